"""Real git clones committing concurrently: shards never conflict, reports add up."""
import os
import subprocess

import pytest

from conftest import Runner, git, make_git_repo

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


@pytest.fixture
def origin(tmp_path, pycache, home):
    bare = str(tmp_path / "origin.git")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", bare], check=True)
    seed = Runner(make_git_repo(str(tmp_path / "seed"), "lead@example.com"), pycache, home)
    seed.ok("init", "--timezone", "UTC", user="lead")
    git(seed.root, "add", "-A")
    git(seed.root, "commit", "-qm", "Set up FlowForge")
    git(seed.root, "remote", "add", "origin", bare)
    git(seed.root, "push", "-q", "origin", "main")
    return bare


def clone(origin, path, email, pycache, home):
    subprocess.run(["git", "clone", "-q", origin, path], check=True, capture_output=True)
    git(path, "config", "user.email", email)
    git(path, "config", "user.name", email.split("@")[0])
    return Runner(path, pycache, home)


def commit_and_sync(runner, user, message):
    runner.ok("aggregate", user=user, env=NOW)
    git(runner.root, "add", "-A")
    git(runner.root, "commit", "-qm", message)
    push = subprocess.run(["git", "push", "-q", "origin", "main"], cwd=runner.root,
                          capture_output=True, text=True)
    if push.returncode:
        merge = subprocess.run(["git", "pull", "-q", "--no-rebase", "--no-edit", "origin", "main"],
                               cwd=runner.root, capture_output=True, text=True)
        assert merge.returncode == 0, "merge conflict: " + merge.stdout + merge.stderr
        git(runner.root, "push", "-q", "origin", "main")


def work(runner, user, day, minutes, issue):
    runner.ok("start", issue, "--at", "%s 09:00" % day, user=user, env=NOW)
    runner.ok("stop", "--at", "%s %02d:%02d" % (day, 9 + minutes // 60, minutes % 60),
              user=user, env=NOW)


def test_two_developers_on_two_clones_never_conflict(origin, tmp_path, pycache, home):
    alice = clone(origin, str(tmp_path / "alice"), "alice@example.com", pycache, home)
    bob = clone(origin, str(tmp_path / "bob"), "bob@example.com", pycache, home)
    expected = {"alice": 0, "bob": 0}
    for n in range(1, 6):
        day = "2026-11-%02d" % (n + 9)
        # both work and commit before either pulls: every round needs a real merge
        work(alice, "alice", day, 30 * n, "1")
        work(bob, "bob", day, 20 * n, "2")
        expected["alice"] += 30 * n * 60
        expected["bob"] += 20 * n * 60
        commit_and_sync(alice, "alice", "alice day %d" % n)
        commit_and_sync(bob, "bob", "bob day %d" % n)
        git(alice.root, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
    manager = clone(origin, str(tmp_path / "manager"), "boss@example.com", pycache, home)
    rows = manager.ok("report", "--json", "--by", "user", user="boss").json["rows"]
    assert {r["user"]: r["seconds"] for r in rows} == expected
    assert not os.path.exists(os.path.join(manager.root, ".flowforge/user"))  # no private data
    for runner in (alice, bob):
        git(runner.root, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
        rows = runner.ok("report", "--json", "--by", "user").json["rows"]
        assert {r["user"]: r["seconds"] for r in rows} == expected
    log = git(manager.root, "log", "--merges", "--oneline")
    assert len(log.splitlines()) >= 4            # the merges really happened


def test_one_developer_on_two_clones(origin, tmp_path, pycache, home):
    laptop = clone(origin, str(tmp_path / "laptop"), "alice@example.com", pycache, home)
    desktop = clone(origin, str(tmp_path / "desktop"), "alice@example.com", pycache, home)
    work(laptop, "alice", "2026-11-10", 90, "1")
    work(desktop, "alice", "2026-11-10", 45, "1")     # the same day, the same issue
    commit_and_sync(laptop, "alice", "laptop")
    commit_and_sync(desktop, "alice", "desktop")
    git(laptop.root, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
    shard_dirs = os.listdir(os.path.join(laptop.root, ".flowforge/team/summaries"))
    assert len(shard_dirs) == 2 and all(d.startswith("alice--") for d in shard_dirs)
    report = laptop.ok("report", "--json", "--by", "user,issue,day").json
    assert [(r["user"], r["issue"], r["day"], r["seconds"]) for r in report["rows"]] == [
        ("alice", "1", "2026-11-10", 135 * 60)]
