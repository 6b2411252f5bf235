"""A loopback fake of GitLab's GraphQL API (POST /api/graphql) for the timelog
operations FlowForge uses, with GitLab's status codes, headers and error
bodies (sources in the plugins README, section GitLab):

* 401 `{"errors":[{"message":"Invalid token"}]}` for a token GitLab does not know
  (GraphqlController#authorize_access_api!); 422 `Query too large` over 10,000
  characters; every other answer is 200 with `data` and, for what failed,
  top-level `errors` (e.g. a timelog to delete that does not exist or is not
  yours) or the mutation payload's `errors` (a spentAt in the future, a zero
  duration, a summary over 255 characters).
* RateLimit-Limit/-Name/-Observed/-Remaining/-Reset on every answer; over the
  limit, 429 with a plain-text `Retry later` body, Retry-After and
  RateLimit-ResetTime (Rack::Attack, "User and IP rate limits").
* `timelogs(first:, after:)` cursor pages of at most `page_size` (100, GitLab's
  maximum page size) nodes, `pageInfo { hasNextPage endCursor }`, opaque cursors.
* timeSpent read the way GitLab reads it: `1d` is 8 h, a bare number is hours.

It reads only the documents FlowForge sends (variables for every argument),
not GraphQL at large."""
import base64
import calendar
import json
import re
import time
from datetime import datetime, timezone
from email.utils import formatdate

from fakes import FakeServer

RESOURCE_ERROR = ("The resource that you are attempting to access does not exist or you don't "
                  "have permission to perform this action")
UNITS = {"mo": 160 * 3600, "month": 160 * 3600, "months": 160 * 3600, "w": 40 * 3600,
         "week": 40 * 3600, "weeks": 40 * 3600, "d": 8 * 3600, "day": 8 * 3600, "days": 8 * 3600,
         "h": 3600, "hour": 3600, "hours": 3600, "m": 60, "minute": 60, "minutes": 60,
         "s": 1, "second": 1, "seconds": 1}
INPUT_TYPES = {"timelogCreate": "TimelogCreateInput!", "timelogDelete": "TimelogDeleteInput!"}


class Raw:
    """A reply body sent as is (GitLab's throttle answers in plain text)."""

    def __init__(self, data, content_type="text/plain"):
        self.data, self.content_type = data, content_type


