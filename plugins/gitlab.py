"""FlowForge plugin: each developer's time as GitLab timelogs, one per (day, issue).

Enable it in .flowforge/config.json (committed; never put a token there):

    "plugins": {"gitlab": {"project": "group/project"}}

`project` (a full path, subgroups allowed) is where bare issue numbers go:
`#12` / `12`; `group/project#12` names its own project.  Optional: "timeout"
(seconds per request, default 15).  The token comes from GITLAB_TOKEN in the
environment of whatever runs the retry queue (the daemon, `flowforge queue
run`); it needs the `api` scope (mutations) and at least the Planner role.

Where the token goes: https://gitlab.com, or the self-managed GitLab that
GITLAB_URL (or CI_SERVER_URL) in that same environment names -- the instance's
root URL, e.g. https://gitlab.example.com.  A committed "api_url" that the
environment does not confirm is refused, never contacted.  https:// only;
http:// only to this machine (test doubles).  Error text is scrubbed of the
token before the queue, a log or a screen sees it.

What it writes, through the GraphQL API (POST /api/graphql): for every store
this clone writes and every day (the first day of each week or month with a
coarser granularity) with time on the issue, exactly one timelog by the
token's user -- timeSpent the day's seconds, spentAt noon of that day in the
developer's time zone, and a summary ending in FlowForge's key
`[flowforge:v1 <user>--<store> <day> <issue tag>]`.  A sync reads the issue's
timelogs (cursor pages), and for each day whose timelog differs sends one
mutation request that deletes the old timelog(s) and creates the new one;
days that agree cost nothing, and when nothing changed since this machine's
last sync no request is made at all.  Days in a month a manager has closed
are never rewritten: a difference there is reported instead (the job is
dead-lettered once, after the open days are written; the log has it as
`gitlab-held`; `plugins check` lists it while the month is closed).  REST's
add_spent_time cannot set the day nor remove one entry, hence GraphQL.
"""
import hashlib
import os
import re

import flowforge

PLUGIN_API = 1
NAME = "gitlab"
PUBLIC_URL = "https://gitlab.com"
URL_ENV = ("GITLAB_URL", "CI_SERVER_URL")      # the developer's own choice (CI sets the second)
TOKEN_ENV = "GITLAB_TOKEN"
GRAPHQL = "/api/graphql"
PAGE_SIZE = 100               # GitLab's maximum page size for most connections
MAX_PAGES = 100               # timelog pages followed for one issue (10,000 timelogs)
DELETES_PER_REQUEST = 20      # duplicates removed in one mutation document
SUMMARY_LIMIT = 255           # Timelog validates summary length <= 255
RATE_LIMIT_WAIT = 60          # a 429 without Retry-After or RateLimit-Reset
KEY = "[flowforge:v1 %s %s %s]"                 # store key, day, issue tag
_KEY = re.compile(r"\[flowforge:v1 ([A-Za-z0-9_][A-Za-z0-9._-]{0,63}--[0-9a-f]{10}) "
                  r"([0-9]{4}-[0-9]{2}-[0-9]{2}) ([0-9a-f]{8})\]", re.ASCII)
# GitLab's path segments: letters, digits, _ - . and not starting with - or .
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}", re.ASCII)
_NUMBER = re.compile(r"#?([0-9]{1,12})", re.ASCII)
_IID = re.compile(r"[0-9]{1,12}", re.ASCII)
_DAY = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})", re.ASCII)

READ = """query FlowForgeTimelogs($path: ID!, $iid: String!, $after: String) {
  currentUser { username }
  project(fullPath: $path) {
    issue(iid: $iid) {
      id
      timelogs(first: %d, after: $after) {
        pageInfo { hasNextPage endCursor }
        nodes { id timeSpent spentAt summary user { username } }
      }
    }
  }
}""" % PAGE_SIZE

CHECK = """query FlowForgeCheck($path: ID!) {
  currentUser { username }
  project(fullPath: $path) { id fullPath }
}"""

CHECK_USER = "query FlowForgeCheck { currentUser { username } }"

CREATE = "c: timelogCreate(input: $c) { errors timelog { id timeSpent spentAt summary } }"
DELETE = "d%d: timelogDelete(input: $d%d) { errors }"


