"""The Notion plugin against a loopback fake: hours and a date on each issue's page."""
import json
import os

import pytest

import flowforge as ff

from fakes import FakeNotion

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


@pytest.fixture
def notion():
    fake = FakeNotion()
    yield fake
    fake.close()


def enable(repo, notion, **extra):
    """The committed config names no server: the fake's URL comes from the
    environment (FLOWFORGE_NOTION_API_URL)."""
    path = os.path.join(repo.root, ".flowforge/config.json")
    config = json.load(open(path))
    config["plugins"] = {"notion": dict({"database_id": "db1"}, **extra)}
    json.dump(config, open(path, "w"), indent=2)


def env(notion):
    return dict(NOW, NOTION_TOKEN=notion.token, FLOWFORGE_NOTION_API_URL=notion.url + "/v1")


def track(repo, issue, minutes, notion, day="2026-11-19"):
    repo.ok("log", issue, "%dm" % minutes, "--date", day, env=env(notion))
    repo.ok("aggregate", env=env(notion))


def run_queue(repo, notion):
    return [r["outcome"] for r in repo.ok("queue", "run", "--json", env=env(notion)).json["ran"]]


class Clock:
    def __init__(self):
        self.t = 2_000_000_000.0

    def __call__(self):
        return self.t


def run_in_process(repo, notion, monkeypatch, clock=None):
    monkeypatch.setenv("NOTION_TOKEN", notion.token)
    monkeypatch.setenv("FLOWFORGE_NOTION_API_URL", notion.url + "/v1")
    queue = ff.RetryQueue(os.path.join(repo.root, ".flowforge/state/queue.db"), clock=clock or Clock())
    outcome = ff.run_job(ff.Repo(repo.root), queue, queue.claim("test"))
    return outcome, queue.jobs()[0]


def test_hours_and_date_on_the_issues_page(repo, notion):
    page = notion.add_page("owner/repo#12")
    enable(repo, notion)
    track(repo, "owner/repo#12", 75, notion, day="2026-11-18")
    track(repo, "owner/repo#12", 20, notion)
    assert run_queue(repo, notion) == ["done"]
    [(updated, properties)] = notion.updates
    assert updated == page
    assert properties == {"Hours": {"number": 1.58}, "Last tracked": {"date": {"start": "2026-11-19"}}}
    paths = [(r[0], r[1]) for r in notion.requests]
    assert paths == [("GET", "/v1/databases/db1"), ("POST", "/v1/data_sources/ds1/query"),
                     ("PATCH", "/v1/pages/%s" % page)]
    query = notion.requests[1][3]
    assert query["filter"] == {"property": "FF Key", "rich_text": {"equals": "owner/repo#12"}}
    for _, _, headers, _ in notion.requests:
        assert headers["notion-version"] == "2026-03-11"
        assert headers["authorization"] == "Bearer " + notion.token


def test_cached_ids_then_no_request_when_unchanged(repo, notion):
    notion.add_page("5")
    enable(repo, notion)
    track(repo, "5", 60, notion)
    run_queue(repo, notion)
    track(repo, "5", 30, notion)
    before = len(notion.requests)
    run_queue(repo, notion)
    assert [r[0] for r in notion.requests[before:]] == ["PATCH"]     # ids cached
    before = len(notion.requests)
    os.environ.update(NOW)
    try:
        ff.enqueue_sync(ff.Repo(repo.root), "notion", "5")
    finally:
        del os.environ["FLOWFORGE_NOW"]
    assert run_queue(repo, notion) == ["done"]
    assert len(notion.requests) == before                          # unchanged: no request


def test_no_page_means_nothing_written(repo, notion):
    enable(repo, notion)
    track(repo, "77", 60, notion)
    assert run_queue(repo, notion) == ["done"]
    assert notion.updates == [] and notion.count("PATCH") == 0


@pytest.mark.parametrize("status,code,after", [(429, "rate_limited", 7), (529, "service_overload", 3)])
def test_rate_limits_wait_as_notion_asks(repo, notion, monkeypatch, status, code, after):
    notion.add_page("5")
    enable(repo, notion)
    track(repo, "5", 60, notion)
    notion.script.append(("PATCH", "/pages/", status, {"Retry-After": str(after)},
                          {"object": "error", "status": status, "code": code,
                           "message": "You have been rate limited.",
                           "additional_data": {"rate_limit_reason": "public_api_request_rate_limit"}}))
    clock = Clock()
    outcome, job = run_in_process(repo, notion, monkeypatch, clock)
    assert outcome == "queued" and code in job["last_error"]
    assert after - 0.01 <= job["next_attempt_at"] - clock.t <= max(after, 2) + 0.01
    clock.t = job["next_attempt_at"]
    assert run_in_process(repo, notion, monkeypatch, clock)[0] == "done"
    assert len(notion.updates) == 1


def test_conflict_reads_again_and_retries(repo, notion, monkeypatch):
    notion.add_page("5")
    enable(repo, notion)
    track(repo, "5", 60, notion)
    notion.script.append(("PATCH", "/pages/", 409, {}, {
        "object": "error", "status": 409, "code": "conflict_error",
        "message": "Conflict occurred while saving. Please try again."}))
    outcome, _ = run_in_process(repo, notion, monkeypatch)
    assert outcome == "done" and len(notion.updates) == 1
    assert [r[0] for r in notion.requests].count("POST") == 2          # looked the page up again


