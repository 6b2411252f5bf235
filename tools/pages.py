#!/usr/bin/env python3
"""make pages: the README's screenshots of the report page and the invoice.

Builds a throwaway repository with a month of a small team's time, writes
`report --format html` and `bill --format html` for November 2026, and
renders both in headless Chromium into docs/report.png and docs/invoice.png
(and docs/invoice.pdf, the printed invoice).  Needs Debian's `chromium`."""
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FF = [sys.executable, os.path.join(HERE, "flowforge.py")]
NOW = "2026-12-01T09:00:00Z"
TEAM = {"alice": ["WEB-12", "WEB-14", "API-3"], "bob": ["API-3", "API-7"],
        "carol": ["WEB-14", "OPS-2"], "dan": ["API-7", "OPS-2", "WEB-12"]}
PROJECTS = {"WEB": "web", "API": "api", "OPS": "ops"}


def run(argv, cwd, **env):
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL,
                   env=dict(os.environ, FLOWFORGE_NOW=NOW, **env))


def sample_repo(root):
    """A repository with November 2026 tracked by four people, and rates."""
    subprocess.run(["git", "init", "-q", root], check=True)
    for key, value in (("user.name", "Mia Manager"), ("user.email", "mia@acme.dev")):
        subprocess.run(["git", "config", key, value], cwd=root, check=True)
    run(FF + ["init"], root)
    path = os.path.join(root, ".flowforge", "config.json")
    config = json.load(open(path))
    config["billing"].update(
        currency="EUR", default_rate="95.00", user_rates={"alice": "120.00"},
        project_rates={"ops": "80.00"}, round_minutes=15, round_mode="up",
        invoice={"issuer": {"name": "Acme Development GmbH", "address": [
            "Hauptstraße 1", "10115 Berlin", "Germany"], "email": "billing@acme.dev",
            "tax_id": "VAT DE123456789"},
            "client": {"name": "Globex Corporation", "address": [
                "1 Globex Plaza", "Cypress Creek, OR 97000", "USA"]},
            "number": "ACME-{month}", "due_days": 30,
            "notes": "Payable by bank transfer to IBAN DE00 1234 5678 9012 3456 78."})
    json.dump(config, open(path, "w"), indent=2)
    rng = random.Random(11)
    for user, issues in TEAM.items():
        for day in range(2, 31):
            if datetime.date(2026, 11, day).weekday() >= 5 and rng.random() < 0.9:  # weekends
                continue
            for issue in rng.sample(issues, rng.randint(1, min(2, len(issues)))):
                minutes = rng.choice((45, 60, 90, 120, 150, 180, 240))
                run(FF + ["--user", user, "log", issue, "%dm" % minutes, "--date",
                          "2026-11-%02d" % day, "--project", PROJECTS[issue.split("-")[0]]], root)
    run(FF + ["aggregate", "--all"], root)
    return root


def screenshot(html, png, height):
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,%d" % height, "--screenshot=%s" % png, "file://" + html],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    if not shutil.which("chromium"):
        sys.exit("pages: needs headless Chromium (apt-get install chromium)")
    work = tempfile.mkdtemp(prefix="flowforge-pages-")
    try:
        root = sample_repo(os.path.join(work, "app"))
        docs = os.path.join(HERE, "docs")
        os.makedirs(docs, exist_ok=True)
        report, invoice = os.path.join(work, "report.html"), os.path.join(work, "invoice.html")
        run(FF + ["report", "--period", "2026-11", "--by", "user,issue", "--format", "html",
                  "--output", report], root)
        run(FF + ["bill", "--format", "html", "--output", invoice], root)
        screenshot(report, os.path.join(docs, "report.png"), 2300)
        screenshot(invoice, os.path.join(docs, "invoice.png"), 1500)
        subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                        "--no-pdf-header-footer", "--print-to-pdf=%s" % os.path.join(
                            docs, "invoice.pdf"), "file://" + invoice], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print("wrote docs/report.png, docs/invoice.png and docs/invoice.pdf")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
