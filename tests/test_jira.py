"""The Jira plugin against a loopback fake: one worklog per (developer, day, issue)."""
import base64
import contextlib
import io
import json
import os

import pytest

import flowforge as ff

from fake_jira import FakeJira

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}
ADF = {"type": "doc", "version": 1}


@pytest.fixture
def jira():
    fake = FakeJira()
    yield fake
    fake.close()


def enable(repo, **settings):
    path = os.path.join(repo.root, ".flowforge/config.json")
    config = json.load(open(path))
    config["plugins"] = {"jira": dict({"deployment": "cloud"}, **settings)}
    json.dump(config, open(path, "w"), indent=2)


def env(fake, **extra):
    out = dict(NOW, JIRA_URL=fake.url)
    if fake.deployment == "cloud":
        out.update(JIRA_EMAIL=fake.email, JIRA_API_TOKEN=fake.token)
    else:
        out.update(JIRA_TOKEN=fake.token)
    out.update(extra)
    return out


def log(repo, fake, *entries, user="alice"):
    """`log` each (issue, duration, day), then one aggregation."""
    for issue, duration, day in entries:
        repo.ok("log", issue, duration, "--date", day, user=user, env=env(fake))
    repo.ok("aggregate", user=user, env=env(fake))


def queue(repo, clock=None):
    return ff.RetryQueue(os.path.join(repo.root, ".flowforge/state/queue.db"),
                         clock=clock or Clock())


class Clock:
    def __init__(self):
        self.t = 2_000_000_000.0

    def __call__(self):
        return self.t


def run(repo, fake, monkeypatch, clock=None, **extra):
    """Run the next due job in this process (the queue on a fake clock)."""
    for key, value in dict(env(fake, **extra), FLOWFORGE_USER="alice").items():
        monkeypatch.setenv(key, value)
    q = queue(repo, clock)
    job = q.claim("test")
    assert job is not None, q.jobs()
    outcome = ff.run_job(ff.Repo(repo.root), q, job)
    return outcome, [j for j in q.jobs() if j["id"] == job.id][0]


def resync(repo, issue="ABC-12"):
    """A sync job for `issue`, as an aggregation that touched it would ask for."""
    old = dict(os.environ)
    os.environ.update(NOW)
    try:
        ff.enqueue_sync(ff.Repo(repo.root), "jira", issue)
    finally:
        os.environ.clear()
        os.environ.update(old)


def store_key(repo, user="alice"):
    return ff.store_key(user, ff.PrivateStore(ff.Repo(repo.root), user).store_id)


def cloud_body(repo, day, seconds, started, issue="ABC-12", user="alice"):
    key = "%s/%s/%s" % (store_key(repo, user), issue, day)
    text = "Time tracked with FlowForge by %s on %s. [flowforge:%s]" % (user, day, key)
    return {"timeSpentSeconds": seconds, "started": started,
            "comment": dict(ADF, content=[{"type": "paragraph", "content": [
                {"type": "text", "text": text}]}]),
            "properties": [{"key": "flowforge", "value": {
                "v": 1, "key": key, "user": user, "store": store_key(repo, user),
                "issue": issue, "day": day}}]}


def test_first_sync_one_worklog_per_day_with_the_exact_seconds(repo, jira):
    enable(repo)
    repo.ok("init", "--timezone", "Europe/Berlin", env=env(jira))
    log(repo, jira, ("ABC-12", "1h30m", "2026-11-19"), ("ABC-12", "30m", "2026-11-20"),
        ("ABC-12", "1h", "2026-11-20"), ("ABC-12", "30s", "2026-11-18"))
    log(repo, jira, ("ABC-12", "45m", "2026-11-19"), user="bob")   # bob's, not alice's token
    assert [(j["kind"], j["payload"]["issue"]) for j in queue(repo).jobs()] == [("sync", "ABC-12")]
    ran = repo.ok("queue", "run", "--json", env=env(jira)).json["ran"]
    assert [r["outcome"] for r in ran] == ["done"]
    assert [(m, p) for m, p, _, _ in jira.requests] == [
        ("GET", "/rest/api/3/issue/ABC-12/worklog?startAt=0&maxResults=1000&expand=properties"),
        ("POST", "/rest/api/3/issue/ABC-12/worklog?adjustEstimate=leave&notifyUsers=false"),
        ("POST", "/rest/api/3/issue/ABC-12/worklog?adjustEstimate=leave&notifyUsers=false")]
    # to the second, at local midnight (Berlin is +0100 in November); the 30 s day
    # is below Jira's minute and is not sent
    assert jira.requests[1][3] == cloud_body(repo, "2026-11-19", 5400, "2026-11-19T00:00:00.000+0100")
    assert jira.requests[2][3] == cloud_body(repo, "2026-11-20", 5400, "2026-11-20T00:00:00.000+0100")
    basic = base64.b64encode(("%s:%s" % (jira.email, jira.token)).encode()).decode()
    for _, _, headers, _ in jira.requests:
        assert headers["authorization"] == "Basic " + basic
        assert headers["accept"] == "application/json"
        assert headers["user-agent"].startswith("flowforge/")
    assert [w["timeSpentSeconds"] for w in jira.ours("ABC-12")] == [5400, 5400]
    state = json.load(open(os.path.join(repo.root, ".flowforge/state/plugins/jira.json")))
    [entry] = state["issues"].values()
    assert sorted(entry["days"]) == ["2026-11-19", "2026-11-20"]


