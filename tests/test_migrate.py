"""`flowforge migrate` moves FlowForge 0.1's in-tree .flowforge/team/ into the
ledger; store refs that were rewritten to something else are never taken for
ledger history, and their owner can put them back."""
import os

import flowforge
from conftest import clean_env, git
from test_ledger import Clone, make_origin  # noqa: F401 (fixture helpers)

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def write_legacy_store(root, user, store_id, months):
    """The 0.1 layout, as 0.1 wrote it: shards under team/summaries/<key>/ and a
    chain under team/audit/<key>.jsonl whose records name work-tree paths."""
    key = flowforge.store_key(user, store_id)
    team = os.path.join(root, ".flowforge", "team")
    os.makedirs(os.path.join(team, "summaries", key), exist_ok=True)
    os.makedirs(os.path.join(team, "audit"), exist_ok=True)
    seq, prev, lines, total = 0, flowforge.AUDIT_GENESIS, b"", 0
    for month, cells in months.items():
        data = flowforge.render_shard(user, store_id, month, "day", "UTC", cells)
        rel = ".flowforge/team/summaries/%s/%s.json" % (key, month)
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        sha = flowforge.shard_sha(data)
        seconds = sum(cells.values())
        record = flowforge.chain_record(seq, prev, "aggregate", 1795132800 + seq * 86400,
                                        files={rel: sha}, totals={month: seconds})
        seq, prev = record["seq"], record["hash"]
        lines += flowforge.canonical_bytes(record)
        total += seconds
    with open(os.path.join(team, "audit", key + ".jsonl"), "wb") as f:
        f.write(lines)
    return key, total


def test_migrate_moves_every_store_commits_the_removal_and_is_idempotent(tmp_path, pycache):
    origin = make_origin(tmp_path, pycache)
    lead = Clone(tmp_path, origin, "lead", "lead", pycache)
    k1, t1 = write_legacy_store(lead.root, "dave", "0123456789",
                                {"2026-10": {("2026-10-05", "1", ""): 3600},
                                 "2026-11": {("2026-11-02", "2", "web"): 5400}})
    k2, t2 = write_legacy_store(lead.root, "erin", "abcdef0123",
                                {"2026-11": {("2026-11-03", "3", ""): 1234}})
    lead.git("add", ".flowforge/team")
    lead.git("commit", "-qm", "0.1 time", "--no-verify")
    with open(os.path.join(lead.root, "unrelated.txt"), "w") as f:
        f.write("staged, not part of the migration\n")
    lead.git("add", "unrelated.txt")
    r = lead("report", "--json", "--by", "user")
    assert r.rc == 0 and "run `flowforge migrate`" in r.err, r        # read, and told
    assert r.json["total_seconds"] == t1 + t2
    assert "would move" in lead.ok("migrate", "--dry-run").out
    assert lead.git("ls-files", ".flowforge/team").stdout.strip()        # dry run: unchanged
    out = lead.ok("migrate").out
    assert "moved %s" % k1 in out and "moved %s" % k2 in out and "committed the removal" in out
    assert lead.git("ls-files", ".flowforge/team").stdout == ""
    assert not os.path.exists(os.path.join(lead.root, ".flowforge", "team"))
    removed = lead.git("show", "--name-only", "--format=", "HEAD").stdout.split()
    assert len(removed) == 5 and all(p.startswith(".flowforge/team/") for p in removed), removed
    assert lead.git("diff", "--cached", "--name-only").stdout.split() == ["unrelated.txt"]
    assert lead.git("status", "--porcelain").stdout.split() == ["A", "unrelated.txt"]
    r = lead("report", "--json", "--by", "user")
    assert r.rc == 0 and "migrate" not in r.err and r.json["total_seconds"] == t1 + t2, r
    assert "nothing to migrate" in lead.ok("migrate").out                # idempotent
    ci = lead("reconcile", "--ci", "--json").json
    assert ci["findings"] == [] and ci["stores"] == 2, ci      # (lead tracks no time: "missing")
    lead.ok("push")
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    assert manager.ok("report", "--json", "--by", "user").json["total_seconds"] == t1 + t2


