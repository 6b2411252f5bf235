"""The GitLab plugin against a loopback fake of GitLab's GraphQL API: one
timelog per (developer's store, day, issue), rewritten only for the days that
changed -- one mutation request per changed day (its timelogDelete and its
timelogCreate together), nothing at all for an unchanged issue."""
import hashlib
import json
import os

import pytest

import flowforge as ff

from fake_gitlab import FakeGitLab, Raw, epoch, parse_duration, top_fields

NOW = "2026-11-20T18:00:00Z"
STATE = ".flowforge/state/plugins/gitlab.json"


@pytest.fixture
def gitlab():
    fake = FakeGitLab(now=NOW)
    fake.add_issue("acme/app", 12)
    yield fake
    fake.close()


def plugin():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gitlab_plugin", os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plugins", "gitlab.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def enable(repo, **extra):
    """The committed config names no server: the fake's URL comes from the
    environment (GITLAB_URL), as a self-managed GitLab's would."""
    path = os.path.join(repo.root, ".flowforge/config.json")
    config = json.load(open(path))
    config["plugins"] = {"gitlab": dict({"project": "acme/app"}, **extra)}
    json.dump(config, open(path, "w"), indent=2)


def env(gitlab, **extra):
    return dict({"FLOWFORGE_NOW": NOW, "GITLAB_TOKEN": gitlab.token, "GITLAB_URL": gitlab.url},
                **extra)


def log(repo, gitlab, issue, duration, day, user="alice"):
    repo.ok("log", issue, duration, "--date", day, user=user, env=env(gitlab))


def aggregate(repo, gitlab, user="alice"):
    repo.ok("aggregate", user=user, env=env(gitlab))


def run_queue(repo, gitlab, **extra):
    r = repo.ok("queue", "run", "--json", env=env(gitlab, **extra))
    return [j["outcome"] for j in r.json["ran"]]


def jobs(repo):
    return ff.RetryQueue(os.path.join(repo.root, ".flowforge/state/queue.db")).jobs()


def enqueue(repo, issue="12"):
    os.environ["FLOWFORGE_NOW"] = NOW
    try:
        ff.enqueue_sync(ff.Repo(repo.root), "gitlab", issue)
    finally:
        del os.environ["FLOWFORGE_NOW"]


def key_of(repo, day, issue="12", user="alice"):
    store = ff.PrivateStore(ff.Repo(repo.root), user).store_id
    return "[flowforge:v1 %s--%s %s %s]" % (user, store, day,
                                           hashlib.sha256(issue.encode()).hexdigest()[:8])


def by_day(gitlab, user="alice"):
    """{day of the key: (seconds, spentAt, summary)} of the timelogs `user` has on acme/app#12."""
    out = {}
    for t in gitlab.timelogs("acme/app", 12, user):
        day = t["summary"].split()[-2]
        assert day not in out, "two timelogs for %s" % day
        out[day] = (t["timeSpent"], t["spentAt"], t["summary"])
    return out


class Clock:
    def __init__(self):
        self.t = 2_000_000_000.0

    def __call__(self):
        return self.t


def run_in_process(repo, gitlab, monkeypatch, clock, token=None):
    """Run the queued job here, with a fake clock for the queue."""
    monkeypatch.setenv("GITLAB_TOKEN", token or gitlab.token)
    monkeypatch.setenv("GITLAB_URL", gitlab.url)
    monkeypatch.setenv("FLOWFORGE_NOW", NOW)
    queue = ff.RetryQueue(os.path.join(repo.root, ".flowforge/state/queue.db"), clock=clock)
    job = queue.claim("test")
    assert job is not None
    outcome = ff.run_job(ff.Repo(repo.root), queue, job)
    return outcome, queue.jobs()[0]


# -- writing ---------------------------------------------------------------------


