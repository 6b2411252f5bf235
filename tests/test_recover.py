"""recover: git clean -fdx, lost clones, store refs tampered with, kill -9 during deploy.

Team time lives in the ledger (one store ref per private store): a damaged
shard or chain is a commit on that ref (conftest.rewrite_ledger, as a hostile
or buggy teammate's FlowForge could push it), and its repair is the newest
version that verifies, written as a new commit on top."""
import os
import shutil
import signal
import subprocess

import pytest

import flowforge as ff

from conftest import Runner, clean_env, git, make_git_repo, run_crashing, tree_snapshot
from conftest import ledger_files, ledger_shard, rewrite_ledger, store_key_of, store_keys
from conftest import team_total

STORES = "refs/flowforge/stores/"

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def work(repo, user="alice"):
    repo.ok("start", "1", "--at", "2026-11-18 09:00", "--note", "private", user=user, env=NOW)
    repo.ok("stop", "--at", "2026-11-18 11:15", user=user, env=NOW)
    repo.ok("log", "ABC-2", "45m", "--date", "2026-11-19", user=user, env=NOW)
    repo.ok("start", "3", "--at", "2026-11-20 08:00", user=user, env=NOW)   # still running
    repo.ok("aggregate", user=user, env=NOW)
    git(repo.root, "add", "-A")
    git(repo.root, "commit", "-qm", "time")


def entries(repo, user="alice"):
    return repo.ok("entries", "--json", "--from", "2026-11-01", "--to", "2026-11-30", user=user,
                   env=NOW).json["entries"]


def test_git_clean_then_reconstruct_from_the_mirror(repo):
    work(repo)
    before = (entries(repo), repo.ok("status", "--json", env=NOW).json["timer"],
              repo.ok("report", "--json", "--by", "user,issue,day").out)
    subprocess.run(["git", "clean", "-fdxq"], cwd=repo.root, check=True)
    assert not os.path.exists(os.path.join(repo.root, ".flowforge/user"))
    r = repo("recover", "assess", "--json")
    assert r.rc == 1 and any("mirror" in f["problem"] for f in r.json["findings"])
    snapshot = tree_snapshot(repo.root)
    repo.ok("recover", "reconstruct", "--from-mirror", "--dry-run")
    assert tree_snapshot(repo.root) == snapshot                     # --dry-run changes nothing
    r = repo.ok("recover", "reconstruct", "--from-mirror")
    assert "staged .flowforge/user/alice/time/daily/2026-11-18.jsonl" in r.out
    assert not os.path.exists(os.path.join(repo.root, ".flowforge/user"))   # only staged so far
    repo.ok("recover", "deploy")
    after = (entries(repo), repo.ok("status", "--json", env=NOW).json["timer"],
             repo.ok("report", "--json", "--by", "user,issue,day").out)
    assert after == before
    assert repo.ok("recover", "validate").rc == 0
    r = repo.ok("aggregate", "--full", env=NOW)
    assert "up to date" in r.out                                     # shards identical
    assert git(repo.root, "status", "--porcelain") == ""
    assert repo.ok("audit", "verify").rc == 0
    assert os.stat(os.path.join(repo.root, ".flowforge/user/alice")).st_mode & 0o777 == 0o700


def parent(root, rev):
    return git(root, "rev-parse", rev + "^").strip()


def is_ancestor(root, older, newer):
    return subprocess.run(["git", "merge-base", "--is-ancestor", older, newer], cwd=root,
                          env=clean_env(HOME=os.path.dirname(root))).returncode == 0


def test_deleted_clone_recovered_in_a_new_clone(repo, tmp_path, pycache):
    work(repo)
    bare = str(tmp_path / "origin.git")
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", bare], check=True)
    git(repo.root, "remote", "add", "origin", bare)
    git(repo.root, "push", "-q", "origin", "main")
    repo.ok("push", "origin", env=NOW)
    [(key, tip)] = store_keys(repo.root).items()
    expected = entries(repo)
    rows = repo.ok("report", "--json", "--by", "user,issue,day").json["rows"]
    shutil.rmtree(repo.root)
    new = Runner(str(tmp_path / "again"), pycache, repo.home)
    subprocess.run(["git", "clone", "-q", bare, new.root], check=True)
    new.ok("fetch", "origin", env=NOW)                  # team data: from the remote
    assert new.ok("report", "--json", "--by", "user,issue,day").json["rows"] == rows
    new.ok("recover", "reconstruct", "--from-mirror", env=NOW)   # private data: the mirror
    new.ok("recover", "deploy", env=NOW)
    assert entries(new) == expected
    assert "up to date" in new.ok("aggregate", "--full", env=NOW).out
    assert store_keys(new.root) == {key: tip}         # the same store ref, nothing rewritten
    # and it goes on: the next aggregation extends that ref, the push fast-forwards
    new.ok("log", "4", "15m", "--date", "2026-11-20", env=NOW)
    new.ok("aggregate", env=NOW)
    [(again, newer)] = store_keys(new.root).items()
    assert again == key and parent(new.root, newer) == tip
    assert key in new.ok("push", "origin", env=NOW).out
    assert git(bare, "rev-parse", STORES + key).strip() == newer
    assert team_total(new) == 3 * 3600 + 15 * 60
    assert new.ok("audit", "verify", env=NOW).rc == 0


