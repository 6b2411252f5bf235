"""A loopback fake of Jira's worklog REST API: Cloud (/rest/api/3, Basic auth
with e-mail and API token, ADF comments, worklog properties) and Data Center
(/rest/api/2, bearer personal access token, plain-text comments).

What it reproduces, and where that comes from, is listed in plugins/README.md
("## Jira"): the page object {startAt, maxResults, total, worklogs} and a page
size the server may cap below the maxResults asked for, expand=properties,
201/200/204 for create/update/delete, the ErrorCollection error body
{"errorMessages": [...], "errors": {...}}, Cloud's gateway 401 body, and 429
with Retry-After (and X-RateLimit-Reset on Cloud)."""
import base64
import re
import threading
import urllib.parse

from fakes import FakeServer

_STARTED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}")
_ADJUST = ("new", "leave", "manual", "auto")


class FakeJira(FakeServer):
    EMAIL = "alice@example.com"
    TOKEN = "ATATT3xFfGF0_test"          # the shape of an Atlassian API token
    PAT = "NjQ2ODk2_test_pat"

    def __init__(self, deployment="cloud", token=None, email=EMAIL, page_size=None,
                 echo_auth=False):
        super().__init__()
        # FakeServer's handler knows GET/POST/PATCH/DELETE; Jira updates with PUT.
        handler = self.server.RequestHandlerClass
        handler.do_PUT = handler.handle_any
        self.deployment = deployment
        self.version = "3" if deployment == "cloud" else "2"
        self.email = email
        self.token = token or (self.TOKEN if deployment == "cloud" else self.PAT)
        # Cloud caps maxResults at 5000 (its default); Data Center's documented
        # resource returns every worklog of the issue and ignores the paging.
        self.page_size = page_size or 5000
        self.echo_auth = echo_auth
        self.issues = {"ABC-12": [], "ABC-13": [], "OPS-7": []}
        self.next_id = 10000
        self.id_lock = threading.Lock()

    # -- helpers for tests ------------------------------------------------------

    def auth_header(self):
        if self.deployment == "cloud":
            pair = ("%s:%s" % (self.email, self.token)).encode()
            return "Basic " + base64.b64encode(pair).decode()
        return "Bearer " + self.token

    def add_worklog(self, issue, seconds, started="2026-11-19T09:00:00.000+0000", comment="",
                    properties=None, author="someone"):
        with self.id_lock:
            self.next_id += 1
            wid = str(self.next_id)
        worklog = {"id": wid, "issueId": "1%04d" % len(self.issues), "author": {
            "displayName": author}, "started": started, "timeSpentSeconds": seconds,
            "timeSpent": "%dm" % (seconds // 60),
            "comment": self._comment(comment) if isinstance(comment, str) else comment,
            "properties": list(properties or [])}
        worklog["self"] = "%s/rest/api/%s/issue/%s/worklog/%s" % (self.url, self.version,
                                                                 worklog["issueId"], wid)
        self.issues.setdefault(issue, []).append(worklog)
        return worklog

    def ours(self, issue):
        """FlowForge's worklogs on `issue`: those with its property (Cloud) or marker."""
        out = []
        for w in self.issues.get(issue, []):
            text = self.comment_text(w.get("comment"))
            if any(p.get("key") == "flowforge" for p in w.get("properties") or []) \
                    or "[flowforge:" in text:
                out.append(w)
        return out

    def writes(self):
        return [(m, p) for m, p, _, _ in self.requests if m in ("POST", "PUT", "DELETE")]

    @staticmethod
    def comment_text(comment):
        if isinstance(comment, str):
            return comment
        parts = []

        def walk(node):
            if isinstance(node, dict):
                if node.get("type") == "text" and isinstance(node.get("text"), str):
                    parts.append(node["text"])
                for child in node.get("content") or []:
                    walk(child)
        walk(comment)
        return "".join(parts)

    def _comment(self, text):
        if self.deployment != "cloud":
            return text
        return {"type": "doc", "version": 1, "content": [
            {"type": "paragraph", "content": [{"type": "text", "text": text}]}]} if text else None

    # -- Jira's answers ---------------------------------------------------------

    def error(self, status, messages=(), errors=None, headers=None):
        return status, headers or {}, {"errorMessages": list(messages), "errors": errors or {}}

    def unauthorized(self, headers):
        if self.deployment == "cloud":
            body = {"message": "Client must be authenticated to access this resource.",
                    "status-code": 401}
        else:
            body = {"errorMessages": ["You are not authenticated. Authentication required to "
                                      "perform this operation."], "errors": {}}
        if self.echo_auth:                # a hostile or broken server echoing the credentials
            seen = headers.get("Authorization") or ""
            body["seen"] = seen
            if seen.startswith("Basic "):
                try:
                    seen = base64.b64decode(seen[6:]).decode("utf-8", "replace")
                except ValueError:
                    pass
            body["message"] += " (credentials: %s)" % seen
        return 401, {"WWW-Authenticate": "Basic realm=\"protected-area\""}, body

    def shown(self, worklog, expand):
        out = {k: v for k, v in worklog.items() if k != "properties"}
        if self.deployment == "cloud" and "properties" in expand:
            out["properties"] = worklog["properties"]
        return out

    def common_headers(self):
        return {"X-AREQUESTID": "fake-%d" % len(self.requests)}

    def route(self, method, path, headers, body):
        if headers.get("Authorization") != self.auth_header():
            return self.unauthorized(headers)
        url = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(url.query))
        expand = (query.get("expand") or "").split(",")
        prefix = "/rest/api/%s" % self.version
        if url.path == prefix + "/myself" and method == "GET":
            if self.deployment == "cloud":
                return 200, {}, {"accountId": "5b10a2844c20165700ede21g", "displayName": "Alice",
                                 "emailAddress": self.email, "active": True}
            return 200, {}, {"name": "alice", "key": "JIRAUSER10100", "displayName": "Alice",
                             "active": True}
        m = re.fullmatch(re.escape(prefix) + r"/issue/([A-Z][A-Z0-9_]*-\d+)/worklog(?:/(\d+))?",
                         url.path)
        if not m:
            return self.error(404, ["null for uri: %s%s" % (self.url, url.path)])
        issue, wid = m.groups()
        if issue not in self.issues:
            return self.error(404, ["Issue does not exist or you do not have permission to see "
                                    "it."])
        worklogs = self.issues[issue]
        if "adjustEstimate" in query and query["adjustEstimate"] not in _ADJUST:
            return self.error(400, ["Invalid value for adjustEstimate: %s"
                                    % query["adjustEstimate"]])
        if wid is None and method == "GET":
            if self.deployment == "cloud":
                start = int(query.get("startAt", 0))
                size = min(int(query.get("maxResults", 5000)), self.page_size)
            else:
                start, size = 0, max(len(worklogs), 1)
            page = worklogs[start:start + size]
            return 200, {}, {"startAt": start, "maxResults": size, "total": len(worklogs),
                             "worklogs": [self.shown(w, expand) for w in page]}
        if wid is None and method == "POST":
            problem = self.invalid(body, create=True)
            if problem:
                return problem
            worklog = self.add_worklog(issue, body["timeSpentSeconds"], body["started"],
                                       body.get("comment") or "", body.get("properties"),
                                       author="Alice")
            return 201, {}, self.shown(worklog, expand)
        found = [w for w in worklogs if w["id"] == wid]
        if not found:
            return self.error(404, ["Cannot find worklog with id: %s" % wid])
        worklog = found[0]
        if method == "PUT":
            problem = self.invalid(body, create=False)
            if problem:
                return problem
            for field in ("timeSpentSeconds", "started", "comment"):
                if field in body:
                    worklog[field] = body[field]
            worklog["timeSpent"] = "%dm" % (worklog["timeSpentSeconds"] // 60)
            if "properties" in body:
                keys = {p["key"] for p in body["properties"]}
                worklog["properties"] = [p for p in worklog["properties"] if p["key"] not in keys]
                worklog["properties"] += body["properties"]
            return 200, {}, self.shown(worklog, expand)
        if method == "DELETE":
            worklogs.remove(worklog)
            return 204, {}, None
        if method == "GET":
            return 200, {}, self.shown(worklog, expand)
        return 405, {}, None

    def invalid(self, body, create):
        """Jira's 400 for a worklog body it refuses, else None."""
        if not isinstance(body, dict):
            return self.error(400, ["Unexpected character: was expecting a JSON object"])
        allowed = {"timeSpentSeconds", "started", "comment", "visibility"}
        if self.deployment == "cloud":
            allowed.add("properties")
        unknown = sorted(set(body) - allowed)
        if unknown:
            return self.error(400, ["Unrecognized field \"%s\"" % unknown[0]])
        errors = {}
        seconds = body.get("timeSpentSeconds")
        if create or "timeSpentSeconds" in body:
            if not isinstance(seconds, int) or isinstance(seconds, bool) or seconds < 60:
                errors["timeLogged"] = "Time Spent must be at least one minute."
        started = body.get("started")
        if (create or "started" in body) and not (isinstance(started, str)
                                                  and _STARTED.fullmatch(started)):
            errors["started"] = "Invalid date format. Please enter the date in the format " \
                                "\"yyyy-MM-dd'T'HH:mm:ss.SSSZ\"."
        comment = body.get("comment")
        if comment is not None:
            if self.deployment == "cloud" and not (isinstance(comment, dict)
                                                   and comment.get("type") == "doc"
                                                   and comment.get("version") == 1):
                errors["comment"] = "Comment must be an Atlassian Document."
            if self.deployment != "cloud" and not isinstance(comment, str):
                errors["comment"] = "Comment must be a string."
        for prop in body.get("properties") or []:
            if not (isinstance(prop, dict) and isinstance(prop.get("key"), str)
                    and 0 < len(prop["key"]) <= 255 and "value" in prop):
                errors["properties"] = "The property key must be 1-255 characters."
        return self.error(400, [], errors) if errors else None
