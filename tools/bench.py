#!/usr/bin/env python3
"""make bench / make bench-full: FlowForge's targets (DESIGN section 7), measured on this machine.

    python3 tools/bench.py [--full]        BENCH_RUNS=N: rounds per row (default 21)

FlowForge is installed with install.sh into a temporary prefix, as a user would, and every
row runs the installed `flowforge` command (a `python3 -S` launcher importing the compiled
module) as a fresh process, its output going to a file.  The data is written straight to
the private stores' day files (generation only; FlowForge itself appends with fsync).
The interpreter's own directory is put first on PATH, so that the hook shim's `python3` is
the interpreter itself and not a version manager's shim (pyenv's costs ~100 ms a start).

Shapes.  Every developer logs 2,000 entries on working days, on a working set of 4 issues a
week (from 300); segments never cross midnight, so each day's total is known exactly.  The
teams' stores are in UTC; the stores of the timer rows and the 1M-entry store are in
Europe/Berlin, a zone with daylight saving time, as most people's are.
  `make bench` (quick): 50 users x 2,000 entries over 1 year (100k); one user with 100,000
    entries over 1,000 days and an empty store (the timer rows); five repositories of
    50 users x 2,000 over 1 year (the five-repository bill); 100,000 Watson frames.
  `make bench-full`, in addition: 50 users x the same 2,000 entries spread over 15 years;
    500 users x 2,000 entries over 24 months (1M entries); one user with 1,000,000 entries
    over 15 years, in a repository with 49 other users x 2,000 over a year (so the hook
    sees 50 users' stores); 1,000,000 Watson frames; the worst case, where every entry may
    be on any of 200 issues.

How the rows are judged.  The floor is `python3 -S -c pass`, run with the interpreter the
launcher runs.  It is not measured once up front: every timed run of every row is paired
with one floor run, back to back, the order alternating from round to round (floor first in
even rounds, the command first in odd ones), so a change in the machine's load hits both.
  * "<= floor + N ms" rows (start, stop, status, the hook): each round records
    command - floor; the verdict is the median of those differences against N.  The median
    column shows that median difference, then the command's and the floor's own medians.
  * "<= 1.1x empty" rows: the empty and the long-history stores run in the same rounds (the
    order of the stores rotating); each round records long / empty; the verdict is the
    median of those ratios.
  * absolute rows ("<= 300 ms"): the median of the command's wall times against the
    target; the floor's median over the same rounds is printed beside it, so that a loaded
    machine shows in the table.
  * cold and warm are separate rows: cold report = .flowforge/state/cache removed before
    each run (a report's first run after a fetch), in a manager's clone whose `flowforge
    fetch` brought the team's ledger refs; the warm and one-month report rows run there
    too.  Cold aggregation = the ledger refs and
    the aggregation state deleted before each run; warm = the same command again once a
    first (untimed) run has filled what it caches.  The first `aggregate` after an import
    is its own row, one sample per import.
  * peak RSS rows (cold report, aggregate --full from a new ledger, the imports): those
    rows' timed runs go through `/usr/bin/time -f %M -o FILE` (about 1 ms more per run;
    without GNU time, a fresh `python3 -S` parent reading getrusage(RUSAGE_CHILDREN)), and
    the row is the largest value over its runs: the peak of the command's process or of any
    child it waited for (git), not a sum.  Not os.wait4 from this script: Linux carries the
    high-water mark of the image a process replaces at exec into its ru_maxrss, so a child
    of this (large) script would report this script's size.
  * the queue row: jobs per second, in process.
Every run checks its outcome.  A command that exits non-zero, or exits 0 without having done
the work -- a hook that deferred to the queue ("not aggregated"), an aggregation that did not
move the ledger ref, a report whose --json total differs from the generated data, an import
that wrote fewer entries, a bill without its five repositories -- makes its row FAILED, not
fast.  The table prints each median beside its target and a verdict; the script exits 1 when
any row is MISSED or FAILED, so a regression cannot pass silently."""
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import flowforge  # noqa: E402

RUNS = max(1, int(os.environ.get("BENCH_RUNS", "21")))
SLOW_RUNS = min(RUNS, 5)     # rows of seconds per run: the full aggregations
SLOWER_RUNS = min(RUNS, 3)   # the imports and the 1M-entry aggregations
DAY = 86400
MIB = 1024 * 1024
FLOOR_ARGV = [sys.executable, "-S", "-c", "pass"]


# -- running commands -------------------------------------------------------------------------

class Run:
    """One finished command: wall seconds, exit code, output, peak RSS (bytes)."""

    def __init__(self, seconds, code, out, err, rss):
        self.seconds, self.code, self.out, self.err, self.rss = seconds, code, out, err, rss

    def text(self):
        return self.err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]


# Peak RSS needs a fresh, small parent: Linux carries the high-water mark of the image a
# process replaces at exec into its ru_maxrss, so a child forked from this (large) script
# would report this script's size.  GNU time forks the command from its own tiny image.
TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None
RSS_WRAPPER = ("import os, resource, subprocess, sys\n"
               "code = subprocess.call(sys.argv[2:])\n"
               "open(sys.argv[1], 'w').write('%d\\n' % resource.getrusage(resource.RUSAGE_CHILDREN)"
               ".ru_maxrss)\n"
               "sys.exit(code)\n")
