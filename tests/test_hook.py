"""The git hooks, with real commits: pre-commit aggregates into the ledger ref (staging
nothing), and never blocks a commit."""
import json
import os
import shutil
import stat
import subprocess
import sys
import time

import pytest

import flowforge as ff

from conftest import FLOWFORGE, ROOT, git, ledger_files, lock_held, set_hook_budget, store_keys

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def commit(repo, message, *extra, env=None, path=None):
    """`git commit` as a developer runs it; returns (returncode, stderr)."""
    e = repo.env(FLOWFORGE_USER="alice", **dict(NOW, **(env or {})))
    if path:
        e["PATH"] = path
    proc = subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", message] + list(extra),
                          cwd=repo.root, env=e, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr


def wait_for_background_daemon(repo, timeout=30):
    deadline = time.monotonic() + timeout
    while ff.daemon_state(ff.Repo(repo.root))[0]:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def committed_files(repo, rev="HEAD"):
    return git(repo.root, "show", "--name-only", "--format=", rev).split()


def ledger_refs(repo):
    """`git for-each-ref refs/flowforge/`: every ledger ref and where it points."""
    return git(repo.root, "for-each-ref", "refs/flowforge/")


def ledger_seconds(repo, user="alice"):
    """Total seconds of the shards at the tip of the user's store ref."""
    total = 0
    for name, data in ledger_files(repo.root, user).items():
        if name.startswith("summaries/"):
            doc = ff.verify_shard_bytes(data)
            ff.check_shard_sums(doc)
            total += doc["totals"]["seconds"]
    return total


def assert_nothing_staged(repo):
    """A clean work tree and index: the hook wrote nothing git would commit."""
    assert git(repo.root, "status", "--porcelain", "--untracked-files=all") == ""
    assert git(repo.root, "diff", "--cached", "--name-only") == ""
    assert not os.path.exists(os.path.join(repo.root, ".flowforge/team"))


def jobs(repo):
    path = os.path.join(repo.root, ".flowforge/state/queue.db")
    return ff.RetryQueue(path).jobs() if os.path.exists(path) else []


@pytest.fixture
def hooked(repo):
    """A repository with FlowForge vendored, hooks installed and a first commit."""
    shutil.copy(FLOWFORGE, os.path.join(repo.root, "flowforge.py"))
    repo.ok("install", "hooks")
    git(repo.root, "add", "-A")
    assert commit(repo, "set up")[0] == 0
    return repo


def test_shards_land_in_the_same_commit(hooked):
    """The commit's pre-commit hook aggregates into the ledger ref: the time is there as
    soon as the commit is, and the branch, the index and the work tree are untouched."""
    assert_nothing_staged(hooked)
    assert store_keys(hooked.root) == {}               # the first commit had no time yet
    hooked.ok("log", "1", "1h30m", "--date", "2026-11-19", env=NOW)
    rc, err = commit(hooked, "work")
    assert rc == 0 and err == ""
    assert committed_files(hooked) == []               # nothing FlowForge on the branch
    assert_nothing_staged(hooked)
    [key] = store_keys(hooked.root)
    assert key.startswith("alice--")
    assert ledger_seconds(hooked) == 5400
    assert hooked.ok("report", "--json").json["total_seconds"] == 5400
    metrics = hooked.ok("metrics", "--format", "json").json
    assert metrics["hook_success_total"] >= 2 and metrics["hook_failure_total"] == 0


def test_lock_held_commit_goes_on_and_one_job_is_queued(hooked):
    started = time.time()
    hooked.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    lock = os.path.join(hooked.root, ".flowforge/state/locks/aggregate.alice.lock")
    with lock_held(lock):
        for n in range(3):
            rc, err = commit(hooked, "work %d" % n)
            assert rc == 0
            assert err.count("\n") == 1 and "queued as job" in err and "busy" in err, err
        assert store_keys(hooked.root) == {}          # nothing reached the ledger meanwhile
    queued = jobs(hooked)
    assert [(j["kind"], j["status"], j["payload"]) for j in queued] == [
        ("aggregate", "queued", {"user": "alice"})]          # three failures, one job
    assert hooked.ok("metrics", "--format", "json").json["hook_failure_total"] == 3
    wait_for_background_daemon(hooked)     # post-commit started one; it may still be running
    hooked.ok("daemon", "--once", env=NOW)
    assert [j["status"] for j in jobs(hooked)] == ["done"]
    assert hooked.ok("report", "--json").json["total_seconds"] == 3600
    assert ledger_seconds(hooked) == 3600                      # the daemon wrote the ledger
    refs = ledger_refs(hooked)
    rc, err = commit(hooked, "next")              # nothing left to do: no new ledger commit
    assert rc == 0 and err == "" and ledger_refs(hooked) == refs
    assert committed_files(hooked) == []
    assert_nothing_staged(hooked)
    metrics = hooked.ok("metrics", "--format", "json").json
    # from the first failure to the job's success: within this test's own run time
    assert metrics["recovery_count"] == 1
    assert 0 <= metrics["recovery_seconds_sum"] <= time.time() - started + 1, metrics


