"""Time, duration, issue and name parsing; midnight and DST splitting."""
from datetime import datetime, timezone

import pytest

import flowforge as ff

UTC = timezone.utc
NOW = int(datetime(2026, 11, 22, 15, 0, tzinfo=UTC).timestamp())


def ts(*args, tz=UTC):
    return int(datetime(*args, tzinfo=tz).timestamp())


@pytest.mark.parametrize("text,expected", [
    ("now", NOW),
    ("09:30", ts(2026, 11, 22, 9, 30)),
    ("9:05:07", ts(2026, 11, 22, 9, 5, 7)),
    ("2026-11-20 09:30", ts(2026, 11, 20, 9, 30)),
    ("2026-11-20T09:30:15", ts(2026, 11, 20, 9, 30, 15)),
    ("2026-11-20T09:30:00Z", ts(2026, 11, 20, 9, 30)),
    ("2026-11-20T09:30:00+01:00", ts(2026, 11, 20, 8, 30)),
    ("2026-11-20T09:30:00-0230", ts(2026, 11, 20, 12, 0)),
    ("2026-11-20", ts(2026, 11, 20)),
    ("-15m", NOW - 900),
    ("-1h30m", NOW - 5400),
    ("-1:30", NOW - 5400),
])
def test_parse_time_forms(text, expected):
    assert ff.parse_time(text, UTC, NOW) == expected


def test_parse_time_uses_the_zone_for_local_forms():
    berlin = ff.load_timezone("Europe/Berlin")
    assert ff.parse_time("09:30", berlin, NOW) == ts(2026, 11, 22, 8, 30)
    assert ff.parse_time("2026-07-01 09:30", berlin, NOW) == ts(2026, 7, 1, 7, 30)
    # an explicit offset wins over the zone
    assert ff.parse_time("2026-07-01T09:30+00:00", berlin, NOW) == ts(2026, 7, 1, 9, 30)


@pytest.mark.parametrize("text", ["", "yesterday", "25:00", "09:60", "2026-13-01 09:00",
                                  "2026-02-30", "-", "-abc", "--15m", "09:30 xm", "2026-11-20T",
                                  "1700000000", "2026-11-20 09:30 +5"])
def test_parse_time_rejects(text):
    with pytest.raises(ff.FlowForgeError) as e:
        ff.parse_time(text, UTC, NOW)
    assert e.value.exit_code == ff.EXIT_USAGE


@pytest.mark.parametrize("text,seconds", [
    ("90m", 5400), ("1h30m", 5400), ("1h 30m", 5400), ("1.5h", 5400), ("1:30", 5400),
    ("1:30:15", 5415), ("45s", 45), ("2h", 7200), ("0.1h", 360), ("1.33h", 4788),
    ("1h30m15s", 5415), ("1.5m", 90), ("24h", 86400), ("0.0002h", 1),
])
def test_parse_duration(text, seconds):
    assert ff.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "1.5", "h", "-1h", "0m", "0:00", "1m1h", "1h1h",
                                  "1:60", "abc", "1x", "1,5h", "1h-30m", "0.0001h"])
def test_parse_duration_rejects(text):
    with pytest.raises(ff.FlowForgeError) as e:
        ff.parse_duration(text)
    assert e.value.exit_code == ff.EXIT_USAGE


def test_duration_without_unit_gets_a_hint():
    with pytest.raises(ff.FlowForgeError, match="give a unit"):
        ff.parse_duration("30")


@pytest.mark.parametrize("text,canonical", [
    ("123", "123"), ("#123", "123"), ("#007", "7"), ("owner/repo#123", "owner/repo#123"),
    ("my.org/my-repo#9", "my.org/my-repo#9"), ("ABC-12", "ABC-12"), ("abc-12", "ABC-12"),
])
def test_parse_issue(text, canonical):
    assert ff.parse_issue(text) == canonical


@pytest.mark.parametrize("text", ["", "#", "abc", "12 3", "owner/#1", "/repo#1", "a/b/c#1",
                                  "../x#1", "ABC-", "-12", "=cmd()", "1" * 13, "owner/repo#x"])
def test_parse_issue_rejects(text):
    with pytest.raises(ff.FlowForgeError) as e:
        ff.parse_issue(text)
    assert e.value.exit_code == ff.EXIT_USAGE


