#!/usr/bin/env python3
"""make bench-peers: FlowForge, Watson and Timewarrior side by side, on identical data.

    python3 tools/bench_peers.py        BENCH_RUNS=N: rounds for start+stop (default 11;
                                        the reports run min(N, 5) rounds)

The data: 100,000 Watson frames of one user (tools/bench.py's generator: back to back,
10-60 s apart, 1-25 minutes long, ending two days ago, 90% tagged with an issue "#N", on
5 projects).  Each tool gets exactly those intervals in its own format, as setup:
  * FlowForge: `flowforge import watson FRAMES` into a new repository (then `aggregate`),
    run as the installed command (install.sh --prefix into a temporary directory);
  * Watson (td-watson, installed into .venv if missing): the frames file in a temporary
    WATSON_DIR, run as .venv/bin/watson;
  * Timewarrior (`timew` on PATH, e.g. Debian's timewarrior package): one
    data/YYYY-MM.data file per month in a temporary TIMEWARRIORDB.
A peer that is missing (and cannot be installed) is skipped, with the reason printed.

Rows, the tools interleaved round by round (their order rotating):
  * report over all history: `flowforge report --by issue` (warm: after one untimed run),
    `watson report --all --json`, `timew summary :all`.  Before timing, one untimed run of
    each must agree with the generated data: FlowForge's and Watson's JSON totals, and
    the total line of Timewarrior's summary, equal the frames' seconds.
  * start+stop with 100,000 past entries: `flowforge start OPS-1` + `flowforge stop`,
    `watson start p1 +OPS-1` + `watson stop`, `timew start OPS-1` + `timew stop`, each
    round a 2-minute interval on its own ten minutes after the history (FlowForge:
    FLOWFORGE_NOW and --at -2m; Watson: --at; Timewarrior: explicit times), the wall time
    of the two commands summed.  Afterwards every tool must hold exactly one new interval
    per round.
Medians; the ratio is FlowForge / peer (below 1: FlowForge is faster)."""
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
HERE = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)
import bench  # noqa: E402  (its frames generator and its way of running commands)

RUNS = max(1, int(os.environ.get("BENCH_RUNS", "11")))
REPORT_RUNS = min(RUNS, 5)
FRAMES = 100000
VENV = os.path.join(HERE, ".venv")


def iso(ts):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts))


def compact(ts):
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(ts))


