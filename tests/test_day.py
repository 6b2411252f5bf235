"""A developer's day: time input as people type it, intervals, `continue`, no
overlapping or impossible time from any source, views that agree across
midnight, typos caught, shell completion."""
import json
import os
import shlex
import shutil
import subprocess
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

import flowforge
from conftest import ROOT, launcher_argv, private_total

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
BERLIN = ZoneInfo("Europe/Berlin")
# Friday 2026-11-20, 19:00 in Berlin
NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def berlin(text):
    """Epoch seconds of a Berlin wall-clock time 'YYYY-MM-DD HH:MM'."""
    return int(datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=BERLIN).timestamp())


@pytest.fixture
def dev(repo):
    """alice's clone, her store in Europe/Berlin."""
    repo.ok("init", "--timezone", "Europe/Berlin")
    return repo


def entries(dev, *args):
    return dev.ok("entries", "--json", *args, env=NOW).json


def timer_start(dev, at):
    r = dev.ok("start", "7", "--at", at, "--json", env=NOW)
    dev.ok("cancel", env=NOW)
    return r.json["timer"]["running_since"]


# -- 1. time input -------------------------------------------------------------

@pytest.mark.parametrize("typed, meant", [
    ("9am", "2026-11-20 09:00"), ("9:30pm", "2026-11-19 21:30"),   # 21:30 today is the future
    ("9:30", "2026-11-20 09:30"), ("09:30:00", "2026-11-20 09:30"), ("noon", "2026-11-20 12:00"),
    ("12am", "2026-11-20 00:00"), ("yesterday 17:00", "2026-11-19 17:00"),
    ("yesterday 5pm", "2026-11-19 17:00"), ("mon 9:00", "2026-11-16 09:00"),
    ("fri 8:15", "2026-11-20 08:15"), ("thursday 10am", "2026-11-19 10:00"),
    ("-15m", "2026-11-20 18:45"), ("2h ago", "2026-11-20 17:00"), ("1h30m ago", "2026-11-20 17:30"),
    ("2026-11-18 09:30", "2026-11-18 09:30"), ("2026-11-18T09:30", "2026-11-18 09:30"),
    ("2026-11-18T08:30Z", "2026-11-18 09:30"), ("2026-11-18T09:30+01:00", "2026-11-18 09:30"),
])
def test_time_forms_people_type(dev, typed, meant):
    if typed == "9:30pm":   # not accepted as a start in the future: give it yesterday's date
        typed = "yesterday 9:30pm"
    assert timer_start(dev, typed) == berlin(meant)


def test_day_forms_for_log_and_entries(dev):
    for typed, meant in (("today", "2026-11-20"), ("yesterday", "2026-11-19"), ("mon", "2026-11-16"),
                         ("fri", "2026-11-20"), ("-3d", "2026-11-17"), ("2026-11-02", "2026-11-02")):
        entry = dev.ok("log", "1", "10m", "--date", typed, "--json", env=NOW).json["entry"]
        assert entry["date"] == meant, typed
        assert [e["id"] for e in entries(dev, "--date", typed)["entries"]] == [entry["id"]]
        dev.ok("delete", entry["id"], env=NOW)


def test_unparseable_time_names_the_accepted_forms_and_changes_nothing(dev):
    for bad in ("half past nine", "25:00", "13pm", "9", "tomorrow 9:00", "yesterday"):
        r = dev("start", "1", "--at", bad, env=NOW)
        assert r.rc == 64, (bad, r)
        assert "9am" in r.err and "yesterday 17:00" in r.err and "2h ago" in r.err, r.err
        assert r.err.count("\n") == 1 and "Traceback" not in r.err
    r = dev("log", "1", "1h", "--date", "someday", env=NOW)
    assert r.rc == 64 and "yesterday" in r.err and "-3d" in r.err
    assert dev.ok("status", "--json", env=NOW).json["timer"] is None
    assert private_total(dev.root) == 0


