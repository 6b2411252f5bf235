"""A real full disk and a real read-only file system: a small tmpfs holding the
whole repository (.git and .flowforge), filled to within N pages of full, N
swept page by page.  Each command either succeeds, or fails with exit 73/77,
one line, and the ledger and the private store exactly as they were; after
space comes back, a retry gives exact totals."""
import os
import shutil
import subprocess

import pytest

from conftest import SOAK, Runner, git, make_git_repo

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}
PAGE = 4096


@pytest.fixture
def tmpfs(tmp_path):
    mnt = str(tmp_path / "fs")
    os.makedirs(mnt)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", mnt],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): %s" % proc.stderr.strip())
    yield mnt
    subprocess.run(["umount", "-l", mnt], capture_output=True)


def fill(mnt, leave):
    """Fill the file system until `leave` bytes are free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(os.path.join(mnt, "filler"), "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    st = os.statvfs(mnt)
    return st.f_bavail * st.f_frsize


def state(root):
    """What must not change when a command fails: the ledger refs and the
    private store's entries and timer."""
    refs = git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/flowforge/")
    private = {}
    base = os.path.join(root, ".flowforge", "user")
    for dirpath, _, names in os.walk(base):
        for name in names:
            if ".tmp-" not in name:
                with open(os.path.join(dirpath, name), "rb") as f:
                    private[os.path.relpath(os.path.join(dirpath, name), base)] = f.read()
    return refs, private


def prepared(mnt, pycache, home, n):
    root = make_git_repo(os.path.join(mnt, "r%d" % n))
    runner = Runner(root, pycache, home)
    runner.ok("init", "--timezone", "UTC")
    runner.ok("log", "1", "1h", "--date", "2026-11-18", env=NOW)
    runner.ok("aggregate", env=NOW)
    runner.ok("log", "2", "30m", "--date", "2026-11-19", env=NOW)
    runner.ok("start", "3", "--at", "2026-11-20T09:00:00Z", env=NOW)
    return runner


@pytest.mark.parametrize("command", [["stop", "--at", "2026-11-20T10:00:00Z"], ["aggregate"]],
                         ids=["stop", "aggregate"])
def test_a_full_disk_swept_page_by_page(tmpfs, pycache, home, command):
    outcomes = {}
    pages = range(0, 48 if SOAK else 14)
    for n in pages:
        runner = prepared(tmpfs, pycache, home, n)
        before = state(runner.root)
        fill(tmpfs, n * PAGE)
        r = runner(*command, env=NOW)
        os.unlink(os.path.join(tmpfs, "filler"))
        if r.rc == 0:
            outcomes.setdefault("ok", []).append(n)
        else:
            outcomes.setdefault(r.rc, []).append(n)
            assert r.rc in (73, 77), (n, r)
            assert r.err.count("\n") == 1 and "Traceback" not in r.err, (n, r)
            after = state(runner.root)
            assert after[0] == before[0], (n, "a ledger ref moved", r)
            assert after[1] == before[1], (n, "the private store changed", r)
        # space is back: the user repeats what failed, and everything adds up
        if command[0] == "stop" and r.rc != 0:
            runner.ok(*command, env=NOW)
        status = runner.ok("status", env=NOW)
        assert "no timer" in status.out or "running" not in status.out or command[0] != "stop"
        runner.ok("aggregate", env=NOW)
        expected = 5400 + (3600 if command[0] == "stop" else 0)
        assert runner.ok("report", "--json", "--by", "user").json["total_seconds"] == expected, n
        shutil.rmtree(runner.root)
    assert 73 in outcomes and "ok" in outcomes, outcomes     # the sweep crossed the edge


def test_a_read_only_remount_changes_nothing_and_the_retry_is_exact(tmpfs, pycache, home):
    runner = prepared(tmpfs, pycache, home, 0)
    before = state(runner.root)
    subprocess.run(["mount", "-o", "remount,ro", tmpfs], check=True)
    try:
        for args in (["stop", "--at", "2026-11-20T10:00:00Z"], ["aggregate"],
                     ["log", "4", "1h", "--date", "2026-11-17"]):
            r = runner(*args, env=NOW)
            assert r.rc in (73, 77) and r.err.count("\n") == 1 and "Traceback" not in r.err, (args, r)
        rc = subprocess.run(["git", "commit", "--allow-empty", "-qm", "x"], cwd=runner.root,
                            capture_output=True).returncode
        assert rc != 0                  # git itself cannot write either: the file system is ro
    finally:
        subprocess.run(["mount", "-o", "remount,rw", tmpfs], check=True)
    assert state(runner.root) == before
    runner.ok("stop", "--at", "2026-11-20T10:00:00Z", env=NOW)
    runner.ok("aggregate", env=NOW)
    assert runner.ok("report", "--json", "--by", "user").json["total_seconds"] == 9000
