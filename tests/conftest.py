"""Shared fixtures: throwaway git repositories and ways to run FlowForge.

`ff(...)` runs the CLI in a child process the way the installed command does
(importing the module, bytecode cached, -S), so hundreds of runs stay fast.
`call(...)` runs `flowforge.main()` in this process for tests that need to
inject faults or inspect internals."""
import io
import json
import os
import subprocess
import sys
import contextlib
import glob

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOWFORGE = os.path.join(ROOT, "flowforge.py")
sys.path.insert(0, ROOT)

import flowforge  # noqa: E402

SOAK = bool(os.environ.get("FLOWFORGE_SOAK"))


def launcher_argv(pycache):
    """The `flowforge` command as install.sh writes it, for this checkout: the
    timer commands start fast (flowforge.py, section 16), the others import the
    module -- its bytecode in `pycache`, not in the checkout."""
    launcher = os.path.join(pycache, "flowforge")
    if not os.path.exists(launcher):
        flowforge.write_launcher(launcher, os.path.join(pycache, "flowforge.fast-start"))
    # sys.path[0] as when the script runs itself: its own directory, not the
    # current one that -c would put there
    return [sys.executable, "-S", "-X", "pycache_prefix=" + pycache, "-c",
            "import sys; sys.dont_write_bytecode = False; sys.path[0] = %r; "
            "exec(compile(open(%r).read(), %r, 'exec'))" % (pycache, launcher, launcher)]


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GIT_", "FLOWFORGE_")) and k not in ("NO_COLOR", "FORCE_COLOR")}
    env.update(GIT_AUTHOR_NAME="Test", GIT_COMMITTER_NAME="Test",
               GIT_AUTHOR_EMAIL="test@example.com", GIT_COMMITTER_EMAIL="test@example.com",
               GIT_CONFIG_NOSYSTEM="1", TZ="UTC", LC_ALL="C")
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


class Result:
    def __init__(self, rc, out, err):
        self.rc, self.out, self.err = rc, out, err

    @property
    def json(self):
        return json.loads(self.out)

    def __repr__(self):
        return "Result(rc=%r, out=%r, err=%r)" % (self.rc, self.out[-500:], self.err[-500:])


def git(cwd, *args, check=True, env=None):
    proc = subprocess.run(["git"] + list(args), cwd=cwd, capture_output=True, text=True,
                          env=env or clean_env(HOME=os.path.dirname(cwd)))
    if check and proc.returncode:
        raise AssertionError("git %s failed: %s" % (" ".join(args), proc.stderr))
    return proc.stdout


