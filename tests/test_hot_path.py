"""The timer commands' hot path: what it imports, and that each shortcut it takes
(no argparse, no re, no json package, the C library's localtime, fewer fsyncs,
no interpreter teardown) answers exactly as the long way round does."""
import json
import os
import random
import re
import subprocess
import sys
from datetime import date, datetime, timedelta

import pytest

import flowforge as ff

from conftest import ROOT

HEAVY = ("re", "json", "argparse", "zoneinfo", "datetime", "enum", "subprocess", "hashlib",
         "sqlite3", "decimal", "csv")


def test_timer_commands_import_only_what_they_use(repo):
    """start (with --at -15m), status and stop of a store in a zone with DST, as the
    installed command runs them (-S): none of the modules that cost milliseconds."""
    zone = {"TZ": "Europe/Berlin", "FLOWFORGE_NOW": "1795172400"}   # 2026-11-20 12:00 there
    env = repo.env(FLOWFORGE_USER="berta", **zone)
    repo.ok("log", "7", "5m", "--date", "yesterday", user="berta", env=zone)
    with open(os.path.join(repo.root, ".flowforge/user/berta/config.json")) as f:
        assert json.load(f)["timezone"] == "Europe/Berlin"
    for argv in (["start", "12", "--at", "-15m", "--note", "x"], ["status"], ["stop"]):
        code = ("import sys; sys.argv = ['flowforge'] + %r; sys.path.insert(0, %r); "
                "import flowforge; rc = flowforge.main(); "
                "print('heavy:', *[m for m in %r if m in sys.modules]); sys.exit(rc)"
                % (argv, ROOT, HEAVY))
        proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=repo.root, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, (argv, proc.stderr)
        assert proc.stdout.splitlines()[-1] == "heavy:", (argv, proc.stdout)
    doc = repo.ok("status", "--json", user="berta", env=zone).json
    assert doc["timer"] is None and doc["today"] == "2026-11-20" and doc["today_seconds"] == 900


# -- quick_args is argparse, for plain command lines ---------------------------------

def _argparse(argv):
    name = ff._command_name(argv)
    parser = ff.build_parser(name)
    args, extra = parser.parse_known_args(argv)
    if extra and name == "log" and args.duration is None and len(extra) == 1:
        args.duration = extra[0]
    elif extra:
        return None
    return vars(args)


PLAIN = [
    ["start", "12"], ["start", "#12", "--project", "web", "--note", "login bug"],
    ["start", "ABC-7", "--at=-15m", "--allow-overlap"], ["--json", "start", "1", "-q"],
    ["-C", "/tmp", "--user", "bob", "stop", "--at", "17:30"], ["stop", "--color", "never"],
    ["status"], ["status", "--json", "-v"], ["pause"], ["resume", "--at", "13:00"],
    ["cancel"], ["switch", "9", "--at=-1h"], ["continue"], ["continue", "20261122-1a2b3c4d"],
    ["log", "12", "1h30m"], ["log", "12", "2h", "--date", "yesterday"],
    ["log", "12", "--start", "9:00", "--end", "11:30", "--note", "review", "--key", "k1"],
    ["version"], ["completion", "bash"],
    ["completion", "--words", "issues"], ["init"],
    ["aggregate"], ["aggregate", "--full", "--all"], ["aggregate", "--wait", "2.5"],
    ["aggregate", "--wait=0", "-q"],
]
NOT_PLAIN = [
    ["start"], ["start", "1", "2"], ["start", "1", "--proj", "web"], ["start", "-h"],
    ["status", "--help"], ["start", "1", "--color", "rainbow"], ["stop", "--at"],
    ["--at", "9:00", "start", "1"], ["start", "1", "--", "x"], ["completion", "tcsh"],
    ["start", "1", "--json=yes"], ["stop", "-qv"],
    # an optional positional after an option: argparse has given it its default by then
    ["quarantine", "delete", "--force", "X"], ["continue", "--at", "9:00", "20261122-1a2b3c4d"],
    ["log", "12", "--date", "yesterday", "2h"],
    ["aggregate", "--wait", "soon"], ["aggregate", "--wait", "4000"], ["aggregate", "--wait", "nan"],
]


@pytest.mark.parametrize("argv", PLAIN, ids=" ".join)
def test_quick_args_gives_what_argparse_gives(argv):
    quick = ff.quick_args(argv)
    assert quick is not None, argv
    assert vars(quick) == _argparse(argv)


@pytest.mark.parametrize("argv", NOT_PLAIN, ids=" ".join)
def test_anything_else_goes_to_argparse(argv):
    assert ff.quick_args(argv) is None


def test_quick_args_never_disagrees_with_argparse_on_random_lines():
    words = ["start", "stop", "status", "log", "pause", "12", "#3", "--at", "9:00", "--note",
             "n", "--json", "-q", "-C", ".", "--project", "p", "--allow-overlap", "--date",
             "today", "2h", "--color", "auto", "-v", "--user", "u", "x", "--at=10:00",
             "aggregate", "--full", "--all", "--wait", "3", "-1", "--wait=1e9", "inf"]
    rng = random.Random(14)
    checked = 0
    for _ in range(3000):
        argv = [rng.choice(words) for _ in range(rng.randint(1, 6))]
        quick = ff.quick_args(argv)
        if quick is None:
            continue
        try:
            expected = _argparse(argv)
        except ff.FlowForgeError:
            expected = "an argparse error"
        assert vars(quick) == expected, argv
        checked += 1
    assert checked > 100


# -- the regular expressions the hot path no longer compiles ---------------------------

