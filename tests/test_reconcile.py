"""reconcile: local repairs, and --ci on clean checkouts with real commits."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import flowforge as ff

from conftest import FLOWFORGE, Runner, clean_env, make_git_repo
from conftest import git as git_as_test

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def git(cwd, *args):
    """git as the clone's own author (its user.email), not the suite's test identity."""
    env = {k: v for k, v in clean_env(HOME=os.path.dirname(cwd)).items()
           if not k.startswith(("GIT_AUTHOR_", "GIT_COMMITTER_"))}
    return git_as_test(cwd, *args, env=env)


@pytest.fixture
def team(tmp_path, pycache, home):
    """A bare remote; alice and bob each commit time from their own clones."""
    bare = str(tmp_path / "origin.git")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", bare], check=True)
    clones = {}
    for name in ("alice", "bob"):
        path = str(tmp_path / name)
        if not clones:
            make_git_repo(path, "%s@example.com" % name)
            runner = Runner(path, pycache, home)
            runner.ok("init", "--timezone", "UTC", user=name)
            shutil.copy(FLOWFORGE, os.path.join(path, "flowforge.py"))
            git(path, "add", "-A")
            git(path, "commit", "-qm", "Set up FlowForge")
            git(path, "remote", "add", "origin", bare)
            git(path, "push", "-q", "origin", "main")
        else:
            subprocess.run(["git", "clone", "-q", bare, path], check=True)
            git(path, "config", "user.email", "%s@example.com" % name)
            git(path, "config", "user.name", name)
        clones[name] = Runner(path, pycache, home)
    return bare, clones


def commit_time(runner, user, day, minutes):
    runner.ok("log", "1", "%dm" % minutes, "--date", day, user=user, env=NOW)
    runner.ok("aggregate", user=user, env=NOW)
    git(runner.root, "add", "-A")
    git(runner.root, "commit", "-qm", "%s %s" % (user, day))
    git(runner.root, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
    git(runner.root, "push", "-q", "origin", "main")


def fresh_clone(bare, path):
    subprocess.run(["git", "clone", "-q", bare, path], check=True)
    return path


def run_ci(path, *extra, env=None):
    """What the workflow runs, in a checkout without any private data."""
    return subprocess.run([sys.executable, "flowforge.py", "reconcile", "--ci"] + list(extra),
                          cwd=path, capture_output=True, text=True, env=env)


def test_workflow_command_works_on_a_fresh_clone(team, tmp_path):
    bare, clones = team
    commit_time(clones["alice"], "alice", "2026-11-18", 90)
    commit_time(clones["bob"], "bob", "2026-11-18", 30)
    r = clones["alice"].ok("install", "ci")
    assert "wrote .github/workflows/flowforge-reconcile.yml" in r.out
    assert "up to date" in clones["alice"].ok("install", "ci").out
    workflow = open(os.path.join(clones["alice"].root, ".github/workflows/flowforge-reconcile.yml"))
    text = workflow.read()
    for needle in ('cron: "17 */4 * * *"', "push:", "workflow_dispatch:", "concurrency:",
                   "contents: read", "issues: write", "fetch-depth: 0", "gh issue create"):
        assert needle in text
    assert "write-all" not in text and "contents: write" not in text
    git(clones["alice"].root, "add", "-A")
    git(clones["alice"].root, "commit", "-qm", "CI")
    git(clones["alice"].root, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
    git(clones["alice"].root, "push", "-q", "origin", "main")
    checkout = fresh_clone(bare, str(tmp_path / "ci"))
    assert not os.path.exists(os.path.join(checkout, ".flowforge/user"))
    command = re.search(r"run: (python3 flowforge.py reconcile --ci .*)", text).group(1)
    summary = tmp_path / "step-summary.md"
    env = dict(os.environ, GITHUB_STEP_SUMMARY=str(summary))
    proc = subprocess.run(command, shell=True, cwd=checkout, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = open(os.path.join(checkout, "flowforge-reconcile.md")).read()
    assert "**Result: clean.**" in report and "Checked 2 shard(s) and 2 audit chain(s)" in report
    assert summary.read_text() == report


def test_hand_edited_and_conflicted_shards_are_named(team, tmp_path):
    bare, clones = team
    commit_time(clones["alice"], "alice", "2026-11-18", 90)
    commit_time(clones["bob"], "bob", "2026-11-18", 30)
    checkout = fresh_clone(bare, str(tmp_path / "ci"))
    [alice_shard] = glob.glob(checkout + "/.flowforge/team/summaries/alice--*/2026-11.json")
    [bob_shard] = glob.glob(checkout + "/.flowforge/team/summaries/bob--*/2026-11.json")
    text = open(alice_shard).read()
    open(alice_shard, "w").write(text.replace('"seconds":5400', '"seconds":9000', 1))
    good = open(bob_shard).read()
    open(bob_shard, "w").write("<<<<<<< HEAD\n%s=======\n%s>>>>>>> other\n" % (good, good))
    proc = run_ci(checkout, "--report", "r.md")
    assert proc.returncode == 1
    report = open(os.path.join(checkout, "r.md")).read()
    assert "## Damaged shards" in report
    assert os.path.relpath(alice_shard, checkout) in report and "sha256" in report
    assert os.path.relpath(bob_shard, checkout) in report and "conflict markers" in report


def test_missing_aggregation_with_real_commits_by_two_authors(team, tmp_path):
    bare, clones = team
    commit_time(clones["alice"], "alice", "2026-11-18", 90)
    # bob tracks time but commits code without aggregating (no hook, no aggregate)
    clones["bob"].ok("log", "1", "2h", user="bob", env=NOW)
    for n in range(2):
        open(os.path.join(clones["bob"].root, "code%d.txt" % n), "w").write("work\n")
        git(clones["bob"].root, "add", "code%d.txt" % n)
        git(clones["bob"].root, "commit", "-qm", "code %d" % n)
    git(clones["bob"].root, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
    git(clones["bob"].root, "push", "-q", "origin", "main")
    checkout = fresh_clone(bare, str(tmp_path / "ci"))
    proc = run_ci(checkout, "--json")
    assert proc.returncode == 1
    missing = json.loads(proc.stdout)["missing"]
    assert [(m["user"], m["email"], m["commits"]) for m in missing] == [("bob", "bob@example.com", 2)]
    proc = run_ci(checkout, "--report", "r.md")
    report = open(os.path.join(checkout, "r.md")).read()
    assert "Possible missing aggregation" in report and "bob@example.com" in report
    assert "alice@example.com" not in report
    # two hours later, with a one-hour window, the commits are outside it
    import time
    later = dict(os.environ, FLOWFORGE_NOW=str(int(time.time()) + 7200))
    assert run_ci(checkout, "--lookback-hours", "1", env=later).returncode == 0


def test_local_reconcile_repairs(repo):
    repo.ok("log", "1", "1h", "--date", "2026-11-18", env=NOW)
    repo.ok("aggregate", env=NOW)
    # private time newer than the shards, an orphaned temp file of a dead writer,
    # a damaged own shard and a dead aggregate job
    repo.ok("log", "2", "30m", "--date", "2026-11-19", env=NOW)
    temp = os.path.join(repo.root, ".flowforge/team/summaries/.2026-11.json.tmp-999999-0a0b0c0d")
    open(temp, "w").write("{")
    [shard] = glob.glob(repo.root + "/.flowforge/team/summaries/alice--*/2026-11.json")
    open(shard, "a").write("junk")
    q = ff.RetryQueue(os.path.join(repo.root, ".flowforge/state/queue.db"))
    q.enqueue("aggregate", {"user": "alice"}, key="aggregate:alice", max_attempts=1)
    q.fail(q.claim("w"), "boom")
    r = repo.ok("reconcile", env=NOW)
    assert "removed the orphaned temp file" in r.out
    assert "quarantined .flowforge/team/summaries/alice--" in r.out
    assert "aggregated" in r.out and "settled" in r.out
    assert not os.path.exists(temp)
    assert repo.ok("report", "--json").json["total_seconds"] == 5400
    assert q.stats()["counts"]["dead"] == 0
    assert repo.ok("audit", "verify").rc == 0
    assert "nothing to repair" in repo.ok("reconcile", env=NOW).out