def test_time_budget_exceeded(hooked):
    set_hook_budget(hooked.root, 1)
    for day in range(1, 29):
        hooked.ok("log", "1", "10m", "--date", "2026-10-%02d" % day, env=NOW)
    shutil.rmtree(os.path.join(hooked.root, ".flowforge/state/aggregate"), ignore_errors=True)
    rc, err = commit(hooked, "slow")
    assert rc == 0 and "budget of 1 ms" in err and "queued" in err
    assert len(jobs(hooked)) == 1
    wait_for_background_daemon(hooked)
    hooked.ok("daemon", "--once", env=NOW)
    assert hooked.ok("report", "--json").json["total_seconds"] == 28 * 600


def test_best_effort_code_does_not_swallow_the_end_of_the_budget(hooked, tmp_path, monkeypatch):
    """The mirror tolerates FlowForge errors; the budget's end must get through it."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    mirror = ff.PrivateStore(ff.Repo(hooked.root), "alice").mirror
    with pytest.raises(ff.BudgetExceeded):
        with ff.time_budget(0.05):
            mirror._best_effort("slow copy", lambda: time.sleep(2))
    assert not os.path.exists(os.path.join(hooked.root, ".flowforge/state", ff.MIRROR_STALE))


def test_broken_flowforge_py_never_blocks(hooked):
    with open(os.path.join(hooked.root, "flowforge.py"), "a") as f:
        f.write("\ndef broken(:\n")
    hooked.ok("log", "1", "1h", env=NOW)
    rc, err = commit(hooked, "work")
    assert rc == 0
    assert err.count("\n") == 1 and err.startswith("flowforge: hook failed: ") and "Syntax" in err
    os.unlink(os.path.join(hooked.root, "flowforge.py"))
    rc, err = commit(hooked, "flowforge.py gone, the fallback copy runs")
    assert rc == 0 and err == ""


def tool_dir(tmp_path, names):
    """A PATH directory with only these programs."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in names:
        os.symlink(shutil.which(name), str(d / name))
    return str(d)


def test_python3_absent_from_path(hooked, tmp_path):
    hooked.ok("log", "1", "1h", env=NOW)
    path = tool_dir(tmp_path, ["git", "sh"])
    rc, err = commit(hooked, "no python", path=path)
    assert rc == 0
    assert err == "flowforge: python3 not found; time not aggregated (run flowforge aggregate later)\n"


# A python3 for PATH that injects a failure into the hook, then runs what the
# shim asked for: ENOSPC for shard writes, or a real RLIMIT_FSIZE (EFBIG, which
# the git processes it starts inherit).
FAULTY_PYTHON = r"""#!%(python)s
import errno, os, resource, signal, sys
mode = os.environ["FAULT"]
if mode == "enospc":   # every write of a shard's bytes, wherever it goes on the way to git
    real_write = os.write   # (as a file, or compressed in the pack of a commit's objects)
    def write(fd, data):
        if b'"kind":"flowforge-shard"' in bytes(data) or bytes(data[:4]) == b"PACK":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    os.write = write
else:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))   # below a shard's loose object
args = sys.argv[1:]
for flag, value in zip(args, args[1:]):   # as the real python3 would take the shim's -X
    if flag == "-X" and value.startswith("pycache_prefix="):
        sys.pycache_prefix = value.split("=", 1)[1]
code = args[args.index("-c") + 1]
sys.argv = ["-c"] + args[args.index("-c") + 2:]
exec(compile(code, "<shim>", "exec"))
"""


