"""The line formats of a bulk load and export (``pbkv/bulk.py``): pairs round-trip
exactly through JSON lines and CSV however the stream is cut, and the first invalid
line is named, with every line before it taken and nothing of it."""

from __future__ import annotations

import csv
import io
import json

import msgpack
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pbkv.bulk import (
    DumpError,
    DumpReader,
    LineError,
    LineFormat,
    LineParser,
    PackedParser,
    PairLimits,
    json_line,
    json_lines,
    packed_chunk,
)

TRICKY = [
    ("plain", "value"),
    ("crlf\r\n", "line\r\nbreak"),
    ("nul\0", "\0"),
    ('quo"te', '"\\'),
    ("emoji 😀", "韩国人 🎉"),
    ("empty", ""),
    ("comma,", ",;\t"),
]

keys = st.text(min_size=1, max_size=20)
values = st.text(max_size=30)
pair_lists = st.lists(st.tuples(keys, values), max_size=30)


def csv_text(pairs: list[tuple[str, str]]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerows(pairs)
    return out.getvalue().encode()


def parse(data: bytes, cuts: list[int], fmt: LineFormat = LineFormat.JSON) -> LineParser:
    """Feed ``data`` cut at ``cuts`` (positions), then end it."""
    parser = LineParser(fmt)
    start = 0
    for cut in sorted(set(cuts)):
        parser.feed(data[start:cut])
        start = cut
    parser.feed(data[start:])
    parser.end()
    return parser


def pairs_of(parser: LineParser) -> list[tuple[str, str]]:
    flat = parser.pairs
    return list(zip(flat[0::2], flat[1::2], strict=True))


@settings(max_examples=200, deadline=None)
@given(pair_lists, st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_json_lines_round_trip_whatever_the_cuts(pairs, cuts) -> None:
    data = json_lines(pairs)
    parser = parse(data, [cut % (len(data) + 1) for cut in cuts])
    assert parser.error is None
    assert pairs_of(parser) == pairs
    assert parser.ends == list(range(1, len(pairs) + 1))


@settings(max_examples=200, deadline=None)
@given(pair_lists, st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_csv_round_trips_whatever_the_cuts(pairs, cuts) -> None:
    data = csv_text(pairs)
    parser = parse(data, [cut % (len(data) + 1) for cut in cuts], LineFormat.CSV)
    assert parser.error is None
    assert pairs_of(parser) == pairs
    # A record's number is the last line it reaches (quoted line ends make it span lines).
    assert parser.ends == sorted(parser.ends) and len(parser.ends) == len(pairs)
    assert not pairs or parser.ends[-1] == data.count(b"\n")


@pytest.mark.parametrize("fmt", list(LineFormat))
def test_tricky_pairs_byte_by_byte(fmt: LineFormat) -> None:
    data = json_lines(TRICKY) if fmt is LineFormat.JSON else csv_text(TRICKY)
    parser = parse(data, list(range(len(data))), fmt)
    assert parser.error is None and pairs_of(parser) == TRICKY


def test_a_last_line_without_a_line_end_and_crlf_line_ends() -> None:
    parser = parse(b'["a","1"]\r\n["b","2"]', [])
    assert pairs_of(parser) == [("a", "1"), ("b", "2")] and parser.lines == 2
    parser = parse(b"a,1\r\nb,2", [], LineFormat.CSV)
    assert pairs_of(parser) == [("a", "1"), ("b", "2")]


@pytest.mark.parametrize(
    ("bad", "status", "reason"),
    [
        (b'["only one"]', 400, "two strings"),
        (b'["k", 1]', 400, "two strings"),
        (b'{"k": "v"}', 400, "two strings"),
        (b'["k","v"] ["x","y"]', 400, "not valid JSON"),
        (b'["k","v"', 400, "not valid JSON"),
        (b"", 400, "empty line"),
        (b'["","v"]', 400, "key is empty"),
        (b'["\xff","v"]', 400, "not valid JSON"),
    ],
)
def test_the_first_invalid_json_line_is_named_and_nothing_of_it_taken(bad, status, reason) -> None:
    good = json_lines([(f"k{i}", "v") for i in range(5)])
    parser = parse(good + bad + b"\n" + json_line("after", "x"), [len(good) + 3])
    assert isinstance(parser.error, LineError)
    assert (parser.error.line, parser.error.status) == (6, status)
    assert reason in parser.error.reason and str(parser.error).startswith("line 6: ")
    assert pairs_of(parser) == [(f"k{i}", "v") for i in range(5)]
    parser.feed(json_line("later", "x"))  # nothing is read after the error
    assert len(parser.pairs) == 10


@pytest.mark.parametrize(
    "bad", [b"only-one-field", b"a,b,c", b"", b'"unclosed,x', b'a"b,"c"d', b"\xff,v", b",v"]
)
def test_the_first_invalid_csv_record_is_named(bad: bytes) -> None:
    parser = parse(b'k1,v1\n"multi\nline",v2\n' + bad + b"\nafter,x\n", [], LineFormat.CSV)
    assert parser.error is not None and parser.error.line == 4, parser.error
    assert pairs_of(parser) == [("k1", "v1"), ("multi\nline", "v2")]


def test_limits_on_keys_values_and_lines() -> None:
    limits = PairLimits(max_key_bytes=4, max_value_bytes=8)
    parser = LineParser(LineFormat.JSON, limits)
    parser.feed(json_lines([("abcd", "12345678"), ("ééé", "v")]))
    assert parser.error == LineError(2, 413, "key longer than 4 bytes")
    assert pairs_of(parser) == [("abcd", "12345678")]

    parser = LineParser(LineFormat.JSON, limits)
    parser.feed(json_line("k", "é" * 5))
    assert parser.error == LineError(1, 413, "value longer than 8 bytes")

    parser = LineParser(LineFormat.JSON, limits)
    parser.feed(json_line("k", "v"))
    parser.feed(b"[" + b" " * limits.max_line_bytes)  # no line end in sight
    assert parser.error is not None and (parser.error.line, parser.error.status) == (2, 413)
    assert pairs_of(parser) == [("k", "v")]

    parser = LineParser(LineFormat.CSV, limits)
    parser.feed(b'"open\n' + b"x\n" * limits.max_line_bytes)  # a quote never closed
    assert parser.error is not None and (parser.error.line, parser.error.status) == (1, 413)


def test_take_cuts_at_pairs_and_characters_and_names_the_last_line() -> None:
    parser = parse(json_lines([(f"k{i}", "v" * 10) for i in range(10)]), [])
    assert parser.take(3, 1000) == (["k0", "v" * 10, "k1", "v" * 10, "k2", "v" * 10], [1, 2, 3])
    taken, ends = parser.take(100, 25)  # 12 characters a pair: closed by the third
    assert (len(taken), ends) == (6, [4, 5, 6])
    taken, ends = parser.take(100, 10_000)
    assert (len(taken), ends) == (8, [7, 8, 9, 10])
    assert parser.take(100, 100) == ([], []) and parser.chars == 0


@settings(max_examples=100, deadline=None)
@given(pair_lists, st.lists(st.integers(min_value=0, max_value=4000), max_size=8))
def test_packed_chunks_round_trip_whatever_the_cuts(pairs, cuts) -> None:
    flat = [item for pair in pairs for item in pair]
    half = len(pairs) // 2
    data = packed_chunk(flat[: 2 * half], list(range(1, half + 1)))
    data += packed_chunk(flat[2 * half :], list(range(half + 1, len(pairs) + 1)))
    parser = PackedParser()
    start = 0
    for cut in sorted({cut % (len(data) + 1) for cut in cuts}):
        parser.feed(data[start:cut])
        start = cut
    parser.feed(data[start:])
    parser.end()
    assert parser.error is None
    assert pairs_of(parser) == pairs and parser.ends == list(range(1, len(pairs) + 1))


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (msgpack.packb([[3], ["k", 1]]), 400),
        (msgpack.packb([[3], ["", "v"]]), 400),
        (msgpack.packb([[3, 4], ["k", "v"]]), 400),
        (msgpack.packb({"k": "v"}), 400),
        (msgpack.packb([["3"], ["k", "v"]]), 400),
        (packed_chunk(["k", "v" * 9], [3]), 413),
        (packed_chunk(["k" * 5, "v"], [3]), 413),
        (b"\xc1", 400),  # never used in msgpack
        (packed_chunk(["k", "v"], [3])[:-1], 400),  # cut short
    ],
)
def test_invalid_packed_chunks_are_refused(data: bytes, status: int) -> None:
    parser = PackedParser(PairLimits(max_key_bytes=4, max_value_bytes=8))
    parser.feed(packed_chunk(["a", "1", "b", "2"], [1, 2]) + data)
    parser.end()
    assert parser.error is not None and parser.error.status == status, parser.error
    assert parser.error.line == 3
    assert pairs_of(parser) == [("a", "1"), ("b", "2")]


def test_a_packed_chunk_keeps_the_pairs_before_one_over_a_limit() -> None:
    parser = PackedParser(PairLimits(max_key_bytes=4, max_value_bytes=8))
    parser.feed(packed_chunk(["a", "1", "b", "2", "k", "v" * 9, "c", "3"], [4, 5, 7, 8]))
    assert parser.error == LineError(7, 413, "value longer than 8 bytes")
    assert pairs_of(parser) == [("a", "1"), ("b", "2")] and parser.ends == [4, 5]


def test_the_load_progress_bar_draws_a_few_times_a_second_and_clears(monkeypatch, capsys) -> None:
    from pbkv import cli

    clock = [100.0]
    monkeypatch.setattr(cli, "_now", lambda: clock[0])
    bar = cli._ProgressBar(2_000_000)
    bar(500_000)  # at once: not drawn yet
    assert capsys.readouterr().err == ""
    clock[0] += 0.5
    bar(1_000_000)
    drawn = capsys.readouterr().err
    assert drawn.startswith("\r[" + "#" * 15 + " " * 15 + "]  50%")
    assert "1.0 MB" in drawn and "2.0 MB/s" in drawn
    clock[0] += 0.05  # within a tenth of a second of the last: not redrawn
    bar(1_500_000)
    assert capsys.readouterr().err == ""
    unknown = cli._ProgressBar(0)  # stdin: no total, no bar, only the amount
    clock[0] += 1.0
    unknown(3_000_000)
    text = capsys.readouterr().err
    assert "[" not in text and "3.0 MB" in text
    bar.clear()
    assert capsys.readouterr().err == "\r\x1b[K"


# -- reading a dump reply as it arrives ------------------------------------------------

# Values that look like the boundary between two pairs, escaped or not.
LOOKALIKES = [("],[", "x"), ("k", '"],["'), ("\\", '\\"],["'), ("a,", '],["'), ("[", "]")]


def read_dump(data: bytes, cuts: list[int]) -> tuple[list[tuple[str, str]], list[int]]:
    """The pairs of a dump reply cut at ``cuts``, and how many each piece gave."""
    reader = DumpReader()
    pairs: list[tuple[str, str]] = []
    counts = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        got = reader.feed(data[start:cut])
        counts.append(len(got))
        pairs += got
        start = cut
    pairs += reader.end()
    return pairs, counts


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(keys, values) | st.sampled_from(LOOKALIKES), max_size=30),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=8),
    st.booleans(),
)
def test_a_dump_reply_reads_whole_whatever_the_cuts(pairs, cuts, spaced) -> None:
    """As pbkv writes it (no spaces) or as json.dumps does: every pair, in order."""
    items = [list(pair) for pair in pairs]
    data = json.dumps(items).encode() if spaced else orjson.dumps(items)
    got, _ = read_dump(data, [cut % (len(data) + 1) for cut in cuts])
    assert got == pairs