RSS_METHOD = ("`/usr/bin/time -f %M` (GNU time's wait4 of the command; ~1 ms added to those rows)"
              if TIME else "resource.getrusage(RUSAGE_CHILDREN) in a fresh `python3 -S` parent "
              "(~10 ms added to those rows)")


def execute(argv, cwd, env, rss=False):
    """Run argv once; the time covers fork to reap.  rss=True: under GNU time (or a small
    Python parent), for the peak RSS of the command and of the children it waited for."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile("r") as peak:
        if rss:
            argv = ([TIME, "-f", "%M", "-o", peak.name] if TIME
                    else [sys.executable, "-S", "-c", RSS_WRAPPER, peak.name]) + list(argv)
        started = time.perf_counter()
        code = subprocess.call(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=err)
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        kib = None
        if rss:
            lines = peak.read().split()
            kib = int(lines[-1]) if lines and lines[-1].isdigit() else None
        return Run(seconds, code, out.read(), err.read(), kib * 1024 if kib is not None else None)


class Failed(Exception):
    """A row's command failed or did not do its work."""


def must(argv, cwd, env, input=None):
    """An untimed setup or check command that has to succeed; its stdout."""
    proc = subprocess.run(argv, cwd=cwd, env=env, input=input, capture_output=True)
    if proc.returncode:
        raise Failed("%s exited %d: %s" % (" ".join(os.path.basename(a) for a in argv[:3]),
                                           proc.returncode,
                                           proc.stderr.decode("utf-8", "replace").strip()[-300:]))
    return proc.stdout


def ms(seconds):
    return "%.1f ms" % (seconds * 1000) if seconds < 1 else "%.2f s" % seconds


def limit_text(seconds):
    return "%d ms" % round(seconds * 1000) if seconds < 1 else "%g s" % seconds


class Series:
    """The paired samples of one timed row."""

    def __init__(self, what, data, limit=None, budget=None, target=None):
        self.what, self.data, self.limit, self.budget = what, data, limit, budget
        self.target = target
        self.runs = []       # (Run, floor seconds)
        self.error = None

    def add(self, run, floor, problem=None):
        if self.error:
            return
        problem = problem or (None if run.code == 0 else "exit %d: %s" % (run.code, run.text()[0]))
        if problem:
            self.error = problem
        else:
            self.runs.append((run, floor))