# -- where the token may go: FlowForge's provider rules --------------------------

shown_url, scrub, ScrubbedErrors = flowforge.shown_url, flowforge.scrub_secret, flowforge.ScrubbedErrors


def api_base(config):
    """The instance's root URL: https://gitlab.com, or a server this process's
    environment (URL_ENV) names; a committed api_url alone is refused."""
    return flowforge.provider_api_base(config, NAME, PUBLIC_URL, URL_ENV)


# -- issues --------------------------------------------------------------------


def valid_project(path):
    """Whether `path` is a GitLab project full path (group[/subgroup...]/project)."""
    if not isinstance(path, str) or len(path) > 500:
        return False
    parts = path.split("/")
    return 2 <= len(parts) <= 21 and all(
        _SEGMENT.fullmatch(p) and not p.endswith((".git", ".atom")) for p in parts)


def gitlab_issue(issue, config):
    """(project full path, iid) of an issue reference this plugin syncs, else None."""
    if not isinstance(issue, str):
        return None
    path, hash_, number = issue.rpartition("#")
    if hash_ and path:
        return (path, int(number)) if valid_project(path) and _IID.fullmatch(number) else None
    m = _NUMBER.fullmatch(issue)
    project = config.get("project")
    if m and valid_project(project):
        return project, int(m.group(1))
    return None


def not_an_issue(issue, config):
    """Why `issue` gets no timelogs: the message of the dead letter."""
    if _NUMBER.fullmatch(issue or ""):
        if config.get("project") is None:
            return "%s has no project: set plugins.gitlab.project in config.json" % issue
        return ("plugins.gitlab.project %r is not a GitLab project path (group/project)"
                % str(config.get("project"))[:200])
    return ("refusing issue reference %r: GitLab's are #12 (with plugins.gitlab.project) or "
            "group/project#12" % str(issue)[:200])


def on_stop(repo, entry, config):
    if gitlab_issue(entry["issue"], config):
        flowforge.enqueue_sync(repo, NAME, entry["issue"])


def on_aggregate(repo, issues, config):
    for issue in issues:
        if gitlab_issue(issue, config):
            flowforge.enqueue_sync(repo, NAME, issue)


# -- what a timelog says ---------------------------------------------------------


def time_spent(seconds):
    """GitLab's duration text for `seconds`: hours, minutes and seconds only --
    GitLab counts a day as 8 h and a bare number as hours."""
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    parts = ["%d%s" % (n, unit) for n, unit in ((h, "h"), (m, "m"), (s, "s")) if n]
    return " ".join(parts) or "0s"


