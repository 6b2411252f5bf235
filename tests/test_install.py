"""install.sh: a command on a PATH, or FlowForge vendored into a repository; twice."""
import os
import subprocess

from conftest import ROOT, clean_env, make_git_repo

INSTALL = os.path.join(ROOT, "install.sh")


def sh(*args, env=None, cwd=None):
    return subprocess.run(list(args), capture_output=True, text=True, env=env or clean_env(),
                          cwd=cwd)


def test_install_prefix_twice(tmp_path):
    prefix = str(tmp_path / "prefix")
    for _ in range(2):
        r = sh(INSTALL, "--prefix", prefix)
        assert r.returncode == 0, r.stderr
    launcher = os.path.join(prefix, "bin", "flowforge")
    assert os.access(launcher, os.X_OK)
    assert open(launcher).readline().rstrip().endswith(" -S")
    assert open(os.path.join(prefix, "lib/flowforge/flowforge.py"), "rb").read() == \
        open(os.path.join(ROOT, "flowforge.py"), "rb").read()
    r = sh(launcher, "version")
    assert r.returncode == 0 and "flowforge" in r.stdout
    pycache = os.path.join(prefix, "lib/flowforge/__pycache__")
    assert any(n.startswith("flowforge.") for n in os.listdir(pycache))   # compiled at install


def test_install_repo_twice(tmp_path):
    repo = make_git_repo(str(tmp_path / "team"))
    env = clean_env(HOME=str(tmp_path), FLOWFORGE_USER="alice")
    for _ in range(2):
        r = sh(INSTALL, "--repo", repo, env=env)
        assert r.returncode == 0, r.stderr
    assert open(os.path.join(repo, "flowforge.py"), "rb").read() == \
        open(os.path.join(ROOT, "flowforge.py"), "rb").read()
    assert os.path.isfile(os.path.join(repo, ".flowforge/config.json"))
    assert os.path.isdir(os.path.join(repo, ".flowforge/user/alice"))
    r = sh("python3", "flowforge.py", "status", env=env, cwd=repo)
    assert r.returncode == 0, r.stderr
    init = sh("python3", "flowforge.py", "init", env=env, cwd=repo)    # says what to commit
    assert "next: `git add flowforge.py .flowforge && git commit`" in init.stdout, init
    outside = sh("python3", os.path.join(ROOT, "flowforge.py"), "init", env=env, cwd=repo)
    assert "next: `git add .flowforge && git commit`" in outside.stdout, outside


def test_install_refuses_bad_arguments(tmp_path):
    assert sh(INSTALL).returncode == 64
    assert sh(INSTALL, "--sideways", "x").returncode == 64
    r = sh(INSTALL, "--repo", str(tmp_path))
    assert r.returncode == 1 and "not inside a git work tree" in r.stderr