ORACLES = {
    "valid_user_name": (r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}", lambda t: ff.valid_user_name(t)),
    "is_project": (r"^[A-Za-z0-9][A-Za-z0-9 ._/-]{0,63}$",
                   lambda t: ff.is_project(t), lambda t: not t.endswith(" ")),
    "is_ref_namespace": (r"refs/(?:[A-Za-z0-9_][A-Za-z0-9._-]*/)+", ff.is_ref_namespace),
    "is_rate": (r"^\d{1,9}(\.\d{1,4})?$", ff.is_rate),
    "is_currency": (r"^[A-Z]{3}$", ff.is_currency),
    "is_iso_date": (r"^\d{4}-\d{2}-\d{2}$", ff.is_iso_date),
    "is_month": (r"^\d{4}-\d{2}$", ff.is_month),
    "is_entry_id": (r"(\d{4})(\d{2})(\d{2})-[0-9a-f]{8,16}", ff.is_entry_id),
}


@pytest.mark.parametrize("name", sorted(ORACLES))
def test_hand_written_checks_agree_with_their_patterns(name):
    pattern, check, *also = ORACLES[name]
    compiled = re.compile(pattern)
    rng = random.Random(name)
    alphabet = "aZ09 ._/-_#éAZ\n\u0663" + "refs" + "20261122-1a2b3c4d"
    seeds = ["refs/flowforge/stores/", "2026-11-22", "2026-11", "20261122-1a2b3c4d", "120.50",
             "EUR", "alice", "web app", "a" * 64, "a" * 65]
    for _ in range(40000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        if rng.random() < 0.4:
            seed = rng.choice(seeds)
            cut = rng.randint(0, len(seed))
            text = seed[:cut] + text[:rng.randint(0, 3)] + seed[cut:]
        expected = compiled.fullmatch(text) is not None and all(f(text) for f in also)
        assert check(text) == expected, repr(text)


def test_durations_and_relative_times_parse_as_the_patterns_did():
    part = re.compile(r"(\d+(?:\.\d+)?)\s*([hms])")
    clock = re.compile(r"(\d+):([0-5]\d)(?::([0-5]\d))?")
    ago = re.compile(r"^(?:-(\S+)|(\S+)\s+ago)$")
    days_ago = re.compile(r"^-(\d{1,4})d$")
    rng = random.Random(7)
    alphabet = "0123456789.:hmsd -ago\t\u00a0\u0663x"
    for _ in range(60000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9))).strip().lower()
        if rng.random() < 0.2:
            text = "-" + text
        if rng.random() < 0.2:
            text += " ago"
        if text and part.sub("", text).strip() == "":
            assert ff._duration_parts(text) == part.findall(text), repr(text)
        else:
            assert not ff._duration_parts(text), repr(text)
        m = clock.fullmatch(text)
        assert ff._clock_duration(text) == (
            int(m.group(1)) * 3600 + int(m.group(2)) * 60 + int(m.group(3) or 0) if m else None)
        m = ago.fullmatch(text)
        assert ff._ago(text) == ((m.group(1) or m.group(2)) if m else None), repr(text)
        m = days_ago.fullmatch(text)
        assert ff._days_ago(text) == (int(m.group(1)) if m else None), repr(text)


def test_date_arithmetic_agrees_with_datetime():
    epoch = date(1970, 1, 1)
    for n in range(0, 376200, 13):
        assert ff.epoch_day((epoch + timedelta(days=n)).isoformat()) == n
    assert ff.epoch_day("2999-12-31") == (date(2999, 12, 31) - epoch).days
    rng = random.Random(3)
    for _ in range(20000):
        day = "%04d-%02d-%02d" % (rng.randint(1960, 3010), rng.randint(0, 13), rng.randint(0, 32))
        shift = rng.randint(-800, 800)
        try:
            expected = (date.fromisoformat(day) + timedelta(days=shift)).isoformat()
        except ValueError:
            with pytest.raises(ValueError):
                ff.shift_day(day, shift)
            continue
        assert ff.shift_day(day, shift) == expected
        assert ff._day_count(day, expected) == shift + 1


# -- json without the json package -----------------------------------------------------

def test_load_json_is_json_loads():
    texts = ['{"a":1}', ' [1,2.5,"x",null,true,false] \n', '"\\u00e9\\n"', '{"a":1} x', "",
             "  ", '{"a":', "[1,]", "NaN", "-Infinity", "1e400", "[" * 50 + "]" * 50,
             '{"a":"\\ud800"}', "\t{}\r\n", "{} {}", '"\x01"']
    data = [t.encode() for t in texts] + [b'\xef\xbb\xbf{"b":2}', b'{"c":"\xc3\xa9"}', b"\xff",
                                          '{"u": 1}'.encode("utf-16"), b"\x00"]
    for value in texts + data:
        try:
            expected = ("ok", repr(json.loads(value)))
        except ValueError:
            expected = "ValueError"
        try:
            got = ("ok", repr(ff.load_json(value)))
        except ValueError:
            got = "ValueError"
        assert got == expected, value


def test_canonical_json_is_sorted_compact_json_dumps():
    values = [{"b": 1, "a": [1.5, None, "é\n", True]}, "x", 1e100, float("inf"), {1: 2},
              {"nested": {"z": [], "y": {}}}, -0.0, 10 ** 30, "\u2028\x00"]
    for value in values:
        assert ff.canonical_json(value) == json.dumps(value, sort_keys=True, separators=(",", ":"),
                                                      ensure_ascii=False)
    with pytest.raises(TypeError):
        ff.canonical_json({"a": object()})
    with pytest.raises(ValueError):
        ff.canonical_json(_circular())
    value = {"a": {"b": object()}}
    with pytest.raises(TypeError):
        ff.canonical_json(value)
    value["a"]["b"] = 1   # a failed encode leaves nothing behind
    assert ff.canonical_json(value) == '{"a":{"b":1}}'


def _circular():
    loop = []
    loop.append(loop)
    return loop


