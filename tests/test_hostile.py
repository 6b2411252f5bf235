"""A teammate's commit is untrusted input: crafted shards, chains, config and
author names give one clear line and a documented exit code on every clone,
never a traceback, a hang, or a billed absurdity."""
import json
import os
import subprocess

import pytest

import flowforge
from conftest import ledger_files, rewrite_ledger, store_key_of

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}
READERS = (("report", "--json"), ("bill", "--month", "2026-11", "--json"), ("audit", "verify"),
           ("reconcile", "--ci"))


def sealed(blank):
    """Shard bytes with a valid sha256, however hostile the rest: anyone can compute one."""
    assert blank.count(b'"sha256":""') == 1
    return blank.replace(b'"sha256":""', b'"sha256":"%s"' % flowforge.sha256_hex(blank).encode())


def shard_doc(repo, **changes):
    doc = json.loads(ledger_files(repo.root)["summaries/2026-11.json"])
    doc.update(changes, sha256="")
    return doc


@pytest.fixture
def tracked(repo):
    repo.ok("log", "1", "1h", "--date", "2026-11-16", env=NOW)
    repo.ok("aggregate", env=NOW)
    return repo


def assert_one_line(repo, code, *names, args_list=READERS):
    for args in args_list:
        r = repo(*args, env=NOW, timeout=60)
        assert r.rc in code, (args, r)
        assert "Traceback" not in r.err and r.err.count("\n") == 1, (args, r.err)
        for name in names:
            assert name in r.err + r.out, (args, name, r)


def plant(repo, data, name="summaries/2026-11.json"):
    rewrite_ledger(repo.root, {name: data})


def test_a_shard_nested_100k_deep(tracked):
    doc = canonical = flowforge.canonical_bytes(shard_doc(tracked))
    deep = b'"deep":' + b"[" * 100000 + b"]" * 100000 + b","
    plant(tracked, sealed(doc[:1] + deep + canonical[1:]))
    assert_one_line(tracked, (65,), "2026-11.json", args_list=READERS[:2])
    r = tracked("reconcile", "--ci", env=NOW)
    assert r.rc == 1 and "Traceback" not in r.err and "2026-11.json" in r.out, r


@pytest.mark.parametrize("field,value", [("totals", [1]), ("user", 5), ("month", ["2026-11"]),
                                         ("rows", {"a": 1})])
def test_shard_fields_of_the_wrong_type(tracked, field, value):
    plant(tracked, sealed(flowforge.canonical_bytes(shard_doc(tracked, **{field: value}))))
    assert_one_line(tracked, (65,), "2026-11.json", args_list=READERS[:2])
    r = tracked("reconcile", "--ci", env=NOW)
    assert r.rc == 1 and "Traceback" not in r.err and "2026-11.json" in r.out, r


def test_absurd_seconds_are_refused_not_billed(tracked):
    doc = shard_doc(tracked)
    doc["rows"] = [["2026-11-16", "1", "", 10 ** 300]]
    doc["totals"] = {"seconds": 10 ** 300, "by_issue": {"1": 10 ** 300}, "by_project": {"": 10 ** 300},
                     "by_period": {"2026-11-16": 10 ** 300}}
    plant(tracked, sealed(flowforge.canonical_bytes(doc)))
    assert_one_line(tracked, (65,), "2026-11.json", args_list=READERS[:2])


def test_a_huge_shard_is_refused_without_reading_it(tracked):
    doc = shard_doc(tracked)
    doc["padding"] = "x" * (flowforge.MAX_SHARD_BYTES + 10)
    plant(tracked, sealed(flowforge.canonical_bytes(doc)))
    r = tracked("report", "--json", env=NOW)
    assert r.rc == 65 and "more than" in r.err and r.err.count("\n") == 1, r


@pytest.mark.parametrize("mangle", [
    lambda r: dict(r, files=["summaries/2026-11.json"]),
    lambda r: dict(r, ts="yesterday"),
    lambda r: [r],
])
def test_chain_records_of_the_wrong_shape(tracked, mangle):
    name = [n for n in ledger_files(tracked.root) if n.startswith("audit/")][0]
    records = [json.loads(line) for line in ledger_files(tracked.root)[name].splitlines()]
    records[-1] = mangle(records[-1])
    plant(tracked, b"".join(flowforge.canonical_bytes(r) for r in records), name)
    for args in (("audit", "verify"), ("reconcile", "--ci")):
        r = tracked(*args, env=NOW)
        assert r.rc == 1 and "Traceback" not in r.err and "audit" in r.out, (args, r)


def test_escape_sequences_in_names_are_neutralised_when_printed(tracked):
    doc = shard_doc(tracked)
    evil = "1\x1b[2J\x1b]0;owned\x07"
    doc["rows"] = [["2026-11-16", evil, "", 3600]]
    doc["totals"] = {"seconds": 3600, "by_issue": {evil: 3600}, "by_project": {"": 3600},
                     "by_period": {"2026-11-16": 3600}}
    plant(tracked, sealed(flowforge.canonical_bytes(doc)))
    for fmt in ("table", "md", "csv", "html"):
        r = tracked.ok("report", "--format", fmt, env=NOW)
        assert "\x1b" not in r.out and "\x07" not in r.out and "1?[2J" in r.out, (fmt, r.out)
    assert tracked.ok("report", "--json", env=NOW).json["rows"][0]["issue"] == evil  # data intact


