"""reconcile: local repairs, and --ci on clean checkouts with real commits.

Team time travels in the ledger (one store ref per private store): every clone
shares it with `flowforge push`, and a CI checkout sees it after `flowforge
fetch origin`, as the workflow runs it.  Commits and the FlowForge clock are
pinned to the same moment, so the look-back windows are exact."""
import calendar
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import flowforge as ff

from conftest import FLOWFORGE, Runner, clean_env, make_git_repo, rewrite_ledger, store_key_of
from conftest import ledger_files, ledger_shard, store_keys
from conftest import git as git_as_test

NOW_ISO = "2026-11-20T18:00:00Z"
NOW = {"FLOWFORGE_NOW": NOW_ISO}
NOW_TS = calendar.timegm(time.strptime(NOW_ISO, "%Y-%m-%dT%H:%M:%SZ"))


def git(cwd, *args):
    """git as the clone's own author (its user.email), not the suite's test
    identity, at the pinned moment."""
    env = {k: v for k, v in clean_env(HOME=os.path.dirname(cwd)).items()
           if not k.startswith(("GIT_AUTHOR_", "GIT_COMMITTER_"))}
    env.update(GIT_AUTHOR_DATE=NOW_ISO, GIT_COMMITTER_DATE=NOW_ISO)
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
    """Track time, aggregate it into the store ref, commit code, push both."""
    runner.ok("log", "1", "%dm" % minutes, "--date", day, user=user, env=NOW)
    runner.ok("aggregate", user=user, env=NOW)
    with open(os.path.join(runner.root, "%s.txt" % user), "a") as f:
        f.write("%s\n" % day)
    git(runner.root, "add", "%s.txt" % user)
    git(runner.root, "commit", "-qm", "%s %s" % (user, day))
    git(runner.root, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
    git(runner.root, "push", "-q", "origin", "main")
    runner.ok("push", "origin", user=user, env=NOW)


def ci_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    env.update(NOW)
    env.update(extra)
    return env


def fresh_clone(bare, path, fetch=True):
    """A checkout as CI makes it: no private data; the ledger fetched as the
    workflow's first step does."""
    subprocess.run(["git", "clone", "-q", bare, path], check=True)
    if fetch:
        proc = subprocess.run([sys.executable, "flowforge.py", "fetch", "origin"], cwd=path,
                              capture_output=True, text=True, env=ci_env())
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return path


def run_ci(path, *extra, env=None):
    """What the workflow runs, in a checkout without any private data."""
    return subprocess.run([sys.executable, "flowforge.py", "reconcile", "--ci"] + list(extra),
                          cwd=path, capture_output=True, text=True, env=env or ci_env())


def merge_on_ref(root, user, changes):
    """A merge commit on the user's store ref whose tree has `changes`: what
    `git merge` of two histories of one store (and a hand-resolved conflict)
    would leave.  Store refs only ever fast-forward, so it pushes as one."""
    ref = "refs/flowforge/stores/" + store_key_of(root, user)
    tip = git(root, "rev-parse", ref).strip()
    other = git(root, "commit-tree", tip + "^{tree}", "-m", "the store on another machine").strip()
    resolved = rewrite_ledger(root, changes, user=user, message="resolved")
    merge = git(root, "commit-tree", resolved + "^{tree}", "-p", tip, "-p", other,
                "-m", "Merge").strip()
    git(root, "update-ref", ref, merge, resolved)
    return merge


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
    commands = re.findall(r"run: (python3 flowforge.py .*)", text)
    assert len(commands) == 2 and commands[0] == "python3 flowforge.py fetch origin"
    assert commands[1].startswith("python3 flowforge.py reconcile --ci ")
    git(clones["alice"].root, "add", "-A")
    git(clones["alice"].root, "commit", "-qm", "CI")
    git(clones["alice"].root, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
    git(clones["alice"].root, "push", "-q", "origin", "main")
    checkout = fresh_clone(bare, str(tmp_path / "ci"), fetch=False)
    assert not os.path.exists(os.path.join(checkout, ".flowforge/user"))
    assert store_keys(checkout) == {}
    # without the fetch step nothing says where anyone's time went
    proc = run_ci(checkout, "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert sorted(m["user"] for m in json.loads(proc.stdout)["missing"]) == ["alice", "bob"]
    summary = tmp_path / "step-summary.md"
    env = ci_env(GITHUB_STEP_SUMMARY=str(summary))
    for command in commands:                             # the workflow's steps, in order
        proc = subprocess.run(command, shell=True, cwd=checkout, capture_output=True, text=True,
                              env=env)
        assert proc.returncode == 0, command + "\n" + proc.stdout + proc.stderr
    report = open(os.path.join(checkout, "flowforge-reconcile.md")).read()
    assert "**Result: clean.**" in report and "Checked 2 store ref(s) with 2 shard(s)" in report
    assert summary.read_text() == report


def test_hand_edited_and_conflicted_shards_are_named(team, tmp_path):
    """Alice's store ref gets a hand-edited shard; bob's a merge commit whose
    shard still has the conflict markers: both travel as fast-forwards."""
    bare, clones = team
    commit_time(clones["alice"], "alice", "2026-11-18", 90)
    commit_time(clones["bob"], "bob", "2026-11-18", 30)
    alice, bob = clones["alice"].root, clones["bob"].root
    text = ledger_shard(alice, "2026-11", "alice")
    edited = text.replace(b'"seconds":5400', b'"seconds":9000', 1)
    assert edited != text
    rewrite_ledger(alice, {"summaries/2026-11.json": edited}, user="alice")
    clones["alice"].ok("push", "origin", user="alice", env=NOW)
    good = ledger_shard(bob, "2026-11", "bob").decode()
    merge_on_ref(bob, "bob", {"summaries/2026-11.json": (
        "<<<<<<< HEAD\n%s=======\n%s>>>>>>> other\n" % (good, good)).encode()})
    clones["bob"].ok("push", "origin", user="bob", env=NOW)
    checkout = fresh_clone(bare, str(tmp_path / "ci"))
    alice_ref = "refs/flowforge/remotes/origin/" + store_key_of(alice, "alice")
    bob_ref = "refs/flowforge/remotes/origin/" + store_key_of(bob, "bob")
    proc = run_ci(checkout, "--json")
    assert proc.returncode == 1
    findings = {(f["kind"], f["path"], f["detail"]) for f in json.loads(proc.stdout)["findings"]}
    assert findings == {
        ("shard", alice_ref + ":summaries/2026-11.json",
         "shard does not match its sha256 (edited by hand?)"),
        ("shard", bob_ref + ":summaries/2026-11.json", "shard contains git conflict markers"),
        ("ledger", bob_ref, "its history is not linear (a merge commit): store refs only ever "
                            "fast-forward")}
    proc = run_ci(checkout, "--report", "r.md")
    assert proc.returncode == 1
    report = open(os.path.join(checkout, "r.md")).read()
    assert "## Damaged shards" in report and "## Store refs that cannot be trusted" in report
    assert "`%s:summaries/2026-11.json`: shard does not match its sha256" % alice_ref in report
    assert "`%s:summaries/2026-11.json`: shard contains git conflict markers" % bob_ref in report
    assert "`%s`: its history is not linear" % bob_ref in report


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
    assert store_keys(clones["bob"].root) == {}          # bob's store ref never moved
    checkout = fresh_clone(bare, str(tmp_path / "ci"))
    proc = run_ci(checkout, "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["findings"] == []
    missing = doc["missing"]
    assert [(m["user"], m["email"], m["commits"]) for m in missing] == [("bob", "bob@example.com", 2)]
    proc = run_ci(checkout, "--report", "r.md")
    report = open(os.path.join(checkout, "r.md")).read()
    assert "Possible missing aggregation" in report and "bob@example.com" in report
    assert "alice@example.com" not in report
    # two hours later, with a one-hour window, the commits are outside it
    later = ci_env(FLOWFORGE_NOW=str(NOW_TS + 7200))
    assert run_ci(checkout, "--lookback-hours", "1", env=later).returncode == 0
    assert run_ci(checkout, "--lookback-hours", "3", env=later).returncode == 1
    # someone who commits but tracks no time is ignored, by e-mail address or by name
    config_path = os.path.join(checkout, ".flowforge/config.json")
    config = json.load(open(config_path))
    for ignored in (["bob@example.com"], ["bob"], ["carol@example.com"]):
        config["reconcile"] = {"ignore_authors": ignored}
        with open(config_path, "w") as f:
            json.dump(config, f)
        proc = run_ci(checkout, "--json")
        missing = [m["email"] for m in json.loads(proc.stdout)["missing"]]
        if ignored == ["carol@example.com"]:
            assert proc.returncode == 1 and missing == ["bob@example.com"]
        else:
            assert proc.returncode == 0 and missing == [], ignored


def test_local_reconcile_repairs(repo):
    repo.ok("log", "1", "1h", "--date", "2026-11-18", env=NOW)
    repo.ok("aggregate", env=NOW)
    # private time newer than the shards, an orphaned temp file of a dead writer,
    # a damaged own shard (committed on the store ref) and a dead aggregate job
    repo.ok("log", "2", "30m", "--date", "2026-11-19", env=NOW)
    temp = os.path.join(repo.root, ".flowforge/state/aggregate/.alice.json.tmp-999999-0a0b0c0d")
    open(temp, "w").write("{")
    damaged = ledger_shard(repo.root, "2026-11") + b"junk"
    tampered = rewrite_ledger(repo.root, {"summaries/2026-11.json": damaged})
    r = repo("report", "--json")
    assert r.rc == 65 and "damaged shard" in r.err
    q = ff.RetryQueue(os.path.join(repo.root, ".flowforge/state/queue.db"))
    q.enqueue("aggregate", {"user": "alice"}, key="aggregate:alice", max_attempts=1)
    q.fail(q.claim("w"), "boom")
    r = repo.ok("reconcile", env=NOW)
    assert "removed the orphaned temp file" in r.out
    assert "alice: aggregated summaries/2026-11.json" in r.out
    assert "settled" in r.out
    assert not os.path.exists(temp)
    # the repair is a new commit on top: the damaged version stays in the ref's history
    [(key, tip)] = store_keys(repo.root).items()
    assert git_as_test(repo.root, "rev-parse", tip + "^").strip() == tampered
    assert ledger_files(repo.root, rev=tampered)["summaries/2026-11.json"] == damaged
    ff.verify_shard_bytes(ledger_shard(repo.root, "2026-11"))
    assert repo.ok("report", "--json").json["total_seconds"] == 5400
    assert q.stats()["counts"]["dead"] == 0
    assert repo.ok("audit", "verify", env=NOW).rc == 0
    assert "nothing to repair" in repo.ok("reconcile", env=NOW).out
