"""Bad input: one clear line on stderr, the documented exit code, nothing changed."""
import os
import shutil
import subprocess

import pytest

from conftest import tree_snapshot

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}

CORPUS = [
    # timers
    (["start"], 64), (["start", ""], 64), (["start", "abc"], 64), (["start", "#"], 64),
    (["start", "12 3"], 64), (["start", "../../etc#1"], 64), (["start", "a/..#1"], 64),
    (["start", "a/...#1"], 64), (["start", "1", "--at", "25:00"], 64),
    (["start", "1", "--at", "tomorrow"], 64), (["start", "1", "--at", "2030-01-01 09:00"], 64),
    (["start", "1", "--at", "-15x"], 64), (["start", "1", "--project", "=cmd|x"], 64),
    (["start", "1", "--project", ""], 64), (["start", "1", "--note", "a\x01b"], 64),
    (["start", "1", "--note", "x" * 2001], 64),
    (["stop"], 1), (["pause"], 1), (["resume"], 1), (["cancel"], 1),
    (["stop", "--at", "9xm"], 64), (["stop", "--at", "13pm"], 64),
    # log
    (["log", "1", "30"], 64), (["log", "1", "-1h"], 64), (["log", "1", "25h"], 64),
    (["log", "1", "0m"], 64), (["log", "1", "1h", "--date", "2026-02-30"], 64),
    (["log", "1", "1h", "--date", "2099-01-01"], 64), (["log", "1", "1h", "--key", ""], 64),
    (["log", "1", "abc"], 64), (["log", "1"], 64),
    # entries, edit, delete
    (["edit", "nonsense", "--issue", "1"], 64), (["edit", "20261120-zzzzzzzz", "--issue", "1"], 64),
    (["edit", "20261120-00000000", "--issue", "1"], 1), (["edit", "20261120-00000000"], 64),
    (["delete", "20261120-00000000"], 1), (["delete", "../x"], 64),
    (["entries", "--from", "2026-1-1"], 64), (["entries", "--issue", "x y"], 64),
    # team
    (["aggregate", "--wait", "-1"], 64), (["aggregate", "--wait", "x"], 64),
    (["aggregate", "--wait", "nan"], 64), (["audit", "verify", "--since-hours", "nan"], 64),
    (["audit", "verify", "--since-hours", "inf"], 64), (["reconcile", "--lookback-hours", "nan"], 64),
    (["queue", "retry", "99999999999999999999"], 64), (["queue", "list", "--limit", "0"], 64),
    (["daemon", "--interval", "inf"], 64), (["start", "1", "--at", "-99999999h"], 64),
    (["start", "1", "--at", "1969-12-31 09:00"], 64),
    (["report", "--by", "bogus"], 64), (["report", "--by", "user,user"], 64),
    (["report", "--format", "xml"], 64), (["report", "--from", "2026-1-1"], 64),
    (["report", "--period", "year"], 64), (["bill", "--month", "2026-00"], 64),
    (["bill", "--month", "2026-11", "--to", "2026-11-30"], 64),
    (["quarantine", "restore"], 64), (["quarantine", "restore", "Q99"], 1),
    (["quarantine", "explode"], 64),
    # the command line itself and identities
    (["frobnicate"], 64), (["status", "--frob"], 64), ([], 64),
    (["--user", "../x", "status"], 64), (["--user", ".git", "status"], 64),
    (["--user", "", "status"], 64), (["--user", "a/b", "log", "1", "1h"], 64),
    (["--user", "x" * 65, "status"], 64), (["--user", "-rf", "status"], 64),
    (["-C", "/nonexistent/path", "status"], 64),
    (["init", "--timezone", "Mars/Olympus"], 78), (["init", "--timezone", "../../etc/passwd"], 78),
]


@pytest.fixture
def lived_in(repo):
    """A repository with history, a running timer and shards."""
    repo.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    repo.ok("aggregate", env=NOW)
    repo.ok("status", env=NOW)
    return repo


def check_clean_failure(r, rc):
    assert r.rc == rc, r
    assert "Traceback" not in r.err
    assert r.err.count("\n") == 1 and r.err.startswith("flowforge: "), r.err
    assert r.out == ""


def sandbox_digest(*roots):
    """One sha256 over every file, link and directory (path, mode, bytes) under
    `roots`, .git included: the repository with its refs and objects, the home
    directory with the mirror."""
    import hashlib
    digest = hashlib.sha256()
    for root in roots:
        for dirpath, dirnames, filenames in sorted(os.walk(root)):
            dirnames.sort()
            for name in sorted(filenames) + [d + "/" for d in dirnames]:
                path = os.path.join(dirpath, name.rstrip("/"))
                st = os.lstat(path)
                digest.update(("%s %o\0" % (os.path.relpath(path, root), st.st_mode)).encode())
                if os.path.islink(path):
                    digest.update(os.readlink(path).encode())
                elif not name.endswith("/"):
                    with open(path, "rb") as f:
                        digest.update(f.read())
    return digest.hexdigest()