def spent_at(day, tz_name, now_ts):
    """ISO 8601 (UTC) of noon of `day` in the developer's zone -- the same
    calendar day for viewers from UTC-11 to UTC+11 -- or now when noon is
    still ahead (GitLab refuses a spentAt in the future)."""
    from datetime import datetime, timezone
    y, m, d = (int(x) for x in _DAY.fullmatch(day).groups())
    noon = int(datetime(y, m, d, 12, tzinfo=flowforge.load_timezone(tz_name)).timestamp())
    return datetime.fromtimestamp(min(noon, int(now_ts)), timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def issue_tag(issue):
    """8 hex digits naming the FlowForge issue reference: `12` and
    `group/project#12` are two ledger rows that may meet on one GitLab issue."""
    return hashlib.sha256(issue.encode("utf-8")).hexdigest()[:8]


def summary(user, day, granularity, store, tag):
    period = {"week": "the week of %s", "month": "%s"}.get(granularity, "%s") % (
        day[:7] if granularity == "month" else day)
    text = "FlowForge: time of %s in %s %s" % (user, period, KEY % (store, day, tag))
    assert len(text) <= SUMMARY_LIMIT, text   # user <= 64, store key 75, the rest fixed
    return text


# -- HTTP and GraphQL ------------------------------------------------------------


def client(config, http, base, token):
    return ScrubbedErrors(http(base, {"Authorization": "Bearer " + token,
                                      "Accept": "application/json",
                                      "User-Agent": "flowforge/%s" % flowforge.VERSION},
                               timeout=float(config.get("timeout", 15))), token)


def error_text(reply):
    """GitLab's words from an error reply: GraphQL `errors`, REST `message` /
    `error`, or the plain text (a throttled request's body is `Retry later`)."""
    doc = reply.json_object()
    errors = doc.get("errors")
    if isinstance(errors, list) and errors:
        return messages(errors)
    for key in ("message", "error"):
        if isinstance(doc.get(key), str) and doc[key]:
            return doc[key]
    text = " ".join(reply.body[:2000].decode("utf-8", "replace").split())[:200]
    return text or "no message"


def messages(errors):
    return "; ".join(str(e.get("message") or e) if isinstance(e, dict) else str(e)
                     for e in errors[:3])[:600]


def rate_limit_wait(headers):
    """Seconds to wait from Retry-After, else RateLimit-Reset (Unix time),
    else RateLimit-ResetTime (an HTTP date); None when none is given."""
    now_ts = flowforge.now()
    after = flowforge.parse_retry_after(headers.get("retry-after"), now_ts)
    if after is not None:
        return after
    reset = headers.get("ratelimit-reset", "").strip()
    if reset.isdigit():
        return float(min(max(1, int(reset) - now_ts), flowforge.RETRY_AFTER_MAX))
    return flowforge.parse_retry_after(headers.get("ratelimit-resettime"), now_ts)


def check(reply, what):
    """The reply, or RetryLater / PermanentFailure as GitLab's status says."""
    if 200 <= reply.status < 300:
        return reply
    text = "GitLab %d on %s: %s" % (reply.status, what, error_text(reply))
    if reply.status == 429:
        after = rate_limit_wait(reply.headers)
        raise flowforge.RetryLater(text, after=RATE_LIMIT_WAIT if after is None else after)
    if reply.status >= 500 or reply.status == 408:
        raise flowforge.RetryLater(text, after=rate_limit_wait(reply.headers))
    raise flowforge.PermanentFailure(text)   # 401 token, 403 no API access, 404 URL, 422 ...


class GraphQL:
    """POST /api/graphql through `api`; stops before a request that GitLab
    said (RateLimit-Remaining: 0) it would refuse, until RateLimit-Reset."""

    def __init__(self, api):
        self.api = api
        self.exhausted = None

    def run(self, document, variables, what):
        if self.exhausted is not None:
            raise flowforge.RetryLater("GitLab's rate limit is used up (RateLimit-Remaining: 0); "
                                       "%s waits for RateLimit-Reset" % what, after=self.exhausted)
        reply = check(self.api.request("POST", GRAPHQL, {"query": document, "variables": variables}),
                      what)
        if reply.headers.get("ratelimit-remaining", "").strip() == "0":
            wait = rate_limit_wait(reply.headers)
            self.exhausted = RATE_LIMIT_WAIT if wait is None else max(1.0, wait)
        doc = reply.json_object()
        if not isinstance(doc.get("data"), dict) and not doc.get("errors"):
            raise flowforge.PermanentFailure("GitLab gave no GraphQL answer on %s" % what)
        return doc


def refused(doc, what):
    """PermanentFailure (or RetryLater for a server-side fault) from top-level errors."""
    text = "GitLab refused %s: %s" % (what, messages(doc["errors"]))
    if re.search(r"internal server error|timed out|try again", text, re.I):
        raise flowforge.RetryLater(text)
    raise flowforge.PermanentFailure(text)


def read_timelogs(gql, path, iid):
    """(token's username, issue global id, [timelog]) following the cursor pages."""
    after, seen, nodes = None, set(), []
    what = "reading the timelogs of %s#%d" % (path, iid)
    for _ in range(MAX_PAGES):
        doc = gql.run(READ, {"path": path, "iid": str(iid), "after": after}, what)
        if doc.get("errors"):
            refused(doc, what)
        data = doc["data"]
        user = data.get("currentUser")
        if not isinstance(user, dict) or not isinstance(user.get("username"), str):
            raise flowforge.PermanentFailure("GitLab does not know the token's user (currentUser "
                                             "is null): check GITLAB_TOKEN")
        project = data.get("project")
        if not isinstance(project, dict):
            raise flowforge.PermanentFailure("GitLab has no project %s, or the token cannot see it"
                                             % path)
        issue = project.get("issue")
        if not isinstance(issue, dict):
            raise flowforge.PermanentFailure("GitLab has no issue %s#%d, or the token cannot see it"
                                             % (path, iid))
        if not isinstance(issue.get("id"), str) or not issue["id"].startswith("gid://gitlab/"):
            raise flowforge.PermanentFailure("GitLab returned %s#%d without a global id" % (path, iid))
        connection = issue.get("timelogs") or {}
        page = connection.get("nodes")
        info = connection.get("pageInfo") or {}
        if not isinstance(page, list):
            raise flowforge.PermanentFailure("GitLab returned no timelog list for %s#%d" % (path, iid))
        nodes += [n for n in page if isinstance(n, dict)]
        if not info.get("hasNextPage"):
            return user["username"], issue["id"], nodes
        after = info.get("endCursor")
        if not isinstance(after, str) or not after or after in seen:
            raise flowforge.PermanentFailure("GitLab's timelog pages of %s#%d do not advance "
                                             "(endCursor %r)" % (path, iid, str(after)[:40]))
        seen.add(after)
    raise flowforge.PermanentFailure("%s#%d has more than %d pages of timelogs"
                                     % (path, iid, MAX_PAGES))


def timelog_of(node):
    """(id, seconds) of a timelog node from GitLab, else None."""
    tid, seconds = node.get("id"), node.get("timeSpent")
    if isinstance(tid, str) and tid.startswith("gid://gitlab/Timelog/") and isinstance(
            seconds, int) and not isinstance(seconds, bool):
        return tid, seconds
    return None


def write_day(gql, issue_id, old_ids, create, seconds, what):
    """Delete `old_ids` and (when `create` is given) create one timelog of
    `seconds`, in one
    mutation request -- GitLab runs a mutation's fields in order -- or more
    when more than DELETES_PER_REQUEST duplicates are to go.  The new id."""
    chunks = [old_ids[i:i + DELETES_PER_REQUEST] for i in range(0, len(old_ids),
                                                              DELETES_PER_REQUEST)] or [[]]
    new_id, failed = None, []
    for n, chunk in enumerate(chunks):
        last = n == len(chunks) - 1
        declared = ["$d%d: TimelogDeleteInput!" % i for i in range(len(chunk))]
        fields = [DELETE % (i, i) for i in range(len(chunk))]
        variables = {"d%d" % i: {"id": tid} for i, tid in enumerate(chunk)}
        if last and create:
            declared.append("$c: TimelogCreateInput!")
            fields.append(CREATE)
            variables["c"] = dict(create, issuableId=issue_id)
        document = "mutation FlowForgeDay(%s) {\n  %s\n}" % (", ".join(declared),
                                                             "\n  ".join(fields))
        doc = gql.run(document, variables, what)
        data = doc.get("data") or {}
        for i in range(len(chunk)):
            payload = data.get("d%d" % i)
            if not isinstance(payload, dict) or payload.get("errors"):
                failed.append(chunk[i])
        if last and create:
            payload = data.get("c")
            if not isinstance(payload, dict) or payload.get("errors") or not isinstance(
                    payload.get("timelog"), dict):
                why = (payload or {}).get("errors") if isinstance(payload, dict) else None
                raise flowforge.PermanentFailure("GitLab refused %s: %s" % (
                    what, messages(why or doc.get("errors") or ["no timelog returned"])))
            made = timelog_of(payload["timelog"])
            if made is None:
                raise flowforge.PermanentFailure("GitLab returned a timelog without an id on %s"
                                                 % what)
            new_id = made[0]
            if made[1] != seconds:
                raise flowforge.PermanentFailure(
                    "GitLab read %r as %d s, not %d s, on %s" % (create["timeSpent"], made[1],
                                                                 seconds, what))
    if failed:   # gone already, or not ours to delete: the next attempt reads the issue again
        raise flowforge.RetryLater("GitLab did not delete %d old timelog(s) on %s: %s" % (
            len(failed), what, messages(doc.get("errors") or ["no reason given"])))
    return new_id


# -- sync ------------------------------------------------------------------------


def closed_months(repo):
    """{"YYYY-MM": ...} of months a manager has closed (none before FlowForge has them)."""
    find = getattr(flowforge, "closed_months", None)
    return dict(find(repo) or {}) if find else {}


def desired_days(repo, issue):
    """{store key: (user, tz, granularity, {day: seconds})} for this clone's own
    stores that the ledger holds: what GitLab should show for them.  A store
    with no ledger ref and no time (a lost ref, say) is left alone."""
    own = flowforge.own_issue_days(repo, issue)
    in_ledger = {name.rsplit("/", 1)[-1] for name in flowforge.list_ledger_refs(repo)}
    stores = {}
    for user in flowforge.local_users(repo):
        try:
            store = flowforge.PrivateStore(repo, user)
            key, tz = flowforge.store_key(user, store.store_id), store.tz_name
        except flowforge.FlowForgeError:
            continue            # damaged settings: `recover assess` says so
        mine = own.get(user)
        if mine is None and key not in in_ledger:
            continue
        mine = mine or {}
        days = {d: int(s) for d, s in (mine.get("days") or {}).items() if int(s) > 0}
        stores[key] = (user, mine.get("timezone") or tz, mine.get("granularity") or "day", days)
    return stores


def expected(stores, entry, closed):
    """What the last sync left on GitLab if nothing changed since: the ledger's
    days, except held days of closed months (GitLab keeps what it has)."""
    out = {}
    for key, (_, _, _, days) in stores.items():
        held = (entry.get("held") or {}).get(key) or {}
        merged = {}
        for day in set(days) | set(held):
            seconds = held[day][0] if day[:7] in closed and day in held else days.get(day, 0)
            if seconds:
                merged[day] = seconds
        out[key] = merged
    return out


def sync(repo, issue, config, http, state):
    target = gitlab_issue(issue, config)
    if target is None:
        raise flowforge.PermanentFailure(not_an_issue(issue, config))
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise flowforge.PermanentFailure("no GITLAB_TOKEN in the environment of the process that "
                                         "runs the queue")
    base = api_base(config)                             # before any request, or none at all
    return flowforge.without_secret(token, lambda: update(repo, issue, config, http, state,
                                                          target, base, token))


def update(repo, issue, config, http, state, target, base, token):
    path, iid = target
    ref = "%s#%d" % (path, iid)
    stores, closed, tag = desired_days(repo, issue), closed_months(repo), issue_tag(issue)
    issues = state.setdefault("issues", {})
    if not stores:
        return "unchanged"                              # nothing of this clone's to write
    entry_key = "%s %s %s" % (base, ref, tag)
    entry = issues.get(entry_key) or {}
    if entry.get("clean") and entry.get("synced") == expected(stores, entry, closed):
        return "unchanged"                              # no request at all
    entry = issues[entry_key] = dict(entry, clean=False)   # kept even if this attempt fails
    gql = GraphQL(client(config, http, base, token))
    username, issue_id, nodes = read_timelogs(gql, path, iid)
    ours = {}                                           # store -> day -> [(id, seconds)]
    for node in nodes:
        m = _KEY.search(node.get("summary") or "")
        made = timelog_of(node)
        author = (node.get("user") or {}).get("username")
        if m and made and m.group(1) in stores and m.group(3) == tag and author == username:
            ours.setdefault(m.group(1), {}).setdefault(m.group(2), []).append(made)
    synced, held, now_ts, written, news = {}, {}, flowforge.now(), 0, []
    for key in sorted(stores):
        user, tz, granularity, days = stores[key]
        synced[key], have = {}, ours.get(key, {})
        for day in sorted(set(days) | set(have)):
            want, logs = days.get(day, 0), have.get(day, [])
            remote = sum(seconds for _, seconds in logs)
            if day[:7] in closed:
                if remote != want:
                    held.setdefault(key, {})[day] = [remote, want]
                    if ((entry.get("held") or {}).get(key) or {}).get(day) != [remote, want]:
                        news.append(report_held(repo, ref, user, day, remote, want,
                                                closed[day[:7]]))
                if remote:
                    synced[key][day] = remote
                continue
            if want and len(logs) == 1 and remote == want:
                synced[key][day] = want                 # agrees: no request
                continue
            if not want and not logs:
                continue
            create = None
            if want:
                create = {"timeSpent": time_spent(want), "spentAt": spent_at(day, tz, now_ts),
                          "summary": summary(user, day, granularity, key, tag)}
            what = "the timelog of %s on %s in %s" % (user, day, ref)
            write_day(gql, issue_id, [tid for tid, _ in logs], create, want, what)
            written += 1
            if want:
                synced[key][day] = want
    entry.update(issue_id=issue_id, user=username, synced=synced, held=held, clean=True)
    if news:    # the open days are written; the job is dead-lettered once to say so
        raise flowforge.PermanentFailure("%s: not rewritten, in closed months: %s" % (
            ref, "; ".join(news)))
    return "updated %d day(s)" % written if written else "unchanged"


def report_held(repo, ref, user, day, remote, want, closing):
    """A closed month's day that differs, the first time it is seen: logged
    (event gitlab-held) and said in the dead letter; the state keeps it, and
    `plugins check` lists it while the month stays closed."""
    by = closing.get("closed_by") if isinstance(closing, dict) else None
    flowforge.log_event(repo, "gitlab-held", issue=ref, user=user, day=day,
                        ledger_seconds=want, gitlab_seconds=remote)
    return "%s on %s has %s in the ledger, %s in GitLab (%s closed%s; `flowforge reopen %s` " \
        "lets it through)" % (user, day, flowforge.format_duration(want),
                              flowforge.format_duration(remote), day[:7],
                              " by %s" % by if by else "", day[:7])


# -- plugins check -----------------------------------------------------------------


def health(repo, config, online=False, http=None):
    """`plugins check`: the token, the base URL, the project; with `online`
    one read-only GraphQL query (the token's user and the project)."""
    token = os.environ.get(TOKEN_ENV)
    if not token:
        return "no GITLAB_TOKEN in this environment"
    try:
        base = api_base(config)
    except flowforge.PermanentFailure as e:
        return str(e)
    project = config.get("project")
    if project is not None and not valid_project(project):
        return "plugins.gitlab.project %r is not a GitLab project path (group/project)" % str(
            project)[:200]
    notes = ["token from GITLAB_TOKEN", "GitLab %s allowed" % shown_url(base),
             "project %s" % project if project else
             "no plugins.gitlab.project: only group/project#12 references are synced"]
    notes += held_notes(repo)
    if online:
        try:
            gql = GraphQL(client(config, http, base, token))
            doc = gql.run(CHECK, {"path": project}, "checking") if project else gql.run(
                CHECK_USER, {}, "checking")
            if doc.get("errors"):
                refused(doc, "the check")
            user = (doc["data"].get("currentUser") or {}).get("username")
            if not user:
                return {"problem": "GitLab does not know the token's user (currentUser is null)",
                        "notes": notes}
            if project and not doc["data"].get("project"):
                return {"problem": "GitLab has no project %s, or the token cannot see it" % project,
                        "notes": notes}
        except (flowforge.RetryLater, flowforge.PermanentFailure) as e:
            return {"problem": scrub(e, token), "notes": notes}
        notes.append("online: GraphQL answered as @%s%s" % (
            user, ", project %s found" % project if project else ""))
    return {"problem": None, "notes": notes}


def held_notes(repo, limit=10):
    """One line per day of a month still closed whose timelog differs from the ledger."""
    closed, lines = closed_months(repo), []
    for name, entry in sorted((flowforge.plugin_state(repo, NAME)[0]().get("issues") or {}).items()):
        for key, days in sorted((entry.get("held") or {}).items()):
            for day, (remote, want) in sorted(days.items()):
                if day[:7] in closed:
                    lines.append("held: %s, %s on %s: ledger %s, GitLab %s (%s is closed)" % (
                        name.split(" ")[1], key.rpartition("--")[0], day,
                        flowforge.format_duration(want), flowforge.format_duration(remote),
                        day[:7]))
    return lines[:limit] + (["... and %d more held days" % (len(lines) - limit)]
                            if len(lines) > limit else [])
