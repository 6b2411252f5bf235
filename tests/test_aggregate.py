"""Aggregation into shards: exactness, incrementality, privacy, damage handling."""
import json
import os
import random
import subprocess

import pytest

import flowforge as ff

from conftest import (clean_env, git, ledger_files, lock_held, private_total, rewrite_ledger,
                      store_key_of, store_keys, team_total)

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def shard_bytes(root, user="alice"):
    """{"YYYY-MM.json": bytes} of the shards at the tip of the user's store ref
    ({} while the store has no ref yet)."""
    if not any(k.rpartition("--")[0] == user for k in store_keys(root)):
        return {}
    return {name[len("summaries/"):]: data for name, data in ledger_files(root, user).items()
            if name.startswith("summaries/")}


def shard_docs(root, user="alice"):
    """{"YYYY-MM.json": verified document} of the user's shards in the ledger."""
    return {name: ff.verify_shard_bytes(data) for name, data in shard_bytes(root, user).items()}


def store_ref(root, user="alice"):
    return "refs/flowforge/stores/" + store_key_of(root, user)


def test_shard_content(repo):
    repo.ok("start", "owner/repo#5", "--project", "web", "--at", "2026-11-19 09:00", env=NOW)
    repo.ok("stop", "--at", "2026-11-19 10:30", env=NOW)
    repo.ok("log", "ABC-1", "45m", "--date", "2026-11-18", env=NOW)
    assert store_keys(repo.root) == {}                 # nothing in the ledger before aggregating
    repo.ok("aggregate", env=NOW)
    key = store_key_of(repo.root)
    assert key.startswith("alice--")
    files = ledger_files(repo.root)
    assert sorted(files) == ["audit/2026.jsonl", "summaries/2026-11.json"]
    doc = ff.verify_shard_bytes(files["summaries/2026-11.json"])
    assert (doc["user"], doc["store"], doc["month"]) == ("alice", key.rpartition("--")[2], "2026-11")
    assert doc["rows"] == [["2026-11-18", "ABC-1", "", 2700], ["2026-11-19", "owner/repo#5", "web", 5400]]
    assert doc["totals"] == {"seconds": 8100, "by_issue": {"ABC-1": 2700, "owner/repo#5": 5400},
                             "by_project": {"": 2700, "web": 5400},
                             "by_period": {"2026-11-18": 2700, "2026-11-19": 5400}}
    assert doc["schema"] == 1 and len(doc["sha256"]) == 64
    ff.check_shard_sums(doc)
    # plain files in the ledger, and nothing written into the work tree's old team layout
    modes = {line.split()[0] for line in git(repo.root, "ls-tree", "-r", store_ref(repo.root))
             .splitlines()}
    assert modes == {"100644"}
    assert not os.path.exists(os.path.join(repo.root, ".flowforge/team"))
    assert team_total(repo) == 8100


def test_rerun_rewrites_nothing(repo):
    repo.ok("log", "1", "1h", env=NOW)
    repo.ok("aggregate", env=NOW)
    ref = store_ref(repo.root)

    def ledger_state():
        """The tip, its history, the ref's reflog and the loose objects."""
        return (store_keys(repo.root), git(repo.root, "rev-list", ref),
                git(repo.root, "reflog", "show", "--format=%H %gs", ref),
                git(repo.root, "count-objects"), ledger_files(repo.root))

    before = ledger_state()
    assert len(before[1].split()) == 1 and "summaries/2026-11.json" in before[4]
    state = os.path.join(repo.root, ".flowforge/state/aggregate/alice.json")
    state_before = os.stat(state).st_mtime_ns
    for args in (["aggregate"], ["aggregate", "--full"]):
        r = repo.ok(*args, env=NOW)
        assert "up to date" in r.out
        assert ledger_state() == before          # no new ledger commit, no new object
    assert os.stat(state).st_mtime_ns == state_before


def test_entry_across_month_end_reaches_both_shards(repo):
    repo.ok("start", "1", "--at", "2026-10-31 22:00", env=NOW)
    repo.ok("stop", "--at", "2026-11-01 01:30", env=NOW)
    repo.ok("aggregate", env=NOW)
    docs = shard_docs(repo.root)
    assert sorted(docs) == ["2026-10.json", "2026-11.json"]
    assert docs["2026-10.json"]["rows"] == [["2026-10-31", "1", "", 7200]]
    assert docs["2026-11.json"]["rows"] == [["2026-11-01", "1", "", 5400]]


