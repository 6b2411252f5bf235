#!/usr/bin/env python3
"""make demo: FlowForge's main job, end to end, on a throwaway repository.

Three developers each work in their own clone of one team repository for a
week (timers with --at times, so the demo is instant) and commit their work;
the pre-commit hook aggregates their time into shards that ride along with
each commit, and the commits merge without conflicts.  A manager then clones the repository,
with no private data at all, and prints the team report and the bill."""
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {}   # the demo's own environment (HOME and XDG_DATA_HOME inside its directory)
DEVELOPERS = [
    ("alice", "alice@example.com", [("101", "web"), ("102", "web"), ("acme/api#7", "api")]),
    ("bob", "bob@example.com", [("102", "web"), ("OPS-4", "ops"), ("acme/api#7", "api")]),
    ("carol", "carol@example.com", [("acme/api#7", "api"), ("acme/api#9", "api"), ("101", "web")]),
]


def run(argv, cwd, env=None, quiet=True):
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit("demo: `%s` failed in %s:\n%s%s" % (" ".join(argv), cwd, proc.stdout, proc.stderr))
    if not quiet:
        sys.stdout.write(proc.stdout)
    return proc.stdout


def git(cwd, *args):
    return run(["git"] + list(args), cwd, ENV)


def main():
    started = time.monotonic()
    base = tempfile.mkdtemp(prefix="flowforge-demo-")
    env = ENV
    env.update(os.environ, HOME=base, XDG_DATA_HOME=os.path.join(base, "xdg"),
               GIT_CONFIG_NOSYSTEM="1", TZ="UTC")
    for key in ("FLOWFORGE_USER", "FLOWFORGE_NOW", "GIT_DIR", "GIT_INDEX_FILE"):
        env.pop(key, None)
    print("FlowForge demo in %s" % base)

    # 1. FlowForge installed as a command, and vendored into a new team repository
    prefix = os.path.join(base, "prefix")
    run([os.path.join(HERE, "install.sh"), "--prefix", prefix], HERE, env)
    flowforge = os.path.join(prefix, "bin", "flowforge")
    origin = os.path.join(base, "origin.git")
    run(["git", "init", "-q", "--bare", "-b", "main", origin], base, env)
    lead = os.path.join(base, "lead")
    run(["git", "clone", "-q", origin, lead], base, env)
    git(lead, "config", "user.email", "lead@example.com")
    git(lead, "config", "user.name", "Lead")
    run([os.path.join(HERE, "install.sh"), "--repo", lead], HERE, env)
    config_path = os.path.join(lead, ".flowforge", "config.json")
    config = json.load(open(config_path))
    config["billing"].update(currency="EUR", default_rate="95.00", user_rates={"carol": "110.00"},
                             project_rates={"ops": "80.00"}, round_minutes=15, round_mode="up")
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    git(lead, "add", "-A")
    git(lead, "commit", "-qm", "Set up FlowForge")
    git(lead, "push", "-q", "origin", "main")
    print("  team repository with FlowForge vendored: %s" % origin)

    # 2. Three developers, each on their own clone, play last week
    today = datetime.date.today()
    monday = today - datetime.timedelta(days=today.weekday() + 7)
    clones = {}
    for name, email, _ in DEVELOPERS:
        path = os.path.join(base, name)
        run(["git", "clone", "-q", origin, path], base, env)
        git(path, "config", "user.email", email)
        git(path, "config", "user.name", name.capitalize())
        run([flowforge, "init", "--timezone", "UTC"], path, env)
        run([flowforge, "install", "hooks"], path, env)   # aggregation rides along with commits
        clones[name] = path
    expected = {name: 0 for name, _, _ in DEVELOPERS}

    def minutes(hhmm):
        return int(hhmm[:2]) * 60 + int(hhmm[3:])
    for offset in range(5):
        day = monday + datetime.timedelta(days=offset)
        for n, (name, _, issues) in enumerate(DEVELOPERS):
            path = clones[name]
            first, second = issues[offset % 3], issues[(offset + 1) % 3]

            def ff(*args, path=path):
                return run([flowforge] + list(args), path, env)
            at = "%s %%s" % day.isoformat()
            start, pause, resume = "08:%02d" % (40 + 7 * n), "12:00", "12:4%d" % (5 + n)
            switch, stop = "14:%02d" % (10 + 11 * n), "17:%02d" % (5 + 13 * n)
            ff("start", first[0], "--project", first[1], "--note", "private notes stay here",
               "--at", at % start)
            ff("pause", "--at", at % pause)
            ff("resume", "--at", at % resume)
            ff("switch", second[0], "--project", second[1], "--at", at % switch)
            ff("stop", "--at", at % stop)
            expected[name] += 60 * (minutes(pause) - minutes(start) + minutes(stop) - minutes(resume))
            if offset == 2:
                ff("log", "OPS-4", "45m", "--project", "ops", "--date", day.isoformat(),
                   "--note", "on-call review")
                expected[name] += 45 * 60
            with open(os.path.join(path, "%s.txt" % name), "a") as f:   # the day's code
                f.write("%s\n" % day.isoformat())
            git(path, "add", "%s.txt" % name)
            git(path, "commit", "-qm", "%s: %s" % (name, day.isoformat()))   # the hook stages shards
            push = subprocess.run(["git", "push", "-q", "origin", "main"], cwd=path, env=env,
                                  capture_output=True)
            if push.returncode:   # someone pushed first: merge (shards never conflict)
                git(path, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main")
                git(path, "push", "-q", "origin", "main")
        print("  %s: 3 developers tracked time and committed (the hook aggregated); merged"
              % day.strftime("%a %d %b"))

    # 3. The manager: a fresh clone, no private data, report and bill in well under a second
    manager = os.path.join(base, "manager")
    run(["git", "clone", "-q", origin, manager], base, env)
    merges = len(git(manager, "log", "--merges", "--oneline").splitlines())
    print("  %d merge commits, 0 conflicts; the manager's clone has no private data: %s"
          % (merges, not os.path.exists(os.path.join(manager, ".flowforge", "user"))))
    print()
    t = time.monotonic()
    run([flowforge, "report", "--by", "user,project", "--from", monday.isoformat(), "--to",
         (monday + datetime.timedelta(days=6)).isoformat()], manager, env, quiet=False)
    print()
    run([flowforge, "report", "--by", "issue", "--from", monday.isoformat()], manager, env,
        quiet=False)
    print()
    run([flowforge, "bill", "--from", monday.isoformat(), "--to",
         (monday + datetime.timedelta(days=6)).isoformat()], manager, env, quiet=False)
    print()
    elapsed = time.monotonic() - t
    report = json.loads(run([flowforge, "report", "--json", "--by", "user"], manager, env))
    got = {row["user"]: row["seconds"] for row in report["rows"]}
    print("every tracked second reached the team report: %s (%s)" % (
        "yes" if got == expected else "NO", ", ".join("%s %s" % (u, got.get(u)) for u in sorted(got))))
    print("report and bill took %.2f s; the whole demo %.1f s" % (elapsed,
                                                                  time.monotonic() - started))
    if got != expected:
        sys.exit("demo: expected %s" % expected)
    print("look around: cd %s/alice && %s status" % (base, flowforge))
    if os.environ.get("FLOWFORGE_DEMO_CLEANUP"):
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