def test_first_sync_writes_one_timelog_per_day_then_unchanged_sends_nothing(repo, gitlab):
    enable(repo)
    log(repo, gitlab, "#12", "1h30m", "2026-11-18")
    log(repo, gitlab, "12", "30m15s", "2026-11-19")
    log(repo, gitlab, "ABC-3", "1h", "2026-11-19")            # a Jira key: not GitLab's
    aggregate(repo, gitlab)
    assert [j["payload"]["issue"] for j in jobs(repo)] == ["12"]
    assert run_queue(repo, gitlab) == ["done"]
    # one read, then one mutation request per day, each a single timelogCreate
    assert [(kind, fields) for kind, fields, _ in gitlab.calls()] == [
        ("query", ["currentUser", "project"]),
        ("mutation", ["timelogCreate"]), ("mutation", ["timelogCreate"])]
    created = [v["c"] for _, _, v in gitlab.writes()]
    assert [c["timeSpent"] for c in created] == ["1h 30m", "30m 15s"]
    assert all(c["issuableId"] == gitlab.issue("acme/app", 12)["id"] for c in created)
    assert by_day(gitlab) == {
        "2026-11-18": (5400, "2026-11-18T12:00:00Z",
                       "FlowForge: time of alice in 2026-11-18 " + key_of(repo, "2026-11-18")),
        "2026-11-19": (1815, "2026-11-19T12:00:00Z",
                       "FlowForge: time of alice in 2026-11-19 " + key_of(repo, "2026-11-19"))}
    for method, path, headers, _ in gitlab.requests:
        assert (method, path) == ("POST", "/api/graphql")
        assert headers["authorization"] == "Bearer " + gitlab.token
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"].startswith("flowforge/")
    # unchanged: the job runs and sends nothing at all
    before = len(gitlab.requests)
    enqueue(repo)
    assert run_queue(repo, gitlab) == ["done"]
    assert len(gitlab.requests) == before
    # without this machine's state: the timelogs are read again, none is written
    os.unlink(os.path.join(repo.root, STATE))
    enqueue(repo)
    assert run_queue(repo, gitlab) == ["done"]
    assert [c[0] for c in gitlab.calls()[before:]] == ["query"]
    assert len(gitlab.timelogs("acme/app", 12)) == 2


def test_a_changed_total_costs_one_mutation_request_for_the_changed_day_only(repo, gitlab):
    enable(repo)
    log(repo, gitlab, "12", "1h", "2026-11-18")
    log(repo, gitlab, "12", "1h", "2026-11-19")
    aggregate(repo, gitlab)
    run_queue(repo, gitlab)
    old = {t["summary"].split()[-2]: t["id"] for t in gitlab.timelogs("acme/app", 12)}
    before = len(gitlab.requests)
    log(repo, gitlab, "12", "15m", "2026-11-19")
    aggregate(repo, gitlab)
    assert run_queue(repo, gitlab) == ["done"]
    new = gitlab.calls()[len(gitlab.calls()) - (len(gitlab.requests) - before):]
    # the changed day: one request, deleting its timelog and creating the new one, in that order
    assert [(kind, fields) for kind, fields, _ in new] == [
        ("query", ["currentUser", "project"]), ("mutation", ["timelogDelete", "timelogCreate"])]
    variables = new[1][2]
    assert variables["d0"] == {"id": old["2026-11-19"]}
    assert variables["c"]["timeSpent"] == "1h 15m" and variables["c"]["spentAt"] == "2026-11-19T12:00:00Z"
    assert by_day(gitlab)["2026-11-19"][0] == 4500
    # the unchanged day keeps its timelog: not deleted, not created again
    assert [t["id"] for t in gitlab.timelogs("acme/app", 12)
            if "2026-11-18" in t["summary"]] == [old["2026-11-18"]]


