"""The hash-chained audit log: every tampering names its seq; the ledger's
history anchors the rest.

The team chain lives in the store's ledger ref (audit/<YYYY>.jsonl); every
tampering here is a commit on top of that ref, as a hostile or buggy
teammate's FlowForge could push it (conftest.rewrite_ledger)."""
import json
import os
import subprocess
import sys

import pytest

import flowforge as ff

from conftest import ROOT, git, ledger_chain, ledger_files, ledger_shard, rewrite_ledger
from conftest import store_key_of, store_keys

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


@pytest.fixture
def chained(repo):
    """Six aggregations that each changed a shard: a chain of six records."""
    for n in range(1, 7):
        repo.ok("log", str(n), "%dm" % (10 * n), "--date", "2026-11-%02d" % n, env=NOW)
        repo.ok("aggregate", env=NOW)
    [chain] = [n for n in ledger_files(repo.root) if n.startswith("audit/")]
    assert chain == "audit/2026.jsonl"
    repo.chain = chain
    repo.ref = "refs/flowforge/stores/" + store_key_of(repo.root)
    return repo


def lines(repo):
    return ledger_chain(repo.root).splitlines(keepends=True)


def write(repo, parts):
    """Commit `parts` as the chain on top of the store ref; returns the commit."""
    return rewrite_ledger(repo.root, {repo.chain: b"".join(parts)})


def records(repo):
    return [json.loads(line) for line in lines(repo)]


def verify(repo, **env):
    r = repo("audit", "verify", "--json", "--since-hours", "0", env=env or None)
    return r.rc, r.json["findings"]


def test_records_and_show(chained):
    recs = records(chained)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(r["ts"] % 86400 == 0 for r in recs)          # the team chain keeps only the day
    assert recs[0]["prev"] == ff.AUDIT_GENESIS and recs[1]["prev"] == recs[0]["hash"]
    assert recs[-1]["files"] == {"summaries/2026-11.json": ff.verify_shard_bytes(
        ledger_shard(chained.root, "2026-11"))["sha256"]}
    # one ledger commit per record, in a line
    history = git(chained.root, "rev-list", "--parents", chained.ref).splitlines()
    assert len(history) == 6 and all(len(line.split()) <= 2 for line in history)
    assert not os.path.exists(os.path.join(chained.root, ".flowforge/team"))
    local = ff.AuditChain(os.path.join(chained.root, ".flowforge/user/alice/audit.jsonl")).records()
    assert [r["team_seq"] for r in local] == [1, 2, 3, 4, 5, 6]
    tips = store_keys(chained.root)
    chained.ok("aggregate", env=NOW)                          # nothing changed: no record
    assert store_keys(chained.root) == tips and len(records(chained)) == 6
    out = chained.ok("audit", "show").out
    assert len(out.splitlines()) == 6 and "aggregate" in out
    assert verify(chained) == (0, [])


def only_finding(repo):
    rc, findings = verify(repo)
    assert rc == 1 and [(f["kind"], f["path"]) for f in findings] == [
        ("audit", repo.ref + ":audit/")], findings
    return findings[0]["detail"]


def test_flip_a_byte(chained):
    parts = lines(chained)
    record = json.loads(parts[2])
    parts[2] = parts[2].replace(b'"ts":%d' % record["ts"], b'"ts":%d' % (record["ts"] + 1))
    write(chained, parts)
    assert "record 3 does not match its hash" in only_finding(chained)


def test_flip_a_byte_that_breaks_the_json(chained):
    parts = lines(chained)
    parts[3] = parts[3][:10] + b"\x00" + parts[3][11:]
    write(chained, parts)
    assert "record 4 is not valid JSON" in only_finding(chained)


def test_delete_a_record(chained):
    parts = lines(chained)
    del parts[2]
    write(chained, parts)
    assert "record 3 carries seq 4" in only_finding(chained)


def test_reorder_records(chained):
    parts = lines(chained)
    parts[3], parts[4] = parts[4], parts[3]
    write(chained, parts)
    assert "record 4 carries seq 5" in only_finding(chained)


def test_insert_a_record(chained):
    parts = lines(chained)
    forged = dict(json.loads(parts[1]), totals={"2026-11": 999999})
    parts.insert(2, (json.dumps(forged) + "\n").encode())
    write(chained, parts)
    assert "record 3" in only_finding(chained)


