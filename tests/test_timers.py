"""Timer semantics through the CLI: start/stop/pause/resume/switch/cancel/log/edit/delete."""
import json
import os

import flowforge as ff

from conftest import private_total

T0 = "2026-11-20T09:00:00Z"
NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def entries(repo, user="alice", **kw):
    return repo.ok("entries", "--json", "--from", "2026-11-01", "--to", "2026-11-30",
                   user=user, env=NOW).json["entries"]


def test_start_stop_records_exact_seconds(repo):
    repo.ok("start", "123", "--at", "09:00", env=NOW)
    r = repo.ok("stop", "--at", "10:15:30", "--json", env=NOW)
    entry = r.json["entry"]
    start = ff.parse_time(T0, ff._utc(), 0)
    assert entry["segments"] == [[start, start + 4530]]
    assert ff.entry_seconds(entry) == 4530
    assert [e["id"] for e in entries(repo)] == [entry["id"]]


def test_start_while_running_stops_first_and_says_so(repo):
    repo.ok("start", "123", "--at", "09:00", env=NOW)
    r = repo.ok("start", "124", "--at", "09:45", env=NOW)
    assert "stopped 123 after 45m" in r.out
    assert "tracking 124" in r.out
    repo.ok("stop", "--at", "10:00", env=NOW)
    got = {e["issue"]: ff.entry_seconds(e) for e in entries(repo)}
    assert got == {"123": 2700, "124": 900}


def test_start_same_issue_is_a_no_op(repo):
    repo.ok("start", "#123", "--at", "09:00", env=NOW)
    r = repo.ok("start", "123", "--at", "09:30", env=NOW)
    assert "already tracking 123" in r.out
    status = repo.ok("status", "--json", env=NOW).json
    assert status["timer"]["running_since"] == ff.parse_time(T0, ff._utc(), 0)


def test_pause_resume_accumulate_exactly(repo):
    repo.ok("start", "123", "--at", "09:00", env=NOW)
    repo.ok("pause", "--at", "09:20", env=NOW)
    assert repo("pause", "--at", "09:25", env=NOW).rc == 1          # already paused
    repo.ok("resume", "--at", "10:00", env=NOW)
    assert repo("resume", "--at", "10:05", env=NOW).rc == 1         # already running
    repo.ok("pause", "--at", "10:10:07", env=NOW)
    repo.ok("resume", "--at", "11:00", env=NOW)
    status = repo.ok("status", "--json", env={"FLOWFORGE_NOW": "2026-11-20T11:30:00Z"}).json
    assert status["elapsed_seconds"] == 20 * 60 + 607 + 30 * 60
    entry = repo.ok("stop", "--at", "11:30", "--json", env=NOW).json["entry"]
    assert ff.entry_seconds(entry) == 20 * 60 + 607 + 30 * 60
    assert len(entry["segments"]) == 3


def test_stop_while_paused_records_closed_segments(repo):
    repo.ok("start", "123", "--at", "09:00", env=NOW)
    repo.ok("pause", "--at", "09:30", env=NOW)
    entry = repo.ok("stop", "--json", env=NOW).json["entry"]
    assert ff.entry_seconds(entry) == 1800


def test_start_same_issue_while_paused_resumes(repo):
    repo.ok("start", "123", "--at", "09:00", env=NOW)
    repo.ok("pause", "--at", "09:30", env=NOW)
    r = repo.ok("start", "123", "--at", "10:00", env=NOW)
    assert "resumed 123" in r.out
    entry = repo.ok("stop", "--at", "10:30", "--json", env=NOW).json["entry"]
    assert ff.entry_seconds(entry) == 3600


def test_switch_and_cancel(repo):
    repo.ok("start", "1", "--at", "09:00", env=NOW)
    repo.ok("switch", "2", "--at", "09:10", env=NOW)
    r = repo.ok("cancel", env=NOW)
    assert "cancelled 2" in r.out
    assert repo("stop", env=NOW).rc == 1
    assert [(e["issue"], ff.entry_seconds(e)) for e in entries(repo)] == [("1", 600)]


def test_time_ordering_is_enforced(repo):
    repo.ok("start", "1", "--at", "10:00", env=NOW)
    r = repo("stop", "--at", "09:59", env=NOW)
    assert r.rc == 64 and "before" in r.err
    r = repo("start", "2", "--at", "09:00", env=NOW)
    assert r.rc == 64 and "before" in r.err
    repo.ok("pause", "--at", "10:30", env=NOW)
    r = repo("resume", "--at", "10:29", env=NOW)
    assert r.rc == 64
    assert repo.ok("status", "--json", env=NOW).json["timer"]["issue"] == "1"


