"""FlowForge plugin: one comment per GitHub issue with the team's tracked time.

Enable it in .flowforge/config.json (committed; never put a token there):

    "plugins": {"github": {"repository": "owner/repo", "per_user": false,
                           "label": "time-tracked"}}

The token comes from GITHUB_TOKEN or GH_TOKEN in the environment of whatever
runs the retry queue (the daemon, or `flowforge queue run`).  Issues written
`123`/`#123` belong to `repository` (else $GITHUB_REPOSITORY, else the `origin`
remote); `owner/repo#123` names its own.  Jira-style `ABC-12` is not GitHub's.

What it writes: on each such issue, exactly one comment, found again by a
hidden marker, with the team's total (and each user's, with "per_user": true),
plus the optional label.  Nothing else, and no request at all when the total
has not changed since the last update from this machine.
"""
import os
import re

import flowforge

PLUGIN_API = 1
NAME = "github"
API_VERSION = "2022-11-28"
BODY_LIMIT = 65536
MARKER = "<!-- flowforge:summary v1 key=%s -->"


def origin_repository(repo):
    """owner/repo of the `origin` remote, when it is a hosted URL (not a local path)."""
    rc, out, _ = flowforge.run_git(["config", "--get", "remote.origin.url"], repo.root,
                                   check=False)
    url = out.strip()
    m = re.fullmatch(r"(?:[a-z+]+://[^/]+/|[^/@\s]+@[^:/\s]+:)([A-Za-z0-9_.-]+)/"
                     r"([A-Za-z0-9_.-]+?)(?:\.git)?/?", url)
    return "%s/%s" % m.groups() if rc == 0 and m else None


def github_issue(repo, issue, config):
    """(owner/repo, number) of an issue reference GitHub can hold, else None."""
    m = re.fullmatch(r"([A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)#(\d+)", issue)
    if m:
        return m.group(1), int(m.group(2))
    if issue.isdigit():
        repository = (config.get("repository") or os.environ.get("GITHUB_REPOSITORY")
                      or origin_repository(repo))
        return (repository, int(issue)) if repository else None
    return None


def on_stop(repo, entry, config):
    if github_issue(repo, entry["issue"], config):
        flowforge.enqueue_sync(repo, NAME, entry["issue"])


def on_aggregate(repo, issues, config):
    for issue in issues:
        if github_issue(repo, issue, config):
            flowforge.enqueue_sync(repo, NAME, issue)


