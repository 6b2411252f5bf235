"""A manager's month end: periods and filters, the report page and the invoice,
exports, closed periods with adjustments, and bills across repositories."""
import csv
import io
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from html.parser import HTMLParser

import pytest

import flowforge as ff
from conftest import Runner, git, make_git_repo, rewrite_ledger, store_key_of
from test_ledger import Clone, make_origin

DEC = {"FLOWFORGE_NOW": "2026-12-01T09:00:00Z"}
NOV = {"FLOWFORGE_NOW": "2026-11-20T18:00:00Z"}


def set_billing(root, **billing):
    path = os.path.join(root, ".flowforge/config.json")
    config = json.load(open(path))
    config["billing"].update(billing)
    json.dump(config, open(path, "w"), indent=2)


@pytest.fixture
def month(repo):
    """October and November 2026 of three people, rates and a 15-minute increment."""
    set_billing(repo.root, currency="EUR", default_rate="100.00", user_rates={"carol": "80.00"},
                round_minutes=15, invoice={
                    "issuer": {"name": "Acme Dev GmbH", "address": ["Hauptstr. 1", "Berlin"],
                               "email": "billing@acme.dev", "tax_id": "DE123"},
                    "client": {"name": "Globex <Corp> & Sons", "address": ["1 Plaza"]},
                    "number": "ACME-{month}", "due_days": 30})
    for user, issue, duration, day, project in (
            ("alice", "WEB-1", "2h", "2026-11-02", "web"), ("alice", "API-2", "50m", "2026-11-03", "api"),
            ("bob", "WEB-1", "1h10m", "2026-11-03", "web"), ("bob", "WEB-9", "3h", "2026-11-24", "web"),
            ("carol", "OPS-4", "40m", "2026-11-30", "ops"), ("carol", "OPS-4", "25m", "2026-10-31", "ops"),
            ("alice", "WEB-1", "1h", "2026-12-01", "web")):
        repo.ok("log", issue, duration, "--date", day, "--project", project, user=user, env=DEC)
    repo.ok("aggregate", "--all", env=DEC)
    return repo


def rows_of(result, *dims):
    return {tuple(r[d] for d in dims): r["seconds"] for r in result.json["rows"]}


# -- 1. periods and filters ------------------------------------------------------

def test_periods_name_the_days_they_cover(month):
    def span(*args):
        doc = month.ok("report", "--json", *args, env=DEC).json
        return doc["from"], doc["to"], doc["total_seconds"]
    assert span("--period", "today") == ("2026-12-01", "2026-12-01", 3600)
    assert span("--period", "yesterday") == ("2026-11-30", "2026-11-30", 2400)
    assert span("--period", "this-week") == ("2026-11-30", "2026-12-06", 6000)
    assert span("--period", "last-week") == ("2026-11-23", "2026-11-29", 10800)
    assert span("--period", "this-month")[:2] == ("2026-12-01", "2026-12-31")
    assert span("--period", "last-month") == ("2026-11-01", "2026-11-30", 7200 + 3000 + 4200
                                              + 10800 + 2400)
    assert span("--period", "2026-10") == ("2026-10-01", "2026-10-31", 1500)
    assert span("--period", "2026-W45") == ("2026-11-02", "2026-11-08", 7200 + 3000 + 4200)
    assert span("--from", "yesterday", "--to", "today")[2] == 6000


def test_an_empty_or_unknown_period_is_a_usage_error(month):
    r = month("report", "--from", "2026-11-05", "--to", "2026-11-01", env=DEC)
    assert r.rc == 64 and "after --to" in r.err and r.out == ""
    for bad in ("2026-W60", "lastweek", "2026-13"):
        r = month("report", "--period", bad, env=DEC)
        assert r.rc == 64 and len(r.err.strip().splitlines()) == 1, r
    assert month("report", "--period", "today", "--from", "2026-11-01", env=DEC).rc == 64
    assert month("bill", "--month", "2026-11", "--period", "last-week", env=DEC).rc == 64


def test_filters_repeat_and_take_globs(month):
    r = month.ok("report", "--json", "--period", "2026-11", "--user", "a*", "--user", "carol",
                 "--by", "user,issue", env=DEC)
    assert rows_of(r, "user", "issue") == {("alice", "WEB-1"): 7200, ("alice", "API-2"): 3000,
                                           ("carol", "OPS-4"): 2400}
    r = month.ok("report", "--json", "--project", "web", "--issue", "WEB-*", "--by", "issue",
                 "--period", "2026-11", env=DEC)
    assert rows_of(r, "issue") == {("WEB-1",): 7200 + 4200, ("WEB-9",): 10800}
    assert r.json["filters"] == {"users": [], "projects": ["web"], "issues": ["WEB-*"]}
    out = month.ok("report", "--user", "nobody*", "--period", "2026-11", env=DEC).out
    assert "no tracked time in 2026-11 (user nobody*)" in out
    bill = month.ok("bill", "--json", "--user", "bob", env=DEC).json
    assert {(line["user"], line["seconds"]) for line in bill["lines"]} == {("bob", 4200 + 10800)}