def test_two_mirrors_need_a_choice(repo, tmp_path, pycache):
    work(repo)
    other = Runner(make_git_repo(str(tmp_path / "desktop")), pycache, repo.home)
    shutil.copy(os.path.join(repo.root, ".flowforge/config.json"), str(tmp_path / "config.json"))
    other.ok("init")
    shutil.copy(str(tmp_path / "config.json"), os.path.join(other.root, ".flowforge/config.json"))
    other.ok("log", "9", "1h", env=NOW)                 # same repo id: a second mirror
    other.ok("aggregate", env=NOW)
    store_id = ff.PrivateStore(ff.Repo(other.root), "alice").store_id
    third = Runner(make_git_repo(str(tmp_path / "third")), pycache, repo.home)
    third.ok("init")
    shutil.copy(str(tmp_path / "config.json"), os.path.join(third.root, ".flowforge/config.json"))
    shutil.rmtree(os.path.join(third.root, ".flowforge/user"))
    r = third("recover", "reconstruct", "--from-mirror")
    assert r.rc == 64 and "--store" in r.err
    assert "1 day files, from %s" % other.root in r.err
    r = third.ok("recover", "reconstruct", "--from-mirror", "--store", store_id)
    assert "mirror %s" % store_id in r.out


def test_after_git_clean_no_command_hides_the_mirror_behind_a_new_store(repo):
    work(repo)
    subprocess.run(["git", "clean", "-fdxq"], cwd=repo.root, check=True)
    for command in (["status"], ["log", "1", "1h"], ["init"]):
        r = repo(*command, env=NOW)
        assert r.rc == 65 and "recover reconstruct --from-mirror" in r.err, (command, r)
    assert not os.path.exists(os.path.join(repo.root, ".flowforge/user/alice"))
    repo.ok("recover", "reconstruct", "--from-mirror")
    r = repo.ok("recover", "validate", "--json")       # checks the staged store, before deploy
    assert [x["recomputed_seconds"] for x in r.json["results"]] == [3 * 3600]
    assert r.json["differ"] == 0
    assert not os.path.exists(os.path.join(repo.root, ".flowforge/state/recover/view"))
    repo.ok("recover", "deploy")
    assert repo.ok("status", "--json", env=NOW).json["timer"]["issue"] == "3"


def test_reconstruct_never_replaces_newer_private_data_with_the_mirror(repo, tmp_path):
    work(repo)
    daily = os.path.join(repo.root, ".flowforge/user/alice/time/daily")
    elsewhere = {"XDG_DATA_HOME": str(tmp_path / "elsewhere")}       # the mirror misses this
    repo.ok("log", "7", "2h", "--date", "2026-11-18", env=dict(NOW, **elsewhere))
    newer = open(os.path.join(daily, "2026-11-18.jsonl"), "rb").read()
    os.unlink(os.path.join(daily, "2026-11-19.jsonl"))                 # this one is lost
    r = repo.ok("recover", "reconstruct", "--from-mirror")
    assert "2026-11-19.jsonl (from mirror" in r.out
    assert "kept .flowforge/user/alice/time/daily/2026-11-18.jsonl" in r.out
    repo.ok("recover", "deploy")
    assert open(os.path.join(daily, "2026-11-18.jsonl"), "rb").read() == newer
    assert sum(ff.entry_seconds(e) for e in entries(repo)) == 3 * 3600 + 7200


