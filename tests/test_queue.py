"""The sqlite3 retry queue: state machine, order, backoff, fencing, races, kill -9."""
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import flowforge as ff

from conftest import ROOT, SOAK


class Clock:
    def __init__(self, start=1_000_000.0):
        self.t = start

    def __call__(self):
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def queue(tmp_path, clock):
    q = ff.RetryQueue(str(tmp_path / "queue.db"), clock=clock, rng=random.Random(1))
    yield q
    q.close()


def test_state_machine(queue, clock):
    job_id, created = queue.enqueue("aggregate", {"user": "a"})
    assert created
    job = queue.claim("w1")
    assert (job.id, job.attempts, job.payload) == (job_id, 1, {"user": "a"})
    assert queue.claim("w2") is None                       # leased: nobody else gets it
    queue.ack(job)
    with pytest.raises(ff.LeaseLost):
        queue.ack(job)                                     # a double ack is rejected
    with pytest.raises(ff.LeaseLost):
        queue.fail(job, "late")
    [row] = queue.jobs()
    assert row["status"] == "done" and row["done_at"] == clock.t
    assert queue.stats()["jobs_done_total"] == 1


def test_failures_back_off_then_dead_letter_with_the_last_error(queue, clock):
    queue.enqueue("aggregate", {}, max_attempts=3)
    for attempt in range(1, 4):
        job = queue.claim("w")
        assert job is not None and job.attempts == attempt
        outcome = queue.fail(job, "boom %d" % attempt)
        [row] = queue.jobs()
        if attempt < 3:
            assert outcome == "queued" and row["status"] == "queued"
            assert clock.t <= row["next_attempt_at"] <= clock.t + 2 ** attempt
            assert row["next_attempt_at"] > clock.t          # seeded jitter: a real wait
            assert queue.claim("w") is None                  # not before its time
            clock.t = row["next_attempt_at"]
    assert outcome == "dead"
    assert row["status"] == "dead" and row["last_error"] == "boom 3" and row["attempts"] == 3
    assert queue.claim("w") is None
    queue.retry(row["id"])
    job = queue.claim("w")
    assert job.attempts == 1
    queue.fail(job, "never again", permanent=True)
    assert queue.jobs()[0]["status"] == "dead"
    assert queue.stats()["jobs_dead_total"] == 2


def test_expired_lease_is_an_attempt_and_fences_the_old_worker(queue, clock):
    queue.enqueue("aggregate", {}, max_attempts=2)
    first = queue.claim("w1", lease=10)
    clock.t += 11
    assert queue.claim("w2") is None          # expired: an attempt, retried after a backoff
    clock.t = queue.jobs()[0]["next_attempt_at"]
    second = queue.claim("w2", lease=10)
    assert second.id == first.id and second.attempts == 2 and second.token != first.token
    with pytest.raises(ff.LeaseLost):
        queue.ack(first)
    queue.ack(second)
    # an expired lease that nobody took over still cannot be acknowledged
    queue.enqueue("aggregate", {"n": 2})
    third = queue.claim("w3", lease=5)
    clock.t += 6
    with pytest.raises(ff.LeaseLost):
        queue.ack(third)


def test_lease_expiry_counts_towards_dead_letter(queue, clock):
    queue.enqueue("aggregate", {}, max_attempts=1)
    queue.claim("w", lease=1)
    clock.t += 2
    assert queue.claim("w") is None
    [row] = queue.jobs()
    assert row["status"] == "dead" and "lease expired" in row["last_error"]


def test_priority_then_fifo_and_delays(queue, clock):
    ids = {}
    for name, priority in (("low", "low"), ("n1", "normal"), ("n2", "normal"), ("high", "high"),
                           ("crit", "critical")):
        ids[name] = queue.enqueue("aggregate", {"name": name}, priority=priority)[0]
    ids["later"] = queue.enqueue("aggregate", {"name": "later"}, priority="critical", delay=60)[0]
    order = []
    while True:
        job = queue.claim("w")
        if job is None:
            break
        order.append(job.payload["name"])
        queue.ack(job)
    assert order == ["crit", "high", "n1", "n2", "low"]
    clock.t += 60
    assert queue.claim("w").payload["name"] == "later"