def test_dst_days_are_split_in_the_users_zone(repo):
    repo.ok("init", "--timezone", "America/New_York", user="ny")
    env = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}
    repo.ok("start", "1", "--at", "2026-03-07 22:00", user="ny", env=env)
    repo.ok("stop", "--at", "2026-03-08 04:00", user="ny", env=env)      # 5 real hours
    repo.ok("start", "2", "--at", "2026-10-31 23:00", user="ny", env=env)
    repo.ok("stop", "--at", "2026-11-01 03:00", user="ny", env=env)      # 5 real hours
    repo.ok("aggregate", user="ny", env=env)
    rows = {}
    docs = shard_docs(repo.root, user="ny")
    assert sorted(docs) == ["2026-03.json", "2026-10.json", "2026-11.json"]
    for doc in docs.values():
        assert doc["timezone"] == "America/New_York"
        for period, issue, _, seconds in doc["rows"]:
            rows[(period, issue)] = seconds
    assert rows == {("2026-03-07", "1"): 7200, ("2026-03-08", "1"): 10800,
                    ("2026-10-31", "2"): 3600, ("2026-11-01", "2"): 14400}


@pytest.mark.parametrize("granularity,periods", [("week", ["2026-W46", "2026-W47"]),
                                                  ("month", ["2026-11"])])
def test_granularity(repo, granularity, periods):
    path = os.path.join(repo.root, ".flowforge/config.json")
    config = json.load(open(path))
    config["granularity"] = granularity
    json.dump(config, open(path, "w"))
    repo.ok("log", "1", "1h", "--date", "2026-11-15", env=NOW)
    repo.ok("log", "1", "2h", "--date", "2026-11-16", env=NOW)
    repo.ok("aggregate", env=NOW)
    [doc] = shard_docs(repo.root).values()
    assert sorted({r[0] for r in doc["rows"]}) == periods
    assert doc["granularity"] == granularity
    assert repo("report", "--by", "day").rc == 64           # finer than what is stored: a usage error
    assert team_total(repo) == 3 * 3600
    # a range may not cut a period in two: adjacent ranges would both count it
    r = repo("bill", "--from", "2026-11-12", "--to", "2026-11-15")
    assert r.rc == 64 and "boundaries" in r.err
    if granularity == "week":
        halves = [repo.ok("bill", "--json", "--from", a, "--to", b).json["total_seconds"]
                  for a, b in (("2026-11-01", "2026-11-15"), ("2026-11-16", "2026-11-30"))]
        assert halves == [3600, 7200]


def test_a_report_skips_only_stores_with_nothing_to_take_in(repo):
    """report, bill, close and push look at two small files per store to skip a
    store whose aggregation would take nothing in; anything that would make it
    take something in (a change, a lost or older state, other settings) is seen."""
    repo.ok("log", "1", "1h", "--date", "2026-11-16", env=NOW)
    repo.ok("log", "2", "1h", "--date", "2026-11-16", user="bob", env=NOW)

    def settled(user="alice"):
        r = ff.Repo(repo.root)
        store = ff.PrivateStore(r, user)
        tip = git(repo.root, "for-each-ref", "--format=%(objectname)", ff.STORES_REF
                  + ff.store_key(user, store.store_id)).strip() or None
        return ff.Aggregator(store, r.config["granularity"]).settled(tip)
    assert not settled() and not settled("bob")                   # days named, never aggregated
    repo.ok("report", env=NOW)
    assert settled() and settled("bob")
    repo.ok("log", "1", "30m", "--date", "2026-11-17", user="bob", env=NOW)
    assert settled() and not settled("bob")
    assert repo.ok("report", "--json", env=NOW).json["total_seconds"] == 9000
    assert settled("bob")
    path = os.path.join(repo.root, ".flowforge/config.json")
    config = json.load(open(path))
    config["granularity"] = "week"
    json.dump(config, open(path, "w"))
    assert not settled()                                          # a full run is due
    rows = repo.ok("report", "--json", "--by", "week", env=NOW).json["rows"]
    assert {r["week"] for r in rows} == {"2026-W47"} and settled()
    os.unlink(os.path.join(repo.root, ".flowforge/state/aggregate/alice.json"))
    assert not settled()
    repo.ok("report", env=NOW)
    assert settled()
    # the ledger ref put back to an older commit (a .git restored from a backup), or
    # gone: not settled, so the report says so or rebuilds -- never silently less time
    ref = store_ref(repo.root)
    older = git(repo.root, "rev-list", "--max-parents=0", ref).split()[0]
    newest = git(repo.root, "rev-parse", ref).strip()
    git(repo.root, "update-ref", ref, older)
    assert not settled()
    r = repo.ok("report", "--json", env=NOW)
    assert "newest time of alice may be missing" in r.err and "last wrote" in r.err
    git(repo.root, "update-ref", ref, newest)
    assert settled()
    git(repo.root, "update-ref", "-d", ref)
    assert repo.ok("report", "--json", env=NOW).json["total_seconds"] == 9000   # rebuilt
    assert settled()


