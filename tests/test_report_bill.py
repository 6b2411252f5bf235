"""Reports and billing from committed shards."""
import csv
import io
import json
import os
import random

import pytest

import flowforge as ff

NOW = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def set_config(repo, **billing):
    path = os.path.join(repo.root, ".flowforge/config.json")
    config = json.load(open(path))
    config["billing"].update(billing)
    json.dump(config, open(path, "w"), indent=2)


@pytest.fixture
def team(repo):
    repo.ok("log", "1", "1h", "--project", "web", "--date", "2026-11-02", user="alice", env=NOW)
    repo.ok("log", "2", "30m", "--project", "api", "--date", "2026-11-03", user="alice", env=NOW)
    repo.ok("log", "1", "2h15m", "--project", "web", "--date", "2026-11-10", user="bob", env=NOW)
    repo.ok("log", "3", "10m", "--project", "web", "--date", "2026-10-30", user="bob", env=NOW)
    repo.ok("log", "3", "7m", "--project", "web", "--date", "2026-11-10", user="bob", env=NOW)
    repo.ok("aggregate", "--all", env=NOW)
    return repo


def test_report_by_user_and_issue(team):
    r = team.ok("report", "--json", "--by", "user,issue")
    rows = [(x["user"], x["issue"], x["seconds"]) for x in r.json["rows"]]
    assert rows == [("alice", "1", 3600), ("alice", "2", 1800), ("bob", "1", 8100),
                    ("bob", "3", 1020)]
    assert r.json["total_seconds"] == 14520
    assert r.json["schema"] == "flowforge.report/1"


def test_report_dimensions_and_ranges(team):
    r = team.ok("report", "--json", "--by", "project,week", "--from", "2026-11-01",
                "--to", "2026-11-30")
    assert [(x["project"], x["week"], x["seconds"]) for x in r.json["rows"]] == [
        ("api", "2026-W45", 1800), ("web", "2026-W45", 3600), ("web", "2026-W46", 8520)]
    r = team.ok("report", "--json", "--by", "month")
    assert [(x["month"], x["seconds"]) for x in r.json["rows"]] == [("2026-10", 600),
                                                                    ("2026-11", 13920)]
    r = team.ok("report", "--json", "--by", "day", "--from", "2026-11-10", "--to", "2026-11-10")
    assert r.json["total_seconds"] == 8100 + 420
    r = team.ok("report", "--json", "--period", "week", "--by", "user",
                env={"FLOWFORGE_NOW": "2026-11-12T12:00:00Z"})
    assert [(x["user"], x["seconds"]) for x in r.json["rows"]] == [("bob", 8520)]


def test_report_formats(team):
    table = team.ok("report", "--by", "user").out
    assert "alice" in table and "total" in table and "4:02" in table
    md = team.ok("report", "--by", "user", "--format", "md").out
    assert "| user | time | hours |" in md
    html = team.ok("report", "--by", "user", "--format", "html").out
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert html.count('<tr data-seconds="') == 3          # alice, bob, carol
    rows = list(csv.reader(io.StringIO(team.ok("report", "--by", "user", "--format", "csv").out)))
    assert rows[0] == ["user", "seconds", "hours"]            # exact seconds, decimal hours
    assert rows[1] == ["alice", "5400", "1.50"]


def test_report_on_empty_repo_and_bad_arguments(repo):
    assert "no tracked time" in repo.ok("report").out
    assert repo("report", "--by", "user,bogus").rc == 64
    assert repo("report", "--from", "2026-13-01").rc == 64
    assert repo("report", "--format", "xml").rc == 64


def test_csv_cells_are_neutralised(repo):
    """A teammate can commit any shard: a formula in it must not reach a spreadsheet."""
    cells = {("2026-11-02", "=HYPERLINK(\"http://x\")", "+cmd|' /C calc'!A0", 3600): None}
    data = ff.render_shard("mallory", "abcdef0123", "2026-11", "day", "UTC",
                           {k[:3]: k[3] for k in cells})
    d = os.path.join(repo.root, ".flowforge/team/summaries/mallory--abcdef0123")
    os.makedirs(d)
    open(os.path.join(d, "2026-11.json"), "wb").write(data)
    out = repo.ok("report", "--by", "issue,project", "--format", "csv").out
    row = list(csv.reader(io.StringIO(out)))[1]
    assert row[0].startswith("'=") and row[1].startswith("'+")
    out = repo.ok("bill", "--month", "2026-11", "--format", "csv", "--by-issue").out
    for row in list(csv.reader(io.StringIO(out)))[1:]:
        assert not any(c[:1] in ("=", "+", "-", "@") for c in row), row
    assert ff.csv_safe("@SUM(A1)") == "'@SUM(A1)" and ff.csv_safe("-1+A1") == "'-1+A1"
    assert ff.csv_safe("-1") == "'-1"          # text such as a project named -1; figures are kept
    assert ff.csv_safe("alice") == "alice"