def test_unchanged_sends_nothing_a_changed_day_one_put_a_zero_day_one_delete(repo, jira,
                                                                              monkeypatch):
    enable(repo)
    log(repo, jira, ("ABC-12", "1h", "2026-11-18"), ("ABC-12", "1h", "2026-11-19"),
        ("ABC-12", "2h", "2026-11-20"))
    assert run(repo, jira, monkeypatch)[0] == "done"
    assert [m for m, _ in jira.writes()] == ["POST"] * 3
    ids = {w["started"][:10]: w["id"] for w in jira.ours("ABC-12")}
    before = len(jira.requests)
    resync(repo)
    assert run(repo, jira, monkeypatch)[0] == "done"
    assert len(jira.requests) == before                       # unchanged: no request at all
    entry = json.loads(repo.ok("entries", "--json", "--date", "2026-11-18",
                               env=env(jira)).out)["entries"][0]
    repo.ok("delete", entry["id"], env=env(jira))
    log(repo, jira, ("ABC-12", "15m", "2026-11-20"))
    outcome, job = run(repo, jira, monkeypatch)
    assert outcome == "done"
    assert [(m, p) for m, p, _, _ in jira.requests[before:]] == [
        ("DELETE", "/rest/api/3/issue/ABC-12/worklog/%s?adjustEstimate=leave" % ids["2026-11-18"]),
        ("PUT", "/rest/api/3/issue/ABC-12/worklog/%s?adjustEstimate=leave&notifyUsers=false"
         % ids["2026-11-20"])]
    assert jira.requests[-1][3] == cloud_body(repo, "2026-11-20", 8100, "2026-11-20T00:00:00.000+0000")
    assert sorted((w["started"][:10], w["timeSpentSeconds"]) for w in jira.ours("ABC-12")) == [
        ("2026-11-19", 3600), ("2026-11-20", 8100)]


@pytest.mark.parametrize("deployment", ["cloud", "datacenter"])
def test_a_lost_response_is_found_again_not_repeated(repo, monkeypatch, deployment):
    fake = FakeJira(deployment)
    try:
        enable(repo, deployment=deployment, timeout=0.5)
        log(repo, fake, ("ABC-12", "1h", "2026-11-19"))
        fake.delay["POST"] = 1.5                    # Jira creates it; the answer never arrives
        clock = Clock()
        outcome, job = run(repo, fake, monkeypatch, clock)
        assert outcome == "queued" and "no complete answer within 0.5 s" in job["last_error"]
        assert len(fake.ours("ABC-12")) == 1
        fake.delay.clear()
        clock.t = job["next_attempt_at"]
        before = len(fake.requests)
        assert run(repo, fake, monkeypatch, clock)[0] == "done"
        assert [m for m, _, _, _ in fake.requests[before:]] == ["GET"]   # found: no second POST
        assert fake.count("POST") == 1 and len(fake.ours("ABC-12")) == 1
        resync(repo)
        before = len(fake.requests)
        assert run(repo, fake, monkeypatch, clock)[0] == "done"
        assert len(fake.requests) == before          # and its id is known from now on
    finally:
        fake.close()