def test_deploy_refuses_a_target_that_changed_since_staging(repo):
    work(repo)
    day = os.path.join(repo.root, ".flowforge/user/alice/time/daily/2026-11-19.jsonl")
    os.unlink(day)
    repo.ok("recover", "reconstruct", "--from-mirror")
    repo.ok("log", "8", "30m", "--date", "2026-11-19", env=NOW)        # written meanwhile
    def data():
        return {k: v for k, v in tree_snapshot(repo.root).items() if "/locks/" not in k}
    before = data()
    r = repo("recover", "deploy")
    assert r.rc == 1 and "changed since it was staged" in r.err and r.err.count("\n") == 1
    assert data() == before


def test_damaged_private_settings_are_repaired_from_the_mirror(repo):
    work(repo)
    config = os.path.join(repo.root, ".flowforge/user/alice/config.json")
    good = open(config, "rb").read()
    open(config, "wb").write(b"{garbage")
    r = repo("recover", "assess", "--json")
    assert any("reconstruct --from-mirror" in f["fix"] for f in r.json["findings"])
    r = repo.ok("recover", "reconstruct", "--from-mirror")
    assert "staged .flowforge/user/alice/config.json" in r.out
    repo.ok("recover", "deploy")
    assert open(config, "rb").read() == good
    assert sum(ff.entry_seconds(e) for e in entries(repo)) == 3 * 3600


def test_damaged_plan_and_deploy_journal_are_one_line_errors(repo):
    deploy_template(repo)
    recover = os.path.join(repo.root, ".flowforge/state/recover")
    open(os.path.join(recover, "plan.json"), "w").write("{")
    r = repo("recover", "deploy")
    assert r.rc == 65 and "plan" in r.err and "Traceback" not in r.err and r.err.count("\n") == 1
    open(os.path.join(recover, "deploy.json"), "w").write("[1, 2")
    r = repo("status", env=NOW)
    assert r.rc == 0 and "deploy journal" in r.err and "set aside as Q" in r.err
    assert not os.path.exists(os.path.join(recover, "deploy.json"))
    assert "deploy journal" in repo.ok("quarantine", "list").out


def test_a_store_ref_moved_back_to_an_older_commit_is_brought_up_to_date(repo):
    """The ledger's equivalent of a chain restored from an older commit: the
    store ref set back (a .git restored from yesterday's backup).  The older
    version verifies, but it misses time; the next aggregation notices that
    the tip is not the one it last wrote and rebuilds on top of it."""
    work(repo)
    repo.ok("log", "9", "1h", "--date", "2026-11-19", env=NOW)
    repo.ok("aggregate", env=NOW)                     # a ledger commit the older one lacks
    [(key, tip)] = store_keys(repo.root).items()
    older = parent(repo.root, tip)
    git(repo.root, "update-ref", STORES + key, older, tip)
    assert team_total(repo) == 3 * 3600               # the hour is missing from the ledger
    assert repo("recover", "validate").rc == 1        # and the private data says so
    repo.ok("aggregate", env=NOW)                     # notices the tip is not the cached one
    [(_, rebuilt)] = store_keys(repo.root).items()
    assert parent(repo.root, rebuilt) == older        # on top of what the ref holds: linear
    assert team_total(repo) == 4 * 3600
    assert repo.ok("recover", "validate").rc == 0
    assert repo.ok("audit", "verify", env=NOW).rc == 0


def test_shard_corrupted_in_head_is_rebuilt_from_git_history(repo):
    """A tampered tip of a store whose private data is on another machine:
    `reconstruct` stages the newest version from the ref's own history that
    verifies, `deploy` writes it as a new commit on top."""
    work(repo)
    repo.ok("log", "5", "2h", "--date", "2026-11-17", user="bob", env=NOW)
    repo.ok("aggregate", user="bob", env=NOW)
    key = store_key_of(repo.root, "bob")
    ref, good_tip = STORES + key, store_keys(repo.root)[key]
    good = ledger_shard(repo.root, "2026-11", "bob")
    bad = rewrite_ledger(repo.root, {"summaries/2026-11.json": good.replace(b"7200", b"9999")},
                         user="bob", message="a bad edit")             # damaged at the tip
    shutil.rmtree(os.path.join(repo.root, ".flowforge/user/bob"))       # bob's data is elsewhere
    findings = repo("reconcile", "--ci", "--json", env=NOW).json["findings"]
    assert [(f["kind"], f["path"]) for f in findings] == [("shard", ref + ":summaries/2026-11.json")]
    r = repo.ok("recover", "reconstruct", env=NOW)
    assert ref in r.out and good_tip[:12] in r.out, r          # says what it staged, from where
    assert store_keys(repo.root)[key] == bad                     # only staged so far
    repo.ok("recover", "deploy", env=NOW)
    assert ledger_shard(repo.root, "2026-11", "bob") == good
    assert parent(repo.root, store_keys(repo.root)[key]) == bad  # a new commit on top: linear
    assert repo("reconcile", "--ci", "--json", env=NOW).json["findings"] == []
    assert team_total(repo) == 3 * 3600 + 7200                   # the report is exact again