def test_future_times_are_refused(repo):
    r = repo("start", "1", "--at", "2026-11-21 09:00", env=NOW)
    assert r.rc == 64 and "future" in r.err
    r = repo("log", "1", "1h", "--date", "2026-11-21", env=NOW)
    assert r.rc == 64 and "future" in r.err
    assert repo.ok("status", "--json", env=NOW).json["timer"] is None


def test_absurd_durations_are_refused(repo):
    repo.ok("start", "1", "--at", "2026-11-18 09:00", env=NOW)
    r = repo("stop", env=NOW)
    assert r.rc == 1 and "longer than 24h" in r.err
    repo.ok("stop", "--at", "2026-11-18 17:00", env=NOW)
    assert repo("log", "1", "25h", env=NOW).rc == 64
    assert repo("log", "1", "-1h", env=NOW).rc != 0
    assert [ff.entry_seconds(e) for e in entries(repo)] == [8 * 3600]


def test_log_and_idempotency_key(repo):
    repo.ok("log", "ABC-7", "1h30m", "--date", "2026-11-19", "--key", "k1", env=NOW)
    r = repo.ok("log", "ABC-7", "1h30m", "--date", "2026-11-19", "--key", "k1", env=NOW)
    assert "already logged" in r.out
    repo.ok("log", "ABC-7", "15m", "--date", "2026-11-19", env=NOW)
    got = sorted(ff.entry_seconds(e) for e in entries(repo))
    assert got == [900, 5400]


def test_edit_and_delete_are_amendments(repo):
    repo.ok("start", "1", "--at", "09:00", env=NOW)
    entry = repo.ok("stop", "--at", "10:00", "--json", env=NOW).json["entry"]
    repo.ok("edit", entry["id"], "--issue", "2", "--end", "10:30", "--note", "fixed", env=NOW)
    [e] = entries(repo)
    assert (e["issue"], ff.entry_seconds(e), e["note"]) == ("2", 5400, "fixed")
    repo.ok("edit", entry["id"], "--duration", "20m", env=NOW)
    assert ff.entry_seconds(entries(repo)[0]) == 1200
    logged = repo.ok("log", "3", "1h", "--date", "2026-11-19", "--json", env=NOW).json["entry"]
    repo.ok("edit", logged["id"], "--duration", "2h", "--date", "2026-11-18", env=NOW)
    assert repo("edit", logged["id"], "--start", "09:00", env=NOW).rc == 64
    repo.ok("delete", entry["id"], env=NOW)
    left = entries(repo)
    assert [(e["issue"], ff.entry_seconds(e)) for e in left] == [("3", 7200)]
    # the files stayed append-only: the original entry line is still there
    path = os.path.join(repo.root, ".flowforge/user/alice/time/daily/2026-11-20.jsonl")
    lines = open(path, "rb").read().splitlines()
    assert [json.loads(line[9:])["op"] for line in lines] == ["entry", "edit", "edit", "delete"]


def test_editing_a_paused_entry_keeps_its_pauses(repo):
    repo.ok("start", "1", "--at", "09:00", env=NOW)
    repo.ok("pause", "--at", "10:00", env=NOW)
    repo.ok("resume", "--at", "11:00", env=NOW)
    entry = repo.ok("stop", "--at", "12:00", "--json", env=NOW).json["entry"]
    repo.ok("edit", entry["id"], "--start", "08:30", env=NOW)
    assert ff.entry_seconds(entries(repo)[0]) == 9000
    repo.ok("edit", entry["id"], "--end", "12:30", env=NOW)
    assert ff.entry_seconds(entries(repo)[0]) == 10800          # the pause hour stays out
    repo.ok("edit", entry["id"], "--duration", "2h", env=NOW)   # moves the last end
    [e] = entries(repo)
    assert ff.entry_seconds(e) == 7200 and len(e["segments"]) == 2
    assert e["segments"][1][1] - e["segments"][1][0] == 1800
    r = repo("edit", entry["id"], "--duration", "30m", env=NOW)  # would empty the last segment
    assert r.rc == 64 and "segment" in r.err
    r = repo("edit", entry["id"], "--start", "10:15", env=NOW)   # after the first segment's end
    assert r.rc == 64
    assert ff.entry_seconds(entries(repo)[0]) == 7200


def test_pausing_in_the_second_the_timer_started(repo):
    repo.ok("start", "1", "--at", "09:00", env=NOW)
    assert "0s so far" in repo.ok("pause", "--at", "09:00", env=NOW).out
    repo.ok("resume", "--at", "09:30", env=NOW)
    assert ff.entry_seconds(repo.ok("stop", "--at", "10:00", "--json", env=NOW).json["entry"]) == 1800


