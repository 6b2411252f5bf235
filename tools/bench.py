#!/usr/bin/env python3
"""make bench: FlowForge's DESIGN targets, measured on this machine.

Generates 50 users / 100,000 entries (and one user with 100,000 entries of
history) in a temporary directory, installs FlowForge with install.sh as a user
would, and prints medians.  The floor is the bare interpreter start.  Each
developer logs 2,000 entries over a year of working days, on a working set of
4 issues a week; a last row shows the worst case, where every entry may be on
any of 200 issues (so shards barely aggregate)."""
import json
import os
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

RUNS = int(os.environ.get("BENCH_RUNS", "21"))
DAY = 86400


def timed(argv, cwd, env, runs=RUNS, before=None, check=None):
    """Median wall time (seconds) of running argv; `before` runs untimed first each time,
    `check(stderr)` judges each run's outcome (a fast run that did not do the work fails)."""
    samples = []
    for i in range(runs):
        if before:
            before(i)
        t = time.perf_counter()
        proc = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        samples.append(time.perf_counter() - t)
        if proc.returncode:
            sys.exit("bench: %s failed: %s" % (" ".join(argv), proc.stderr.decode()))
        if check and not check(proc.stderr.decode()):
            sys.exit("bench: %s did not do its work: %s" % (" ".join(argv), proc.stderr.decode()))
    return statistics.median(samples)


def hook_aggregated(stderr):
    """The hook prints nothing when it aggregated, and one line when it deferred to the queue."""
    return "not aggregated" not in stderr


