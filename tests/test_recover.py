"""recover: git clean -fdx, lost clones, shards damaged in history, kill -9 during deploy."""
import glob
import os
import shutil
import signal
import subprocess


import flowforge as ff

from conftest import Runner, git, make_git_repo, run_crashing, tree_snapshot

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


def test_deleted_clone_recovered_in_a_new_clone(repo, tmp_path, pycache):
    work(repo)
    bare = str(tmp_path / "origin.git")
    subprocess.run(["git", "clone", "-q", "--bare", repo.root, bare], check=True)
    expected = entries(repo)
    shutil.rmtree(repo.root)
    new = Runner(str(tmp_path / "again"), pycache, repo.home)
    subprocess.run(["git", "clone", "-q", bare, new.root], check=True)
    new.ok("recover", "reconstruct", "--from-mirror")
    new.ok("recover", "deploy")
    assert entries(new) == expected
    assert "up to date" in new.ok("aggregate", "--full", env=NOW).out


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


def test_a_chain_restored_from_git_is_brought_up_to_date(repo):
    work(repo)
    repo.ok("log", "9", "1h", "--date", "2026-11-19", env=NOW)
    repo.ok("aggregate", env=NOW)                     # a chain record the commit does not have
    git(repo.root, "checkout", "HEAD", "--", ".flowforge/team/audit")
    assert repo("audit", "verify").rc != 0
    repo.ok("aggregate", env=NOW)                     # notices the chain is not the cached one
    assert repo.ok("audit", "verify").rc == 0


def test_shard_corrupted_in_head_is_rebuilt_from_git_history(repo):
    work(repo)
    work_bob = ["log", "5", "2h", "--date", "2026-11-17"]
    repo.ok(*work_bob, user="bob", env=NOW)
    repo.ok("aggregate", user="bob", env=NOW)
    git(repo.root, "add", "-A")
    git(repo.root, "commit", "-qm", "bob's time")
    [bob_shard] = glob.glob(repo.root + "/.flowforge/team/summaries/bob--*/2026-11.json")
    good = open(bob_shard, "rb").read()
    open(bob_shard, "wb").write(good.replace(b"7200", b"9999"))
    git(repo.root, "commit", "-qam", "a bad edit")                     # damaged in HEAD
    shutil.rmtree(os.path.join(repo.root, ".flowforge/user/bob"))       # bob's data is elsewhere
    shutil.rmtree(os.path.join(repo.root, ".flowforge/state/backups"), ignore_errors=True)
    findings = repo("reconcile", "--ci", "--json").json["findings"]
    assert [f["kind"] for f in findings] == ["shard"]             # one finding per file
    r = repo.ok("recover", "reconstruct")
    assert "from git " in r.out and os.path.basename(os.path.dirname(bob_shard)) in r.out
    repo.ok("recover", "deploy")
    assert open(bob_shard, "rb").read() == good
    assert repo("reconcile", "--ci", "--json").json["findings"] == []


def test_backups_serve_when_there_is_no_history(repo):
    repo.ok("log", "1", "1h", "--date", "2026-11-18", env=NOW)
    repo.ok("aggregate", env=NOW)
    repo.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    repo.ok("aggregate", env=NOW)
    [shard] = glob.glob(repo.root + "/.flowforge/team/summaries/alice--*/2026-11.json")
    backups = glob.glob(repo.root + "/.flowforge/state/backups/shards/alice--*/2026-11/*.json")
    assert len(backups) == 1 and ff.verify_shard_bytes(open(backups[0], "rb").read())
    shutil.rmtree(os.path.join(repo.root, ".flowforge/user/alice"))   # no private data either
    open(shard, "a").write("damage")
    r = repo.ok("recover", "reconstruct")
    assert "from backup" in r.out
    repo.ok("recover", "deploy")
    assert ff.read_shard(shard)["totals"]["seconds"] == 3600          # the last good version


def test_validate_compares_to_the_second(repo):
    work(repo)
    assert repo.ok("recover", "validate").rc == 0
    [shard] = glob.glob(repo.root + "/.flowforge/team/summaries/alice--*/2026-11.json")
    doc = ff.read_shard(shard)
    cells = {(p, i, pr): s + (1 if n == 0 else 0) for n, (p, i, pr, s) in enumerate(doc["rows"])}
    open(shard, "wb").write(ff.render_shard("alice", doc["store"], doc["month"], "day", "UTC", cells))
    r = repo("recover", "validate", "--json")
    assert r.rc == 1 and r.json["differ"] == 1
    [bad] = [x for x in r.json["results"] if not x["identical"]]
    assert bad["shard_seconds"] == bad["recomputed_seconds"] + 1


def deploy_template(repo):
    """Three staged shard repairs (from the private store) ready to deploy."""
    for month in ("2026-09", "2026-10", "2026-11"):
        repo.ok("log", "1", "1h", "--date", month + "-10", env=NOW)
    repo.ok("aggregate", env=NOW)
    shards = sorted(glob.glob(repo.root + "/.flowforge/team/summaries/alice--*/*.json"))
    for path in shards:
        open(path, "a").write("x")            # damage all three
    repo.ok("recover", "reconstruct")
    return [os.path.relpath(p, repo.root) for p in shards]


def test_kill9_during_deploy_gives_old_or_new_never_a_mix(repo, tmp_path):
    shards = deploy_template(repo)
    old = {p: open(os.path.join(repo.root, p), "rb").read() for p in shards}
    k, crashes, outcomes = 0, 0, set()
    while True:
        k += 1
        root = str(tmp_path / ("k%d" % k))
        shutil.copytree(repo.root, root, symlinks=True)
        runner = Runner(root, repo.pycache, repo.home)
        rc = run_crashing(runner, k, "recover", "deploy")
        if rc == 0:
            break
        assert rc == -signal.SIGKILL
        crashes += 1
        assert runner("recover", "assess").rc in (0, 1)   # any command finishes the deploy
        now_bytes = {p: open(os.path.join(root, p), "rb").read() for p in shards}
        states = {"old" if now_bytes[p] == old[p] else "new" for p in shards}
        assert len(states) == 1, (k, states)       # all old or all new
        for p in shards:
            if states == {"new"}:
                ff.verify_shard_bytes(now_bytes[p])
        outcomes |= states
        assert not os.path.exists(os.path.join(root, ".flowforge/state/recover/deploy.json"))
        shutil.rmtree(root)
    assert crashes >= 5 and outcomes == {"old", "new"}


def test_rollback_restores_what_deploy_replaced(repo):
    shards = deploy_template(repo)
    damaged = {p: open(os.path.join(repo.root, p), "rb").read() for p in shards}
    repo.ok("recover", "deploy")
    assert repo("recover", "deploy").rc == 1                       # nothing staged any more
    repo.ok("recover", "deploy", "--rollback")
    assert {p: open(os.path.join(repo.root, p), "rb").read() for p in shards} == damaged


def test_recover_audit_report(repo):
    work(repo)
    r = repo.ok("recover", "audit")
    assert "| alice |" in r.out and "| ok |" in r.out
    doc = repo.ok("recover", "audit", "--json").json
    assert doc["stores"][0]["chain_ok"] and doc["stores"][0]["total_seconds"] == 3 * 3600
