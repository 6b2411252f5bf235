"""The ledger with real git: a bare remote, clones with the hooks installed,
feature branches, concurrent pushes, kill -9, rewritten and refused refs.

Every clone is its own machine (own HOME, so its own mirror) unless a test
says otherwise; git runs with
the same environment as FlowForge (FLOWFORGE_USER, the pinned clock), so the
hooks act as the clone's developer.  Totals are asserted to the second."""
import csv
import io
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time

import pytest

import flowforge as ff

from conftest import SOAK, Runner, clean_env, git, make_git_repo, roomy_hook_budget, run_crashing

NOW_ISO = "2026-11-20T18:00:00Z"
NOW = {"FLOWFORGE_NOW": NOW_ISO}
SETUP_DATE = "2026-11-01T00:00:00Z"     # the seed commit: outside reconcile's window
LEDGER_FILES = ("summaries/", "audit/", ".flowforge/team")


# -- helpers -------------------------------------------------------------------

def make_origin(tmp_path, pycache, name="origin.git"):
    """A bare remote whose main holds a committed FlowForge setup."""
    bare = str(tmp_path / name)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", bare], check=True)
    seed_root = make_git_repo(str(tmp_path / (name + "-seed")), "lead@example.com")
    seed_home = str(tmp_path / (name + "-seed-home"))
    os.makedirs(seed_home)
    seed = Runner(seed_root, pycache, seed_home)
    seed.ok("init", "--timezone", "UTC", user="lead")
    roomy_hook_budget(seed_root)
    env = clean_env(HOME=seed_home, GIT_AUTHOR_NAME="lead", GIT_AUTHOR_EMAIL="lead@example.com",
                    GIT_COMMITTER_NAME="lead", GIT_COMMITTER_EMAIL="lead@example.com",
                    GIT_AUTHOR_DATE=SETUP_DATE, GIT_COMMITTER_DATE=SETUP_DATE)
    for args in (["add", "-A"], ["commit", "-qm", "Set up FlowForge"],
                 ["remote", "add", "origin", bare], ["push", "-q", "origin", "main"]):
        git(seed_root, *args, env=env)
    return bare


@pytest.fixture
def origin(tmp_path, pycache):
    return make_origin(tmp_path, pycache)