def test_bad_input_corpus_changes_nothing(lived_in):
    before = tree_snapshot(lived_in.root)
    sandbox = sandbox_digest(lived_in.root, lived_in.home)
    for args, rc in CORPUS:
        check_clean_failure(lived_in(*args, env=NOW), rc)
        assert tree_snapshot(lived_in.root) == before, args
        assert sandbox_digest(lived_in.root, lived_in.home) == sandbox, args


def test_hostile_user_from_environment(lived_in):
    before = tree_snapshot(lived_in.root)
    for name in ("../../x", ".", "a\nb", "x/y", ".hidden"):
        check_clean_failure(lived_in("log", "1", "1h", user=name, env=NOW), 64)
    assert tree_snapshot(lived_in.root) == before


@pytest.mark.parametrize("content", [b"{", b"[]", b'{"schema": 99}', b'{"schema": 1, "granularity":'
                                     b' "hour"}', b'{"schema":1,"billing":{"currency":"euro"}}', b"",
                                     b'{"schema": 1, "plugins": [1]}',
                                     b'{"schema": 1, "plugins": {"github": "yes"}}',
                                     b'{"schema": 1, "plugins": {"github": {"enabled": "no"}}}',
                                     b'{"schema": 1, "authors": ["x"]}',
                                     b'{"schema": 1, "authors": {"a@example.com": "../x"}}'])
def test_corrupted_config(lived_in, content):
    path = os.path.join(lived_in.root, ".flowforge/config.json")
    open(path, "wb").write(content)
    before = tree_snapshot(lived_in.root)
    for args in (["status"], ["log", "1", "1h"], ["report"], ["bill"], ["aggregate"]):
        check_clean_failure(lived_in(*args, env=NOW), 78)
    assert tree_snapshot(lived_in.root) == before


def test_not_initialised_and_not_a_repository(bare_repo, tmp_path):
    before = tree_snapshot(bare_repo.root)
    check_clean_failure(bare_repo("start", "1"), 78)
    assert tree_snapshot(bare_repo.root) == before
    outside = tmp_path / "nogit"
    outside.mkdir()
    check_clean_failure(bare_repo("init", cwd=str(outside)), 1)
    assert list(outside.iterdir()) == []


def make_read_only(path):
    if os.geteuid() == 0:       # root ignores modes; the immutable flag stops even root
        if not shutil.which("chattr"):
            pytest.skip("running as root without chattr")
        proc = subprocess.run(["chattr", "-R", "+i", path], capture_output=True)
        if proc.returncode:
            pytest.skip("cannot set the immutable flag here: %s" % proc.stderr.decode().strip())
        return lambda: subprocess.run(["chattr", "-R", "-i", path], check=True)
    for dirpath, dirnames, filenames in os.walk(path):
        for name in filenames + dirnames:
            os.chmod(os.path.join(dirpath, name), os.stat(os.path.join(dirpath, name)).st_mode & ~0o222)
    os.chmod(path, 0o555)
    return lambda: subprocess.run(["chmod", "-R", "u+w", path], check=True)


def test_read_only_flowforge_dir(lived_in):
    ffdir = os.path.join(lived_in.root, ".flowforge")
    before = tree_snapshot(lived_in.root)
    restore = make_read_only(ffdir)
    try:
        for args in (["log", "1", "1h"], ["start", "2"], ["aggregate", "--full"]):
            check_clean_failure(lived_in(*args, env=NOW), 77)
        # reading still works
        assert lived_in("report", "--json").rc == 0
    finally:
        restore()
    assert tree_snapshot(lived_in.root) == before


def test_a_shard_with_a_valid_checksum_but_bad_rows_stops_reports(lived_in):
    import flowforge as ff
    from conftest import ledger_shard, rewrite_ledger
    name = "summaries/2026-11.json"
    doc = ff.verify_shard_bytes(ledger_shard(lived_in.root, "2026-11"))
    assert lived_in("report", env=NOW).rc == 0              # readable (and cached) before
    for cells in ({("yesterday", "1", ""): 3600}, {("2026-10-31", "1", ""): 3600}):
        bad = ff.render_shard("alice", doc["store"], "2026-11", "day", "UTC", cells)
        ff.verify_shard_bytes(bad)                           # the checksum itself is valid
        rewrite_ledger(lived_in.root, {name: bad})            # as a teammate's FlowForge could
        for command in (["report"], ["bill"]):
            r = lived_in(*command, env=NOW)
            check_clean_failure(r, 65)
            assert "malformed row" in r.err and name in r.err


def test_a_day_record_with_a_string_version_is_set_aside(lived_in):
    import flowforge as ff
    path = os.path.join(lived_in.root, ".flowforge/user/alice/time/daily/2026-11-19.jsonl")
    with open(path, "ab") as f:
        f.write(ff.encode_record({"op": "entry", "id": "20261119-0badbad0", "issue": "2",
                                  "date": "2026-11-19", "seconds": 60, "v": "1"}))
    r = lived_in("entries", "--date", "2026-11-19", env=NOW)
    assert r.rc == 0 and "Traceback" not in r.err and "quarantined" in r.err