def test_config_nested_100k_deep_and_a_fifo_in_its_place(repo):
    path = os.path.join(repo.root, ".flowforge", "config.json")
    with open(path, "w") as f:
        f.write('{"deep":' + "[" * 100000 + "]" * 100000 + "}")
    for args in (("report",), ("status",), ("aggregate",)):
        r = repo(*args, env=NOW)
        assert r.rc == 78 and r.err.count("\n") == 1 and "config.json" in r.err, (args, r)
    os.unlink(path)
    os.mkfifo(path)
    for args in (("report",), ("status",)):
        r = repo(*args, env=NOW, timeout=20)     # a hang would time out here
        assert r.rc == 78 and "not a regular file" in r.err and r.err.count("\n") == 1, (args, r)


def test_author_names_with_separators_do_not_break_reconcile(tracked):
    for name in ("Eve\x1fMallory", "Zed\x1e\x1f|x", "Null\x01Byte"):
        env = dict(os.environ, GIT_AUTHOR_NAME=name, GIT_AUTHOR_EMAIL="eve@example.com",
                   GIT_COMMITTER_NAME="c", GIT_COMMITTER_EMAIL="c@example.com",
                   GIT_AUTHOR_DATE="2026-11-20T12:00:00Z", GIT_COMMITTER_DATE="2026-11-20T12:00:00Z",
                   HOME=tracked.home)
        subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=tracked.root,
                       env=env, check=True)
    r = tracked("reconcile", "--ci", env=NOW)
    assert r.rc == 1 and "Traceback" not in r.err, r
    assert "eve@example.com" in r.out and "\x1f" not in r.out, r.out
    assert store_key_of(tracked.root)  # the store itself is untouched


def test_a_huge_shard_in_the_old_in_tree_layout_is_refused_unread(repo):
    key = "mallory--0123456789"
    directory = os.path.join(repo.root, ".flowforge", "team", "summaries", key)
    os.makedirs(directory)
    with open(os.path.join(directory, "2026-11.json"), "wb") as f:
        f.write(b"{" + b" " * (flowforge.MAX_SHARD_BYTES + 10) + b"}")
    for args in (("report", "--json"), ("migrate",)):
        r = repo(*args, env=NOW)
        assert r.rc == 65 and "bytes, more than" in r.err and r.err.count("\n") == 1, (args, r)


def rows_by_hand(rows, month):
    """The rule a shard's rows follow, one row at a time: (by_issue, by_project), or
    None when some row is not [period of the month, issue, project, 0 < seconds <= a year]."""
    periods = {"%s-%02d" % (month, d) for d in range(1, 31)}
    by_issue, by_project = {}, {}
    for row in rows:
        if not (type(row) is list and len(row) == 4):
            return None
        period, issue, project, seconds = row
        if not (type(period) is str and period in periods and type(issue) is str
                and type(project) is str and len(issue) <= 1000 and len(project) <= 1000
                and type(seconds) is int and 0 < seconds <= 366 * 86400):
            return None
        by_issue[issue] = by_issue.get(issue, 0) + seconds
        by_project[project] = by_project.get(project, 0) + seconds
    return by_issue, by_project


def test_a_shards_rows_are_checked_as_the_rule_says():
    """On thousands of random rows, one spoilt cell each (a bool, a float, 0, a
    year and a second, a period of another month or none, a list, a tuple row,
    three or five cells, a long name), check_shard_sums accepts exactly what the
    rule accepts, sums the same, and names a malformed row otherwise."""
    import random
    rnd = random.Random(14)
    spoils = [lambda r: r.__setitem__(3, True), lambda r: r.__setitem__(3, 1.0),
              lambda r: r.__setitem__(3, 0), lambda r: r.__setitem__(3, -5),
              lambda r: r.__setitem__(3, 366 * 86400 + 1), lambda r: r.__setitem__(0, "2026-10-31"),
              lambda r: r.__setitem__(0, ["2026-11-16"]), lambda r: r.__setitem__(1, 7),
              lambda r: r.__setitem__(2, None), lambda r: r.__setitem__(1, "x" * 1001),
              lambda r: r.append(1), lambda r: r.pop(), lambda r: r.__setitem__(0, "2026-11-31")]
    outcomes = set()
    for case in range(3000):
        rows = [["2026-11-%02d" % rnd.randint(1, 30), rnd.choice("abc"), rnd.choice(["", "p"]),
                 rnd.choice([1, 60, 3600, 366 * 86400])] for _ in range(rnd.randint(0, 6))]
        if rows and case % 3:
            rnd.choice(spoils)(rnd.choice(rows))
            if case % 7 == 0:
                rows[rnd.randrange(len(rows))] = tuple(rows[0])
        expected = rows_by_hand(rows, "2026-11")
        doc = {"user": "alice", "store": "s1", "month": "2026-11", "granularity": "day",
               "rows": rows, "totals": {"seconds": sum(expected[0].values()) if expected else 0,
                                        "by_issue": expected[0] if expected else {}}}
        try:
            got = flowforge.check_shard_sums(doc)
        except ValueError as e:
            assert expected is None, (rows, e)
            assert "malformed row" in str(e), (rows, e)
            outcomes.add("refused")
            continue
        assert expected is not None and got == expected[1], rows
        outcomes.add("accepted")
    assert outcomes == {"accepted", "refused"}
