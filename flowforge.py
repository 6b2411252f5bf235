#!/usr/bin/env python3
"""FlowForge: git-centric developer time tracking, where TIME = MONEY.

Every minute a developer tracks reaches the team's billing summary exactly once,
even when hooks, daemons, disks, networks and people fail.  This is one file,
Python 3.9+ standard library only: copy it into a repository and run it.

Quick start (in a git work tree)
    python3 flowforge.py init                    # creates .flowforge/; safe to run twice
    python3 flowforge.py start 123 --note "login bug"
    python3 flowforge.py pause                   # ... resume, switch 124, cancel
    python3 flowforge.py stop
    python3 flowforge.py log 124 1h30m --date 2026-11-20
    python3 flowforge.py install hooks           # commits aggregate, pushes carry the ledger
    git add .flowforge && git commit -m "Track time"
    python3 flowforge.py report --by user,issue  # on any clone after `flowforge fetch`
    python3 flowforge.py bill --month 2026-11

Where the data lives
    .flowforge/config.json      team config (committed): rates, rounding, granularity
    refs/flowforge/stores/<user>--<store>    the ledger: one git ref per private
        store, off the code branches, linear; its commits hold
        summaries/<YYYY-MM>.json (monthly shards with a sha256) and
        audit/<YYYY>.jsonl (the hash-chained team audit records)
    .flowforge/user/<name>/     private, git-ignored, 0700: timers, entries, notes
    .flowforge/state/           per machine, git-ignored: locks, caches, logs
    .flowforge/quarantine/      damaged files set aside, with manifest.json

Exit codes
    0 ok    1 expected failure    64 usage    65 bad data    69 provider unavailable
    73 cannot create    75 temporary (lock held)    77 permission    78 bad config

Plugins (one stdlib-only .py file each; PLUGIN_API = 1; see section 9 and
plugins/README.md) define any of these hooks, called with keyword arguments:
    on_start(repo, user, timer, config)        a timer started
    on_stop(repo, user, entry, config)         a timer stopped, its entry recorded
    on_aggregate(repo, user, store, written, issues, config)   shards changed
    sync(repo, issue, config, job, http, state)   a queued job: talk to the provider
    health(repo, config)                       `plugins check`: None or a problem
They raise RetryLater(after=seconds) or PermanentFailure(message) from sync.

Stability: the command line, the exit codes and the on-disk formats (each
carries a "schema" number that is checked on read) are the public interface.
Functions in this file may change between versions.

Sections, in dependency order (each leans only on the ones above it):
    1. Constants and errors
    2. Small utilities: clock, time zones, parsing, canonical JSON, checksums, git
    3. Atomic I/O and locks
    4. Layout, config, identity and quarantine
    5. Private store, mirror and timers
    6. Audit chain
    7. Shards
    8. The ledger: one git ref per private store
    9. Aggregation
    10. Retry queue
    11. Plugins (the hook table is there)
    12. Hooks, daemon and health
    13. Recovery and import
    14. Reports and billing
    15. Command line
    16. Fast start
"""

import errno
import os
import sys

# Run as a script (`python3 flowforge.py`, the daemon, cron, systemd, launchd,
# the pre-commit framework), the script's directory -- the repository's top --
# is first on sys.path, and an empty PYTHONPATH entry adds the current one: a
# teammate's zlib.py or datetime.py committed there must never be imported
# instead of the standard library's.  (The hook shim does the same for -c.)
if __name__ == "__main__":
    _here = {os.path.dirname(os.path.realpath(__file__)), os.path.realpath(".")}
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") not in _here]

import time  # noqa: E402
import zlib  # noqa: E402
from _thread import get_ident as _thread_ident  # noqa: E402


class _LazyModule:
    """A standard module imported when first used.  The timer commands must
    start near the interpreter's own start-up time, and `re` (with the enum and
    functools it pulls in) costs them ~8 ms and `json` ~3 ms more; the commands
    that need them pay on first use, once: the real module then replaces this
    stand-in in the globals."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        module = __import__(self._name)
        globals()[self._name] = module
        return getattr(module, attr)


json = _LazyModule("json")
re = _LazyModule("re")

if __name__ == "__main__":
    # One module identity even when run as a script, so that code doing
    # `import flowforge` (plugins, tests) gets this module, not a second copy.
    sys.modules.setdefault("flowforge", sys.modules[__name__])


# ############################################################################
# 1. Constants and errors
# ############################################################################

VERSION = "0.2.0"   # 0.2: team time in the ledger (store refs); 0.1 kept it in .flowforge/team/

EXIT_OK = 0
EXIT_FAIL = 1          # an expected failure; the message says what to do
EXIT_USAGE = 64        # bad command line or argument
EXIT_DATA = 65         # bad or damaged data
EXIT_UNAVAILABLE = 69  # a provider or facility is unavailable
EXIT_CANTCREAT = 73    # cannot write (disk full, file too large, I/O error)
EXIT_TEMPFAIL = 75     # try again later (lock held)
EXIT_NOPERM = 77       # permission denied
EXIT_CONFIG = 78       # bad configuration

MAX_ENTRY_SECONDS = 24 * 3600  # one entry longer than a day is a forgotten timer
# Clock times a record may hold: 1970 to the end of 9999, the years dates have.
# A record beyond them, or longer than a shard row may hold (MAX_ROW_SECONDS;
# no writer makes one longer than a day), is damaged: a segment to the year
# 10**22, written by hand with a valid crc, had every command that splits it
# into days run for ever, and one to 9999 took 26 s of every `status`.
LAST_SECOND = 253402300799
# An entry's time lies on local days at most this far from the day file that
# holds it (the day in its id), so that "the time on day D" reads a few files.
REACH_DAYS = 2   # timers, logs and imports stay within it by construction
# What a shard read from a teammate's commit may hold, before it is believed:
# a row of more than a year of seconds, or a name longer than any issue
# reference, is garbage or an attack, not time to bill.
MAX_ROW_SECONDS = 366 * 86400
MAX_NAME_CHARS = 1000
MAX_SHARD_BYTES = 4 << 20       # a month of 500 issues every day is under 1 MB
MAX_CHAIN_BYTES = 64 << 20      # a year of aggregations is well under 1 MB
MAX_CONFIG_BYTES = 1 << 20
MAX_TREE_BYTES = 16 << 20       # a ledger directory: ~40 bytes per month
FUTURE_TOLERANCE = 60          # seconds of clock skew accepted for "now"
# Times outside 1970..2999 are typos or garbage (and overflow the date functions).
EPOCH_LIMITS = (0, 32503680000)
NOTE_MAX = 2000

# On-disk format versions.  A reader refuses a newer version instead of misreading it.
CONFIG_SCHEMA = 1
USER_SCHEMA = 2   # 2: day files are named in time/changed before they change
TIMER_SCHEMA = 1
RECORD_SCHEMA = 1
SHARD_SCHEMA = 1
AGGSTATE_SCHEMA = 2   # 2: a header and a part per year (1: one file)
QUARANTINE_SCHEMA = 1


class FlowForgeError(Exception):
    """An expected failure: `main` prints the message on one line and exits."""

    def __init__(self, message, exit_code=EXIT_FAIL):
        super().__init__(message)
        self.exit_code = exit_code


class LockBusy(FlowForgeError):
    def __init__(self, message):
        super().__init__(message, EXIT_TEMPFAIL)


class CorruptFile(FlowForgeError):
    """A file failed to parse, validate or match its checksum."""

    def __init__(self, path, reason):
        super().__init__("%s: %s" % (path, reason), EXIT_DATA)
        self.path = path
        self.reason = reason


class StorageError(FlowForgeError):
    """A write that the disk refused (full, too large, read-only, I/O error)."""

    EXIT_CODES = {errno.EACCES: EXIT_NOPERM, errno.EPERM: EXIT_NOPERM, errno.EROFS: EXIT_NOPERM,
                  errno.ELOOP: EXIT_NOPERM}

    def __init__(self, path, error):
        what = "refusing the symbolic link" if error.errno == errno.ELOOP else "cannot write"
        super().__init__("%s %s: %s" % (what, path, error.strerror or error),
                         self.EXIT_CODES.get(error.errno, EXIT_CANTCREAT))
        self.errno = error.errno


# ############################################################################
# 2. Small utilities: clock, time zones, parsing, canonical JSON, checksums, git
# ############################################################################

class Pattern:
    """A regular expression compiled on first use (see _LazyModule: the timer
    commands never import `re`).  After that its methods are plain attributes."""

    def __init__(self, source):
        self.source = source

    def __getattr__(self, name):
        compiled = re.compile(self.source)
        for method in ("match", "fullmatch", "search", "sub", "finditer", "findall", "split"):
            setattr(self, method, getattr(compiled, method))
        return getattr(compiled, name)


def now():
    """Current time in integer epoch seconds.

    FLOWFORGE_NOW (epoch seconds or ISO-8601 with offset) pins the clock, for
    reproducible tests and demos."""
    pinned = os.environ.get("FLOWFORGE_NOW")
    if pinned:
        if pinned.lstrip("-").isdigit():
            return int(pinned)
        return parse_time(pinned, _utc(), int(time.time()))
    return int(time.time())


def _utc():
    from datetime import timezone
    return timezone.utc


def utc_year(ts):
    """The year (a number) of epoch second `ts` in UTC."""
    return time.gmtime(ts).tm_year


def load_timezone(name):
    """A zoneinfo time zone by IANA name; a bad name is a configuration error."""
    from zoneinfo import ZoneInfo
    try:
        if not name or name.startswith(("/", ".")) or ".." in name:
            raise ValueError(name)
        return ZoneInfo(name)
    except Exception:
        raise FlowForgeError("unknown time zone %r (use an IANA name such as "
                             "Europe/Berlin)" % name, EXIT_CONFIG)


def system_timezone_name():
    """The machine's IANA zone name: $TZ, else /etc/localtime's target, else UTC."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz and not tz.startswith("/"):
        try:
            load_timezone(tz)
            return tz
        except FlowForgeError:
            pass
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            name = target.split("zoneinfo/", 1)[1]
            load_timezone(name)
            return name
    except (OSError, FlowForgeError):
        pass
    return "UTC"


def utc_text(ts):
    """`2026-11-20 09:00:00 UTC`: a time for messages that have no user's zone."""
    from datetime import datetime
    return datetime.fromtimestamp(ts, _utc()).strftime("%Y-%m-%d %H:%M:%S UTC")


def local_date(ts, tz):
    """The calendar date (ISO string) of epoch second `ts` in zone `tz`."""
    from datetime import datetime
    return datetime.fromtimestamp(ts, tz).date().isoformat()


_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_NAME_FIRST = _ALNUM | {"_"}
_NAME_CHARS = _ALNUM | set("._-")
_PROJECT_CHARS = _NAME_CHARS | set(" /")


def spelled(text, first, rest, longest):
    """Whether `text` is a character of `first` and then up to longest - 1 of `rest`:
    the names every command checks, by hand rather than with `re` (see _LazyModule)."""
    return 0 < len(text) <= longest and text[0] in first and rest.issuperset(text[1:])


_VERIFIED_DAYS = {}


class Zone:
    """A time zone by IANA name.  `tzinfo` is its zoneinfo, for datetime arithmetic.
    What the timer commands ask -- an instant's local date and clock, the local day
    around an instant, how long that day is -- the C library's localtime answers
    when it reads the very file zoneinfo reads, without importing datetime and
    zoneinfo (~6 ms, more than half a timer command's budget).  It answers only for
    a day that starts at 00:00:00, lasts 86,400 s and has the same UTC offset from
    the day before to the day after; any other day (a clock change, a skipped
    midnight) is zoneinfo's, which knows folds.  (No zone in the tz database moves
    its clocks and back within three days, tests/test_hot_path.py checks, so equal
    offsets from the day before to the day after mean none moved in between.)"""

    def __init__(self, name):
        self.name = name
        self._tzinfo = None
        self._libc = None
        # the days verified so far, shared by every Zone of the name (they are exact):
        # ISO date -> (first second, first second of the next day), first second ->
        # (first second of the next day, ISO date), and the UTC offsets of those days
        self._spans, self._days, self._offsets = _VERIFIED_DAYS.setdefault(name, ({}, {}, []))

    def __repr__(self):
        return "Zone(%r)" % self.name

    @property
    def tzinfo(self):
        if self._tzinfo is None:
            self._tzinfo = load_timezone(self.name)
        return self._tzinfo

    def _walls(self, *stamps):
        """time.struct_time of each epoch second in this zone by the C library,
        or None where it might not read what zoneinfo reads."""
        if self._libc is None:
            self._libc = self.name == "UTC" or self._same_file()
        threading = sys.modules.get("threading")
        if not self._libc or (threading is not None and threading.active_count() > 1
                              and self.name != "UTC"):
            return None   # (TZ and tzset are process-wide: not while another thread runs)
        if self.name == "UTC":
            return [time.gmtime(ts) for ts in stamps]
        saved = os.environ.get("TZ")
        os.environ["TZ"] = self.name   # restored at once: git and plugins keep the user's TZ
        try:
            time.tzset()
            return [time.localtime(ts) for ts in stamps]
        finally:
            if saved is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = saved
            time.tzset()

    def _same_file(self):
        """Whether the C library's TZ=name and zoneinfo's ZoneInfo(name) read one
        file: /usr/share/zoneinfo/<name>, where both look first unless TZDIR or
        PYTHONTZPATH point elsewhere, and a real zone file (the C library would
        quietly take anything else for UTC)."""
        name = self.name
        if (not hasattr(time, "tzset") or os.environ.get("TZDIR") or os.environ.get("PYTHONTZPATH")
                or not name or name.startswith(("/", ".", "right/")) or ".." in name
                or not spelled(name, _NAME_FIRST, _NAME_CHARS | {"/", "+"}, 200)):
            return False
        try:
            with open(os.path.join("/usr/share/zoneinfo", name), "rb") as f:
                return f.read(4) == b"TZif"
        except OSError:
            return False

    def date_of(self, ts):
        """The local date (ISO string) of epoch second `ts`."""
        walls = self._walls(ts)
        if walls:
            return "%04d-%02d-%02d" % walls[0][:3]
        from datetime import datetime
        return datetime.fromtimestamp(ts, self.tzinfo).date().isoformat()

    def clock_text(self, ts):
        """`2026-11-20 09:30:00`: epoch second `ts` on this zone's clock."""
        walls = self._walls(ts)
        if walls:
            return "%04d-%02d-%02d %02d:%02d:%02d" % walls[0][:6]
        from datetime import datetime
        return datetime.fromtimestamp(ts, self.tzinfo).strftime("%Y-%m-%d %H:%M:%S")

    def day_span(self, ts):
        """(first second, first second of the next day, ISO date) of the local day of `ts`."""
        for offset in self._offsets:   # a day seen before (an aggregation asks ~10^5 times)
            lo = ts - (ts + offset) % 86400
            known = self._days.get(lo)
            if known and ts < known[0]:
                return lo, known[0], known[1]
        walls = self._walls(ts)
        if walls:
            wall = walls[0]
            lo = ts - (wall.tm_hour * 3600 + wall.tm_min * 60 + wall.tm_sec)
            hi = lo + 86400
            before, first, last, after, later = self._walls(lo - 86400, lo, hi - 1, hi, hi + 86400)
            if (first[:6] == wall[:3] + (0, 0, 0) and last[:6] == wall[:3] + (23, 59, 59)
                    and after[3:6] == (0, 0, 0) and len({w.tm_gmtoff for w in (
                        before, first, wall, last, after, later)}) == 1):
                iso = "%04d-%02d-%02d" % wall[:3]
                self._spans[iso] = (lo, hi)
                self._days[lo] = (hi, iso)
                if wall.tm_gmtoff not in self._offsets:
                    self._offsets.append(wall.tm_gmtoff)
                return lo, hi, iso
        from datetime import datetime, timedelta
        day = datetime.fromtimestamp(ts, self.tzinfo).date()
        lo, hi = self._day_start(day), self._day_start(day + timedelta(days=1))
        if not lo <= ts < hi:  # zone data where local days overlap: keep making progress
            lo, hi = ts, max(hi, ts + 1)
        return lo, hi, day.isoformat()

    def day_length(self, day_iso):
        """Seconds in local date `day_iso`: 86400, or 82800 / 90000 on DST days."""
        span = self._spans.get(day_iso)
        if span:
            return span[1] - span[0]
        from datetime import date, timedelta
        day = date.fromisoformat(day_iso)
        return self._day_start(day + timedelta(days=1)) - self._day_start(day)

    def _day_start(self, day):
        """Epoch second at which local date `day` (a datetime.date) begins; where
        midnight does not exist, the day's first instant (fold=0, PEP 495)."""
        from datetime import datetime
        return int(datetime(day.year, day.month, day.day, tzinfo=self.tzinfo).timestamp())


class DayClock:
    """Local calendar days of one Zone, for splitting time at local midnight:
    23- and 25-hour DST days come out right; where midnight does not exist, the
    day starts at its first instant."""

    def __init__(self, zone):
        self.zone = zone
        self._lengths = {}
        self._span = (0, 0, "")

    @property
    def tz(self):
        return self.zone.tzinfo

    def split(self, start, end):
        """[(date ISO string, seconds)] covering [start, end); the parts sum to end - start."""
        lo, hi, iso = self._span
        if not lo <= start < hi:
            lo, hi, iso = self._day_span(start)
        if end <= hi:  # the common case: the whole segment lies in one local day
            return [(iso, end - start)]
        parts = []
        while start < end:
            if not lo <= start < hi:
                lo, hi, iso = self._day_span(start)
            stop = min(end, hi)
            parts.append((iso, stop - start))
            start = stop
        return parts

    def day_length(self, day_iso):
        """Seconds in local date `day_iso`: 86400, or 82800 / 90000 on DST days."""
        length = self._lengths.get(day_iso)
        if length is None:
            length = self._lengths[day_iso] = self.zone.day_length(day_iso)
        return length

    def day_of(self, ts):
        """The local date (ISO string) of epoch second `ts`; cheap for nearby times."""
        lo, hi, iso = self._span
        if lo <= ts < hi:
            return iso
        return self._day_span(ts)[2]

    def _day_span(self, ts):
        self._span = self.zone.day_span(ts)
        return self._span


# Time input, as people type it.  One table (TIME_FORMS) is the help text, the
# README's reference and the error message, so the three cannot disagree.
TIME_FORMS = (
    ("now", "this instant"),
    ("9:30, 09:30:15, 9am, 9:30pm, noon", "that time today (with `log --date D`: on D; "
     "with `edit`: on the entry's day)"),
    ("yesterday 17:00, mon 9:00", "that time on that day (mon..sun: the most recent, "
     "today included)"),
    ("2026-11-22 09:30, 2026-11-22T09:30", "that local date and time"),
    ("2026-11-22T09:30+01:00", "an exact instant, with its offset (Z for UTC); also for a "
     "time that DST skips or repeats"),
    ("-15m, -1h30m, 2h ago, 15m ago", "that long before now"),
)
DAY_FORMS = (
    ("today, yesterday", ""),
    ("mon .. sun, monday .. sunday", "the most recent one, today included"),
    ("-3d", "three days ago"),
    ("2026-11-22", "that date"),
)
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_CLOCK = Pattern(r"^(\d{1,2})(?::(\d{2})(?::(\d{2}))?)?\s*(am|pm)?"
                    r"\s*(z|[+-]\d{2}:?\d{2})?$")
_DATE_TIME = Pattern(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2})(?:\.\d+)?)?"
    r"\s*(Z|z|[+-]\d{2}:?\d{2})?)?$")


def _ago(text):
    """The DURATION of `-DURATION` or `DURATION ago` (no spaces inside), or None."""
    if text[:1] == "-" and len(text) > 1 and not _has_space(text):
        return text[1:]
    head = text[:-3] if text.endswith("ago") else ""
    word = head.rstrip()
    if word and len(word) < len(head) and not _has_space(word):
        return word
    return None


def _has_space(text):
    return any(c.isspace() for c in text)


def _days_ago(text):
    """N of `-Nd` (up to 4 digits), or None."""
    digits = text[1:-1]
    if text[:1] == "-" and text[-1:] == "d" and 0 < len(digits) <= 4 and digits.isdecimal():
        return int(digits)
    return None


def is_month(text):
    """`YYYY-MM` in shape (digits as `re`'s \\d); by hand, as in `spelled`."""
    return len(text) == 7 and text[4] == "-" and (text[:4] + text[5:]).isdecimal()


def is_iso_date(text):
    """`YYYY-MM-DD` in shape."""
    return len(text) == 10 and text[7] == "-" and is_month(text[:7]) and text[8:].isdecimal()


def shift_month(month, months):
    """The month `months` after `month` (YYYY-MM; negative: before)."""
    index = int(month[:4]) * 12 + int(month[5:7]) - 1 + months
    return "%04d-%02d" % (index // 12, index % 12 + 1)


def _forms(table):
    return ", ".join(form for form, _ in table)


def _offset_zone(text):
    from datetime import timedelta, timezone
    if text in ("Z", "z"):
        return timezone.utc
    sign = -1 if text[0] == "-" else 1
    digits = text[1:].replace(":", "")
    hours, minutes = int(digits[:2]), int(digits[2:])
    if hours > 23 or minutes > 59:
        raise ValueError(text)
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def local_instant(day, hour, minute, second, tz, raw):
    """Epoch second of a wall-clock time on `day` in zone `tz`.

    A time that the zone skips (the spring-forward gap) or repeats (the autumn
    overlap) has two candidate instants; rather than pick one silently -- an
    hour billed or lost -- both are named and the user gives the offset."""
    from datetime import datetime
    naive = datetime(day.year, day.month, day.day, hour, minute, second)
    first = int(naive.replace(tzinfo=tz, fold=0).timestamp())
    second_ = int(naive.replace(tzinfo=tz, fold=1).timestamp())
    if first == second_:
        return first
    zone = getattr(tz, "key", None) or str(tz)
    options = sorted({first, second_})

    def exact(ts):
        local = datetime.fromtimestamp(ts, tz)
        offset = local.strftime("%z")
        return "%s%s:%s (%s)" % (local.strftime("%Y-%m-%dT%H:%M:%S"), offset[:3], offset[3:],
                                 local.tzname())
    if datetime.fromtimestamp(first, tz).replace(tzinfo=None) == naive:
        what = "happens twice in %s (the clocks go back)" % zone
    else:
        what = "does not exist in %s (the clocks skip it)" % zone
    raise FlowForgeError("time %r %s: it could be %s or %s; give one of those, with its offset"
                         % (raw, what, exact(options[0]), exact(options[1])), EXIT_USAGE)


def parse_day(text, tz, now_ts, what="date"):
    """A day argument (see DAY_FORMS) as a datetime.date, local to `tz`."""
    from datetime import date, datetime, timedelta
    word = (text or "").strip().lower()
    today = datetime.fromtimestamp(now_ts, tz).date()
    if word == "today":
        return today
    if word == "yesterday":
        return today - timedelta(days=1)
    if word[:3] in _WEEKDAYS and word in (word[:3], _WEEKDAY_NAMES[_WEEKDAYS.index(word[:3])]):
        return today - timedelta(days=(today.weekday() - _WEEKDAYS.index(word[:3])) % 7)
    days = _days_ago(word)
    if days is not None:
        return today - timedelta(days=days)
    if is_iso_date(word):
        try:
            return plausible_day(date.fromisoformat(word), text, what)
        except ValueError:
            pass
    raise FlowForgeError("%s %r is not valid: use %s" % (what, text, _forms(DAY_FORMS)),
                         EXIT_USAGE)


def relative_time(text, now_ts):
    """Epoch seconds for `now`, `-15m` or `2h ago`, which need no time zone; None
    for any other form (parse_time's)."""
    lowered = (text or "").strip().lower()
    if lowered == "now":
        return now_ts
    ago = _ago(lowered)
    if ago and _days_ago(lowered) is None:
        try:
            return _plausible(now_ts - parse_duration(ago), text)
        except FlowForgeError as e:
            if e.exit_code != EXIT_USAGE or "out of range" in str(e):
                raise
        except (ValueError, OverflowError):   # digits beyond int(): not a time
            pass
    return None


def parse_time(text, tz, now_ts, base_day=None):
    """Epoch seconds for a time argument (see TIME_FORMS), local to `tz`.

    A time of day alone is on `base_day` (a datetime.date; default today)."""
    from datetime import datetime
    raw = text
    text = (text or "").strip()
    lowered = text.lower()
    try:
        relative = relative_time(raw, now_ts)
        if relative is not None:
            return relative
        m = _DATE_TIME.fullmatch(text)
        if m:
            y, mo, d = int(m.group(1)), int(m.group(2)), int(m.group(3))
            hour, minute, second = (int(m.group(4) or 0), int(m.group(5) or 0), int(m.group(6) or 0))
            if m.group(7):
                ts = int(datetime(y, mo, d, hour, minute, second,
                                  tzinfo=_offset_zone(m.group(7))).timestamp())
                return _plausible(ts, raw)
            from datetime import date
            return _plausible(local_instant(date(y, mo, d), hour, minute, second, tz, raw), raw)
        day_word, _, clock = lowered.partition(" ")
        clock = clock.strip()
        if not clock or _CLOCK.fullmatch(day_word) or day_word in ("noon", "midnight"):
            day, clock = base_day, lowered  # a time of day alone
        else:
            day = parse_day(day_word, tz, now_ts)
        if day is None:
            day = datetime.fromtimestamp(now_ts, tz).date()
        clock = {"noon": "12:00", "midnight": "0:00"}.get(clock, clock)
        m = _CLOCK.fullmatch(clock)
        if m and (m.group(2) is not None or m.group(4)):
            hour, minute, second = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
            if m.group(4):
                if not 1 <= hour <= 12:
                    raise ValueError(raw)
                hour = hour % 12 + (12 if m.group(4) == "pm" else 0)
            if hour > 23 or minute > 59 or second > 59:
                raise ValueError(raw)
            if m.group(5):
                local = datetime(day.year, day.month, day.day, hour, minute, second,
                                 tzinfo=_offset_zone(m.group(5)))
                return _plausible(int(local.timestamp()), raw)
            return _plausible(local_instant(day, hour, minute, second, tz, raw), raw)
    except (ValueError, OverflowError):
        pass
    except FlowForgeError as e:
        if "not valid" not in str(e):  # out of range, or a DST gap/overlap: say that
            raise
    raise FlowForgeError("time %r is not valid: use %s" % (raw, _forms(TIME_FORMS)), EXIT_USAGE)


def plausible_time(ts):
    """Whether epoch second `ts` lies within EPOCH_LIMITS (False for NaN)."""
    return EPOCH_LIMITS[0] <= ts < EPOCH_LIMITS[1]


def _plausible(ts, raw):
    if not plausible_time(ts):
        raise FlowForgeError("time %r is out of range (1970 to 2999)" % raw, EXIT_USAGE)
    return ts


_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def epoch_day(day_iso):
    """Days from 1970-01-01 to the valid ASCII date `day_iso` of years 1970-2999,
    else None: the timer commands' date arithmetic, without importing datetime."""
    if not (is_iso_date(day_iso) and day_iso.isascii() and "1970" <= day_iso[:4] <= "2999"):
        return None
    year, month, day = int(day_iso[:4]), int(day_iso[5:7]), int(day_iso[8:])
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= month <= 12 or not 1 <= day <= _MONTH_DAYS[month - 1] + (leap and month == 2):
        return None
    before = year - 1   # leap days before this year, less the 477 before 1970
    days = 365 * (year - 1970) + before // 4 - before // 100 + before // 400 - 477
    return days + sum(_MONTH_DAYS[:month - 1]) + (leap and month > 2) + day - 1


def shift_day(day_iso, days):
    """The ISO date `days` after (or before, if negative) `day_iso`; clamped
    to the calendar's ends rather than overflowing."""
    number = epoch_day(day_iso)
    if number is not None and 0 <= number + days < 376200:   # within 1970..2999
        return "%04d-%02d-%02d" % time.gmtime((number + days) * 86400)[:3]
    from datetime import date, timedelta
    try:
        return (date.fromisoformat(day_iso) + timedelta(days=days)).isoformat()
    except OverflowError:
        return (date.max if days > 0 else date.min).isoformat()


_YEARS = ("1970", "2999")   # the dates FlowForge takes, as EPOCH_LIMITS the times


def plausible_day(day, text, what):
    """`day` (a datetime.date), if its year lies within _YEARS."""
    if not _YEARS[0] <= "%04d" % day.year <= _YEARS[1]:
        raise FlowForgeError("%s %r is out of range (%s to %s)" % (what, text, _YEARS[0],
                                                                  _YEARS[1]), EXIT_USAGE)
    return day


def _day_count(first_day, last_day):
    """Days from `first_day` to `last_day`, both included."""
    first, last = epoch_day(first_day), epoch_day(last_day)
    if first is not None and last is not None:
        return last - first + 1
    from datetime import date
    return (date.fromisoformat(last_day) - date.fromisoformat(first_day)).days + 1


def parse_date(text, what="date"):
    """A `YYYY-MM-DD` argument as a datetime.date."""
    from datetime import date
    if is_iso_date(text or ""):
        try:
            return plausible_day(date.fromisoformat(text), text, what)
        except ValueError:
            pass
    raise FlowForgeError("%s %r is not valid: use YYYY-MM-DD" % (what, text), EXIT_USAGE)


def parse_month(text):
    if is_month(text or "") and 1 <= int(text[5:7]) <= 12 and \
            1970 <= int(text[:4]) <= 2999:
        return text
    raise FlowForgeError("month %r is not valid: use YYYY-MM" % text, EXIT_USAGE)


_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1}


def _duration_parts(text):
    """[(number, unit)] of `1h 30m`-style text (numbers `12` or `1.5`, units h m s,
    spaces anywhere between), or None; scanned by hand, as in `spelled`."""
    parts, i, end = [], 0, len(text)
    while True:
        while i < end and text[i].isspace():
            i += 1
        if i == end:
            return parts
        j = i
        while j < end and text[j].isdecimal():
            j += 1
        if j == i:
            return None
        if j + 1 < end and text[j] == "." and text[j + 1].isdecimal():
            j += 1
            while j < end and text[j].isdecimal():
                j += 1
        number = text[i:j]
        while j < end and text[j].isspace():
            j += 1
        if j == end or text[j] not in "hms":
            return None
        parts.append((number, text[j]))
        i = j + 1


def _clock_duration(text):
    """Seconds of `1:30` or `1:30:15` (minutes and seconds 00-59), or None."""
    fields = text.split(":")
    if not 2 <= len(fields) <= 3 or not fields[0].isdecimal() or not all(
            len(f) == 2 and f[0] in "012345" and f[1].isdecimal() for f in fields[1:]):
        return None
    return int(fields[0]) * 3600 + int(fields[1]) * 60 + int(fields[2] if len(fields) == 3 else 0)


def _exact_seconds(number, unit_seconds):
    """Integer seconds for a decimal string times a unit, rounded half up, no floats."""
    whole, _, frac = number.partition(".")
    scale = 10 ** len(frac)
    numerator = (int(whole) * scale + int(frac or 0)) * unit_seconds
    return (2 * numerator + scale) // (2 * scale)


def parse_duration(text):
    """Positive integer seconds for `90m`, `1h30m`, `1.5h`, `45s`, `1:30` or `1:30:15`."""
    raw = text
    text = (text or "").strip().lower()
    seconds = _clock_duration(text)
    parts = _duration_parts(text) if seconds is None and text else None
    if parts:
        units = [u for _, u in parts]
        if units == sorted(set(units), key="hms".index):
            try:
                seconds = sum(_exact_seconds(n, _UNIT_SECONDS[u]) for n, u in parts)
            except ValueError:   # more digits than int() takes: not a duration
                seconds = None
    if seconds is None:
        hint = ""
        if re.fullmatch(r"\d+(\.\d+)?", text):
            hint = " (%sm or %sh? give a unit)" % (text, text)
        raise FlowForgeError("duration %r is not valid: use 90m, 1h30m, 1.5h or 1:30%s"
                             % (raw, hint), EXIT_USAGE)
    if seconds <= 0:
        raise FlowForgeError("duration %r is not positive" % raw, EXIT_USAGE)
    return seconds


def format_duration(seconds):
    """`1h05m` style for people; the data itself stays in integer seconds."""
    seconds = int(seconds)
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return "%s%dh%02dm" % (sign, h, m)
    if m:
        return "%s%dm%02ds" % (sign, m, s) if s else "%s%dm" % (sign, m)
    return "%s%ds" % (sign, s)


def closest(word, choices):
    """The choice most like `word` (a typo's likely meaning), or None."""
    from difflib import get_close_matches
    found = get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def exact_duration(seconds):
    """format_duration, to the second (`24h00m01s`), for figures that are compared."""
    text = format_duration(seconds)
    return text + "%02ds" % (abs(int(seconds)) % 60) if abs(int(seconds)) >= 3600 and seconds % 60 \
        else text


def format_hours(seconds):
    """`12:30` (hours:minutes, truncated) for tables."""
    h, rest = divmod(int(seconds), 3600)
    return "%d:%02d" % (h, rest // 60)


_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_KEY_CHARS = _ALNUM | {"_"}
_REPO_CHARS = _ALNUM | set("_.-")


def _issue_number(text):
    """1 to 12 ASCII digits."""
    return 0 < len(text) <= 12 and text.isascii() and text.isdigit()


def parse_issue(text):
    """Canonical issue reference: `123` (also from `#123`), `owner/repo#123`, `ABC-12`."""
    text = (text or "").strip()
    number = text[1:] if text[:1] == "#" else text
    if _issue_number(number):   # the common case
        return str(int(number))
    # `owner/repo#N` and `KEY-N` by hand rather than with regular expressions
    # (tests/test_hot_path.py holds them to the patterns they replaced): a timer
    # command that imported `re` would pay ~11 ms.
    repo, sep, number = text.partition("#")
    owner, slash, name = repo.partition("/")
    if (sep and slash and _issue_number(number) and spelled(owner, _REPO_CHARS, _REPO_CHARS, 100)
            and spelled(name, _REPO_CHARS, _REPO_CHARS, 100)
            and not repo.startswith((".", "-")) and owner.strip(".") and name.strip(".")):
        # (`a/..#1` would be a path trick in a provider's URL; `acme/.github#3` is a real repo)
        return "%s#%d" % (repo, int(number))
    key, sep, number = text.partition("-")
    if sep and _issue_number(number) and spelled(key, _LETTERS, _KEY_CHARS, 20):
        return "%s-%d" % (key.upper(), int(number))
    raise FlowForgeError("issue %r is not valid: use 123, #123, owner/repo#123 or ABC-12"
                         % text, EXIT_USAGE)


def is_project(text):
    """1-64 letters, digits, space, . _ / -, starting with a letter or digit."""
    return spelled(text, _ALNUM, _PROJECT_CHARS, 64) and not text.endswith(" ")


def parse_project(text):
    if text is None:
        return ""
    if is_project(text):
        return text
    raise FlowForgeError("project %r is not valid: 1-64 letters, digits, space, . _ / -, "
                         "starting with a letter or digit" % text, EXIT_USAGE)


def parse_note(text):
    if text is None:
        return ""
    if len(text) > NOTE_MAX:
        raise FlowForgeError("note is longer than %d characters" % NOTE_MAX, EXIT_USAGE)
    if any(ord(c) < 32 and c not in "\t\n" for c in text):
        raise FlowForgeError("note contains control characters", EXIT_USAGE)
    return text


def valid_user_name(name):
    """Letters, digits, `.`, `_`, `-`; 1-64 characters; no leading dot (so no `..`)."""
    return spelled(name or "", _NAME_FIRST, _NAME_CHARS, 64)


_JSON_CODEC = []   # [scanner, canonical encoder], made on first use


def _json_codec():
    """The C scanner and encoder of the json package, set up as json.loads and
    a canonical json.dumps set them up, without importing json itself (whose
    Python half imports `re`: ~11 ms of a timer command's start-up).  Where the
    accelerator is missing (another interpreter), the json package's own."""
    if not _JSON_CODEC:
        try:
            import _json

            class Decoding:   # the attributes json.decoder.JSONDecoder gives its scanner
                strict = True
                object_hook = object_pairs_hook = None
                parse_float, parse_int = float, int
                parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                                  "NaN": float("nan")}.__getitem__

            def unserializable(obj):
                raise TypeError("Object of type %s is not JSON serializable" % type(obj).__name__)
            scanner = _json.make_scanner(Decoding())

            def encode(obj):   # a new encoder each time: a failed encode leaves its markers
                return "".join(_json.make_encoder({}, unserializable, _json.encode_basestring,
                                                  None, ":", ",", True, False, True)(obj, 0))
            _JSON_CODEC[:] = [scanner, encode]
        except (ImportError, AttributeError, TypeError):
            scanner = json.JSONDecoder().scan_once
            encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            _JSON_CODEC[:] = [scanner, encoder.encode]
    return _JSON_CODEC


def load_json(data):
    """json.loads, for text or UTF-8 bytes: ValueError on anything that is not one JSON value."""
    if isinstance(data, (bytes, bytearray)):
        if data[:1] in (b"\xef", b"\xfe", b"\xff", b"\x00") or data[1:2] == b"\x00":
            return json.loads(data)   # a byte-order mark, or UTF-16/32: json's detection
        data = data.decode("utf-8", "surrogatepass")
    start = len(data) - len(data.lstrip(" \t\n\r"))
    try:
        value, end = _json_codec()[0](data, start)
    except (StopIteration, SystemError):
        # Bad JSON.  (The accelerator reports it with json.decoder's exception,
        # and only once json.decoder is loaded.)  json itself says what is wrong.
        return json.loads(data)
    if end != len(data) and data[end:].strip(" \t\n\r"):
        return json.loads(data)   # extra data: the same
    return value


def canonical_json(obj):
    """Sorted keys, compact, UTF-8: the same data always gives the same bytes."""
    return _json_codec()[1](obj)


def canonical_bytes(obj):
    return (canonical_json(obj) + "\n").encode("utf-8")


def encode_record(record):
    """One checksummed line of the private store: `<crc32 hex> <canonical JSON>\\n`.

    crc32 rather than sha256: it catches torn and flipped lines, and zlib is
    already loaded, whereas hashlib costs the timers ~15 ms at start-up."""
    body = canonical_json(record).encode("utf-8")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_record(line):
    """The record of one line (without its newline); ValueError says what is wrong."""
    if len(line) < 11 or line[8:9] != b" ":
        raise ValueError("not a checksummed record")
    body = line[9:]
    try:
        crc = int(line[:8], 16)
    except ValueError:
        raise ValueError("not a checksummed record")
    if crc != zlib.crc32(body):
        raise ValueError("checksum mismatch")
    try:
        record = load_json(body)
    except ValueError:
        raise ValueError("not JSON")
    if not isinstance(record, dict):
        raise ValueError("not a record")
    version = record.get("v", 0)
    if type(version) is not int:
        raise ValueError("record version %r is not a number" % (version,))
    if version > RECORD_SCHEMA:
        raise ValueError("written by a newer FlowForge (record version %s)" % version)
    return record


_sha256 = None


def sha256_hex(data):
    return sha256_hasher(data).hexdigest()


def sha256_hasher(data=b""):
    """A SHA-256 object, fed `data`."""
    return (_sha256 or sha256_constructor())(data)


def sha256_constructor():
    """The SHA-256 constructor (called for each of many small digests)."""
    # hashlib loads OpenSSL (~15 ms at import).  The interpreter's builtin
    # SHA-256 gives the same digest and keeps report and hook start-up fast.
    # The builtin module is _sha256 up to Python 3.11 and _sha2 from 3.12; both
    # are looked up by name so that a static check on either version sees no
    # module foreign to it.
    global _sha256
    if _sha256 is None:
        for name in ("_sha2", "_sha256"):
            try:
                _sha256 = __import__(name).sha256
                break
            except (ImportError, AttributeError):
                continue
        else:
            from hashlib import sha256 as _sha256
    return _sha256


def _spawn_git(args, cwd, env=None, stdin=False, stderr=True):
    """posix_spawn `git -C cwd ARGS`: (pid, stdin fd or None, stdout fd, stderr fd or None).

    posix_spawn instead of subprocess: importing subprocess costs ~15 ms, which
    the timers and the hook cannot afford.  Inherits the environment (plus
    `env`), so inside a git hook GIT_DIR and GIT_INDEX_FILE keep pointing at the
    right repository."""
    ours, theirs, actions = [], [], []
    try:
        if stdin:
            in_r, in_w = os.pipe()
            ours.append(in_w)
            theirs.append(in_r)
            actions.append((os.POSIX_SPAWN_DUP2, in_r, 0))
        else:
            devnull = os.open(os.devnull, os.O_RDONLY)
            theirs.append(devnull)
            actions.append((os.POSIX_SPAWN_DUP2, devnull, 0))
        out_r, out_w = os.pipe()
        ours.append(out_r)
        theirs.append(out_w)
        actions.append((os.POSIX_SPAWN_DUP2, out_w, 1))
        if stderr:
            err_r, err_w = os.pipe()
            ours.append(err_r)
            theirs.append(err_w)
            actions.append((os.POSIX_SPAWN_DUP2, err_w, 2))
        else:
            quiet = os.open(os.devnull, os.O_WRONLY)
            theirs.append(quiet)
            actions.append((os.POSIX_SPAWN_DUP2, quiet, 2))
        for fd in ours:
            actions.append((os.POSIX_SPAWN_CLOSE, fd))
        environ = dict(os.environ, **env) if env else os.environ
        pid = os.posix_spawnp("git", ["git", "-C", cwd] + list(args), environ,
                              file_actions=actions)
    except OSError as e:
        for fd in ours:
            os.close(fd)
        raise FlowForgeError("cannot run git: %s" % e.strerror, EXIT_UNAVAILABLE)
    finally:
        for fd in theirs:
            os.close(fd)
    return (pid, ours[0] if stdin else None, ours[1 if stdin else 0],
            ours[-1] if stderr else None)


def _wait_exit(pid):
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
        else (status >> 8)


def fork_workers(chunks, work):
    """Run work(chunk) for each chunk in a forked child of its own (one per
    core: the callers' work is CPU-bound Python); each child sends what work()
    returns through a pipe, as JSON, and exits without returning into main().
    Returns [(pid, pipe, chunk)] for reap_workers."""
    sys.stdout.flush()
    sys.stderr.flush()
    children = []
    for chunk in chunks:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(read_fd)
                with os.fdopen(write_fd, "wb") as pipe:
                    pipe.write(canonical_bytes(work(chunk)))
            except BaseException:
                code = EXIT_FAIL
            finally:
                sys.stderr.flush()
                os._exit(code)
        os.close(write_fd)
        children.append((pid, read_fd, chunk))
    return children


def reap_workers(children):
    """[(chunk, what its work() returned, or None where the worker failed)]."""
    done = []
    for pid, read_fd, chunk in children:
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        try:
            result = load_json(data) if status == 0 and data else None
        except ValueError:
            result = None
        done.append((chunk, result))
    return done


def run_git_bytes(args, cwd, input=None, env=None, timeout=None):
    """Run git to the end; returns (exit code, stdout bytes, stderr text).

    `input` is written to its stdin while its output is read (no deadlock on
    big exchanges); after `timeout` seconds it is killed and exit code is -1."""
    if not hasattr(os, "posix_spawnp"):  # pragma: no cover - non-POSIX
        import subprocess
        try:
            proc = subprocess.run(["git", "-C", cwd] + list(args), input=input or b"",
                                  capture_output=True, timeout=timeout,
                                  env=dict(os.environ, **env) if env else None)
        except subprocess.TimeoutExpired:
            return -1, b"", "timed out"
        return proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")
    import select
    pid, in_w, out_r, err_r = _spawn_git(args, cwd, env, stdin=input is not None)
    chunks = {out_r: [], err_r: []}
    readers = [out_r, err_r]
    pending = memoryview(input or b"")
    writers = [in_w] if in_w is not None else []
    if in_w is not None and not pending:
        os.close(in_w)
        writers = []
    elif in_w is not None:
        os.set_blocking(in_w, False)  # write only what the pipe takes: git may be writing too
    deadline = None if timeout is None else time.monotonic() + timeout
    killed = False
    try:
        while readers or writers:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready_r, ready_w, _ = select.select(readers, writers, [], wait)
            if not ready_r and not ready_w:
                import signal
                os.kill(pid, signal.SIGKILL)
                killed = True
                break
            for fd in ready_w:
                try:
                    pending = pending[os.write(fd, pending[:65536]):]
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    pending = pending[:0]
                except OSError as e:
                    import signal
                    os.kill(pid, signal.SIGKILL)
                    _wait_exit(pid)
                    raise StorageError("the pipe to git %s" % args[0], e)
                if not pending:
                    os.close(fd)
                    writers = []
            for fd in ready_r:
                data = os.read(fd, 65536)
                if data:
                    chunks[fd].append(data)
                else:
                    readers.remove(fd)
    finally:
        for fd in readers + writers:
            os.close(fd)
        for fd in (out_r, err_r):
            if fd not in readers:
                try:
                    os.close(fd)
                except OSError:
                    pass
    rc = _wait_exit(pid)
    if killed:
        return -1, b"", "timed out after %g s" % timeout
    return rc, b"".join(chunks[out_r]), b"".join(chunks[err_r]).decode("utf-8", "replace")


def git_error_line(err, rc):
    """The line of git's stderr that says what went wrong."""
    lines = [line.strip() for line in err.strip().splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:")):
            return line
    return lines[-1] if lines else "exit %d" % rc


def run_git(args, cwd, check=True, input=None, env=None, timeout=None):
    """Run git; returns (exit code, stdout, stderr) as text."""
    rc, out, err = run_git_bytes(args, cwd, input, env, timeout)
    if check and rc != 0:
        raise FlowForgeError("git %s failed: %s" % (" ".join(a for a in args[:4] if a != "-c")
                                                    if args[0] == "-c" else " ".join(args[:2]),
                                                    git_error_line(err, rc)), git_exit_code(err))
    return rc, out.decode("utf-8", "replace"), err


def git_exit_code(err):
    """FlowForge's exit code for a git failure: a full or read-only disk is 73/77 as
    for FlowForge's own writes."""
    if ("No space left" in err or "File too large" in err or "Input/output error" in err
            or "couldn't write" in err or "could not write" in err or "unable to write" in err):
        return EXIT_CANTCREAT   # git names some failed writes without their errno
    if "Read-only file system" in err or "Permission denied" in err:
        return EXIT_NOPERM
    return EXIT_FAIL


class GitObjects:
    """One `git cat-file --batch` process: many objects per round trip, for as
    many rounds as the caller needs, so reading a ledger costs one process."""

    def __init__(self, cwd):
        self.cwd = cwd
        self.pid = None

    def _start(self):
        self.pid, self.stdin, self.stdout, _ = _spawn_git(["cat-file", "--batch"], self.cwd,
                                                          stdin=True, stderr=False)
        # select() promises room for one byte only: a blocking write of a long
        # request could wait on git while git waits on us to read its answers
        os.set_blocking(self.stdin, False)
        self.buffer = b""

    def get(self, names, limit=None):
        """[(type, bytes) or None] for each object name (an id, or `REV:PATH`).
        An object bigger than `limit` bytes is not kept: ("too large", size)."""
        import select
        names = [n for n in names]
        if not names:
            return []
        for name in names:
            if not name or "\n" in name or not name.isprintable():
                raise FlowForgeError("bad git object name %r" % name, EXIT_DATA)
        if self.pid is None:
            self._start()
        request = memoryview(("\n".join(names) + "\n").encode("utf-8"))
        out, pos, skip = [], 0, 0
        buf = self.buffer
        while len(out) < len(names) or skip:
            ready_r, ready_w, _ = select.select([self.stdout], [self.stdin] if request else [],
                                                [])
            if ready_w:
                try:
                    request = request[os.write(self.stdin, request[:65536]):]
                except BlockingIOError:
                    pass
                except OSError as e:
                    raise StorageError("the pipe to git cat-file", e)
            if not ready_r:
                continue
            data = os.read(self.stdout, 1 << 20)
            if not data:
                raise FlowForgeError("git cat-file ended early", EXIT_UNAVAILABLE)
            buf += data
            while len(out) < len(names) or skip:
                if skip:  # the rest of an object too large to keep
                    dropped = min(skip, len(buf) - pos)
                    pos, skip = pos + dropped, skip - dropped
                    if skip:
                        break
                    continue
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    break
                header = buf[pos:eol].split(b" ")
                if header[-1] in (b"missing", b"ambiguous") or len(header) != 3:
                    out.append(None)
                    pos = eol + 1
                    continue
                size = int(header[2])
                if limit is not None and size > limit:
                    out.append(("too large", size))
                    pos, skip = eol + 1, size + 1
                    continue
                if len(buf) < eol + 1 + size + 1:
                    break
                out.append((header[1].decode(), buf[eol + 1:eol + 1 + size]))
                pos = eol + 1 + size + 1
            buf, pos = buf[pos:], 0
        self.buffer = buf
        return out

    def close(self):
        if self.pid is not None:
            os.close(self.stdin)
            os.close(self.stdout)
            _wait_exit(self.pid)
            self.pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_tree(data, id_size):
    """{name: (mode, object id)} of a raw git tree object (`id_size` bytes per
    id: 20 for SHA-1 repositories, 32 for SHA-256); ValueError if malformed."""
    entries, pos = {}, 0
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            nul = data.index(b"\0", space)
            mode, name = data[pos:space].decode(), data[space + 1:nul].decode("utf-8")
            if nul + 1 + id_size > len(data):
                raise ValueError("truncated tree")
            entries[name] = (mode, data[nul + 1:nul + 1 + id_size].hex())
            pos = nul + 1 + id_size
    except UnicodeDecodeError:
        raise ValueError("tree entry names are not UTF-8")
    return entries


def git_config_get(root, key):
    rc, out, _ = run_git(["config", "--get", key], root, check=False)
    return out.strip() if rc == 0 else ""


# ############################################################################
# 3. Atomic I/O and locks
# ############################################################################

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path):
    """fsync a directory, so that a rename or a new file in it survives power loss."""
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def atomic_write(path, data, mode=None, sync_dir=True, durable=True):
    """Replace `path` with `data` so that readers see the old bytes or the new, never a mix.

    Temp file in the same directory (a rename across file systems is a copy),
    fsync before the rename (otherwise a crash can leave the new name pointing
    at empty data), os.replace, then fsync the directory (otherwise the rename
    itself may not survive power loss).  On any failure the temp file is
    removed and the target is untouched.  `mode` None keeps an existing file's
    mode and gives a new one 0666 minus the umask.  A caller replacing many
    files in one directory passes sync_dir=False and calls fsync_dir once.
    durable=False skips both fsyncs: for a copy that is compared with its
    original and rewritten when they differ (the mirror's timer), so that
    losing it or finding it torn after a crash costs nothing."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, ".%s.tmp-%d-%s" % (name, os.getpid(), os.urandom(4).hex()))
    keep_mode = None
    if mode is None:
        try:
            keep_mode = os.lstat(path).st_mode & 0o7777
        except FileNotFoundError:
            pass
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                     0o666 if mode is None else mode)
    except OSError as e:
        raise StorageError(path, e)
    try:
        try:
            if keep_mode is not None:
                os.fchmod(fd, keep_mode)
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise StorageError(path, e)
        raise
    if sync_dir and durable:
        try:
            fsync_dir(directory or ".")
        except OSError as e:
            raise StorageError(directory, e)


def append_durable(path, data, create_mode=0o600, durable=True):
    """Append `data` to `path` and fsync; returns the file's size before the append.

    The caller holds the file's lock and has made sure the file ends with a
    newline.  If the write fails half way (disk full), the file is cut back to
    its old size so that no torn line is left behind.  A bulk writer creating
    many files passes durable=False and fsyncs them and their directory once at
    the end (creating files between fsyncs waits on the journal each time)."""
    created = not os.path.lexists(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC,
                     create_mode)
    except OSError as e:
        raise StorageError(path, e)
    try:
        size = os.fstat(fd).st_size
        try:
            _write_all(fd, data)
            if durable:
                os.fsync(fd)
        except BaseException as e:
            try:
                if created:  # a file this append made: gone again, as if never tried
                    os.unlink(path)
                else:
                    os.ftruncate(fd, size)
                    os.fsync(fd)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise StorageError(path, e)
            raise
    finally:
        os.close(fd)
    if size == 0 and durable:
        try:
            fsync_dir(os.path.dirname(path))  # a new file's directory entry must be durable too
        except OSError as e:
            raise StorageError(path, e)
    return size


def read_bytes(path):
    """A file's bytes; a symlink is refused (exit 77), never followed, so a planted
    link cannot make FlowForge read or copy someone else's file."""
    return read_bytes_and_stat(path)[0]


def open_regular(path):
    """(descriptor, os.stat_result) of a regular file, opened for reading: a
    symlink is refused (exit 77), never followed; a directory raises
    IsADirectoryError; anything else that is not a regular file is refused
    (O_NONBLOCK: opening a planted FIFO returns at once instead of hanging)."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StorageError(path, e)
        raise
    try:
        st = os.fstat(fd)
        kind = st.st_mode & 0o170000
        if kind == 0o040000:
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        if kind != 0o100000:
            raise FlowForgeError("refusing %s: not a regular file" % path, EXIT_NOPERM)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_bytes_and_stat(path, limit=None):
    """(bytes, os.stat_result) from one open descriptor (open_regular), with
    `limit` only of a file of at most that many bytes."""
    # stat before reading: if the file grows meanwhile, the recorded stat is
    # the older one, so an incremental reader looks again next time
    fd, st = open_regular(path)
    try:
        if limit is not None and st.st_size > limit:
            raise FlowForgeError("refusing %s: %d bytes, more than the %d a FlowForge file of "
                                 "its kind can hold" % (path, st.st_size, limit), EXIT_DATA)
        # os.read, not a file object: one call for the expected size (a day file
        # is small, and an aggregation reads thousands), more while it keeps coming
        chunks = [os.read(fd, st.st_size + 1)]
        while chunks[-1]:
            chunks.append(os.read(fd, max(st.st_size, 1 << 16)))
        return b"".join(chunks), st
    finally:
        os.close(fd)


def makedirs_private(path):
    """Create a directory tree whose new parts are 0700 (private or per-machine data).

    Not os.makedirs(mode=...): since Python 3.7 that mode applies to the leaf only."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        makedirs_private(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


class FileLock:
    """An exclusive `flock` on a lock file, waiting at most `timeout` seconds.

    flock, not lockf: a POSIX record lock is dropped when the process closes
    *any* descriptor of the file, while a flock belongs to our descriptor and
    vanishes with the process, so a `kill -9` never leaves a stale lock.  The
    lock file is never deleted: a waiter still holding the old inode and a
    newcomer on a re-created path could otherwise both "hold" the lock.
    O_NOFOLLOW refuses a planted symlink."""

    def __init__(self, path, timeout, what):
        self.path = path
        self.timeout = timeout
        self.what = what
        self.fd = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            raise FlowForgeError("FlowForge needs POSIX file locks (fcntl), which this "
                                 "platform does not have", EXIT_UNAVAILABLE)
        deadline = time.monotonic() + self.timeout
        delay = 0.001
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise FlowForgeError("refusing lock file %s: it is a symbolic link"
                                         % self.path, EXIT_NOPERM)
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LockBusy("%s is busy (another FlowForge process holds its lock); "
                                   "try again" % self.what)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, 0.05)
                continue
            if os.fstat(fd).st_nlink == 0:  # unlinked while we waited: lock the new file
                os.close(fd)
                continue
            self.fd = fd
            return self

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ############################################################################
# 4. Layout, config, identity and quarantine
# ############################################################################

class UI:
    """Where messages go: data on stdout, everything for people on stderr."""
    quiet = False
    verbose = False
    color = False
    json = False


def info(message):
    if not UI.quiet:
        sys.stderr.write(message + "\n")


def warn(message):
    sys.stderr.write("warning: " + message + "\n")


def debug(message):
    if UI.verbose:
        sys.stderr.write("debug: " + message + "\n")


def one_line(error):
    """An exception as one short line, for logs and the hook's single line."""
    text = str(error) if isinstance(error, FlowForgeError) else "%s: %s" % (
        type(error).__name__, error)
    text = " ".join(text.split())
    return text[:300] + ("..." if len(text) > 300 else "")


# Events for plugins: the timers and the aggregation announce what happened
# here; the plugins section (further down) registers the listener.
EVENT_LISTENERS = []


def announce(repo, hook, **kwargs):
    for listener in EVENT_LISTENERS:
        listener(repo, hook, **kwargs)


GITIGNORE = """\
# FlowForge: private and per-machine data never leave this machine.
/user/
/state/
/quarantine/
"""

DEFAULT_CONFIG = {
    "schema": CONFIG_SCHEMA,
    # day | week | month: the finest period that committed shards reveal.
    "granularity": "day",
    "billing": {
        "currency": "USD",
        "default_rate": "0.00",     # per hour, a decimal string
        "user_rates": {},           # {"alice": "120.00"}
        "project_rates": {},        # {"web": "95.00"}
        "user_project_rates": {},   # {"alice/web": "150.00"}; the most specific rate wins
        "round_minutes": 0,         # billing increment; 0 bills exact seconds
        "round_mode": "up",         # up | nearest | down
        "round_scope": "line",      # line: round each bill line; day: each user x issue x day
    },
    "hook": {"budget_ms": 400, "lock_wait_ms": 100},
    "daemon": {"interval": 30},
    # Where store refs live on the remote; refs/heads/flowforge/ for a host
    # that accepts branches only.  This clone's own refs stay under
    # refs/flowforge/stores/ whatever it is.
    "ledger": {"prefix": "refs/flowforge/stores/"},
    # Commit authors (e-mail or name) that `reconcile --ci` never reports as
    # missing aggregation: people who commit but track no time.
    "reconcile": {"ignore_authors": []},
}
def is_ref_namespace(prefix):
    """`refs/` and then names (as user names, of any length), each ending in `/`."""
    parts = prefix.split("/")
    return len(parts) > 2 and parts[0] == "refs" and parts[-1] == "" and all(
        spelled(part, _NAME_FIRST, _NAME_CHARS, len(part)) for part in parts[1:-1])

def is_rate(text):
    """A decimal string such as `120` or `120.50` (up to 9 digits, 4 decimals).
    By hand, not a regular expression: every command validates the config."""
    whole, dot, fraction = text.partition(".")
    return (whole.isdecimal() and len(whole) <= 9
            and (not dot or fraction.isdecimal() and len(fraction) <= 4))


def is_currency(text):
    """A three-letter code such as EUR."""
    return len(text) == 3 and text.isascii() and text.isalpha() and text.isupper()


class Repo:
    """A git work tree with FlowForge's layout under .flowforge/."""

    def __init__(self, root):
        self.root = root
        self.ff = os.path.join(root, ".flowforge")
        self.config_path = os.path.join(self.ff, "config.json")
        self.team = os.path.join(self.ff, "team")
        self.summaries = os.path.join(self.team, "summaries")
        self.users = os.path.join(self.ff, "user")
        self.state = os.path.join(self.ff, "state")
        self.locks = os.path.join(self.state, "locks")
        self.logs = os.path.join(self.state, "logs")
        self.aggstate = os.path.join(self.state, "aggregate")
        self.quarantine_dir = os.path.join(self.ff, "quarantine")
        self._config = None

    @classmethod
    def find(cls, start):
        """The work tree containing `start`: the nearest directory with a .git entry."""
        path = os.path.abspath(start)
        if not os.path.isdir(path):
            raise FlowForgeError("%s is not a directory" % start, EXIT_USAGE)
        while True:
            if os.path.exists(os.path.join(path, ".git")):
                return cls(path)
            parent = os.path.dirname(path)
            if parent == path:
                raise FlowForgeError("%s is not inside a git work tree (run `git init` "
                                     "first, or use -C REPO)" % os.path.abspath(start))
            path = parent

    def rel(self, path):
        return os.path.relpath(path, self.root)

    def check_dirs(self, *extra):
        """Refuse (exit 77) a symbolic link or a non-directory where FlowForge
        keeps data: a teammate could commit `.flowforge/user -> somewhere`, and
        writes would follow it out of the git-ignored directories."""
        import stat
        for path in (self.ff, self.users, self.state, self.locks, self.quarantine_dir) + extra:
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(mode):
                raise FlowForgeError("refusing %s: %s where FlowForge keeps its data; move it "
                                     "away" % (path, "a symbolic link" if stat.S_ISLNK(mode)
                                               else "not a directory"), EXIT_NOPERM)

    def require(self):
        self.check_dirs()
        if os.path.lexists(self.config_path) and not os.path.isfile(self.config_path):
            raise FlowForgeError("refusing %s: not a regular file" % self.config_path, EXIT_CONFIG)
        if not os.path.isfile(self.config_path):
            raise FlowForgeError("FlowForge is not set up in %s: run `flowforge init`"
                                 % self.root, EXIT_CONFIG)
        return self

    @property
    def config(self):
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def ensure_machine_dirs(self):
        for path in (self.locks, self.logs, self.aggstate, self.quarantine_dir):
            makedirs_private(path)

    def lock(self, name, timeout, what):
        if not os.path.isdir(self.locks):
            self.ensure_machine_dirs()
        return FileLock(os.path.join(self.locks, name + ".lock"), timeout, what)


def _merge_defaults(config, defaults):
    merged = dict(defaults)
    for key, value in config.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            merged[key] = _merge_defaults(value, defaults[key])
        else:
            merged[key] = value
    return merged


def load_config(path):
    """The team config, with defaults for missing keys; anything wrong is exit 78."""
    try:
        raw = read_bytes_and_stat(path, MAX_CONFIG_BYTES)[0]
    except FileNotFoundError:
        raise FlowForgeError("%s is missing: run `flowforge init`" % path, EXIT_CONFIG)
    except FlowForgeError as e:
        raise FlowForgeError(str(e), EXIT_CONFIG)
    try:
        config = load_json(raw)
    except (ValueError, RecursionError) as e:
        raise FlowForgeError("%s is not valid JSON (%s); fix it or restore it from git"
                             % (path, one_line(e)), EXIT_CONFIG)
    if not isinstance(config, dict):
        raise FlowForgeError("%s must hold a JSON object" % path, EXIT_CONFIG)
    config = _merge_defaults(config, DEFAULT_CONFIG)
    validate_config(config, path)
    return config


def unmatched_rates(billing, users, projects, pairs):
    """[(table, key, closest name or None)] of rates in `billing` that match no
    tracked time: a mistyped name silently bills at the default rate."""
    found = []
    for table, names in (("user_rates", users), ("project_rates", projects),
                         ("user_project_rates", pairs)):
        for key in sorted(billing.get(table, {})):
            if key not in names:
                found.append((table, key, closest(key, names)))
    return found


def rate_warning(table, key, guess, where):
    return "billing.%s has a rate for %r, but %s has no time for it%s" % (
        table, key, where, " (did you mean %r?)" % guess if guess else "")


def validate_config(config, path):
    def bad(what):
        raise FlowForgeError("%s: %s" % (path, what), EXIT_CONFIG)

    schema = config.get("schema")
    if not isinstance(schema, int) or schema < 1:
        bad("schema must be a positive integer")
    if schema > CONFIG_SCHEMA:
        bad("written by a newer FlowForge (schema %d); upgrade flowforge.py" % schema)
    if config.get("granularity") not in ("day", "week", "month"):
        bad("granularity must be day, week or month")
    billing = config.get("billing")
    if not isinstance(billing, dict):
        bad("billing must be an object")
    if not isinstance(billing.get("currency"), str) or not is_currency(billing["currency"]):
        bad("billing.currency must be a three-letter code such as EUR")

    def rate(where, value):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return
        if not isinstance(value, str) or not is_rate(value):
            bad("%s must be a non-negative decimal string such as \"120.00\"" % where)

    rate("billing.default_rate", billing.get("default_rate"))
    for table in ("user_rates", "project_rates", "user_project_rates"):
        rates = billing.get(table)
        if not isinstance(rates, dict):
            bad("billing.%s must be an object" % table)
        for key, value in rates.items():
            rate("billing.%s[%r]" % (table, key), value)
    minutes = billing.get("round_minutes")
    if not isinstance(minutes, int) or isinstance(minutes, bool) or not 0 <= minutes <= 1440:
        bad("billing.round_minutes must be a whole number of minutes from 0 to 1440")
    if billing.get("round_mode") not in ("up", "nearest", "down"):
        bad("billing.round_mode must be up, nearest or down")
    if billing.get("round_scope") not in ("line", "day"):
        bad("billing.round_scope must be line or day")
    closers = billing.get("closers", [])
    if not isinstance(closers, list) or not all(isinstance(c, str) and "@" in c for c in closers):
        bad("billing.closers must be a list of e-mail addresses (who may close a month)")
    if not isinstance(billing.get("signed_closes", False), bool):
        bad("billing.signed_closes must be true or false")
    invoice = billing.get("invoice", {})
    if not isinstance(invoice, dict):
        bad("billing.invoice must be an object")
    for who in ("issuer", "client"):
        party = invoice.get(who, {})
        if not isinstance(party, dict) or not all(
                isinstance(party.get(k, ""), str) for k in ("name", "email", "tax_id")) or not (
                isinstance(party.get("address", []), list)
                and all(isinstance(a, str) for a in party.get("address", []))):
            bad("billing.invoice.%s must be {\"name\", \"address\": [lines], \"email\", "
                "\"tax_id\"} (strings)" % who)
    for key in ("number", "notes", "tax_label"):
        if not isinstance(invoice.get(key, ""), str):
            bad("billing.invoice.%s must be a string" % key)
    if "tax_rate" in invoice and not (isinstance(invoice["tax_rate"], str)
                                      and is_rate(invoice["tax_rate"])):
        bad("billing.invoice.tax_rate must be a percentage as a decimal string, such as \"19\"")
    if invoice.get("paper", "A4") not in ("A4", "letter"):
        bad("billing.invoice.paper must be A4 or letter")
    due = invoice.get("due_days", 0)
    if not isinstance(due, int) or isinstance(due, bool) or not 0 <= due <= 365:
        bad("billing.invoice.due_days must be a whole number of days from 0 to 365")
    hook = config.get("hook")
    if not isinstance(hook, dict):
        bad("hook must be an object")
    for key in ("budget_ms", "lock_wait_ms"):
        value = hook.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 60000:
            bad("hook.%s must be a whole number of milliseconds from 0 to 60000" % key)
    daemon = config.get("daemon")
    interval = daemon.get("interval") if isinstance(daemon, dict) else None
    if (not isinstance(interval, (int, float)) or isinstance(interval, bool)
            or not 1 <= interval <= 86400):
        bad("daemon.interval must be 1-86400 seconds")
    plugins = config.get("plugins", {})
    if not isinstance(plugins, dict) or not all(isinstance(v, dict) for v in plugins.values()):
        bad("plugins must be an object of {\"name\": {settings}}")
    for name, section in plugins.items():
        if not isinstance(section.get("enabled", True), bool):
            bad("plugins.%s.enabled must be true or false" % name)
    ledger = config.get("ledger")
    prefix = ledger.get("prefix") if isinstance(ledger, dict) else None
    if (not isinstance(prefix, str) or not is_ref_namespace(prefix) or ".." in prefix
            or prefix.count("/") < 3 or prefix.startswith(("refs/flowforge/incoming/",
                                                           "refs/flowforge/remotes/",
                                                           "refs/flowforge/quarantine/",
                                                           "refs/remotes/", "refs/tags/"))):
        bad("ledger.prefix must be a ref namespace of its own ending in /, such as "
            "\"refs/flowforge/stores/\" or \"refs/heads/flowforge/\"")
    reconcile = config.get("reconcile")
    ignored = reconcile.get("ignore_authors") if isinstance(reconcile, dict) else None
    if not isinstance(ignored, list) or not all(isinstance(a, str) and a for a in ignored):
        bad("reconcile.ignore_authors must be a list of commit e-mail addresses or names")
    authors = config.get("authors", {})
    if not isinstance(authors, dict) or not all(
            isinstance(v, str) and valid_user_name(v) for v in authors.values()):
        bad("authors must map commit e-mail addresses to FlowForge user names")


def derive_user_name(email):
    """`Jane.Doe+work@example.com` -> `jane.doe`: a valid name from an e-mail address."""
    local = email.split("@", 1)[0].split("+", 1)[0].lower()
    name = re.sub(r"[^a-z0-9._-]", "-", local).lstrip(".-")[:64]
    return name if valid_user_name(name) else ""


def resolve_user(root, explicit):
    """Who is tracking: --user, $FLOWFORGE_USER, git config flowforge.user, user.email."""
    if explicit is not None:
        return check_user_name(explicit, "--user")
    if os.environ.get("FLOWFORGE_USER"):
        return check_user_name(os.environ["FLOWFORGE_USER"], "FLOWFORGE_USER")
    name = git_config_get(root, "flowforge.user")
    if name:
        return check_user_name(name, "git config flowforge.user")
    email = git_config_get(root, "user.email")
    name = derive_user_name(email) if email else ""
    if name:
        return name
    raise FlowForgeError("cannot tell who you are: pass --user NAME, set FLOWFORGE_USER, "
                         "or run `git config flowforge.user NAME`", EXIT_CONFIG)


def check_user_name(name, source):
    if not valid_user_name(name):
        raise FlowForgeError("user name %r (from %s) is not valid: 1-64 letters, digits, "
                             ". _ -, not starting with . or -" % (name, source), EXIT_USAGE)
    return name


def init_repo(root):
    """Create the layout; safe to run twice (nothing existing is overwritten)."""
    repo = Repo(root)
    repo.check_dirs()
    created = []
    for path in (os.path.join(repo.ff, "plugins"),):
        if not os.path.isdir(path):
            os.makedirs(path, exist_ok=True)
            created.append(repo.rel(path) + "/")
    for path in (repo.users, repo.state):
        if not os.path.isdir(path):
            makedirs_private(path)
            created.append(repo.rel(path) + "/")
    repo.ensure_machine_dirs()
    gitignore = os.path.join(repo.ff, ".gitignore")
    try:
        current = read_bytes(gitignore).decode("utf-8", "replace")
    except FileNotFoundError:
        current = ""
    missing = [line for line in GITIGNORE.splitlines()
               if line.startswith("/") and line not in current.splitlines()]
    if missing:
        text = current.rstrip("\n") + "\n" + "\n".join(missing) + "\n" if current else GITIGNORE
        atomic_write(gitignore, text.encode("utf-8"))
        created.append(repo.rel(gitignore))
    if not os.path.exists(repo.config_path):
        config = load_json(json.dumps(DEFAULT_CONFIG))
        config["repo_id"] = os.urandom(8).hex()  # names this repository's mirror
        atomic_write(repo.config_path, (json.dumps(config, indent=2, sort_keys=True) + "\n")
                     .encode("utf-8"))
        created.append(repo.rel(repo.config_path))
    else:
        load_config(repo.config_path)  # validate the existing one
    return repo, created


def private_store_users(paths):
    """The users whose private stores `paths` (relative to the work tree) lie in."""
    return sorted(u for u in {parts[2] for parts in (p.replace(os.sep, "/").split("/") for p in paths)
                              if parts[:2] == [".flowforge", "user"] and len(parts) > 3}
                  if valid_user_name(u))


def forget_aggregation_states(repo, paths):
    """Drop, durably, the aggregation state of every private store that `paths`
    lie in, before files are put back there: a restore does not name them in
    the store's list of changed days, so its next aggregation must look at all
    of its files.  The caller holds those users' aggregation locks."""
    dropped = False
    for user in private_store_users(paths):
        state = os.path.join(repo.aggstate, user + ".json")
        if os.path.lexists(state):
            os.unlink(state)
            dropped = True
    if dropped:
        fsync_dir(repo.aggstate)


class Quarantine:
    """Damaged files, set aside (never deleted) with a manifest of why and when."""

    def __init__(self, repo):
        self.repo = repo
        self.dir = repo.quarantine_dir
        self.manifest_path = os.path.join(self.dir, "manifest.json")

    def _load(self):
        try:
            doc = load_json(read_bytes(self.manifest_path))
            items = doc["items"]
            if not isinstance(items, list):
                raise ValueError
            return items
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError):
            # The manifest is only an index of the files beside it: rebuild it.
            items = []
            for name in sorted(os.listdir(self.dir)):
                if re.match(r"^Q\d+-", name):
                    items.append({"id": name.split("-", 1)[0], "file": name, "original": "",
                                  "reason": "unknown (the manifest was damaged)", "time": 0,
                                  "size": os.path.getsize(os.path.join(self.dir, name)),
                                  "sha256": ""})
            return items

    def _save(self, items):
        atomic_write(self.manifest_path, canonical_bytes(
            {"schema": QUARANTINE_SCHEMA, "items": items}), 0o600)

    def _lock(self):
        return self.repo.lock("quarantine", 10, "the quarantine")

    def put(self, path, reason, copy=False):
        """Move (or copy) `path` into quarantine; returns the item id."""
        makedirs_private(self.dir)
        with self._lock():
            items = self._load()
            number = 1 + max([int(i["id"][1:]) for i in items if i["id"][1:].isdigit()] or [0])
            item_id = "Q%d" % number
            name = "%s-%s" % (item_id, os.path.basename(path))
            dest = os.path.join(self.dir, name)
            data = read_bytes(path)
            if copy:
                atomic_write(dest, data, 0o600)
            else:
                os.replace(path, dest)
                fsync_dir(self.dir)
            items.append({"id": item_id, "file": name, "original": self.repo.rel(path),
                          "sha256": sha256_hex(data), "size": len(data), "reason": reason,
                          "time": now()})
            self._save(items)
        log_event(self.repo, "quarantine", id=item_id, path=self.repo.rel(path), reason=reason)
        return item_id

    def list(self):
        return self._load() if os.path.isdir(self.dir) else []

    def _find(self, items, item_id):
        for item in items:
            if item["id"].lower() == item_id.lower():
                return item
        raise FlowForgeError("no quarantined item %s (see `flowforge quarantine list`)" % item_id)

    def restore(self, item_id, force=False):
        found = self._find(self.list(), item_id)  # an unknown id changes nothing, not even a lock
        from contextlib import ExitStack
        with ExitStack() as held:
            # A file of a private store goes back with no aggregation running and
            # no write of that store in between, its aggregation state dropped
            # first.  (Their locks before the quarantine's: a salvage takes them
            # in that order.)
            for user in private_store_users([found.get("original") or ""]):
                held.enter_context(self.repo.lock("aggregate." + user, 30, "aggregation for %s" % user))
                held.enter_context(self.repo.lock("store." + user, 30, "the private store of %s" % user))
            held.enter_context(self._lock())
            items = self._load()
            item = self._find(items, item_id)
            if not item.get("original") or item["original"] != found.get("original"):
                raise FlowForgeError("%s has no recorded original path" % item["id"])
            target = os.path.join(self.repo.root, item["original"])
            if os.path.exists(target) and not force:
                raise FlowForgeError("%s exists; move it away first or use --force" % item["original"])
            forget_aggregation_states(self.repo, [item["original"]])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            atomic_write(target, read_bytes(os.path.join(self.dir, item["file"])), 0o600)
            os.unlink(os.path.join(self.dir, item["file"]))
            items.remove(item)
            self._save(items)
        return item

    def delete(self, item_id):
        self._find(self.list(), item_id)
        with self._lock():
            items = self._load()
            item = self._find(items, item_id)
            try:
                os.unlink(os.path.join(self.dir, item["file"]))
            except FileNotFoundError:
                pass
            items.remove(item)
            self._save(items)
        return item


LOG_MAX_BYTES = 1 << 20
LOG_KEEP = 3


def log_event(repo, event, **fields):
    """Append one line to state/logs/flowforge.jsonl (size-rotated); never raises.

    The log is diagnostics: losing a line to a full disk must not fail the
    command that is reporting it."""
    try:
        makedirs_private(repo.logs)
        path = os.path.join(repo.logs, "flowforge.jsonl")
        try:
            if os.path.getsize(path) > LOG_MAX_BYTES:
                for i in range(LOG_KEEP - 1, 0, -1):
                    if os.path.exists("%s.%d" % (path, i)):
                        os.replace("%s.%d" % (path, i), "%s.%d" % (path, i + 1))
                os.replace(path, path + ".1")
        except OSError:
            pass
        fields.update(ts=now(), event=event, pid=os.getpid())
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_NOFOLLOW | _O_CLOEXEC, 0o600)
        try:
            os.write(fd, canonical_bytes(fields))
        finally:
            os.close(fd)
    except Exception:
        pass


def record_metrics(repo, **changes):
    """Update state/metrics.json: keys ending in `_total` are counters (added
    to), the others are set.  Best effort: metrics never fail a command."""
    try:
        path = os.path.join(repo.state, "metrics.json")
        with repo.lock("metrics", 0.5, "the metrics"):
            try:
                metrics = load_json(read_bytes(path))
                if not isinstance(metrics, dict):
                    metrics = {}
            except (FileNotFoundError, ValueError):
                metrics = {}
            for key, value in changes.items():
                if key.endswith("_total"):
                    metrics[key] = metrics.get(key, 0) + value
                else:
                    metrics[key] = value
            atomic_write(path, canonical_bytes(metrics), 0o600)
    except Exception as e:
        log_event(repo, "metrics-not-recorded", error=str(e))


def read_metrics(repo):
    try:
        metrics = load_json(read_bytes(os.path.join(repo.state, "metrics.json")))
        return metrics if isinstance(metrics, dict) else {}
    except (OSError, ValueError, FlowForgeError):
        return {}


# ############################################################################
# 5. Private store, mirror and timers
# ############################################################################
#
# .flowforge/user/<name>/ holds one developer's detailed data for this clone:
#   config.json              store id (random, made once) and time zone
#   time/current.json        the running or paused timer, replaced atomically
#   time/far.json            ids of entries edited to hold time beyond REACH_DAYS
#                            of their day file, so that views still find them
#   time/daily/<day>.jsonl   append-only checksummed records, fsynced:
#       {"op":"entry", "id", "issue", "project", "note", "segments":[[start,end],...]}
#       {"op":"entry", ..., "date", "seconds"}            (logged without clock times)
#       {"op":"edit", "id", "set":{...}}  {"op":"delete", "id"}   (latest wins)
# An entry id is "<YYYYMMDD>-<8 hex>": the day names the file that holds the
# entry and all its amendments, so finding an entry reads one small file.

_HEX = frozenset("0123456789abcdef")


def is_entry_id(text):
    """`20261122-1a2b3c4d`: the day's digits, `-`, 8-16 hex digits."""
    return (17 <= len(text) <= 25 and text[8] == "-" and text[:8].isdecimal()
            and _HEX.issuperset(text[9:]))


def entry_seconds(entry):
    if "segments" in entry:
        return sum(end - start for start, end in entry["segments"])
    return entry["seconds"]


def entry_start(entry):
    return entry["segments"][0][0] if entry.get("segments") else None


def entry_parts(entry, split):
    """[(local date, seconds)] of an entry: its clock segments split at local
    midnight by `split` (a DayClock's), a logged entry all on its date.  This
    is the one definition of "the time on day D": status, entries, the shards
    and so every report use it."""
    segments = entry.get("segments")
    if segments is None:
        return ((entry["date"], entry["seconds"]),)
    if len(segments) == 1:
        return split(*segments[0])
    return [part for start, end in segments for part in split(start, end)]


def segments_overlap(a, b):
    """Whether two lists of [start, end) segments share a second."""
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


def _valid_record(record):
    """Structural check of a record that passed its checksum."""
    version = record.get("v", 0) if type(record) is dict else None
    if type(version) is not int or version > RECORD_SCHEMA:
        return False
    entry_id = record.get("id")
    if type(entry_id) is not str or not is_entry_id(entry_id):
        return False
    op = record.get("op")
    if op == "entry":
        return _valid_entry_fields(record, complete=True)
    if op == "edit":
        changes = record.get("set")
        return type(changes) is dict and _valid_entry_fields(changes, False)
    return op == "delete"


def _valid_segments(segments, longest, shortest=1):
    """Whether each of `segments` is an [int start, int end] pair within 1970-9999,
    `shortest` to `longest` seconds long (a timer paused in the second it started
    holds a segment of none)."""
    try:
        for start, end in segments:
            if (type(start) is not int or type(end) is not int or start < 0
                    or not shortest <= end - start <= longest or end > LAST_SECOND):
                return False
    except (TypeError, ValueError):  # a segment that is not a pair
        return False
    return True


def _valid_entry_fields(fields, complete):
    """Each field present is well formed; a complete entry also has exactly one
    form of time: clock `segments`, or a `date` with `seconds`.  (Written for
    speed: a full aggregation checks every record ever written.)"""
    segments = fields.get("segments")
    if segments is not None and not (type(segments) is list and segments
                                     and _valid_segments(segments, MAX_ROW_SECONDS)):
        return False
    seconds = fields.get("seconds")
    if seconds is not None and (type(seconds) is not int or not 0 < seconds <= MAX_ROW_SECONDS):
        return False
    day = fields.get("date")
    if day is not None and (type(day) is not str or not is_iso_date(day)):
        return False
    if (type(fields.get("issue", "")) is not str or type(fields.get("project", "")) is not str
            or type(fields.get("note", "")) is not str):
        return False
    if complete:
        return "issue" in fields and (segments is not None) != (seconds is not None and
                                                               day is not None)
    return True


def resolve_entries(records):
    """Entries by id after applying amendments in order (latest wins).

    Entries are the records themselves (with their "op" and "v" keys) until an
    amendment applies, which works on a copy.  A deleted id stays deleted even
    if its entry record appears again, so re-running an import never
    resurrects what the user removed."""
    entries = {}
    deleted = set()
    copied = set()
    for record in records:
        op, entry_id = record["op"], record["id"]
        if op == "entry":
            if entry_id not in entries and entry_id not in deleted:
                entries[entry_id] = record
        elif op == "edit":
            entry = entries.get(entry_id)
            if entry is not None:
                if entry_id not in copied:
                    entry = entries[entry_id] = dict(entry)
                    copied.add(entry_id)
                changes = record["set"]
                if "segments" in changes:
                    entry.pop("date", None)
                    entry.pop("seconds", None)
                if "seconds" in changes:
                    entry.pop("segments", None)
                entry.update(changes)
        elif op == "delete":
            entries.pop(entry_id, None)
            deleted.add(entry_id)
    return entries


def public_entry(entry, **extra):
    """An entry as shown to its owner (without the record bookkeeping keys)."""
    shown = {k: v for k, v in entry.items() if k not in ("op", "v")}
    shown.update(extra)
    return shown


def new_entry_id(day_iso, key=None, digits=8):
    """`YYYYMMDD-xxxxxxxx`; with an idempotency key the id is derived from it
    (importers use 12 hex digits: thousands of entries may share a day)."""
    suffix = sha256_hex(key.encode("utf-8"))[:digits] if key else os.urandom(4).hex()
    return day_iso.replace("-", "") + "-" + suffix


def day_of_entry_id(entry_id):
    if not is_entry_id(entry_id or ""):
        raise FlowForgeError("entry id %r is not valid (ids look like 20261122-1a2b3c4d; "
                             "see `flowforge entries`)" % entry_id, EXIT_USAGE)
    return "%s-%s-%s" % (entry_id[:4], entry_id[4:6], entry_id[6:8])


def data_home():
    """$XDG_DATA_HOME, or ~/.local/share (a relative value is ignored, per the spec)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    return base if os.path.isabs(base) else os.path.join(os.path.expanduser("~"), ".local", "share")


def repo_identity(repo):
    """The `repo_id` of the committed config (8 to 64 hex digits), the same in
    every clone of the repository; None where the config has none."""
    repo_id = repo.config.get("repo_id")
    return repo_id if isinstance(repo_id, str) and 8 <= len(repo_id) <= 64 \
        and _HEX.issuperset(repo_id) else None


def mirror_root(repo):
    """$XDG_DATA_HOME/flowforge/<repo id>/: outside the work tree, so that
    `git clean -fdx` or a deleted clone cannot take the private data along.
    The repo id is in the committed config, so a fresh clone finds it too."""
    repo_id = repo_identity(repo) or sha256_hex(repo.root.encode("utf-8"))[:16]
    return os.path.join(data_home(), "flowforge", repo_id)


MIRROR_STALE = "mirror-stale"   # marker in state/: the next aggregation syncs the whole mirror


class Mirror:
    """The out-of-tree copy of one private store, kept in step as it is written.

    A failing mirror never fails the command that wrote the private store (the
    write is done; failing would invite a retry that doubles it): the error is
    logged and the next aggregation copies whatever differs."""

    def __init__(self, store):
        self.store = store
        self.repo = store.repo
        self.dir = os.path.join(mirror_root(store.repo), store_key(store.user, store.store_id))

    def _best_effort(self, what, func):
        try:
            func()
            return True
        except (OSError, FlowForgeError) as e:
            log_event(self.repo, "mirror-failed", what=what, error=str(e))
            try:
                atomic_write(os.path.join(self.repo.state, MIRROR_STALE), b"", 0o600)
            except (OSError, FlowForgeError):
                pass
            return False

    def _copy(self, rel, data, sync_dir=True, durable=True):
        path = os.path.join(self.dir, rel)
        makedirs_private(os.path.dirname(path))
        atomic_write(path, data, 0o600, sync_dir=sync_dir, durable=durable)
        return os.path.dirname(path)

    def put(self, rel, data, durable=True):
        return self._best_effort(rel, lambda: self._copy(rel, data, durable=durable))

    def appended(self, day, data, size_before):
        """Mirror an append to a day file: append the same bytes when the copy is
        exactly the file's old content, else copy the whole file.  Synced (unlike
        the timer's copy, which every aggregation compares by content): an
        aggregation compares only the days changed since the last one, so a copy
        that a power cut took back after that would stay short."""
        rel = os.path.join("time", "daily", day + ".jsonl")

        def do():
            path = os.path.join(self.dir, rel)
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                size = -1
            if size == size_before:
                append_durable(path, data)
            else:
                self._copy(rel, read_bytes(self.store.day_path(day)))
        return self._best_effort(rel, do)

    def sync(self, days=None, sizes=None):
        """Copy what differs: the given days (None: everything), settings, timer,
        local audit chain.  Returns the number of files copied.  `sizes`: {day:
        size} of day files just read (an aggregation's), not to stat them again."""
        stale = os.path.join(self.repo.state, MIRROR_STALE)
        read_all = days is None and sizes is not None   # the caller read every day file
        # A whole copy is owed after a failed copy (the marker) or to a mirror that
        # no whole copy made (no mirror.json: new, deleted, or begun again by a put)
        if os.path.exists(stale) or not os.path.isfile(os.path.join(self.dir, "mirror.json")):
            days = None   # ... whatever the caller read
        copied = [0]

        def do():
            if days is not None:
                wanted = days
            else:   # everything: the days just read (under the store lock), or a listing
                wanted = sorted(sizes) if read_all else self.store.days()
            daily = os.path.join("time", "daily", "")
            known = {day + ".jsonl": size for day, size in (sizes or {}).items()}
            copies = {}   # the mirror's day files and sizes: one directory scan
            if len(wanted) > 8:
                try:
                    with os.scandir(os.path.join(self.dir, daily)) as scan:
                        copies = {e.name: e.stat().st_size
                                  for e in scan if e.is_file(follow_symlinks=False)}
                except FileNotFoundError:
                    pass
            # A day file of its copy's size is its copy (day files only grow): one
            # comparison a day, no path made for it (a full run has 10^3 a store).
            files = [daily + name for name in (day + ".jsonl" for day in wanted)
                     if name not in known or known[name] != copies.get(name)]
            files += ["config.json", os.path.join("time", "current.json"),
                      os.path.join("time", "far.json"), "audit.jsonl"]
            pending = []
            for rel in files:
                name = rel[len(daily):] if rel.startswith(daily) else None
                source = os.path.join(self.store.dir, rel)
                target = os.path.join(self.dir, rel)
                try:
                    size = known[name] if name in known else os.path.getsize(source)
                    same_size = (copies[name] if name in copies else os.path.getsize(target)) == size
                except FileNotFoundError:
                    if not os.path.exists(source):
                        continue
                    same_size = False
                # Day files only grow (edits are appended; a salvage shrinks one):
                # for them an equal size is an equal copy, a stat is enough.
                if same_size and rel.endswith(".jsonl") and rel != "audit.jsonl":
                    continue
                data = read_bytes(source)
                try:
                    if same_size and read_bytes(target) == data:
                        continue
                except (FileNotFoundError, FlowForgeError):
                    pass
                self._copy(rel, data, sync_dir=False, durable=False)
                pending.append(target)
            # Synced after copying: a few files one by one (then their directories);
            # many (a first mirror of years of history) with one os.sync(), as an
            # fsync per new file costs ~1 ms.  (A copy torn by a crash before that
            # differs in size from its file, and the next sync copies it again.)
            if len(pending) >= 64:
                os.sync()
            else:
                for path in pending:
                    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                for directory in {os.path.dirname(path) for path in pending}:
                    fsync_dir(directory)
            copied[0] = len(pending)
            if copied[0] or not os.path.exists(os.path.join(self.dir, "mirror.json")):
                self._copy("mirror.json", canonical_bytes({
                    "schema": 1, "root": self.repo.root, "user": self.store.user,
                    "store": self.store.store_id, "updated": now()}))
            if days is None and os.path.exists(stale):
                os.unlink(stale)
        self._best_effort("sync", do)
        return copied[0]


def find_mirrors(repo, user):
    """[(store id, directory, info)] of this user's mirrors for this repository;
    the one made from this very work tree first."""
    root = mirror_root(repo)
    found = []
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return found
    for name in names:
        owner, sep, store_id = name.rpartition("--")
        if sep and owner == user and re.fullmatch(r"[0-9a-f]{10}", store_id):
            try:
                info = load_json(read_bytes(os.path.join(root, name, "mirror.json")))
            except (OSError, ValueError, FlowForgeError):
                info = {}
            found.append((store_id, os.path.join(root, name), info))
    found.sort(key=lambda item: item[2].get("root") != repo.root)
    return found


class PrivateStore:
    """One developer's private data in this clone: .flowforge/user/<name>/."""

    def __init__(self, repo, user, directory=None):
        self.repo = repo
        self.user = user
        self.dir = directory or os.path.join(repo.users, user)  # another: a recovery view
        self.config_path = os.path.join(self.dir, "config.json")
        self.time_dir = os.path.join(self.dir, "time")
        self.daily = os.path.join(self.time_dir, "daily")
        self.timer_path = os.path.join(self.time_dir, "current.json")
        self.far_path = os.path.join(self.time_dir, "far.json")
        self.changes_path = os.path.join(repo.aggstate, user + ".changes.jsonl")
        self.reach_path = (None if directory else
                           os.path.join(repo.state, "cache", "reach", user + ".rec"))
        self._settings = None
        self._zone = None
        self._clock = None
        self._salvaged = None
        self._reach_lines = 0

    # -- settings -----------------------------------------------------------

    def exists(self):
        return os.path.isfile(self.config_path)

    def create(self, timezone=None):
        """Create the store (0700 directories, a random store id); idempotent.
        Under the store's lock, with a re-check: two first commands at once
        (`log` and `aggregate`, say) must not make two store ids, which would
        bill the user twice."""
        if timezone:
            load_timezone(timezone)
        if self.exists() and not timezone:
            return False
        with self.lock():
            self._settings = None
            return self._create(timezone)

    def _create(self, timezone):
        if not self.exists():
            self.refuse_if_data_elsewhere()
        for path in (self.daily, os.path.join(self.time_dir, "archive")):
            makedirs_private(path)
        os.chmod(self.dir, 0o700)
        if not self.exists():
            settings = {"schema": USER_SCHEMA, "user": self.user, "store": os.urandom(5).hex(),
                        "timezone": timezone or system_timezone_name(), "created": now()}
            atomic_write(self.config_path, canonical_bytes(settings), 0o600)
            self._settings = None
            self.mirror.sync()
            return True
        if timezone and self.settings()["timezone"] != timezone:
            settings = dict(self.settings(), timezone=timezone)
            atomic_write(self.config_path, canonical_bytes(settings), 0o600)
            self._settings = self._zone = self._clock = None
            self.mirror.put("config.json", canonical_bytes(settings))
        return False

    def refuse_if_data_elsewhere(self):
        """For a store that does not exist: its data may still be somewhere, and
        neither a new store nor "nothing recorded" may hide it."""
        self._refuse_to_hide_a_mirror()
        self._refuse_to_orphan_days()

    def _refuse_to_orphan_days(self):
        """Day files without the settings that name their store: a new store id
        over them would aggregate the same entries a second time under a new
        ledger ref.  The settings come back from the mirror, or by hand."""
        try:
            days = [n for n in os.listdir(self.daily) if n.endswith(".jsonl")]
        except (FileNotFoundError, NotADirectoryError):
            return
        if days:
            raise FlowForgeError(
                "the private store of %s has %d day file(s) but no settings (%s): run `flowforge "
                "recover reconstruct --from-mirror`, then `flowforge recover deploy`; refusing to "
                "give its entries a new store id" % (self.user, len(days),
                                                     self.repo.rel(self.config_path)), EXIT_DATA)

    def _refuse_to_hide_a_mirror(self):
        """After `git clean -fdx` (or a re-clone into the same path) the store is
        gone but its mirror is not; a new empty store would hide that data."""
        for _, directory, info in find_mirrors(self.repo, self.user):
            if info.get("root") != self.repo.root:
                continue  # another clone of the same repository on this machine
            daily = os.path.join(directory, "time", "daily")
            if os.path.isdir(daily) and os.listdir(daily):
                raise FlowForgeError(
                    "the private store of %s is missing from this work tree but its mirror %s "
                    "holds its data: run `flowforge recover reconstruct --from-mirror`, then "
                    "`flowforge recover deploy` (to start an empty store instead, move that "
                    "mirror away)" % (self.user, directory), EXIT_DATA)

    def settings(self):
        if self._settings is None:
            try:
                settings = load_json(read_bytes(self.config_path))
                store_id = str(settings.get("store", "")) if isinstance(settings, dict) else ""
                if len(store_id) != 10 or not _HEX.issuperset(store_id):
                    raise ValueError("no valid store id")
                if settings.get("schema", 0) > USER_SCHEMA:
                    raise ValueError("written by a newer FlowForge")
            except FileNotFoundError:
                raise FlowForgeError("no private store for %s here: run `flowforge init`"
                                     % self.user, EXIT_CONFIG)
            except ValueError as e:
                raise CorruptFile(self.repo.rel(self.config_path), "%s; run `flowforge "
                                  "recover assess`" % e)
            self._settings = settings
        return self._settings

    @property
    def store_id(self):
        return self.settings()["store"]

    @property
    def mirror(self):
        return Mirror(self)

    @property
    def tz_name(self):
        return self.settings().get("timezone") or "UTC"

    @property
    def zone(self):
        if self._zone is None:
            self._zone = Zone(self.tz_name)
        return self._zone

    @property
    def tz(self):
        return self.zone.tzinfo

    @property
    def clock(self):
        if self._clock is None:
            self._clock = DayClock(self.zone)
        return self._clock

    def lock(self, timeout=10.0):
        """Serialises every read-modify-write of this store (timers, appends, edits)."""
        return self.repo.lock("store." + self.user, timeout, "the private store of %s" % self.user)

    # -- day files ----------------------------------------------------------

    def day_path(self, day_iso):
        return os.path.join(self.daily, day_iso + ".jsonl")

    # -- the list of changed days -------------------------------------------
    #
    # Every write of a day file is preceded by a durable line naming its day in
    # .flowforge/state/aggregate/<user>.changes.jsonl, so that an incremental
    # aggregation stats the days named there instead of every day file of
    # years.  The list's first line is a random token, which the aggregation
    # state records: a list deleted or begun anew does not match it, and the
    # aggregation looks at every day file.  Schema 2 of the store's settings
    # says that its writes are listed: a FlowForge that does not keep the list
    # refuses such a store ("written by a newer FlowForge") instead of writing
    # past it.

    def note_changes(self, days):
        """Name `days` in the list of changed days, durably, before their files
        change.  The caller holds the store lock.  Upgrades a schema-1 store.  A
        note is never taken back, not even when the write it announces fails:
        that write may have got as far as the disk (an fsync of its directory
        failing, say), and a day named for nothing costs a stat."""
        if self.exists() and self.settings().get("schema", 1) < 2:
            self._settings = None   # as they are now, under the lock, not as first read
        if self.exists() and self.settings().get("schema", 1) < 2:
            settings = dict(self.settings(), schema=USER_SCHEMA)
            atomic_write(self.config_path, canonical_bytes(settings), 0o600)
            self._settings = None
            self.mirror.put("config.json", canonical_bytes(settings))
        lines = "".join('"%s"\n' % d for d in sorted(set(days))).encode()
        try:
            regular = (os.lstat(self.changes_path).st_mode & 0o170000) == 0o100000
        except FileNotFoundError:
            regular = None
        if regular is False:   # something else planted there: out of the way, a new list
            os.replace(self.changes_path, "%s.not-a-list-%s" % (self.changes_path,
                                                               os.urandom(4).hex()))
            log_event(self.repo, "changes-list-replaced", user=self.user)
        if not regular:
            makedirs_private(os.path.dirname(self.changes_path))
            lines = canonical_bytes({"list": os.urandom(8).hex()}) + lines
        append_durable(self.changes_path, lines)

    def read_changes(self, create=False):
        """(bytes read, {days named} or None if the list is damaged, its token or
        None).  `create`: begin a list if there is none (the caller holds the
        store lock), so that an aggregation knows the token it records."""
        try:
            raw = read_bytes(self.changes_path)
        except FileNotFoundError:
            if not create:
                return 0, set(), None
            makedirs_private(os.path.dirname(self.changes_path))
            raw = canonical_bytes({"list": os.urandom(8).hex()})
            append_durable(self.changes_path, raw)
        except (OSError, FlowForgeError):
            return 0, None, None
        lines = raw.split(b"\n")
        try:
            token = load_json(lines[0]).get("list")
        except (ValueError, AttributeError, RecursionError):
            token = None
        if lines.pop() != b"" or not isinstance(token, str):
            return len(raw), None, None   # torn (a note that may or may not have come)
        named = {line[1:-1].decode("ascii", "replace") for line in lines[1:]
                 if line[:1] == line[-1:] == b'"'}
        if len(named) != len(set(lines[1:])) or not all(is_iso_date(d) and d.isascii()
                                                         for d in named):
            return len(raw), None, None
        return len(raw), named, token

    def forget_changes(self, size, renew=False):
        """Drop what the first `size` bytes of the list named (an aggregation
        took it in), keeping its token (`renew`, for a damaged list: a new one)
        and what was named since.  The caller holds the store lock."""
        try:
            raw = read_bytes(self.changes_path)
        except FileNotFoundError:
            return
        head = raw[:raw.find(b"\n") + 1]
        if renew:
            head = canonical_bytes({"list": os.urandom(8).hex()})
        if size and len(raw) >= size and (renew or raw[size:] != raw[len(head):]):
            atomic_write(self.changes_path, head + raw[size:], 0o600)

    def day_stats(self):
        """{day: [size, mtime_ns]} of every day file, from one directory scan:
        what an incremental aggregation looks at of years of history."""
        found = {}
        try:
            scan = os.scandir(self.daily)
        except FileNotFoundError:
            return found
        with scan:
            for entry in scan:
                name = entry.name
                if len(name) == 16 and name.endswith(".jsonl") and is_iso_date(name[:10]):
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:   # gone since the listing
                        continue
                    found[name[:10]] = [st.st_size, st.st_mtime_ns]
        return found

    def days(self):
        """Days that have a file, sorted."""
        try:
            names = os.listdir(self.daily)
        except FileNotFoundError:
            return []
        return sorted(name[:10] for name in names
                      if len(name) == 16 and name.endswith(".jsonl") and is_iso_date(name[:10]))

    def read_day(self, day_iso):
        """All records of one day file.  The caller holds the store lock.

        A torn or corrupted line is never skipped silently: the file is copied
        into quarantine, the good lines are written back, and a warning names
        the quarantined copy."""
        return self.read_day_and_stat(day_iso)[0]

    def read_day_and_stat(self, day_iso):
        """(records, [size, mtime_ns]) of one day file, as it is after any salvage."""
        records, st = self._read_day_and_stat_result(day_iso)
        return records, (None if st is None else [st.st_size, st.st_mtime_ns])

    def _read_day_and_stat_result(self, day_iso):
        """(records, os.stat_result or None) of one day file, after any salvage."""
        path = self.day_path(day_iso)
        try:
            raw, st = read_bytes_and_stat(path)
        except FileNotFoundError:
            return [], None
        records = self._parse_day(path, raw)
        if self._salvaged == path:  # rewritten with its good lines
            st = os.stat(path)
        return records, st

    def read_all_days(self, batch_bytes=1 << 16):
        """(day, records, [size, mtime_ns]) of every day file, as read_day_and_stat
        gives them, with the per-file work done once for many: the files of up to
        `batch_bytes` are checked by crc and parsed by one json scan (a full
        aggregation of years reads ~10^5 files).  Small batches: the records of a
        million entries are never held at once, and a batch of megabytes was
        slower than one of kilobytes (0.8 s more for 300,000 entries).  A file
        that fails any check is read again on its own, the careful way."""
        flags = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0)
        crc32, fstat, read, close = zlib.crc32, os.fstat, os.read, os.close
        prefix = os.path.join(self.daily, "")
        days, stats, parts, counts, odd, size = [], {}, [], [], [], 0
        for day in self.days() + [None]:
            if day is None or size >= batch_bytes:
                yield from self._parsed_batch(days, stats, parts, counts, odd)
                days, stats, parts, counts, odd, size = [], {}, [], [], [], 0
                if day is None:
                    return
            try:
                fd = os.open(prefix + day + ".jsonl", flags)
            except OSError:   # gone since the listing, a symlink, ...: the careful way
                odd.append(day)
                continue
            try:
                st = fstat(fd)
                raw = read(fd, st.st_size + 1) if st.st_mode & 0o170000 == 0o100000 else None
            finally:
                close(fd)
            lines = raw.split(b"\n") if raw is not None and len(raw) == st.st_size else [b"?"]
            try:
                if lines.pop() != b"" or not all(line[8:9] == b" " and int(line[:8], 16)
                                                 == crc32(line[9:]) for line in lines):
                    raise ValueError("torn or damaged")
            except ValueError:
                odd.append(day)
                continue
            days.append(day)
            stats[day] = [st.st_size, st.st_mtime_ns]
            parts += [line[9:] for line in lines]
            counts.append(len(lines))
            size += len(raw)

    def _parsed_batch(self, days, stats, parts, counts, odd):
        """read_all_days' records of one batch of files."""
        try:
            records = load_json(b"[" + b",".join(parts) + b"]")
        except (ValueError, RecursionError):
            records = None
        # as many values as lines (a line of two, `{..},{..}`, would shift the days)
        if records is None or len(records) != len(parts) \
                or not all(_valid_record(r) for r in records):
            odd = odd + days   # one of them is odd: each on its own
        else:
            at = 0
            for day, count in zip(days, counts):
                yield day, records[at:at + count], stats[day]
                at += count
        for day in sorted(odd):
            records, stat = self.read_day_and_stat(day)
            if stat is not None:
                yield day, records, stat

    def _parse_day(self, path, raw):
        """Records of a day file.  Fast path: check every line's crc32, then one
        json.loads for the whole file; anything odd takes the careful path."""
        lines = raw.split(b"\n")
        if lines.pop() == b"":
            crc32 = zlib.crc32
            try:
                for line in lines:
                    if line[8:9] != b" " or int(line[:8], 16) != crc32(line[9:]):
                        raise ValueError
                records = load_json(b"[" + b",".join([line[9:] for line in lines]) + b"]")
                if all(_valid_record(r) for r in records):
                    return records
            except ValueError:
                pass
        return self._parse_day_carefully(path, raw)

    @staticmethod
    def _scan_day(raw):
        """(records, good lines, problems), line by line."""
        records, good, bad = [], [], []
        lines = raw.split(b"\n")
        for number, line in enumerate(lines[:-1], 1):
            try:
                record = decode_record(line)
                if not _valid_record(record):
                    raise ValueError("not a valid record")
            except ValueError as e:
                bad.append("line %d: %s" % (number, e))
                continue
            records.append(record)
            good.append(line + b"\n")
        if lines[-1] != b"":
            bad.append("line %d: torn (no end of line)" % len(lines))
        return records, good, bad

    def check_day(self, day_iso):
        """The problems of one day file, repairing nothing (for `recover assess`)."""
        try:
            return self._scan_day(read_bytes(self.day_path(day_iso)))[2]
        except FileNotFoundError:
            return []

    def _parse_day_carefully(self, path, raw):
        records, good, bad = self._scan_day(raw)
        if bad:
            self._salvage(path, b"".join(good), "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""),
                          len(bad))
        return records

    def _salvage(self, path, good, reason, count):
        item = Quarantine(self.repo).put(path, reason, copy=True)
        self.note_changes([os.path.basename(path)[:10]])
        atomic_write(path, good, 0o600)
        self._salvaged = path
        self.mirror.put(os.path.relpath(path, self.dir), good)
        warn("%s: %s; the original is quarantined as %s and %d damaged line(s) were set "
             "aside (see `flowforge quarantine list`)" % (self.repo.rel(path), reason, item, count))

    def append(self, day_iso, records, bulk=False):
        """Append records to a day file durably.  The caller holds the store lock.

        `bulk` (imports): no directory fsync and no mirror copy per file; the
        caller names the days first (note_changes) and calls finish_bulk() once
        at the end."""
        self.append_lines(day_iso, [encode_record(r if r.get("v") == RECORD_SCHEMA
                                                  else dict(r, v=RECORD_SCHEMA)) for r in records], bulk)

    def append_lines(self, day_iso, lines, bulk=False):
        """append() of records already encoded (encode_record)."""
        makedirs_private(self.daily)
        path = self.day_path(day_iso)
        try:
            with open(path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell():
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a torn tail from an earlier crash
                        f.seek(0)
                        self._parse_day(path, f.read())
        except FileNotFoundError:
            pass
        data = b"".join(lines)
        if not bulk:   # (a bulk writer names its days once, before it starts)
            self.note_changes([day_iso])
        size_before = append_durable(path, data, durable=not bulk)
        if not bulk:
            self.mirror.appended(day_iso, data, size_before)

    def finish_bulk(self, days):
        """After bulk appends: fsync the files, then their directory once; leave
        the mirror to the next aggregation (a stale marker), which copies
        whatever differs -- rather than fsync a mirror copy of every file."""
        if len(days) >= 64:
            os.sync()   # (as Mirror.sync: an fsync per new file costs ~0.2-1 ms)
        else:
            for day in days:
                fd = os.open(self.day_path(day), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(self.daily)
        atomic_write(os.path.join(self.repo.state, MIRROR_STALE), b"", 0o600)

    def entries_of_day(self, day_iso):
        return resolve_entries(self.read_day(day_iso))

    def entries_near(self, first_day, last_day):
        """{id: (day file, entry)} of every entry that can have time from
        `first_day` to `last_day`: those in the day files up to REACH_DAYS
        either side (of the files outside those days, only the entries with
        time beyond their file's day).  The caller holds the store lock."""
        low, high = shift_day(first_day, -REACH_DAYS), shift_day(last_day, REACH_DAYS)
        if high <= shift_day(low, 62):  # a few probes beat listing years of day files
            days = [shift_day(low, n) for n in range(_day_count(low, high))]
        else:
            days = [d for d in self.days() if low <= d <= high]
        far = self.far_entries()
        days += sorted({day for day in far.values() if not low <= day <= high})
        found, reach, noted = {}, None, []
        for day in days:
            if first_day <= day <= last_day or day in far.values() or not self.reach_path:
                entries = self.entries_of_day(day)
            else:   # only its entries with time on other days can have time on those asked
                if reach is None:
                    reach = self._read_reach()
                entries = self._entries_reaching(day, reach, noted)
            for entry_id, entry in entries.items():
                if low <= day <= high or entry_id in far:
                    found[entry_id] = (day, entry)
        if noted:
            self._note_reach(reach, noted)
        return found

    # A heavy user's day file holds a few hundred records, and "the entries
    # with time on D" reads five of them, though few entries have time beyond
    # their own day (past midnight, or after a change of time zone).  So once
    # a file has been read for other days than its own, the entries it holds
    # that have time on other days are kept in .flowforge/state/cache/reach/
    # <user>.rec with its size, mtime, inode and ctime (a file replaced with
    # the same size and mtime has another inode, or a new ctime, which utime
    # cannot set back) and the store's time zone; while those match, they
    # stand for the file when other days are asked for (entries with no time
    # on the days asked for are nobody's business).  A cache: a line that
    # fails its crc, is of another schema or holds what is not an entry, or a
    # file that does not match, is read again.

    REACH_DAYS_KEPT = 16   # the newest files' lines, when the cache is rewritten
    REACH_SCHEMA = 1

    def _read_reach(self):
        """{day: [size, mtime_ns, inode, ctime_ns, zone, {id: entry with time on other days}]}."""
        found = {}
        try:
            raw = read_bytes(self.reach_path)
        except (OSError, FlowForgeError):
            return found
        lines = raw.split(b"\n")
        # a torn last line (a crash mid-append): the next append would join it
        self._reach_lines = len(lines) - 1 if not lines[-1] else 2 * self.REACH_DAYS_KEPT
        for line in lines[:-1]:
            try:
                record = decode_record(line)
            except ValueError:
                continue
            note = record.get("reach")
            if record.get("schema") == self.REACH_SCHEMA and type(note) is list and len(note) == 7 \
                    and type(note[0]) is str and is_iso_date(note[0]) and type(note[6]) is dict \
                    and all(type(entry) is dict and entry.get("id") == entry_id
                            and entry.get("op") == "entry" and _valid_record(entry)
                            for entry_id, entry in note[6].items()):
                found[note[0]] = note[1:]
        return found

    def _entries_reaching(self, day, reach, noted):
        """The entries of `day`'s file that have time on other days."""
        try:
            st = os.lstat(self.day_path(day))
        except FileNotFoundError:
            return {}
        known = reach.get(day)
        if known and known[:5] == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns,
                                   self.tz_name] and st.st_mode & 0o170000 == 0o100000:
            return known[5]
        records, st = self._read_day_and_stat_result(day)
        split = self.clock.split
        entries = {entry_id: entry for entry_id, entry in resolve_entries(records).items()
                   if any(d != day for d, _ in entry_parts(entry, split))}
        if st is not None:
            noted.append([day, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns,
                          self.tz_name, entries])
        return entries

    def _note_reach(self, reach, noted):
        """Append the new lines to the reach cache, or rewrite it with the
        newest files' once it holds twice as many (or ends in a torn line); a
        failure only costs the next command time.  The caller holds the store
        lock."""
        schema = self.REACH_SCHEMA
        lines = b"".join(encode_record({"reach": note, "schema": schema}) for note in noted)
        try:
            makedirs_private(os.path.dirname(self.reach_path))
            if self._reach_lines + len(noted) > 2 * self.REACH_DAYS_KEPT:
                reach.update((note[0], note[1:]) for note in noted)
                lines = b"".join(encode_record({"reach": [day] + reach[day], "schema": schema})
                                 for day in sorted(reach)[-self.REACH_DAYS_KEPT:])
                atomic_write(self.reach_path, lines, 0o600, durable=False)
            else:
                append_durable(self.reach_path, lines, durable=False)
        except (OSError, FlowForgeError):
            pass

    def far_entries(self):
        """{entry id: day file} of entries that may hold time beyond REACH_DAYS
        of their day file (an edit moved them).  A listed id that no longer
        reaches far is harmless: views look at the entry's real time."""
        try:
            doc = load_json(read_bytes(self.far_path))
            far = doc["entries"] if isinstance(doc, dict) else None
            if isinstance(far, dict) and all(isinstance(v, str) and is_iso_date(v)
                                             for v in far.values()):
                return far
            raise ValueError("not a map of entry ids to days")
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, RecursionError, FlowForgeError) as e:
            warn("%s is damaged (%s): views may miss an entry moved far from its day; run "
                 "`flowforge aggregate --full` to see the totals" % (self.repo.rel(self.far_path), e))
            return {}

    def note_far(self, entry_id, day_iso):
        """Record that entry `entry_id` (in `day_iso`'s file) reaches far; written
        before the edit that moves it, so a crash leaves at most a harmless note."""
        far = self.far_entries()
        if far.get(entry_id) == day_iso:
            return
        far[entry_id] = day_iso
        data = canonical_bytes({"schema": 1, "entries": far})
        atomic_write(self.far_path, data, 0o600)
        self.mirror.put(os.path.join("time", "far.json"), data)

    def find_entry(self, entry_id):
        day = day_of_entry_id(entry_id)
        entry = self.entries_of_day(day).get(entry_id)
        if entry is None:
            raise FlowForgeError("no entry %s (see `flowforge entries`)" % entry_id)
        return day, entry

    def has_record(self, day_iso, entry_id):
        """Whether an entry with this id was ever appended (cheap: one substring scan)."""
        try:
            raw = read_bytes(self.day_path(day_iso))
        except FileNotFoundError:
            return False
        needle = b'"id":"%s"' % entry_id.encode("ascii")
        if needle not in raw:
            return False
        return any(r["id"] == entry_id and r["op"] == "entry" for r in self._parse_day(
            self.day_path(day_iso), raw))

    # -- the timer ----------------------------------------------------------

    def load_timer(self):
        """The running or paused timer, or None.  The caller holds the store lock.

        `stop` appends the entry first and clears the timer second.  If a crash
        came in between, the entry id is already in its day file: the timer is
        cleared here, so the time is never lost and never counted twice."""
        try:
            raw = read_bytes(self.timer_path)
        except FileNotFoundError:
            return None
        try:
            doc = load_json(raw)
            if not isinstance(doc, dict) or doc.get("schema", 0) > TIMER_SCHEMA:
                raise ValueError("unknown timer format")
            timer = doc.get("timer")
            if timer is not None and not _valid_timer(timer):
                raise ValueError("invalid timer")
        except ValueError as e:
            item = Quarantine(self.repo).put(self.timer_path, "timer state: %s" % e)
            raise FlowForgeError("the timer state %s was damaged and was set aside as %s; "
                                 "the running timer is lost: start it again with --at"
                                 % (self.repo.rel(self.timer_path), item), EXIT_DATA)
        if timer is not None and self.has_record(timer["day"], timer["id"]):
            self.save_timer(None, recorded=True)
            log_event(self.repo, "timer-healed", user=self.user, id=timer["id"])
            debug("timer %s had already been recorded; cleared it" % timer["id"])
            return None
        return timer

    def save_timer(self, timer, recorded=False):
        """Write the timer state (None: no timer).  fsyncs: the file and its
        directory, so that a started, paused or resumed timer survives a crash;
        `recorded` (clearing a timer whose entry is in its day file already):
        the file only -- should the rename be lost, the old timer comes back and
        load_timer clears it again.  The mirror's copy is not synced: every
        aggregation compares it with this file and rewrites it if it differs."""
        makedirs_private(self.time_dir)
        data = canonical_bytes({"schema": TIMER_SCHEMA, "timer": timer})
        atomic_write(self.timer_path, data, 0o600, sync_dir=not recorded)
        self.mirror.put(os.path.join("time", "current.json"), data, durable=False)


def _valid_timer(timer):
    return (isinstance(timer, dict) and isinstance(timer.get("id"), str)
            and is_entry_id(timer["id"])
            and isinstance(timer.get("day"), str) and isinstance(timer.get("issue"), str)
            and isinstance(timer.get("segments"), list)
            and _valid_segments(timer["segments"], LAST_SECOND, 0)   # a forgotten timer's may be long
            and (timer.get("running_since") is None
                 or (type(timer["running_since"]) is int and 0 <= timer["running_since"] <= LAST_SECOND))
            and (timer.get("segments") or timer.get("running_since") is not None))


def timer_seconds(timer, at):
    total = sum(end - start for start, end in timer["segments"])
    if timer.get("running_since") is not None:
        total += max(0, at - timer["running_since"])
    return total


def timer_last_point(timer):
    if timer.get("running_since") is not None:
        return timer["running_since"]
    return timer["segments"][-1][1]


class Timers:
    """Timer commands of one user.  Each runs under the store lock and returns
    (result dict for --json, list of messages for people).

    Every entry is admitted before it is written (`admit`): time that cannot be
    -- overlapping another timed entry of the same person, or a day holding
    more hours than it has -- is refused, because it would be billed twice."""

    def __init__(self, store, now_ts):
        self.store = store
        self.now = now_ts

    def check_time(self, at, what):
        if at > self.now + FUTURE_TOLERANCE:
            raise FlowForgeError("%s %s is in the future" % (what, self.show(at)), EXIT_USAGE)
        return at

    def show(self, ts):
        return self.store.zone.clock_text(ts)

    def span(self, segments):
        """`2026-11-20 09:00-10:30` (or `... 23:00 to 2026-11-21 01:30`) for messages."""
        first, last = self.show(segments[0][0])[:16], self.show(segments[-1][1])[:16]
        return "%s-%s" % (first, last[11:]) if first[:10] == last[:10] else "%s to %s" % (first, last)

    # -- admission ----------------------------------------------------------

    def admit(self, entry, allow_overlap=False, timer=None, what=None):
        """Check a new or changed entry against this user's other time; the
        caller holds the store lock and writes `entry` to the day file its id
        names (an edit that moves it further than REACH_DAYS notes it in
        far.json).
        `timer`: the running or paused timer, which counts as timed work too.
        With `allow_overlap` an overlapping entry is marked, not refused.
        `what`: the entry in words for the message (default: its span)."""
        clock = self.store.clock
        parts = entry_parts(entry, clock.split)
        days = sorted({day for day, _ in parts})
        near = self.store.entries_near(days[0], days[-1])
        near.pop(entry["id"], None)
        if entry.get("segments"):
            clash, other_id = self._overlap(entry, near, timer)
            if clash and not allow_overlap:
                fix = ("`flowforge edit %s --start/--end`" % other_id if other_id
                       else "`flowforge stop --at TIME`")
                raise FlowForgeError(
                    "%s overlaps %s: change the times, fix that one (%s), or give --allow-overlap "
                    "if you really worked on both at once" % (what or self.span(entry["segments"]),
                                                              clash, fix), EXIT_DATA)
            if clash or entry.get("overlap"):
                entry["overlap"] = bool(clash)
        recorded = {}
        for _, other in near.values():
            for day, seconds in entry_parts(other, clock.split):
                recorded[day] = recorded.get(day, 0) + seconds
        adding = {}
        for day, seconds in parts:
            adding[day] = adding.get(day, 0) + seconds
        for day in sorted(adding):
            length = clock.day_length(day)
            if recorded.get(day, 0) + adding[day] > length:
                raise FlowForgeError(
                    "%s would hold %s of recorded time, more than the %s it has (%s recorded, "
                    "this adds %s): see `flowforge entries --date %s`"
                    % (day, exact_duration(recorded.get(day, 0) + adding[day]),
                       exact_duration(length), exact_duration(recorded.get(day, 0)),
                       exact_duration(adding[day]), day), EXIT_DATA)
        return entry

    def admit_batch(self, times, record_of, allow_overlap=False, timer=None, carry=None):
        """`admit` for many new entries at once (an import), in one pass over
        their days.  `times`: each entry as (start, end, True) for clock
        times, or (date, seconds, False) for seconds on a local date, in the
        order they are taken; `record_of(position)`: that entry as a record (for
        the messages only).  An entry that overlaps an earlier one, or a recorded
        entry, is refused (marked instead with `allow_overlap`), as is one that
        would fill a day beyond its hours; `timer`, the running or paused one,
        counts as timed work too.  Returns ([(position, why not)], [positions
        of entries to mark overlapping]).  The caller holds the store lock.

        `carry` lets an import admit its entries a slice of time at a time, in
        time order, without holding them all: {"seconds": {day: seconds the
        earlier slices admitted}, "latest": (end, segments) or None}, read and
        updated here, so that the slices together admit what one call would."""
        from bisect import bisect_left
        if not times:
            return [], []
        clock = self.store.clock
        split, day_length = clock.split, clock.day_length
        parts = [split(start, end) if is_timed else ((start, end),) for start, end, is_timed in times]
        days = sorted({day for p in parts for day, _ in p})
        recorded, starts, reach = {}, [], []
        timed = []
        for other_id, (_, other) in self.store.entries_near(days[0], days[-1]).items():
            for day, seconds in entry_parts(other, split):
                recorded[day] = recorded.get(day, 0) + seconds
            for start, end in other.get("segments") or ():
                timed.append((start, end, other_id, other))
        if timer is not None:
            for start, end in self._timer_spans(timer):
                timed.append((start, end, None, timer))
        timed.sort(key=lambda t: t[0])
        best = None
        for start, end, other_id, other in timed:   # reach[i]: the latest end among timed[:i + 1]
            if best is None or end > best[0]:
                best = (end, other_id, other)
            starts.append(start)
            reach.append(best)
        refused, overlapping = [], []
        latest, earlier = None, {}   # (end, segments) of the admitted new entry that ends last
        if carry is not None:
            latest, earlier = carry["latest"], carry["seconds"]
            for day in days:
                recorded[day] = recorded.get(day, 0) + earlier.get(day, 0)
        for position, (start, end, is_timed) in enumerate(times):
            clash = None
            if is_timed:
                i = bisect_left(starts, end) - 1   # recorded segments starting before this ends
                if i >= 0 and reach[i][0] > start:
                    record = record_of(position)
                    if reach[i][1] is None:
                        clash = self._overlap(record, {}, timer)[0] or "the timer"
                    else:
                        clash = self._overlap(record, {reach[i][1]: (None, reach[i][2])}, None)[0] \
                            or "entry %s" % reach[i][1]
                elif latest is not None and latest[0] > start:
                    clash = "%s in the same import" % self.span(latest[1])
            if (end - start if is_timed else end) > MAX_ENTRY_SECONDS:
                refused.append((position, "%s is longer than 24h" % self.describe(record_of(position))))
                continue
            if clash and not allow_overlap:
                refused.append((position, "%s overlaps %s" % (self.span([[start, end]]), clash)))
                continue
            full = None
            for day, seconds in parts[position]:
                if recorded.get(day, 0) + seconds > day_length(day):
                    full = day
                    break
            if full:
                refused.append((position, "%s would fill %s beyond its %s" % (
                    self.describe(record_of(position)), full, format_duration(day_length(full)))))
                continue
            if clash:
                overlapping.append(position)
            for day, seconds in parts[position]:
                recorded[day] = recorded.get(day, 0) + seconds
                earlier[day] = earlier.get(day, 0) + seconds
            if is_timed and (latest is None or end > latest[0]):
                latest = (end, [[start, end]])
        if carry is not None:
            carry["latest"] = latest
        return refused, overlapping

    def _timer_spans(self, timer):
        """The timer's time so far as segments (a running one: up to now)."""
        spans = [list(s) for s in timer["segments"] if s[1] > s[0]]
        if timer.get("running_since") is not None:
            spans.append([timer["running_since"], max(self.now, timer["running_since"] + 1)])
        return spans

    def describe(self, entry):
        """An entry's time in words: its span, or its date and duration."""
        if entry.get("segments"):
            return self.span(entry["segments"])
        return "%s on %s" % (format_duration(entry["seconds"]), entry["date"])

    def _overlap(self, entry, near, timer):
        """(description, entry id) of the first timed entry -- or (description,
        None) of the timer -- that `entry` overlaps; (None, None) if none."""
        segments = entry["segments"]
        for other_id, (_, other) in sorted(near.items(), key=lambda kv: entry_start(kv[1][1]) or 0):
            if other.get("segments") and segments_overlap(segments, other["segments"]):
                return ("entry %s (%s, %s)" % (other_id, other["issue"],
                                               self.span(other["segments"])), other_id)
        if timer is not None and timer["id"] != entry["id"]:
            spans = self._timer_spans(timer)
            if segments_overlap(segments, spans):
                state = "running" if timer.get("running_since") is not None else "paused"
                return "the %s timer for %s (since %s)" % (
                    state, timer["issue"], self.show(spans[0][0])[:16]), None
        return None, None

    # -- the timer ----------------------------------------------------------

    def _finish(self, timer, at, messages, allow_overlap=False):
        """Record the timer as an entry ending at `at` (if running) and clear it."""
        segments = [list(s) for s in timer["segments"]]
        if timer.get("running_since") is not None:
            if at < timer["running_since"]:
                raise FlowForgeError("stop time %s is before the timer's start %s"
                                     % (self.show(at), self.show(timer["running_since"])),
                                     EXIT_USAGE)
            segments.append([timer["running_since"], at])
        segments = [s for s in segments if s[1] > s[0]]
        seconds = sum(e - s for s, e in segments)
        if seconds > MAX_ENTRY_SECONDS:
            raise FlowForgeError("the timer for %s has run for %s, longer than 24h: stop it "
                                 "with --at TIME, or cancel it" % (timer["issue"],
                                                                  format_duration(seconds)))
        entry = None
        if seconds:
            entry = {"op": "entry", "id": timer["id"], "issue": timer["issue"],
                     "project": timer.get("project", ""), "note": timer.get("note", ""),
                     "segments": segments, "src": "timer"}
            self.admit(entry, allow_overlap or timer.get("allow_overlap", False))
            self.store.append(timer["day"], [entry])  # the commit point
            messages.append("stopped %s after %s%s" % (timer["issue"], format_duration(seconds),
                                                      " (overlap allowed)" if entry.get("overlap")
                                                      else ""))
            try:
                self.store.save_timer(None, recorded=True)
            except StorageError as e:  # recorded: the next command sees it and clears the timer
                log_event(self.store.repo, "after-commit-point", command="stop", error=one_line(e))
                warn("the entry is recorded, but the timer file could not be cleared (%s); the "
                     "next FlowForge command clears it" % e)
            return entry
        messages.append("discarded %s: nothing to record (0s)" % timer["issue"])
        self.store.save_timer(None)
        return entry

    def start(self, issue, project, note, at, allow_overlap=False):
        self.check_time(at, "start time")
        messages = []
        with self.store.lock():
            timer = self.store.load_timer()
            if timer is not None and timer["issue"] == issue:
                if timer.get("running_since") is not None:
                    messages.append("already tracking %s since %s"
                                    % (issue, self.show(timer["running_since"])))
                    return {"timer": timer, "changed": False}, messages
                result, messages = self._resume(timer, at, messages)
                if result["stopped"]:
                    announce(self.store.repo, "on_stop", user=self.store.user,
                             entry=result["stopped"])
                return result, messages
            stopped = None
            if timer is not None:
                if at < timer_last_point(timer):
                    raise FlowForgeError("start time %s is before the current timer's %s"
                                         % (self.show(at), self.show(timer_last_point(timer))),
                                         EXIT_USAGE)
            day = self.store.zone.date_of(at)
            new = {"id": new_entry_id(day), "day": day, "issue": issue, "project": project,
                   "note": note, "segments": [], "running_since": at}
            if allow_overlap:
                new["allow_overlap"] = True
            # Its first second must be free (the whole interval is admitted on stop,
            # when its end is known: a timer started in the past may stop before
            # the next entry); the old timer's entry is admitted as it is recorded.
            self.admit({"id": new["id"], "segments": [[at, at + 1]]}, allow_overlap,
                       what="a timer from %s" % self.show(at)[:16])
            if timer is not None:
                stopped = self._finish(timer, at, messages)
            timer = new
            try:
                self.store.save_timer(timer)
            except StorageError as e:
                if stopped is None:
                    raise  # nothing happened
                # The stop is recorded (the commit point): say so, and what is left to do,
                # rather than an error exit that a script would answer by logging it again.
                log_event(self.store.repo, "after-commit-point", command="start", error=one_line(e))
                warn("%s is recorded, but %s could not be started (%s): run `flowforge start %s "
                     "--at '%s'` when there is space" % (messages[-1], issue, e, issue,
                                                         self.show(at)))
                return {"timer": None, "stopped": public_entry(stopped), "changed": True}, messages
        if stopped:
            announce(self.store.repo, "on_stop", user=self.store.user, entry=public_entry(stopped))
        announce(self.store.repo, "on_start", user=self.store.user, timer=timer)
        messages.append("tracking %s since %s" % (issue, self.show(at)))
        return {"timer": timer, "stopped": stopped and public_entry(stopped), "changed": True}, messages

    def last_entry(self):
        """(id, entry) of the timed entry that ended last, or None (for `continue`)."""
        best = None
        with self.store.lock():
            for day in reversed(self.store.days()):
                if best and day < shift_day(self.store.zone.date_of(best[1]["segments"][-1][1]),
                                            -REACH_DAYS):
                    break
                for entry_id, entry in self.store.entries_of_day(day).items():
                    if entry.get("segments") and (
                            best is None or entry["segments"][-1][1] > best[1]["segments"][-1][1]):
                        best = (entry_id, entry)
        return best

    def resume_entry(self, entry_id, at, allow_overlap=False):
        """`continue`: a new timer with an entry's issue, project and note."""
        if entry_id:
            with self.store.lock():
                _, entry = self.store.find_entry(entry_id)
        else:
            found = self.last_entry()
            if found is None:
                raise FlowForgeError("no timed entry to continue yet (start one with "
                                     "`flowforge start ISSUE`)")
            entry_id, entry = found
        result, messages = self.start(entry["issue"], entry.get("project", ""),
                                      entry.get("note", ""), at, allow_overlap)
        result["continued"] = entry_id
        return result, messages

    def stop(self, at, allow_overlap=False):
        self.check_time(at, "stop time")
        messages = []
        with self.store.lock():
            timer = self._require()
            entry = self._finish(timer, at, messages, allow_overlap)
        if entry:
            announce(self.store.repo, "on_stop", user=self.store.user, entry=public_entry(entry))
        return {"entry": entry and public_entry(entry)}, messages

    def pause(self, at):
        self.check_time(at, "pause time")
        with self.store.lock():
            timer = self._require()
            since = timer.get("running_since")
            if since is None:
                raise FlowForgeError("the timer for %s is already paused" % timer["issue"])
            if at < since:
                raise FlowForgeError("pause time %s is before the timer's start %s"
                                     % (self.show(at), self.show(since)), EXIT_USAGE)
            if at > since:  # what it ran until now must be free (as on stop)
                self.admit({"id": timer["id"], "segments": timer["segments"] + [[since, at]]},
                           timer.get("allow_overlap", False), what="the timer for %s until %s"
                           % (timer["issue"], self.show(at)[:16]))
            # An empty segment (pausing in the second it started) keeps the
            # paused timer valid; stopping drops it.
            timer["segments"].append([since, at])
            timer["running_since"] = None
            self.store.save_timer(timer)
        return {"timer": timer}, ["paused %s at %s (%s so far)" % (
            timer["issue"], self.show(at), format_duration(timer_seconds(timer, at)))]

    def resume(self, at):
        self.check_time(at, "resume time")
        with self.store.lock():
            timer = self._require()
            if timer.get("running_since") is not None:
                raise FlowForgeError("the timer for %s is already running" % timer["issue"])
            result, messages = self._resume(timer, at, [])
        if result["stopped"]:
            announce(self.store.repo, "on_stop", user=self.store.user, entry=result["stopped"])
        return result, messages

    def _resume(self, timer, at, messages):
        last = timer_last_point(timer)
        if at < last:
            raise FlowForgeError("resume time %s is before the pause at %s"
                                 % (self.show(at), self.show(last)), EXIT_USAGE)
        self.admit({"id": timer["id"], "segments": [[at, at + 1]]},
                   timer.get("allow_overlap", False),
                   what="resuming %s at %s" % (timer["issue"], self.show(at)[:16]))
        stopped = None
        if self.store.zone.date_of(at) != timer["day"]:
            # A new day, a new entry: an entry stays near the day file that holds it.
            stopped = self._finish(timer, last, messages)
            day = self.store.zone.date_of(at)
            timer = dict(timer, id=new_entry_id(day), day=day, segments=[])
        timer["running_since"] = at
        self.store.save_timer(timer)
        messages.append("resumed %s at %s" % (timer["issue"], self.show(at)))
        return {"timer": timer, "changed": True, "stopped": stopped and public_entry(stopped)}, messages

    def cancel(self):
        with self.store.lock():
            timer = self._require()
            self.store.save_timer(None)
        return {"timer": timer}, ["cancelled %s (%s discarded)" % (
            timer["issue"], format_duration(timer_seconds(timer, self.now)))]

    def status(self):
        with self.store.lock():
            timer = self.store.load_timer()
            today = self.store.zone.date_of(self.now)
            near = self.store.entries_near(today, today)
        split = self.store.clock.split
        today_seconds = sum(seconds for _, entry in near.values()
                            for day, seconds in entry_parts(entry, split) if day == today)
        result = {"timer": timer, "today": today, "today_seconds": today_seconds}
        lines = []
        if timer is None:
            lines.append("no timer running")
        else:
            result["elapsed_seconds"] = timer_seconds(timer, self.now)
            spans = list(timer["segments"])
            if timer.get("running_since") is not None and self.now > timer["running_since"]:
                spans.append([timer["running_since"], self.now])
            result["timer_today_seconds"] = sum(
                seconds for day, seconds in entry_parts({"segments": spans}, split)
                if day == today) if spans else 0
            state = "tracking" if timer.get("running_since") is not None else "paused"
            line = "%s %s%s: %s" % (state, timer["issue"],
                                    " (%s)" % timer["project"] if timer.get("project") else "",
                                    format_duration(result["elapsed_seconds"]))
            if timer.get("running_since") is not None:   # the day too, if not today's
                shown = self.show(timer["running_since"])
                line += " since %s" % (shown[11:16] if shown[:10] == today else shown[:16])
            if timer.get("note"):
                line += " - " + timer["note"]
            lines.append(line)
        line = "today %s: %s recorded" % (today, format_duration(today_seconds))
        if result.get("timer_today_seconds"):
            line += ", %s more on the timer" % format_duration(result["timer_today_seconds"])
        return result, lines + [line]

    def _require(self):
        timer = self.store.load_timer()
        if timer is None:
            raise FlowForgeError("no timer is running (start one with `flowforge start ISSUE`)")
        return timer

    def check_log(self, seconds, day, start, tz):
        """What `log` refuses before anything is written (or a store created)."""
        if seconds > MAX_ENTRY_SECONDS:
            raise FlowForgeError("duration %s is longer than 24h; log each day separately"
                                 % format_duration(seconds), EXIT_USAGE)
        if start is not None:
            self.check_time(start + seconds, "end time")
        elif day > local_date(self.now, tz):
            raise FlowForgeError("date %s is in the future" % day, EXIT_USAGE)

    def log(self, issue, seconds, day, project, note, key, allow_overlap=False, start=None):
        """Record time without a timer: `seconds` on `day`, or with `start`
        the interval [start, start + seconds) (Timewarrior's `track`)."""
        self.check_log(seconds, day, start, self.store.tz)
        if start is not None:
            day = self.store.zone.date_of(start)
        entry_id = new_entry_id(day, key)
        entry = {"op": "entry", "id": entry_id, "issue": issue, "project": project,
                 "note": note, "src": "log"}
        if start is None:
            entry.update(date=day, seconds=seconds)
        else:
            entry["segments"] = [[start, start + seconds]]
        if key:
            entry["key"] = key
        with self.store.lock():
            if key and self.store.has_record(day, entry_id):
                return {"entry": public_entry(entry), "changed": False}, [
                    "already logged (key %r): %s" % (key, entry_id)]
            self.admit(entry, allow_overlap, self.store.load_timer())
            self.store.append(day, [entry])
        when = self.span(entry["segments"]) if start is not None else day
        return {"entry": public_entry(entry), "changed": True}, ["logged %s to %s on %s (%s)%s" % (
            exact_duration(seconds), issue, when, entry_id,
            " (overlap allowed)" if entry.get("overlap") else "")]

    def edit(self, entry_id, changes, allow_overlap=False):
        """Append an amendment.  `changes` may hold issue, project, note, start,
        end, seconds, date; the result is admitted like a new entry."""
        with self.store.lock():
            day, entry = self.store.find_entry(entry_id)
            new = dict(entry)
            new.update({k: v for k, v in changes.items() if k in ("issue", "project", "note")})
            if "segments" in entry and "date" in changes:
                raise FlowForgeError("%s has clock times: move it with --start and --end (a time "
                                     "of day there is on the entry's day; give another day with "
                                     "it: --start 'yesterday 9:00')" % entry_id, EXIT_USAGE)
            if "segments" in entry and any(k in changes for k in ("start", "end", "seconds")):
                new["segments"] = self._moved_segments(entry["segments"], changes)
            elif "segments" not in entry:
                if "start" in changes or "end" in changes:
                    raise FlowForgeError("%s was logged without clock times: change it with "
                                         "--duration and --date" % entry_id, EXIT_USAGE)
                new["seconds"] = changes.get("seconds", entry["seconds"])
                new["date"] = changes.get("date", entry["date"])
                if new["date"] > self.store.zone.date_of(self.now):
                    raise FlowForgeError("date %s is in the future" % new["date"], EXIT_USAGE)
            if entry_seconds(new) > MAX_ENTRY_SECONDS:
                raise FlowForgeError("an entry cannot be longer than 24h", EXIT_USAGE)
            if any(new.get(k) != entry.get(k) for k in ("segments", "date", "seconds")):
                admitted = self.admit(dict(new, id=entry_id), allow_overlap, self.store.load_timer())
                if "overlap" in admitted:
                    new["overlap"] = admitted["overlap"]
                days = [d for d, _ in entry_parts(new, self.store.clock.split)]
                if min(days) < shift_day(day, -REACH_DAYS) or max(days) > shift_day(day, REACH_DAYS):
                    self.store.note_far(entry_id, day)
            changed = {k: v for k, v in new.items() if entry.get(k) != v}
            if not changed:
                return {"entry": public_entry(entry, id=entry_id), "changed": False}, [
                    "%s is unchanged" % entry_id]
            self.store.append(day, [{"op": "edit", "id": entry_id, "set": changed}])
        return {"entry": public_entry(new, id=entry_id), "changed": True}, ["edited %s" % entry_id]

    def _moved_segments(self, segments, changes):
        """A paused entry keeps its pauses: --start moves the first segment's
        start, --end the last one's end, and --duration sets the total by moving
        the last end."""
        segments = [list(s) for s in segments]
        if "start" in changes:
            segments[0][0] = changes["start"]
        if "end" in changes:
            segments[-1][1] = changes["end"]
        elif "seconds" in changes:
            segments[-1][1] += changes["seconds"] - sum(e - s for s, e in segments)
        for start, end in segments:
            if end <= start:
                what = "end" if len(segments) == 1 else "the change leaves a segment empty: end"
                raise FlowForgeError("%s %s is not after start %s"
                                     % (what, self.show(end), self.show(start)), EXIT_USAGE)
        self.check_time(segments[-1][1], "end time")
        return segments

    def delete(self, entry_id):
        with self.store.lock():
            day, entry = self.store.find_entry(entry_id)
            self.store.append(day, [{"op": "delete", "id": entry_id}])
        return {"entry": public_entry(entry, id=entry_id)}, ["deleted %s (%s, %s)" % (
            entry_id, entry["issue"], format_duration(entry_seconds(entry)))]

    def entries(self, first_day, last_day):
        """Entries with time from `first_day` to `last_day`, each with its "day"
        (where its time begins) and "range_seconds" (its time in the range)."""
        split = self.store.clock.split
        with self.store.lock():
            near = self.store.entries_near(first_day, last_day)
        found = []
        for entry_id, (_, entry) in near.items():
            parts = entry_parts(entry, split)
            inside = sum(seconds for day, seconds in parts if first_day <= day <= last_day)
            if inside:
                found.append(public_entry(entry, id=entry_id, day=parts[0][0],
                                          range_seconds=inside))
        found.sort(key=lambda e: (e["day"], entry_start(e) or 0, e["id"]))
        return found


# ############################################################################
# 6. Audit chain
# ############################################################################
#
# Each aggregation that changes shards appends one record to the store's
# local chain (private, exact times) and to its team chain in the ledger
# (audit/<YYYY>.jsonl in the store's ref, time rounded to the UTC day):
#     {"seq", "ts", "action", "files": {name: shard sha256}, "totals", "prev", "hash"}
# hash = sha256(prev + canonical JSON of the record without "hash"), so an
# edited, removed, reordered or inserted record breaks every later link.  A
# chain cannot see its own truncation or a complete rewrite: the ledger's
# commits anchor it, a fetch refuses a rewritten ref, and `audit verify`
# checks that each commit's chain extends the one before it.

AUDIT_GENESIS = "0" * 64


def utc_day_start(ts):
    """Team chains record only the UTC day: when someone worked stays private."""
    return ts - ts % 86400


def audit_hash(prev, body):
    return sha256_hex((prev + canonical_json(body)).encode("utf-8"))


class AuditChain:
    """An append-only, hash-chained JSON-lines file.  Appenders hold a lock."""

    def __init__(self, path, mode=0o600):
        self.path = path
        self.mode = mode

    def _tail(self):
        """(the last complete line, whether a torn partial line follows it)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        except FileNotFoundError:
            return None, False
        try:
            size = os.fstat(fd).st_size
            start = max(0, size - 65536)  # records are small: the end of the file will do
            data = os.pread(fd, size - start, start)
            if start and data.count(b"\n") < 2:
                data, start = os.pread(fd, size, 0), 0
        finally:
            os.close(fd)
        torn = bool(data) and not data.endswith(b"\n")
        lines = [line for line in data[:data.rfind(b"\n") + 1].split(b"\n") if line]
        return (lines[-1] if lines else None), torn

    def head(self):
        """(seq, hash) of the last record; a torn tail must be repaired first."""
        last, torn = self._tail()
        if torn:
            raise CorruptFile(self.path, "the audit chain ends in a torn line; run `flowforge "
                              "reconcile` to trim it")
        if last is None:
            return 0, AUDIT_GENESIS
        try:
            record = load_json(last)
            return int(record["seq"]), str(record["hash"])
        except (ValueError, KeyError, TypeError):
            raise CorruptFile(self.path, "the last audit record is damaged; see `flowforge audit "
                              "verify`")

    def append(self, action, ts, **fields):
        record = chain_record(*self.head(), action, ts, **fields)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        append_durable(self.path, canonical_bytes(record), self.mode)
        return record

    def trim_torn_tail(self, repo):
        """Cut a partial last line (an append that never completed), keeping a
        copy in quarantine.  Returns the quarantine id, or None."""
        _, torn = self._tail()
        if not torn:
            return None
        data = read_bytes(self.path)
        keep = data[:data.rfind(b"\n") + 1]
        item = Quarantine(repo).put(self.path, "torn audit tail (%d bytes)" % (len(data) - len(keep)),
                                    copy=True)
        fd = os.open(self.path, os.O_WRONLY | _O_NOFOLLOW | _O_CLOEXEC)
        try:
            os.ftruncate(fd, len(keep))
            os.fsync(fd)
        finally:
            os.close(fd)
        return item

    def records(self):
        try:
            data = read_bytes(self.path)
        except FileNotFoundError:
            return []
        out = []
        for line in data.split(b"\n"):
            if line:
                try:
                    out.append(load_json(line))
                except ValueError:
                    out.append(None)
        return out

    def verify(self):
        try:
            data = read_bytes(self.path)
        except FileNotFoundError:
            data = b""
        return verify_chain_bytes(data, self.path)


def verify_chain_bytes(data, path):
    """{"ok", "records", "problem", "bad_seq", "torn_tail", "files": {path: sha}, "last"}.

    Names the first broken record by its expected seq, and tells a torn last
    line (an interrupted append: repairable) from a damaged or altered one.
    Every field a record carries is checked for its type: chains come from
    teammates' commits."""
    result = {"path": path, "ok": True, "records": 0, "problem": None, "bad_seq": None,
              "torn_tail": False, "files": {}, "last": None}
    if not data:
        return result
    lines = data.split(b"\n")
    if lines[-1] != b"":
        result["torn_tail"] = True
    lines = lines[:-1]
    prev, expected = AUDIT_GENESIS, 1
    for line in lines:
        problem = None
        try:
            record = load_json(line)
            if not isinstance(record, dict):
                raise ValueError
        except (ValueError, RecursionError):
            record, problem = None, "record %d is not valid JSON" % expected
        if record is not None:
            body = {k: v for k, v in record.items() if k != "hash"}
            files = record.get("files", {})
            if record.get("seq") != expected:
                problem = "record %d carries seq %r (removed, reordered or inserted records)" % (
                    expected, record.get("seq"))
            elif record.get("prev") != prev:
                problem = "record %d does not link to the record before it" % expected
            elif record.get("hash") != audit_hash(prev, body):
                problem = "record %d does not match its hash (edited)" % expected
            elif not isinstance(files, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
                problem = "record %d has malformed \"files\"" % expected
            elif type(record.get("ts")) is not int:
                problem = "record %d has a malformed \"ts\"" % expected
        if problem:
            result.update(ok=False, problem=problem, bad_seq=expected)
            return result
        prev = record["hash"]
        result["records"] = expected
        result["last"] = record
        for name, sha in files.items():
            result["files"][name] = sha
        expected += 1
    if result["torn_tail"]:
        result.update(ok=False, problem="torn last line after record %d (an interrupted "
                      "append: `flowforge reconcile` trims it)" % result["records"],
                      bad_seq=result["records"] + 1)
    return result


def chain_record(prev_seq, prev_hash, action, ts, **fields):
    """The next record of a chain whose head is (prev_seq, prev_hash)."""
    body = dict(fields, seq=prev_seq + 1, ts=ts, action=action, prev=prev_hash)
    return dict(body, hash=audit_hash(prev_hash, body))


def store_key(user, store_id):
    """`<user>--<store>`: how shard directories, team chains, mirrors and
    backups name one private store."""
    return "%s--%s" % (user, store_id)


def list_team_chains(repo):
    """[(path, user, store)] of the committed audit chains."""
    directory = os.path.join(repo.team, "audit")
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if name.endswith(".jsonl"):
            user, sep, store_id = name[:-6].rpartition("--")
            if sep:
                out.append((os.path.join(directory, name), user, store_id))
    return out


# ############################################################################
# 7. Shards
# ############################################################################
#
# A shard is the team's summary of one private store for one month, kept as
# summaries/<YYYY-MM>.json in that store's ledger ref (section 8).  It holds
# integer seconds per (period, issue, project) at the configured granularity,
# totals, and a sha256 -- no notes, no clock times, no host names.  The 0.1
# layout kept the same files in .flowforge/team/summaries/<user>--<store>/ on
# the branch; they are read here only to migrate them.

def period_of(day_iso, granularity):
    if granularity == "day":
        return day_iso
    if granularity == "month":
        return day_iso[:7]
    from datetime import date
    year, week, _ = date.fromisoformat(day_iso).isocalendar()
    return "%04d-W%02d" % (year, week)


def day_contributions(records, clock, granularity):
    """{month: {(period, issue, project): seconds}} of one day file's entries."""
    months = {}
    split = clock.split
    for entry in resolve_entries(records).values():
        issue, project = entry["issue"], entry.get("project", "")
        for day, seconds in entry_parts(entry, split):
            cells = months.get(day[:7])
            if cells is None:
                cells = months[day[:7]] = {}
            key = (day if granularity == "day" else period_of(day, granularity), issue, project)
            cells[key] = cells.get(key, 0) + seconds
    return months


def render_shard(user, store_id, month, granularity, tz_name, cells):
    """Canonical bytes of a shard.  Its "sha256" is the SHA-256 of these bytes
    with that field's value empty, so checking it needs no re-serialisation."""
    rows = sorted([period, issue, project, seconds]
                  for (period, issue, project), seconds in cells.items() if seconds)
    by_issue, by_project, by_period = {}, {}, {}
    for period, issue, project, seconds in rows:
        by_issue[issue] = by_issue.get(issue, 0) + seconds
        by_project[project] = by_project.get(project, 0) + seconds
        by_period[period] = by_period.get(period, 0) + seconds
    doc = {"schema": SHARD_SCHEMA, "kind": "flowforge-shard", "user": user, "store": store_id,
           "month": month, "granularity": granularity, "timezone": tz_name,
           "columns": ["period", "issue", "project", "seconds"], "rows": rows,
           "totals": {"seconds": sum(by_issue.values()), "by_issue": by_issue,
                      "by_project": by_project, "by_period": by_period},
           "sha256": ""}
    blank = canonical_bytes(doc)
    return blank.replace(b'"sha256":""', b'"sha256":"%s"' % sha256_hex(blank).encode(), 1)


_HEX_BYTES = frozenset(b"0123456789abcdef")


def shard_sha_span(raw):
    """(start, end) of the first `"sha256":"<64 lowercase hex>"` value in a
    shard's bytes, or None (by hand: the hook imports no `re`)."""
    at = raw.find(b'"sha256":"')
    while at >= 0:
        start, end = at + 10, at + 74
        if raw[end:end + 1] == b'"' and _HEX_BYTES.issuperset(raw[start:end]):
            return start, end
        at = raw.find(b'"sha256":"', at + 1)
    return None


def shard_sha(raw):
    """The sha256 a shard's bytes carry (hex), or None."""
    span = shard_sha_span(raw)
    return raw[span[0]:span[1]].decode() if span else None


def verify_shard_bytes(raw):
    """The shard document, or ValueError naming what is wrong with it."""
    if b"\n<<<<<<< " in b"\n" + raw or b"\n>>>>>>> " in raw:
        raise ValueError("contains git conflict markers")
    span = shard_sha_span(raw)
    if not span:
        raise ValueError("has no sha256")
    if sha256_hex(raw[:span[0]] + raw[span[1]:]) != raw[span[0]:span[1]].decode():
        raise ValueError("does not match its sha256 (edited by hand?)")
    try:
        doc = load_json(raw)
    except (ValueError, RecursionError):  # RecursionError: nested too deep to be a shard
        raise ValueError("is not valid JSON")
    if not isinstance(doc, dict) or doc.get("kind") != "flowforge-shard":
        raise ValueError("is not a FlowForge shard")
    if not isinstance(doc.get("schema"), int) or doc["schema"] > SHARD_SCHEMA:
        raise ValueError("was written by a newer FlowForge (schema %s)" % doc.get("schema"))
    return doc


def check_shard_sums(doc):
    """Internal consistency: header and rows well formed, the totals equal
    their sums.  Returns the seconds by project, which a shard does not carry
    (its readers need them, and this is the one pass over its rows)."""
    user, store_id, month = doc.get("user"), doc.get("store"), doc.get("month")
    if (not isinstance(user, str) or not valid_user_name(user) or not isinstance(store_id, str)
            or not isinstance(month, str) or not is_month(month)
            or doc.get("granularity") not in ("day", "week", "month")):
        raise ValueError("header (user, store, month, granularity) malformed")
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise ValueError("rows missing")
    periods = month_periods(month, doc["granularity"])
    total = 0
    by_issue, by_project = {}, {}
    for row in rows:   # spelled out, not all(...): a cold report checks ~10^6 rows
        if type(row) is not list or len(row) != 4:
            raise ValueError("malformed row %.80r" % (row,))
        period, issue, project, seconds = row
        if (type(seconds) is not int or not 0 < seconds <= MAX_ROW_SECONDS
                or type(issue) is not str or type(project) is not str or type(period) is not str
                or len(issue) > MAX_NAME_CHARS or len(project) > MAX_NAME_CHARS
                or period not in periods):
            raise ValueError("malformed row %.80r" % (row,))
        total += seconds
        by_issue[issue] = by_issue.get(issue, 0) + seconds
        by_project[project] = by_project.get(project, 0) + seconds
    totals = doc.get("totals")
    if (not isinstance(totals, dict) or totals.get("seconds") != total
            or totals.get("by_issue") != by_issue):
        raise ValueError("totals do not match its rows")
    return by_project


_MONTH_PERIODS = {}


def month_periods(month, granularity):
    """The periods a shard of `month` may have rows for (days, ISO weeks or
    the month itself); ValueError for a month that does not exist."""
    key = (month, granularity)
    if key not in _MONTH_PERIODS:
        from datetime import date, timedelta
        first, last = (date.fromisoformat(d) for d in month_bounds(month))
        _MONTH_PERIODS[key] = {period_of((first + timedelta(days=n)).isoformat(), granularity)
                               for n in range((last - first).days + 1)}
    return _MONTH_PERIODS[key]


def list_shard_files(repo):
    """[(path, user, store, month)] of every shard in the work tree, sorted.
    Committed directories are checked like private ones: a symbolic link is
    refused, not followed."""
    found = []
    repo.check_dirs(repo.team, repo.summaries, os.path.join(repo.team, "audit"))
    try:
        dirs = sorted(os.listdir(repo.summaries))
    except FileNotFoundError:
        return found
    for name in dirs:
        user, sep, store_id = name.rpartition("--")
        if not sep:
            continue
        directory = os.path.join(repo.summaries, name)
        repo.check_dirs(directory)
        try:
            files = sorted(os.listdir(directory))
        except NotADirectoryError:
            continue
        for file_name in files:
            if file_name.endswith(".json") and is_month(file_name[:-5]):
                found.append((os.path.join(directory, file_name), user, store_id, file_name[:-5]))
    return found


# ############################################################################
# 8. The ledger: one git ref per private store
# ############################################################################
#
# Team time does not live on the code branches: the same writer would write
# different versions of its files on different branches, and merges would
# conflict.  Each private store owns one ref, refs/flowforge/stores/<user>--<store>,
# whose linear, fast-forward-only history holds that store's files:
#     summaries/<YYYY-MM>.json   the monthly shards
#     audit/<YYYY>.jsonl         its team audit chain, one file per UTC year so
#                                that an aggregation rewrites one year, not all
# Every aggregation that changes something is one commit on that ref, written
# with plumbing (blobs, trees, commit) and published by `update-ref NEW OLD`:
# the compare-and-swap is the commit point, so a crash before it leaves only
# unreachable objects and a crash after it leaves a complete commit.  Commit
# dates are rounded to the UTC day, as the chain's, so no clock time leaks.
#
# Refs under refs/flowforge/ (none shows in `git branch -a`):
#     stores/<key>                      this clone's own stores (pushed)
#     incoming/<remote>/<key>           what the last fetch brought, as is
#     remotes/<remote>/<key>            accepted copies: fast-forwards only
#     quarantine/<remote>/<key>/<id>    histories kept aside when a store ref
#                                       was rewritten on a remote
# On the remote, store refs live under ledger.prefix (config.json), by default
# refs/flowforge/stores/ (refs/heads/flowforge/ for hosts that take branches only).

STORES_REF = "refs/flowforge/stores/"
INCOMING_REF = "refs/flowforge/incoming/"
REMOTES_REF = "refs/flowforge/remotes/"
QUARANTINE_REF = "refs/flowforge/quarantine/"
# A closed (or reopened) month: refs/flowforge/periods/<YYYY-MM> here,
# <ledger.prefix>periods/<YYYY-MM> on the remote (so the fetch refspec brings
# it to incoming/<remote>/periods/ with the store refs, never mistaken for one).
PERIODS_REF = "refs/flowforge/periods/"
LEDGER_SCHEMA = 1
LEDGER_DIRS = ("summaries", "audit")   # all a store ref's tree may hold; audit/ always
LEDGER_CACHE_SCHEMA = 6   # 5: a header line (each month and the place of its lines, and
#                              of the totals of them all), then a totals line and a rows
#                              line per month, then the totals line of all months;
#                              6: the rows line is the shard blob itself
LEDGER_AUTHOR = "FlowForge ledger"
PARALLEL_CACHE_AT = 64   # stores to verify at once from which forked workers share the work
_STORE_KEY = Pattern(r"([A-Za-z0-9_][A-Za-z0-9._-]{0,63})--([0-9a-f]{10})")


def _digits(text):
    return text.isascii() and text.isdigit()


def shard_month(name):
    """`2026-11` of a shard's file name `2026-11.json`, else None (by hand, not
    a regular expression: the hook imports no `re`)."""
    if len(name) == 12 and name.endswith(".json") and name[4] == "-" \
            and _digits(name[:4]) and _digits(name[5:7]):
        return name[:7]
    return None


def is_chain_name(name):
    """Whether `name` is an audit chain's file name, `2026.jsonl`."""
    return len(name) == 10 and name.endswith(".jsonl") and _digits(name[:4])
# Objects are fsynced before the ref that names them, and the ref itself too
# (git >= 2.36; older versions ignore the setting and rely on the page cache).
_GIT_DURABLE = ["-c", "core.fsync=objects,reference", "-c", "core.fsyncMethod=fsync"]


def parse_store_key(key):
    """(user, store id) of `<user>--<store>`, or None."""
    m = _STORE_KEY.fullmatch(key or "")
    return (m.group(1), m.group(2)) if m else None


def shard_name(month):
    return "summaries/%s.json" % month


def ledger_file_name(path):
    """The ledger name of a file an audit record lists: records written before
    the ledger name work-tree paths (.flowforge/team/summaries/<key>/<m>.json)."""
    if path.startswith(".flowforge/team/summaries/"):
        return "summaries/" + path.rsplit("/", 1)[-1]
    return path


def remote_prefix(repo):
    return repo.config["ledger"]["prefix"]


def is_ancestor(repo, older, newer):
    rc, _, err = run_git(["merge-base", "--is-ancestor", older, newer], repo.root, check=False)
    if rc not in (0, 1):
        raise FlowForgeError("git merge-base failed: %s" % git_error_line(err, rc), EXIT_DATA)
    return rc == 0


def list_ledger_refs(repo):
    """{ref name: (object id, object type, tree id)} of every ref under refs/flowforge/."""
    _, out, _ = run_git(["for-each-ref", "--format=%(objectname) %(objecttype) %(tree) "
                         "%(refname)", "refs/flowforge/"], repo.root)
    refs = {}
    for line in out.splitlines():
        parts = line.split(" ", 3)  # a ref to a non-commit has an empty tree field
        if len(parts) == 4:
            refs[parts[3]] = (parts[0], parts[1], parts[2])
    return refs


def update_refs(repo, updates, message):
    """Apply [(ref, new id, old id or "")] in one transaction (all or none);
    old "" means the ref must not exist yet, None that anything goes; new ""
    deletes the ref (old must then be its value).
    FlowForgeError when another writer got there first."""
    if not updates:
        return
    lines = "".join(("delete %s %s\n" % (ref, old) if not new else
                     "update %s %s %s\n" % (ref, new, old) if old is not None else
                     "update %s %s\n" % (ref, new)) for ref, new, old in updates)
    rc, _, err = run_git(_GIT_DURABLE + ["update-ref", "--create-reflog", "-m", message,
                                         "--stdin"], repo.root, check=False, input=lines.encode())
    if rc:  # another writer moved the ref first, unless the disk said otherwise
        code = git_exit_code(err)
        raise FlowForgeError("cannot update the ledger (%s): %s" % (
            updates[0][0] if len(updates) == 1 else "%d refs" % len(updates),
            git_error_line(err, rc)), EXIT_TEMPFAIL if code == EXIT_FAIL else code)


PACK_AT = 64   # objects at once from which they are kept as a pack rather than loose


def _git_hasher(hash_name):
    """The constructor of the repository's object hash ("sha1" or "sha256"):
    the interpreter's builtin one (hashlib would load OpenSSL: ~6 ms of a hook)."""
    if hash_name == "sha256":
        return sha256_hasher
    try:
        from _sha1 import sha1
    except ImportError:
        from hashlib import sha1
    return sha1


def object_id(kind, data, hash_name):
    """The id git gives `data` as an object of `kind` (blob, tree, commit)."""
    return _git_hasher(hash_name)(b"%s %d\0" % (kind.encode("ascii"), len(data)) + data).hexdigest()


def blob_id(data, hash_name):
    return object_id("blob", data, hash_name)


_PACK_TYPES = {"commit": 1, "tree": 2, "blob": 3}


def _pack(objects, hash_name):
    """(a version 2 pack of `objects` [(kind, bytes)], undeltified, and their ids)."""
    parts, ids = [b"PACK", (2).to_bytes(4, "big"), len(objects).to_bytes(4, "big")], []
    for kind, data in objects:
        ids.append(object_id(kind, data, hash_name))
        size = len(data)
        header = [_PACK_TYPES[kind] << 4 | size & 0x0F]   # the type, then the size, 7 bits a byte
        size >>= 4
        while size:
            header[-1] |= 0x80
            header.append(size & 0x7F)
            size >>= 7
        parts += [bytes(header), zlib.compress(data, 1)]
    body = b"".join(parts)
    return body + _git_hasher(hash_name)(body).digest(), ids


def object_format(repo):
    """"sha1" or "sha256": the hash of the repository's objects (asked once)."""
    known = getattr(repo, "_object_format", None)
    if known is None:
        rc, out, _ = run_git(["rev-parse", "--show-object-format"], repo.root, check=False)
        known = repo._object_format = "sha256" if rc == 0 and out.strip() == "sha256" else "sha1"
    return known


def write_objects(repo, objects, hash_name=None):
    """Store [(kind, bytes)] as git objects -- blobs, and the trees and commit
    built here that name them -- in one git process; returns their ids.  They
    travel as one pack: many (a full aggregation writes a shard per month of
    years) stay a pack that `git index-pack` checks and indexes, because a
    loose object file each is what costs (~0.3 ms a file here); a few (a
    commit's worth) become loose objects by `git unpack-objects`, as a pack per
    commit would pile up.  Both fsync what they write.  (`hash_name`: the
    object format, when the caller knows it.)"""
    if not objects:
        return []
    pack, ids = _pack(objects, hash_name or object_format(repo))
    if len(objects) >= PACK_AT:
        run_git(["-c", "core.fsync=objects,reference,pack-metadata", "-c", "core.fsyncMethod=fsync",
                 "index-pack", "--stdin"], repo.root, input=pack)
    else:
        run_git(_GIT_DURABLE + ["unpack-objects", "-q"], repo.root, input=pack)
    return ids


_TREE_MODES = {"100644": b"100644", "100755": b"100755", "120000": b"120000", "160000": b"160000",
               "40000": b"40000", "040000": b"40000"}


def tree_object(entries):
    """The raw git tree of {name: (mode, object id)}: entries in git's order,
    where a directory sorts as if its name ended in `/`.  ValueError for an
    entry git would not write (what `git mktree` refuses)."""
    items = []
    for name, (mode, oid) in entries.items():
        raw = name.encode("utf-8")
        kind = _TREE_MODES.get(mode)
        if kind is None or not raw or b"/" in raw or b"\0" in raw or name in (".", ".."):
            raise ValueError("a tree entry git would not write: %r (mode %s)" % (name, mode))
        items.append((raw + b"/" if kind == b"40000" else raw, kind, raw, bytes.fromhex(oid)))
    return b"".join(b"%s %s\0%s" % (kind, raw, oid) for _, kind, raw, oid in sorted(items))


def ledger_commit_env(user, ts):
    """Author and dates of a ledger commit: the store's user, no e-mail address
    and no clock time (the UTC day only)."""
    date = "@%d +0000" % utc_day_start(ts)
    return {"GIT_AUTHOR_NAME": user, "GIT_AUTHOR_EMAIL": "%s@flowforge.invalid" % user,
            "GIT_COMMITTER_NAME": LEDGER_AUTHOR, "GIT_COMMITTER_EMAIL": "ledger@flowforge.invalid",
            "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date}


# what git strips from either end of a name or an address in a commit (its "crud")
_GIT_CRUD = "".join(map(chr, range(33))) + ".,:;<>\"\\'"


def ledger_commit_object(tree, parent, user, ts, message):
    """The raw commit `git commit-tree` makes of `tree` over `parent` (or none)
    with ledger_commit_env's names and dates (built here: two git processes
    fewer for every aggregation)."""
    env = ledger_commit_env(user, ts)

    def ident(who):   # as git writes it: a name and address lose "crud" at either end
        return "%s <%s> %s" % (env["GIT_%s_NAME" % who].strip(_GIT_CRUD),
                               env["GIT_%s_EMAIL" % who].strip(_GIT_CRUD), env["GIT_%s_DATE" % who][1:])
    return "\n".join(["tree " + tree] + (["parent " + parent] if parent else []) + [
        "author " + ident("AUTHOR"), "committer " + ident("COMMITTER"), "", message]).encode("utf-8")


class StoreLedger:
    """One store's ref: its tip's files, and commits that change them.  The
    caller holds the store's aggregate lock (one writer per ref)."""

    def __init__(self, repo, user, store_id, objects=None):
        self.repo, self.user, self.store_id = repo, user, store_id
        self.key = store_key(user, store_id)
        self.ref = STORES_REF + self.key
        self.objects = objects or GitObjects(repo.root)
        self._tip = False
        self._trees = {}

    def tip(self, known_seq=None):
        """This clone's tip of the store; a fetched copy that is ahead of it (or
        the only copy, in a fresh clone of a store restored from its mirror) is
        taken over, so history stays linear and the next push fast-forwards.

        `known_seq`, from the writer (the aggregation): the last team audit
        record this store's private chain knows.  A copy with records beyond it
        was written by another clone with the same store id (a copied work
        tree): taking it over would drop that clone's time, so it is refused."""
        if self._tip is not False:
            return self._tip
        _, out, _ = run_git(["for-each-ref", "--format=%(objectname) %(objecttype) %(refname)",
                             self.ref, REMOTES_REF + "*/" + self.key], self.repo.root)
        own, copies = None, []
        for line in out.splitlines():
            oid, kind, ref = line.split(" ", 2)
            if ref == self.ref:
                own = oid
            elif kind == "commit" and ref.count("/") == REMOTES_REF.count("/") + 1:
                copies.append(oid)   # refs/flowforge/remotes/<remote>/<key>, nothing nested
        best = own
        for oid in copies:
            if best is None or (oid != best and is_ancestor(self.repo, best, oid)):
                best = oid
        if best != own:
            if known_seq is not None:
                self._tip = best
                seq = self.chain_head()[0]
                self._tip, self._trees = False, {}
                if seq > known_seq:
                    raise FlowForgeError(
                        "the ledger of %s has audit records up to %d but this clone's store knows "
                        "%d: another clone writes the same store (a copied work tree?); give one "
                        "of them its own store (move its .flowforge/user/%s away and run "
                        "`flowforge recover assess`)" % (self.key, seq, known_seq, self.user),
                        EXIT_DATA)
            update_refs(self.repo, [(self.ref, best, own or "")], "flowforge: take over %s from "
                        "a fetched copy" % self.key)
        self._tip = best
        return best

    def tree(self, directory):
        """{name: (mode, id)} of summaries/ or audit/ at the tip."""
        if directory not in self._trees:
            tip = self.tip()
            entries = {}
            if tip:
                found = self.objects.get(["%s:%s" % (tip, directory)], MAX_TREE_BYTES)[0]
                if found is not None:
                    if found[0] != "tree":
                        raise CorruptFile("%s:%s" % (self.ref, directory), "is not a directory")
                    try:
                        entries = parse_tree(found[1], len(tip) // 2)
                    except ValueError as e:
                        raise CorruptFile("%s:%s" % (self.ref, directory), str(e))
            self._trees[directory] = entries
        return self._trees[directory]

    def months(self):
        return sorted(m for m in map(shard_month, self.tree("summaries")) if m)

    def read(self, names):
        """{name: bytes or None} of files at the tip."""
        tip = self.tip()
        if not tip or not names:
            return {name: None for name in names}
        found = self.objects.get(["%s:%s" % (tip, name) for name in names], MAX_CHAIN_BYTES)
        for name, item in zip(names, found):
            if item and item[0] == "too large":
                raise CorruptFile("%s:%s" % (self.ref, name), "is more than %d bytes"
                                  % MAX_CHAIN_BYTES)
        return {name: (item[1] if item and item[0] == "blob" else None)
                for name, item in zip(names, found)}

    def chain_head(self):
        """(seq, hash, name and bytes of the chain's last year file)."""
        years = sorted(n for n in self.tree("audit") if is_chain_name(n))
        if not years:
            return 0, AUDIT_GENESIS, None, b""
        name = "audit/" + years[-1]
        data = self.read([name])[name] or b""
        result = verify_chain_tail(data, "%s:%s" % (self.ref, name))
        return result[0], result[1], name, data

    def commit(self, files, message, ts):
        """One commit over the tip with `files` {ledger name: bytes} changed;
        returns the new tip.  Its blobs, trees and commit are written at once;
        the update-ref compare-and-swap is the commit point: before it nothing
        is visible, after it everything is."""
        tip = self.tip()
        # the tip's id says the object format (asking git would be one more process)
        hash_name = ("sha256" if len(tip) == 64 else "sha1") if tip else object_format(self.repo)
        objects, dirs = [], {}
        for name in sorted(files):
            directory, base = name.split("/", 1)
            objects.append(("blob", files[name]))
            dirs.setdefault(directory, {})[base] = ("100644", object_id("blob", files[name], hash_name))
        root = {}
        for directory in sorted(set(dirs) | {"summaries", "audit"}):
            entries = dict(self.tree(directory), **dirs.get(directory, {}))
            if entries:
                try:
                    data = tree_object(entries)
                except ValueError as e:
                    raise CorruptFile("%s:%s" % (self.ref, directory), str(e))
                objects.append(("tree", data))
                root[directory] = ("40000", object_id("tree", data, hash_name))
        data = tree_object(root)
        objects += [("tree", data), ("commit", ledger_commit_object(
            object_id("tree", data, hash_name), tip, self.user, ts, message))]
        new = write_objects(self.repo, objects, hash_name)[-1]
        update_refs(self.repo, [(self.ref, new, tip or "")], "flowforge: " +
                    message.splitlines()[0])
        self._tip, self._trees = new, {}
        return new

    def commit_audited(self, shards, action, ts, **fields):
        """Commit changed shards ({ledger name: bytes}, perhaps none) together
        with the team audit record that lists them; returns (record, tip)."""
        seq, prev, last_name, last_data = self.chain_head()
        shas = {n: shard_sha(d) for n, d in shards.items()}
        record = chain_record(seq, prev, action, utc_day_start(ts), files=shas, **fields)
        name = max("audit/%04d.jsonl" % utc_year(ts), last_name or "")
        files = dict(shards)
        files[name] = (last_data if name == last_name else b"") + canonical_bytes(record)
        months = ", ".join(sorted(n[10:17] for n in shas))
        tip = self.commit(files, "%s%s (audit %d)" % (action, ": " + months if months else "",
                                                      record["seq"]), ts)
        return record, tip

    def close(self):
        self.objects.close()


def verify_chain_tail(data, where):
    """(seq, hash) of a chain file's last record, without walking the chain
    (the reads that must be fast); a torn or damaged tail is an error."""
    if data and not data.endswith(b"\n"):
        raise CorruptFile(where, "the audit chain ends in a torn line")
    last = data[data.rfind(b"\n", 0, len(data) - 1) + 1:] if data else b""
    if not last:
        return 0, AUDIT_GENESIS
    try:
        record = load_json(last)
        seq, digest = record["seq"], record["hash"]
        if type(seq) is not int or not isinstance(digest, str):
            raise TypeError
        return seq, digest
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CorruptFile(where, "the last audit record is damaged; see `flowforge audit verify`")


def ledger_chain_records(repo, user, store_id):
    """(where, [records or None]) of a store's team chain at its tip."""
    ledger = StoreLedger(repo, user, store_id)
    try:
        tip = ledger.tip()
        if not tip:
            raise FlowForgeError("no ledger ref for %s here (run `flowforge fetch`?)"
                                 % store_key(user, store_id))
        names = sorted("audit/" + n for n in ledger.tree("audit") if is_chain_name(n))
        data = b"".join(d or b"" for d in ledger.read(names).values())
    finally:
        ledger.close()
    records = []
    for line in data.split(b"\n"):
        if line:
            try:
                record = load_json(line)
            except (ValueError, RecursionError):
                record = None
            records.append(record if isinstance(record, dict) else None)
    return ledger.ref + ":audit/", records


# -- reading every store: what reports, bills and CI see ---------------------

def _ledger_cache_path(repo, key):
    return os.path.join(repo.state, "cache", "ledger", key + ".rec")


def _read_ledger_cache(repo, key, months=None, rows=True, summed=False):
    """The cached, verified shards of one store ({"tree", "months": {month:
    blob}, "shards"}), or None; with `months` (first, last), only the shards of
    those months are decoded -- a report of one month reads one line per store;
    `summed`: instead, one document of the totals of all its months ("shards":
    {"all": doc}), so that a report over all history reads one line per store.
    Each line carries a crc32 like a private record: a damaged or edited cache
    is ignored and rebuilt from git, never trusted."""
    first, last = months or (None, None)
    if summed:
        months = first = last = None
    try:
        fd = os.open(_ledger_cache_path(repo, key), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError:
        return None
    try:
        head = os.read(fd, 1 << 13)   # the header line: ~25 bytes per month
        end = head.find(b"\n")
        if end < 0:   # a header longer than the first read (centuries of months)
            head += b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
            end = head.find(b"\n")
        record = decode_record(head[:end])
        places = record.get("months")
        whole = record.get("all")
        spans = None
        if months and isinstance(places, dict):   # the places of the months asked for
            spans = [v for m, v in places.items() if (not first or m >= first)
                     and (not last or m <= last)]
            if not all(type(v) is list and len(v) == 2 and type(v[0]) is int and type(v[1]) is int
                       for v in spans):
                spans = None
        if summed:
            if not (isinstance(whole, list) and len(whole) == 2
                    and all(type(x) is int and x >= 0 for x in whole)):
                return None
            body = os.pread(fd, whole[1] - whole[0], end + 1 + whole[0])
        elif spans is not None:
            # only the lines of the months asked for: a report of one month reads
            # a few kilobytes per store, not its years
            lo, hi = (min(v[0] for v in spans), max(v[1] for v in spans)) if spans else (0, 0)
            body = os.pread(fd, hi - lo, end + 1 + lo) if hi > lo else b""
        else:
            body = head[end + 1:] + b"".join(iter(lambda: os.read(fd, 1 << 20), b""))
        lines = [head[:end]] + body.split(b"\n")
    except (OSError, ValueError, FlowForgeError):
        return None
    finally:
        os.close(fd)
    listed = record.get("months")
    if record.get("schema") != LEDGER_CACHE_SCHEMA or record.get("key") != key \
            or not isinstance(listed, dict):
        return None
    shards = {}
    if summed:
        if lines[1][:10] != b"all     S ":
            return None
        try:
            item = decode_record(lines[1][10:])
        except ValueError:
            return None
        if not isinstance(item.get("doc"), dict):
            return None
        record["shards"] = {"all": item["doc"]}
        return record
    # A month's totals line (its document without the rows), then its rows line:
    # the verified shard blob itself, so that writing the cache encodes no rows.
    raws = {}
    for line in lines[1:]:
        month = line[:7].decode("ascii", "replace")
        kind = line[8:9]
        if not line or (first and month < first) or (last and month > last) \
                or kind not in (b"T", b"R") or (kind == b"R" and not rows):
            continue
        try:
            item = decode_record(line[10:])
        except ValueError:
            return None
        if kind == b"T":
            if item.get("month") != month or not isinstance(item.get("doc"), dict) \
                    or month not in listed or month in shards:
                return None
            shards[month] = item["doc"]
        elif month not in shards or item.get("month") != month \
                or not isinstance(item.get("rows"), list) or shards[month].get("rows"):
            return None
        else:
            shards[month] = dict(shards[month], rows=item["rows"])
            raws[month] = line[10:]
    wanted = [m for m in listed if (not first or m >= first) and (not last or m <= last)]
    if len(wanted) != len(shards) or (rows and len(raws) != len(shards)):
        return None
    record["shards"], record["raws"] = shards, raws
    return record


def _rows_line(blob, doc):
    """A shard blob as the cache's rows line (a checksummed record): the blob as
    it is when it is one line of JSON (FlowForge writes them so), else the
    document re-encoded."""
    body = blob[:-1] if blob.endswith(b"\n") else blob
    if b"\n" in body or b"\r" in body:
        return encode_record(doc)[:-1]
    return b"%08x %s" % (zlib.crc32(body), body)


def summed_shards(shards):
    """One document of the totals (by issue, by project) of a store's month
    documents {month: doc}, as a report over all history adds them up."""
    by_issue, by_project = {}, {}
    for month in sorted(shards):
        for table, into in (("by_issue", by_issue), ("by_project", by_project)):
            for name, seconds in shards[month][table].items():
                into[name] = into.get(name, 0) + seconds
    last = shards[max(shards)] if shards else {}
    return {"user": last.get("user"), "store": last.get("store"), "month": None,
            "granularity": last.get("granularity", "month"), "by_issue": by_issue,
            "by_project": by_project}


def _shard_doc(data, key, month, where):
    """The verified rows of one shard blob; CorruptFile names it."""
    try:
        doc = verify_shard_bytes(data)
        by_project = check_shard_sums(doc)
    except ValueError as e:
        raise CorruptFile(where, "shard %s" % e)
    user, store_id = parse_store_key(key)
    if (doc["user"], doc["store"], doc["month"]) != (user, store_id, month):
        raise CorruptFile(where, "shard says %s--%s/%s but lives in the ledger of %s as %s"
                          % (doc["user"], doc["store"], doc["month"], key, month))
    return {"user": user, "store": store_id, "month": month,
            "granularity": doc["granularity"], "rows": doc["rows"],
            "by_issue": doc["totals"]["by_issue"], "by_project": by_project}


class LedgerView:
    """Every store this clone knows, one tip per store.  The ref of a store this
    clone writes (`owned`) wins over the fetched copies unless one is ahead of
    it; any other local store ref (a `migrate` or a `recover deploy` made here)
    is just one more copy, so its owner's newer history is never hidden."""

    def __init__(self, repo, owned=()):
        self.repo = repo
        self.owned = set(owned)
        self.refs = list_ledger_refs(repo)
        self.warnings = accept_incoming(repo, self.refs)
        self.problems = []  # what makes the ledger unreadable: a report refuses to add up
        self.stores = {}   # key -> (ref, commit, tree)
        self.first_month = {}   # key -> the first month it holds time in (after shards())
        copies = {}
        for ref, (oid, kind, tree) in sorted(self.refs.items()):
            if ref.startswith(STORES_REF):
                key = ref[len(STORES_REF):]
            elif ref.startswith(REMOTES_REF):
                key = ref.rsplit("/", 1)[-1]
                if ref.count("/") != REMOTES_REF.count("/") + 1:
                    continue  # nested under the prefix on the remote: not a store ref
            else:
                continue
            if parse_store_key(key) is None:
                self.warnings.append("ignoring %s: not a store ref (<user>--<store>)" % ref)
                continue
            if kind != "commit":
                self.problems.append("%s points at a %s, not a commit: a store ref must hold "
                                     "shards (see `flowforge recover assess`)" % (ref, kind))
                continue
            copies.setdefault(key, []).append((ref, oid, tree))
        for key, found in sorted(copies.items()):
            chosen = self._choose(key, found)
            if chosen:
                self.stores[key] = chosen
        owners = {}
        for key in sorted(self.stores):
            user, store_id = parse_store_key(key)
            if store_id in owners:
                self.problems.append("two store refs claim store %s: %s and %s; one of them was "
                                     "renamed or copied (see `flowforge recover assess`)" % (
                                         store_id, owners[store_id], key))
            owners[store_id] = key

    def _choose(self, key, found):
        own = [f for f in found if f[0].startswith(STORES_REF) and key in self.owned]
        best = own[0] if own else None
        for candidate in sorted(found, key=lambda f: f[0].startswith(STORES_REF)):
            if best is None:
                best = candidate
            elif candidate[1] != best[1]:
                if is_ancestor(self.repo, best[1], candidate[1]):
                    best = candidate
                elif is_ancestor(self.repo, candidate[1], best[1]) or own:
                    continue
                elif candidate[0].startswith(STORES_REF):
                    # a local repair or migration that the owner's history has left
                    # behind: the fetched history is the one to read
                    self.warnings.append(
                        "%s, made in this clone, has diverged from %s (its owner's history): "
                        "reading the latter; `git update-ref -d %s` removes the local one"
                        % (candidate[0], best[0], candidate[0]))
                else:
                    self.problems.append("%s and %s hold diverging histories of store %s: one "
                                         "was rewritten (see `flowforge recover assess`)"
                                         % (best[0], candidate[0], key))
                    return None
        return best

    def shards(self, months=None, rows=True, summed=False):
        """The verified shard documents of every store (with `months`, a
        (first, last) pair of YYYY-MM or None, only those months), read through
        one cat-file process and cached by tree id.  `summed`: where the cache
        is current, one document per store, of the totals of all its months
        (summed_shards), in place of its months' documents."""
        docs, damaged = [], []
        objects = GitObjects(self.repo.root)
        try:
            stale = {}
            for key, (_, _, tree) in sorted(self.stores.items()):
                cached = _read_ledger_cache(self.repo, key, months, rows, summed)
                if cached is not None and cached.get("tree") == tree:
                    docs += self._cached_docs(key, cached, months, summed)
                else:   # every month of it, to reuse what did not change
                    stale[key] = cached and _read_ledger_cache(self.repo, key)
            if stale:
                docs += self._refresh(objects, stale, months, damaged, rows, summed)
        finally:
            objects.close()
        if damaged:
            raise FlowForgeError("%d damaged shard(s) in the ledger: %s; run `flowforge recover "
                                 "assess`" % (len(damaged), "; ".join(damaged[:3])), EXIT_DATA)
        return docs

    def _cached_docs(self, key, cached, months, summed):
        """The documents a current cache of `key` gives (one, summed, or its months')."""
        if cached["months"]:
            self.first_month[key] = min(cached["months"])
        if summed:
            return [cached["shards"]["all"]] if cached["months"] else []
        return self._pick(key, cached["shards"], months)

    def _refresh(self, objects, stale, months, damaged, rows=True, summed=False, workers=True):
        """The documents (within `months`) of the stores in `stale` {key: their
        old cache or None}, read from git, verified and cached; what is damaged
        is added to `damaged`.  Many stores (a first report after a fetch) are
        spread over forked workers, one per core: each verifies and caches its
        share, and the documents are then read from the caches as a warm report
        reads them (any that cannot be are refreshed here)."""
        docs = []
        count = min(os.cpu_count() or 1, 8) if hasattr(os, "fork") else 1
        if workers and len(stale) >= PARALLEL_CACHE_AT and count > 1:
            keys = sorted(stale)
            chunks = [keys[i::count] for i in range(count)]
            children = fork_workers(chunks[1:], lambda chunk: self._worker_refresh(
                {k: stale[k] for k in chunk}))
            docs += self._refresh(objects, {k: stale.pop(k) for k in chunks[0]}, months, damaged,
                                  rows, summed, workers=False)
            for chunk, found in reap_workers(children):
                if not isinstance(found, list):
                    continue   # the worker failed: its stores are refreshed here
                damaged.extend(str(d) for d in found)
                for key in chunk:
                    cached = _read_ledger_cache(self.repo, key, months, rows, summed)
                    if cached is not None and cached.get("tree") == self.stores[key][2]:
                        docs += self._cached_docs(key, cached, months, summed)
                        del stale[key]
            if damaged or not stale:
                return docs
        keys = sorted(stale)
        roots = objects.get([self.stores[k][2] for k in keys], MAX_TREE_BYTES)
        for key, root in zip(keys, roots):
            try:
                names = parse_tree(root[1], len(self.stores[key][1]) // 2) \
                    if root and root[0] == "tree" else {}
            except ValueError:
                names = {}
            if "audit" not in names or set(names) - set(LEDGER_DIRS):
                damaged.append("%s (%s is not a ledger commit)" % (
                    self.stores[key][0], self.stores[key][1][:12]))
        keys = [k for k in keys if not any(d.startswith(self.stores[k][0] + " ")
                                           for d in damaged)]
        trees = objects.get(["%s:summaries" % self.stores[k][2] for k in keys],
                            MAX_TREE_BYTES)
        wanted = []
        listing = {}
        for key, found in zip(keys, trees):
            ref, commit = self.stores[key][:2]
            entries = {}
            if found is not None:
                try:
                    if found[0] != "tree":
                        raise ValueError("summaries is not a directory")
                    entries = parse_tree(found[1], len(commit) // 2)
                except ValueError as e:
                    damaged.append("%s (%s)" % (ref, e))
                    continue
            old = (stale[key] or {}).get("shards", {})
            listing[key] = {}
            for name, (_, oid) in sorted(entries.items()):
                month = shard_month(name)
                if not month:
                    continue
                listing[key][month] = oid
                if not (month in old and old[month].get("blob") == oid):
                    wanted.append((key, month, oid))
        fresh, raws = {}, {}
        for (key, month, oid), found in zip(wanted, self._blobs(objects, wanted,
                                                                damaged)):
            if found is False:
                break  # a damaged shard stops the reading: nothing more is needed
            where = "%s:summaries/%s.json" % (self.stores[key][0], month)
            try:
                if found is None or found[0] != "blob":
                    raise CorruptFile(where, "is more than %d bytes: not a shard"
                                      % MAX_SHARD_BYTES if found and found[0] == "too large"
                                      else "is missing from the repository")
                doc = fresh[(key, month)] = dict(_shard_doc(found[1], key, month, where),
                                                 blob=oid)
                raws[(key, month)] = _rows_line(found[1], doc)
                if not rows:   # the cache keeps them as raws; parsed, they are most of the memory
                    del doc["rows"]
            except CorruptFile as e:
                damaged.append(str(e))
        for key in sorted(listing):
            old = (stale[key] or {}).get("shards", {})
            shards = {month: fresh.get((key, month)) or old[month]
                      for month in listing[key] if (key, month) in fresh
                      or (month in old and old[month].get("blob") == listing[key][month])}
            if len(shards) != len(listing[key]):
                continue  # damaged: reported below, nothing cached
            old_raws = (stale[key] or {}).get("raws", {})
            total = self._save_cache(key, shards, {month: raws.get((key, month)) or old_raws[month]
                                                   for month in shards})
            if not summed:
                docs.extend(self._pick(key, shards, months))
            elif shards:   # as the cache gives it (_cached_docs)
                self.first_month.setdefault(key, min(shards))
                docs.append(total)
        return docs

    def _worker_refresh(self, stale):
        """A worker's share of _refresh: its own cat-file; returns what is damaged."""
        objects = GitObjects(self.repo.root)
        damaged = []
        try:
            self._refresh(objects, stale, None, damaged, rows=False, workers=False)
        finally:
            objects.close()
        return damaged

    @staticmethod
    def _blobs(objects, wanted, damaged, chunk=32):
        """The blobs of `wanted`, each id read once, a chunk at a time so that a
        teammate's tree of huge or repeated blobs costs one chunk, not all of
        them: once something is damaged, the rest comes back as False."""
        seen = {}
        for start in range(0, len(wanted), chunk):
            if damaged:
                yield from [False] * (len(wanted) - start)
                return
            part = wanted[start:start + chunk]
            missing = sorted({oid for _, _, oid in part} - set(seen))
            seen.update(zip(missing, objects.get(missing, MAX_SHARD_BYTES)))
            for _, _, oid in part:
                yield seen[oid]
            seen = {oid: seen[oid] for _, _, oid in part}   # keep only what may repeat next

    def _pick(self, key, shards, months):
        """The documents of the months within (first month, last month); notes
        the store's first month (its readable label in reports)."""
        if shards and key not in self.first_month:
            self.first_month[key] = min(shards)
        first, last = months or (None, None)
        return [doc for month, doc in shards.items()
                if (first is None or month >= first) and (last is None or month <= last)]

    def _save_cache(self, key, shards, raws):
        """Write the cache of one store: `shards` {month: document}, `raws`
        {month: its rows line (_rows_line)}; returns the summed document."""
        body, places = [], {}
        size = 0
        for month in sorted(shards):
            lines = (month.encode("ascii") + b" T " + encode_record({"month": month, "doc": {
                k: v for k, v in shards[month].items() if k != "rows"}})
                + month.encode("ascii") + b" R " + raws[month] + b"\n")
            places[month] = [size, size + len(lines)]   # where its lines are, after the header
            size += len(lines)
            body.append(lines)
        total = summed_shards(shards)
        summed = b"all     S " + encode_record({"doc": total})
        body.append(summed)
        # the header names each month with the place of its lines (the blob ids are
        # in the lines): a one-month report decodes a small header per store
        record = {"schema": LEDGER_CACHE_SCHEMA, "key": key, "tree": self.stores[key][2],
                  "months": places, "all": [size, size + len(summed)]}
        data = encode_record(record) + b"".join(body)
        try:
            makedirs_private(os.path.dirname(_ledger_cache_path(self.repo, key)))
            # not synced: every line is crc-checked on read, and a lost or torn
            # cache is rebuilt from git (a cold report writes hundreds of these)
            atomic_write(_ledger_cache_path(self.repo, key), data, 0o600, durable=False)
        except (OSError, FlowForgeError) as e:
            debug("cannot cache the ledger of %s: %s" % (key, e))  # a cache: reading goes on
        return total


# -- travelling: fetch, accept, push ------------------------------------------

def accept_incoming(repo, refs):
    """Move what a fetch brought (incoming/<remote>/<key>) to the accepted
    copies (remotes/<remote>/<key>) when it fast-forwards them.  A store ref
    that was rewritten on the remote is refused: the accepted history stays,
    a quarantine ref keeps it for good, and the warning repeats on every read
    until someone decides (`flowforge fetch --accept-rewritten`).  Updates
    `refs` in place; returns the warnings."""
    warnings, updates, keep = [], [], []
    for ref, (oid, kind, tree) in sorted(refs.items()):
        if not ref.startswith(INCOMING_REF) or kind != "commit":
            continue
        rest = ref[len(INCOMING_REF):]
        remote, _, key = rest.rpartition("/")
        if not remote or "/" in remote or parse_store_key(key) is None:
            continue  # nested under the prefix on the remote: not a store ref, never a copy
        accepted = REMOTES_REF + rest
        old = refs.get(accepted)
        if old and old[0] == oid:
            continue
        if old is None or is_ancestor(repo, old[0], oid):
            updates.append((accepted, oid, old[0] if old else "", (oid, kind, tree)))
        elif is_ancestor(repo, oid, old[0]):
            # Behind what we accepted: an unfinished push of ours, or someone
            # moved it back on the remote (time lost there).  Told, not taken.
            warnings.append("the store ref %s on %s is behind the history accepted here (moved "
                            "back, or a push of it is pending): kept the longer one; its owner's "
                            "`flowforge push` brings the remote up to date" % (key, remote))
        else:
            kept = "%s%s/%s" % (QUARANTINE_REF, rest, old[0][:12])
            if kept not in refs:
                keep.append((kept, old[0], "", old))
            warnings.append("the store ref %s was rewritten on %s (its new history does not "
                            "extend the one fetched before): refused; the earlier history is "
                            "kept as %s; run `flowforge recover assess`" % (key, remote, kept))
    if updates or keep:
        try:
            update_refs(repo, [u[:3] for u in updates + keep], "flowforge: accept fetched store refs")
            for ref, _, _, value in updates + keep:
                refs[ref] = value
        except FlowForgeError as e:
            warnings.append("could not record the fetched store refs (%s)" % e)
    return warnings


def default_remote(repo):
    """The remote that `push` and `fetch` use when none is named."""
    _, out, _ = run_git(["remote"], repo.root)
    remotes = out.split()
    if not remotes:
        raise FlowForgeError("this clone has no git remote: add one (`git remote add origin URL`)"
                             " to share the ledger", EXIT_USAGE)
    if len(remotes) == 1:
        return remotes[0]
    if "origin" in remotes:
        return "origin"
    raise FlowForgeError("several remotes (%s): name one" % ", ".join(remotes), EXIT_USAGE)


def check_remote(repo, remote):
    _, out, _ = run_git(["remote"], repo.root)
    if remote not in out.split():
        raise FlowForgeError("no git remote named %r here (remotes: %s)" % (
            remote, ", ".join(out.split()) or "none"), EXIT_USAGE)
    return remote


def fetch_refspec(repo, remote):
    return "+%s*:%s%s/*" % (remote_prefix(repo), INCOMING_REF, remote)


def fetch_state_path(repo):
    return os.path.join(repo.state, "ledger-fetch.json")


def record_fetch(repo, remote):
    try:
        state = load_json(read_bytes(fetch_state_path(repo)))
        if not isinstance(state, dict):
            state = {}
    except (OSError, ValueError, FlowForgeError):
        state = {}
    state[remote] = now()
    makedirs_private(repo.state)
    atomic_write(fetch_state_path(repo), canonical_bytes(state), 0o600)


def last_fetch_time(repo, refs):
    """When the ledger was last fetched here: `flowforge fetch`, or a plain
    `git fetch` with the ledger's refspec (FETCH_HEAD, once incoming store refs
    exist: a fetch without the refspec brings none), whichever is newer."""
    times = []
    try:
        state = load_json(read_bytes(fetch_state_path(repo)))
        times += [v for v in state.values() if isinstance(v, int)] if isinstance(state, dict) else []
    except (OSError, ValueError, FlowForgeError):
        pass
    _, out, _ = run_git(["rev-parse", "--git-path", "FETCH_HEAD"], repo.root, check=False)
    path = out.strip()
    if path and any(ref.startswith(INCOMING_REF) for ref in refs):
        try:
            times.append(int(os.stat(os.path.join(repo.root, path)).st_mtime))
        except OSError:
            pass
    return max(times) if times else None


def never_fetched(repo):
    """A clone with a remote that has never brought the ledger from it."""
    _, remotes, _ = run_git(["remote"], repo.root)
    return bool(remotes.split()) and last_fetch_time(repo, list_ledger_refs(repo)) is None


def ledger_fetch(repo, remote, accept_rewritten=False):
    """Fetch every store ref of `remote`; returns {"stores", "new", "warnings"}."""
    before = list_ledger_refs(repo)
    rc, _, err = run_git(["fetch", "--no-tags", "--prune", "--quiet", remote,
                          fetch_refspec(repo, remote)], repo.root, check=False,
                         env={"GIT_TERMINAL_PROMPT": "0"})
    if rc:
        raise FlowForgeError("cannot fetch the ledger from %s: %s" % (remote, git_error_line(err, rc)),
                             EXIT_UNAVAILABLE)
    record_fetch(repo, remote)
    refs = list_ledger_refs(repo)
    if accept_rewritten:
        take = []
        for ref, (oid, kind, _) in refs.items():
            if ref.startswith(INCOMING_REF + remote + "/") and kind == "commit":
                accepted = REMOTES_REF + ref[len(INCOMING_REF):]
                old = refs.get(accepted)
                if old and old[0] != oid and not is_ancestor(repo, old[0], oid):
                    kept = "%s%s/%s" % (QUARANTINE_REF, ref[len(INCOMING_REF):], old[0][:12])
                    take += [(accepted, oid, old[0])] + ([(kept, old[0], "")] if kept not in refs
                                                         else [])
        update_refs(repo, take, "flowforge: accept rewritten store refs")
        refs = list_ledger_refs(repo)
    warnings = accept_incoming(repo, refs)
    mine = [r for r in refs if r.startswith(INCOMING_REF + remote + "/")]
    periods = [r for r in mine if r.startswith(INCOMING_REF + remote + "/periods/")]
    mine = [r for r in mine if r not in periods]
    changed = [r for r in mine if before.get(r, (None,))[0] != refs[r][0]]
    if changed:
        # A fetch leaves a loose file per ref it wrote (two per store: the
        # incoming copy and the accepted one); every report lists them all.
        # Packed, as `git gc` would, listing 1,000 refs took 4 ms instead of 12.
        # Only speed depends on it: a failure (a lock held) is left to the next.
        run_git(["pack-refs", "--all"], repo.root, check=False)
    return {"remote": remote, "stores": len(mine), "changed": len(changed),
            "periods": len(periods), "warnings": warnings}


PUSH_TIMEOUT = 20.0   # seconds the pre-push hook gives the ledger's own push


def ledger_push(repo, remote, owned, timeout=None, restore=False):
    """Push this clone's store refs that the remote does not have yet, fast-
    forward only; returns {"pushed": [keys], "up_to_date": n}.  A refusal is
    a FlowForgeError whose line says why (and what setting to change).

    `owned` are the keys of the private stores in this clone: they are pushed
    whenever they moved.  Other store refs here (made by `migrate`) are
    published once, while the remote has no copy; after that their owners
    write them, and a refusal of one of them is not this clone's problem.
    With `restore`, the owned refs replace a copy that was rewritten on the
    remote (a lease on the rewritten value the last fetch saw)."""
    refs = list_ledger_refs(repo)
    periods = push_periods(repo, remote, refs, timeout, restore)
    prefix = remote_prefix(repo)
    todo, leases = [], []
    for ref, (oid, _, _) in sorted(refs.items()):
        if ref.startswith(STORES_REF) and parse_store_key(ref[len(STORES_REF):]):
            key = ref[len(STORES_REF):]
            tracking = refs.get("%s%s/%s" % (REMOTES_REF, remote, key))
            seen = refs.get("%s%s/%s" % (INCOMING_REF, remote, key))
            if key not in owned:
                if tracking is None and seen is None:
                    todo.append((key, oid, ""))
                elif (tracking and tracking[0] != oid and (not seen or seen[0] == tracking[0])
                      and is_ancestor(repo, tracking[0], oid)):
                    todo.append((key, oid, tracking[0]))   # a repair made here: fast-forward
            elif restore:
                if seen and seen[0] != oid:
                    todo.append((key, oid, tracking[0] if tracking else ""))
                    leases.append("--force-with-lease=%s%s:%s" % (prefix, key, seen[0]))
            elif (tracking is None or tracking[0] != oid) or (seen and seen[0] != oid):
                todo.append((key, oid, tracking[0] if tracking else ""))
    if not todo:
        return {"remote": remote, "pushed": ["periods/" + m for m in periods],
                "up_to_date": not periods}
    specs = ["%s%s%s:%s%s" % ("+" if restore else "", STORES_REF, key, prefix, key)
             for key, _, _ in todo]
    rc, out, err = run_git(["push", "--no-verify", "--porcelain"] + leases + [remote] + specs,
                           repo.root, check=False, timeout=timeout,
                           env={"GIT_TERMINAL_PROMPT": "0"})
    done, refused = [], []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and ":" in parts[1]:
            key = parts[1].split(":", 1)[0][len(STORES_REF):]
            if parts[0] in (" ", "*", "=", "+"):
                done.append(key)
            elif parts[0] == "!":
                refused.append((key, parts[2] if len(parts) > 2 else "rejected"))
    tips = {key: (oid, old) for key, oid, old in todo}
    updates = []
    for key in done:  # what the remote now has, as a fetch would have recorded it
        if key in tips:
            # git itself may have moved incoming/ already (its fetch refspec maps
            # pushed refs): no compare-and-swap on that one
            updates.append(("%s%s/%s" % (REMOTES_REF, remote, key), tips[key][0], tips[key][1]))
            updates.append(("%s%s/%s" % (INCOMING_REF, remote, key), tips[key][0], None))
    try:
        update_refs(repo, updates, "flowforge: pushed to %s" % remote)
    except FlowForgeError:
        pass  # only the record of what the remote has: the next push finds out again
    refused = [r for r in refused if r[0] in owned]
    if rc and out.strip() and not refused and all(key in done for key, _, _ in todo
                                                  if key in owned):
        rc = 0  # the remote answered, and refused only other stores' publication
    if refused or rc:
        reason = refused[0][1] if refused else git_error_line(err, rc)
        if "non-fast-forward" in reason or "fetch first" in reason or "stale info" in reason:
            hint = ("the remote's copy of %s has a history this clone does not have: run "
                    "`flowforge fetch`; if it says the ref was rewritten there, `flowforge push "
                    "--restore` puts this clone's history back" % refused[0][0])
        elif "hook declined" in reason or "denied" in reason or "refus" in reason.lower():
            hint = ("the remote refused refs under %s: if it accepts only branches, set "
                    "ledger.prefix to \"refs/heads/flowforge/\" in .flowforge/config.json "
                    "(\"ledger\": {\"prefix\": \"refs/heads/flowforge/\"})" % prefix)
        else:
            hint = reason
        error = FlowForgeError("cannot push the ledger to %s (%s): %s" % (
            remote, reason if hint != reason else "exit %d" % rc, hint), EXIT_UNAVAILABLE)
        error.permanent = bool(refused) and "non-fast-forward" in reason
        raise error
    return {"remote": remote, "pushed": done + ["periods/" + m for m in periods],
            "up_to_date": False}


def push_periods(repo, remote, refs, timeout=None, restore=False):
    """Push the period records (closes, reopens) made here that the remote has
    not seen, fast-forward only; returns the months pushed.  A refusal means
    another close or reopen of that month came first: fetch, then decide."""
    prefix = remote_prefix(repo)
    todo, diverged, leases = [], [], []
    for ref, (oid, _, _) in sorted(refs.items()):
        month = ref[len(PERIODS_REF):] if ref.startswith(PERIODS_REF) else None
        if month and is_month(month):
            seen = refs.get("%s%s/periods/%s" % (INCOMING_REF, remote, month))
            if seen is None or (seen[0] != oid and is_ancestor(repo, seen[0], oid)):
                todo.append((month, oid))
            elif seen[0] != oid and not is_ancestor(repo, oid, seen[0]):
                if restore:
                    todo.append((month, oid))
                    leases.append("--force-with-lease=%speriods/%s:%s" % (prefix, month, seen[0]))
                else:
                    diverged.append(month)
    if diverged:
        error = FlowForgeError("the record of %s on %s is not in this clone's history (rewritten "
                               "or forged there): this clone's close or reopen is not published; "
                               "`flowforge push --restore` puts it back" % (
                                   ", ".join(diverged), remote), EXIT_UNAVAILABLE)
        error.permanent = True
        raise error
    if not todo:
        return []
    rc, _, err = run_git(["push", "--no-verify", "--porcelain"] + leases + [remote]
                         + ["%s%s%s:%speriods/%s" % ("+" if restore else "", PERIODS_REF, m, prefix,
                                                     m) for m, _ in todo],
                         repo.root, check=False, timeout=timeout, env={"GIT_TERMINAL_PROMPT": "0"})
    if rc:
        raise FlowForgeError("cannot push the closed periods %s to %s (%s): if another close or "
                             "reopen came first, run `flowforge fetch` and look again"
                             % (", ".join(m for m, _ in todo), remote, git_error_line(err, rc)),
                             EXIT_UNAVAILABLE)
    try:
        update_refs(repo, [("%s%s/periods/%s" % (INCOMING_REF, remote, m), oid, None)
                           for m, oid in todo], "flowforge: pushed periods to %s" % remote)
    except FlowForgeError:
        pass  # only the record of what the remote has
    return [m for m, _ in todo]


def add_fetch_refspec(repo, remote):
    """Make a plain `git fetch` / `git pull` bring the ledger too (idempotent).
    `git config flowforge.fetch false` opts this clone out."""
    if git_config_get(repo.root, "flowforge.fetch") == "false":
        return False
    spec = fetch_refspec(repo, remote)
    rc, out, _ = run_git(["config", "--get-all", "remote.%s.fetch" % remote], repo.root,
                         check=False)
    if spec in out.splitlines():
        return False
    for old in out.splitlines():  # a changed ledger.prefix: the old mapping goes
        if old.endswith(":%s%s/*" % (INCOMING_REF, remote)):
            run_git(["config", "--fixed-value", "--unset", "remote.%s.fetch" % remote, old],
                    repo.root, check=False)
    run_git(["config", "--add", "remote.%s.fetch" % remote, spec], repo.root)
    return True


def remove_fetch_refspecs(repo):
    _, out, _ = run_git(["remote"], repo.root)
    removed = 0
    for remote in out.split():
        rc, specs, _ = run_git(["config", "--get-all", "remote.%s.fetch" % remote], repo.root,
                               check=False)
        for spec in specs.splitlines():
            if (":" + INCOMING_REF) in spec:
                run_git(["config", "--fixed-value", "--unset", "remote.%s.fetch" % remote, spec],
                        repo.root, check=False)
                removed += 1
    return removed


# -- the 0.1 layout: shards and chains in .flowforge/team/ on the branch -------

def legacy_stores(repo):
    """{key: {"shards": {month: path}, "chain": path or None}} of the work tree's
    .flowforge/team/ (FlowForge 0.1), which `migrate` moves into the ledger."""
    out = {}
    for path, user, store_id, month in list_shard_files(repo):
        out.setdefault(store_key(user, store_id), {"shards": {}, "chain": None})["shards"][month] = path
    for path, user, store_id in list_team_chains(repo):
        out.setdefault(store_key(user, store_id), {"shards": {}, "chain": None})["chain"] = path
    return out


def legacy_store_files(repo, key, entry):
    """(ledger files {name: bytes}, date of the last record) of one in-tree
    store, after checking every shard, the chain, and that they agree.  The
    chain is split into UTC years; its records keep their work-tree paths
    (their hashes cover them)."""
    if parse_store_key(key) is None:
        raise FlowForgeError("%s: not a store directory (<user>--<store>)" % key, EXIT_DATA)
    files, shas = {}, {}
    for month, path in sorted(entry["shards"].items()):
        data = read_bytes_and_stat(path, MAX_SHARD_BYTES)[0]
        _shard_doc(data, key, month, repo.rel(path))
        files[shard_name(month)] = data
        shas[shard_name(month)] = shard_sha(data)
    chain = read_bytes_and_stat(entry["chain"], MAX_CHAIN_BYTES)[0] if entry["chain"] else b""
    where = repo.rel(entry["chain"]) if entry["chain"] else key
    result = verify_chain_bytes(chain, where)
    if not result["ok"]:
        raise CorruptFile(where, result["problem"] + (
            "; on the owner's machine `flowforge reconcile` repairs it first"
            if result["torn_tail"] else ""))
    audited = {ledger_file_name(p): sha for p, sha in result["files"].items()}
    for name, sha in sorted(shas.items()):
        if audited.get(name) != sha:
            raise CorruptFile(repo.rel(entry["shards"][name[10:17]]),
                              "differs from its last audit record" if name in audited
                              else "is not in its audit chain")
    years, last_ts = {}, 0
    for line in chain.splitlines(True):
        ts = load_json(line)["ts"]
        if ts < last_ts:
            raise CorruptFile(where, "records are not in time order")
        last_ts = ts
        name = "audit/%s.jsonl" % local_date(ts, _utc())[:4]
        years[name] = years.get(name, b"") + line
    files.update(years)
    return files, last_ts


def migrate_store(repo, key, entry):
    """Create the store's ref from its in-tree files, unless the ledger already
    holds them; returns the new tip or None.  Deterministic (same tree, date,
    author, message), so two clones migrating the same data make the same
    commit and neither push conflicts."""
    files, last_ts = legacy_store_files(repo, key, entry)
    user, store_id = parse_store_key(key)
    ledger = StoreLedger(repo, user, store_id)
    try:
        tip = ledger.tip()
        if tip:
            names = sorted(n for n in files if n.startswith("audit/"))
            have = ledger.read(names)
            if all(have[n] is not None and have[n].startswith(files[n]) for n in names):
                return None  # migrated before: the ledger's chain extends the in-tree one
            raise FlowForgeError("the ledger already holds store %s with a history that does not "
                                 "contain .flowforge/team/'s: see `flowforge recover assess`"
                                 % key, EXIT_DATA)
        return ledger.commit(files, "migrate: %d shard(s) from .flowforge/team" % len(
            [n for n in files if n.startswith("summaries/")]), last_ts or now())
    finally:
        ledger.close()


# ############################################################################
# 9. Aggregation
# ############################################################################
#
# Aggregation is incremental.  The aggregation state of a store remembers, for
# each day file, its size and mtime and the months (and periods) it contributes
# to -- an entry that crosses midnight at the end of a month, or was edited, can
# reach another month -- and the ledger tip it was computed against.  A changed
# day file marks its old and new periods; each marked period is recomputed from
# the day files that contribute to it; the shards that changed, with one audit
# record for them, become one ledger commit.

def _periods(contributions):
    """The periods (days, weeks or months) that one day file's time lies in."""
    return sorted({key[0] for cells in contributions.values() for key in cells})


class StaleAggregationState(Exception):
    """A part of the aggregation state does not match its header: rebuild it."""


class AggregationState:
    """What the aggregation of one store remembers, split so that a run reads
    and writes what it touches, not the years behind it (a whole-state rewrite
    cost 15 ms of every commit's hook at a million entries):

    - state/aggregate/<user>.json, the header: the ledger tip, the store's list
      token, and the sha256 of each part;
    - state/aggregate/<user>.parts/<YYYY>.json: {day: [size, mtime_ns, months,
      periods]} of that year's day files (a part a year, not a month: a full
      run writes every part, and 180 files per store made `aggregate --full`
      of 15 years 30 ms a store slower).

    The days that feed a month are in its own year's part and the month
    before's (an entry across midnight); a day whose time reaches any month
    other than its own and the next (an edited entry) is named in the header's
    "reach", so that recomputing a month finds every day that feeds it.  Parts
    are written before the header and without fsync: a part that does not match
    the sha256 its header names (a crash in between, an edit) makes the state
    stale, and the next run rebuilds it in full -- it is a cache of the private
    store, and the header, written durably last, is what a run trusts."""

    def __init__(self, repo, user):
        self.path = os.path.join(repo.aggstate, user + ".json")
        self.parts_dir = os.path.join(repo.aggstate, user + ".parts")
        self.header = None
        self.moved = False     # load(): a header of this store, of another ledger tip
        self._parts = {}      # year: {day: entry}, as loaded or changed
        self._touched = set()  # years whose part changed

    def load(self, expected):
        """Read the header; True when it is this store's, of this ledger tip
        (`expected` fields) -- else the run is a full one."""
        try:
            header = load_json(read_bytes(self.path))
        except FileNotFoundError:
            return False
        except (ValueError, RecursionError):
            debug("aggregation state %s is damaged; rebuilding" % self.path)
            return False
        # A ledger tip other than the one the state was computed against
        # (restored, taken over from a fetched copy) may hold other shards.
        if not isinstance(header, dict) or any(header.get(k) != v for k, v in expected.items()):
            self.moved = isinstance(header, dict) and all(
                header.get(k) == v for k, v in expected.items() if k != "tip")
            return False
        parts, reach = header.get("parts"), header.get("reach")
        if not (isinstance(parts, dict) and all(len(y) == 4 and y.isdecimal() and isinstance(d, str)
                                                for y, d in parts.items())
                and isinstance(reach, dict) and all(
                    type(days) is list and all(isinstance(d, str) and is_iso_date(d) for d in days)
                    for days in reach.values())):
            return False
        self.header = header
        return True

    @staticmethod
    def _valid(year, day, entry):
        return (is_iso_date(day) and day[:4] == year and type(entry) is list and len(entry) == 4
                and type(entry[0]) is int and type(entry[1]) is int
                and type(entry[2]) is list and type(entry[3]) is list
                and all(isinstance(m, str) and is_month(m) for m in entry[2])
                and all(isinstance(p, str) for p in entry[3]))

    def part(self, year):
        """{day: entry} of the days of `year` (loaded once, checked by sha256)."""
        found = self._parts.get(year)
        if found is not None:
            return found
        digest = self.header["parts"].get(year)
        found = {}
        if digest is not None:
            try:
                raw = read_bytes(os.path.join(self.parts_dir, year + ".json"))
                if sha256_hex(raw)[:32] != digest:
                    raise ValueError("it does not match its header")
                found = load_json(raw)
                if not isinstance(found, dict) or not all(
                        self._valid(year, d, e) for d, e in found.items()):
                    raise ValueError("its entries are not [size, mtime, months, periods]")
            except (OSError, ValueError, RecursionError, FlowForgeError) as e:
                raise StaleAggregationState("part %s: %s" % (year, e))
        self._parts[year] = found
        return found

    def entry(self, day):
        return self.part(day[:4]).get(day)

    def all_days(self):
        """Every day the state knows (reads every part)."""
        return [day for year in sorted(self.header["parts"]) for day in self.part(year)]

    def days_feeding(self, month):
        """(day, entry) of the days whose time reaches `month`."""
        for year in sorted({shift_month(month, -1)[:4], month[:4]}):
            for day, entry in self.part(year).items():
                if month in entry[2]:
                    yield day, entry
        for day in self.header["reach"].get(month, ()):
            entry = self.entry(day)
            if entry is not None and month in entry[2]:
                yield day, entry

    @staticmethod
    def _far(day, entry):
        """The months of a day's entry beyond its own and the next."""
        own = day[:7]
        return [m for m in entry[2] if m != own and m != shift_month(own, 1)] if entry else []

    def update(self, entries):
        """Take in {day: new entry, or None for a day file that is gone}."""
        reach = self.header["reach"]
        for day, entry in sorted(entries.items()):
            part = self.part(day[:4])
            old = part.get(day)
            if old == entry:
                continue
            for month in self._far(day, old):
                reach[month] = [d for d in reach.get(month, []) if d != day]
                if not reach[month]:
                    del reach[month]
            for month in self._far(day, entry):
                reach[month] = sorted(set(reach.get(month, [])) | {day})
            if entry is None:
                del part[day]
            else:
                part[day] = entry
            self._touched.add(day[:4])

    def replace(self, entries):
        """Begin anew with {day: entry} of every day file (a full run)."""
        self.header = {"parts": {}, "reach": {}}
        self._parts = {}
        for day, entry in sorted(entries.items()):
            self._parts.setdefault(day[:4], {})[day] = entry
            for month in self._far(day, entry):
                self.header["reach"].setdefault(month, []).append(day)
        self._touched = set(self._parts)

    def save(self, fields):
        """Write the parts that changed, then the header (`fields` and the
        parts' sums), durably: the header is what a run trusts."""
        parts = dict(self.header["parts"])
        for year in sorted(self._touched):
            days = self._parts[year]
            if not days:
                parts.pop(year, None)
                continue
            data = canonical_bytes(days)
            path = os.path.join(self.parts_dir, year + ".json")
            old, parts[year] = parts.get(year), sha256_hex(data)[:32]
            if old == parts[year]:   # as its header says, and as it was read and checked
                continue
            try:   # a full run renders every part anew: the ones that are as they were stay
                if old is None and read_bytes(path) == data:
                    continue
            except (OSError, FlowForgeError):
                pass
            self._make_parts_dir()
            atomic_write(path, data, 0o600, sync_dir=False, durable=False)
        header = dict(fields, parts=parts, reach=self.header["reach"])
        data = canonical_bytes(header)
        try:
            unchanged = read_bytes(self.path) == data
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            makedirs_private(os.path.dirname(self.path))
            atomic_write(self.path, data, 0o600)
        self.header, self._touched = header, set()

    def _make_parts_dir(self):
        """The parts' directory; a file or link at its place (our cache's
        place) is removed, so that a damaged state heals instead of failing
        every run."""
        try:
            if os.path.islink(self.parts_dir) or (os.path.lexists(self.parts_dir)
                                                  and not os.path.isdir(self.parts_dir)):
                os.unlink(self.parts_dir)
            makedirs_private(self.parts_dir)
        except OSError as e:
            raise StorageError(self.parts_dir, e)

    def prune(self):
        """Remove part files that the header does not name (years that lost
        their last day file, parts of an older state)."""
        try:
            names = os.listdir(self.parts_dir)
        except OSError:
            return
        for name in names:
            if name[:-5] not in self.header["parts"]:
                try:
                    os.unlink(os.path.join(self.parts_dir, name))
                except OSError:
                    pass


class Aggregator:
    """Turns one private store into its shards in the ledger, incrementally or
    in full, and records each change in the store's audit chains."""

    def __init__(self, store, granularity):
        self.store = store
        self.repo = store.repo
        self.granularity = granularity

    def contributions(self, day, records):
        return day_contributions(records, self.store.clock, self.granularity)

    def run(self, full=False, lock_timeout=10.0, routine=False):
        """Aggregate; returns {"written": [ledger names], "months", "full", "audit": seq, "tip"}.
        `routine` (before a report): only the incremental work of an unchanged
        ledger; a store ref that moved under the cache (restored, rewritten,
        tampered with) is left to an explicit `aggregate`, which says so."""
        store = self.store
        with self.repo.lock("aggregate." + store.user, lock_timeout,
                            "aggregation for %s" % store.user):
            ledger = StoreLedger(self.repo, store.user, store.store_id)
            try:
                return self._run(ledger, full, lock_timeout, routine)
            finally:
                ledger.close()

    def settled(self, tip):
        """True when a routine run against ledger tip `tip` would take nothing
        in: the store's list of changed days names none, and the state (checked
        as a run checks it) was saved against `tip` with this list and these
        settings.  Small files read, no lock and no git -- what a report costs for
        each of a clone's stores before it reads the ledger.  `tip` None (no
        ref, or a fetched copy a run might take over): not settled."""
        store = self.store
        if tip is None or store.settings().get("schema", 1) < 2:
            return False
        _, named, token = store.read_changes()
        if token is None or named != set():
            return False
        state = AggregationState(self.repo, store.user)
        return state.load(self._state_fields(tip)) and state.header.get("journal") == token

    def _private_chain(self):
        return AuditChain(os.path.join(self.store.dir, "audit.jsonl"))

    def known_team_seq(self):
        """The last team audit record that this store's private chain records."""
        last, _ = self._private_chain()._tail()
        try:
            seq = load_json(last).get("team_seq") if last else 0
        except (ValueError, AttributeError, RecursionError):
            return 0
        return seq if type(seq) is int and seq > 0 else 0

    def _state_fields(self, tip):
        """What a state must record to be trusted by a run against `tip`."""
        return {"schema": AGGSTATE_SCHEMA, "store": self.store.store_id,
                "granularity": self.granularity, "timezone": self.store.tz_name, "tip": tip}

    def _changed_days(self, state, changes):
        """{day: [size, mtime_ns], or None for a day file gone} of the day files
        that differ from the state: those the store's list of changes names
        when the state took in that very list (its token), else every one."""
        store = self.store
        if changes[1] is not None and changes[2] and state.header.get("journal") == changes[2]:
            stats = {}
            for day in changes[1]:
                try:
                    st = os.lstat(store.day_path(day))
                    stats[day] = [st.st_size, st.st_mtime_ns]
                except FileNotFoundError:
                    pass
            named = set(changes[1])
        else:
            stats = store.day_stats()
            named = set(stats).union(state.all_days())
        differ = {}
        for day in sorted(named):
            old = state.entry(day)
            if stats.get(day) is None:
                if old is not None:
                    differ[day] = None
            elif old is None or old[:2] != stats[day]:
                differ[day] = stats[day]
        return differ

    def _run(self, ledger, full, lock_timeout, routine=False):
        store = self.store
        known = self.known_team_seq()
        if ledger.tip(known) is None:
            legacy = legacy_stores(self.repo).get(ledger.key)
            if legacy:  # this store's 0.1 history first, so its chain goes on
                migrate_store(self.repo, ledger.key, legacy)
                ledger._tip = False
            elif known and never_fetched(self.repo):
                # a fresh clone of a restored store: its ledger is on the remote, not
                # here yet (with no remote, or after a fetch, the history starts anew)
                raise FlowForgeError(
                    "%s was aggregated before (team audit record %d) but its ledger ref is not in "
                    "this clone: run `flowforge fetch`, then aggregate again" % (ledger.key, known))
        tip = ledger.tip(known)
        if tip:
            self._heal_private_chain(ledger, known)
        state = AggregationState(self.repo, store.user)
        if not full and not state.load(self._state_fields(tip)):
            if tip and routine and state.moved:
                raise FlowForgeError("its ledger ref is not the one this clone last wrote "
                                     "(restored, rewritten or damaged?)")
            full = True
        with store.lock(lock_timeout):
            # What the list of changed days names now is taken in by this run (and
            # dropped from it once the new state is saved).  It stands for every
            # change since the state only if the state records this list's token
            # (saved under schema 2, state "journal"); else every day file is
            # looked at.
            journaled = store.settings().get("schema", 1) >= 2
            changes = store.read_changes(create=journaled)
            taken = None
            if not full:
                try:
                    taken = self._take_in_changes(ledger, state, changes)
                except StaleAggregationState as e:
                    debug("aggregation state of %s: %s; rebuilding" % (store.user, e))
            full = taken is None
            if full:
                taken = self._take_in_all(ledger, state)
            parsed, changed, months, base, periods = taken
            present = {day: st[0] for day, st in changed.items() if st}
            store.mirror.sync(None if full else sorted(present), present)
        files, totals, issues = self._changed_shards(ledger, months, parsed, base, periods)
        record = None
        if files:
            record, tip = self._commit(ledger, files, totals,
                                       "aggregate-full" if full else "aggregate")
        saved = True
        try:
            state.save(dict(self._state_fields(tip), user=store.user,
                            journal=journaled and changes[2]))
            if full:
                state.prune()
        except StorageError as e:
            if not record:
                raise
            saved = False
            # a cache: without it the next run recomputes in full, to the same shards
            log_event(self.repo, "after-commit-point", command="aggregate", error=one_line(e))
            warn("aggregated into the ledger, but its cache could not be written (%s)" % e)
        if saved and changes[0]:   # what this run took in is in the state now
            try:
                with store.lock(lock_timeout):
                    store.forget_changes(changes[0], renew=changes[1] is None)
            except (OSError, FlowForgeError) as e:   # kept: the next run stats them again
                log_event(self.repo, "after-commit-point", command="aggregate",
                          what="the list of changed days kept what it named", error=one_line(e))
        written = sorted(n for n in files if n.startswith("summaries/"))
        if written:
            announce(self.repo, "on_aggregate", user=store.user, store=store.store_id,
                     written=written, issues=sorted(issues))
        return {"user": store.user, "store": store.store_id, "full": full,
                "months": sorted(months), "written": written,
                "audit": record["seq"] if record else None, "tip": tip}

    def _take_in_all(self, ledger, state):
        """Every day file read (the stat from the same descriptor), for a full
        run: (parsed, {day: stat}, months, None, None)."""
        parsed, stats, entries = {}, {}, {}
        for day, records, stat in self.store.read_all_days():
            contributions = parsed[day] = self.contributions(day, records)
            stats[day] = stat
            entries[day] = stat + [sorted(contributions), _periods(contributions)]
        state.replace(entries)
        months = set(ledger.months())   # also months whose entries are all gone now
        for contributions in parsed.values():
            months.update(contributions)
        return parsed, stats, months, None, None

    def _take_in_changes(self, ledger, state, changes):
        """The changed day files read, and the unchanged ones that feed the
        periods they touch: (parsed, {changed day: stat or None}, months,
        cells of those months' shards outside the periods, periods)."""
        store = self.store
        changed = self._changed_days(state, changes)
        parsed, entries = {}, {}
        months, periods = set(), set()
        for day, stat in changed.items():
            old = state.entry(day)
            if old is not None:
                months.update(old[2])
                periods.update(old[3])
            if stat is None:
                entries[day] = None
                continue
            records, stat = store.read_day_and_stat(day)
            if stat is None:   # gone since it was looked at
                changed[day] = entries[day] = None
                continue
            contributions = parsed[day] = self.contributions(day, records)
            changed[day] = stat
            entries[day] = stat + [sorted(contributions), _periods(contributions)]
            months.update(contributions)
            periods.update(entries[day][3])
        # The cells of the periods that changed are recomputed from the day
        # files that contribute to them; the rest of each month comes from its
        # shard as it is.  So one changed day re-reads a few day files, not its
        # whole month.
        base = self._shard_cells(ledger, months, periods)
        if base is None:
            periods = None
        for month in sorted(months):   # unchanged days that feed a recomputed period
            for day, old in state.days_feeding(month):
                if day not in parsed and day not in changed and (
                        periods is None or periods.intersection(old[3])):
                    parsed[day] = self.contributions(day, store.read_day(day))
        state.update(entries)
        return parsed, changed, months, base, periods

    def _heal_private_chain(self, ledger, known):
        """Team records that the private chain lacks -- the process ended between
        the ledger commit and the private append (kill -9, the hook's budget) --
        are recorded there now, marked as healed."""
        seq = ledger.chain_head()[0]
        if seq <= known:
            return
        names = sorted("audit/" + n for n in ledger.tree("audit") if is_chain_name(n))
        chain = b"".join(d or b"" for d in ledger.read(names).values())
        local = self._private_chain()
        for line in chain.splitlines():
            try:
                record = load_json(line)
            except (ValueError, RecursionError):
                return
            if isinstance(record, dict) and type(record.get("seq")) is int and record["seq"] > known:
                local.append("healed", record.get("ts", 0), files=record.get("files", {}),
                             totals=record.get("totals", {}), team_seq=record["seq"],
                             healed=record.get("action"))
        self.store.mirror.sync([])

    @staticmethod
    def month_cells(parsed):
        """{month: {cell: seconds}} of parsed days, in one pass over them (not
        one pass per month: a million entries over years are read once)."""
        by_month = {}
        for contributions in parsed.values():
            for month, cells in contributions.items():
                into = by_month.get(month)
                if into is None:
                    by_month[month] = dict(cells)
                    continue
                for key, seconds in cells.items():
                    into[key] = into.get(key, 0) + seconds
        return by_month

    def _shard_cells(self, ledger, months, periods):
        """{month: cells of its shard outside `periods`}, from the ledger as it
        is; None when a shard does not read back (then months are recomputed
        whole, from every day file that has time in them)."""
        base = {}
        for name, raw in ledger.read([shard_name(m) for m in sorted(months)]).items():
            cells = base[name[len("summaries/"):-len(".json")]] = {}
            if raw is None:
                continue
            try:
                for period, issue, project, seconds in load_json(raw)["rows"]:
                    if period not in periods:
                        cells[(period, issue, project)] = seconds
            except (TypeError, ValueError, KeyError, RecursionError):
                return None
        return base

    def render_month(self, month, by_month):
        cells = by_month.get(month, {})
        return render_shard(self.store.user, self.store.store_id, month, self.granularity,
                            self.store.tz_name, cells), bool(cells)

    def compute_all(self):
        """{month: shard bytes} recomputed from every private record, writing nothing."""
        with self.store.lock():
            parsed = {day: self.contributions(day, self.store.read_day(day))
                      for day in self.store.days()}
        ledger = StoreLedger(self.repo, self.store.user, self.store.store_id)
        try:
            existing = set(ledger.months())
        finally:
            ledger.close()
        months = set(existing)
        for contributions in parsed.values():
            months.update(contributions)
        out = {}
        by_month = self.month_cells(parsed)
        for month in sorted(months):
            data, has_cells = self.render_month(month, by_month)
            if has_cells or month in existing:
                out[month] = data
        return out

    def _changed_shards(self, ledger, months, parsed, base=None, periods=None):
        """({ledger name: new shard bytes}, {month: total seconds}, issues of the
        changed shards before and after) for the months whose shard changed.
        With `base`, a month is its cells outside `periods` plus what the
        parsed day files give to `periods`."""
        names = {shard_name(m): m for m in sorted(months)}
        files, totals, issues = {}, {}, set()
        by_month = self.month_cells(parsed)
        if base is not None:
            for month in months:
                cells = dict(base.get(month, {}))
                for key, seconds in by_month.get(month, {}).items():
                    if key[0] in periods:
                        cells[key] = cells.get(key, 0) + seconds
                by_month[month] = cells
        # A shard is compared by its blob id in the tip's tree, so that only the
        # shards that changed are read (for the issues they had): a full
        # aggregation of years re-reads none of its unchanged months.
        listed = ledger.tree("summaries") if ledger.tip() else {}
        rendered = {}
        for name, month in sorted(names.items()):
            data, has_cells = self.render_month(month, by_month)
            mode, oid = listed.get(name[len("summaries/"):], (None, None))
            if mode == "100644" and oid == blob_id(data, "sha1" if len(oid) == 40 else "sha256"):
                continue  # unchanged
            if mode is None and not has_cells:
                continue  # a month that never had time
            rendered[name] = data
        old = ledger.read(sorted(name for name in rendered if name[len("summaries/"):] in listed))
        for name, data in sorted(rendered.items()):
            month = names[name]
            if old.get(name) == data:
                continue
            if old.get(name) is not None:   # the issues it had (its new ones are in its cells)
                try:
                    issues.update(row[1] for row in load_json(old[name])["rows"])
                except (TypeError, ValueError, KeyError, IndexError, RecursionError):
                    pass
            cells = by_month.get(month, {})
            issues.update(key[1] for key, seconds in cells.items() if seconds)
            files[name] = data
            totals[month] = sum(cells.values())
        return files, totals, issues

    def _commit(self, ledger, files, totals, action):
        """One audit record and one ledger commit for the changed shards, then
        the store's private chain; returns (team record, new tip)."""
        ts = now()
        record, tip = ledger.commit_audited(files, action, ts, totals=totals)
        # The ledger commit is the commit point: what follows is bookkeeping of
        # this machine, and a failure there no longer makes the command fail.
        try:
            local = AuditChain(os.path.join(self.store.dir, "audit.jsonl"))
            item = local.trim_torn_tail(self.repo)  # an append cut short by a crash
            if item:
                warn("%s ended in a torn line; trimmed it (a copy is quarantined as %s)"
                     % (self.repo.rel(local.path), item))
            local.append(action, ts, files=record["files"], totals=totals,
                         team_seq=record["seq"])
        except StorageError as e:
            log_event(self.repo, "after-commit-point", command="aggregate", error=one_line(e))
            warn("aggregated into the ledger, but the private audit record could not be written "
                 "(%s)" % e)
        self.store.mirror.sync([])  # the local chain (and settings) without any day file
        return record, tip


def aggregate_store(repo, user, full=False, lock_timeout=10.0, routine=False):
    store = PrivateStore(repo, user)
    return Aggregator(store, repo.config["granularity"]).run(full, lock_timeout, routine)


def aggregate_stores(repo, users, full=False, lock_timeout=10.0):
    """Aggregate several private stores.  Stores share nothing (own locks, own
    shards), so many of them are spread over forked workers, one per core;
    errors travel back as data so that their exit codes survive."""
    workers = min(len(users) // 8, os.cpu_count() or 1, 8)
    if workers < 2 or not hasattr(os, "fork"):
        return [aggregate_store(repo, u, full, lock_timeout) for u in users]

    def run_chunk(chunk):
        out = []
        for user in chunk:
            try:
                out.append(["ok", aggregate_store(repo, user, full, lock_timeout)])
            except FlowForgeError as e:
                out.append(["error", str(e), e.exit_code])
        return out

    chunks = [users[i::workers] for i in range(workers)]
    children = fork_workers(chunks[1:], run_chunk)
    outcomes = {0: run_chunk(chunks[0])}
    for n, (_, result) in enumerate(reap_workers(children), 1):
        if not isinstance(result, list):
            raise FlowForgeError("an aggregation worker failed: run `flowforge aggregate` again")
        outcomes[n] = result
    by_user = {}
    for n, chunk in enumerate(chunks):
        by_user.update(zip(chunk, outcomes[n]))
    for user in users:
        if by_user[user][0] == "error":
            raise FlowForgeError(by_user[user][1], by_user[user][2])
    return [by_user[user][1] for user in users]


def own_store_keys(repo):
    """The ledger keys of the private stores in this clone (the refs it writes)."""
    keys = set()
    for user in local_users(repo):
        try:
            keys.add(store_key(user, PrivateStore(repo, user).store_id))
        except FlowForgeError:
            continue  # damaged settings: `recover assess` says so
    return keys


def local_users(repo):
    """Users with a private store in this clone."""
    try:
        names = sorted(os.listdir(repo.users))
    except FileNotFoundError:
        return []
    return [n for n in names if valid_user_name(n)
            and os.path.isfile(os.path.join(repo.users, n, "config.json"))]


def known_users(repo):
    """Users this clone knows of: its private stores, and every store in its ledger."""
    users = set(local_users(repo))
    for ref in list_ledger_refs(repo):
        owner, sep, _ = ref.rsplit("/", 1)[-1].rpartition("--")
        if sep and valid_user_name(owner):
            users.add(owner)
    return sorted(users)


# ############################################################################
# 10. Retry queue
# ############################################################################
#
# Everything that failed, or must happen later, is a job in state/queue.db.
# SQLite in WAL mode with synchronous=FULL: a commit survives power loss.
# Every write is one BEGIN IMMEDIATE transaction, which takes the write lock
# up front (a DEFERRED one that reads first can fail with SQLITE_BUSY_SNAPSHOT,
# which no busy timeout cures).  A claim is a lease with a random fencing
# token: once the lease has expired the worker can neither acknowledge the job
# nor commit an effect with it.  Nothing is deleted until done (and purged).
#
#   queued --claim--> leased --ack--> done
#      ^                 |--fail / lease expired--> queued (after backoff)
#      |                 '--fail, attempts used up / permanent--> dead
#      '------------- retry ID (dead or queued) ------------------'

QUEUE_SCHEMA = 1
PRIORITIES = {"critical": 0, "high": 1, "normal": 2, "low": 3}
BACKOFF_BASE = 1.0             # seconds
BACKOFF_CAP = 3600.0           # full-jitter ceiling
RETRY_AFTER_MAX = 86400.0      # a server cannot park a job for more than a day
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_LEASE = 120.0
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs",
                       "lustre", "gpfs", "fuse.sshfs", "fuse.s3fs", "davfs"}
_JOB_KIND = Pattern(r"[a-z][a-z0-9_.:-]{0,63}")


class RetryLater(Exception):
    """Raised by a job handler or plugin: try again, after `after` seconds if given."""

    def __init__(self, message="retry later", after=None):
        super().__init__(message)
        self.after = after


class PermanentFailure(Exception):
    """Raised by a job handler or plugin: retrying cannot help; dead-letter the job."""


class LeaseLost(FlowForgeError):
    """A worker's lease expired or was taken over: it must not ack or commit effects."""

    def __init__(self, job_id):
        super().__init__("job %d: the lease was lost (expired or taken over); not acknowledged"
                         % job_id, EXIT_TEMPFAIL)


def backoff_delay(attempt, rng):
    """Full jitter: uniform(0, min(cap, base * 2**attempt)).  The exponent is
    clamped before it is used, so huge attempt counts cannot overflow."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(max(attempt, 0), 64))
    return rng.uniform(0, ceiling)


def parse_retry_after(value, now_ts):
    """Seconds from a Retry-After value: delta-seconds or an HTTP-date (RFC 9110
    10.2.3).  A past date gives 0, a huge value is clamped, garbage gives None."""
    if value is None:
        return None
    text = str(value).strip()
    if text.isdigit():
        return RETRY_AFTER_MAX if len(text) > 6 else min(float(text), RETRY_AFTER_MAX)
    try:
        from email.utils import parsedate_to_datetime
        when = parsedate_to_datetime(text)
        if when is None:
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=_utc())
        return min(max(0.0, when.timestamp() - now_ts), RETRY_AFTER_MAX)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def retry_delay(attempt, rng, retry_after=None):
    """The wait before the next attempt: the jittered backoff, but at least what
    the server asked for, and never more than RETRY_AFTER_MAX."""
    delay = backoff_delay(attempt, rng)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, RETRY_AFTER_MAX)


def filesystem_type(path, mounts="/proc/self/mounts"):
    """The file system type holding `path` (Linux; None where unknown)."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as f:
            table = [line.split() for line in f]
    except OSError:
        return None
    path = os.path.realpath(path)
    best, kind = "", None
    for fields in table:
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def sqlite_wal_reset_bug(version_info):
    """Whether this SQLite has the WAL-reset bug (3.7.0-3.51.2, fixed in 3.51.3
    with back-ports to 3.50.7 and 3.44.6)."""
    if not (3, 7, 0) <= version_info < (3, 51, 3):
        return False
    return not ((3, 50, 7) <= version_info < (3, 51, 0) or (3, 44, 6) <= version_info < (3, 45, 0))


class Job:
    """A claimed job.  `token` is the lease's fencing token."""

    def __init__(self, row):
        self.id = row["id"]
        self.kind = row["kind"]
        self.payload = load_json(row["payload"])
        self.priority = row["priority"]
        self.attempts = row["attempts"]
        self.max_attempts = row["max_attempts"]
        self.key = row["idem_key"]
        self.token = row["lease_token"]
        self.lease_expires_at = row["lease_expires_at"]
        self.created_at = row["created_at"]


_JOB_COLUMNS = ("id", "kind", "payload", "priority", "status", "attempts", "max_attempts",
                "next_attempt_at", "last_error", "idem_key", "lease_owner", "lease_expires_at",
                "created_at", "updated_at", "done_at", "failed_at")


class RetryQueue:
    """Durable jobs in state/queue.db.  One connection per process: it is
    opened lazily and refuses to be used after fork()."""

    def __init__(self, path, busy_timeout=5.0, clock=None, rng=None):
        self.path = path
        self.busy_timeout = busy_timeout
        self.clock = clock or time.time
        self._rng = rng
        self._conn = None
        self._pid = None

    @property
    def rng(self):
        if self._rng is None:
            import random
            self._rng = random.Random()
        return self._rng

    # -- connection ---------------------------------------------------------

    def connect(self):
        if self._conn is not None:
            if self._pid != os.getpid():
                raise FlowForgeError("the queue connection was opened before fork() and cannot "
                                     "be used in the child; open a new RetryQueue")
            return self._conn
        import sqlite3
        directory = os.path.dirname(self.path)
        fs = filesystem_type(directory)
        if fs in NETWORK_FILESYSTEMS and not os.environ.get("FLOWFORGE_ALLOW_NETWORK_FS"):
            raise FlowForgeError("%s is on a network file system (%s), where SQLite's locking "
                                 "and WAL are unsafe; keep .flowforge/state on a local disk"
                                 % (directory, fs), EXIT_UNAVAILABLE)
        makedirs_private(directory)
        with self._errors():
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=%d" % int(self.busy_timeout * 1000))
            # Switching to WAL takes a lock: only do it when the file is not WAL yet.
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
        os.chmod(self.path, 0o600)
        self._conn, self._pid = conn, os.getpid()
        self._write(self._create_schema)
        return conn

    def close(self):
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    @staticmethod
    def _create_schema(conn):
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL)")
        conn.execute("""CREATE TABLE IF NOT EXISTS jobs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            payload TEXT NOT NULL,
            priority INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('queued', 'leased', 'done', 'dead')),
            attempts INTEGER NOT NULL DEFAULT 0,
            max_attempts INTEGER NOT NULL,
            next_attempt_at REAL NOT NULL,
            last_error TEXT,
            idem_key TEXT,
            lease_token TEXT,
            lease_owner TEXT,
            lease_expires_at REAL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            done_at REAL,
            failed_at REAL)""")
        # At most one active job per idempotency key: a burst of failures or
        # events becomes one job.
        conn.execute("""CREATE UNIQUE INDEX IF NOT EXISTS jobs_active_key ON jobs (idem_key)
                        WHERE idem_key IS NOT NULL AND status IN ('queued', 'leased')""")
        conn.execute("CREATE INDEX IF NOT EXISTS jobs_due ON jobs (status, priority, "
                     "next_attempt_at, id)")
        conn.execute("CREATE INDEX IF NOT EXISTS jobs_key ON jobs (idem_key)")
        for key, value in (("schema", QUEUE_SCHEMA), ("jobs_done", 0), ("jobs_dead", 0),
                           ("recovery_seconds_sum", 0), ("recovery_count", 0)):
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
        schema = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]
        if schema > QUEUE_SCHEMA:
            raise FlowForgeError("queue.db was written by a newer FlowForge (schema %d); "
                                 "upgrade flowforge.py" % schema, EXIT_CONFIG)

    class _Errors:
        """Turn sqlite3 errors into FlowForge's: busy -> 75, full -> 73, corrupt -> 65."""

        def __init__(self, path):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, kind, error, tb):
            import sqlite3
            if error is None or not isinstance(error, sqlite3.Error):
                return False
            text = str(error)
            if "locked" in text or "busy" in text:
                raise LockBusy("the retry queue is busy (%s); try again" % text)
            if "full" in text or "disk I/O" in text:
                raise FlowForgeError("cannot write %s: %s" % (self.path, text), EXIT_CANTCREAT)
            if "malformed" in text or "not a database" in text:
                raise FlowForgeError("%s is damaged (%s); move it aside and run `flowforge "
                                     "reconcile`" % (self.path, text), EXIT_DATA)
            raise FlowForgeError("retry queue %s: %s" % (self.path, text))

    def _errors(self):
        return self._Errors(self.path)

    def _write(self, func):
        """Run func(conn) in one BEGIN IMMEDIATE transaction."""
        conn = self._conn or self.connect()
        if self._pid != os.getpid():
            self.connect()  # raises: used after fork
        with self._errors():
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = func(conn)
                conn.execute("COMMIT")
                return result
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _read(self, sql, args=()):
        conn = self.connect()
        with self._errors():
            return conn.execute(sql, args).fetchall()

    # -- producing ----------------------------------------------------------

    def enqueue(self, kind, payload=None, key=None, priority="normal", delay=0.0,
                max_attempts=DEFAULT_MAX_ATTEMPTS, failed=False, once=False):
        """Add a job; returns (id, created).

        With an idempotency `key`, an active (queued or leased) job with that key
        is returned instead of adding another one.  `once` extends that to done
        and dead jobs: the key names one unit of work that must never run twice.
        `failed` marks the job as the repair of a failure (for the recovery-time
        metric)."""
        if not isinstance(kind, str) or not _JOB_KIND.fullmatch(kind):
            raise FlowForgeError("job kind %r is not valid" % (kind,), EXIT_USAGE)
        if priority not in PRIORITIES:
            raise FlowForgeError("priority must be one of %s" % ", ".join(PRIORITIES), EXIT_USAGE)
        if not isinstance(max_attempts, int) or not 1 <= max_attempts <= 100000:
            raise FlowForgeError("max attempts must be 1-100000", EXIT_USAGE)
        body = canonical_json(payload if payload is not None else {})
        now_ts = self.clock()

        def tx(conn):
            if key is not None:
                statuses = "" if once else " AND status IN ('queued', 'leased')"
                row = conn.execute("SELECT id FROM jobs WHERE idem_key = ?%s ORDER BY id LIMIT 1"
                                   % statuses, (key,)).fetchone()
                if row:
                    return row[0], False
            cursor = conn.execute(
                "INSERT INTO jobs (kind, payload, priority, status, max_attempts, next_attempt_at,"
                " idem_key, created_at, updated_at, failed_at) VALUES (?, ?, ?, 'queued', ?, ?, ?,"
                " ?, ?, ?)", (kind, body, PRIORITIES[priority], max_attempts, now_ts + delay, key,
                              now_ts, now_ts, now_ts if failed else None))
            return cursor.lastrowid, True
        return self._write(tx)

    # -- consuming ----------------------------------------------------------

    def claim(self, owner, lease=DEFAULT_LEASE, kinds=None, due_by=None):
        """Lease the next due job (highest priority, then oldest), or None.
        `due_by`, the start of a pass: a job tried before is taken only if it
        was due by then, so one that fails during the pass (due again after
        the time it failed) waits for the next pass."""
        import sqlite3
        now_ts = self.clock()
        token = os.urandom(8).hex()
        kind_sql, kind_args = "", ()
        if kinds:
            kind_sql = " AND kind IN (%s)" % ",".join("?" * len(kinds))
            kind_args = tuple(kinds)
        if due_by is not None:   # a job queued during the pass (never tried) runs in it too
            kind_sql += " AND (attempts = 0 OR next_attempt_at <= ?)"
            kind_args += (due_by,)
        pick = ("SELECT id FROM jobs WHERE status = 'queued' AND next_attempt_at <= ?%s "
                "ORDER BY priority, id LIMIT 1" % kind_sql)
        lease_sql = ("UPDATE jobs SET status = 'leased', lease_token = ?, lease_owner = ?, "
                     "lease_expires_at = ?, attempts = attempts + 1, updated_at = ? ")
        lease_args = (token, owner, now_ts + lease, now_ts)

        def tx(conn):
            self._expire_leases(conn, now_ts)
            if sqlite3.sqlite_version_info >= (3, 35, 0):
                row = conn.execute(lease_sql + "WHERE id = (%s) RETURNING *" % pick,
                                   lease_args + (now_ts,) + kind_args).fetchone()
            else:  # pragma: no cover - SQLite without RETURNING
                found = conn.execute(pick, (now_ts,) + kind_args).fetchone()
                row = None
                if found:
                    conn.execute(lease_sql + "WHERE id = ? AND status = 'queued'",
                                 lease_args + (found[0],))
                    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (found[0],)).fetchone()
            return Job(row) if row else None
        return self._write(tx)

    def _expire_leases(self, conn, now_ts):
        """Leases past their expiry count as failed attempts of dead or hung workers."""
        rows = conn.execute("SELECT id, attempts, max_attempts FROM jobs WHERE status = 'leased' "
                            "AND lease_expires_at < ?", (now_ts,)).fetchall()
        for row in rows:
            self._settle(conn, row["id"], row["attempts"], row["max_attempts"],
                         "lease expired: the worker died or hung", now_ts, None, False)

    def _settle(self, conn, job_id, attempts, max_attempts, error, now_ts, retry_after, permanent):
        if permanent or attempts >= max_attempts:
            conn.execute("UPDATE jobs SET status = 'dead', last_error = ?, lease_token = NULL, "
                         "lease_owner = NULL, lease_expires_at = NULL, updated_at = ?, "
                         "failed_at = COALESCE(failed_at, ?) WHERE id = ?",
                         (error, now_ts, now_ts, job_id))
            conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'jobs_dead'")
            return "dead"
        delay = retry_delay(attempts, self.rng, retry_after)
        conn.execute("UPDATE jobs SET status = 'queued', last_error = ?, next_attempt_at = ?, "
                     "lease_token = NULL, lease_owner = NULL, lease_expires_at = NULL, "
                     "updated_at = ?, failed_at = COALESCE(failed_at, ?) WHERE id = ?",
                     (error, now_ts + delay, now_ts, now_ts, job_id))
        return "queued"

    def _check_lease(self, conn, job, now_ts):
        row = conn.execute("SELECT status, lease_token, lease_expires_at FROM jobs WHERE id = ?",
                           (job.id,)).fetchone()
        if (row is None or row["status"] != "leased" or row["lease_token"] != job.token
                or row["lease_expires_at"] < now_ts):
            raise LeaseLost(job.id)

    def ack(self, job, effect=None):
        """Mark a job done.  `effect(conn)` runs in the same transaction, so a
        local effect and the acknowledgement commit together or not at all."""
        now_ts = self.clock()

        def tx(conn):
            self._check_lease(conn, job, now_ts)
            if effect is not None:
                effect(conn)
            failed_at = conn.execute("SELECT failed_at FROM jobs WHERE id = ?",
                                     (job.id,)).fetchone()[0]
            conn.execute("UPDATE jobs SET status = 'done', done_at = ?, updated_at = ?, "
                         "lease_token = NULL, lease_expires_at = NULL WHERE id = ?",
                         (now_ts, now_ts, job.id))
            self._count_done(conn, failed_at, now_ts)
        self._write(tx)

    @staticmethod
    def _count_done(conn, failed_at, now_ts):
        """The done counter, and for a job that had failed, how long recovery took."""
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'jobs_done'")
        if failed_at is not None:
            conn.execute("UPDATE meta SET value = value + ? WHERE key = "
                         "'recovery_seconds_sum'", (now_ts - failed_at,))
            conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'recovery_count'")

    def fail(self, job, error, retry_after=None, permanent=False):
        """Record a failed attempt: back to the queue after a backoff, or dead."""
        now_ts = self.clock()

        def tx(conn):
            self._check_lease(conn, job, now_ts)
            return self._settle(conn, job.id, job.attempts, job.max_attempts, str(error)[:2000],
                                now_ts, retry_after, permanent)
        return self._write(tx)

    def settle_key(self, key, dead=False):
        """Mark queued (not running) jobs with this key done, and with `dead` the
        dead-lettered ones too: their work was done another way, e.g. the daemon
        aggregated the user a failed hook had queued."""
        now_ts = self.clock()
        statuses = "('queued', 'dead')" if dead else "('queued')"

        def tx(conn):
            rows = conn.execute("SELECT id, failed_at FROM jobs WHERE idem_key = ? AND "
                                "status IN %s" % statuses, (key,)).fetchall()
            for row in rows:
                conn.execute("UPDATE jobs SET status = 'done', done_at = ?, updated_at = ?, "
                             "last_error = COALESCE(last_error || ' ', '') || '(done by another "
                             "run)' WHERE id = ?", (now_ts, now_ts, row["id"]))
                self._count_done(conn, row["failed_at"], now_ts)
            return len(rows)
        return self._write(tx)

    def heartbeat(self, job, lease=DEFAULT_LEASE):
        """Extend a lease that is still ours (for long jobs); raises LeaseLost."""
        now_ts = self.clock()

        def tx(conn):
            self._check_lease(conn, job, now_ts)
            conn.execute("UPDATE jobs SET lease_expires_at = ?, updated_at = ? WHERE id = ?",
                         (now_ts + lease, now_ts, job.id))
            job.lease_expires_at = now_ts + lease
        self._write(tx)

    # -- repair and inspection ----------------------------------------------

    def retry(self, job_id):
        """Put a dead (or waiting) job back to run now, with fresh attempts."""
        now_ts = self.clock()

        def tx(conn):
            row = conn.execute("SELECT status, idem_key FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise FlowForgeError("no job %s (see `flowforge queue list`)" % job_id)
            if row["status"] in ("done", "leased"):
                raise FlowForgeError("job %s is %s; only queued or dead jobs can be retried"
                                     % (job_id, row["status"]))
            if row["status"] == "dead" and row["idem_key"] is not None and conn.execute(
                    "SELECT 1 FROM jobs WHERE idem_key = ? AND status IN ('queued', 'leased')",
                    (row["idem_key"],)).fetchone():
                raise FlowForgeError("job %s: a newer job with the same key is already queued"
                                     % job_id)
            conn.execute("UPDATE jobs SET status = 'queued', attempts = 0, next_attempt_at = ?, "
                         "updated_at = ? WHERE id = ?", (now_ts, now_ts, job_id))
        self._write(tx)

    def purge(self, dead=False, older_than=0.0):
        """Delete done jobs (and dead ones with `dead`) finished before now - older_than."""
        cutoff = self.clock() - older_than
        statuses = ("done", "dead") if dead else ("done",)

        def tx(conn):
            return conn.execute("DELETE FROM jobs WHERE status IN (%s) AND updated_at <= ?"
                                % ",".join("?" * len(statuses)), statuses + (cutoff,)).rowcount
        return self._write(tx)

    def jobs(self, status=None, limit=100, job_id=None):
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        if job_id is not None:
            where, args = "WHERE id = ?", (job_id,)
        rows = self._read("SELECT %s FROM jobs %s ORDER BY id DESC LIMIT ?"
                          % (", ".join(_JOB_COLUMNS), where), args + (limit,))
        out = []
        for row in rows:
            job = dict(zip(_JOB_COLUMNS, row))
            job["payload"] = load_json(job["payload"])
            job["priority"] = [k for k, v in PRIORITIES.items() if v == job["priority"]][0]
            out.append(job)
        return out

    def stats(self):
        now_ts = self.clock()
        counts = {status: 0 for status in ("queued", "leased", "done", "dead")}
        for status, count in self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status"):
            counts[status] = count
        oldest = self._read("SELECT MIN(created_at), MIN(next_attempt_at) FROM jobs "
                            "WHERE status IN ('queued', 'leased')")[0]
        meta = dict(self._read("SELECT key, value FROM meta"))
        return {"counts": counts, "depth": counts["queued"] + counts["leased"],
                "oldest_age_seconds": round(now_ts - oldest[0], 3) if oldest[0] else 0,
                "next_due_in_seconds": round(max(0.0, oldest[1] - now_ts), 3) if oldest[1] else None,
                "jobs_done_total": int(meta.get("jobs_done", 0)),
                "jobs_dead_total": int(meta.get("jobs_dead", 0)),
                "recovery_seconds_sum": meta.get("recovery_seconds_sum", 0.0),
                "recovery_count": int(meta.get("recovery_count", 0))}

    def integrity_check(self):
        return self._read("PRAGMA integrity_check")[0][0]


def open_queue(repo, busy_timeout=5.0):
    return RetryQueue(os.path.join(repo.state, "queue.db"), busy_timeout=busy_timeout)


def queue_exists(repo):
    return os.path.exists(os.path.join(repo.state, "queue.db"))


JOB_KINDS = {}


def job_kind(name):
    """Register the handler of a job kind: handler(repo=, payload=, job=, queue=).

    Handlers signal RetryLater or PermanentFailure; any other exception is a
    failed attempt.  Provider plugins register their kinds the same way."""
    def register(func):
        JOB_KINDS[name] = func
        return func
    return register


def run_job(repo, queue, job):
    """Run one claimed job and settle it; returns "done", "queued" or "dead"."""
    handler = JOB_KINDS.get(job.kind)
    if handler is None:
        return queue.fail(job, "unknown job kind %r: no handler is registered (is its plugin "
                          "installed and enabled?)" % job.kind, permanent=True)
    try:
        handler(repo=repo, payload=job.payload, job=job, queue=queue)
    except RetryLater as e:
        outcome = queue.fail(job, str(e), retry_after=e.after)
    except PermanentFailure as e:
        outcome = queue.fail(job, str(e) or "permanent failure", permanent=True)
    except LeaseLost:
        raise
    except FlowForgeError as e:
        outcome = queue.fail(job, str(e))
    except Exception as e:
        import traceback
        log_event(repo, "job-error", job=job.id, kind=job.kind, error=repr(e),
                  traceback=traceback.format_exc(limit=8))
        outcome = queue.fail(job, "%s: %s" % (type(e).__name__, e))
    else:
        queue.ack(job)
        outcome = "done"
    log_event(repo, "job", job=job.id, kind=job.kind, outcome=outcome, attempt=job.attempts)
    return outcome


AGGREGATE_MAX_ATTEMPTS = 100   # about two days of retries (mean wait 30 min at the cap)


def enqueue_aggregate(queue, user):
    """Queue an aggregation that failed: one job per user (by key), first in line."""
    job_id, _ = queue.enqueue("aggregate", {"user": user}, key="aggregate:" + user,
                              priority="high", failed=True, max_attempts=AGGREGATE_MAX_ATTEMPTS)
    return job_id


PUSH_MAX_ATTEMPTS = 100


def enqueue_push(queue, remote):
    """Queue a ledger push that failed: one job per remote (by key)."""
    job_id, _ = queue.enqueue("push", {"remote": remote}, key="push:" + remote, priority="high",
                              failed=True, max_attempts=PUSH_MAX_ATTEMPTS)
    return job_id


@job_kind("push")
def push_job(repo, payload, job, queue):
    """A ledger push that the pre-push hook (or `flowforge push`) could not finish."""
    remote = payload.get("remote")
    if not isinstance(remote, str) or not remote:
        raise PermanentFailure("push job without a remote: %r" % (remote,))
    try:
        check_remote(repo, remote)
        ledger_push(repo, remote, own_store_keys(repo), timeout=120.0)
    except FlowForgeError as e:
        if getattr(e, "permanent", False) or e.exit_code == EXIT_USAGE:
            raise PermanentFailure(str(e))
        raise RetryLater(str(e))


@job_kind("aggregate")
def aggregate_job(repo, payload, job, queue):
    """Aggregation that the hook (or the daemon) could not finish."""
    user = payload.get("user")
    if not isinstance(user, str) or not valid_user_name(user):
        raise PermanentFailure("aggregate job without a valid user: %r" % (user,))
    if not PrivateStore(repo, user).exists():
        raise PermanentFailure("no private store for %s in this clone" % user)
    aggregate_store(repo, user, bool(payload.get("full")), lock_timeout=5.0)
    record_metrics(repo, last_aggregate_success=now())


# ############################################################################
# 11. Plugins
# ############################################################################
#
# A plugin is one standard-library-only .py file, found in plugins/ beside
# flowforge.py, in .flowforge/plugins/, or on FLOWFORGE_PLUGIN_PATH (files or
# directories, separated by os.pathsep), and enabled by a section named after
# it in config.json ("plugins": {"github": {...}}; "enabled": false turns it
# off).  It declares PLUGIN_API = 1 and NAME, and defines any of these hooks,
# each called with keyword arguments -- only those it names, so the table can
# grow without breaking old plugins:
#
#   hook          keyword arguments                          when
#   on_start      repo, user, timer, config                  a timer started
#   on_stop       repo, user, entry, config                  a timer stopped; its entry is recorded
#   on_aggregate  repo, user, store, written, issues, config an aggregation changed shards
#   sync          repo, issue, config, job, http, state      a queued `sync` job for one issue
#   health        repo, config                               `plugins check`: None, or a problem
#
# on_* hooks run inside commands (even the commit hook): they must be quick
# and never touch the network -- they call enqueue_sync() instead.  `sync`
# runs only in queue jobs (the daemon or `queue run`) and signals RetryLater
# (after=seconds) or PermanentFailure(message).  An exception in any other hook
# is logged with the plugin's name and the command goes on.

PLUGIN_API = 1
PLUGINS_RUN = []   # plugin modules this process has run

PLUGIN_HOOKS = {
    "on_start": ("repo", "user", "timer", "config"),
    "on_stop": ("repo", "user", "entry", "config"),
    "on_aggregate": ("repo", "user", "store", "written", "issues", "config"),
    "sync": ("repo", "issue", "config", "job", "http", "state"),
    "health": ("repo", "config"),
}
_PLUGIN_NAME = Pattern(r"[a-z][a-z0-9_-]{0,31}")


class Plugin:
    """One discovered plugin file: loaded, or the reason it was not."""

    def __init__(self, path):
        self.path = path
        self.name = os.path.basename(path)[:-3]
        self.module = None
        self.error = None
        self.hooks = {}

    def load(self):
        import importlib.util
        import inspect
        # `import flowforge` inside the plugin must find this running module,
        # even when flowforge.py runs as a script or was loaded by path.
        sys.modules.setdefault("flowforge", sys.modules[__name__])
        try:
            spec = importlib.util.spec_from_file_location("flowforge_plugin_" + self.name, self.path)
            module = importlib.util.module_from_spec(spec)
            PLUGINS_RUN.append(self.name)   # run() then exits the ordinary way (their atexit, files)
            spec.loader.exec_module(module)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            self.error = "does not import: %s" % one_line(e)
            return self
        api = getattr(module, "PLUGIN_API", None)
        name = getattr(module, "NAME", None)
        if not isinstance(api, int):
            self.error = "is not a FlowForge plugin (no PLUGIN_API)"
        elif api > PLUGIN_API:
            self.error = ("needs plugin API %d; this FlowForge %s has API %d: upgrade flowforge.py"
                          % (api, VERSION, PLUGIN_API))
        elif not isinstance(name, str) or not _PLUGIN_NAME.fullmatch(name):
            self.error = "has no valid NAME"
        if self.error:
            return self
        self.name, self.module = name, module
        for hook, allowed in PLUGIN_HOOKS.items():
            func = getattr(module, hook, None)
            if func is None:
                continue
            try:
                params = inspect.signature(func).parameters.values()
            except (TypeError, ValueError):
                self.error = "hook %s is not a function" % hook
                return self
            if any(p.kind == p.VAR_KEYWORD for p in params):
                self.hooks[hook] = (func, None)   # takes everything we pass
                continue
            unknown = [p.name for p in params if p.name not in allowed
                       and p.default is p.empty and p.kind != p.VAR_POSITIONAL]
            if unknown:
                self.error = "hook %s wants %s, which FlowForge does not pass" % (
                    hook, ", ".join(unknown))
                return self
            self.hooks[hook] = (func, {p.name for p in params})
        return self

    def call(self, hook, **kwargs):
        func, accepted = self.hooks[hook]
        if accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return func(**kwargs)


def plugin_paths(repo):
    """Plugin files in discovery order; a later one with the same name loses."""
    places = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins"),
              os.path.join(repo.ff, "plugins")]
    places += [p for p in os.environ.get("FLOWFORGE_PLUGIN_PATH", "").split(os.pathsep) if p]
    found = []
    for place in places:
        if os.path.isfile(place) and place.endswith(".py"):
            found.append(place)
        elif os.path.isdir(place):
            found += [os.path.join(place, n) for n in sorted(os.listdir(place))
                      if n.endswith(".py") and not n.startswith("_")]
    return found


_LOADED = {}


def discover_plugins(repo):
    """All plugin files, loaded (each once per process), with their config."""
    plugins, seen = [], set()
    for path in plugin_paths(repo):
        key = os.path.realpath(path)
        if key not in _LOADED:
            _LOADED[key] = Plugin(path).load()
        plugin = _LOADED[key]
        if plugin.name in seen:
            continue
        seen.add(plugin.name)
        plugins.append(plugin)
    return plugins


def plugin_config(repo, name):
    """The plugin's section of config.json, or None when it is not enabled."""
    section = (repo.config.get("plugins") or {}).get(name)
    if not isinstance(section, dict) or section.get("enabled") is False:
        return None
    return section


def enabled_plugins(repo):
    """[(plugin, config)] of the loaded, enabled plugins.  Costs nothing when
    config.json enables none (no directory is even listed)."""
    if not repo.config.get("plugins"):
        return []
    out = []
    for plugin in discover_plugins(repo):
        config = plugin_config(repo, plugin.name)
        if config is not None and plugin.module is not None and not plugin.error:
            out.append((plugin, config))
    return out


def call_plugins(repo, hook, **kwargs):
    """Call `hook` of every enabled plugin that has it (the listener of
    announce()).  An exception is logged with the plugin's name and swallowed:
    a plugin never takes a command down."""
    for plugin, config in enabled_plugins(repo):
        if hook not in plugin.hooks:
            continue
        try:
            plugin.call(hook, repo=repo, config=config, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:
            log_event(repo, "plugin-error", plugin=plugin.name, hook=hook, error=one_line(e))
            debug("plugin %s, %s: %s" % (plugin.name, hook, one_line(e)))


EVENT_LISTENERS.append(call_plugins)


def enqueue_sync(repo, plugin, issue, priority="normal"):
    """Ask for one `sync` of (plugin, issue): many events become one job."""
    queue = open_queue(repo, busy_timeout=2.0)
    try:
        return queue.enqueue("sync", {"plugin": plugin, "issue": issue},
                             key="sync:%s:%s" % (plugin, issue), priority=priority,
                             max_attempts=25)[0]
    finally:
        queue.close()


def plugin_state(repo, name):
    """A plugin's per-machine cache, state/plugins/<name>.json: (load, save)."""
    path = os.path.join(repo.state, "plugins", name + ".json")

    def load():
        try:
            data = load_json(read_bytes(path))
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def save(data):
        makedirs_private(os.path.dirname(path))
        atomic_write(path, canonical_bytes(data), 0o600)
    return load, save


class HttpResponse:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        try:
            return load_json(self.body.decode("utf-8")) if self.body else None
        except ValueError:
            return None

    def json_object(self):
        """The body as a JSON object, or {} (error bodies are not always JSON)."""
        doc = self.json()
        return doc if isinstance(doc, dict) else {}


class Http:
    """A small JSON-over-HTTPS client for plugins: one deadline for each whole
    exchange (`timeout`: connect, headers, body, redirects),
    a client-side throttle, redirects followed only to the same host (so a token
    never travels elsewhere), and network failures as RetryLater.  Errors never
    carry request headers, so tokens stay out of logs and the queue."""

    clock = staticmethod(time.monotonic)   # tests replace these to avoid sleeping
    sleep = staticmethod(time.sleep)
    # The time of the last request to each server, for every client of this
    # process: a provider's "n requests a second" holds across queue jobs, each
    # of which makes its own client.
    _last_request = {}

    def __init__(self, base_url, headers, timeout=15.0, min_interval=0.0):
        self.base_url = base_url.rstrip("/")
        self.headers = headers
        self.timeout = timeout
        self.min_interval = min_interval
        self.requests = 0

    def _throttle(self):
        last = self._last_request.get(self.base_url)
        if self.min_interval and last is not None:
            # never more than one interval: a clock that went back is no reason to stall
            wait = min(last + self.min_interval - self.clock(), self.min_interval)
            if wait > 0:
                self.sleep(wait)
        self._last_request[self.base_url] = self.clock()

    def request(self, method, path, body=None, headers=None):
        import urllib.parse
        import urllib.request
        origin = urllib.parse.urlsplit(self.base_url)[:2]
        url = path if path.startswith(("http://", "https://")) else self.base_url + path
        if urllib.parse.urlsplit(url)[:2] != origin:  # a pagination link, say: not our host
            raise PermanentFailure("refusing to send the credentials to another host: %s"
                                   % urllib.parse.urlsplit(url).netloc)
        data = canonical_json(body).encode("utf-8") if body is not None else None
        deadline = time.monotonic() + self.timeout   # real time (tests replace self.clock)
        for _ in range(4):
            all_headers = dict(self.headers, **(headers or {}))
            if data is not None:
                all_headers["Content-Type"] = "application/json"
            request = urllib.request.Request(url, data=data, method=method, headers=all_headers)
            self._throttle()
            self.requests += 1
            reply = self._exchange(request, deadline, "%s %s" % (
                method, urllib.parse.urlsplit(url).netloc))
            if reply.status in (301, 302, 307, 308) and reply.headers.get("location"):
                url = urllib.parse.urljoin(url, reply.headers["location"])
                if urllib.parse.urlsplit(url)[:2] != origin:
                    raise PermanentFailure("refusing a redirect to another host: %s"
                                           % urllib.parse.urlsplit(url).netloc)
                continue  # the same method and body again: urllib would turn a POST into a GET
            return reply
        raise PermanentFailure("too many redirects for %s %s" % (method, path))

    def _exchange(self, request, deadline, what):
        """One request and its whole answer -- connect, headers, body -- within
        `deadline` (monotonic): a per-read socket timeout alone lets a server
        that trickles a byte at a time hold a job for ever (and past its lease).
        A watchdog shuts the connection down when the time is up."""
        import http.client
        import threading
        import urllib.error
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RetryLater("%s: no complete answer within %g s" % (what, self.timeout))
        exchange = _Exchange()
        watchdog = threading.Timer(remaining, exchange.abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            try:
                with exchange.opener().open(request, timeout=remaining) as response:
                    reply = HttpResponse(response.status, _lower(response.headers), response.read())
            except urllib.error.HTTPError as e:
                reply = HttpResponse(e.code, _lower(e.headers), e.read())
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
            import socket
            # the socket's own timeout (the same deadline) may fire before the watchdog
            if exchange.expired or isinstance(getattr(e, "reason", e), socket.timeout):
                raise RetryLater("%s: no complete answer within %g s" % (what, self.timeout))
            raise RetryLater("%s: %s" % (what, one_line(getattr(e, "reason", e))))
        finally:
            watchdog.cancel()
        if exchange.expired:  # what arrived before the shutdown may look whole: it is not
            raise RetryLater("%s: no complete answer within %g s" % (what, self.timeout))
        return reply


def _lower(headers):
    return {k.lower(): v for k, v in headers.items()} if headers else {}


class _Exchange:
    """The connections of one request (through proxies too), so that its
    watchdog can end it; and an opener that hands 3xx back to Http.request
    instead of following it."""

    def __init__(self):
        self.connections = []
        self.expired = False

    def abort(self):
        import socket
        self.expired = True
        for connection in self.connections:
            sock = getattr(connection, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def opener(self):
        import http.client
        import urllib.request

        def tracked(cls):
            def make(*args, **kwargs):
                connection = cls(*args, **kwargs)
                self.connections.append(connection)
                return connection
            return make

        class Plain(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(tracked(http.client.HTTPConnection), req)

        class Secure(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(tracked(http.client.HTTPSConnection), req,
                                    context=self._context)

        class Refuse(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args, **kwargs):
                return None
        return urllib.request.build_opener(Plain, Secure, Refuse)


# -- where a provider's token may go -------------------------------------------
#
# A committed config.json is shared through git: a server named only there
# must never receive anyone's token.  Providers (and third-party plugins) take
# their base URL through provider_api_base() and wrap their client in
# ScrubbedErrors, so error text that echoes the token is cleaned before it is
# stored or shown.

def is_loopback(host):
    import ipaddress
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


def provider_base_url(url, setting):
    """`url` tidied (no trailing /), or PermanentFailure naming `setting`: https, or
    http to loopback; a host; no user, password, query, fragment or dot segments."""
    if not isinstance(url, str) or not url.strip() or len(url) > 2000:
        raise PermanentFailure("%s must be a URL" % setting)
    import urllib.parse
    url = url.strip()
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise PermanentFailure("%s is not a valid URL: %s" % (setting, shown_url(url)))
    if parts.username is not None or parts.password is not None:
        raise PermanentFailure("%s must not carry a user name or password: %s"
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
        raise PermanentFailure("%s %s: %s" % (setting, problem, shown_url(url)))
    netloc = host if port is None else "%s:%d" % (host, port)
    if ":" in host:
        netloc = "[%s]" % host if port is None else "[%s]:%d" % (host, port)
    return urllib.parse.urlunsplit((parts.scheme.lower(), netloc.lower(), parts.path.rstrip("/"),
                                    "", ""))


def provider_api_base(config, plugin, public_api, url_env):
    """A provider's base URL, or PermanentFailure.  A server other than the
    public API comes from this process's environment (`url_env`, names of
    variables): an api_url in the committed config.json is used only when it is
    the public API or when the environment says the same -- else it is refused,
    and never contacted."""
    env, name = "", url_env[0]
    for candidate in url_env:
        if os.environ.get(candidate, "").strip():
            env, name = os.environ[candidate].strip(), candidate
            break
    base = provider_base_url(env, name) if env else public_api
    committed = config.get("api_url")
    if committed is None or committed == "":
        return base
    setting = "plugins.%s.api_url in config.json" % plugin
    try:
        if provider_base_url(committed, setting) == base:
            return base
    except PermanentFailure as e:
        if env:
            raise
        problem = "; it is not valid either: %s" % e
    else:
        problem = ""
    if env:
        raise PermanentFailure(
            "refusing %s (%s): it does not match %s=%s in this environment; make them agree or "
            "remove api_url (nothing was sent)" % (setting, shown_url(committed), name,
                                                    shown_url(env)))
    raise PermanentFailure(
        "refusing %s (%s): config.json is shared through git, so a server other than %s is "
        "used only when your own environment names it -- if you trust that server, set %s to "
        "its https:// URL where the queue runs (nothing was sent)%s"
        % (setting, shown_url(committed), public_api, name, problem))


def scrub_secret(text, secret):
    """`text` without `secret` (as is, %-encoded or JSON-escaped, any case)."""
    import urllib.parse
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
            clean = scrub_secret(text, self.secret)
            if clean != text:
                reply.body = clean.encode("utf-8")
        return reply


def without_secret(secret, work):
    """work()'s result; what it raises comes back with `secret` scrubbed from its
    text: RetryLater and PermanentFailure keep their kind (and wait), any other
    exception that shows the secret becomes a RuntimeError of the cleaned text.
    For a provider's sync, whose errors end up in the queue and on screens."""
    try:
        return work()
    except RetryLater as e:
        raise RetryLater(scrub_secret(e, secret), after=e.after) from None
    except PermanentFailure as e:
        raise PermanentFailure(scrub_secret(e, secret)) from None
    except Exception as e:
        if scrub_secret(repr(e), secret) != repr(e) or scrub_secret(e, secret) != str(e):
            text = scrub_secret("%s: %s" % (type(e).__name__, e), secret)  # scrubbed, then cut
            raise RuntimeError(" ".join(text.split())[:1000]) from None
        raise


@job_kind("sync")
def sync_job(repo, payload, job, queue):
    """One provider update for one issue, by the plugin named in the payload."""
    name, issue = payload.get("plugin"), payload.get("issue")
    if not isinstance(name, str) or not isinstance(issue, str):
        raise PermanentFailure("sync job without a plugin and an issue: %r" % (payload,))
    for plugin, config in enabled_plugins(repo):
        if plugin.name == name:
            if "sync" not in plugin.hooks:
                raise PermanentFailure("plugin %s has no sync hook" % name)
            load, save = plugin_state(repo, name)
            state = load()
            try:
                return plugin.call("sync", repo=repo, issue=issue, config=config, job=job,
                                   http=Http, state=state)
            finally:
                save(state)  # what the plugin learned (ids, last bodies) even when it fails
    raise PermanentFailure("plugin %s is not installed or not enabled" % name)


def plugins_report(repo, check=False, online=False):
    """[{name, path, api, hooks, enabled, status, problem, notes}] for `plugins
    list|check`.  A health hook returns None (fine), a problem, or {"problem":
    ..., "notes": [what it checked]}; with `online` it may make one read-only
    request through the `http` it is given."""
    rows = []
    for plugin in discover_plugins(repo):
        config = plugin_config(repo, plugin.name)
        problem, notes = plugin.error, []
        if check and not problem and config is not None and "health" in plugin.hooks:
            try:
                answer = plugin.call("health", repo=repo, config=config, online=online, http=Http)
                if isinstance(answer, dict):
                    notes = [str(n) for n in answer.get("notes") or []]
                    answer = answer.get("problem")
                problem = str(answer) if answer else None
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:
                problem = "health hook failed: %s" % one_line(e)
        rows.append({"name": plugin.name, "path": plugin.path,
                     "api": getattr(plugin.module, "PLUGIN_API", None),
                     "hooks": sorted(plugin.hooks), "enabled": config is not None,
                     "status": "error" if problem else ("enabled" if config is not None
                                                        else "disabled"),
                     "problem": problem, "notes": notes})
    for name in sorted(set(repo.config.get("plugins") or {}) - {r["name"] for r in rows}):
        rows.append({"name": name, "path": None, "api": None, "hooks": [], "enabled": True,
                     "status": "error", "problem": "enabled in config.json but not found",
                     "notes": []})
    return rows


# ############################################################################
# 12. Hooks, daemon and health
# ############################################################################
#
# Layer 1, the git hooks: `hook pre-commit` aggregates what changed within a
# time budget into the store's ledger ref (local, no network; the commit being
# made is not touched).  `hook pre-push` pushes this clone's store refs to the
# remote being pushed to, fast-forward only.  Neither ever blocks: any failure
# becomes one `aggregate` or `push` job, one line on stderr, a log entry, and
# exit 0.  The shims in .git/hooks are POSIX sh, so even a missing python3 or
# a broken flowforge.py cannot fail a commit or a push.
#
# Layer 2, the daemon: polls the private stores' mtimes (the stdlib has no
# inotify) and the queue; one per repository (a lock); a heartbeat file;
# SIGTERM finishes the current job; SIGHUP reloads config; sd_notify for
# systemd.  cron runs `daemon --once` (or `--ensure` as a watchdog).

HOOKS = ("pre-commit", "post-commit", "pre-push")
SHIM_VERSION = 4
SHIM_MARK = "# flowforge-shim v"

# Loads flowforge.py by path, and takes the current directory (which `-c` puts
# first on sys.path, as does an empty PYTHONPATH entry, and which is the work
# tree's top in a hook) off the path: a team's own zlib.py or re.py there would
# shadow the standard library.  The import system's own frozen modules load it
# (importlib.util would import contextlib, collections and functools first:
# ~4 ms of every commit).
_SHIM_LOAD = ('import os, sys, _frozen_importlib as b, _frozen_importlib_external as e; '
              'h = os.path.realpath("."); '
              'sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != h]; '
              'sys.dont_write_bytecode = False; '
              's = e.spec_from_file_location("flowforge", sys.argv[1]); '
              'm = b.module_from_spec(s); sys.modules["flowforge"] = m; s.loader.exec_module(m); ')
_SHIM_LOADER = _SHIM_LOAD + 'raise SystemExit(m.main(sys.argv[2:]))'

# What a hook imports beyond the module's top: `install hooks` compiles them, and
# flowforge.py, into the hooks' bytecode prefix, so that a new clone's first
# commit does not compile them itself -- re, enum, collections and datetime
# alone take ~60 ms of the hook's budget on an idle machine, and flowforge.py
# ~150 ms before it.  sqlite3, subprocess and traceback are the way to the queue.
HOOK_IMPORTS = ("datetime", "re", "sqlite3", "subprocess", "traceback")
_WARM_LOADER = _SHIM_LOAD + "import " + ", ".join(HOOK_IMPORTS)

_SHIM = """#!/bin/sh
%(mark)s%(version)d %(hook)s: written by `flowforge install hooks`.
# Runs FlowForge and never blocks a commit: whatever happens (python3 missing,
# flowforge.py missing or broken) it exits 0, and the retry queue and the
# daemon catch up.  A hook that was here before runs first, as
# %(hook)s.flowforge-chained, and its verdict stands.
case $0 in */*) here=${0%%/*} ;; *) here=. ;; esac
if [ -x "$here/%(hook)s.flowforge-chained" ]; then
    "$here/%(hook)s.flowforge-chained" "$@" || exit $?
fi
# git runs a hook in the top of the work tree; run by hand from elsewhere, ask git
root=$PWD
[ -e "$root/.git" ] || root=$(git rev-parse --show-toplevel 2>/dev/null) || exit 0
%(guard)sff="$root/flowforge.py"
[ -f "$ff" ] || ff=%(fallback)s
[ -f "$ff" ] || exit 0
if ! command -v python3 >/dev/null 2>&1; then
    echo "flowforge: python3 not found; time not aggregated (run flowforge aggregate later)" >&2
    exit 0
fi
# the bytecode (of flowforge.py, and of the few standard modules it needs, as the
# prefix applies to them too) is kept in the prefix even where it is not wanted
# elsewhere: compiling them costs more than the hook's whole work
out=$(PYTHONDONTWRITEBYTECODE= python3 -S -X "pycache_prefix=$root/.flowforge/state/pycache" \
    -c '%(loader)s' "$ff" hook %(hook)s "$@" 2>&1 </dev/null)
if [ -n "$out" ]; then
    last=${out##*"
"}
    case $last in
    flowforge:*) ;;
    *) last="flowforge: hook failed: $last" ;;
    esac
    printf '%%s\\n' "$last" >&2
fi
exit 0
"""

_SHIM_GUARDS = {
    "pre-commit": "",
    # post-commit has work only when pre-commit left some: a marker file, so
    # that an ordinary commit does not start Python twice.
    "post-commit": '[ -f "$root/.flowforge/state/hook-pending" ] || exit 0\n',
    "pre-push": "",
}


def sh_quote(text):
    return "'" + text.replace("'", "'\"'\"'") + "'"


def flowforge_path(repo):
    """The flowforge.py that hooks and schedulers should run: the repository's
    vendored copy if there is one, else this very file."""
    vendored = os.path.join(repo.root, "flowforge.py")
    return vendored if os.path.isfile(vendored) else os.path.abspath(__file__)


def render_shim(hook, fallback):
    return _SHIM % {"mark": SHIM_MARK, "version": SHIM_VERSION, "hook": hook,
                    "guard": _SHIM_GUARDS[hook], "fallback": sh_quote(fallback),
                    "loader": _SHIM_LOADER}


def hooks_dir(repo):
    """Where git looks for hooks here, honouring core.hooksPath and worktrees."""
    _, out, _ = run_git(["rev-parse", "--git-path", "hooks"], repo.root)
    path = out.strip()
    return path if os.path.isabs(path) else os.path.join(repo.root, path)


def install_hooks(repo):
    """Write the shims; an existing foreign hook is kept and chained.  Idempotent."""
    directory = hooks_dir(repo)
    os.makedirs(directory, exist_ok=True)
    done = []
    for hook in HOOKS:
        path = os.path.join(directory, hook)
        shim = render_shim(hook, flowforge_path(repo)).encode("utf-8")
        try:
            current = read_bytes(path) if not os.path.islink(path) else b"(symlink)"
        except FileNotFoundError:
            current = None
        chained = path + ".flowforge-chained"
        if current == shim:
            done.append((hook, "up to date"))
            continue
        if current is not None and SHIM_MARK.encode() not in current:
            if os.path.lexists(chained):
                raise FlowForgeError("both %s and %s exist; move one of them away first"
                                     % (path, chained))
            os.replace(path, chained)  # keep the team's hook; the shim runs it first
            done.append((hook, "installed; the existing hook is chained"))
        else:
            done.append((hook, "updated" if current else "installed"))
        atomic_write(path, shim, 0o755)
    warm_hook_bytecode(repo)
    return directory, done


def warm_hook_bytecode(repo):
    """Compile what the hooks import into their bytecode prefix, with the
    python3 they will run.  Best effort: without it the first commit compiles."""
    import shutil
    import subprocess
    python = shutil.which("python3")
    if python is None:
        return False
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    prefix = os.path.join(repo.state, "pycache")
    try:
        makedirs_private(prefix)
        proc = subprocess.run(
            [python, "-S", "-X", "pycache_prefix=" + prefix,
             "-c", _WARM_LOADER, flowforge_path(repo)],
            cwd=repo.root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def uninstall_hooks(repo):
    directory = hooks_dir(repo)
    done = []
    for hook in HOOKS:
        path = os.path.join(directory, hook)
        chained = path + ".flowforge-chained"
        try:
            ours = SHIM_MARK.encode() in read_bytes(path)
        except (FileNotFoundError, FlowForgeError):
            ours = False
        if ours:
            os.unlink(path)
            if os.path.lexists(chained):
                os.replace(chained, path)
                done.append((hook, "removed; the chained hook is restored"))
            else:
                done.append((hook, "removed"))
        else:
            done.append((hook, "not installed"))
    return directory, done


def hook_status(repo):
    """{hook: "current" | "stale" | "missing" | "foreign"} for health and doctor."""
    directory = hooks_dir(repo)
    status = {}
    for hook in HOOKS:
        path = os.path.join(directory, hook)
        try:
            data = read_bytes(path)
        except (FileNotFoundError, FlowForgeError):
            status[hook] = "missing"
            continue
        if SHIM_MARK.encode() not in data:
            status[hook] = "foreign"
        elif data == render_shim(hook, flowforge_path(repo)).encode() and os.access(path, os.X_OK):
            status[hook] = "current"
        else:
            status[hook] = "stale"
    return status


class BudgetExceeded(Exception):
    """Not a FlowForgeError: code that tolerates FlowForge errors (the mirror,
    reading a chain) must not swallow the end of the budget."""


class time_budget:
    """Raise BudgetExceeded in the main thread once `seconds` have passed.

    Interrupting aggregation is safe: the cache and mirror copies are atomic
    replaces (an interrupted one removes its temp file), an interrupted private
    audit append leaves a torn tail that the next run trims, and re-running is
    idempotent.  A git child that is running when the budget ends is left to
    finish on its own (it is not killed, so it leaves no lock file): objects it
    writes are unreachable until the ledger's update-ref, which either happened
    (the next run finds the shards current) or did not."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.armed = False

    def _expired(self, signum, frame):
        raise BudgetExceeded("aggregation took longer than the hook's budget of %d ms"
                             % (self.seconds * 1000))

    # _signal, not signal: the module behind it, without the enum module that
    # signal.py imports for its names (~10 ms of every commit's hook)
    def __enter__(self):
        import _signal
        if self.seconds > 0 and hasattr(_signal, "setitimer") and _in_main_thread():
            try:
                self.previous = _signal.signal(_signal.SIGALRM, self._expired)
            except ValueError:   # not the main thread after all: no budget to enforce
                return self
            _signal.setitimer(_signal.ITIMER_REAL, self.seconds)
            self.armed = True
        return self

    def __exit__(self, *exc):
        if self.armed:
            import _signal
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            _signal.signal(_signal.SIGALRM, self.previous)
        return False


_MAIN_THREAD = _thread_ident()   # the CLI imports this module in its main thread


def _in_main_thread():
    """Whether this is the interpreter's main thread (only it receives signals)."""
    threading = sys.modules.get("threading")
    if threading is None:   # no other thread was started through threading
        return _thread_ident() == _MAIN_THREAD
    return threading.current_thread() is threading.main_thread()


def pending_marker(repo):
    return os.path.join(repo.state, "hook-pending")


def mark_pending(repo):
    makedirs_private(repo.state)
    atomic_write(pending_marker(repo), b"", 0o600)


def hook_pre_commit(args):
    """The pre-commit hook; returns the line to print (or None).  Never raises:
    this is the one place where FlowForge swallows everything, and it logs what."""
    repo = user = None
    try:
        repo = Repo.find(args.C or os.getcwd())
        if not os.path.isfile(repo.config_path):
            return None  # FlowForge is not set up here: nothing to do
        config = load_config(repo.config_path)
        if os.path.exists(deploy_journal(repo)):  # never stage a half-deployed recovery
            finish_interrupted_deploy(repo)
        user = resolve_user(repo.root, args.user)
        store = PrivateStore(repo, user)
        if not store.exists():
            return None
        hook = config["hook"]
        with time_budget(hook["budget_ms"] / 1000.0):
            Aggregator(store, config["granularity"]).run(False, hook["lock_wait_ms"] / 1000.0)
        record_metrics(repo, hook_success_total=1, last_aggregate_success=now())
        return None
    except BaseException as e:  # the commit must go on, whatever happened
        return hook_failed(repo, user, e)


def hook_failed(repo, user, error):
    import traceback
    reason = one_line(error)
    if repo is None or not os.path.isdir(repo.ff):
        return "flowforge: time not aggregated: %s" % reason
    log_event(repo, "hook-failed", user=user, error=reason,
              traceback=traceback.format_exc(limit=12))
    record_metrics(repo, hook_failure_total=1, last_hook_failure=now())
    if user is None:
        return "flowforge: time not aggregated: %s" % reason
    try:
        queue = open_queue(repo, busy_timeout=2.0)
        job_id = enqueue_aggregate(queue, user)
        queue.close()
        mark_pending(repo)
        return "flowforge: time not aggregated (%s); queued as job %d" % (reason, job_id)
    except BaseException as e:
        log_event(repo, "hook-enqueue-failed", user=user, error=one_line(e))
        return ("flowforge: time not aggregated (%s) and not queued (%s); run `flowforge "
                "aggregate` later" % (reason, one_line(e)))


def hook_post_commit(args):
    """After a commit whose pre-commit queued work: a one-off daemon run."""
    repo = None
    try:
        repo = Repo.find(args.C or os.getcwd())
        marker = pending_marker(repo)
        if not os.path.exists(marker):
            return None
        os.unlink(marker)
        queue = open_queue(repo, busy_timeout=2.0)
        if queue.stats()["depth"]:
            spawn_flowforge(repo, ["daemon", "--once", "-q"])
        queue.close()
        return None
    except BaseException as e:
        if repo is not None and os.path.isdir(repo.state):
            log_event(repo, "post-commit-failed", error=one_line(e))
        return "flowforge: post-commit: %s" % one_line(e)


def hook_pre_push(args):
    """The pre-push hook: push this clone's store refs to the remote that the
    user pushes to.  Never raises; a failure becomes a queued `push` job."""
    repo = None
    # git passes the remote's name; the pre-commit framework passes it in its environment
    remote = args.args[0] if args.args else os.environ.get("PRE_COMMIT_REMOTE_NAME")
    try:
        repo = Repo.find(args.C or os.getcwd())
        if not os.path.isfile(repo.config_path):
            return None
        repo._config = load_config(repo.config_path)
        _, out, _ = run_git(["remote"], repo.root)
        if remote not in out.split():
            return None  # a push to a URL: no remote to keep the ledger's copy for
        for user in local_users(repo):   # time tracked since the last commit travels too
            try:
                aggregate_store(repo, user, False, 1.0, routine=True)
            except (FlowForgeError, OSError) as e:
                log_event(repo, "pre-push-aggregate-failed", user=user, error=one_line(e))
        result = ledger_push(repo, remote, own_store_keys(repo), timeout=PUSH_TIMEOUT)
        if queue_exists(repo):
            queue = open_queue(repo, busy_timeout=2.0)
            queue.settle_key("push:" + remote)
            queue.close()
        if result["pushed"]:
            return "flowforge: ledger pushed to %s (%d store%s)" % (
                remote, len(result["pushed"]), "" if len(result["pushed"]) == 1 else "s")
        return None
    except BaseException as e:  # the push must go on, whatever happened
        reason = one_line(e)
        if repo is None or not os.path.isdir(repo.ff) or not remote:
            return "flowforge: ledger not pushed: %s" % reason
        log_event(repo, "push-failed", remote=remote, error=reason)
        try:
            queue = open_queue(repo, busy_timeout=2.0)
            job_id = enqueue_push(queue, remote)
            queue.close()
            return "flowforge: ledger not pushed (%s); queued as job %d" % (reason, job_id)
        except BaseException as e2:
            return "flowforge: ledger not pushed (%s) and not queued (%s); run `flowforge push`" % (
                reason, one_line(e2))


def spawn_flowforge(repo, argv):
    """Start FlowForge detached (own session, output to the log directory)."""
    import subprocess
    makedirs_private(repo.logs)
    log = open(os.path.join(repo.logs, "daemon.out"), "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-X", "pycache_prefix=" + os.path.join(repo.state, "pycache"),
             flowforge_path(repo), "-C", repo.root] + argv,
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            close_fds=True, cwd=repo.root)
    finally:
        log.close()
    return proc.pid


def sd_notify(message):
    """Tell systemd (Type=notify) how we are; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    import socket
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode("utf-8"), address)
        return True
    except OSError:
        return False


def daemon_state(repo):
    """(running, info): whether a daemon holds the lock, and its heartbeat file."""
    try:
        info = load_json(read_bytes(os.path.join(repo.state, "daemon.json")))
        if not isinstance(info, dict):
            info = {}
    except (OSError, ValueError, FlowForgeError):
        info = {}
    if not os.path.isdir(repo.locks):
        return False, info
    try:
        with repo.lock("daemon", 0, "the daemon"):
            return False, info
    except LockBusy:
        return True, info


class Daemon:
    """The polling loop: aggregate changed stores, run due jobs, heartbeat, sleep."""

    def __init__(self, repo, interval=None, once=False):
        self.repo = repo
        self.once = once
        self.interval_override = interval
        self.stopping = False
        self.reload = False
        self.queue = open_queue(repo)
        self.owner = "%s:%d" % (os.uname().nodename if hasattr(os, "uname") else "host", os.getpid())
        self.started = now()
        self.wake_r = self.wake_w = None
        self.load_config()

    def load_config(self):
        self.repo._config = None  # SIGHUP: read config.json again
        self.interval = float(self.interval_override or self.repo.config["daemon"]["interval"])
        watchdog = os.environ.get("WATCHDOG_USEC")
        self.watchdog = int(watchdog) / 1e6 if watchdog and watchdog.isdigit() else None

    def run(self):
        import gc
        gc.enable()   # off for a command (run()); a process that lives on collects its cycles
        lock = self.repo.lock("daemon", 0, "the daemon")
        try:
            lock.acquire()
        except LockBusy:
            running, info = daemon_state(self.repo)
            if self.once:
                info_pid = info.get("pid")
                debug("a daemon is running (pid %s); nothing to do" % info_pid)
                return EXIT_OK
            raise FlowForgeError("a daemon is already running here (pid %s)" % info.get("pid"),
                                 EXIT_TEMPFAIL)
        try:
            self._signals(True)
            sd_notify("READY=1\nSTATUS=FlowForge daemon for %s" % self.repo.root)
            log_event(self.repo, "daemon-start", pid=os.getpid(), once=self.once)
            while True:
                if self.reload:
                    self.reload = False
                    self.load_config()
                    log_event(self.repo, "daemon-reload")
                self.beat("running")
                self.iterate()
                if self.once or self.stopping:
                    break
                self.sleep(self.next_wait())
            return EXIT_OK
        finally:
            self.beat("stopped")
            sd_notify("STOPPING=1")
            self._signals(False)
            self.queue.close()
            lock.release()
            log_event(self.repo, "daemon-stop", pid=os.getpid())

    def iterate(self):
        """One round.  A bug here is logged and the loop goes on (after the
        usual sleep, so a persistent error cannot spin)."""
        try:
            self.aggregate_changed()
            self.drain()
        except FlowForgeError as e:
            log_event(self.repo, "daemon-error", error=one_line(e))
            warn(str(e))
        except Exception as e:
            import traceback
            log_event(self.repo, "daemon-error", error=one_line(e),
                      traceback=traceback.format_exc(limit=12))
            warn("daemon: %s (logged)" % one_line(e))

    def aggregate_changed(self):
        granularity = self.repo.config["granularity"]
        for user in local_users(self.repo):
            if self.stopping:
                return
            try:
                Aggregator(PrivateStore(self.repo, user), granularity).run(False, 2.0)
                self.queue.settle_key("aggregate:" + user)
            except LockBusy:
                continue  # someone (the hook) is aggregating right now
            except FlowForgeError as e:
                job_id = enqueue_aggregate(self.queue, user)
                log_event(self.repo, "daemon-aggregate-failed", user=user, error=one_line(e),
                          job=job_id)
                return
        record_metrics(self.repo, last_aggregate_success=now())

    def drain(self):
        """One pass: every due job runs once (those queued meanwhile too); a
        failure waits for its backoff and the next round, so a flapping server
        cannot hold the loop."""
        due_by = self.queue.clock()
        while not self.stopping:
            job = self.queue.claim(self.owner, due_by=due_by)
            if job is None:
                return
            try:
                run_job(self.repo, self.queue, job)
            except LeaseLost as e:
                log_event(self.repo, "lease-lost", job=job.id, error=str(e))
            self.beat("running")

    def next_wait(self):
        wait = self.interval
        due = self.queue.stats()["next_due_in_seconds"]
        if due is not None:
            wait = min(wait, max(due, 0.5))  # never spin, even on a job due "now"
        if self.watchdog:
            wait = min(wait, self.watchdog / 2)
        return max(wait, 0.5)

    def beat(self, state):
        doc = {"schema": 1, "pid": os.getpid(), "state": state, "started": self.started,
               "heartbeat": now(), "interval": self.interval, "once": self.once,
               "version": VERSION}
        try:
            atomic_write(os.path.join(self.repo.state, "daemon.json"), canonical_bytes(doc), 0o600)
        except FlowForgeError as e:
            log_event(self.repo, "heartbeat-failed", error=str(e))
        if self.watchdog:
            sd_notify("WATCHDOG=1")

    def sleep(self, seconds):
        """Sleep, but wake at once on SIGTERM / SIGHUP (self-pipe)."""
        import select
        try:
            ready, _, _ = select.select([self.wake_r], [], [], seconds)
        except InterruptedError:
            ready = []
        if ready:
            try:
                while os.read(self.wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def _signals(self, install):
        import signal
        if install:
            self.wake_r, self.wake_w = os.pipe()
            os.set_blocking(self.wake_r, False)
            os.set_blocking(self.wake_w, False)
            self._old_wakeup = signal.set_wakeup_fd(self.wake_w)

            def stop(signum, frame):
                self.stopping = True  # the current job finishes; then the loop ends

            def reload(signum, frame):
                self.reload = True
            self._old = {sig: signal.signal(sig, handler) for sig, handler in (
                (signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload))}
        else:
            if self.wake_r is None:
                return
            for sig, handler in self._old.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(self._old_wakeup)
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.wake_r = self.wake_w = None


def ensure_daemon(repo, wait=5.0):
    """Start a detached daemon unless one is running; returns (started, pid).

    Two concurrent --ensure may both spawn, but the daemon lock lets only one
    of them run: the other exits at once."""
    running, info = daemon_state(repo)
    if running:
        return False, info.get("pid")
    stale = info.get("pid")     # the heartbeat of the last run (a `--once`, say) until a new one
    pid = spawn_flowforge(repo, ["daemon", "-q"])
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        running, info = daemon_state(repo)
        if running and info.get("pid") not in (None, stale):
            return True, info["pid"]
        time.sleep(0.05)
    if running:   # it holds the lock but has not written its heartbeat yet
        return True, pid
    raise FlowForgeError("started a daemon (pid %d) but it is not running; see "
                         ".flowforge/state/logs/daemon.out" % pid)


def stop_daemon(repo, wait=30.0):
    import signal
    running, info = daemon_state(repo)
    if not running or not info.get("pid"):
        raise FlowForgeError("no daemon is running here")
    os.kill(int(info["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not daemon_state(repo)[0]:
            return info["pid"]
        time.sleep(0.05)
    raise FlowForgeError("the daemon (pid %s) did not stop within %d s" % (info["pid"], wait),
                         EXIT_TEMPFAIL)


# -- schedulers ---------------------------------------------------------------

def scheduler_entries(repo, kind, home=None):
    """{path: content} for cron, systemd or launchd, with absolute paths."""
    import shlex
    home = home or os.path.expanduser("~")
    python = os.path.realpath(sys.executable)
    ff = flowforge_path(repo)
    name = "flowforge-" + sha256_hex(repo.root.encode("utf-8"))[:8]
    run = [python, "-S", ff, "-C", repo.root, "daemon"]
    log = os.path.join(repo.logs, "daemon.out")
    if kind == "cron":
        # Overlap protection twice over: flock(1) where present, and the daemon
        # lock, which makes a second `daemon --once` return at once.  cron reads
        # a bare % as a newline, hence the escaping.
        command = " ".join(shlex.quote(a) for a in run + ["--once", "-q"])
        lock = shlex.quote(os.path.join(repo.locks, "cron.lock"))
        # `if`, not `&& ... ||`: with `a && flock -n ... || b`, a held lock (flock
        # exits 1) would run b, the daemon, anyway.
        line = ("*/5 * * * * cd %s && if command -v flock >/dev/null; then flock -n %s %s; "
                "else %s; fi >> %s 2>&1 # flowforge:%s" % (shlex.quote(repo.root), lock, command,
                                                          command, shlex.quote(log), repo.root))
        return {"crontab": line.replace("%", "\\%") + "\n"}
    if kind == "systemd":
        base = os.path.join(os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"),
                            "systemd", "user")
        exec_start = " ".join(shlex.quote(a) for a in run)
        service = ("[Unit]\nDescription=FlowForge daemon for %s\n\n[Service]\nType=notify\n"
                   "NotifyAccess=main\nWorkingDirectory=%s\nExecStart=%s\nRestart=on-failure\n"
                   "RestartSec=10\nWatchdogSec=120\n\n[Install]\nWantedBy=default.target\n"
                   % (repo.root, repo.root, exec_start))
        once = ("[Unit]\nDescription=FlowForge catch-up run for %s\n\n[Service]\nType=oneshot\n"
                "WorkingDirectory=%s\nExecStart=%s --once -q\n" % (repo.root, repo.root, exec_start))
        timer = ("[Unit]\nDescription=FlowForge catch-up every 5 minutes for %s\n\n[Timer]\n"
                 "OnBootSec=2min\nOnUnitActiveSec=5min\nPersistent=true\n\n[Install]\n"
                 "WantedBy=timers.target\n" % repo.root)
        return {os.path.join(base, name + ".service"): service,
                os.path.join(base, name + "-once.service"): once,
                os.path.join(base, name + "-once.timer"): timer}
    if kind == "launchd":
        import plistlib
        label = "dev.flowforge." + name[len("flowforge-"):]
        plist = {"Label": label, "ProgramArguments": run, "WorkingDirectory": repo.root,
                 "RunAtLoad": True, "KeepAlive": {"SuccessfulExit": False},
                 "ThrottleInterval": 30, "StandardOutPath": log, "StandardErrorPath": log,
                 "EnvironmentVariables": {"PATH": "/usr/local/bin:/usr/bin:/bin:/opt/homebrew/bin"}}
        path = os.path.join(home, "Library", "LaunchAgents", label + ".plist")
        return {path: plistlib.dumps(plist).decode("utf-8")}
    raise FlowForgeError("unknown scheduler %r" % kind, EXIT_USAGE)


def write_crontab(line, root):
    """Install `line` in the user's crontab, replacing an earlier one for this repository."""
    import subprocess
    try:
        current = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    except FileNotFoundError:
        raise FlowForgeError("crontab is not installed", EXIT_UNAVAILABLE)
    lines = current.stdout.splitlines() if current.returncode == 0 else []
    tag = "# flowforge:%s" % root
    kept = [entry for entry in lines if not entry.rstrip().endswith(tag)]
    new = "\n".join(kept + [line.rstrip("\n")]) + "\n"
    proc = subprocess.run(["crontab", "-"], input=new, capture_output=True, text=True)
    if proc.returncode:
        raise FlowForgeError("crontab failed: %s" % proc.stderr.strip(), EXIT_UNAVAILABLE)


# -- health, metrics, doctor --------------------------------------------------

HEALTH_CODES = {"ok": 0, "degraded": 1, "unhealthy": 2}


def daemon_verdict(repo):
    """(status, detail, data) of the daemon for health and doctor: ok while one
    runs with a fresh heartbeat, or when a scheduled `daemon --once` ran lately."""
    running, info = daemon_state(repo)
    interval = repo.config["daemon"]["interval"]
    age = now() - info["heartbeat"] if info.get("heartbeat") else None
    data = {"heartbeat_age": age, "running": running}
    if running and age is not None and age <= 3 * interval + 60:
        return "ok", "running (pid %s), heartbeat %ds ago" % (info.get("pid"), age), data
    if info.get("once") is True and age is not None and age <= 900:   # not a stopped daemon
        return "ok", "last run %ds ago (cron or --once)" % age, data
    return "degraded", "not running%s (run `flowforge daemon --ensure` or install a scheduler)" % (
        ", last heartbeat %ds ago" % age if age is not None else ""), data


def health_checks(repo):
    """[{check, status, detail, ...}]: status is ok, degraded or unhealthy."""
    checks = []

    def add(check, status, detail, **data):
        checks.append(dict(data, check=check, status=status, detail=detail))

    hooks = hook_status(repo)
    bad = {h: s for h, s in hooks.items() if s != "current"}
    add("hooks", "degraded" if bad else "ok",
        "; ".join("%s %s" % kv for kv in bad.items()) + " (run `flowforge install hooks`)"
        if bad else "pre-commit, post-commit and pre-push installed and current", hooks=hooks)

    status, detail, data = daemon_verdict(repo)
    add("daemon", status, detail, **data)

    stats = None
    if queue_exists(repo):
        queue = open_queue(repo, busy_timeout=2.0)
        stats = queue.stats()
        queue.close()
    if stats is None:
        add("queue", "ok", "empty", depth=0, dead=0)
    elif stats["counts"]["dead"]:
        add("queue", "unhealthy", "%d dead job(s): see `flowforge queue dead`, then "
            "`flowforge queue retry ID`" % stats["counts"]["dead"], depth=stats["depth"],
            dead=stats["counts"]["dead"], oldest_age=stats["oldest_age_seconds"])
    elif stats["depth"] and stats["oldest_age_seconds"] > 3600:
        add("queue", "degraded", "%d job(s) waiting, the oldest for %s" % (
            stats["depth"], format_duration(stats["oldest_age_seconds"])), depth=stats["depth"],
            dead=0, oldest_age=stats["oldest_age_seconds"])
    else:
        add("queue", "ok", "%d job(s) waiting" % stats["depth"], depth=stats["depth"], dead=0,
            oldest_age=stats["oldest_age_seconds"])

    metrics = read_metrics(repo)
    last = metrics.get("last_aggregate_success")
    newest = 0
    for user in local_users(repo):
        store = PrivateStore(repo, user)
        for day in store.days()[-3:]:
            try:
                newest = max(newest, int(os.stat(store.day_path(day)).st_mtime))
            except OSError:
                pass
    # Private data changed after the last successful aggregation has been
    # waiting at least since that change.
    waiting = now() - newest if newest and (last is None or last < newest) else 0
    since = ("last success %s ago" % format_duration(now() - last)) if last else "never aggregated"
    if waiting > 86400:
        add("aggregation", "unhealthy", "private time has waited %s for aggregation (%s)"
            % (format_duration(waiting), since), last_success=last, waiting=waiting)
    elif waiting > 3600:
        add("aggregation", "degraded", "private time has waited %s for aggregation (%s)"
            % (format_duration(waiting), since), last_success=last, waiting=waiting)
    elif waiting:
        add("aggregation", "ok", "private time changed %s ago, not aggregated yet (the next "
            "commit or daemon round does it; %s)" % (format_duration(waiting), since),
            last_success=last, waiting=waiting)
    else:
        add("aggregation", "ok", ("shards are current (%s)" % since) if newest
            else "no private data here", last_success=last, waiting=waiting)

    try:
        st = os.statvfs(repo.ff)
        free = st.f_bavail * st.f_frsize
        status = "unhealthy" if free < 10 << 20 else "degraded" if free < 200 << 20 else "ok"
        add("disk", status, "%d MiB free" % (free >> 20), free_bytes=free)
    except (OSError, AttributeError):
        add("disk", "ok", "unknown", free_bytes=None)

    items = Quarantine(repo).list()
    add("quarantine", "degraded" if items else "ok",
        "%d file(s) set aside: see `flowforge quarantine list`" % len(items) if items
        else "empty", files=len(items))
    return checks


def overall_health(checks):
    worst = max((HEALTH_CODES[c["status"]] for c in checks), default=0)
    return [k for k, v in HEALTH_CODES.items() if v == worst][0]


def _prom_label(value):
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_prometheus(repo, data):
    """Prometheus text exposition (format 0.0.4), one family per metric, for
    node_exporter's textfile collector."""
    label = '{repo="%s"}' % _prom_label(repo.root)
    out = []

    def family(name, kind, help_text, samples):
        out.append("# HELP %s %s" % (name, help_text))
        out.append("# TYPE %s %s" % (name, kind))
        for suffix, labels, value in samples:
            out.append("%s%s%s %s" % (name, suffix, labels, repr(float(value))
                                      if isinstance(value, float) else value))

    def labelled(extra):
        return label[:-1] + "," + extra + "}"
    family("flowforge_hook_runs_total", "counter", "Pre-commit hook runs by result.",
           [("", labelled('result="success"'), data["hook_success_total"]),
            ("", labelled('result="failure"'), data["hook_failure_total"])])
    family("flowforge_jobs_total", "counter", "Retry-queue jobs finished, by final status.",
           [("", labelled('status="done"'), data["jobs_done_total"]),
            ("", labelled('status="dead"'), data["jobs_dead_total"])])
    family("flowforge_queue_depth", "gauge", "Jobs queued or running.",
           [("", label, data["queue_depth"])])
    family("flowforge_queue_dead", "gauge", "Dead-lettered jobs waiting for a human.",
           [("", label, data["queue_dead"])])
    family("flowforge_queue_oldest_age_seconds", "gauge", "Age of the oldest waiting job.",
           [("", label, data["queue_oldest_age_seconds"])])
    family("flowforge_recovery_seconds", "summary",
           "Time from a failure to the job that repaired it.",
           [("_sum", label, data["recovery_seconds_sum"]),
            ("_count", label, data["recovery_count"])])
    family("flowforge_last_aggregation_timestamp_seconds", "gauge",
           "When an aggregation last succeeded (Unix time).",
           [("", label, data["last_aggregate_success"] or 0)])
    family("flowforge_daemon_heartbeat_age_seconds", "gauge",
           "Seconds since the daemon's last heartbeat (-1: never).",
           [("", label, data["daemon_heartbeat_age_seconds"])])
    family("flowforge_quarantined_files", "gauge", "Files set aside as damaged.",
           [("", label, data["quarantined_files"])])
    return "\n".join(out) + "\n"


def collect_metrics(repo):
    metrics = read_metrics(repo)
    stats = {"depth": 0, "counts": {"dead": 0}, "oldest_age_seconds": 0, "jobs_done_total": 0,
             "jobs_dead_total": 0, "recovery_seconds_sum": 0.0, "recovery_count": 0}
    if queue_exists(repo):
        queue = open_queue(repo, busy_timeout=2.0)
        stats = queue.stats()
        queue.close()
    _, info = daemon_state(repo)
    return {"hook_success_total": metrics.get("hook_success_total", 0),
            "hook_failure_total": metrics.get("hook_failure_total", 0),
            "jobs_done_total": stats["jobs_done_total"], "jobs_dead_total": stats["jobs_dead_total"],
            "queue_depth": stats["depth"], "queue_dead": stats["counts"]["dead"],
            "queue_oldest_age_seconds": stats["oldest_age_seconds"],
            "recovery_seconds_sum": float(stats["recovery_seconds_sum"]),
            "recovery_count": stats["recovery_count"],
            "last_aggregate_success": metrics.get("last_aggregate_success"),
            "daemon_heartbeat_age_seconds": now() - info["heartbeat"] if info.get("heartbeat")
            else -1,
            "quarantined_files": len(Quarantine(repo).list())}


def doctor_findings(repo, notes=None):
    """[(problem, fix)] of this setup; empty when all is well.  `notes`, a list,
    collects what is worth knowing but needs no action (and changes no exit code)."""
    import sqlite3
    findings = []
    notes = [] if notes is None else notes
    lines = []
    try:
        lines = read_bytes(os.path.join(repo.ff, ".gitignore")).decode("utf-8", "replace").split()
    except (OSError, FlowForgeError):
        pass
    missing = [g for g in GITIGNORE.split() if g.startswith("/") and g not in lines]
    if missing:
        findings.append((".flowforge/.gitignore lacks %s: private data could be committed"
                         % " ".join(missing), "run `flowforge init`"))
    rc, tracked, _ = run_git(["ls-files", "--", ".flowforge/user", ".flowforge/state",
                              ".flowforge/quarantine"], repo.root, check=False)
    if tracked.strip():
        findings.append(("private or per-machine files are tracked by git: %s"
                         % ", ".join(tracked.split()[:3]),
                         "git rm -r --cached .flowforge/user .flowforge/state .flowforge/quarantine"))
    for path in [repo.users, repo.state] + [os.path.join(repo.users, u) for u in local_users(repo)]:
        try:
            mode = os.stat(path).st_mode & 0o777
        except OSError:
            continue
        if mode & 0o077:
            findings.append(("%s is readable by others (mode %o)" % (repo.rel(path), mode),
                             "chmod 700 %s" % repo.rel(path)))
    for hook, status in hook_status(repo).items():
        if status != "current":
            findings.append(("the %s hook is %s" % (hook, status), "run `flowforge install hooks`"))
    if daemon_verdict(repo)[0] != "ok":   # no daemon, and no recent scheduled run either
        findings.append(("no daemon is running here", "run `flowforge daemon --ensure`, or "
                         "`flowforge install cron|systemd|launchd --write`"))
    damaged = False
    if queue_exists(repo):
        queue = open_queue(repo, busy_timeout=2.0)
        try:
            damaged = queue.integrity_check() != "ok"
            dead = 0 if damaged else queue.stats()["counts"]["dead"]
        except FlowForgeError:
            damaged, dead = True, 0
        finally:
            queue.close()
        if dead:
            findings.append(("%d dead job(s) in the retry queue" % dead,
                             "see `flowforge queue dead`, fix the cause, `flowforge queue retry ID`"))
    if damaged and not sqlite_wal_reset_bug(sqlite3.sqlite_version_info):
        findings.append(("queue.db fails its integrity check", "move .flowforge/state/queue.db "
                         "aside and run `flowforge reconcile`"))
    if sqlite_wal_reset_bug(sqlite3.sqlite_version_info):
        # Stock Debian and Ubuntu Pythons link such a SQLite and there is nothing
        # to do about it here, so it is a note -- unless the queue shows damage.
        text = ("this Python links SQLite %s, which has the WAL-reset bug: it can corrupt "
                "queue.db only when two processes use it at once (the daemon and a hook) and a "
                "checkpoint races a commit" % sqlite3.sqlite_version)
        if damaged:
            findings.append((text + "; queue.db fails its integrity check",
                             "move .flowforge/state/queue.db aside and run `flowforge reconcile`; "
                             "use a Python built with SQLite 3.51.3 or later (3.50.7, 3.44.6)"))
        else:
            notes.append(text + "; queue.db passes its integrity check. A Python built with "
                         "SQLite 3.51.3 or later (3.50.7, 3.44.6) removes it")
    fs = filesystem_type(repo.state)
    if fs in NETWORK_FILESYSTEMS:
        findings.append((".flowforge/state is on a network file system (%s)" % fs,
                         "keep the repository on a local disk"))
    if Quarantine(repo).list():
        findings.append(("files are quarantined", "see `flowforge quarantine list`"))
    _check_rates(repo, findings, notes)
    return findings


def _check_rates(repo, findings, notes):
    """Rates for names with no time in the ledger: a near miss of a tracked
    name is a problem (a typo bills at the default rate), another a note."""
    view = LedgerView(repo, own_store_keys(repo))
    if view.problems:
        return  # `reconcile` and every report name those
    users, projects, pairs = set(), set(), set()
    for doc in view.shards():
        users.add(doc["user"])
        for _, _, project, _ in doc["rows"]:
            projects.add(project)
            pairs.add("%s/%s" % (doc["user"], project))
    for table, key, guess in unmatched_rates(repo.config["billing"], users, projects, pairs):
        text = rate_warning(table, key, guess, "the ledger")
        if guess:
            findings.append((text, "rename it in .flowforge/config.json"))
        else:
            notes.append(text)


# ############################################################################
# 13. Recovery and import
# ############################################################################
#
# Layer 3 (`reconcile --ci`, on a clean checkout after fetching the ledger)
# proves the ledger right or names what is wrong; layer 4 (`recover`,
# `reconcile`) repairs it from the private store, the mirror, and the
# ledger's own history, reflog, remote copies and quarantine refs.  Repairs
# are staged and deployed under a journal; the only changes in place are
# trimming a chain's torn tail and keeping a day file's good lines, each
# after copying the original to quarantine.

def verify_store(repo, objects, key, ref, tip, history_since=None):
    """Problems of one store ref: [(kind, where, detail)].  Every shard
    (checksum, schema, sums, header against the ref's name), the audit chain
    (its years in order), each shard against its last audit record, a linear
    history, and with `history_since` (epoch) that each commit since then
    extends the chain of the commit before it."""
    found = []
    where = lambda name: "%s:%s" % (ref, name)  # noqa: E731
    size = len(tip) // 2

    def listing(rev, directory):
        item = objects.get(["%s:%s" % (rev, directory)], MAX_TREE_BYTES)[0]
        if item is None:
            return {}
        if item[0] != "tree":
            raise ValueError("%s is not a directory" % directory)
        return parse_tree(item[1], size)
    try:
        root = objects.get([tip + "^{tree}"], MAX_TREE_BYTES)[0]
        entries = parse_tree(root[1], size) if root and root[0] == "tree" else {}
        if "audit" not in entries or set(entries) - set(LEDGER_DIRS):
            raise ValueError("%s is not a ledger commit (its files: %s)" % (
                tip[:12], ", ".join(sorted(entries)[:5]) or "none"))
        shards, years = listing(tip, "summaries"), listing(tip, "audit")
    except ValueError as e:
        return [("ledger", ref, str(e))]
    names = sorted(shards)
    wanted = [(key, name, shards[name][1]) for name in names]
    damaged = []   # LedgerView._blobs stops reading once this holds something
    shas = {}
    for name, item in zip(names, LedgerView._blobs(objects, wanted, damaged)):
        if item is False:
            found.append(("shard", where("summaries/"), "not read further after a damaged shard"))
            break
        month = shard_month(name)
        if not month:
            found.append(("shard", where("summaries/" + name), "is not a shard name (YYYY-MM.json)"))
            continue
        try:
            if item is None or item[0] != "blob":
                raise CorruptFile(where("summaries/" + name), "is more than %d bytes: not a shard"
                                  % MAX_SHARD_BYTES if item and item[0] == "too large"
                                  else "is not a file")
            _shard_doc(item[1], key, month, where("summaries/" + name))
            shas["summaries/" + name] = shard_sha(item[1])
        except CorruptFile as e:
            found.append(("shard", e.path, e.reason))
            damaged.append(name)
    if not damaged:  # one damaged shard is enough to refuse the store; the rest is noise
        chain_found = _chain_problems(objects, tip, years, shas, where)
        found += chain_found
        if any(kind == "audit" for kind, _, _ in chain_found):
            return found   # a broken chain: its history says nothing more
    rc, out, _ = run_git(["rev-list", "--parents", tip], repo.root, check=False)
    if rc:
        found.append(("ledger", ref, "its history cannot be read (missing objects?)"))
    elif any(len(line.split()) > 2 for line in out.splitlines()):
        found.append(("ledger", ref, "its history is not linear (a merge commit): store refs "
                      "only ever fast-forward"))
    elif history_since is not None:
        found += _chain_history_problems(repo, objects, ref, tip, history_since, size)
    return found


def _chain_problems(objects, tip, years, shas, where):
    """The audit chain of a store's tip, and its shards against their records."""
    found = []
    chain, problem = _store_chain(objects, tip, years)
    if problem:
        found.append(("audit", where("audit/"), problem))
        return found
    result = verify_chain_bytes(chain, where("audit/"))
    if not result["ok"]:
        found.append(("audit", where("audit/"), result["problem"]))
        return found
    audited = {ledger_file_name(p): sha for p, sha in result["files"].items()}
    for name, sha in sorted(shas.items()):
        if audited.get(name) is None:
            found.append(("shard-audit", where(name), "not in the audit chain"))
        elif audited[name] != sha:
            found.append(("shard-audit", where(name), "differs from its last audit record"))
    for name in sorted(set(audited) - set(shas)):
        found.append(("shard-audit", where(name), "in the audit chain but missing"))
    return found


def _store_chain(objects, rev, years):
    """(the chain's bytes, its years in order, or a problem)."""
    names = sorted(years)
    bad = [n for n in names if not is_chain_name(n)]
    if bad:
        return b"", "audit/%s is not a chain file name (YYYY.jsonl)" % bad[0]
    items = objects.get(["%s:audit/%s" % (rev, n) for n in names], MAX_CHAIN_BYTES)
    if any(item is None or item[0] != "blob" for item in items):
        return b"", "a chain file is not a file, or more than %d bytes" % MAX_CHAIN_BYTES
    return b"".join(item[1] for item in items), None


_RESTORE_MESSAGE = Pattern(r"recover: restore ([0-9a-f]{40}(?:[0-9a-f]{24})?) ")


def _chain_history_problems(repo, objects, ref, tip, since, size):
    """Each commit on the ref since `since` must extend the chain before it.
    A `recover` repair instead brings back the files of a named earlier commit
    of the same history: that is listed as "restored" (not a problem) when its
    chain is exactly that commit's."""
    rc, out, _ = run_git(["log", "--format=%H %P%x1f%s", "--since=@%d" % utc_day_start(since), tip],
                         repo.root, check=False)
    problems = []

    def chain_at(rev):
        item = objects.get(["%s:audit" % rev], MAX_TREE_BYTES)[0]
        try:
            years = parse_tree(item[1], size) if item and item[0] == "tree" else {}
        except ValueError:
            years = {}
        return _store_chain(objects, rev, years)[0]
    for line in out.splitlines():
        head, _, subject = line.partition("\x1f")
        ids = head.split()
        if len(ids) != 2:
            continue
        child = chain_at(ids[0])
        if child.startswith(chain_at(ids[1])):
            continue
        m = _RESTORE_MESSAGE.match(subject + " ")
        if m and is_ancestor(repo, m.group(1), ids[1]) and child == chain_at(m.group(1)):
            problems.append(("restored", ref, "commit %s restored the files of its earlier commit "
                             "%s (flowforge recover)" % (ids[0][:12], m.group(1)[:12])))
        else:
            problems.append(("audit-history", ref, "commit %s rewrites or truncates the audit "
                             "chain of the commit before it" % ids[0][:12]))
    return problems


def verify_ledger(repo, history_since=None):
    """Every store ref this clone knows; returns {"findings": [...], "stores", "shards"}.

    A finding is {"kind", "path", "detail"}; a path names a ref, or a file in
    one as REF:NAME.  "notes" lists repairs by `recover` in the window: they are
    told, not counted as problems."""
    view = LedgerView(repo, own_store_keys(repo))
    findings = [{"kind": "ledger", "path": "refs/flowforge/", "detail": p} for p in view.problems]
    findings += [{"kind": "ledger", "path": "refs/flowforge/", "detail": w}
                 for w in view.warnings if "rewritten" in w]
    shards, notes = 0, []
    objects = GitObjects(repo.root)
    try:
        for key, (ref, tip, _) in sorted(view.stores.items()):
            for kind, path, detail in verify_store(repo, objects, key, ref, tip, history_since):
                (notes if kind == "restored" else findings).append(
                    {"kind": kind, "path": path, "detail": detail})
            item = objects.get(["%s:summaries" % tip], MAX_TREE_BYTES)[0]
            if item and item[0] == "tree":
                try:
                    shards += len(parse_tree(item[1], len(tip) // 2))
                except ValueError:
                    pass
    finally:
        objects.close()
    if os.path.lexists(repo.team):
        for key, entry in sorted(legacy_stores(repo).items()):
            if key in view.stores:
                continue
            try:
                legacy_store_files(repo, key, entry)
                detail = "still in the 0.1 layout on this branch: run `flowforge migrate`"
            except FlowForgeError as e:
                detail = "still in the 0.1 layout, and damaged: %s" % e
            findings.append({"kind": "legacy", "path": "%s/.../%s" % (repo.rel(repo.team), key),
                             "detail": detail})
    return {"findings": findings, "notes": notes, "stores": len(view.stores), "shards": shards,
            "view": view}


def author_user(repo, email):
    """The FlowForge user of a commit author: config "authors" {email: user}, else
    the user that the e-mail address gives by default."""
    authors = repo.config.get("authors") or {}
    return authors.get(email) or derive_user_name(email)


_GIT_LOG_FIELD = Pattern(r"[\x00-\x1f\x7f]")


def missing_aggregation(repo, lookback_hours, view):
    """Authors with commits on any branch in the window (local or fetched)
    whose store refs did not move in it.  Ledger commits carry the UTC day
    only, so "moved" means a commit on or after the window's first day."""
    since = now() - int(lookback_hours * 3600)
    # NUL separates the fields: the one byte no author name or address can hold
    rc, out, err = run_git(["log", "--branches", "--remotes", "--no-merges",
                            "--since=@%d" % since, "--format=%H%x00%ae%x00%an%x00%ct%x00"],
                           repo.root, check=False)
    if rc:
        raise FlowForgeError("git log failed: %s" % git_error_line(err, rc))
    _, dates, _ = run_git(["for-each-ref", "--format=%(committerdate:unix) %(refname)",
                           "refs/flowforge/"], repo.root)
    moved_since = utc_day_start(since)
    chosen = {ref for ref, _, _ in view.stores.values()}
    moved = set()
    for line in dates.splitlines():
        stamp, _, ref = line.partition(" ")
        if ref in chosen and stamp.isdigit() and int(stamp) >= moved_since:
            moved.add(parse_store_key(ref.rsplit("/", 1)[-1])[0])
    ignored = set(repo.config["reconcile"]["ignore_authors"])
    authors = {}
    tokens = [t.strip("\n") for t in out.split("\x00")]
    for n in range(0, len(tokens) - 4, 4):
        sha, email, name, ctime = tokens[n:n + 4]
        if not ctime.isdigit():
            continue
        email, name = _GIT_LOG_FIELD.sub("?", email), _GIT_LOG_FIELD.sub("?", name)
        if (name.endswith("[bot]") or email.endswith("[bot]@users.noreply.github.com")
                or email in ignored or name in ignored):
            continue
        entry = authors.setdefault(email, {"email": email, "name": name,
                                           "user": author_user(repo, email), "commits": 0,
                                           "last_commit": sha, "last_time": int(ctime)})
        entry["commits"] += 1
        if int(ctime) > entry["last_time"]:
            entry.update(last_commit=sha, last_time=int(ctime))
    return [a for a in authors.values() if a["user"] not in moved]


def ci_report_markdown(repo, result, missing, lookback_hours):
    _, head, _ = run_git(["rev-parse", "--short", "HEAD"], repo.root, check=False)
    findings = result["findings"]
    problems = len(findings) + len(missing)
    out = ["# FlowForge reconcile", "",
           "Checked %d store ref(s) with %d shard(s) at `%s`; authors of the last %g hours."
           % (result["stores"], result["shards"], head.strip() or "?", lookback_hours), ""]
    titles = {"ledger": "Store refs that cannot be trusted", "shard": "Damaged shards",
              "audit": "Broken audit chains",
              "shard-audit": "Shards that do not match their audit chain",
              "audit-history": "Audit chains rewritten after they were committed",
              "legacy": "Stores still on the branch (FlowForge 0.1 layout)",
              "period": "Closed months that cannot be trusted"}
    for kind, title in titles.items():
        rows = [f for f in findings if f["kind"] == kind]
        if rows:
            out += ["## %s" % title, ""] + ["- `%s`: %s" % (f["path"], f["detail"]) for f in rows]
            out.append("")
    if result.get("notes"):
        out += ["## Restored by `flowforge recover` (for the record; not a problem)", ""]
        out += ["- `%s`: %s" % (f["path"], f["detail"]) for f in result["notes"]] + [""]
    if missing:
        out += ["## Possible missing aggregation", "",
                "These authors committed, but none of their store refs moved: time tracked "
                "since then may not be aggregated or pushed yet (or they tracked none).", "",
                "| author | FlowForge user | commits | last commit |", "| --- | --- | ---: | --- |"]
        out += ["| %s <%s> | %s | %d | %s |" % (m["name"].replace("|", "/"), m["email"], m["user"],
                                                m["commits"], m["last_commit"][:10])
                for m in missing]
        out += ["", "On that developer's machine: `flowforge reconcile && flowforge push`. "
                "Someone who tracks no time goes into `reconcile.ignore_authors` in "
                "`.flowforge/config.json`."]
        out.append("")
    out.append("**Result: %s.**" % ("clean" if not problems else "%d problem(s) found; see "
                                    "\"When things break\" in FlowForge's README" % problems))
    return "\n".join(out) + "\n"


_TEMP_FILE = Pattern(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


def orphaned_temp_files(roots, min_age=3600):
    """Temp files of interrupted atomic writes: their writer is gone (or they are old)."""
    found = []
    for root in roots:
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                m = _TEMP_FILE.match(name)
                if not m:
                    continue
                path = os.path.join(dirpath, name)
                try:
                    os.kill(int(m.group(1)), 0)
                    alive = True
                except ProcessLookupError:
                    alive = False
                except PermissionError:
                    alive = True
                try:
                    old = now() - os.lstat(path).st_mtime > min_age
                except FileNotFoundError:
                    continue
                if not alive or old:
                    found.append(path)
    return found


def reconcile_local(repo, lookback_hours=72):
    """What `flowforge reconcile` does on a developer's machine; returns
    (actions, remaining findings)."""
    actions = []
    resumed = finish_interrupted_deploy(repo)
    if resumed:
        actions.append("finished an interrupted deploy (%s)" % resumed)
    for path in orphaned_temp_files([repo.ff, mirror_root(repo)]):
        os.unlink(path)
        actions.append("removed the orphaned temp file %s" % path)
    granularity = repo.config["granularity"]
    queue = open_queue(repo) if queue_exists(repo) else None
    before = verify_ledger(repo)["findings"]
    for user in local_users(repo):
        store = PrivateStore(repo, user)
        local = AuditChain(os.path.join(store.dir, "audit.jsonl"))
        item = local.trim_torn_tail(repo)
        if item:
            actions.append("trimmed the torn tail of %s (quarantined as %s)"
                           % (repo.rel(local.path), item))
        key = store_key(user, store.store_id)
        damaged = any(key in f["path"] and f["kind"] in ("shard", "shard-audit") for f in before)
        result = Aggregator(store, granularity).run(full=damaged)
        if result["written"]:
            actions.append("%s: aggregated %s" % (user, ", ".join(result["written"])))
        if queue is not None:
            settled = queue.settle_key("aggregate:" + user, dead=True)
            if settled:
                actions.append("%s: %d queued or dead aggregate job(s) settled" % (user, settled))
        copied = store.mirror.sync()
        if copied:
            actions.append("%s: mirror brought up to date (%d file(s))" % (user, copied))
    if queue is not None:
        queue.close()
    record_metrics(repo, last_aggregate_success=now())
    return actions, verify_ledger(repo)


WORKFLOW = """\
# Written by `flowforge install ci`: fetches the ledger (every store ref), checks
# its shards, audit chains and histories, and looks for authors whose time was
# not aggregated.  On failure it opens (or comments on) an issue with the report.
name: FlowForge reconcile
on:
  schedule:
    - cron: "17 */4 * * *"
  push:
  workflow_dispatch:
concurrency:
  group: flowforge-reconcile
  cancel-in-progress: false
permissions:
  contents: read
  issues: write
jobs:
  reconcile:
    runs-on: ubuntu-latest
    timeout-minutes: 15
    steps:
      - uses: actions/checkout@v4
        with:
          fetch-depth: 0
      - name: Fetch the ledger (store refs)
        run: python3 flowforge.py fetch origin
      - name: Reconcile the ledger
        id: reconcile
        run: python3 flowforge.py reconcile --ci --report flowforge-reconcile.md
      - name: Report problems in an issue
        if: failure() && steps.reconcile.outcome == 'failure'
        env:
          GH_TOKEN: ${{ secrets.GITHUB_TOKEN }}
        run: |
          title="FlowForge reconcile found problems"
          number=$(gh issue list --state open --search "in:title $title" --json number --jq '.[0].number')
          if [ -n "$number" ]; then
            gh issue comment "$number" --body-file flowforge-reconcile.md
          else
            gh issue create --title "$title" --body-file flowforge-reconcile.md
          fi
"""


# -- recover: assess, reconstruct, validate, audit, deploy -------------------

def recover_dir(repo):
    return os.path.join(repo.state, "recover")


class Progress:
    """"\\rreconstructing 12/650" on stderr, only when it is a terminal."""

    def __init__(self, what, total):
        self.what, self.total = what, total
        self.show = total > 20 and not UI.quiet and sys.stderr.isatty()

    def step(self, n):
        if self.show and (n % 10 == 0 or n == self.total):
            sys.stderr.write("\r%s %d/%d" % (self.what, n, self.total))
            if n == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def assess(repo, user=None):
    """Everything that is damaged or missing, read-only: [{"area", "problem", "fix"}]."""
    found = []

    def add(area, problem, fix):
        found.append({"area": area, "problem": problem, "fix": fix})
    if os.path.exists(os.path.join(recover_dir(repo), "deploy.json")):
        add("deploy", "a deploy was interrupted", "any command finishes it; or `flowforge reconcile`")
    if os.path.exists(os.path.join(recover_dir(repo), "plan.json")):
        add("deploy", "reconstructed files are staged but not deployed",
            "`flowforge recover validate`, then `flowforge recover deploy`")
    for f in verify_ledger(repo)["findings"]:
        fix = {"legacy": "`flowforge migrate`"}.get(
            f["kind"], "`flowforge recover reconstruct`, then `flowforge recover deploy` (the "
            "newest version that verifies, as a new commit); or the owner's `flowforge reconcile`")
        add(f["kind"], "%s: %s" % (f["path"], f["detail"]), fix)
    users = local_users(repo)
    for name in users:
        store = PrivateStore(repo, name)
        try:
            store.settings()
        except FlowForgeError as e:
            add("private", str(e), "`flowforge recover reconstruct --from-mirror`")
            continue
        for day in store.days():
            problems = store.check_day(day)
            if problems:
                add("private", "%s: %s" % (repo.rel(store.day_path(day)), "; ".join(problems[:2])),
                    "any command that reads it quarantines it and keeps its good lines")
        try:
            raw = read_bytes(store.timer_path)
            doc = load_json(raw)
            if not isinstance(doc, dict) or (doc.get("timer") is not None
                                             and not _valid_timer(doc["timer"])):
                raise ValueError
        except FileNotFoundError:
            pass
        except (ValueError, FlowForgeError):
            add("private", "%s is damaged" % repo.rel(store.timer_path),
                "`flowforge status` quarantines it; start the timer again with --at")
        mirror = store.mirror
        if not os.path.isdir(mirror.dir):
            add("mirror", "%s has no mirror outside the work tree" % name, "`flowforge reconcile`")
    if user and user not in users:
        mirrors = find_mirrors(repo, user)
        if mirrors:
            add("private", "no private store for %s here, but %d mirror(s) exist (%s)" % (
                user, len(mirrors), ", ".join(m[0] for m in mirrors)),
                "`flowforge recover reconstruct --from-mirror`, then `flowforge recover deploy`")
    if queue_exists(repo):
        queue = open_queue(repo, busy_timeout=2.0)
        try:
            if queue.integrity_check() != "ok":
                add("queue", "queue.db fails its integrity check", "move it aside; `flowforge "
                    "reconcile` re-runs missing aggregation")
            dead = queue.stats()["counts"]["dead"]
            if dead:
                add("queue", "%d dead job(s)" % dead, "`flowforge queue dead`, then `queue retry ID`")
        except FlowForgeError as e:
            add("queue", str(e), "move queue.db aside; `flowforge reconcile`")
        finally:
            queue.close()
    temps = orphaned_temp_files([repo.ff])
    if temps:
        add("temp", "%d orphaned temp file(s) from interrupted writes" % len(temps),
            "`flowforge reconcile` removes them")
    items = Quarantine(repo).list()
    if items:
        add("quarantine", "%d quarantined file(s)" % len(items), "`flowforge quarantine list`")
    return found


def ledger_candidates(repo, key, tip):
    """[(commit, where it comes from)] that may hold a good version of a store,
    newest first: the own ref's reflog, the tip's history, every fetched copy
    and the quarantine refs."""
    out, seen = [], {tip}
    _, reflog, _ = run_git(["log", "-g", "--format=%H", STORES_REF + key], repo.root, check=False)
    _, history, _ = run_git(["rev-list", "--first-parent", "-n", "500", tip], repo.root, check=False)
    _, copies, _ = run_git(["for-each-ref", "--format=%(objectname) %(refname)",
                            REMOTES_REF + "*/" + key, INCOMING_REF + "*/" + key,
                            QUARANTINE_REF + "*/" + key + "/*"], repo.root, check=False)
    rank = {REMOTES_REF: 0, INCOMING_REF: 1, QUARANTINE_REF: 2}   # accepted copies first
    copies = sorted(copies.splitlines(), key=lambda line: next(
        (r for prefix, r in rank.items() if " " + prefix in line), 3))
    for source, ids in (("reflog", reflog.split()), ("history", history.split()),
                        ("copy", copies)):
        for item in ids:
            oid, _, ref = item.partition(" ")
            if oid not in seen:
                seen.add(oid)
                out.append((oid, "%s %s" % (ref or source, oid[:12])))
    return out


def good_ledger_version(repo, objects, key, ref, tip):
    """(commit, source) of the newest version of a store that verifies, or (None, None)."""
    for oid, source in ledger_candidates(repo, key, tip):
        rc, kind, _ = run_git(["cat-file", "-t", oid], repo.root, check=False)
        if rc == 0 and kind.strip() == "commit" and not verify_store(repo, objects, key, ref, oid):
            return oid, source
    return None, None


def reconstruct(repo, user, from_mirror=False, store_id=None, dry_run=False):
    """Stage repairs under state/recover/staged (private files) and in the plan
    (store refs); returns the plan."""
    items, refs, unrecoverable = [], [], []

    def stage(rel, data, source):
        items.append({"path": rel, "source": source, "sha256": sha256_hex(data), "size": len(data),
                      "data": data, "replaces": _sha_or_none(os.path.join(repo.root, rel))})
    kept = []
    if from_mirror:
        store = PrivateStore(repo, user)
        chosen, directory = choose_mirror(repo, store, store_id)
        for dirpath, _, filenames in os.walk(directory):
            for name in sorted(filenames):
                if name == "mirror.json" or _TEMP_FILE.match(name):
                    continue
                source = os.path.join(dirpath, name)
                inside = os.path.relpath(source, directory)
                rel = repo.rel(os.path.join(store.dir, inside))
                data = read_bytes(source)
                try:
                    local = read_bytes(os.path.join(repo.root, rel))
                except FileNotFoundError:
                    local = None
                if local == data:
                    continue
                if mirror_copy_wanted(inside, local, data):
                    stage(rel, data, "mirror %s" % chosen)
                else:
                    kept.append("%s: the copy here is newer than the mirror's; kept it" % rel)
    result = verify_ledger(repo)
    view = result["view"]
    objects = GitObjects(repo.root)
    try:
        for key, (ref, tip, _) in sorted(view.stores.items()):
            if not any(f["path"].startswith(ref) for f in result["findings"]):
                continue
            good, source = good_ledger_version(repo, objects, key, ref, tip)
            if good is None:
                unrecoverable.append("%s: damaged, and no version in its reflog, history, fetched "
                                     "copies or quarantine refs verifies" % ref)
                continue
            own = view.refs.get(STORES_REF + key)
            refs.append({"ref": STORES_REF + key, "key": key, "restore": good, "parent": tip,
                         "replaces": own[0] if own else "", "source": source})
        # A damaged local store ref that reports no longer read (a good fetched copy
        # won): brought forward to that copy's files, so it stops standing in the way.
        for ref, (oid, kind, _) in sorted(view.refs.items()):
            key = ref[len(STORES_REF):]
            if (not ref.startswith(STORES_REF) or kind != "commit" or key not in view.stores
                    or view.stores[key][0] == ref or any(r["key"] == key for r in refs)):
                continue
            if verify_store(repo, objects, key, ref, oid):
                chosen_ref, chosen_tip, _ = view.stores[key]
                refs.append({"ref": ref, "key": key, "restore": chosen_tip, "parent": oid,
                             "replaces": oid, "source": "%s %s" % (chosen_ref, chosen_tip[:12])})
    finally:
        objects.close()
    plan = {"schema": 1, "created": now(), "items": [{k: v for k, v in i.items() if k != "data"}
                                                      for i in items],
            "refs": refs, "unrecoverable": unrecoverable, "kept": kept}
    if not dry_run and (items or refs):
        staged = os.path.join(recover_dir(repo), "staged")
        if os.path.isdir(staged):
            import shutil
            shutil.rmtree(staged)
        for item in items:
            target = os.path.join(staged, item["path"])
            makedirs_private(os.path.dirname(target))
            atomic_write(target, item["data"], 0o600, sync_dir=False)
        makedirs_private(recover_dir(repo))
        atomic_write(os.path.join(recover_dir(repo), "plan.json"), canonical_bytes(plan), 0o600)
    return plan


def repair_commit(repo, key, restore, parent, source):
    """A new commit on `parent` whose files are those of `restore`: how a ref
    repair (or its rollback) reaches the ledger, so that history stays linear
    and the next push fast-forwards.  Its message names the restored commit in
    full, which is how verification tells a restore from a rewrite."""
    _, tree, _ = run_git(["rev-parse", "--verify", "%s^{tree}" % restore], repo.root)
    _, out, _ = run_git(_GIT_DURABLE + ["commit-tree", "--no-gpg-sign", tree.strip(), "-p", parent],
                        repo.root,
                        input=("recover: restore %s (%s)\n" % (restore, source)).encode(),
                        env=ledger_commit_env(parse_store_key(key)[0], now()))
    return out.strip()


def choose_mirror(repo, store, store_id=None):
    """(store id, directory) of the mirror to reconstruct `store` from: the
    one given, else the only one, else the one made from this work tree."""
    user = store.user
    mirrors = find_mirrors(repo, user)
    if store_id:
        mirrors = [m for m in mirrors if m[0] == store_id]
    try:
        current = store.store_id if store.exists() else None
    except FlowForgeError:
        current = None  # damaged settings: the mirror's copy is what repairs them
    if current:
        mirrors = [m for m in mirrors if m[0] == current]
    if not mirrors:
        raise FlowForgeError("no mirror of %s's private store %sfor this repository under %s"
                             % (user, (current or store_id or "") + " " if current or store_id
                                else "", mirror_root(repo)))
    here = [m for m in mirrors if m[2].get("root") == repo.root]
    if len(mirrors) > 1 and len(here) != 1:
        def describe(m):
            days = os.path.join(m[1], "time", "daily")
            count = len(os.listdir(days)) if os.path.isdir(days) else 0
            return "%s (%d day files, from %s)" % (m[0], count, m[2].get("root", "?"))
        raise FlowForgeError("several mirrors of %s's store: %s; choose one with --store"
                             % (user, "; ".join(describe(m) for m in mirrors)), EXIT_USAGE)
    chosen = here[0] if here else mirrors[0]
    return chosen[0], chosen[1]


def mirror_copy_wanted(inside, local, mirrored):
    """Whether the mirror's copy of a store file should replace the one here
    (`local`, None when missing).  A newer local file is never replaced: the
    append-only files only when the mirror holds every good line of the local
    one, the settings only when the local ones are damaged, the timer only
    when it is missing."""
    if local is None:
        return True
    if inside.endswith(".jsonl"):
        lines = set(mirrored.splitlines(True))
        if inside == "audit.jsonl":
            good = [line for line in local.splitlines(True) if line.endswith(b"\n")]
        else:
            good = PrivateStore._scan_day(local)[1]
        return all(line in lines for line in good)
    if inside == "config.json":
        try:
            return not re.fullmatch(r"[0-9a-f]{10}", str(load_json(local).get("store", "")))
        except (ValueError, AttributeError):
            return True
    return False


def load_plan(repo):
    path = os.path.join(recover_dir(repo), "plan.json")
    try:
        plan = load_json(read_bytes(path))
        if not isinstance(plan, dict) or not isinstance(plan.get("items"), list):
            raise ValueError
        return plan
    except FileNotFoundError:
        return None
    except ValueError:
        raise FlowForgeError("the recovery plan %s is damaged: run `flowforge recover "
                             "reconstruct` again" % repo.rel(path), EXIT_DATA)


def validate(repo):
    """Recompute every local store from its private records and compare, to the
    second, with its shards in the ledger (the staged version where a repair
    of its private files or its ref is staged)."""
    import shutil
    plan = load_plan(repo) or {"items": [], "refs": []}
    staged = {item["path"] for item in plan["items"]}
    restored = {item["key"]: item["restore"] for item in plan.get("refs", [])}
    results = []
    granularity = repo.config["granularity"]
    prefix = repo.rel(repo.users) + "/"
    repaired = {path[len(prefix):].split("/")[0] for path in staged if path.startswith(prefix)}
    objects = GitObjects(repo.root)
    try:
        for name in sorted(set(local_users(repo)) | repaired):
            store = PrivateStore(repo, name)
            if name in repaired:  # as the deploy will leave it: a copy with the staged files over it
                view = os.path.join(recover_dir(repo), "view", name)
                shutil.rmtree(view, ignore_errors=True)
                if os.path.isdir(store.dir):
                    shutil.copytree(store.dir, view)
                shutil.copytree(os.path.join(recover_dir(repo), "staged", repo.rel(store.dir)),
                                view, dirs_exist_ok=True)
                store = PrivateStore(repo, name, view)
            try:
                computed, store_id = Aggregator(store, granularity).compute_all(), store.store_id
            finally:
                if name in repaired:
                    shutil.rmtree(os.path.dirname(store.dir), ignore_errors=True)
            key = store_key(name, store_id)
            ledger = StoreLedger(repo, name, store_id, objects)
            if key in restored:
                ledger._tip = restored[key]
            have = ledger.read([shard_name(m) for m in computed])
            for month, data in computed.items():
                actual = have[shard_name(month)]
                expected = load_json(data)["totals"]["seconds"]
                try:
                    seconds = load_json(actual)["totals"]["seconds"] if actual else None
                except (ValueError, KeyError, TypeError):
                    seconds = None
                results.append({"path": "%s%s:%s" % (STORES_REF, key, shard_name(month)),
                                "staged": key in restored, "recomputed_seconds": expected,
                                "shard_seconds": seconds, "identical": actual == data})
    finally:
        objects.close()
    return results


def compliance_audit(repo):
    """Per store: chain verified, records, shards matching, total seconds."""
    rows = []
    result = verify_ledger(repo)
    view = result["view"]
    objects = GitObjects(repo.root)
    try:
        for key, (ref, tip, _) in sorted(view.stores.items()):
            user, store_id = parse_store_key(key)
            problems = [f for f in result["findings"] if f["path"].startswith(ref)]
            ledger = StoreLedger(repo, user, store_id, objects)
            ledger._tip = tip
            total = 0
            try:
                years = {n: m for n, m in ledger.tree("audit").items()}
                chain, _ = _store_chain(objects, tip, years)
                chain_result = verify_chain_bytes(chain, ref)
                for data in ledger.read([shard_name(m) for m in ledger.months()]).values():
                    try:
                        total += load_json(data)["totals"]["seconds"]
                    except (TypeError, ValueError, KeyError, RecursionError):
                        pass
            except FlowForgeError as e:   # a teammate's unreadable ref: one row says so
                chain_result = {"records": 0, "ok": False, "problem": one_line(e), "last": None}
            last = chain_result["last"]
            rows.append({"user": user, "store": store_id, "ref": ref,
                         "records": chain_result["records"], "chain_ok": chain_result["ok"],
                         "problem": chain_result["problem"],
                         "shards_matching": not [p for p in problems if p["kind"] != "audit"],
                         "shard_problems": problems, "total_seconds": total,
                         "last_record_day": local_date(last["ts"], _utc()) if last else None})
    finally:
        objects.close()
    return rows


def deploy_journal(repo):
    return os.path.join(recover_dir(repo), "deploy.json")


def deploy_locks(repo, paths):
    """The locks of every store whose files a deploy touches, in a fixed order."""
    users = set()
    for rel in paths:
        parts = rel.split("/")
        if parts[:2] == [".flowforge", "user"] and len(parts) > 2:
            users.add(parts[2])
        elif parts[:2] == [".flowforge", "team"] and len(parts) > 3:
            users.add(parts[3].rsplit(".", 1)[0].rpartition("--")[0])
    locks = [repo.lock("deploy", 30, "a deploy")]
    for user in sorted(u for u in users if valid_user_name(u)):
        locks.append(repo.lock("aggregate." + user, 30, "aggregation for %s" % user))
        locks.append(repo.lock("store." + user, 30, "the private store of %s" % user))
    return locks


def _apply(repo, journal):
    """Roll a journaled deploy forward: move every staged file that is still
    there into place.  Idempotent, so a crash in here is finished by re-running."""
    touched = set()
    forget_aggregation_states(repo, [item["path"] for item in journal["items"]])   # first
    for item in journal["items"]:
        target = os.path.join(repo.root, item["path"])
        if item.get("delete"):
            if os.path.lexists(target):
                os.unlink(target)
                touched.add(os.path.dirname(target))
            continue
        staged = item["staged"]
        if os.path.exists(staged):
            private = item["path"].startswith((".flowforge/user/", ".flowforge/state/"))
            (makedirs_private if private else lambda d: os.makedirs(d, exist_ok=True))(
                os.path.dirname(target))
            os.replace(staged, target)
            touched.add(os.path.dirname(target))
    for directory in sorted(touched):
        fsync_dir(directory)
    current = list_ledger_refs(repo) if journal.get("refs") else {}
    for item in journal.get("refs", []):
        now_at = (current.get(item["ref"]) or ("",))[0]
        if now_at == item["new"]:
            continue  # done before a crash
        if now_at != item["old"]:
            raise FlowForgeError("%s moved during the deploy; run `flowforge recover assess`"
                                 % item["ref"])
        update_refs(repo, [(item["ref"], item["new"], item["old"])], "flowforge: recover %s"
                    % item["key"])
    if not journal.get("rollback"):  # the plan is used up: part of the deploy, not after it
        import shutil
        shutil.rmtree(os.path.join(recover_dir(repo), "staged"), ignore_errors=True)
        plan = os.path.join(recover_dir(repo), "plan.json")
        if os.path.exists(plan):
            os.unlink(plan)
    journal["state"] = "done"
    history = os.path.join(recover_dir(repo), "deploys")
    makedirs_private(history)
    atomic_write(os.path.join(history, journal["id"] + ".json"), canonical_bytes(journal), 0o600)
    os.unlink(deploy_journal(repo))
    fsync_dir(recover_dir(repo))


def _read_journal(repo, path):
    """The deploy journal, or None after setting a damaged one aside (it is
    written by atomic replace, so damage is from outside FlowForge)."""
    try:
        journal = load_json(read_bytes(path))
        if (not isinstance(journal, dict) or journal.get("state") not in ("prepared", "applying")
                or not isinstance(journal.get("id"), str) or not isinstance(journal.get("items"), list)
                or not all(isinstance(i, dict) and isinstance(i.get("path"), str)
                           for i in journal["items"])
                or not isinstance(journal.get("refs", []), list)
                or not all(isinstance(r, dict) and all(isinstance(r.get(k), str) for k in
                                                       ("ref", "key", "old", "new"))
                           for r in journal.get("refs", []))):
            raise ValueError("not a deploy journal")
        return journal
    except ValueError:
        item = Quarantine(repo).put(path, "damaged deploy journal")
        warn("the deploy journal %s was damaged and was set aside as %s; the deploy it "
             "described may be half done: run `flowforge recover assess`" % (repo.rel(path), item))
        return None


def finish_interrupted_deploy(repo):
    """After a crash during deploy: a journal that reached "applying" is rolled
    forward, an earlier one discarded, so the files are all new or all old."""
    path = deploy_journal(repo)
    if not os.path.exists(path):
        return None
    journal = _read_journal(repo, path)
    if journal is None:
        return None
    locks = deploy_locks(repo, [i["path"] for i in journal["items"]] + [
        ".flowforge/user/%s/" % parse_store_key(r.get("key", ""))[0]
        for r in journal.get("refs", []) if parse_store_key(r.get("key", ""))])
    for lock in locks:
        lock.acquire()
    try:
        if not os.path.exists(path):
            return None  # someone else finished it while we waited
        journal = _read_journal(repo, path)
        if journal is None:
            return None
        if journal["state"] == "applying":
            _apply(repo, journal)
            log_event(repo, "deploy-resumed", id=journal["id"])
            return "rolled forward %s" % journal["id"]
        os.unlink(path)
        log_event(repo, "deploy-discarded", id=journal["id"])
        return "discarded %s before it changed anything" % journal["id"]
    finally:
        for lock in reversed(locks):
            lock.release()


def _sha_or_none(path):
    try:
        return sha256_hex(read_bytes(path))
    except FileNotFoundError:
        return None


def deploy(repo, dry_run=False, rollback=False):
    """Swap the staged files and ref repairs in (or, with rollback, undo the
    last deploy), all under one journal."""
    finish_interrupted_deploy(repo)
    recover = recover_dir(repo)
    deploy_id = "%d-%s" % (now(), os.urandom(3).hex())
    staging = os.path.join(recover, "swap-" + deploy_id)
    items, ref_items = [], []
    if rollback:
        history = os.path.join(recover, "deploys")
        done = sorted(os.listdir(history)) if os.path.isdir(history) else []
        if not done:
            raise FlowForgeError("no deploy to roll back")
        last = load_json(read_bytes(os.path.join(history, done[-1])))
        for item in last["items"]:
            if item.get("backup"):
                items.append({"path": item["path"], "source": item["backup"]})
            else:
                items.append({"path": item["path"], "delete": True})
        for item in last.get("refs", []):
            ref_items.append({"ref": item["ref"], "key": item["key"], "restore": item["old"],
                              "replaces": item["new"], "source": "as before deploy %s"
                              % last["id"]})
    else:
        plan = load_plan(repo)
        if not plan or not (plan["items"] or plan.get("refs")):
            raise FlowForgeError("nothing is staged: run `flowforge recover reconstruct` first")
        for item in plan["items"]:
            items.append({"path": item["path"], "replaces": item.get("replaces", False),
                          "source": os.path.join(recover, "staged", item["path"])})
        ref_items = plan.get("refs") or []
    if dry_run:
        return {"id": None, "items": [{"path": i["path"], "delete": bool(i.get("delete"))}
                                      for i in items] + [{"path": r["ref"], "restore": r["source"]}
                                                         for r in ref_items]}
    users = [".flowforge/user/%s/" % parse_store_key(r["key"])[0] for r in ref_items]
    locks = deploy_locks(repo, [i["path"] for i in items] + users)
    for lock in locks:
        lock.acquire()
    try:
        journal = _prepare_deploy(repo, items, ref_items, deploy_id, staging, rollback)
        atomic_write(deploy_journal(repo), canonical_bytes(journal), 0o600)
        journal["state"] = "applying"  # from here on, a crash is rolled forward
        atomic_write(deploy_journal(repo), canonical_bytes(journal), 0o600)
        _apply(repo, journal)
    finally:
        for lock in reversed(locks):
            lock.release()
    import shutil
    shutil.rmtree(staging, ignore_errors=True)
    log_event(repo, "deploy", id=deploy_id, rollback=rollback, files=len(items), refs=len(ref_items))
    return {"id": deploy_id, "items": journal["items"] + [
        {"path": r["ref"], "restored": r["source"]} for r in journal["refs"]]}


def _prepare_deploy(repo, items, ref_items, deploy_id, staging, rollback):
    """Check that nothing changed since staging, copy what is replaced (for
    rollback), stage the swaps and make the repair commits; returns the
    journal.  Nothing live changes here."""
    recover = recover_dir(repo)
    changed = [i["path"] for i in items if i.get("replaces", False) is not False
               and i["replaces"] != _sha_or_none(os.path.join(repo.root, i["path"]))]
    current = list_ledger_refs(repo)
    changed += [r["ref"] for r in ref_items
                if (current.get(r["ref"]) or ("",))[0] != r["replaces"]]
    if changed:
        raise FlowForgeError("%s changed since it was staged (%d in all): run `flowforge recover "
                             "reconstruct` again; nothing was deployed" % (changed[0], len(changed)))
    journal = {"schema": 1, "id": deploy_id, "state": "prepared", "rollback": rollback,
               "items": [], "refs": []}
    for item in items:
        target = os.path.join(repo.root, item["path"])
        entry = {"path": item["path"], "backup": None}
        if os.path.exists(target):  # keep what is replaced, for rollback
            backup = os.path.join(recover, "backups", deploy_id, item["path"])
            makedirs_private(os.path.dirname(backup))
            atomic_write(backup, read_bytes(target), 0o600, sync_dir=False)
            entry["backup"] = backup
        if item.get("delete"):
            entry["delete"] = True
        else:
            swap = os.path.join(staging, item["path"])
            makedirs_private(os.path.dirname(swap))
            mode = 0o600 if item["path"].startswith(".flowforge/user/") else None
            atomic_write(swap, read_bytes(item["source"]), mode, sync_dir=False)
            entry["staged"] = swap
        journal["items"].append(entry)
    for item in ref_items:
        old = item["replaces"] or item.get("parent")
        if not item["restore"]:   # rolling back a ref that the deploy created: it goes
            journal["refs"].append({"ref": item["ref"], "key": item["key"], "old": item["replaces"],
                                    "new": "", "source": item["source"]})
            continue
        new = repair_commit(repo, item["key"], item["restore"], old, item["source"])
        journal["refs"].append({"ref": item["ref"], "key": item["key"], "old": item["replaces"],
                                "new": new, "source": item["source"]})
    return journal


# -- imports, export, erase ----------------------------------------------------
#
# Importers read a whole source first and refuse it with the file and line (or
# issue and session) of the first problem, before anything is written.  Every
# imported entry gets an id derived from its source, so importing the same
# file again adds nothing; entries already there (perhaps edited since) are
# left alone.
#
# They stream: a source of a million entries is read a piece at a time
# (JSONStream) into columns (ImportedEntries, ~40 bytes an entry), then
# checked and written a slice of days at a time, so that memory stays
# proportional to a slice, not to the years the source covers.


class JSONStreamError(ValueError):
    """Not JSON, at line `lineno` (1-based) of the source."""

    def __init__(self, message, lineno):
        ValueError.__init__(self, "%s (line %d)" % (message, lineno))
        self.lineno = lineno


class JSONStream:
    """A JSON document read a megabyte at a time: the elements of an array and
    the members of an object one by one, each decoded by json's own scanner,
    so that a source larger than memory allows is never held parsed whole.
    `hasher` has seen every byte read."""

    CHUNK = 1 << 20

    def __init__(self, fd):
        import json.decoder
        self._fd = fd
        self._scan = json.decoder.JSONDecoder().scan_once
        self._decode_error = json.decoder.JSONDecodeError
        self.hasher = sha256_hasher()
        self._text, self._pos, self._lines, self._eof = "", 0, 0, False
        head = self._read()
        if head[:1] in (b"\xef", b"\xfe", b"\xff", b"\x00") or head[1:2] == b"\x00":
            # A byte-order mark, or UTF-16/32: decoded whole, as json.loads would.
            chunks = [head]
            while chunks[-1]:
                chunks.append(self._read())
            data = b"".join(chunks)
            try:
                self._text = data.decode(json.detect_encoding(data), "surrogatepass")
            except UnicodeDecodeError as e:
                raise JSONStreamError("not text: %s" % e.reason, 1)
            self._eof = True
        else:
            import codecs
            self._decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")
            self._feed(head)

    def _read(self):
        data = os.read(self._fd, self.CHUNK)
        self.hasher.update(data)
        return data

    def _feed(self, data):
        if not data:
            self._eof = True
        try:
            self._text += self._decoder.decode(data, self._eof)
        except UnicodeDecodeError as e:
            raise JSONStreamError("not UTF-8: %s" % e.reason, self._line(len(self._text)))

    def _more(self):
        """Read on (keeping the text from the current position): False at the end."""
        if self._eof:
            return False
        self._lines += self._text.count("\n", 0, self._pos)
        self._text, self._pos = self._text[self._pos:], 0
        self._feed(self._read())
        return True

    def _line(self, at):
        return self._lines + self._text.count("\n", 0, at) + 1

    def peek(self):
        """The next character that is not white space ("" at the end)."""
        while True:
            text, pos = self._text, self._pos
            end = len(text)
            while pos < end and text[pos] in " \t\n\r":
                pos += 1
            self._pos = pos
            if pos < end or not self._more():
                return text[pos:pos + 1]

    def value(self):
        """The next whole value."""
        self.peek()
        while True:
            text = self._text
            try:
                value, end = self._scan(text, self._pos)
            except StopIteration as e:
                at, message = e.value, "Expecting value"
            except self._decode_error as e:
                at, message = e.pos, e.msg
            except RecursionError:   # (a hostile file of `[[[[...`)
                raise JSONStreamError("nested too deeply", self._line(self._pos))
            else:
                # A number (or literal) that reaches the end of what was read
                # may go on in the next piece: read on and decode it again.
                if end <= len(text) - 8 or not self._more():
                    self._pos = end
                    return value
                continue
            # Decoding stopped at the end of what was read (or inside a string
            # that goes on): the rest may be in the next piece.
            if (at >= len(text) - 8 or message.startswith("Unterminated string")) and self._more():
                continue
            raise JSONStreamError(message, self._line(at))

    def _expect(self, chars, message):
        char = self.peek()
        if not char or char not in chars:
            raise JSONStreamError(message, self._line(self._pos))
        self._pos += 1
        return char

    def elements(self):
        """Each element of the array that comes next (the caller has peeked a "[")."""
        self._expect("[", "Expecting '['")
        if self.peek() == "]":
            self._pos += 1
            return
        scan, blank = self._scan, " \t\n\r"
        tried = None   # the text in which decoding many elements at once failed
        while True:
            text, pos = self._text, self._pos
            # Many elements in one call of the scanner: those up to the last
            # `], [` (or `}, {`) read so far.  If that bracket is not the end of
            # an element (it is in a string, or closes a nested value), the
            # text cut there is not a whole array and fails to decode; then one
            # at a time, as below, until more is read.
            cut = self._last_boundary(text, pos) if tried is not text else 0
            if cut > pos + 4096:
                piece = "[" + text[pos:cut] + "]"
                try:
                    values, end = scan(piece, 0)
                except (StopIteration, self._decode_error, RecursionError):
                    end = -1
                if end == len(piece):
                    self._pos = cut
                    yield from values
                    self._expect(",", "Expecting ',' delimiter")
                    continue
                tried = text
            # The usual element -- `, ` before it, wholly within what was read --
            # without value()'s calls; anything else goes through them.
            try:
                value, end = scan(text, pos)
            except (StopIteration, self._decode_error, RecursionError):
                end = len(text)
            if end <= len(text) - 8:
                self._pos = end
            else:
                value = self.value()
                text, end = self._text, self._pos
            yield value
            char = text[end:end + 1]
            if char == ",":
                end += 1
                while text[end:end + 1] in blank and end < len(text):
                    end += 1
                self._pos = end
            elif self._expect(",]", "Expecting ',' delimiter") == "]":
                return

    @staticmethod
    def _last_boundary(text, pos):
        """Just after the last `]` (or `}`) in text[pos:] that a comma and a
        `[` (or `{`) follow, or 0."""
        for close, opening in (("],", "["), ("},", "{")):
            end = len(text)
            for _ in range(4):   # (a nested list or object may close just before)
                at = text.rfind(close, pos, end)
                if at < 0:
                    break
                after = at + 2
                while text[after:after + 1] in (" ", "\n", "\t", "\r") and after < len(text):
                    after += 1
                if text[after:after + 1] == opening:
                    return at + 1
                end = at
        return 0

    def members(self):
        """The key of each member of the object that comes next (the caller has
        peeked a "{"): the caller reads the member's value before the next."""
        self._expect("{", "Expecting '{'")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            if self.peek() != '"':
                raise JSONStreamError("Expecting property name enclosed in double quotes",
                                      self._line(self._pos))
            key = self.value()
            self._expect(":", "Expecting ':' delimiter")
            yield key
            if self._expect(",}", "Expecting ',' delimiter") == "}":
                return

    def end(self):
        """After the document's value: nothing but white space may follow."""
        if self.peek():
            raise JSONStreamError("Extra data", self._line(self._pos))


class ImportedEntries:
    """One user's entries from an import, in columns rather than a record dict
    per entry (a million of those would take over a gigabyte).  Entry i starts
    at starts[i] and ends at ends[i] (or, when not timed[i], is ends[i]
    seconds on its start's local day); kinds[i] indexes its (issue, project,
    note, extra fields as canonical JSON) among the batch's distinct ones;
    digests[12i:12i+12] are its id's 12 hex digits (ASCII).  by_day: the
    entries of each id day (the UTC day of the start, as a day number)."""

    def __init__(self):
        from array import array
        self._array = array
        self.starts, self.ends, self.kinds = array("q"), array("q"), array("I")
        self.timed, self.digests = bytearray(), bytearray()
        self.by_day = {}
        self._ordered = False

    def __len__(self):
        return len(self.starts)

    def _in_order(self, indices):
        """A day's entries in the order an import takes them: its days'
        seconds first (by id), then by start and id."""
        starts, timed, digests = self.starts, self.timed, self.digests
        if all(timed[i] for i in indices):
            indices = sorted(indices, key=starts.__getitem__)
            if all(starts[a] < starts[b] for a, b in zip(indices, indices[1:])):
                return indices   # (the usual case: no two start at the same second)
        return sorted(indices, key=lambda i: (starts[i] if timed[i] else 0,
                                              digests[12 * i:12 * i + 12]))

    def slices(self, size=4096):
        """[(day number, [entry index])] in day order, a slice of consecutive
        days holding about `size` entries at a time; each day's entries in the
        order an import takes them (see _in_order)."""
        if not self._ordered:   # once: a check and a write go through the same slices
            for day, indices in self.by_day.items():
                self.by_day[day] = self._array("I", self._in_order(indices))
            self._ordered = True
        piece, count = [], 0
        for day in sorted(self.by_day):
            indices = self.by_day[day]
            piece.append((day, indices))
            count += len(indices)
            if count >= size:
                yield piece
                piece, count = [], 0
        if piece:
            yield piece


class ImportBatch:
    """What an importer found: entries by user (ImportedEntries), running
    timers, things to review."""

    def __init__(self, source, path, zone):
        self.source, self.path = source, path
        self.clock = DayClock(zone)
        self.entries = {}     # user -> ImportedEntries
        self.timers = []      # (user, issue, project, note, start, entry id)
        self.review = []      # human-readable lines: not billed, or worth a look
        self.unknown_fields = set()
        self.imported_days = set()   # local days that entries were written to
        self._tags = {}
        self._kinds, self._kind_index = [], {}   # distinct (issue, project, note, extra)
        self._utc_days, self._id_prefixes = {}, {}
        self._key_prefix = (source + ":").encode("utf-8")
        self._lines = {}   # kind -> the three parts of its timed records' lines
        self._sha = sha256_constructor()

    def issue_from_tags(self, tags):
        """(issue, other tags): the first tag that is an issue reference, or
        ValueError for tags that are not strings (cached: a source repeats the
        same tags thousands of times)."""
        key = tuple(tags)
        if key not in self._tags:
            if not all(isinstance(t, str) for t in key):
                raise ValueError("tags must be a list of strings")
            self._tags[key] = _issue_from_tags(key)
        return self._tags[key]

    def utc_day(self, day_number):
        """The ISO date of a day number (days since 1970-01-01)."""
        day = self._utc_days.get(day_number)
        if day is None:
            day = self._utc_days[day_number] = "%04d-%02d-%02d" % time.gmtime(day_number * 86400)[:3]
        return day

    def _digest(self, key):
        # (surrogatepass: a key is only hashed, and a source may hold a lone surrogate)
        return self._sha(self._key_prefix + key.encode("utf-8", "surrogatepass")).hexdigest()[:12]

    def _id_prefix(self, day_number):
        """`YYYYMMDD-` of a day number, as ASCII bytes."""
        prefix = self._id_prefixes.get(day_number)
        if prefix is None:
            prefix = self._id_prefixes[day_number] = (
                self.utc_day(day_number).replace("-", "") + "-").encode("ascii")
        return prefix

    def entry_id(self, key, start):
        """The same id on every import of the same source entry, whatever the
        time zone: the UTC day of its start and the source's own key (as
        new_entry_id makes it, 12 hex digits).  A running interval gets the id
        its closed form will have, so stopping the restored timer and
        importing the closed interval later count it once."""
        return self.utc_day(start // 86400).replace("-", "") + "-" + self._digest(key)

    def add_timer(self, user, key, issue, project, note, start):
        self.timers.append((user, issue, project, note, start, self.entry_id(key, start)))

    def kind(self, issue, project, note, extra=None):
        """The number of an entry's issue, project, note and extra fields
        (validated) among those of the batch, for add(); ValueError for text
        that cannot be stored."""
        kind = (issue, project, note, canonical_json(extra) if extra else "")
        number = self._kind_index.get(kind)
        if number is None:
            try:   # (JSON's \ud800 escapes decode to what UTF-8 cannot hold)
                "".join(kind).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text that is not valid Unicode (a lone surrogate)")
            number = self._kind_index[kind] = len(self._kinds)
            self._kinds.append(kind)
        return number

    def add(self, user, key, kind, start, end=None, seconds=None):
        """One entry (its times already validated; `kind` from kind()): clock
        times when start and end give its length, else a day's seconds."""
        entries = self.entries.get(user) or self._new_user(user)
        timed = end is not None and (seconds is None or seconds == end - start)
        index = len(entries.starts)
        entries.starts.append(start)
        entries.ends.append(end if timed else seconds)
        entries.timed.append(timed)
        entries.kinds.append(kind)
        entries.digests += self._digest(key).encode()
        number = start // 86400
        day = entries.by_day.get(number)
        if day is None:
            day = entries.by_day[number] = entries._array("I")
        day.append(index)
        entries._ordered = False

    def _new_user(self, user):
        entries = self.entries[user] = ImportedEntries()
        return entries

    def ids(self, entries, day, indices):
        """The ids of entries `indices` of id day `day`."""
        prefix, digests = self._id_prefix(day).decode("ascii"), entries.digests
        return [prefix + digests[12 * i:12 * i + 12].decode("ascii") for i in indices]

    def record(self, entries, index):
        """Entry `index` of `entries` as the record the store keeps."""
        issue, project, note, extra = self._kinds[entries.kinds[index]]
        start = entries.starts[index]
        record = {"op": "entry",
                  "id": (self._id_prefix(start // 86400)
                         + entries.digests[12 * index:12 * index + 12]).decode("ascii"),
                  "issue": issue, "project": project, "note": note, "src": self.source,
                  "v": RECORD_SCHEMA}
        if entries.timed[index]:
            record["segments"] = [[start, entries.ends[index]]]
        else:
            record["date"], record["seconds"] = self.clock.day_of(start), entries.ends[index]
        if extra:
            record["extra"] = load_json(extra)
        return record

    def lines(self, entries, day, indices, overlapping):
        """encode_record() of record(entries, i) for each i of `indices` (of id
        day `day`), marked overlapping where overlapping[i].  The usual entry --
        timed, no extra fields -- is put together from the parts of the first
        such line with the same issue, project and note, rather than from a
        dict encoded each time (a million entries)."""
        prefix = self._id_prefix(day)
        starts, ends, timed, digests = entries.starts, entries.ends, entries.timed, entries.digests
        kinds, known, crc32 = entries.kinds, self._lines, zlib.crc32
        out = []
        for i in indices:
            parts = known.get(kinds[i])
            if overlapping[i] or not timed[i] or (parts is None and self._kinds[kinds[i]][3]):
                record = self.record(entries, i)
                if overlapping[i]:
                    record["overlap"] = True
                out.append(encode_record(record))
                continue
            if parts is None:
                parts = self._line_parts(entries, i)
            body = b"%s%s%s%s%d,%d%s" % (parts[0], prefix, digests[12 * i:12 * i + 12], parts[1],
                                         starts[i], ends[i], parts[2])
            out.append(b"%08x %s\n" % (crc32(body), body))
        return out

    def _line_parts(self, entries, index):
        """The JSON of timed entry `index` before its id, between its id and
        its start, and after its end."""
        record = self.record(entries, index)
        line = canonical_json(record)   # `{"id":"...",...,"segments":[[...]],"src":...}`
        head, rest = line.split(canonical_json(record["id"]), 1)
        middle, tail = rest.rsplit(canonical_json(record["segments"]), 1)
        parts = ((head + '"').encode("utf-8"), ('"' + middle + "[[").encode("utf-8"),
                 ("]]" + tail).encode("utf-8"))
        if len(self._lines) < 100000:   # (notes may all differ)
            self._lines[entries.kinds[index]] = parts
        return parts


def _import_error(path, where, what):
    return FlowForgeError("%s: %s: %s (nothing was imported)" % (path, where, what), EXIT_DATA)


def open_source(path, shown):
    """A descriptor of the file an import reads (open_regular); `shown`: the
    path as the user gave it, for the message."""
    try:
        return open_regular(path)[0]
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FlowForgeError("%s is not a readable file" % shown, EXIT_USAGE)


def _json_source(path, fd):
    try:
        return JSONStream(fd)
    except JSONStreamError as e:
        raise _import_error(path, "line %d" % e.lineno, "not valid JSON")


_IMPORT_DAYS = {}   # date text -> epoch day or None: a source repeats its dates


def _utc_instant(date_text, hour, minute, second):
    """Epoch seconds of a UTC date of 1970-2999 (`YYYY-MM-DD`, or `YYYYMMDD`)
    at the given time of day; None unless both are valid."""
    day = _IMPORT_DAYS.get(date_text, False)
    if day is False:
        iso = date_text if len(date_text) != 8 else "%s-%s-%s" % (
            date_text[:4], date_text[4:6], date_text[6:])
        day = _IMPORT_DAYS[date_text] = epoch_day(iso)
    if day is None or hour > 23 or minute > 59 or second > 59:
        return None
    return day * 86400 + hour * 3600 + minute * 60 + second


def _v1_time(value):
    """Epoch seconds of an ISO-8601 time; ValueError says what is wrong."""
    if not isinstance(value, str):
        raise ValueError("time %r is not a string" % (value,))
    if (len(value) == 20 and value[19] == "Z" and value[10] == "T" and value[13] == value[16] == ":"
            and value.isascii() and (value[11:13] + value[14:16] + value[17:19]).isdigit()):
        # The usual `2026-11-16T09:00:00Z`, without parse_time's regular
        # expressions and datetime (a million sessions); anything else, and any
        # invalid value, goes to parse_time.
        ts = _utc_instant(value[:10], int(value[11:13]), int(value[14:16]), int(value[17:19]))
        if ts is not None:
            return ts
    try:
        return parse_time(value.strip(), _utc(), 0)   # naive times are taken as UTC
    except FlowForgeError:
        raise ValueError("time %r is not ISO-8601" % value)


def parse_v1(path, stream, mapping, zone):
    """The legacy .task-times.json: {issue: {status, current_session, sessions}},
    read an issue and a session at a time."""
    batch = ImportBatch("v1", path, zone)
    try:
        if stream.peek() != "{":
            stream.value()    # not JSON, or not an object
            raise _import_error(path, "top level", "expected an object keyed by issue")
        issues = set()
        for issue_key in stream.members():
            where = "issue %r" % issue_key
            try:
                issue = parse_issue(str(issue_key))
            except FlowForgeError:
                raise _import_error(path, where, "not an issue reference")
            if issue_key in issues:   # (json.loads would keep the last one, silently)
                raise _import_error(path, where, "appears twice")
            issues.add(issue_key)
            if stream.peek() != "{":
                stream.value()
                raise _import_error(path, where, "expected an object")
            _v1_issue(batch, stream, issue, where, mapping)
        stream.end()
    except JSONStreamError as e:
        raise _import_error(path, "line %d" % e.lineno, "not valid JSON")
    return batch


def _v1_issue(batch, stream, issue, where, mapping):
    """One issue's record: its sessions as they come, its running session last."""
    path = batch.path
    current, keys = None, set()
    for key in stream.members():
        if key in keys:
            raise _import_error(path, where, "%r appears twice" % key)
        keys.add(key)
        if key not in ("status", "current_session", "sessions"):
            batch.unknown_fields.add(key)
        if key != "sessions" or stream.peek() != "[":
            value = stream.value()
            if key == "current_session":
                current = value
            elif key == "sessions" and value:
                raise _import_error(path, where, "sessions must be a list")
            continue
        for n, session in enumerate(stream.elements(), 1):
            try:
                _v1_session(batch, session, issue, mapping)
            except ValueError as e:
                raise _import_error(path, "%s, session %d" % (where, n), str(e))
    if isinstance(current, dict) and current.get("start"):
        try:
            user = _v1_user(current.get("user"), mapping)
            start = _v1_time(current["start"])
        except ValueError as e:
            raise _import_error(path, where + ", current_session", str(e))
        batch.add_timer(user, _v1_key(issue, user, start, current), issue, "",
                        "v1 running session", start)


_V1_FIELDS = frozenset(("start", "end", "user", "instance_id", "duration", "reason"))


def _v1_session(batch, session, issue, mapping):
    """Add one session of `issue`; ValueError says what is wrong with it."""
    if not isinstance(session, dict):
        raise ValueError("expected an object")
    user = _v1_user(session.get("user"), mapping)
    start = _v1_time(session.get("start"))
    end = _v1_time(session["end"]) if session.get("end") is not None else None
    duration = session.get("duration")
    if duration is not None:
        if (isinstance(duration, bool) or not isinstance(duration, (int, float))
                or not 0 <= duration < EPOCH_LIMITS[1]):      # also refuses NaN
            raise ValueError("duration %r is not a number of seconds" % (duration,))
        seconds = int(round(duration))     # an explicit duration wins over start/end
    elif end is not None:
        seconds = end - start
        if seconds < 0:
            raise ValueError("ends before it starts")
    else:
        raise ValueError("has neither an end nor a duration")
    extra = None
    if not _V1_FIELDS.issuperset(session):
        extra = {k: v for k, v in session.items() if k not in _V1_FIELDS}
        batch.unknown_fields.update(extra)
    if seconds == 0:
        batch.review.append("not billed: %s, %s, %s: duration 0 (closed by the old "
                            "stale-timer cleanup?)" % (issue, user, session.get("start")))
        return
    if seconds > MAX_ENTRY_SECONDS:
        batch.review.append("imported, check it: %s, %s, %s lasts %s" % (
            issue, user, session.get("start"), format_duration(seconds)))
    note = "v1" + (": %s" % session["reason"] if session.get("reason") else "")
    batch.add(user, _v1_key(issue, user, start, session),
              batch.kind(issue, "", note[:NOTE_MAX], extra), start, end, seconds)


def _v1_key(issue, user, start, session):
    """A session's identity: the running one keeps it when v1 closes it."""
    return "%s:%s:%s:%s" % (issue, user, start, session.get("instance_id", ""))


def _v1_user(name, mapping):
    if isinstance(name, str):
        name = mapping.get(name, name)
    if name is None:
        raise ValueError("has no user")
    if not isinstance(name, str) or not valid_user_name(name):
        raise ValueError("user %r is not a valid name (use --map old=new)" % (name,))
    return name


def _issue_from_tags(tags):
    for tag in tags:
        try:
            return parse_issue(tag), [t for t in tags if t != tag]
        except FlowForgeError:
            continue
    return None, list(tags)


def _clean_project(name, path, where):
    if not name:
        return ""
    cleaned = re.sub(r"[^A-Za-z0-9 ._/-]", "-", str(name)).strip(" -")[:64].strip()
    if not is_project(cleaned or "x!"):
        raise _import_error(path, where, "project %r cannot be used" % name)
    return cleaned


def parse_watson(path, stream, user, default_issue, zone):
    """Watson's frames file: [[start, stop, project, id, tags, updated_at], ...],
    read a frame at a time."""
    batch = ImportBatch("watson", path, zone)
    without_issue = 0
    kinds = {}   # (tags, project) -> kind, or -1 without an issue
    low, high = EPOCH_LIMITS
    try:
        if stream.peek() != "[":
            stream.value()    # not JSON, or not a list
            raise _import_error(path, "top level", "expected a list of frames")
        for n, frame in enumerate(stream.elements(), 1):
            if type(frame) is not list or len(frame) < 4:
                raise _import_error(path, "frame %d" % n,
                                    "expected [start, stop, project, id, tags, ...]")
            start, stop, project, frame_id = frame[:4]
            tags = frame[4] if len(frame) > 4 and frame[4] is not None else []
            if (type(start) not in (int, float) or type(stop) not in (int, float)
                    or not (low <= start < high and low <= stop < high)):
                raise _import_error(path, "frame %d" % n,
                                    "start and stop must be Unix times (1970 to 2999)")
            if stop <= start:
                raise _import_error(path, "frame %d" % n, "stops before it starts")
            if type(tags) is not list:
                raise _import_error(path, "frame %d" % n, "tags must be a list of strings")
            if type(project) is not str and project is not None:
                raise _import_error(path, "frame %d" % n, "project must be a string")
            try:
                kind = kinds.get((tuple(tags), project))   # a source repeats its tags, projects
            except TypeError:   # (a list or object among the tags)
                raise _import_error(path, "frame %d" % n, "tags must be a list of strings")
            if kind is None:
                try:
                    issue, rest = batch.issue_from_tags(tags)
                except ValueError as e:
                    raise _import_error(path, "frame %d" % n, str(e))
                issue = issue or default_issue
                note = ("watson" + (": " + " ".join(rest) if rest else ""))[:NOTE_MAX]
                try:
                    kind = kinds[(tuple(tags), project)] = -1 if issue is None else batch.kind(
                        issue, _clean_project(project, path, "frame %d" % n), note)
                except ValueError as e:
                    raise _import_error(path, "frame %d" % n, str(e))
            if kind < 0:
                without_issue += 1
                continue
            batch.add(user, str(frame_id), kind, int(start), int(stop))
        stream.end()
    except JSONStreamError as e:
        raise _import_error(path, "line %d" % e.lineno, "not valid JSON")
    if without_issue:
        raise FlowForgeError("%s: %d frame(s) have no tag that is an issue reference (123, "
                             "ABC-12, owner/repo#1); give --default-issue (nothing was imported)"
                             % (path, without_issue), EXIT_DATA)
    return batch


_TIMEW_LINE = Pattern(r"^inc (\d{8}T\d{6}Z)(?: - (\d{8}T\d{6}Z))?(?: # (.*))?$")


def _timew_time(text, path, name, number):
    """Epoch seconds of Timewarrior's `YYYYMMDDTHHMMSSZ` (UTC), by arithmetic
    rather than strptime (~10 us a call, a million intervals)."""
    ts = _utc_instant(text[:8], int(text[9:11]), int(text[11:13]), int(text[13:15]))
    if ts is None:
        raise _import_error(path, "%s line %d" % (name, number), "%s is not a valid time" % text)
    return ts


def _timew_words(text):
    """Tags as Timewarrior writes them: bare words, or "quoted \\"words\\""."""
    words, i = [], 0
    while i < len(text):
        if text[i] == " ":
            i += 1
        elif text[i] == '"':
            j, word = i + 1, []
            while j < len(text) and text[j] != '"':
                if text[j] == "\\" and j + 1 < len(text):
                    j += 1
                word.append(text[j])
                j += 1
            if j >= len(text):
                raise ValueError("unterminated quote")
            words.append("".join(word))
            i = j + 1
        else:
            j = text.find(" ", i)
            j = len(text) if j < 0 else j
            words.append(text[i:j])
            i = j
    return words


def timewarrior_files(path):
    """(directory, [data file names in order]) of a Timewarrior directory (with
    data/, or data/ itself)."""
    directory = os.path.join(path, "data") if os.path.isdir(os.path.join(path, "data")) else path
    try:
        files = sorted(n for n in os.listdir(directory) if re.fullmatch(r"\d{4}-\d{2}\.data", n))
    except OSError as e:
        raise FlowForgeError("%s: %s" % (path, e.strerror), EXIT_USAGE)
    if not files:
        raise FlowForgeError("%s has no Timewarrior data files (data/YYYY-MM.data)" % path,
                             EXIT_DATA)
    return directory, files


def parse_timewarrior(path, user, default_issue, project, zone, hasher):
    """Timewarrior's data/*.data: `inc START - END # tags # "annotation"`; an
    interval without an end is the running one.  A month's file at a time;
    `hasher` is fed each file's bytes in name order."""
    directory, files = timewarrior_files(path)
    batch = ImportBatch("timewarrior", path, zone)
    without_issue = 0
    tagged = {}   # the text after `#` -> (issue, note): a source repeats its tags
    for name in files:
        data = read_bytes(os.path.join(directory, name))
        hasher.update(data)
        for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            m = _TIMEW_LINE.match(line)
            if not m:
                raise _import_error(path, "%s line %d" % (name, number), "not an interval line")
            begins, ends, text = m.groups()
            start = _timew_time(begins, path, name, number)
            end = _timew_time(ends, path, name, number) if ends else None
            found = tagged.get(text)
            if found is None:
                tags, annotation = (), ""
                if text:
                    tag_part, _, note_part = text.partition(" # ")
                    try:
                        tags = _timew_words(tag_part)
                        annotation = " ".join(_timew_words(note_part)) if note_part else ""
                    except ValueError as e:
                        raise _import_error(path, "%s line %d" % (name, number), str(e))
                issue, rest = batch.issue_from_tags(tags)
                words = " ".join(rest + ([annotation] if annotation else []))
                found = (issue or default_issue,
                         ("timewarrior: " + words if words else "timewarrior")[:NOTE_MAX])
                if len(tagged) < 100000:   # (annotations may all differ)
                    tagged[text] = found
            issue, note = found
            if issue is None:
                without_issue += 1
                continue
            if end is None:
                batch.add_timer(user, begins, issue, project, note, start)
            elif end < start:
                raise _import_error(path, "%s line %d" % (name, number), "ends before it starts")
            elif end > start:
                batch.add(user, begins, batch.kind(issue, project, note), start, end)
    if without_issue:
        raise FlowForgeError("%s: %d interval(s) have no tag that is an issue reference; give "
                             "--default-issue (nothing was imported)" % (path, without_issue),
                             EXIT_DATA)
    return batch


def apply_import(repo, batch, importing_user, data_sha, dry_run=False, overlaps="refuse"):
    """Append the batch's new entries (by id; deleted ones stay deleted) and
    restore a running timer for the importing user only.

    Entries are admitted like typed ones (Timers.admit_batch), a slice of
    days at a time.  `overlaps`: "refuse" stops the whole import on a
    conflict, naming the first ones, and imports nothing; "allow" imports
    overlapping entries marked as such; "skip" imports the rest and lists
    what it left out.  Every slice is checked before the first is written."""
    summary = {"source": batch.source, "users": {}, "timers": [], "review": list(batch.review),
               "unknown_fields": sorted(batch.unknown_fields), "skipped": []}
    users = sorted(set(batch.entries) | {t[0] for t in batch.timers})
    stores = {user: PrivateStore(repo, user) for user in users}
    plans = {}
    from contextlib import ExitStack
    with ExitStack() as held:
        # Every user's store lock (in name order, as no other command takes two), so
        # that nothing recorded between the check and the write can slip past it;
        # every check first, so that a refusal writes nothing.
        for user in users:
            held.enter_context(stores[user].lock())
        for user in users:
            store = stores[user]
            if not store.exists():
                store._zone = Zone(system_timezone_name())  # the zone create() gives it
            plans[user] = _check_import(store, batch, batch.entries.get(user), overlaps, summary)
        for user in users:
            store = stores[user]
            outcome, counts = plans[user]
            if not dry_run and not store.exists() and (counts["added"] or user == importing_user):
                store._settings = store._zone = store._clock = None
                store._create(None)   # under the lock held above
            if store.exists() and counts["added"] and not dry_run:
                _write_import(store, batch, batch.entries[user], outcome)
    for user in users:
        store = stores[user]
        counts = plans[user][1]
        for timer_user, issue, project, note, start, timer_id in batch.timers:
            if timer_user != user:
                continue
            if user != importing_user:
                summary["timers"].append("not restored: %s's running %s since %s (only the "
                                         "importing user's timer is)"
                                         % (user, issue, utc_text(start)))
                continue
            summary["timers"].append(restore_timer(store, timer_id, issue, project, note, start,
                                                   dry_run))
        if not dry_run and store.exists():
            with repo.lock("aggregate." + user, 10, "aggregation for %s" % user):
                AuditChain(os.path.join(store.dir, "audit.jsonl")).append(
                    "import", now(), files={}, totals={}, source=batch.source,
                    file=os.path.basename(batch.path), sha256=data_sha, added=counts["added"],
                    already=counts["already"], unknown_fields=sorted(batch.unknown_fields))
        summary["users"][user] = counts
    return summary


# What the check decided for each imported entry: written by the write pass or not.
_ALREADY, _REFUSED, _ADMITTED, _OVERLAPPING = 0, 1, 2, 3


def _check_import(store, batch, entries, overlaps, summary):
    """(outcome bytearray, counts) for one user's entries, a slice at a time
    in time order, or FlowForgeError when `overlaps` is "refuse" and one would
    overlap or overfill a day.  The caller holds the store lock."""
    counts = {"added": 0, "already": 0, "overlapping": 0}
    if entries is None:
        return bytearray(), counts
    outcome = bytearray([_ADMITTED]) * len(entries)   # until found otherwise
    timers = Timers(store, now())
    timer = store.load_timer() if store.exists() else None
    carry = {"seconds": {}, "latest": None}
    refused_count, shown = 0, []
    files = set(store.days())   # (one listing, rather than a look for each day's file)
    starts, ends, timed, day_of = entries.starts, entries.ends, entries.timed, batch.clock.day_of
    # A day's seconds (v1 sessions with a duration of their own) are taken
    # first, then clock times in time order -- as when all are admitted at once.
    passes = (False, True) if 0 in timed else (True,)
    for clock_times in passes:
        for piece in entries.slices():
            where = []   # the indices of the new entries taken in this pass
            for day, indices in piece:
                iso = batch.utc_day(day)
                if clock_times != passes[0]:   # looked at in the first pass
                    where += [i for i in indices if outcome[i] != _ALREADY and timed[i]]
                    continue
                if iso not in files:
                    where += [i for i in indices if timed[i] == clock_times]
                    continue
                seen = {r["id"] for r in store.read_day(iso)}
                for i, entry_id in zip(indices, batch.ids(entries, day, indices)):
                    if entry_id in seen:
                        outcome[i] = _ALREADY
                        counts["already"] += 1
                    elif timed[i] == clock_times:
                        where.append(i)
            refused, overlapping = timers.admit_batch(
                [(starts[i], ends[i], True) if clock_times else (day_of(starts[i]), ends[i], False)
                 for i in where],
                lambda position, where=where: batch.record(entries, where[position]),
                overlaps == "allow", timer, carry)
            counts["added"] += len(where) - len(refused)
            counts["overlapping"] += len(overlapping)
            for position in overlapping:
                outcome[where[position]] = _OVERLAPPING
            for position, why in refused:
                outcome[where[position]] = _REFUSED
                if overlaps == "skip":
                    summary["skipped"].append("not imported for %s: %s" % (store.user, why))
                elif len(shown) < 3:
                    shown.append(why)
            refused_count += len(refused)
    if refused_count and overlaps != "skip":
        raise FlowForgeError(
            "%d entr%s for %s would overlap, run over 24h or overfill a day: %s%s; "
            "nothing was imported (--allow-overlap imports overlapping ones marked as "
            "such, --skip-conflicts imports the rest)"
            % (refused_count, "y" if refused_count == 1 else "ies", store.user, "; ".join(shown),
               " ..." if refused_count > 3 else ""), EXIT_DATA)
    return outcome, counts


def _write_import(store, batch, entries, outcome):
    """Append the admitted entries to their day files, a day at a time, naming
    every day first (note_changes).  The caller holds the store lock."""
    days = [day for day in sorted(entries.by_day)
            if any(outcome[i] >= _ADMITTED for i in entries.by_day[day])]
    store.note_changes([batch.utc_day(day) for day in days])
    written = []
    day_of, starts = batch.clock.day_of, entries.starts
    overlapping = outcome.translate(bytes([0, 0, 0, 1]) + bytes(252))   # 1 where _OVERLAPPING
    for piece in entries.slices():
        for day, indices in piece:
            admitted = [i for i in indices if outcome[i] >= _ADMITTED]
            if admitted:
                lines = batch.lines(entries, day, admitted, overlapping)
                # (in time order; a UTC day's starts fall on at most two local days)
                batch.imported_days.update((day_of(starts[admitted[0]]), day_of(starts[admitted[-1]])))
                store.append_lines(batch.utc_day(day), lines, bulk=True)
                written.append(batch.utc_day(day))
    store.finish_bulk(written)


def restore_timer(store, timer_id, issue, project, note, start, dry_run):
    """Restore an imported running interval unless it was already restored
    (running) or already recorded (stopped, perhaps since deleted)."""
    since = utc_text(start)
    if not store.exists():
        return "would restore: running %s since %s" % (issue, since)
    day = day_of_entry_id(timer_id)
    with store.lock():
        if store.has_record(day, timer_id):
            return "not restored: %s since %s was already stopped and recorded" % (issue, since)
        current = store.load_timer()
        if current is not None and current["id"] == timer_id:
            return "already running: %s since %s" % (issue, since)
        if current is not None:
            return "not restored: %s since %s (a timer is running)" % (issue, since)
        if dry_run:
            return "would restore: running %s since %s" % (issue, since)
        store.save_timer({"id": timer_id, "day": day, "issue": issue, "project": project,
                          "note": note, "segments": [], "running_since": start})
    return "restored: running %s since %s" % (issue, since)


def export_entries(store):
    with store.lock():
        entries = []
        for day in store.days():
            for entry_id, entry in store.entries_of_day(day).items():
                entries.append(public_entry(entry, id=entry_id, day=day))
        timer = store.load_timer()
    entries.sort(key=lambda e: (e["day"], entry_start(e) or 0, e["id"]))
    return {"schema": "flowforge.export/1", "user": store.user, "store": store.store_id,
            "timezone": store.tz_name, "exported": now(), "entries": entries, "timer": timer}


def render_export_csv(doc, tz):
    from datetime import datetime
    rows = []
    for e in doc["entries"]:
        if e.get("segments"):
            start = datetime.fromtimestamp(e["segments"][0][0], tz).isoformat()
            end = datetime.fromtimestamp(e["segments"][-1][1], tz).isoformat()
        else:
            start = end = ""
        rows.append([e["id"], e["day"], start, end, entry_seconds(e), e["issue"],
                     e.get("project", ""), e.get("note", ""), e.get("src", "")])
    return render("csv", ["id", "day", "start", "end", "seconds", "issue", "project", "note",
                          "source"], rows)


def erase_user(repo, user):
    """Remove a user's private data, cache, quarantined private files and every
    mirror of it for this repository; record the erasure in the team audit."""
    import shutil
    store = PrivateStore(repo, user)
    removed = []
    store_id = store.store_id if store.exists() else None
    with repo.lock("aggregate." + user, 30, "aggregation for %s" % user):
        with store.lock(30):
            if store_id:
                ledger = StoreLedger(repo, user, store_id)
                try:
                    ledger.commit_audited({}, "erase", now(), totals={},
                                          note="private data erased; committed aggregates kept")
                finally:
                    ledger.close()
            if os.path.isdir(store.dir):
                shutil.rmtree(store.dir)
                removed.append(repo.rel(store.dir))
            state = AggregationState(repo, user)
            for path in (state.path, store.changes_path):
                if os.path.exists(path):
                    os.unlink(path)
                    removed.append(repo.rel(path))
            if os.path.islink(state.parts_dir):   # which days had time: private too
                os.unlink(state.parts_dir)
                removed.append(repo.rel(state.parts_dir))
            elif os.path.isdir(state.parts_dir):
                shutil.rmtree(state.parts_dir)
                removed.append(repo.rel(state.parts_dir))
    for _, directory, _ in find_mirrors(repo, user):
        shutil.rmtree(directory)
        removed.append(directory)
    quarantine = Quarantine(repo)
    prefix = repo.rel(store.dir) + os.sep
    for item in quarantine.list():
        if (item.get("original") or "").startswith(prefix):
            quarantine.delete(item["id"])
            removed.append("quarantine %s" % item["id"])
    if queue_exists(repo):
        queue = open_queue(repo)
        queue.settle_key("aggregate:" + user, dead=True)
        queue.close()
    log_event(repo, "erase", user=user)
    return {"user": user, "store": store_id, "removed": removed}


# ############################################################################
# 14. Reports and billing
# ############################################################################
#
# Reports read the ledger (every store ref this clone knows), so they work on
# any clone that has fetched it.  A shard that fails its checksum stops the
# report with exit 65 and its name: a billing figure is never computed from a
# damaged file, and never from a partial set.

REPORT_DIMENSIONS = ("user", "issue", "project", "day", "week", "month", "store", "repo")
_GRANULARITY_RANK = {"day": 0, "week": 1, "month": 2}


def load_legacy_shards(repo, skip):
    """Shards of FlowForge 0.1's in-tree layout, for stores not in the ledger yet."""
    shards, damaged = [], []
    for path, user, store_id, month in list_shard_files(repo):
        key = store_key(user, store_id)
        if key in skip:
            continue
        try:
            shards.append(_shard_doc(read_bytes_and_stat(path, MAX_SHARD_BYTES)[0], key, month,
                                     repo.rel(path)))
        except CorruptFile as e:
            damaged.append("%s (%s)" % (repo.rel(path), e.reason))
    if damaged:
        raise FlowForgeError("%d damaged shard(s): %s; run `flowforge reconcile` on the "
                             "owner's machine or `flowforge recover assess`"
                             % (len(damaged), "; ".join(damaged[:3])), EXIT_DATA)
    return shards


def load_team_shards(repo, first=None, last=None, about=None, rows=True, summed=False):
    """Every store's shards for the months that [first, last] touches: the
    ledger, plus stores that only the in-tree 0.1 layout holds.  `about`
    collects what a report says of its data (stores, when fetched); `summed`:
    see LedgerView.shards."""
    view = LedgerView(repo, own_store_keys(repo))
    for problem in view.problems:
        raise FlowForgeError(problem, EXIT_DATA)
    for line in view.warnings:
        warn(line)
    months = (first[:7] if first else None, last[:7] if last else None)
    shards = view.shards(months, rows, summed)   # rows=False: the docs may hold only totals
    legacy = load_legacy_shards(repo, set(view.stores)) if os.path.lexists(repo.team) else []
    if legacy:
        warn("this branch still keeps time in %s/ (FlowForge 0.1): run `flowforge migrate`"
             % repo.rel(repo.team))
    fetched = last_fetch_time(repo, view.refs)
    if not view.stores and not legacy and fetched is None:
        if never_fetched(repo):
            raise FlowForgeError("this clone has never fetched the team ledger: run `flowforge "
                                 "fetch` (after `flowforge install hooks`, `git fetch` brings it "
                                 "too)", EXIT_UNAVAILABLE)
    if about is not None:
        about.update(stores=len(view.stores), fetched_at=fetched,
                     legacy_stores=len({(d["user"], d["store"]) for d in legacy}),
                     first_month=dict(view.first_month),
                     tips={k: v[1] for k, v in view.stores.items()})
    return shards + [d for d in legacy if (months[0] is None or d["month"] >= months[0])
                     and (months[1] is None or d["month"] <= months[1])]


def aggregate_own(repo):
    """Before a report, a bill, a close or a push: aggregate every private store
    in this clone (incrementally; usually nothing to do), so that time tracked
    since the last commit is in it -- the stores an import made for teammates
    too, or a close would bill their time as adjustments later.  Returns a line
    for each store that could not be; the command goes on without that
    newest time, and says so."""
    lines, took_in = [], False
    users = local_users(repo)
    tips, fetched = {}, {}
    if users:   # one git process for every store: its ref, and the fetched copies of it
        for ref, (oid, _, _) in list_ledger_refs(repo).items():
            if ref.startswith(STORES_REF):
                tips[ref[len(STORES_REF):]] = oid
            elif ref.startswith(REMOTES_REF):
                fetched.setdefault(ref.rpartition("/")[2], set()).add(oid)
    for user in users:
        try:
            store = PrivateStore(repo, user)
            aggregator = Aggregator(store, repo.config["granularity"])
            key = store_key(user, store.store_id)
            tip = tips.get(key)
            if not aggregator.settled(tip if fetched.get(key, {tip}) == {tip} else None):
                took_in |= bool(aggregator.run(False, 2.0, routine=True)["months"])
        except (FlowForgeError, OSError) as e:   # OSError: a read-only clone, say
            lines.append("the newest time of %s may be missing: it could not be aggregated "
                         "(%s); run `flowforge aggregate --all`" % (user, one_line(e)))
    if took_in and not lines:   # `health` measures the wait for aggregation from this
        record_metrics(repo, last_aggregate_success=now())
    return lines


def data_age_line(about):
    """"ledger: 12 stores, fetched 2 h ago" for the foot of a report (stderr)."""
    if about.get("fetched_at") is None:
        return ("ledger: %d store(s), this clone's own only (never fetched: `flowforge fetch` "
                "brings the team's)" % about.get("stores", 0))
    age = max(0, now() - about["fetched_at"])
    return "ledger: %d store(s), fetched %s ago" % (about.get("stores", 0), format_duration(age)
                                                     if age >= 60 else "%d s" % age)


def month_bounds(month):
    from calendar import monthrange
    year, mon = int(month[:4]), int(month[5:7])
    return "%s-01" % month, "%s-%02d" % (month, monthrange(year, mon)[1])


def period_bounds(period, granularity, month):
    """First and last day that a shard row's period covers within its month."""
    if granularity == "day":
        return period, period
    first, last = month_bounds(month)
    if granularity == "week":
        from datetime import date, timedelta
        year, week = int(period[:4]), int(period[6:])
        monday = date.fromisocalendar(year, week, 1)
        first = max(first, monday.isoformat())
        last = min(last, (monday + timedelta(days=6)).isoformat())
    return first, last


PERIOD_NAMES = ("today", "yesterday", "this-week", "last-week", "this-month", "last-month", "all")
_PERIOD_ALIASES = {"day": "today", "week": "this-week", "month": "this-month"}  # 0.1's words
_WEEK = Pattern(r"(\d{4})-W(\d{2})")


def period_range(text, today):
    """(first day, last day) of a named period, inclusive; (None, None) for all.
    `today` is the local day (YYYY-MM-DD) that relative names count from."""
    from datetime import date, timedelta
    name = _PERIOD_ALIASES.get(text, text)
    day = date.fromisoformat(today)
    if name == "all":
        return None, None
    if name in ("today", "yesterday"):
        one = (day - timedelta(days=int(name == "yesterday"))).isoformat()
        return one, one
    if name in ("this-week", "last-week"):
        monday = day - timedelta(days=day.weekday() + (7 if name == "last-week" else 0))
        return monday.isoformat(), (monday + timedelta(days=6)).isoformat()
    if name in ("this-month", "last-month"):
        return month_bounds(today[:7] if name == "this-month" else shift_month(today[:7], -1))
    if is_month(name or ""):
        return month_bounds(parse_month(name))
    m = _WEEK.fullmatch(name or "")
    if m:
        try:
            monday = date.fromisocalendar(int(m.group(1)), int(m.group(2)), 1)
            plausible_day(monday, text, "--period")
        except ValueError:
            monday = None
        if monday:
            return monday.isoformat(), (monday + timedelta(days=6)).isoformat()
    raise FlowForgeError("--period %r is not valid: use %s, YYYY-MM or YYYY-Www (ISO week, "
                         "such as 2026-W48)" % (text, ", ".join(PERIOD_NAMES)), EXIT_USAGE)


def resolve_range(period, first, last, tz, now_ts):
    """(first day, last day) of a report, inclusive, None for unbounded: a
    period's, or --from/--to (day forms, local to `tz`).  An empty range (first
    after last) is a usage error, not a report with no time."""
    if period and (first or last):
        raise FlowForgeError("use --period or --from/--to, not both", EXIT_USAGE)
    if not (first or last):
        return period_range(period or "all", local_date(now_ts, tz))
    first = parse_day(first, tz, now_ts, "--from").isoformat() if first else None
    last = parse_day(last, tz, now_ts, "--to").isoformat() if last else None
    if first and last and first > last:
        raise FlowForgeError("--from %s is after --to %s: nothing can lie between them"
                             % (first, last), EXIT_USAGE)
    return first, last


class Selection:
    """What a report or bill covers: a range of days, and the users, projects
    and issues that match the given patterns (`*` globs; none given: all)."""

    def __init__(self, first=None, last=None, users=(), projects=(), issues=()):
        self.first, self.last = first, last
        issues = [self._issue(p) for p in issues or ()]
        self.patterns = {"users": list(users or ()), "projects": list(projects or ()),
                         "issues": issues}
        self._users, self._projects, self._issues = (
            self._matcher(p) for p in (users, projects, issues))

    @staticmethod
    def _issue(pattern):
        """`#123` is issue 123, as everywhere else; globs are taken as given."""
        if any(c in pattern for c in "*?["):
            return pattern
        try:
            return parse_issue(pattern)
        except FlowForgeError:
            return pattern

    @staticmethod
    def _matcher(patterns):
        """A cached test of one value against the patterns (None: everything)."""
        if not patterns:
            return None
        import fnmatch
        regex = re.compile("|".join("(?:%s)" % fnmatch.translate(p) for p in patterns))
        seen = {}

        def test(value):
            hit = seen.get(value)
            if hit is None:
                hit = seen[value] = regex.match(value) is not None
            return hit
        return test

    @property
    def filtered(self):
        return any(self.patterns.values())

    def wants_user(self, user):
        return self._users is None or self._users(user)

    def wants_row(self, issue, project):
        return ((self._issues is None or self._issues(issue))
                and (self._projects is None or self._projects(project)))

    def describe(self):
        """"user alice, b*; project web" for titles, or ""."""
        words = {"users": "user", "projects": "project", "issues": "issue"}
        return "; ".join("%s %s" % (words[k], ", ".join(v)) for k, v in self.patterns.items() if v)


_CELL_FIELDS = ("repo", "user", "store", "month", "day", "week", "issue", "project")


def team_cells(shards, dims, first, last, selection=None):
    """{key tuple over dims: seconds} of shard rows within [first, last] that
    `selection` (if any) wants."""
    from operator import itemgetter
    finest = min((_GRANULARITY_RANK[d] for d in dims if d in _GRANULARITY_RANK), default=3)
    pick = itemgetter(*[_CELL_FIELDS.index(d) for d in dims])
    single = len(dims) == 1
    need_week = "week" in dims
    weeks = {}
    cells = {}
    wants_row = selection.wants_row if selection is not None and selection.filtered else None
    for doc in shards:
        granularity, user, store_id, month = (doc["granularity"], doc["user"], doc["store"],
                                              doc["month"])
        if selection is not None and not selection.wants_user(user):
            continue
        source = doc.get("repo")
        if _GRANULARITY_RANK[granularity] > finest:
            raise FlowForgeError("shards of %s are kept per %s: --by %s is finer than that"
                                 % (user, granularity,
                                    [d for d in dims if d in _GRANULARITY_RANK][0]), EXIT_USAGE)
        for period, issue, project, seconds in doc["rows"]:
            if wants_row is not None and not wants_row(issue, project):
                continue
            if first or last:
                p_first, p_last = period_bounds(period, granularity, month)
                if (first and p_last < first) or (last and p_first > last):
                    continue
                if (first and p_first < first) or (last and p_last > last):
                    # Counting it would bill it again in the adjacent range.
                    raise FlowForgeError(
                        "the shards of %s keep time per %s, and %s (%s to %s) crosses the "
                        "edge of %s..%s: use a range that starts and ends on %s boundaries"
                        % (user, granularity, period, p_first, p_last, first or "", last or "",
                           granularity), EXIT_USAGE)
            if granularity == "day":
                day = period
                week = None
                if need_week:
                    week = weeks.get(day)
                    if week is None:
                        week = weeks[day] = period_of(day, "week")
            else:
                day, week = None, (period if granularity == "week" else None)
            key = pick((source, user, store_id, month, day, week, issue, project))
            if single:
                key = (key,)
            cells[key] = cells.get(key, 0) + seconds
    return cells


def issue_totals(repo, issue):
    """{"total", "by_user": {user: seconds}, "last_day"} of one issue, from every
    committed shard (the team's figure, as `report` gives it; plugins report it)."""
    by_user, last_day = {}, None
    for doc in load_team_shards(repo):
        for period, row_issue, _, seconds in doc["rows"]:
            if row_issue == issue:
                by_user[doc["user"]] = by_user.get(doc["user"], 0) + seconds
                day = period_bounds(period, doc["granularity"], doc["month"])[1]
                last_day = max(last_day or day, day)
    return {"total": sum(by_user.values()), "by_user": by_user, "last_day": last_day}


def own_issue_days(repo, issue):
    """{user: {"timezone", "granularity", "days": {first day of period: seconds}}}
    of one issue, for the stores this clone writes: a developer's own time as
    the ledger holds it, which providers that write per-developer worklogs
    (Jira, GitLab) put in the tracker.  Users without time on it are absent."""
    own = own_store_keys(repo)
    out = {}
    for doc in load_team_shards(repo):
        if store_key(doc["user"], doc["store"]) not in own:
            continue
        mine = None
        for period, row_issue, _, seconds in doc["rows"]:
            if row_issue == issue:
                if mine is None:
                    mine = out.setdefault(doc["user"], {
                        "timezone": PrivateStore(repo, doc["user"]).tz_name,
                        "granularity": doc["granularity"], "days": {}})
                day = period_bounds(period, doc["granularity"], doc["month"])[0]
                mine["days"][day] = mine["days"].get(day, 0) + seconds
    return out


def decimal_hours(seconds):
    """Hours with two decimals, rounded half up, by integer arithmetic."""
    hundredths = (int(seconds) * 100 * 2 + 3600) // (2 * 3600)
    return "%d.%02d" % divmod(hundredths, 100)


def signed_hours(seconds):
    """decimal_hours of a figure that may be a credit (an adjustment)."""
    return decimal_hours(seconds) if seconds >= 0 else "-" + decimal_hours(-seconds)


def csv_safe(value):
    """Neutralise spreadsheet formulas: a cell starting with = + - @ (or tab, CR)
    is prefixed with a quote, so a project name cannot run code in Excel."""
    text = str(value)
    if text and text[0] in "=+-@\t\r":
        return "'" + text
    return text


_CSV_NUMBER = Pattern(r"-\d+(?:\.\d+)?")   # a credit (an adjustment), not a formula
_CSV_FIGURES = ("seconds", "hours", "billable_seconds", "billable_hours", "rate", "amount")


_CONTROL = Pattern("[\x00-\x1f\x7f-\x9f]")


def printable(value):
    """A cell as text with control characters (terminal escape sequences among
    them) shown as `?`: issue names and projects come from teammates' commits."""
    text = str(value)
    return text if text.isprintable() else _CONTROL.sub("?", text)   # the common case: no scan


def _printable_rows(rows):
    """Rows as lists of text fit for a terminal.  The whole table is checked
    with one join (a report can have 10^5 rows); only a table that holds a
    number or a control character is looked at row by row."""
    rows = rows if type(rows) is list else list(rows)
    try:
        if "".join(["".join(row) for row in rows]).isprintable():
            return rows
    except TypeError:   # a number among the cells
        pass
    # a whole row checked at once (all its cells are printable if their join is)
    return [cells if "".join(cells).isprintable() else [printable(c) for c in cells]
            for cells in ([str(c) for c in row] for row in rows)]


def render(fmt, headers, rows, total_row=None, title=None):
    """Render a table as table / csv / md text (HTML pages are render_page's).
    Cells are text or numbers; control characters in text are shown as `?`."""
    rows = _printable_rows(rows)
    if total_row:
        rows_all = rows + [[printable(c) for c in total_row]]
    else:
        rows_all = rows
    if fmt == "csv":
        import csv
        import io
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(headers)
        for row in rows_all:   # figures stay numbers; any text is neutralised
            writer.writerow([c if h in _CSV_FIGURES and _CSV_NUMBER.fullmatch(c) else csv_safe(c)
                             for h, c in zip(headers, row)])
        return buf.getvalue()
    if fmt == "md":
        def esc(c):
            return c.replace("|", "\\|")
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(
            " ---: " if h in _NUMERIC_HEADERS else " --- " for h in headers) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
        if total_row:
            lines.append("| " + " | ".join("**%s**" % esc(c) if c else "" for c in total_row) + " |")
        return (("## %s\n\n" % title) if title else "") + "\n".join(lines) + "\n"
    widths = [max(len(h), max(map(len, column), default=0))
              for h, column in zip(headers, zip(*rows_all) if rows_all else [()] * len(headers))]
    template = "  ".join("%%%s%ds" % ("" if h in _NUMERIC_HEADERS else "-", w)
                         for h, w in zip(headers, widths))

    def line(cells):
        return (template % tuple(cells)).rstrip()
    out = []
    if title:
        out.append(title)
    head = line(headers)
    out.append("\033[1m%s\033[0m" % head if UI.color else head)
    out.append("  ".join("-" * w for w in widths))
    out += [(template % tuple(r)).rstrip() for r in rows]   # line(), inlined for 10^5 rows
    if total_row:
        out.append("  ".join("-" * w for w in widths))
        out.append(line(rows_all[-1]))
    return "\n".join(out) + "\n"


_NUMERIC_HEADERS = ("time", "hours", "billable", "rate", "amount", "seconds")


# -- what a report reads: one repository or several ---------------------------

def read_portfolio(path):
    """The clones a portfolio file lists: one path per line (relative to the
    file), blank lines and `#` comments ignored."""
    try:
        text = read_bytes(path).decode("utf-8")
    except (OSError, UnicodeDecodeError, FlowForgeError) as e:
        why = os.strerror(e.errno).lower() if getattr(e, "errno", None) else "not UTF-8 text" \
            if isinstance(e, UnicodeDecodeError) else one_line(e)
        raise FlowForgeError("cannot read the portfolio %s: %s" % (path, why), EXIT_USAGE)
    base = os.path.dirname(os.path.abspath(path))
    paths = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()     # comments, also after a path
        if line:
            paths.append(os.path.join(base, os.path.expanduser(line)))
    if not paths:
        raise FlowForgeError("the portfolio %s lists no repository (one clone path per line)"
                             % path, EXIT_USAGE)
    return paths


def open_sources(paths):
    """[(label, Repo)] for the repositories a report or bill reads.  Every
    repository that is missing, not set up or has never fetched its ledger is
    named, all at once (exit 69): a total that silently left one out would be
    a wrong invoice."""
    found, problems = [], []
    for path in paths:
        try:
            repo = Repo.find(path).require()
            repo._config = load_config(repo.config_path)
            if never_fetched(repo):   # its own stores at most: a partial total
                raise FlowForgeError("has never fetched its ledger: run `flowforge -C %s fetch`"
                                     % path)
            if any(os.path.realpath(r.root) == os.path.realpath(repo.root) for _, r in found):
                raise FlowForgeError("%s is named twice (as %s)" % (path, repo.root), EXIT_USAGE)
            ident = repo_identity(repo)
            same = [r.root for _, r in found if ident and repo_identity(r) == ident]
            if same:   # both ledgers hold the team's stores: a total of both counts them twice
                raise FlowForgeError(
                    "%s is named twice: %s is a clone of the same repository (repo_id %s in "
                    ".flowforge/config.json) and holds the same stores; name one clone"
                    % (same[0], repo.root, ident), EXIT_USAGE)
            found.append((None, repo))
        except FlowForgeError as e:
            if e.exit_code == EXIT_USAGE and "named twice" in str(e):
                raise
            problems.append("%s %s" % (path, str(e).replace("%s " % path, "", 1)
                                       if str(e).startswith(path) else "(%s)" % e))
    if problems:
        raise FlowForgeError("cannot read %d of %d repositories: %s" % (
            len(problems), len(paths), "; ".join(problems)), EXIT_UNAVAILABLE)
    names = [os.path.basename(r.root) for _, r in found]
    return [(name if names.count(name) == 1 else "%s/%s" % (
        os.path.basename(os.path.dirname(r.root)), name), r) for name, (_, r) in zip(names, found)]


def store_labels(first_months):
    """{store id: readable label} from {store key: first month with time}:
    "alice, since 2026-03" -- the user and when the store began, never the
    machine; two stores of one user that began together get their ids."""
    seen, labels = {}, {}
    for key, month in first_months.items():
        user, store_id = parse_store_key(key)
        seen.setdefault((user, month), []).append(store_id)
    for (user, month), ids in seen.items():
        for store_id in ids:
            labels[store_id] = "%s, since %s%s" % (user, month,
                                                  " (%s)" % store_id[:6] if len(ids) > 1 else "")
    return labels


def load_sources(sources, first, last, rows=True, summed=False):
    """(shards of every source, each with its "repo" label; {label: about})."""
    shards, about = [], {}
    for label, repo in sources:
        seen = {}
        for doc in load_team_shards(repo, first, last, seen, rows, summed):
            doc["repo"] = label
            shards.append(doc)
        about[label] = seen
    return shards, about


def ledger_about(about):
    """What a report says of its data: one repository's figures as before,
    with several, each repository's too."""
    merged = {"stores": 0, "legacy_stores": 0, "fetched_at": None}
    for seen in about.values():
        merged["stores"] += seen.get("stores", 0)
        merged["legacy_stores"] += seen.get("legacy_stores", 0)
        if seen.get("fetched_at") is not None:
            merged["fetched_at"] = min(merged["fetched_at"] or seen["fetched_at"],
                                       seen["fetched_at"])
    if len(about) > 1:
        merged["repos"] = {label: {k: v for k, v in seen.items() if k not in ("first_month", "tips")}
                           for label, seen in about.items()}
    return merged


def _finest_period(shards):
    coarsest = max((_GRANULARITY_RANK[s["granularity"]] for s in shards), default=0)
    return ("day", "week", "month")[coarsest]


_TOTALS_DIMS = ({"repo", "user", "store", "month", "issue"}, {"repo", "user", "store", "month",
                                                              "project"})


def totals_suffice(dims, selection):
    """Whether each shard's verified totals (by issue, by project) give this
    report: no finer period than a month, whole months, no issue or project
    filter.  Then the rows -- most of the bytes -- are never decoded."""
    first, last = selection.first, selection.last
    return (any(set(dims) <= allowed for allowed in _TOTALS_DIMS)
            and not selection.patterns["issues"] and not selection.patterns["projects"]
            and (first is None or first.endswith("-01"))
            and (last is None or last == month_bounds(last[:7])[1]))


def totals_cells(shards, dims, selection):
    """team_cells from the shards' totals: {key over dims: seconds}."""
    from itertools import repeat
    kind = "issue" if "issue" in dims else "project"
    table = "by_issue" if kind == "issue" else "by_project"
    at = dims.index(kind) if kind in dims else None
    cells = {}
    for doc in shards:
        if not selection.wants_user(doc["user"]):
            continue
        fields = {"repo": doc.get("repo"), "user": doc["user"], "store": doc["store"],
                  "month": doc["month"]}
        if at is None:   # no issue or project column: the shard's total
            key = tuple(fields[d] for d in dims)
            cells[key] = cells.get(key, 0) + sum(doc[table].values())
            continue
        before = tuple(fields[d] for d in dims[:at])
        after = tuple(fields[d] for d in dims[at + 1:])
        names = doc[table]
        if len(before) == 1 and not after:   # by user,issue and the like: keys made in C
            keys = zip(repeat(before[0]), names)
        else:
            keys = [before + (name,) + after for name in names]
        mine = dict(zip(keys, names.values()))
        if cells.keys().isdisjoint(mine):   # the common case: no other store has these keys
            cells.update(mine)
            continue
        for key, seconds in mine.items():
            cells[key] = cells.get(key, 0) + seconds
    return {k: v for k, v in cells.items() if v} if 0 in cells.values() else cells


def sorted_keys(keys):
    """Tuples of text in tuple order.  Sorted by their elements joined with NUL,
    the order of the tuples when no element holds a NUL (the lowest character),
    because comparing tuples element by element is what made sorting a
    report's 10^5 rows slow (0.2 s, against 0.07 s)."""
    keys = list(keys)
    try:
        if "\0" in "".join(map("".join, keys)):
            return sorted(keys)
    except TypeError:   # an element that is not text
        return sorted(keys)
    return sorted(keys, key="\0".join)


def build_report(sources, dims, selection, views=False, documents=True):
    """The report document; with `views`, also the figures the HTML page draws
    (per period and user, per issue, per project), from the same shards.

    Its `table` is what the renderers read: one tuple per row, (the values of
    `dims`, the seconds, the decimal hours) and, by store, the store's label
    and user.  `rows`, the same as objects for the JSON document, are
    built only with `documents`: a report of 10^5 rows printed as a table
    spends a fifth of its time on them otherwise."""
    first, last = selection.first, selection.last
    by_totals = not views and totals_suffice(dims, selection)
    # over all history, by anything but month: one document per store will do
    summed = by_totals and first is None and last is None and "month" not in dims
    shards, about = load_sources(sources, first, last, rows=not by_totals, summed=summed)
    cells = totals_cells(shards, dims, selection) if by_totals else \
        team_cells(shards, dims, first, last, selection)
    keys = sorted_keys(cells)
    hours = decimal_hours
    names = tuple(dims) + ("seconds", "hours")
    if "store" in dims:
        labels = {}
        for seen in about.values():
            labels.update(store_labels(seen.get("first_month", {})))
        owners = {doc["store"]: doc["user"] for doc in shards}
        at = dims.index("store")
        user = dims.index("user") if "user" in dims else None
        table = [(key, cells[key], hours(cells[key]), labels.get(key[at], key[at]),
                  owners.get(key[at], "") if user is None else key[user]) for key in keys]
        names += ("store_label", "user")
    else:
        seconds = list(map(cells.__getitem__, keys))
        table = list(zip(keys, seconds, map(hours, seconds)))
    total = sum(cells.values())
    report = {"schema": "flowforge.report/1", "from": first, "to": last, "by": list(dims),
              "filters": selection.patterns, "table": table,
              "rows": [dict(zip(names, row[0] + row[1:])) for row in table] if documents else None,
              "total_seconds": total, "total_hours": decimal_hours(total),
              "ledger": ledger_about(about), "repos": [label for label, _ in sources]}
    if views:
        period = _finest_period(shards)
        report["views"] = {
            "period": period,
            "by_period_user": sorted([p, u, s] for (p, u), s in team_cells(
                shards, [period, "user"], first, last, selection).items()),
            "by_issue": sorted([i, s] for (i,), s in team_cells(
                shards, ["issue"], first, last, selection).items()),
            "by_project": sorted([p, s] for (p,), s in team_cells(
                shards, ["project"], first, last, selection).items())}
    return report


def range_text(first, last):
    """A report's days in words, for titles."""
    if first and last:
        if first[:7] == last[:7] and (first, last) == month_bounds(first[:7]):
            return first[:7]
        return "%s to %s" % (first, last)
    return "since %s" % first if first else "up to %s" % last if last else "all time"


def report_columns(report, exact=False):
    """(headers, rows) of a report's table: `store` shows the user and the
    store's label; then each row's time (`exact`: integer seconds) and decimal
    hours."""
    dims = report["by"]
    headers = []
    for d in dims:
        headers += (["user"] if "user" not in dims else []) + ["store", "store_id"] \
            if d == "store" else [d]
    headers += ["seconds", "hours"] if exact else ["time", "hours"]
    figure = str if exact else format_hours
    if "store" not in dims:   # the common case: rows stay tuples
        return headers, [key + (figure(seconds), hours) for key, seconds, hours in report["table"]]
    rows = []
    for key, seconds, hours, label, user in report["table"]:
        cells = ()
        for at, d in enumerate(dims):
            cells += ((() if "user" in dims else (user,)) + (label, key[at])
                      if d == "store" else (key[at],))
        rows.append(cells + (figure(seconds), hours))
    return headers, rows


def render_report(report, fmt):
    """A report as table / md / csv (the page is render_page's)."""
    span = range_text(report["from"], report["to"])
    if fmt == "csv":   # for accountants: exact seconds, decimal hours, stable columns
        return render(fmt, *report_columns(report, exact=True))
    headers, rows = report_columns(report)
    if fmt == "table" and not rows:
        return "no tracked time in %s%s\n" % (span, _filter_words(report))
    total = ["total"] + [""] * (len(headers) - 3) + [format_hours(report["total_seconds"]),
                                                     report["total_hours"]]
    return render(fmt, headers, rows, total, "Tracked time, %s%s" % (span, _filter_words(report)))


def _filter_words(doc):
    words = Selection(**{k: v for k, v in doc.get("filters", {}).items()}).describe() \
        if doc.get("filters") else ""
    return " (%s)" % words if words else ""


def round_seconds(seconds, increment, mode):
    if not increment or not seconds:
        return seconds
    if mode == "up":
        return -(-seconds // increment) * increment
    if mode == "down":
        return seconds // increment * increment
    return (seconds + increment // 2) // increment * increment  # nearest, half up


def rate_for(billing, user, project):
    """The hourly rate: user/project, else project, else user, else default."""
    for table, key in (("user_project_rates", "%s/%s" % (user, project)),
                       ("project_rates", project), ("user_rates", user)):
        if key in billing[table]:
            return billing[table][key]
    return billing["default_rate"]


def money(value):
    """A Decimal rounded to the cent, half up."""
    from decimal import Decimal, ROUND_HALF_UP
    return Decimal(value).quantize(Decimal("0.01"), ROUND_HALF_UP)


def bill_lines(shards, billing, first, last, selection, by_issue, warn_rates=True, known=None):
    """{(project, user[, issue]): line} of one repository's shards, priced
    with its billing rules.  Rounding (billing.round_minutes, round_mode)
    applies to each line, or with round_scope "day" to each user x project x
    issue x period cell before the line sums them."""
    from decimal import Decimal
    increment = billing["round_minutes"] * 60
    mode, scope = billing["round_mode"], billing["round_scope"]
    cells = team_cells(shards, ["project", "user", "issue", _finest_period(shards)], first, last,
                       selection)
    sums = {}
    for (project, user, issue, _), seconds in cells.items():
        line = sums.setdefault((project, user, issue) if by_issue else (project, user), [0, 0])
        line[0] += seconds
        line[1] += round_seconds(seconds, increment, mode) if scope == "day" else 0
    if warn_rates:   # a typo that bills the default: a near name, or a user nobody knows
        for table, key, guess in unmatched_rates(billing, {k[1] for k in sums},
                                                 {k[0] for k in sums},
                                                 {"%s/%s" % (k[1], k[0]) for k in sums}):
            if guess or (table == "user_rates" and key not in (known or ())):
                warn(rate_warning(table, key, guess, "this bill"))
    lines = {}
    for key, (seconds, billable) in sums.items():
        if scope == "line":
            billable = round_seconds(seconds, increment, mode)
        rate = Decimal(str(rate_for(billing, key[1], key[0])))
        lines[key] = {"seconds": seconds, "billable_seconds": billable,
                      "rate": rate_text(rate), "amount": str(money(billable * rate / 3600))}
    return lines


def rate_text(rate):
    """A rate as it is applied: cents, or every decimal it has (95.555)."""
    return str(money(rate)) if money(rate) == rate else str(rate.normalize())


def line_docs(lines, dims, prefix=()):
    """Bill lines as documents (hours beside the exact seconds), sorted."""
    out = []
    for key in sorted(lines):
        line = lines[key]
        out.append(dict(zip(dims, prefix + key), seconds=line["seconds"],
                        billable_seconds=line["billable_seconds"],
                        hours=signed_hours(line["seconds"]),
                        billable_hours=signed_hours(line["billable_seconds"]),
                        rate=line["rate"], amount=line["amount"]))
    return out


def sum_lines(lines):
    """(seconds, billable seconds, amount as a Decimal) of line documents."""
    from decimal import Decimal
    return (sum(line["seconds"] for line in lines),
            sum(line["billable_seconds"] for line in lines),
            sum((Decimal(line["amount"]) for line in lines), Decimal(0)))


# -- closed periods: an invoiced month's figures never change silently --------
#
# `flowforge close 2026-11` commits the month's bill (per line, per store, and
# the ledger tips it came from) to refs/flowforge/periods/2026-11, authored by
# the closer's git identity; `reopen` commits on top of it.  Time recorded
# later into a closed month stays recorded (TIME = MONEY); bills show it as
# "adjustments after close": on the closed month's own bill, and billed on the
# next open month's, whose close then records what it carried, so that each
# adjustment is billed exactly once.

PERIOD_SCHEMA = 1
MAX_PERIOD_BYTES = 8 << 20
_AMOUNT = Pattern(r"-?\d{1,15}\.\d{2}")
_RATE_TEXT = Pattern(r"\d{1,15}(?:\.\d{1,4})?")


def _valid_lines(lines):
    """Line documents as a close records them (from a teammate's commit: checked)."""
    def number(v):
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(lines, list) and all(
        isinstance(line, dict) and number(line.get("seconds")) and number(line.get("billable_seconds"))
        and isinstance(line.get("project"), str) and isinstance(line.get("user"), str)
        and isinstance(line.get("issue", ""), str)
        and isinstance(line.get("rate"), str) and _RATE_TEXT.fullmatch(line["rate"])
        and isinstance(line.get("amount"), str) and _AMOUNT.fullmatch(line["amount"])
        for line in lines)


def _valid_period(doc, month):
    if not (isinstance(doc, dict) and doc.get("kind") == "flowforge-period"
            and doc.get("month") == month and doc.get("state") in ("closed", "open")
            and isinstance(doc.get("by"), str) and isinstance(doc.get("at"), int)):
        return False
    if doc["state"] == "open":
        return True
    carried = doc.get("carried")
    return (_valid_lines(doc.get("lines")) and _valid_lines(doc.get("lines_by_issue"))
            and isinstance(carried, dict) and all(
                is_month(m) and isinstance(c, dict) and _valid_lines(c.get("lines"))
                and _valid_lines(c.get("lines_by_issue")) for m, c in carried.items()))


def period_records(repo, refs=None):
    """({month: newest record (a close or a reopen)}, warnings), from the
    records made here and those fetched: the copy that extends the others
    wins; of two that diverged (two people closed one month in two clones),
    the one made here, with a warning."""
    refs = list_ledger_refs(repo) if refs is None else refs
    copies = {}
    for ref, (oid, kind, _) in refs.items():
        if ref.startswith(PERIODS_REF):
            month, local = ref[len(PERIODS_REF):], True
        elif ref.startswith(INCOMING_REF) and "/periods/" in ref:
            remote, _, month = ref[len(INCOMING_REF):].partition("/periods/")
            if "/" in remote:
                continue
            local = False
        else:
            continue
        if kind == "commit" and is_month(month):
            copies.setdefault(month, []).append((local, ref, oid))
    chosen, warnings = {}, []
    for month, found in sorted(copies.items()):
        found.sort(key=lambda c: not c[0])   # the record made here first
        best = found[0]
        for candidate in found[1:]:
            if candidate[2] == best[2] or is_ancestor(repo, candidate[2], best[2]):
                continue
            if is_ancestor(repo, best[2], candidate[2]):
                best = candidate
            else:
                warnings.append("%s and %s are two different closes of %s: reading %s; reopen "
                                "and close it again to settle it" % (best[1], candidate[1], month,
                                                                     best[1]))
        chosen[month] = best
    records = {}
    if chosen:
        objects = GitObjects(repo.root)
        authors = _period_authors(repo, [c[2] for c in chosen.values()])   # one git log for all
        try:
            for month, (_, ref, oid) in chosen.items():
                doc, problem = _period_record(repo, objects, month, oid, authors)
                if problem:
                    # The latest believable record in its history: by the time it was
                    # made, not by its place, since a forged merge could put an older
                    # reopen or close first.
                    warnings.append("ignoring %s (%s): %s" % (ref, oid[:12], problem))
                    _, older, _ = run_git(["rev-list", "--max-count=200", oid], repo.root,
                                          check=False)
                    candidates = [_period_record(repo, objects, month, c)[0]
                                  for c in older.split()[1:]]
                    believed = [c for c in candidates if c]
                    doc = max(believed, key=lambda c: c["at"]) if believed else None
                if doc:
                    records[month] = doc
        finally:
            objects.close()
    return records, warnings


def _period_record(repo, objects, month, oid, authors=None):
    """(record, None) of one period commit, or (None, why it is not believed)."""
    [found] = objects.get(["%s:close.json" % oid], MAX_PERIOD_BYTES)
    try:
        doc = load_json(found[1]) if found and found[0] == "blob" else None
    except (ValueError, RecursionError):
        doc = None
    if not _valid_period(doc, month):
        return None, "not a FlowForge period record"
    if not authors or oid not in authors:
        authors = _period_authors(repo, [oid])
    ident, email, signature = authors.get(oid, ("", "", "N"))
    problem = _period_refusal(doc, month, ident, email, signature, repo.config["billing"])
    if problem:
        return None, problem
    doc["commit"], doc["signature"] = oid, signature
    return doc, None


def _period_authors(repo, commits):
    """{commit: ("Name <e-mail>", e-mail, git's signature check %G?)}."""
    rc, out, _ = run_git(["log", "--no-walk=unsorted", "--format=%H%x00%an <%ae>%x00%ae%x00%G?"]
                         + commits, repo.root, check=False)
    found = {}
    for line in out.splitlines() if rc == 0 else []:
        parts = line.split("\0")
        if len(parts) == 4:
            found[parts[0]] = tuple(parts[1:])
    return found


def _period_refusal(doc, month, ident, email, signature, billing):
    """Why a period record is not to be believed, or None.  Anyone who can push
    can write one: its author must be the commit's, a close must come after the
    month ended, and billing.closers / signed_closes narrow who may close."""
    if doc["by"] != ident:
        return "it says it was made by %s, but its commit is by %s" % (doc["by"], ident or "?")
    if doc["at"] > now() + 86400:
        return "it is dated %s, in the future" % utc_text(doc["at"])[:10]
    if doc["state"] == "closed" and doc["at"] < local_instant_utc(
            shift_month(month, 1) + "-01") - 14 * 3600:     # the month's end anywhere on earth
        return "a close of %s dated before the month ended" % month
    closers = billing.get("closers") or []
    if closers and email.lower() not in {c.lower() for c in closers}:
        return "%s is not in billing.closers" % email
    if billing.get("signed_closes") and signature not in ("G", "U"):
        return "its commit has no good signature (billing.signed_closes; git says %r)" % signature
    return None


def local_instant_utc(day):
    """The UTC timestamp of 00:00 UTC on `day` (YYYY-MM-DD)."""
    from calendar import timegm
    return timegm((int(day[:4]), int(day[5:7]), int(day[8:10]), 0, 0, 0))


def closed_months(repo):
    """{month: {"closed_by", "closed_at", "commit"}} of the months closed now."""
    return {m: {"closed_by": r["by"], "closed_at": r["at"], "commit": r["commit"]}
            for m, r in period_records(repo)[0].items() if r["state"] == "closed"}


def next_open_month(month, records):
    """The first month after `month` that is not closed: its bill carries
    the adjustments made to `month` after its close."""
    while True:
        month = shift_month(month, 1)
        if records.get(month, {}).get("state") != "closed":
            return month


def _line_key(line, dims):
    return tuple(line.get(d, "") for d in dims)


def select_lines(docs, selection):
    """The line documents a filtered bill shows."""
    if selection is None or not selection.filtered:
        return list(docs)
    return [d for d in docs if selection.wants_user(d["user"])
            and selection.wants_row(d.get("issue", "*"), d["project"])]


def adjustment_lines(now, closed_docs, dims, carried=()):
    """{key: line} of what changed since a close: the figures now, less those
    closed, less what later bills already carried.  A line that existed at
    the close keeps its closed rate: a rate changed since then is not billed
    backwards."""
    from decimal import Decimal
    closed = {_line_key(d, dims): d for d in closed_docs}
    out = {}
    for key in set(now) | set(closed):
        new, old = now.get(key), closed.get(key)
        billable = new["billable_seconds"] if new else 0
        if old:
            rate = old["rate"]
            amount = money(Decimal(billable) * Decimal(rate) / 3600) - Decimal(old["amount"])
        else:
            rate, amount = new["rate"], Decimal(new["amount"])
        seconds = (new["seconds"] if new else 0) - (old["seconds"] if old else 0)
        billable -= old["billable_seconds"] if old else 0
        for docs in carried:
            for d in docs:
                if _line_key(d, dims) == key:
                    seconds -= d["seconds"]
                    billable -= d["billable_seconds"]
                    amount -= Decimal(d["amount"])
        if seconds or billable or amount:
            out[key] = {"seconds": seconds, "billable_seconds": billable, "rate": rate,
                        "amount": str(money(amount))}
    return out


def closed_billing(billing, record):
    """The billing rules a closed month was billed with: its rounding (rates
    are in its lines), whatever config.json says today."""
    rounding = record.get("rounding") if record else None
    if not isinstance(rounding, dict):
        return billing
    return dict(billing, round_minutes=rounding.get("minutes", billing["round_minutes"]),
                round_mode=rounding.get("mode", billing["round_mode"]),
                round_scope=rounding.get("scope", billing["round_scope"]))


def month_lines(repo, month, by_issue, selection=None, shards=None, record=None):
    """{key: line} of one repository's month as billed now (with the rounding
    of its close, if it has one)."""
    first, last = month_bounds(month)
    if shards is None:
        shards = load_team_shards(repo, first, last)
    return bill_lines(shards, closed_billing(repo.config["billing"], record), first, last,
                      selection, by_issue, warn_rates=False)


def carried_later(records, month, variant, selection=None):
    """The adjustments of `month` that later closes already billed."""
    return [select_lines(records[k]["carried"].get(month, {}).get(variant, []), selection)
            for k in sorted(records) if k > month and records[k]["state"] == "closed"]


def pending_adjustments(repo, month, records, by_issue, selection=None):
    """[(closed month, {key: line})] that the bill of open `month` carries:
    for each closed month whose next open month this is, what changed since
    its close and no later close carried yet."""
    dims = ["project", "user"] + (["issue"] if by_issue else [])
    variant = "lines_by_issue" if by_issue else "lines"
    out = []
    for closed in sorted(m for m, r in records.items() if r["state"] == "closed" and m < month):
        if next_open_month(closed, records) != month:
            continue
        between = [records[k]["carried"].get(closed, {}).get(variant, [])
                   for k in sorted(records) if closed < k < month
                   and records[k]["state"] == "closed"]
        lines = adjustment_lines(month_lines(repo, closed, by_issue, selection,
                                             record=records[closed]),
                                 select_lines(records[closed][variant], selection), dims,
                                 [select_lines(c, selection) for c in between])
        if lines:
            out.append((closed, lines))
    return out


def build_bill(sources, selection, by_issue, month=None, invoice=True):
    """The bill of `selection` across `sources`.  For a whole `month`: a closed
    month bills its closed lines, with what changed since as adjustments
    (billed on the next open month); an open month bills its lines and the
    adjustments it carries."""
    first, last = selection.first, selection.last
    several = len(sources) > 1
    key_dims = ["project", "user"] + (["issue"] if by_issue else [])
    dims = (["repo"] if several else []) + key_dims
    variant = "lines_by_issue" if by_issue else "lines"
    currencies = {repo.config["billing"]["currency"] for _, repo in sources}
    if len(currencies) > 1:
        raise FlowForgeError("these repositories bill in different currencies (%s): bill them "
                             "separately" % ", ".join("%s %s" % (label, repo.config["billing"][
                                 "currency"]) for label, repo in sources), EXIT_CONFIG)
    lines, adjustments, closes, about = [], [], [], {}
    for label, repo in sources:
        shards, seen = load_sources([(label, repo)], first, last)
        about.update(seen)
        prefix = (label,) if several else ()
        records, warnings = period_records(repo) if month or first or last else ({}, [])
        for line in warnings:
            warn(line)
        record = records.get(month) if month else None
        if record and record["state"] == "closed":
            now_lines = bill_lines(shards, closed_billing(repo.config["billing"], record), first,
                                   last, selection, by_issue, warn_rates=False)
            closed = select_lines(record[variant], selection)
            lines += [dict(d, repo=label) if several else dict(d) for d in closed]
            # what this invoice carried from earlier closed months, as it was closed
            for earlier, carried in sorted(record["carried"].items()):
                docs = select_lines(carried[variant], selection)
                if docs:
                    adjustments.append(_adjustment_group(
                        earlier, records.get(earlier) or record,
                        {_line_key(d, key_dims): d for d in docs}, dims, prefix,
                        billed_here=True, billed_on=month))
            later = carried_later(records, month, variant, selection)
            pending = adjustment_lines(now_lines, closed, key_dims, later)
            already = sum((sum_lines(c)[2] for c in later), money(0))
            if pending or already:
                adjustments.append(_adjustment_group(
                    month, record, pending, dims, prefix, billed_here=False,
                    billed_on=next_open_month(month, records), already_billed=already))
            missing = sorted(set(record.get("stores", {})) - set(seen[label].get("tips", {})))
            if missing:
                warn("%s was closed with store(s) %s that the ledger here no longer has (deleted "
                     "on the remote, or not fetched): their time shows as a credit; run `flowforge "
                     "fetch` and `flowforge recover assess`" % (month, ", ".join(missing)))
            closes.append({"repo": label, "month": month, "by": record["by"], "at": record["at"],
                           "commit": record["commit"], "rounding": record.get("rounding"),
                           "invoice": record.get("invoice")})
            continue
        now_lines = bill_lines(shards, repo.config["billing"], first, last, selection, by_issue,
                               known=known_users(repo))
        lines += line_docs(now_lines, dims, prefix)
        if month:
            for closed, change in pending_adjustments(repo, month, records, by_issue, selection):
                adjustments.append(_adjustment_group(closed, records[closed], change, dims, prefix,
                                                     billed_here=True, billed_on=month))
        elif first or last:
            touched = [m for m, r in records.items() if r["state"] == "closed"
                       and (not first or m >= first[:7]) and (not last or m <= last[:7])]
            if touched:
                warn("%s covers closed month(s) %s: these are today's figures, not the invoiced "
                     "ones; `flowforge bill --month %s` shows the invoice and its adjustments"
                     % (range_text(first, last), ", ".join(sorted(touched)), sorted(touched)[0]))
    lines.sort(key=lambda d: _line_key(d, dims))
    seconds, billable, amount = sum_lines(lines)
    billed = sum((sum_lines(g["lines"])[2] for g in adjustments if g["billed_here"]), money(0))
    billing = sources[0][1].config["billing"]
    rounding = [repo.config["billing"] for _, repo in sources]
    bill = {"schema": "flowforge.bill/1", "from": first, "to": last, "month": month,
            "currency": currencies.pop(), "by": dims,
            "rounding": {"minutes": billing["round_minutes"], "mode": billing["round_mode"],
                         "scope": billing["round_scope"]},
            "filters": selection.patterns, "lines": lines, "total_seconds": seconds,
            "total_billable_seconds": billable, "lines_amount": str(money(amount)),
            "adjustments": adjustments, "adjustments_amount": str(money(billed)),
            "total_amount": str(money(amount + billed)), "closed": closes,
            "ledger": ledger_about(about), "repos": [label for label, _ in sources]}
    if any(r["round_minutes"] != billing["round_minutes"] or r["round_mode"] != billing[
            "round_mode"] or r["round_scope"] != billing["round_scope"] for r in rounding):
        bill["rounding"]["per_repo"] = {label: {"minutes": r["round_minutes"], "mode": r[
            "round_mode"], "scope": r["round_scope"]} for (label, _), r in zip(sources, rounding)}
    if len(closes) == len(sources) and closes and closes[0].get("rounding"):
        bill["rounding"] = dict(closes[0]["rounding"])    # as closed, not as configured now
    if invoice:
        whole = closes and len(closes) == len(sources)   # closed in every repository
        frozen = closes[0].get("invoice") if whole else None
        bill["invoice"] = frozen if isinstance(frozen, dict) else billing.get("invoice", {})
        bill["issued"] = closes[0]["at"] if whole else None
        rate = bill["invoice"].get("tax_rate")
        if isinstance(rate, str) and is_rate(rate):   # percent, on the total
            from decimal import Decimal
            tax = money(Decimal(bill["total_amount"]) * Decimal(rate) / 100)
            bill["tax"] = {"label": bill["invoice"].get("tax_label", "VAT"), "rate": rate,
                           "amount": str(tax), "total": str(money(Decimal(bill["total_amount"])
                                                                   + tax))}
    return bill


def _adjustment_group(month, record, change, dims, prefix, billed_here, billed_on,
                      already_billed=None):
    """One closed month's adjustments on a bill: `change` {key: line} not yet
    billed (billed here, or on `billed_on`); `already_billed` what later
    closes carried of it."""
    docs = line_docs(change, dims, prefix)
    seconds, billable, amount = sum_lines(docs)
    return {"month": month, "closed_by": record["by"], "closed_at": record["at"],
            "lines": docs, "seconds": seconds, "billable_seconds": billable,
            "amount": str(money(amount)), "billed_here": billed_here, "billed_on": billed_on,
            "already_billed": str(money(already_billed or 0))}


def rounding_text(rounding):
    if rounding.get("per_repo"):
        return "rounding per repository (%s)" % "; ".join(
            "%s: %s" % (label, rounding_text(r)) for label, r in sorted(rounding["per_repo"].items()))
    if not rounding["minutes"]:
        return "exact seconds, no rounding"
    return "rounded %s to %d min per %s" % (rounding["mode"], rounding["minutes"],
                                            "line" if rounding["scope"] == "line"
                                            else "user, issue and day")


def bill_title(bill):
    span = range_text(bill["from"], bill["to"])
    words = ["Bill %s" % span]
    if bill.get("period") == "last-month":
        words.append("(the last complete month)")
    closed = bill["closed"]
    if closed and len(closed) == len(bill["repos"]) == 1:
        words.append("(closed %s by %s)" % (utc_text(closed[0]["at"])[:10], closed[0]["by"]))
    elif closed:
        shut = [c["repo"] for c in closed]
        words.append("(closed in %s; open in %s)" % (", ".join(shut), ", ".join(
            r for r in bill["repos"] if r not in shut) or "none"))
    return "%s, %s, %s%s" % (" ".join(words), bill["currency"], rounding_text(bill["rounding"]),
                             _filter_words(bill))


BILL_CSV_COLUMNS = ("kind", "month", "in_total", "seconds", "hours", "billable_seconds",
                    "billable_hours", "rate", "amount", "currency")


def bill_csv_rows(bill):
    """(headers, rows) of the accountants' export: one row per line and per
    adjustment line, exact seconds and decimal hours, the currency on each;
    `in_total` says whether the row is part of this bill's total (an
    adjustment of a closed month's own bill is billed on a later one)."""
    dims = bill["by"]
    month = bill.get("month") or ""
    rows = []
    for kind, adjusted, billed, docs in ([("line", month, True, bill["lines"])]
                                         + [("adjustment", g["month"], g["billed_here"], g["lines"])
                                            for g in bill["adjustments"]]):
        for d in docs:
            rows.append([d.get(k, "") for k in dims] + [
                kind, adjusted, "yes" if billed else "no", str(d["seconds"]),
                signed_hours(d["seconds"]), str(d["billable_seconds"]),
                signed_hours(d["billable_seconds"]), d["rate"], d["amount"], bill["currency"]])
    return list(dims) + list(BILL_CSV_COLUMNS), rows


def render_bill(bill, fmt):
    """A bill as table / md / csv (the invoice page is render_page's)."""
    dims = bill["by"]
    if fmt == "csv":
        headers, rows = bill_csv_rows(bill)
        return render(fmt, headers, rows)
    if fmt == "table" and not bill["lines"] and not bill["adjustments"]:
        return "nothing to bill in %s%s\n" % (range_text(bill["from"], bill["to"]),
                                              _filter_words(bill))
    headers = list(dims) + ["hours", "billable", "rate", "amount"]

    def rows_of(docs):
        return [[d[k] for k in dims] + [signed_hours(d["seconds"]),
                                        signed_hours(d["billable_seconds"]), d["rate"], d["amount"]]
                for d in docs]
    blank = [""] * (len(dims) - 1)
    total = (["total"] + blank + [decimal_hours(bill["total_seconds"]),
                                  decimal_hours(bill["total_billable_seconds"]), "",
                                  "%s %s" % (bill["total_amount"], bill["currency"])])
    if not bill["adjustments"]:
        return render(fmt, headers, rows_of(bill["lines"]), total, bill_title(bill))
    out = [render(fmt, headers, rows_of(bill["lines"]),
                  ["lines"] + blank + [decimal_hours(bill["total_seconds"]),
                                       decimal_hours(bill["total_billable_seconds"]), "",
                                       bill["lines_amount"]], bill_title(bill))]
    for group in bill["adjustments"]:
        title = "Adjustments after close of %s (closed %s by %s): %s" % (
            group["month"], utc_text(group["closed_at"])[:10], group["closed_by"],
            "billed on this bill" if group["billed_here"] else
            "%s%s" % ("nothing pending" if not group["lines"] else
                      "billed on the bill of %s, not in this total" % group["billed_on"],
                      "; %s %s already billed on later bills" % (
                          group["already_billed"], bill["currency"])
                      if group["already_billed"] != "0.00" else ""))
        if not group["lines"]:
            out.append(title + ("\n" if fmt == "table" else "\n\n"))
            continue
        out.append(render(fmt, headers, rows_of(group["lines"]),
                          ["adjustments"] + blank + [signed_hours(group["seconds"]),
                                                     signed_hours(group["billable_seconds"]), "",
                                                     group["amount"]], title))
    out.append("Total %s %s\n" % (bill["total_amount"], bill["currency"]) if fmt == "table"
               else "**Total %s %s**\n" % (bill["total_amount"], bill["currency"]))
    return "\n".join(out)


def git_identity(repo):
    """"Name <e-mail>" of git's user here, which closes and reopens are signed by."""
    rc, out, _ = run_git(["var", "GIT_COMMITTER_IDENT"], repo.root, check=False,
                         env={"GIT_CONFIG_PARAMETERS": "'user.useconfigonly=true'"})
    m = re.fullmatch(r"(.+?) <([^<>]+)> \d+ [+-]\d{4}", out.strip()) if rc == 0 else None
    name, email = m.groups() if m else (None, None)
    if not name or not email:
        raise FlowForgeError("a close is signed by who made it: set `git config user.name` and "
                             "`git config user.email` first", EXIT_CONFIG)
    return name, email


def commit_period(repo, month, doc, parent, identity, message):
    """Commit one period record on top of `parent`; returns the commit id."""
    hash_name = object_format(repo)
    data = canonical_bytes(doc)
    tree = write_objects(repo, [("blob", data), ("tree", tree_object(
        {"close.json": ("100644", object_id("blob", data, hash_name))}))], hash_name)[1]
    env = {"GIT_AUTHOR_NAME": identity[0], "GIT_AUTHOR_EMAIL": identity[1],
           "GIT_COMMITTER_NAME": identity[0], "GIT_COMMITTER_EMAIL": identity[1]}
    sign = ["-S"] if git_config_get(repo.root, "commit.gpgsign") == "true" else []
    _, commit, _ = run_git(_GIT_DURABLE + ["commit-tree", tree] + (["-p", parent] if parent else [])
                           + sign + ["-m", message], repo.root, env=env)
    local = list_ledger_refs(repo).get(PERIODS_REF + month)
    update_refs(repo, [(PERIODS_REF + month, commit.strip(), local[0] if local else "")], message)
    return commit.strip()


def close_month(repo, month, reason=None):
    """Close `month`: commit its bill (lines, per store figures and ledger tips,
    the adjustments of earlier months it carries) as the record that later
    bills compare with.  Returns the record."""
    identity = git_identity(repo)
    records, warnings = period_records(repo)
    for line in warnings:
        warn(line)
    current = records.get(month)
    if current and current["state"] == "closed":
        raise FlowForgeError("%s is already closed (by %s on %s); `flowforge reopen %s` first"
                             % (month, current["by"], utc_text(current["at"])[:10], month),
                             EXIT_USAGE)
    first, last = month_bounds(month)
    about = {}
    shards = load_team_shards(repo, first, last, about)
    billing = repo.config["billing"]
    doc = {"schema": PERIOD_SCHEMA, "kind": "flowforge-period", "month": month, "state": "closed",
           "at": now(), "by": "%s <%s>" % identity, "reason": reason or "",
           "currency": billing["currency"], "rounding": {
               "minutes": billing["round_minutes"], "mode": billing["round_mode"],
               "scope": billing["round_scope"]}, "carried": {},
           "invoice": billing.get("invoice", {})}
    for variant, by_issue in (("lines", False), ("lines_by_issue", True)):
        dims = ["project", "user"] + (["issue"] if by_issue else [])
        doc[variant] = line_docs(month_lines(repo, month, by_issue, shards=shards), dims)
        for closed, change in pending_adjustments(repo, month, records, by_issue):
            doc["carried"].setdefault(closed, {"lines": [], "lines_by_issue": []})[variant] = \
                line_docs(change, dims)
    per_store = team_cells(shards, ["user", "store"], first, last)
    doc["stores"] = {store_key(u, s): {"user": u, "store": s, "seconds": seconds,
                                       "tip": about.get("tips", {}).get(store_key(u, s))}
                     for (u, s), seconds in sorted(per_store.items())}
    seconds, billable, amount = sum_lines(doc["lines"])
    carried = sum((sum_lines(c["lines"])[2] for c in doc["carried"].values()), money(0))
    doc.update(total_seconds=seconds, total_billable_seconds=billable,
               lines_amount=str(money(amount)), total_amount=str(money(amount + carried)))
    doc["commit"] = commit_period(repo, month, doc, current["commit"] if current else None,
                                  identity, "flowforge: close %s (%s %s, %s h)" % (
                                      month, doc["total_amount"], doc["currency"],
                                      decimal_hours(seconds)))
    log_event(repo, "close", month=month, by=doc["by"], amount=doc["total_amount"])
    return doc


def reopen_month(repo, month, reason=None):
    identity = git_identity(repo)
    records, _ = period_records(repo)
    current = records.get(month)
    if not current or current["state"] != "closed":
        raise FlowForgeError("%s is not closed" % month, EXIT_USAGE)
    doc = {"schema": PERIOD_SCHEMA, "kind": "flowforge-period", "month": month, "state": "open",
           "at": now(), "by": "%s <%s>" % identity, "reason": reason or ""}
    doc["commit"] = commit_period(repo, month, doc, current["commit"], identity,
                                  "flowforge: reopen %s%s" % (month, ": " + reason if reason else ""))
    log_event(repo, "reopen", month=month, by=doc["by"])
    return doc


def close_problems(repo, stores):
    """Findings about closed months for `reconcile --ci`: records not believed,
    two closes of one month, stores a close lists that the ledger lacks."""
    records, warnings = period_records(repo)
    found = [{"kind": "period", "path": "refs/flowforge/periods/", "detail": w} for w in warnings]
    for month, record in sorted(records.items()):
        if record["state"] == "closed":
            for key in sorted(set(record.get("stores", {})) - set(stores)):
                found.append({"kind": "period", "path": PERIODS_REF + month, "detail":
                              "closed with store %s, which the ledger no longer has (deleted on "
                              "the remote?): its time would show as a credit" % key})
    return found


def closed_adjustments(repo):
    """[{month, seconds, amount}] of every closed month whose figures changed
    since its close (for `reconcile --ci`)."""
    records, _ = period_records(repo)
    out = []
    for month, record in sorted(records.items()):
        if record["state"] == "closed":
            change = adjustment_lines(month_lines(repo, month, False, record=record),
                                      record["lines"], ["project", "user"],
                                      carried_later(records, month, "lines"))
            if change:
                seconds, _, amount = sum_lines(line_docs(change, ["project", "user"]))
                out.append({"month": month, "seconds": seconds, "amount": str(money(amount)),
                            "currency": record["currency"], "closed_by": record["by"],
                            "billed_on": next_open_month(month, records)})
    return out


# -- the report page: one self-contained HTML document --------------------------
#
# No script, no font, no image that is not inline: the page is read in mail
# clients, archived with invoices and printed.  Every figure is drawn from the
# same document that --format json prints, and each carries its exact seconds
# (and cents) in data- attributes, so nothing is lost to rounding.

PAGE_CSS = """
:root{--ink:#1d2330;--soft:#5b6475;--line:#e3e6ec;--paper:#fff;--wash:#f5f6f9;--accent:#2f5bea}
*{box-sizing:border-box}
body{margin:0;background:var(--wash);color:var(--ink);
 font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans","DejaVu Sans",sans-serif}
.page{max-width:1080px;margin:24px auto;background:var(--paper);padding:32px 40px;border-radius:10px;
 box-shadow:0 1px 3px rgba(20,30,60,.08),0 8px 24px rgba(20,30,60,.06)}
header{display:flex;justify-content:space-between;align-items:flex-start;gap:24px;
 border-bottom:2px solid var(--ink);padding-bottom:16px;margin-bottom:24px}
h1{font-size:26px;margin:0 0 4px;letter-spacing:-.01em}
h2{font-size:15px;text-transform:uppercase;letter-spacing:.06em;color:var(--soft);margin:28px 0 10px}
.sub{color:var(--soft)}
.meta{text-align:right;color:var(--soft);font-size:13px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(130px,1fr));gap:12px}
.card{background:var(--wash);border-radius:8px;padding:12px 14px}
.card b{display:block;font-size:22px;font-variant-numeric:tabular-nums}
.card span{color:var(--soft);font-size:12px;text-transform:uppercase;letter-spacing:.05em}
.two{display:grid;grid-template-columns:1fr 1fr;gap:28px}
.bars{list-style:none;margin:0;padding:0}
.bars li{display:grid;grid-template-columns:minmax(90px,34%) 1fr 64px;gap:8px;align-items:center;
 padding:3px 0}
.bars .name{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bars .track{background:var(--wash);border-radius:3px;height:12px}
.bars .fill{background:var(--accent);height:12px;border-radius:3px;min-width:1px}
.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
svg{display:block;width:100%;height:auto}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;margin-top:6px;font-size:12px;color:var(--soft)}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
.months{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:18px}
.month table{border-collapse:collapse;width:100%;table-layout:fixed}
.month caption{text-align:left;font-weight:600;padding-bottom:4px}
.month th{font-size:11px;color:var(--soft);font-weight:500;padding:2px}
.month td{height:42px;border:2px solid var(--paper);border-radius:4px;font-size:11px;
 vertical-align:top;padding:2px 4px;background:var(--wash)}
.month td small{display:block;text-align:right;font-variant-numeric:tabular-nums;color:var(--ink)}
.month td.out{background:transparent}
table.exact{border-collapse:collapse;width:100%}
table.exact th,table.exact td{padding:6px 8px;border-bottom:1px solid var(--line);text-align:left}
table.exact th{font-size:12px;color:var(--soft);font-weight:600;text-transform:uppercase;
 letter-spacing:.04em}
table.exact td.num,table.exact th.num{text-align:right}
table.exact tfoot td{font-weight:700;border-top:2px solid var(--ink);border-bottom:none}
.parties{display:grid;grid-template-columns:1fr 1fr;gap:28px;margin-bottom:8px}
.party{line-height:1.5}
.party b{display:block;font-size:15px}
.totals{margin-left:auto;width:min(360px,100%);margin-top:14px}
.totals div{display:flex;justify-content:space-between;padding:4px 0}
.totals .grand{font-size:18px;font-weight:700;border-top:2px solid var(--ink);padding-top:8px}
.note{color:var(--soft);font-size:12px}
.empty{color:var(--soft);font-style:italic}
footer{margin-top:32px;padding-top:12px;border-top:1px solid var(--line);color:var(--soft);
 font-size:12px}
@media (max-width:720px){.two,.parties{grid-template-columns:1fr}.page{padding:20px}}
@page{size:PAPER;margin:16mm 14mm}
@media print{body{background:#fff;font-size:11pt}.page{box-shadow:none;margin:0;max-width:none;
 padding:0;border-radius:0}.screen{display:none}h2{break-after:avoid}tr,li,.month{break-inside:avoid}
 .card{border:1px solid var(--line)}}
"""
PALETTE = ("#2f5bea", "#e8773a", "#2aa876", "#c2417a", "#8b5cf6", "#d4a514", "#17a2b8", "#6b7280",
           "#b45309", "#0f766e")


def _esc(value):
    from html import escape
    return escape(printable(value), quote=True)


def _chart_buckets(rows, period, first, last):
    """(bucket names, {(bucket, user): seconds}, unit) for the stacked chart:
    every day of the range (weeks past 120 days, months past 3 years)."""
    from datetime import date, timedelta
    days = sorted({r[0] for r in rows}) if period == "day" else []
    if period != "day" or not days:
        names = sorted({r[0] for r in rows})
        return names, {(p, u): s for p, u, s in rows}, period
    start, end = date.fromisoformat(first or days[0]), date.fromisoformat(last or days[-1])
    if (end - start).days > 62:   # a long range: drawn where its time is
        start = max(start, date.fromisoformat(days[0]))
        end = min(end, date.fromisoformat(days[-1]))
    span = (end - start).days + 1
    unit = "day" if span <= 120 else "week" if span <= 1100 else "month"

    def bucket(day):
        return day if unit == "day" else period_of(day, unit)
    names, seen = [], set()
    for n in range(span):
        name = bucket((start + timedelta(days=n)).isoformat())
        if name not in seen:
            seen.add(name)
            names.append(name)
    cells = {}
    for day, user, seconds in rows:
        key = (bucket(day), user)
        cells[key] = cells.get(key, 0) + seconds
    return names, cells, unit


def _stacked_svg(names, cells, users, colors, unit):
    """Hours per period stacked by user, as inline SVG (a <title> per bar)."""
    width, height, left, bottom, top = 1000, 260, 44, 26, 10
    totals = [sum(cells.get((n, u), 0) for u in users) for n in names]
    peak = max(totals + [1])
    step = next(s for s in (1, 2, 4, 8, 10, 20, 40, 50, 100, 200, 500, 1000, 2000, 5000, 10 ** 9)
                if peak / 3600 / s <= 6)
    top_hours = max(step, -(-peak // (step * 3600)) * step)
    scale = (height - bottom - top) / (top_hours * 3600)
    slot = (width - left) / max(1, len(names))
    bar = max(1.0, slot * 0.72)
    out = ['<svg viewBox="0 0 %d %d" role="img" aria-label="hours per %s stacked by user">'
           % (width, height, unit)]
    for h in range(0, top_hours + 1, step):
        y = height - bottom - h * 3600 * scale
        out.append('<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="#e3e6ec"/>'
                   '<text x="%d" y="%.1f" font-size="11" fill="#5b6475" text-anchor="end">%d h</text>'
                   % (left, width, y, y, left - 6, y + 4, h))
    every = max(1, -(-len(names) // 16))
    for i, name in enumerate(names):
        x = left + i * slot + (slot - bar) / 2
        y = height - bottom
        for user in users:
            seconds = cells.get((name, user), 0)
            if not seconds:
                continue
            h = seconds * scale
            y -= h
            out.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s" '
                       'data-period="%s" data-user="%s" data-seconds="%d"><title>%s %s: %s h'
                       '</title></rect>' % (x, y, bar, h, colors[user], _esc(name), _esc(user),
                                            seconds, _esc(user), _esc(name),
                                            decimal_hours(seconds)))
        if i % every == 0:
            label = name[5:] if unit == "day" else name
            out.append('<text x="%.1f" y="%d" font-size="11" fill="#5b6475" text-anchor="middle">'
                       '%s</text>' % (x + bar / 2, height - 8, _esc(label)))
    out.append("</svg>")
    return "".join(out)


def _bar_list(rows, kind):
    """Horizontal bars of (name, seconds), largest first."""
    if not rows:
        return '<p class="empty">no time</p>'
    rows = sorted(rows, key=lambda r: (-r[1], r[0]))
    peak = rows[0][1] or 1
    items = ['<li data-%s="%s" data-seconds="%d"><span class="name" title="%s">%s</span>'
             '<span class="track"><span class="fill" style="display:block;width:%.1f%%"></span>'
             '</span><span class="num">%s h</span></li>'
             % (kind, _esc(name), seconds, _esc(name), _esc(name or "(none)"),
                100.0 * seconds / peak, decimal_hours(seconds)) for name, seconds in rows]
    return '<ul class="bars" data-list="%s">%s</ul>' % (kind, "".join(items))


def _calendar(per_day, first, last, limit=12):
    """Month grids of the range (the last `limit` months of a longer one)."""
    from calendar import Calendar
    days = sorted(per_day)
    if not days and not (first and last):
        return '<p class="empty">no time</p>'
    start, end = (first or days[0])[:7], (last or days[-1])[:7]
    if days and shift_month(start, 3) <= end:   # a long range: its months with time
        start, end = max(start, days[0][:7]), min(end, days[-1][:7])
    months = []
    month = start
    while month <= end:
        months.append(month)
        month = shift_month(month, 1)
    note = ""
    if len(months) > limit:
        note = '<p class="note">the last %d of %d months</p>' % (limit, len(months))
        months = months[-limit:]
    peak = max(per_day.values() or [1])
    out = []
    for month in months:
        year, mon = int(month[:4]), int(month[5:])
        rows = []
        for week in Calendar().monthdatescalendar(year, mon):
            cells = []
            for day in week:
                iso = day.isoformat()
                if day.month != mon:
                    cells.append('<td class="out"></td>')
                    continue
                seconds = per_day.get(iso, 0)
                shade = "" if not seconds else \
                    ' style="background:rgba(47,91,234,%.2f)"' % (0.12 + 0.6 * seconds / peak)
                cells.append('<td data-day="%s" data-seconds="%d"%s>%d%s</td>' % (
                    iso, seconds, shade, day.day,
                    "<small>%s</small>" % decimal_hours(seconds) if seconds else ""))
            rows.append("<tr>%s</tr>" % "".join(cells))
        out.append('<div class="month"><table><caption>%s</caption><thead><tr>%s</tr></thead>'
                   '<tbody>%s</tbody></table></div>' % (
                       month, "".join("<th>%s</th>" % d for d in "MTWTFSS"), "".join(rows)))
    return note + '<div class="months">%s</div>' % "".join(out)


def _overview(report):
    """Summary cards, the stacked chart, issues and projects, the calendar."""
    views = report["views"]
    rows = views["by_period_user"]
    users = sorted({r[1] for r in rows})
    colors = {u: PALETTE[i % len(PALETTE)] for i, u in enumerate(users)}
    names, cells, unit = _chart_buckets(rows, views["period"], report["from"], report["to"])
    per_day = {}
    if views["period"] == "day":
        for day, _, seconds in rows:
            per_day[day] = per_day.get(day, 0) + seconds
    total = report["total_seconds"]
    days = len(per_day)
    cards = [("total", '<b data-seconds="%d">%s h</b>' % (total, decimal_hours(total))),
             ("people", "<b>%d</b>" % len(users)), ("issues", "<b>%d</b>" % len(views["by_issue"])),
             ("projects", "<b>%d</b>" % len(views["by_project"]))]
    if days:
        cards.append(("days with time", "<b>%d</b>" % days))
        cards.append(("per day with time", "<b>%s h</b>" % decimal_hours(total // days)))
    out = ['<section class="summary"><div class="cards">%s</div></section>' % "".join(
        '<div class="card">%s<span>%s</span></div>' % (value, name) for name, value in cards)]
    out.append("<section><h2>Hours per %s, by person</h2>" % unit)
    out.append(_stacked_svg(names, cells, users, colors, unit) if names else
               '<p class="empty">no time in this period</p>')
    out.append('<div class="legend">%s</div></section>' % "".join(
        '<span><i style="background:%s"></i>%s</span>' % (colors[u], _esc(u)) for u in users))
    out.append('<section class="two"><div><h2>By issue</h2>%s</div><div><h2>By project</h2>%s'
               '</div></section>' % (_bar_list(views["by_issue"], "issue"),
                                     _bar_list(views["by_project"], "project")))
    if views["period"] == "day":
        out.append("<section><h2>Calendar</h2>%s</section>" % _calendar(
            per_day, report["from"], report["to"]))
    return "".join(out)


def _exact_table(headers, rows, numeric, foot=None):
    """The table beneath: every figure with its exact value in data- attributes.
    `rows` are [(cells, {attribute: value})]."""
    head = "".join('<th%s>%s</th>' % (' class="num"' if h in numeric else "", _esc(h))
                   for h in headers)
    body = []
    for cells, data in rows:
        attrs = "".join(' data-%s="%s"' % (k, _esc(v)) for k, v in data.items())
        body.append("<tr%s>%s</tr>" % (attrs, "".join(
            '<td%s>%s</td>' % (' class="num"' if h in numeric else "", _esc(c))
            for h, c in zip(headers, cells))))
    tfoot = ""
    if foot:
        cells, data = foot
        attrs = "".join(' data-%s="%s"' % (k, _esc(v)) for k, v in data.items())
        tfoot = "<tfoot><tr%s>%s</tr></tfoot>" % (attrs, "".join(
            '<td%s>%s</td>' % (' class="num"' if h in numeric else "", _esc(c))
            for h, c in zip(headers, cells)))
    return '<table class="exact"><thead><tr>%s</tr></thead><tbody>%s</tbody>%s</table>' % (
        head, "".join(body) or '<tr><td colspan="%d" class="empty">no time</td></tr>'
        % len(headers), tfoot)


def _document(title, body, paper="A4"):
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta name="generator" content="FlowForge %s"><title>%s</title><style>%s</style>'
            '</head><body><main class="page">%s<footer>Made by FlowForge %s on %s. Hours are '
            'shown to 0.01 h, rounded half up<span class="screen">; the exact seconds are in '
            'each figure\'s data- attributes</span>.</footer></main></body></html>\n' % (
                VERSION, _esc(title), PAGE_CSS.replace("PAPER", paper), body, VERSION,
                utc_text(now())[:16].replace("T", " ") + " UTC"))


def _about_line(doc):
    about = doc["ledger"]
    where = ", ".join(doc.get("repos") or [])
    return "%s · %d store(s)%s" % (where, about.get("stores", 0), (
        ", fetched %s" % utc_text(about["fetched_at"])[:16].replace("T", " ") + " UTC")
        if about.get("fetched_at") else ", this clone's own stores only")


def render_report_page(report):
    span = range_text(report["from"], report["to"])
    headers, cells = report_columns(report)
    rows = [(c, {"seconds": r[1]}) for c, r in zip(cells, report["table"])]
    foot = (["total"] + [""] * (len(headers) - 3) + [format_hours(report["total_seconds"]),
                                                     report["total_hours"]],
            {"seconds": report["total_seconds"], "total": "1"})
    title = "Tracked time, %s" % span
    body = ('<header><div><h1>%s</h1><div class="sub">%s</div></div><div class="meta">%s</div>'
            '</header>' % (_esc(title), _esc(_filter_words(report).strip(" ()") or
                                                "everyone, every project and issue"),
                           _esc(_about_line(report))))
    body += _overview(report)
    body += "<section><h2>The exact figures (by %s)</h2>%s</section>" % (
        _esc(", ".join(report["by"])), _exact_table(headers, rows, ("time", "hours"), foot))
    return _document(title, body)


def grouped(amount):
    """"25575.00" as "25,575.00" for reading (the exact text stays in data-)."""
    sign, digits = ("-", amount[1:]) if amount.startswith("-") else ("", amount)
    whole, _, cents = digits.partition(".")
    return sign + "{:,}".format(int(whole)) + ("." + cents if cents else "")


def _party(who, label):
    """An issuer or client block from billing.invoice."""
    if not who:
        return '<div class="party"><span class="note">%s</span><b>—</b><span class="note">set ' \
               'billing.invoice.%s in config.json</span></div>' % (label, label.lower())
    lines = [who.get("name", "")] + list(who.get("address", []))
    lines += [who[k] for k in ("email", "tax_id") if who.get(k)]
    return '<div class="party"><span class="note">%s</span><b>%s</b>%s</div>' % (
        label, _esc(lines[0]), "<br>".join(_esc(line) for line in lines[1:]))


def render_bill_page(bill, report=None):
    invoice = bill.get("invoice") or {}
    month = bill.get("month") or (bill["from"] or "")[:7]
    number = invoice.get("number", "{month}").replace("{month}", month or "").replace(
        "{year}", (month or "")[:4])
    span = range_text(bill["from"], bill["to"])
    cur = bill["currency"]
    dims = bill["by"]
    numeric = ("hours", "billable", "rate", "amount")
    headers = list(dims) + ["hours", "billable", "rate", "amount"]

    def rows_of(docs):
        return [([d[k] if d[k] or k != "project" else "(none)" for k in dims]
                 + [signed_hours(d["seconds"]),
                                         signed_hours(d["billable_seconds"]), grouped(d["rate"]),
                                         grouped(d["amount"])],
                 {"seconds": d["seconds"], "billable-seconds": d["billable_seconds"],
                  "amount": d["amount"]}) for d in docs]
    title = "Invoice %s" % number if number else "Bill %s" % span
    # closed as a whole (every repository of the bill), or partly
    closed = bill["closed"][0] if bill["closed"] and len(bill["closed"]) == len(
        bill["repos"]) else None
    partly = bool(bill["closed"]) and closed is None
    meta = ["<div>Period <b>%s</b></div>" % _esc(span),
            "<div>Currency <b>%s</b></div>" % _esc(cur),
            "<div>%s</div>" % _esc(rounding_text(bill["rounding"]).capitalize())]
    if closed:   # for the team, not the client: not printed
        meta.append('<div class="screen">Closed %s by %s</div>' % (
            _esc(utc_text(closed["at"])[:10]), _esc(closed["by"])))
    elif partly:
        shut = [c["repo"] for c in bill["closed"]]
        meta.append('<div class="screen">Closed in %s; open in %s</div>' % (
            _esc(", ".join(shut)), _esc(", ".join(r for r in bill["repos"] if r not in shut))))
    from datetime import date, timedelta
    issued = date.fromisoformat(utc_text(bill.get("issued") if closed else now())[:10])
    meta.insert(0, "<div>Date <b>%s</b></div>" % issued.isoformat())
    if invoice.get("due_days"):
        meta.append("<div>Due <b>%s</b> (%d days)</div>" % (
            (issued + timedelta(days=invoice["due_days"])).isoformat(), invoice["due_days"]))
    body = ['<header><div><h1>%s</h1><div class="sub">%s%s</div></div><div class="meta">%s</div>'
            '</header>' % (_esc(title), _esc("Time billed, %s" % span),
                           _esc(" (the last complete month)" if bill.get("period") == "last-month"
                                else "") + _esc(_filter_words(bill)), "".join(meta))]
    body[0] = body[0].replace("Time billed, ", "Time billed for ", 1)
    body.append('<section class="parties">%s%s</section>' % (
        _party(invoice.get("issuer"), "From"), _party(invoice.get("client"), "Bill to")))
    body.append('<section><h2>Lines</h2>%s</section>' % _exact_table(
        headers, rows_of(bill["lines"]), numeric,
        (["subtotal"] + [""] * (len(dims) - 1) + [decimal_hours(bill["total_seconds"]),
                                                  decimal_hours(bill["total_billable_seconds"]),
                                                  "", grouped(bill["lines_amount"])],
         {"seconds": bill["total_seconds"], "billable-seconds": bill["total_billable_seconds"],
          "amount": bill["lines_amount"], "total": "lines"})))
    for group in bill["adjustments"]:
        how = ("billed on this invoice" if group["billed_here"]
               else "not in this total: billed on the invoice of %s" % group["billed_on"])
        body.append('<section%s data-adjustments="%s" data-billed-here="%s"><h2>Adjustments after '
                    'close of %s</h2><p class="note">Time recorded into %s after it was closed '
                    '<span class="screen">(%s by %s)</span>: %s.</p>%s</section>' % (
                        "" if group["billed_here"] else ' class="screen"',
                        _esc(group["month"]), "1" if group["billed_here"] else "0",
                        _esc(group["month"]), _esc(group["month"]),
                        _esc(utc_text(group["closed_at"])[:10]), _esc(group["closed_by"]), _esc(how),
                        _exact_table(headers, rows_of(group["lines"]), numeric,
                                     (["adjustments"] + [""] * (len(dims) - 1) + [
                                         signed_hours(group["seconds"]),
                                         signed_hours(group["billable_seconds"]), "",
                                         grouped(group["amount"])],
                                      {"seconds": group["seconds"], "amount": group["amount"],
                                       "total": "adjustments"}))))
    totals = ['<div><span>Lines</span><span class="num">%s %s</span></div>' % (
        grouped(bill["lines_amount"]), _esc(cur))]
    if bill["adjustments_amount"] != "0.00":
        totals.append('<div><span>Adjustments after close</span><span class="num">%s %s</span>'
                      '</div>' % (grouped(bill["adjustments_amount"]), _esc(cur)))
    tax = bill.get("tax")
    if tax:
        totals.append('<div><span>Net</span><span class="num">%s %s</span></div>' % (
            grouped(bill["total_amount"]), _esc(cur)))
        totals.append('<div><span>%s %s %%</span><span class="num" data-amount="%s" '
                      'data-total="tax">%s %s</span></div>' % (
                          _esc(tax["label"]), _esc(tax["rate"]), _esc(tax["amount"]),
                          grouped(tax["amount"]), _esc(cur)))
    totals.append('<div class="grand"><span>Total</span><span class="num" data-amount="%s" '
                  'data-total="invoice">%s %s</span></div>' % (
                      _esc(tax["total"] if tax else bill["total_amount"]),
                      grouped(tax["total"] if tax else bill["total_amount"]), _esc(cur)))
    body.append('<section class="totals">%s</section>' % "".join(totals))
    if invoice.get("notes"):
        body.append('<p class="note party">%s</p>' % _esc(invoice["notes"]))
    if report is not None:
        body.append('<div class="screen"><h2>Where the time went</h2><p class="note">As tracked '
                    'now%s; not printed.</p>%s</div>' % (
                        " (this month is closed: the invoice above keeps its closed figures)"
                        if closed else "", _overview(report)))
    return _document(title, "".join(body), invoice.get("paper", "A4"))


def render_page(doc, report=None):
    """--format html: the report page, or the invoice page of a bill."""
    if doc["schema"].startswith("flowforge.bill"):
        return render_bill_page(doc, report)
    return render_report_page(doc)


# ############################################################################
# 15. Command line
# ############################################################################
#
# One cmd_<name>() per command, registered with @command together with its
# one-line help, an example and its arguments; build_parser() turns the
# registry into argparse sub-parsers and command_reference() into the README's
# reference, so help, README and code cannot drift apart.

COMMANDS = []


class Command:
    def __init__(self, name, func, summary, example, arguments, area):
        self.name, self.func, self.summary = name, func, summary
        self.example, self.arguments, self.area = example, arguments, area
        # a command that defines -C or --user itself (several repositories, a
        # filter) gets the common options without those
        self.filters = any("-C" in flags or "--user" in flags for flags, _ in arguments)


def command(name, summary, example, *arguments, area="timers"):
    """Register cmd_<name>; `arguments` are (flags tuple, argparse keywords) pairs."""
    def register(func):
        COMMANDS.append(Command(name, func, summary, example, arguments, area))
        return func
    return register


def arg(*flags, **kwargs):
    return flags, kwargs


def number(kind, low, high):
    """An argparse type: a `kind` (int or float) from low to high; NaN and
    infinities are refused like any other number out of range."""
    def convert(text):
        import argparse
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("%r is not a number" % text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("%s is not from %s to %s" % (text, low, high))
        return value
    convert.__name__ = kind.__name__  # argparse names the type in its messages
    convert.quick = True   # quick_args may call it (it raises only for a bad value)
    return convert


AT = arg("--at", metavar="TIME", help="when: 9:30, 9am, 'yesterday 17:00', 'mon 9:00', -15m, "
         "'2h ago', '2026-11-22 09:30' or ISO-8601 (default: now)")


class Context:
    """What a command needs, resolved lazily so that cheap commands stay cheap."""

    def __init__(self, args):
        self.args = args
        self._repo = None
        self._user = None
        self._now = None

    @property
    def now(self):
        if self._now is None:
            self._now = now()
        return self._now

    def work_tree(self):
        return Repo.find(self.args.C or os.getcwd())

    @property
    def repo(self):
        if self._repo is None:
            repo = self.work_tree().require()
            repo._config = load_config(repo.config_path)  # a damaged one stops every command (78)
            if os.path.exists(deploy_journal(repo)):
                finished = finish_interrupted_deploy(repo)
                if finished:
                    info("flowforge: %s" % finished)
            self._repo = repo
        return self._repo

    @property
    def user(self):
        if self._user is None:
            self._user = resolve_user(self.repo.root, self.args.user)
        return self._user

    def store(self):
        """This user's private store (not created yet if it does not exist)."""
        store = PrivateStore(self.repo, self.user)
        self.repo.check_dirs(store.dir, store.time_dir, store.daily)
        return store

    def zone(self, store):
        """The store's time zone, or the machine's for a store not yet created."""
        return store.tz if store.exists() else load_timezone(system_timezone_name())

    def time(self, text, store):
        if not text:
            return self.now
        relative = relative_time(text, self.now)   # -15m: no time zone to load
        return parse_time(text, self.zone(store), self.now) if relative is None else relative

    def existing_store(self, store):
        """`store` if it exists, else None -- or, for a user named with --user
        that this clone does not know, the error that says so: a read-only
        command must not create a store for a typo."""
        if store.exists():
            return store
        store.refuse_if_data_elsewhere()
        if self.args.user is not None:
            known = known_users(self.repo)
            if store.user not in known:
                guess = closest(store.user, known)
                raise FlowForgeError("no user %s here%s; known users: %s" % (
                    store.user, " (did you mean %s?)" % guess if guess else "",
                    ", ".join(known) or "none yet"), EXIT_USAGE)
        return None

    def ready_store(self, store):
        """Create the store on first use (after all arguments were validated)."""
        if not store.exists():
            store.create()
            info("created the private store of %s (store %s, time zone %s)"
                 % (store.user, store.store_id, store.tz_name))
        return store

    def write_output(self, text, path, mode):
        """--output FILE: written atomically (a textfile collector or a spreadsheet
        never sees half a file); otherwise stdout."""
        if path:
            import stat
            real = os.path.realpath(path)   # a symlink's target, not the link, is written
            try:
                kind = os.stat(real).st_mode
            except FileNotFoundError:
                kind = None
            if kind is not None and not stat.S_ISREG(kind):
                try:   # a FIFO, a terminal, /dev/stdout: written into, never replaced
                    with open(real, "w", encoding="utf-8") as f:
                        f.write(text)
                except OSError as e:
                    raise StorageError(path, e)
            else:
                atomic_write(real, text.encode("utf-8"), mode)
        else:
            sys.stdout.write(text)

    def emit(self, name, result, lines):
        """--json: one document on stdout and messages on stderr; else messages on stdout."""
        if UI.json:
            for line in lines:
                info(line)
            doc = {"schema": "flowforge.%s/1" % name}
            doc.update(result)
            sys.stdout.write(json.dumps(doc, sort_keys=True, indent=1) + "\n")
        else:
            for line in lines:
                sys.stdout.write(line + "\n")
        return EXIT_OK


# -- setup -------------------------------------------------------------------

@command("init", "Set up FlowForge in this git work tree (idempotent).",
         "flowforge init --timezone Europe/Berlin",
         arg("--timezone", metavar="TZ", help="your IANA time zone (default: the machine's)"),
         area="setup")
def cmd_init(ctx, args):
    if args.timezone:
        load_timezone(args.timezone)
    root = ctx.work_tree().root
    repo, created = init_repo(root)
    ctx._repo = repo
    lines = ["created " + c for c in created] or ["FlowForge is already set up in %s" % root]
    try:
        store = ctx.store()
    except FlowForgeError as e:
        if e.exit_code == EXIT_NOPERM:
            raise
        lines.append("no private store yet: %s" % e)
        store = None
    if store is not None:
        if store.create(args.timezone):
            lines.append("created the private store of %s (store %s, time zone %s)"
                         % (store.user, store.store_id, store.tz_name))
        else:
            lines.append("private store of %s: store %s, time zone %s"
                         % (store.user, store.store_id, store.tz_name))
    lines += ledger_fetch_setup(repo)
    vendored = os.path.relpath(os.path.realpath(__file__), os.path.realpath(root))
    lines.append("next: `git add %s.flowforge && git commit`, then `flowforge start ISSUE`"
                 % ("" if vendored.startswith("..") else vendored + " "))
    return ctx.emit("init", {"root": root, "created": created,
                             "user": store.user if store else None}, lines)


@command("completion", "Print a shell completion script for bash, zsh or fish.",
         "flowforge completion bash > ~/.local/share/bash-completion/completions/flowforge",
         arg("shell", choices=("bash", "zsh", "fish"), nargs="?", help="the shell"),
         arg("--words", choices=("issues", "entries"), help="print your recent issues or entry "
             "ids, one per line (what the scripts complete)"),
         area="setup")
def cmd_completion(ctx, args):
    if args.words:
        try:
            words = completion_words(ctx, args.words)
        except FlowForgeError:
            words = []   # completing outside a work tree, say: offer nothing, say nothing
        sys.stdout.write("".join(w + "\n" for w in words))
        return EXIT_OK
    if not args.shell:
        raise FlowForgeError("give a shell: bash, zsh or fish", EXIT_USAGE)
    sys.stdout.write({"bash": bash_completion, "zsh": zsh_completion,
                      "fish": fish_completion}[args.shell]())
    return EXIT_OK


@command("version", "Print FlowForge's version.", "flowforge version", area="setup")
def cmd_version(ctx, args):
    return ctx.emit("version", {"version": VERSION, "python": sys.version.split()[0]},
                    ["flowforge %s (Python %s)" % (VERSION, sys.version.split()[0])])


# -- timers ------------------------------------------------------------------

def warn_if_closed(repo, days, today):
    """Time just recorded on `days` of a closed month: said at once.  Only a
    day before this month can be in one (a month is closed after it ends),
    so the timer commands of today never look."""
    months = sorted({d[:7] for d in days if d and d[:7] < today[:7]})
    if not months:
        return
    closed = closed_months(repo)
    for month in months:
        if month in closed:
            warn("%s is closed (by %s on %s): this time is recorded, and bills show it as an "
                 "adjustment after close (`flowforge bill --month %s`)"
                 % (month, closed[month]["closed_by"], utc_text(closed[month]["closed_at"])[:10],
                    month))


def entry_days(entry, zone):
    """The local days (in Zone `zone`) an entry's time lies on (its logged day,
    or where its intervals start and end)."""
    if not entry:
        return []
    if entry.get("date"):
        return [entry["date"]]
    return [zone.date_of(ts) for seg in entry.get("segments", []) for ts in (seg[0], seg[1] - 1)]


def _recorded(ctx, store, result, *days):
    """A command's result, after saying so if its time went into a closed month."""
    warn_if_closed(ctx.repo, list(days) + entry_days(result[0].get("entry"), store.zone),
                   store.zone.date_of(ctx.now))
    return result


def _timers(ctx):
    return Timers(ctx.store(), ctx.now)


ALLOW_OVERLAP = arg("--allow-overlap", action="store_true",
                    help="record it even where it overlaps another timed entry (marked as "
                    "overlapping: real parallel work)")


@command("start", "Start a timer (stops the running one first and says so).",
         "flowforge start 123 --project web --note 'login bug' --at 9:30",
         arg("issue", metavar="ISSUE", help="123, #123, owner/repo#123 or ABC-12"),
         arg("--project", metavar="P", help="project name (for rates and reports)"),
         arg("--note", metavar="TEXT", help="private note; never leaves this machine"), AT,
         ALLOW_OVERLAP)
def cmd_start(ctx, args):
    issue, project, note = parse_issue(args.issue), parse_project(args.project), parse_note(args.note)
    timers = _timers(ctx)
    at = timers.check_time(ctx.time(args.at, timers.store), "start time")  # before any store exists
    ctx.ready_store(timers.store)
    result, lines = timers.start(issue, project, note, at, args.allow_overlap)
    return ctx.emit("start", result, lines)


@command("switch", "Stop the running timer and start one for another issue.",
         "flowforge switch 124 --at -15m",
         arg("issue", metavar="ISSUE", help="the issue to switch to"),
         arg("--project", metavar="P", help="project name"),
         arg("--note", metavar="TEXT", help="private note"), AT, ALLOW_OVERLAP)
def cmd_switch(ctx, args):
    return cmd_start(ctx, args)


@command("continue", "Start a timer with the issue, project and note of the last timed entry "
         "(or of entry ID).", "flowforge continue --at 13:00",
         arg("id", metavar="ID", nargs="?", help="entry id from `flowforge entries` (default: "
             "the timed entry that ended last)"), AT, ALLOW_OVERLAP)
def cmd_continue(ctx, args):
    if args.id:
        day_of_entry_id(args.id)
    timers = _timers(ctx)
    at = timers.check_time(ctx.time(args.at, timers.store), "start time")
    if ctx.existing_store(timers.store) is None:
        raise FlowForgeError("no timed entry to continue yet (start one with `flowforge start "
                             "ISSUE`)")
    return ctx.emit("continue", *timers.resume_entry(args.id, at, args.allow_overlap))


def _timer_at(ctx, args, action, *extra):
    """stop, pause and resume: an optional --at, then the Timers method of that name."""
    timers = _timers(ctx)
    at = timers.check_time(ctx.time(args.at, timers.store), action + " time")
    if ctx.existing_store(timers.store) is None:
        raise FlowForgeError("no timer is running (start one with `flowforge start ISSUE`)")
    return ctx.emit(action, *_recorded(ctx, timers.store, getattr(timers, action)(at, *extra)))


@command("stop", "Stop the timer and record the entry.", "flowforge stop --at 17:30", AT,
         ALLOW_OVERLAP)
def cmd_stop(ctx, args):
    return _timer_at(ctx, args, "stop", args.allow_overlap)


@command("pause", "Pause the running timer.", "flowforge pause --at 12:00", AT)
def cmd_pause(ctx, args):
    return _timer_at(ctx, args, "pause")


@command("resume", "Resume the paused timer (on a later day: as a new entry).",
         "flowforge resume --at 13:00", AT)
def cmd_resume(ctx, args):
    return _timer_at(ctx, args, "resume")


@command("cancel", "Discard the running or paused timer without recording it.",
         "flowforge cancel")
def cmd_cancel(ctx, args):
    timers = _timers(ctx)
    if ctx.existing_store(timers.store) is None:
        raise FlowForgeError("no timer is running (start one with `flowforge start ISSUE`)")
    return ctx.emit("cancel", *timers.cancel())


@command("status", "Show the timer and today's recorded time.", "flowforge status --json")
def cmd_status(ctx, args):
    timers = _timers(ctx)
    if ctx.existing_store(timers.store) is None:
        today = local_date(ctx.now, ctx.zone(timers.store))
        return ctx.emit("status", {"timer": None, "today": today, "today_seconds": 0},
                        ["no timer running", "today %s: nothing recorded yet" % today])
    return ctx.emit("status", *timers.status())


@command("log", "Record time spent without a timer: a duration, or an interval.",
         "flowforge log 123 --start 9:00 --end 11:30 --date yesterday --note 'review'",
         arg("issue", metavar="ISSUE", help="123, #123, owner/repo#123 or ABC-12"),
         arg("duration", metavar="DURATION", nargs="?", help="90m, 1h30m, 1.5h or 1:30 (with "
             "--start or --end: the interval's length)"),
         arg("--start", metavar="TIME", help="the interval's start (a time: see `--at`)"),
         arg("--end", metavar="TIME", help="the interval's end"),
         arg("--date", metavar="D", help="the day: today (default), yesterday, mon..sun, -3d "
             "or YYYY-MM-DD; times of day in --start/--end are on it"),
         arg("--project", metavar="P", help="project name"),
         arg("--note", metavar="TEXT", help="private note"),
         arg("--key", metavar="KEY", help="idempotency key: logging the same key on the same "
             "date again does nothing (for scripts)"), ALLOW_OVERLAP)
def cmd_log(ctx, args):
    issue = parse_issue(args.issue)
    project, note = parse_project(args.project), parse_note(args.note)
    if args.key is not None and not 0 < len(args.key) <= 200:
        raise FlowForgeError("--key must be 1-200 characters", EXIT_USAGE)
    timers = _timers(ctx)
    zone = ctx.zone(timers.store)
    day = parse_day(args.date, zone, ctx.now) if args.date else None
    start = end = None
    if args.start:
        start = parse_time(args.start, zone, ctx.now, day)
    if args.end:
        end = parse_time(args.end, zone, ctx.now, day)
    seconds = parse_duration(args.duration) if args.duration else None
    if start is not None and end is not None:
        if seconds is not None:
            raise FlowForgeError("give DURATION or both --start and --end, not all three",
                                 EXIT_USAGE)
        if end <= start:
            raise FlowForgeError("end %s is not after start %s (for an interval past midnight, "
                                 "give the end's day: --end 'today 01:30')"
                                 % (timers.show(end), timers.show(start)), EXIT_USAGE)
        seconds = end - start
    elif seconds is None:
        raise FlowForgeError("give a DURATION (log 123 1h30m) or an interval (log 123 --start "
                             "9:00 --end 11:30)", EXIT_USAGE)
    elif end is not None:
        start = end - seconds
    if start is None:
        day = (day or parse_day("today", zone, ctx.now)).isoformat()
    timers.check_log(seconds, day, start, zone)
    ctx.ready_store(timers.store)
    return ctx.emit("log", *_recorded(ctx, timers.store, timers.log(
        issue, seconds, day, project, note, args.key, args.allow_overlap, start)))


@command("entries", "List your entries with time in a range of days (default: the last 7).",
         "flowforge entries --date yesterday",
         arg("--date", metavar="D", help="one day: today, yesterday, mon..sun, -3d or YYYY-MM-DD"),
         arg("--from", dest="first", metavar="D", help="first day (the same forms)"),
         arg("--to", dest="last", metavar="D", help="last day (default: today)"),
         arg("--issue", metavar="ISSUE", help="only this issue"))
def cmd_entries(ctx, args):
    issue = parse_issue(args.issue) if args.issue else None
    timers = _timers(ctx)
    zone = ctx.zone(timers.store)
    if args.date:
        if args.first or args.last:
            raise FlowForgeError("use --date or --from/--to, not both", EXIT_USAGE)
        first = last = parse_day(args.date, zone, ctx.now).isoformat()
    else:
        last = parse_day(args.last or "today", zone, ctx.now, "--to").isoformat()
        first = (parse_day(args.first, zone, ctx.now, "--from").isoformat() if args.first
                 else shift_day(last, -6))
        if first > last:
            raise FlowForgeError("--from %s is after --to %s" % (first, last), EXIT_USAGE)
    found = []
    if ctx.existing_store(timers.store) is not None:
        found = [e for e in timers.entries(first, last) if issue is None or e["issue"] == issue]
    if UI.json:
        return ctx.emit("entries", {"from": first, "to": last, "entries": found,
                                    "total_seconds": sum(e["range_seconds"] for e in found)}, [])
    span_text = first if first == last else "%s to %s" % (first, last)
    if not found:
        sys.stdout.write("no entries on %s\n" % span_text)
        return EXIT_OK
    rows = []
    for e in found:
        if e.get("segments"):
            start, end = timers.show(e["segments"][0][0]), timers.show(e["segments"][-1][1])
            span = "%s-%s" % (start[11:16], end[11:16])
            if end[:10] != start[:10]:  # past midnight: the end is N days later
                span += " (+%dd)" % (_day_count(start[:10], end[:10]) - 1)
        else:
            span = "(logged)"
        time_text = format_duration(e["range_seconds"])
        if e["range_seconds"] != entry_seconds(e):
            time_text += " of " + format_duration(entry_seconds(e))
        note = e.get("note", "").replace("\n", " ")
        rows.append([e["id"], e["day"], span, time_text, e["issue"], e.get("project", ""),
                     ("overlap! " if e.get("overlap") else "")
                     + note[:40] + ("..." if len(note) > 40 else "")])
    total = sum(e["range_seconds"] for e in found)
    sys.stdout.write(render("table", ["id", "day", "span", "time", "issue", "project", "note"],
                            rows, ["total", "", "", format_duration(total), "", "", ""],
                            title="Entries, %s" % span_text))
    return EXIT_OK


@command("edit", "Amend an entry (the original stays in the append-only file).",
         "flowforge edit 20261122-1a2b3c4d --issue 124 --end 17:45",
         arg("id", metavar="ID", help="entry id from `flowforge entries`"),
         arg("--issue", metavar="ISSUE", help="new issue"),
         arg("--project", metavar="P", help="new project"),
         arg("--note", metavar="TEXT", help="new note"),
         arg("--start", metavar="TIME", help="new start (timer entries; a time of day is on the "
             "entry's day)"),
         arg("--end", metavar="TIME", help="new end (timer entries)"),
         arg("--duration", metavar="DURATION", help="new duration"),
         arg("--date", metavar="D", help="new date (logged entries): yesterday, mon..sun, -3d, "
             "YYYY-MM-DD"), ALLOW_OVERLAP)
def cmd_edit(ctx, args):
    from datetime import date
    entry_day = date.fromisoformat(day_of_entry_id(args.id))
    store = ctx.store()
    zone = ctx.zone(store)
    changes = {}
    if args.issue is not None:
        changes["issue"] = parse_issue(args.issue)
    if args.project is not None:
        changes["project"] = parse_project(args.project)
    if args.note is not None:
        changes["note"] = parse_note(args.note)
    if args.duration is not None:
        changes["seconds"] = parse_duration(args.duration)
    if args.date is not None:
        changes["date"] = parse_day(args.date, zone, ctx.now).isoformat()
    for field in ("start", "end"):
        if getattr(args, field) is not None:
            changes[field] = parse_time(getattr(args, field), zone, ctx.now, entry_day)
    if not changes:
        raise FlowForgeError("nothing to change: give --issue, --project, --note, --start, "
                             "--end, --duration or --date", EXIT_USAGE)
    if ctx.existing_store(store) is None:
        raise FlowForgeError("no entry %s (no private store yet)" % args.id)
    return ctx.emit("edit", *_recorded(ctx, store, Timers(store, ctx.now).edit(
        args.id, changes, args.allow_overlap), entry_day.isoformat()))


@command("delete", "Delete an entry (recorded as an amendment).",
         "flowforge delete 20261122-1a2b3c4d",
         arg("id", metavar="ID", help="entry id from `flowforge entries`"))
def cmd_delete(ctx, args):
    day_of_entry_id(args.id)
    store = ctx.store()
    if ctx.existing_store(store) is None:
        raise FlowForgeError("no entry %s (no private store yet)" % args.id)
    return ctx.emit("delete", *_recorded(ctx, store, Timers(store, ctx.now).delete(args.id)))


# -- team --------------------------------------------------------------------

def ledger_fetch_setup(repo):
    """`init` / `install hooks`: a plain `git fetch` brings the ledger too."""
    lines = []
    _, out, _ = run_git(["remote"], repo.root)
    for remote in out.split():
        if add_fetch_refspec(repo, remote):
            lines.append("git fetch from %s now brings the ledger too (remote.%s.fetch; opt out "
                         "with `git config flowforge.fetch false`)" % (remote, remote))
    return lines


@command("fetch", "Fetch every teammate's store ref (the team ledger) from a remote.",
         "flowforge fetch origin",
         arg("remote", nargs="?", metavar="REMOTE", help="the git remote (default: origin, or "
             "the only one)"),
         arg("--accept-rewritten", action="store_true", help="take the new history of store "
             "refs that were rewritten on the remote (the old one stays in a quarantine ref)"),
         area="team")
def cmd_fetch(ctx, args):
    repo = ctx.repo
    remote = check_remote(repo, args.remote) if args.remote else default_remote(repo)
    result = ledger_fetch(repo, remote, args.accept_rewritten)
    for line in result["warnings"]:
        warn(line)
    lines = ["fetched %d store ref(s) from %s, %d changed%s" % (
        result["stores"], remote, result["changed"], ", %d closed-period record(s)"
        % result["periods"] if result["periods"] else "")]
    return ctx.emit("fetch", result, lines + ledger_fetch_setup(repo))


@command("push", "Push this clone's store refs (your ledger) to a remote, fast-forward only.",
         "flowforge push origin",
         arg("remote", nargs="?", metavar="REMOTE", help="the git remote (default: origin, or "
             "the only one)"),
         arg("--restore", action="store_true", help="put this clone's own store history back "
             "where `fetch` found it rewritten on the remote (only over the rewritten copy it saw)"),
         area="team")
def cmd_push(ctx, args):
    repo = ctx.repo
    for line in aggregate_own(repo):   # time tracked since the last commit travels too
        warn(line)
    remote = check_remote(repo, args.remote) if args.remote else default_remote(repo)
    result = ledger_push(repo, remote, own_store_keys(repo), restore=args.restore)
    if queue_exists(repo):
        queue = open_queue(repo)
        queue.settle_key("push:" + remote)
        queue.close()
    return ctx.emit("push", result, ["pushed %s to %s" % (", ".join(result["pushed"]), remote)
                                     if result["pushed"] else "the ledger on %s is up to date"
                                     % remote])


@command("migrate", "Move FlowForge 0.1's .flowforge/team/ shards and chains into the ledger.",
         "flowforge migrate",
         arg("--dry-run", action="store_true", help="check and say what would move"),
         area="setup")
def cmd_migrate(ctx, args):
    repo = ctx.repo
    stores = legacy_stores(repo)
    checked = {key: legacy_store_files(repo, key, entry)[0] for key, entry in sorted(stores.items())}
    lines = []
    if args.dry_run:
        lines = ["would move %s (%d file(s))" % (key, len(files)) for key, files in checked.items()]
        return ctx.emit("migrate", {"stores": sorted(checked), "dry_run": True},
                        lines or ["nothing to migrate"])
    moved = []
    for key, entry in sorted(stores.items()):
        user = parse_store_key(key)[0]
        with repo.lock("aggregate." + user, 30, "aggregation for %s" % user):
            if migrate_store(repo, key, entry):
                moved.append(key)
    lines += ["moved %s into %s%s" % (key, STORES_REF, key) for key in moved]
    lines += ["%s was in the ledger already" % key for key in sorted(set(checked) - set(moved))]
    committed = False
    team = repo.rel(repo.team)
    rc, tracked, _ = run_git(["ls-files", "--", team], repo.root)
    if os.path.isdir(repo.team):
        import shutil
        shutil.rmtree(repo.team)  # first: `git commit -- PATHS` reads the work tree
    if tracked.strip():
        run_git(["rm", "-r", "-q", "--cached", "--ignore-unmatch", "--", team], repo.root)
        # Only these paths: whatever else the user has staged stays staged.
        run_git(["commit", "-q", "--no-verify", "-m", "FlowForge: team time moved to the ledger "
                 "(refs/flowforge/stores/)", "--", team], repo.root)
        committed = True
        lines.append("committed the removal of %s/ from this branch" % team)
    if checked or committed:
        lines.append("next: `flowforge push` (or any `git push` with the hooks installed) shares "
                     "the ledger; other clones run `flowforge fetch`")
    return ctx.emit("migrate", {"stores": sorted(checked), "moved": moved, "committed": committed},
                    lines or ["nothing to migrate"])


@command("aggregate", "Write your private entries into your store's ledger ref (the team shards).",
         "flowforge aggregate --full",
         arg("--full", action="store_true", help="rebuild every shard instead of only changed days"),
         arg("--all", action="store_true", help="every private store in this clone, not only yours"),
         arg("--wait", metavar="SECONDS", type=number(float, 0, 3600), default=10.0,
             help="how long to wait for a busy lock before exit 75 (default 10)"),
         area="team")
def cmd_aggregate(ctx, args):
    repo = ctx.repo
    users = local_users(repo) if args.all else [ctx.user]
    if not args.all and not ctx.store().exists():
        raise FlowForgeError("no private store for %s here: nothing to aggregate" % ctx.user)
    results = aggregate_stores(repo, users, args.full, args.wait)
    record_metrics(repo, last_aggregate_success=now())
    if queue_exists(repo):  # what a failed hook queued is done now
        queue = open_queue(repo)
        for user in users:
            queue.settle_key("aggregate:" + user)
        queue.close()
    lines = []
    for r in results:
        written = r["written"]
        if len(written) > 4:   # years of shards (a full run): their span, not 180 names
            lines.append("%s: wrote %d shards (first %s, last %s)" % (r["user"], len(written), shard_month(
                written[0][len("summaries/"):]), shard_month(written[-1][len("summaries/"):])))
        elif written:
            lines.append("%s: wrote %s" % (r["user"], ", ".join(written)))
        else:
            lines.append("%s: shards up to date" % r["user"])
    return ctx.emit("aggregate", {"results": results}, lines)


def _dims(text):
    dims = [d.strip() for d in (text or "").split(",") if d.strip()]
    bad = [d for d in dims if d not in REPORT_DIMENSIONS]
    twice = sorted({d for d in dims if dims.count(d) > 1})
    if bad or not dims or twice:
        guess = closest(bad[0], REPORT_DIMENSIONS) if bad else None
        what = ("no dimension %r%s" % (bad[0], " (did you mean %s?)" % guess if guess else "")
                if bad else "%s given twice" % twice[0] if twice else "no dimension given")
        raise FlowForgeError("--by: %s; it takes a comma-separated list of %s" % (
            what, ", ".join(REPORT_DIMENSIONS)), EXIT_USAGE)
    return dims


NO_AGGREGATE = arg("--no-aggregate", action="store_true", help="only what the ledger holds: do "
                   "not aggregate this clone's own stores first")


def _report_zone(ctx):
    """The zone of `report`'s and `bill`'s days: the user's store here (the one
    status and entries use), else the machine's."""
    try:
        store = ctx.store()
        zone = store.tz if store.exists() else None
    except FlowForgeError:  # no identity here (a CI clone, say)
        zone = None
    return zone or load_timezone(system_timezone_name())


def _today_local(ctx):
    return local_date(ctx.now, _report_zone(ctx))


def _report_arguments(what):
    return (arg("--period", metavar="P", help="today, yesterday, this-week, last-week, this-month, "
                "last-month, YYYY-MM, YYYY-Www or all%s" % (
                    " (default: all)" if what == "report" else " (default: last-month)")),
            arg("--from", dest="first", metavar="D", help="first day: YYYY-MM-DD, today, "
                "yesterday, mon..sun or -3d"),
            arg("--to", dest="last", metavar="D", help="last day (same forms as --from)"),
            arg("--user", dest="users", action="append", metavar="NAME", help="only these users "
                "(repeatable; * globs)"),
            arg("--project", dest="projects", action="append", metavar="NAME",
                help="only these projects (repeatable; * globs)"),
            arg("--issue", dest="issues", action="append", metavar="ISSUE",
                help="only these issues (repeatable; * globs)"),
            arg("-C", dest="repos", action="append", metavar="REPO", help="the repository (several "
                "-C: all of them, with a repo dimension)"),
            arg("--portfolio", metavar="FILE", help="the repositories listed in FILE, one clone "
                "path per line"),
            arg("--format", choices=("table", "json", "csv", "md", "html"), default="table",
                help="output format (default table; html: a complete page)"),
            arg("--output", metavar="FILE", help="write FILE (atomically) instead of printing"),
            arg("--open", action="store_true", help="open the page in the default browser "
                "(html; with no --output, a file under .flowforge/state/pages/)"),
            NO_AGGREGATE)


def _sources(ctx, args):
    """[(label, Repo)] of -C REPO (several) and --portfolio; one repository by default."""
    paths = list(args.repos or []) + (read_portfolio(args.portfolio) if args.portfolio else [])
    if not paths:
        return [(os.path.basename(ctx.repo.root), ctx.repo)]
    sources = open_sources(paths)
    ctx.args.C = sources[0][1].root     # whose store zone says what "today" is
    ctx._repo = sources[0][1]
    return sources


def _selection(ctx, args, default_period):
    first, last = resolve_range(args.period or (None if args.first or args.last else default_period),
                                args.first, args.last, _report_zone(ctx), ctx.now)
    return Selection(first, last, args.users, args.projects, args.issues)


def _check_users(sources, selection):
    """A --user without a glob that names nobody in these ledgers: a typo, said
    so (exit 64) rather than billed as nothing."""
    plain = [u for u in selection.patterns["users"] if not any(c in u for c in "*?[")]
    if not plain:
        return
    known = sorted({u for _, repo in sources for u in known_users(repo)})
    for user in plain:
        if user not in known:
            guess = closest(user, known)
            raise FlowForgeError("no user %s in the ledger%s; known users: %s" % (
                user, " (did you mean %s?)" % guess if guess else "", ", ".join(known) or "none"),
                EXIT_USAGE)


def _aggregate_sources(sources, args):
    """Aggregate the private stores of each repository first."""
    if args.no_aggregate:
        return []
    return [line for _, repo in sources for line in aggregate_own(repo)]


def _deliver(ctx, args, doc, text, name):
    """Write a report or bill: --output, --open (html), or stdout."""
    path = args.output
    if args.open and not path:
        if args.format != "html":
            raise FlowForgeError("--open shows a page: use it with --format html", EXIT_USAGE)
        pages = os.path.join(ctx.repo.state, "pages")
        makedirs_private(pages)
        first, last = doc["from"], doc["to"]
        span = "%s_%s" % (first, last) if first and last else "since-" + first if first else \
            "until-" + last if last else "all-time"
        path = os.path.join(pages, "%s-%s.html" % (name, span))
    ctx.write_output(text, path, 0o644)
    if path:
        info("wrote %s" % path)
    if args.open:
        import webbrowser
        if not webbrowser.open("file://" + os.path.abspath(path)):
            warn("no browser to open here: the page is %s" % path)


@command("report", "Team time from the ledger: every store ref this clone has fetched.",
         "flowforge report --period last-month --by user,issue --format html --output nov.html",
         arg("--by", default="user,issue", metavar="DIMS",
             help="comma-separated: %s (default user,issue)" % ",".join(REPORT_DIMENSIONS)),
         *_report_arguments("report"), area="team")
def cmd_report(ctx, args):
    dims = _dims(args.by)
    sources = _sources(ctx, args)
    selection = _selection(ctx, args, "all")
    _check_users(sources, selection)
    pending = _aggregate_sources(sources, args)
    as_json = UI.json or args.format == "json"
    report = build_report(sources, dims, selection, views=args.format == "html", documents=as_json)
    report["period"] = args.period
    for line in pending:   # after the report: a report that fails says one thing only
        warn(line)
    info(data_age_line(report["ledger"]))
    if as_json:
        del report["table"]   # the renderers' form of the rows
        text = json.dumps(report, sort_keys=True, indent=1) + "\n"
    elif args.format == "html":
        text = render_page(report)
    else:
        text = render_report(report, args.format)
    _deliver(ctx, args, report, text, "report")
    return EXIT_OK


@command("bill", "Billing lines; a closed month as invoiced, with adjustments after close.",
         "flowforge bill --month 2026-11 --format html --output invoice-2026-11.html",
         arg("--month", metavar="M", help="YYYY-MM (default: the last complete month)"),
         arg("--by-issue", action="store_true", help="one line per issue, not per project"),
         *_report_arguments("bill"), area="team")
def cmd_bill(ctx, args):
    if args.month and (args.first or args.last or args.period):
        raise FlowForgeError("use --month, --period or --from/--to, one of them", EXIT_USAGE)
    sources = _sources(ctx, args)
    if args.month:
        selection = Selection(*month_bounds(parse_month(args.month)), args.users, args.projects,
                              args.issues)
    else:
        selection = _selection(ctx, args, "last-month")
    first, last = selection.first, selection.last
    _check_users(sources, selection)
    whole = first and last and first[:7] == last[:7] and (first, last) == month_bounds(first[:7])
    pending = _aggregate_sources(sources, args)
    bill = build_bill(sources, selection, args.by_issue, month=first[:7] if whole else None)
    if last is None or last >= _today_local(ctx):   # after the bill: a failure says one thing
        pending.append("%s has not ended yet: this bill will still change"
                       % range_text(first, last))
    bill["period"] = args.period or ("last-month" if not (args.month or args.first or args.last)
                                     else None)
    for line in pending:
        warn(line)
    info(data_age_line(bill["ledger"]))
    if UI.json or args.format == "json":
        text = json.dumps(bill, sort_keys=True, indent=1) + "\n"
    elif args.format == "html":
        text = render_page(bill, build_report(sources, ["user", "issue"], selection, views=True))
    else:
        text = render_bill(bill, args.format)
    _deliver(ctx, args, bill, text, "bill")
    return EXIT_OK


def _month_to_close(ctx, text):
    month = parse_month(text)
    if month >= _today_local(ctx)[:7]:
        raise FlowForgeError("%s has not ended yet: a month is closed after its last day"
                             % month, EXIT_USAGE)
    return month


ONE_REPO = arg("-C", dest="repos", action="append", metavar="REPO", help="the repository (one: "
              "each repository closes its own months)")


def _one_repo(ctx, args):
    if len(args.repos or []) > 1:
        raise FlowForgeError("close and reopen one repository at a time (each keeps its own "
                             "closes): run it once per -C REPO", EXIT_USAGE)
    if args.repos:
        ctx.args.C = args.repos[0]
    return ctx.repo


@command("close", "Close a billed month: record its figures, signed by your git identity.",
         "flowforge close 2026-11",
         arg("month", metavar="MONTH", help="YYYY-MM, a month that has ended"), ONE_REPO,
         arg("--reason", metavar="TEXT", help="a note kept with the record"),
         arg("--no-push", action="store_true", help="record here only; `flowforge push` "
             "publishes it later"),
         arg("--no-fetch", action="store_true", help="close what this clone has, without "
             "fetching the team's ledger first"),
         NO_AGGREGATE, area="team")
def cmd_close(ctx, args):
    repo = _one_repo(ctx, args)
    month = _month_to_close(ctx, args.month)
    _, remotes, _ = run_git(["remote"], repo.root)
    if remotes.split() and not args.no_fetch:
        # what is closed is what the team has pushed: never a stale copy of it
        remote = default_remote(repo)
        try:
            fetched = ledger_fetch(repo, remote)
        except FlowForgeError as e:
            raise FlowForgeError("%s; a close needs the team's latest ledger (`--no-fetch` closes "
                                 "what this clone has)" % e, EXIT_UNAVAILABLE)
        for line in fetched["warnings"]:
            warn(line)
    for line in [] if args.no_aggregate else aggregate_own(repo):
        warn(line)
    record = close_month(repo, month, args.reason)
    lines = ["closed %s in %s: %s %s, %s h over %d store(s), by %s (%s%s)" % (
        month, os.path.basename(repo.root), record["total_amount"], record["currency"],
        decimal_hours(record["total_seconds"]), len(record["stores"]), record["by"],
        record["commit"][:12], ", GPG-signed" if git_config_get(repo.root, "commit.gpgsign")
        == "true" else "")]
    lines += _publish_period(repo, args.no_push)
    return ctx.emit("close", {"record": record}, lines)


@command("reopen", "Reopen a closed month (recorded; its next close records it again).",
         "flowforge reopen 2026-11 --reason 'late timesheet from bob'",
         arg("month", metavar="MONTH", help="YYYY-MM"), ONE_REPO,
         arg("--reason", metavar="TEXT", help="why, kept with the record"),
         arg("--no-push", action="store_true", help="record here only"), area="team")
def cmd_reopen(ctx, args):
    repo = _one_repo(ctx, args)
    record = reopen_month(repo, parse_month(args.month), args.reason)
    lines = ["reopened %s, signed by %s (%s)" % (record["month"], record["by"],
                                                record["commit"][:12])]
    lines += _publish_period(repo, args.no_push)
    return ctx.emit("reopen", {"record": record}, lines)


def _publish_period(repo, no_push):
    """Push a close or reopen at once; if that fails, the queue retries it."""
    _, remotes, _ = run_git(["remote"], repo.root)
    if no_push or not remotes.split():
        return ["not pushed: `flowforge push` publishes it"]
    remote = default_remote(repo)
    try:
        ledger_push(repo, remote, own_store_keys(repo), timeout=PUSH_TIMEOUT)
        return ["pushed to %s" % remote]
    except FlowForgeError as e:
        if getattr(e, "permanent", False):   # retrying would not help: say what to do
            warn("not pushed: %s" % one_line(e))
            return ["recorded here, not pushed"]
        queue = open_queue(repo)
        try:
            enqueue_push(queue, remote)
        finally:
            queue.close()
        return ["not pushed yet (%s); queued for the daemon" % one_line(e)]


# -- layers ------------------------------------------------------------------

@command("install", "Install git hook shims, or print/write scheduler entries for the daemon.",
         "flowforge install hooks",
         arg("what", choices=("hooks", "cron", "systemd", "launchd", "ci"),
             help="hooks: the git hook shims; cron/systemd/launchd: run the daemon; ci: the "
             "GitHub Actions reconcile workflow"),
         arg("--write", action="store_true", help="cron/systemd/launchd: install the entry "
             "instead of printing it"),
         area="setup")
def cmd_install(ctx, args):
    repo = ctx.repo
    if args.what == "hooks":
        directory, done = install_hooks(repo)
        lines = ["%s: %s (%s)" % (hook, what, directory) for hook, what in done]
        lines += ledger_fetch_setup(repo)
        return ctx.emit("install", {"hooks_dir": directory, "hooks": dict(done)}, lines)
    if args.what == "ci":
        path = os.path.join(repo.root, ".github", "workflows", "flowforge-reconcile.yml")
        try:
            current = read_bytes(path)
        except FileNotFoundError:
            current = None
        if current == WORKFLOW.encode("utf-8"):
            return ctx.emit("install", {"workflow": repo.rel(path), "changed": False},
                            ["%s is up to date" % repo.rel(path)])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, WORKFLOW.encode("utf-8"))
        return ctx.emit("install", {"workflow": repo.rel(path), "changed": True},
                        ["%s %s: commit it; it needs the repository's issues permission"
                         % ("updated" if current else "wrote", repo.rel(path))])
    entries = scheduler_entries(repo, args.what)
    if not args.write:
        if UI.json:
            return ctx.emit("install", {"entries": entries}, [])
        for path, content in entries.items():
            if args.what != "cron":
                sys.stdout.write("# %s\n" % path)
            sys.stdout.write(content if content.endswith("\n") else content + "\n")
        return EXIT_OK
    lines = []
    if args.what == "cron":
        write_crontab(entries["crontab"], repo.root)
        lines.append("added to your crontab: %s" % entries["crontab"].strip())
    else:
        for path, content in entries.items():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_write(path, content.encode("utf-8"), 0o644)
            lines.append("wrote %s" % path)
        if args.what == "systemd":
            unit = os.path.basename(sorted(entries)[0])
            lines.append("next: systemctl --user daemon-reload && systemctl --user enable --now %s"
                         " (or the -once.timer instead)" % unit)
        else:
            lines.append("next: launchctl bootstrap gui/$(id -u) %s" % list(entries)[0])
    return ctx.emit("install", {"written": list(entries)}, lines)


@command("uninstall", "Remove the git hook shims and restore a chained hook.",
         "flowforge uninstall hooks",
         arg("what", choices=("hooks",), help="what to remove"), area="setup")
def cmd_uninstall(ctx, args):
    directory, done = uninstall_hooks(ctx.repo)
    removed = remove_fetch_refspecs(ctx.repo)
    return ctx.emit("uninstall", {"hooks_dir": directory, "hooks": dict(done),
                                  "fetch_refspecs_removed": removed},
                    ["%s: %s" % kv for kv in done] + (
                        ["removed the ledger's fetch refspec from %d remote(s)" % removed]
                        if removed else []))


@command("hook", "Run a git hook (called by the shims; always exits 0).",
         "flowforge hook pre-commit",
         arg("name", choices=HOOKS, help="which hook"),
         arg("args", nargs="*", metavar="ARG", help="what git passes the hook (pre-push: the "
             "remote and its URL)"), area="layers")
def cmd_hook(ctx, args):
    line = {"pre-commit": hook_pre_commit, "post-commit": hook_post_commit,
            "pre-push": hook_pre_push}[args.name](args)
    if line:
        sys.stderr.write(line + "\n")
    return EXIT_OK


def _ran_line(ran, now_ts):
    """`job 3 (sync): queued, attempt 1/10, next in 2s: GitHub 502 ...` for queue run."""
    line = "job %(id)d (%(kind)s): %(outcome)s" % ran
    if ran["outcome"] == "done":
        return line
    line += ", attempt %d/%d" % (ran["attempts"], ran["max_attempts"])
    if ran["next_attempt_at"] is not None:
        line += ", next in %s" % format_duration(max(0, ran["next_attempt_at"] - now_ts))
    return line + ": " + " ".join((ran["error"] or "").split())[:200]


@command("queue", "Inspect and repair the retry queue.", "flowforge queue retry 12",
         arg("action", choices=("status", "list", "run", "retry", "dead", "purge"),
             help="status, list, run (each due job once), retry ID, dead (dead-lettered), purge (done)"),
         arg("id", nargs="?", type=number(int, 1, 2 ** 63 - 1), metavar="ID",
             help="job id (retry)"),
         arg("--once", action="store_true", help="run: one job at most"),
         arg("--status", choices=("queued", "leased", "done", "dead"), help="list: only these"),
         arg("--limit", type=number(int, 1, 100000), default=50, metavar="N",
             help="list: at most N jobs"),
         arg("--dead", action="store_true", help="purge: dead jobs too"),
         arg("--older-than", type=number(float, 0, 36500), default=0.0, metavar="DAYS",
             help="purge: only jobs finished at least DAYS ago"),
         area="layers")
def cmd_queue(ctx, args):
    repo = ctx.repo
    if args.action == "retry" and args.id is None:
        raise FlowForgeError("queue retry needs a job ID (see `flowforge queue list`)", EXIT_USAGE)
    queue = open_queue(repo)
    if args.action == "status":
        stats = queue.stats()
        c = stats["counts"]
        return ctx.emit("queue", stats, [
            "queued %d, running %d, done %d, dead %d" % (c["queued"], c["leased"], c["done"],
                                                         c["dead"]),
            "oldest waiting job: %s" % (format_duration(stats["oldest_age_seconds"])
                                        if stats["depth"] else "none")])
    if args.action in ("list", "dead"):
        jobs = queue.jobs("dead" if args.action == "dead" else args.status, args.limit)
        lines = ["%5d  %-6s  %-9s %-8s attempts %d/%d  %s" % (
            j["id"], j["status"], j["kind"], j["priority"], j["attempts"], j["max_attempts"],
            (j["last_error"] or "")[:100]) for j in jobs]
        return ctx.emit("queue", {"jobs": jobs}, lines or ["no jobs"])
    if args.action == "run":
        owner = "queue-run:%d" % os.getpid()
        outcomes = []
        due_by = queue.clock()      # one pass: a job that fails in it waits for its backoff
        while True:
            job = queue.claim(owner, due_by=due_by)
            if job is None:
                break
            ran = {"id": job.id, "kind": job.kind, "outcome": run_job(repo, queue, job)}
            if ran["outcome"] != "done":   # what went wrong, and when it is tried again
                [row] = queue.jobs(job_id=job.id)
                ran.update(error=row["last_error"], attempts=row["attempts"],
                           max_attempts=row["max_attempts"],
                           next_attempt_at=row["next_attempt_at"] if ran["outcome"] == "queued"
                           else None)
            outcomes.append(ran)
            if args.once:
                break
        return ctx.emit("queue", {"ran": outcomes}, [_ran_line(o, queue.clock()) for o in outcomes]
                        or ["no job is due"])
    if args.action == "retry":
        queue.retry(args.id)
        return ctx.emit("queue", {"retried": args.id}, ["job %d queued again" % args.id])
    count = queue.purge(args.dead, args.older_than * 86400)
    return ctx.emit("queue", {"purged": count}, ["purged %d job(s)" % count])


@command("daemon", "Run the polling daemon: aggregate changes, run due jobs, heartbeat.",
         "flowforge daemon --ensure",
         arg("--once", action="store_true", help="one round, then exit (for cron)"),
         arg("--interval", type=number(float, 1, 86400), metavar="S",
             help="seconds between rounds (default: "
             "config daemon.interval, 30)"),
         arg("--ensure", action="store_true", help="start a detached daemon unless one runs"),
         arg("--stop", action="store_true", help="stop the running daemon (SIGTERM)"),
         area="layers")
def cmd_daemon(ctx, args):
    repo = ctx.repo
    if sum(map(bool, (args.once, args.ensure, args.stop))) > 1:
        raise FlowForgeError("use one of --once, --ensure, --stop", EXIT_USAGE)
    repo.ensure_machine_dirs()
    if args.ensure:
        started, pid = ensure_daemon(repo)
        return ctx.emit("daemon", {"started": started, "pid": pid},
                        ["started the daemon (pid %s)" % pid if started
                         else "the daemon is running (pid %s)" % pid])
    if args.stop:
        pid = stop_daemon(repo)
        return ctx.emit("daemon", {"stopped": pid}, ["stopped the daemon (pid %s)" % pid])
    return Daemon(repo, args.interval, args.once).run()


@command("health", "Health of this clone's setup: exit 0 healthy, 1 degraded, 2 unhealthy.",
         "flowforge health --json", area="layers")
def cmd_health(ctx, args):
    checks = health_checks(ctx.repo)
    status = overall_health(checks)
    width = max(len(c["check"]) for c in checks)
    ctx.emit("health", {"status": status, "checks": checks},
             ["%-*s  %-9s  %s" % (width, c["check"], c["status"], c["detail"]) for c in checks]
             + ["overall: %s" % status])
    return HEALTH_CODES[status]


@command("metrics", "Counters and gauges for monitoring (Prometheus text or JSON).",
         "flowforge metrics --output /var/lib/node_exporter/textfile/flowforge.prom",
         arg("--format", choices=("prometheus", "json"), default="prometheus",
             help="output format (default prometheus)"),
         arg("--output", metavar="FILE", help="write FILE atomically instead of printing "
             "(for node_exporter's textfile collector)"),
         area="layers")
def cmd_metrics(ctx, args):
    repo = ctx.repo
    data = collect_metrics(repo)
    if UI.json or args.format == "json":
        text = json.dumps(dict(data, schema="flowforge.metrics/1"), sort_keys=True, indent=1) + "\n"
    else:
        text = render_prometheus(repo, data)
    ctx.write_output(text, args.output, 0o644)
    return EXIT_OK


@command("doctor", "Say what is wrong with this setup and how to fix it.", "flowforge doctor",
         area="setup")
def cmd_doctor(ctx, args):
    notes = []
    findings = doctor_findings(ctx.repo, notes)
    lines = ["problem: %s\n    fix: %s" % f for f in findings] or ["all good"]
    lines += ["note: %s" % n for n in notes]
    ctx.emit("doctor", {"findings": [{"problem": p, "fix": f} for p, f in findings],
                        "notes": notes}, lines)
    return EXIT_FAIL if findings else EXIT_OK


# -- recovery ------------------------------------------------------------------

@command("audit", "Verify or show the hash-chained audit records of aggregations.",
         "flowforge audit verify",
         arg("action", choices=("verify", "show"), help="verify every chain, or show one"),
         arg("--store", metavar="ID", help="show: the store (default: yours here)"),
         arg("--local", action="store_true", help="show: your private chain (exact times)"),
         arg("--since-hours", type=number(float, 0, 876000), default=720.0, metavar="H",
             help="verify: check committed history this far back (default 720)"),
         area="recovery")
def cmd_audit(ctx, args):
    repo = ctx.repo
    if args.action == "verify":
        result = verify_ledger(repo, history_since=now() - int(args.since_hours * 3600))
        findings = [f for f in result["findings"] if f["kind"] in ("audit", "ledger",
                                                                   "shard-audit", "audit-history")]
        for name in local_users(repo):
            local = AuditChain(os.path.join(PrivateStore(repo, name).dir, "audit.jsonl")).verify()
            if not local["ok"]:
                findings.append({"kind": "audit", "path": repo.rel(local["path"]),
                                 "detail": local["problem"]})
        lines = ["%s: %s" % (f["path"], f["detail"]) for f in findings]
        lines.append("%d chain(s) checked: %s" % (result["stores"], "all intact" if not findings
                                                   else "%d problem(s)" % len(findings)))
        ctx.emit("audit", {"chains": result["stores"], "findings": findings}, lines)
        return EXIT_FAIL if findings else EXIT_OK
    if args.local:
        path = os.path.join(ctx.store().dir, "audit.jsonl")
        records = AuditChain(path).records()
        if not records and not os.path.exists(path):
            raise FlowForgeError("no audit chain at %s" % repo.rel(path))
    else:
        store_id = args.store or ctx.store().store_id
        path, records = ledger_chain_records(repo, ctx.user, store_id)
    lines = []
    for r in records:
        if r is None:
            lines.append("(a damaged line)")
            continue
        day = local_date(r.get("ts", 0), _utc())
        total = sum(v for v in (r.get("totals") or {}).values() if isinstance(v, int))
        lines.append("%5s  %s  %-14s  %d file(s)  %s  %s" % (
            r.get("seq"), day, r.get("action"), len(r.get("files") or {}),
            format_duration(total) if total else "-", str(r.get("hash"))[:12]))
    return ctx.emit("audit", {"path": repo.rel(path) if args.local else path, "records": records},
                    lines or ["the chain is empty"])


@command("reconcile", "Find and repair missing aggregation; --ci: verify a clean checkout.",
         "flowforge reconcile --ci --report flowforge-reconcile.md",
         arg("--ci", action="store_true", help="verify shards, chains and authors without "
             "private data; exit 1 when something is wrong"),
         arg("--lookback-hours", type=number(float, 0, 87600), default=72.0, metavar="N",
             help="--ci: authors of the last N hours (default 72)"),
         arg("--report", metavar="FILE", help="--ci: write the Markdown report to FILE "
             "(also appended to $GITHUB_STEP_SUMMARY when set)"),
         area="recovery")
def cmd_reconcile(ctx, args):
    repo = ctx.repo
    if not args.ci:
        if args.report:
            raise FlowForgeError("--report goes with --ci", EXIT_USAGE)
        actions, result = reconcile_local(repo, args.lookback_hours)
        others = result["findings"]
        lines = actions or ["nothing to repair here"]
        lines += ["still wrong: %s: %s" % (f["path"], f["detail"]) for f in others]
        ctx.emit("reconcile", {"actions": actions, "findings": others}, lines)
        return EXIT_FAIL if others else EXIT_OK
    result = verify_ledger(repo, history_since=now() - int(args.lookback_hours * 3600))
    result["findings"] += close_problems(repo, result["view"].stores)
    missing = missing_aggregation(repo, args.lookback_hours, result["view"])
    report = ci_report_markdown(repo, result, missing, args.lookback_hours)
    adjusted = closed_adjustments(repo) if not result["findings"] else []
    if adjusted:
        result_line = report[report.rindex("**Result:"):]
        report = report[:report.rindex("**Result:")]
        report += "## Adjustments to closed months\n\nTime recorded into closed months " \
                  "after their close, not billed yet (the next open month's bill carries " \
                  "it):\n\n| month | closed by | time | amount | billed on |\n| --- | --- | " \
                  "---: | ---: | --- |\n" + "".join(
                      "| %s | %s | %s h | %s %s | %s |\n" % (
                          a["month"], a["closed_by"].replace("|", "/"), signed_hours(a["seconds"]),
                          a["amount"], a["currency"], a["billed_on"]) for a in adjusted) \
            + "\n" + result_line
    if args.report:
        atomic_write(os.path.abspath(args.report), report.encode("utf-8"), 0o644)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(report)
    problems = len(result["findings"]) + len(missing)
    if UI.json:
        ctx.emit("reconcile", {"findings": result["findings"], "missing": missing,
                               "notes": result["notes"], "shards": result["shards"],
                               "stores": result["stores"], "closed_adjustments": adjusted}, [])
    else:
        sys.stdout.write(report)
    return EXIT_FAIL if problems else EXIT_OK


@command("recover", "Disaster recovery: assess, reconstruct, validate, audit, deploy.",
         "flowforge recover reconstruct --from-mirror",
         arg("action", choices=("assess", "reconstruct", "validate", "audit", "deploy"),
             help="assess: what is damaged; reconstruct: stage repairs; validate: recompute and "
             "compare; audit: compliance report; deploy: swap the staged files in"),
         arg("--from-mirror", action="store_true", help="reconstruct: restore your private "
             "store from its copy outside the work tree"),
         arg("--store", metavar="ID", help="reconstruct: which mirrored store, when several"),
         arg("--rollback", action="store_true", help="deploy: put back what the last deploy "
             "replaced"),
         arg("--dry-run", action="store_true", help="say what would happen, change nothing"),
         area="recovery")
def cmd_recover(ctx, args):
    repo = ctx.repo
    if args.action == "assess":
        user = None
        try:
            user = ctx.user
        except FlowForgeError:
            pass
        found = assess(repo, user)
        lines = ["%-10s %s\n           fix: %s" % (f["area"], f["problem"], f["fix"]) for f in found]
        ctx.emit("recover", {"findings": found}, lines or ["nothing is damaged"])
        return EXIT_FAIL if found else EXIT_OK
    if args.action == "reconstruct":
        if not args.dry_run:
            repo.ensure_machine_dirs()
        plan = reconstruct(repo, ctx.user, args.from_mirror, args.store, args.dry_run)
        lines = ["%s %s (from %s)" % ("would stage" if args.dry_run else "staged", i["path"],
                                      i["source"]) for i in plan["items"]]
        lines += ["%s %s: restore %s as a new commit" % (
            "would stage" if args.dry_run else "staged", r["ref"], r["source"])
            for r in plan["refs"]]
        lines += ["cannot reconstruct %s" % u for u in plan["unrecoverable"]]
        lines += ["kept %s" % k for k in plan["kept"]]
        if (plan["items"] or plan["refs"]) and not args.dry_run:
            lines.append("next: `flowforge recover validate`, then `flowforge recover deploy`")
        ctx.emit("recover", plan, lines or ["nothing needs reconstructing"])
        return EXIT_FAIL if plan["unrecoverable"] else EXIT_OK
    if args.action == "validate":
        results = validate(repo)
        bad = [r for r in results if r["shard_seconds"] != r["recomputed_seconds"]
               or not r["identical"]]
        lines = ["%s%s: recomputed %s, shard %s" % (r["path"], " (staged)" if r["staged"] else "",
                                                    r["recomputed_seconds"], r["shard_seconds"])
                 for r in bad]
        lines.append("%d shard(s) recomputed from private data: %s" % (
            len(results), "all identical, to the second" if not bad else "%d differ" % len(bad)))
        ctx.emit("recover", {"results": results, "differ": len(bad)}, lines)
        return EXIT_FAIL if bad else EXIT_OK
    if args.action == "audit":
        rows = compliance_audit(repo)
        if UI.json:
            return ctx.emit("recover", {"stores": rows}, [])
        table = [[r["user"], r["store"], r["records"], "ok" if r["chain_ok"] else r["problem"],
                  "yes" if r["shards_matching"] else "no", format_hours(r["total_seconds"]),
                  r["last_record_day"] or "-"] for r in rows]
        sys.stdout.write(render("md", ["user", "store", "records", "chain", "shards match",
                                       "time", "last record"], table,
                                title="FlowForge audit, %s" % local_date(now(), _utc())))
        return EXIT_OK if all(r["chain_ok"] and r["shards_matching"] for r in rows) else EXIT_FAIL
    result = deploy(repo, args.dry_run, args.rollback)
    def done(item):
        if item.get("delete"):
            return "would delete" if args.dry_run else "deleted"
        if args.dry_run:
            return "would write"
        return "replaced" if item.get("backup") else "restored"
    lines = ["%s %s" % (done(i), i["path"]) for i in result["items"]]
    if not args.dry_run:
        lines.append("deploy %s done; `flowforge recover deploy --rollback` undoes it"
                     % result["id"])
    return ctx.emit("recover", result, lines)


@command("import", "Import from FlowForge v1, Watson or Timewarrior (idempotent).",
         "flowforge import watson ~/.config/watson/frames --default-issue OPS-1",
         arg("kind", choices=("v1", "watson", "timewarrior"), help="the source's format"),
         arg("path", metavar="PATH", help="v1: .task-times.json; watson: the frames file; "
             "timewarrior: its directory (with data/)"),
         arg("--map", action="append", default=[], metavar="OLD=NEW",
             help="v1: rename a user (repeatable)"),
         arg("--default-issue", metavar="ISSUE", help="watson/timewarrior: the issue of entries "
             "without an issue tag"),
         arg("--project", metavar="P", help="timewarrior: the project of every entry"),
         arg("--dry-run", action="store_true", help="count what would be imported"),
         arg("--allow-overlap", action="store_true", help="import entries that overlap other "
             "timed entries, marked as overlapping (default: refuse the import, naming them)"),
         arg("--skip-conflicts", action="store_true", help="import everything but the entries "
             "that overlap or overfill a day, and list those"),
         area="data")
def cmd_import(ctx, args):
    mapping = {}
    for item in args.map:
        old, sep, new = item.partition("=")
        if not sep or not old or not valid_user_name(new):
            raise FlowForgeError("--map takes OLD=NEW with a valid NEW user name", EXIT_USAGE)
        mapping[old] = new
    default_issue = parse_issue(args.default_issue) if args.default_issue else None
    project = parse_project(args.project)
    user = ctx.user
    store = ctx.store()
    zone = store.zone if store.exists() else Zone(system_timezone_name())
    path = os.path.abspath(os.path.expanduser(args.path))
    if args.kind == "timewarrior":
        if not os.path.isdir(path):
            raise FlowForgeError("%s is not a directory" % args.path, EXIT_USAGE)
        hasher = sha256_hasher()   # of the data files, in name order
        batch = parse_timewarrior(path, user, default_issue, project, zone, hasher)
    else:
        fd = open_source(path, args.path)
        try:
            stream = _json_source(path, fd)
            batch = (parse_v1(path, stream, mapping, zone) if args.kind == "v1"
                     else parse_watson(path, stream, user, default_issue, zone))
        finally:
            os.close(fd)
        hasher = stream.hasher
    data_sha = hasher.hexdigest()
    if args.allow_overlap and args.skip_conflicts:
        raise FlowForgeError("use --allow-overlap or --skip-conflicts, not both", EXIT_USAGE)
    summary = apply_import(ctx.repo, batch, user, data_sha, args.dry_run,
                           "allow" if args.allow_overlap else "skip" if args.skip_conflicts
                           else "refuse")
    verb = "would import" if args.dry_run else "imported"
    lines = ["%s %d entr%s for %s (%d already there)" % (
        verb, c["added"], "y" if c["added"] == 1 else "ies", u, c["already"])
        for u, c in sorted(summary["users"].items())] or ["nothing to import"]
    lines += ["%d of them overlap other entries (imported, marked)" % c["overlapping"]
              for c in summary["users"].values() if c["overlapping"]]
    lines += summary["timers"] + summary["review"] + summary["skipped"]
    if summary["unknown_fields"]:
        lines.append("unknown fields kept in the entries and the audit: %s"
                     % ", ".join(summary["unknown_fields"]))
    if not args.dry_run and any(c["added"] for c in summary["users"].values()):
        lines.append("next: `flowforge aggregate --all` (or commit: the hook aggregates yours)")
        warn_if_closed(ctx.repo, sorted(batch.imported_days), zone.date_of(ctx.now))
    return ctx.emit("import", summary, lines)


@command("export", "Export your own complete data (entries with notes, the timer).",
         "flowforge export --format csv --output my-time.csv",
         arg("--format", choices=("json", "csv"), default="json", help="output format (json)"),
         arg("--output", metavar="FILE", help="write FILE instead of printing"),
         area="data")
def cmd_export(ctx, args):
    store = ctx.store()
    if not store.exists():
        raise FlowForgeError("no private store for %s here: nothing to export" % store.user)
    doc = export_entries(store)
    text = (json.dumps(doc, sort_keys=True, indent=1) + "\n" if args.format == "json"
            else render_export_csv(doc, store.tz))
    ctx.write_output(text, args.output, 0o600)   # notes are private: 0600
    if args.output:
        info("exported %d entries to %s" % (len(doc["entries"]), args.output))
    return EXIT_OK


@command("erase", "Erase a user's private data and mirror (committed aggregates stay).",
         "flowforge erase --user alice --yes",
         arg("--yes", action="store_true", help="really erase (required)"),
         area="data")
def cmd_erase(ctx, args):
    user = ctx.user
    if not args.yes:
        raise FlowForgeError("erase removes %s's private data for good; add --yes" % user,
                             EXIT_USAGE)
    result = erase_user(ctx.repo, user)
    lines = ["erased %s" % r for r in result["removed"]] or ["nothing to erase for %s" % user]
    lines.append("the aggregates in the ledger stay (billing records); the "
                 "erasure is recorded in the team audit chain")
    return ctx.emit("erase", result, lines)


@command("plugins", "List the plugins found, or check the enabled ones (exit 1 on a problem).",
         "flowforge plugins check",
         arg("action", choices=("list", "check"), help="list: what was found; check: also run "
             "each enabled plugin's health hook (token, base URL, settings)"),
         arg("--online", action="store_true", help="check: also make one read-only request "
             "to each enabled provider"),
         area="plugins")
def cmd_plugins(ctx, args):
    if args.online and args.action != "check":
        raise FlowForgeError("--online goes with `plugins check`", EXIT_USAGE)
    rows = plugins_report(ctx.repo, check=args.action == "check", online=args.online)
    lines = ["%-10s %-9s %s%s%s" % (r["name"], r["status"], r["path"] or "-",
                                   "".join("\n           %s" % n for n in r["notes"]),
                                   ("\n           %s" % r["problem"]) if r["problem"] else "")
             for r in rows] or ["no plugins found (see plugins/README.md)"]
    ctx.emit("plugins", {"plugins": rows}, lines)
    bad = [r for r in rows if r["problem"] and (r["enabled"] or args.action == "list")]
    return EXIT_FAIL if args.action == "check" and bad else EXIT_OK


@command("quarantine", "List, restore or delete files set aside as damaged.",
         "flowforge quarantine restore Q3",
         arg("action", choices=("list", "restore", "delete"), help="what to do"),
         arg("id", nargs="?", metavar="ID", help="item id (restore, delete)"),
         arg("--force", action="store_true", help="restore over an existing file"),
         area="recovery")
def cmd_quarantine(ctx, args):
    quarantine = Quarantine(ctx.repo)
    if args.action == "list":
        items = quarantine.list()
        lines = ["%s  %s  %s  (%d bytes) %s" % (i["id"], i.get("original") or "?", i["reason"],
                                                 i.get("size", 0), i.get("file", "")) for i in items]
        return ctx.emit("quarantine", {"items": items}, lines or ["quarantine is empty"])
    if not args.id:
        raise FlowForgeError("quarantine %s needs an ID (see `flowforge quarantine list`)"
                             % args.action, EXIT_USAGE)
    if args.action == "restore":
        item = quarantine.restore(args.id, args.force)
        return ctx.emit("quarantine", {"restored": item}, ["restored %s to %s" % (
            item["id"], item["original"])])
    item = quarantine.delete(args.id)
    return ctx.emit("quarantine", {"deleted": item}, ["deleted %s" % item["id"]])


# -- parsing and main ------------------------------------------------------------

def _add_common(parser, suppress, skip=()):
    import argparse

    def default(value):
        # In sub-parsers SUPPRESS leaves the main parser's value alone, so that
        # `flowforge --json report` and `flowforge report --json` both work.
        return {"default": argparse.SUPPRESS if suppress else value}
    if "-C" not in skip:
        parser.add_argument("-C", metavar="REPO", help="run as if started in REPO",
                            **default(None))
    if "--user" not in skip:
        parser.add_argument("--user", metavar="NAME", help="act as this user (default: "
                            "$FLOWFORGE_USER, else git config)", **default(None))
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout",
                        **default(False))
    parser.add_argument("-q", "--quiet", action="store_true", help="fewer messages",
                        **default(False))
    parser.add_argument("-v", "--verbose", action="store_true", help="more messages",
                        **default(False))
    parser.add_argument("--color", choices=("auto", "always", "never"), help="colour output",
                        **default("auto"))


def _command_name(argv):
    """The command word of argv (skipping global options and their values), or None."""
    takes_value = ("-C", "--user", "--color")
    tokens = iter(argv)
    for token in tokens:
        if token in takes_value:
            next(tokens, None)
        elif not token.startswith("-"):
            return token
    return None


def _english(message):
    return message


def _english_plural(singular, plural, n):
    return singular if n == 1 else plural


def build_parser(only=None):
    """The argparse parser; with `only`, just that command's sub-parser is built,
    because building all of them costs the hot commands ~10 ms per run."""
    import argparse
    # FlowForge speaks English: argparse's gettext would stat dozens of locale
    # paths for each message it formats, on every run of every command.
    argparse._ = _english
    argparse.ngettext = _english_plural

    class Parser(argparse.ArgumentParser):
        def error(self, message):
            raise FlowForgeError("%s (see `%s --help`)" % (message, self.prog), EXIT_USAGE)

    def formatter(prog):   # a fixed width: no shutil import to ask the terminal
        return argparse.RawDescriptionHelpFormatter(prog, width=88, max_help_position=30)

    common = Parser(add_help=False, formatter_class=formatter)
    _add_common(common, suppress=True)
    # report and bill take -C and --user several times (repositories, a filter)
    common_filters = Parser(add_help=False, formatter_class=formatter)
    _add_common(common_filters, suppress=True, skip=("-C", "--user"))
    parser = Parser(prog="flowforge", formatter_class=formatter,
                    description="FlowForge: git-centric time tracking (TIME = MONEY).",
                    epilog="Run `flowforge COMMAND --help` for a command's options and an example.")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for spec in COMMANDS:
        if only and spec.name != only:
            continue
        p = sub.add_parser(spec.name, help=spec.summary, description=spec.summary,
                           epilog="example:\n  " + spec.example,
                           parents=[common_filters if spec.filters else common],
                           formatter_class=formatter)
        for flags, kwargs in spec.arguments:
            p.add_argument(*flags, **kwargs)
        p.set_defaults(handler=spec.func)
    return parser


def command_reference():
    """The README's command reference, generated from the registry (not from
    argparse's help formatting, which changes between Python versions)."""
    out = []
    areas = []
    for spec in COMMANDS:
        if spec.area not in areas:
            areas.append(spec.area)
    for area in areas:
        out.append("### %s\n" % area.capitalize())
        for spec in (s for s in COMMANDS if s.area == area):
            usage, rows = ["flowforge", spec.name], []
            for flags, kwargs in spec.arguments:
                if flags[0].startswith("-"):
                    name = ", ".join(flags)
                    if kwargs.get("action") != "store_true":
                        value = kwargs.get("metavar") or (
                            "{%s}" % ",".join(kwargs["choices"]) if "choices" in kwargs
                            else kwargs.get("dest", flags[-1].lstrip("-")).upper())
                        name += " " + value
                    usage.append("[%s %s]" % (flags[-1], name.split(" ", 1)[1])
                                 if " " in name else "[%s]" % flags[-1])
                else:
                    name = "|".join(kwargs["choices"]) if "choices" in kwargs else (
                        kwargs.get("metavar") or flags[0])
                    usage.append("[%s]" % name if kwargs.get("nargs") == "?" else name)
                rows.append("| `%s` | %s |" % (name.replace("|", "\\|"),
                                               kwargs.get("help", "").replace("|", "\\|")))
            out.append("#### `flowforge %s`\n\n%s\n\n```\n%s\n```\n" % (
                spec.name, spec.summary, " ".join(usage)))
            if rows:
                out.append("| argument | meaning |\n| --- | --- |\n" + "\n".join(rows) + "\n")
            out.append("Example: `%s`\n" % spec.example)
    return "\n".join(out)


# -- shell completion ----------------------------------------------------------
#
# The scripts are generated from the registry, like the README's reference:
# every command, its options and the values they take.  Issue references and
# entry ids come at completion time from `flowforge completion --words`.

_GLOBAL_OPTIONS = (("-C", "dirs"), ("--user", ""), ("--json", None), ("-q", None),
                   ("--quiet", None), ("-v", None), ("--verbose", None),
                   ("--color", "always auto never"), ("-h", None), ("--help", None))
_DAY_WORDS = "today yesterday mon tue wed thu fri sat sun"


def _completion_kind(flags, kwargs):
    """What a value of this argument is, for completion: a word list, `issues`,
    `entries`, `files`, `dirs`, or "" (anything); None for a flag with no value."""
    if kwargs.get("action") == "store_true":
        return None
    if "choices" in kwargs:
        return " ".join(kwargs["choices"])
    metavar, text = kwargs.get("metavar", ""), kwargs.get("help", "")
    if metavar == "ISSUE":
        return "@issues"
    if metavar == "ID" and "entry id" in text:
        return "@entries"
    if metavar in ("FILE", "PATH"):
        return "@files"
    if metavar == "D":
        return _DAY_WORDS
    if metavar == "TIME":
        return "now"
    return ""


def completion_specs():
    """[(command, summary, [(flag, kind)], [positional kinds])] from the registry."""
    specs = []
    for spec in COMMANDS:
        options, positionals = list(_GLOBAL_OPTIONS), []
        for flags, kwargs in spec.arguments:
            kind = _completion_kind(flags, kwargs)
            if flags[0].startswith("-"):
                options += [(flag, kind) for flag in flags]
            else:
                positionals.append(kind)
        specs.append((spec.name, spec.summary, options, positionals))
    return specs


def _bash_words(kind):
    if kind == "@files":
        return 'compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -f -- "$cur")'
    if kind == "dirs":
        return 'compopt -o filenames 2>/dev/null; mapfile -t COMPREPLY < <(compgen -d -- "$cur")'
    if kind in ("@issues", "@entries"):
        return ('COMPREPLY=($(compgen -W "$("${COMP_WORDS[0]}" "${ctx[@]}" completion --words %s '
                '2>/dev/null)" -- "$cur"))' % kind[1:])
    return 'COMPREPLY=($(compgen -W "%s" -- "$cur"))' % kind


def bash_completion():
    specs = completion_specs()
    out = ["# flowforge completion for bash (generated by `flowforge completion bash`)",
           "_flowforge() {",
           "    # bash splits 13:00 into 13 : 00 (COMP_WORDBREAKS); join them back",
           '    local words=() cword=0 i w',
           '    for ((i = 0; i < ${#COMP_WORDS[@]}; i++)); do',
           '        w="${COMP_WORDS[i]}"',
           '        if ((${#words[@]} > 1)) && [[ "$w" == ":" || "${words[${#words[@]}-1]}" == *: ]]; then',
           '            words[${#words[@]}-1]+="$w"',
           "        else",
           '            words+=("$w")',
           "        fi",
           '        ((i == COMP_CWORD)) && cword=$((${#words[@]} - 1))',
           "    done",
           '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${words[cword-1]}"',
           '    local cmd="" ctx=() npos=0',
           "    for ((i = 1; i < cword; i++)); do",
           '        case "${words[i]}" in',
           '            -C|--user) ctx+=("${words[i]}" "${words[i+1]}"); ((i++)) ;;',
           "            --color) ((i++)) ;;",
           "            -*) ;;",
           '            *) cmd="${words[i]}"; break ;;',
           "        esac",
           "    done",
           '    if [[ -z "$cmd" ]]; then',
           '        case "$prev" in -C) %s; return ;; --user) return ;; --color) %s; return ;; esac'
           % (_bash_words("dirs"), _bash_words("always auto never")),
           '        if [[ "$cur" == -* ]]; then',
           "            %s" % _bash_words(" ".join(f for f, _ in _GLOBAL_OPTIONS)),
           "        else",
           "            %s" % _bash_words(" ".join(name for name, _, _, _ in specs)),
           "        fi",
           "        return",
           "    fi",
           '    case "$cmd" in']
    for name, _, options, positionals in specs:
        values = [(f, k) for f, k in options if k is not None]
        value_flags = "|".join(f for f, _ in values)
        out.append("    %s)" % name)
        out.append('        case "$prev" in')
        for flag, kind in values:
            out.append("            %s) %s; return ;;" % (flag, _bash_words(kind) if kind else
                                                            "COMPREPLY=()"))
        out.append("        esac")
        out.append('        if [[ "$cur" == -* ]]; then %s; return; fi'
                   % _bash_words(" ".join(f for f, _ in options)))
        if positionals:
            # which positional is this: count the words after the command, skipping option values
            out.append("        for ((i = i + 1; i < cword; i++)); do")
            out.append('            case "${words[i]}" in %s) ((i++)) ;; -*) ;; *) ((npos++)) ;; '
                       'esac' % (value_flags or "--"))
            out.append("        done")
            out.append('        case "$npos" in')
            for n, kind in enumerate(positionals):
                if kind:
                    out.append("            %d) %s ;;" % (n, _bash_words(kind)))
            out.append("        esac")
        out.append("        ;;")
    out += ["    esac", "}", "complete -F _flowforge flowforge", ""]
    return "\n".join(out)


def zsh_completion():
    """zsh runs the bash function through bashcompinit (part of zsh); source it
    from ~/.zshrc."""
    return ("# flowforge completion for zsh (generated by `flowforge completion zsh`);\n"
            "# in ~/.zshrc: source <(flowforge completion zsh)\n"
            "(( $+functions[compdef] )) || { autoload -U +X compinit && compinit }\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + bash_completion())


def fish_completion():
    def quote(text):
        return "'%s'" % text.replace("\\", "\\\\").replace("'", "\\'")

    def values(kind):
        if kind in ("@issues", "@entries"):
            return "-a %s" % quote("(flowforge completion --words %s 2>/dev/null)" % kind[1:])
        if kind == "@files":
            return "-F"
        if kind == "dirs":
            return "-a %s" % quote("(__fish_complete_directories)")
        return "-a %s" % quote(kind) if kind else ""
    specs = completion_specs()
    out = ["# flowforge completion for fish (generated by `flowforge completion fish`)",
           "complete -c flowforge -f"]
    for name, summary, _, _ in specs:
        out.append("complete -c flowforge -n __fish_use_subcommand -a %s -d %s"
                   % (name, quote(summary)))
    for name, _, options, positionals in specs:
        cond = "-n %s" % quote("__fish_seen_subcommand_from %s" % name)
        for flag, kind in options[len(_GLOBAL_OPTIONS):]:
            switch = "-l %s" % flag[2:] if flag.startswith("--") else "-s %s" % flag[1:]
            extra = "" if kind is None else ("-r " + values(kind)).strip()
            out.append(("complete -c flowforge %s %s %s" % (cond, switch, extra)).rstrip())
        if positionals and positionals[0]:
            out.append("complete -c flowforge %s %s" % (cond, values(positionals[0])))
    for flag, kind in _GLOBAL_OPTIONS:
        switch = "-l %s" % flag[2:] if flag.startswith("--") else "-s %s" % flag[1:]
        out.append(("complete -c flowforge %s %s" % (switch, "" if kind is None else
                                                     ("-r " + values(kind)).strip())).rstrip())
    return "\n".join(out) + "\n"


def completion_words(ctx, what):
    """Recent issue references (the running timer's first) or entry ids of the
    user, newest first: what the completion scripts offer at run time."""
    store = ctx.store()
    if not store.exists():
        return []
    today = store.zone.date_of(ctx.now)
    found = Timers(store, ctx.now).entries(shift_day(today, -30), today)
    found.sort(key=lambda e: (e["day"], entry_start(e) or 0), reverse=True)
    if what == "entries":
        return [e["id"] for e in found]
    with store.lock():
        timer = store.load_timer()
    words = [timer["issue"]] if timer else []
    for e in found:
        if e["issue"] not in words:
            words.append(e["issue"])
    return words


def time_forms_reference():
    """The README's table of time and day forms, from TIME_FORMS and DAY_FORMS."""
    rows = ["| you type | it means |", "| --- | --- |"]
    rows += ["| %s | %s |" % (", ".join("`%s`" % f.strip() for f in forms.split(",")), meaning)
             for forms, meaning in TIME_FORMS]
    rows += ["", "| a day (`--date`, `--from`, `--to` of `entries`) | it means |", "| --- | --- |"]
    rows += ["| %s | %s |" % (", ".join("`%s`" % f.strip() for f in forms.split(",")),
                              meaning or "that day") for forms, meaning in DAY_FORMS]
    return "\n".join(rows) + "\n"


def _configure_ui(args):
    UI.json = bool(args.json)
    UI.quiet = bool(args.quiet)
    UI.verbose = bool(args.verbose)
    if args.color == "always":
        UI.color = True
    elif args.color == "never" or UI.json:
        UI.color = False
    else:
        UI.color = (sys.stdout.isatty() and os.environ.get("TERM") != "dumb"
                    and not os.environ.get("NO_COLOR")) or bool(os.environ.get("FORCE_COLOR"))


def _negative(token):
    """`-15m`, `-1h`: a token argparse would take for an option."""
    return token[:1] == "-" and token[1:2].isdecimal()


def _join_relative_times(argv):
    """`--at -15m` -> `--at=-15m`: argparse would take -15m for an option.
    A negative DURATION (`log 123 -1h`) is refused here with its own words,
    not with argparse's "the following arguments are required"."""
    out = []
    for token in argv:
        if out and out[-1] in ("--at", "--start", "--end", "--date", "--from", "--to") \
                and _negative(token):
            out[-1] = out[-1] + "=" + token
        else:
            out.append(token)
    if _command_name(out) == "log":
        takes_value = ("-C", "--user", "--color", "--start", "--end", "--date", "--project",
                       "--note", "--key")
        for before, token in zip([None] + out, out):
            if _negative(token) and before not in takes_value:
                raise FlowForgeError(
                    "duration %r is not valid: a duration is positive (for time in the past give "
                    "--date yesterday, or --start/--end; to take time off an entry, `flowforge "
                    "edit ID --duration`)" % token, EXIT_USAGE)
    return out


class _Args:
    """An argparse.Namespace, without importing argparse."""

    def __init__(self, **values):
        self.__dict__.update(values)


_COMMON_SWITCHES = {"--json": "json", "-q": "quiet", "--quiet": "quiet", "-v": "verbose",
                    "--verbose": "verbose"}
_COMMON_VALUES = {"-C": ("C", None), "--user": ("user", None),
                  "--color": ("color", ("auto", "always", "never"))}


def quick_args(argv):
    """What argparse makes of a plain command line, without argparse: importing
    and building it (with the `re` it imports) is most of a timer command's cost.
    Plain means options spelled in full (`--at 9:30` or `--at=9:30`), values that
    do not start with `-`, no `-h`, the right number of arguments; anything else
    -- and every mistake -- returns None and goes to argparse, which has the
    words for it.  tests/test_hot_path.py holds the two to the same result."""
    name = _command_name(argv)
    spec = next((s for s in COMMANDS if s.name == name), None)
    if spec is None or spec.filters:
        return None
    values = dict(C=None, user=None, json=False, quiet=False, verbose=False, color="auto",
                  command=name, handler=spec.func)
    switches, options, positionals = dict(_COMMON_SWITCHES), dict(_COMMON_VALUES), []
    converters = {}
    for flags, kwargs in spec.arguments:
        if set(kwargs) - {"help", "metavar", "choices", "nargs", "action", "type", "default"} or \
                kwargs.get("action") not in (None, "store_true") or kwargs.get("nargs") not in (None, "?"):
            return None   # lists, counts, appends: argparse's business
        if "type" in kwargs and not (getattr(kwargs["type"], "quick", False)
                                     and flags[0].startswith("-")
                                     and not isinstance(kwargs.get("default"), str)):
            return None   # other types, or a text default that argparse would convert
        if not flags[0].startswith("-"):
            if "default" in kwargs:
                return None
            positionals.append((flags[0], kwargs))
            values[flags[0]] = None
            continue
        dest = flags[-1].lstrip("-").replace("-", "_")
        values[dest] = kwargs.get("default", False if kwargs.get("action") else None)
        if "type" in kwargs:
            converters[dest] = kwargs["type"]
        for flag in flags:
            if kwargs.get("action"):
                switches[flag] = dest
            else:
                options[flag] = (dest, kwargs.get("choices"))
    # argparse gives an optional positional its default at the first option after
    # the command word, so a positional after an option is not for it: not plain
    optional = any(kwargs.get("nargs") == "?" for _, kwargs in positionals)
    given, tokens, before_command, options_seen = [], iter(argv), True, False
    for token in tokens:
        if not token.startswith("-"):
            if before_command:
                before_command = False   # the command word
            elif optional and options_seen:
                return None
            else:
                given.append(token)
            continue
        options_seen = options_seen or not before_command
        flag, equals, value = token.partition("=")
        if before_command and flag not in _COMMON_SWITCHES and flag not in _COMMON_VALUES:
            return None
        if flag in switches and not equals:
            values[switches[flag]] = True
        elif flag in options:
            if not equals:
                value = next(tokens, None)
                if value is None or value.startswith("-"):
                    return None
            dest, choices = options[flag]
            if choices and value not in choices:
                return None
            if dest in converters:
                try:
                    value = converters[dest](value)
                except Exception:   # argparse's ArgumentTypeError: argparse says it
                    return None
            values[dest] = value
        else:
            return None
    required = sum(1 for _, kwargs in positionals if kwargs.get("nargs") != "?")
    if not required <= len(given) <= len(positionals):
        return None
    for (dest, kwargs), value in zip(positionals, given):
        if kwargs.get("choices") and value not in kwargs["choices"]:
            return None
        values[dest] = value
    return _Args(**values)


class _HookArgs:
    """What argparse would give `hook NAME ARGS...` with no options."""

    def __init__(self, name, args):
        self.name, self.args = name, args
        self.C = self.user = None


def main(argv=None):
    """Run one command; returns the exit code (see the module docstring)."""
    try:
        argv = _join_relative_times(sys.argv[1:] if argv is None else list(argv))
        if len(argv) >= 2 and argv[0] == "hook" and argv[1] in HOOKS and not any(
                a.startswith("-") for a in argv[1:]):
            # The shims' call, on every commit and push: no argparse (~5 ms to build).
            return cmd_hook(None, _HookArgs(argv[1], argv[2:]))
        name = _command_name(argv)
        before = argv[:argv.index(name)] if name in argv else argv
        if before.count("-C") > 1:   # argparse would keep the last one, silently
            raise FlowForgeError("-C is given %d times before the command: give it once (report "
                                 "and bill take several -C after the command word)"
                                 % before.count("-C"), EXIT_USAGE)
        known = any(spec.name == name for spec in COMMANDS)
        if name is not None and not known:
            guess = closest(name, [spec.name for spec in COMMANDS])
            raise FlowForgeError("unknown command %r%s (`flowforge --help` lists them)" % (
                name, ": did you mean %s?" % guess if guess else ""), EXIT_USAGE)
        args = quick_args(argv) if known else None
        if args is None:
            parser = build_parser(name if known else None)
            args, extra = parser.parse_known_args(argv)
            if extra and name == "log" and args.duration is None and len(extra) == 1 \
                    and not extra[0].startswith("-"):
                args.duration = extra[0]   # `log 123 --date yesterday 2h`: after the options
            elif extra:   # said by the command's own help, which lists what it takes
                raise FlowForgeError("unrecognized arguments: %s (see `flowforge %s --help`)" % (
                    " ".join(extra), name) if known else "unrecognized arguments: %s (see "
                    "`flowforge --help`)" % " ".join(extra), EXIT_USAGE)
        _configure_ui(args)
        if not getattr(args, "handler", None):
            raise FlowForgeError("no command given (`flowforge --help` lists them)", EXIT_USAGE)
        return args.handler(Context(args), args) or EXIT_OK
    except FlowForgeError as e:
        sys.stderr.write("flowforge: %s\n" % e)
        return e.exit_code
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            return EXIT_OK
        where = " %s" % e.filename if e.filename else ""
        sys.stderr.write("flowforge: cannot access%s: %s\n" % (where, e.strerror or e))
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            return EXIT_CANTCREAT   # a full disk (behind stdout, say), as for FlowForge's writes
        return StorageError.EXIT_CODES.get(e.errno, EXIT_FAIL)
    except KeyboardInterrupt:
        sys.stderr.write("flowforge: interrupted\n")
        return 130


def run():
    """The command's entry point: main(), then exit without tearing the
    interpreter down -- freeing this module's thousands of objects one by one
    costs ~2 ms, a fifth of a timer command's budget.  Every file FlowForge
    writes is written with os.write and closed by then; only the standard
    streams are buffered, and they are flushed here (output that cannot be
    written is one line and exit 73, a closed pipe is not an error).  After a
    plugin ran, or with a thread still running, the ordinary exit runs their
    atexit handlers, closes their files and waits.

    The cycle collector is off for a command: its data (shards, rows, records)
    holds no reference cycles, and a full collection walks every object alive
    each time the heap grows by a quarter -- 30% of a cold report's time over
    a thousand stores.  The daemon, the one process that lives on, turns it back
    on."""
    import gc
    gc.disable()
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    except OSError as e:
        sys.stderr.write("flowforge: cannot write the output: %s\n" % (e.strerror or e))
        code = code or StorageError.EXIT_CODES.get(e.errno, EXIT_CANTCREAT)
    except ValueError:   # stdout closed by the caller
        pass
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    threading = sys.modules.get("threading")
    if PLUGINS_RUN or (threading is not None and threading.active_count() > 1):
        try:
            sys.stdout = open(os.devnull, "w")   # flushed above; nothing to say twice at exit
        except OSError:
            pass
        raise SystemExit(code)
    os._exit(code)



# ############################################################################
# 16. Fast start: the timer commands on the part of this module they use
# ############################################################################

# Unmarshalling this module's bytecode (1 MB, 1,300 functions) is most of what
# a timer command costs above the interpreter's own start.  install.sh writes a
# second cache beside the bytecode, with the module's top-level statements in
# two parts: the fast part -- every statement that is not a definition, the
# definitions of main, run and the FAST_COMMANDS, and every definition their
# names lead to, transitively -- and the rest.  For those commands the launcher
# runs the fast part (a third of the bytecode) and keeps the rest's bytes
# unread until something asks for a name that is not there: a plugin's
# `flowforge.NAME`, or a FAST_BOUNDARY call.  Then the rest runs in the same
# globals and the module is whole, as if imported.  tests/test_hot_path.py
# holds the parts to that: closed under their names, never binding a name
# twice, and whole again after complete_module().

FAST_COMMANDS = ("start", "stop", "status", "switch", "pause", "resume", "cancel", "log")
# Names main() calls only on the way out of the fast part: argparse, for a
# command line quick_args does not take, and the hook shims' command.  In the
# fast part each is a function that completes the module, then calls the real one.
FAST_BOUNDARY = ("build_parser", "cmd_hook", "_HookArgs")
FAST_START_FORMAT = b"flowforge-fast-start/2"
# While this module is the fast part: (the cache file, open where the rest's
# marshalled code begins, the rest's length, its crc32).  A reinstall
# replaces the file, not these bytes.
_rest_of_module = None


def complete_module():
    """Run the rest of the module, once (nothing to do when it is whole).

    The rest's bytes are checked as the fast part's were: a cache torn or
    damaged after the launcher read its header (it is a file like any other)
    gives the rest compiled from the source instead, not half a module.  A name
    of the rest that is already set, but for the boundary stubs it replaces, was
    set by someone else -- a plugin's `flowforge.NAME = ...` (the fast part
    binds none of them) -- and stays."""
    global _rest_of_module
    rest, _rest_of_module = _rest_of_module, None
    if rest is None:
        return
    import marshal
    cache, size, crc = rest
    try:
        with cache:
            data = cache.read(size + 1)
        if len(data) != size or zlib.crc32(data) != crc:
            raise ValueError("the fast-start cache changed after its header was read")
        code = marshal.loads(data)
    except (OSError, ValueError, EOFError, TypeError, OverflowError, MemoryError):
        with open(__file__, "rb") as f:
            code = marshal.loads(fast_start_parts(f.read(), __file__)[1])
    names = globals()
    before = dict(names)
    exec(code, names)
    names.update((name, value) for name, value in before.items() if names[name] is not value
                 and not getattr(value, "__qualname__", "").startswith("_leaving_fast_part."))
    COMMANDS.sort(key=lambda spec: spec.func.__code__.co_firstlineno)   # source order


def __getattr__(name):
    """`flowforge.NAME` that the fast part does not have (PEP 562).  Not for
    the import system's probes (`__spec__`, `__path__`): none is in the rest;
    but `__all__`, which `from flowforge import *` asks for (there is none:
    the star import then takes every public name, of the whole module)."""
    if _rest_of_module is not None and (not name.startswith("__") or name == "__all__"):
        complete_module()
        if name in globals():
            return globals()[name]
    raise AttributeError("module 'flowforge' has no attribute %r" % name)


def __dir__():
    """dir(flowforge): the whole module's names, as imported."""
    complete_module()
    return sorted(globals())


def _leaving_fast_part(name):
    def call(*args, **kwargs):
        complete_module()
        return globals()[name](*args, **kwargs)
    return call


def fast_start_parts(source, filename):
    """The fast part and the rest of `source` (this module's text), each as
    marshalled code; the fast part without docstrings (nothing here reads
    them).  A statement's names are every Name in it, locals too: more than
    it needs is only a larger fast part."""
    import ast
    import marshal
    body = ast.parse(source, filename).body
    binds, names = {}, []
    for i, statement in enumerate(body):
        if isinstance(statement, (ast.FunctionDef, ast.ClassDef)):
            bound = {statement.name}
        else:
            bound = {node.id for node in ast.walk(statement)
                     if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}
            bound |= {(alias.asname or alias.name).split(".")[0] for node in ast.walk(statement)
                      if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
        for name in bound:
            binds.setdefault(name, []).append(i)
        names.append({node.id for node in ast.walk(statement) if isinstance(node, ast.Name)})
    roots = {"main", "run", "__getattr__", "__dir__", "_leaving_fast_part"} | {
        "cmd_" + name for name in FAST_COMMANDS}
    todo = [i for i, statement in enumerate(body)
            if not isinstance(statement, (ast.FunctionDef, ast.ClassDef)) or statement.name in roots]
    fast = set()
    while todo:
        i = todo.pop()
        if i not in fast:
            fast.add(i)
            todo += [j for name in names[i] - set(FAST_BOUNDARY) for j in binds.get(name, ())]
    stubs = ast.parse("".join("%s = _leaving_fast_part(%r)\n" % (name, name)
                              for name in FAST_BOUNDARY), filename).body
    fast_code = compile(ast.Module([body[i] for i in sorted(fast)] + stubs, []), filename, "exec",
                        optimize=2)
    rest = compile(ast.Module([s for i, s in enumerate(body) if i not in fast], []), filename, "exec")
    return marshal.dumps(fast_code), marshal.dumps(rest)


LAUNCHER = """\
#!%(python)s -S
# FlowForge launcher written by install.sh (flowforge.py, section 16).  It
# imports the module, so that its bytecode is cached; -S skips site-packages,
# which FlowForge does not use.  A timer command given first (`flowforge stop`)
# starts on the part of the module it uses instead, from the cache beside the
# bytecode, when that cache is for this interpreter and this flowforge.py.
import sys
sys.path.insert(0, %(lib)r)


def fast_start():
    import marshal
    import os
    import zlib
    from _frozen_importlib_external import MAGIC_NUMBER
    try:
        cache = open(%(cache)r, "rb")
        header = cache.readline().split()
        stat = os.stat(%(source)r)
        if header[:4] != [%(format)r, MAGIC_NUMBER.hex().encode(), b"%%d" %% stat.st_mtime_ns,
                          b"%%d" %% stat.st_size] or sys.argv[1].encode() not in header[4].split(b","):
            return None
        data = cache.read(int(header[5]))
        if zlib.crc32(data) != int(header[6]):
            return None
        fast = marshal.loads(data)
        rest = (cache, int(header[7]), int(header[8]))
    except (OSError, ValueError, EOFError, TypeError, IndexError, OverflowError, MemoryError):
        return None
    if type(fast) is not type(fast_start.__code__):
        return None
    module = type(sys)("flowforge")
    module.__file__ = %(source)r
    module.__spec__ = None   # as for a script: nothing to find it again with
    sys.modules["flowforge"] = module
    exec(fast, module.__dict__)
    module._rest_of_module = rest   # read only when asked for: two thirds of the bytes
    return module


module = fast_start() if len(sys.argv) > 1 else None
if module is None:
    import flowforge as module
module.run()
"""


def write_launcher(path, cache=None):
    """Write the `flowforge` command at `path` for this module's file, and its
    fast-start cache (by default beside the bytecode).  The cache's first line
    says which interpreter and which file it is for (magic number, mtime and
    size, as the bytecode cache does), and the length and crc32 of each part;
    a launcher that finds anything else imports the whole module."""
    from importlib.util import MAGIC_NUMBER
    source_path = os.path.abspath(__file__)
    cache = cache or os.path.join(os.path.dirname(source_path), "__pycache__", "flowforge.fast-start")
    with open(source_path, "rb") as f:
        stat = os.fstat(f.fileno())
        source = f.read()
    fast, rest = fast_start_parts(source, source_path)
    header = b"%s %s %d %d %s %d %d %d %d\n" % (
        FAST_START_FORMAT, MAGIC_NUMBER.hex().encode(), stat.st_mtime_ns, stat.st_size,
        ",".join(FAST_COMMANDS).encode(), len(fast), zlib.crc32(fast), len(rest), zlib.crc32(rest))
    makedirs_private(os.path.dirname(cache))
    atomic_write(cache, header + fast + rest, 0o644)
    text = LAUNCHER % {"python": sys.executable, "lib": os.path.dirname(source_path),
                       "cache": cache, "source": source_path, "format": FAST_START_FORMAT}
    atomic_write(path, text.encode(), 0o755, durable=False)


if __name__ == "__main__":
    run()