def test_bill_without_a_month_bills_the_last_complete_month(month):
    r = month.ok("bill", env=DEC)
    assert r.out.splitlines()[0].startswith("Bill 2026-11 (the last complete month), EUR")
    doc = month.ok("bill", "--json", env=DEC).json
    assert (doc["from"], doc["to"], doc["period"]) == ("2026-11-01", "2026-11-30", "last-month")


# -- 3. exports --------------------------------------------------------------------

def test_csv_exports_have_stable_columns_exact_seconds_and_the_currency(month):
    report = list(csv.DictReader(io.StringIO(month.ok(
        "report", "--format", "csv", "--period", "2026-11", "--by", "user,project", env=DEC).out)))
    assert list(report[0]) == ["user", "project", "seconds", "hours"]
    assert {(r["user"], r["project"]): (int(r["seconds"]), r["hours"]) for r in report} == {
        ("alice", "api"): (3000, "0.83"), ("alice", "web"): (7200, "2.00"),
        ("bob", "web"): (15000, "4.17"), ("carol", "ops"): (2400, "0.67")}
    bill = list(csv.DictReader(io.StringIO(month.ok("bill", "--format", "csv", env=DEC).out)))
    assert list(bill[0]) == ["project", "user", "kind", "month", "in_total", "seconds", "hours",
                             "billable_seconds", "billable_hours", "rate", "amount", "currency"]
    carol = [r for r in bill if r["user"] == "carol"][0]
    assert (carol["seconds"], carol["billable_seconds"], carol["rate"], carol["amount"],
            carol["currency"], carol["month"]) == ("2400", "2700", "80.00", "60.00", "EUR", "2026-11")


def test_by_store_shows_the_user_and_a_readable_label(month):
    r = month.ok("report", "--json", "--by", "store", env=DEC)
    labels = {row["user"]: row["store_label"] for row in r.json["rows"]}
    assert labels == {"alice": "alice, since 2026-11", "bob": "bob, since 2026-11",
                      "carol": "carol, since 2026-10"}
    table = month.ok("report", "--by", "store", env=DEC).out
    header = table.splitlines()[1].split()
    assert header[:3] == ["user", "store", "store_id"]
    assert "carol, since 2026-10" in table and os.uname().nodename not in table


# -- 2. the page and the invoice -----------------------------------------------------

class Page(HTMLParser):
    """Tags, data- attributes and text of a page; fails on anything external."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.data, self.text, self.stack = [], [], [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        assert tag not in ("script", "link", "img", "iframe", "object"), tag
        for name in ("src", "href"):
            assert name not in attrs, (tag, attrs)
        if any(k.startswith("data-") for k in attrs):
            self.data.append((tag, attrs))

    def handle_data(self, data):
        self.text.append(data)

    def with_attr(self, name, tag=None):
        return [a for t, a in self.data if name in a and (tag is None or t == tag)]


def test_report_page_is_one_complete_document_whose_figures_are_the_json_report(month):
    html = month.ok("report", "--format", "html", "--period", "2026-11", env=DEC).out
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "url(" not in html and "@import" not in html and "http" not in html.split("<body")[0]
    page = Page(html)
    assert {"svg", "rect", "table", "tfoot", "style", "title"} <= set(page.tags)
    by_user_issue = month.ok("report", "--json", "--period", "2026-11", env=DEC).json
    rows = [a for a in page.with_attr("data-seconds", "tr") if "data-total" not in a]
    assert [int(a["data-seconds"]) for a in rows] == [r["seconds"] for r in by_user_issue["rows"]]
    [total] = page.with_attr("data-total", "tr")
    assert int(total["data-seconds"]) == by_user_issue["total_seconds"]
    # the chart: one bar per (day, user), stacked; sums per user are the report's
    per_day_user = month.ok("report", "--json", "--period", "2026-11", "--by", "day,user",
                            env=DEC)
    bars = {(a["data-period"], a["data-user"]): int(a["data-seconds"])
            for a in page.with_attr("data-user", "rect")}
    assert bars == rows_of(per_day_user, "day", "user")
    for kind in ("issue", "project"):
        expected = rows_of(month.ok("report", "--json", "--period", "2026-11", "--by", kind,
                                    env=DEC), kind)
        assert {(a["data-" + kind],): int(a["data-seconds"])
                for a in page.with_attr("data-" + kind, "li")} == expected
    calendar = {a["data-day"]: int(a["data-seconds"]) for a in page.with_attr("data-day", "td")}
    assert len(calendar) == 30 and calendar["2026-11-24"] == 10800 and calendar["2026-11-01"] == 0


def test_invoice_page_has_the_parties_the_rule_and_every_cent_of_the_bill(month):
    html = month.ok("bill", "--format", "html", env=DEC).out
    page = Page(html)
    text = " ".join(page.text)
    for words in ("Invoice ACME-2026-11", "Acme Dev GmbH", "DE123", "Globex <Corp> & Sons",
                  "Rounded up to 15 min per line", "Due 2026-12-31", "EUR"):
        assert words in re.sub(r"\s+", " ", text), words
    assert "Globex <Corp>" not in html                          # escaped, not markup
    assert "@page{size:A4" in html and "@media print" in html
    bill = month.ok("bill", "--json", env=DEC).json
    lines = [a for a in page.with_attr("data-amount", "tr") if "data-total" not in a]
    assert [(int(a["data-seconds"]), int(a["data-billable-seconds"]), a["data-amount"])
            for a in lines] == [(x["seconds"], x["billable_seconds"], x["amount"])
                                for x in bill["lines"]]
    [grand] = page.with_attr("data-total", "span")
    assert grand["data-amount"] == bill["total_amount"] == "%.2f" % sum(
        float(x["amount"]) for x in bill["lines"])


def png_pixels_differ(path):
    """Whether a PNG is more than one flat colour (no imaging library needed)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", None
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            width = struct.unpack(">I", data[pos + 8:pos + 12])[0]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + size]
        pos += 12 + size
    raw = zlib.decompress(idat)
    return width > 100 and len(set(raw[::97])) > 16


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed "
                    "(apt-get install chromium): the pages are not rendered")