@pytest.mark.parametrize("fault", ["enospc", "efbig"])
def test_failing_writes_never_block(hooked, tmp_path, fault):
    if not os.path.exists("/proc/self/fd"):
        pytest.skip("needs /proc")
    for day in range(1, 20):
        hooked.ok("log", str(day), "%dm" % (day + 10), "--date", "2026-11-%02d" % day, env=NOW)
    bindir = tool_dir(tmp_path, ["git", "sh"])
    with open(os.path.join(bindir, "python3"), "w") as f:
        f.write(FAULTY_PYTHON % {"python": sys.executable})
    os.chmod(os.path.join(bindir, "python3"), 0o755)
    refs_before = ledger_refs(hooked)
    rc, err = commit(hooked, "disk trouble", env={"FAULT": fault}, path=bindir)
    assert rc == 0, err
    assert err.count("\n") == 1 and "time not aggregated" in err, err
    assert ("No space left" in err) if fault == "enospc" else ("File too large" in err)
    if fault == "enospc":
        assert "queued as job" in err and len(jobs(hooked)) == 1
    assert ledger_refs(hooked) == refs_before               # no ref moved, none half-way
    assert committed_files(hooked) == []
    assert_nothing_staged(hooked)
    wait_for_background_daemon(hooked)
    hooked.ok("daemon", "--once", env=NOW)          # the disk is fine again
    expected = sum((day + 10) * 60 for day in range(1, 20))
    assert hooked.ok("report", "--json").json["total_seconds"] == expected
    assert ledger_seconds(hooked) == expected
    assert all(j["status"] == "done" for j in jobs(hooked))


def test_partial_commit_stages_for_the_next_commit_never_reverts(hooked):
    """`git commit -- path` runs the hook against a temporary index: the hook writes the
    ledger ref only, so the commit holds exactly the named path, nothing is staged for
    later, and no change of the developer's is reverted or swept into a commit."""
    open(os.path.join(hooked.root, "a.txt"), "w").write("a\n")
    open(os.path.join(hooked.root, "b.txt"), "w").write("b\n")
    git(hooked.root, "add", "a.txt", "b.txt")
    git(hooked.root, "commit", "-qm", "a", "--no-verify")
    hooked.ok("log", "1", "1h", env=NOW)
    open(os.path.join(hooked.root, "a.txt"), "w").write("changed\n")
    open(os.path.join(hooked.root, "b.txt"), "w").write("staged, not committed\n")
    git(hooked.root, "add", "b.txt")
    rc, err = commit(hooked, "partial", "--", "a.txt")
    assert rc == 0 and err == ""
    assert committed_files(hooked) == ["a.txt"]
    assert git(hooked.root, "show", "HEAD:a.txt") == "changed\n"
    assert ledger_seconds(hooked) == 3600                  # aggregated by this very commit
    assert git(hooked.root, "diff", "--cached", "--name-only").split() == ["b.txt"]
    assert git(hooked.root, "status", "--porcelain") == "M  b.txt\n"
    assert open(os.path.join(hooked.root, "a.txt")).read() == "changed\n"
    refs = ledger_refs(hooked)
    rc, err = commit(hooked, "next")
    assert rc == 0 and err == ""
    assert committed_files(hooked) == ["b.txt"]             # only the developer's own change
    assert_nothing_staged(hooked)
    assert ledger_refs(hooked) == refs                      # nothing new to aggregate
    assert hooked.ok("report", "--json").json["total_seconds"] == 3600


def test_chaining_idempotence_and_uninstall(repo):
    hooks = os.path.join(repo.root, ".git/hooks")
    team_hook = "#!/bin/sh\necho team-hook-ran >&2\nexit ${TEAM_HOOK_EXIT:-0}\n"
    with open(os.path.join(hooks, "pre-commit"), "w") as f:
        f.write(team_hook)
    os.chmod(os.path.join(hooks, "pre-commit"), 0o755)
    r = repo.ok("install", "hooks")
    assert "chained" in r.out
    before = {n: open(os.path.join(hooks, n), "rb").read() for n in os.listdir(hooks)}
    assert "up to date" in repo.ok("install", "hooks").out
    assert before == {n: open(os.path.join(hooks, n), "rb").read() for n in os.listdir(hooks)}
    rc, err = commit(repo, "team hook says no", env={"TEAM_HOOK_EXIT": "1"})
    assert rc != 0 and "team-hook-ran" in err                 # its verdict stands
    rc, err = commit(repo, "team hook says yes")
    assert rc == 0 and "team-hook-ran" in err
    assert repo("health", "--json").json["checks"][0]["status"] == "ok"   # hooks: current
    repo.ok("uninstall", "hooks")
    assert open(os.path.join(hooks, "pre-commit")).read() == team_hook
    assert not os.path.exists(os.path.join(hooks, "post-commit"))
    assert not os.path.exists(os.path.join(hooks, "pre-commit.flowforge-chained"))


