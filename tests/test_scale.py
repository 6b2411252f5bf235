"""Costs that follow the work asked: a report of one month decodes one month
per store, the shard cache survives damage, aggregation groups in one pass."""
import glob
import json
import os
import random

import pytest

import flowforge as ff

from conftest import call

NOW = {"FLOWFORGE_NOW": "2026-12-01T09:00:00Z"}


def history(repo, users=("alice", "bob", "carol")):
    """Three people with time in eleven months of 2026."""
    days = ["2026-%02d-1%d" % (m, m % 10) for m in range(1, 12)]
    for n, user in enumerate(users):
        for day in days:
            repo.ok("log", str(n + 1), "%dm" % (30 + n), "--date", day, user=user, env=NOW)
    repo.ok("aggregate", "--all", env=NOW)
    return days


def caches(root):
    return sorted(glob.glob(os.path.join(root, ".flowforge/state/cache/ledger/*.rec")))


def test_a_warm_report_of_one_month_decodes_one_month_per_store(repo, monkeypatch):
    history(repo)
    everything = repo.ok("report", "--json", "--by", "user,month", env=NOW).json   # warms the cache
    assert len(caches(repo.root)) == 3
    decoded = []
    real = ff.decode_record
    monkeypatch.setattr(ff, "decode_record", lambda line: decoded.append(line[:40]) or real(line))
    r = call(repo.root, "report", "--json", "--by", "user", "--period", "2026-11",
             "--no-aggregate", env=NOW)
    assert r.rc == 0, r
    cache_lines = [d for d in decoded if b'"doc"' in d or b'"months"' in d or b"schema" in d]
    assert len(cache_lines) <= 3 * 2, decoded          # a header and one month, per store
    month = {(x["user"], x["month"]): x["seconds"] for x in everything["rows"]}
    assert {x["user"]: x["seconds"] for x in r.json["rows"]} == {
        u: month[(u, "2026-11")] for u in ("alice", "bob", "carol")}


def test_a_damaged_or_stale_shard_cache_is_rebuilt_never_trusted(repo):
    history(repo)
    expected = repo.ok("report", "--json", "--by", "user,month", env=NOW).json
    path = caches(repo.root)[0]
    lines = open(path, "rb").read().split(b"\n")
    november = [n for n, line in enumerate(lines) if line.startswith(b"2026-11 ")][0]
    lines[november] = lines[november].replace(b'"seconds"', b'"sec0nds"', 1)   # crc now wrong
    open(path, "wb").write(b"\n".join(lines))
    r = repo.ok("report", "--json", "--by", "user,month", "--period", "2026-11", env=NOW)
    assert r.json["rows"] == [x for x in expected["rows"] if x["month"] == "2026-11"]
    assert b"sec0nds" not in open(path, "rb").read()          # rebuilt from git
    open(path, "wb").write(b"garbage\n")
    assert repo.ok("report", "--json", "--by", "user,month", env=NOW).json == expected
    # a cache of another ledger tree (a fetch moved the ref): read again from git
    repo.ok("log", "9", "1h", "--date", "2026-11-12", user="alice", env=NOW)
    repo.ok("aggregate", "--all", env=NOW)
    after = repo.ok("report", "--json", "--by", "user", env=NOW).json
    assert after["total_seconds"] == expected["total_seconds"] + 3600


def test_full_aggregation_groups_every_entry_once(repo, monkeypatch):
    """render_month reads the grouped cells; the day contributions are walked once."""
    history(repo, users=("alice",))
    store = ff.PrivateStore(ff.Repo(repo.root), "alice")
    aggregator = ff.Aggregator(store, "day")
    walked = []
    real = ff.Aggregator.month_cells
    monkeypatch.setattr(ff.Aggregator, "month_cells",
                        staticmethod(lambda parsed: walked.append(len(parsed)) or real(parsed)))
    shards = aggregator.compute_all()
    assert len(shards) == 11 and walked == [11]
    ledger = ff.StoreLedger(ff.Repo(repo.root), "alice", store.store_id)
    try:
        stored = ledger.read([ff.shard_name(m) for m in shards])
    finally:
        ledger.close()
    assert all(stored[ff.shard_name(m)] == data for m, data in shards.items())


