"""What an independent review of the ledger found, each as a test: long
cat-file exchanges, hostile trees of huge or repeated blobs, repairs made in a
manager's clone, copied work trees, nested ref names, a private chain that
missed records, aggregating in a fresh clone before fetching."""
import json
import os
import shutil
import subprocess
import time

import flowforge
from conftest import clean_env, rewrite_ledger
from test_ledger import Clone, make_origin

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def test_a_long_cat_file_exchange_does_not_deadlock(repo):
    proc = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=repo.root, input=b"x" * 3000,
                          capture_output=True, check=True)
    blob = proc.stdout.decode().strip()
    started = time.monotonic()
    objects = flowforge.GitObjects(repo.root)
    try:
        found = objects.get([blob] * 5000)      # ~200 KB of names, ~15 MB of answers
    finally:
        objects.close()
    assert len(found) == 5000 and found[-1] == ("blob", b"x" * 3000)
    assert time.monotonic() - started < 20


def push_tree(clone, ref, entries):
    """Push a commit whose tree is `entries` {path: bytes} to `ref` on origin."""
    env = clean_env(HOME=clone.home, GIT_INDEX_FILE=os.path.join(clone.root, ".git", "evil-index"))
    blobs = {}
    for data in set(entries.values()):
        blobs[data] = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=clone.root,
                                     env=env, input=data, capture_output=True,
                                     check=True).stdout.decode().strip()
    index = "".join("100644 %s\t%s\n" % (blobs[data], path) for path, data in entries.items())
    subprocess.run(["git", "update-index", "--add", "--index-info"], cwd=clone.root, env=env,
                   input=index.encode(), check=True)
    tree = subprocess.run(["git", "write-tree"], cwd=clone.root, env=env, capture_output=True,
                          check=True).stdout.decode().strip()
    commit = subprocess.run(["git", "commit-tree", tree, "-m", "x"], cwd=clone.root, env=env,
                            capture_output=True, check=True).stdout.decode().strip()
    clone.git("push", "-q", "--no-verify", "origin", "%s:%s" % (commit, ref))