def test_core_hooks_path_is_honoured(repo):
    git(repo.root, "config", "core.hooksPath", ".githooks")
    repo.ok("install", "hooks")
    for hook in ("pre-commit", "post-commit", "pre-push"):
        shim = os.path.join(repo.root, ".githooks", hook)
        assert os.path.exists(shim) and os.stat(shim).st_mode & stat.S_IXUSR, hook
        assert not os.path.exists(os.path.join(repo.root, ".git", "hooks", hook)), hook
    repo.ok("log", "1", "1h", env=NOW)
    assert store_keys(repo.root) == {}
    rc, err = commit(repo, "work")
    assert rc == 0 and err == ""
    assert ledger_seconds(repo) == 3600                    # the hook in .githooks/ ran
    assert git(repo.root, "diff", "--cached", "--name-only") == ""


def test_stale_and_missing_hooks_are_reported(repo):
    r = repo("health", "--json")
    assert r.json["checks"][0]["status"] == "degraded"
    repo.ok("install", "hooks")
    shim = os.path.join(repo.root, ".git/hooks/pre-commit")
    open(shim, "a").write("# edited\n")
    assert repo("health", "--json").json["checks"][0]["hooks"]["pre-commit"] == "stale"
    assert "updated" in repo.ok("install", "hooks").out


def test_pre_commit_framework_manifest():
    text = open(os.path.join(ROOT, ".pre-commit-hooks.yaml")).read()
    assert "id: flowforge" in text and "pass_filenames: false" in text
    assert "always_run: true" in text and "minimum_pre_commit_version" in text
    assert os.access(FLOWFORGE, os.X_OK)                  # language: script runs the file


