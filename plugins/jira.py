"""FlowForge plugin: each developer's own time as Jira worklogs, one per (day, issue).

Enable it in .flowforge/config.json (committed; never put a token there):

    "plugins": {"jira": {"url": "https://acme.atlassian.net", "deployment": "cloud",
                         "adjust_estimate": "leave", "projects": ["ABC", "OPS"]}}

The server and the credentials come from the environment of whatever runs the
retry queue (the daemon, or `flowforge queue run`):

* JIRA_URL -- the site, https://<site>.atlassian.net or the Data Center base
  URL.  It is the only place a token is sent to.  A committed "url" is a
  check, not a destination: it must equal JIRA_URL, else the job is refused
  before any connection (an API token works on every site of its account, so
  a teammate who could commit a site of their own would collect everyone's).
* Cloud ("deployment": "cloud", the default for *.atlassian.net):
  JIRA_EMAIL and JIRA_API_TOKEN, sent as HTTP Basic auth; REST API v3, the
  worklog comment in Atlassian Document Format.
* Data Center ("deployment": "datacenter", the default elsewhere): JIRA_TOKEN,
  a personal access token sent as a bearer token; REST API v2, a plain-text
  comment.

What it writes: for the developer this clone belongs to (the user FlowForge
resolves, as every command does), on each issue `ABC-12`, one worklog per
local day (per period with week/month granularity) with `timeSpentSeconds`
equal to that day's seconds in the ledger and `started` at local midnight,
e.g. 2026-11-19T00:00:00.000+0100.  It carries FlowForge's key -- store,
issue, day -- in the worklog entity property "flowforge" (Cloud, set in the
same request that creates the worklog) and in a marker at the end of the
comment (both deployments), and is found again by them.  A day whose total
changed is updated with PUT, a day that went to zero is deleted, and no
request at all is made when nothing changed since this machine's last sync.
A day with a cached worklog id is written directly; any other day is looked
up first (all pages of the issue's worklogs), so a create whose response was
lost is found, not repeated.  Days in a month a manager closed (`flowforge
close`) are not rewritten: the difference is reported (a dead letter the
first time, the log and `plugins check` after that).
"""
import base64
import os
import re

import flowforge

PLUGIN_API = 1
NAME = "jira"
PROPERTY_KEY = "flowforge"               # the worklog entity property FlowForge owns
MARKER = "[flowforge:%s]"                # the same key, at the end of the comment
PAGE_SIZE = 1000                         # maxResults asked for; the server may cap it lower
MAX_PAGES = 500
MIN_SECONDS = 60                         # Jira refuses a worklog under a minute (400)
ADJUST = ("leave", "auto")               # new/manual need an estimate FlowForge does not have
DEPLOYMENTS = ("cloud", "datacenter")
URL_ENV = "JIRA_URL"
# A Jira issue key: the project key (a capital letter, then capitals, digits
# or _), a dash, the number.  Nothing else reaches a URL path.
_KEY = re.compile(r"([A-Z][A-Z0-9_]{0,254})-([1-9][0-9]{0,17})", re.ASCII)
_ID = re.compile(r"[0-9]{1,19}", re.ASCII)

scrub, shown_url = flowforge.scrub_secret, flowforge.shown_url


# -- settings: where, who, how --------------------------------------------------


def jira_key(issue, config):
    """`issue` when it is a Jira issue key this plugin owns, else None."""
    m = _KEY.fullmatch(issue) if isinstance(issue, str) else None
    if not m:
        return None
    projects = config.get("projects")
    if isinstance(projects, list) and projects and m.group(1) not in projects:
        return None
    return issue


