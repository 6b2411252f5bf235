"""FlowForge plugin: the team's hours on the Notion page of each issue.

Enable it in .flowforge/config.json (committed; never put a token there):

    "plugins": {"notion": {"database_id": "<the database's id>",
                           "key_property": "FF Key", "hours_property": "Hours",
                           "date_property": "Last tracked"}}

Optional: "key_type" ("rich_text", or "title" when the key is the page title),
"data_source_id" (when the database has several data sources; else the first),
"notion_version" (default 2026-03-11; at least 2025-09-03 for data sources,
older versions use the legacy database query), "timeout".
The token comes from NOTION_TOKEN in the environment of the process that runs
the retry queue.  It is sent to https://api.notion.com/v1 only, unless
FLOWFORGE_NOTION_API_URL (or NOTION_API_URL) in that same environment names
another server (https://, or http:// to localhost, 127.0.0.0/8 or ::1).  A
committed "api_url" that the environment does not confirm is refused, never
contacted.  Error text is scrubbed of the token before it is kept or shown.

What it writes: on the page whose key property equals the issue reference
(`123`, `owner/repo#123`, `ABC-12`), the team's total in hours (a number,
two decimals) and the last day with tracked time (a date).  Nothing else; no
request when neither changed since this machine's last update; a page that
does not exist is left alone (the lookup follows has_more / next_cursor).
At most three requests a second, across all jobs of the process.
"""
import os
import re
from decimal import ROUND_HALF_UP, Decimal

import flowforge

PLUGIN_API = 1
NAME = "notion"
NOTION_VERSION = "2026-03-11"
DATA_SOURCES_SINCE = "2025-09-03"
PUBLIC_API = "https://api.notion.com/v1"
MAX_QUERY_PAGES = 50          # result pages followed for one lookup (has_more / next_cursor)
URL_ENV = ("FLOWFORGE_NOTION_API_URL", "NOTION_API_URL")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)   # Notion's ids are UUIDs: never a path


# -- where the token may go: FlowForge's provider rules --------------------------

is_loopback, shown_url, base_url = flowforge.is_loopback, flowforge.shown_url, flowforge.provider_base_url
scrub, ScrubbedErrors = flowforge.scrub_secret, flowforge.ScrubbedErrors


def api_base(config):
    """The API's base URL: the public API, or a server this process's
    environment (URL_ENV) names; a committed api_url alone is refused."""
    return flowforge.provider_api_base(config, NAME, PUBLIC_API, URL_ENV)


def notion_id(value, what, secret=None):
    """`value` when it is a Notion id (letters, digits, - and _), else PermanentFailure."""
    if (not isinstance(value, str) or not _ID.fullmatch(value)
            or (secret and scrub(value, secret) != value)):
        raise flowforge.PermanentFailure("%s is not a Notion id: %s" % (
            what, repr(scrub(str(value), secret)[:80]) if secret else repr(str(value)[:80])))
    return value


# -- hooks ---------------------------------------------------------------------



def on_stop(repo, entry, config):
    flowforge.enqueue_sync(repo, NAME, entry["issue"])


def on_aggregate(repo, issues, config):
    for issue in issues:
        flowforge.enqueue_sync(repo, NAME, issue)


def health(repo, config, online=False, http=None):
    """`plugins check`: the token, the base URL, the ids; with `online` one
    read-only request (GET /databases/{id})."""
    token = os.environ.get("NOTION_TOKEN")
    if not token:
        return "no NOTION_TOKEN in this environment"
    if not config.get("database_id"):
        return "set plugins.notion.database_id in config.json"
    try:
        base = api_base(config)
        database = notion_id(config["database_id"], "plugins.notion.database_id")
        if config.get("data_source_id"):
            notion_id(config["data_source_id"], "plugins.notion.data_source_id")
    except flowforge.PermanentFailure as e:
        return str(e)
    notes = ["token from NOTION_TOKEN", "API %s allowed" % shown_url(base)]
    if online:
        try:
            check(client(config, http, base, token).request("GET", "/databases/%s" % database),
                  "reading the database")
        except (flowforge.RetryLater, flowforge.PermanentFailure) as e:
            return {"problem": scrub(e, token), "notes": notes}
        notes.append("online: GET /databases/%s answered" % database)
    return {"problem": None, "notes": notes}