def test_pages_render_in_headless_chromium(month, tmp_path):
    for name, args in (("report", ["report", "--period", "2026-11"]), ("bill", ["bill"])):
        page = tmp_path / (name + ".html")
        month.ok(*args, "--format", "html", "--output", page, env=DEC)
        shot = tmp_path / (name + ".png")
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--window-size=1200,1400", "--screenshot=%s" % shot, "file://%s" % page],
                       check=True, capture_output=True, timeout=120)
        assert png_pixels_differ(shot), name


def test_open_writes_the_page_and_says_where_without_a_browser(month):
    r = month.ok("report", "--format", "html", "--open", env=dict(DEC, BROWSER="false"))
    [path] = re.findall(r"wrote (\S+\.html)", r.err)
    assert path == os.path.join(month.root, ".flowforge/state/pages/report-all-time.html")
    assert open(path).read().startswith("<!DOCTYPE html>")
    assert "no browser to open here: the page is %s" % path in r.err
    r = month.ok("bill", "--format", "html", "--open", "--month", "2026-11",
                 env=dict(DEC, BROWSER="false"))
    assert re.findall(r"wrote (\S+\.html)", r.err)[0].endswith("/bill-2026-11-01_2026-11-30.html")
    assert month("report", "--open", env=DEC).rc == 64


def test_hostile_names_cannot_break_out_of_the_page(repo):
    """Issue and project names come from teammates' commits: the page escapes them."""
    repo.ok("log", "1", "1h", "--date", "2026-11-02", env=DEC)
    repo.ok("aggregate", env=DEC)
    key = store_key_of(repo.root)
    user, store_id = key.rsplit("--", 1)
    rewrite_ledger(repo.root, {"summaries/2026-11.json": ff.render_shard(
        user, store_id, "2026-11", "day", "UTC",
        {("2026-11-02", "<script>alert(1)</script>", '"><img src=x onerror=alert(2)>'): 3600})})
    html = repo.ok("report", "--format", "html", "--by", "issue,project", "--period", "2026-11",
                   env=DEC).out
    assert "<script>" not in html and "<img" not in html and "&lt;script&gt;" in html
    Page(html)


# -- 4. closed periods ---------------------------------------------------------------

def test_close_records_the_bill_per_store_with_tips_signed_by_the_closer(month):
    r = month.ok("close", "2026-11", "--json", env=DEC, user="alice")
    record = r.json["record"]
    bill = month.ok("bill", "--json", env=DEC).json
    assert record["total_amount"] == bill["total_amount"] and record["lines"] == bill["lines"]
    tips = {ref.split()[1].rsplit("/", 1)[1]: ref.split()[0] for ref in git(
        month.root, "for-each-ref", "--format=%(objectname) %(refname)",
        "refs/flowforge/stores/").splitlines()}
    assert {k: (v["seconds"], v["tip"]) for k, v in record["stores"].items()} == {
        k: (s, tips[k]) for k, s in zip(sorted(tips), (10200, 15000, 2400))}
    author = git(month.root, "log", "-1", "--format=%an <%ae>", "refs/flowforge/periods/2026-11")
    assert author.strip() == "Test <test@example.com>" == record["by"]   # git's identity here
    assert bill["closed"][0]["commit"] == record["commit"]
    again = month("close", "2026-11", env=DEC)
    assert again.rc == 64 and "already closed" in again.err
    assert month("close", "2026-12", env=DEC).rc == 64        # has not ended