def test_a_dump_reply_gives_its_pairs_as_they_arrive() -> None:
    """Pairs come out soon after the comma that follows each arrived (a scan that found
    none waits for twice the bytes): the reply is never held whole."""
    pairs = [(f"key-{i}", "],[" * (i % 3)) for i in range(100)]
    data = orjson.dumps([list(pair) for pair in pairs])
    got, counts = read_dump(data, list(range(len(data))))  # byte by byte
    assert got == pairs
    assert sum(counts[: len(data) // 2]) >= 45  # half the bytes: about half the pairs
    assert sum(counts[:-1]) == 99  # all but the last, which no comma follows


@pytest.mark.parametrize(
    "data",
    [
        b"",  # no reply at all
        b'{"success":"false"}',  # not an array
        b'[["a","b"],["c",',  # cut short
        b'[["a","b"]',  # no closing bracket
        b'[["a","b"],]',  # a comma before the closing bracket
        b'[["a","b"],["c",1]]',  # not a string
        b'[["a","b","c"]]',  # not a pair
        b'[["a","b"]] ["c","d"]',  # more after the array
    ],
)
def test_a_dump_reply_that_is_not_a_whole_array_of_pairs_is_refused(data: bytes) -> None:
    with pytest.raises(DumpError):
        read_dump(data, [len(data) // 2])


def test_a_dump_reader_waits_for_a_long_pair_up_to_its_bound() -> None:
    long_pair = [["k", "v" * 5000]]
    data = orjson.dumps(long_pair * 3)
    reader = DumpReader(max_pending=12_000)
    got = []
    for start in range(0, len(data), 100):
        got += reader.feed(data[start : start + 100])
    assert got + reader.end() == [("k", "v" * 5000)] * 3
    reader = DumpReader(max_pending=4_000)
    with pytest.raises(DumpError, match="longer than 4000 bytes"):
        for start in range(0, len(data), 100):
            reader.feed(data[start : start + 100])
