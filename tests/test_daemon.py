"""The daemon: heartbeat, jobs, SIGTERM mid-job, SIGHUP, --ensure, sd_notify, no spinning."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import flowforge as ff

from conftest import ROOT

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}

# The daemon with one extra job kind, `test.slow`, that takes a while and
# leaves a mark: for SIGTERM-in-the-middle tests.
SLOW_DAEMON = r"""
import os, sys, time
sys.path.insert(0, %r)
import flowforge
@flowforge.job_kind("test.slow")
def slow(repo, payload, job, queue):
    open(payload["started"], "w").close()
    time.sleep(payload["seconds"])
    with open(payload["done"], "a") as f:
        f.write("%%d\n" %% job.id)
raise SystemExit(flowforge.main(sys.argv[1:]))
""" % ROOT


def state(repo):
    try:
        return json.load(open(os.path.join(repo.root, ".flowforge/state/daemon.json")))
    except (OSError, ValueError):
        return {}


def wait_for(predicate, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def start_daemon(repo, *args, env=None):
    e = repo.env(FLOWFORGE_USER="alice", **(env or {}))
    return subprocess.Popen([sys.executable, "-S", "-c", SLOW_DAEMON, "-C", repo.root, "daemon"]
                            + list(args), env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def queue(repo):
    return ff.RetryQueue(os.path.join(repo.root, ".flowforge/state/queue.db"))


def test_heartbeat_aggregation_jobs_and_sigterm_mid_job(repo, tmp_path):
    repo.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    daemon = start_daemon(repo, "--interval", "1")
    try:
        first = wait_for(lambda: state(repo).get("state") == "running" and state(repo))
        assert first["pid"] == daemon.pid
        wait_for(lambda: state(repo)["heartbeat"] > first["heartbeat"], 5)     # it beats
        # it aggregated the private change by polling
        wait_for(lambda: repo("report", "--json").json["total_seconds"] == 3600)
        started, done = str(tmp_path / "started"), str(tmp_path / "done")
        queue(repo).enqueue("test.slow", {"seconds": 1.5, "started": started, "done": done})
        wait_for(lambda: os.path.exists(started))
        daemon.send_signal(signal.SIGTERM)              # in the middle of the job
        assert daemon.wait(timeout=30) == 0
    finally:
        daemon.kill()
        daemon.wait()
    assert open(done).read().split() == ["1"]           # the job finished
    [job] = queue(repo).jobs()
    assert job["status"] == "done"
    assert state(repo)["state"] == "stopped"


def test_sighup_reloads_config(repo):
    daemon = start_daemon(repo, env=NOW)
    try:
        wait_for(lambda: state(repo).get("interval") == 30.0)
        path = os.path.join(repo.root, ".flowforge/config.json")
        config = json.load(open(path))
        config["daemon"]["interval"] = 1
        json.dump(config, open(path, "w"))
        daemon.send_signal(signal.SIGHUP)
        wait_for(lambda: state(repo).get("interval") == 1.0)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0


def test_one_daemon_per_repository(repo):
    daemon = start_daemon(repo, "--interval", "5")
    try:
        wait_for(lambda: state(repo).get("state") == "running")
        second = repo("daemon")
        assert second.rc == 75 and "already running" in second.err
        assert repo("daemon", "--once").rc == 0          # cron while a daemon runs: no-op
        r = repo.ok("daemon", "--ensure")
        assert "is running (pid %d)" % daemon.pid in r.out
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)


def test_ensure_after_a_once_run_names_the_new_daemon(repo):
    repo.ok("daemon", "--once")
    once = state(repo)["pid"]
    r = repo.ok("daemon", "--ensure")
    try:
        pid = state(repo)["pid"]
        assert pid != once and "started the daemon (pid %d)" % pid in r.out, (r, once)
        assert "is running (pid %d)" % pid in repo.ok("daemon", "--ensure").out
    finally:
        assert "stopped" in repo.ok("daemon", "--stop").out


def daemon_pids(root):
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                cmd = open("/proc/%s/cmdline" % name, "rb").read().split(b"\0")
            except OSError:
                continue
            if root.encode() in cmd and b"daemon" in cmd and b"--ensure" not in cmd:
                pids.append(int(name))
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="counts processes through /proc")
def test_ensure_starts_one_even_when_raced_and_stop_stops_it(repo):
    procs = [repo.popen("daemon", "--ensure", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    for p in procs:
        p.communicate(timeout=60)
        assert p.returncode == 0
    wait_for(lambda: state(repo).get("state") == "running")
    time.sleep(0.5)                                     # losers of the race exit at once
    alive = wait_for(lambda: len(daemon_pids(repo.root)) == 1 and daemon_pids(repo.root))
    assert alive == [state(repo)["pid"]]
    assert "stopped" in repo.ok("daemon", "--stop").out
    wait_for(lambda: daemon_pids(repo.root) == [])
    assert repo("daemon", "--stop").rc == 1


def cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads CPU time from /proc")
def test_never_busy_spins_on_failing_jobs(repo, monkeypatch):
    q = queue(repo)
    for n in range(5):
        q.enqueue("no.such-kind-%d" % n if n else "test.kind", {}, max_attempts=1000)
    q.enqueue("aggregate", {"user": "nobody-here"}, max_attempts=1000)
    daemon = start_daemon(repo, "--interval", "1")
    try:
        wait_for(lambda: state(repo).get("state") == "running")
        time.sleep(0.5)
        before = cpu_seconds(daemon.pid)
        time.sleep(3)
        assert cpu_seconds(daemon.pid) - before < 0.6
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    assert {j["status"] for j in q.jobs()} == {"dead"}   # unknown kinds and bad payloads


def test_sd_notify_ready_watchdog_stopping(repo, tmp_path):
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    daemon = start_daemon(repo, "--interval", "30",
                          env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
    try:
        messages = [sock.recv(4096).decode() for _ in range(3)]
        assert messages[0].startswith("READY=1")
        assert "WATCHDOG=1" in messages[1:]             # every half watchdog period
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
        rest = []
        while True:
            try:
                rest.append(sock.recv(4096).decode())
            except socket.timeout:
                break
            if rest[-1] == "STOPPING=1":
                break
        assert "STOPPING=1" in rest
    finally:
        daemon.kill()
        daemon.wait()
        sock.close()


def test_once_runs_due_jobs_and_aggregates(repo):
    repo.ok("log", "1", "1h", env=NOW)
    q = queue(repo)
    q.enqueue("aggregate", {"user": "alice"})
    repo.ok("daemon", "--once", env=NOW)
    assert [j["status"] for j in q.jobs()] == ["done"]
    assert repo.ok("report", "--json").json["total_seconds"] == 3600
    assert state(repo)["state"] == "stopped" and state(repo)["once"] is True


def test_scheduler_entries(repo, tmp_path):
    cron = repo.ok("install", "cron").out
    assert cron.count("\n") == 1 and cron.startswith("*/5 * * * * cd ")
    assert repo.root in cron and "flock -n" in cron and "daemon --once" in cron
    assert os.path.isabs(cron.split("cd ", 1)[1].split()[0].strip("'"))
    systemd = repo.ok("install", "systemd", "--json").json["entries"]
    # the daemon's unit: flowforge-<repo>.service, not the -once one the timer starts
    [service] = [v for k, v in systemd.items() if os.path.basename(k).startswith("flowforge-")
                 and k.endswith(".service") and not k.endswith("-once.service")]
    for needle in ("Restart=on-failure", "WatchdogSec=", "Type=notify", "ExecStart=/",
                   repo.root):
        assert needle in service
    timers = [k for k in systemd if k.endswith(".timer")]
    assert timers and "OnUnitActiveSec" in systemd[timers[0]]
    import plistlib
    [(path, text)] = repo.ok("install", "launchd", "--json").json["entries"].items()
    plist = plistlib.loads(text.encode())
    assert plist["ProgramArguments"][0].startswith("/") and plist["RunAtLoad"] is True
    assert path.endswith(".plist") and plist["Label"].startswith("dev.flowforge.")


def test_scheduler_write(repo, tmp_path):
    config_home = tmp_path / "config"
    r = repo.ok("install", "systemd", "--write", env={"XDG_CONFIG_HOME": str(config_home)})
    units = sorted(os.listdir(str(config_home / "systemd" / "user")))
    assert len(units) == 3 and "systemctl --user" in r.out
    repo.ok("install", "launchd", "--write")
    assert os.listdir(os.path.join(repo.home, "Library", "LaunchAgents"))
    # crontab --write, twice: one line for this repository
    bindir = tmp_path / "bin"
    bindir.mkdir()
    store = tmp_path / "crontab.txt"
    (bindir / "crontab").write_text("#!/bin/sh\nif [ \"$1\" = -l ]; then cat %s 2>/dev/null || "
                                    "exit 1; else cat > %s; fi\n" % (store, store))
    os.chmod(str(bindir / "crontab"), 0o755)
    store.write_text("0 1 * * * other job\n")
    path = "%s:%s" % (bindir, os.environ["PATH"])
    for _ in range(2):
        repo.ok("install", "cron", "--write", env={"PATH": path})
    lines = store.read_text().splitlines()
    assert lines[0] == "0 1 * * * other job" and len(lines) == 2 and repo.root in lines[1]


def test_commands_run_without_the_cycle_collector_and_the_daemon_with_it(repo):
    """run() turns the cycle collector off for a command (its data holds no cycles);
    the daemon, which lives on, turns it back on."""
    import gc
    code = ("import gc, sys; sys.path.insert(0, %r); import flowforge\n"
            "real = flowforge.main\n"
            "def main(argv=None):\n"
            "    print('command', gc.isenabled())\n"
            "    return real(['daemon', '--once'])\n"
            "flowforge.main = main\n"
            "real_run = flowforge.Daemon.run\n"
            "def run(self):\n"
            "    code = real_run(self); print('daemon', gc.isenabled()); return code\n"
            "flowforge.Daemon.run = run\n"
            "flowforge.run()\n" % ROOT)
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=repo.root,
                          env=repo.env(FLOWFORGE_USER="alice"), capture_output=True, text=True)
    assert proc.returncode == 0, proc
    assert proc.stdout.split("\n")[:2] == ["command False", "daemon True"], proc.stdout
    assert gc.isenabled()
