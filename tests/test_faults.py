"""Injected I/O errors: the k-th write / fsync / replace fails -> nothing half-done, no
success claimed, and a retry afterwards gives exact totals."""
import errno
import glob
import os
import shutil
import subprocess
import sys

import pytest

import flowforge as ff

from conftest import ROOT, all_files_parse, call, git, ledger_files, private_total, tree_snapshot

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def ledger_refs(root):
    """`git for-each-ref refs/flowforge/`: every ledger ref and where it points."""
    return git(root, "for-each-ref", "refs/flowforge/")


def store_tips(root):
    out = git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/flowforge/stores/")
    return dict(line.split() for line in out.splitlines())


def ledger_whole(root, before):
    """Every store ref either still points where it did (`before`: ref -> tip) or
    moved by exactly one commit, and every shard and chain at its tip verifies."""
    for ref, tip in store_tips(root).items():
        if ref in before and tip != before[ref]:
            assert git(root, "rev-parse", tip + "^").strip() == before[ref], ref
        elif ref not in before:
            assert git(root, "rev-list", "--count", tip).strip() == "1", ref
        user = ref.rsplit("/", 1)[1].rpartition("--")[0]
        files = ledger_files(root, user)
        chain = b"".join(files[n] for n in sorted(files) if n.startswith("audit/"))
        assert ff.verify_chain_bytes(chain, ref)["ok"], ref
        for name, data in files.items():
            if name.startswith("summaries/"):
                ff.check_shard_sums(ff.verify_shard_bytes(data))