def test_start_in_the_future_is_refused(dev):
    r = dev("start", "1", "--at", "21:00", env=NOW)    # 21:00 today, two hours ahead
    assert r.rc == 64 and "in the future" in r.err


def test_dst_gap_and_overlap_are_refused_with_both_instants(dev):
    # 2026-03-29: Berlin skips 02:00-03:00; 2026-10-25: it has 02:00-03:00 twice
    r = dev("log", "1", "--start", "2026-03-29 02:30", "--end", "2026-03-29 04:00", env=NOW)
    assert r.rc == 64 and "does not exist in Europe/Berlin" in r.err
    assert "2026-03-29T01:30:00+01:00" in r.err and "2026-03-29T03:30:00+02:00" in r.err
    r = dev("start", "1", "--at", "2026-10-25 02:30", env=NOW)
    assert r.rc == 64 and "happens twice" in r.err
    assert "2026-10-25T02:30:00+02:00" in r.err and "2026-10-25T02:30:00+01:00" in r.err
    r = dev("log", "1", "--start", "sun 2:30", "--end", "sun 3:00", env={
        "FLOWFORGE_NOW": "2026-10-26T12:00:00Z"})      # "sun" is the 25th: the same refusal
    assert r.rc == 64 and "happens twice" in r.err
    assert private_total(dev.root) == 0
    # with the offset it is one instant: the second 02:30 (CET) to 03:00 is 30 minutes
    entry = dev.ok("log", "1", "--start", "2026-10-25T02:30+01:00", "--end", "2026-10-25 03:00",
                   "--json", env=NOW).json["entry"]
    assert entry["segments"] == [[1792891800, 1792893600]]
    # either side of the gap is fine, and the day around it has 23 hours
    entry = dev.ok("log", "1", "--start", "2026-03-29 01:30", "--end", "2026-03-29 03:30",
                   "--json", env=NOW).json["entry"]
    assert entry["segments"][0][1] - entry["segments"][0][0] == 3600


# -- 2. logging an interval ------------------------------------------------------

def test_log_an_interval_like_timewarrior_track(dev):
    entry = dev.ok("log", "123", "--start", "9:00", "--end", "11:30", "--date", "yesterday",
                   "--json", env=NOW).json["entry"]
    assert entry["segments"] == [[berlin("2026-11-19 09:00"), berlin("2026-11-19 11:30")]]
    assert entry["id"].startswith("20261119-")
    entry = dev.ok("log", "124", "45m", "--end", "17:00", "--json", env=NOW).json["entry"]
    assert entry["segments"] == [[berlin("2026-11-20 16:15"), berlin("2026-11-20 17:00")]]
    entry = dev.ok("log", "125", "1h", "--start", "mon 14:00", "--json", env=NOW).json["entry"]
    assert entry["segments"] == [[berlin("2026-11-16 14:00"), berlin("2026-11-16 15:00")]]
    assert private_total(dev.root) == 9000 + 2700 + 3600


@pytest.mark.parametrize("args, words", [
    (["log", "123", "-1h"], "a duration is positive"),
    (["log", "123"], "give a DURATION"),
    (["log", "123", "--start", "11:00", "--end", "9:00"], "is not after start"),
    (["log", "123", "1h", "--start", "9:00", "--end", "11:00"], "not all three"),
    (["log", "123", "--start", "18:30", "--end", "20:00"], "in the future"),
    (["log", "123", "25h"], "longer than 24h"),
])
def test_log_mistakes_get_one_clear_line(dev, args, words):
    r = dev(*args, env=NOW)
    assert r.rc == 64 and words in r.err, r
    assert "required" not in r.err and r.err.count("\n") == 1
    assert private_total(dev.root) == 0


# -- 3. continue -------------------------------------------------------------------

