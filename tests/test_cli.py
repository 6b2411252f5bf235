"""The command line as a whole: help, docs, exit codes, output modes, stdlib only."""
import ast
import os
import subprocess
import sys

import pytest

import flowforge as ff

from conftest import FLOWFORGE, ROOT, clean_env

NAMES = [spec.name for spec in ff.COMMANDS]


def test_every_command_has_help_and_an_example():
    assert len(NAMES) == len(set(NAMES))
    for spec in ff.COMMANDS:
        assert spec.summary.endswith(".") and len(spec.summary) < 90, spec.name
        assert spec.example.startswith("flowforge %s" % spec.name), spec.name
        for flags, kwargs in spec.arguments:
            assert kwargs.get("help"), (spec.name, flags)


@pytest.mark.parametrize("name", NAMES)
def test_help_runs_and_shows_the_example(repo, name):
    r = repo(name, "--help")
    assert r.rc == 0 and "example:" in r.out and "usage: flowforge %s" % name in r.out


def test_readme_reference_is_current_and_lists_every_command():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "readme_reference.py"),
                           "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name in NAMES:
        assert "#### `flowforge %s`" % name in readme
    assert readme.index("make demo") < readme.index("## Quick start")
    assert readme.index("make test") < readme.index("## Quick start")


def test_usage_errors_exit_64_not_argparse_2(repo):
    for args in (["--frobnicate"], ["start"], ["report", "--by"], ["log", "1", "1h", "extra"]):
        r = repo(*args)
        assert r.rc == 64 and r.err.startswith("flowforge: ") and r.err.count("\n") == 1, r


def test_runs_as_a_script_too(repo):
    env = clean_env(FLOWFORGE_USER="alice", HOME=repo.home)
    for args in (["--help"], ["version"], ["status"]):
        proc = subprocess.run([sys.executable, FLOWFORGE] + args, cwd=repo.root, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_global_options_before_or_after_the_command(repo):
    a = repo("--json", "version")
    b = repo("version", "--json")
    assert a.rc == b.rc == 0 and a.json == b.json and a.json["schema"] == "flowforge.version/1"
    other = os.path.dirname(repo.root)
    assert repo("-C", repo.root, "status", cwd=other).rc == 0
    assert repo("status", "-C", repo.root, cwd=other).rc == 0


def test_json_mode_prints_only_data_on_stdout(repo):
    for args in (["start", "1"], ["status"], ["stop"], ["log", "1", "1h"], ["entries"],
                 ["aggregate"], ["quarantine", "list"], ["report"], ["bill"]):
        r = repo("--json", *args)
        assert r.rc == 0, r
        doc = r.json
        assert doc["schema"].startswith("flowforge.") and doc["schema"].endswith("/1")


def test_color(repo):
    repo.ok("log", "1", "1h")
    repo.ok("aggregate")
    assert "\033[" in repo.ok("report", "--color", "always").out
    assert "\033[" not in repo.ok("report", "--color", "never").out
    assert "\033[" not in repo.ok("report").out            # not a terminal
    assert "\033[" not in repo.ok("report", env={"NO_COLOR": "1"}).out


def _imports(path):
    tree = ast.parse(open(path).read(), path, feature_version=(3, 9))   # 3.9 syntax
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.skipif(sys.version_info < (3, 10), reason="needs sys.stdlib_module_names")
def test_flowforge_and_plugins_import_only_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"flowforge", "__future__"}
    files = [FLOWFORGE] + [os.path.join(ROOT, "plugins", n) for n in os.listdir(
        os.path.join(ROOT, "plugins")) if n.endswith(".py")]
    for path in files:
        bad = sorted(set(_imports(path)) - allowed)
        assert not bad, (path, bad)


def test_hot_path_does_not_import_heavy_modules(repo):
    """The timers must not pay for subprocess, hashlib (OpenSSL) or sqlite3."""
    code = ("import sys; sys.argv = ['flowforge', 'status']; sys.path.insert(0, %r); "
            "import flowforge; rc = flowforge.main(); "
            "print('heavy:', *[m for m in ('subprocess', 'hashlib', 'sqlite3', 'decimal', 'csv')"
            " if m in sys.modules])" % ROOT)
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=repo.root, capture_output=True,
                          text=True, env=clean_env(FLOWFORGE_USER="alice", HOME=repo.home))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "heavy:", proc.stdout