def test_edits_that_move_months_and_empty_a_month(repo):
    entry = repo.ok("log", "1", "1h", "--date", "2026-10-10", "--json", env=NOW).json["entry"]
    repo.ok("aggregate", env=NOW)
    repo.ok("edit", entry["id"], "--date", "2026-11-10", env=NOW)
    repo.ok("aggregate", env=NOW)
    docs = shard_docs(repo.root)
    assert docs["2026-10.json"]["rows"] == []
    assert docs["2026-11.json"]["rows"] == [["2026-11-10", "1", "", 3600]]
    repo.ok("delete", entry["id"], env=NOW)
    repo.ok("aggregate", env=NOW)
    assert {name: doc["rows"] for name, doc in shard_docs(repo.root).items()} == {
        "2026-10.json": [], "2026-11.json": []}
    assert team_total(repo) == 0


def test_incremental_equals_full_rebuild(repo):
    rng = random.Random(7)
    ids = []
    for step in range(60):
        action = rng.choice(["log", "log", "timer", "edit", "delete"] if ids else ["log"])
        day = "2026-%02d-%02d" % (rng.choice([9, 10, 11]), rng.randint(1, 19))
        if action == "log":
            ids.append(repo.ok("log", str(rng.randint(1, 5)), "%dm" % rng.randint(1, 300), "--date",
                               day, "--json", env=NOW).json["entry"]["id"])
        elif action == "timer":
            repo.ok("start", str(rng.randint(1, 5)), "--at", day + " 23:%02d" % rng.randint(0, 59),
                    "--allow-overlap", env=NOW)     # random timers may share a day's last hour
            ids.append(repo.ok("stop", "--json", "--at", day + " 23:59:59",
                               env=NOW).json["entry"]["id"])
        elif action == "edit":
            victim = rng.choice(ids)
            repo("edit", victim, "--issue", str(rng.randint(1, 5)), env=NOW)
        else:
            victim = ids.pop(rng.randrange(len(ids)))
            repo.ok("delete", victim, env=NOW)
        if step % 7 == 0:
            repo.ok("aggregate", env=NOW)
    repo.ok("aggregate", env=NOW)
    incremental = shard_bytes(repo.root)
    assert incremental
    # forget the cache and every shard (a commit that removes them), rebuild from scratch
    os.unlink(os.path.join(repo.root, ".flowforge/state/aggregate/alice.json"))
    rewrite_ledger(repo.root, {"summaries/" + name: None for name in incremental})
    assert shard_bytes(repo.root) == {}
    repo.ok("aggregate", "--full", env=NOW)
    assert shard_bytes(repo.root) == incremental
    assert team_total(repo) == private_total(repo.root)


def ledger_objects(root):
    """(every blob, every commit object) reachable from any ref under refs/flowforge/, raw."""
    out = git(root, "rev-list", "--objects", "--glob=refs/flowforge/*")
    oids = [line.split()[0] for line in out.splitlines()]
    proc = subprocess.run(["git", "cat-file", "--batch"], cwd=root, input="\n".join(oids).encode()
                          + b"\n", capture_output=True, check=True,
                          env=clean_env(HOME=os.path.dirname(root)))
    data, blobs, commits = proc.stdout, [], []
    while data:
        header, _, data = data.partition(b"\n")
        _, kind, size = header.split()
        body, data = data[:int(size)], data[int(size) + 1:]
        if kind == b"blob":
            blobs.append(body)
        elif kind == b"commit":
            commits.append(body)
    return blobs, commits


