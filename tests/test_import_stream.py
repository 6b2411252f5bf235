"""Imports that stream: the JSON reader, the columns, checking and writing a
slice of days at a time, and the memory a large import takes."""
import calendar
import json
import os
import random
import subprocess
import sys
import time

import pytest

import flowforge as ff
from conftest import call, launcher_argv

TRICKY_STRINGS = ["], [", "}, {", "],[", "},{", '"', "\\", "€uro", "\ud83d\ude00", "a\nb", "",
                  "[[", "]]", "\u2028", "#12", "x" * 300]


def random_value(rng, depth=0):
    kind = rng.randrange(9 if depth < 3 else 5)
    if kind == 0:
        return rng.choice(TRICKY_STRINGS) + str(rng.randrange(10))
    if kind == 1:
        return rng.randrange(-10 ** 12, 10 ** 12)
    if kind == 2:
        return rng.choice([1.5, -0.0, 1e3, 2.5e-7, 123456789.125])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return rng.choice(TRICKY_STRINGS)
    if kind in (5, 6):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {rng.choice(TRICKY_STRINGS) + str(i): random_value(rng, depth + 1)
            for i in range(rng.randrange(4))}


def random_document(rng, elements):
    doc = []
    for _ in range(elements):
        if rng.random() < 0.7:   # a frame-like element, as most sources are
            doc.append([rng.randrange(10 ** 9), rng.randrange(10 ** 9), rng.choice(TRICKY_STRINGS),
                        "%032x" % rng.getrandbits(128), [rng.choice(TRICKY_STRINGS)], 1.5])
        else:
            doc.append(random_value(rng))
    style = rng.choice([{}, {"indent": 1}, {"separators": (",", ":")}, {"ensure_ascii": False}])
    return json.dumps(doc, **style)


