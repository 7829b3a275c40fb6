"""Bulk load and export: the line formats of ``pbkv dump`` and ``pbkv load`` (no I/O).

A pair is a line: a JSON array ``["key","value"]`` (JSON lines, what ``pbkv dump``
writes), or a CSV record ``key,value`` (RFC 4180 quoting, so a quoted field may
hold line ends and the record then spans several lines).  ``LineParser`` takes the
bytes of such a stream in chunks cut anywhere, and gives back the pairs of the
complete lines with the number of each one's last line; the first line that is
not a valid pair stops it, as a ``LineError`` naming that line (nothing of it is
taken; every line before it is).

JSON lines are parsed a chunk at a time with one ``orjson.loads`` per line; the
slower line-by-line walk runs only when that fails, to find the line at fault.
"""

from __future__ import annotations

import csv
import enum
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import orjson


class LineFormat(enum.Enum):
    JSON = "jsonl"  # one JSON array of two strings a line
    CSV = "csv"  # one CSV record of two fields (a quoted field may span lines)
    # What ``pbkv load`` sends once it has read the lines itself (``PackedParser``).
    PACKED = "msgpack"


class LoadMode(enum.Enum):
    """What a loaded pair does to a key that already holds a value."""

    INSERT = "insert"  # leaves it as it is (the pair counts as skipped)
    UPSERT = "upsert"  # overwrites it


class LineError(Exception):
    """Line ``line`` (1-based; for a CSV record, the line it starts on) is not a valid
    pair: ``status`` 400 (malformed) or 413 (too long)."""

    def __init__(self, line: int, status: int, reason: str) -> None:
        super().__init__(line, status, reason)
        self.line = line
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LineError):
            return NotImplemented
        return (self.line, self.status, self.reason) == (other.line, other.status, other.reason)

    def __hash__(self) -> int:
        return hash((self.line, self.status, self.reason))


@dataclass(frozen=True, slots=True)
class PairLimits:
    """Bounds on one pair, in UTF-8 bytes (a request's key and value limits), and on
    the bytes of one line (or CSV record) while it is read."""

    max_key_bytes: int = 64 * 1024
    max_value_bytes: int = 1024 * 1024

    @property
    def max_line_bytes(self) -> int:
        # JSON escapes (\u0000: 6 bytes for 1) and CSV quotes may grow each byte.
        return 6 * (self.max_key_bytes + self.max_value_bytes) + 64


def json_line(key: str, value: str) -> bytes:
    """One pair as ``pbkv dump`` writes it (newline included)."""
    return orjson.dumps((key, value)) + b"\n"


def json_lines(pairs: Iterable[tuple[str, str]]) -> bytes:
    dumps = orjson.dumps
    return b"".join([dumps(pair) + b"\n" for pair in pairs])


class DumpError(Exception):
    """A dump reply that is not a JSON array of ``["key","value"]`` pairs (or ended
    before its closing bracket)."""


# A JSON string, and one pair followed by its comma, whitespace allowed where JSON
# allows it.  Possessive quantifiers: a scan never backtracks, whatever the bytes.
_STRING = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_PAIRS_WITH_COMMAS = re.compile(
    rb"(?:\s*+\[\s*+" + _STRING + rb"\s*+,\s*+" + _STRING + rb"\s*+\]\s*+,)*+", re.DOTALL
)
MAX_DUMP_PENDING = 256 << 20  # bytes of one pair a reader may wait for (a bound, not a size)