def test_a_close_takes_every_store_of_this_clone_not_only_the_closers(month):
    """carol's store lives in alice's clone too (an import makes such stores);
    her hour logged since the last aggregation is in alice's report and in the
    close, never billed later as an adjustment."""
    month.ok("log", "OPS-4", "1h", "--date", "2026-11-30", "--project", "ops", user="carol",
             env=DEC)
    report = month.ok("report", "--json", "--period", "2026-11", "--by", "user", env=DEC,
                      user="alice")
    assert rows_of(report, "user")[("carol",)] == 40 * 60 + 3600
    month.ok("log", "OPS-4", "30m", "--date", "2026-11-30", "--project", "ops", user="carol",
             env=DEC)
    record = month.ok("close", "2026-11", "--json", env=DEC, user="alice").json["record"]
    assert record["total_seconds"] == 10200 + 15000 + 2400 + 5400
    bill = month.ok("bill", "--json", "--month", "2026-11", env=DEC, user="alice").json
    assert bill["adjustments"] == [] and bill["total_amount"] == record["total_amount"]


def test_time_into_a_closed_month_is_kept_warned_and_billed_once_as_an_adjustment(month):
    month.ok("close", "2026-11", env=DEC)
    invoiced = month.ok("bill", "--json", "--month", "2026-11", env=DEC).json
    r = month.ok("log", "WEB-9", "20m", "--date", "2026-11-24", "--project", "web", user="bob",
                 env=DEC)
    assert "2026-11 is closed" in r.err and "adjustment" in r.err
    assert "closed" not in month.ok("log", "WEB-9", "5m", "--project", "web", user="bob",
                                    env=DEC).err                 # today: no look at closes
    month.ok("aggregate", "--all", env=DEC)
    closed = month.ok("bill", "--json", "--month", "2026-11", env=DEC).json
    assert closed["lines"] == invoiced["lines"] and closed["total_amount"] == invoiced["total_amount"]
    [group] = closed["adjustments"]
    assert (group["month"], group["seconds"], group["billed_here"], group["billed_on"]) == (
        "2026-11", 1200, False, "2026-12")
    # bob's web line, 4h10m -> 4h30m at 15-minute increments: 4h15m -> 4h30m billable
    assert [(x["user"], x["billable_seconds"], x["amount"]) for x in group["lines"]] == [
        ("bob", 900, "25.00")]
    table = month.ok("bill", "--month", "2026-11", env=DEC).out
    assert "Adjustments after close of 2026-11" in table and "not in this total" in table
    december = month.ok("bill", "--json", "--month", "2026-12", env=DEC).json
    assert [g["month"] for g in december["adjustments"]] == ["2026-11"]
    assert december["total_amount"] == "%.2f" % (float(december["lines_amount"]) + 25)
    # December's close carries it; January's bill does not bill it again
    later = {"FLOWFORGE_NOW": "2027-01-05T09:00:00Z"}
    closed_dec = month.ok("close", "2026-12", "--json", env=later).json["record"]
    assert closed_dec["carried"]["2026-11"]["lines"][0]["amount"] == "25.00"
    assert month.ok("bill", "--json", "--month", "2027-01", env=later).json["adjustments"] == []
    nov = month.ok("bill", "--json", "--month", "2026-11", env=later).json["adjustments"][0]
    assert nov["already_billed"] == "25.00"


def test_reopen_is_recorded_and_the_bill_is_live_again(month):
    month.ok("close", "2026-11", env=DEC)
    month.ok("log", "OPS-4", "1h", "--date", "2026-11-30", "--project", "ops", user="carol",
             env=DEC)
    month.ok("aggregate", "--all", env=DEC)
    r = month.ok("reopen", "2026-11", "--reason", "late timesheet", env=DEC)
    assert "reopened 2026-11" in r.out
    log = git(month.root, "log", "--format=%s", "refs/flowforge/periods/2026-11").splitlines()
    assert log[0] == "flowforge: reopen 2026-11: late timesheet" and log[1].startswith(
        "flowforge: close 2026-11")
    bill = month.ok("bill", "--json", "--month", "2026-11", env=DEC).json
    assert bill["adjustments"] == [] and bill["closed"] == []
    assert [x["seconds"] for x in bill["lines"] if x["user"] == "carol"] == [2400 + 3600]
    assert month("reopen", "2026-11", env=DEC).rc == 64