class Bench:
    def __init__(self, base, env):
        self.base, self.env = base, env
        self.floors = []
        self.rows = []       # (what, data, median text, target text, verdict)
        self.failures = []

    def floor(self):
        run = execute(FLOOR_ARGV, self.base, self.env)
        if run.code:
            sys.exit("bench: the floor itself failed: %s" % run.text()[0])
        self.floors.append(run.seconds)
        return run.seconds

    def paired(self, i, argv, cwd, env, rss=False):
        """Round i of a row: the floor and the command back to back, the order alternating."""
        if i % 2 == 0:
            floor = self.floor()
            run = execute(argv, cwd, env, rss)
        else:
            run = execute(argv, cwd, env, rss)
            floor = self.floor()
        return run, floor

    def measure(self, series, argv, cwd, env, runs=RUNS, before=None, check=None, verify=None,
                rss=False):
        """Time argv `runs` times into series and add its row.  verify() runs once, untimed,
        before the rounds; before(i) before each round (untimed); check(run, i) judges each
        run's outcome (a string says what is wrong)."""
        try:
            if verify:
                verify()
            for i in range(runs):
                if before:
                    before(i)
                run, floor = self.paired(i, argv, cwd(i) if callable(cwd) else cwd, env, rss)
                series.add(run, floor, check(run, i) if check and run.code == 0 else None)
                if series.error:
                    break
        except Failed as e:
            series.error = str(e)
        self.timed(series)
        return series

    def timed(self, series):
        """The row of a series: its median beside its target, and the verdict."""
        if series.budget is not None:
            target = "<= floor + %d ms" % round(series.budget * 1000)
        elif series.limit is not None:
            target = "<= " + limit_text(series.limit)
        else:
            target = "(no target)"
        target = series.target or target
        if series.error or not series.runs:
            self.fail(series.what, series.data, target, series.error or "no runs")
            return
        times = [run.seconds for run, _ in series.runs]
        floors = [floor for _, floor in series.runs]
        median, floor = statistics.median(times), statistics.median(floors)
        if series.budget is not None:
            over = statistics.median([t - f for t, f in zip(times, floors)])
            text = "+%.1f ms (%s; floor %s)" % (over * 1000, ms(median), ms(floor))
            verdict = "ok" if over <= series.budget else "MISSED"
        else:
            text = "%s (floor %s)" % (ms(median), ms(floor))
            verdict = "" if series.limit is None else "ok" if median <= series.limit else "MISSED"
        if len(times) < 3:
            text += ", %d run%s" % (len(times), "" if len(times) == 1 else "s")
        self.rows.append((series.what, series.data, text, target, verdict))

    def ratio(self, what, data, ratios, limit, error=None):
        target = "<= %gx empty (per round)" % limit
        if error or not ratios:
            self.fail(what, data, target, error or "no rounds")
            return
        median = statistics.median(ratios)
        self.rows.append((what, data, "%.2fx" % median, target, "ok" if median <= limit else "MISSED"))

    def rss(self, what, series, limit=None):
        target = "<= %d MiB" % (limit // MIB) if limit else "(no target)"
        if series.error or not series.runs:
            self.fail(what, series.data, target, "its command failed (above)")
            return
        peaks = [run.rss for run, _ in series.runs if run.rss is not None]
        if not peaks:
            self.fail(what, series.data, target, "no RSS was measured")
            return
        peak = max(peaks)
        verdict = "" if limit is None else "ok" if peak <= limit else "MISSED"
        self.rows.append((what, series.data, "%.1f MiB" % (peak / MIB), target, verdict))

    def fail(self, what, data, target, reason):
        self.failures.append("%s (%s): %s" % (what, data, reason))
        self.rows.append((what, data, "-", target, "FAILED (%d)" % len(self.failures)))


# -- data ---------------------------------------------------------------------------------------

def workdays(now, days):
    today = now // DAY
    return [d for d in range(today - days, today) if (d + 3) % 7 < 5]  # epoch day 0: a Thursday


def weekend_days(now):
    """The weekend days before today, newest first (the generated history has none)."""
    return [time.strftime("%Y-%m-%d", time.gmtime(d * DAY))
            for d in range(now // DAY - 1, now // DAY - 60, -1) if (d + 3) % 7 >= 5]


# The timer rows' stores live in a zone with daylight saving time, as most users' do (the
# teams' stores in UTC, so that the generated totals per day are the reports' days).
TIMER_ZONE = "Europe/Berlin"


def write_store(repo, user, entries, days, rng, now, totals, spread=False, zone="UTC"):
    """A private store with `entries` entries on the working days of the last `days` days,
    written straight to the day files; adds each day's seconds to totals[day].

    Realistic shape: a working set of 4 issues that changes every week (from a pool of
    300).  spread=True is the worst case instead: every entry on any of 200 issues."""
    store = flowforge.PrivateStore(repo, user)
    store.create(zone)
    days_worked = workdays(now, days)
    working_sets = {}
    names = {}
    per_day = {}
    for n in range(entries):
        day_number = rng.choice(days_worked)
        if spread:
            issue = str(rng.randint(1, 200))
        else:
            week = (day_number + 3) // 7
            if week not in working_sets:
                working_sets[week] = [str(rng.randint(1, 300)) for _ in range(4)]
            issue = rng.choice(working_sets[week])
        day_start = day_number * DAY
        day = names.get(day_number) or names.setdefault(
            day_number, time.strftime("%Y-%m-%d", time.gmtime(day_start)))
        if rng.random() < 0.7:
            start = day_start + rng.randint(7 * 3600, 22 * 3600)
            end = min(start + rng.randint(300, 3 * 3600), day_start + DAY - 1)
            record = {"segments": [[start, end]]}
            seconds = end - start
        else:
            seconds = rng.randint(60, 4 * 3600)
            record = {"date": day, "seconds": seconds}
        record.update(op="entry", id=day.replace("-", "") + "-%08x" % rng.getrandbits(32),
                      issue=issue, project="p%d" % (int(issue) % 5), note="bench entry %d" % n,
                      src="bench", v=flowforge.RECORD_SCHEMA)
        per_day.setdefault(day, []).append(flowforge.encode_record(record))
        totals[day] = totals.get(day, 0) + seconds
    for day, lines in per_day.items():
        with open(store.day_path(day), "wb") as f:
            f.write(b"".join(lines))


def write_watson_frames(path, count, rng, now):
    """A Watson frames file, [start, stop, project, id, tags, updated_at], back to back
    (10-60 s apart, 1-25 minutes long) and ending two days ago: 100,000 frames are about
    2.6 years, 1,000,000 about 26."""
    frames = []
    t = 0
    for _ in range(count):
        t += rng.randint(10, 60)
        stop = t + rng.randint(60, 1500)
        tags = ["#%d" % rng.randint(1, 300)] if rng.random() < 0.9 else ["meeting"]
        frames.append([t, stop, "p%d" % rng.randint(1, 5), "%032x" % rng.getrandbits(128), tags, stop])
        t = stop
    shift = now - 2 * DAY - t
    for frame in frames:
        frame[0] += shift
        frame[1] += shift
        frame[5] += shift
    with open(path, "w") as f:
        json.dump(frames, f)
    return path


def queue_throughput(path, jobs=1000):
    """Jobs per second through the durable queue (WAL, synchronous=FULL): each job
    is three transactions (enqueue, claim, ack), each one fsynced."""
    queue = flowforge.RetryQueue(path)
    queue.stats()
    started = time.perf_counter()
    for n in range(jobs):
        queue.enqueue("aggregate", {"n": n})
        queue.ack(queue.claim("bench"))
    rate = jobs / (time.perf_counter() - started)
    queue.close()
    return rate


def make_repo(path):
    os.makedirs(path)
    subprocess.run(["git", "init", "-q", path], check=True)
    repo, _ = flowforge.init_repo(path)
    return repo


class Team:
    """A generated repository: its Repo, users and each day's generated seconds."""

    def __init__(self, base, name, users, entries, days, rng, now, spread=False, extra=None):
        started = time.time()
        self.repo = make_repo(os.path.join(base, name))
        self.root = self.repo.root
        self.totals = {}
        self.users = []
        for user, count, span in (extra or []):
            write_store(self.repo, user, count, span, rng, now, self.totals, zone=TIMER_ZONE)
            self.users.append(user)
        for u in range(users):
            write_store(self.repo, "user%03d" % u, entries, days, rng, now, self.totals, spread)
            self.users.append("user%03d" % u)
        progress("  %s: %d stores, %s entries in %.1f s" % (
            name, len(self.users), "{:,}".format(users * entries + sum(c for _, c, _ in extra or [])),
            time.time() - started))

    def log(self, ff, env, issue, day):
        """`flowforge log ISSUE 1m --date DAY` (untimed setup), counted in the generated totals."""
        must(ff + ["log", issue, "1m", "--date", day], self.root, env)
        self.totals[day] = self.totals.get(day, 0) + 60

    def seconds(self, month=None):
        return sum(s for day, s in self.totals.items() if month is None or day.startswith(month))


STARTED = time.time()


def progress(text):
    sys.stderr.write("[%4.0f s] %s\n" % (time.time() - STARTED, text))
    sys.stderr.flush()


# -- helpers over the repositories ------------------------------------------------------------

def ledger_tips(root, env, user=None):
    """{ref: object id} of the ledger's store refs (one user's, or all)."""
    pattern = "refs/flowforge/stores/" + ("%s--*" % user if user else "")
    out = must(["git", "for-each-ref", "--format=%(refname) %(objectname)", pattern], root, env)
    return dict(line.split(" ", 1) for line in out.decode().splitlines())


def drop_ledger(repo, env, user=None):
    """Delete the ledger refs and the aggregation state (of one user, or all): a new ledger."""
    refs = "".join("delete %s\n" % ref for ref in ledger_tips(repo.root, env, user))
    must(["git", "update-ref", "--stdin"], repo.root, env, input=refs.encode())
    if user:
        try:
            os.unlink(os.path.join(repo.state, "aggregate", user + ".json"))
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(os.path.join(repo.state, "aggregate"), ignore_errors=True)


def report_verifier(ff, team_list, env, args, month=None, repos_expected=None):
    """A verify(): the command's --json total must equal the generated seconds."""
    def verify():
        roots = team_list if isinstance(team_list, list) else [team_list]
        doc = json.loads(must(ff + args + ["--json"], roots[0].root, env))
        expected = sum(t.seconds(month) for t in roots)
        if doc.get("total_seconds") != expected:
            raise Failed("--json total_seconds %s, the generated data has %d"
                         % (doc.get("total_seconds"), expected))
        if repos_expected is not None and len(doc.get("repos") or []) != repos_expected:
            raise Failed("--json repos lists %d repositories, not %d"
                         % (len(doc.get("repos") or []), repos_expected))
    return verify


def printed_something(run, i):
    return None if run.out.strip() else "printed nothing"


# -- the rows -----------------------------------------------------------------------------------

def timer_rows(bench, ff, env, stores, now):
    """start, status and stop on each store, every store in every round (order rotating),
    each command paired with a floor run; then the long histories against the empty one."""
    names = ("start", "status", "stop")
    series = {(label, name): Series("%s, %s" % (name, label), data, budget=0.010)
              for label, data, _, _ in stores for name in names}
    for r in range(RUNS):
        shift = r % len(stores)
        pinned = now + 3600 + 600 * r   # each round on its own ten minutes after the history
        day = local_day(pinned - 120, TIMER_ZONE)   # where the stores' entries land
        for label, _, repo, user in stores[shift:] + stores[:shift]:
            if any(series[label, name].error for name in names):
                continue
            store = flowforge.PrivateStore(repo, user)
            e = dict(env, FLOWFORGE_USER=user, FLOWFORGE_NOW=str(pinned))
            for name, argv in (("start", ff + ["start", "1", "--at", "-2m"]), ("status", ff + ["status"]),
                               ("stop", ff + ["stop"])):
                lines = day_lines(store, day)
                run, floor = bench.paired(r, argv, repo.root, e)
                problem = None
                if run.code == 0:
                    problem = timer_problem(name, run, store, lines, day, ff, repo.root, e)
                series[label, name].add(run, floor, problem)
                if series[label, name].error:
                    break
    for label, _, _, _ in stores:
        for name in names:
            bench.timed(series[label, name])
    empty = stores[0][0]
    for label, data, _, _ in stores[1:]:
        for name in names:
            a, b = series[label, name], series[empty, name]
            ratios = [x.seconds / y.seconds for (x, _), (y, _) in zip(a.runs, b.runs)]
            bench.ratio("%s, %s vs empty history" % (name, label), data, ratios, 1.1,
                        "a run failed (above)" if a.error or b.error else None)


def local_day(ts, zone):
    """The date (YYYY-MM-DD) of epoch second `ts` in time zone `zone`."""
    from datetime import datetime
    from zoneinfo import ZoneInfo
    return datetime.fromtimestamp(ts, ZoneInfo(zone)).date().isoformat()


def day_lines(store, day):
    try:
        with open(store.day_path(day), "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def timer_problem(name, run, store, lines_before, day, ff, root, env):
    with open(store.timer_path, "rb") as f:
        timer = json.load(f).get("timer")
    if name == "start":
        return None if timer and timer.get("issue") == "1" else "start left no timer on issue 1"
    if name == "stop":
        if timer:
            return "the timer still runs after stop"
        if day_lines(store, day) != lines_before + 1:
            return "stop did not append one entry to %s" % day
        return None
    if not run.out.strip():
        return "status printed nothing"
    doc = json.loads(must(ff + ["status", "--json"], root, env))   # untimed: what status knows
    if (doc.get("timer") or {}).get("issue") != "1" or doc.get("elapsed_seconds") != 120:
        return "status --json does not show the 2-minute timer on issue 1"
    return None


def aggregate_full_rows(bench, ff, env, team, data, limit, user=None, runs=SLOW_RUNS):
    """aggregate --full (--all unless user): from a new ledger (cold), then again (warm)."""
    args = ["aggregate", "--full"] + ([] if user else ["--all"])
    e = dict(env, FLOWFORGE_USER=user or team.users[0])
    stores = 1 if user else len(team.users)
    label = " ".join(args)

    def check(run, i):
        tips = ledger_tips(team.root, env, user)
        return None if len(tips) == stores else "%d ledger refs after it, not %d" % (len(tips), stores)
    cold = bench.measure(Series(label + ", new ledger (cold)", data, limit), ff + args, team.root, e,
                         runs, before=lambda i: drop_ledger(team.repo, env, user), check=check, rss=True)
    warm = bench.measure(Series(label + ", ledger current (warm)", data, limit), ff + args, team.root,
                         e, runs, check=check)
    return cold, warm


def ref_moves(bench, ff, series, argv, team, env, user, day, runs=RUNS, check_more=None):
    """Rows whose command must move `user`'s ledger ref after `log` changed one day."""
    e = dict(env, FLOWFORGE_USER=user)
    before_tips = {}

    def before(i):
        team.log(ff, e, "7", day)
        before_tips.clear()
        before_tips.update(ledger_tips(team.root, env, user))

    def check(run, i):
        problem = check_more(run) if check_more else None
        if problem:
            return problem
        tips = ledger_tips(team.root, env, user)
        return None if tips and tips != before_tips else "the ledger ref did not move"
    return bench.measure(series, argv, team.root, e, runs, before=before, check=check)


def hook_row(bench, ff, env, team, data, user, day, floor_budget=0.100):
    """The pre-commit hook as git runs it: the shim in .git/hooks (sh, git rev-parse,
    then python3), after `log` changed one day; it must aggregate, not defer."""
    e = dict(env, FLOWFORGE_USER=user)
    series = Series("hook pre-commit (shim), one changed day", data, budget=floor_budget,
                    target="<= floor + %d ms, not deferred" % round(floor_budget * 1000))
    try:
        shutil.copy(os.path.join(HERE, "flowforge.py"), os.path.join(team.root, "flowforge.py"))
        must(ff + ["install", "hooks"], team.root, e)
        must(["git", "add", "-A"], team.root, e)
        shim = [os.path.join(team.root, ".git", "hooks", "pre-commit")]
        must(shim, team.root, e)   # untimed: compiles the vendored copy into its pycache
    except Failed as error:
        series.error = str(error)
        bench.timed(series)
        return

    def deferred(run):
        err = run.err.decode("utf-8", "replace")
        return "deferred: %s" % err.strip() if "not aggregated" in err else None
    ref_moves(bench, ff, series, shim, team, env, user, day, check_more=deferred)


def managers_clone(ff, env, team):
    """A manager's clone of a team's repository: `flowforge fetch` has brought
    every store's ledger ref (refs/flowforge/remotes/origin/...), and with them
    the shards as git delivers them, in a pack.  (The repository that
    aggregated them holds them as thousands of loose objects, one file each,
    as no developer's clone does: each aggregates only its own store.)"""
    root = team.root + "-manager"
    os.makedirs(root)
    must(["git", "init", "-q", root], root, env)
    must(["git", "remote", "add", "origin", team.root], root, env)
    e = dict(env, FLOWFORGE_USER="manager")
    must(ff + ["init", "--timezone", "UTC"], root, e)
    out = must(ff + ["fetch"], root, e).decode()
    if "fetched %d store ref(s)" % len(team.users) not in out:
        raise Failed("fetch in the manager's clone: %s" % out.strip())
    return root


class Clone:
    """A clone as report_verifier sees it: its root, and the team's generated totals."""

    def __init__(self, root, team):
        self.root, self.team = root, team

    def seconds(self, month=None):
        return self.team.seconds(month)


def report_rows(bench, ff, env, team, data, cold_limit, warm_limit, month, month_limit=0.150):
    """report --by user,issue over all history cold and warm, and one month's report,
    in a manager's clone that fetched the team's ledger (cold: a first report after a
    fetch)."""
    e = dict(env, FLOWFORGE_USER="manager")
    args = ["report", "--by", "user,issue"]
    series = Series("report --by user,issue, all history, cold (no cache)", data, cold_limit)
    try:
        clone = Clone(managers_clone(ff, env, team), team)
    except Failed as error:
        series.error = "setup: %s" % error
        bench.timed(series)
        return series
    cache = os.path.join(clone.root, ".flowforge", "state", "cache")
    cold = bench.measure(series, ff + args, clone.root, e,
                         before=lambda i: shutil.rmtree(cache, ignore_errors=True),
                         check=printed_something, verify=report_verifier(ff, clone, e, args), rss=True)
    bench.measure(Series("report --by user,issue, all history, warm", data, warm_limit), ff + args,
                  clone.root, e, check=printed_something)
    margs = ["report", "--period", month]
    bench.measure(Series("report --period %s (a full month), warm" % month, data, month_limit,
                         target="<= %d ms (--period month)" % round(month_limit * 1000)),
                  ff + margs, clone.root, e, check=printed_something,
                  verify=report_verifier(ff, clone, e, margs, month))
    return cold


def html_row(bench, ff, env, team, data, month, base):
    e = dict(env, FLOWFORGE_USER=team.users[0])
    page = os.path.join(base, "last-month.html")
    args = ["report", "--period", "last-month", "--format", "html", "--output", page]

    def before(i):
        if os.path.exists(page):
            os.unlink(page)

    def check(run, i):
        try:
            with open(page, "rb") as f:
                html = f.read()
        except FileNotFoundError:
            return "wrote no %s" % page
        return None if html.rstrip().endswith(b"</html>") else "the page is not a complete HTML page"
    bench.measure(Series("report --period last-month --format html --output FILE, warm", data, 1.0),
                  ff + args, team.root, e, before=before, check=check,
                  verify=report_verifier(ff, team, e, ["report", "--period", "last-month"], month))


def bill_row(bench, ff, env, teams, data, month, base):
    e = dict(env, FLOWFORGE_USER=teams[0].users[0])
    args = ["bill"]
    for team in teams:
        args += ["-C", team.root]
    args += ["--month", month]
    bench.measure(Series("bill -C r1 .. -C r5 --month %s (five repositories), warm" % month, data, 1.5),
                  ff + args, base, e, check=printed_something,
                  verify=report_verifier(ff, teams, e, args, month, repos_expected=len(teams)))


def push_row(bench, ff, env, team, data, day, base):
    """The ledger's share of a developer's `git push`, to a bare remote on this disk."""
    e = dict(env, FLOWFORGE_USER=team.users[0])
    series = Series("push, one changed store of %d (local bare remote)" % len(team.users), data)
    remote = os.path.join(base, "remote.git")
    try:
        must(["git", "init", "-q", "--bare", remote], base, env)
        must(["git", "remote", "add", "origin", remote], team.root, env)
        must(ff + ["push", "origin"], team.root, e)
    except Failed as error:
        series.error = str(error)
        bench.timed(series)
        return

    def before(i):
        team.log(ff, e, "8", day)
        must(ff + ["aggregate"], team.root, e)

    def check(run, i):
        mine = ledger_tips(team.root, env, team.users[0])
        theirs = must(["git", "ls-remote", remote] + list(mine), base, env).decode()
        return None if all(oid in theirs for oid in mine.values()) else "the remote lacks the new tip"
    bench.measure(series, ff + ["push", "origin"], team.root, e, before=before, check=check)


def import_rows(bench, ff, env, base, frames, count, limit, runs, first_aggregate_limit=None):
    """import watson into a fresh repository per run; then (optionally) its first aggregate."""
    e = dict(env, FLOWFORGE_USER="importer")
    data = "{:,} Watson frames, one user".format(count)
    imported = Series("import watson, {:,} frames".format(count), data, limit)
    first = Series("aggregate, first after the import of {:,} frames (cold)".format(count), data,
                   first_aggregate_limit)
    for i in range(runs):
        try:
            repo = make_repo(os.path.join(base, "import-%d-%d" % (count, i)))
        except (OSError, subprocess.CalledProcessError, flowforge.FlowForgeError) as error:
            imported.error = "setup: %s" % error
            break
        run, floor = bench.paired(i, ff + ["import", "watson", frames, "--default-issue", "OPS-1"],
                                  repo.root, e, rss=True)
        problem = None
        if run.code == 0:
            written = entries_in(flowforge.PrivateStore(repo, "importer"))
            problem = None if written == count else "wrote %d entries, not %d" % (written, count)
        imported.add(run, floor, problem)
        if imported.error:
            break
        if first_aggregate_limit is not None:
            run, floor = bench.paired(i + 1, ff + ["aggregate"], repo.root, e)
            problem = None
            if run.code == 0 and not ledger_tips(repo.root, env, "importer"):
                problem = "no ledger ref after it"
            first.add(run, floor, problem)
        if i:   # keep the first repository (the RSS of its import is in the series)
            shutil.rmtree(repo.root, ignore_errors=True)
    bench.timed(imported)
    if first_aggregate_limit is not None:
        bench.timed(first)
    return imported


def entries_in(store):
    count = 0
    for name in os.listdir(store.daily):
        with open(os.path.join(store.daily, name), "rb") as f:
            count += f.read().count(b'"op":"entry"')
    return count


def queue_row(bench, base):
    try:
        rate = queue_throughput(os.path.join(base, "queue.db"))
    except Exception as error:   # any failure is the row's
        bench.fail("queue: enqueue + claim + ack, durable", "1,000 jobs, in process", ">= 300 jobs/s",
                   repr(error))
        return
    bench.rows.append(("queue: enqueue + claim + ack, durable", "1,000 jobs, in process",
                       "%.0f jobs/s" % rate, ">= 300 jobs/s", "ok" if rate >= 300 else "MISSED"))


# -- main ---------------------------------------------------------------------------------------

def machine():
    git = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip()
    try:
        commit = subprocess.run(["git", "-C", HERE, "describe", "--always", "--dirty"],
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return ("machine: %d CPUs (nproc), Linux %s; Python %s (%s); %s; load average %s\n"
            "FlowForge %s (tree %s), %s" % (
                len(os.sched_getaffinity(0)), platform.release(), platform.python_version(),
                sys.executable, git, " ".join("%.2f" % x for x in os.getloadavg()), flowforge.VERSION,
                commit, time.strftime("%Y-%m-%d %H:%M")))


FULL = "--full" in sys.argv[1:]


def main():
    unknown = [a for a in sys.argv[1:] if a != "--full"]
    if unknown:
        sys.exit("usage: tools/bench.py [--full]")
    print(machine())
    print("make %s: %d rounds per row (%d for the full aggregations, %d for the imports and the 1M "
          "aggregations); peak RSS by %s" % ("bench-full" if FULL else "bench", RUNS, SLOW_RUNS,
                                             SLOWER_RUNS, RSS_METHOD))
    sys.stdout.flush()
    base = tempfile.mkdtemp(prefix="flowforge-bench-")
    try:
        bench = run(base)
    finally:
        os.chdir(HERE)
        shutil.rmtree(base, ignore_errors=True)
    print()
    print("| what | data | median | target | verdict |")
    print("| --- | --- | ---: | --- | --- |")
    print("| floor: python3 -S -c pass | every round of every row (%d runs) | %s | (the floor) | |"
          % (len(bench.floors), ms(statistics.median(bench.floors))))
    for row in bench.rows:
        print("| %s | %s | %s | %s | %s |" % row)
    print()
    for n, failure in enumerate(bench.failures, 1):
        print("FAILED (%d): %s" % (n, failure))
    missed = [row[0] for row in bench.rows if row[4] == "MISSED"]
    print("%d rows, %d MISSED, %d FAILED; load average at the end %s; the bench took %.0f s"
          % (len(bench.rows), len(missed), len(bench.failures),
             " ".join("%.2f" % x for x in os.getloadavg()), time.time() - STARTED))
    return 1 if missed or bench.failures else 0


def run(base):
    rng = random.Random(2026)
    now = int(time.time())
    env = dict(os.environ, HOME=base, TZ="UTC", GIT_CONFIG_NOSYSTEM="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for key in list(env):
        if key.startswith("FLOWFORGE_"):
            del env[key]
    os.chdir(base)
    prefix = os.path.join(base, "prefix")
    subprocess.run([os.path.join(HERE, "install.sh"), "--prefix", prefix], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    ff = [os.path.join(prefix, "bin", "flowforge")]
    bench = Bench(base, env)
    year, mon = time.gmtime(now)[:2]
    month = "%04d-%02d" % ((year, mon - 1) if mon > 1 else (year - 1, 12))   # the last full month
    weekends = weekend_days(now)

    progress("generating the data (%s)..." % ("full" if FULL else "quick"))
    empty = make_repo(os.path.join(base, "empty"))
    flowforge.PrivateStore(empty, "fresh").create(TIMER_ZONE)
    solo = Team(base, "solo", 0, 0, 0, rng, now, extra=[("heavy", 100000, 1000)])
    team = Team(base, "team", 50, 2000, 365, rng, now)
    bill_teams = [Team(base, "r%d" % n, 50, 2000, 365, rng, now) for n in range(1, 6)]
    frames = write_watson_frames(os.path.join(base, "frames-100k.json"), 100000, rng, now)
    if FULL:
        team15 = Team(base, "team15y", 50, 2000, 15 * 365, rng, now)
        big = Team(base, "team500", 500, 2000, 730, rng, now)
        huge = Team(base, "solo1m", 49, 2000, 365, rng, now, extra=[("huge", 1000000, 15 * 365)])
        frames_1m = write_watson_frames(os.path.join(base, "frames-1m.json"), 1000000, rng, now)
        worst = Team(base, "worst", 50, 2000, 365, rng, now, spread=True)
    progress("data generated")

    y1 = "50 users x 2,000, 1 year (100k)"
    stores = [("empty history", "a new store", empty, "fresh"),
              ("100,000 past entries", "one user, 100k over 1,000 days", solo.repo, "heavy")]
    if FULL:
        stores.append(("1,000,000 past entries", "one user, 1M over 15 years", huge.repo, "huge"))
    progress("timer rows")
    timer_rows(bench, ff, env, stores, now)

    progress("%s: aggregation, reports, push, hook" % y1)
    agg_cold, _ = aggregate_full_rows(bench, ff, env, team, y1, 1.5)
    ref_moves(bench, ff, Series("aggregate, one changed day (incremental)", y1,
                            target="(no target; <= 60 ms at 1M in bench-full)"),
              ff + ["aggregate"], team, env, team.users[0], weekends[0])
    report_cold = report_rows(bench, ff, env, team, y1, 1.0, 0.300, month)
    html_row(bench, ff, env, team, y1, month, base)
    push_row(bench, ff, env, team, y1, weekends[1], base)
    hook_row(bench, ff, env, team, y1, team.users[0], weekends[2])

    progress("the five-repository bill")
    e = dict(env, FLOWFORGE_USER="user000")
    try:
        for t in bill_teams:
            must(ff + ["aggregate", "--full", "--all"], t.root, e)
        bill_row(bench, ff, env, bill_teams, "5 repositories x 50 users x 2,000, 1 year", month, base)
    except Failed as error:
        bench.fail("bill, five repositories", "5 x 100k", "<= 1.5 s", "setup: %s" % error)

    progress("import watson, 100,000 frames")
    imported = import_rows(bench, ff, env, base, frames, 100000, 3.0, SLOWER_RUNS, 1.5)
    queue_row(bench, base)
    rss = [("peak RSS: report --by user,issue, cold", report_cold, None),
           ("peak RSS: aggregate --full --all, new ledger", agg_cold, None),
           ("peak RSS: import watson, 100,000 frames", imported, 200 * MIB)]

    if FULL:
        y15 = "50 users x 2,000, 15 years (100k)"
        progress(y15)
        agg_cold, _ = aggregate_full_rows(bench, ff, env, team15, y15, 1.5)
        report_cold = report_rows(bench, ff, env, team15, y15, 1.5, 0.300, month)
        hook_row(bench, ff, env, team15, y15, team15.users[0], weekends[0])
        rss += [("peak RSS: report --by user,issue, cold", report_cold, None),
                ("peak RSS: aggregate --full --all, new ledger", agg_cold, None)]

        m24 = "500 users x 2,000, 24 months (1M)"
        progress(m24)
        e = dict(env, FLOWFORGE_USER=big.users[0])
        agg = bench.measure(Series("aggregate --full --all, new ledger (cold)", m24,
                                   target="(no target; setup of the report rows)"),
                            ff + ["aggregate", "--full", "--all"], big.root, e, 1, rss=True)
        report_cold = report_rows(bench, ff, env, big, m24, 1.5, 0.500, month)
        rss += [("peak RSS: report --by user,issue, cold", report_cold, None),
                ("peak RSS: aggregate --full --all, new ledger", agg, None)]

        m1 = "one user, 1M over 15 years (+49 users x 2,000)"
        progress(m1)
        try:
            must(ff + ["aggregate", "--full", "--all"], huge.root, dict(env, FLOWFORGE_USER="huge"))
        except Failed as error:
            bench.fail("aggregate --full --all (setup)", m1, "-", str(error))
        agg_cold, _ = aggregate_full_rows(bench, ff, env, huge, m1, 10.0, user="huge", runs=SLOWER_RUNS)
        ref_moves(bench, ff, Series("aggregate, one changed day (incremental)", m1, 0.060),
                  ff + ["aggregate"], huge, env, "huge", weekends[0])
        hook_row(bench, ff, env, huge, m1, "huge", weekends[1])
        rss.append(("peak RSS: aggregate --full, new ledger", agg_cold, None))

        progress("import watson, 1,000,000 frames")
        imported = import_rows(bench, ff, env, base, frames_1m, 1000000, 15.0, SLOWER_RUNS)
        rss.append(("peak RSS: import watson, 1,000,000 frames", imported, 200 * MIB))

        progress("worst case")
        e = dict(env, FLOWFORGE_USER=worst.users[0])
        try:
            must(ff + ["aggregate", "--full", "--all"], worst.root, e)
            bench.measure(Series("report --by user,issue, worst case: 200 issues per user every month",
                                 "50 users x 2,000, 1 year, any of 200 issues"),
                          ff + ["report", "--by", "user,issue"], worst.root, e, check=printed_something,
                          verify=report_verifier(ff, worst, e, ["report", "--by", "user,issue"]))
        except Failed as error:
            bench.fail("report, worst case", "50 x 2,000, 200 issues", "(no target)", str(error))

    for what, series, limit in rss:
        bench.rss(what, series, limit)
    progress("done")
    return bench


if __name__ == "__main__":
    sys.exit(main())
