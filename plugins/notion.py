"""FlowForge plugin: the team's hours on the Notion page of each issue.

Enable it in .flowforge/config.json (committed; never put a token there):

    "plugins": {"notion": {"database_id": "<the database's id>",
                           "key_property": "FF Key", "hours_property": "Hours",
                           "date_property": "Last tracked"}}

Optional: "key_type" ("rich_text", or "title" when the key is the page title),
"data_source_id" (when the database has several data sources; else the first),
"notion_version" (default 2026-03-11; at least 2025-09-03 for data sources,
older versions use the legacy database query), "api_url", "timeout".
The token comes from NOTION_TOKEN in the environment of the process that runs
the retry queue.

What it writes: on the page whose key property equals the issue reference
(`123`, `owner/repo#123`, `ABC-12`), the team's total in hours (a number,
two decimals) and the last day with tracked time (a date).  Nothing else; no
request when neither changed since this machine's last update; a page that
does not exist is left alone.  At most three requests a second.
"""
import os
from decimal import ROUND_HALF_UP, Decimal

import flowforge

PLUGIN_API = 1
NAME = "notion"
NOTION_VERSION = "2026-03-11"
DATA_SOURCES_SINCE = "2025-09-03"


def on_stop(repo, entry, config):
    flowforge.enqueue_sync(repo, NAME, entry["issue"])


def on_aggregate(repo, issues, config):
    for issue in issues:
        flowforge.enqueue_sync(repo, NAME, issue)


def health(repo, config):
    if not os.environ.get("NOTION_TOKEN"):
        return "no NOTION_TOKEN in this environment"
    if not config.get("database_id"):
        return "set plugins.notion.database_id in config.json"
    return None


def check(reply, what):
    """The reply, or RetryLater / PermanentFailure as Notion's status says."""
    if 200 <= reply.status < 300:
        return reply
    doc = reply.json_object()
    text = "Notion %d %s on %s: %s" % (reply.status, doc.get("code", ""), what,
                                       doc.get("message") or "no message")
    if reply.status in (429, 529):
        raise flowforge.RetryLater(text, after=flowforge.parse_retry_after(
            reply.headers.get("retry-after"), flowforge.now()))
    if reply.status >= 500 or reply.status == 409:
        raise flowforge.RetryLater(text)
    raise flowforge.PermanentFailure(text)   # 400 validation, 401, 403, 404


def hours(seconds):
    """Hours with two decimals, rounded half up (a JSON number)."""
    return float((Decimal(seconds) / 3600).quantize(Decimal("0.01"), ROUND_HALF_UP))


def find_page(api, config, state, issue):
    """The id of the page whose key property is `issue`, or None."""
    version = config.get("notion_version", NOTION_VERSION)
    key_filter = {"property": config.get("key_property", "FF Key"),
                  config.get("key_type", "rich_text"): {"equals": issue}}
    database = config["database_id"]
    if version >= DATA_SOURCES_SINCE:
        source = config.get("data_source_id") or state.get("data_source")
        if not source:
            reply = check(api.request("GET", "/databases/%s" % database), "reading the database")
            sources = (reply.json() or {}).get("data_sources") or []
            if not sources:
                raise flowforge.PermanentFailure("Notion database %s has no data source" % database)
            source = state["data_source"] = sources[0]["id"]
        path = "/data_sources/%s/query" % source
    else:
        path = "/databases/%s/query" % database   # versions before data sources
    reply = check(api.request("POST", path, {"filter": key_filter, "page_size": 1}),
                  "looking up %s" % issue)
    results = (reply.json() or {}).get("results") or []
    return results[0]["id"] if results else None


def sync(repo, issue, config, http, state):
    token = os.environ.get("NOTION_TOKEN")
    if not token:
        raise flowforge.PermanentFailure("no NOTION_TOKEN in the environment of the process "
                                         "that runs the queue")
    if not config.get("database_id"):
        raise flowforge.PermanentFailure("set plugins.notion.database_id in config.json")
    totals = flowforge.issue_totals(repo, issue)
    wanted = {"hours": hours(totals["total"]), "day": totals["last_day"]}
    pages = state.setdefault("pages", {})
    known = pages.get(issue) or {}
    if known.get("hours") == wanted["hours"] and known.get("day") == wanted["day"]:
        return "unchanged"                    # no request at all
    api = http(config.get("api_url", "https://api.notion.com/v1"),
               {"Authorization": "Bearer " + token,
                "Notion-Version": config.get("notion_version", NOTION_VERSION),
                "User-Agent": "flowforge/%s" % flowforge.VERSION},
               timeout=float(config.get("timeout", 15)), min_interval=1.0 / 3)
    properties = {config.get("hours_property", "Hours"): {"number": wanted["hours"]}}
    if wanted["day"]:
        properties[config.get("date_property", "Last tracked")] = {"date": {"start": wanted["day"]}}
    page = known.get("page")
    for attempt in range(3):
        if not page:
            page = find_page(api, config, state, issue)
            if page is None:
                pages[issue] = dict(wanted, page=None)
                return "no page"
        reply = api.request("PATCH", "/pages/%s" % page, {"properties": properties})
        if reply.status == 404 and known.get("page"):
            page = known["page"] = None       # the cached page is gone: look it up again
            continue
        if reply.status == 409 and attempt < 2:
            page = None                       # a conflicting edit: read again, write again
            continue
        check(reply, "updating the page of %s" % issue)
        pages[issue] = dict(wanted, page=page)
        return "updated"
    raise flowforge.RetryLater("Notion kept reporting conflicts for %s" % issue)