def test_closes_travel_and_warn_a_developer_in_another_clone(tmp_path, pycache):
    origin = make_origin(tmp_path, pycache)
    manager = Clone(tmp_path, origin, "manager", "mia", pycache)
    dev = Clone(tmp_path, origin, "dev", "bob", pycache)
    dev.ok("log", "7", "2h", "--date", "2026-10-20")
    dev.git("commit", "-q", "--allow-empty", "-m", "work")
    dev.git("push", "-q", "origin", "main")
    manager.git("fetch", "-q")
    r = manager.ff.ok("close", "2026-10", user="mia", env=dict(
        NOV, GIT_COMMITTER_NAME="Mia Manager", GIT_COMMITTER_EMAIL="mia@example.com"))
    assert "pushed to origin" in r.out
    dev.git("fetch", "-q")                                  # a plain git fetch brings it
    warned = dev.ff.ok("log", "7", "1h", "--date", "2026-10-21", user="bob", env=NOV)
    assert "2026-10 is closed (by Mia Manager <mia@example.com> on 2026-11-20)" in warned.err
    dev.git("commit", "-q", "--allow-empty", "-m", "more")
    dev.git("push", "-q", "origin", "main")
    manager.git("fetch", "-q")
    ci = manager.ff("reconcile", "--ci", "--json", user="mia", env=NOV)
    assert ci.json["closed_adjustments"] == [{
        "month": "2026-10", "seconds": 3600, "amount": "0.00", "currency": "USD",
        "closed_by": "Mia Manager <mia@example.com>", "billed_on": "2026-11"}]
    assert "Adjustments to closed months" in manager.ff("reconcile", "--ci", user="mia",
                                                         env=NOV).out


def test_a_hostile_period_record_is_ignored_with_a_warning(month):
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=month.root, input=b'{"kind"'
                          b':"flowforge-period","month":"2026-11","state":"closed","lines":7}',
                          capture_output=True, check=True).stdout.decode().strip()
    tree = subprocess.run(["git", "mktree"], cwd=month.root, input=("100644 blob %s\tclose.json\n"
                          % blob).encode(), capture_output=True, check=True).stdout.decode().strip()
    commit = git(month.root, "commit-tree", tree, "-m", "x").strip()
    git(month.root, "update-ref", "refs/flowforge/incoming/origin/periods/2026-11", commit)
    r = month.ok("bill", "--json", env=DEC)
    assert "ignoring refs/flowforge/incoming/origin/periods/2026-11" in r.err
    assert r.json["closed"] == [] and "Traceback" not in r.err


# -- 5. many repositories --------------------------------------------------------------

def agency(tmp_path, pycache, home):
    """Two client repositories with their own rates."""
    runners = []
    for name, rate, minutes in (("shop", "100.00", 90), ("app", "120.00", 30)):
        root = make_git_repo(str(tmp_path / "clients" / name))
        r = Runner(root, pycache, home)
        r.ok("init", "--timezone", "UTC")
        set_billing(root, default_rate=rate)
        r.ok("log", "1", "%dm" % minutes, "--date", "2026-11-05", env=DEC)
        r.ok("log", "2", "%dm" % (minutes // 3), "--date", "2026-11-06", user="bob", env=DEC)
        r.ok("aggregate", "--all", env=DEC)
        runners.append(r)
    return runners


def test_bills_and_reports_span_repositories_with_each_ones_rates(tmp_path, pycache, home):
    shop, app = agency(tmp_path, pycache, home)
    args = ["-C", shop.root, "-C", app.root]
    bill = shop.ok("bill", "--json", *args, env=DEC).json
    assert bill["by"] == ["repo", "project", "user"]
    assert {(x["repo"], x["user"], x["seconds"], x["amount"]) for x in bill["lines"]} == {
        ("shop", "alice", 5400, "150.00"), ("shop", "bob", 1800, "50.00"),
        ("app", "alice", 1800, "60.00"), ("app", "bob", 600, "20.00")}
    assert bill["total_amount"] == "280.00" and bill["total_seconds"] == 9600
    report = shop.ok("report", "--json", "--by", "repo,user", *args, env=DEC).json
    assert rows_of(shop.ok("report", "--json", "--by", "repo", *args, env=DEC), "repo") == {
        ("shop",): 7200, ("app",): 2400}
    assert report["total_seconds"] == 9600
    portfolio = tmp_path / "clients" / "globex.txt"
    portfolio.write_text("# Globex's repositories\nshop\n\napp\n")
    assert shop.ok("bill", "--json", "--portfolio", portfolio, env=DEC).json["lines"] == bill["lines"]


def test_a_missing_or_unfetched_repository_is_named_never_skipped(tmp_path, pycache, home):
    shop, app = agency(tmp_path, pycache, home)
    origin = make_origin(tmp_path, pycache, "far.git")
    unfetched = str(tmp_path / "far")
    git(str(tmp_path), "clone", "-q", origin, unfetched)
    missing = str(tmp_path / "gone")
    r = shop("bill", "-C", shop.root, "-C", missing, "-C", unfetched, env=DEC)
    assert r.rc == 69 and r.out == ""
    assert missing in r.err and "not a directory" in r.err
    assert unfetched in r.err and "never fetched" in r.err and len(r.err.splitlines()) == 1
    set_billing(app.root, currency="USD")
    set_billing(shop.root, currency="EUR")
    r = shop("bill", "-C", shop.root, "-C", app.root, env=DEC)
    assert r.rc == 78 and "different currencies" in r.err


@pytest.mark.skipif(not shutil.which("gpg"), reason="gpg is not installed: signed closes untested")
def test_a_close_is_gpg_signed_where_git_signs_commits(month, tmp_path):
    gnupg = tmp_path / "gnupg"
    gnupg.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(gnupg))
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                    "Test <test@example.com>", "ed25519", "sign", "never"], env=env, check=True,
                   capture_output=True, timeout=120)
    git(month.root, "config", "commit.gpgsign", "true")
    git(month.root, "config", "user.signingkey", "test@example.com")
    try:
        month.ok("close", "2026-11", env=dict(DEC, GNUPGHOME=str(gnupg)))
        proc = subprocess.run(["git", "verify-commit", "refs/flowforge/periods/2026-11"],
                              cwd=month.root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0 and "Good signature" in proc.stderr, proc.stderr
        assert month.ok("bill", "--json", "--month", "2026-11", env=dict(DEC, GNUPGHOME=str(
            gnupg))).json["closed"]
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True)