def stream_of(tmp_path, text, name="doc.json"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    return os.open(str(path), os.O_RDONLY)


def read_all(fd):
    stream = ff.JSONStream(fd)
    if stream.peek() != "[":
        value = stream.value()
    else:
        value = list(stream.elements())
    stream.end()
    return value, stream.hasher.hexdigest()


@pytest.mark.parametrize("chunk", [1, 7, 4500, 9001, 1 << 20])
def test_the_json_stream_reads_what_json_loads_reads(tmp_path, monkeypatch, chunk):
    """Arrays of every kind of value, strings holding `], [` and `}, {`, split
    into pieces of every size: the same elements as json.loads, and the
    digest of the file's bytes."""
    monkeypatch.setattr(ff.JSONStream, "CHUNK", chunk)
    rng = random.Random(chunk)
    for trial in range(12 if chunk > 100 else 4):
        text = random_document(rng, rng.choice([0, 1, 5, 300, 2000]))
        fd = stream_of(tmp_path, text, "doc%d.json" % trial)
        try:
            value, digest = read_all(fd)
        finally:
            os.close(fd)
        assert value == json.loads(text)
        assert digest == ff.sha256_hex(text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("chunk", [3, 4500, 1 << 20])
def test_the_json_stream_refuses_what_json_loads_refuses_at_the_same_line(tmp_path, monkeypatch,
                                                                           chunk):
    monkeypatch.setattr(ff.JSONStream, "CHUNK", chunk)
    rng = random.Random(7 + chunk)
    refused = 0
    for trial in range(150 if chunk > 100 else 40):
        text = random_document(rng, rng.choice([3, 200, 1500]))
        text = text.replace(", ", ",\n", rng.randrange(1, 400))   # lines to count
        at = rng.randrange(len(text))
        text = text[:at] + rng.choice(["", "x", "]", "[", ",", '"', "{", "}", ":"]) + text[at + 1:]
        fd = stream_of(tmp_path, text, "bad%d.json" % trial)
        try:
            try:
                expected = json.loads(text)
            except ValueError as e:
                with pytest.raises(ff.JSONStreamError) as raised:
                    read_all(fd)
                assert raised.value.lineno == e.lineno, (text, e)
                refused += 1
            else:
                assert read_all(fd)[0] == expected
        finally:
            os.close(fd)
    assert refused > 10   # (the corruptions mostly break the document)


@pytest.mark.parametrize("chunk", [2, 1 << 20])
def test_the_json_stream_reads_an_object_member_by_member(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(ff.JSONStream, "CHUNK", chunk)
    rng = random.Random(3)
    doc = {"k%d%s" % (i, rng.choice(TRICKY_STRINGS)): {"sessions": [random_value(rng) for _ in range(5)],
                                                      "status": "x"}
           for i in range(50)}
    text = json.dumps(doc, indent=rng.choice([None, 2]))
    fd = stream_of(tmp_path, text)
    try:
        stream, seen = ff.JSONStream(fd), {}
        for key in stream.members():
            inner = {}
            for name in stream.members():
                if name == "sessions":
                    inner[name] = list(stream.elements())
                else:
                    inner[name] = stream.value()
            seen[key] = inner
        stream.end()
    finally:
        os.close(fd)
    assert seen == json.loads(text)


def test_a_byte_order_mark_and_utf16_are_read_as_json_loads_reads_them(tmp_path):
    doc = [[1, 2, "é", "id", ["#1"]]]
    for data in (b"\xef\xbb\xbf" + json.dumps(doc).encode(), json.dumps(doc).encode("utf-16")):
        path = tmp_path / "bom.json"
        path.write_bytes(data)
        fd = os.open(str(path), os.O_RDONLY)
        try:
            assert read_all(fd) == (json.loads(data), ff.sha256_hex(data))
        finally:
            os.close(fd)


def test_timewarrior_times_match_strptime():
    from datetime import datetime, timezone
    rng = random.Random(5)
    texts = ["%04d%02d%02dT%02d%02d%02dZ" % (rng.choice([1969, 1970, 2024, 2026, 2999, 3000]),
                                             rng.randrange(0, 14), rng.randrange(0, 33),
                                             rng.randrange(0, 26), rng.randrange(0, 62),
                                             rng.randrange(0, 62)) for _ in range(3000)]
    texts += ["20240229T120000Z", "20230229T120000Z", "19700101T000000Z", "29991231T235959Z"]
    for text in texts:
        try:
            expected = int(datetime.strptime(text, "%Y%m%dT%H%M%SZ")
                           .replace(tzinfo=timezone.utc).timestamp())
            valid = ff.plausible_time(expected)
        except ValueError:
            valid = False
        if valid:
            assert ff._timew_time(text, "p", "f", 1) == expected, text
        else:
            with pytest.raises(ff.FlowForgeError):
                ff._timew_time(text, "p", "f", 1)


STORABLE = [t.replace("\ud83d\ude00", "\U0001f600") for t in TRICKY_STRINGS[:-1]]


def test_lines_put_together_are_the_records_encoded():
    """The write pass's lines, assembled from parts, are byte for byte
    encode_record() of the records (unicode notes, projects, overlap marks,
    extra fields, a day's seconds)."""
    batch = ff.ImportBatch("v1", "x", ff.Zone("Europe/Berlin"))
    rng = random.Random(11)
    for n in range(3000):
        start = 1_700_000_000 + rng.randrange(10 ** 8)
        kind = batch.kind(rng.choice(["1", "OPS-7", "acme/app#3"]), rng.choice(["", "p €", "a/b"]),
                          rng.choice(STORABLE) + str(rng.randrange(3)),
                          rng.choice([None, None, {"branch": "x\u2028"}]))
        if rng.random() < 0.8:
            batch.add("u", "key%d" % n, kind, start, start + rng.randrange(1, 5000))
        else:
            batch.add("u", "key%d" % n, kind, start, start + 100, rng.randrange(1, 5000))
    entries = batch.entries["u"]
    overlapping = bytes(rng.random() < 0.1 for _ in range(len(entries)))
    for piece in entries.slices():
        for day, indices in piece:
            expected = []
            for i in indices:
                record = batch.record(entries, i)
                if overlapping[i]:
                    record["overlap"] = True
                expected.append(ff.encode_record(record))
            assert batch.lines(entries, day, indices, overlapping) == expected


def frames_file(path, frames):
    path.write_text(json.dumps(frames))
    return str(path)


def day_entries(root, user="alice"):
    r = call(root, "entries", "--json", "--from", "2026-01-01", "--to", "2026-12-31", user=user,
             env={"FLOWFORGE_NOW": "2026-11-30T12:00:00Z"})
    assert r.rc == 0, r
    return sorted((e["id"], e.get("segments"), e.get("seconds"), e.get("overlap", False), e["note"])
                  for e in r.json["entries"])


def fresh(tmp_path, name, tz="UTC"):
    from conftest import make_git_repo
    root = make_git_repo(str(tmp_path / name))
    r = call(root, "init", "--timezone", tz)
    assert r.rc == 0, r
    return root


@pytest.mark.parametrize("mode", [[], ["--skip-conflicts"], ["--allow-overlap"]])
def test_slices_of_one_day_admit_what_one_slice_admits(tmp_path, monkeypatch, mode):
    """Random frames over two weeks, many overlapping (across midnight too):
    checked a day at a time or all at once, the same entries are imported,
    refused or marked, with the same messages."""
    rng = random.Random(len(mode))
    base = calendar.timegm((2026, 11, 2, 0, 0, 0))
    frames, t = [], base
    for n in range(400):
        t += rng.randrange(-1800, 5400)   # a step back makes an overlap
        length = rng.randrange(60, 3600)
        frames.append([t, t + length, "p", "f%d" % n, ["#%d" % rng.randrange(1, 4)], t])
        t += length
    path = frames_file(tmp_path / "frames.json", frames)
    slices = ff.ImportedEntries.slices
    outcomes = []
    for size in (1, 10 ** 9):
        monkeypatch.setattr(ff.ImportedEntries, "slices",
                            lambda self, size=size: slices(self, size))
        root = fresh(tmp_path, "r%d" % size, "Europe/Berlin")
        r = call(root, "import", "watson", path, *mode, env={"FLOWFORGE_NOW": "2026-11-30T12:00:00Z"})
        outcomes.append((r.rc, r.out, r.err, day_entries(root)))
    assert outcomes[0] == outcomes[1]
    rc, out, err, entries = outcomes[0]
    if mode:
        assert rc == 0 and len(entries) > 0
        assert ("overlap" in out) and (mode != ["--allow-overlap"] or any(e[3] for e in entries))
    else:
        assert rc == 65 and "would overlap" in err and entries == []


def test_a_day_filled_from_the_slice_before_is_refused(tmp_path, monkeypatch):
    """v1 sessions in Pacific/Auckland (UTC+13): 20 hours logged on 18 November
    (a session that started on 17 November UTC) and 10 timed hours the next
    UTC day, on the same local day: checked a UTC day at a time, the second
    is still refused for overfilling the day."""
    slices = ff.ImportedEntries.slices
    monkeypatch.setattr(ff.ImportedEntries, "slices", lambda self, size=1: slices(self, size))
    doc = {"1": {"sessions": [
        {"start": "2026-11-17T20:00:00Z", "end": "2026-11-17T21:00:00Z", "duration": 72000,
         "user": "alice"},
        {"start": "2026-11-18T01:00:00Z", "end": "2026-11-18T11:00:00Z", "user": "alice"}]}}
    path = tmp_path / "task-times.json"
    path.write_text(json.dumps(doc))
    root = fresh(tmp_path, "nz", "Pacific/Auckland")
    r = call(root, "import", "v1", str(path), env={"FLOWFORGE_NOW": "2026-11-30T12:00:00Z"})
    assert r.rc == 65 and "would fill 2026-11-18" in r.err, r
    r = call(root, "import", "v1", str(path), "--skip-conflicts",
             env={"FLOWFORGE_NOW": "2026-11-30T12:00:00Z"})
    assert r.rc == 0 and "imported 1 entry" in r.out and "would fill 2026-11-18" in r.out, r


def test_v1_refuses_an_issue_or_a_field_given_twice(tmp_path):
    root = fresh(tmp_path, "dup")
    session = '{"start": "2026-11-16T09:00:00Z", "duration": 60, "user": "alice"}'
    for text, message in (('{"1": {"sessions": [%s]}, "1": {"sessions": []}}' % session,
                           "issue '1': appears twice"),
                          ('{"1": {"sessions": [%s], "sessions": []}}' % session,
                           "'sessions' appears twice")):
        path = tmp_path / "twice.json"
        path.write_text(text)
        r = call(root, "import", "v1", str(path))
        assert r.rc == 65 and message in r.err and "nothing was imported" in r.err, r
    assert day_entries(root) == []


def test_an_import_streams_in_bounded_memory(tmp_path, pycache):
    """300,000 Watson frames (27 MB; holding them parsed took ~450 MB before
    imports streamed): the import's peak RSS stays under 130 MB, and
    importing again adds nothing."""
    rng = random.Random(1)
    t = calendar.timegm((2020, 1, 1, 0, 0, 0))
    path = tmp_path / "frames.json"
    with open(path, "w") as f:
        f.write("[")
        for n in range(300000):
            t += rng.randrange(10, 60)
            stop = t + rng.randrange(60, 1500)
            f.write("%s[%d, %d, \"p%d\", \"%032x\", [\"#%d\"], %d]" % (
                ", " if n else "", t, stop, rng.randrange(5), rng.getrandbits(128),
                rng.randrange(1, 300), stop))
            t = stop
        f.write("]")
    root = fresh(tmp_path, "big")
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, "
             "text=True); print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
             "print(p.stdout + p.stderr)")
    env = dict(os.environ, FLOWFORGE_USER="alice", TZ="UTC")
    for attempt in ("first", "again"):
        started = time.time()
        out = subprocess.run([sys.executable, "-S", "-c", probe] + launcher_argv(pycache)
                             + ["import", "watson", str(path)], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300).stdout
        code, kib = out.split("\n")[0].split()
        assert code == "0", out
        assert int(kib) < 130 * 1024, (attempt, kib)
        expected = ("imported 300000 entries" if attempt == "first"
                    else "imported 0 entries for alice (300000 already there)")
        assert expected in out, out
        print(attempt, "%.1f s" % (time.time() - started), "%d KiB" % int(kib))
    # a full aggregation of them reads the day files in batches: it never holds
    # 300,000 parsed records at once either
    for args in (["aggregate"], ["aggregate", "--full"]):
        out = subprocess.run([sys.executable, "-S", "-c", probe] + launcher_argv(pycache) + args,
                             cwd=root, env=env, capture_output=True, text=True, timeout=300).stdout
        code, kib = out.split("\n")[0].split()
        assert code == "0" and int(kib) < 130 * 1024, (args, kib, out)


@pytest.mark.parametrize("kind,text", [
    ("watson", '[[1763280000, 1763283600, "p", "id1", ["#1", "\\ud83d"]]]'),
    ("watson", '[[1763280000, 1763283600, "p\\udc00", "id1", ["x\\udc00", "#1"]]]'),
    ("v1", '{"1": {"sessions": [{"start": "2026-11-16T09:00:00Z", "duration": 60, '
           '"user": "alice", "reason": "\\ud800"}]}}'),
    ("v1", '{"1": {"sessions": [{"start": "2026-11-16T09:00:00Z", "duration": 60, '
           '"user": "alice", "branch": "\\udfff"}]}}')])
def test_text_that_utf8_cannot_hold_is_refused_before_anything_is_written(tmp_path, kind, text):
    """A lone surrogate escape (valid JSON, not storable text) in a note or an
    extra field (in a project it is cleaned away, as any odd character): one
    line, exit 65, nothing written (it used to stop the import half way
    through with a traceback)."""
    root = fresh(tmp_path, "s")
    good = {"watson": '[1763200000, 1763203600, "p", "id0", ["#2"]], ',
            "v1": ''}[kind]
    if good:
        text = "[" + good + text[1:]
    path = tmp_path / "source.json"
    path.write_text(text)
    r = call(root, "import", kind, str(path))
    assert r.rc == 65 and "not valid Unicode" in r.err and r.err.count("\n") == 1, r
    assert day_entries(root) == []


def test_days_seconds_are_admitted_before_clock_times_as_in_one_pass(tmp_path):
    """v1 sessions with a duration of their own (seconds on a day) are taken
    before any clock times, whatever their start: the 13-hour session is the
    one left out, and the day file lists the days' seconds first."""
    doc = {"OPS-1": {"status": "done", "sessions": [
        {"start": "2024-01-01T00:00:00Z", "end": "2024-01-01T13:00:00Z", "user": "alice"},
        {"start": "2024-01-01T14:00:00Z", "end": "2024-01-01T15:00:00Z", "duration": 39600,
         "user": "alice"},
        {"start": "2024-01-01T20:00:00Z", "end": "2024-01-01T21:00:00Z", "duration": 7200,
         "user": "alice"}]}}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(doc))
    root = fresh(tmp_path, "order")
    r = call(root, "import", "v1", str(path), "--skip-conflicts")
    assert r.rc == 0, r
    assert "not imported for alice: 2024-01-01 00:00-13:00 would fill 2024-01-01" in r.out, r
    kept = sorted(e[2] for e in day_entries_all(root))
    assert kept == [7200, 39600]


def day_entries_all(root, user="alice"):
    r = call(root, "entries", "--json", "--from", "2020-01-01", "--to", "2026-12-31", user=user)
    assert r.rc == 0, r
    return sorted((e["id"], e.get("segments"), e.get("seconds")) for e in r.json["entries"])


@pytest.mark.parametrize("sessions,refused", [
    ([("2024-01-01T02:00:00Z", 36000), ("2024-01-01T20:00:00Z", 72000)], True),
    ([("2024-01-01T20:00:00Z", 72000), ("2024-01-02T02:00:00Z", 36000)], False)])
def test_a_days_seconds_count_on_the_date_they_are_recorded_on(tmp_path, sessions, refused):
    """alice (UTC) imports sessions of bob, whose store is in Asia/Tokyo: each
    is recorded on its start's date in the importer's zone, and the day's hours
    are checked on that same date."""
    root = fresh(tmp_path, "zones")
    assert call(root, "init", "--timezone", "Asia/Tokyo", user="bob").rc == 0
    doc = {"OPS-1": {"status": "done", "sessions": [
        {"start": start, "end": start, "duration": seconds, "user": "bob"}
        for start, seconds in sessions]}}
    path = tmp_path / "v1.json"
    path.write_text(json.dumps(doc))
    r = call(root, "import", "v1", str(path))
    if refused:
        assert r.rc == 65 and "would fill 2024-01-01" in r.err, r
        assert day_entries_all(root, "bob") == []
    else:
        assert r.rc == 0 and "imported 2 entries for bob" in r.out, r


def test_a_lone_surrogate_in_a_source_key_is_only_hashed(tmp_path):
    """A Watson frame id or a v1 instance_id is never stored, only hashed into
    the entry's id: a lone surrogate there imports (and again adds nothing)."""
    root = fresh(tmp_path, "key")
    path = tmp_path / "frames.json"
    path.write_text('[[1700000000, 1700003600, "proj", "a\\ud800", ["OPS-2"], 1700003600]]')
    for expected in ("imported 1 entry", "imported 0 entries for alice (1 already there)"):
        r = call(root, "import", "watson", str(path))
        assert r.rc == 0 and expected in r.out, r


@pytest.mark.parametrize("kind", ["watson", "v1"])
def test_a_file_nested_too_deeply_is_one_line(tmp_path, kind):
    root = fresh(tmp_path, "deep")
    path = tmp_path / "deep.json"
    path.write_text({"watson": "[", "v1": '{"1": {"sessions": ['}[kind] + "[" * 200000)
    r = call(root, "import", kind, str(path))
    assert r.rc == 65 and "not valid JSON" in r.err and r.err.count("\n") == 1, r


def test_an_import_reads_only_a_regular_file(tmp_path):
    """A directory or a missing file: exit 64; a symlink (never followed) or a
    FIFO (never waited on): exit 77; nothing written either way."""
    root = fresh(tmp_path, "kinds")
    good = tmp_path / "frames.json"
    good.write_text('[[1700000000, 1700003600, "p", "id1", ["#1"]]]')
    os.symlink(str(good), str(tmp_path / "link.json"))
    os.mkfifo(str(tmp_path / "fifo.json"))
    (tmp_path / "dir.json").mkdir()
    for name, code in (("missing.json", 64), ("dir.json", 64), ("link.json", 77),
                       ("fifo.json", 77)):
        r = call(root, "import", "watson", str(tmp_path / name))
        assert r.rc == code and r.err.count("\n") == 1, (name, r)
    assert day_entries(root) == []