def test_data_center_bearer_token_api_2_and_a_plain_comment(repo, monkeypatch):
    fake = FakeJira("datacenter")
    try:
        enable(repo, deployment="datacenter", adjust_estimate="auto")
        for n in range(3):                           # Data Center lists every worklog at once
            fake.add_worklog("ABC-12", 600, comment="by hand %d" % n)
        log(repo, fake, ("ABC-12", "2h", "2026-11-19"))
        assert run(repo, fake, monkeypatch)[0] == "done"
        key = "%s/ABC-12/2026-11-19" % store_key(repo)
        assert [(m, p, b) for m, p, _, b in fake.requests] == [
            ("GET", "/rest/api/2/issue/ABC-12/worklog?startAt=0&maxResults=1000", None),
            ("POST", "/rest/api/2/issue/ABC-12/worklog?adjustEstimate=auto", {
                "timeSpentSeconds": 7200, "started": "2026-11-19T00:00:00.000+0000",
                "comment": "Time tracked with FlowForge by alice on 2026-11-19. [flowforge:%s]"
                           % key})]
        assert all(h["authorization"] == "Bearer " + fake.token for _, _, h, _ in fake.requests)
    finally:
        fake.close()


def test_pagination_follows_start_at_through_three_pages(repo, monkeypatch):
    fake = FakeJira(page_size=2)                     # Jira may cap maxResults below the ask
    try:
        enable(repo)
        log(repo, fake, ("ABC-12", "1h", "2026-11-19"), ("ABC-12", "1h", "2026-11-20"))
        key = "%s/ABC-12/" % store_key(repo)
        for n in range(4):
            fake.add_worklog("ABC-12", 600, comment="someone else %d" % n)
        mine = fake.add_worklog("ABC-12", 1800, "2026-11-19T00:00:00.000+0000", properties=[
            {"key": "flowforge", "value": {"key": key + "2026-11-19"}}])   # on page 3, too short
        stale = fake.add_worklog("ABC-12", 900, "2026-11-17T00:00:00.000+0000", properties=[
            {"key": "flowforge", "value": {"key": key + "2026-11-17"}}])   # a day now at zero
        assert run(repo, fake, monkeypatch)[0] == "done"
        calls = [(m, p) for m, p, _, _ in fake.requests]
        listing = "/rest/api/3/issue/ABC-12/worklog?startAt=%d&maxResults=1000&expand=properties"
        assert calls[:3] == [("GET", listing % 0), ("GET", listing % 2), ("GET", listing % 4)]
        assert sorted(calls[3:]) == sorted([
            ("PUT", "/rest/api/3/issue/ABC-12/worklog/%s?adjustEstimate=leave&notifyUsers=false"
             % mine["id"]),
            ("DELETE", "/rest/api/3/issue/ABC-12/worklog/%s?adjustEstimate=leave" % stale["id"]),
            ("POST", "/rest/api/3/issue/ABC-12/worklog?adjustEstimate=leave&notifyUsers=false")])
        assert sorted((w["started"][:10], w["timeSpentSeconds"]) for w in fake.ours("ABC-12")) == [
            ("2026-11-19", 3600), ("2026-11-20", 3600)]
        assert len(fake.issues["ABC-12"]) == 6
    finally:
        fake.close()


@pytest.mark.parametrize("headers,after", [
    ({"Retry-After": "30", "RateLimit-Reason": "jira-burst-based"}, 30),
    ({"X-RateLimit-Reset": "RESET"}, 120),
])
def test_rate_limits_wait_as_long_as_jira_asks(repo, jira, monkeypatch, headers, after):
    enable(repo)
    log(repo, jira, ("ABC-12", "1h", "2026-11-19"))
    if "X-RateLimit-Reset" in headers:    # an ISO 8601 instant, yyyy-MM-ddTHH:mmZ: NOW + 2 min
        headers = {"X-RateLimit-Reset": "2026-11-20T18:02Z"}
    jira.script.append(("GET", "/worklog", 429, headers,
                        {"errorMessages": ["Rate limit exceeded."], "errors": {}}))
    clock = Clock()
    outcome, job = run(repo, jira, monkeypatch, clock)
    assert outcome == "queued" and "Jira 429" in job["last_error"]
    assert "Rate limit exceeded." in job["last_error"]
    assert after - 2 <= job["next_attempt_at"] - clock.t <= after + 2
    assert jira.writes() == []
    clock.t = job["next_attempt_at"]
    assert run(repo, jira, monkeypatch, clock)[0] == "done"
    assert len(jira.ours("ABC-12")) == 1


