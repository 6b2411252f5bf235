"""The hash-chained audit log: every tampering names its seq; git anchors the rest."""
import json
import os
import subprocess
import sys

import pytest

import flowforge as ff

from conftest import ROOT, git

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


@pytest.fixture
def chained(repo):
    """Six aggregations that each changed a shard: a chain of six records."""
    for n in range(1, 7):
        repo.ok("log", str(n), "%dm" % (10 * n), "--date", "2026-11-%02d" % n, env=NOW)
        repo.ok("aggregate", env=NOW)
    [chain] = os.listdir(os.path.join(repo.root, ".flowforge/team/audit"))
    repo.chain = os.path.join(repo.root, ".flowforge/team/audit", chain)
    return repo


def lines(path):
    return open(path, "rb").read().splitlines(keepends=True)


def write(path, parts):
    open(path, "wb").write(b"".join(parts))


def verify(repo):
    r = repo("audit", "verify", "--json", "--since-hours", "0")
    return r.rc, r.json["findings"]


def test_records_and_show(chained):
    records = ff.AuditChain(chained.chain).records()
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["ts"] % 86400 == 0 for r in records)       # the team chain keeps only the day
    assert records[0]["prev"] == ff.AUDIT_GENESIS and records[1]["prev"] == records[0]["hash"]
    assert list(records[-1]["files"].values())[0] == ff.read_shard(os.path.join(
        chained.root, list(records[-1]["files"])[0]))["sha256"]
    local = ff.AuditChain(os.path.join(chained.root, ".flowforge/user/alice/audit.jsonl")).records()
    assert [r["team_seq"] for r in local] == [1, 2, 3, 4, 5, 6]
    chained.ok("aggregate", env=NOW)                          # nothing changed: no record
    assert len(ff.AuditChain(chained.chain).records()) == 6
    out = chained.ok("audit", "show").out
    assert len(out.splitlines()) == 6 and "aggregate" in out
    assert verify(chained) == (0, [])


def test_flip_a_byte(chained):
    parts = lines(chained.chain)
    record = json.loads(parts[2])
    parts[2] = parts[2].replace(b'"ts":%d' % record["ts"], b'"ts":%d' % (record["ts"] + 1))
    write(chained.chain, parts)
    rc, findings = verify(chained)
    assert rc == 1 and "record 3 does not match its hash" in findings[0]["detail"]


def test_flip_a_byte_that_breaks_the_json(chained):
    parts = lines(chained.chain)
    parts[3] = parts[3][:10] + b"\x00" + parts[3][11:]
    write(chained.chain, parts)
    assert "record 4 is not valid JSON" in verify(chained)[1][0]["detail"]


def test_delete_a_record(chained):
    parts = lines(chained.chain)
    del parts[2]
    write(chained.chain, parts)
    assert "record 3 carries seq 4" in verify(chained)[1][0]["detail"]


def test_reorder_records(chained):
    parts = lines(chained.chain)
    parts[3], parts[4] = parts[4], parts[3]
    write(chained.chain, parts)
    assert "record 4 carries seq 5" in verify(chained)[1][0]["detail"]


def test_insert_a_record(chained):
    parts = lines(chained.chain)
    forged = dict(json.loads(parts[1]), totals={"2026-11": 999999})
    parts.insert(2, (json.dumps(forged) + "\n").encode())
    write(chained.chain, parts)
    assert "record 3" in verify(chained)[1][0]["detail"]


def test_torn_tail_is_told_apart_and_trimmed_by_reconcile(chained):
    with open(chained.chain, "ab") as f:
        f.write(b'{"action":"aggregate","fil')
    rc, findings = verify(chained)
    assert rc == 1 and findings[0]["kind"] == "torn-tail"
    assert "torn last line after record 6" in findings[0]["detail"]
    r = chained.ok("reconcile", env=NOW)
    assert "trimmed the torn tail" in r.out
    assert verify(chained) == (0, [])
    assert any("torn audit tail" in i["reason"]
               for i in chained.ok("quarantine", "list", "--json").json["items"])


def test_truncation_and_rewrite_only_show_against_the_git_anchor(chained):
    git(chained.root, "add", "-A")
    git(chained.root, "commit", "-qm", "time")
    parts = lines(chained.chain)
    write(chained.chain, parts[:-2])                        # truncated: the chain itself is fine
    assert ff.AuditChain(chained.chain).verify()["ok"]
    r = chained("audit", "verify", "--json")
    kinds = {f["kind"] for f in r.json["findings"]}
    assert r.rc == 1 and "audit-history" in kinds
    # a complete, consistent rewrite with other totals
    prev, rewritten = ff.AUDIT_GENESIS, []
    for line in parts:
        body = {k: v for k, v in json.loads(line).items() if k != "hash"}
        body["prev"] = prev
        body["totals"] = {k: v * 2 for k, v in body["totals"].items()}
        prev = ff.audit_hash(prev, body)
        rewritten.append(ff.canonical_bytes(dict(body, hash=prev)))
    write(chained.chain, rewritten)
    assert ff.AuditChain(chained.chain).verify()["ok"]
    r = chained("audit", "verify", "--json")
    assert r.rc == 1 and any("rewrites or truncates" in f["detail"] for f in r.json["findings"])


def test_shard_must_match_its_last_record(chained):
    shard = sorted(os.path.join(d, f) for d, _, fs in os.walk(
        os.path.join(chained.root, ".flowforge/team/summaries")) for f in fs)[0]
    doc = ff.read_shard(shard)
    cells = {(p, i, pr): s * 2 for p, i, pr, s in doc["rows"]}   # a consistent, valid shard
    open(shard, "wb").write(ff.render_shard(doc["user"], doc["store"], doc["month"], "day", "UTC",
                                            cells))
    rc, findings = verify(chained)
    assert rc == 1 and findings[0]["detail"] == "differs from its last audit record"


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