def api_base(config):
    """JIRA_URL from this process's environment, checked against a committed
    "url" (which alone is never used), or PermanentFailure: nothing is sent."""
    env = os.environ.get(URL_ENV, "").strip()
    committed = config.get("url")
    if not env:
        hint = (" (config.json names %s; config.json is shared through git, so it never decides "
                "where a token goes)" % shown_url(committed)) if committed else ""
        raise flowforge.PermanentFailure(
            "no %s in this environment: set %s to your Jira site (https://<site>.atlassian.net "
            "or the Data Center URL) where the queue runs%s (nothing was sent)"
            % (URL_ENV, URL_ENV, hint))
    base = flowforge.provider_base_url(env, URL_ENV)
    if committed not in (None, ""):
        setting = "plugins.jira.url in config.json"
        try:
            same = flowforge.provider_base_url(committed, setting) == base
        except flowforge.PermanentFailure as e:
            raise flowforge.PermanentFailure("%s (nothing was sent)" % e)
        if not same:
            raise flowforge.PermanentFailure(
                "refusing %s (%s): it does not match %s=%s in this environment; make them agree "
                "or remove url (nothing was sent)" % (setting, shown_url(committed), URL_ENV,
                                                       shown_url(env)))
    return base


def deployment_of(config, base):
    value = config.get("deployment")
    if value is None:
        host = re.sub(r"^https?://", "", base).split("/")[0].split(":")[0]
        return "cloud" if host.endswith(".atlassian.net") else "datacenter"
    if value not in DEPLOYMENTS:
        raise flowforge.PermanentFailure("plugins.jira.deployment must be \"cloud\" or "
                                         "\"datacenter\", not %r" % (str(value)[:40],))
    return value


def adjust_of(config):
    value = config.get("adjust_estimate", "leave")
    if value not in ADJUST:
        raise flowforge.PermanentFailure(
            "plugins.jira.adjust_estimate must be \"leave\" or \"auto\", not %r (\"new\" and "
            "\"manual\" need an estimate per worklog, which FlowForge does not have)"
            % (str(value)[:40],))
    return value


def credentials(deployment):
    """(Authorization header value, [secrets to scrub], what it used) or
    PermanentFailure naming the variables to set."""
    if deployment == "cloud":
        email, token = os.environ.get("JIRA_EMAIL", ""), os.environ.get("JIRA_API_TOKEN", "")
        if not email or not token:
            raise flowforge.PermanentFailure(
                "Jira Cloud needs JIRA_EMAIL and JIRA_API_TOKEN in the environment of the process "
                "that runs the queue (missing: %s)" % ", ".join(
                    n for n, v in (("JIRA_EMAIL", email), ("JIRA_API_TOKEN", token)) if not v))
        pair = base64.b64encode(("%s:%s" % (email, token)).encode("utf-8")).decode("ascii")
        return "Basic " + pair, [token, pair], "JIRA_EMAIL and JIRA_API_TOKEN (Basic)"
    token = os.environ.get("JIRA_TOKEN", "")
    if not token:
        raise flowforge.PermanentFailure("Jira Data Center needs JIRA_TOKEN (a personal access "
                                         "token) in the environment of the process that runs "
                                         "the queue")
    return "Bearer " + token, [token], "JIRA_TOKEN (Bearer)"


def whose_time(repo):
    """The FlowForge user whose time this clone's daemon writes: the one every
    command resolves (--user, FLOWFORGE_USER, git config), else the only one."""
    try:
        return flowforge.resolve_user(repo.root, None)
    except flowforge.FlowForgeError as e:
        users = flowforge.local_users(repo)
        if len(users) == 1:
            return users[0]
        raise flowforge.PermanentFailure("cannot tell whose time to write to Jira: %s" % e)


class Settings:
    def __init__(self, repo, config):
        self.base = api_base(config)
        self.deployment = deployment_of(config, self.base)
        self.adjust = adjust_of(config)
        self.authorization, self.secrets, self.auth_from = credentials(self.deployment)
        self.api = "/rest/api/%s" % ("3" if self.deployment == "cloud" else "2")
        self.timeout = float(config.get("timeout", 15))
        self.min_interval = float(config.get("min_interval", 0))
        self.notify = bool(config.get("notify_users", False))

    def client(self, http):
        api = http(self.base, {"Accept": "application/json", "Authorization": self.authorization,
                               "User-Agent": "flowforge/%s" % flowforge.VERSION},
                   timeout=self.timeout, min_interval=self.min_interval)
        for secret in self.secrets:
            api = flowforge.ScrubbedErrors(api, secret)
        return api

    def scrubbed(self, work):
        for secret in self.secrets:
            work = (lambda inner, s: lambda: flowforge.without_secret(s, inner))(work, secret)
        return work()

    def clean(self, text):
        for secret in self.secrets:
            text = scrub(text, secret)
        return text

    def write_query(self):
        query = "adjustEstimate=%s" % self.adjust
        if self.deployment == "cloud":        # Data Center documents no notifyUsers
            query += "&notifyUsers=%s" % ("true" if self.notify else "false")
        return query


