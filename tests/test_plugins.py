"""The plugin contract: discovery, API versions, keyword hooks, isolation, one module."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import flowforge as ff

from conftest import FLOWFORGE, ROOT, git
from fakes import FakeGitHub

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def write_plugin(directory, name, body, api=1, plugin_name=None):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + ".py")
    with open(path, "w") as f:
        f.write("import flowforge\nPLUGIN_API = %d\nNAME = %r\n%s\n" % (api, plugin_name or name,
                                                                       body))
    return path


def enable(repo, **sections):
    path = os.path.join(repo.root, ".flowforge/config.json")
    config = json.load(open(path))
    config["plugins"] = sections
    json.dump(config, open(path, "w"), indent=2)


def plugins(repo, **kw):
    return {p["name"]: p for p in repo("plugins", "list", "--json", **kw).json["plugins"]}


def test_discovery_in_three_places(repo, tmp_path):
    write_plugin(os.path.join(repo.root, ".flowforge/plugins"), "team", "")
    extra_dir = str(tmp_path / "extra")
    write_plugin(extra_dir, "indir", "")
    single = write_plugin(str(tmp_path / "single"), "afile", "")
    write_plugin(os.path.join(repo.root, ".flowforge/plugins"), "_skipped", "")
    found = plugins(repo, env={"FLOWFORGE_PLUGIN_PATH": os.pathsep.join([extra_dir, single])})
    assert {"github", "notion", "team", "indir", "afile"} <= set(found)
    assert "_skipped" not in found
    assert found["github"]["path"] == os.path.join(ROOT, "plugins", "github.py")
    assert found["team"]["status"] == "disabled"
    enable(repo, team={})
    assert plugins(repo)["team"]["status"] == "enabled"
    enable(repo, team={"enabled": False})
    assert plugins(repo)["team"]["status"] == "disabled"


def test_broken_newer_and_foreign_plugins_are_reported_and_skipped(repo):
    directory = os.path.join(repo.root, ".flowforge/plugins")
    write_plugin(directory, "broken", "def on_stop(:\n")
    write_plugin(directory, "future", "", api=2)
    with open(os.path.join(directory, "foreign.py"), "w") as f:
        f.write("x = 1\n")
    write_plugin(directory, "greedy", "def on_stop(entry, banana):\n    pass\n")
    write_plugin(directory, "odd", "health = 'fine'\n")
    enable(repo, broken={}, future={}, foreign={}, greedy={}, odd={})
    found = plugins(repo)
    assert found["broken"]["problem"].startswith("does not import: SyntaxError")
    assert "needs plugin API 2; this FlowForge" in found["future"]["problem"]
    assert found["foreign"]["problem"] == "is not a FlowForge plugin (no PLUGIN_API)"
    assert "wants banana" in found["greedy"]["problem"]
    assert found["odd"]["problem"] == "hook health is not a function"
    assert repo("plugins", "check").rc == 1
    r = repo.ok("log", "1", "1h", env=NOW)                 # everything else goes on
    repo.ok("aggregate", env=NOW)
    assert "logged" in r.out


def test_hook_exceptions_are_logged_with_the_plugin_name(repo):
    write_plugin(os.path.join(repo.root, ".flowforge/plugins"), "flaky",
                 "def on_stop(entry):\n    raise ValueError('boom in ' + entry['issue'])\n")
    enable(repo, flaky={})
    repo.ok("start", "9", "--at", "09:00", env=NOW)
    r = repo.ok("stop", "--at", "10:00", env=NOW)
    assert "stopped 9" in r.out
    log = open(os.path.join(repo.root, ".flowforge/state/logs/flowforge.jsonl")).read()
    [line] = [json.loads(x) for x in log.splitlines() if "plugin-error" in x]
    assert line["plugin"] == "flaky" and line["hook"] == "on_stop" and "boom in 9" in line["error"]


def test_keyboard_interrupt_and_system_exit_are_not_swallowed(tmp_path):
    path = write_plugin(str(tmp_path), "quitter", "def on_stop(entry):\n    raise SystemExit(7)\n")
    plugin = ff.Plugin(path).load()
    repo = ff.Repo(str(tmp_path))
    repo._config = {"plugins": {"quitter": {}}}
    ff._LOADED[os.path.realpath(path)] = plugin
    os.environ["FLOWFORGE_PLUGIN_PATH"] = path
    try:
        with pytest.raises(SystemExit):
            ff.call_plugins(repo, "on_stop", entry={"issue": "1"})
    finally:
        del os.environ["FLOWFORGE_PLUGIN_PATH"]


def test_hooks_get_only_the_keywords_they_name(tmp_path):
    path = write_plugin(str(tmp_path), "modest", "seen = []\n"
                        "def on_stop(entry):\n    seen.append(sorted(locals()))\n"
                        "def on_start(**everything):\n    seen.append(sorted(everything))\n")
    plugin = ff.Plugin(path).load()
    assert plugin.error is None
    plugin.call("on_stop", repo=None, user="u", entry={}, config={})
    plugin.call("on_start", repo=None, user="u", timer={}, config={})
    assert plugin.module.seen == [["entry"], ["config", "repo", "timer", "user"]]
    assert ff.RetryLater("x", after=5).after == 5 and issubclass(ff.PermanentFailure, Exception)


def test_import_flowforge_gets_the_running_module_even_as_a_script(repo, tmp_path):
    out = tmp_path / "identity.txt"
    write_plugin(os.path.join(repo.root, ".flowforge/plugins"), "ident",
                 "import sys\n"
                 "def on_stop(entry, config):\n"
                 "    main = sys.modules['__main__']\n"
                 "    with open(config['out'], 'w') as f:\n"
                 "        f.write('%s %s' % (flowforge is main, flowforge.RetryLater is main.RetryLater))\n")
    enable(repo, ident={"out": str(out)})
    env = repo.env(FLOWFORGE_USER="alice", **NOW)
    for command in (["start", "1", "--at", "09:00"], ["stop", "--at", "10:00"]):
        subprocess.run([sys.executable, FLOWFORGE] + command, cwd=repo.root, env=env, check=True,
                       capture_output=True)
    assert out.read_text() == "True True"


def test_provider_work_never_runs_in_the_commit_hook(repo):
    github = FakeGitHub()
    try:
        shutil.copy(FLOWFORGE, os.path.join(repo.root, "flowforge.py"))   # as install.sh --repo
        shutil.copy(os.path.join(ROOT, "plugins", "github.py"),
                    os.path.join(repo.root, ".flowforge", "plugins", "github.py"))
        repo.ok("install", "hooks")
        enable(repo, github={"repository": "acme/app"})
        repo.ok("log", "7", "1h", env=NOW)
        git(repo.root, "add", "-A")
        env = repo.env(FLOWFORGE_USER="alice", GITHUB_TOKEN=github.token,
                       GITHUB_API_URL=github.url, **NOW)
        proc = subprocess.run(["git", "commit", "-qm", "work"], cwd=repo.root, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stderr == ""
        assert github.requests == []                       # queued, not sent
        jobs = ff.RetryQueue(os.path.join(repo.root, ".flowforge/state/queue.db")).jobs()
        assert [(j["kind"], j["payload"]) for j in jobs] == [("sync", {"plugin": "github",
                                                                       "issue": "7"})]
    finally:
        github.close()


def test_the_readme_example_plugin_works_as_written(repo, tmp_path):
    readme = open(os.path.join(ROOT, "plugins", "README.md")).read()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    directory = tmp_path / "mine"
    directory.mkdir()
    (directory / "tally.py").write_text(code)
    target = tmp_path / "tally.csv"
    enable(repo, tally={"path": str(target)})
    env = {"FLOWFORGE_PLUGIN_PATH": str(directory), **NOW}
    assert plugins(repo, env=env)["tally"]["status"] == "enabled"
    assert repo("plugins", "check", env=env).rc == 0
    repo.ok("log", "ABC-1", "1h30m", env=env)
    repo.ok("log", "ABC-2", "15m", env=env)
    repo.ok("aggregate", env=env)
    assert target.read_text() == "issue,seconds\nABC-1,5400\nABC-2,900\n"


def test_enabled_but_missing_and_health_problems(repo):
    enable(repo, github={"repository": "acme/app"}, nosuch={})
    r = repo("plugins", "check", "--json")
    rows = {p["name"]: p for p in r.json["plugins"]}
    assert r.rc == 1
    assert rows["nosuch"]["problem"] == "enabled in config.json but not found"
    assert "no GITHUB_TOKEN" in rows["github"]["problem"]
    assert repo("plugins", "check", env={"GITHUB_TOKEN": "x"}).rc == 1          # nosuch still


def test_http_sends_credentials_only_to_its_own_host():
    from fakes import FakeServer
    ours, other = FakeServer(), FakeServer()
    try:
        http = ff.Http(ours.url, {"Authorization": "token secret"})
        ours.script = [("GET", "^/old$", 307, {"Location": "/new"}, None),
                       ("GET", "^/new$", 200, {}, {"ok": 1}),
                       ("GET", "^/moved$", 302, {"Location": other.url + "/x"}, None)]
        assert http.request("GET", "/old").json() == {"ok": 1}       # same host: followed
        with pytest.raises(ff.PermanentFailure, match="another host"):
            http.request("GET", "/moved")
        with pytest.raises(ff.PermanentFailure, match="another host"):
            http.request("GET", other.url + "/issues?page=2")          # a foreign next link
        assert other.requests == []
        assert [r[2]["authorization"] for r in ours.requests] == ["token secret"] * 3
    finally:
        ours.close()
        other.close()