@pytest.mark.parametrize("name,ok", [
    ("alice", True), ("jane.doe", True), ("a_b-c", True), ("x" * 64, True), ("x" * 65, False),
    ("", False), (".hidden", False), ("..", False), ("../x", False), ("a/b", False),
    ("a b", False), ("-x", False), ("ünï", False), ("a\nb", False),
])
def test_user_names(name, ok):
    assert ff.valid_user_name(name) is ok


def test_derive_user_name_from_email():
    assert ff.derive_user_name("Jane.Doe+work@example.com") == "jane.doe"
    assert ff.derive_user_name("a b@x") == "a-b"
    assert ff.derive_user_name("...@x") == ""


def test_split_at_utc_midnight():
    clock = ff.DayClock(ff.Zone("UTC"))
    parts = clock.split(ts(2026, 11, 21, 23, 30), ts(2026, 11, 22, 0, 45))
    assert parts == [("2026-11-21", 1800), ("2026-11-22", 2700)]


def test_split_over_several_days_sums_exactly():
    clock = ff.DayClock(ff.Zone("Asia/Kolkata"))
    start, end = ts(2026, 1, 30, 10, 0), ts(2026, 2, 2, 5, 17, 3)
    parts = clock.split(start, end)
    assert sum(s for _, s in parts) == end - start
    assert [d for d, _ in parts] == ["2026-01-30", "2026-01-31", "2026-02-01", "2026-02-02"]


def test_split_on_spring_forward_day():
    ny = ff.load_timezone("America/New_York")
    clock = ff.DayClock(ff.Zone("America/New_York"))
    # 2026-03-08: clocks jump from 02:00 to 03:00, the day has 23 hours
    start, end = ts(2026, 3, 7, 22, 0, tz=ny), ts(2026, 3, 8, 4, 0, tz=ny)
    assert end - start == 5 * 3600
    assert clock.split(start, end) == [("2026-03-07", 2 * 3600), ("2026-03-08", 3 * 3600)]
    whole = clock.split(ts(2026, 3, 8, 0, 0, tz=ny), ts(2026, 3, 9, 0, 0, tz=ny))
    assert whole == [("2026-03-08", 23 * 3600)]


def test_split_on_fall_back_day():
    ny = ff.load_timezone("America/New_York")
    clock = ff.DayClock(ff.Zone("America/New_York"))
    # 2026-11-01: 01:00-02:00 happens twice, the day has 25 hours
    whole = clock.split(ts(2026, 11, 1, 0, 0, tz=ny), ts(2026, 11, 2, 0, 0, tz=ny))
    assert whole == [("2026-11-01", 25 * 3600)]
    start, end = ts(2026, 10, 31, 23, 0, tz=ny), ts(2026, 11, 1, 3, 0, tz=ny)
    assert clock.split(start, end) == [("2026-10-31", 3600), ("2026-11-01", 4 * 3600)]


def test_split_where_midnight_does_not_exist():
    # America/Havana skips 00:00-01:00 on its spring-forward day (2026-03-08)
    havana = ff.load_timezone("America/Havana")
    clock = ff.DayClock(ff.Zone("America/Havana"))
    start = ts(2026, 3, 7, 23, 0, tz=havana)
    end = start + 3 * 3600
    parts = clock.split(start, end)
    assert sum(s for _, s in parts) == 3 * 3600
    assert parts[0] == ("2026-03-07", 3600)
    assert parts[1][0] == "2026-03-08"


def test_canonical_record_roundtrip_and_damage():
    rec = {"op": "entry", "id": "20261122-0a0b0c0d", "note": "ü"}
    line = ff.encode_record(rec)
    assert line.endswith(b"\n")
    assert ff.decode_record(line[:-1]) == rec
    flipped = bytearray(line[:-1])
    flipped[20] ^= 1
    with pytest.raises(ValueError):
        ff.decode_record(bytes(flipped))
    with pytest.raises(ValueError):
        ff.decode_record(line[:15])


def test_record_from_newer_version_is_refused():
    line = ff.encode_record({"op": "entry", "id": "20261122-0a0b0c0d", "v": 99})
    with pytest.raises(ValueError, match="newer"):
        ff.decode_record(line[:-1])


def test_sha256_matches_hashlib():
    import hashlib
    assert ff.sha256_hex(b"flowforge") == hashlib.sha256(b"flowforge").hexdigest()


@pytest.mark.parametrize("text", ["web\n", "web ", " web", "=HYPERLINK()", "a" * 65, "a\tb"])
def test_parse_project_rejects(text):
    with pytest.raises(ff.FlowForgeError):
        ff.parse_project(text)