def test_notes_and_times_never_reach_committed_files(repo):
    marker = "SECRET-MARKER-%s" % os.urandom(6).hex()
    repo.ok("start", "1", "--note", marker, "--at", "2026-11-19 09:13:27", env=NOW)
    entry = repo.ok("stop", "--at", "2026-11-19 11:02:41", "--json", env=NOW).json["entry"]
    repo.ok("log", "2", "1h", "--note", marker, env=NOW)
    repo.ok("aggregate", env=NOW)
    # the developer commits everything git would take; the code commit's own dates are
    # pinned, so that no wall-clock time can match (or hide) what is looked for
    pinned = clean_env(HOME=os.path.dirname(repo.root), GIT_AUTHOR_DATE="2026-11-20T18:00:00Z",
                       GIT_COMMITTER_DATE="2026-11-20T18:00:00Z")
    git(repo.root, "add", "-A", env=pinned)
    git(repo.root, "commit", "-qm", "time", env=pinned)
    committed = git(repo.root, "ls-files").split()
    assert not any(c.startswith((".flowforge/user", ".flowforge/state", ".flowforge/quarantine",
                                 ".flowforge/team")) for c in committed), committed
    # the team's time went to the ledger instead
    assert "summaries/2026-11.json" in ledger_files(repo.root)
    blobs, commits = ledger_objects(repo.root)
    assert any(b'"kind":"flowforge-shard"' in b for b in blobs)
    assert any(b'"action":"aggregate' in b for b in blobs)           # the audit chain
    assert len(commits) == 1
    secrets = [marker.encode(), b"09:13", b"11:02"] + [str(ts).encode()
                                                       for ts in entry["segments"][0]]
    for obj in blobs + commits:
        for secret in secrets:
            assert secret not in obj, (secret, obj[:300])
    for obj in commits:
        # the store's user, no developer e-mail address, the UTC day only
        assert b"dev@example.com" not in obj and b"test@example.com" not in obj, obj
        stamps = [line.rsplit(b" ", 2) for line in obj.split(b"\n\n")[0].splitlines()
                  if line.startswith((b"author ", b"committer "))]
        assert len(stamps) == 2
        for _who, ts, zone in stamps:
            assert int(ts) % 86400 == 0 and zone == b"+0000", obj
        assert obj.startswith(b"tree ") and b"\nauthor alice <" in obj
    dump = subprocess.run(["git", "log", "-p", "--all", "--format=fuller"], cwd=repo.root,
                          capture_output=True, check=True).stdout
    assert b"summaries/2026-11.json" in dump                    # --all does see the ledger
    for secret in secrets:
        assert secret not in dump, secret


def test_corrupted_line_is_quarantined_not_dropped_silently(repo):
    repo.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    repo.ok("log", "2", "2h", "--date", "2026-11-19", env=NOW)
    path = os.path.join(repo.root, ".flowforge/user/alice/time/daily/2026-11-19.jsonl")
    original = open(path, "rb").read()
    data = bytearray(original)
    data[data.index(b'"issue":"1"') + 9] = ord("7")   # flip the issue; the crc no longer matches
    open(path, "wb").write(bytes(data))
    r = repo.ok("aggregate", env=NOW)
    assert "checksum mismatch" in r.err and "quarantined as Q1" in r.err
    items = repo.ok("quarantine", "list", "--json").json["items"]
    assert items[0]["original"] == ".flowforge/user/alice/time/daily/2026-11-19.jsonl"
    assert items[0]["size"] == len(original)
    qfile = os.path.join(repo.root, ".flowforge/quarantine", items[0]["file"])
    assert open(qfile, "rb").read() == bytes(data)
    assert team_total(repo) == 7200
    # the salvaged file is clean now: no further warnings
    assert "warning" not in repo.ok("aggregate", "--full", env=NOW).err


@pytest.mark.parametrize("fields", [
    {"segments": [[1795000000, 10 ** 30]]},            # to the year 10**22: split for ever
    {"segments": [[1795000000, 253402300799]]},        # to 9999: 26 s of every status
    {"segments": [[-86400, 3600]]},                    # before 1970
    {"segments": [[1795000000, 1795000000 + 367 * 86400]]},   # longer than a shard row holds
    {"date": "2026-11-19", "seconds": 10 ** 30},
])
def test_a_record_with_absurd_times_is_damaged_not_a_hang(repo, fields):
    """A line with a valid crc but times no writer makes is quarantined like any damaged
    line: every command answers at once and the day's good time stays."""
    repo.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    path = os.path.join(repo.root, ".flowforge/user/alice/time/daily/2026-11-19.jsonl")
    with open(path, "ab") as f:
        f.write(ff.encode_record(dict({"op": "entry", "id": "20261119-0123abcd", "issue": "2",
                                       "v": ff.RECORD_SCHEMA}, **fields)))
    for args in (["status"], ["entries", "--json"], ["aggregate", "--full"], ["report", "--json"]):
        r = repo(*args, env=NOW, timeout=20)
        assert r.rc == 0 and "Traceback" not in r.err, (args, r)
    assert team_total(repo) == 3600
    assert len(repo.ok("quarantine", "list", "--json").json["items"]) == 1