@pytest.mark.parametrize("case,status,text", [
    ("token", 401, "Client must be authenticated to access this resource."),
    ("forbidden", 403, "You do not have the permission to see the specified issue."),
    ("missing", 404, "Issue does not exist or you do not have permission to see it."),
])
def test_refusals_are_dead_lettered_with_jiras_message(repo, jira, monkeypatch, case, status,
                                                       text):
    enable(repo)
    issue = "ABC-99" if case == "missing" else "ABC-12"     # the fake has no ABC-99
    log(repo, jira, (issue, "1h", "2026-11-19"))
    extra = {"JIRA_API_TOKEN": "ATATT-revoked"} if case == "token" else {}
    if case == "forbidden":
        jira.script.append(("GET", "/worklog", 403, {}, {"errorMessages": [text], "errors": {}}))
    outcome, job = run(repo, jira, monkeypatch, **extra)
    assert outcome == "dead"
    assert "Jira %d on listing the worklogs of %s: %s" % (status, issue, text) == job["last_error"]
    assert jira.writes() == []


def test_settings_that_would_misdirect_a_token_are_refused_before_any_request(repo, jira,
                                                                              monkeypatch):
    log(repo, jira, ("ABC-12", "1h", "2026-11-19"), ("#7", "1h", "2026-11-19"))
    enable(repo, url="https://evil.atlassian.net")               # committed, not confirmed
    resync(repo)
    outcome, job = run(repo, jira, monkeypatch)
    assert outcome == "dead" and "refusing plugins.jira.url in config.json" in job["last_error"]
    assert "nothing was sent" in job["last_error"]
    enable(repo, url="https://evil.atlassian.net")
    resync(repo)
    outcome, job = run(repo, jira, monkeypatch, JIRA_URL="")
    assert outcome == "dead" and "no JIRA_URL in this environment" in job["last_error"]
    enable(repo, adjust_estimate="new")
    resync(repo)
    outcome, job = run(repo, jira, monkeypatch)
    assert outcome == "dead" and "adjust_estimate must be" in job["last_error"]
    enable(repo, url=jira.url + "/")                            # the same site: accepted
    resync(repo)
    outcome, job = run(repo, jira, monkeypatch, JIRA_API_TOKEN="")
    assert outcome == "dead" and "JIRA_EMAIL and JIRA_API_TOKEN" in job["last_error"]
    assert jira.requests == []
    assert all(j["payload"]["issue"] == "ABC-12" for j in queue(repo).jobs())   # no job for #7


@contextlib.contextmanager
def environment(repo, **extra):
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(repo.env(FLOWFORGE_USER="alice", **extra))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_fifty_stops_on_one_issue_make_one_job_and_one_worklog(repo, jira, monkeypatch):
    enable(repo)
    with environment(repo, **env(jira)), contextlib.redirect_stdout(io.StringIO()):
        for n in range(50):                         # in this process: 100 commands stay quick
            assert ff.main(["-C", repo.root, "start", "ABC-12", "--at", "2026-11-19 08:%02d" % n]) == 0
            assert ff.main(["-C", repo.root, "stop", "--at", "2026-11-19 08:%02d:30" % n]) == 0
    repo.ok("aggregate", env=env(jira))
    repo.ok("aggregate", env=env(jira))
    assert len(queue(repo).jobs()) == 1
    assert run(repo, jira, monkeypatch)[0] == "done"
    assert [m for m, _ in jira.writes()] == ["POST"]
    assert [w["timeSpentSeconds"] for w in jira.ours("ABC-12")] == [1500]


def test_the_token_never_reaches_disk_logs_queue_or_output(repo):
    marker = "ATATT3SECRET%s" % os.urandom(8).hex()
    fake = FakeJira(token="something-else", echo_auth=True)   # 401, echoing what it got
    try:
        enable(repo)
        e = dict(env(fake), JIRA_API_TOKEN=marker)
        basic = base64.b64encode(("%s:%s" % (fake.email, marker)).encode()).decode()
        outputs = [repo.ok("log", "ABC-12", "1h", env=e), repo.ok("aggregate", env=e),
                   repo.ok("queue", "run", "-v", env=e),
                   repo("plugins", "check", "--online", env=e),
                   repo("queue", "dead", "--json", env=e), repo("health", "--json", env=e)]
        assert "Client must be authenticated" in outputs[4].out      # it really failed
        assert any(basic in str(h.get("authorization")) for _, _, h, _ in fake.requests)
    finally:
        fake.close()
    for secret in (marker, basic):
        for r in outputs:
            assert secret not in r.out and secret not in r.err
        for top in (os.path.join(repo.root, ".flowforge"), repo.home):
            for dirpath, _, files in os.walk(top):
                for name in files:
                    data = open(os.path.join(dirpath, name), "rb").read()
                    assert secret.encode() not in data, name


