"""Where a provider token may go, and where it must never be written.

A committed .flowforge/config.json is written by anyone who can push: it must
not be able to send every teammate's GITHUB_TOKEN / NOTION_TOKEN to a server of
its choosing.  Only the developer's own environment names a server other than
the public API; the URL is https (http only on loopback); error text that
echoes the token is scrubbed before the queue, a log or a terminal sees it;
issue references with path tricks are refused."""
import glob
import json
import os
import socket

import pytest

import flowforge as ff

from conftest import ROOT
from fakes import FakeGitHub, FakeNotion, FakeServer

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def configure(repo, **sections):
    path = os.path.join(repo.root, ".flowforge/config.json")
    config = json.load(open(path))
    config["plugins"] = sections
    json.dump(config, open(path, "w"), indent=2)


def queue_db(repo):
    return os.path.join(repo.root, ".flowforge/state/queue.db")


def jobs(repo):
    return ff.RetryQueue(queue_db(repo)).jobs()


def dead(repo, env):
    return repo.ok("queue", "dead", "--json", env=env).json["jobs"]


def track(repo, issue, env):
    repo.ok("log", issue, "1h", "--date", "2026-11-19", env=env)
    repo.ok("aggregate", env=env)


@pytest.fixture
def github():
    fake = FakeGitHub()
    yield fake
    fake.close()


@pytest.fixture
def notion():
    fake = FakeNotion()
    yield fake
    fake.close()


def plugin_module(name):
    return ff.Plugin(os.path.join(ROOT, "plugins", name + ".py")).load().module


# -- a committed api_url is not enough ----------------------------------------------

def test_committed_github_api_url_alone_gets_no_request_and_a_one_line_dead_letter(repo, github):
    configure(repo, github={"repository": "acme/app", "api_url": github.url})
    e = dict(NOW, GITHUB_TOKEN=github.token)
    track(repo, "7", e)
    ran = repo.ok("queue", "run", "--json", env=e).json["ran"]
    assert [r["outcome"] for r in ran] == ["dead"]
    assert github.requests == []                                   # not even one connection
    [job] = dead(repo, e)
    reason = job["last_error"]
    assert "\n" not in reason and len(reason) < 400
    assert "refusing plugins.github.api_url" in reason and "set GITHUB_API_URL" in reason
    assert "nothing was sent" in reason
    check = repo("plugins", "check", "--json", env=e).json["plugins"]
    assert "GITHUB_API_URL" in {p["name"]: p for p in check}["github"]["problem"]

    # the developer confirms it in their own environment: now it is used
    e = dict(e, GITHUB_API_URL=github.url)
    repo.ok("queue", "retry", str(job["id"]), env=e)
    assert [r["outcome"] for r in repo.ok("queue", "run", "--json", env=e).json["ran"]] == ["done"]
    assert len(github.ours("acme/app", 7)) == 1
    assert repo("plugins", "check", env=e).rc == 0


def test_environment_that_disagrees_with_the_committed_url_is_refused(repo, github):
    other = FakeGitHub()
    try:
        configure(repo, github={"repository": "acme/app", "api_url": other.url})
        e = dict(NOW, GITHUB_TOKEN=github.token, GITHUB_API_URL=github.url)
        track(repo, "7", e)
        assert repo.ok("queue", "run", "--json", env=e).json["ran"][0]["outcome"] == "dead"
        assert github.requests == [] and other.requests == []
        [job] = dead(repo, e)
        assert "does not match GITHUB_API_URL" in job["last_error"]
    finally:
        other.close()


def test_committed_public_api_needs_no_confirmation(repo, monkeypatch):
    github = plugin_module("github")
    monkeypatch.delenv("GITHUB_API_URL", raising=False)
    assert github.api_base({}) == "https://api.github.com"
    assert github.api_base({"api_url": "https://api.github.com/"}) == "https://api.github.com"
    monkeypatch.setenv("GITHUB_API_URL", "https://ghe.example.com/api/v3/")
    assert github.api_base({}) == "https://ghe.example.com/api/v3"
    assert github.api_base({"api_url": "https://GHE.example.com/api/v3"}) == \
        "https://ghe.example.com/api/v3"


