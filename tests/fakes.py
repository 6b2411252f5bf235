"""Loopback fakes of the GitHub REST and Notion APIs, with their real status
codes, headers and error bodies, scripted failures and a request log."""
import json
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeServer:
    """A threaded HTTP server on 127.0.0.1, port 0.  `script` holds canned
    replies [(method, path regex, status, headers, body)] used once each."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = []      # (method, path, headers, body)
        self.script = []
        self.delay = {}         # method -> seconds to wait before answering (after acting)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                with fake.lock:
                    fake.requests.append((self.command, self.path,
                                          {k.lower(): v for k, v in self.headers.items()}, body))
                    canned = None
                    for n, (method, pattern, _, _, _) in enumerate(fake.script):
                        if method == self.command and re.search(pattern, self.path):
                            canned = fake.script.pop(n)
                            break
                if canned:
                    status, headers, reply = canned[2:]
                else:
                    status, headers, reply = fake.route(self.command, self.path, self.headers, body)
                if fake.delay.get(self.command):
                    time.sleep(fake.delay[self.command])
                data = b"" if reply is None else json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    for key, value in dict(fake.common_headers(), **(headers or {})).items():
                        self.send_header(key, value)
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)

            do_GET = do_POST = do_PATCH = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def common_headers(self):
        return {}

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def count(self, method=None):
        return len([r for r in self.requests if method is None or r[0] == method])


class FakeGitHub(FakeServer):
    TOKEN = "ghp_test"
    VERSIONS = ("2022-11-28", "2026-03-10")

    def __init__(self, token=TOKEN):
        super().__init__()
        self.token = token
        self.comments = {}      # (repo, number) -> [comment]
        self.labels = {}
        self.next_id = 1000

    def common_headers(self):
        return {"x-ratelimit-limit": "5000", "x-ratelimit-remaining": "4999",
                "x-ratelimit-used": "1", "x-ratelimit-reset": str(int(time.time()) + 3600),
                "x-ratelimit-resource": "core"}

    def error(self, status, message, **extra):
        body = {"message": message, "documentation_url": "https://docs.github.com/rest",
                "status": str(status)}
        body.update(extra)
        return status, {}, body

    def add_comment(self, repo, number, body, login="someone"):
        self.next_id += 1
        comment = {"id": self.next_id, "node_id": "IC_%d" % self.next_id, "body": body,
                   "user": {"login": login, "type": "User"},
                   "html_url": "https://github.example/%s/issues/%d#issuecomment-%d" % (
                       repo, number, self.next_id)}
        self.comments.setdefault((repo, number), []).append(comment)
        return comment

    def ours(self, repo, number):
        return [c for c in self.comments.get((repo, number), []) if "flowforge:summary" in c["body"]]

    def route(self, method, path, headers, body):
        if not headers.get("User-Agent"):
            return self.error(403, "Request forbidden by administrative rules. Please make sure "
                              "your request has a User-Agent header")
        if headers.get("Authorization") != "Bearer " + self.token:
            return self.error(401, "Bad credentials")
        if headers.get("X-GitHub-Api-Version") not in self.VERSIONS:
            return self.error(400, "Unsupported 'X-GitHub-Api-Version'")
        if headers.get("Accept") != "application/vnd.github+json":
            return self.error(415, "Unsupported media type")
        url = urllib.parse.urlsplit(path)
        query = dict(urllib.parse.parse_qsl(url.query))
        m = re.fullmatch(r"/repos/([^/]+)/([^/]+)", url.path)
        if m and method == "GET":
            return 200, {}, {"id": 1, "full_name": "%s/%s" % m.groups(), "private": True}
        m = re.fullmatch(r"/repos/([^/]+/[^/]+)/issues/(\d+)/comments", url.path)
        if m and method == "GET":
            repo, number = m.group(1), int(m.group(2))
            items = self.comments.get((repo, number), [])
            per_page, page = int(query.get("per_page", 30)), int(query.get("page", 1))
            chunk = items[(page - 1) * per_page:page * per_page]
            headers = {}
            if page * per_page < len(items):
                headers["Link"] = '<%s%s?per_page=%d&page=%d>; rel="next"' % (
                    self.url, url.path, per_page, page + 1)
            return 200, headers, chunk
        if m and method == "POST":
            if len(body.get("body", "")) > 65536:
                return self.error(422, "Validation Failed", errors=[{
                    "resource": "IssueComment", "code": "custom", "field": "body",
                    "message": "body is too long (maximum is 65536 characters)"}])
            comment = self.add_comment(m.group(1), int(m.group(2)), body["body"], "flowforge-bot")
            return 201, {"Location": "%s/repos/%s/issues/comments/%d" % (
                self.url, m.group(1), comment["id"])}, comment
        m = re.fullmatch(r"/repos/([^/]+/[^/]+)/issues/comments/(\d+)", url.path)
        if m:
            for items in self.comments.values():
                for comment in items:
                    if comment["id"] == int(m.group(2)):
                        if method == "PATCH":
                            comment["body"] = body["body"]
                            return 200, {}, comment
                        if method == "DELETE":
                            items.remove(comment)
                            return 204, {}, None
            return self.error(404, "Not Found")
        m = re.fullmatch(r"/repos/([^/]+/[^/]+)/issues/(\d+)/labels", url.path)
        if m and method == "POST":
            labels = self.labels.setdefault((m.group(1), int(m.group(2))), set())
            labels.update(body["labels"])
            return 200, {}, [{"name": name} for name in sorted(labels)]
        return self.error(404, "Not Found")


class FakeNotion(FakeServer):
    TOKEN = "ntn_test"

    def __init__(self, token=TOKEN):
        super().__init__()
        self.token = token
        self.databases = {"db1": ["ds1"]}
        self.pages = {}         # id -> {"properties": {...}}
        self.updates = []       # (page id, properties)
        self.request_count = 0
        self.chunks = []        # result counts of the first queries (then page_size)
        self.query_calls = 0

    def add_page(self, key, page_id=None, key_property="FF Key"):
        page_id = page_id or "page-%d" % (len(self.pages) + 1)
        self.pages[page_id] = {"id": page_id, "properties": {
            key_property: {"rich_text": [{"plain_text": key}]}}}
        return page_id

    def common_headers(self):
        self.request_count += 1
        return {"x-notion-request-id": "req-%d" % self.request_count}

    def error(self, status, code, message):
        return status, {}, {"object": "error", "status": status, "code": code, "message": message,
                            "request_id": "req-%d" % self.request_count}

    def route(self, method, path, headers, body):
        version = headers.get("Notion-Version")
        if not version:
            return self.error(400, "missing_version", "Notion-Version header failed validation")
        if headers.get("Authorization") != "Bearer " + self.token:
            return self.error(401, "unauthorized", "API token is invalid.")
        url = urllib.parse.urlsplit(path).path
        m = re.fullmatch(r"/v1/databases/([^/]+)", url)
        if m and method == "GET":
            if m.group(1) not in self.databases:
                return self.error(404, "object_not_found", "Could not find database with ID: %s. "
                                  "Make sure the relevant pages and databases are shared with "
                                  "your integration." % m.group(1))
            return 200, {}, {"object": "database", "id": m.group(1), "data_sources": [
                {"id": ds, "name": "Tasks"} for ds in self.databases[m.group(1)]]}
        m = re.fullmatch(r"/v1/(data_sources|databases)/([^/]+)/query", url)
        if m and method == "POST":
            if m.group(1) == "databases" and version > "2022-06-28" and version >= "2025-09-03":
                return self.error(400, "invalid_request_url", "Invalid request URL.")
            flt = body.get("filter") or {}
            prop = flt.get("property")
            wanted = (flt.get("rich_text") or flt.get("title") or {}).get("equals")
            results = [p for p in self.pages.values()
                       if any(t.get("plain_text") == wanted
                              for t in (p["properties"].get(prop) or {}).get("rich_text", []))]
            # Notion may return fewer results than page_size, even none, with has_more:
            # `chunks` (a list of sizes) makes the fake do that, page after page.
            offset = int(body.get("start_cursor") or 0)
            call = self.query_calls
            self.query_calls += 1
            size = self.chunks[call] if call < len(self.chunks) else body.get("page_size", 100)
            end = offset + size
            more = end < len(results) or call + 1 < len(self.chunks)
            return 200, {}, {"object": "list", "results": results[offset:end],
                             "next_cursor": str(end) if more else None, "has_more": more,
                             "type": "page_or_data_source"}
        m = re.fullmatch(r"/v1/pages/([^/]+)", url)
        if m and method == "PATCH":
            page = self.pages.get(m.group(1))
            if page is None:
                return self.error(404, "object_not_found", "Could not find page with ID: %s."
                                  % m.group(1))
            for name, value in body.get("properties", {}).items():
                if "number" in value and not isinstance(value["number"], (int, float)):
                    return self.error(400, "validation_error", "body failed validation: "
                                      "body.properties.%s.number should be a number" % name)
            page["properties"].update(body["properties"])
            self.updates.append((m.group(1), body["properties"]))
            return 200, {}, {"object": "page", "id": m.group(1), "properties": page["properties"]}
        return self.error(400, "invalid_request_url", "Invalid request URL.")