def client(config, http, base, token):
    return ScrubbedErrors(http(base, {"Authorization": "Bearer " + token,
                                      "Notion-Version": config.get("notion_version", NOTION_VERSION),
                                      "User-Agent": "flowforge/%s" % flowforge.VERSION},
                               timeout=float(config.get("timeout", 15)), min_interval=1.0 / 3),
                          token)


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


def find_page(api, config, state, issue, token):
    """The id of the page whose key property is `issue`, or None."""
    version = config.get("notion_version", NOTION_VERSION)
    key_filter = {"property": config.get("key_property", "FF Key"),
                  config.get("key_type", "rich_text"): {"equals": issue}}
    database = notion_id(config["database_id"], "plugins.notion.database_id")
    if version >= DATA_SOURCES_SINCE:
        source = config.get("data_source_id") or state.get("data_source")
        if source:
            source = notion_id(source, "the data source id")
        else:
            reply = check(api.request("GET", "/databases/%s" % database), "reading the database")
            doc = reply.json()
            sources = (doc.get("data_sources") if isinstance(doc, dict) else None) or []
            if not isinstance(sources, list) or not sources:
                raise flowforge.PermanentFailure("Notion database %s has no data source" % database)
            first = sources[0] if isinstance(sources[0], dict) else {}
            source = state["data_source"] = notion_id(first.get("id"),
                                                      "the data source id Notion returned", token)
        path = "/data_sources/%s/query" % source
    else:
        path = "/databases/%s/query" % database   # versions before data sources
    query = {"filter": key_filter, "page_size": 100}
    for _ in range(MAX_QUERY_PAGES):
        # Notion may answer with fewer results than page_size, even none, and
        # has_more: the page can be on a later cursor.
        doc = check(api.request("POST", path, query), "looking up %s" % issue).json()
        results = (doc.get("results") if isinstance(doc, dict) else None) or []
        if isinstance(results, list) and results:
            first = results[0] if isinstance(results[0], dict) else {}
            return notion_id(first.get("id"), "the page id Notion returned", token)
        cursor = doc.get("next_cursor") if isinstance(doc, dict) else None
        if not (doc.get("has_more") is True and isinstance(cursor, str) and cursor):
            return None
        query = dict(query, start_cursor=cursor)
    raise flowforge.RetryLater("Notion kept paging through %d result pages for %s"
                               % (MAX_QUERY_PAGES, issue))


def sync(repo, issue, config, http, state):
    token = os.environ.get("NOTION_TOKEN")
    if not token:
        raise flowforge.PermanentFailure("no NOTION_TOKEN in the environment of the process "
                                         "that runs the queue")
    if not config.get("database_id"):
        raise flowforge.PermanentFailure("set plugins.notion.database_id in config.json")
    base = api_base(config)                   # before any request, or none at all
    # Notion's words, minus the token
    return flowforge.without_secret(token, lambda: update(repo, issue, config, http, state,
                                                          base, token))


def update(repo, issue, config, http, state, base, token):
    totals = flowforge.issue_totals(repo, issue)
    wanted = {"hours": hours(totals["total"]), "day": totals["last_day"]}
    pages = state.setdefault("pages", {})
    known = pages.get(issue) or {}
    if known.get("hours") == wanted["hours"] and known.get("day") == wanted["day"]:
        return "unchanged"                    # no request at all
    api = client(config, http, base, token)
    properties = {config.get("hours_property", "Hours"): {"number": wanted["hours"]}}
    if wanted["day"]:
        properties[config.get("date_property", "Last tracked")] = {"date": {"start": wanted["day"]}}
    page = known.get("page")
    for attempt in range(3):
        if page:
            page = notion_id(page, "the cached page id")
        else:
            page = find_page(api, config, state, issue, token)
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
