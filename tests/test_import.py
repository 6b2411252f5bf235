"""Imports (v1, Watson, Timewarrior), export and erase: idempotent, exact, no partial imports."""
import csv
import glob
import io
import json
import os

import pytest

import flowforge as ff

from conftest import ROOT, ledger_chain, ledger_files, private_total, store_key_of, tree_snapshot

NOW = {"FLOWFORGE_NOW": "2026-11-22T18:00:00Z"}
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def user_total(repo, user):
    return sum(ff.entry_seconds(e) for e in repo.ok(
        "entries", "--json", "--from", "2025-01-01", "--to", "2026-12-31", user=user,
        env=NOW).json["entries"])


def test_v1_import(repo):
    path = os.path.join(FIXTURES, "task-times.json")
    r = repo.ok("import", "v1", path, "--map", "olduser=bob", env=NOW)
    assert "imported 3 entries for alice" in r.out and "imported 1 entry for bob" in r.out
    assert "not billed: 123, alice" in r.out and "duration 0" in r.out
    assert "restored: running 123 since" in r.out
    assert "not restored: bob's running 124" in r.out
    assert "branch" in r.out and "priority" in r.out          # unknown fields, reported
    assert user_total(repo, "alice") == 5400 + 3600 + 7200    # the explicit duration wins
    assert user_total(repo, "bob") == 4500
    entries = {e["issue"]: e for e in repo.ok("entries", "--json", "--from", "2026-11-01",
                                              "--to", "2026-11-30", env=NOW).json["entries"]
               if e.get("seconds") == 7200}
    assert entries["123"]["extra"] == {"branch": "feature/x"} and "paused twice" in entries["123"]["note"]
    status = repo.ok("status", "--json", env=NOW).json
    assert status["timer"]["issue"] == "123" and status["timer"]["running_since"] == 1795165200
    repo.ok("aggregate", "--all", env=NOW)
    rows = repo.ok("report", "--json", "--by", "user,day").json["rows"]
    assert {(r["user"], r["day"]): r["seconds"] for r in rows if r["user"] == "bob"} == {
        ("bob", "2026-11-16"): 1800, ("bob", "2026-11-17"): 2700}       # split at midnight
    local = ff.AuditChain(os.path.join(repo.root, ".flowforge/user/alice/audit.jsonl")).records()
    [imported] = [r for r in local if r["action"] == "import"]
    assert imported["unknown_fields"] == ["branch", "priority"] and imported["added"] == 3
    assert imported["sha256"] == ff.sha256_hex(open(path, "rb").read())
    # twice: nothing added
    r = repo.ok("import", "v1", path, "--map", "olduser=bob", env=NOW)
    assert "imported 0 entries for alice (3 already there)" in r.out
    assert user_total(repo, "alice") == 16200


def test_v1_import_does_not_resurrect_deleted_entries(repo):
    path = os.path.join(FIXTURES, "task-times.json")
    repo.ok("import", "v1", path, "--map", "olduser=bob", env=NOW)
    victim = repo.ok("entries", "--json", "--date", "2026-11-16", env=NOW).json["entries"][0]
    repo.ok("delete", victim["id"], env=NOW)
    repo.ok("import", "v1", path, "--map", "olduser=bob", env=NOW)
    assert user_total(repo, "alice") == 16200 - 5400


def test_watson_import(repo):
    path = os.path.join(FIXTURES, "watson-frames.json")
    r = repo("import", "watson", path, env=NOW)
    assert r.rc == 65 and "1 frame(s) have no tag" in r.err and "--default-issue" in r.err
    assert not os.path.exists(os.path.join(repo.root, ".flowforge/user/alice/time/daily/2025-11-16.jsonl"))
    # two of the frames overlap (10:00-10:15 UTC inside 09:00-11:00): refused, nothing written
    r = repo("import", "watson", path, "--default-issue", "OPS-1", env=NOW)
    assert r.rc == 65 and "overlap" in r.err and "nothing was imported" in r.err
    assert user_total(repo, "alice") == 0
    r = repo.ok("import", "watson", path, "--default-issue", "OPS-1", "--allow-overlap", env=NOW)
    assert "imported 4 entries for alice (0 already there)" in r.out
    assert "1 of them overlap other entries (imported, marked)" in r.out
    assert user_total(repo, "alice") == 3600 + 2700 + 7200 + 900
    by_issue = {e["issue"]: e for e in repo.ok("entries", "--json", "--from", "2025-11-01", "--to",
                                                "2025-11-30", env=NOW).json["entries"]}
    assert sorted(by_issue) == ["42", "ACME-9", "OPS-1", "acme/api#5"]
    assert by_issue["42"]["project"] == "acme" and by_issue["42"]["note"] == "watson: review"
    assert by_issue["OPS-1"]["project"] == "internal tools"
    r = repo.ok("import", "watson", path, "--default-issue", "OPS-1", env=NOW)
    assert "imported 0 entries for alice (4 already there)" in r.out