# -- what a manager must be able to trust ------------------------------------------------

JAN = {"FLOWFORGE_NOW": "2027-01-05T09:00:00Z"}


def late_time(month_repo, minutes=20, day="2026-11-24"):
    month_repo.ok("log", "WEB-9", "%dm" % minutes, "--date", day, "--project", "web", user="bob",
                  env=DEC)
    month_repo.ok("aggregate", "--all", env=DEC)


def test_a_closed_invoice_reads_back_exactly_as_closed_with_what_it_carried(month):
    month.ok("close", "2026-11", env=DEC)
    late_time(month)
    december = month.ok("bill", "--json", "--month", "2026-12", env=JAN).json
    record = month.ok("close", "2026-12", "--json", env=JAN).json["record"]
    assert record["total_amount"] == december["total_amount"]
    again = month.ok("bill", "--json", "--month", "2026-12", env=JAN).json
    assert again["total_amount"] == record["total_amount"]               # carried stays billed
    assert [(g["month"], g["billed_here"], g["amount"]) for g in again["adjustments"]] == [
        ("2026-11", True, "25.00")]
    november = month.ok("bill", "--json", "--month", "2026-11", env=JAN).json
    assert [(g["lines"], g["already_billed"]) for g in november["adjustments"]] == [([], "25.00")]
    ci = month("reconcile", "--ci", "--json", env=JAN)
    assert ci.json["closed_adjustments"] == [] and ci.json["findings"] == []


def test_bill_csv_keeps_credits_numeric(month):
    month.ok("close", "2026-11", env=DEC)
    entry = month.ok("entries", "--json", "--date", "2026-11-24", user="bob", env=DEC).json
    month.ok("delete", entry["entries"][0]["id"], user="bob", env=DEC)
    month.ok("aggregate", "--all", env=DEC)
    rows = list(csv.DictReader(io.StringIO(month.ok("bill", "--format", "csv", "--month",
                                                    "2026-12", env=JAN).out)))
    [credit] = [r for r in rows if r["kind"] == "adjustment"]
    assert (credit["month"], credit["seconds"], credit["amount"]) == ("2026-11", "-10800", "-300.00")


def test_a_closed_invoice_ignores_later_config_edits(month):
    month.ok("close", "2026-11", env=DEC)
    invoiced = month.ok("bill", "--json", "--month", "2026-11", env=DEC).json
    set_billing(month.root, round_minutes=30, default_rate="200.00", invoice={
        "number": "OTHER-{month}", "client": {"name": "Initech"}})
    now = month.ok("bill", "--json", "--month", "2026-11", env=DEC).json
    assert now["lines"] == invoiced["lines"] and now["adjustments"] == []
    assert now["rounding"]["minutes"] == 15 and now["invoice"]["number"] == "ACME-{month}"
    page = month.ok("bill", "--format", "html", "--month", "2026-11", env=JAN).out
    assert "Invoice ACME-2026-11" in page and "Initech" not in page and "2026-12-31" in page