def test_a_torn_tail_committed_on_the_ref_is_broken_and_repaired_from_history(chained):
    """In the ledger a torn tail is no interrupted append (a commit is all or
    nothing): it is a defect a teammate's FlowForge committed.  It is reported
    as a broken chain, nothing builds on it, and `recover` puts back the last
    version that verifies, as a new commit."""
    good, good_tip = ledger_chain(chained.root), store_keys(chained.root)
    write(chained, lines(chained) + [b'{"action":"aggregate","fil'])
    assert "torn last line after record 6" in only_finding(chained)
    chained.ok("log", "7", "7m", "--date", "2026-11-07", env=NOW)
    r = chained("aggregate", env=NOW)                    # never extends a damaged chain
    assert r.rc == 65 and "torn" in r.err and r.err.count("\n") == 1, r
    assert ledger_chain(chained.root).endswith(b'"fil')
    r = chained("recover", "assess", "--json", env=NOW)
    assert r.rc == 1 and any(f["area"] == "audit" and "recover reconstruct" in f["fix"]
                             for f in r.json["findings"])
    tampered = store_keys(chained.root)
    chained.ok("recover", "reconstruct", env=NOW)
    assert store_keys(chained.root) == tampered               # only staged so far
    chained.ok("recover", "deploy", env=NOW)
    assert ledger_chain(chained.root) == good
    [(key, tip)] = store_keys(chained.root).items()
    assert git(chained.root, "rev-parse", tip + "^").strip() == tampered[key]     # linear
    assert git(chained.root, "rev-parse", tip + "^{tree}") == git(
        chained.root, "rev-parse", good_tip[key] + "^{tree}")
    chained.ok("aggregate", env=NOW)                          # the chain goes on from record 6
    assert [r["seq"] for r in records(chained)] == [1, 2, 3, 4, 5, 6, 7]
    assert verify(chained) == (0, [])
    r = chained("audit", "verify", "--json", env=NOW)          # the whole look-back window
    assert r.rc == 0 and r.json["findings"] == [], r


def test_truncation_and_rewrite_only_show_in_the_ref_history(chained):
    """A chain cannot see its own truncation or a complete, consistent rewrite:
    the ledger's history shows them, as a commit that does not extend the
    chain of the commit before it."""
    parts = lines(chained)
    truncated = b"".join(parts[:-2])
    assert ff.verify_chain_bytes(truncated, "x")["ok"]       # the chain itself is fine
    commit = write(chained, parts[:-2])
    r = chained("audit", "verify", "--json")
    history = [f for f in r.json["findings"] if f["kind"] == "audit-history"]
    assert r.rc == 1 and history == [{
        "kind": "audit-history", "path": chained.ref,
        "detail": "commit %s rewrites or truncates the audit chain of the commit before it"
                  % commit[:12]}]
    assert not any(f["kind"] == "audit" for f in r.json["findings"])
    # a complete, consistent rewrite with other totals
    prev, rewritten = ff.AUDIT_GENESIS, []
    for line in parts:
        body = {k: v for k, v in json.loads(line).items() if k != "hash"}
        body["prev"] = prev
        body["totals"] = {k: v * 2 for k, v in body["totals"].items()}
        prev = ff.audit_hash(prev, body)
        rewritten.append(ff.canonical_bytes(dict(body, hash=prev)))
    assert ff.verify_chain_bytes(b"".join(rewritten), "x")["ok"]
    commit = write(chained, rewritten)
    r = chained("audit", "verify", "--json")
    assert r.rc == 1 and [f for f in r.json["findings"] if f["kind"] != "audit-history"] == []
    assert any(f["detail"] == "commit %s rewrites or truncates the audit chain of the commit "
               "before it" % commit[:12] for f in r.json["findings"])


def test_shard_must_match_its_last_record(chained):
    doc = ff.verify_shard_bytes(ledger_shard(chained.root, "2026-11"))
    cells = {(p, i, pr): s * 2 for p, i, pr, s in doc["rows"]}   # a consistent, valid shard
    rewrite_ledger(chained.root, {"summaries/2026-11.json": ff.render_shard(
        doc["user"], doc["store"], doc["month"], "day", "UTC", cells)})
    rc, findings = verify(chained)
    assert rc == 1 and findings == [{"kind": "shard-audit",
                                     "path": chained.ref + ":summaries/2026-11.json",
                                     "detail": "differs from its last audit record"}]


APPENDER = r"""
import sys
sys.path.insert(0, %r)
import flowforge
path, lock, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
chain = flowforge.AuditChain(path)
for i in range(n):
    with flowforge.FileLock(lock, 60, "audit"):
        chain.append("test", 0, files={}, totals={})
""" % ROOT


def test_8_processes_append_one_linear_chain(tmp_path):
    path, lock = str(tmp_path / "chain.jsonl"), str(tmp_path / "chain.lock")
    procs = [subprocess.Popen([sys.executable, "-S", "-c", APPENDER, path, lock, "150"])
             for _ in range(8)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 8
    result = ff.AuditChain(path).verify()
    assert result["ok"] and result["records"] == 1200
    assert [r["seq"] for r in ff.AuditChain(path).records()] == list(range(1, 1201))