def test_timewarrior_import(repo):
    path = os.path.join(FIXTURES, "timewarrior")
    r = repo.ok("import", "timewarrior", path, "--project", "acme", env=NOW)
    assert "imported 4 entries for alice" in r.out
    assert "restored: running 42 since" in r.out
    assert user_total(repo, "alice") == 7200 + 1800 + 7200 + 9000
    by_issue = {e["issue"]: e for e in repo.ok("entries", "--json", "--from", "2026-10-01", "--to",
                                                "2026-11-30", env=NOW).json["entries"]}
    assert by_issue["OPS-3"]["note"] == "timewarrior: on call pager went off"
    assert by_issue["owner/repo#9"]["note"] == 'timewarrior: late "fix"'
    assert by_issue["ABC-12"]["project"] == "acme"
    assert by_issue["ABC-12"]["note"] == "timewarrior"          # only the issue's tag: no words
    repo.ok("stop", "--at", "2026-11-20 09:00", env=NOW)
    repo.ok("aggregate", env=NOW)
    rows = repo.ok("report", "--json", "--by", "month").json["rows"]
    assert {r["month"]: r["seconds"] for r in rows} == {"2026-10": 7200,
                                                        "2026-11": 1800 + 7200 + 1800 + 7200 + 3600}
    r = repo.ok("import", "timewarrior", path, "--project", "acme", env=NOW)
    assert "imported 0 entries for alice (4 already there)" in r.out


def test_reimporting_a_stopped_running_session_does_not_restore_it(repo, tmp_path):
    """The running v1 session is restored once; after it was stopped, importing
    the same file again, or the file after v1 closed the session, adds nothing."""
    path = os.path.join(FIXTURES, "task-times.json")
    repo.ok("import", "v1", path, "--map", "olduser=bob", env=NOW)
    repo.ok("stop", "--at", "2026-11-20T11:00:00Z", env=NOW)
    assert user_total(repo, "alice") == 16200 + 7200
    r = repo.ok("import", "v1", path, "--map", "olduser=bob", env=NOW)
    assert "was already stopped and recorded" in r.out
    assert repo.ok("status", "--json", env=NOW).json["timer"] is None
    doc = json.load(open(path))
    closed = dict(doc["123"].pop("current_session"), end="2026-11-20T11:30:00Z")
    doc["123"]["sessions"].append(closed)
    later = tmp_path / "later.json"
    later.write_text(json.dumps(doc))
    r = repo.ok("import", "v1", str(later), "--map", "olduser=bob", env=NOW)
    assert "imported 0 entries for alice (4 already there)" in r.out
    assert user_total(repo, "alice") == 16200 + 7200      # FlowForge's own stop wins


def test_reimporting_a_running_interval_while_it_runs(repo, tmp_path):
    path = os.path.join(FIXTURES, "timewarrior")
    repo.ok("import", "timewarrior", path, env=NOW)
    r = repo.ok("import", "timewarrior", path, env=NOW)
    assert "already running: 42" in r.out
    repo.ok("stop", "--at", "2026-11-20 09:00", env=NOW)
    tw = tmp_path / "tw" / "data"
    tw.mkdir(parents=True)
    for name in ("2026-10.data", "2026-11.data"):
        text = open(os.path.join(path, "data", name)).read()
        (tw / name).write_text(text.replace("20261120T080000Z #", "20261120T080000Z - "
                                            "20261120T093000Z #"))
    r = repo.ok("import", "timewarrior", str(tw.parent), env=NOW)
    assert "imported 0 entries for alice (5 already there)" in r.out
    assert user_total(repo, "alice") == 7200 + 1800 + 7200 + 9000 + 3600