def forge_close(root, month, by, at, author=("Mallory", "mallory@example.com"), parent=None):
    doc = {"schema": 1, "kind": "flowforge-period", "month": month, "state": "closed", "at": at,
           "by": by, "reason": "", "currency": "EUR", "rounding": {"minutes": 0, "mode": "up",
                                                                   "scope": "line"},
           "carried": {}, "lines": [{"project": "web", "user": "bob", "seconds": 359640,
                                     "billable_seconds": 359640, "rate": "100.00",
                                     "amount": "9999.00"}], "lines_by_issue": []}
    env = dict(os.environ, GIT_AUTHOR_NAME=author[0], GIT_AUTHOR_EMAIL=author[1],
               GIT_COMMITTER_NAME=author[0], GIT_COMMITTER_EMAIL=author[1])
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=root, input=json.dumps(
        doc).encode(), capture_output=True, check=True, env=env).stdout.decode().strip()
    tree = subprocess.run(["git", "mktree"], cwd=root, input=("100644 blob %s\tclose.json\n"
                          % blob).encode(), capture_output=True, check=True).stdout.decode().strip()
    commit = subprocess.run(["git", "commit-tree", tree] + (["-p", parent] if parent else [])
                            + ["-m", "close"], cwd=root, capture_output=True, check=True,
                            env=env).stdout.decode().strip()
    git(root, "update-ref", "refs/flowforge/incoming/origin/periods/" + month, commit)
    return commit


def test_a_forged_close_is_not_believed(month):
    dec_1 = 1796115600
    # "by" the manager, but committed by someone else
    forge_close(month.root, "2026-11", "Mia Manager <mia@example.com>", dec_1)
    r = month.ok("bill", "--json", env=DEC)
    assert r.json["closed"] == [] and "its commit is by Mallory <mallory@example.com>" in r.err
    # dated before the month ended
    forge_close(month.root, "2026-11", "Mallory <mallory@example.com>", dec_1 - 10 * 86400)
    r = month.ok("bill", "--json", env=DEC)
    assert r.json["closed"] == [] and "before the month ended" in r.err
    # a real close, then a forgery on top: the close below it holds; closers narrow who may
    month.ok("close", "2026-11", "--no-push", env=DEC)
    real = month.ok("bill", "--json", env=DEC).json
    mine = git(month.root, "rev-parse", "refs/flowforge/periods/2026-11").strip()
    set_billing(month.root, closers=["test@example.com"])
    git(month.root, "update-ref", "-d", "refs/flowforge/periods/2026-11")
    forge_close(month.root, "2026-11", "Mallory <mallory@example.com>", dec_1, parent=mine)
    r = month.ok("bill", "--json", env=DEC)
    assert "mallory@example.com is not in billing.closers" in r.err
    assert r.json["closed"][0]["commit"] == mine and r.json["total_amount"] == real["total_amount"]
    ci = month("reconcile", "--ci", env=DEC)
    assert ci.rc == 1 and "Closed months that cannot be trusted" in ci.out


def test_a_store_missing_since_the_close_is_named(month):
    month.ok("close", "2026-11", env=DEC)
    key = [k for k in git(month.root, "for-each-ref", "--format=%(refname)",
                          "refs/flowforge/stores/").split() if "/carol--" in k][0]
    git(month.root, "update-ref", "-d", key)
    shutil.rmtree(os.path.join(month.root, ".flowforge/user/carol"))
    r = month.ok("bill", "--month", "2026-11", env=DEC)
    assert "no longer has" in r.err and key.rsplit("/", 1)[1] in r.err
    ci = month("reconcile", "--ci", "--json", env=DEC)
    assert ci.rc == 1 and any("no longer has" in f["detail"] for f in ci.json["findings"])


def test_output_follows_links_and_never_replaces_what_is_not_a_file(month, tmp_path):
    target = tmp_path / "real.html"
    target.write_text("old")
    link = tmp_path / "link.html"
    link.symlink_to(target)
    month.ok("report", "--format", "html", "--output", link, env=DEC)
    assert link.is_symlink() and target.read_text().startswith("<!DOCTYPE html>")
    r = month("report", "--format", "csv", "--output", "/dev/full", env=DEC)
    assert r.rc == 73 and os.path.exists("/dev/full") and not os.path.isfile("/dev/full")


def test_close_fetches_the_team_first(tmp_path, pycache):
    origin = make_origin(tmp_path, pycache)
    manager = Clone(tmp_path, origin, "manager", "mia", pycache)
    dev = Clone(tmp_path, origin, "dev", "bob", pycache)
    dev.ok("log", "7", "2h", "--date", "2026-10-20")
    dev.git("push", "-q", "origin", "main")          # pre-push aggregates what was not committed
    r = manager.ff.ok("close", "2026-10", "--json", user="mia", env=NOV)
    assert r.json["record"]["total_seconds"] == 7200
    assert {v["user"] for v in r.json["record"]["stores"].values()} == {"bob"}