def test_continue_starts_the_last_timed_entry_again(dev):
    r = dev("continue", env=NOW)
    assert r.rc == 1 and "no timed entry to continue" in r.err
    dev.ok("start", "12", "--project", "web", "--note", "login bug", "--at", "9:00", env=NOW)
    dev.ok("stop", "--at", "10:00", env=NOW)
    first = entries(dev, "--date", "today")["entries"][0]["id"]
    dev.ok("start", "13", "--at", "10:30", env=NOW)
    dev.ok("stop", "--at", "11:00", env=NOW)
    dev.ok("log", "99", "1h", env=NOW)            # no clock times: not what `continue` takes
    timer = dev.ok("continue", "--at", "13:00", "--json", env=NOW).json["timer"]
    assert (timer["issue"], timer["project"], timer["note"]) == ("13", "", "")
    timer = dev.ok("continue", first, "--at", "14:00", "--json", env=NOW).json["timer"]
    assert (timer["issue"], timer["project"], timer["note"]) == ("12", "web", "login bug")
    dev.ok("stop", "--at", "15:00", env=NOW)
    assert private_total(dev.root) == 3600 + 1800 + 3600 + 3600 + 3600
    r = dev("continue", "20261120-00000000", env=NOW)
    assert r.rc == 1 and "no entry 20261120-00000000" in r.err


def test_resuming_on_a_later_day_starts_a_new_entry(dev):
    dev.ok("start", "5", "--at", "2026-11-18 16:00", env=NOW)
    dev.ok("pause", "--at", "2026-11-18 18:00", env=NOW)
    r = dev.ok("resume", "--at", "2026-11-19 09:00", env=NOW)
    assert "stopped 5 after 2h00m" in r.out and "resumed 5" in r.out
    dev.ok("stop", "--at", "2026-11-19 10:00", env=NOW)
    got = entries(dev, "--from", "2026-11-18", "--to", "2026-11-19")["entries"]
    assert [(e["day"], e["range_seconds"]) for e in got] == [("2026-11-18", 7200),
                                                            ("2026-11-19", 3600)]


# -- 4. no overlapping or impossible time -------------------------------------------

def test_overlaps_are_refused_for_every_source(dev, tmp_path):
    first = dev.ok("log", "1", "--start", "9:00", "--end", "10:00", "--json",
                   env=NOW).json["entry"]["id"]
    total = private_total(dev.root)
    # a timer started inside it
    r = dev("start", "2", "--at", "9:30", env=NOW)
    assert r.rc == 65 and first in r.err and "--allow-overlap" in r.err
    assert dev.ok("status", "--json", env=NOW).json["timer"] is None
    # an interval across it
    r = dev("log", "3", "--start", "8:30", "--end", "9:15", env=NOW)
    assert r.rc == 65 and first in r.err and "09:00-10:00" in r.err
    # a timer from 7:00 may start (it may stop before 9:00), but it cannot stop after 9:00
    dev.ok("start", "8", "--at", "7:00", env=NOW)
    r = dev("stop", env=NOW)
    assert r.rc == 65 and first in r.err and "07:00-19:00" in r.err
    dev.ok("stop", "--at", "8:30", env=NOW)
    early = entries(dev, "--issue", "8")["entries"][0]["id"]
    r = dev("edit", early, "--end", "9:30", env=NOW)     # an edit that moves it onto another
    assert r.rc == 65 and first in r.err
    dev.ok("start", "4", "--at", "10:30", env=NOW)
    dev.ok("stop", "--at", "11:30", env=NOW)
    second = entries(dev, "--issue", "4")["entries"][0]["id"]
    r = dev("edit", second, "--start", "9:30", env=NOW)
    assert r.rc == 65 and first in r.err
    # an interval inside the running timer
    dev.ok("start", "5", "--at", "12:00", env=NOW)
    r = dev("log", "7", "--start", "12:10", "--end", "12:20", env=NOW)
    assert r.rc == 65 and "the running timer for 5" in r.err
    dev.ok("stop", "--at", "12:30", env=NOW)
    assert private_total(dev.root) == total + 5400 + 3600 + 1800
    # an import that overlaps what is recorded: refused whole, nothing written
    frames = tmp_path / "frames"
    frames.write_text(json.dumps([
        [berlin("2026-11-20 09:30"), berlin("2026-11-20 10:30"), "acme", "f1", ["#8"], 0],
        [berlin("2026-11-19 09:00"), berlin("2026-11-19 10:00"), "acme", "f2", ["#8"], 0]]))
    before = private_total(dev.root)
    r = dev("import", "watson", str(frames), env=NOW)
    assert r.rc == 65 and "nothing was imported" in r.err and first in r.err
    assert private_total(dev.root) == before
    r = dev.ok("import", "watson", str(frames), "--skip-conflicts", env=NOW)
    assert "imported 1 entry for alice" in r.out and "not imported for alice" in r.out
    assert private_total(dev.root) == before + 3600