def test_reimport_after_a_time_zone_change_adds_nothing(repo):
    path = os.path.join(FIXTURES, "watson-frames.json")
    repo.ok("import", "watson", path, "--default-issue", "OPS-1", "--allow-overlap", env=NOW)
    repo.ok("init", "--timezone", "Pacific/Kiritimati")          # UTC+14: other local days
    r = repo.ok("import", "watson", path, "--default-issue", "OPS-1", env=NOW)
    assert "imported 0 entries for alice (4 already there)" in r.out
    assert user_total(repo, "alice") == 3600 + 2700 + 7200 + 900


def test_another_users_running_session_alone_creates_no_store(repo, tmp_path):
    path = tmp_path / "only-bob.json"
    path.write_text(json.dumps({"7": {"current_session": {"start": "2026-11-20T10:00:00Z",
                                                          "user": "bob"}}}))
    r = repo.ok("import", "v1", str(path), env=NOW)
    assert "not restored: bob's running 7" in r.out
    assert not os.path.exists(os.path.join(repo.root, ".flowforge/user/bob"))


MALFORMED = [
    ("v1", "not json {", "not valid JSON"),
    ("v1", "[]", "expected an object"),
    ("v1", '{"fix login": {"sessions": []}}', "not an issue reference"),
    ("v1", '{"1": {"sessions": [{"start": "2026-11-16T09:00:00Z", "user": "alice"}]}}',
     "neither an end nor a duration"),
    ("v1", '{"1": {"sessions": [{"start": "yesterday", "end": "2026-11-16T09:00:00Z", '
           '"user": "alice"}]}}', "not ISO-8601"),
    ("v1", '{"1": {"sessions": [{"start": "2026-11-16T09:00:00Z", "duration": 60, '
           '"user": "../x"}]}}', "not a valid name"),
    ("v1", '{"1": {"sessions": [{"start": "2026-11-16T09:00:00Z", "duration": -5, '
           '"user": "alice"}]}}', "not a number of seconds"),
    ("v1", '{"1": {"sessions": [{"start": "2026-11-16T09:00:00Z", "duration": 60, '
           '"user": ["alice"]}]}}', "not a valid name"),
    ("v1", '{"1": {"sessions": [{"start": "2026-11-16T09:00:00Z", "duration": Infinity, '
           '"user": "alice"}]}}', "not a number of seconds"),
    ("v1", '{"1": {"sessions": [{"start": "2026-11-16T09:00:00Z", "duration": NaN, '
           '"user": "alice"}]}}', "not a number of seconds"),
    ("v1", '{"1": {"sessions": [{"start": "0000-01-01T00:00:00Z", "duration": 60, '
           '"user": "alice"}]}}', "not ISO-8601"),
    ("v1", '{"1": {"sessions": [{"start": "0001-01-01T00:00:00Z", "duration": 60, '
           '"user": "alice"}]}}', "not ISO-8601"),
    ("v1", '{"1": {"sessions": [{"start": "garbage"}]}}', "has no user"),
    ("v1", '{"1": {"sessions": [{"start": "garbage", "user": "alice"}]}}', "not ISO-8601"),
    ("watson", '{"frames": []}', "expected a list"),
    ("watson", '[[NaN, 1763283600, "p", "id1", ["1"]]]', "must be Unix times"),
    ("watson", '[[1763280000, 1e30, "p", "id1", ["1"]]]', "must be Unix times"),
    ("watson", '[[1763280000, 1763283600, ["p"], "id1", ["1"]]]', "project must be a string"),
    ("watson", '[[1763283600, 1763280000, "p", "id1", ["1"]]]', "stops before it starts"),
    ("watson", '[[1763280000, 1763283600, "p", "id1", "1"]]', "tags must be a list"),
    ("watson", '[["a", "b", "p", "id"]]', "must be Unix times"),
    ("timewarrior", "inc 20261116T080000Z - 20261116T100000Z # 42\ninc garbage\n", "line 2"),
    ("timewarrior", 'inc 20261116T080000Z - 20261116T100000Z # "42\n', "unterminated quote"),
    ("timewarrior", "inc 20261116T100000Z - 20261116T080000Z # 42\n", "ends before it starts"),
    ("timewarrior", "inc 20261399T100000Z - 20261116T080000Z # 42\n", "not a valid time"),
]


