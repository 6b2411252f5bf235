"""Exactly-once store creation, one commit point per command, symlinked and
special files on FlowForge's paths, and the cron watchdog line with its lock held."""
import errno
import json
import os
import subprocess

import pytest

import flowforge
from conftest import call, git, lock_held, make_git_repo, Runner

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def store_ids(root, user="alice"):
    path = os.path.join(root, ".flowforge", "user", user, "config.json")
    return json.load(open(path))["store"]


@pytest.mark.parametrize("round_", range(6))
def test_two_first_commands_at_once_make_one_store(tmp_path, pycache, home, round_):
    root = make_git_repo(str(tmp_path / "r"))
    runner = Runner(root, pycache, home)
    runner.ok("init", "--timezone", "UTC", user="lead")
    procs = [runner.popen("log", "5", "1h", "--date", "2026-11-16", env=NOW,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE),
             runner.popen("log", "6", "30m", "--date", "2026-11-16", env=NOW,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    runner.ok("aggregate", env=NOW)
    refs = git(root, "for-each-ref", "--format=%(refname)", "refs/flowforge/stores/").split()
    assert refs == ["refs/flowforge/stores/alice--" + store_ids(root)]      # one store, one ref
    assert runner.ok("report", "--json", "--by", "user").json["total_seconds"] == 5400


def test_day_files_without_settings_never_get_a_new_store_id(repo, home):
    repo.ok("log", "1", "2h", "--date", "2026-11-16", env=NOW)
    repo.ok("aggregate", env=NOW)
    os.unlink(os.path.join(repo.root, ".flowforge", "user", "alice", "config.json"))
    xdg = os.path.join(home, "xdg-data")
    os.rename(xdg, xdg + "-moved-away")     # as the old message suggested
    r = repo("log", "1", "1h", "--date", "2026-11-17", env=NOW)
    assert r.rc == 65 and "no settings" in r.err and r.err.count("\n") == 1, r
    assert not os.path.exists(os.path.join(repo.root, ".flowforge", "user", "alice", "config.json"))
    assert repo.ok("report", "--json", "--by", "user").json["total_seconds"] == 7200


def test_stop_on_a_full_disk_records_once_and_says_so(repo, monkeypatch):
    repo.ok("start", "7", "--at", "2026-11-20T09:00:00Z", env=NOW)
    real = flowforge.atomic_write

    def full_for_the_timer(path, data, *a, **k):
        if path.endswith("current.json"):
            raise flowforge.StorageError(path, OSError(errno.ENOSPC, "No space left on device"))
        return real(path, data, *a, **k)
    monkeypatch.setattr(flowforge, "atomic_write", full_for_the_timer)
    r = call(repo.root, "stop", "--at", "2026-11-20T10:00:00Z", env=NOW)
    assert r.rc == 0 and "stopped 7 after 1h00m" in r.out and "recorded" in r.err, r
    monkeypatch.setattr(flowforge, "atomic_write", real)
    r = repo("stop", "--at", "2026-11-20T10:30:00Z", env=NOW)     # the runbook's "repeat it"
    assert r.rc == 1 and "no timer" in r.err, r                  # healed: no second entry
    entries = repo.ok("entries", "--json", "--date", "2026-11-20", env=NOW).json["entries"]
    assert [flowforge.entry_seconds(e) for e in entries] == [3600]


def test_aggregate_that_reached_the_ledger_reports_success(repo, monkeypatch):
    repo.ok("log", "1", "1h", "--date", "2026-11-16", env=NOW)
    real = flowforge.atomic_write

    def full_for_the_cache(path, data, *a, **k):
        if "/state/aggregate/" in path:
            raise flowforge.StorageError(path, OSError(errno.ENOSPC, "No space left on device"))
        return real(path, data, *a, **k)
    monkeypatch.setattr(flowforge, "atomic_write", full_for_the_cache)
    r = call(repo.root, "aggregate", env=NOW)
    assert r.rc == 0 and "aggregated into the ledger" in r.err, r
    monkeypatch.setattr(flowforge, "atomic_write", real)
    assert repo.ok("report", "--json", "--by", "user").json["total_seconds"] == 3600
    r = repo.ok("aggregate", env=NOW)                 # a full recompute to the same shards
    assert "up to date" in r.out, r


@pytest.mark.parametrize("which", ["user", "state", "user/alice", "quarantine", "team",
                                   "team/summaries"])
def test_a_committed_symlink_on_flowforges_paths_is_refused(tmp_path, pycache, home, which):
    """A teammate commits `.flowforge/<which> -> ../leak`; on a fresh clone every
    command refuses (77) and nothing lands in the link's target."""
    root = make_git_repo(str(tmp_path / "r"))
    runner = Runner(root, pycache, home)
    runner.ok("init", "--timezone", "UTC", user="lead")
    os.makedirs(os.path.join(root, "leak"))
    target = os.path.join(root, ".flowforge", which)
    if os.path.isdir(target):
        os.rename(target, target + ".old")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.symlink(os.path.relpath(os.path.join(root, "leak"), os.path.dirname(target)), target)
    commands = (("log", "1", "1h"), ("status",), ("aggregate",), ("init",))
    if which.startswith("team"):   # the 0.1 layout: refused by whatever reads it
        runner.ok("log", "1", "1h", env=NOW)
        commands = (("report",), ("aggregate",), ("migrate",))
    for args in commands:
        r = runner(*args, env=NOW)
        assert r.rc == 77 and "symbolic link" in r.err and r.err.count("\n") == 1, (args, r)
    assert os.listdir(os.path.join(root, "leak")) == []


@pytest.mark.parametrize("where", ["time/current.json", "time/daily/2026-11-16.jsonl"])
def test_a_fifo_never_hangs_a_command(repo, where):
    repo.ok("log", "1", "1h", "--date", "2026-11-15", env=NOW)
    path = os.path.join(repo.root, ".flowforge", "user", "alice", where)
    os.mkfifo(path)
    for args in (("status",), ("aggregate", "--full"), ("entries", "--date", "2026-11-16")):
        r = repo(*args, env=NOW, timeout=20)         # a hang fails here
        assert "Traceback" not in r.err, (args, r)
        assert r.rc in (0, 65, 77), (args, r)


def test_the_cron_line_does_not_run_the_daemon_while_its_lock_is_held(repo):
    line = repo.ok("install", "cron").out.strip()
    command = line.split(" ", 5)[5].split(" # flowforge:")[0].replace("\\%", "%")
    heartbeat = os.path.join(repo.root, ".flowforge", "state", "daemon.json")
    lock = os.path.join(repo.root, ".flowforge", "state", "locks", "cron.lock")
    with lock_held(lock):
        held = subprocess.run(["sh", "-c", command], timeout=60, env=repo.env())
    assert held.returncode == 1                       # flock -n: busy, and nothing else ran
    assert not os.path.exists(heartbeat)              # the lock was held: no daemon round
    subprocess.run(["sh", "-c", command], check=True, timeout=60, env=repo.env())
    assert json.load(open(heartbeat))["once"] is True  # and without it, one round


def test_switch_on_a_full_disk_records_the_stop_once_and_says_what_is_left(repo, monkeypatch):
    repo.ok("start", "7", "--at", "2026-11-20T09:00:00Z", env=NOW)
    real = flowforge.atomic_write

    def full_for_the_timer(path, data, *a, **k):
        if path.endswith("current.json"):
            raise flowforge.StorageError(path, OSError(errno.ENOSPC, "No space left on device"))
        return real(path, data, *a, **k)
    monkeypatch.setattr(flowforge, "atomic_write", full_for_the_timer)
    r = call(repo.root, "switch", "8", "--at", "2026-11-20T10:00:00Z", env=NOW)
    assert r.rc == 0 and "is recorded" in r.err and "flowforge start 8 --at" in r.err, r
    monkeypatch.setattr(flowforge, "atomic_write", real)
    status = repo.ok("status", env=NOW)                 # heals: 7 was recorded, its timer goes
    assert "7" not in status.out.split("today")[0], status.out
    repo.ok("start", "8", "--at", "2026-11-20T10:00:00Z", env=NOW)       # as the line said
    repo.ok("stop", "--at", "2026-11-20T10:30:00Z", env=NOW)
    entries = repo.ok("entries", "--json", "--date", "2026-11-20", env=NOW).json["entries"]
    assert sorted((e["issue"], flowforge.entry_seconds(e)) for e in entries) == [
        ("7", 3600), ("8", 1800)]
