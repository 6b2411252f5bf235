"""Real git clones committing and pushing concurrently: team time travels in
the ledger (one store ref per private store), so merges never conflict and
every clone's report adds up, to the second.

Each clone has the hooks installed: `git push` pushes its store refs (the
pre-push hook) and `git pull` brings everyone's (the fetch refspec that
`install hooks` adds).  The manager's fresh clone runs `flowforge fetch`."""
import os
import subprocess

import pytest

from conftest import Runner, git, make_git_repo, roomy_hook_budget, store_keys

NOW_ISO = "2026-11-20T18:00:00Z"
NOW = {"FLOWFORGE_NOW": NOW_ISO}


@pytest.fixture
def origin(tmp_path, pycache, home):
    bare = str(tmp_path / "origin.git")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", bare], check=True)
    seed = Runner(make_git_repo(str(tmp_path / "seed"), "lead@example.com"), pycache, home)
    seed.ok("init", "--timezone", "UTC", user="lead")
    roomy_hook_budget(seed.root)
    git(seed.root, "add", "-A")
    git(seed.root, "commit", "-qm", "Set up FlowForge")
    git(seed.root, "remote", "add", "origin", bare)
    git(seed.root, "push", "-q", "origin", "main")
    return bare


def clone(origin, path, email, pycache, home, hooks=True):
    subprocess.run(["git", "clone", "-q", origin, path], check=True, capture_output=True)
    git(path, "config", "user.email", email)
    git(path, "config", "user.name", email.split("@")[0])
    runner = Runner(path, pycache, home)
    runner.user = email.split("@")[0]
    if hooks:
        runner.ok("install", "hooks", user=runner.user)
    return runner


def git_as(runner, *args, check=True):
    """git as the clone's developer: the hooks see the same environment
    (user, pinned clock, home) as FlowForge's own commands."""
    email = "%s@example.com" % runner.user
    env = runner.env(FLOWFORGE_USER=runner.user, GIT_AUTHOR_NAME=runner.user,
                     GIT_COMMITTER_NAME=runner.user, GIT_AUTHOR_EMAIL=email,
                     GIT_COMMITTER_EMAIL=email, GIT_AUTHOR_DATE=NOW_ISO,
                     GIT_COMMITTER_DATE=NOW_ISO, **NOW)
    proc = subprocess.run(["git"] + list(args), cwd=runner.root, capture_output=True, text=True,
                          env=env)
    if check:
        assert proc.returncode == 0, "git %s: %s%s" % (" ".join(args), proc.stdout, proc.stderr)
    return proc


def pull(runner):
    """`git pull`: a merge of main, and (the refspec the hooks added) the ledger."""
    merge = git_as(runner, "pull", "-q", "--no-rebase", "--no-edit", check=False)
    assert merge.returncode == 0, "merge conflict: " + merge.stdout + merge.stderr


def commit_and_sync(runner, message):
    """Aggregate, commit code, push: on a rejected push, pull (a real merge) and push again."""
    runner.ok("aggregate", user=runner.user, env=NOW)
    with open(os.path.join(runner.root, os.path.basename(runner.root) + ".txt"), "a") as f:
        f.write(message + "\n")
    git_as(runner, "add", "-A")
    git_as(runner, "commit", "-qm", message)
    assert git_as(runner, "status", "--porcelain").stdout == ""
    push = git_as(runner, "push", "-q", "origin", "main", check=False)
    if push.returncode:
        pull(runner)
        push = git_as(runner, "push", "-q", "origin", "main")
    assert "not pushed" not in push.stderr, push.stderr


def work(runner, day, minutes, issue):
    runner.ok("start", issue, "--at", "%s 09:00" % day, user=runner.user, env=NOW)
    runner.ok("stop", "--at", "%s %02d:%02d" % (day, 9 + minutes // 60, minutes % 60),
              user=runner.user, env=NOW)


def remote_store_refs(bare):
    out = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(objectname)",
                          "refs/flowforge/"], cwd=bare, capture_output=True, text=True,
                         check=True).stdout
    return dict(line.split() for line in out.splitlines())