# -- hooks ------------------------------------------------------------------------


def on_aggregate(repo, issues, config):
    for issue in issues:
        if jira_key(issue, config):
            flowforge.enqueue_sync(repo, NAME, issue)


def health(repo, config, online=False, http=None):
    """`plugins check`: the credentials, the allowed base URL, the settings;
    with `online` one read-only request (GET /rest/api/{3,2}/myself)."""
    try:
        settings = Settings(repo, config)
        user = whose_time(repo)
    except flowforge.PermanentFailure as e:
        return str(e)
    notes = ["deployment %s, REST API %s" % (settings.deployment, settings.api),
             "token from %s" % settings.auth_from,
             "site %s allowed (from %s)" % (shown_url(settings.base), URL_ENV),
             "worklogs of %s, adjustEstimate=%s" % (user, settings.adjust)]
    held = held_report(load_state_for_health(repo))
    if held:
        notes.append("not rewritten (closed months): %s" % held)
    if online:
        try:
            reply = check(settings.client(http).request("GET", settings.api + "/myself"),
                          "reading %s/myself" % settings.api)
        except (flowforge.RetryLater, flowforge.PermanentFailure) as e:
            return {"problem": settings.clean(str(e)), "notes": notes}
        me = reply.json_object()
        name = me.get("displayName") or me.get("name") or "?"
        notes.append("online: GET %s/myself answered (%s)" % (settings.api,
                                                            flowforge.printable(name)[:80]))
    return {"problem": None, "notes": notes}


def load_state_for_health(repo):
    return flowforge.plugin_state(repo, NAME)[0]()


def sync(repo, issue, config, http, state):
    if jira_key(issue, config) is None:
        raise flowforge.PermanentFailure(
            "refusing issue reference %r: a Jira issue key is ABC-12 (project key in capitals)%s"
            % (issue[:200], " of the projects %s" % ", ".join(map(str, config["projects"]))
               if config.get("projects") else ""))
    settings = Settings(repo, config)                  # before any request, or none at all
    return settings.scrubbed(lambda: Sync(repo, issue, settings, http, state).run())


# -- Jira's answers ---------------------------------------------------------------


def message_of(reply):
    """Jira's own words: the ErrorCollection's errorMessages and errors, a
    gateway's message, or the start of a body that is not JSON."""
    doc = reply.json_object()
    parts = [str(m) for m in doc.get("errorMessages") or [] if m] if isinstance(
        doc.get("errorMessages"), list) else []
    if isinstance(doc.get("errors"), dict):
        parts += ["%s: %s" % (k, v) for k, v in sorted(doc["errors"].items())]
    if isinstance(doc.get("message"), str) and doc["message"]:
        parts.append(doc["message"])
    if parts:
        return "; ".join(parts)[:500]
    text = re.sub(r"<[^>]*>", " ", reply.body[:4000].decode("utf-8", "replace"))
    return " ".join(text.split())[:200] or "no message"


def retry_after(headers):
    """Seconds to wait from Retry-After, else Cloud's X-RateLimit-Reset (an
    ISO 8601 instant, yyyy-MM-ddTHH:mmZ), else None."""
    after = flowforge.parse_retry_after(headers.get("retry-after"), flowforge.now())
    if after is not None:
        return after
    reset = headers.get("x-ratelimit-reset", "").strip()
    if reset:
        from datetime import datetime, timezone
        for fmt in ("%Y-%m-%dT%H:%MZ", "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S.%fZ"):
            try:
                when = datetime.strptime(reset, fmt).replace(tzinfo=timezone.utc)
            except ValueError:
                continue
            return min(max(1.0, when.timestamp() - flowforge.now()), flowforge.RETRY_AFTER_MAX)
    return None