def test_idempotency_keys(queue):
    a, created_a = queue.enqueue("aggregate", {}, key="aggregate:alice")
    b, created_b = queue.enqueue("aggregate", {}, key="aggregate:alice")
    assert a == b and created_a and not created_b
    job = queue.claim("w")
    assert queue.enqueue("aggregate", {}, key="aggregate:alice") == (a, False)   # still active
    queue.ack(job)
    c, created_c = queue.enqueue("aggregate", {}, key="aggregate:alice")         # a new need
    assert created_c and c != a
    d, _ = queue.enqueue("sync", {}, key="once-only", once=True)
    queue.ack(queue.claim("w", kinds=["sync"]))
    assert queue.enqueue("sync", {}, key="once-only", once=True) == (d, False)


def test_backoff_bounds_and_determinism():
    for attempt in (0, 1, 2, 5, 11, 12, 100, 1000, 10 ** 6):
        rng = random.Random(attempt)
        for _ in range(50):
            delay = ff.backoff_delay(attempt, rng)
            assert 0 <= delay <= min(ff.BACKOFF_CAP, 2.0 ** min(attempt, 64))
    seq = [ff.backoff_delay(n, random.Random(42)) for n in range(30)]
    assert seq == [ff.backoff_delay(n, random.Random(42)) for n in range(30)]
    assert ff.retry_delay(3, random.Random(1), retry_after=500) >= 500
    assert ff.retry_delay(10 ** 9, random.Random(1), retry_after=10 ** 12) == ff.RETRY_AFTER_MAX


def test_full_jitter_spreads_simultaneous_failures():
    rng = random.Random(7)
    delays = [ff.backoff_delay(10, rng) for _ in range(1000)]     # a 1024 s window
    buckets = {}
    for d in delays:
        buckets[int(d)] = buckets.get(int(d), 0) + 1
    assert max(buckets.values()) <= 15                         # no second gets more than 1.5 %


NOW_TS = 1_800_000_000.0   # 2027-01-15


def http_date(ts):
    from email.utils import formatdate
    return formatdate(ts, usegmt=True)