# -- Zone: the C library where it reads zoneinfo's file, zoneinfo elsewhere ----------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "America/Havana", "Australia/Lord_Howe",
         "Asia/Kolkata", "Pacific/Apia", "America/Sao_Paulo", "Asia/Tehran", "Africa/Casablanca",
         "Antarctica/Troll", "Pacific/Chatham", "Europe/Dublin"]


def _zoneinfo_day(ts, tz):
    """The local day of `ts` as DayClock computed it with zoneinfo alone."""
    day = datetime.fromtimestamp(ts, tz).date()
    lo = int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp())
    nxt = day + timedelta(days=1)
    hi = int(datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).timestamp())
    if not lo <= ts < hi:
        lo, hi = ts, max(hi, ts + 1)
    return lo, hi, day.isoformat()


@pytest.mark.parametrize("name", ZONES)
def test_zone_answers_as_zoneinfo_does(name):
    tz = ff.load_timezone(name)
    zone = ff.Zone(name)
    assert zone._walls(0) is not None or name != "UTC"   # the C library's path is taken
    rng = random.Random(name)
    stamps = [rng.randint(0, 32503680000 - 1) for _ in range(300)]
    stamps += [rng.randint(1700000000, 1900000000) for _ in range(300)]
    # the instants around each of this zone's clock changes of 2020-2030
    for hour in range(int(datetime(2020, 1, 1).timestamp()) // 3600,
                      int(datetime(2030, 1, 1).timestamp()) // 3600, 1):
        ts = hour * 3600
        if tz.utcoffset(datetime.fromtimestamp(ts, tz)) != \
                tz.utcoffset(datetime.fromtimestamp(ts + 3600, tz)):
            stamps += [ts - 86400, ts - 1, ts, ts + 1, ts + 1800, ts + 3600, ts + 86400]
    for ts in stamps:
        local = datetime.fromtimestamp(ts, tz)
        assert zone.date_of(ts) == local.date().isoformat(), (name, ts)
        assert zone.clock_text(ts) == local.strftime("%Y-%m-%d %H:%M:%S"), (name, ts)
        lo, hi, iso = zone.day_span(ts)
        assert (lo, hi, iso) == _zoneinfo_day(ts, tz), (name, ts)
        assert ff.Zone(name).day_length(iso) == zone.day_length(iso) == hi - lo, (name, ts)


def test_zone_falls_back_to_zoneinfo_where_the_c_library_would_guess(monkeypatch, tmp_path):
    assert ff.Zone("Europe/Berlin")._walls(0) is not None
    monkeypatch.setenv("TZDIR", str(tmp_path))
    assert ff.Zone("Europe/Berlin")._walls(0) is None
    assert ff.Zone("Europe/Berlin").date_of(0) == "1970-01-01"
    monkeypatch.delenv("TZDIR")
    assert ff.Zone("Not/AZone")._walls(0) is None
    with pytest.raises(ff.FlowForgeError) as e:
        ff.Zone("Not/AZone").date_of(0)
    assert e.value.exit_code == ff.EXIT_CONFIG
    before = os.environ.get("TZ")
    ff.Zone("Asia/Tokyo").date_of(0)
    assert os.environ.get("TZ") == before   # the user's TZ is back for git and plugins


def test_no_zone_moves_its_clocks_and_back_within_three_days():
    """What Zone relies on: equal offsets from the day before a day to the day after mean no
    clock change inside it.  Checked on this machine's tz database."""
    pure = pytest.importorskip("zoneinfo._zoneinfo")
    import zoneinfo
    shortest = None
    for name in sorted(zoneinfo.available_timezones()):
        zone = pure.ZoneInfo.no_cache(name)
        changes, offset = [], zone._tti_before.utcoff if zone._tti_before else None
        for when, info in zip(zone._trans_utc, zone._ttinfos):
            if info.utcoff != offset:
                changes.append((when, offset, info.utcoff))
                offset = info.utcoff
        for a, b in zip(changes, changes[1:]):
            if b[2] == a[1]:
                gap = b[0] - a[0]
                shortest = gap if shortest is None else min(shortest, gap)
                assert gap > 3 * 86400, (name, a, b)
    assert shortest is not None


# -- fsyncs and the exit ---------------------------------------------------------------------

def test_fsyncs_per_timer_command(repo, monkeypatch):
    """What durability needs and no more (the README's table): start = the timer
    file and its directory; stop = the list of changed days, the day file and
    its mirror copy (and their directories when the appends create them) and
    the cleared timer file; the timer's mirror copy is not synced."""
    from conftest import call
    assert call(repo.root, "log", "1", "5m").rc == 0   # the store and today's day file exist
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink("/proc/self/fd/%d" % fd)),
                                                 real_fsync(fd)))
    time_dir = os.path.realpath(os.path.join(repo.root, ".flowforge", "user", "alice", "time"))
    assert call(repo.root, "start", "2", "--at", "-10m").rc == 0
    assert len(synced) == 2, synced
    assert os.path.basename(synced[0]).startswith(".current.json.tmp-")   # then renamed
    assert synced[1] == time_dir
    synced.clear()
    assert call(repo.root, "stop").rc == 0
    assert len(synced) == 4, synced
    assert synced[0] == os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(time_dir))),
                                     "state", "aggregate", "alice.changes.jsonl")   # named first
    assert os.path.dirname(synced[1]) == os.path.join(time_dir, "daily")
    assert synced[1].endswith(".jsonl")
    assert "/flowforge/" in synced[2] and synced[2].endswith(os.path.basename(synced[1]))  # mirror
    assert os.path.basename(synced[3]).startswith(".current.json.tmp-")


