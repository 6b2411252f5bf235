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
does not exist is left alone.  At most three requests a second.
"""
import ipaddress
import json
import os
import re
import urllib.parse
from decimal import ROUND_HALF_UP, Decimal

import flowforge

PLUGIN_API = 1
NAME = "notion"
NOTION_VERSION = "2026-03-11"
DATA_SOURCES_SINCE = "2025-09-03"
PUBLIC_API = "https://api.notion.com/v1"
URL_ENV = ("FLOWFORGE_NOTION_API_URL", "NOTION_API_URL")
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)   # Notion's ids are UUIDs: never a path


# -- where the token may go ----------------------------------------------------
# (the same few functions are in github.py: a plugin is one file)

def is_loopback(host):
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shown_url(url):
    """A URL for a message: without a user name or password, one line, short."""
    if not isinstance(url, str):
        return repr(url)[:60]
    return repr(re.sub(r"//[^/?#]*@", "//", url, count=1)[:120])


def base_url(url, setting):
    """`url` tidied (no trailing /), or PermanentFailure naming `setting`: https, or
    http to loopback; a host; no user, password, query, fragment or dot segments."""
    if not isinstance(url, str) or not url.strip() or len(url) > 2000:
        raise flowforge.PermanentFailure("%s must be a URL" % setting)
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise flowforge.PermanentFailure("%s is not a valid URL: %s" % (setting, shown_url(url)))
    if parts.username is not None or parts.password is not None:
        raise flowforge.PermanentFailure("%s must not carry a user name or password: %s"
                                         % (setting, shown_url(url)))
    problem = None
    if parts.scheme not in ("https", "http") or not host:
        problem = "must be an https:// URL"
    elif parts.scheme == "http" and not is_loopback(host):
        problem = "must be https:// (http:// only to localhost, 127.0.0.1 or ::1)"
    elif parts.query or parts.fragment or "#" in url or re.search(r"[\s%\\]", url):
        problem = "must be a plain base URL (no query, fragment, spaces or %-escapes)"
    elif any(seg in (".", "..") for seg in parts.path.split("/")):
        problem = "must not contain . or .. path segments"
    if problem:
        raise flowforge.PermanentFailure("%s %s: %s" % (setting, problem, shown_url(url)))
    netloc = host if port is None else "%s:%d" % (host, port)
    if ":" in host:
        netloc = "[%s]" % host if port is None else "[%s]:%d" % (host, port)
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc.lower(), parts.path.rstrip("/"),
                                    "", ""))


def api_base(config):
    """The API's base URL, or PermanentFailure.  A server other than the public
    API comes from this process's environment (URL_ENV): an api_url in the
    committed config.json is used only when it is the public API or when the
    environment says the same -- else it is refused, and never contacted."""
    env, name = "", URL_ENV[0]
    for candidate in URL_ENV:
        if os.environ.get(candidate, "").strip():
            env, name = os.environ[candidate].strip(), candidate
            break
    base = base_url(env, name) if env else PUBLIC_API
    committed = config.get("api_url")
    if committed is None or committed == "":
        return base
    setting = "plugins.%s.api_url in config.json" % NAME
    try:
        if base_url(committed, setting) == base:
            return base
    except flowforge.PermanentFailure as e:
        if env:
            raise
        problem = "; it is not valid either: %s" % e
    else:
        problem = ""
    if env:
        raise flowforge.PermanentFailure(
            "refusing %s (%s): it does not match %s=%s in this environment; make them agree or "
            "remove api_url (nothing was sent)" % (setting, shown_url(committed), name,
                                                    shown_url(env)))
    raise flowforge.PermanentFailure(
        "refusing %s (%s): config.json is shared through git, so a server other than %s is "
        "used only when your own environment names it -- if you trust that server, set %s to "
        "its https:// URL where the queue runs (nothing was sent)%s"
        % (setting, shown_url(committed), PUBLIC_API, name, problem))


def scrub(text, secret):
    """`text` without `secret` (as is, %-encoded or JSON-escaped, any case)."""
    text = str(text)
    if not secret:
        return text
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret),
             json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}
    for form in sorted(forms, key=len, reverse=True):
        text = re.sub(re.escape(form), "[token]", text, flags=re.IGNORECASE)
    return text


class ScrubbedErrors:
    """`http` whose error replies (status 300 and up) have the token scrubbed
    from their bodies, before any message is cut from them."""

    def __init__(self, api, secret):
        self.api, self.secret = api, secret

    def request(self, method, path, body=None):
        reply = self.api.request(method, path, body)
        if reply.status >= 300 and reply.body:
            text = reply.body.decode("utf-8", "replace")
            clean = scrub(text, self.secret)
            if clean != text:
                reply.body = clean.encode("utf-8")
        return reply


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


def health(repo, config):
    if not os.environ.get("NOTION_TOKEN"):
        return "no NOTION_TOKEN in this environment"
    if not config.get("database_id"):
        return "set plugins.notion.database_id in config.json"
    try:
        api_base(config)
        notion_id(config["database_id"], "plugins.notion.database_id")
        if config.get("data_source_id"):
            notion_id(config["data_source_id"], "plugins.notion.data_source_id")
    except flowforge.PermanentFailure as e:
        return str(e)
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
    reply = check(api.request("POST", path, {"filter": key_filter, "page_size": 1}),
                  "looking up %s" % issue)
    doc = reply.json()
    results = (doc.get("results") if isinstance(doc, dict) else None) or []
    if not isinstance(results, list) or not results:
        return None
    first = results[0] if isinstance(results[0], dict) else {}
    return notion_id(first.get("id"), "the page id Notion returned", token)


def sync(repo, issue, config, http, state):
    token = os.environ.get("NOTION_TOKEN")
    if not token:
        raise flowforge.PermanentFailure("no NOTION_TOKEN in the environment of the process "
                                         "that runs the queue")
    if not config.get("database_id"):
        raise flowforge.PermanentFailure("set plugins.notion.database_id in config.json")
    base = api_base(config)                   # before any request, or none at all
    try:
        return update(repo, issue, config, http, state, base, token)
    except flowforge.RetryLater as e:         # Notion's words, minus the token
        raise flowforge.RetryLater(scrub(e, token), after=e.after) from None
    except flowforge.PermanentFailure as e:
        raise flowforge.PermanentFailure(scrub(e, token)) from None
    except Exception as e:
        if scrub(repr(e), token) != repr(e) or scrub(e, token) != str(e):
            text = scrub("%s: %s" % (type(e).__name__, e), token)   # scrubbed, then cut
            raise RuntimeError(" ".join(text.split())[:1000]) from None
        raise


def update(repo, issue, config, http, state, base, token):
    totals = flowforge.issue_totals(repo, issue)
    wanted = {"hours": hours(totals["total"]), "day": totals["last_day"]}
    pages = state.setdefault("pages", {})
    known = pages.get(issue) or {}
    if known.get("hours") == wanted["hours"] and known.get("day") == wanted["day"]:
        return "unchanged"                    # no request at all
    api = ScrubbedErrors(http(base, {"Authorization": "Bearer " + token,
                                     "Notion-Version": config.get("notion_version", NOTION_VERSION),
                                     "User-Agent": "flowforge/%s" % flowforge.VERSION},
                              timeout=float(config.get("timeout", 15)), min_interval=1.0 / 3),
                         token)
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