def test_torn_tail_is_repaired_before_the_next_append(repo):
    repo.ok("log", "1", "1h", "--date", "2026-11-19", env=NOW)
    path = os.path.join(repo.root, ".flowforge/user/alice/time/daily/2026-11-19.jsonl")
    with open(path, "ab") as f:
        f.write(b'0badc0de {"id":"2026')            # a crash in the middle of a write
    r = repo.ok("log", "2", "30m", "--date", "2026-11-19", env=NOW)
    assert "torn" in r.err
    repo.ok("aggregate", env=NOW)
    assert team_total(repo) == 5400
    assert len(repo.ok("quarantine", "list", "--json").json["items"]) == 1


def test_damaged_timer_state_is_quarantined(repo):
    repo.ok("start", "1", "--at", "09:00", env=NOW)
    path = os.path.join(repo.root, ".flowforge/user/alice/time/current.json")
    open(path, "w").write('{"schema":1,"timer":{"id":')
    r = repo("status", env=NOW)
    assert r.rc == 65 and "set aside as Q1" in r.err
    assert not os.path.exists(path)
    repo.ok("start", "1", "--at", "09:00", env=NOW)


def test_aggregate_lock_held_exits_75(repo):
    repo.ok("log", "1", "1h", env=NOW)
    with lock_held(os.path.join(repo.root, ".flowforge/state/locks/aggregate.alice.lock")):
        r = repo("aggregate", "--wait", "0.3", env=NOW)
        assert r.rc == 75 and "busy" in r.err
        assert store_keys(repo.root) == {}       # nothing reached the ledger
    repo.ok("aggregate", "--wait", "5", env=NOW)   # the lock vanished with its holder


def test_tampered_shard_stops_the_report_and_full_aggregation_rewrites_it(repo):
    repo.ok("log", "1", "1h", env=NOW)
    repo.ok("aggregate", env=NOW)
    name = "summaries/2026-11.json"
    good = ledger_files(repo.root)[name]
    assert team_total(repo) == 3600                          # (and the reading is cached)
    rewrite_ledger(repo.root, {name: good.replace(b"3600", b"7200")})
    r = repo("report")
    assert r.rc == 65 and name in r.err and "sha256" in r.err, r
    conflicted = rewrite_ledger(repo.root, {name: b"<<<<<<< HEAD\n" + good + b"=======\n" + good
                                            + b">>>>>>> x\n"})
    r = repo("report")
    assert r.rc == 65 and name in r.err and "conflict markers" in r.err, r
    repo.ok("aggregate", "--full", env=NOW)
    assert ledger_files(repo.root)[name] == good
    # repaired by a new commit on top: the ref still only moves forward
    ref = store_ref(repo.root)
    assert git(repo.root, "rev-parse", ref + "~1").strip() == conflicted
    assert team_total(repo) == 3600


def test_aggregate_all_users(repo):
    for user in ("alice", "bob", "carol"):
        repo.ok("log", "1", "1h", user=user, env=NOW)
    r = repo.ok("aggregate", "--all", env=NOW)
    assert r.out.count("wrote") == 3
    assert team_total(repo) == 3 * 3600


def test_parallel_aggregation_keeps_exit_codes(repo):
    """aggregate --all spreads many stores over workers; a busy lock in a worker is still 75."""
    users = ["dev%02d" % i for i in range(17)]
    for user in users:
        repo.ok("log", "1", "1h", user=user, env=NOW)
    with lock_held(os.path.join(repo.root, ".flowforge/state/locks/aggregate.dev16.lock")):
        r = repo("aggregate", "--all", "--wait", "0.2", env=NOW)
        assert r.rc == 75 and "dev16" in r.err, r
    r = repo.ok("aggregate", "--all", "--json", env=NOW)
    assert [x["user"] for x in r.json["results"]] == sorted(users + ["alice"])
    rows = repo.ok("report", "--json", "--by", "user").json["rows"]
    assert {x["user"]: x["seconds"] for x in rows} == {u: 3600 for u in users}


