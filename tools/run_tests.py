"""`make test`: the whole suite in TEST_JOBS pytest processes (2 by default, never
more than the cores this process may use; TEST_JOBS=1 runs it as one), each given
every n-th test (FLOWFORGE_TEST_SHARD, tests/conftest.py) and a scratch directory
of its own.

The first shard prints as it goes; the others' output follows once they end, then
a line with each shard's outcome.  The exit code is the first failing shard's (a
shard that a signal ended: 128 + the signal), 0 when every shard passed.  The
scratch directory is removed when every shard passed, and named otherwise, so
that the files of a failed test can be looked at.  Ctrl-C or SIGTERM is passed on
to every shard, which gets 30 s to clean up (tmpfs mounts, immutable files,
children) before it is killed."""
import os
import signal
import subprocess
import sys
import tempfile
import time

NO_TESTS = 5   # pytest's exit code when a shard was given no test (a narrow -k)


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def job_count():
    try:
        wanted = int(os.environ.get("TEST_JOBS") or 2)
    except ValueError:
        sys.exit("run_tests: TEST_JOBS must be a whole number, not %r" % os.environ["TEST_JOBS"])
    return max(1, min(wanted, usable_cores()))


def exit_code(code):
    return 128 - code if code < 0 else code


def stop(procs, grace=30.0):
    """SIGINT to every shard's process group, then SIGKILL after `grace` seconds."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def main(argv):
    jobs = job_count()
    env = {k: v for k, v in os.environ.items() if k != "FLOWFORGE_TEST_SHARD"}
    args = [sys.executable, "-m", "pytest", "-q"] + argv
    if not any(a.startswith("tests") for a in argv):
        args.append("tests")
    if jobs == 1:
        return exit_code(subprocess.call(args, env=env))
    scratch = tempfile.mkdtemp(prefix="ff-tests-")
    logs = [open(os.path.join(scratch, "shard%d.log" % n), "w+b") for n in range(2, jobs + 1)]
    print("tests in %d processes; shard 1 of %d prints as it runs, the others write to %s"
          % (jobs, jobs, ", ".join(log.name for log in logs)), flush=True)
    procs = []

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupted)
    try:
        for n in range(jobs):
            # each shard in its own session: a signal reaches the runner, which passes
            # it on and waits, rather than every process at once
            procs.append(subprocess.Popen(
                args + ["--basetemp", os.path.join(scratch, "tmp%d" % n)],
                env=dict(env, FLOWFORGE_TEST_SHARD="%d/%d" % (n, jobs)), start_new_session=True,
                stdin=subprocess.DEVNULL, **({} if n == 0 else {
                    "stdout": logs[n - 1], "stderr": subprocess.STDOUT})))
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        print("\nrun_tests: interrupted; stopping the shards", file=sys.stderr, flush=True)
        stop(procs)
        print("run_tests: their files stay in %s" % scratch, file=sys.stderr)
        return 130
    for n, log in enumerate(logs, 2):
        log.seek(0)
        print("\n--- shard %d of %d ---" % (n, jobs), flush=True)
        sys.stdout.buffer.write(log.read())
        sys.stdout.buffer.flush()
        log.close()
    codes = [exit_code(c) for c in codes]
    # a shard that a narrow selection left without tests has not failed
    failed = [c for c in codes if c not in (0, NO_TESTS)] or (
        [NO_TESTS] if all(c == NO_TESTS for c in codes) else [])
    print("\nshards: %s" % ", ".join("passed" if c == 0 else "no tests" if c == NO_TESTS
                                     else "FAILED (exit %d)" % c for c in codes), flush=True)
    if failed:
        print("the shards' files stay in %s" % scratch, flush=True)
        return failed[0]
    import shutil
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