@pytest.mark.parametrize("value,expected", [
    ("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("99999999999999", ff.RETRY_AFTER_MAX),
    ("9" * 5000, ff.RETRY_AFTER_MAX), ("-5", None), ("1.5", None), ("soon", None), ("", None),
    (None, None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), (http_date(NOW_TS + 90), 90.0),
    ("Fri, 31 Dec 9999 23:59:59 GMT", ff.RETRY_AFTER_MAX), ("Mon, 99 Foo 2020 99:99:99 GMT", None),
])
def test_retry_after_parsing(value, expected):
    assert ff.parse_retry_after(value, NOW_TS) == expected


def test_unknown_kinds_are_dead_lettered_not_crashed_on(queue, tmp_path):
    queue.enqueue("no.such-kind", {"x": 1})
    job = queue.claim("w")
    repo = ff.Repo(str(tmp_path))
    assert ff.run_job(repo, queue, job) == "dead"
    assert "unknown job kind" in queue.jobs()[0]["last_error"]


def test_handler_outcomes(queue, tmp_path, monkeypatch):
    repo = ff.Repo(str(tmp_path))
    calls = []

    def handler(repo, payload, job, queue):
        calls.append(payload["do"])
        if payload["do"] == "later":
            raise ff.RetryLater("rate limited", after=300)
        if payload["do"] == "never":
            raise ff.PermanentFailure("bad request: no such page")
        if payload["do"] == "crash":
            raise KeyError("oops")
    monkeypatch.setitem(ff.JOB_KINDS, "test.kind", handler)
    outcomes = {}
    for do in ("ok", "later", "never", "crash"):
        queue.enqueue("test.kind", {"do": do})
        outcomes[do] = ff.run_job(repo, queue, queue.claim("w"))
    assert outcomes == {"ok": "done", "later": "queued", "never": "dead", "crash": "queued"}
    rows = {r["payload"]["do"]: r for r in queue.jobs()}
    assert rows["later"]["next_attempt_at"] >= queue.clock() + 300
    assert rows["never"]["last_error"] == "bad request: no such page"
    assert rows["crash"]["last_error"].startswith("KeyError")


def test_schema_from_the_future_is_refused(tmp_path):
    path = str(tmp_path / "queue.db")
    ff.RetryQueue(path).enqueue("aggregate", {})
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    conn.commit()
    conn.close()
    with pytest.raises(ff.FlowForgeError) as e:
        ff.RetryQueue(path).stats()
    assert e.value.exit_code == ff.EXIT_CONFIG and "newer" in str(e.value)


def test_settings_wal_and_full_sync(queue):
    conn = queue.connect()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2      # FULL
    assert os.stat(queue.path).st_mode & 0o777 == 0o600


def test_connection_is_not_used_across_fork(queue):
    queue.enqueue("aggregate", {})
    pid = os.fork()
    if pid == 0:
        try:
            queue.enqueue("aggregate", {})
            os._exit(1)
        except ff.FlowForgeError as e:
            os._exit(0 if "fork" in str(e) else 2)
        except BaseException:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_network_filesystems_are_refused(tmp_path, monkeypatch):
    mounts = tmp_path / "mounts"
    mounts.write_text("server:/export %s nfs4 rw 0 0\n/dev/sda1 / ext4 rw 0 0\n" % tmp_path)
    assert ff.filesystem_type(str(tmp_path / "x"), str(mounts)) == "nfs4"
    assert ff.filesystem_type("/usr", str(mounts)) == "ext4"
    monkeypatch.setattr(ff, "filesystem_type", lambda path, mounts=None: "nfs4")
    with pytest.raises(ff.FlowForgeError) as e:
        ff.RetryQueue(str(tmp_path / "q.db")).stats()
    assert e.value.exit_code == ff.EXIT_UNAVAILABLE and "network file system" in str(e.value)


def test_wal_reset_bug_versions():
    assert ff.sqlite_wal_reset_bug((3, 40, 1))
    assert not ff.sqlite_wal_reset_bug((3, 51, 3))
    assert not ff.sqlite_wal_reset_bug((3, 50, 7)) and ff.sqlite_wal_reset_bug((3, 50, 6))
    assert not ff.sqlite_wal_reset_bug((3, 44, 6)) and ff.sqlite_wal_reset_bug((3, 45, 0))
    assert not ff.sqlite_wal_reset_bug((3, 6, 23))


def test_wal_file_stays_bounded(tmp_path):
    q = ff.RetryQueue(str(tmp_path / "queue.db"))
    for i in range(3000):
        q.enqueue("aggregate", {"i": i, "pad": "x" * 200})
        q.ack(q.claim("w"))
    for _ in range(3000):
        assert q.claim("w") is None          # a daemon polling an empty queue
    assert os.path.getsize(str(tmp_path / "queue.db-wal")) < 8 << 20
    assert q.integrity_check() == "ok"


PRELUDE = "import os, sys, time, json, random, signal\nsys.path.insert(0, %r)\nimport flowforge\n" % ROOT

CLAIMER = PRELUDE + r"""
q = flowforge.RetryQueue(sys.argv[1], busy_timeout=30)
claimed = []
while True:
    job = q.claim("w%d" % os.getpid())
    if job is None:
        break
    q.ack(job)
    claimed.append(job.id)
print(json.dumps(claimed))
"""


def test_8_processes_claim_2000_jobs_exactly_once(tmp_path):
    path = str(tmp_path / "queue.db")
    q = ff.RetryQueue(path)
    for i in range(2000):
        q.enqueue("aggregate", {"i": i})
    q.close()
    procs = [subprocess.Popen([sys.executable, "-S", "-c", CLAIMER, path], stdout=subprocess.PIPE)
             for _ in range(8)]
    claimed = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        claimed += json.loads(out)
    assert sorted(claimed) == list(range(1, 2001))
    assert ff.RetryQueue(path).stats()["counts"]["done"] == 2000


ENQUEUER = PRELUDE + r"""
q = flowforge.RetryQueue(sys.argv[1], busy_timeout=30)
ids = set()
for _ in range(8):
    ids.add(q.enqueue("aggregate", {}, key="same-key")[0])
print(json.dumps(sorted(ids)))
"""


def test_8_processes_enqueue_one_key_once(tmp_path):
    path = str(tmp_path / "queue.db")
    ff.RetryQueue(path).stats()
    procs = [subprocess.Popen([sys.executable, "-S", "-c", ENQUEUER, path], stdout=subprocess.PIPE)
             for _ in range(8)]
    ids = set()
    for p in procs:
        out, _ = p.communicate(timeout=120)
        ids.update(json.loads(out))
    assert len(ids) == 1
    assert ff.RetryQueue(path).stats()["counts"]["queued"] == 1


HOLDER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def test_busy_timeout_waits_then_fails_as_temporary(tmp_path):
    path = str(tmp_path / "queue.db")
    ff.RetryQueue(path).stats()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path, "1.5"], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    started = time.monotonic()
    job_id, created = ff.RetryQueue(path, busy_timeout=5).enqueue("aggregate", {})
    assert created and time.monotonic() - started >= 1.0
    holder.wait()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, path, "4"], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    with pytest.raises(ff.LockBusy) as e:
        ff.RetryQueue(path, busy_timeout=1).enqueue("aggregate", {"n": 2})
    assert e.value.exit_code == ff.EXIT_TEMPFAIL
    holder.wait()
    assert ff.RetryQueue(path).stats()["counts"]["queued"] == 1   # the failed call wrote nothing