def test_committed_notion_api_url_alone_gets_no_request(repo, notion):
    notion.add_page("5")
    configure(repo, notion={"database_id": "db1", "api_url": notion.url + "/v1"})
    e = dict(NOW, NOTION_TOKEN=notion.token)
    track(repo, "5", e)
    assert repo.ok("queue", "run", "--json", env=e).json["ran"][0]["outcome"] == "dead"
    assert notion.requests == []
    [job] = dead(repo, e)
    assert "\n" not in job["last_error"]
    assert "refusing plugins.notion.api_url" in job["last_error"]
    assert "set FLOWFORGE_NOTION_API_URL" in job["last_error"]
    ff.RetryQueue(queue_db(repo)).retry(job["id"])        # confirmed: now it is used
    e1 = dict(e, FLOWFORGE_NOTION_API_URL=notion.url + "/v1/")
    assert repo.ok("queue", "run", "--json", env=e1).json["ran"][0]["outcome"] == "done"
    notion.add_page("6")
    e2 = dict(e, NOTION_API_URL=notion.url + "/v1")             # the other name works too
    track(repo, "6", e2)
    assert repo.ok("queue", "run", "--json", env=e2).json["ran"][0]["outcome"] == "done"
    assert [u[0] for u in notion.updates] == ["page-1", "page-2"]


# -- https, or http on loopback only ---------------------------------------------------

@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://127.9.9.9", "http://[::1]:9/v1",
                                 "http://localhost:1234/api/v3", "https://ghe.example.com/api/v3"])
def test_https_or_loopback_http_is_accepted(url):
    for name in ("github", "notion"):
        assert plugin_module(name).base_url(url, "X") == url


@pytest.mark.parametrize("url,why", [
    ("http://example.com", "must be https"),
    ("http://10.0.0.1:8080", "must be https"),
    ("http://127.0.0.1.nip.io", "must be https"),
    ("http://0x7f.1", "must be https"),
    ("ftp://127.0.0.1", "must be an https"),
    ("https://me:hunter2@ghe.example.com", "user name or password"),
    ("https://ghe.example.com/api/v3?x=1", "plain base URL"),
    ("https://ghe.example.com/%2e%2e/", "plain base URL"),
    ("https://ghe.example.com/api/../v3", ". or .."),
    ("https://", "must be an https"),
])
def test_other_urls_are_refused(url, why):
    for name in ("github", "notion"):
        with pytest.raises(ff.PermanentFailure, match=why) as e:
            plugin_module(name).base_url(url, "X")
        assert "hunter2" not in str(e.value)


class NoNetwork:
    """Every way urllib could connect, recorded and refused."""

    def __init__(self, monkeypatch):
        self.calls = []

        def refuse(*args, **kwargs):
            self.calls.append(args)
            raise AssertionError("connected")
        monkeypatch.setattr(ff._Exchange, "opener", lambda self: type("Refuse", (), {"open": refuse})())
        monkeypatch.setattr(socket, "create_connection", refuse)
        monkeypatch.setattr(socket, "getaddrinfo", refuse)


def run_one(repo):
    queue = ff.RetryQueue(queue_db(repo))
    outcome = ff.run_job(ff.Repo(repo.root), queue, queue.claim("test"))
    return outcome, queue.jobs()[0]


@pytest.mark.parametrize("plugin,section,variable,url", [
    ("github", {"repository": "acme/app"}, "GITHUB_API_URL", "http://ghe.example.com/api/v3"),
    ("github", {"repository": "acme/app", "api_url": "http://10.1.2.3"}, "GITHUB_API_URL",
     "http://10.1.2.3"),
    ("notion", {"database_id": "db1"}, "FLOWFORGE_NOTION_API_URL", "http://notion.example/v1"),
    ("notion", {"database_id": "db1"}, "NOTION_API_URL", "http://192.168.0.9/v1"),
])
def test_plain_http_to_another_host_is_refused_without_connecting(repo, monkeypatch, plugin,
                                                                 section, variable, url):
    configure(repo, **{plugin: section})
    track(repo, "7", NOW)
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_x")
    monkeypatch.setenv("NOTION_TOKEN", "ntn_x")
    monkeypatch.setenv(variable, url)
    net = NoNetwork(monkeypatch)
    outcome, job = run_one(repo)
    assert outcome == "dead" and net.calls == []
    assert "must be https://" in job["last_error"] and variable in job["last_error"]


# -- the token is scrubbed from whatever a server says ----------------------------------

class EchoGitHub(FakeServer):
    """A server that echoes the Authorization header back, in every way a
    message could be cut from: JSON message, errors list, a raw body cut at 200
    characters, and the host of a redirect."""

    def route(self, method, path, headers, body):
        auth = headers.get("Authorization", "")
        token = auth.split(" ", 1)[-1]
        if "/issues/7/" in path:
            return 401, {}, {"message": "Bad credentials: you sent %s" % auth}
        if "/issues/8/" in path:
            return 502, {}, "x" * 185 + auth + " and more"          # the token straddles 200
        if "/issues/9/" in path:
            return 422, {}, {"message": "Validation Failed",
                             "errors": [{"message": "header was %s" % auth}]}
        if "/issues/10/" in path:
            return 307, {"Location": "http://%s.invalid/x" % token}, None
        if "/issues/11/" in path:
            return 401, {}, {"message": "bad %s" % json.dumps(token.upper()).strip('"')}
        return 404, {}, {"message": "Not Found %s" % auth}