def test_the_command_flushes_its_output_and_keeps_its_exit_code(repo, tmp_path):
    out = tmp_path / "out"
    code = "import sys; sys.path.insert(0, %r); import flowforge; flowforge.run()" % ROOT
    env = repo.env(FLOWFORGE_USER="alice")
    with open(out, "w") as f:
        ok = subprocess.run([sys.executable, "-S", "-c", code, "status", "--json"], cwd=repo.root,
                            env=env, stdout=f)
    assert ok.returncode == 0 and json.loads(out.read_text())["timer"] is None
    bad = subprocess.run([sys.executable, "-S", "-c", code, "start"], cwd=repo.root, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 64 and "flowforge:" in bad.stderr


def test_bad_json_says_what_json_says_before_json_is_loaded():
    """The C scanner can only raise its error once json.decoder is imported; a
    fresh process (the timer commands') must still get json's one-line message."""
    code = ("import sys; sys.path.insert(0, %r); import flowforge\n"
            "for text in ('{not json', '{\"a\":', '[1,]', '{} x', ''):\n"
            "    assert 'json.decoder' not in sys.modules or text != '{not json'\n"
            "    try:\n        flowforge.load_json(text)\n"
            "    except ValueError as e:\n        print(e)\n" % ROOT)
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    expected = []
    for text in ('{not json', '{"a":', '[1,]', '{} x', ''):
        try:
            json.loads(text)
        except ValueError as e:
            expected.append(str(e))
    assert proc.stdout.splitlines() == expected


def test_output_that_cannot_be_written_is_one_line_and_exit_73(repo):
    """The command flushes its output itself before exiting without teardown: a
    full disk behind stdout is said, not swallowed; a closed pipe is no error."""
    code = "import sys; sys.path.insert(0, %r); import flowforge; flowforge.run()" % ROOT
    env = repo.env(FLOWFORGE_USER="alice")
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-S", "-c", code, "status"], cwd=repo.root,
                           env=env, stdout=full, stderr=subprocess.PIPE, text=True)
    assert r.returncode == 73, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowforge: ") and "No space left" in lines[0], lines
    head = subprocess.Popen([sys.executable, "-S", "-c", code, "report", "--by", "user,issue"],
                            cwd=repo.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head.stdout.close()   # the reader went away
    assert head.wait(timeout=60) == 0
    assert b"Traceback" not in head.stderr.read()


@pytest.mark.parametrize("argv", [["start", "1", "--at=-" + "9" * 5000 + "m"],
                                  ["log", "1", "9" * 5000 + "m"]], ids=["--at", "log"])
def test_numbers_beyond_any_time_are_one_line(repo, argv):
    r = repo(*argv)
    assert r.rc == 64 and r.err.count("\n") == 1 and "not valid" in r.err, r


def _parse_issue_by_patterns(text):
    """parse_issue as it was written with regular expressions."""
    text = (text or "").strip()
    number = text[1:] if text[:1] == "#" else text
    if number.isascii() and number.isdigit() and len(number) <= 12:
        return str(int(number))
    m = re.fullmatch(r"^([A-Za-z0-9_.-]{1,100}/[A-Za-z0-9_.-]{1,100})#([0-9]{1,12})$", text)
    if m and not m.group(1).startswith((".", "-")) and not any(
            part.strip(".") == "" for part in m.group(1).split("/")):
        return "%s#%d" % (m.group(1), int(m.group(2)))
    m = re.fullmatch(r"^([A-Za-z][A-Za-z0-9_]{0,19})-([0-9]{1,12})$", text)
    if m:
        return "%s-%d" % (m.group(1).upper(), int(m.group(2)))
    return None


def test_issue_references_are_parsed_by_hand_as_the_patterns_parsed_them():
    rng = random.Random(12)
    alphabet = "aZ09#/-._ x\n\u0663é"
    seeds = ["acme/app#12", "ABC-12", "acme/.github#3", "a/..#1", "-x/y#1", ".x/y#2", "#12",
             "x" * 100 + "/y#1", "x" * 101 + "/y#1", "a" * 20 + "-1", "a" * 21 + "-1", "ab_c-007",
             "o/r#" + "9" * 12, "o/r#" + "9" * 13, "K-" + "1" * 13, " OPS-1 ", "a/b/c#1", "1-2"]
    for _ in range(60000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
        if rng.random() < 0.6:
            seed = rng.choice(seeds)
            cut = rng.randint(0, len(seed))
            text = seed[:cut] + text[:rng.randint(0, 2)] + seed[cut + rng.randint(0, 1):]
        expected = _parse_issue_by_patterns(text)
        try:
            got = ff.parse_issue(text)
        except ff.FlowForgeError:
            got = None
        assert got == expected, repr(text)
    for seed in seeds:
        try:
            got = ff.parse_issue(seed)
        except ff.FlowForgeError:
            got = None
        assert got == _parse_issue_by_patterns(seed), seed


def test_a_timer_on_a_key_or_repository_issue_does_not_import_re(tmp_path, pycache):
    """`start ABC-12` and `start acme/app#3` stay on the hot path."""
    import subprocess
    import sys
    from conftest import ROOT, clean_env, make_git_repo
    root = make_git_repo(str(tmp_path / "r"))
    env = clean_env(FLOWFORGE_USER="alice", HOME=str(tmp_path))
    launcher = [sys.executable, "-S", "-X", "pycache_prefix=" + pycache, "-c",
                "import sys; sys.path.insert(0, %r); import flowforge; code = flowforge.main(); "
                "print('re' in sys.modules, file=sys.stderr); sys.exit(code)" % ROOT]
    assert subprocess.run(launcher + ["init", "--timezone", "UTC"], cwd=root, env=env,
                          capture_output=True).returncode == 0
    for issue in ("ABC-12", "acme/app#3"):
        for argv in (["start", issue], ["stop"]):
            proc = subprocess.run(launcher + argv, cwd=root, env=env, capture_output=True, text=True)
            assert proc.returncode == 0, proc
            assert proc.stderr.strip().endswith("False"), (argv, proc.stderr)


# -- the hook's path: no re, no signal (enum), no hashlib, no shutil, no datetime -------------

def test_the_pre_commit_hook_imports_only_what_it_uses(repo):
    """`hook pre-commit` with a changed day (it aggregates and commits to the ledger)
    runs without the modules that cost a commit milliseconds; it still aggregates."""
    repo.ok("log", "7", "5m", "--date", "2026-11-18", env={"FLOWFORGE_NOW": "1795172400"})
    repo.ok("aggregate", env={"FLOWFORGE_NOW": "1795172400"})
    repo.ok("log", "7", "25m", "--date", "2026-11-19", env={"FLOWFORGE_NOW": "1795172400"})
    code = ("import sys; sys.path.insert(0, %r); import flowforge; "
            "rc = flowforge.main(['hook', 'pre-commit']); "
            "print('heavy:', *[m for m in %r + ('signal', 'shutil', 'threading') "
            "if m in sys.modules]); sys.exit(rc)" % (ROOT, HEAVY))
    env = repo.env(FLOWFORGE_USER="alice", FLOWFORGE_NOW="1795172400")
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=repo.root, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc
    assert proc.stdout.splitlines()[-1] == "heavy:", proc.stdout
    doc = repo.ok("report", "--json", "--no-aggregate", env={"FLOWFORGE_NOW": "1795172400"}).json
    assert doc["total_seconds"] == 30 * 60


def test_shard_sha_is_the_regular_expression():
    """shard_sha_span, written by hand, finds what `"sha256":"([0-9a-f]{64})"` finds."""
    pattern = re.compile(rb'"sha256":"([0-9a-f]{64})"')
    rng = random.Random(64)
    good = b"%064x" % rng.getrandbits(256)
    pieces = [b'"sha256":"', good, b'"', b"a", b"F", b'"sha256":""', b"{", b'\\"', b"0" * 63, b":"]
    for _ in range(20000):
        raw = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        m = pattern.search(raw)
        assert ff.shard_sha_span(raw) == (m.span(1) if m else None), raw
        assert ff.shard_sha(raw) == (m.group(1).decode() if m else None)
    data = ff.render_shard("alice", "0123456789", "2026-11", "day", "UTC",
                           {("2026-11-02", 'say "sha256":"x"', ""): 60})
    assert ff.shard_sha(data) == pattern.search(data).group(1).decode()
    assert ff.verify_shard_bytes(data)["rows"] == [["2026-11-02", 'say "sha256":"x"', "", 60]]


def test_quick_args_never_disagrees_with_argparse_on_any_command():
    """Random lines of every command's own words (its flags, their choices, numbers,
    text): wherever quick_args answers, it answers what argparse does."""
    rng = random.Random(1414)
    answered = set()
    for spec in ff.COMMANDS:
        words = [spec.name, "--json", "-q", "12", "x", "2.5", "-1", "0", "9:00", "2026-11-20"]
        for flags, kwargs in spec.arguments:
            words += [f for f in flags if f.startswith("-")] + list(kwargs.get("choices") or [])
        for _ in range(150):
            argv = [spec.name] + [rng.choice(words) for _ in range(rng.randint(0, 4))]
            quick = ff.quick_args(argv)
            if quick is None:
                continue
            try:
                expected = _argparse(argv)
            except (ff.FlowForgeError, SystemExit):
                expected = "an argparse error"
            assert vars(quick) == expected, argv
            answered.add(spec.name)
    assert {"start", "stop", "status", "aggregate"} <= answered


# -- the fast start: the timer commands on the part of the module they use -----------

def _fast_part(tmp_path, damage=None):
    """The fast part of flowforge.py run in a module of its own, and that module
    ready to complete itself from the rest, as the launcher leaves it (the
    rest's bytes as `damage` makes them, after the launcher's check)."""
    import marshal
    import types
    import zlib
    with open(ff.__file__, "rb") as f:
        fast, rest = ff.fast_start_parts(f.read(), ff.__file__)
    (tmp_path / "rest").write_bytes(damage(rest) if damage else rest)
    module = types.ModuleType("flowforge")
    module.__file__ = ff.__file__
    exec(marshal.loads(fast), module.__dict__)
    module._rest_of_module = (open(tmp_path / "rest", "rb"), len(rest), zlib.crc32(rest))
    return module, len(fast), len(rest)


def _code_objects(code):
    yield code
    for const in code.co_consts:
        if isinstance(const, type(code)):
            yield from _code_objects(const)


def test_the_fast_part_is_closed_and_completes_to_the_whole_module(tmp_path):
    """Read from its bytecode, not from the analysis that made it: every global
    name the fast part's code loads is bound in it (or a builtin, or a boundary
    that leaves it); the rest rebinds nothing of it but the boundary stubs; and
    once complete the module has every definition the whole module has, from the
    same lines, with the same defaults, and the commands in the same order."""
    import builtins
    import dis
    module, fast_bytes, rest_bytes = _fast_part(tmp_path)
    assert fast_bytes < (fast_bytes + rest_bytes) / 2   # else the fast start is pointless
    fast_names = dict(module.__dict__)
    for name in ff.FAST_BOUNDARY:
        assert fast_names[name].__qualname__.startswith("_leaving_fast_part")
    codes = []
    for value in fast_names.values():
        members = vars(value).values() if isinstance(value, type) else [value]
        for member in members:
            member = getattr(getattr(member, "__func__", member), "fget", member)
            if hasattr(member, "__code__"):
                codes += _code_objects(member.__code__)
    loaded = {i.argval for code in codes for i in dis.get_instructions(code)
              if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    missing = {n for n in loaded if n not in fast_names and not hasattr(builtins, n)}
    assert missing == set(), missing
    assert "build_report" not in fast_names and "Aggregator" not in fast_names
    assert module.__getattr__("build_report") is module.build_report   # a plugin's flowforge.X
    assert module._rest_of_module is None
    for name, value in fast_names.items():
        if name not in ff.FAST_BOUNDARY + ("_rest_of_module",) and not name.startswith("__") \
                and type(value) is not module._LazyModule:   # (which replaces itself when used)
            assert module.__dict__[name] is value, name   # the rest rebound it
    whole = {n: v for n, v in vars(ff).items() if not n.startswith("__") and n not in ("json", "re")}
    assert set(whole) <= set(module.__dict__)
    for name, value in whole.items():
        mine = module.__dict__[name]
        if mine is None or value is None:
            continue   # a cache this process filled in (`global NAME` in a function)
        assert type(mine).__qualname__ == type(value).__qualname__, name
        if hasattr(value, "__code__"):
            assert (mine.__code__.co_firstlineno, mine.__qualname__) == \
                (value.__code__.co_firstlineno, value.__qualname__), name
            assert repr(mine.__defaults__) == repr(value.__defaults__), name
        elif isinstance(value, type) and value.__module__ == "flowforge":
            assert sorted(vars(mine)) == sorted(vars(value)), name
        elif isinstance(value, (int, str, bytes, tuple, frozenset)):
            assert mine == value, name
    assert [c.name for c in module.COMMANDS] == [c.name for c in ff.COMMANDS]
    assert all(c.func is module.__dict__["cmd_" + c.name.replace("-", "_")] for c in module.COMMANDS)


def _whole(module):
    """The module completed itself into the whole one (its definitions, from the same lines)."""
    assert module._rest_of_module is None
    for name, value in vars(ff).items():
        if callable(value) and hasattr(value, "__code__") and not name.startswith("__"):
            assert module.__dict__[name].__code__.co_firstlineno == value.__code__.co_firstlineno, name
    assert [c.name for c in module.COMMANDS] == [c.name for c in ff.COMMANDS]


@pytest.mark.parametrize("damage", [lambda b: b[:-5000], lambda b: b[:100] + b"\xff" + b[101:],
                                    lambda b: b"", lambda b: b"\x00" * len(b), "huge"],
                         ids=["torn", "one byte", "empty", "zeros", "a huge length"])
def test_a_rest_damaged_after_the_launchers_check_is_compiled_from_the_source(tmp_path, damage):
    """The launcher checks the header and the fast part; the rest is read later,
    when something asks for it.  Torn, a byte changed, emptied or zeroed by
    then, it is not half run: the module completes from flowforge.py itself."""
    module, _, _ = _fast_part(tmp_path, None if damage == "huge" else damage)
    if damage == "huge":   # a header claiming more than any file holds
        cache, _, crc = module._rest_of_module
        module._rest_of_module = (cache, 10 ** 30, crc)
    assert "build_report" not in module.__dict__
    assert callable(module.__getattr__("build_report"))
    _whole(module)


def test_what_a_plugin_sets_before_the_module_completes_stays(tmp_path, monkeypatch):
    """A plugin's `flowforge.NAME = ...` for a name of the rest, before anything
    completed the module, is what the module has after it (as it would be on
    the whole module); dir() and `from flowforge import *` see the whole module."""
    import sys
    module, _, _ = _fast_part(tmp_path)
    assert "enqueue_sync" not in module.__dict__ and "build_report" not in module.__dict__

    def dry_run(*args, **kwargs):
        return None
    module.enqueue_sync = dry_run
    module.build_parser = dry_run   # a boundary stub replaced by a plugin: the plugin's too
    module.__getattr__("build_report")
    assert module.enqueue_sync is dry_run and module.__dict__["enqueue_sync"] is dry_run
    assert module.build_parser is dry_run
    assert {n for n in vars(ff) if not n.startswith("__")} <= set(module.__dict__)
    for check in ("dir", "star"):
        (tmp_path / check).mkdir()
        module, _, _ = _fast_part(tmp_path / check)
        if check == "dir":
            assert "build_report" in dir(module)
        else:
            monkeypatch.setitem(sys.modules, "flowforge", module)
            names = {}
            exec("from flowforge import *", names)
            assert "build_report" in names and "Aggregator" in names
        _whole(module)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """FlowForge installed with install.sh, as a user would."""
    from conftest import clean_env
    prefix = tmp_path_factory.mktemp("prefix")
    subprocess.run([os.path.join(ROOT, "install.sh"), "--prefix", str(prefix)], check=True,
                   capture_output=True, env=clean_env())
    return prefix


PROBE = """import flowforge
PLUGIN_API = 1
NAME = "probe"


def on_stop(entry, config):
    with open(config["out"], "a") as f:
        f.write("%s %s\\n" % (type(flowforge.build_report).__name__, sorted(entry)))
"""

FAST_SCENARIO = [
    ["status"], ["start", "12", "--at", "-15m", "--note", "x"], ["status"], ["status", "--json"],
    ["switch", "13", "--project", "web", "--at", "-5m"], ["pause"], ["resume"], ["stop"],
    ["log", "7", "30m"], ["log", "7", "-1h"], ["cancel"], ["start"], ["stop", "--bogus"],
    ["start", "--help"], ["-q", "start", "1", "--at", "-3m"], ["stop", "--json"],
    ["entries", "--json"], ["report", "--by", "issue"],
]


def _run_scenario(launcher, root, env, out):
    seen = []
    for step, argv in enumerate(FAST_SCENARIO):
        e = dict(env, FLOWFORGE_NOW=str(1795172400 + 60 * step))
        proc = subprocess.run([launcher] + argv, cwd=root, env=e, capture_output=True, text=True)
        seen.append((argv, proc.returncode, proc.stdout, proc.stderr))
    seen = [tuple(re.sub(r"\d{8}-[0-9a-f]{8,16}", "ID", str(x)).replace(root, "ROOT") for x in row)
            for row in seen]
    return seen, out.read_text().splitlines()


def test_installed_timer_commands_start_fast_and_answer_as_the_whole_module(installed, tmp_path):
    """The same day's commands twice, through the installed launcher: once with
    its fast-start cache, once without (the whole module, as before it): the
    same output, errors and exit codes, argparse's answers included, and a
    plugin (those installed beside the module too, which ask for names of the
    rest as they are imported) gets what it asks for.  No timer command imports
    the module through the import system; every other command does."""
    from conftest import clean_env, make_git_repo
    launcher = str(installed / "bin" / "flowforge")
    cache = installed / "lib" / "flowforge" / "__pycache__" / "flowforge.fast-start"
    assert cache.read_bytes().startswith(ff.FAST_START_FORMAT + b" ")
    results = {}
    for kind in ("fast", "whole"):
        root = make_git_repo(str(tmp_path / kind))
        env = clean_env(HOME=str(tmp_path / ("home-" + kind)), FLOWFORGE_USER="alice",
                        FLOWFORGE_PLUGIN_PATH=str(tmp_path / "plugins"))
        (tmp_path / "plugins").mkdir(exist_ok=True)
        (tmp_path / "plugins" / "probe.py").write_text(PROBE)
        subprocess.run([launcher, "init", "--timezone", "Europe/Berlin"], cwd=root, env=env,
                       check=True, capture_output=True)
        out = tmp_path / ("probe-" + kind)
        out.write_text("")
        config_path = os.path.join(root, ".flowforge", "config.json")
        config = json.load(open(config_path))
        config["plugins"] = {"probe": {"out": str(out)}}
        json.dump(config, open(config_path, "w"))
        if kind == "fast":
            traced = subprocess.run([launcher, "status"], cwd=root, capture_output=True, text=True,
                                    env=dict(env, PYTHONPROFILEIMPORTTIME="1"))
            assert traced.returncode == 0 and "| flowforge\n" not in traced.stderr, traced.stderr
            traced = subprocess.run([launcher, "entries"], cwd=root, capture_output=True, text=True,
                                    env=dict(env, PYTHONPROFILEIMPORTTIME="1"))
            assert traced.returncode == 0 and "| flowforge\n" in traced.stderr
        else:
            cache.rename(str(cache) + ".away")
        try:
            results[kind] = _run_scenario(launcher, root, env, out)
        finally:
            if kind == "whole":
                os.rename(str(cache) + ".away", cache)
    (fast, fast_probe), (whole, whole_probe) = results["fast"], results["whole"]
    for mine, theirs in zip(fast, whole):
        assert mine == theirs
    assert [int(rc) for _, rc, _, _ in fast] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 1, 64, 64, 0, 0, 0, 0,
                                                 0], fast
    assert "usage: flowforge start" in fast[13][2]
    assert len(fast_probe) == 3 and all(line.startswith("function [") for line in fast_probe)
    assert whole_probe == fast_probe


def test_a_stale_or_damaged_fast_start_cache_imports_the_whole_module(installed, tmp_path):
    """A flowforge.py changed after the install (another mtime or size), a cache
    torn short, or one full of garbage: the launcher imports the whole module,
    and the command answers as ever."""
    from conftest import clean_env, make_git_repo
    launcher = str(installed / "bin" / "flowforge")
    lib = installed / "lib" / "flowforge"
    cache = lib / "__pycache__" / "flowforge.fast-start"
    source = lib / "flowforge.py"
    good, stat = cache.read_bytes(), source.stat()
    root = make_git_repo(str(tmp_path / "repo"))
    env = clean_env(HOME=str(tmp_path / "home"), FLOWFORGE_USER="alice", PYTHONPROFILEIMPORTTIME="1")
    subprocess.run([launcher, "init", "--timezone", "UTC"], cwd=root, env=env, check=True,
                   capture_output=True)

    def status():
        proc = subprocess.run([launcher, "status"], cwd=root, env=env, capture_output=True,
                              text=True)
        assert proc.returncode == 0 and "no timer running" in proc.stdout, proc.stderr
        return "| flowforge\n" in proc.stderr   # imported whole

    try:
        assert status() is False
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
        assert status() is True
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert status() is False
        header = good[:good.index(b"\n") + 1]
        fields = header.split(b" ")
        for damaged in (b" ".join(fields[:5] + [b"9" * 30] + fields[6:]) + good[len(header):],
                        good[:len(header) + 1000], header + b"\x00garbage" * 100,
                        header.replace(b"status", b"statu"), b"", good.replace(b"/2 ", b"/1 ", 1),
                        good[:len(header) + 5000] + b"\xff" + good[len(header) + 5001:]):
            cache.write_bytes(damaged)
            assert status() is True
        # the rest torn or changed: the fast part runs, and what needs the rest
        # (argparse's answer to a mistake) gets it from the source
        for damaged in (good[:-5000], good[:-5000] + b"\xff" + good[-4999:]):
            cache.write_bytes(damaged)
            assert status() is False
            proc = subprocess.run([launcher, "stop", "--bogus"], cwd=root, env=env,
                                  capture_output=True, text=True)
            assert proc.returncode == 64 and "unrecognized arguments" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
    finally:
        cache.write_bytes(good)
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert status() is False


def test_the_reach_cache_answers_as_reading_every_file(repo):
    """entries_near with the reach cache -- warm, and after each change: entries
    across midnight, edits that move an entry over it, deletes, a new time
    zone, a file touched by hand, a damaged cache, a file changed in place or
    replaced with its size and mtime kept, crc-valid lines of what is not an
    entry, a torn last line -- gives, for every range of days, the entries with
    time in it that reading every file gives, and never a traceback."""
    from conftest import call
    rng = random.Random(11)
    env = {"FLOWFORGE_NOW": "2026-12-01T12:00:00Z"}
    first = date(2026, 11, 1)
    days = [(first + timedelta(days=n)).isoformat() for n in range(20)]

    def log_some(count):
        for _ in range(count):
            start = datetime(2026, 11, 1, 6) + timedelta(days=rng.randrange(18),
                                                        minutes=rng.randrange(0, 18 * 60, 7))
            end = start + timedelta(minutes=rng.choice([20, 45, 90, 300, 600]))
            r = call(repo.root, "log", str(rng.randrange(1, 9)), "--start",
                     start.strftime("%Y-%m-%d %H:%M"), "--end", end.strftime("%Y-%m-%d %H:%M"),
                     "--json", env=env)
            assert r.rc in (0, 65), r   # 65: overlaps an earlier one, refused

    def entries():
        return [e for day in days for e in call(repo.root, "entries", "--date", day, "--json",
                                                env=env).json["entries"]]

    def check():
        ff_repo = ff.Repo(repo.root)
        cached, plain = ff.PrivateStore(ff_repo, "alice"), ff.PrivateStore(ff_repo, "alice")
        plain.reach_path = None
        split = plain.clock.split
        for low in days:
            for span in (0, 1, 3):
                high = min(days[-1], (date.fromisoformat(low) + timedelta(days=span)).isoformat())
                seen = []
                for store in (cached, plain):
                    near = store.entries_near(low, high)
                    seen.append({i: entry for i, (_, entry) in near.items()
                                 if any(low <= d <= high for d, _ in ff.entry_parts(entry, split))})
                assert seen[0] == seen[1], (low, high)
        return os.path.join(repo.root, ".flowforge", "state", "cache", "reach", "alice.rec")

    log_some(60)
    check()
    reach = check()   # warm: the cache answers
    assert os.path.getsize(reach) > 0
    for _ in range(3):
        log_some(10)
        check()
        late = [e for e in entries() if e.get("segments")]
        moved = rng.choice(late)
        end = moved["segments"][-1][1] + rng.choice([3600, 6 * 3600])
        call(repo.root, "edit", moved["id"], "--end",
             datetime.fromtimestamp(end, ff.load_timezone("UTC")).strftime("%Y-%m-%d %H:%M"),
             "--allow-overlap", env=env)
        check()
        call(repo.root, "delete", rng.choice(late)["id"], env=env)
        check()
    for zone in ("Asia/Tokyo", "America/Los_Angeles"):   # days ahead, then behind the files'
        assert call(repo.root, "init", "--timezone", zone, env=env).rc == 0
        check()
    daily = os.path.join(repo.root, ".flowforge", "user", "alice", "time", "daily")
    for name in sorted(os.listdir(daily))[::3]:
        path = os.path.join(daily, name)
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))
    check()
    with open(reach, "r+b") as f:
        raw = f.read()
        f.seek(len(raw) // 2)
        f.write(b"garbage\n")
    check()
    lines = open(reach, "rb").read().splitlines()
    assert len(lines) <= 2 * ff.PrivateStore.REACH_DAYS_KEPT   # rewritten with the newest files

    # A day file the cache stands for, changed without changing its size or
    # mtime: an entry's end moved by a few seconds (the same digits), the file
    # rewritten in place or replaced, its mtime set back.
    def cached_days():
        notes = []
        for line in open(reach, "rb").read().splitlines():
            try:
                notes.append(ff.decode_record(line)["reach"])
            except ValueError:
                continue   # the garbage above, if no rewrite has dropped it yet
        last = {n[0]: n for n in notes}   # (a file's last line is the one that counts)
        return {day: [i for i, e in n[-1].items() if e.get("segments")] for day, n in last.items()
                if any(e.get("segments") for e in n[-1].values())}
    for replace in (False, True):
        day, reaching = sorted(cached_days().items())[-1]   # an entry the cache holds
        path = os.path.join(daily, day + ".jsonl")
        old, st = open(path, "rb").read(), os.stat(path)
        records = [ff.decode_record(line) for line in old.splitlines()]
        moved = next(r for r in records if r["id"] in reaching and r.get("segments")
                     and r["segments"][-1][1] % 100 < 90)
        moved["segments"][-1][1] += 7
        new = b"".join(ff.encode_record(r) for r in records)
        assert len(new) == len(old) and new != old
        if replace:
            with open(path + ".new", "wb") as f:
                f.write(new)
            os.replace(path + ".new", path)
        else:
            with open(path, "r+b") as f:
                f.write(new)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
        store = ff.PrivateStore(ff.Repo(repo.root), "alice")
        other = next(d for d, _ in ff.entry_parts(moved, store.clock.split) if d != day)
        assert store.entries_near(other, other)[moved["id"]][1]["segments"] == moved["segments"]
        check()
    # crc-valid lines of what is not an entry, or of another schema, for a file
    # as it is: ignored (read again), never a crash; then a torn last line: the
    # next note rewrites the cache rather than joining it
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1))
    st = os.stat(path)   # (no line of the cache is for the file as it is now)
    key = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, "America/Los_Angeles"]
    entry_id = ff.decode_record(open(path, "rb").read().splitlines()[0])["id"]
    with open(reach, "ab") as f:
        for entries, schema in (({entry_id: {"id": entry_id, "op": "entry", "segments": 5}}, 1),
                                ({entry_id: {"id": entry_id, "op": "entry", "issue": "1",
                                             "segments": [[1, 0]]}}, 1),
                                ({entry_id: [1]}, 1), ({"x": {"id": "y"}}, 1), ({}, 2)):
            f.write(ff.encode_record({"reach": [day] + key + [entries], "schema": schema}))
        f.write(b"0123abcd {\"reach\": [")
    check()
    assert all(ff.decode_record(line) for line in open(reach, "rb").read().splitlines())
    with open(reach, "wb") as f:   # nothing but a torn line
        f.write(b"0123abcd {\"reach\": [")
    check()
    assert all(ff.decode_record(line) for line in open(reach, "rb").read().splitlines())