def test_pagination_across_three_pages_finds_every_timelog_of_ours(repo, gitlab):
    """250 teammates' timelogs: three cursor pages.  Two stale timelogs of ours
    (a race once left both, on pages 1 and 3) go in the day's one request; a
    timelog by another GitLab user that carries our key is not ours."""
    enable(repo)
    log(repo, gitlab, "12", "1h", "2026-11-19")
    key = key_of(repo, "2026-11-19")
    first = gitlab.add_timelog("acme/app", 12, 1800, "FlowForge: time of alice " + key, "alice")
    for n in range(125):
        gitlab.add_timelog("acme/app", 12, 600, "pairing %d" % n, "bob")
    forged = gitlab.add_timelog("acme/app", 12, 3600, "copied " + key, "mallory")
    for n in range(125):
        gitlab.add_timelog("acme/app", 12, 600, "review %d" % n, "bob")
    last = gitlab.add_timelog("acme/app", 12, 1800, "FlowForge: time of alice " + key, "alice")
    aggregate(repo, gitlab)
    assert run_queue(repo, gitlab) == ["done"]
    reads = gitlab.reads()
    assert len(reads) == 3
    assert reads[0][2]["after"] is None and reads[1][2]["after"] and reads[2][2]["after"]
    assert reads[1][2]["after"] != reads[2][2]["after"]
    [(_, fields, variables)] = gitlab.writes()
    assert fields == ["timelogDelete", "timelogDelete", "timelogCreate"]
    assert {variables["d0"]["id"], variables["d1"]["id"]} == {first["id"], last["id"]}
    assert by_day(gitlab)["2026-11-19"][0] == 3600
    assert forged in gitlab.timelogs("acme/app", 12)
    assert len(gitlab.timelogs("acme/app", 12, "bob")) == 250


def test_fifty_stops_make_one_job_and_one_timelog(repo, gitlab):
    enable(repo)
    for n in range(50):
        repo.ok("start", "#12", "--at", "2026-11-19 08:%02d" % n, env=env(gitlab))
        repo.ok("stop", "--at", "2026-11-19 08:%02d:30" % n, env=env(gitlab))
    assert len(jobs(repo)) == 1
    aggregate(repo, gitlab)
    assert len(jobs(repo)) == 1
    assert run_queue(repo, gitlab) == ["done"]
    assert [c[1] for c in gitlab.calls()] == [["currentUser", "project"], ["timelogCreate"]]
    assert by_day(gitlab) == {"2026-11-19": (1500, "2026-11-19T12:00:00Z", by_day(gitlab)[
        "2026-11-19"][2])}


# -- failures --------------------------------------------------------------------


def test_a_lost_response_is_not_written_twice(repo, gitlab, monkeypatch):
    enable(repo, timeout=0.5)
    log(repo, gitlab, "12", "1h", "2026-11-19")
    aggregate(repo, gitlab)
    gitlab.slow["timelogCreate"] = 1.5          # GitLab creates it; the answer never arrives
    clock = Clock()
    outcome, job = run_in_process(repo, gitlab, monkeypatch, clock)
    assert outcome == "queued" and "no complete answer within 0.5 s" in job["last_error"]
    assert len(gitlab.timelogs("acme/app", 12)) == 1
    gitlab.slow.clear()
    before = len(gitlab.calls())
    clock.t = job["next_attempt_at"]
    outcome, job = run_in_process(repo, gitlab, monkeypatch, clock)
    assert outcome == "done"
    assert [c[0] for c in gitlab.calls()[before:]] == ["query"]   # found it: nothing written
    assert gitlab.count_field("timelogCreate") == 1
    assert by_day(gitlab)["2026-11-19"][0] == 3600
    # a rewrite whose answer is lost, then the ledger goes back to what was synced
    # before: GitLab holds the lost rewrite, so the next sync must look, not trust
    entry = repo.ok("log", "12", "15m", "--date", "2026-11-19", env=env(gitlab)).out
    aggregate(repo, gitlab)
    gitlab.slow["timelogCreate"] = 1.5
    clock.t += 10
    assert run_in_process(repo, gitlab, monkeypatch, clock)[0] == "queued"
    assert by_day(gitlab)["2026-11-19"][0] == 4500
    gitlab.slow.clear()
    repo.ok("delete", entry.rsplit("(", 1)[1].split(")")[0], env=env(gitlab))
    aggregate(repo, gitlab)
    clock.t += 3600
    assert run_in_process(repo, gitlab, monkeypatch, clock)[0] == "done"
    assert by_day(gitlab)["2026-11-19"][0] == 3600
    assert len(gitlab.timelogs("acme/app", 12)) == 1


