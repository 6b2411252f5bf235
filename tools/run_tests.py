"""`make test`: the whole suite in one pytest process per core (at most
TEST_JOBS, 2 by default; TEST_JOBS=1 runs it as one), each given every n-th
test (tests/conftest.py) and a scratch directory of its own.

The first process prints as it goes; the others' output follows once they end.
The exit code is the first non-zero one of them (0 when every test passed)."""
import os
import subprocess
import sys
import tempfile


def main(argv):
    jobs = max(1, min(int(os.environ.get("TEST_JOBS", "2")), os.cpu_count() or 1))
    args = [sys.executable, "-m", "pytest", "-q"] + argv
    if jobs == 1:
        return subprocess.call(args + ["tests"])
    with tempfile.TemporaryDirectory(prefix="ff-tests-") as scratch:
        others = []
        for index in range(1, jobs):
            log = open(os.path.join(scratch, "shard%d.log" % index), "w+")
            env = dict(os.environ, FLOWFORGE_TEST_SHARD="%d/%d" % (index, jobs))
            others.append((subprocess.Popen(
                args + ["--basetemp", os.path.join(scratch, "tmp%d" % index), "tests"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log))
        print("tests in %d processes; this one shows shard 1 of %d as it runs" % (jobs, jobs),
              flush=True)
        env = dict(os.environ, FLOWFORGE_TEST_SHARD="0/%d" % jobs)
        try:
            codes = [subprocess.call(args + ["--basetemp", os.path.join(scratch, "tmp0"),
                                             "tests"], env=env)]
        except BaseException:   # Ctrl-C: the others end too before their scratch goes
            for proc, _ in others:
                proc.terminate()
                proc.wait()
            raise
        for index, (proc, log) in enumerate(others, 2):
            codes.append(proc.wait())
            log.seek(0)
            print("\n--- shard %d of %d ---" % (index, jobs), flush=True)
            sys.stdout.write(log.read())
            log.close()
        print("\nshards: %s" % ", ".join("%s" % ("passed" if c == 0 else "FAILED (exit %d)" % c)
                                         for c in codes), flush=True)
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