def test_an_entry_moved_weeks_away_is_found_on_its_new_day(dev):
    entry = dev.ok("log", "1", "1h", "--date", "2026-10-10", "--json", env=NOW).json["entry"]
    dev.ok("edit", entry["id"], "--date", "2026-11-18", env=NOW)
    assert [e["id"] for e in entries(dev, "--date", "2026-11-18")["entries"]] == [entry["id"]]
    assert entries(dev, "--date", "2026-10-10")["entries"] == []
    dev.ok("log", "2", "23h", "--date", "2026-11-18", env=NOW)       # the moved hour still counts
    assert dev("log", "3", "1s", "--date", "2026-11-18", env=NOW).rc == 65
    timed = dev.ok("log", "4", "--start", "2026-10-01 09:00", "--end", "2026-10-01 10:00",
                   "--json", env=NOW).json["entry"]
    dev.ok("edit", timed["id"], "--start", "2026-11-19 09:00", "--end", "2026-11-19 10:00", env=NOW)
    r = dev("log", "5", "--start", "2026-11-19 09:30", "--end", "2026-11-19 09:45", env=NOW)
    assert r.rc == 65 and timed["id"] in r.err
    assert entries(dev, "--date", "2026-11-19")["total_seconds"] == 3600


def test_allow_overlap_records_parallel_work_marked(dev):
    dev.ok("log", "1", "--start", "9:00", "--end", "10:00", env=NOW)
    r = dev.ok("log", "2", "--start", "9:30", "--end", "10:30", "--allow-overlap", env=NOW)
    assert "overlap allowed" in r.out
    dev.ok("start", "3", "--at", "9:45", "--allow-overlap", env=NOW)
    dev.ok("stop", "--at", "10:15", env=NOW)             # the timer remembers it was allowed
    got = {e["issue"]: e for e in entries(dev, "--date", "today")["entries"]}
    assert not got["1"].get("overlap") and got["2"]["overlap"] and got["3"]["overlap"]
    assert "overlap!" in dev.ok("entries", "--date", "today", env=NOW).out
    assert private_total(dev.root) == 3600 * 2 + 1800
    # moving it clear of the others drops the mark
    dev.ok("edit", got["2"]["id"], "--start", "11:00", "--end", "11:30", env=NOW)
    got = {e["issue"]: e for e in entries(dev, "--date", "today")["entries"]}
    assert got["2"]["overlap"] is False


def test_import_overlapping_itself_is_refused_unless_allowed(dev):
    path = os.path.join(FIXTURES, "watson-frames.json")   # two of its frames overlap
    r = dev("import", "watson", path, "--default-issue", "OPS-1", env=NOW)
    assert r.rc == 65 and "in the same import" in r.err
    assert private_total(dev.root) == 0
    r = dev.ok("import", "watson", path, "--default-issue", "OPS-1", "--skip-conflicts", env=NOW)
    assert "imported 3 entries" in r.out and "overlaps" in r.out
    r = dev.ok("import", "watson", path, "--default-issue", "OPS-1", "--allow-overlap", env=NOW)
    assert "imported 1 entry for alice (3 already there)" in r.out