def make_git_repo(path, email="dev@example.com"):
    os.makedirs(path, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    git(path, "config", "user.email", email)
    git(path, "config", "user.name", email.split("@")[0])
    git(path, "config", "commit.gpgsign", "false")
    return path


class Runner:
    def __init__(self, root, pycache, home):
        self.root = root
        self.pycache = pycache
        self.home = home

    def env(self, **extra):
        base = {"HOME": self.home, "XDG_DATA_HOME": os.path.join(self.home, "xdg-data")}
        base.update(extra)
        return clean_env(**base)

    def __call__(self, *args, user="alice", env=None, cwd=None, input=None, timeout=60):
        argv = launcher_argv(self.pycache) + [str(a) for a in args]
        e = self.env(FLOWFORGE_USER=user, **(env or {}))
        proc = subprocess.run(argv, cwd=cwd or self.root, env=e, capture_output=True, text=True,
                              input=input, timeout=timeout)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def ok(self, *args, **kwargs):
        r = self(*args, **kwargs)
        assert r.rc == 0, r
        return r

    def popen(self, *args, user="alice", env=None, **kwargs):
        argv = launcher_argv(self.pycache) + [str(a) for a in args]
        return subprocess.Popen(argv, cwd=self.root, env=self.env(FLOWFORGE_USER=user, **(env or {})),
                                **kwargs)


def set_hook_budget(root, ms):
    """The hook's time budget in the repository's config (`hook.budget_ms`)."""
    config_path = os.path.join(root, ".flowforge", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["hook"]["budget_ms"] = ms
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def roomy_hook_budget(root):
    """Tests ask what the hooks do, not how fast (make bench does, and test_hook the
    budget's end): a budget that a loaded CI machine cannot overrun, so that a slow
    fsync never turns a commit's aggregation into a queued job."""
    set_hook_budget(root, 20000)


@pytest.fixture(scope="session")
def pycache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pycache"))


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home"
    path.mkdir()
    return str(path)


@pytest.fixture
def repo(tmp_path, pycache, home):
    """An initialised FlowForge repository; returns its Runner (runner.root is the path)."""
    root = make_git_repo(str(tmp_path / "repo"))
    runner = Runner(root, pycache, home)
    runner.ok("init", "--timezone", "UTC")
    roomy_hook_budget(root)
    return runner


@pytest.fixture
def bare_repo(tmp_path, pycache, home):
    """A git repository without FlowForge."""
    return Runner(make_git_repo(str(tmp_path / "plain")), pycache, home)


def call(root, *args, user="alice", env=None):
    """flowforge.main() in this process; returns Result."""
    old_env = dict(os.environ)
    outside = os.path.dirname(os.path.abspath(root))
    os.environ.update(clean_env(FLOWFORGE_USER=user, HOME=os.path.join(outside, "home"),
                                XDG_DATA_HOME=os.path.join(outside, "xdg-data"), **(env or {})))
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = flowforge.main(["-C", root] + [str(a) for a in args])
    finally:
        os.environ.clear()
        os.environ.update(old_env)
    return Result(rc, out.getvalue(), err.getvalue())


def tree_snapshot(root):
    """{relative path: (bytes, mode)} of every file under root except .git."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                snap[os.path.relpath(path, root)] = ("link", os.readlink(path))
                continue
            with open(path, "rb") as f:
                snap[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mode)
        for name in dirnames:
            path = os.path.join(dirpath, name)
            snap[os.path.relpath(path, root) + "/"] = ("dir", os.stat(path).st_mode)
    return snap


def team_total(runner, user="alice"):
    """Total seconds of the committed shards, via `report --json`."""
    return runner.ok("report", "--json", "--by", "user", user=user).json["total_seconds"]


def private_total(root):
    """Total seconds in every private store, read through FlowForge's own parser."""
    repo = flowforge.Repo(root)
    total = 0
    for user in flowforge.local_users(repo):
        store = flowforge.PrivateStore(repo, user)
        for day in store.days():
            total += sum(flowforge.entry_seconds(e) for e in store.entries_of_day(day).values())
    return total


def all_files_parse(root):
    """Every FlowForge file parses; orphaned temp files are the only leftovers."""
    ffdir = os.path.join(root, ".flowforge")
    for path in glob.glob(ffdir + "/**/*", recursive=True):
        name = os.path.basename(path)
        if os.path.isdir(path) or ".tmp-" in name or name.endswith(".lock"):
            continue
        data = open(path, "rb").read()
        if path.endswith(".jsonl") and "/daily/" in path:
            assert data == b"" or data.endswith(b"\n"), path
            for line in data.splitlines():
                flowforge.decode_record(line)
        elif path.endswith(".jsonl"):
            for line in data.splitlines():
                json.loads(line)
        elif path.endswith(".json"):
            if "/summaries/" in path:
                flowforge.verify_shard_bytes(data)
            else:
                assert data.strip(), path
                json.loads(data)


@contextlib.contextmanager
def lock_held(path):
    """Another process holds the flock on `path` for the duration of the block."""
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl,os,time; fd=os.open(%r, os.O_RDWR"
                               "|os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True);"
                               " time.sleep(120)" % path], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


# Runs FlowForge and SIGKILLs itself right after the CRASH_AT-th write, fsync,
# replace, unlink or ftruncate: every window between two durable steps.
CRASHER = r"""
import os, signal, sys
sys.dont_write_bytecode = False
sys.path.insert(0, %r)
import flowforge
target = int(os.environ["CRASH_AT"])
calls = [0]
def after(func):
    def wrapper(*a, **k):
        result = func(*a, **k)
        calls[0] += 1
        if calls[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return wrapper
for name in ("write", "fsync", "replace", "unlink", "ftruncate"):
    setattr(os, name, after(getattr(os, name)))
raise SystemExit(flowforge.main())
""" % ROOT


def run_crashing(runner, k, *args, user="alice", now="2026-11-20T18:00:00Z"):
    """Run FlowForge in a child that SIGKILLs itself after its k-th durable step."""
    env = runner.env(FLOWFORGE_USER=user, FLOWFORGE_NOW=now, CRASH_AT=str(k))
    proc = subprocess.run([sys.executable, "-S", "-c", CRASHER] + list(args), cwd=runner.root,
                          env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode


# -- the ledger: store refs in git ---------------------------------------------

def store_keys(root):
    """{user--store: tip} of this clone's own store refs."""
    out = git(root, "for-each-ref", "--format=%(refname) %(objectname)", "refs/flowforge/stores/")
    return {line.split()[0].rsplit("/", 1)[1]: line.split()[1] for line in out.splitlines()}


def store_key_of(root, user="alice"):
    keys = [k for k in store_keys(root) if k.rpartition("--")[0] == user]
    assert len(keys) == 1, keys
    return keys[0]


def ledger_files(root, user="alice", rev=None):
    """{name: bytes} of every file at the tip (or `rev`) of the user's store ref."""
    rev = rev or "refs/flowforge/stores/" + store_key_of(root, user)
    names = git(root, "ls-tree", "-r", "--name-only", rev).split()
    out = {}
    for name in names:
        proc = subprocess.run(["git", "cat-file", "blob", "%s:%s" % (rev, name)], cwd=root,
                              capture_output=True, env=clean_env(HOME=os.path.dirname(root)))
        out[name] = proc.stdout
    return out


def ledger_shard(root, month, user="alice"):
    """The bytes of one shard in the user's store ref (None if absent)."""
    return ledger_files(root, user).get("summaries/%s.json" % month)


def ledger_chain(root, user="alice"):
    """The user's team audit chain (all years) as bytes."""
    files = ledger_files(root, user)
    return b"".join(files[n] for n in sorted(files) if n.startswith("audit/"))


def rewrite_ledger(root, changes, user="alice", message="tampered"):
    """Commit `changes` ({name: bytes, or None to delete}) on top of the user's
    store ref, the way a hostile or buggy teammate's FlowForge could: the
    result is a normal fast-forward that every clone will fetch."""
    ref = "refs/flowforge/stores/" + store_key_of(root, user)
    env = clean_env(HOME=os.path.dirname(root), GIT_INDEX_FILE=os.path.join(root, ".git",
                                                                           "tamper-index"))
    subprocess.run(["git", "read-tree", ref], cwd=root, env=env, check=True)
    for name, data in changes.items():
        if data is None:
            subprocess.run(["git", "rm", "-q", "--cached", name], cwd=root, env=env, check=True)
            continue
        blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=root, env=env,
                              input=data, capture_output=True, check=True).stdout.decode().strip()
        subprocess.run(["git", "update-index", "--add", "--cacheinfo", "100644,%s,%s" % (blob, name)],
                       cwd=root, env=env, check=True)
    tree = subprocess.run(["git", "write-tree"], cwd=root, env=env, capture_output=True,
                          check=True).stdout.decode().strip()
    commit = subprocess.run(["git", "commit-tree", tree, "-p", ref, "-m", message], cwd=root,
                            env=env, capture_output=True, check=True).stdout.decode().strip()
    subprocess.run(["git", "update-ref", ref, commit], cwd=root, env=env, check=True)
    os.unlink(os.path.join(root, ".git", "tamper-index"))
    return commit


def pytest_collection_modifyitems(config, items):
    """FLOWFORGE_TEST_SHARD=i/n (tools/run_tests.py, `make test`): run every n-th
    test from the i-th, so that n pytest processes share the suite; the heavy tests
    (kill loops, imports, soaks) are spread over the list, and so over the shards.
    Counted in the order of the tests' ids, whatever order the items come in, so
    that the shards never overlap or leave a test out."""
    shard = os.environ.get("FLOWFORGE_TEST_SHARD")
    if not shard:
        return
    index, count = map(int, shard.split("/"))
    if not 0 <= index < count:
        raise pytest.UsageError("FLOWFORGE_TEST_SHARD=%s: the shard must be 0 to %d" % (shard, count - 1))
    mine = {item.nodeid for n, item in enumerate(sorted(items, key=lambda i: i.nodeid))
            if n % count == index}
    config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in mine])
    items[:] = [item for item in items if item.nodeid in mine]
