"""health, metrics and doctor."""
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import flowforge as ff

from conftest import ROOT, call, git

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def checks(r):
    return {c["check"]: c["status"] for c in r.json["checks"]}


def test_health_levels(repo):
    repo.ok("install", "hooks")
    r = repo("health", "--json")
    assert r.rc == 1 and checks(r)["daemon"] == "degraded" and r.json["status"] == "degraded"
    daemon = subprocess.Popen([sys.executable, "-S", "-c", "import sys; sys.path.insert(0, %r); "
                               "import flowforge; raise SystemExit(flowforge.main())" % ROOT,
                               "-C", repo.root, "daemon", "--interval", "1"],
                              env=repo.env(FLOWFORGE_USER="alice"))
    try:
        deadline = time.monotonic() + 15
        while checks(repo("health", "--json"))["daemon"] != "ok":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = repo("health", "--json")
        assert r.rc == 0 and r.json["status"] == "ok", r.out
        q = ff.RetryQueue(os.path.join(repo.root, ".flowforge/state/queue.db"))
        q.enqueue("no.such-kind", {}, priority="critical")
        deadline = time.monotonic() + 60
        while not q.stats()["counts"]["dead"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        r = repo("health", "--json")
        assert r.rc == 2 and checks(r)["queue"] == "unhealthy" and "dead" in r.out
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    r = repo("health")
    assert r.rc == 2 and "overall: unhealthy" in r.out


def test_health_sees_waiting_private_time_and_quarantine(repo):
    repo.ok("log", "1", "1h", env=NOW)
    day = os.path.join(repo.root, ".flowforge/user/alice/time/daily/2026-11-20.jsonl")
    old = time.time() - 2 * 86400
    os.utime(day, (old, old))
    r = repo("health", "--json")
    assert checks(r)["aggregation"] == "unhealthy" and r.rc == 2
    repo.ok("aggregate")
    assert checks(repo("health", "--json"))["aggregation"] == "ok"
    # aggregated 3 h ago, tracked 2 h ago: waiting; a report (or bill, close, push)
    # aggregates first, and health sees that
    repo.ok("log", "3", "1h", env=NOW)
    metrics = os.path.join(repo.root, ".flowforge/state/metrics.json")
    doc = json.load(open(metrics))
    doc["last_aggregate_success"] = time.time() - 3 * 3600
    json.dump(doc, open(metrics, "w"))
    two_hours_ago = time.time() - 2 * 3600
    os.utime(day, (two_hours_ago, two_hours_ago))
    assert checks(repo("health", "--json"))["aggregation"] == "degraded"
    repo.ok("report")
    assert checks(repo("health", "--json"))["aggregation"] == "ok"
    with open(day, "ab") as f:
        f.write(b"torn")
    repo.ok("log", "2", "1h", env=NOW)
    assert checks(repo("health", "--json"))["quarantine"] == "degraded"


PROM_LINE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})?'
                       r' [-+]?([0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?|NaN|[-+]Inf)$')


def test_metrics_prometheus_text_format(repo, tmp_path):
    out = repo.ok("metrics").out
    assert out.endswith("\n")
    families = {}
    for line in out.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in families and kind in ("counter", "gauge", "summary")
            families[name] = kind
        elif line.startswith("# HELP ") or not line:
            continue
        else:
            assert PROM_LINE.match(line), line
            name = line.split("{")[0].split(" ")[0]
            base = re.sub(r"_(sum|count)$", "", name)
            assert name in families or families.get(base) == "summary", line
    for name in ("flowforge_hook_runs_total", "flowforge_jobs_total", "flowforge_queue_depth",
                 "flowforge_recovery_seconds", "flowforge_daemon_heartbeat_age_seconds"):
        assert name in families
    target = tmp_path / "textfile" / "flowforge.prom"
    target.parent.mkdir()
    repo.ok("metrics", "--output", str(target))
    assert target.read_text().startswith("# HELP")
    assert os.listdir(str(target.parent)) == ["flowforge.prom"]
    # a repository path with a quote and a backslash stays one valid label
    weird = ff.render_prometheus(ff.Repo('/tmp/a"b\\c'), ff.collect_metrics(ff.Repo(repo.root)))
    assert all(PROM_LINE.match(x) for x in weird.splitlines() if not x.startswith("#"))