@pytest.mark.parametrize("case", ["throttled", "remaining-zero", "reset-only", "no-headers"])
def test_rate_limits_wait_as_long_as_gitlab_says(repo, gitlab, monkeypatch, case):
    enable(repo)
    log(repo, gitlab, "12", "1h", "2026-11-19")
    aggregate(repo, gitlab)
    if case == "throttled":                     # Rack::Attack: 429, Retry later, Retry-After
        gitlab.limit, gitlab.window, after, text = 0, 45, 45, "GitLab 429 on reading"
    elif case == "remaining-zero":              # the read used the last request of the window
        gitlab.limit, gitlab.window, after, text = 1, 120, 120, "RateLimit-Remaining: 0"
    elif case == "reset-only":                  # an application limit: JSON errors, RateLimit-Reset
        gitlab.canned.append(("timelogCreate", 429, {"RateLimit-Reset": str(epoch(NOW) + 90)},
                              {"errors": [{"message": "This endpoint has been requested too many "
                                                      "times. Try again later."}]}))
        after, text = 90, "requested too many times"
    else:                                       # 429 and nothing to go by: a minute
        gitlab.canned.append(("timelogCreate", 429, {"RateLimit-Reset": None}, Raw(b"Retry later\n")))
        after, text = 60, "GitLab 429"
    clock = Clock()
    outcome, job = run_in_process(repo, gitlab, monkeypatch, clock)
    assert outcome == "queued" and text in job["last_error"]
    assert job["next_attempt_at"] - clock.t == pytest.approx(after, abs=1)
    if case in ("throttled", "remaining-zero"):
        assert gitlab.writes() == []            # nothing sent into a refusal
    assert gitlab.timelogs("acme/app", 12) == []
    gitlab.limit, gitlab.observed = 2000, 0     # the window has passed
    clock.t = job["next_attempt_at"]
    outcome, job = run_in_process(repo, gitlab, monkeypatch, clock)
    assert outcome == "done" and by_day(gitlab)["2026-11-19"][0] == 3600


@pytest.mark.parametrize("case,text", [
    ("token", "GitLab 401 on reading the timelogs of acme/app#12: Invalid token"),
    ("project", "GitLab has no project acme/gone, or the token cannot see it"),
    ("issue", "GitLab has no issue acme/app#99, or the token cannot see it"),
])
def test_auth_failures_and_unknown_issues_are_dead_lettered(repo, gitlab, monkeypatch, case, text):
    enable(repo, project="acme/gone" if case == "project" else "acme/app")
    log(repo, gitlab, "99" if case == "issue" else "12", "1h", "2026-11-19")
    aggregate(repo, gitlab)
    outcome, job = run_in_process(repo, gitlab, monkeypatch, Clock(),
                                  token="glpat-revoked" if case == "token" else None)
    assert outcome == "dead" and job["last_error"] == text
    assert gitlab.writes() == [] and len(gitlab.reads()) == 1


def test_no_token_or_a_committed_url_is_refused_without_a_request(repo, gitlab):
    enable(repo)
    log(repo, gitlab, "12", "1h", "2026-11-19")
    aggregate(repo, gitlab)
    assert run_queue(repo, gitlab, GITLAB_TOKEN="") == ["dead"]
    assert "no GITLAB_TOKEN" in jobs(repo)[0]["last_error"]
    enable(repo, api_url=gitlab.url)            # committed, not confirmed by the environment
    enqueue(repo)
    r = repo.ok("queue", "run", "--json", env={"FLOWFORGE_NOW": NOW, "GITLAB_TOKEN": gitlab.token})
    assert [j["outcome"] for j in r.json["ran"]] == ["dead"]
    newest = max(jobs(repo), key=lambda j: j["id"])["last_error"]
    assert "refusing plugins.gitlab.api_url in config.json" in newest and "set GITLAB_URL to its" in newest
    assert gitlab.requests == []