@pytest.mark.parametrize("source", ["reflog", "fetched copy"])
def test_the_reflog_or_a_fetched_copy_serves_when_history_does_not(repo, tmp_path, source):
    """The tip's history holds no good version (the ref was overwritten with a
    new root commit) and there is no private data to rebuild from: the ref's
    reflog, or the copy last pushed to the remote, still has one."""
    repo.ok("log", "1", "1h", "--date", "2026-11-18", env=NOW)
    repo.ok("aggregate", env=NOW)
    repo.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    repo.ok("aggregate", env=NOW)
    [(key, good_tip)] = store_keys(repo.root).items()
    ref = STORES + key
    if source == "fetched copy":
        bare = str(tmp_path / "origin.git")
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", bare], check=True)
        git(repo.root, "remote", "add", "origin", bare)
        repo.ok("push", "origin", env=NOW)
    damaged = rewrite_ledger(repo.root, {"summaries/2026-11.json": ledger_shard(
        repo.root, "2026-11") + b"damage"})
    orphan = git(repo.root, "commit-tree", damaged + "^{tree}", "-m", "history rewritten").strip()
    git(repo.root, "update-ref", ref, orphan, damaged)
    assert git(repo.root, "rev-list", ref).split() == [orphan]        # no history
    if source == "fetched copy":
        git(repo.root, "reflog", "expire", "--expire=all", "--expire-unreachable=all", ref)
        assert git(repo.root, "reflog", "show", "--format=%H", ref).split() == []
    shutil.rmtree(os.path.join(repo.root, ".flowforge/user/alice"))   # no private data either
    r = repo.ok("recover", "reconstruct", env=NOW)
    assert ref in r.out and good_tip[:12] in r.out, r
    if source == "fetched copy":
        assert "refs/flowforge/remotes/origin/" + key in r.out
    repo.ok("recover", "deploy", env=NOW)
    assert ff.verify_shard_bytes(ledger_shard(repo.root, "2026-11"))["totals"]["seconds"] == 7200
    assert parent(repo.root, store_keys(repo.root)[key]) == orphan    # on top of the tip
    assert team_total(repo) == 7200
    assert repo.ok("audit", "verify", env=NOW).rc == 0


def test_validate_compares_to_the_second(repo):
    work(repo)
    assert repo.ok("recover", "validate").rc == 0
    doc = ff.verify_shard_bytes(ledger_shard(repo.root, "2026-11"))
    cells = {(p, i, pr): s + (1 if n == 0 else 0) for n, (p, i, pr, s) in enumerate(doc["rows"])}
    rewrite_ledger(repo.root, {"summaries/2026-11.json": ff.render_shard(
        "alice", doc["store"], doc["month"], "day", "UTC", cells)})
    r = repo("recover", "validate", "--json")
    assert r.rc == 1 and r.json["differ"] == 1
    [bad] = [x for x in r.json["results"] if not x["identical"]]
    assert bad["path"] == STORES + store_key_of(repo.root) + ":summaries/2026-11.json"
    assert bad["shard_seconds"] == bad["recomputed_seconds"] + 1


DAYS = [".flowforge/user/alice/time/daily/%s-10.jsonl" % m for m in ("2026-09", "2026-10", "2026-11")]


def deploy_template(repo, what="both"):
    """Staged repairs ready to deploy: three private day files lost here (from
    the mirror), and/or three shards tampered with in one commit on the store
    ref (the version before it, from the ref's history).  Returns (shard
    names, day files)."""
    for month in ("2026-09", "2026-10", "2026-11"):
        repo.ok("log", "1", "1h", "--date", month + "-10", env=NOW)
    repo.ok("aggregate", env=NOW)
    shards, days = [], []
    if what in ("ref", "both"):
        files = ledger_files(repo.root)
        shards = sorted(n for n in files if n.startswith("summaries/"))
        assert len(shards) == 3
        rewrite_ledger(repo.root, {n: files[n] + b"x" for n in shards})     # damage all three
    if what in ("files", "both"):
        days = DAYS
        for rel in days:
            os.unlink(os.path.join(repo.root, rel))
    repo.ok("recover", "reconstruct", *(["--from-mirror"] if days else []), env=NOW)
    return shards, days