@pytest.mark.parametrize("granularity", ["day", "week"])
def test_incremental_aggregation_of_changed_periods_equals_a_full_rebuild(repo, granularity):
    """After every change, the incremental shards (a changed day's periods
    recomputed, the rest of the month kept) equal those of a full rebuild:
    entries across midnight and month ends, moves between days, deletions."""
    path = os.path.join(repo.root, ".flowforge/config.json")
    config = json.load(open(path))
    config["granularity"] = granularity
    json.dump(config, open(path, "w"))
    rng = random.Random(granularity)
    ids = []
    for step in range(24):
        day = "2026-%02d-%02d" % (rng.choice([10, 11]), rng.choice([1, 2, 15, 28, 29, 30, 31][:6]))
        action = rng.choice(["log", "night", "move", "delete"] if ids else ["log"])
        if action == "log":
            ids.append(repo.ok("log", str(rng.randint(1, 4)), "%dm" % rng.randint(1, 90), "--date",
                               day, "--json", "--allow-overlap", env=NOW).json["entry"]["id"])
        elif action == "night":        # across midnight: two days, maybe two months
            ids.append(repo.ok("log", str(rng.randint(1, 4)), "--start", day + " 23:%02d"
                               % rng.randint(0, 50), "--end", "%s 00:%02d" % (
                                   ff.shift_day(day, 1), rng.randint(1, 50)), "--json",
                               "--allow-overlap", env=NOW).json["entry"]["id"])
        elif action == "move":
            repo("edit", rng.choice(ids), "--issue", str(rng.randint(1, 4)), env=NOW)
        else:
            repo.ok("delete", ids.pop(rng.randrange(len(ids))), env=NOW)
        repo.ok("aggregate", env=NOW)
        incremental = ff.Aggregator(ff.PrivateStore(ff.Repo(repo.root), "alice"),
                                    granularity).compute_all()
        ledger = ff.StoreLedger(ff.Repo(repo.root), "alice",
                                ff.PrivateStore(ff.Repo(repo.root), "alice").store_id)
        try:
            stored = ledger.read([ff.shard_name(m) for m in incremental])
        finally:
            ledger.close()
        assert {m: stored[ff.shard_name(m)] for m in incremental} == incremental, step


def test_a_report_from_shard_totals_equals_one_from_their_rows(repo):
    """`--by user,issue` over whole months reads each shard's verified totals,
    not its rows; a finer report (by day) reads the rows: they agree."""
    history(repo)
    repo.ok("log", "2", "15m", "--date", "2026-03-13", "--project", "web", user="alice", env=NOW)
    repo.ok("aggregate", "--all", env=NOW)
    for args in ([], ["--period", "2026-03"], ["--from", "2026-02-01", "--to", "2026-04-30"]):
        for by, fine in (("user,issue", "user,issue,day"), ("project,month", "project,month,day")):
            coarse = repo.ok("report", "--json", "--by", by, *args, env=NOW).json
            rows = repo.ok("report", "--json", "--by", fine, *args, env=NOW).json
            dims = by.split(",")
            summed = {}
            for r in rows["rows"]:
                key = tuple(r[d] for d in dims)
                summed[key] = summed.get(key, 0) + r["seconds"]
            assert {tuple(r[d] for d in dims): r["seconds"] for r in coarse["rows"]} == summed
            assert coarse["total_seconds"] == rows["total_seconds"] > 0


def _state_paths(repo, user="alice"):
    """(header path, {year: part path}) of a store's aggregation state."""
    base = os.path.join(repo.root, ".flowforge/state/aggregate", user)
    return base + ".json", {os.path.basename(p)[:-5]: p
                            for p in sorted(glob.glob(base + ".parts/*.json"))}


def _assert_exact(repo, user="alice"):
    """The ledger holds exactly what every private record of `user` gives."""
    store = ff.PrivateStore(ff.Repo(repo.root), user)
    expected = ff.Aggregator(store, "day").compute_all()
    ledger = ff.StoreLedger(ff.Repo(repo.root), user, store.store_id)
    try:
        stored = ledger.read([ff.shard_name(m) for m in expected])
    finally:
        ledger.close()
    assert expected and {m: stored[ff.shard_name(m)] for m in expected} == expected


def _aggregate(repo):
    """Run `aggregate`; True when it was a full run."""
    [result] = repo.ok("aggregate", "--json", env=NOW).json["results"]
    return result["full"]


def _write_schema_1_state(repo):
    """The state as FlowForge 0.2's first versions kept it: one file naming every day."""
    header_path, parts = _state_paths(repo)
    header = json.load(open(header_path))
    files = {}
    for path in parts.values():
        files.update(json.load(open(path)))
    old = {k: v for k, v in header.items() if k not in ("parts", "reach")}
    open(header_path, "wb").write(ff.canonical_bytes(dict(old, schema=1, files=files)))
    for path in parts.values():
        os.unlink(path)
    return parts


def test_a_state_of_schema_1_is_rebuilt_in_full(repo):
    """What FlowForge 0.2 kept (one file naming every day) is not trusted: the
    first aggregation after the upgrade rebuilds, exactly, in the new layout."""
    history(repo, users=("alice",))
    header_path, _ = _state_paths(repo)
    parts = _write_schema_1_state(repo)
    repo.ok("log", "7", "20m", "--date", "2026-11-11", user="alice", env=NOW)
    assert _aggregate(repo) is True
    _assert_exact(repo)
    header = json.load(open(header_path))
    assert header["schema"] == 2 and sorted(header["parts"]) == sorted(parts)
    repo.ok("log", "7", "5m", "--date", "2026-11-12", user="alice", env=NOW)
    assert _aggregate(repo) is False   # trusted from now on
    _assert_exact(repo)


