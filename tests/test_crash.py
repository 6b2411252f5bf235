"""kill -9 at every durability step and at random moments: nothing lost, nothing doubled."""
import random
import shutil
import signal
import subprocess
import threading
import time

import pytest

import flowforge as ff

from conftest import SOAK, Runner, all_files_parse, make_git_repo, private_total, run_crashing

NOW = "2026-11-20T18:00:00Z"

# Each scenario: setup commands, the operation under test (retried once after
# a crash), what the user does next, and the exact private total afterwards.
SCENARIOS = {
    "stop": ([["start", "1", "--at", "09:00"]], ["stop", "--at", "10:00"], [], 3600),
    "start-while-running": ([["start", "1", "--at", "09:00"]], ["start", "2", "--at", "09:30"],
                            [["stop", "--at", "10:00"]], 3600),
    "pause": ([["start", "1", "--at", "09:00"]], ["pause", "--at", "09:20"], [["stop"]], 1200),
    "log-with-key": ([["log", "1", "1h"]], ["log", "2", "30m", "--key", "k"], [], 5400),
    "edit": ([["log", "1", "1h", "--date", "2026-11-19"]], None, [], 7200),
    "delete": ([["log", "1", "1h", "--date", "2026-11-19"], ["log", "2", "2h",
                                                              "--date", "2026-11-19"]], None, [], 7200),
    "aggregate": ([["log", "1", "1h"], ["log", "2", "2h", "--date", "2026-10-31"]],
                  ["aggregate"], [], 3 * 3600),
}


def prepare(tmp_path, pycache, home, name):
    root = make_git_repo(str(tmp_path / ("template-" + name)))
    runner = Runner(root, pycache, home)
    runner.ok("init", "--timezone", "UTC")
    setup, op, _, _ = SCENARIOS[name]
    for args in setup:
        runner.ok(*args, env={"FLOWFORGE_NOW": NOW})
    if op is None:  # edit / delete need the entry id
        entry_id = [e["id"] for e in runner.ok("entries", "--json", "--date", "2026-11-19",
                                               env={"FLOWFORGE_NOW": NOW}).json["entries"]
                    if e["issue"] == "1"][0]
        op = ["edit", entry_id, "--duration", "2h"] if name == "edit" else ["delete", entry_id]
    if name != "aggregate":
        runner.ok("aggregate", env={"FLOWFORGE_NOW": NOW})
    return runner, op


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_crash_at_every_durable_step(tmp_path, pycache, home, name):
    template, op = prepare(tmp_path, pycache, home, name)
    then, expected = SCENARIOS[name][2:]
    crashes = 0
    for k in range(1, 200):
        root = str(tmp_path / ("run-%d" % k))
        shutil.copytree(template.root, root, symlinks=True)
        runner = Runner(root, template.pycache, home)
        rc = run_crashing(runner, k, *op)
        if rc != -signal.SIGKILL:
            assert rc == 0, (k, rc)
            break                           # the operation finished: every step was covered
        crashes += 1
        all_files_parse(root)
        # what a user does after a crash: look, retry the command, aggregate
        status = runner("status", "--json", env={"FLOWFORGE_NOW": NOW})
        assert status.rc == 0, status
        retry = runner(*op, env={"FLOWFORGE_NOW": NOW})
        assert retry.rc in (0, 1), (k, retry)   # 1: "no timer running" / "already paused"
        if name == "edit":
            assert retry.rc == 0
        for args in then:
            runner.ok(*args, env={"FLOWFORGE_NOW": NOW})
        runner.ok("aggregate", env={"FLOWFORGE_NOW": NOW})
        all_files_parse(root)
        assert private_total(root) == expected, k
        assert runner.ok("report", "--json", "--by", "user").json["total_seconds"] == expected, k
        shutil.rmtree(root)
    else:
        pytest.fail("the operation never finished")
    assert crashes >= 2, crashes   # at least a write and its fsync