def test_reading_every_day_at_once_is_reading_each_day(repo, tmp_path):
    """aggregate --full reads every day file in one pass (read_all_days); it must
    give what read_day_and_stat gives day by day, damaged files included (each
    salvaged and quarantined as on its own), and leave the same files behind."""
    import shutil
    for n, day in enumerate(["2026-11-%02d" % d for d in range(2, 14)]):
        repo.ok("log", str(n % 3 + 1), "%dm" % (n + 5), "--date", day, "--note", "n%d" % n, env=NOW)
    repo.ok("start", "9", "--at", "2026-11-14 23:00", env=NOW)
    repo.ok("stop", "--at", "2026-11-15 01:30", env=NOW)     # across midnight
    daily = os.path.join(repo.root, ".flowforge/user/alice/time/daily")
    entry = lambda day, issue: ff.encode_record({           # noqa: E731
        "op": "entry", "id": day.replace("-", "") + "-0123abcd", "issue": issue, "date": day,
        "seconds": 60, "v": ff.RECORD_SCHEMA})

    def damage(name, data, mode="ab"):
        with open(os.path.join(daily, name), mode) as f:
            f.write(data)
    damage("2026-11-03.jsonl", b"0badc0de {\"torn")                     # torn tail
    flipped = bytearray(open(os.path.join(daily, "2026-11-04.jsonl"), "rb").read())
    flipped[flipped.index(b'"issue":"') + 9] = ord("7")                 # crc no longer matches
    damage("2026-11-04.jsonl", bytes(flipped), "wb")
    two = b'{"a":1},{"b":2}'                                            # two values, a good crc
    damage("2026-11-05.jsonl", b"%08x %s\n" % (zlib_crc(two), two))
    damage("2026-11-06.jsonl", b"", "wb")                               # empty
    damage("2026-11-07.jsonl", b"zzzzzzzz " + entry("2026-11-07", "4")[9:])   # not hex
    damage("2026-11-08.jsonl", entry("2026-11-08", "5"))                # a good line appended
    os.mkdir(os.path.join(daily, "2026-11-20.jsonl"))                   # a directory
    copy = str(tmp_path / "copy")
    shutil.copytree(repo.root, copy, symlinks=True)

    def store(root):
        return ff.PrivateStore(ff.Repo.find(root), "alice")
    os.environ["FLOWFORGE_NOW"] = NOW["FLOWFORGE_NOW"]
    try:
        with pytest.raises(IsADirectoryError):     # as day by day: one line, and stop
            list(store(repo.root).read_all_days())
        for root in (repo.root, copy):
            os.rmdir(os.path.join(root, os.path.relpath(daily, repo.root), "2026-11-20.jsonl"))
        together = {day: (records, stat) for day, records, stat in store(repo.root).read_all_days()}
        # in batches of any size (here one file each): the same
        assert {day: records for day, records, _ in store(repo.root).read_all_days(1)} == {
            day: records for day, (records, _) in together.items()}
        one_by_one = {}
        other = store(copy)
        for day in other.days():
            records, stat = other.read_day_and_stat(day)
            if stat is not None:
                one_by_one[day] = (records, stat)
    finally:
        del os.environ["FLOWFORGE_NOW"]
    assert {d: r for d, (r, _) in together.items()} == {d: r for d, (r, _) in one_by_one.items()}
    assert {d: s[0] for d, (_, s) in together.items()} == {d: s[0] for d, (_, s) in one_by_one.items()}
    assert len(together["2026-11-08"][0]) == 2 and together["2026-11-06"][0] == []
    # 13 written, one damaged, one emptied, one appended
    assert sum(len(r) for r, _ in together.values()) == 12
    for name in sorted(os.listdir(daily)):
        if os.path.isfile(os.path.join(daily, name)):
            assert open(os.path.join(daily, name), "rb").read() == \
                open(os.path.join(copy, os.path.relpath(daily, repo.root), name), "rb").read(), name
    quarantined = sorted(os.listdir(os.path.join(repo.root, ".flowforge/quarantine")))
    assert len(quarantined) == len(os.listdir(os.path.join(copy, ".flowforge/quarantine"))) >= 3


def zlib_crc(data):
    import zlib
    return zlib.crc32(data)