def assert_linear(root, rev):
    history = git(root, "rev-list", "--parents", rev).splitlines()
    assert history and all(len(line.split()) <= 2 for line in history), history


def rows_by_user(runner, user):
    rows = runner.ok("report", "--json", "--by", "user", user=user, env=NOW).json["rows"]
    return {r["user"]: r["seconds"] for r in rows}


def test_two_developers_on_two_clones_never_conflict(origin, tmp_path, pycache, home):
    alice = clone(origin, str(tmp_path / "alice"), "alice@example.com", pycache, home)
    bob = clone(origin, str(tmp_path / "bob"), "bob@example.com", pycache, home)
    expected = {"alice": 0, "bob": 0}
    for n in range(1, 6):
        day = "2026-11-%02d" % (n + 9)
        # both work and commit before either pulls: every round needs a real merge
        work(alice, day, 30 * n, "1")
        work(bob, day, 20 * n, "2")
        expected["alice"] += 30 * n * 60
        expected["bob"] += 20 * n * 60
        commit_and_sync(alice, "alice day %d" % n)
        commit_and_sync(bob, "bob day %d" % n)
        pull(alice)
    # the remote holds one linear store ref per developer, at each clone's tip
    refs = remote_store_refs(origin)
    keys = {**store_keys(alice.root), **store_keys(bob.root)}
    assert refs == {"refs/flowforge/stores/" + k: tip for k, tip in keys.items()}
    assert sorted(k.rpartition("--")[0] for k in keys) == ["alice", "bob"]
    manager = clone(origin, str(tmp_path / "manager"), "boss@example.com", pycache, home,
                    hooks=False)
    manager.ok("fetch", user="boss", env=NOW)
    assert rows_by_user(manager, "boss") == expected
    assert not os.path.exists(os.path.join(manager.root, ".flowforge/user"))  # no private data
    for key in keys:
        assert_linear(manager.root, "refs/flowforge/remotes/origin/" + key)
    assert manager.ok("audit", "verify", user="boss", env=NOW).rc == 0
    ci = manager("reconcile", "--ci", "--json", user="boss", env=NOW)
    assert ci.json["findings"] == [] and ci.json["stores"] == 2 and ci.json["shards"] == 2
    for runner in (alice, bob):
        pull(runner)                                 # brings the ledger too (the hooks' refspec)
        assert rows_by_user(runner, runner.user) == expected
    log = git(manager.root, "log", "--merges", "--oneline")
    assert len(log.splitlines()) >= 4            # the merges really happened


def test_one_developer_on_two_clones(origin, tmp_path, pycache, home):
    laptop = clone(origin, str(tmp_path / "laptop"), "alice@example.com", pycache, home)
    desktop = clone(origin, str(tmp_path / "desktop"), "alice@example.com", pycache, home)
    work(laptop, "2026-11-10", 90, "1")
    work(desktop, "2026-11-10", 45, "1")     # the same day, the same issue
    commit_and_sync(laptop, "laptop")
    commit_and_sync(desktop, "desktop")
    pull(laptop)
    keys = sorted(set(store_keys(laptop.root)) | set(store_keys(desktop.root)))
    assert len(keys) == 2 and all(k.startswith("alice--") for k in keys)   # two stores
    assert sorted(remote_store_refs(origin)) == ["refs/flowforge/stores/" + k for k in keys]
    for runner in (laptop, desktop):
        if runner is desktop:
            runner.ok("fetch", user="alice", env=NOW)
        report = runner.ok("report", "--json", "--by", "user,issue,day", env=NOW).json
        assert [(r["user"], r["issue"], r["day"], r["seconds"]) for r in report["rows"]] == [
            ("alice", "1", "2026-11-10", 135 * 60)]