def test_a_day_holds_no_more_hours_than_it_has(dev):
    dev.ok("log", "1", "20h", "--date", "2026-11-18", env=NOW)
    r = dev("log", "2", "20h", "--date", "2026-11-18", env=NOW)
    assert r.rc == 65 and "2026-11-18 would hold 40h00m" in r.err and "24h00m" in r.err
    dev.ok("log", "2", "4h", "--date", "2026-11-18", env=NOW)
    r = dev("log", "3", "--start", "2026-11-18 23:00", "--end", "2026-11-18 23:01", env=NOW)
    assert r.rc == 65
    # an interval past midnight counts on the day it reaches too
    dev.ok("log", "4", "23h", "--date", "2026-11-19", env=NOW)
    r = dev("log", "5", "--start", "2026-11-19 22:00", "--end", "2026-11-20 00:30", env=NOW)
    assert r.rc == 65 and "2026-11-19 would hold" in r.err
    # the edit that would overfill a day
    logged = entries(dev, "--date", "2026-11-19")["entries"][0]["id"]
    r = dev("edit", logged, "--date", "2026-11-18", env=NOW)
    assert r.rc == 65
    assert private_total(dev.root) == (20 + 4 + 23) * 3600
    # DST: 2026-03-29 has 23 hours in Berlin, 2026-10-25 has 25
    dev.ok("log", "6", "23h", "--date", "2026-03-29", env=NOW)
    r = dev("log", "6", "1m", "--date", "2026-03-29", env=NOW)
    assert r.rc == 65 and "23h00m it has" in r.err
    dev.ok("log", "7", "24h", "--date", "2026-10-25", env=NOW)
    dev.ok("log", "7", "1h", "--date", "2026-10-25", env=NOW)
    assert dev("log", "7", "1s", "--date", "2026-10-25", env=NOW).rc == 65


# -- 5. views that agree --------------------------------------------------------------

def test_time_past_midnight_is_the_same_in_every_view(dev):
    dev.ok("start", "42", "--at", "2026-11-19 20:00", env=NOW)
    dev.ok("stop", "--at", "2026-11-20 02:30", env=NOW)
    dev.ok("log", "43", "1h", "--date", "2026-11-20", env=NOW)
    late = {"FLOWFORGE_NOW": "2026-11-20T09:00:00Z"}
    per_view = {}
    for day, expected in (("2026-11-19", 4 * 3600), ("2026-11-20", 2 * 3600 + 1800 + 3600)):
        listed = entries(dev, "--date", day)
        per_view[day] = listed["total_seconds"]
        assert listed["total_seconds"] == expected, day
        assert "42" in [e["issue"] for e in listed["entries"]]
        report = dev.ok("report", "--json", "--by", "user,day", "--from", day, "--to", day,
                        env=NOW).json      # no aggregate first: report takes its own newest time
        assert report["total_seconds"] == expected, day
        bill = dev.ok("bill", "--json", "--from", day, "--to", day, env=NOW).json
        assert bill["total_seconds"] == expected, day
    status = dev.ok("status", "--json", env=late).json
    assert status["today"] == "2026-11-20" and status["today_seconds"] == per_view["2026-11-20"]
    text = dev.ok("entries", "--date", "2026-11-20", env=NOW).out
    assert "20:00-02:30 (+1d)" in text and "2h30m of 6h30m" in text


def test_running_timer_counts_on_today_in_status(dev):
    dev.ok("start", "1", "--at", "yesterday 23:00", env={"FLOWFORGE_NOW": "2026-11-20T00:30:00Z"})
    status = dev.ok("status", "--json", env={"FLOWFORGE_NOW": "2026-11-20T00:30:00Z"}).json
    # 01:30 in Berlin: 1h30m of the timer's 2h30m are today's
    assert status["today_seconds"] == 0 and status["timer_today_seconds"] == 5400
    assert status["elapsed_seconds"] == 9000
    text = dev.ok("status", env={"FLOWFORGE_NOW": "2026-11-20T00:30:00Z"}).out
    assert "tracking 1: 2h30m since 2026-11-19 23:00" in text      # not today's: with its day