def find_watson():
    """.venv/bin/watson, installing td-watson into .venv if it is not there; (argv, reason)."""
    watson = os.path.join(VENV, "bin", "watson")
    if not os.path.exists(watson):
        sys.stderr.write("installing td-watson into .venv...\n")
        try:
            if not os.path.exists(os.path.join(VENV, "bin", "python")):
                subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
            subprocess.run([os.path.join(VENV, "bin", "python"), "-m", "pip", "install", "--quiet",
                            "td-watson"], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            return None, "td-watson could not be installed into .venv (%s)" % e
    if not os.path.exists(watson):
        return None, "td-watson installed no .venv/bin/watson"
    return [watson], None


def find_timew():
    timew = shutil.which("timew")
    if not timew:
        return None, "timew is not on PATH (Debian: apt-get install timewarrior)"
    return [timew], None


def total_seconds(frames):
    return sum(stop - start for start, stop, *_ in frames)


def hms(seconds):
    return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


class Tool:
    """One tracker: how to run it, its report and its start+stop, and how to check them."""

    def __init__(self, name, argv, env, cwd):
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.report_times, self.startstop_times = [], []
        self.error = None

    def run(self, args, env=None):
        run = bench.execute(self.argv + args, self.cwd, env or self.env)
        if run.code:
            raise bench.Failed("%s %s exited %d: %s" % (self.name, " ".join(args), run.code,
                                                       run.text()[0]))
        return run


class FlowForge(Tool):
    def setup(self, frames_path, frames, base):
        self.repo = bench.make_repo(os.path.join(base, "flowforge"))
        self.cwd = self.repo.root
        self.env = dict(self.env, FLOWFORGE_USER="me")
        self.run(["import", "watson", frames_path, "--default-issue", "OPS-1"])
        self.run(["aggregate"])

    def report(self):
        return self.run(["report", "--by", "issue"])

    def verify_report(self, expected):
        doc = json.loads(self.run(["report", "--by", "issue", "--json"]).out)
        return None if doc.get("total_seconds") == expected else \
            "report --json total %s, the frames have %d" % (doc.get("total_seconds"), expected)

    def start_stop(self, start, stop):
        env = dict(self.env, FLOWFORGE_NOW=str(stop))
        return [self.run(["start", "OPS-1", "--at", "-%dm" % ((stop - start) // 60)], env),
                self.run(["stop"], env)]

    def intervals(self):
        return bench.entries_in(bench.flowforge.PrivateStore(self.repo, "me"))


class Watson(Tool):
    def setup(self, frames_path, frames, base):
        directory = os.path.join(base, "watson")
        os.makedirs(directory)
        shutil.copy(frames_path, os.path.join(directory, "frames"))
        with open(os.path.join(directory, "state"), "w") as f:
            f.write("{}")
        self.env = dict(self.env, WATSON_DIR=directory)
        self.frames_file = os.path.join(directory, "frames")

    def report(self):
        return self.run(["report", "--all", "--json"])

    def verify_report(self, expected):
        doc = json.loads(self.report().out)
        return None if round(doc.get("time", -1)) == expected else \
            "report --all --json time %s, the frames have %d" % (doc.get("time"), expected)

    def start_stop(self, start, stop):
        return [self.run(["start", "p1", "+OPS-1", "--at", iso(start)]),
                self.run(["stop", "--at", iso(stop)])]

    def intervals(self):
        with open(self.frames_file) as f:
            return len(json.load(f))


class Timewarrior(Tool):
    def setup(self, frames_path, frames, base):
        directory = os.path.join(base, "timewarrior")
        os.makedirs(os.path.join(directory, "data"))
        open(os.path.join(directory, "timewarrior.cfg"), "w").close()
        months = {}
        for start, stop, project, _, tags, _ in frames:
            words = [project] + ['"%s"' % t if t.startswith("#") else t for t in tags]
            months.setdefault(time.strftime("%Y-%m", time.gmtime(start)), []).append(
                "inc %s - %s # %s\n" % (compact(start), compact(stop), " ".join(words)))
        for month, lines in months.items():
            with open(os.path.join(directory, "data", month + ".data"), "w") as f:
                f.writelines(lines)
        self.env = dict(self.env, TIMEWARRIORDB=directory)
        self.run(["summary", ":all"])   # rebuilds its tags database once, untimed

    def report(self):
        return self.run(["summary", ":all"])

    def verify_report(self, expected):
        lines = [line.strip() for line in self.report().out.decode().splitlines() if line.strip()]
        return None if lines and lines[-1] == hms(expected) else \
            "summary :all ends with %r, the frames have %s" % (lines[-1:] or "", hms(expected))

    def start_stop(self, start, stop):
        return [self.run(["start", iso(start) + "Z", "OPS-1"]), self.run(["stop", iso(stop) + "Z"])]

    def intervals(self):
        return len(json.loads(self.run(["export", ":all"]).out))


def rounds(tools, count, step):
    """count rounds; each runs step(tool, i) for every tool still standing, order rotating."""
    for i in range(count):
        shift = i % len(tools)
        for tool in tools[shift:] + tools[:shift]:
            if tool.error:
                continue
            try:
                step(tool, i)
            except (bench.Failed, ValueError, OSError) as e:
                tool.error = str(e)


def main():
    started = time.time()
    base = tempfile.mkdtemp(prefix="flowforge-peers-")
    try:
        return run(base, started)
    finally:
        os.chdir(HERE)
        shutil.rmtree(base, ignore_errors=True)


def run(base, started):
    now = int(time.time())
    env = dict(os.environ, HOME=base, TZ="UTC", GIT_CONFIG_NOSYSTEM="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for key in list(env):
        if key.startswith(("FLOWFORGE_", "WATSON_", "TIMEWARRIOR")):
            del env[key]
    print(bench.machine())
    print("make bench-peers: %d rounds of start+stop, %d of each report" % (RUNS, REPORT_RUNS))
    os.chdir(base)
    prefix = os.path.join(base, "prefix")
    subprocess.run([os.path.join(HERE, "install.sh"), "--prefix", prefix], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    tools = [FlowForge("FlowForge", [os.path.join(prefix, "bin", "flowforge")], env, base)]
    skipped = []
    for name, cls, find in (("Watson", Watson, find_watson), ("Timewarrior", Timewarrior, find_timew)):
        argv, reason = find()
        if argv:
            tools.append(cls(name, argv, env, base))
        else:
            skipped.append("%s skipped: %s" % (name, reason))
    versions = []
    for tool in tools[1:]:
        out = subprocess.run(tool.argv + ["--version"], capture_output=True, text=True).stdout
        versions.append("%s %s" % (tool.name, out.strip().split()[-1] if out.strip() else "?"))
    print("peers: %s" % ", ".join(versions + skipped or ["none"]))

    sys.stderr.write("generating %d frames and setting the three tools up...\n" % FRAMES)
    frames_path = bench.write_watson_frames(os.path.join(base, "frames.json"), FRAMES,
                                            random.Random(2026), now)
    with open(frames_path) as f:
        frames = json.load(f)
    expected = total_seconds(frames)
    for tool in tools:
        t = time.time()
        try:
            tool.setup(frames_path, frames, base)
            tool.report()   # warm: FlowForge fills its ledger cache here
            tool.error = tool.verify_report(expected)
        except (bench.Failed, ValueError, OSError) as e:
            tool.error = "setup: %s" % e
        sys.stderr.write("  %s ready in %.1f s%s\n" % (tool.name, time.time() - t,
                                                       " (%s)" % tool.error if tool.error else ""))
    before = {tool.name: tool.intervals() for tool in tools if not tool.error}

    sys.stderr.write("report over all history, %d rounds...\n" % REPORT_RUNS)
    rounds(tools, REPORT_RUNS, lambda tool, i: tool.report_times.append(tool.report().seconds))

    sys.stderr.write("start+stop, %d rounds...\n" % RUNS)
    first = frames[-1][1] + 600

    def start_stop(tool, i):
        runs = tool.start_stop(first + 600 * i, first + 600 * i + 120)
        tool.startstop_times.append(sum(run.seconds for run in runs))
    rounds(tools, RUNS, start_stop)
    for tool in tools:
        if not tool.error:
            added = tool.intervals() - before[tool.name]
            if added != RUNS:
                tool.error = "%d new intervals after %d start+stop rounds" % (added, RUNS)

    print()
    names = [tool.name for tool in tools]
    print("| what (100,000 past entries, one user) | %s | %s |"
          % (" | ".join(names), " | ".join("FlowForge / %s" % n for n in names[1:])))
    print("| --- |%s" % (" ---: |" * (2 * len(names) - 1)))
    for what, attr in (("report over all history", "report_times"), ("start + stop", "startstop_times")):
        medians = [None if tool.error else statistics.median(getattr(tool, attr)) for tool in tools]
        cells = ["FAILED" if m is None else bench.ms(m) for m in medians]
        for m in medians[1:]:
            cells.append("-" if m is None or medians[0] is None else "%.3f (%s)" % (
                medians[0] / m, "%.1fx faster" % (m / medians[0]) if m > medians[0]
                else "%.1fx slower" % (medians[0] / m)))
        print("| %s | %s |" % (what, " | ".join(cells)))
    print()
    print("commands: FlowForge `report --by issue` / `start OPS-1` + `stop`; Watson `report --all "
          "--json` / `start p1 +OPS-1` + `stop`; Timewarrior `summary :all` / `start OPS-1` + `stop`")
    for line in skipped:
        print(line)
    failed = [tool for tool in tools if tool.error]
    for tool in failed:
        print("FAILED: %s: %s" % (tool.name, tool.error))
    print("the peers bench took %.0f s" % (time.time() - started))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