def test_the_shim_run_by_hand_from_a_subdirectory_finds_the_work_tree(hooked):
    """git runs a hook in the top of the work tree (the shim takes $PWD then); run by
    hand from a subdirectory it asks git.  Either way the day is aggregated, and the
    bytecode is kept in .flowforge/state/pycache even with PYTHONDONTWRITEBYTECODE set."""
    shim = os.path.join(hooked.root, ".git", "hooks", "pre-commit")
    sub = os.path.join(hooked.root, "src", "deep")
    os.makedirs(sub)
    pycache = os.path.join(hooked.root, ".flowforge", "state", "pycache")
    shutil.rmtree(pycache, ignore_errors=True)
    hooked.ok("log", "12", "5m", "--date", "2026-11-18", env=NOW)
    hooked.ok("aggregate", env=NOW)
    for n, cwd in enumerate((sub, hooked.root)):
        hooked.ok("log", "12", "%dm" % (10 + n), "--date", "2026-11-19", env=NOW)
        before = ledger_seconds(hooked)
        e = hooked.env(FLOWFORGE_USER="alice", PYTHONDONTWRITEBYTECODE="1", **NOW)
        proc = subprocess.run([shim], cwd=cwd, env=e, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stderr == "", proc
        assert ledger_seconds(hooked) == before + (10 + n) * 60
    compiled = [name for _, _, names in os.walk(pycache) for name in names]
    assert any(name.startswith("flowforge.") and name.endswith(".pyc") for name in compiled)
    assert not os.path.exists(os.path.join(sub, "__pycache__"))
    assert not os.path.exists(os.path.join(hooked.root, "__pycache__"))


def compiled_for_hooks(repo):
    """Every bytecode file in the hooks' prefix, by path."""
    prefix = os.path.join(repo.root, ".flowforge", "state", "pycache")
    return {(os.path.join(d, name), st.st_ino, st.st_mtime_ns)
            for d, _, names in os.walk(prefix) for name in names
            for st in [os.stat(os.path.join(d, name))]}


def test_a_new_clones_first_commit_compiles_nothing(repo):
    """`install hooks` compiles flowforge.py and what the hook imports into the hooks'
    prefix (even under PYTHONDONTWRITEBYTECODE), with the python3 the hooks run:
    the first commit spends its budget on aggregation, not on compiling."""
    shutil.copy(FLOWFORGE, os.path.join(repo.root, "flowforge.py"))
    repo.ok("install", "hooks", env={"PYTHONDONTWRITEBYTECODE": "1"})
    warm = compiled_for_hooks(repo)
    names = {os.path.basename(path).split(".")[0] for path, _, _ in warm}
    assert {"flowforge", "datetime", "enum", "dbapi2", "traceback"} <= names, sorted(names)
    git(repo.root, "add", "-A")
    repo.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    rc, err = commit(repo, "set up and work")
    assert rc == 0 and err == "" and ledger_seconds(repo) == 3600
    assert compiled_for_hooks(repo) == warm


def test_a_committed_module_named_as_the_standard_librarys_is_never_run(hooked, tmp_path):
    """A teammate's zlib.py, datetime.py, re.py or sqlite3/ at the top of the work tree,
    where hooks, `python3 flowforge.py` and the daemon run (also with -S, as the daemon,
    cron and systemd run it, and with an empty PYTHONPATH entry, which stands for the
    current directory): FlowForge imports the standard library's, never theirs."""
    marker = str(tmp_path / "ran")
    trap = "open(%r, 'a').write(__name__ + '\\n')\nraise SystemExit(3)\n" % marker
    for name in ("zlib.py", "datetime.py", "re.py", "subprocess.py", "traceback.py", "types.py",
                 "sqlite3/__init__.py"):
        path = os.path.join(hooked.root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(trap)
    git(hooked.root, "add", "-A")
    expected = 0
    for n, pythonpath in enumerate((None, ":" + str(tmp_path / "nonexistent"))):
        extra = {"PYTHONPATH": pythonpath} if pythonpath else {}
        hooked.ok("log", "1", "1h", "--date", "2026-11-1%d" % n, env=NOW)
        expected += 3600
        rc, err = commit(hooked, "work %d" % n, env=extra)
        assert rc == 0 and err == "" and ledger_seconds(hooked) == expected, (pythonpath, err)
        env = hooked.env(FLOWFORGE_USER="alice", **dict(NOW, **extra))
        # without -S, site's .pth files import modules before FlowForge runs: from an
        # empty PYTHONPATH entry too, which is Python's start-up, not FlowForge's to mend
        for flags in ([["-S"]] if pythonpath else [[], ["-S"]]):
            for args in (["log", "2", "1m", "--date", "2026-11-18"], ["report", "--json"],
                         ["queue", "status"], ["daemon", "--once", "-q"]):
                proc = subprocess.run([sys.executable] + flags + ["flowforge.py"] + args,
                                      cwd=hooked.root, env=env, capture_output=True, text=True,
                                      timeout=120)
                assert proc.returncode == 0 and "Traceback" not in proc.stderr, (flags, args, proc.stderr)
                if args[0] == "log":
                    expected += 60
                if args[0] == "report":
                    assert json.loads(proc.stdout)["total_seconds"] == expected
                assert not os.path.exists(marker), (flags, args, open(marker).read())
    # run from a subdirectory holding its own zlib.py: the empty entry is that directory
    sub = os.path.join(hooked.root, "src")
    os.makedirs(sub)
    with open(os.path.join(sub, "zlib.py"), "w") as f:
        f.write(trap)
    proc = subprocess.run([sys.executable, "-S", "../flowforge.py", "queue", "status"], cwd=sub,
                          env=hooked.env(FLOWFORGE_USER="alice", PYTHONPATH=":", **NOW),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    git(hooked.root, "add", "-A")
    rc, err = commit(hooked, "more work")
    assert rc == 0 and err == "" and ledger_seconds(hooked) == expected
    assert not os.path.exists(marker), open(marker).read()


def test_a_timer_with_absurd_times_is_set_aside_not_a_hang(repo):
    """current.json with a valid shape but a segment to the year 10**22: one line,
    exit 65, the timer set aside -- not a command that splits it into days for ever."""
    repo.ok("start", "1", "--at", "09:00", env=NOW)
    repo.ok("pause", env=NOW)
    path = os.path.join(repo.root, ".flowforge/user/alice/time/current.json")
    doc = json.load(open(path))
    doc["timer"]["segments"] = [[doc["timer"]["segments"][0][0], 10 ** 30]]
    with open(path, "w") as f:
        json.dump(doc, f)
    r = repo("status", env=NOW, timeout=20)
    assert r.rc == 65 and "set aside as Q1" in r.err and r.err.count("\n") == 1, r
    repo.ok("start", "1", "--at", "10:00", env=NOW)