def test_report_names_own_time_it_could_not_aggregate(dev):
    dev.ok("log", "1", "1h", env=NOW)
    dev.ok("aggregate", env=NOW)
    dev.ok("log", "1", "2h", env=NOW)
    repo = flowforge.Repo(dev.root)
    with repo.lock("aggregate.alice", 5, "test"):          # another aggregation holds it
        r = dev.ok("report", "--json", env=NOW)
    assert r.json["total_seconds"] == 3600
    assert "newest time of alice may be missing" in r.err
    assert dev.ok("report", "--json", env=NOW).json["total_seconds"] == 3 * 3600


# -- 6. typos --------------------------------------------------------------------------

def test_unknown_user_for_read_only_commands_creates_nothing(dev):
    for command in (["entries"], ["status"], ["stop"], ["edit", "20261120-0000aaaa", "--note", "x"],
                    ["continue"], ["completion", "--words", "issues"]):
        r = dev("--user", "alcie", *command, env=NOW)
        if command[0] == "completion":
            assert r.rc == 0 and r.out == ""
        else:
            assert r.rc == 64, (command, r)
            assert "no user alcie here (did you mean alice?)" in r.err and "known users: alice" in r.err
    assert not os.path.exists(os.path.join(dev.root, ".flowforge/user/alcie"))
    r = dev("--user", "ghost", "entries", env=NOW)
    assert "no user ghost here; known users: alice" in r.err


def test_unknown_command_suggests_the_closest(dev):
    for typed, meant in (("strat", "start"), ("stpo", "stop"), ("reprot", "report"),
                         ("contineu", "continue")):
        r = dev(typed, "1")
        assert r.rc == 64 and "did you mean %s?" % meant in r.err, r
    r = dev("xyzzy")
    assert r.rc == 64 and "unknown command 'xyzzy'" in r.err and "did you mean" not in r.err


def test_rates_for_names_without_time_are_named(dev):
    path = os.path.join(dev.root, ".flowforge", "config.json")
    config = json.load(open(path))
    config["billing"].update(project_rates={"wbe": "100.00"}, user_rates={"bob": "90.00"},
                             user_project_rates={"alice/web": "120.00"})
    with open(path, "w") as f:
        json.dump(config, f)
    dev.ok("log", "1", "1h", "--project", "web", env=NOW)
    r = dev.ok("bill", "--month", "2026-11", "--json", env=NOW)
    assert "project_rates has a rate for 'wbe', but this bill has no time for it (did you " \
           "mean 'web'?)" in r.err
    assert "user_rates has a rate for 'bob'" in r.err
    assert "alice/web" not in r.err and r.json["lines"][0]["rate"] == "120.00"
    r = dev("doctor", "--json", env=NOW)
    problems = [f["problem"] for f in r.json["findings"]]
    assert any("'wbe'" in p and "'web'" in p for p in problems)
    assert any("'bob'" in n for n in r.json["notes"])        # no near name: a note, not a problem


# -- 7. shell completion ------------------------------------------------------------------

@pytest.fixture
def on_path(dev, tmp_path):
    """A `flowforge` command on PATH, as install.sh puts it there."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    launcher = bindir / "flowforge"
    launcher.write_text("#!/bin/sh\nexec %s \"$@\"\n" % " ".join(
        shlex.quote(a) for a in launcher_argv(dev.pycache)))
    launcher.chmod(0o755)
    env = dev.env(FLOWFORGE_USER="alice", **NOW)
    env["PATH"] = "%s:%s" % (bindir, os.environ["PATH"])
    return env


def complete_bash(dev, env, words):
    script = dev.ok("completion", "bash").out
    program = script + """