def check(reply, what):
    """The reply, or RetryLater / PermanentFailure as Jira's status says."""
    if 200 <= reply.status < 300:
        return reply
    text = "Jira %d on %s: %s" % (reply.status, what, message_of(reply))
    if reply.status == 429:
        after = retry_after(reply.headers)
        raise flowforge.RetryLater(text, after=60 if after is None else after)
    if reply.status >= 500:
        raise flowforge.RetryLater(text, after=retry_after(reply.headers))
    raise flowforge.PermanentFailure(text)          # 400, 401, 403, 404, 413 ...


# -- the days ---------------------------------------------------------------------


def started_of(day, tz_name):
    """Local midnight of `day` in Jira's format: 2026-11-19T00:00:00.000+0100."""
    from datetime import datetime
    zone = flowforge.load_timezone(tz_name)
    y, m, d = (int(x) for x in day.split("-"))
    offset = int(datetime(y, m, d, tzinfo=zone).utcoffset().total_seconds()) // 60
    sign = "-" if offset < 0 else "+"
    return "%s-%02d-%02dT00:00:00.000%s%02d%02d" % (day[:4], m, d, sign, abs(offset) // 60,
                                                  abs(offset) % 60)


def instant(started):
    """A `started` value as a UTC timestamp, or None."""
    from datetime import datetime
    try:
        return datetime.strptime(str(started), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    except ValueError:
        return None


def comment_text(comment):
    """The plain text of a comment: a string (v2) or an ADF document (v3)."""
    if isinstance(comment, str):
        return comment
    parts = []
    stack = [comment]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "text" and isinstance(node.get("text"), str):
                parts.append(node["text"])
            stack.extend(reversed(node.get("content") or []))
    return "".join(parts)


def worklog_id(worklog):
    value = worklog.get("id") if isinstance(worklog, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and _ID.fullmatch(value) else None


def held_report(state):
    lines = []
    for key, entry in sorted((state.get("issues") or {}).items()):
        for day, figures in sorted((entry.get("held") or {}).items()):
            lines.append("%s %s (FlowForge %s, Jira %s)" % (
                key.rpartition("|")[2].split("/")[1], day,
                flowforge.format_duration(figures[0]),
                "none" if figures[1] is None else flowforge.format_duration(figures[1])))
    return "; ".join(lines[:20])


class Sync:
    """One (issue, developer) sync: plan from the ledger and the cache, then
    the fewest requests that make Jira agree."""

    def __init__(self, repo, issue, settings, http, state):
        self.repo, self.issue, self.settings, self.http = repo, issue, settings, http
        self.user = whose_time(repo)
        store = flowforge.PrivateStore(repo, self.user)
        if not store.exists():
            raise flowforge.PermanentFailure("no private store for %s in this clone" % self.user)
        self.store_key = flowforge.store_key(self.user, store.store_id)
        mine = flowforge.own_issue_days(repo, issue).get(self.user) or {}
        self.tz = mine.get("timezone") or store.tz_name
        self.wanted = {d: s for d, s in (mine.get("days") or {}).items() if s > 0}
        closed = getattr(flowforge, "closed_months", None)
        self.closed = closed(repo) if closed else {}
        issues = state.setdefault("issues", {})
        self.cache_key = "%s|%s/%s" % (settings.base, self.store_key, issue)
        self.entry = issues.setdefault(self.cache_key, {"days": {}})
        self.first = not self.entry.get("listed")    # never looked up from this machine
        self.days = self.entry.setdefault("days", {})
        self.api = None
        self.counts = {"created": 0, "updated": 0, "deleted": 0}

    # the key of one day's worklog, its comment, its body
    def ff_key(self, day):
        return "%s/%s/%s" % (self.store_key, self.issue, day)

    def target(self, day):
        seconds = self.wanted.get(day, 0)
        return seconds if seconds >= MIN_SECONDS else 0

    def body(self, day, create):
        text = ("Time tracked with FlowForge by %s on %s. %s" % (self.user, day,
                                                                MARKER % self.ff_key(day)))
        body = {"timeSpentSeconds": self.target(day), "started": started_of(day, self.tz)}
        if self.settings.deployment == "cloud":
            body["comment"] = {"type": "doc", "version": 1, "content": [
                {"type": "paragraph", "content": [{"type": "text", "text": text}]}]}
            body["properties"] = [{"key": PROPERTY_KEY, "value": {
                "v": 1, "key": self.ff_key(day), "user": self.user, "store": self.store_key,
                "issue": self.issue, "day": day}}]
        else:
            body["comment"] = text
        return body

    def client(self):
        if self.api is None:
            self.api = self.settings.client(self.http)
        return self.api

    def path(self, worklog=None, query=""):
        path = "%s/issue/%s/worklog" % (self.settings.api, self.issue)
        if worklog:
            path += "/" + worklog
        return path + ("?" + query if query else "")

    # -- the run ------------------------------------------------------------------

    def run(self):
        days = sorted(set(self.wanted) | set(self.days))
        todo, held = [], {}
        for day in days:
            known = self.days.get(day)
            if not self.first and (known or {}).get("seconds", 0) == self.target(day):
                continue                                   # Jira has what FlowForge has
            if not self.first and known is None and self.target(day) == 0:
                continue                                   # nothing there, nothing wanted
            if day[:7] in self.closed:
                if not self.first:
                    held[day] = [self.wanted.get(day, 0), (known or {}).get("seconds")]
                continue
            todo.append(day)
        if self.first:
            held = self.reconcile_all()
            self.entry["listed"] = True
        else:
            lookups = []
            for day in todo:
                if not self.write_known(day):
                    lookups.append(day)
            if lookups:
                self.reconcile_all(only=set(lookups))
        return self.report(held)

    def write_known(self, day):
        """Write `day` through its cached worklog id; False when it needs a lookup."""
        known = self.days.get(day)
        wid = (known or {}).get("id")
        target = self.target(day)
        if not wid:
            return target == 0 and self.forget(day)
        if target == 0:
            self.delete(day, wid)
            return True
        reply = self.client().request("PUT", self.path(wid, self.settings.write_query()),
                                      self.body(day, create=False))
        if reply.status == 404:                       # deleted in Jira: look it up, or create
            self.days.pop(day, None)
            return False
        check(reply, "updating the worklog of %s on %s" % (self.issue, day))
        self.days[day] = {"id": wid, "seconds": target}
        self.counts["updated"] += 1
        return True

    def forget(self, day):
        self.days.pop(day, None)
        return True

    def delete(self, day, wid):
        reply = self.client().request("DELETE", self.path(wid, "adjustEstimate=%s"
                                                          % self.settings.adjust))
        if reply.status != 404:                       # already gone is what was wanted
            check(reply, "deleting the worklog of %s on %s" % (self.issue, day))
            self.counts["deleted"] += 1
        self.days.pop(day, None)

    def find_ours(self):
        """{day: [worklogs]} of this store's worklogs on the issue, lowest id
        first, following startAt / maxResults / total through every page."""
        prefix = "%s/%s/" % (self.store_key, self.issue)
        found, start = {}, 0
        expand = "&expand=properties" if self.settings.deployment == "cloud" else ""
        for _ in range(MAX_PAGES):
            reply = check(self.client().request("GET", self.path(query="startAt=%d&maxResults=%d%s"
                                                                 % (start, PAGE_SIZE, expand))),
                          "listing the worklogs of %s" % self.issue)
            page = reply.json_object()
            worklogs = page.get("worklogs") if isinstance(page.get("worklogs"), list) else []
            for worklog in worklogs:
                key = self.key_of(worklog)
                if key and key.startswith(prefix) and worklog_id(worklog):
                    found.setdefault(key[len(prefix):], []).append(worklog)
            total = page.get("total")
            start += len(worklogs)
            if not worklogs or not isinstance(total, int) or start >= total:
                break
        else:
            raise flowforge.RetryLater("listing the worklogs of %s: more than %d pages"
                                       % (self.issue, MAX_PAGES))
        for day in found:
            found[day].sort(key=lambda w: int(worklog_id(w)))
        return found

    @staticmethod
    def key_of(worklog):
        for prop in worklog.get("properties") or []:
            if isinstance(prop, dict) and prop.get("key") == PROPERTY_KEY:
                value = prop.get("value")
                if isinstance(value, dict) and isinstance(value.get("key"), str):
                    return value["key"]
        m = re.search(r"\[flowforge:([^\]\s]{1,400})\]", comment_text(worklog.get("comment")))
        return m.group(1) if m else None

    def reconcile_all(self, only=None):
        """Look every (or `only` these) day up in Jira and make it agree:
        update what is there, create what is missing, delete what went to zero
        and any duplicate.  Returns the closed-month days that disagree."""
        found = self.find_ours()
        held = {}
        days = sorted(set(self.wanted) | set(found) | set(self.days)) if only is None else sorted(only)
        for day in days:
            if not re.fullmatch(r"\d{4}-\d\d-\d\d", day):
                continue
            worklogs = found.get(day, [])
            target = self.target(day)
            if day[:7] in self.closed:                    # a closed month: never rewritten
                have = sum(int(w.get("timeSpentSeconds") or 0) for w in worklogs) if worklogs \
                    else None
                if worklogs:
                    self.days[day] = {"id": worklog_id(worklogs[0]), "seconds": have}
                if (have or 0) != target:
                    held[day] = [self.wanted.get(day, 0), have]
                continue
            for duplicate in worklogs[1:]:                # a race once left two: keep the first
                self.delete(day, worklog_id(duplicate))
            if not worklogs and target == 0:
                self.days.pop(day, None)
            elif not worklogs:
                self.create(day)
            elif target == 0:
                self.delete(day, worklog_id(worklogs[0]))
            else:
                worklog, wid = worklogs[0], worklog_id(worklogs[0])
                if (worklog.get("timeSpentSeconds") != target
                        or instant(worklog.get("started")) != instant(started_of(day, self.tz))
                        or (self.settings.deployment == "cloud"
                            and not any(p.get("key") == PROPERTY_KEY
                                        for p in worklog.get("properties") or []
                                        if isinstance(p, dict)))):
                    self.days[day] = {"id": wid, "seconds": None}
                    if not self.write_known(day):
                        self.create(day)
                else:
                    self.days[day] = {"id": wid, "seconds": target}
        return held

    def create(self, day):
        query = self.settings.write_query()
        reply = check(self.client().request("POST", self.path(query=query),
                                            self.body(day, create=True)),
                      "adding a worklog to %s on %s" % (self.issue, day))
        wid = worklog_id(reply.json_object())
        if wid is None:   # created, but we cannot tell which: the next run looks it up
            raise flowforge.RetryLater("Jira answered %d without a worklog id on %s"
                                       % (reply.status, self.issue))
        self.days[day] = {"id": wid, "seconds": self.target(day)}
        self.counts["created"] += 1

    # -- what the job says ----------------------------------------------------------

    def report(self, held):
        short = sorted(d for d, s in self.wanted.items() if 0 < s < MIN_SECONDS)
        parts = ["%d %s" % (n, what) for what, n in sorted(self.counts.items()) if n]
        if short:
            parts.append("under a minute, not in Jira: %s" % ", ".join(short))
            flowforge.log_event(self.repo, "jira-short", issue=self.issue, days=short)
        previous = self.entry.get("held") or {}
        self.entry["held"] = held
        if not held:
            self.entry.pop("held", None)
            return "; ".join(parts) or "unchanged"
        lines = []
        for day, (ours, theirs) in sorted(held.items()):
            closed = self.closed.get(day[:7]) or {}
            lines.append("%s (month %s closed%s): FlowForge %s, Jira %s" % (
                day, day[:7], " by %s" % closed["closed_by"] if closed.get("closed_by") else "",
                flowforge.format_duration(ours),
                "none" if theirs is None else flowforge.format_duration(theirs)))
        flowforge.log_event(self.repo, "jira-held", issue=self.issue, days=sorted(held))
        if held == previous:
            return "; ".join(parts + ["still not rewritten: %s" % ", ".join(sorted(held))])
        raise flowforge.PermanentFailure(
            "%sJira not rewritten for %s in a closed month: %s -- `flowforge reopen MONTH` lets "
            "FlowForge write it, or correct Jira by hand" % (
                ("; ".join(parts) + "; ") if parts else "", self.issue, "; ".join(lines)))