def test_a_tree_of_one_huge_blob_repeated_costs_one_read(tmp_path, pycache):
    origin = make_origin(tmp_path, pycache)
    bob = Clone(tmp_path, origin, "bob", "bob", pycache)
    huge = b"x" * (3 << 20)
    entries = {"summaries/%04d-%02d.json" % (1980 + n // 12, 1 + n % 12): huge for n in range(600)}
    entries["audit/2026.jsonl"] = b""
    push_tree(bob, "refs/flowforge/stores/evil--0123456789", entries)
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    started = time.monotonic()
    r = manager("report", "--json")
    assert r.rc == 65 and r.err.count("\n") == 1 and "evil--0123456789" in r.err, r
    assert time.monotonic() - started < 20


def test_a_nested_ref_name_is_no_copy_of_anyones_store(tmp_path, pycache):
    origin = make_origin(tmp_path, pycache)
    alice = Clone(tmp_path, origin, "alice", "alice", pycache)
    alice.log("1", "1h", "2026-11-16")
    alice.commit("a.txt", "work")
    alice.git("push", "-q", "origin", "main")
    key = alice.store_key()
    tree = alice.git("rev-parse", "refs/flowforge/stores/%s^{tree}" % key).stdout.strip()
    forged = alice.git("commit-tree", tree, "-m", "forged").stdout.strip()
    alice.git("push", "-q", "--no-verify", "origin", "%s:refs/flowforge/stores/x/%s" % (forged, key))
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    r = manager("report", "--json", "--by", "user")
    assert r.rc == 0 and r.json["total_seconds"] == 3600, r


def damaged_store_in_a_managers_clone(tmp_path, pycache):
    """bob's 2 h, then a damaged commit of his store ref, pushed; the manager's
    fresh clone has fetched it.  Returns (bob, manager)."""
    origin = make_origin(tmp_path, pycache)
    bob = Clone(tmp_path, origin, "bob", "bob", pycache)
    bob.log("1", "2h", "2026-11-16")
    bob.commit("b.txt", "work")
    bob.git("push", "-q", "origin", "main")
    key = bob.store_key()
    shard = bob.git("show", "refs/flowforge/stores/%s:summaries/2026-11.json" % key).stdout
    rewrite_ledger(bob.root, {"summaries/2026-11.json": shard.replace('"rows"', '"rows" ', 1)
                              .encode()}, user="bob")
    bob.ok("push")
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    return bob, manager


def test_a_repair_made_in_a_managers_clone_never_hides_the_owners_newer_time(tmp_path, pycache):
    bob, manager = damaged_store_in_a_managers_clone(tmp_path, pycache)
    assert manager("report", "--json", "--by", "user").rc == 65
    manager.ok("recover", "reconstruct")
    manager.ok("recover", "deploy")                       # a local repair, in the manager's clone
    assert manager.ok("report", "--json", "--by", "user").json["total_seconds"] == 7200
    bob.ok("reconcile")                                   # the owner repairs his own way
    bob.log("1", "3h", "2026-11-17")
    bob.commit("b.txt", "more")
    bob.git("push", "-q", "origin", "main")
    manager.ok("fetch")
    r = manager("report", "--json", "--by", "user")
    assert r.rc == 0 and r.json["total_seconds"] == 7200 + 10800, r   # the owner's history wins
    assert "git update-ref -d" in r.err, r                # and the stale local repair is named


def test_a_copied_work_tree_is_refused_as_a_second_writer(tmp_path, pycache):
    origin = make_origin(tmp_path, pycache)
    a = Clone(tmp_path, origin, "a", "alice", pycache)
    a.log("1", "1h", "2026-11-16")
    a.commit("a.txt", "one")
    a.git("push", "-q", "origin", "main")
    b_root = str(tmp_path / "b")
    shutil.copytree(a.root, b_root, symlinks=True)
    b = Clone.__new__(Clone)
    b.__dict__.update(a.__dict__, name="b", root=b_root)
    b.ff = type(a.ff)(b_root, a.ff.pycache, a.home)
    a.log("2", "2h", "2026-11-17")
    a.commit("a.txt", "two")
    a.git("push", "-q", "origin", "main")
    b.ok("fetch")
    b.log("3", "3h", "2026-11-18")
    r = b("aggregate")
    assert r.rc == 65 and "another clone writes the same store" in r.err, r
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    assert manager.ok("report", "--json", "--by", "user").json["total_seconds"] == 10800


def test_a_private_chain_that_missed_records_is_healed(repo):
    repo.ok("log", "1", "1h", "--date", "2026-11-16", env=NOW)
    repo.ok("aggregate", env=NOW)
    repo.ok("log", "1", "1h", "--date", "2026-11-17", env=NOW)
    repo.ok("aggregate", env=NOW)
    path = os.path.join(repo.root, ".flowforge/user/alice/audit.jsonl")
    lines = open(path, "rb").read().splitlines(True)
    open(path, "wb").write(b"".join(lines[:-1]))      # the append after the commit never happened
    repo.ok("aggregate", env=NOW)
    records = [json.loads(line) for line in open(path, "rb").read().splitlines()]
    assert [r["team_seq"] for r in records] == [1, 2] and records[-1]["action"] == "healed"
    assert repo.ok("audit", "verify", env=NOW).rc == 0


def test_aggregating_in_a_fresh_clone_before_fetching_never_forks_the_store(tmp_path, pycache):
    origin = make_origin(tmp_path, pycache)
    a = Clone(tmp_path, origin, "a", "alice", pycache)
    a.log("1", "1h", "2026-11-16")
    a.commit("a.txt", "one")
    a.git("push", "-q", "origin", "main")
    shutil.rmtree(a.root)                                  # the clone is lost; the mirror is not
    a2 = Clone(tmp_path, origin, "a", "alice", pycache, home=a.home)
    a2.ok("recover", "reconstruct", "--from-mirror")
    a2.ok("recover", "deploy")
    a2.log("1", "30m", "2026-11-17")
    r = a2("aggregate")
    assert r.rc == 1 and "flowforge fetch" in r.err, r
    a2.ok("fetch")
    a2.ok("aggregate")
    a2.ok("push")                                           # a fast-forward
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    assert manager.ok("report", "--json", "--by", "user").json["total_seconds"] == 5400


def test_rolling_back_a_deploy_that_created_a_store_ref_deletes_it(tmp_path, pycache):
    _, manager = damaged_store_in_a_managers_clone(tmp_path, pycache)
    manager.ok("recover", "reconstruct")
    manager.ok("recover", "deploy")
    assert manager.git("for-each-ref", "refs/flowforge/stores/").stdout.strip()
    manager.ok("recover", "deploy", "--rollback")
    assert manager.git("for-each-ref", "refs/flowforge/stores/").stdout.strip() == ""
    assert manager("report", "--json").rc == 65              # back to how it was