@pytest.mark.parametrize("status,code,message", [
    (400, "validation_error", "body failed validation: body.properties.Hours.number should be a number"),
    (401, "unauthorized", "API token is invalid."),
    (403, "restricted_resource", "Insufficient permissions for this endpoint."),
    (404, "object_not_found", "Could not find page with ID: x."),
])
def test_permanent_failures_carry_notions_message(repo, notion, monkeypatch, status, code, message):
    notion.add_page("5")
    enable(repo, notion)
    track(repo, "5", 60, notion)
    notion.script.append(("PATCH", "/pages/", status, {}, {"object": "error", "status": status,
                                                           "code": code, "message": message}))
    outcome, job = run_in_process(repo, notion, monkeypatch)
    assert outcome == "dead" and message in job["last_error"] and code in job["last_error"]


def test_a_vanished_cached_page_is_looked_up_again(repo, notion, monkeypatch):
    old = notion.add_page("5")
    enable(repo, notion)
    track(repo, "5", 60, notion)
    run_queue(repo, notion)
    del notion.pages[old]
    new = notion.add_page("5", page_id="page-new")
    track(repo, "5", 60, notion)
    assert run_queue(repo, notion) == ["done"]
    assert notion.updates[-1][0] == new


def test_at_most_three_requests_a_second(repo, notion, monkeypatch):
    notion.add_page("5")
    enable(repo, notion)
    track(repo, "5", 60, notion)
    clock, sleeps = [100.0], []

    def sleep(seconds):
        sleeps.append(seconds)
        clock[0] += seconds
    monkeypatch.setattr(ff.Http, "clock", staticmethod(lambda: clock[0]))
    monkeypatch.setattr(ff.Http, "sleep", staticmethod(sleep))
    monkeypatch.setattr(ff.Http, "_last_request", {})
    outcome, _ = run_in_process(repo, notion, monkeypatch)
    assert outcome == "done" and notion.count() == 3
    assert len(sleeps) == 2 and all(abs(s - 1 / 3) < 1e-9 for s in sleeps)   # spaced 1/3 s


def test_a_page_on_a_later_cursor_is_found(repo, notion):
    """Notion may answer a query with fewer results than page_size -- even none --
    and has_more: the lookup follows next_cursor until the page comes."""
    page = notion.add_page("5")
    notion.chunks = [0, 0, 0]              # three empty pages with has_more first
    enable(repo, notion)
    track(repo, "5", 60, notion)
    assert run_queue(repo, notion) == ["done"]
    assert [u[0] for u in notion.updates] == [page]
    queries = [r[3] for r in notion.requests if r[0] == "POST"]
    assert len(queries) == 4 and "start_cursor" not in queries[0]
    assert all(q["start_cursor"] == "0" for q in queries[1:])


def test_three_requests_a_second_hold_across_jobs(repo, notion, monkeypatch):
    for issue in ("5", "6"):
        notion.add_page(issue)
    enable(repo, notion)
    track(repo, "5", 60, notion)
    track(repo, "6", 60, notion)
    clock, stamps = [100.0], []

    def sleep(seconds):
        clock[0] += seconds
    monkeypatch.setattr(ff.Http, "clock", staticmethod(lambda: clock[0]))
    monkeypatch.setattr(ff.Http, "sleep", staticmethod(sleep))
    monkeypatch.setattr(ff.Http, "_last_request", {})
    original = ff.Http._throttle

    def throttle(self):
        original(self)
        stamps.append(clock[0])
    monkeypatch.setattr(ff.Http, "_throttle", throttle)
    monkeypatch.setenv("NOTION_TOKEN", notion.token)
    monkeypatch.setenv("FLOWFORGE_NOTION_API_URL", notion.url + "/v1")
    queue = ff.RetryQueue(os.path.join(repo.root, ".flowforge/state/queue.db"), clock=Clock())
    for _ in range(2):                     # two jobs, one after the other, in one process
        assert ff.run_job(ff.Repo(repo.root), queue, queue.claim("test")) == "done"
    assert len(stamps) == 5                # GET, query, PATCH; then query, PATCH (cached source)
    assert all(b - a >= 1 / 3 - 1e-9 for a, b in zip(stamps, stamps[1:])), stamps


def test_legacy_versions_query_the_database(repo, notion):
    page = notion.add_page("5")
    enable(repo, notion, notion_version="2022-06-28")
    track(repo, "5", 60, notion)
    assert run_queue(repo, notion) == ["done"]
    assert [r[1] for r in notion.requests] == ["/v1/databases/db1/query", "/v1/pages/%s" % page]
    assert notion.requests[0][2]["notion-version"] == "2022-06-28"


def test_notion_token_never_leaks(repo):
    marker = "ntn_SECRET%s" % os.urandom(8).hex()
    notion = FakeNotion(token="other")
    try:
        notion.add_page("5")
        enable(repo, notion)
        e = dict(NOW, NOTION_TOKEN=marker, FLOWFORGE_NOTION_API_URL=notion.url + "/v1")
        out = [repo.ok("log", "5", "1h", env=e),
               repo.ok("aggregate", env=e),
               repo.ok("queue", "run", "-v", env=e),
               repo("queue", "dead", "--json", env=e)]
        assert "unauthorized" in out[-1].out
    finally:
        notion.close()
    for r in out:
        assert marker not in r.out + r.err
    for dirpath, _, files in os.walk(os.path.join(repo.root, ".flowforge")):
        for name in files:
            assert marker.encode() not in open(os.path.join(dirpath, name), "rb").read(), name


def test_plugins_check_online_reads_the_database(repo, notion):
    enable(repo, notion)
    r = repo.ok("plugins", "check", "--online", env=env(notion))
    assert "token from NOTION_TOKEN" in r.out and "online: GET /databases/db1 answered" in r.out
    assert [(q[0], q[1]) for q in notion.requests] == [("GET", "/v1/databases/db1")]
    r = repo("plugins", "check", "--online", env=dict(env(notion), NOTION_TOKEN="ntn_wrong"))
    assert r.rc == 1 and "API token is invalid" in r.out and "ntn_wrong" not in r.out + r.err