def test_a_forged_merge_cannot_bring_back_an_older_reopen(month):
    set_billing(month.root, closers=["test@example.com"])
    month.ok("close", "2026-11", "--no-push", env=DEC)
    month.ok("reopen", "2026-11", "--no-push", env=DEC)
    reopened = git(month.root, "rev-parse", "refs/flowforge/periods/2026-11").strip()
    month.ok("close", "2026-11", "--no-push", env=dict(DEC, FLOWFORGE_NOW="2026-12-01T10:00:00Z"))
    closed = git(month.root, "rev-parse", "refs/flowforge/periods/2026-11").strip()
    tree = git(month.root, "rev-parse", closed + "^{tree}").strip()
    env = dict(os.environ, GIT_AUTHOR_NAME="eve", GIT_AUTHOR_EMAIL="eve@example.com",
               GIT_COMMITTER_NAME="eve", GIT_COMMITTER_EMAIL="eve@example.com")
    forged = subprocess.run(["git", "commit-tree", tree, "-p", reopened, "-p", closed, "-m", "x"],
                            cwd=month.root, env=env, capture_output=True, check=True,
                            text=True).stdout.strip()
    git(month.root, "update-ref", "-d", "refs/flowforge/periods/2026-11")
    git(month.root, "update-ref", "refs/flowforge/incoming/origin/periods/2026-11", forged)
    r = month.ok("bill", "--json", "--month", "2026-11", env=DEC)
    assert "ignoring" in r.err and r.json["closed"][0]["commit"] == closed


def test_a_close_dated_in_the_future_is_not_believed(month):
    forge_close(month.root, "2026-12", "Mallory <mallory@example.com>", 1798800000)   # 2027-01-01
    r = month.ok("bill", "--json", "--month", "2026-12", env=DEC)
    assert r.json["closed"] == [] and "in the future" in r.err


def test_one_repository_is_one_repository(month, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(month.root)
    r = month("bill", "-C", month.root, "-C", link, env=DEC)
    assert r.rc == 64 and "named twice" in r.err
    r = month("-C", month.root, "-C", month.root, "close", "2026-11", env=DEC)
    assert r.rc == 64 and "-C is given 2 times" in r.err
    other = str(tmp_path / "other-clone")      # a second clone: the same repo_id, the same stores
    shutil.copytree(month.root, other, symlinks=True)
    for command in ("bill", "report"):
        r = month(command, "-C", month.root, "-C", other, env=DEC)
        assert r.rc == 64 and "clone of the same repository" in r.err and r.out == "", r
        assert len(r.err.strip().splitlines()) == 1
    config = os.path.join(other, ".flowforge", "config.json")
    with open(config) as f:
        doc = json.load(f)
    doc["repo_id"] = "0123456789abcdef"                           # another repository after all
    with open(config, "w") as f:
        json.dump(doc, f)
    assert month.ok("report", "-C", month.root, "-C", other, "--json", env=DEC).json["repos"] == [
        os.path.basename(month.root), "other-clone"]


def test_credits_have_signed_hours_and_csv_says_what_is_in_the_total(month):
    month.ok("close", "2026-11", env=DEC)
    entry = month.ok("entries", "--json", "--date", "2026-11-24", user="bob", env=DEC).json
    month.ok("delete", entry["entries"][0]["id"], user="bob", env=DEC)
    month.ok("aggregate", "--all", env=DEC)
    [group] = month.ok("bill", "--json", "--month", "2026-11", env=DEC).json["adjustments"]
    assert [(x["seconds"], x["hours"]) for x in group["lines"]] == [(-10800, "-3.00")]
    rows = list(csv.DictReader(io.StringIO(month.ok("bill", "--format", "csv", "--month",
                                                    "2026-11", env=DEC).out)))
    assert {r["kind"]: r["in_total"] for r in rows} == {"line": "yes", "adjustment": "no"}
    total = month.ok("bill", "--json", "--month", "2026-11", env=DEC).json["total_amount"]
    assert "%.2f" % sum(float(r["amount"]) for r in rows if r["in_total"] == "yes") == total


def test_a_close_that_cannot_reach_the_remote_says_so(month, tmp_path):
    bare = str(tmp_path / "origin.git")
    subprocess.run(["git", "init", "-q", "--bare", bare], check=True)
    git(month.root, "remote", "add", "origin", bare)
    assert "pushed to origin" in month.ok("close", "2026-11", env=DEC).out
    # someone rewrites the record on the remote (a forced push of another history)
    other = forge_close(month.root, "2026-11", "Mallory <mallory@example.com>", 1796115600)
    git(month.root, "push", "-q", "-f", bare, "%s:refs/flowforge/stores/periods/2026-11" % other)
    month.ok("reopen", "2026-11", env=DEC)
    r = month.ok("close", "2026-11", env=dict(DEC, FLOWFORGE_NOW="2026-12-01T11:00:00Z"))
    assert "not pushed: the record of 2026-11 on origin is not in this clone's history" in r.err
    month.ok("push", "--restore", env=DEC)
    mine = git(month.root, "rev-parse", "refs/flowforge/periods/2026-11").strip()
    assert git(bare, "rev-parse", "refs/flowforge/stores/periods/2026-11").strip() == mine