def health(repo, config):
    if not (os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")):
        return "no GITHUB_TOKEN or GH_TOKEN in this environment"
    if not (config.get("repository") or os.environ.get("GITHUB_REPOSITORY")
            or origin_repository(repo)):
        return "no repository: set plugins.github.repository in config.json"
    return None


def render_body(key, totals, config):
    """The comment: deterministic, so an unchanged total gives the same bytes."""
    lines = ["**Time tracked** on this issue by the team: **%s** (%s h)" % (
        flowforge.format_duration(totals["total"]), flowforge.decimal_hours(totals["total"]))]
    if config.get("per_user") and totals["by_user"]:
        lines += ["", "| who | time | hours |", "| --- | ---: | ---: |"]
        for user, seconds in sorted(totals["by_user"].items()):
            lines.append("| %s | %s | %s |" % (user, flowforge.format_duration(seconds),
                                              flowforge.decimal_hours(seconds)))
    lines += ["", "<sub>Kept up to date by FlowForge.</sub>", MARKER % key]
    body = "\n".join(lines) + "\n"
    if len(body) > BODY_LIMIT:  # GitHub refuses longer bodies with 422
        return render_body(key, totals, dict(config, per_user=False))
    return body


def check(reply, what):
    """The reply, or RetryLater / PermanentFailure as GitHub's status says."""
    if 200 <= reply.status < 300:
        return reply
    doc = reply.json_object()
    message = doc.get("message") or reply.body[:200].decode("utf-8", "replace") or "no message"
    if doc.get("errors"):
        message += " (%s)" % "; ".join(
            str(e.get("message") or e.get("code") or e) if isinstance(e, dict) else str(e)
            for e in doc["errors"][:3])
    text = "GitHub %d on %s: %s" % (reply.status, what, message)
    headers = reply.headers
    if reply.status in (403, 429):
        after = flowforge.parse_retry_after(headers.get("retry-after"), flowforge.now())
        if after is not None:
            raise flowforge.RetryLater(text, after=after)
        if headers.get("x-ratelimit-remaining") == "0":
            reset = headers.get("x-ratelimit-reset", "")
            after = int(reset) - flowforge.now() if reset.isdigit() else 60
            raise flowforge.RetryLater(text, after=max(1, after))
        if reply.status == 429 or "secondary rate limit" in message.lower():
            raise flowforge.RetryLater(text, after=60)  # no headers: wait at least a minute
        raise flowforge.PermanentFailure(text)          # any other 403 is a permission problem
    if reply.status >= 500:
        raise flowforge.RetryLater(text)
    raise flowforge.PermanentFailure(text)              # 401, 404, 410, 422, 400 ...


def ours(comment, marker):
    return isinstance(comment, dict) and marker in (comment.get("body") or "")


def find_comments(api, repository, number, marker):
    """Our comments on the issue (lowest id first), following `Link` pagination."""
    path = "/repos/%s/issues/%d/comments?per_page=100" % (repository, number)
    found = []
    while path:
        reply = check(api.request("GET", path), "listing comments of %s#%d" % (repository, number))
        found += [c for c in reply.json() or [] if ours(c, marker)]
        m = re.search(r'<([^>]+)>;\s*rel="next"', reply.headers.get("link", ""))
        path = m.group(1) if m else None
    return sorted(found, key=lambda c: c["id"])


def sync(repo, issue, config, http, state):
    target = github_issue(repo, issue, config)
    if target is None:
        raise flowforge.PermanentFailure("%s is not an issue of a known GitHub repository (set "
                                         "plugins.github.repository)" % issue)
    repository, number = target
    token = os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")
    if not token:
        raise flowforge.PermanentFailure("no GITHUB_TOKEN or GH_TOKEN in the environment of the "
                                         "process that runs the queue")
    key = "%s#%d" % (repository, number)
    marker = MARKER % key
    body = render_body(key, flowforge.issue_totals(repo, issue), config)
    digest = flowforge.sha256_hex(body.encode("utf-8"))
    comments = state.setdefault("comments", {})
    known = comments.get(key) or {}
    if known.get("sha") == digest and (known.get("labelled") or not config.get("label")):
        return "unchanged"                              # no request at all
    base = config.get("api_url") or os.environ.get("GITHUB_API_URL") or "https://api.github.com"
    api = http(base, {"Accept": "application/vnd.github+json", "Authorization": "Bearer " + token,
                      "X-GitHub-Api-Version": API_VERSION,
                      "User-Agent": "flowforge/%s" % flowforge.VERSION},
               timeout=float(config.get("timeout", 15)))
    comment_id = known.get("id")
    if comment_id and known.get("sha") != digest:
        reply = api.request("PATCH", "/repos/%s/issues/comments/%d" % (repository, comment_id),
                            {"body": body})
        if reply.status == 404:
            comment_id = None                           # deleted on GitHub: find or create again
        else:
            check(reply, "updating the comment on %s" % key)
    if not comment_id:
        found = find_comments(api, repository, number, marker)
        for duplicate in found[1:]:                     # a race once left two: keep the first
            check(api.request("DELETE", "/repos/%s/issues/comments/%d" % (repository,
                                                                       duplicate["id"])),
                  "removing a duplicate comment on %s" % key)
        if found:
            comment_id = found[0]["id"]
            if found[0].get("body") != body:
                check(api.request("PATCH", "/repos/%s/issues/comments/%d" % (repository,
                                                                           comment_id),
                                  {"body": body}), "updating the comment on %s" % key)
        else:
            reply = check(api.request("POST", "/repos/%s/issues/%d/comments" % (repository, number),
                                      {"body": body}), "commenting on %s" % key)
            comment_id = reply.json()["id"]
    comments[key] = known = {"id": comment_id, "sha": digest, "labelled": known.get("labelled")}
    if config.get("label") and not known.get("labelled"):
        check(api.request("POST", "/repos/%s/issues/%d/labels" % (repository, number),
                          {"labels": [config["label"]]}), "labelling %s" % key)
        known["labelled"] = True
    return "updated"