def deploy_state(root, shards, days, old_ledger):
    """{"old"} or {"new"} per part: the ledger's shards, the private day files."""
    files = ledger_files(root)
    return ({"old" if files[n] == old_ledger[n] else "new" for n in shards},
            {"new" if os.path.exists(os.path.join(root, rel)) else "old" for rel in days})


def crashed_deploys(repo, tmp_path):
    """Copies of `repo` in which `recover deploy` was SIGKILLed right after its
    k-th durable step, for k = 1, 2, ... until a run completes: yields
    (k, runner); the number of crashes is the last k minus one."""
    k = 0
    while True:
        k += 1
        root = str(tmp_path / ("k%d" % k))
        shutil.copytree(repo.root, root, symlinks=True)
        runner = Runner(root, repo.pycache, repo.home)
        rc = run_crashing(runner, k, "recover", "deploy")
        if rc == 0:
            shutil.rmtree(root)
            return
        assert rc == -signal.SIGKILL
        yield k, runner
        shutil.rmtree(root)


@pytest.mark.parametrize("what", ["files", "ref", "both"])
def test_kill9_during_deploy_gives_old_or_new_never_a_mix(repo, tmp_path, what):
    """The private files swap under a journal; a ref repair is one update-ref;
    a deploy of both is old or new as a whole."""
    shards, days = deploy_template(repo, what)
    old = ledger_files(repo.root)
    crashes, outcomes = 0, set()
    for k, runner in crashed_deploys(repo, tmp_path):
        crashes += 1
        assert runner("recover", "assess").rc in (0, 1)   # any command finishes the deploy
        ledger, private = deploy_state(runner.root, shards, days, old)
        states = ledger | private
        assert len(states) == 1, (k, ledger, private)     # all old or all new
        if states == {"new"}:
            for name in shards:
                ff.verify_shard_bytes(ledger_files(runner.root)[name])
        outcomes |= states
        assert not os.path.exists(os.path.join(runner.root, ".flowforge/state/recover/deploy.json"))
    assert crashes >= (3 if what == "ref" else 5) and outcomes == {"old", "new"}


@pytest.mark.parametrize("what", ["files", "ref"])
def test_a_deploy_killed_at_any_step_can_be_finished(repo, tmp_path, what):
    """Whatever step a kill -9 hit, `recover deploy` afterwards either deploys
    what is still staged or finds nothing staged, and everything ends new: no
    stale plan that can be neither deployed nor replaced."""
    shards, days = deploy_template(repo, what)
    old = ledger_files(repo.root)
    done = ({"new"} if shards else set(), {"new"} if days else set())
    for k, runner in crashed_deploys(repo, tmp_path):
        runner("recover", "assess")
        before = deploy_state(runner.root, shards, days, old)
        r = runner("recover", "deploy", env=NOW)
        assert r.rc == 0 or (before == done and "nothing is staged" in r.err), (k, before, r)
        assert deploy_state(runner.root, shards, days, old) == done, k
        findings = runner("recover", "assess", "--json").json["findings"]
        assert [f for f in findings if f["area"] == "deploy"] == [], (k, findings)


@pytest.mark.parametrize("what", ["files", "ref", "both"])
def test_rollback_restores_what_deploy_replaced(repo, what):
    shards, days = deploy_template(repo, what)
    damaged = ledger_files(repo.root)
    repo.ok("recover", "deploy", env=NOW)
    repaired = store_keys(repo.root)
    assert deploy_state(repo.root, shards, days, damaged) == (
        {"new"} if shards else set(), {"new"} if days else set())
    assert repo("recover", "deploy").rc == 1                       # nothing staged any more
    repo.ok("recover", "deploy", "--rollback", env=NOW)
    assert all(not os.path.exists(os.path.join(repo.root, rel)) for rel in days)
    assert ledger_files(repo.root) == damaged
    for key, tip in repaired.items():                              # store refs only go forward
        assert is_ancestor(repo.root, tip, STORES + key), key


def test_recover_audit_report(repo):
    work(repo)
    r = repo.ok("recover", "audit")
    assert "| alice |" in r.out and "| ok |" in r.out
    doc = repo.ok("recover", "audit", "--json").json
    assert doc["stores"][0]["chain_ok"] and doc["stores"][0]["total_seconds"] == 3 * 3600