@pytest.mark.parametrize("kind,content,message", MALFORMED)
def test_malformed_imports_change_nothing(repo, tmp_path, kind, content, message):
    repo.ok("log", "1", "1h", env=NOW)
    if kind == "timewarrior":
        path = tmp_path / "tw"
        (path / "data").mkdir(parents=True)
        (path / "data" / "2026-11.data").write_text(content)
    else:
        path = tmp_path / "input.json"
        path.write_text(content)
    before = tree_snapshot(repo.root)
    r = repo("import", kind, str(path), env=NOW)
    assert r.rc == 65 and message in r.err and r.err.count("\n") == 1, r
    assert tree_snapshot(repo.root) == before


def test_import_usage_errors(repo, tmp_path):
    assert repo("import", "v1", str(tmp_path / "missing.json")).rc == 64
    assert repo("import", "timewarrior", str(tmp_path / "nothing-here")).rc == 64
    (tmp_path / "empty").mkdir()
    assert repo("import", "timewarrior", str(tmp_path / "empty")).rc == 65
    assert repo("import", "v1", os.path.join(FIXTURES, "task-times.json"), "--map", "x").rc == 64
    r = repo("import", "v1", os.path.join(FIXTURES, "task-times.json"), "--dry-run", env=NOW)
    assert r.rc == 0 and "would import" in r.out
    assert private_total(repo.root) == 0


def test_export_is_complete_and_csv_safe(repo):
    repo.ok("start", "1", "--at", "09:00", "--note", "=HYPERLINK(\"x\")", env=NOW)
    repo.ok("stop", "--at", "10:00", env=NOW)
    repo.ok("log", "2", "30m", "--date", "2026-11-01", "--note", "plain", env=NOW)
    doc = repo.ok("export", env=NOW).json
    assert doc["schema"] == "flowforge.export/1" and len(doc["entries"]) == 2
    assert {e["note"] for e in doc["entries"]} == {'=HYPERLINK("x")', "plain"}
    rows = list(csv.reader(io.StringIO(repo.ok("export", "--format", "csv", env=NOW).out)))
    assert rows[0][:5] == ["id", "day", "start", "end", "seconds"]
    assert any(r[7] == "'=HYPERLINK(\"x\")" for r in rows[1:])
    out = os.path.join(repo.root, "..", "mine.json")
    repo.ok("export", "--output", out, env=NOW)
    assert json.load(open(out))["entries"] == doc["entries"]


def test_erase(repo):
    repo.ok("log", "1", "1h", env=NOW)
    repo.ok("aggregate", env=NOW)
    day = os.path.join(repo.root, ".flowforge/user/alice/time/daily/2026-11-22.jsonl")
    with open(day, "ab") as f:
        f.write(b"torn")
    repo.ok("log", "2", "1h", env=NOW)                      # quarantines a private copy
    [mirror] = glob.glob(os.path.join(repo.home, "xdg-data", "flowforge", "*", "alice--*"))
    assert os.path.isfile(os.path.join(mirror, "time", "daily", "2026-11-22.jsonl"))
    assert repo("erase", env=NOW).rc == 64                  # needs --yes
    key = store_key_of(repo.root)
    files_before = ledger_files(repo.root)
    chain_before = ledger_chain(repo.root)
    r = repo.ok("erase", "--yes", env=NOW)
    assert "erased .flowforge/user/alice" in r.out and "erased quarantine Q1" in r.out
    assert not os.path.exists(os.path.join(repo.root, ".flowforge/user/alice"))
    assert not os.path.exists(mirror)
    assert repo.ok("quarantine", "list", "--json").json["items"] == []
    # the erasure is one more record on the store's team chain, in its ledger ref
    assert store_key_of(repo.root) == key
    chain = ledger_chain(repo.root)
    assert chain.startswith(chain_before) and len(chain) > len(chain_before)
    records = [json.loads(line) for line in chain.splitlines()]
    assert records[-1]["action"] == "erase" and records[-1]["files"] == {}
    assert len(records) == len(chain_before.splitlines()) + 1
    assert ff.verify_chain_bytes(chain, key)["ok"]
    files_after = ledger_files(repo.root)
    assert {n: d for n, d in files_after.items() if n.startswith("summaries/")} == \
        {n: d for n, d in files_before.items() if n.startswith("summaries/")}
    assert repo.ok("report", "--json").json["total_seconds"] == 3600   # the aggregates stay