def test_the_first_report_after_the_upgrade_rebuilds_the_state_without_alarm(repo):
    """A report aggregates this clone's stores first, routinely; an old state
    is not a ledger ref that moved under it: no warning, and the new time is in."""
    history(repo, users=("alice",))
    _write_schema_1_state(repo)
    repo.ok("log", "7", "20m", "--date", "2026-11-11", user="alice", env=NOW)
    r = repo.ok("report", "--json", "--by", "user", env=NOW)
    assert "warning" not in r.err and "not the one" not in r.err, r.err
    assert r.json["total_seconds"] == 11 * 30 * 60 + 20 * 60
    _assert_exact(repo)


@pytest.mark.parametrize("damage", ["edited", "deleted", "torn", "header sum", "not entries",
                                    "not a month"])
def test_a_part_that_does_not_match_its_header_means_a_full_run(repo, damage):
    """A part rewritten after its header (a crash between the two), edited or
    lost is never trusted: the run that needs it rebuilds the whole state."""
    history(repo, users=("alice",))
    header_path, parts = _state_paths(repo)
    part = parts["2026"]
    entries = json.load(open(part))
    if damage == "edited":     # a day's size that the file no longer has: its change hidden
        entries["2026-11-11"][0] += 1
        open(part, "wb").write(ff.canonical_bytes(entries))
    elif damage == "deleted":
        os.unlink(part)
    elif damage == "torn":
        open(part, "r+b").truncate(os.path.getsize(part) // 2)
    elif damage == "header sum":
        header = json.load(open(header_path))
        header["parts"]["2026"] = "0" * 32
        open(header_path, "wb").write(ff.canonical_bytes(header))
    else:
        months = "2026-11" if damage == "not entries" else ["2026-11", "abc"]
        text = ff.canonical_bytes({"2026-11-11": [1, 2, months, []]})
        open(part, "wb").write(text)
        header = json.load(open(header_path))
        header["parts"]["2026"] = ff.sha256_hex(text)[:32]
        open(header_path, "wb").write(ff.canonical_bytes(header))
    repo.ok("log", "7", "20m", "--date", "2026-11-11", user="alice", env=NOW)
    assert _aggregate(repo) is True
    _assert_exact(repo)
    repo.ok("log", "7", "5m", "--date", "2026-11-12", user="alice", env=NOW)
    assert _aggregate(repo) is False   # whole again
    _assert_exact(repo)


@pytest.mark.parametrize("what", ["file", "link"])
def test_something_else_where_the_parts_belong_is_replaced(repo, tmp_path, what):
    """The parts' directory is a cache of ours: a file or a link in its place
    makes a full run that puts the directory back (a link's target untouched)."""
    import shutil
    history(repo, users=("alice",))
    header_path, _ = _state_paths(repo)
    parts_dir = header_path[:-len(".json")] + ".parts"
    shutil.rmtree(parts_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "2026.json").write_text("mine")
    if what == "file":
        open(parts_dir, "w").write("not a directory")
    else:
        os.symlink(str(elsewhere), parts_dir)
    repo.ok("log", "7", "20m", "--date", "2026-11-11", user="alice", env=NOW)
    assert _aggregate(repo) is True
    assert os.path.isdir(parts_dir) and not os.path.islink(parts_dir)
    assert os.listdir(str(elsewhere)) == ["2026.json"] and (elsewhere / "2026.json").read_text() == "mine"
    _assert_exact(repo)
    repo.ok("log", "7", "5m", "--date", "2026-11-12", user="alice", env=NOW)
    assert _aggregate(repo) is False
    _assert_exact(repo)


@pytest.mark.parametrize("day, reads", [("2026-05-20", ["2026"]), ("2026-01-05", ["2025", "2026"])])
def test_an_incremental_aggregation_reads_and_writes_the_parts_it_touches(repo, monkeypatch, day,
                                                                          reads):
    """One changed day: its year's part (and the year before's, for January,
    whose first day can hold an entry from New Year's Eve) is read; its year's
    part and the header are written -- not a state that grows with every day of
    history."""
    for old in ("2023-06-14", "2024-03-12", "2025-07-16", "2025-12-31"):
        repo.ok("log", "2", "25m", "--date", old, user="alice", env=NOW)
    history(repo, users=("alice",))
    header_path, parts = _state_paths(repo)
    assert sorted(parts) == ["2023", "2024", "2025", "2026"]
    before = {y: open(p, "rb").read() for y, p in parts.items()}
    repo.ok("log", "7", "20m", "--date", day, user="alice", env=NOW)
    read, written = [], []
    real_read, real_write = ff.read_bytes, ff.atomic_write
    monkeypatch.setattr(ff, "read_bytes", lambda p, *a: (read.append(p), real_read(p, *a))[1])
    monkeypatch.setattr(ff, "atomic_write", lambda p, *a, **k: (written.append(p),
                                                                 real_write(p, *a, **k))[1])
    r = call(repo.root, "aggregate", env=NOW)
    monkeypatch.undo()
    assert r.rc == 0, r
    state_dir = os.path.dirname(header_path)
    assert sorted(os.path.basename(p)[:-5] for p in read if ".parts" in p) == reads
    assert [os.path.relpath(p, state_dir) for p in written if p.startswith(state_dir + os.sep)
            and not p.endswith(".changes.jsonl")] == ["alice.parts/2026.json", "alice.json"]
    after = {y: open(p, "rb").read() for y, p in _state_paths(repo)[1].items()}
    assert [y for y in after if after[y] != before[y]] == ["2026"]
    assert day in json.loads(after["2026"])
    _assert_exact(repo)


def test_an_entry_edited_into_a_far_month_feeds_that_month_from_its_own_day_file(repo):
    """An entry whose date is edited into another year stays in its day file;
    when that far month is recomputed for another change, the entry is found
    (the header names the day) and still counted, exactly once."""
    history(repo, users=("alice",))
    repo.ok("log", "2", "5m", "--date", "2025-06-10", user="alice", env=NOW)
    r = repo.ok("log", "3", "45m", "--date", "2026-11-20", "--json", user="alice", env=NOW)
    entry_id = r.json["entry"]["id"]
    repo.ok("aggregate", env=NOW)
    repo.ok("edit", entry_id, "--date", "2025-06-03", user="alice", env=NOW)
    assert _aggregate(repo) is False
    _assert_exact(repo)
    header_path, _ = _state_paths(repo)
    assert json.load(open(header_path))["reach"] == {"2025-06": ["2026-11-20"]}
    # another change on the same day of June 2025: that day is recomputed from
    # every day file that feeds it, the one of November 2026 included
    repo.ok("log", "4", "10m", "--date", "2025-06-03", user="alice", env=NOW)
    assert _aggregate(repo) is False
    _assert_exact(repo)
    june = repo.ok("report", "--json", "--by", "issue", "--period", "2025-06", "--no-aggregate",
                   env=NOW).json
    assert {x["issue"]: x["seconds"] for x in june["rows"]} == {"2": 300, "3": 45 * 60, "4": 600}
    repo.ok("edit", entry_id, "--date", "2026-11-20", user="alice", env=NOW)
    assert _aggregate(repo) is False
    _assert_exact(repo)
    assert json.load(open(header_path))["reach"] == {}


def test_years_of_shards_go_into_one_pack_that_git_reads_back(repo):
    """A full aggregation of 7 years writes its 84 shards as one pack (index-pack
    checks and fsyncs it), not 84 loose files; the ledger reads back exactly and
    `git fsck` finds nothing wrong."""
    from conftest import git
    months = ["%d-%02d" % (y, m) for y in range(2019, 2026) for m in range(1, 13)]
    store = ff.PrivateStore(ff.Repo.find(repo.root).require(), "alice")
    store.create("UTC")
    expected = 0
    for n, month in enumerate(months):
        record = {"op": "entry", "id": month.replace("-", "") + "03-%08x" % n, "issue": str(n % 7 + 1),
                  "project": "", "note": "", "date": month + "-03", "seconds": 60 + n, "src": "log"}
        store.append(month + "-03", [record])
        expected += 60 + n
    packs_before = set(os.listdir(os.path.join(repo.root, ".git/objects/pack")))
    r = repo.ok("aggregate", "--full", env=NOW)
    assert r.out == "alice: wrote 84 shards (first 2019-01, last 2025-12)\n"   # a span, not 84 names
    packs = set(os.listdir(os.path.join(repo.root, ".git/objects/pack"))) - packs_before
    assert len([p for p in packs if p.endswith(".pack")]) == 1, packs
    assert len([p for p in packs if p.endswith(".idx")]) == 1, packs
    ledger = git(repo.root, "ls-tree", "-r", "--name-only", "refs/flowforge/stores/alice--%s"
                 % store.store_id)
    assert len([n for n in ledger.split() if n.startswith("summaries/")]) == len(months)
    report = repo.ok("report", "--json", "--by", "month", "--no-aggregate", env=NOW).json
    assert report["total_seconds"] == expected
    assert len(report["rows"]) == len(months)
    git(repo.root, "fsck", "--strict", "--no-dangling")


def test_a_one_month_report_reads_only_that_months_lines_and_checks_them(repo, monkeypatch):
    """The cache header gives each month's place in the file; a one-month report
    reads that much per store.  A header whose places are wrong (even with a valid
    crc) only costs a rebuild, never a wrong figure."""
    history(repo)
    expected = repo.ok("report", "--json", "--by", "user,month", env=NOW).json
    november = [x for x in expected["rows"] if x["month"] == "2026-11"]
    read = []
    real_pread, real_read = os.pread, os.read
    monkeypatch.setattr(os, "pread", lambda fd, n, at: read.append(n) or real_pread(fd, n, at))
    monkeypatch.setattr(os, "read", lambda fd, n: read.append(-n) or real_read(fd, n))
    r = call(repo.root, "report", "--json", "--by", "user,month", "--period", "2026-11",
             "--no-aggregate", env=NOW)
    monkeypatch.undo()
    assert r.rc == 0 and r.json["rows"] == november
    sizes = [os.path.getsize(p) for p in caches(repo.root)]
    assert len([n for n in read if n > 0]) == 3, read   # one pread per store cache
    assert sum(n for n in read if n > 0) < sum(sizes) / 5, (read, sizes)   # a month of eleven
    for path in caches(repo.root):
        lines = open(path, "rb").read().split(b"\n")
        header = ff.decode_record(lines[0])
        header["months"] = {m: [a + 7, b + 7] for m, (a, b) in header["months"].items()}
        open(path, "wb").write(b"\n".join([ff.encode_record(header)[:-1]] + lines[1:]))
    r = repo.ok("report", "--json", "--by", "user,month", "--period", "2026-11", env=NOW)
    assert r.json["rows"] == november
    assert repo.ok("report", "--json", "--by", "user,month", env=NOW).json == expected


def test_a_report_over_all_history_reads_one_line_per_store_and_checks_it(repo, monkeypatch):
    """By user and issue (or project, store) over all history, a warm report
    decodes each store's line of all its months' totals, not its months; the
    figures are those of the months added up; a damaged or misplaced line, or
    an older cache without it, only costs a rebuild."""
    history(repo)
    by_month = repo.ok("report", "--json", "--by", "user,issue,month", env=NOW).json
    expected = {}
    for row in by_month["rows"]:
        expected[(row["user"], row["issue"])] = expected.get((row["user"], row["issue"]), 0) \
            + row["seconds"]
    decoded = []
    real = ff.decode_record
    monkeypatch.setattr(ff, "decode_record", lambda line: decoded.append(line[:40]) or real(line))
    r = call(repo.root, "report", "--json", "--by", "user,issue", "--no-aggregate", env=NOW)
    monkeypatch.undo()
    assert r.rc == 0, r
    assert {(x["user"], x["issue"]): x["seconds"] for x in r.json["rows"]} == expected
    assert r.json["total_seconds"] == by_month["total_seconds"]
    assert len(decoded) == 3 * 2 and len([d for d in decoded if b'"doc"' in d]) == 3, decoded
    whole = repo.ok("report", "--json", "--by", "user,issue", env=NOW).json
    for damage in ("crc", "place", "schema-4"):
        for path in caches(repo.root):
            lines = open(path, "rb").read().split(b"\n")
            header = ff.decode_record(lines[0])
            if damage == "crc":
                lines = [line.replace(b'"by_issue"', b'"by_issuE"', 1) if line.startswith(b"all ")
                         else line for line in lines]
            elif damage == "place":
                header["all"] = [header["all"][0] - 9, header["all"][1] - 9]
            else:   # as FlowForge 0.2's first versions wrote it: no line of all months
                header["schema"] = 4
                del header["all"]
                lines = [line for line in lines if not line.startswith(b"all ")]
            open(path, "wb").write(b"\n".join([ff.encode_record(header)[:-1]] + lines[1:]))
        assert repo.ok("report", "--json", "--by", "user,issue", env=NOW).json == whole, damage
        assert all(b"\nall     S " in open(p, "rb").read() for p in caches(repo.root))  # rebuilt
    by_project = repo.ok("report", "--json", "--by", "project,user", env=NOW).json
    assert by_project["total_seconds"] == by_month["total_seconds"]


def _store(repo, user="alice"):
    return ff.PrivateStore(ff.Repo.find(repo.root).require(), user)


def test_an_incremental_aggregation_looks_only_at_the_days_named_as_changed(repo, monkeypatch):
    days = history(repo)
    store = _store(repo)
    head = open(store.changes_path, "rb").read()
    assert head.count(b"\n") == 1 and b'"list"' in head   # its token: what was named, taken in
    call(repo.root, "log", "5", "7m", "--date", days[3], env=NOW)
    assert open(store.changes_path, "rb").read() == head + b'"%s"\n' % days[3].encode()
    looked = []
    real_lstat = os.lstat
    monkeypatch.setattr(ff.PrivateStore, "day_stats", lambda self: 1 / 0)   # no scan of all
    monkeypatch.setattr(os, "lstat", lambda p, *a, **k: (looked.append(p), real_lstat(p, *a, **k))[1])
    r = call(repo.root, "aggregate", env=NOW)
    monkeypatch.undo()
    assert r.rc == 0, r
    assert [p for p in looked if "/daily/" in p] == [store.day_path(days[3])]
    assert open(store.changes_path, "rb").read() == head
    report = repo.ok("report", "--json", "--by", "user", "--no-aggregate", env=NOW).json
    assert {x["user"]: x["seconds"] for x in report["rows"]}["alice"] == 11 * 30 * 60 + 7 * 60
    full = repo.ok("aggregate", "--full", env=NOW)
    assert "wrote" not in full.out   # the incremental run had it all


def test_a_store_of_schema_1_is_looked_at_in_full_until_its_changes_are_listed(repo):
    """An older FlowForge wrote without naming its days: the first aggregation
    after the upgrade looks at every day file; from then on time/changed.jsonl says."""
    history(repo, users=("alice",))
    store = _store(repo)
    settings = json.load(open(store.config_path))
    settings["schema"] = 1
    open(store.config_path, "w").write(json.dumps(settings))
    state_path = os.path.join(repo.root, ".flowforge/state/aggregate/alice.json")
    state = json.load(open(state_path))
    state.pop("journal")
    open(state_path, "w").write(json.dumps(state))
    # what an older FlowForge does: append to a day file, name nothing
    day = "2026-11-25"
    record = {"op": "entry", "id": "20261125-0000abcd", "issue": "8", "project": "", "note": "",
              "date": day, "seconds": 600, "src": "log", "v": 1}
    with open(store.day_path(day), "ab") as f:
        f.write(ff.encode_record(record))
    repo.ok("aggregate", env=NOW)
    report = repo.ok("report", "--json", "--by", "user", "--no-aggregate", env=NOW).json
    assert report["total_seconds"] == 11 * 30 * 60 + 600
    assert json.load(open(state_path))["journal"] is False   # still schema 1: not trusted
    repo.ok("log", "9", "1m", "--date", day, env=NOW)          # a write upgrades the store
    assert json.load(open(store.config_path))["schema"] == 2
    repo.ok("aggregate", env=NOW)
    assert json.load(open(state_path))["journal"] == \
        json.loads(open(store.changes_path).readline())["list"]


def test_a_damaged_list_of_changes_means_every_day_file_is_looked_at(repo):
    days = history(repo, users=("alice",))
    store = _store(repo)
    # a torn note (a crash in the middle of naming a day) and a change beside it
    token = open(store.changes_path, "rb").readline()
    open(store.changes_path, "ab").write(b'"2026-1')
    record = {"op": "entry", "id": days[0].replace("-", "") + "-0000beef", "issue": "8",
              "project": "", "note": "", "date": days[0], "seconds": 120, "src": "log", "v": 1}
    with open(store.day_path(days[0]), "ab") as f:
        f.write(ff.encode_record(record))
    repo.ok("aggregate", env=NOW)
    report = repo.ok("report", "--json", "--by", "user", "--no-aggregate", env=NOW).json
    assert report["total_seconds"] == 11 * 30 * 60 + 120
    renewed = open(store.changes_path, "rb").read()   # taken in, torn bytes and all: a new list
    assert renewed.count(b"\n") == 1 and renewed != token
    repo.ok("aggregate", env=NOW)   # (a new list: looked at in full once more, then trusted)
    state = json.load(open(os.path.join(repo.root, ".flowforge/state/aggregate/alice.json")))
    assert state["journal"] == json.loads(renewed)["list"]


def test_a_deleted_list_of_changes_is_noticed(repo):
    """Deleting the list (with the aggregation state kept) must not hide a change:
    the new list has another token than the state records."""
    days = history(repo, users=("alice",))
    store = _store(repo)
    os.unlink(store.changes_path)
    record = {"op": "entry", "id": days[1].replace("-", "") + "-0000cafe", "issue": "8",
              "project": "", "note": "", "date": days[1], "seconds": 300, "src": "log", "v": 1}
    with open(store.day_path(days[1]), "ab") as f:   # a change whose note went with the list
        f.write(ff.encode_record(record))
    repo.ok("aggregate", env=NOW)
    report = repo.ok("report", "--json", "--by", "user", "--no-aggregate", env=NOW).json
    assert report["total_seconds"] == 11 * 30 * 60 + 300


def test_a_flowforge_that_does_not_list_changes_refuses_a_store_that_does(repo, monkeypatch):
    history(repo, users=("alice",))
    monkeypatch.setattr(ff, "USER_SCHEMA", 1)   # what FlowForge 0.2.0 checks
    r = call(repo.root, "log", "3", "1m", env=NOW)
    assert r.rc == 65 and "written by a newer FlowForge" in r.err, r


def test_a_day_file_put_back_from_quarantine_is_aggregated(repo):
    """A restore writes a day file without naming its day as changed: it drops
    the store's aggregation state, so the next aggregation looks at every file."""
    days = history(repo, users=("alice",))
    store = _store(repo)
    path = store.day_path(days[0])
    item = ff.Quarantine(ff.Repo.find(repo.root).require()).put(path, "test", copy=True)
    open(path, "wb").write(b"")   # the day emptied (and aggregated so) since
    repo.ok("aggregate", "--full", env=NOW)
    assert repo.ok("report", "--json", "--no-aggregate", env=NOW).json["total_seconds"] == 10 * 1800
    repo.ok("quarantine", "restore", item, "--force", env=NOW)
    repo.ok("aggregate", env=NOW)
    assert repo.ok("report", "--json", "--no-aggregate", env=NOW).json["total_seconds"] == 11 * 1800


def test_a_mirror_owed_a_whole_copy_gets_one_from_an_incremental_aggregation(repo, monkeypatch):
    """A missing mirror (or one marked stale after a failed copy) is copied in
    full by the next aggregation, even one that read only a changed day."""
    import shutil
    monkeypatch.setenv("XDG_DATA_HOME", os.path.join(repo.home, "xdg-data"))   # the runner's
    days = history(repo, users=("alice",))
    store = _store(repo)
    mirror = store.mirror.dir
    assert len(os.listdir(os.path.join(mirror, "time", "daily"))) == len(days)
    shutil.rmtree(mirror)
    repo.ok("aggregate", env=NOW)   # nothing changed: a whole copy all the same
    assert len(os.listdir(os.path.join(mirror, "time", "daily"))) == len(days)
    shutil.rmtree(mirror)
    repo.ok("log", "4", "2m", "--date", days[2], env=NOW)   # begins a mirror of one day
    repo.ok("aggregate", env=NOW)
    assert sorted(os.listdir(os.path.join(mirror, "time", "daily"))) == sorted(
        d + ".jsonl" for d in days)
    for day in days:
        assert open(os.path.join(mirror, "time", "daily", day + ".jsonl"), "rb").read() == \
            open(store.day_path(day), "rb").read()


@pytest.mark.parametrize("planted", ["fifo", "dir", "symlink"])
def test_something_planted_where_the_list_of_changes_goes_does_not_stop_recording(repo, planted):
    days = history(repo, users=("alice",))
    store = _store(repo)
    os.unlink(store.changes_path)
    if planted == "fifo":
        os.mkfifo(store.changes_path)
    elif planted == "dir":
        os.mkdir(store.changes_path)
    else:
        os.symlink("/etc/passwd", store.changes_path)
    r = repo("log", "6", "3m", "--date", days[4], env=NOW, timeout=20)
    assert r.rc == 0, r
    assert os.path.isfile(store.changes_path) and not os.path.islink(store.changes_path)
    repo.ok("aggregate", env=NOW)
    report = repo.ok("report", "--json", "--no-aggregate", env=NOW).json
    assert report["total_seconds"] == 11 * 1800 + 180


def test_an_aggregation_that_cannot_shorten_the_list_still_succeeds(repo, monkeypatch):
    days = history(repo, users=("alice",))
    call(repo.root, "log", "6", "3m", "--date", days[4], env=NOW)

    def full_disk(self, size, renew=False):
        raise ff.StorageError(self.changes_path, OSError(28, "No space left on device"))
    monkeypatch.setattr(ff.PrivateStore, "forget_changes", full_disk)
    r = call(repo.root, "aggregate", env=NOW)
    monkeypatch.undo()
    assert r.rc == 0 and "wrote" in r.out, r
    repo.ok("aggregate", env=NOW)   # the days still named are looked at again: no harm
    report = repo.ok("report", "--json", "--no-aggregate", env=NOW).json
    assert report["total_seconds"] == 11 * 1800 + 180


def test_a_teammates_shard_of_many_lines_is_cached_and_read_back_the_same(repo):
    """The cache keeps a verified shard blob as its rows line; a blob that is
    valid but not one line (a teammate's FlowForge printed it indented) is
    re-encoded there, and cold and warm reports agree."""
    import hashlib
    from conftest import ledger_files, rewrite_ledger
    history(repo, users=("alice",))
    raw = ledger_files(repo.root)["summaries/2026-11.json"]
    raw_october = ledger_files(repo.root)["summaries/2026-10.json"]
    doc = json.loads(raw)
    doc["sha256"] = ""
    blank = json.dumps(doc, indent=1, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    pretty = blank.replace(b'"sha256":""', b'"sha256":"%s"'
                           % hashlib.sha256(blank).hexdigest().encode(), 1)
    assert pretty.count(b"\n") > 10 and ff.verify_shard_bytes(pretty)["rows"] == doc["rows"]
    rewrite_ledger(repo.root, {"summaries/2026-11.json": pretty})
    args = ("report", "--json", "--by", "day,issue", "--no-aggregate")
    cold = repo.ok(*args, env=NOW).json
    lines = open(caches(repo.root)[0], "rb").read().split(b"\n")
    rows_line = [line for line in lines if line.startswith(b"2026-11 R ")]
    assert len(rows_line) == 1 and ff.decode_record(rows_line[0][10:])["rows"] == doc["rows"]
    october = [line for line in lines if line.startswith(b"2026-10 R ")][0]
    assert october[19:] + b"\n" == raw_october    # a one-line blob is kept as it is
    warm = repo.ok(*args, env=NOW).json
    assert warm == cold and sum(r["seconds"] for r in cold["rows"]) == cold["total_seconds"] > 0
    assert {r["day"]: r["seconds"] for r in cold["rows"] if r["day"].startswith("2026-11")} == {
        row[0]: row[3] for row in doc["rows"]}


def _cold(repo, *args):
    for path in caches(repo.root):
        os.unlink(path)
    r = call(repo.root, "report", "--json", "--no-aggregate", *args, env=NOW)
    assert r.rc == 0, r
    return json.loads(r.out)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_cold_report_over_many_stores_verifies_them_in_workers_to_the_same_result(
        repo, monkeypatch):
    """From PARALLEL_CACHE_AT stores on, a cold report verifies and caches them
    in forked workers (one per core) and reads the workers' caches: the same
    report as one process, and the same warm report after it."""
    history(repo, users=("alice", "bob", "carol", "dave", "erin"))
    monkeypatch.setattr(os, "cpu_count", lambda: 3)   # this process and two workers
    shapes = [("--by", "user,issue"), ("--by", "day,issue"), ("--period", "2026-11"),
              ("--by", "user,month", "--from", "2026-03-01", "--to", "2026-09-15")]
    monkeypatch.setattr(ff, "PARALLEL_CACHE_AT", 10 ** 6)
    serial = [_cold(repo, *shape) for shape in shapes]
    forks = []
    real_fork = os.fork
    monkeypatch.setattr(os, "fork", lambda: forks.append(1) or real_fork())
    monkeypatch.setattr(ff, "PARALLEL_CACHE_AT", 2)
    assert [_cold(repo, *shape) for shape in shapes] == serial
    assert len(forks) == 2 * len(shapes)
    assert len(caches(repo.root)) == 5
    warm = call(repo.root, "report", "--json", "--no-aggregate", "--by", "day,issue", env=NOW)
    assert json.loads(warm.out) == serial[1]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_worker_that_dies_leaves_its_stores_to_the_report_and_damage_is_still_refused(
        repo, monkeypatch):
    from conftest import rewrite_ledger
    history(repo, users=("alice", "bob", "carol", "dave"))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(ff, "PARALLEL_CACHE_AT", 10 ** 6)
    expected = _cold(repo, "--by", "user,issue")
    monkeypatch.setattr(ff, "PARALLEL_CACHE_AT", 2)
    parent = os.getpid()
    real_save = ff.LedgerView._save_cache

    def save(self, key, shards, raws):
        if os.getpid() != parent:
            os._exit(9)            # the worker is killed before it caches anything
        return real_save(self, key, shards, raws)
    monkeypatch.setattr(ff.LedgerView, "_save_cache", save)
    assert _cold(repo, "--by", "user,issue") == expected     # done here instead
    assert len(caches(repo.root)) == 4
    monkeypatch.setattr(ff.LedgerView, "_save_cache", real_save)
    # a damaged shard found by a worker: the report refuses, as one process does
    rewrite_ledger(repo.root, {"summaries/2026-05.json": b'{"not": "a shard"}\n'}, user="dave")
    outcomes = []
    for at in (10 ** 6, 2, 10 ** 6, 2):
        if len(outcomes) == 2:      # and in two stores (one process stops at the first)
            rewrite_ledger(repo.root, {"summaries/2026-06.json": b"[]\n"}, user="alice")
        monkeypatch.setattr(ff, "PARALLEL_CACHE_AT", at)
        for path in caches(repo.root):
            os.unlink(path)
        r = call(repo.root, "report", "--json", "--no-aggregate", "--by", "user", env=NOW)
        assert r.rc == 65 and "damaged shard(s)" in r.err and r.out == "", r
        assert r.err.count("\n") == 1 and not caches(repo.root)[3:], r
        outcomes.append(r.err)
    assert outcomes[0] == outcomes[1] and "dave" in outcomes[0]
    assert "alice" in outcomes[2] and "alice" in outcomes[3]


def test_sorted_keys_is_the_order_of_the_tuples():
    """A report's rows are sorted by their keys joined with NUL (faster than
    comparing tuples): the same order, prefixes, NULs and non-text included."""
    rng = random.Random(7)
    alphabet = ["a", "b", "ab", "", "\x01", "\0", "é", "\U0001F600", "a\0", "Z", "10", "9"]
    for _ in range(3000):
        width = rng.randint(1, 4)
        keys = {tuple(rng.choice(alphabet) + rng.choice(alphabet) for _ in range(width))
                for _ in range(rng.randint(0, 30))}
        assert ff.sorted_keys(keys) == sorted(keys)
    assert ff.sorted_keys({(None, 2), (None, 1)}) == [(None, 1), (None, 2)]


def test_an_entry_across_new_years_eve_still_counts_when_new_years_day_is_recomputed(repo):
    """The first hour of January 1 comes from December 31's day file, in the
    year before's part of the state: a change on January 1 recomputes that day
    from both."""
    history(repo, users=("alice",))
    repo.ok("start", "5", "--at", "2025-12-31 23:00", user="alice", env=NOW)
    repo.ok("stop", "--at", "2026-01-01 01:30", user="alice", env=NOW)
    repo.ok("aggregate", env=NOW)
    repo.ok("log", "6", "15m", "--date", "2026-01-01", user="alice", env=NOW)
    assert _aggregate(repo) is False
    _assert_exact(repo)
    january = repo.ok("report", "--json", "--by", "issue", "--period", "2026-01", "--no-aggregate",
                      env=NOW).json
    assert {x["issue"]: x["seconds"] for x in january["rows"]}["5"] == 90 * 60