def test_migrate_refuses_a_damaged_store_and_creates_no_ref(tmp_path, pycache):
    origin = make_origin(tmp_path, pycache)
    lead = Clone(tmp_path, origin, "lead", "lead", pycache)
    write_legacy_store(lead.root, "dave", "0123456789", {"2026-11": {("2026-11-02", "2", ""): 60}})
    key, _ = write_legacy_store(lead.root, "erin", "abcdef0123",
                                {"2026-11": {("2026-11-03", "3", ""): 1234}})
    path = os.path.join(lead.root, ".flowforge/team/summaries/%s/2026-11.json" % key)
    data = open(path, "rb").read().replace(b"1234", b"9999")
    open(path, "wb").write(data)
    r = lead("migrate")
    assert r.rc == 65 and "2026-11.json" in r.err and r.err.count("\n") == 1, r
    assert lead.git("for-each-ref", "refs/flowforge/").stdout == ""


def test_a_store_ref_force_pushed_to_a_code_commit_is_refused_and_restored_by_its_owner(
        tmp_path, pycache):
    origin = make_origin(tmp_path, pycache)
    bob = Clone(tmp_path, origin, "bob", "bob", pycache)
    bob.work("1", "2026-11-16T09:00:00Z", "2026-11-16T12:45:00Z")          # 13500 s
    bob.commit("b.txt", "work")
    bob.git("push", "-q", "origin", "main")
    key = bob.store_key()
    code = bob.head()
    bob.git("push", "-q", "--force", "--no-verify", "origin",
            "%s:refs/flowforge/stores/%s" % (code, key))                    # the vandal
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    r = manager("report", "--json")
    assert r.rc == 65 and "not a ledger commit" in r.err and r.err.count("\n") == 1, r
    r = manager("recover", "reconstruct")
    assert "cannot reconstruct" in r.out or r.rc == 1, r              # nothing good to restore
    assert not any("history" in line and "staged" in line for line in r.out.splitlines()), r.out
    # the owner: fetch says it was rewritten, push --restore puts the history back
    r = bob("fetch")
    assert r.rc == 0 and "rewritten" in r.err, r
    r = bob("push")
    assert r.rc == 69 and "--restore" in r.err, r
    bob.ok("push", "--restore")
    assert git(origin, "rev-parse", "refs/flowforge/stores/" + key,
               env=clean_env(HOME=str(tmp_path))).strip() == bob.git(
        "rev-parse", "refs/flowforge/stores/" + key).stdout.strip()
    fresh = Clone(tmp_path, origin, "fresh", "boss", pycache, hooks=False)
    fresh.ok("fetch")
    assert fresh.ok("report", "--json", "--by", "user").json["total_seconds"] == 13500


def test_a_store_ref_moved_back_on_the_remote_is_told_and_healed_by_the_next_push(
        tmp_path, pycache):
    origin = make_origin(tmp_path, pycache)
    alice = Clone(tmp_path, origin, "alice", "alice", pycache)
    alice.log("1", "1h", "2026-11-16")
    alice.commit("a.txt", "one")
    alice.git("push", "-q", "origin", "main")
    key = alice.store_key()
    first = alice.git("rev-parse", "refs/flowforge/stores/" + key).stdout.strip()
    alice.log("1", "30m", "2026-11-17")
    alice.commit("a.txt", "two")
    alice.git("push", "-q", "origin", "main")
    alice.git("push", "-q", "--force", "--no-verify", "origin",
              "%s:refs/flowforge/stores/%s" % (first, key))                # moved back
    r = alice("fetch")
    assert r.rc == 0 and "behind" in r.err, r
    alice.ok("push")                                                        # heals it
    manager = Clone(tmp_path, origin, "manager", "boss", pycache, hooks=False)
    manager.ok("fetch")
    assert manager.ok("report", "--json", "--by", "user").json["total_seconds"] == 5400