class Clone:
    """One developer's clone, by default on its own machine (HOME)."""

    def __init__(self, tmp_path, origin, name, user, pycache, hooks=True, home=None):
        self.name, self.user = name, user
        self.root = str(tmp_path / name)
        self.home = home or str(tmp_path / (name + "-home"))
        os.makedirs(self.home, exist_ok=True)
        self.ff = Runner(self.root, pycache, self.home)
        email = "%s@example.com" % user
        self.env = self.ff.env(FLOWFORGE_USER=user, FLOWFORGE_NOW=NOW_ISO,
                               GIT_AUTHOR_NAME=user, GIT_AUTHOR_EMAIL=email,
                               GIT_COMMITTER_NAME=user, GIT_COMMITTER_EMAIL=email,
                               GIT_AUTHOR_DATE=NOW_ISO, GIT_COMMITTER_DATE=NOW_ISO)
        proc = subprocess.run(["git", "clone", "-q", origin, self.root], env=self.env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        self.git("config", "user.email", email)
        self.git("config", "user.name", user)
        self.git("config", "commit.gpgsign", "false")
        if hooks:
            self.ok("install", "hooks")

    # git, as this developer (hooks see the same environment as FlowForge)
    def git(self, *args, check=True, timeout=120):
        proc = subprocess.run(["git"] + [str(a) for a in args], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, "%s: git %s -> %d\n%s%s" % (
                self.name, " ".join(map(str, args)), proc.returncode, proc.stdout, proc.stderr)
        return proc

    def popen_git(self, *args):
        return subprocess.Popen(["git"] + list(args), cwd=self.root, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __call__(self, *args):
        return self.ff(*args, user=self.user, env=NOW)

    def ok(self, *args):
        return self.ff.ok(*args, user=self.user, env=NOW)

    def log(self, issue, duration, day):
        self.ok("log", issue, duration, "--date", day)

    def work(self, issue, start, stop):
        """A timer from `start` to `stop` (ISO-8601, to the second)."""
        self.ok("start", issue, "--at", start)
        self.ok("stop", "--at", stop)

    def commit(self, filename, message, how="add"):
        """Change a file and commit it; the pre-commit hook aggregates, silently.
        how: "add" (git add, git commit), "all" (git commit -a, a tracked file)
        or "paths" (git commit -- FILE: git's temporary index)."""
        with open(os.path.join(self.root, filename), "a") as f:
            f.write("%s\n" % message)
        if how == "all":
            proc = self.git("commit", "-qam", message)
        else:
            self.git("add", filename)
            proc = self.git("commit", "-qm", message, *(["--", filename] if how == "paths" else []))
        assert "flowforge:" not in proc.stderr, proc.stderr   # aggregated, not queued
        self.assert_clean()
        return self.head()

    def head(self):
        return self.git("rev-parse", "HEAD").stdout.strip()

    def assert_clean(self):
        """Nothing to commit, and no ledger file on the branch."""
        status = self.git("status", "--porcelain", "--untracked-files=all").stdout
        assert status == "", "%s: git status --porcelain:\n%s" % (self.name, status)
        tracked = self.git("ls-files").stdout.split()
        assert [p for p in tracked if p.startswith(".flowforge/")] == [
            ".flowforge/.gitignore", ".flowforge/config.json"], tracked
        assert not [p for p in tracked if any(s in p for s in LEDGER_FILES)], tracked

    def report(self):
        return self.ok("report", "--json", "--by", "user,issue,day").json

    def rows(self):
        """{(user, issue, day): seconds} of the report; checks the total adds up."""
        report = self.report()
        rows = {(r["user"], r["issue"], r["day"]): r["seconds"] for r in report["rows"]}
        assert report["total_seconds"] == sum(rows.values()), report
        return rows

    def total(self):
        return self.ok("report", "--json", "--by", "user").json["total_seconds"]

    def store_refs(self):
        out = self.git("for-each-ref", "--format=%(refname)", "refs/flowforge/stores/").stdout
        return out.split()

    def store_key(self):
        refs = self.store_refs()
        assert len(refs) == 1, refs
        return refs[0][len("refs/flowforge/stores/"):]

    def queued_pushes(self):
        jobs = self.ok("queue", "list", "--json").json["jobs"]
        return [j for j in jobs if j["kind"] == "push" and j["status"] in ("queued", "leased")]


def bare_refs(bare, prefix="refs/"):
    out = git(bare, "for-each-ref", "--format=%(objectname) %(refname)", prefix,
              env=clean_env(HOME=os.path.dirname(bare)))
    return dict(reversed(line.split(" ", 1)) for line in out.splitlines())


def flowforge_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("flowforge:")]


def check_refs_and_objects(root):
    """Every ref under refs/flowforge/ names an object that exists, and the
    repository passes `git fsck --no-dangling`."""
    env = clean_env(HOME=os.path.dirname(root))
    out = git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/flowforge/",
              env=env)
    for line in out.splitlines():
        oid, ref = line.split(" ", 1)
        proc = subprocess.run(["git", "cat-file", "-e", oid], cwd=root, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, "%s points at a missing object %s" % (ref, oid)
        proc = subprocess.run(["git", "cat-file", "-e", oid + "^{tree}"], cwd=root, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, "%s: %s has no tree" % (ref, oid)
    fsck = subprocess.run(["git", "fsck", "--no-dangling", "--no-progress"], cwd=root, env=env,
                          capture_output=True, text=True)
    assert fsck.returncode == 0, "git fsck: %s%s" % (fsck.stdout, fsck.stderr)


def manager_sees(tmp_path, origin, pycache, via="flowforge", name="manager"):
    """A fresh clone that fetched the ledger: with `flowforge fetch`, or with a
    plain `git fetch` after `flowforge install hooks`."""
    manager = Clone(tmp_path, origin, name, "boss", pycache, hooks=(via == "git"))
    if via == "git":
        manager.git("fetch", "-q")
    else:
        manager.ok("fetch")
    return manager


# -- 1. feature branches: merge, squash, rebase, cherry-pick, revert -----------

def scenario_merge_no_ff(a):
    a.git("checkout", "-q", "-b", "feat-a")
    a.work("1", "2026-11-16T09:00:00Z", "2026-11-16T10:00:07Z")        # 3607 s
    a.commit("a.txt", "feat-a 1")
    a.log("1", "25m", "2026-11-17")                                     # 1500 s
    a.commit("a.txt", "feat-a 2", how="all")
    a.git("checkout", "-q", "main")
    a.git("checkout", "-q", "-b", "feat-b")
    a.work("1", "2026-11-16T13:00:00Z", "2026-11-16T13:40:05Z")        # 2405 s, same cell
    a.log("2", "1h15m", "2026-11-17")                                   # 4500 s
    a.commit("b.txt", "feat-b 1")
    a.git("checkout", "-q", "main")
    for branch in ("feat-a", "feat-b"):
        merge = a.git("merge", "--no-ff", "--no-edit", branch)
        assert "CONFLICT" not in merge.stdout + merge.stderr
        a.assert_clean()
    assert len(a.git("log", "--merges", "--oneline").stdout.splitlines()) == 2
    return {("alice", "1", "2026-11-16"): 3607 + 2405, ("alice", "1", "2026-11-17"): 1500,
            ("alice", "2", "2026-11-17"): 4500}


def scenario_squash(a):
    a.git("checkout", "-q", "-b", "feat-a")
    a.work("7", "2026-11-18T08:00:00Z", "2026-11-18T08:59:59Z")        # 3599 s
    a.commit("a.txt", "feat-a 1")
    a.log("7", "30m", "2026-11-19")                                     # 1800 s
    a.commit("a.txt", "feat-a 2", how="paths")
    a.git("checkout", "-q", "main")
    merge = a.git("merge", "--squash", "feat-a")
    assert "CONFLICT" not in merge.stdout + merge.stderr
    a.log("8", "10m", "2026-11-19")                                     # the squash commit's hook
    proc = a.git("commit", "-qm", "feat-a squashed")
    assert "flowforge:" not in proc.stderr, proc.stderr
    a.assert_clean()
    a.git("branch", "-q", "-D", "feat-a")                              # its commits are gone
    return {("alice", "7", "2026-11-18"): 3599, ("alice", "7", "2026-11-19"): 1800,
            ("alice", "8", "2026-11-19"): 600}


def scenario_rebase(a):
    a.git("checkout", "-q", "-b", "feat-a")
    a.log("3", "1h", "2026-11-18")
    a.commit("a.txt", "feat-a 1")
    a.work("3", "2026-11-19T10:00:00Z", "2026-11-19T10:20:31Z")        # 1231 s
    a.commit("a2.txt", "feat-a 2")
    a.git("checkout", "-q", "main")
    a.log("4", "45m", "2026-11-18")
    a.commit("m.txt", "main moves on")
    a.git("checkout", "-q", "feat-a")
    rebase = a.git("rebase", "-q", "main")
    assert "CONFLICT" not in rebase.stdout + rebase.stderr
    a.assert_clean()
    a.git("checkout", "-q", "main")
    a.git("merge", "-q", "--ff-only", "feat-a")
    a.assert_clean()
    return {("alice", "3", "2026-11-18"): 3600, ("alice", "3", "2026-11-19"): 1231,
            ("alice", "4", "2026-11-18"): 2700}


def scenario_cherry_pick(a):
    a.git("checkout", "-q", "-b", "feat-a")
    a.log("5", "2h", "2026-11-17")
    a.commit("a.txt", "feat-a 1 (never merged)")
    a.work("6", "2026-11-18T14:00:00Z", "2026-11-18T14:33:33Z")        # 2013 s
    picked = a.commit("b.txt", "feat-a 2 (picked)")
    a.git("checkout", "-q", "main")
    pick = a.git("cherry-pick", picked)
    assert "CONFLICT" not in pick.stdout + pick.stderr
    a.assert_clean()
    a.git("branch", "-q", "-D", "feat-a")
    return {("alice", "5", "2026-11-17"): 7200, ("alice", "6", "2026-11-18"): 2013}


def scenario_revert(a):
    a.log("9", "50m", "2026-11-16")
    reverted = a.commit("r.txt", "a change that gets reverted")
    a.work("9", "2026-11-17T09:00:00Z", "2026-11-17T09:00:59Z")        # 59 s
    a.commit("s.txt", "another change")
    a.log("10", "5m", "2026-11-17")
    a.commit("s.txt", "and another", how="all")
    revert = a.git("revert", "--no-edit", reverted)
    assert "CONFLICT" not in revert.stdout + revert.stderr
    a.assert_clean()
    assert not os.path.exists(os.path.join(a.root, "r.txt"))
    return {("alice", "9", "2026-11-16"): 3000, ("alice", "9", "2026-11-17"): 59,
            ("alice", "10", "2026-11-17"): 300}


SCENARIOS = {"merge-no-ff": (scenario_merge_no_ff, "flowforge"),
             "squash": (scenario_squash, "git"),
             "rebase": (scenario_rebase, "flowforge"),
             "cherry-pick": (scenario_cherry_pick, "git"),
             "revert": (scenario_revert, "git")}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_feature_branch_workflows_reach_a_fresh_clone_exactly(tmp_path, origin, pycache, name):
    scenario, via = SCENARIOS[name]
    alice = Clone(tmp_path, origin, "alice", "alice", pycache)
    expected = scenario(alice)
    alice.assert_clean()
    assert alice.rows() == expected                       # her own clone, before any push
    push = alice.git("push", "origin", "main")
    assert flowforge_lines(push.stderr) == ["flowforge: ledger pushed to origin (1 store)"], \
        push.stderr
    alice.assert_clean()
    assert not alice.queued_pushes()
    assert ["refs/flowforge/stores/" + alice.store_key()] == list(
        bare_refs(origin, "refs/flowforge/"))
    manager = manager_sees(tmp_path, origin, pycache, via)
    assert manager.rows() == expected
    manager.assert_clean()
    ci = manager("reconcile", "--ci")
    assert ci.rc == 0, ci


# -- 2. one developer, two clones: two stores, one sum -------------------------

@pytest.mark.parametrize("machines", ["two machines", "one machine"])
def test_one_developer_on_two_clones_is_summed(tmp_path, origin, pycache, machines):
    laptop = Clone(tmp_path, origin, "laptop", "alice", pycache)
    desktop = Clone(tmp_path, origin, "desktop", "alice", pycache,
                    home=laptop.home if machines == "one machine" else None)
    laptop.work("1", "2026-11-10T09:00:00Z", "2026-11-10T10:30:11Z")   # 5411 s
    desktop.work("1", "2026-11-10T14:00:00Z", "2026-11-10T14:45:02Z")  # 2702 s, same cell
    desktop.log("2", "20m", "2026-11-12")
    laptop.commit("laptop.txt", "from the laptop")
    desktop.commit("desktop.txt", "from the desktop")
    laptop.git("push", "-q", "origin", "main")
    desktop.git("pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
    desktop.assert_clean()
    desktop.git("push", "-q", "origin", "main")
    keys = [laptop.store_key(), desktop.store_key()]
    assert keys[0] != keys[1] and all(k.startswith("alice--") for k in keys)
    assert sorted(bare_refs(origin, "refs/flowforge/")) == sorted(
        "refs/flowforge/stores/" + k for k in keys)
    expected = {("alice", "1", "2026-11-10"): 5411 + 2702, ("alice", "2", "2026-11-12"): 1200}
    manager = manager_sees(tmp_path, origin, pycache)
    assert manager.rows() == expected
    by_store = manager.ok("report", "--json", "--by", "store").json["rows"]
    assert sorted(r["seconds"] for r in by_store) == [2702 + 1200, 5411]
    for by in ("user,issue", "issue,user"):   # the one cell of two stores, in every format
        cols = by.split(",")
        table = list(csv.reader(io.StringIO(manager.ok("report", "--by", by, "--format", "csv").out)))
        assert table[0] == cols + ["seconds", "hours"]
        assert {(row[cols.index("user")], row[cols.index("issue")]): tuple(row[2:]) for row in table[1:]} \
            == {("alice", "1"): ("8113", "2.25"), ("alice", "2"): ("1200", "0.33")}
        assert len(table) == 3
    printed = manager.ok("report", "--by", "user,issue").out.splitlines()
    assert [line.split() for line in printed if line.startswith("alice")] == [
        ["alice", "1", "2:15", "2.25"], ["alice", "2", "0:20", "0.33"]]
    doc = manager.ok("report", "--json", "--by", "store,issue").json["rows"]   # by store: its label
    table = list(csv.reader(io.StringIO(manager.ok("report", "--by", "store,issue", "--format",
                                                   "csv").out)))
    assert table[0] == ["user", "store", "store_id", "issue", "seconds", "hours"]
    assert table[1:] == [[r["user"], r["store_label"], r["store"], r["issue"], str(r["seconds"]),
                          r["hours"]] for r in doc] and len(doc) == 3
    for clone in (laptop, desktop):            # each clone sees both stores after a fetch
        clone.ok("fetch")
        assert clone.rows() == expected


# -- 3. eight clones pushing at the same time ----------------------------------

def push_all_at_once(clones, branches):
    """`git push origin BRANCH` in every clone at the same moment; [(rc, stderr)]."""
    barrier = threading.Barrier(len(clones))
    results = [None] * len(clones)

    def push(n):
        barrier.wait()
        proc = clones[n].popen_git("push", "origin", branches[n])
        _, err = proc.communicate(timeout=120)
        results[n] = (proc.returncode, err)

    threads = [threading.Thread(target=push, args=(n,)) for n in range(len(clones))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_eight_clones_pushing_concurrently_lose_nothing(tmp_path, origin, pycache):
    """Round 1: eight feature branches pushed at once.  Round 2: all eight
    commit on main and push it at once; git refuses all but one (not
    FlowForge's doing), and each pulls and pushes again."""
    users = ["dev%d" % n for n in range(6)] + ["dev0", "dev1"]   # two of them on two machines
    clones = [Clone(tmp_path, origin, "c%d" % n, user, pycache) for n, user in enumerate(users)]
    expected = {}
    queued = 0
    for rnd in range(2):
        for n, clone in enumerate(clones):
            day = "2026-11-%02d" % (16 + rnd)
            seconds = 600 + 97 * n + 13 * rnd
            clone.work(str(n + 1), "%sT09:00:00Z" % day,
                       "%sT%02d:%02d:%02dZ" % (day, 9 + seconds // 3600, seconds // 60 % 60,
                                               seconds % 60))
            cell = (clone.user, str(n + 1), day)
            expected[cell] = expected.get(cell, 0) + seconds
            if rnd == 0:
                clone.git("checkout", "-q", "-b", "feat-%d" % n)
            else:
                clone.git("checkout", "-q", "main")
            clone.commit("c%d.txt" % n, "round %d of %s" % (rnd, clone.name))
        branches = ["feat-%d" % n if rnd == 0 else "main" for n in range(len(clones))]
        results = push_all_at_once(clones, branches)
        for n, (rc, err) in enumerate(results):
            lines = flowforge_lines(err)
            assert len(lines) == 1, err             # the ledger had news in every clone
            if "queued" in lines[0]:
                queued += 1
            else:
                assert lines[0] == "flowforge: ledger pushed to origin (1 store)", err
            if rnd == 0:
                assert rc == 0, (n, err)            # FlowForge never fails the user's push
        for n, (rc, err) in enumerate(results):
            for _ in range(len(clones)):            # git's own refusal of main: pull, push again
                if rc == 0:
                    break
                assert "rejected" in err, err
                clones[n].git("pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
                clones[n].assert_clean()
                proc = clones[n].git("push", "origin", "main", check=False)
                rc, err = proc.returncode, proc.stderr
                assert all("queued" not in line for line in flowforge_lines(err)), err
            assert rc == 0, (n, err)
        assert sum(rc == 0 for rc, _ in results) >= 1
    for clone in clones:
        if clone.queued_pushes():
            clone.ok("queue", "run")
        clone.ok("push")                            # a no-op unless something is still owed
        assert not clone.queued_pushes()
    keys = sorted(c.store_key() for c in clones)
    remote = bare_refs(origin, "refs/flowforge/")
    assert sorted(remote) == ["refs/flowforge/stores/" + k for k in keys]
    for clone in clones:
        assert remote["refs/flowforge/stores/" + clone.store_key()] == clone.git(
            "rev-parse", clone.store_refs()[0]).stdout.strip()
    manager = manager_sees(tmp_path, origin, pycache)
    assert manager.rows() == expected
    assert manager.total() == sum(expected.values())
    print("\n%d of %d ledger pushes were queued and retried" % (queued, 2 * len(clones)))


# -- 4. time on a pushed, never merged branch ----------------------------------

def test_time_on_a_pushed_unmerged_branch_reaches_a_fresh_clone(tmp_path, origin, pycache):
    alice = Clone(tmp_path, origin, "alice", "alice", pycache)
    alice.git("checkout", "-q", "-b", "spike")
    alice.work("42", "2026-11-19T09:00:00Z", "2026-11-19T11:11:11Z")  # 7871 s
    alice.commit("spike.txt", "an experiment nobody merges")
    push = alice.git("push", "-u", "origin", "spike")
    assert flowforge_lines(push.stderr) == ["flowforge: ledger pushed to origin (1 store)"]
    main = git(origin, "rev-parse", "main", env=clean_env(HOME=str(tmp_path)))
    assert alice.git("merge-base", "--is-ancestor", "spike", main.strip(), check=False).returncode
    manager = manager_sees(tmp_path, origin, pycache, via="git")
    assert manager.git("rev-parse", "--abbrev-ref", "HEAD").stdout.strip() == "main"
    assert manager.rows() == {("alice", "42", "2026-11-19"): 7871}


# -- 5. kill -9 during a ledger update ------------------------------------------

def crash_template(tmp_path, pycache, home):
    root = make_git_repo(str(tmp_path / "template"))
    runner = Runner(root, pycache, home)
    runner.ok("init", "--timezone", "UTC")
    runner.ok("log", "2", "2h", "--date", "2026-10-31", env=NOW)
    runner.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    runner.ok("aggregate", env=NOW)                 # the store ref exists: an update follows
    runner.ok("start", "3", "--at", "2026-11-20T09:00:00Z", env=NOW)
    runner.ok("stop", "--at", "2026-11-20T09:45:17Z", env=NOW)           # 2717 s
    runner.ok("log", "4", "30m", "--date", "2026-09-15", env=NOW)
    runner.ok("log", "1", "15m", "--date", "2026-11-19", env=NOW)
    return runner, 7200 + 3600 + 2717 + 1800 + 900


def crash_once(template, k, before, expected):
    """Copy the template, SIGKILL `aggregate` after its k-th durable step, check
    the refs, aggregate again, check the total; True if it crashed."""
    root = os.path.join(os.path.dirname(template.root), "run-%d" % k)
    shutil.copytree(template.root, root, symlinks=True)
    runner = Runner(root, template.pycache, template.home)
    rc = run_crashing(runner, k, "aggregate")
    if rc != -signal.SIGKILL:
        assert rc == 0, (k, rc)
        check_refs_and_objects(root)
        assert runner.ok("report", "--json", "--by", "user").json["total_seconds"] == expected
        runner.ok("audit", "verify", env=NOW)
        shutil.rmtree(root)
        return False
    time.sleep(0.02)          # a git child of the killed process may still be finishing
    check_refs_and_objects(root)
    total = runner.ok("report", "--json", "--by", "user", "--no-aggregate").json["total_seconds"]
    assert total in (before, expected), (k, total)   # the old tip or the new one, nothing else
    runner.ok("aggregate", env=NOW)
    check_refs_and_objects(root)
    assert runner.ok("report", "--json", "--by", "user").json["total_seconds"] == expected, k
    if k % 3 == 0:
        runner.ok("audit", "verify", env=NOW)
    shutil.rmtree(root)
    return True


def test_kill9_at_every_step_of_a_ledger_update(tmp_path, pycache, home):
    """SIGKILL after the k-th write/fsync/replace/unlink/ftruncate of `aggregate`
    (an update of an existing store ref: two months and the audit chain), for
    every k until the run finishes; two runs at a time (independent copies)."""
    from concurrent.futures import ThreadPoolExecutor
    template, expected = crash_template(tmp_path, pycache, home)
    before = template.ok("report", "--json", "--by", "user", "--no-aggregate").json["total_seconds"]
    assert before == 7200 + 3600
    crashes, finished = 0, False
    with ThreadPoolExecutor(max_workers=2) as pool:
        for first in range(1, 400, 6):
            ks = range(first, first + 6)
            outcome = list(pool.map(lambda k: crash_once(template, k, before, expected), ks))
            crashes += sum(outcome)
            if not any(outcome):
                # a whole batch ran to the end: past the last step (the count of
                # steps varies a little: a pipe to git may take a write in parts)
                finished = True
                break
    assert finished, "the operation never finished"
    print("\naggregate: %d crash points" % crashes)
    assert crashes >= 5, crashes


def timewarrior_data(path, n, rng):
    """n intervals over 2026-01..2026-11 with odd seconds, one after another on
    each day as Timewarrior keeps them (it refuses overlaps); returns their total."""
    months, total, cursor = {}, 0, {}
    for i in range(n):
        month, day = 1 + i % 11, 1 + (i * 7) % 19
        start = cursor.get((month, day), 0) + rng.randint(0, 600)
        length = rng.randint(60, 2 * 3600)
        cursor[(month, day)] = start + length
        total += length
        fmt = "2026%02d%02dT%02d%02d%02dZ"
        a = fmt % ((month, day) + (start // 3600, start // 60 % 60, start % 60))
        end = start + length
        b = fmt % ((month, day) + (end // 3600, end // 60 % 60, end % 60))
        months.setdefault(month, []).append("inc %s - %s # %d\n" % (a, b, 100 + i % 9))
    os.makedirs(os.path.join(path, "data"))
    for month, lines in months.items():
        with open(os.path.join(path, "data", "2026-%02d.data" % month), "w") as f:
            f.writelines(lines)
    return total


def test_random_kill9_during_full_aggregation(tmp_path, pycache, home):
    rng = random.Random(20261120)
    root = make_git_repo(str(tmp_path / "repo"))
    runner = Runner(root, pycache, home)
    runner.ok("init", "--timezone", "UTC")
    expected = timewarrior_data(str(tmp_path / "tw"), 1500, rng)
    runner.ok("import", "timewarrior", str(tmp_path / "tw"), env=NOW)
    started = time.monotonic()
    runner.ok("aggregate", "--full", env=NOW)
    op_time = time.monotonic() - started          # adapts: what an unkilled run takes
    assert runner.ok("report", "--json", "--by", "user").json["total_seconds"] == expected
    env = clean_env(HOME=home)

    def tip():
        return git(root, "for-each-ref", "--format=%(objectname)", "refs/flowforge/stores/",
                   env=env)

    kills = moved = 0
    for i in range(300 if SOAK else 30):
        runner.ok("log", str(i % 5 + 1), "%dm" % (1 + i % 30), "--date",
                  "2026-%02d-%02d" % (1 + i % 11, 1 + i % 19), env=NOW)
        expected += (1 + i % 30) * 60
        before = tip()
        proc = runner.popen("aggregate", "--full", env=NOW, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
        started = time.monotonic()
        try:
            proc.wait(timeout=rng.uniform(0.3, 1.1) * op_time)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
        if proc.returncode == -signal.SIGKILL:
            kills += 1
            moved += tip() != before              # killed after its commit point
        else:
            assert proc.returncode == 0, err
            op_time = 0.5 * op_time + 0.5 * (time.monotonic() - started)
        time.sleep(0.02)
        out = git(root, "for-each-ref", "--format=%(objectname) %(refname)", "refs/flowforge/",
                  env=env)
        for line in out.splitlines():
            oid, ref = line.split(" ", 1)
            assert subprocess.run(["git", "cat-file", "-e", oid], cwd=root, env=env).returncode \
                == 0, (i, ref, oid)
    print("\n%d of 30 full aggregations killed, %d after the ref moved (one takes %.2f s)"
          % (kills, moved, op_time))
    assert kills >= 10, kills
    check_refs_and_objects(root)
    runner.ok("aggregate", env=NOW)
    check_refs_and_objects(root)
    assert runner.ok("report", "--json", "--by", "user").json["total_seconds"] == expected
    runner.ok("audit", "verify", env=NOW)


# -- 6. a store ref rewritten on the remote --------------------------------------

@pytest.mark.parametrize("how,via", [("force-push", "flowforge"), ("update-ref", "flowforge"),
                                     ("force-push", "git")])
def test_a_rewritten_store_ref_is_refused_until_accepted(tmp_path, origin, pycache, how, via):
    """`via`: how the manager fetches after the rewrite: `flowforge fetch`, or
    a plain `git fetch` (the refspec force-updates refs/flowforge/incoming/,
    so the refusal happens when the report reads it)."""
    alice = Clone(tmp_path, origin, "alice", "alice", pycache)
    alice.log("1", "1h", "2026-11-18")
    alice.commit("a.txt", "first")
    alice.git("push", "-q", "origin", "main")
    key = alice.store_key()
    ref = "refs/flowforge/stores/" + key
    old_tip = alice.git("rev-parse", ref).stdout.strip()
    manager = manager_sees(tmp_path, origin, pycache, via)
    old_rows = {("alice", "1", "2026-11-18"): 3600}
    assert manager.rows() == old_rows
    # alice records more, then the remote gets a history that does not extend the old one
    alice.work("2", "2026-11-19T09:00:00Z", "2026-11-19T09:10:10Z")    # 610 s
    alice.ok("aggregate")
    tree = alice.git("rev-parse", ref + "^{tree}").stdout.strip()
    orphan = alice.git("commit-tree", tree, "-m", "rewritten history").stdout.strip()
    bare_env = clean_env(HOME=str(tmp_path))
    if how == "force-push":
        alice.git("push", "-q", "--force", "--no-verify", "origin", "%s:%s" % (orphan, ref))
    else:
        alice.git("push", "-q", "--no-verify", "origin", "%s:refs/scratch/new" % orphan)
        git(origin, "update-ref", ref, orphan, old_tip, env=bare_env)
        git(origin, "update-ref", "-d", "refs/scratch/new", env=bare_env)
    assert bare_refs(origin, ref)[ref] == orphan
    new_rows = dict(old_rows)
    new_rows[("alice", "2", "2026-11-19")] = 610

    kept = "refs/flowforge/quarantine/origin/%s/%s" % (key, old_tip[:12])
    if via == "git":
        manager.git("fetch", "-q")
        first = manager("report", "--json", "--by", "user,issue,day")
    else:
        first = manager("fetch")
    assert first.rc == 0, first
    assert "rewritten" in first.err, first
    assert kept in first.err, first
    assert manager.git("rev-parse", kept).stdout.strip() == old_tip
    assert manager.git("rev-parse", "refs/flowforge/remotes/origin/" + key).stdout.strip() \
        == old_tip
    assert manager.rows() == old_rows                   # the accepted history still counts
    again = manager("report", "--json")                # nothing decided: it says so again
    assert again.rc == 0 and "rewritten" in again.err, again
    again = manager("fetch")
    assert again.rc == 0 and "rewritten" in again.err, again
    assert manager.rows() == old_rows

    take = manager("fetch", "--accept-rewritten")
    assert take.rc == 0, take
    assert "rewritten" not in take.err, take
    assert manager.git("rev-parse", "refs/flowforge/remotes/origin/" + key).stdout.strip() \
        == orphan
    assert manager.git("rev-parse", kept).stdout.strip() == old_tip   # kept for good
    assert manager.rows() == new_rows
    assert "rewritten" not in manager("report", "--json").err


# -- 7. receive.denyNonFastForwards ---------------------------------------------

def test_a_remote_that_denies_non_fast_forwards(tmp_path, origin, pycache):
    git(origin, "config", "receive.denyNonFastForwards", "true", env=clean_env(HOME=str(tmp_path)))
    alice = Clone(tmp_path, origin, "alice", "alice", pycache)
    expected = {}
    for n, day in enumerate(("2026-11-16", "2026-11-17", "2026-11-18")):
        alice.work("1", "%sT09:00:00Z" % day, "%sT09:%02d:%02dZ" % (day, 10 + n, 7 * n))
        expected[("alice", "1", day)] = (10 + n) * 60 + 7 * n
        alice.commit("a.txt", "change %d" % n)
        push = alice.git("push", "origin", "main")
        assert flowforge_lines(push.stderr) == ["flowforge: ledger pushed to origin (1 store)"], \
            push.stderr
        assert not alice.queued_pushes()
    assert "up to date" in alice.ok("push").out
    key = alice.store_key()
    assert bare_refs(origin, "refs/flowforge/")["refs/flowforge/stores/" + key] == alice.git(
        "rev-parse", "refs/flowforge/stores/" + key).stdout.strip()
    manager = manager_sees(tmp_path, origin, pycache)
    assert manager.rows() == expected


# -- 8. a host that takes branches only -------------------------------------------

BRANCHES_ONLY = """#!/bin/sh
while read old new ref; do
    case "$ref" in
    refs/heads/*) ;;
    *) echo "this host takes branches only, not $ref" >&2; exit 1 ;;
    esac
done
exit 0
"""


def test_a_remote_that_takes_branches_only(tmp_path, origin, pycache):
    hook = os.path.join(origin, "hooks", "pre-receive")
    with open(hook, "w") as f:
        f.write(BRANCHES_ONLY)
    os.chmod(hook, 0o755)
    alice = Clone(tmp_path, origin, "alice", "alice", pycache)
    alice.work("12", "2026-11-19T09:00:00Z", "2026-11-19T10:02:03Z")  # 3723 s
    alice.commit("a.txt", "work on a branches-only host")
    push = alice.git("push", "origin", "main")            # the user's push is never failed
    head = alice.head()
    assert bare_refs(origin, "refs/heads/")["refs/heads/main"] == head
    lines = flowforge_lines(push.stderr)
    assert len(lines) == 1, push.stderr
    assert "ledger.prefix" in lines[0], lines[0]
    assert "refs/heads/flowforge/" in lines[0], lines[0]
    assert len(alice.queued_pushes()) == 1
    assert not bare_refs(origin, "refs/flowforge/")

    path = os.path.join(alice.root, ".flowforge", "config.json")
    with open(path) as f:
        config = json.load(f)
    config["ledger"] = {"prefix": "refs/heads/flowforge/"}
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    alice.git("add", ".flowforge/config.json")
    alice.git("commit", "-qm", "FlowForge: keep the ledger under refs/heads/flowforge/")
    alice.assert_clean()
    push = alice.git("push", "origin", "main")
    assert flowforge_lines(push.stderr) == ["flowforge: ledger pushed to origin (1 store)"], \
        push.stderr
    key = alice.store_key()
    assert bare_refs(origin, "refs/heads/flowforge/")["refs/heads/flowforge/" + key] == \
        alice.git("rev-parse", "refs/flowforge/stores/" + key).stdout.strip()
    assert not alice.queued_pushes()                   # the queued job is settled

    manager = manager_sees(tmp_path, origin, pycache)  # its clone has the committed config
    assert manager.rows() == {("alice", "12", "2026-11-19"): 3723}
    plain = manager_sees(tmp_path, origin, pycache, via="git", name="manager2")
    assert plain.rows() == {("alice", "12", "2026-11-19"): 3723}


# -- 9. a clone that never fetched -------------------------------------------------

@pytest.mark.parametrize("before", ["nothing", "git pull"])
def test_report_on_a_clone_that_never_fetched_says_to_fetch(tmp_path, origin, pycache, before):
    """`before`: what the manager did first; a plain `git pull` without the
    hooks' refspec brings code, not the ledger."""
    alice = Clone(tmp_path, origin, "alice", "alice", pycache)
    alice.log("1", "1h", "2026-11-18")
    alice.commit("a.txt", "work")
    alice.git("push", "-q", "origin", "main")
    assert bare_refs(origin, "refs/flowforge/")
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    if before == "git pull":
        manager.git("pull", "-q")
        assert not manager.git("for-each-ref", "refs/flowforge/").stdout
    r = manager("report", "--json")
    assert r.rc != 0, r
    assert "flowforge fetch" in r.err, r
    assert r.out == "", r
    manager.ok("fetch")
    assert manager.rows() == {("alice", "1", "2026-11-18"): 3600}


# -- 10. store refs that lie about whose they are ------------------------------

def hostile_copy(alice, new_key):
    """Push alice's store history under another store ref name, as a teammate
    with push access could."""
    key = alice.store_key()
    alice.git("push", "-q", "--no-verify", "origin",
              "refs/flowforge/stores/%s:refs/flowforge/stores/%s" % (key, new_key))
    return key


@pytest.mark.parametrize("rename", ["other user, same store", "same user, other store"])
def test_a_store_ref_that_claims_someone_elses_store_is_named_never_counted(
        tmp_path, origin, pycache, rename):
    alice = Clone(tmp_path, origin, "alice", "alice", pycache)
    alice.log("1", "1h", "2026-11-16")
    alice.commit("a.txt", "work")
    alice.git("push", "-q", "origin", "main")
    key = alice.store_key()
    user, store = key.rsplit("--", 1)
    fake = "mallory--" + store if rename.startswith("other user") else user + "--0123456789"
    hostile_copy(alice, fake)
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    r = manager("report", "--json")
    assert r.rc == 65 and "Traceback" not in r.err, r
    assert r.err.count("\n") == 1 and fake in r.err, r.err      # one line, naming the liar
    r = manager("reconcile", "--ci")
    assert r.rc == 1 and fake in r.out, r


def test_reports_say_how_many_stores_and_how_old_the_fetch_is(tmp_path, origin, pycache):
    alice = Clone(tmp_path, origin, "alice", "alice", pycache)
    alice.log("1", "1h", "2026-11-16")
    alice.commit("a.txt", "work")
    alice.git("push", "-q", "origin", "main")
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    r = manager.ok("report")
    assert "ledger: 1 store(s), fetched" in r.err and "ago" in r.err, r.err
    assert manager.report()["ledger"]["stores"] == 1
    assert manager.report()["ledger"]["fetched_at"] is not None


def test_a_fetch_leaves_the_ledger_refs_packed_and_every_store_readable(tmp_path, origin, pycache):
    """Reports list every ledger ref; after a fetch they are packed (one file,
    as `git gc` keeps refs), and packing changes nothing a report sees; a fetch
    whose packing cannot run (its lock is held) still succeeds."""
    for name in ("alice", "bob"):
        dev = Clone(tmp_path, origin, name, name, pycache)
        dev.log("1", "1h", "2026-11-16")
        dev.commit(name + ".txt", "work")
        dev.git("pull", "-q", "--rebase", "origin", "main")
        dev.git("push", "-q", "origin", "main")
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    loose = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(manager.root, ".git/refs"))
             for f in files if "/flowforge/" in os.path.join(d, f)]
    assert loose == []
    packed = open(os.path.join(manager.root, ".git/packed-refs")).read()
    assert packed.count("refs/flowforge/remotes/origin/") == 2, packed
    assert manager.report()["total_seconds"] == 7200
    carol = Clone(tmp_path, origin, "carol", "carol", pycache)
    carol.log("2", "30m", "2026-11-17")
    carol.commit("carol.txt", "work")
    carol.git("pull", "-q", "--rebase", "origin", "main")
    carol.git("push", "-q", "origin", "main")
    lock = os.path.join(manager.root, ".git/packed-refs.lock")
    open(lock, "w").close()   # another git packing refs right now
    try:
        manager.ok("fetch")
    finally:
        os.unlink(lock)
    assert manager.report()["total_seconds"] == 7200 + 1800


# -- the objects FlowForge writes itself ---------------------------------------

@pytest.mark.parametrize("object_format", ["sha1", "sha256"])
def test_trees_and_commits_built_in_process_are_the_ones_git_makes(tmp_path, object_format):
    """A commit's blobs, trees and commit object are built here and sent to git
    in one pack: each must be the very object `git mktree` / `git commit-tree`
    would make (git's entry order, a directory sorting as `name/`; the names git
    trims), and a pack of few objects or of many must store them all."""
    root = str(tmp_path / "r")
    subprocess.run(["git", "init", "-q", "--object-format=" + object_format, root], check=True)
    repo = ff.Repo(root)

    def g(*args, input=None):
        return subprocess.run(["git"] + list(args), cwd=root, input=input, capture_output=True,
                              check=True).stdout.decode()
    rng = random.Random(5)
    blobs = [("blob", b"%d\n" % n) for n in range(3)] + [("blob", b"x" * n) for n in (0, 1, 700)]
    ids = ff.write_objects(repo, blobs)                      # loose, through unpack-objects
    assert ids == [g("hash-object", "--stdin", input=data).strip() for _, data in blobs]
    tree_id = g("mktree", input="".join("100644 blob %s\t%d\n" % (i, n) for n, i in
                                                 enumerate(ids)).encode()).strip()
    for _ in range(40):
        entries = {}
        for _ in range(rng.randint(1, 8)):
            name = "".join(rng.choice("ab.-_0Z") for _ in range(rng.randint(1, 4)))
            if name in (".", ".."):   # refused (below), as git fsck would
                continue
            entries[name] = rng.choice([("100644", rng.choice(ids)), ("40000", tree_id),
                                        ("100755", ids[0])])
        made = g("mktree", input="".join(
            "%s %s %s\t%s\n" % ("040000" if mode == "40000" else mode, "tree" if mode == "40000"
                                else "blob", oid, name) for name, (mode, oid) in entries.items()
        ).encode()).strip()
        raw = ff.tree_object(entries)
        assert ff.object_id("tree", raw, object_format) == made, entries
    for bad in ({"a/b": ("100644", ids[0])}, {"..": ("100644", ids[0])}, {"a": ("100664", ids[0])}):
        with pytest.raises(ValueError):
            ff.tree_object(bad)
    parent_id = None
    for user in ("ann.", "bob", "x_y-z"):   # each over the one before
        message = "aggregate: 2026-11 (audit 3)"
        env = dict(os.environ, **ff.ledger_commit_env(user, 1795000000))
        expected = subprocess.run(["git", "commit-tree", "--no-gpg-sign", tree_id] +
                                  (["-p", parent_id] if parent_id else []), cwd=root, env=env,
                                  input=message.encode(), capture_output=True, check=True).stdout
        raw = ff.ledger_commit_object(tree_id, parent_id, user, 1795000000, message)
        assert ff.object_id("commit", raw, object_format) == expected.decode().strip(), user
        parent_id = expected.decode().strip()
    many = [("blob", b"shard %d\n" % n) for n in range(ff.PACK_AT + 5)]   # kept as a pack
    ids = ff.write_objects(repo, many)
    assert g("cat-file", "blob", ids[-1]) == "shard %d\n" % (ff.PACK_AT + 4)
    assert g("count-objects", "-v").count("packs: 1") == 1
    subprocess.run(["git", "fsck", "--strict", "--no-dangling"], cwd=root, check=True, capture_output=True)
