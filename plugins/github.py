"""FlowForge plugin: one comment per GitHub issue with the team's tracked time.

Enable it in .flowforge/config.json (committed; never put a token there):

    "plugins": {"github": {"repository": "owner/repo", "per_user": false,
                           "label": "time-tracked"}}

The token comes from GITHUB_TOKEN or GH_TOKEN in the environment of whatever
runs the retry queue (the daemon, or `flowforge queue run`).  Issues written
`123`/`#123` belong to `repository` (else $GITHUB_REPOSITORY, else the `origin`
remote); `owner/repo#123` names its own.  Jira-style `ABC-12` is not GitHub's,
and neither is anything with path tricks (`a/..#1`, `%2e`, extra slashes).

Where the token goes: https://api.github.com, or the GitHub Enterprise URL in
GITHUB_API_URL -- the developer's own environment.  A committed
"api_url" that GITHUB_API_URL does not confirm is refused, never contacted
(anyone who can commit could otherwise collect every teammate's token).  The
URL must be https://; http:// only to this machine (localhost, 127.0.0.0/8,
::1).  Error text is scrubbed of the token before the queue or a log sees it.

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
PUBLIC_API = "https://api.github.com"
URL_ENV = ("GITHUB_API_URL",)              # the developer's own choice
# GitHub's own names: an owner is letters, digits, - (and _ on Enterprise), a
# repository also `.`, but never `.` or `..`.  Nothing else reaches a URL path.
_REPOSITORY = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]{0,99})/([A-Za-z0-9_.-]{1,100})", re.ASCII)
_NUMBER = re.compile(r"[0-9]{1,12}", re.ASCII)


# -- where the token may go: FlowForge's provider rules --------------------------

is_loopback, shown_url, base_url = flowforge.is_loopback, flowforge.shown_url, flowforge.provider_base_url
scrub, ScrubbedErrors = flowforge.scrub_secret, flowforge.ScrubbedErrors


def api_base(config):
    """The API's base URL: the public API, or a server this process's
    environment (URL_ENV) names; a committed api_url alone is refused."""
    return flowforge.provider_api_base(config, NAME, PUBLIC_API, URL_ENV)


# -- issues --------------------------------------------------------------------


def origin_repository(repo):
    """owner/repo of the `origin` remote, when it is a hosted URL (not a local path)."""
    rc, out, _ = flowforge.run_git(["config", "--get", "remote.origin.url"], repo.root,
                                   check=False)
    url = out.strip()
    m = re.fullmatch(r"(?:[a-z+]+://[^/]+/|[^/@\s]+@[^:/\s]+:)([A-Za-z0-9_.-]+)/"
                     r"([A-Za-z0-9_.-]+?)(?:\.git)?/?", url)
    found = "%s/%s" % m.groups() if rc == 0 and m else None
    return found if valid_repository(found) else None


def valid_repository(name):
    """Whether `name` is owner/repo as GitHub spells them: nothing that could
    move a request to another path (`..`, `.`, %-escapes, more slashes)."""
    m = _REPOSITORY.fullmatch(name) if isinstance(name, str) else None
    return bool(m) and m.group(2).strip(".") != ""


def default_repository(repo, config):
    """(owner/repo for bare numbers or None, where it came from)."""
    for value, where in ((config.get("repository"), "plugins.github.repository"),
                         (os.environ.get("GITHUB_REPOSITORY"), "GITHUB_REPOSITORY")):
        if value:
            return (value if valid_repository(value) else None), where
    return origin_repository(repo), "the origin remote"


def github_issue(repo, issue, config):
    """(owner/repo, number) of an issue reference GitHub can hold, else None."""
    if not isinstance(issue, str):
        return None
    owner_repo, hash_, number = issue.rpartition("#")
    if hash_ and owner_repo:
        if valid_repository(owner_repo) and _NUMBER.fullmatch(number):
            return owner_repo, int(number)
        return None
    if _NUMBER.fullmatch(issue):
        repository = default_repository(repo, config)[0]
        return (repository, int(issue)) if repository else None
    return None


def not_an_issue(repo, issue, config):
    """Why `issue` gets no comment: the message of the dead letter."""
    if not _NUMBER.fullmatch(issue):
        return ("refusing issue reference %r: GitHub's are 123 or owner/repo#123, with GitHub "
                "names only (no ., .., %%-escapes or extra slashes)" % issue[:200])
    value, where = default_repository(repo, config)
    if where != "the origin remote":
        return "%s %r is not a GitHub owner/repo name" % (where, str(value)[:200])
    return ("%s is not an issue of a known GitHub repository (set plugins.github.repository)"
            % issue)


def comment_id_of(comment):
    """A comment's id from GitHub: a positive whole number, else PermanentFailure."""
    value = comment.get("id") if isinstance(comment, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise flowforge.PermanentFailure("GitHub returned a comment without a valid id")
    return value


def on_stop(repo, entry, config):
    if github_issue(repo, entry["issue"], config):
        flowforge.enqueue_sync(repo, NAME, entry["issue"])


def on_aggregate(repo, issues, config):
    for issue in issues:
        if github_issue(repo, issue, config):
            flowforge.enqueue_sync(repo, NAME, issue)


def client(config, http, base, token):
    return ScrubbedErrors(http(base, {"Accept": "application/vnd.github+json",
                                      "Authorization": "Bearer " + token,
                                      "X-GitHub-Api-Version": API_VERSION,
                                      "User-Agent": "flowforge/%s" % flowforge.VERSION},
                               timeout=float(config.get("timeout", 15))), token)


def health(repo, config, online=False, http=None):
    """`plugins check`: the token, the base URL, the repository; with `online`
    one read-only request (GET /repos/{owner}/{repo})."""
    variable = "GITHUB_TOKEN" if os.environ.get("GITHUB_TOKEN") else "GH_TOKEN"
    token = os.environ.get(variable)
    if not token:
        return "no GITHUB_TOKEN or GH_TOKEN in this environment"
    try:
        base = api_base(config)
    except flowforge.PermanentFailure as e:
        return str(e)
    value, where = default_repository(repo, config)
    if value is None and where != "the origin remote":
        return "%s is not a GitHub owner/repo name" % where
    if value is None:
        return "no repository: set plugins.github.repository in config.json"
    notes = ["token from %s" % variable, "API %s allowed" % shown_url(base),
             "repository %s (from %s)" % (value, where)]
    if online:
        try:
            check(client(config, http, base, token).request("GET", "/repos/%s" % value),
                  "reading %s" % value)
        except (flowforge.RetryLater, flowforge.PermanentFailure) as e:
            return {"problem": scrub(e, token), "notes": notes}
        notes.append("online: GET /repos/%s answered" % value)
    return {"problem": None, "notes": notes}


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
    message = doc.get("message")
    if not isinstance(message, str) or not message:
        message = reply.body[:2000].decode("utf-8", "replace")[:200] or "no message"
    if isinstance(doc.get("errors"), list) and doc["errors"]:
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
        page = reply.json()
        found += [c for c in page if ours(c, marker)] if isinstance(page, list) else []
        m = re.search(r'<([^>]+)>;\s*rel="next"', reply.headers.get("link", ""))
        path = m.group(1) if m else None
    return sorted(found, key=comment_id_of)


def sync(repo, issue, config, http, state):
    target = github_issue(repo, issue, config)
    if target is None:
        raise flowforge.PermanentFailure(not_an_issue(repo, issue, config))
    token = os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")
    if not token:
        raise flowforge.PermanentFailure("no GITHUB_TOKEN or GH_TOKEN in the environment of the "
                                         "process that runs the queue")
    base = api_base(config)                             # before any request, or none at all
    # GitHub's words, minus the token
    return flowforge.without_secret(token, lambda: update(repo, issue, config, http, state,
                                                          target, base, token))


def update(repo, issue, config, http, state, target, base, token):
    repository, number = target
    key = "%s#%d" % (repository, number)
    marker = MARKER % key
    body = render_body(key, flowforge.issue_totals(repo, issue), config)
    digest = flowforge.sha256_hex(body.encode("utf-8"))
    comments = state.setdefault("comments", {})
    known = comments.get(key) or {}
    if known.get("sha") == digest and (known.get("labelled") or not config.get("label")):
        return "unchanged"                              # no request at all
    api = client(config, http, base, token)
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
                                                                       comment_id_of(duplicate))),
                  "removing a duplicate comment on %s" % key)
        if found:
            comment_id = comment_id_of(found[0])
            if found[0].get("body") != body:
                check(api.request("PATCH", "/repos/%s/issues/comments/%d" % (repository,
                                                                           comment_id),
                                  {"body": body}), "updating the comment on %s" % key)
        else:
            reply = check(api.request("POST", "/repos/%s/issues/%d/comments" % (repository, number),
                                      {"body": body}), "commenting on %s" % key)
            comment_id = comment_id_of(reply.json())
    comments[key] = known = {"id": comment_id, "sha": digest, "labelled": known.get("labelled")}
    if config.get("label") and not known.get("labelled"):
        check(api.request("POST", "/repos/%s/issues/%d/labels" % (repository, number),
                          {"labels": [config["label"]]}), "labelling %s" % key)
        known["labelled"] = True
    return "updated"