STOPPED_WORKER = PRELUDE + r"""
q = flowforge.RetryQueue(sys.argv[1], busy_timeout=30)
job = q.claim("slow", lease=1.0)
print("claimed", job.id, flush=True)
sys.stdin.readline()            # the test SIGSTOPs us here, past the lease
def effect(conn):
    conn.execute("INSERT INTO effects (job, worker) VALUES (?, 'slow')", (job.id,))
try:
    q.ack(job, effect=effect)
    print("acked")
except flowforge.LeaseLost:
    print("rejected")
"""


def test_fencing_a_stopped_worker_cannot_ack(tmp_path):
    path = str(tmp_path / "queue.db")
    q = ff.RetryQueue(path)
    q.connect().execute("CREATE TABLE effects (job INTEGER, worker TEXT)")
    q.enqueue("aggregate", {})
    slow = subprocess.Popen([sys.executable, "-S", "-c", STOPPED_WORKER, path],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert slow.stdout.readline().startswith("claimed")
    slow.send_signal(signal.SIGSTOP)
    time.sleep(1.3)                                   # past the lease
    job = None
    deadline = time.monotonic() + 10
    while job is None and time.monotonic() < deadline:   # due after its backoff
        job = q.claim("fast")
        time.sleep(0.05)
    assert job is not None
    q.ack(job, effect=lambda conn: conn.execute(
        "INSERT INTO effects (job, worker) VALUES (?, 'fast')", (job.id,)))
    slow.send_signal(signal.SIGCONT)
    out, _ = slow.communicate("go\n", timeout=30)
    assert out.strip() == "rejected"
    assert [tuple(r) for r in q.connect().execute("SELECT worker FROM effects")] == [("fast",)]


SOAK_WORKER = PRELUDE + r"""
q = flowforge.RetryQueue(sys.argv[1], busy_timeout=30)
rng = random.Random(os.getpid())
while True:
    job = q.claim("w%d" % os.getpid(), lease=1.0)
    if job is None:
        time.sleep(0.01)
        continue
    time.sleep(rng.random() * 0.004)
    try:
        q.ack(job, effect=lambda conn: conn.execute(
            "INSERT INTO effects (key) VALUES (?)", (job.key,)))
    except flowforge.LeaseLost:
        pass
"""

SOAK_ENQUEUER = PRELUDE + r"""
q = flowforge.RetryQueue(sys.argv[1], busy_timeout=30)
name, count = sys.argv[2], int(sys.argv[3])
for i in range(count):
    q.enqueue("test.effect", {"i": i}, key="%s-%d" % (name, i), once=True, max_attempts=1000)
print("done", flush=True)
"""


def test_kill9_soak_every_job_done_once(tmp_path):
    """8 workers and 2 enqueuers, SIGKILLed at random: every job ends done (or dead),
    each effect happens exactly once, and the database passes integrity_check."""
    path = str(tmp_path / "queue.db")
    q = ff.RetryQueue(path)
    # the effect table: UNIQUE, so a doubled effect would fail the ack's transaction
    q.connect().execute("CREATE TABLE effects (key TEXT UNIQUE NOT NULL)")
    per_enqueuer = 1500 if SOAK else 400
    target_kills = 1000 if SOAK else 100
    rng = random.Random(99)

    def start(kind, n):
        if kind == "worker":
            return subprocess.Popen([sys.executable, "-S", "-c", SOAK_WORKER, path])
        return subprocess.Popen([sys.executable, "-S", "-c", SOAK_ENQUEUER, path, "e%d" % n,
                                 str(per_enqueuer)], stdout=subprocess.PIPE)
    procs = [("worker", n, start("worker", n)) for n in range(8)] + \
            [("enqueuer", n, start("enqueuer", n)) for n in range(2)]
    finished_enqueuers = set()
    kills = 0
    deadline = time.monotonic() + (900 if SOAK else 240)
    while time.monotonic() < deadline:
        time.sleep(rng.uniform(0.02, 0.12))
        for kind, n, p in procs:
            if kind == "enqueuer" and p.poll() == 0:
                finished_enqueuers.add(n)
        if kills >= target_kills and len(finished_enqueuers) == 2:
            break
        candidates = [i for i, (kind, n, p) in enumerate(procs)
                      if p.poll() is None and not (kind == "enqueuer" and n in finished_enqueuers)]
        if not candidates:
            continue
        i = rng.choice(candidates)
        kind, n, p = procs[i]
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        procs[i] = (kind, n, start(kind, n))     # restart it; an enqueuer re-enqueues from 0
    assert kills >= target_kills and len(finished_enqueuers) == 2
    # let the workers finish the rest, expired leases included
    check = ff.RetryQueue(path)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        counts = check.stats()["counts"]
        if counts["queued"] == counts["leased"] == 0:
            break
        # jobs whose workers were killed wait out a backoff: skip the waiting, not the retry
        check._write(lambda conn: conn.execute(
            "UPDATE jobs SET next_attempt_at = 0 WHERE status = 'queued'"))
        time.sleep(0.2)
    for _, _, p in procs:
        p.kill()
        p.wait()
    counts = check.stats()["counts"]
    total = 2 * per_enqueuer
    assert counts["queued"] == counts["leased"] == 0
    assert counts["done"] + counts["dead"] == total
    conn = check.connect()
    effects = [row[0] for row in conn.execute("SELECT key FROM effects")]
    done_keys = {row[0] for row in conn.execute("SELECT idem_key FROM jobs WHERE status = 'done'")}
    assert len(effects) == len(set(effects)) == counts["done"]
    assert set(effects) == done_keys
    assert check.integrity_check() == "ok"
    print("\n%d SIGKILLs; %d jobs done, %d dead" % (kills, counts["done"], counts["dead"]))


def test_settle_key_finishes_waiting_jobs_but_not_running_ones(queue, clock):
    waiting, _ = queue.enqueue("aggregate", {"user": "a"}, key="aggregate:a", failed=True)
    other, _ = queue.enqueue("aggregate", {"user": "b"}, key="aggregate:b")
    running = queue.claim("w")                      # job a is now leased
    assert running.id == waiting
    assert queue.settle_key("aggregate:a") == 0     # a running job is left alone
    queue.fail(running, "busy")
    clock.t += 10
    assert queue.settle_key("aggregate:a") == 1
    statuses = {j["id"]: j["status"] for j in queue.jobs()}
    assert statuses == {waiting: "done", other: "queued"}
    assert queue.stats()["recovery_count"] == 1
