#!/usr/bin/env python3
"""make demo: FlowForge's main job, end to end, on a throwaway repository.

Three developers each work in their own clone of one team repository for a
week, on feature branches (timers with --at times, so the demo is instant).
Every commit goes through the real pre-commit hook, which aggregates their
time into their store's ledger ref (refs/flowforge/stores/<user>--<store>,
never a branch); every `git push` of a branch goes through the real pre-push
hook, which pushes that ledger ref along.  A "server-side" clone then lands
the branches the way a hosting service does: one with `git merge --no-ff`,
one squash-merged, one rebased and fast-forwarded; a fourth branch is pushed
and never merged.  None of that touches team time, which is on no branch.

A manager finally clones the repository, with no private data at all, runs
`flowforge fetch` and prints the team report and the bill; the developers
pull main (a plain `git pull`: `install hooks` made it bring the ledger too).
The demo computes what every user spent on every issue from the --at times
it used, and fails unless the report says exactly that, unless every
developer's `git status` is clean, and unless no branch holds .flowforge/team."""
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
DEVELOPERS = [("alice", "alice@example.com"), ("bob", "bob@example.com"),
              ("carol", "carol@example.com")]
# Who works on which branch on which days (0 = Monday), on which issues, and
# how the server lands it on main.  Each branch writes files of its own, so
# no merge, squash or rebase can conflict.
BRANCHES = [
    ("alice", "feature/login", (0, 1, 2), [("101", "web"), ("102", "web")], "merge --no-ff"),
    ("alice", "spike/sso", (3, 4), [("acme/api#7", "api"), ("101", "web")], None),
    ("bob", "feature/ops-alerts", (0, 1, 2, 3, 4),
     [("OPS-4", "ops"), ("102", "web"), ("acme/api#7", "api")], "squash"),
    ("carol", "feature/api-paging", (0, 1, 2, 3, 4),
     [("acme/api#7", "api"), ("acme/api#9", "api"), ("101", "web")], "rebase"),
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


def git_hooked(cwd, *args):
    """A commit or push through FlowForge's hooks; returns what they said.  A hook
    never fails a commit or push (it queues the work and says so on stderr),
    so the demo fails on any line but "ledger pushed" itself."""
    proc = subprocess.run(["git"] + list(args), cwd=cwd, env=ENV, capture_output=True, text=True)
    said = [line for line in proc.stderr.splitlines() if line.startswith("flowforge:")]
    if proc.returncode or any(not line.startswith("flowforge: ledger pushed") for line in said):
        sys.exit("demo: `git %s` failed in %s:\n%s%s" % (" ".join(args), cwd, proc.stdout,
                                                       proc.stderr))
    return said


def clone(origin, path, name, email):
    run(["git", "clone", "-q", origin, path], os.path.dirname(path), ENV)
    git(path, "config", "user.email", email)
    git(path, "config", "user.name", name)
    return path


def minutes(hhmm):
    return int(hhmm[:2]) * 60 + int(hhmm[3:])


def main():
    started = time.monotonic()
    base = tempfile.mkdtemp(prefix="flowforge-demo-")
    env = ENV
    env.update(os.environ, HOME=base, XDG_DATA_HOME=os.path.join(base, "xdg"),
               GIT_CONFIG_NOSYSTEM="1", TZ="UTC", GIT_EDITOR="true")   # unattended: no editor
    for key in ("FLOWFORGE_USER", "FLOWFORGE_NOW", "GIT_DIR", "GIT_INDEX_FILE"):
        env.pop(key, None)
    print("FlowForge demo in %s" % base)

    # 1. FlowForge installed as a command, and vendored into a new team repository
    prefix = os.path.join(base, "prefix")
    run([os.path.join(HERE, "install.sh"), "--prefix", prefix], HERE, env)
    flowforge = os.path.join(prefix, "bin", "flowforge")
    origin = os.path.join(base, "origin.git")
    run(["git", "init", "-q", "--bare", "-b", "main", origin], base, env)
    lead = clone(origin, os.path.join(base, "lead"), "Lead", "lead@example.com")
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

    # 2. Three developers, each on their own clone and feature branches, play last week
    today = datetime.date.today()
    monday = today - datetime.timedelta(days=today.weekday() + 7)
    clones = {}
    for name, email in DEVELOPERS:
        path = clone(origin, os.path.join(base, name), name.capitalize(), email)
        run([flowforge, "init", "--timezone", "UTC"], path, env)
        # The hooks: pre-commit aggregates into the store's ledger ref,
        # pre-push pushes that ref along with any branch; and a fetch refspec.
        run([flowforge, "install", "hooks"], path, env)
        clones[name] = path
    expected = {}   # (user, issue) -> seconds, from the --at times below and nothing else

    def track(name, issue, seconds):
        expected[(name, issue)] = expected.get((name, issue), 0) + seconds

    for offset in range(5):
        day = monday + datetime.timedelta(days=offset)
        at = "%s %%s" % day.isoformat()
        for n, (name, _) in enumerate(DEVELOPERS):
            path = clones[name]
            branch, issues = [(b, i) for who, b, days, i, _ in BRANCHES
                              if who == name and offset in days][0]
            if git(path, "branch", "--show-current").strip() != branch:
                git(path, "switch", "-q", "-c", branch, "main")   # every branch starts at main

            def ff(*args, path=path):
                return run([flowforge] + list(args), path, env)
            first, second = issues[offset % len(issues)], issues[(offset + 1) % len(issues)]
            start, pause, resume = "08:%02d" % (40 + 7 * n), "12:00", "12:4%d" % (5 + n)
            switch, stop = "14:%02d" % (10 + 11 * n), "17:%02d" % (5 + 13 * n)
            ff("start", first[0], "--project", first[1], "--note", "private notes stay here",
               "--at", at % start)
            ff("pause", "--at", at % pause)
            ff("resume", "--at", at % resume)
            ff("switch", second[0], "--project", second[1], "--at", at % switch)
            ff("stop", "--at", at % stop)
            track(name, first[0], 60 * (minutes(pause) - minutes(start) + minutes(switch)
                                        - minutes(resume)))
            track(name, second[0], 60 * (minutes(stop) - minutes(switch)))
            if offset == 2:
                ff("log", "OPS-4", "45m", "--project", "ops", "--date", day.isoformat(),
                   "--note", "on-call review")
                track(name, "OPS-4", 45 * 60)
            code = "%s.txt" % branch.replace("/", "-")   # the day's code: a file of the branch's own
            with open(os.path.join(path, code), "a") as f:
                f.write("%s\n" % day.isoformat())
            git(path, "add", code)
            git_hooked(path, "commit", "-qm", "%s: %s" % (branch, day.isoformat()))
            # Every day brought new time, so every push must take the ledger along.
            if not git_hooked(path, "push", "-q", "-u", "origin", branch):
                sys.exit("demo: pushing %s from %s did not push the ledger" % (branch, name))
        print("  %s: 3 developers tracked time, committed, pushed; the hooks took the ledger "
              "along" % day.strftime("%a %d %b"))

    # 3. The hosting service lands the branches on main.  Its clone has no
    # FlowForge hooks and fetches no ledger: merges only ever see code.
    server = clone(origin, os.path.join(base, "server"), "Hosting Service", "noreply@example.com")
    for _, branch, _, _, how in BRANCHES:
        if how == "merge --no-ff":
            git(server, "merge", "-q", "--no-ff", "-m", "Merge branch '%s'" % branch,
                "origin/" + branch)
        elif how == "squash":
            git(server, "merge", "-q", "--squash", "origin/" + branch)
            git(server, "commit", "-qm", "%s (squashed)" % branch)
        elif how == "rebase":
            git(server, "switch", "-q", "-c", "landing", "origin/" + branch)
            git(server, "rebase", "-q", "main")
            git(server, "switch", "-q", "main")
            git(server, "merge", "-q", "--ff-only", "landing")
        if how:
            print("  server: %s landed on main (%s)" % (branch, how))
        else:
            print("  server: %s stays unmerged (pushed, never landed)" % branch)
    git(server, "push", "-q", "origin", "main")
    print("  main: %d commits, %d of them merges; 0 conflicts" % (
        int(git(server, "rev-list", "--count", "main")),
        int(git(server, "rev-list", "--count", "--merges", "main"))))

    # 4. The developers pull main: a plain `git pull`, yet the ledger comes too
    for name, _ in DEVELOPERS:
        git(clones[name], "switch", "-q", "main")
        git(clones[name], "pull", "-q", "--ff-only")

    # 5. The manager: a fresh clone, no private data, the ledger from one fetch
    manager = os.path.join(base, "manager")
    run(["git", "clone", "-q", origin, manager], base, env)
    run([flowforge, "fetch"], manager, env)
    stores = git(manager, "for-each-ref", "--format=%(refname)", "refs/flowforge/remotes/").split()
    branches = git(manager, "for-each-ref", "--format=%(refname:short)", "refs/remotes/origin/")
    branches = [b for b in branches.split() if b != "origin/HEAD" and b != "origin"]
    print("  manager: a fresh clone (no private data: %s) fetched %d store refs;"
          % (not os.path.exists(os.path.join(manager, ".flowforge", "user")), len(stores)))
    print("  origin has %d branches (%s), none of them the ledger" % (len(branches), ", ".join(
        b[len("origin/"):] for b in branches)))
    print()
    t = time.monotonic()
    last = (monday + datetime.timedelta(days=6)).isoformat()
    run([flowforge, "report", "--by", "user,project", "--from", monday.isoformat(), "--to", last],
        manager, env, quiet=False)
    print()
    run([flowforge, "report", "--by", "issue", "--from", monday.isoformat()], manager, env,
        quiet=False)
    print()
    run([flowforge, "bill", "--from", monday.isoformat(), "--to", last], manager, env, quiet=False)
    print()
    elapsed = time.monotonic() - t

    # 6. The proofs: the report against the --at times, clean clones, clean branches
    def team_time(path):
        report = json.loads(run([flowforge, "report", "--json", "--by", "user,issue"], path, env))
        return {(row["user"], row["issue"]): row["seconds"] for row in report["rows"]}
    got = team_time(manager)
    pulled = team_time(clones["alice"])   # what alice's plain `git pull` brought
    per_user = {}
    for (user, _), seconds in got.items():
        per_user[user] = per_user.get(user, 0) + seconds
    print("every tracked second reached the team report: %s (%s)" % (
        "yes" if got == expected else "NO",
        ", ".join("%s %s" % (u, per_user[u]) for u in sorted(per_user))))
    print("alice's plain `git pull` brought the same ledger: %s" % ("yes" if pulled == got else "NO"))
    dirty = [name for name, _ in DEVELOPERS if git(clones[name], "status", "--porcelain").strip()]
    print("git status is clean in every developer's clone: %s" % ("yes" if not dirty else
                                                                  "NO (%s)" % ", ".join(dirty)))
    # Every branch on origin (git ls-tree: ls-files of a branch one has not checked
    # out), and each developer's index: team time is in none of them.
    team_files = [(b, f) for b in branches for f in
                  git(manager, "ls-tree", "-r", "--name-only", b, "--", ".flowforge/team").split()]
    team_files += [(name, f) for name, _ in DEVELOPERS for f in
                   git(clones[name], "ls-files", "--", ".flowforge/team").split()]
    print("no branch holds a file under .flowforge/team: %s" % (
        "yes" if not team_files else "NO (%s)" % ", ".join("%s:%s" % bf for bf in team_files)))
    print("report and bill took %.2f s; the whole demo %.1f s" % (elapsed,
                                                                  time.monotonic() - started))
    if got != expected:
        wrong = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        sys.exit("demo: the report differs from the --at times: %s" % ", ".join(
            "%s %s: expected %s, got %s" % (u, i, expected.get((u, i)), got.get((u, i)))
            for u, i in wrong))
    if pulled != got or dirty or team_files:
        sys.exit("demo: see above")
    print("look around: cd %s/alice && %s status" % (base, flowforge))
    if os.environ.get("FLOWFORGE_DEMO_CLEANUP"):
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