class Fault:
    """Make the k-th call to one of os.write / os.fsync / os.replace fail."""

    def __init__(self, monkeypatch, k, err=errno.ENOSPC, partial=False):
        self.k, self.err, self.partial = k, err, partial
        self.calls = 0
        self.fired = False
        for name in ("write", "fsync", "replace"):
            monkeypatch.setattr(os, name, self.wrap(name, getattr(os, name)))

    def wrap(self, name, real):
        def wrapper(*args):
            self.calls += 1
            if self.calls == self.k:
                self.fired = True
                if name == "write" and self.partial and len(args[1]) > 1:
                    real(args[0], bytes(args[1][:len(args[1]) // 2]))   # half a line reached disk
                raise OSError(self.err, os.strerror(self.err))
            return real(*args)
        return wrapper


def test_atomic_write_failures_leave_the_target_untouched(tmp_path, monkeypatch):
    target = tmp_path / "t.json"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    for k in range(1, 6):
        with monkeypatch.context() as m:
            fault = Fault(m, k, errno.EIO)
            try:
                ff.atomic_write(str(target), b"new" * 1000)
            except ff.StorageError as e:
                assert fault.fired and e.exit_code == ff.EXIT_CANTCREAT
                # calls: write, fsync(file), replace, fsync(directory).  Before the
                # rename the target is untouched; a failing directory fsync comes after
                # the rename, which cannot be undone: the new bytes are whole, and the
                # failure is still reported.
                assert target.read_bytes() == (b"old" if k <= 3 else b"new" * 1000)
            else:
                assert not fault.fired
                assert target.read_bytes() == b"new" * 1000
        assert [p.name for p in tmp_path.iterdir()] == ["t.json"]    # no temp file left
        assert os.stat(target).st_mode & 0o777 == 0o640             # mode kept
        target.write_bytes(b"old")


def test_append_that_fails_half_way_is_cut_back(tmp_path, monkeypatch):
    path = str(tmp_path / "day.jsonl")
    ff.append_durable(path, b"first\n")
    with monkeypatch.context() as m:
        Fault(m, 1, errno.ENOSPC, partial=True)
        with pytest.raises(ff.StorageError):
            ff.append_durable(path, b"second line that does not fit\n")
    assert open(path, "rb").read() == b"first\n"


OPERATIONS = [
    ("stop", [["start", "1", "--at", "09:00"]], ["stop", "--at", "10:00"], 3600),
    ("log", [], ["log", "1", "1h", "--key", "x"], 3600),
    ("edit", [["log", "1", "1h", "--date", "2026-11-19"]], "edit", 7200),
    ("aggregate", [["log", "1", "1h"], ["log", "2", "1h", "--date", "2026-10-31"]],
     ["aggregate"], 7200),
]


@pytest.mark.parametrize("name,setup,op,expected", OPERATIONS, ids=[o[0] for o in OPERATIONS])
@pytest.mark.parametrize("err,partial", [(errno.ENOSPC, True), (errno.EIO, False)])
def test_injected_errors_on_every_call(repo, tmp_path, monkeypatch, name, setup, op, expected,
                                       err, partial):
    for args in setup:
        call(repo.root, *args, env=NOW)
    if op == "edit":
        entry_id = call(repo.root, "entries", "--json", "--date", "2026-11-19",
                        env=NOW).json["entries"][0]["id"]
        op = ["edit", entry_id, "--duration", "2h"]
    if name != "aggregate":
        call(repo.root, "aggregate", env=NOW)
    k = 0
    while True:
        k += 1
        root = str(tmp_path / ("k%d" % k))
        shutil.copytree(repo.root, root, symlinks=True)
        before = tree_snapshot(root)
        tips_before = store_tips(root)
        with monkeypatch.context() as m:
            fault = Fault(m, k, err, partial)
            r = call(root, *op, env=NOW)
        if not fault.fired:
            assert r.rc == 0, r
            break
        if r.rc == 0:
            # the failure hit a best-effort write (the mirror, metrics) or came after the
            # command's commit point (the entry appended, the ledger ref moved): the work is
            # done, and the log says what was left for the next command to heal
            log = open(os.path.join(root, ".flowforge/state/logs/flowforge.jsonl")).read()
            assert ("mirror-failed" in log or "metrics-not-recorded" in log
                    or "after-commit-point" in log), k
            all_files_parse(root)
            ledger_whole(root, tips_before)
            assert call(root, "aggregate", env=NOW).rc == 0
            assert private_total(root) == expected, k
            shutil.rmtree(root)
            continue
        # no success claimed, one clear line, no temp files left behind
        assert r.rc == ff.EXIT_CANTCREAT, (k, r)
        assert r.err.count("\n") == 1 and "cannot write" in r.err and "Traceback" not in r.err
        assert not glob.glob(root + "/.flowforge/**/*.tmp-*", recursive=True)
        assert not glob.glob(root + "/.flowforge/state/tmp/*")    # no scratch blobs either
        all_files_parse(root)   # whatever happened before the failure is whole
        ledger_whole(root, tips_before)   # the ledger too: no ref moved half-way
        after = tree_snapshot(root)
        changed = {p for p in before if before[p] != after.get(p)}
        assert all(p.endswith((".json", ".jsonl", "/")) for p in changed), (k, changed)
        # the user retries; the result is exact, as if nothing had failed
        assert call(root, "status", env=NOW).rc == 0
        retry = call(root, *op, env=NOW)
        assert retry.rc == 0 or "no timer is running" in retry.err, (k, retry)
        assert call(root, "aggregate", env=NOW).rc == 0
        assert private_total(root) == expected, k
        assert call(root, "report", "--json").json["total_seconds"] == expected, k
        shutil.rmtree(root)
    assert k > 2


EFBIG = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.path.insert(0, %r)
import flowforge
raise SystemExit(flowforge.main(sys.argv[2:]))
""" % ROOT


def test_file_size_limit_gives_efbig_and_changes_nothing(repo):
    repo.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    repo.ok("aggregate", env=NOW)
    before = tree_snapshot(repo.root)
    refs_before = ledger_refs(repo.root)
    assert "refs/flowforge/stores/alice--" in refs_before
    day = ".flowforge/user/alice/time/daily/2026-11-19.jsonl"
    size = len(before[day][0])
    env = repo.env(FLOWFORGE_USER="alice", **NOW)
    proc = subprocess.run([sys.executable, "-S", "-c", EFBIG, str(size + 20), "-C", repo.root,
                           "log", "2", "2h", "--date", "2026-11-19"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == ff.EXIT_CANTCREAT, proc.stderr
    assert "File too large" in proc.stderr and proc.stderr.count("\n") == 1
    after = tree_snapshot(repo.root)
    assert after[day] == before[day]
    assert ledger_refs(repo.root) == refs_before
    # a shard write refused by the limit leaves the old shard (and every ledger ref) in place
    repo.ok("log", "3", "3h", "--date", "2026-11-19", env=NOW)
    shard = ledger_files(repo.root)["summaries/2026-11.json"]
    proc = subprocess.run([sys.executable, "-S", "-c", EFBIG, "100", "-C", repo.root, "aggregate"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == ff.EXIT_CANTCREAT, proc.stderr
    assert "File too large" in proc.stderr and proc.stderr.count("\n") == 1
    assert ledger_refs(repo.root) == refs_before
    assert ledger_files(repo.root)["summaries/2026-11.json"] == shard
    assert not glob.glob(repo.root + "/.flowforge/state/tmp/*")
    repo.ok("aggregate", env=NOW)
    assert ledger_refs(repo.root) != refs_before
    assert repo.ok("report", "--json").json["total_seconds"] == 4 * 3600