def test_edit_errors(repo):
    assert repo("edit", "nonsense", "--issue", "2", env=NOW).rc == 64
    assert repo("edit", "20261120-00000000", "--issue", "2", env=NOW).rc == 1
    assert repo("delete", "20261120-00000000", env=NOW).rc == 1
    entry = repo.ok("log", "1", "1h", "--json", env=NOW).json["entry"]
    assert repo("edit", entry["id"], env=NOW).rc == 64
    assert "unchanged" in repo.ok("edit", entry["id"], "--issue", "1", env=NOW).out


def test_users_are_separate(repo):
    repo.ok("start", "1", "--at", "09:00", user="alice", env=NOW)
    repo.ok("start", "2", "--at", "09:00", user="bob", env=NOW)
    repo.ok("stop", "--at", "10:00", user="alice", env=NOW)
    assert repo.ok("status", "--json", user="bob", env=NOW).json["timer"]["issue"] == "2"
    assert repo.ok("status", "--json", user="alice", env=NOW).json["timer"] is None


def test_private_store_permissions(repo):
    repo.ok("log", "1", "1h", env=NOW)
    base = os.path.join(repo.root, ".flowforge/user/alice")
    assert os.stat(base).st_mode & 0o777 == 0o700
    for dirpath, dirnames, filenames in os.walk(base):
        for d in dirnames:
            assert os.stat(os.path.join(dirpath, d)).st_mode & 0o777 == 0o700
        for f in filenames:
            assert os.stat(os.path.join(dirpath, f)).st_mode & 0o777 == 0o600


def test_identity_from_git_config(bare_repo):
    from conftest import git
    git(bare_repo.root, "config", "user.email", "Jane.Doe+w@example.com")
    r = bare_repo("init", user=None)
    assert r.rc == 0, r
    assert "jane.doe" in r.out
    git(bare_repo.root, "config", "flowforge.user", "jd")
    assert bare_repo.ok("status", "--json", user=None).rc == 0   # read-only: creates nothing
    assert not os.path.exists(os.path.join(bare_repo.root, ".flowforge/user/jd"))
    bare_repo.ok("log", "1", "1h", user=None)
    assert os.path.isdir(os.path.join(bare_repo.root, ".flowforge/user/jd"))
    git(bare_repo.root, "config", "flowforge.user", "../evil")
    r = bare_repo("status", user=None)
    assert r.rc == 64 and "not valid" in r.err
    r = bare_repo("status", "--user", "bob")       # a name this clone does not know
    assert r.rc == 64 and "known users: jane.doe, jd" in r.err


def test_heals_a_stop_interrupted_between_append_and_clear(repo):
    """The crash window of `stop`: entry appended, timer not yet cleared."""
    repo.ok("start", "1", "--at", "09:00", env=NOW)
    root = repo.root
    timer_path = os.path.join(root, ".flowforge/user/alice/time/current.json")
    saved = open(timer_path, "rb").read()
    repo.ok("stop", "--at", "10:00", env=NOW)
    with open(timer_path, "wb") as f:   # put the timer back, as if the crash came first
        f.write(saved)
    status = repo.ok("status", "--json", env=NOW).json
    assert status["timer"] is None
    assert private_total(root) == 3600
    assert repo("stop", env=NOW).rc == 1
    assert private_total(root) == 3600


def test_every_amendment_kind_reads_back_cleanly(repo):
    """Each edit form must produce a record that the reader accepts (no quarantine)."""
    logged = repo.ok("log", "1", "1h", "--date", "2026-11-19", "--json", env=NOW).json["entry"]
    repo.ok("start", "2", "--at", "09:00", env=NOW)
    timed = repo.ok("stop", "--at", "10:00", "--json", env=NOW).json["entry"]
    for args in (["--duration", "2h"], ["--date", "2026-11-18"], ["--issue", "3"],
                 ["--project", "web"], ["--note", "n"]):
        repo.ok("edit", logged["id"], *args, env=NOW)
    for args in (["--duration", "30m"], ["--start", "08:00"], ["--end", "09:30"], ["--issue", "4"]):
        repo.ok("edit", timed["id"], *args, env=NOW)
    r = repo.ok("aggregate", "--full", env=NOW)
    assert "warning" not in r.err
    assert repo.ok("quarantine", "list", "--json").json["items"] == []
    got = {e["issue"]: (ff.entry_seconds(e), e["day"]) for e in entries(repo)}
    assert got == {"3": (7200, "2026-11-18"), "4": (5400, "2026-11-20")}   # day: where its time is