def test_doctor(repo):
    r = repo("doctor")
    assert r.rc == 1 and "install hooks" in r.out and "no daemon" in r.out
    repo.ok("daemon", "--once")                 # what cron runs: health and doctor agree
    assert checks(repo("health", "--json"))["daemon"] == "ok"
    assert "no daemon" not in repo("doctor").out
    repo.ok("daemon", "--ensure")
    repo.ok("daemon", "--stop")                 # a stopped daemon's fresh heartbeat is no run
    assert checks(repo("health", "--json"))["daemon"] == "degraded"
    assert "no daemon" in repo("doctor").out
    os.chmod(os.path.join(repo.root, ".flowforge/user"), 0o755)
    git(repo.root, "add", "-f", ".flowforge/user")
    open(os.path.join(repo.root, ".flowforge/.gitignore"), "w").write("# emptied\n")
    r = repo("doctor", "--json")
    problems = " ".join(f["problem"] for f in r.json["findings"])
    assert "tracked by git" in problems and "readable by others" in problems
    assert ".gitignore lacks" in problems
    repo.ok("init")
    git(repo.root, "rm", "-r", "-q", "--cached", ".flowforge/user")
    os.chmod(os.path.join(repo.root, ".flowforge/user"), 0o700)
    repo.ok("install", "hooks")
    problems = " ".join(f["problem"] for f in repo("doctor", "--json").json["findings"])
    assert "tracked" not in problems and "readable" not in problems and "hook" not in problems


def test_event_log_is_size_rotated(repo):
    repo_obj = ff.Repo(repo.root)
    path = os.path.join(repo.root, ".flowforge/state/logs/flowforge.jsonl")
    for n in range(5):
        with open(path, "ab") as f:
            f.write(b"x" * (ff.LOG_MAX_BYTES + 1) + b"\n")
        ff.log_event(repo_obj, "test", n=n)
    names = sorted(os.listdir(os.path.dirname(path)))
    assert names == ["flowforge.jsonl", "flowforge.jsonl.1", "flowforge.jsonl.2", "flowforge.jsonl.3"]
    total = sum(os.path.getsize(os.path.join(os.path.dirname(path), n)) for n in names)
    assert total < (ff.LOG_KEEP + 2) * (ff.LOG_MAX_BYTES + 1000)


def test_the_sqlite_wal_reset_bug_is_a_note_unless_the_queue_is_damaged(repo, monkeypatch):
    """A stock Debian/Ubuntu Python links an affected SQLite: doctor says so, but
    exits 0 on an otherwise good setup; only a damaged queue.db makes it a problem."""
    monkeypatch.setattr(ff, "sqlite_wal_reset_bug", lambda version: True)
    monkeypatch.setattr(ff, "daemon_verdict", lambda r: ("ok", "running", {}))   # one runs
    repo.ok("install", "hooks")
    ff.open_queue(ff.Repo(repo.root)).enqueue("aggregate", {"user": "alice"})
    r = call(repo.root, "doctor")
    assert r.rc == 0 and "all good" in r.out and "note: " in r.out and "WAL-reset" in r.out, r
    db = os.path.join(repo.root, ".flowforge/state/queue.db")
    import sqlite3
    with contextlib.closing(sqlite3.connect(db)) as conn:   # everything into the main file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert os.path.getsize(db) > 4096 + 1000
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    size = os.path.getsize(db)
    with open(db, "r+b") as f:          # damage every page but the header's
        f.seek(4096)
        f.write(b"\xff" * (size - 4096))
    r = call(repo.root, "doctor")
    assert r.rc == 1 and "integrity" in r.out, r