def epoch(iso):
    return calendar.timegm(time.strptime(iso.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S%z"))


def parse_duration(text):
    """Seconds, as GitLab's TimeTrackingFormatter (ChronicDuration, 8 h days,
    default unit hours) reads them; None when it cannot."""
    text = text.strip()
    if not text:
        return None
    total, pos = 0.0, 0
    for m in re.finditer(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*", text):
        if m.start() != pos or (m.group(2) and m.group(2) not in UNITS):
            return None
        total += float(m.group(1)) * UNITS.get(m.group(2) or "h")
        pos = m.end()
    return int(total) if pos == len(text) else None


def top_fields(document):
    """(operation type, {variable: type}, [(alias, field, {argument: variable})])."""
    start = document.index("{")
    head = re.fullmatch(r"\s*(query|mutation)?\s*(\w+)?\s*(?:\((.*)\))?\s*", document[:start], re.S)
    kind = head.group(1) or "query"
    declared = dict(re.findall(r"\$(\w+)\s*:\s*([\w!\[\]]+)", head.group(3) or ""))
    flat, depth = [], 0
    for ch in document[start + 1:]:
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                break
            depth -= 1
        elif depth == 0:
            flat.append(ch)
    fields = []
    for alias, name, args in re.findall(r"(?:(\w+)\s*:\s*)?(\w+)\s*(?:\(([^)]*)\))?", "".join(flat)):
        fields.append((alias or name, name, dict(re.findall(r"(\w+)\s*:\s*\$(\w+)", args))))
    return kind, declared, fields


class FakeGitLab(FakeServer):
    TOKEN = "glpat-test-token"

    def __init__(self, token=TOKEN, username="alice", now="2026-11-20T18:00:00Z"):
        super().__init__()
        self.token, self.username = token, username
        self.users = {token: username}
        self.now = epoch(now)
        self.projects = {}          # full path (lower case) -> {"path", "id", "issues": {iid: issue}}
        self.next_id = 500
        self.page_size = 100
        self.slow = {}              # field name -> seconds to wait after acting (a lost answer)
        self.canned = []            # [(field name, status, headers, body)] used once each
        self.limit, self.observed, self.window = 2000, 0, 60
        self.echo_token = False     # a hostile server that repeats the token in its errors
        self._install_handler()

    # -- data --------------------------------------------------------------

    def add_issue(self, path, iid):
        project = self.projects.setdefault(path.lower(), {"path": path, "issues": {},
                                                          "id": "gid://gitlab/Project/%d"
                                                          % (len(self.projects) + 1)})
        self.next_id += 1
        issue = {"id": "gid://gitlab/Issue/%d" % self.next_id, "iid": iid, "timelogs": []}
        project["issues"][iid] = issue
        return issue

    def issue(self, path, iid):
        return self.projects[path.lower()]["issues"][iid]

    def add_timelog(self, path, iid, seconds, summary, user="someone", spent_at=None):
        self.next_id += 1
        log = {"n": self.next_id, "id": "gid://gitlab/Timelog/%d" % self.next_id,
               "timeSpent": seconds, "summary": summary, "user": user,
               "spentAt": spent_at or "2026-11-01T12:00:00Z"}
        self.issue(path, iid)["timelogs"].append(log)
        return log

    def timelogs(self, path, iid, user=None):
        return [t for t in self.issue(path, iid)["timelogs"] if user is None or t["user"] == user]

    def ours(self, path, iid):
        return [t for t in self.timelogs(path, iid) if "[flowforge:" in (t["summary"] or "")]

    # -- what was asked ----------------------------------------------------

    def calls(self):
        """[(operation type, [field names], variables)] of every GraphQL request."""
        out = []
        for method, path, _, body in self.requests:
            if method == "POST" and path.startswith("/api/graphql") and isinstance(body, dict):
                kind, _, fields = top_fields(body.get("query") or "{}")
                out.append((kind, [f[1] for f in fields], body.get("variables") or {}))
        return out

    def count_field(self, name):
        return sum(fields.count(name) for _, fields, _ in self.calls())

    def reads(self):
        return [c for c in self.calls() if c[0] == "query"]

    def writes(self):
        return [c for c in self.calls() if c[0] == "mutation"]

    # -- HTTP --------------------------------------------------------------

    def _install_handler(self):
        fake = self
        base = self.server.RequestHandlerClass

        class Handler(base):
            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                headers = {k.lower(): v for k, v in self.headers.items()}
                with fake.lock:
                    fake.requests.append((self.command, self.path, headers, body))
                status, extra, reply = fake.answer(self.command, self.path, headers, body)
                if isinstance(reply, Raw):
                    data, ctype = reply.data, reply.content_type
                else:
                    data, ctype = json.dumps(reply).encode(), "application/json; charset=utf-8"
                try:
                    self.send_response(status)
                    for key, value in dict(fake.common_headers(), **(extra or {})).items():
                        if value is not None:           # None: leave the header out
                            self.send_header(key, value)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass    # the client gave up (a lost answer)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

        self.server.RequestHandlerClass = Handler

    def common_headers(self):
        remaining = max(0, self.limit - self.observed)
        return {"RateLimit-Name": "throttle_authenticated_api", "RateLimit-Limit": str(self.limit),
                "RateLimit-Observed": str(self.observed), "RateLimit-Remaining": str(remaining),
                "RateLimit-Reset": str(self.now + self.window)}

    def answer(self, method, path, headers, body):
        if method != "POST" or path.split("?")[0] != "/api/graphql":
            return 404, {}, Raw(b"<html><body>The page could not be found</body></html>",
                                "text/html; charset=utf-8")
        self.observed += 1
        if self.observed > self.limit:
            return 429, {"Retry-After": str(self.window),
                         "RateLimit-ResetTime": formatdate(self.now + self.window, usegmt=True)}, \
                Raw(b"Retry later\n")
        token = None
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer "):]
        elif headers.get("private-token"):
            token = headers["private-token"]
        user = self.users.get(token)
        if token is not None and user is None:
            message = "Invalid token" + (" %s" % token if self.echo_token else "")
            return 401, {}, {"errors": [{"message": message}]}
        if not isinstance(body, dict) or not isinstance(body.get("query"), str):
            return 200, {}, {"errors": [{"message": "No query string was present"}]}
        if len(body["query"]) > 10000:
            return 422, {}, {"errors": [{"message": "Query too large"}]}
        kind, declared, fields = top_fields(body["query"])
        for n, (field, status, extra, reply) in enumerate(self.canned):
            if field in [f[1] for f in fields]:
                del self.canned[n]
                return status, extra, reply
        variables = body.get("variables") or {}
        data, errors = {}, []
        for alias, name, args in fields:
            for arg, var in args.items():
                want = INPUT_TYPES.get(name)
                if want and declared.get(var) != want:
                    return 200, {}, {"errors": [{"message": "Type mismatch on variable $%s and "
                                                 "argument %s (%s / %s)" % (var, arg, declared.get(var),
                                                                            want)}]}
            if kind == "query":
                data[alias] = self.query_field(name, args, variables, body["query"], user)
            else:
                value = self.mutation_field(name, variables.get(args.get("input")) or {}, user)
                if isinstance(value, str):
                    errors.append({"message": value, "locations": [{"line": 2, "column": 3}],
                                   "path": [alias]})
                    value = None
                data[alias] = value
                if self.slow.get(name):
                    time.sleep(self.slow[name])     # acted; the answer comes too late
        reply = {"data": data}
        if errors:
            reply["errors"] = errors
        return 200, {}, reply

    def node(self, log):
        return {"id": log["id"], "timeSpent": log["timeSpent"], "spentAt": log["spentAt"],
                "summary": log["summary"], "user": {"username": log["user"]}}

    def query_field(self, name, args, variables, document, user):
        if name == "currentUser":
            return {"username": user} if user else None
        if name != "project":
            return None
        project = self.projects.get(str(variables.get(args.get("fullPath"))).lower())
        if project is None or user is None:
            return None
        out = {"id": project["id"], "fullPath": project["path"]}
        m = re.search(r"issue\(iid:\s*\$(\w+)\)", document)
        if m:
            issue = project["issues"].get(int(variables.get(m.group(1)) or 0))
            if issue is None:
                out["issue"] = None
                return out
            page = re.search(r"timelogs\(([^)]*)\)", document).group(1)
            first = re.search(r"first:\s*([0-9]+)", page)
            size = min(int(first.group(1)) if first else self.page_size, self.page_size)
            after = re.search(r"after:\s*\$(\w+)", page)
            cursor = variables.get(after.group(1)) if after else None
            logs = sorted(issue["timelogs"], key=lambda t: t["n"])
            if cursor:
                start = json.loads(base64.b64decode(cursor))["id"]
                logs = [t for t in logs if t["n"] > int(start)]
            chunk = logs[:size]
            end = base64.b64encode(json.dumps({"id": str(chunk[-1]["n"])}).encode()).decode() \
                if chunk else None
            out["issue"] = {"id": issue["id"], "timelogs": {
                "pageInfo": {"hasNextPage": len(logs) > size, "endCursor": end},
                "nodes": [self.node(t) for t in chunk]}}
        return out

    def find_issue(self, gid):
        for project in self.projects.values():
            for issue in project["issues"].values():
                if issue["id"] == gid:
                    return issue
        return None

    def mutation_field(self, name, payload, user):
        """The payload, or a str: a top-level error."""
        if user is None:
            return RESOURCE_ERROR
        if name == "timelogCreate":
            issue = self.find_issue(payload.get("issuableId"))
            if issue is None:
                return RESOURCE_ERROR
            seconds = parse_duration(str(payload.get("timeSpent") or ""))
            if seconds is None:
                return {"errors": ["Time spent must be formatted correctly. For example: 1h 30m."],
                        "timelog": None}
            at = payload.get("spentAt")
            at_ts = epoch(at) if at else self.now
            if at_ts > self.now:
                return {"errors": ["Spent at can't be a future date and time."], "timelog": None}
            if seconds == 0:
                return {"errors": ["Time spent can't be zero."], "timelog": None}
            if len(payload.get("summary") or "") > 255:
                return {"errors": ["Summary is too long (maximum is 255 characters)"],
                        "timelog": None}
            self.next_id += 1
            log = {"n": self.next_id, "id": "gid://gitlab/Timelog/%d" % self.next_id,
                   "timeSpent": seconds, "summary": payload.get("summary"), "user": user,
                   "spentAt": datetime.fromtimestamp(at_ts, timezone.utc).strftime(
                       "%Y-%m-%dT%H:%M:%SZ")}
            issue["timelogs"].append(log)
            return {"errors": [], "timelog": self.node(log)}
        if name == "timelogDelete":
            for project in self.projects.values():
                for issue in project["issues"].values():
                    for log in issue["timelogs"]:
                        if log["id"] == payload.get("id") and log["user"] == user:
                            issue["timelogs"].remove(log)
                            return {"errors": [], "timelog": self.node(log)}
            return RESOURCE_ERROR
        return "Field '%s' doesn't exist on type 'Mutation'" % name