def test_bill_rates_and_exact_money(team):
    set_config(team, currency="EUR", default_rate="100", user_rates={"bob": "80.50"},
               project_rates={"api": "120.00"}, user_project_rates={"bob/web": "90.125"})
    bill = team.ok("bill", "--month", "2026-11", "--json").json
    lines = {(line["project"], line["user"]): line for line in bill["lines"]}
    assert lines[("web", "alice")]["rate"] == "100.00"     # default
    assert lines[("web", "alice")]["amount"] == "100.00"
    assert lines[("api", "alice")]["amount"] == "60.00"    # project rate beats default
    # user/project rate is most specific: 8520 s at 90.125/h = 213.29583.. -> 213.30
    assert lines[("web", "bob")]["amount"] == "213.30"
    assert bill["total_amount"] == "373.30"
    assert bill["currency"] == "EUR"
    assert isinstance(bill["total_amount"], str)


def test_bill_one_second_is_billed_exactly(repo):
    set_config(repo, default_rate="3600.00")
    repo.ok("log", "1", "1s", "--date", "2026-11-02", env=NOW)
    repo.ok("aggregate", env=NOW)
    assert repo.ok("bill", "--month", "2026-11", "--json").json["total_amount"] == "1.00"


@pytest.mark.parametrize("mode,scope,expected_billable", [
    ("up", "line", 9000),       # bob/web 8520 s -> 9000 (15-min increments)
    ("down", "line", 8100),
    ("nearest", "line", 8100),  # 8520 is 7 min past 2:15 -> nearest 2:15
    ("up", "day", 9000),        # cells 8100 + 420 -> 8100 + 900
    ("down", "day", 8100),      # 8100 + 0
])
def test_bill_rounding(team, mode, scope, expected_billable):
    set_config(team, default_rate="60", round_minutes=15, round_mode=mode, round_scope=scope)
    bill = team.ok("bill", "--month", "2026-11", "--json").json
    line = [x for x in bill["lines"] if x["user"] == "bob"][0]
    assert line["seconds"] == 8520
    assert line["billable_seconds"] == expected_billable
    assert line["amount"] == "%d.00" % (expected_billable // 60)


def test_bill_formats_and_ranges(team):
    set_config(team, default_rate="50")
    out = team.ok("bill", "--month", "2026-11").out
    assert "total" in out and "USD" in out
    csv_rows = list(csv.reader(io.StringIO(team.ok("bill", "--month", "2026-11", "--format",
                                                   "csv").out)))
    assert csv_rows[0] == ["project", "user", "kind", "month", "in_total", "seconds", "hours",
                           "billable_seconds", "billable_hours", "rate", "amount", "currency"]
    assert {row[2] for row in csv_rows[1:]} == {"line"} and {row[11] for row in csv_rows[1:]} == {"USD"}
    by_issue = team.ok("bill", "--from", "2026-10-01", "--to", "2026-11-30", "--by-issue",
                       "--json").json
    assert sum(line["seconds"] for line in by_issue["lines"]) == 14520
    assert team("bill", "--month", "2026-13").rc == 64
    assert team("bill", "--month", "2026-11", "--from", "2026-11-01").rc == 64


def test_bad_config_is_exit_78(team):
    set_config(team, round_mode="sideways")
    r = team("bill")
    assert r.rc == 78 and "round_mode" in r.err
    set_config(team, round_mode="up", default_rate="1e3")
    assert team("bill").rc == 78
    open(os.path.join(team.root, ".flowforge/config.json"), "w").write("{not json")
    r = team("report")
    assert r.rc == 78 and "not valid JSON" in r.err


def test_tables_show_every_cell_as_text_with_control_characters_neutralised():
    """Whole tables are checked at once in the common case (all text, all
    printable); any number or control character anywhere gives, cell by cell,
    what checking every row would: numbers as text, control characters as `?`,
    and right-aligned last columns without trailing blanks."""
    rng = random.Random(7)
    alphabet = ["a", "Z", "7", " ", "é", "\x1b", "\x07", "\x9b", "|", "=", "\u2028"]

    def cell():
        if rng.random() < 0.1:
            return rng.randint(-5, 10 ** 6)
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
    for _ in range(300):
        headers = rng.choice([["user", "issue", "time", "hours"], ["id", "note"], ["issue", "seconds"]])
        clean = rng.random() < 0.5
        rows = [[(str(rng.randint(0, 99)) if clean else cell()) for _ in headers]
                for _ in range(rng.randint(0, 8))]
        if rng.random() < 0.3:
            rows = [tuple(r) for r in rows]
        expected = [[ff.printable(str(c)) for c in row] for row in rows]
        for fmt in ("table", "md", "csv"):
            got = ff.render(fmt, headers, rows)
            assert got == ff.render(fmt, headers, expected), (fmt, rows)
        table = ff.render("table", headers, expected)
        assert all(line == line.rstrip() for line in table.split("\n")), repr(table)
        assert "\x1b" not in table and "\x07" not in table and "\x9b" not in table