class Driver(threading.Thread):
    """One user's random-kill loop: every operation is retried until acknowledged."""

    def __init__(self, runner, user, cycles, seed, kill_rate, kills):
        super().__init__()
        self.runner, self.user, self.cycles = runner, user, cycles
        self.rng = random.Random(seed)
        self.kill_rate = kill_rate
        self.kills = kills
        self.expected = 0
        self.error = None
        self.op_time = 0.06

    def attempt(self, args):
        proc = self.runner.popen(*args, user=self.user, env={"FLOWFORGE_NOW": NOW},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started = time.monotonic()
        kill_after = None
        if self.rng.random() < self.kill_rate:
            kill_after = self.rng.uniform(0.3, 1.2) * self.op_time
        try:
            proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            self.kills.append(self.user)
            return None
        self.op_time = 0.8 * self.op_time + 0.2 * (time.monotonic() - started)
        return proc.returncode, out.decode(), err.decode()

    def do(self, args, done_codes=(0,), done_text=()):
        for _ in range(50):
            result = self.attempt(args)
            if result is None:
                continue
            rc, out, err = result
            if rc in done_codes or any(t in err for t in done_text):
                return rc
            if rc == 75:        # lock busy: fine, try again
                continue
            raise AssertionError("%s %s -> %s %s %s" % (self.user, args, rc, out, err))
        raise AssertionError("%s %s never completed" % (self.user, args))

    def run(self):
        try:
            for i in range(self.cycles):
                day = "2026-%02d-%02d" % (1 + i // 28, 1 + i % 28)
                start = 9 * 60 + self.rng.randint(0, 120)
                pause = start + self.rng.randint(1, 90)
                resume = pause + self.rng.randint(0, 60)
                stop = resume + self.rng.randint(1, 120)
                logged = self.rng.randint(1, 240)

                def at(minutes, day=day):
                    return "%s %02d:%02d" % (day, minutes // 60, minutes % 60)
                self.do(["start", str(i % 7 + 1), "--at", at(start)])
                self.do(["pause", "--at", at(pause)], done_text=("already paused",))
                self.do(["resume", "--at", at(resume)], done_text=("already running",))
                self.do(["stop", "--at", at(stop)], done_text=("no timer is running",))
                self.do(["log", "99", "%dm" % logged, "--date", day, "--key", "cycle-%d" % i])
                self.expected += (pause - start + stop - resume + logged) * 60
                self.attempt(["aggregate", "--wait", "2"])   # killed or not: no retry needed
        except BaseException as e:   # reported by the test thread
            self.error = e


def test_random_kill9_during_timers_logs_and_aggregation(tmp_path, pycache, home):
    users, cycles = (6, 60) if SOAK else (4, 18)
    target_kills = 2000 if SOAK else 200
    root = make_git_repo(str(tmp_path / "repo"))
    runner = Runner(root, pycache, home)
    runner.ok("init", "--timezone", "UTC")
    kills = []
    drivers = []
    rounds = 0
    while len(kills) < target_kills:
        rounds += 1
        batch = [Driver(runner, "u%d-r%d" % (n, rounds), cycles, seed=rounds * 100 + n,
                        kill_rate=0.6, kills=kills) for n in range(users)]
        for d in batch:
            d.start()
        for d in batch:
            d.join()
            if d.error:
                raise d.error
        drivers += batch
        assert rounds < 40, "too few kills landed: %d" % len(kills)
    final = runner.ok("aggregate", "--all", env={"FLOWFORGE_NOW": NOW})
    assert "warning" not in final.err
    all_files_parse(root)
    report = runner.ok("report", "--json", "--by", "user").json
    got = {row["user"]: row["seconds"] for row in report["rows"]}
    want = {d.user: d.expected for d in drivers}
    assert got == want
    assert private_total(root) == sum(want.values())
    assert len(kills) >= target_kills
    print("\n%d SIGKILLs over %d users; total %s exact" % (len(kills), len(drivers),
                                                         ff.format_duration(sum(want.values()))))


def test_every_git_process_that_writes_objects_fsyncs_them_before_a_ref_names_them(repo, tmp_path):
    """A ref that survives a power cut must not name an object that did not:
    git fsyncs loose objects only when told (core.fsync), so every process that
    writes blobs, trees or commits for the ledger or a closed month is told,
    and the ref update too."""
    log = tmp_path / "git-calls"
    wrapper = tmp_path / "bin"
    wrapper.mkdir()
    (wrapper / "git").write_text('#!/bin/sh\nprintf "%%s\\n" "$*" >> %s\nexec %s "$@"\n'
                                 % (log, shutil.which("git")))
    (wrapper / "git").chmod(0o755)
    env = {"FLOWFORGE_NOW": "2026-12-02T09:00:00Z", "PATH": "%s:%s" % (wrapper, ff.os.environ["PATH"])}
    subprocess.run(["git", "config", "user.name", "Test"], cwd=repo.root, check=True)
    subprocess.run(["git", "config", "user.email", "test@example.com"], cwd=repo.root, check=True)
    repo.ok("log", "1", "1h", "--date", "2026-11-19", env=env)
    repo.ok("aggregate", env=env)                      # a first commit of the store's ref
    repo.ok("log", "2", "30m", "--date", "2026-11-20", env=env)
    repo.ok("aggregate", env=env)                      # one on top of it
    repo.ok("close", "2026-11", "--no-push", "--no-fetch", env=env)   # a closed month's commit
    writers = ("hash-object", "mktree", "commit-tree", "index-pack", "unpack-objects", "update-ref")
    calls = [line.split() for line in log.read_text().splitlines()]
    seen = set()
    for argv in calls:
        settings = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-c"]
        command = next((a for a in argv if a in writers), None)
        if command is None or (command == "hash-object" and "-w" not in argv):
            continue
        seen.add(command)
        fsync = [s.split("=", 1)[1].split(",") for s in settings if s.startswith("core.fsync=")]
        assert fsync and "objects" in fsync[0] and "reference" in fsync[0], argv
    # each commit's objects in one process; a closed month's commit by commit-tree (it may be signed)
    assert {"unpack-objects", "commit-tree", "update-ref"} <= seen, calls