class DumpReader:
    """The pairs of a dump reply (``[["k","v"],...]``) out of its bytes, fed in
    pieces cut anywhere: what a piece completes comes out at once, so a dump of any
    size is read in the memory of its longest pair.

    Where a pair ends cannot be told by looking for ``"],["``: a value ``],[`` is
    written as exactly that.  A regular expression that matches whole strings finds
    the end of the complete pairs (each with the comma after it); ``orjson`` then
    parses them, and checks what the expression let through."""

    def __init__(self, max_pending: int = MAX_DUMP_PENDING) -> None:
        self.max_pending = max_pending
        # A bytearray: a long pair arriving in many pieces is appended to, not copied.
        self._pending = bytearray()
        self._opened = False
        self._scanned = 0  # bytes of ``_pending`` the last scan found no whole pair in
        self._comma = False  # what was taken ended with a comma: a pair must follow

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        """The pairs ``data`` completes."""
        pending = self._pending
        pending += data
        if not self._opened:
            start = len(pending) - len(pending.lstrip())
            if start == len(pending):
                pending.clear()
                return []
            if pending[start] != 0x5B:  # [
                raise DumpError("a dump is a JSON array of pairs")
            del pending[: start + 1]
            self._opened = True
        if len(pending) < 2 * self._scanned:  # a long pair still coming: scan again later
            return []
        end = _end_of_pairs(pending)
        if end == 0:
            if len(pending) > self.max_pending:
                raise DumpError(f"a pair of the dump is longer than {self.max_pending} bytes")
            self._scanned = len(pending)
            return []
        array = b"[" + pending[: end - 1] + b"]"  # without the last comma
        del pending[:end]
        self._scanned, self._comma = 0, True
        return _dump_pairs(array)

    def end(self) -> list[tuple[str, str]]:
        """The reply ended: its last pairs; DumpError if it is not a whole array."""
        if not self._opened:
            raise DumpError("a dump is a JSON array of pairs (the reply was empty)")
        rest = bytes(self._pending)
        self._pending.clear()
        if self._comma and rest.lstrip()[:1] == b"]":
            raise DumpError("the dump is not valid JSON (a comma before its closing bracket)")
        return _dump_pairs(b"[" + rest)  # the last pair and the closing bracket


def _end_of_pairs(data: bytearray) -> int:
    match = _PAIRS_WITH_COMMAS.match(data)
    return match.end() if match is not None else 0


def _dump_pairs(array: bytes) -> list[tuple[str, str]]:
    try:
        items = orjson.loads(array)
    except orjson.JSONDecodeError as exc:
        raise DumpError(f"the dump is not valid JSON, or it ended early ({exc})") from None
    if type(items) is not list or not all(map(_is_pair, items)):
        raise DumpError("a dump is a JSON array of pairs of strings")
    return cast("list[tuple[str, str]]", list(map(tuple, items)))


def _is_pair(item: object) -> bool:
    return type(item) is list and len(item) == 2 and type(item[0]) is str and type(item[1]) is str


def _flat_pairs(items: list[Any]) -> list[str] | None:
    """key, value, key, value... when every item is a pair with a non-empty key, else
    None (then the slow path names the first line that is not); checked a whole
    chunk at a time, in C loops (a load parses a million lines in well under a second)."""
    if not items:
        return []
    if set(map(type, items)) != {list} or set(map(len, items)) != {2}:
        return None
    flat = list(itertools.chain.from_iterable(items))
    if set(map(type, flat)) != {str} or not all(flat[0::2]):
        return None
    return flat