class EchoNotion(FakeServer):
    def route(self, method, path, headers, body):
        auth = headers.get("Authorization", "")
        return 401, {}, {"object": "error", "status": 401, "code": "unauthorized " + auth,
                         "message": "API token %s is invalid." % auth}


def files_under(path):
    return [f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
            if os.path.isfile(f)]


def assert_nowhere(repo, marker, outputs):
    db = glob.glob(queue_db(repo) + "*")                         # queue.db and its -wal
    assert db
    for path in db + files_under(os.path.join(repo.root, ".flowforge")) + files_under(repo.home):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            continue    # a -shm or -wal file that SQLite removed as the last connection closed
        assert marker.encode() not in data and marker.upper().encode() not in data, path
        assert marker[:12].encode() not in data, path            # not even a cut-off piece
    for r in outputs:
        assert marker not in r.out + r.err and marker.upper() not in r.out + r.err
        assert marker[:12] not in r.out + r.err


def test_an_echoing_github_never_gets_the_token_stored_or_shown(repo):
    marker = "ghp_SECRET" + os.urandom(8).hex()
    echo = EchoGitHub()
    try:
        configure(repo, github={"repository": "acme/app"})
        e = dict(NOW, GITHUB_TOKEN=marker, GITHUB_API_URL=echo.url)
        out = []
        for issue in ("7", "8", "9", "10", "11"):
            out.append(repo.ok("log", issue, "1h", "--date", "2026-11-19", env=e))
        out.append(repo.ok("aggregate", env=e))
        out.append(repo.ok("queue", "run", "-v", env=e))
        out.append(repo("queue", "list", env=e))
        out.append(repo("queue", "dead", "--json", env=e))
        out.append(repo("health", "--json", env=e))
        out.append(repo("plugins", "check", env=e))
        assert len(echo.requests) == 5
        assert all(r[2]["authorization"] == "Bearer " + marker for r in echo.requests)
    finally:
        echo.close()
    errors = {j["payload"]["issue"]: j["last_error"] for j in jobs(repo)}
    assert "Bad credentials: you sent Bearer [token]" in errors["7"]
    assert "GitHub 502" in errors["8"] and "Bearer [token" in errors["8"]
    assert "header was Bearer [token]" in errors["9"]
    assert "another host: [token].invalid" in errors["10"]
    assert "bad [token]" in errors["11"]
    assert_nowhere(repo, marker, out)


def test_an_echoing_notion_never_gets_the_token_stored_or_shown(repo):
    marker = "ntn_SECRET" + os.urandom(8).hex()
    echo = EchoNotion()
    try:
        configure(repo, notion={"database_id": "db1"})
        e = dict(NOW, NOTION_TOKEN=marker, FLOWFORGE_NOTION_API_URL=echo.url + "/v1")
        out = [repo.ok("log", "5", "1h", "--date", "2026-11-19", env=e),
               repo.ok("aggregate", env=e),
               repo.ok("queue", "run", "-v", env=e),
               repo("queue", "dead", "--json", env=e)]
        assert len(echo.requests) == 1
    finally:
        echo.close()
    [job] = jobs(repo)
    assert job["status"] == "dead"
    assert "unauthorized Bearer [token]" in job["last_error"]
    assert "API token Bearer [token] is invalid" in job["last_error"]
    assert_nowhere(repo, marker, out)


@pytest.mark.parametrize("name", ["github", "notion"])
def test_any_other_exception_that_carries_the_token_is_scrubbed(repo, monkeypatch, name):
    module = plugin_module(name)
    secret = "tok_SECRET" + os.urandom(6).hex()
    monkeypatch.setenv("GITHUB_TOKEN", secret)
    monkeypatch.setenv("NOTION_TOKEN", secret)
    monkeypatch.delenv("GITHUB_API_URL", raising=False)

    class Boom:
        def __init__(self, *args, **kwargs):
            pass

        def request(self, *args, **kwargs):
            raise ValueError("the server said %s%r" % ("x" * 290, secret))   # across 300
    config = {"repository": "acme/app", "database_id": "db1"}
    ff_repo = ff.Repo(repo.root)
    with pytest.raises(Exception) as e:
        module.sync(repo=ff_repo, issue="7", config=config, http=Boom, state={})
    assert secret[:8] not in str(e.value) and secret[:8] not in repr(e.value)
    assert "[token]" in str(e.value)
    assert e.value.__suppress_context__ and "ValueError" in str(e.value)