def test_plugins_check_token_site_and_one_online_read(repo):
    fake = FakeJira("datacenter")
    try:
        enable(repo, deployment="datacenter", url=fake.url)
        r = repo.ok("plugins", "check", "--json", env=env(fake))
        [row] = [p for p in r.json["plugins"] if p["name"] == "jira"]
        assert row["problem"] is None and "token from JIRA_TOKEN (Bearer)" in row["notes"]
        assert any("allowed (from JIRA_URL)" in n and fake.url in n for n in row["notes"])
        assert fake.requests == []                                # offline: no request
        r = repo.ok("plugins", "check", "--online", env=env(fake))
        assert "online: GET /rest/api/2/myself answered (Alice)" in r.out
        assert [(m, p) for m, p, _, _ in fake.requests] == [("GET", "/rest/api/2/myself")]
        r = repo("plugins", "check", "--online", env=env(fake, JIRA_TOKEN="pat-wrong"))
        assert r.rc == 1 and "Jira 401" in r.out and "You are not authenticated" in r.out
        assert "pat-wrong" not in r.out + r.err
        r = repo("plugins", "check", env=env(fake, JIRA_TOKEN=""))
        assert r.rc == 1 and "needs JIRA_TOKEN" in r.out
        r = repo("plugins", "check", "--online", env=env(fake, JIRA_URL="https://jira.example.com"))
        assert r.rc == 1 and "refusing plugins.jira.url" in r.out
        assert len(fake.requests) == 2                            # refused: nothing sent
    finally:
        fake.close()


def test_a_closed_month_is_not_rewritten_and_its_change_is_reported(repo, jira, monkeypatch):
    enable(repo)
    log(repo, jira, ("ABC-12", "1h", "2026-10-19"), ("ABC-12", "1h", "2026-11-19"))
    assert run(repo, jira, monkeypatch)[0] == "done"
    ids = {w["started"][:10]: w["id"] for w in jira.ours("ABC-12")}
    repo.ok("close", "2026-10", env=env(jira))
    log(repo, jira, ("ABC-12", "30m", "2026-10-19"), ("ABC-12", "15m", "2026-11-19"))
    before = len(jira.requests)
    outcome, job = run(repo, jira, monkeypatch)
    assert outcome == "dead"                                  # reported once, in the dead letters
    assert "2026-10-19 (month 2026-10 closed by " in job["last_error"]
    assert "FlowForge 1h30m, Jira 1h00m" in job["last_error"]
    assert [(m, p) for m, p, _, _ in jira.requests[before:]] == [        # November: written
        ("PUT", "/rest/api/3/issue/ABC-12/worklog/%s?adjustEstimate=leave&notifyUsers=false"
         % ids["2026-11-19"])]
    assert {w["started"][:10]: w["timeSpentSeconds"] for w in jira.ours("ABC-12")} == {
        "2026-10-19": 3600, "2026-11-19": 4500}
    resync(repo)
    before = len(jira.requests)
    assert run(repo, jira, monkeypatch)[0] == "done"          # the same difference: not again
    assert len(jira.requests) == before
    r = repo.ok("plugins", "check", env=env(jira))
    assert "not rewritten (closed months): ABC-12 2026-10-19 (FlowForge 1h30m, Jira 1h00m)" in r.out
    repo.ok("reopen", "2026-10", env=env(jira))
    resync(repo)
    assert run(repo, jira, monkeypatch)[0] == "done"
    assert [(m, p) for m, p, _, _ in jira.requests[before:]] == [
        ("PUT", "/rest/api/3/issue/ABC-12/worklog/%s?adjustEstimate=leave&notifyUsers=false"
         % ids["2026-10-19"])]
    assert jira.ours("ABC-12")[0]["timeSpentSeconds"] == 5400
    assert "not rewritten" not in repo.ok("plugins", "check", env=env(jira)).out