def test_the_token_never_reaches_disk_logs_queue_or_stderr(repo, tmp_path):
    marker = "glpat-SECRET%s" % os.urandom(8).hex()
    gitlab = FakeGitLab(token="something-else", now=NOW)   # every request: 401 Invalid token
    gitlab.echo_token = True                                # ... which repeats the token it got
    gitlab.add_issue("acme/app", 12)
    try:
        enable(repo)
        e = dict(env(gitlab), GITLAB_TOKEN=marker)
        outputs = [repo.ok("log", "12", "1h", "--date", "2026-11-19", env=e),
                   repo.ok("aggregate", env=e),
                   repo.ok("queue", "run", "-v", env=e),
                   repo("plugins", "check", "--online", env=e),
                   repo("queue", "dead", "--json", env=e),
                   repo("health", "--json", env=e)]
        assert "Invalid token" in outputs[4].out and "[token]" in outputs[4].out   # it happened
        assert any(h.get("authorization") == "Bearer " + marker for _, _, h, _ in gitlab.requests)
    finally:
        gitlab.close()
    for r in outputs:
        assert marker not in r.out and marker not in r.err
    for top in (os.path.join(repo.root, ".flowforge"), repo.home):
        for dirpath, _, files in os.walk(top):
            for name in files:
                assert marker.encode() not in open(os.path.join(dirpath, name), "rb").read(), name


def test_plugins_check_says_what_it_checked_and_online_makes_one_read(repo, gitlab):
    enable(repo)
    r = repo.ok("plugins", "check", "--json", env=env(gitlab))
    [row] = [p for p in r.json["plugins"] if p["name"] == "gitlab"]
    assert row["problem"] is None
    assert row["notes"][:1] == ["token from GITLAB_TOKEN"] and "project acme/app" in row["notes"]
    assert any("allowed" in n and gitlab.url in n for n in row["notes"])
    assert gitlab.requests == []                                 # offline: no request
    r = repo.ok("plugins", "check", "--online", env=env(gitlab))
    assert "online: GraphQL answered as @alice, project acme/app found" in r.out
    assert [(c[0], c[1]) for c in gitlab.calls()] == [("query", ["currentUser", "project"])]
    r = repo("plugins", "check", "--online", env=dict(env(gitlab), GITLAB_TOKEN="glpat-wrong"))
    assert r.rc == 1 and "GitLab 401" in r.out and "Invalid token" in r.out
    assert "glpat-wrong" not in r.out + r.err
    enable(repo, project="acme/gone")
    r = repo("plugins", "check", "--online", env=env(gitlab))
    assert r.rc == 1 and "GitLab has no project acme/gone" in r.out
    enable(repo, api_url="https://gitlab.example.net")
    r = repo("plugins", "check", env={"GITLAB_TOKEN": gitlab.token})
    assert r.rc == 1 and "refusing plugins.gitlab.api_url" in r.out
    r = repo("plugins", "check", env={})
    assert r.rc == 1 and "no GITLAB_TOKEN in this environment" in r.out
    assert len(gitlab.requests) == 3


# -- the pieces ------------------------------------------------------------------