# -- issue references and ids with path tricks ------------------------------------------

@pytest.mark.parametrize("issue", ["a/..#1", "a/.#1", "a/...#1", "../b#1", ".github/x#1",
                                   "a/%2e%2e#1", "a%2Fb/c#1", "a/b/c#1", "a/b#1/../2",
                                   "a/b#\u0661", "a/b#", "/b#1", "a/#1", "a\\b/c#1", "a/b?x#1"])
def test_issue_references_with_path_tricks_are_refused(repo, github, issue):
    configure(repo, github={"repository": "acme/app"})
    e = dict(NOW, GITHUB_TOKEN=github.token, GITHUB_API_URL=github.url)
    module = plugin_module("github")
    ff_repo = ff.Repo(repo.root)
    assert module.github_issue(ff_repo, issue, {"repository": "acme/app"}) is None
    os.environ.update(NOW)
    try:
        ff.enqueue_sync(ff_repo, "github", issue)       # say a teammate's shard named it
    finally:
        del os.environ["FLOWFORGE_NOW"]
    ran = repo.ok("queue", "run", "--json", env=e).json["ran"]
    assert [r["outcome"] for r in ran] == ["dead"] and github.requests == []
    [job] = dead(repo, e)
    assert "refusing issue reference" in job["last_error"] and "\n" not in job["last_error"]


def test_a_dotted_issue_is_refused_and_a_dotted_repository_name_is_not(repo, github):
    configure(repo, github={"repository": "acme/app"})
    e = dict(NOW, GITHUB_TOKEN=github.token, GITHUB_API_URL=github.url)
    r = repo("log", "a/..#1", "1h", "--date", "2026-11-19", env=e)   # refused at the door
    assert r.rc == 64 and "not valid" in r.err, r
    assert jobs(repo) == []
    track(repo, "acme/.github#3", e)                    # dots inside a name are GitHub's own
    assert [j["payload"]["issue"] for j in jobs(repo)] == ["acme/.github#3"]


@pytest.mark.parametrize("where", ["config", "environment"])
def test_a_default_repository_with_path_tricks_is_refused(repo, github, where):
    section = {"repository": "acme/.."} if where == "config" else {}
    configure(repo, github=section)
    e = dict(NOW, GITHUB_TOKEN=github.token, GITHUB_API_URL=github.url)
    if where == "environment":
        e["GITHUB_REPOSITORY"] = "acme/.."
    ff_repo = ff.Repo(repo.root)
    os.environ.update(NOW)
    try:
        ff.enqueue_sync(ff_repo, "github", "7")
    finally:
        del os.environ["FLOWFORGE_NOW"]
    assert repo.ok("queue", "run", "--json", env=e).json["ran"][0]["outcome"] == "dead"
    assert github.requests == []
    [job] = dead(repo, e)
    assert "is not a GitHub owner/repo name" in job["last_error"]
    assert "not a GitHub owner/repo name" in repo("plugins", "check", env=e).out


@pytest.mark.parametrize("field,value", [("database_id", "../pages/x"), ("database_id", "db1%2f.."),
                                         ("data_source_id", "ds1/../../users")])
def test_notion_ids_with_path_tricks_are_refused(repo, notion, field, value):
    notion.add_page("5")
    configure(repo, notion=dict({"database_id": "db1"}, **{field: value}))
    e = dict(NOW, NOTION_TOKEN=notion.token, FLOWFORGE_NOTION_API_URL=notion.url + "/v1")
    track(repo, "5", e)
    assert repo.ok("queue", "run", "--json", env=e).json["ran"][0]["outcome"] == "dead"
    assert notion.requests == []
    [job] = dead(repo, e)
    assert "is not a Notion id" in job["last_error"]


@pytest.mark.parametrize("committed", ["http://collector.example:8080", "https://collector.example",
                                       "http://127.0.0.1:9/x?y", 42])
def test_any_committed_server_says_which_setting_to_use(repo, monkeypatch, committed):
    configure(repo, github={"repository": "acme/app", "api_url": committed})
    track(repo, "7", NOW)
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_x")
    monkeypatch.delenv("GITHUB_API_URL", raising=False)
    net = NoNetwork(monkeypatch)
    outcome, job = run_one(repo)
    assert outcome == "dead" and net.calls == []
    reason = job["last_error"]
    assert reason.startswith("refusing plugins.github.api_url in config.json")
    assert "set GITHUB_API_URL" in reason and "nothing was sent" in reason and "\n" not in reason