COMP_WORDS=(%s); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()
_flowforge
printf '%%s\\n' "${COMPREPLY[@]}"
""" % " ".join("'%s'" % w for w in words)
    proc = subprocess.run(["bash", "--norc", "-c", program], cwd=dev.root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if line]


def test_bash_completion_from_the_registry(dev, on_path):
    dev.ok("log", "123", "1h", env=NOW)
    dev.ok("log", "ABC-7", "1h", "--date", "yesterday", env=NOW)
    proc = subprocess.run(["bash", "--norc", "-c", dev.ok("completion", "bash").out +
                           "\ncomplete -p flowforge"], env=on_path, capture_output=True, text=True)
    assert proc.stdout.strip() == "complete -F _flowforge flowforge"
    assert complete_bash(dev, on_path, ["flowforge", "st"]) == ["start", "stop", "status"]
    assert complete_bash(dev, on_path, ["flowforge", "con"]) == ["continue"]
    assert complete_bash(dev, on_path, ["flowforge", "start", ""]) == ["123", "ABC-7"]
    assert complete_bash(dev, on_path, ["flowforge", "log", "1", "--da"]) == ["--date"]
    assert "yesterday" in complete_bash(dev, on_path, ["flowforge", "log", "1", "--date", ""])
    assert complete_bash(dev, on_path, ["flowforge", "install", "s"]) == ["systemd"]
    assert complete_bash(dev, on_path, ["flowforge", "-q", "report", "--format", "c"]) == ["csv"]
    ids = complete_bash(dev, on_path, ["flowforge", "edit", ""])
    assert sorted(i[:9] for i in ids) == ["20261119-", "20261120-"]
    # every command of the registry is offered
    assert set(complete_bash(dev, on_path, ["flowforge", ""])) == {c.name for c in flowforge.COMMANDS}


@pytest.mark.skipif(not shutil.which("fish"), reason="fish is not installed (apt-get install fish)")
def test_fish_completion(dev, on_path):
    dev.ok("log", "123", "1h", env=NOW)
    script = os.path.join(dev.root, "..", "flowforge.fish")
    with open(script, "w") as f:
        f.write(dev.ok("completion", "fish").out)
    proc = subprocess.run(["fish", "--no-config", "-c", "source %s; complete -C 'flowforge st'; "
                           "complete -C 'flowforge start '" % script], cwd=dev.root, env=on_path,
                          capture_output=True, text=True, timeout=60)
    words = [line.split("\t")[0] for line in proc.stdout.splitlines()]
    assert {"start", "stop", "status"} <= set(words) and "123" in words, proc


@pytest.mark.skipif(not shutil.which("zsh"), reason="zsh is not installed (apt-get install zsh)")
def test_zsh_completion_loads(dev, on_path):
    script = os.path.join(dev.root, "..", "flowforge.zsh")
    with open(script, "w") as f:
        f.write(dev.ok("completion", "zsh").out)
    proc = subprocess.run(["zsh", "-f", "-c", "source %s && complete -p flowforge" % script],
                          cwd=dev.root, env=dict(on_path, HOME=dev.home), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "_flowforge flowforge" in proc.stdout, proc


# -- what a review found ----------------------------------------------------------------

def test_dates_out_of_range_are_one_line_and_create_nothing(repo):
    for args in (["log", "1", "1h", "--date", "0001-01-01"], ["entries", "--date", "9999-12-31"],
                 ["entries", "--from", "0001-01-01"], ["log", "1", "25h"],
                 ["log", "1", "1h", "--date", "2026-12-01"]):
        r = repo("--user", "fresh", *args, env=NOW)
        assert r.rc == 64 and r.err.count("\n") == 1 and "Traceback" not in r.err, (args, r)
    assert not os.path.exists(os.path.join(repo.root, ".flowforge/user/fresh"))


def test_a_mistake_names_what_was_wrong_and_where_to_look(dev):
    for args, said in ((["report", "--by", "user,isue"], "no dimension 'isue' (did you mean issue?)"),
                       (["report", "--by", "colour"], "no dimension 'colour';"),
                       (["bill", "--by-issue", "--by", "x"], "unrecognized arguments"),
                       (["report", "--by", "user,user"], "user given twice"),
                       (["start", "123", "--bogus"], "see `flowforge start --help`"),
                       (["entries", "--bogus"], "see `flowforge entries --help`")):
        r = dev(*args, env=NOW)
        assert r.rc == 64 and said in r.err and r.err.count("\n") == 1, (args, r)
    assert "logged 1h30m15s to 405" in dev.ok("log", "405", "1:30:15", env=NOW).out   # as stored


def test_pause_and_resume_are_admitted_too(dev):
    dev.ok("log", "1", "--start", "9:00", "--end", "10:00", env=NOW)
    other = dev.ok("log", "2", "--start", "11:00", "--end", "12:00", "--json",
                   env=NOW).json["entry"]["id"]
    dev.ok("start", "3", "--at", "10:30", env=NOW)
    r = dev("pause", "--at", "11:30", env=NOW)          # 11:00-11:30 is recorded already
    assert r.rc == 65 and other in r.err
    dev.ok("pause", "--at", "11:00", env=NOW)
    r = dev("resume", "--at", "11:15", env=NOW)         # inside the 11:00-12:00 entry
    assert r.rc == 65 and other in r.err
    dev.ok("resume", "--at", "12:00", env=NOW)
    dev.ok("stop", "--at", "12:30", env=NOW)
    assert private_total(dev.root) == 3600 * 2 + 1800 + 1800


def test_an_import_is_checked_against_the_running_timer_and_24_hours(dev, tmp_path):
    dev.ok("start", "9", "--at", "12:30", env=NOW)
    frames = tmp_path / "frames"
    frames.write_text(json.dumps([[berlin("2026-11-20 13:00"), berlin("2026-11-20 14:00"), "acme",
                                   "f1", ["#8"], 0]]))
    r = dev("import", "watson", str(frames), env=NOW)
    assert r.rc == 65 and "the running timer for 9" in r.err
    frames.write_text(json.dumps([[berlin("2026-11-10 08:00"), berlin("2026-11-11 14:00"), "acme",
                                   "f2", ["#8"], 0]]))
    r = dev("import", "watson", str(frames), env=NOW)
    assert r.rc == 65 and "longer than 24h" in r.err
    assert private_total(dev.root) == 0


def test_log_arguments_in_any_order_and_notes_that_look_negative(dev):
    assert dev.ok("log", "9", "--date", "yesterday", "2h", "--json",
                  env=NOW).json["entry"]["seconds"] == 7200
    entry = dev.ok("log", "9", "1h", "--note", "-2 bugs fixed", "--json", env=NOW).json["entry"]
    assert entry["note"] == "-2 bugs fixed"
    r = dev("log", "9", "1h", "extra", env=NOW)
    assert r.rc == 64 and "unrecognized arguments: extra" in r.err


def test_edit_date_of_a_timed_entry_is_refused(dev):
    timed = dev.ok("log", "1", "--start", "9:00", "--end", "10:00", "--json", env=NOW).json["entry"]
    r = dev("edit", timed["id"], "--date", "yesterday", env=NOW)
    assert r.rc == 64 and "--start and --end" in r.err


def test_report_periods_are_in_the_store_zone_not_the_machines(dev):
    # 23:30 UTC is 00:30 on the 21st in Berlin: "today" is the 21st for status and report
    late = {"FLOWFORGE_NOW": "2026-11-20T23:30:00Z"}
    dev.ok("log", "1", "1h", env=late)
    dev.ok("log", "2", "--start", "yesterday 22:00", "--end", "yesterday 23:00", env=late)
    assert dev.ok("status", "--json", env=late).json["today"] == "2026-11-21"
    report = dev.ok("report", "--json", "--period", "day", env=late).json
    assert report["from"] == "2026-11-21" and report["total_seconds"] == 3600


def test_bash_completion_keeps_file_names_and_times_whole(dev, on_path):
    dev.ok("log", "123", "1h", env=NOW)
    with open(os.path.join(dev.root, "my frames.json"), "w") as f:
        f.write("[]")
    assert complete_bash(dev, on_path, ["flowforge", "import", "watson", "my"]) == ["my frames.json"]
    # bash splits 13:00 into three words; the entry id after it is still offered
    ids = complete_bash(dev, on_path, ["flowforge", "continue", "--at", "13", ":", "00", ""])
    assert len(ids) == 1 and ids[0].startswith("20261120-")