class PairBuffer:
    """Pairs parsed and not yet taken: ``pairs`` (key, value, ...), ``ends`` (each
    pair's last line number), ``chars`` (of their keys and values)."""

    def __init__(self, limits: PairLimits | None = None) -> None:
        self.pairs: list[str] = []
        self.ends: list[int] = []
        self.chars = 0
        self.limits = limits if limits is not None else PairLimits()
        self.lines = 0  # lines (or packed pairs) read so far
        self.error: LineError | None = None  # the first invalid one: nothing after it

    def failed(self) -> bool:
        """Whether an invalid line was met. A method, read after calls that may set
        ``error``: a type checker (and compiled code) keeps an attribute narrowed to
        None across such calls."""
        return self.error is not None

    def take(self, max_pairs: int, max_chars: int) -> tuple[list[str], list[int]]:
        """Up to ``max_pairs`` pairs from the front of ``pairs``, fewer when their keys
        and values pass ``max_chars`` characters, with their line numbers.  A batch
        closes at those bounds."""
        pairs = self.pairs
        count = min(max_pairs, len(pairs) // 2)
        if self.chars > max_chars:  # only then are the characters counted pair by pair
            chars = 0
            for i in range(count):
                chars += len(pairs[2 * i]) + len(pairs[2 * i + 1])
                if chars >= max_chars:
                    count = i + 1
                    break
        taken = pairs[: 2 * count]
        del pairs[: 2 * count]
        ends = self.ends[:count]
        del self.ends[:count]
        self.chars = sum(map(len, pairs)) if pairs else 0
        return taken, ends


class LineParser(PairBuffer):
    """Lines in (bytes in chunks cut anywhere), pairs out; see the module docstring.

    After ``feed`` or ``end``, ``pairs`` holds key, value, key, value... of every
    valid line not yet taken and ``ends`` the last line number of each of those
    pairs; ``error`` is the first invalid line (nothing after it is read).
    """

    def __init__(self, fmt: LineFormat = LineFormat.JSON, limits: PairLimits | None = None):
        super().__init__(limits)
        self.format = fmt
        self._rest = b""  # the start of a line whose end has not come yet
        self._record_start = 0  # CSV: the line number a record spanning lines began on

    def feed(self, data: bytes) -> None:
        """Read ``data``: the lines it completes become pairs (or the error)."""
        if self.error is not None or not data:
            return
        cut = data.rfind(b"\n")
        if cut < 0:
            self._rest += data
            if len(self._rest) > self.limits.max_line_bytes:
                self._too_long()
            return
        block = self._rest + data[: cut + 1] if self._rest else data[: cut + 1]
        self._rest = data[cut + 1 :]
        self._take(block.split(b"\n")[:-1])
        if not self.failed() and len(self._rest) > self.limits.max_line_bytes:
            self._too_long()

    def end(self) -> None:
        """The stream ended: a last line without a line end counts too."""
        if self.error is not None:
            return
        rest, self._rest = self._rest, b""
        if self.format is LineFormat.CSV:
            if rest or self._record_start:
                # A record still open (an unclosed quote) runs to the end of the stream.
                self._take_csv([rest], final=True)
        elif rest:
            self._take_json([rest])

    # -- lines to pairs ----------------------------------------------------------------
    def _take(self, lines: list[bytes], final: bool = False) -> None:
        if self.format is LineFormat.JSON:
            self._take_json(lines)
        else:
            self._take_csv(lines, final)

    def _take_json(self, lines: list[bytes]) -> None:
        first = self.lines + 1
        loads = orjson.loads
        try:
            items = list(map(loads, lines))
        except orjson.JSONDecodeError:
            items = None
        flat = _flat_pairs(items) if items is not None else None
        if flat is not None:
            longest = max(map(len, lines), default=0)
            if longest > self.limits.max_key_bytes or longest > self.limits.max_value_bytes:
                for offset in range(len(lines)):
                    key, value = flat[2 * offset], flat[2 * offset + 1]
                    if not self._within_limits(key, value, first + offset):
                        del flat[2 * offset :]
                        break
            self.pairs += flat
            self.chars += sum(map(len, flat))
            taken = len(flat) // 2
            self.ends.extend(range(first, first + taken))
            self.lines += taken if self.failed() else len(lines)
            return
        # Something is wrong: walk line by line to take the good ones and name the bad.
        for offset, line in enumerate(lines):
            number = first + offset
            try:
                item = loads(line)
            except orjson.JSONDecodeError as exc:
                if not line.strip():
                    self._fail(number, 400, "empty line")
                else:
                    self._fail(number, 400, f"not valid JSON ({exc})")
                return
            if not _is_pair(item):
                self._fail(number, 400, 'not a JSON array of two strings ["key","value"]')
                return
            if not self._within_limits(item[0], item[1], number):
                return
            self.pairs += item
            self.chars += len(item[0]) + len(item[1])
            self.ends.append(number)
            self.lines = number

    def _take_csv(self, lines: list[bytes], final: bool) -> None:
        rest = self._rest
        for line in lines:
            self.lines += 1
            if not self._record_start:
                self._record_start = self.lines
                record = line
            else:
                record = self._open_record + b"\n" + line
            # A record is complete when its quotes pair up (RFC 4180 doubles a quote).
            if record.count(b'"') % 2 and not final:
                self._open_record = record
                if len(record) > self.limits.max_line_bytes:
                    self._rest = rest
                    self._too_long()
                    return
                continue
            start, self._record_start = self._record_start, 0
            self._open_record = b""
            if not self._take_record(record, start):
                return

    _open_record = b""

    def _take_record(self, record: bytes, start: int) -> bool:
        try:
            text = record.decode()
        except UnicodeDecodeError:
            self._fail(start, 400, "not valid UTF-8")
            return False
        try:
            rows = list(csv.reader([text], strict=True))
        except csv.Error as exc:
            self._fail(start, 400, f"not a valid CSV record ({exc})")
            return False
        if len(rows) != 1 or len(rows[0]) != 2:
            self._fail(start, 400, "not a CSV record of two fields key,value")
            return False
        key, value = rows[0]
        if not self._within_limits(key, value, start):
            return False
        self.pairs += (key, value)
        self.ends.append(self.lines)
        self.chars += len(key) + len(value)
        return True

    def _within_limits(self, key: str, value: str, line: int) -> bool:
        limits = self.limits
        if not key:
            self._fail(line, 400, "the key is empty")
            return False
        if len(key) > limits.max_key_bytes or len(key.encode()) > limits.max_key_bytes:
            self._fail(line, 413, f"key longer than {limits.max_key_bytes} bytes")
            return False
        if len(value) > limits.max_value_bytes or len(value.encode()) > limits.max_value_bytes:
            self._fail(line, 413, f"value longer than {limits.max_value_bytes} bytes")
            return False
        return True

    def _fail(self, line: int, status: int, reason: str) -> None:
        self.error = LineError(line, status, reason)
        self._rest = b""

    def _too_long(self) -> None:
        start = self._record_start or self.lines + 1
        self._fail(start, 413, f"line longer than {self.limits.max_line_bytes} bytes")


# Pairs a packed chunk may hold, and the characters past which it closes: what
# ``pbkv load`` sends is a load chunk's worth (a replicated batch's).
MAX_PACKED_PAIRS = 4096
PACKED_CHARS = 1 << 20


def packed_chunk(pairs: list[str], ends: list[int]) -> bytes:
    """Pairs (key, value, ...) and each one's last line, as ``PackedParser`` reads them."""
    return cast(bytes, msgpack.packb([ends, pairs]))


class PackedParser(PairBuffer):
    """``format=msgpack``: the stream ``pbkv load`` sends once it has parsed and checked
    the lines itself (the parsing is then the client's work, not the primary's).

    A stream of msgpack arrays ``[ends, pairs]``: ``pairs`` flat (key, value, ...),
    ``ends`` the line number of each pair in the client's file.  Checked as the
    lines are (strings, a key not empty, the size limits), an array at a time; the
    interface is ``LineParser``'s.
    """

    def __init__(self, limits: PairLimits | None = None) -> None:
        super().__init__(limits)
        self.format = LineFormat.PACKED
        limits = self.limits
        self._fed = 0  # bytes fed
        self._complete = 0  # bytes of the chunks read whole
        self._unpacker = msgpack.Unpacker(
            raw=False,
            max_buffer_size=4 * (MAX_PACKED_PAIRS * 16 + 4 * (1 << 20) + limits.max_line_bytes),
            # Bounded here, checked against the key and value limits in _take (a 413).
            max_str_len=limits.max_line_bytes,
            max_bin_len=0,
            max_array_len=2 * MAX_PACKED_PAIRS,
            max_map_len=0,
            max_ext_len=0,
        )

    def feed(self, data: bytes) -> None:
        if self.error is not None or not data:
            return
        self._fed += len(data)
        try:
            self._unpacker.feed(data)
            for item in self._unpacker:
                if not self._take(item):
                    return
                self._complete = self._unpacker.tell()  # where the next chunk starts
        except (ValueError, msgpack.exceptions.UnpackException) as exc:
            self._fail(400, f"not a valid packed chunk ({type(exc).__name__})")

    def end(self) -> None:
        if self.error is None and self._complete != self._fed:
            self._fail(400, "the stream ends inside a packed chunk")

    def _take(self, item: Any) -> bool:
        if type(item) is not list or len(item) != 2:
            self._fail(400, "a packed chunk is [ends, pairs]")
            return False
        ends, flat = item
        if (
            type(ends) is not list
            or type(flat) is not list
            or len(flat) != 2 * len(ends)
            or (ends and set(map(type, ends)) != {int})
            or (flat and (set(map(type, flat)) != {str} or not all(flat[0::2])))
        ):
            self._fail(
                400, "a packed chunk holds a line number and two strings, a key not empty, a pair"
            )
            return False
        limits = self.limits
        error: LineError | None = None
        if flat and (
            4 * max(map(len, flat[0::2])) > limits.max_key_bytes
            or 4 * max(map(len, flat[1::2])) > limits.max_value_bytes
        ):  # some pair may pass a limit: look at each (the pairs before it are taken)
            for n in range(len(ends)):
                key, value = flat[2 * n], flat[2 * n + 1]
                if len(key.encode()) > limits.max_key_bytes:
                    reason = f"key longer than {limits.max_key_bytes} bytes"
                elif len(value.encode()) > limits.max_value_bytes:
                    reason = f"value longer than {limits.max_value_bytes} bytes"
                else:
                    continue
                error = LineError(ends[n], 413, reason)
                del flat[2 * n :], ends[n:]
                break
        self.pairs += flat
        self.ends += ends
        self.chars += sum(map(len, flat))
        if ends:
            self.lines = ends[-1]
        if error is not None:
            self.error = error
            return False
        return True

    def _fail(self, status: int, reason: str, line: int = 0) -> None:
        self.error = LineError(line or self.lines + 1, status, reason)