def drop_ledger(root, env):
    """Delete every ledger ref (setup for a cold aggregation)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=delete %(refname)", "refs/flowforge/"],
                          cwd=root, env=env, capture_output=True, text=True, check=True).stdout
    subprocess.run(["git", "update-ref", "--stdin"], cwd=root, env=env, input=refs, text=True,
                   check=True)


def write_store(repo, user, entries, days, rng, now, spread=False):
    """A private store with `entries` entries over the last `days` days, written
    straight to the day files (setup only; FlowForge itself appends with fsync).

    Realistic shape: entries on working days, on a working set of 4 issues
    that changes every week (from a pool of 300).  spread=True is the worst
    case instead: every entry on any of 200 issues, any day."""
    store = flowforge.PrivateStore(repo, user)
    store.create("UTC")
    today = now // DAY
    workdays = [d for d in range(today - days, today) if (d + 3) % 7 < 5]  # epoch day 0 was a Thursday
    working_sets = {}
    per_day = {}
    for n in range(entries):
        day_number = rng.choice(workdays)
        if spread:
            issue = str(rng.randint(1, 200))
        else:
            week = (day_number + 3) // 7
            if week not in working_sets:
                working_sets[week] = [str(rng.randint(1, 300)) for _ in range(4)]
            issue = rng.choice(working_sets[week])
        project = "p%d" % (int(issue) % 5)
        day_start = day_number * DAY
        day = flowforge.local_date(day_start, flowforge._utc())
        if rng.random() < 0.7:
            start = day_start + rng.randint(7 * 3600, 22 * 3600)
            end = start + rng.randint(300, 3 * 3600)
            record = {"segments": [[start, end]]}
        else:
            record = {"date": day, "seconds": rng.randint(60, 4 * 3600)}
        record.update(op="entry", id=day.replace("-", "") + "-%08x" % rng.getrandbits(32),
                      issue=issue, project=project, note="bench entry %d" % n, src="bench",
                      v=flowforge.RECORD_SCHEMA)
        per_day.setdefault(day, []).append(flowforge.encode_record(record))
    for day, lines in per_day.items():
        with open(store.day_path(day), "wb") as f:
            f.write(b"".join(lines))


def write_watson_frames(path, count, rng, now):
    """A Watson frames file: [start, stop, project, id, tags, updated_at], back to back
    over the last three years."""
    frames = []
    start = now - 3 * 365 * DAY
    for _ in range(count):
        start += rng.randint(10, 60)
        stop = start + rng.randint(60, 1500)
        tags = ["#%d" % rng.randint(1, 300)] if rng.random() < 0.9 else ["meeting"]
        frames.append([start, stop, "p%d" % rng.randint(1, 5), "%032x" % rng.getrandbits(128),
                       tags, stop])
        start = stop
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


def main():
    base = tempfile.mkdtemp(prefix="flowforge-bench-")
    try:
        run(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def run(base):
    rng = random.Random(2026)
    now = int(time.time())
    env = dict(os.environ, HOME=base, TZ="UTC", GIT_CONFIG_NOSYSTEM="1")
    for key in ("FLOWFORGE_NOW", "FLOWFORGE_USER"):
        env.pop(key, None)
    prefix = os.path.join(base, "prefix")
    subprocess.run([os.path.join(HERE, "install.sh"), "--prefix", prefix], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    ff = [os.path.join(prefix, "bin", "flowforge")]
    python = sys.executable

    sys.stderr.write("generating 50 users / 100,000 entries and a 100,000-entry history...\n")
    team = make_repo(os.path.join(base, "team"))
    for u in range(50):
        write_store(team, "user%02d" % u, 2000, 365, rng, now)
    worst = make_repo(os.path.join(base, "worst"))
    for u in range(50):
        write_store(worst, "user%02d" % u, 2000, 365, rng, now, spread=True)
    solo = make_repo(os.path.join(base, "solo"))
    write_store(solo, "heavy", 100000, 1000, rng, now)
    empty = make_repo(os.path.join(base, "empty"))
    flowforge.PrivateStore(empty, "fresh").create("UTC")

    rows = []
    floor = timed([python, "-c", "pass"], base, env)
    rows.append(("floor: python3 -c pass", floor, None, ""))
    floor_s = timed([python, "-S", "-c", "pass"], base, env)
    rows.append(("python3 -S -c pass (the installed command's floor)", floor_s, None, ""))

    # Empty and long history are measured interleaved, run by run, so that
    # drift in the machine's load cannot favour either side.
    samples = {key: [] for key in ("empty start", "empty stop", "heavy start", "heavy stop")}
    for run in range(RUNS):
        for name, root, user in (("empty", empty.root, "fresh"), ("heavy", solo.root, "heavy")):
            # each round on its own ten minutes, after all the history: the 2-minute
            # entries never overlap one another (FlowForge refuses overlapping time)
            e = dict(env, FLOWFORGE_USER=user, FLOWFORGE_NOW=str(now + 3600 + 600 * run))
            samples[name + " start"].append(timed(ff + ["start", "1", "--at", "-2m"], root, e, 1))
            samples[name + " stop"].append(timed(ff + ["stop"], root, e, 1))
    empty_start, empty_stop, heavy_start, heavy_stop = (
        statistics.median(samples[k]) for k in ("empty start", "empty stop", "heavy start",
                                                "heavy stop"))
    limit = floor + 0.040
    rows.append(("start, empty history", empty_start, limit, "<= floor + 40 ms"))
    rows.append(("stop, empty history", empty_stop, limit, "<= floor + 40 ms"))
    rows.append(("start, 100,000 past entries", heavy_start, min(limit, 1.1 * empty_start),
                 "<= 1.1x empty and floor + 40 ms"))
    rows.append(("stop, 100,000 past entries", heavy_stop, min(limit, 1.1 * empty_stop),
                 "<= 1.1x empty and floor + 40 ms"))

    e = dict(env, FLOWFORGE_USER="user00")
    aggstate = os.path.join(team.state, "aggregate")

    def wipe(i):
        drop_ledger(team.root, env)
        shutil.rmtree(aggstate, ignore_errors=True)
    cold = timed(ff + ["aggregate", "--full", "--all"], team.root, e, runs=5, before=wipe)
    rows.append(("aggregate --full --all, 50 users / 100,000 entries, new ledger", cold, 1.5, "<= 1.5 s"))
    warm = timed(ff + ["aggregate", "--full", "--all"], team.root, e, runs=5)
    rows.append(("aggregate --full --all, 50 users / 100,000 entries, ledger current", warm, 1.5, "<= 1.5 s"))
    # the changed day is the last weekend day: the generated history fills working
    # days (without FlowForge's day cap), and `log` refuses a day beyond 24 hours
    weekend = next(d for d in range(now // DAY - 1, 0, -1) if (d + 3) % 7 >= 5)
    day = flowforge.local_date(weekend * DAY, flowforge._utc())
    incremental = timed(ff + ["aggregate"], team.root, e,
                        before=lambda i: subprocess.run(ff + ["log", "7", "%dm" % (i + 1), "--date",
                                                              day], cwd=team.root, env=e, check=True,
                                                        capture_output=True))
    rows.append(("aggregate, one changed day (incremental)", incremental, None, ""))
    cache = os.path.join(team.state, "cache")
    report_cold = timed(ff + ["report", "--by", "user,issue"], team.root, e,
                        before=lambda i: shutil.rmtree(cache, ignore_errors=True))
    rows.append(("report --by user,issue, 50 users / 100,000 entries, from refs, cold", report_cold,
                 1.0, "<= 1 s"))
    report = timed(ff + ["report", "--by", "user,issue"], team.root, e)
    rows.append(("report --by user,issue, 50 users / 100,000 entries, from refs, warm", report, 0.3,
                 "<= 0.3 s"))

    # push of one changed store to a bare remote on this disk: the ledger's
    # share of a developer's `git push` (the pre-push hook runs exactly this).
    remote = os.path.join(base, "remote.git")
    subprocess.run(["git", "init", "-q", "--bare", remote], check=True)
    subprocess.run(["git", "remote", "add", "origin", remote], cwd=team.root, check=True)
    subprocess.run(ff + ["push", "origin"], cwd=team.root, env=e, check=True, capture_output=True)

    def change_and_aggregate(i):
        subprocess.run(ff + ["log", "8", "%dm" % (i + 1), "--date", day], cwd=team.root, env=e,
                       check=True, capture_output=True)
        subprocess.run(ff + ["aggregate"], cwd=team.root, env=e, check=True, capture_output=True)
    pushed = timed(ff + ["push", "origin"], team.root, e, before=change_and_aggregate)
    rows.append(("push, one changed store of 50 (local bare remote)", pushed, None, ""))

    # The pre-commit hook as git runs it: the shim in .git/hooks (sh, git rev-parse,
    # then Python), with all 50 users' shards present and one changed day.
    shutil.copy(os.path.join(HERE, "flowforge.py"), os.path.join(team.root, "flowforge.py"))
    subprocess.run(ff + ["install", "hooks"], cwd=team.root, env=e, check=True, capture_output=True)
    subprocess.run(["git", "add", "-A"], cwd=team.root, env=e, check=True)
    shim = [os.path.join(team.root, ".git", "hooks", "pre-commit")]

    def change_one_day(i):
        subprocess.run(ff + ["log", "7", "%dm" % (i + 1), "--date", day], cwd=team.root, env=e,
                       check=True, capture_output=True)
    hook = timed(shim, team.root, e, before=change_one_day, check=hook_aggregated)
    rows.append(("hook pre-commit (shim), 50 users' stores in the ledger, one changed day", hook,
                 floor_s + 0.1, "<= python3 -S floor + 100 ms"))
    watson = write_watson_frames(os.path.join(base, "frames.json"), 100000, rng, now)
    repos = iter(range(100))

    def fresh_repo(i):
        os.chdir(make_repo(os.path.join(base, "import-%d" % next(repos))).root)
    imported = timed(ff + ["import", "watson", watson, "--default-issue", "OPS-1"], None,
                     dict(env, FLOWFORGE_USER="importer"), runs=3, before=fresh_repo)
    os.chdir(base)
    rows.append(("import watson, 100,000 frames", imported, 3.0, "<= 3 s"))
    jobs_per_second = queue_throughput(os.path.join(base, "queue.db"))
    rows.append(("queue: enqueue + claim + ack, durable (jobs/s)", jobs_per_second, None,
                 ">= 300 jobs/s", jobs_per_second >= 300))
    subprocess.run(ff + ["aggregate", "--full", "--all"], cwd=worst.root, env=e, check=True,
                   capture_output=True)
    report = timed(ff + ["report", "--by", "user,issue"], worst.root, e)
    rows.append(("report --by user,issue, worst case: 200 issues per user every month", report,
                 None, "(no target)"))

    print("FlowForge %s bench, Python %s, %d runs per row (medians), %s"
          % (flowforge.VERSION, sys.version.split()[0], RUNS, time.strftime("%Y-%m-%d")))
    print()
    print("| what | median | target | |")
    print("| --- | ---: | --- | --- |")
    for row in rows:
        if len(row) == 5:   # a rate, higher is better
            what, value, _, target, met = row
            print("| %s | %.0f | %s | %s |" % (what, value, target, "ok" if met else "MISSED"))
            continue
        what, seconds, limit, target = row
        verdict = "" if limit is None else ("ok" if seconds <= limit else "MISSED")
        print("| %s | %.1f ms | %s | %s |" % (what, seconds * 1000, target, verdict))


if __name__ == "__main__":
    main()