def test_durations_days_and_references_as_gitlab_reads_them():
    gl = plugin()
    for seconds in (1, 59, 60, 3600, 5415, 8 * 3600, 86399, 25 * 3600 + 1, 744 * 3600):
        text = gl.time_spent(seconds)
        assert "d" not in text and parse_duration(text) == seconds, text   # GitLab: 1d is 8 h
    assert parse_duration("1d") == 8 * 3600 and parse_duration("90") == 90 * 3600
    late = epoch("2026-12-31T00:00:00Z")
    assert gl.spent_at("2026-11-19", "Europe/Berlin", late) == "2026-11-19T11:00:00Z"
    assert gl.spent_at("2026-07-01", "America/Los_Angeles", late) == "2026-07-01T19:00:00Z"
    assert gl.spent_at("2026-11-20", "UTC", epoch("2026-11-20T09:30:00Z")) == "2026-11-20T09:30:00Z"
    config = {"project": "acme/platform/app"}
    assert gl.gitlab_issue("12", config) == ("acme/platform/app", 12)
    assert gl.gitlab_issue("#12", config) == ("acme/platform/app", 12)
    assert gl.gitlab_issue("other/tool#3", config) == ("other/tool", 3)
    for bad in ("ABC-3", "a/..#1", "acme/app.git#1", "-x/y#1", "x/y#", "x/y#1e3", "x/y#١"):
        assert gl.gitlab_issue(bad, config) is None, bad
    assert gl.gitlab_issue("12", {}) is None
    user = "u" * 64
    text = gl.summary(user, "2026-11-16", "week", "%s--%s" % (user, "a" * 10), "0123abcd")
    assert len(text) <= 255 and gl._KEY.search(text).groups() == (
        "%s--%s" % (user, "a" * 10), "2026-11-16", "0123abcd")
    kind, declared, fields = top_fields("mutation M($d0: TimelogDeleteInput!) {\n  d0: timelogDelete"
                                        "(input: $d0) { errors }\n}")
    assert (kind, declared, fields) == ("mutation", {"d0": "TimelogDeleteInput!"},
                                        [("d0", "timelogDelete", {"input": "d0"})])


def test_days_of_a_closed_month_are_not_rewritten_but_reported(repo, gitlab):
    enable(repo)
    log(repo, gitlab, "12", "1h", "2026-10-15")
    aggregate(repo, gitlab)
    run_queue(repo, gitlab)
    [october] = gitlab.timelogs("acme/app", 12)
    repo.ok("close", "2026-10", env=env(gitlab))
    log(repo, gitlab, "12", "30m", "2026-10-15")            # recorded after the close
    log(repo, gitlab, "12", "45m", "2026-11-19")
    aggregate(repo, gitlab)
    before = len(gitlab.calls())
    r = repo.ok("queue", "run", "--json", env=env(gitlab))
    assert [j["outcome"] for j in r.json["ran"]] == ["dead"]             # said once, loudly
    assert max(jobs(repo), key=lambda j: j["id"])["last_error"] == (
        "acme/app#12: not rewritten, in closed months: alice on 2026-10-15 has 1h30m in the "
        "ledger, 1h00m in GitLab (2026-10 closed by Test <test@example.com>; `flowforge reopen "
        "2026-10` lets it through)")
    assert [c[1] for c in gitlab.calls()[before:]] == [["currentUser", "project"], ["timelogCreate"]]
    assert october in gitlab.timelogs("acme/app", 12)        # untouched
    assert by_day(gitlab)["2026-11-19"][0] == 2700            # the open day is written
    events = [json.loads(line) for line in open(os.path.join(
        repo.root, ".flowforge/state/logs/flowforge.jsonl"))]
    assert [(e["day"], e["ledger_seconds"], e["gitlab_seconds"]) for e in events
            if e["event"] == "gitlab-held"] == [("2026-10-15", 5400, 3600)]
    r = repo.ok("plugins", "check", env=env(gitlab))
    assert "held: acme/app#12, alice on 2026-10-15: ledger 1h30m, GitLab 1h00m (2026-10 is closed)" in r.out
    # nothing changed since: no request, no second report
    before = len(gitlab.requests)
    enqueue(repo)
    assert run_queue(repo, gitlab) == ["done"]
    assert len(gitlab.requests) == before
    # reopened: the day is brought up to date, in one request
    repo.ok("reopen", "2026-10", env=env(gitlab))
    enqueue(repo)
    run_queue(repo, gitlab)
    assert [c[1] for c in gitlab.calls()[-2:]] == [["currentUser", "project"],
                                                   ["timelogDelete", "timelogCreate"]]
    assert by_day(gitlab)["2026-10-15"][0] == 5400
    assert "held:" not in repo.ok("plugins", "check", env=env(gitlab)).out
