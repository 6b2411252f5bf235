"""`make test`'s runner (tools/run_tests.py): its shards split the suite without
overlap or gap, and its exit code says whether anything ran and failed."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

RUNNER = os.path.join(ROOT, "tools", "run_tests.py")
needs_two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: one shard")


def run(*args, jobs="2"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWFORGE_")}
    return subprocess.run([sys.executable, RUNNER] + list(args), cwd=ROOT, capture_output=True,
                          text=True, env=dict(env, TEST_JOBS=jobs), timeout=300)


def listed_ids(text):
    return [line for line in text.splitlines() if "::" in line and not line.startswith(" ")]


@needs_two_cores
def test_the_shards_split_the_suite_without_overlap_or_gap():
    whole = run("--collect-only", jobs="1")
    assert whole.returncode == 0, whole.stderr
    split = run("--collect-only")
    assert split.returncode == 0, split.stdout[-2000:] + split.stderr
    first, second = split.stdout.split("--- shard 2 of 2 ---")
    a, b = listed_ids(first), listed_ids(second)
    assert a and b and not set(a) & set(b)
    assert sorted(a + b) == sorted(listed_ids(whole.stdout)) and len(a + b) > 800
    assert abs(len(a) - len(b)) <= 1
    assert "shards: passed, passed" in split.stdout


@needs_two_cores
def test_a_selection_that_leaves_a_shard_without_tests_is_no_failure():
    one = run("--collect-only", "-k", "test_scheduler_entries")
    assert one.returncode == 0 and "no tests" in one.stdout and "FAILED" not in one.stdout, one.stdout
    none = run("--collect-only", "-k", "no_test_is_named_like_this")
    assert none.returncode == 5 and "shards: no tests, no tests" in none.stdout, none.stdout


@needs_two_cores
def test_a_failing_shard_fails_the_run_and_keeps_its_files():
    bad = run("-q", "-k", "test_scheduler_entries", "--no-such-pytest-option")
    assert bad.returncode == 4, bad.stdout + bad.stderr   # pytest's usage error, from both shards
    assert "FAILED (exit 4)" in bad.stdout and "stay in" in bad.stdout
    kept = bad.stdout.rsplit("stay in ", 1)[1].split()[0]
    assert os.path.isdir(kept)
    import shutil
    shutil.rmtree(kept)


def processes_naming(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@needs_two_cores
def test_sigterm_stops_every_shard_and_keeps_their_files():
    """SIGTERM (a cancelled CI job) in the middle of two slow tests: the runner
    passes it on, each shard ends, the runner exits 130 and names the files."""
    import signal
    import time
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWFORGE_")}
    proc = subprocess.Popen(
        [sys.executable, RUNNER, "-k", "test_random_kill9_during_timers_logs_and_aggregation or "
         "test_an_import_streams_in_bounded_memory"], cwd=ROOT, env=dict(env, TEST_JOBS="2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        scratch = os.path.dirname(first.rsplit("write to ", 1)[1].split()[0].rstrip(","))
        deadline = time.monotonic() + 30
        while len(processes_naming(scratch)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)   # into the tests
        assert len(processes_naming(scratch)) >= 2
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and scratch in err
    assert processes_naming(scratch) == []
    import shutil
    shutil.rmtree(scratch, ignore_errors=True)
