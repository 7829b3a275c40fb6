"""A bulk load: ``POST /kvman/load`` with a body of lines, read as it arrives.

The reader hands the body over chunk by chunk (it is never held whole); a
``LineParser`` (``pbkv/bulk.py``) turns it into pairs; the pairs go to the
primary in chunks of at most a batch's size (``BATCH_WRITES`` pairs, closed past
``BATCH_CHARS`` characters), each applied whole or not at all on both servers and
acknowledged once the backup applied it, as any write is.  At most
``LOAD_WINDOW`` chunks are unanswered at once: past that, the connection is not
read until one is answered, so a load holds a bounded amount of memory and goes
as fast as the backup acknowledges.

The reply comes once every chunk sent is answered: a summary (lines, pairs
applied, pairs skipped), or the first failure (an invalid line, a refusal, a
replication failure) with the lines applied before it; every line before that
one is applied, nothing from it on.  A failure is answered at once; the rest of
the body is then read and dropped, so the connection stays usable.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import orjson

from pbkv.bulk import (
    LineError,
    LineFormat,
    LineParser,
    LoadMode,
    PackedParser,
    PairLimits,
)
from pbkv.commands import (
    DiskFailed,
    Loaded,
    MemoryFull,
    Outcome,
    Refused,
    ReplicationFailed,
)
from pbkv.core import BATCH_CHARS, BATCH_WRITES
from pbkv.http.access import check_client_token
from pbkv.http.replies import RETRY, RequestError, raise_method, refusal_reply
from pbkv.metrics import CollectorPaused
from pbkv.routes import LOAD_PATH

if TYPE_CHECKING:
    from pbkv.http.pending import PendingReply
    from pbkv.http.protocol import HttpProtocol

LOAD_PAIRS = BATCH_WRITES  # pairs a chunk holds at most
LOAD_CHARS = BATCH_CHARS  # a chunk closes past this many characters of keys and values
# Chunks sent and not answered before the connection is no longer read: the backup's
# batches in flight plus as many queued behind them keep both servers busy.
LOAD_WINDOW = 8
_METHODS = (b"POST",)
_COURSE_METHODS = (b"GET", b"POST")


class _Failure:
    """The first thing that went wrong, in the order of the lines."""

    __slots__ = ("order", "status", "message", "fields")

    def __init__(self, order: int, status: int, message: str, fields: dict[str, str]) -> None:
        self.order = order  # the chunk it concerns (an invalid line: after every chunk)
        self.status = status
        self.message = message
        self.fields = fields


def _outcome_failure(outcome: Outcome) -> tuple[int, str, dict[str, str]]:
    """A refusing outcome of a chunk as (status, reason, fields), as a write gets it."""
    if isinstance(outcome, Refused):
        stage = outcome.stage.value
        if outcome.primary is not None:
            return (
                503,
                f"this server is the {outcome.role}; send writes to the primary at "
                f"{outcome.primary}",
                {"stage": stage, "primary": outcome.primary},
            )
        return 503, f"not accepting this request in stage {stage}", {"stage": stage}
    if isinstance(outcome, ReplicationFailed):
        return 503, "replication failed", {}
    if isinstance(outcome, MemoryFull):
        return 507, f"max_memory reached ({outcome.limit} bytes): write refused", {}
    if isinstance(outcome, DiskFailed):
        if outcome.applied:
            return 503, f"disk error: not acknowledged ({outcome.reason})", {}
        return 507, f"disk error: writes refused until it clears ({outcome.reason})", {}
    return 500, f"unexpected outcome {type(outcome).__name__}", {}


def load_options(query: bytes | None) -> tuple[LoadMode, LineFormat]:
    """``mode`` (insert, the default, or upsert) and ``format`` (jsonl or csv) from
    the query string; anything else is a 400."""
    mode, fmt = LoadMode.INSERT, LineFormat.JSON
    for name, value in parse_qsl((query or b"").decode("latin-1"), keep_blank_values=True):
        if name == "mode":
            try:
                mode = LoadMode(value)
            except ValueError:
                raise RequestError(400, "mode must be insert or upsert") from None
        elif name == "format":
            try:
                fmt = LineFormat(value)
            except ValueError:
                raise RequestError(400, "format must be jsonl, csv or msgpack") from None
        else:
            raise RequestError(400, f"unknown parameter {name!r} (mode, format)")
    return mode, fmt


class BulkLoad:
    """One load request on one connection (a ``BodyStream`` of its reader)."""

    def __init__(
        self, conn: HttpProtocol, reply: PendingReply, method: bytes, query: bytes | None
    ) -> None:
        self.conn = conn
        self.reply = reply
        limits = conn.limits
        self.limits = PairLimits(limits.max_key_bytes, limits.max_value_bytes)
        self.parser: LineParser | PackedParser = LineParser(LineFormat.JSON, self.limits)
        self.upsert = False
        self.outstanding = 0  # chunks sent, not answered
        self.held = 0  # their characters, counted in guard.pending_bytes
        self.ends: collections.deque[int] = collections.deque()  # each one's last line
        self.sent = 0  # chunks sent
        self.lines = 0  # the last line of the chunks applied so far, all in order
        self.applied = 0
        self.skipped = 0
        self.body_ended = False
        self.answered = False  # the reply is given: the rest of the body is dropped
        self.failure: _Failure | None = None
        try:
            allowed = _COURSE_METHODS if conn.errors == "course" else _METHODS
            if method not in allowed:
                raise_method(b"POST")
            access = conn.access
            if access.client_token is not None:
                check_client_token(access, LOAD_PATH, conn.reader.authorization)
            if conn.reader.idempotency_key is not None:
                raise RequestError(
                    400,
                    "a load takes no Idempotency-Key: run it again instead (in insert "
                    "mode the pairs already loaded are skipped)",
                )
            mode, fmt = load_options(query)
        except RequestError as exc:
            self._fail(0, exc.status, exc.message, {})
            self._finish()
            return
        self.upsert = mode is LoadMode.UPSERT
        if fmt is LineFormat.PACKED:
            self.parser = PackedParser(self.limits)
        else:
            self.parser.format = fmt

    # -- what the reader reports -------------------------------------------------------
    def chunk(self, data: bytes) -> None:
        """Some of the body."""
        conn = self.conn
        conn.reader.since = conn.guard.clock  # the body timeout counts from the last bytes
        if self.answered or self.failure is not None:
            return  # dropped: nothing from the failure on is applied
        parser = self.parser
        with CollectorPaused():
            parser.feed(data)
            self._send(final=parser.error is not None)

    def end(self) -> None:
        """The body is complete."""
        self.body_ended = True
        if not self.answered:
            self.parser.end()
            self._send(final=True)
        self._finish()

    def abort(self, status: int, message: str) -> None:
        """The request cannot go on (its body timed out, or its HTTP is malformed): no
        more of it is read; its complete lines are applied, and the reply says so once
        every chunk sent is answered."""
        self.body_ended = True
        if not self.answered and self.failure is None:
            self._send(final=True)
        self._fail(1 << 62, status, message, {})
        self._finish()

    @property
    def waiting(self) -> bool:
        """Whether the connection must not be read now (the window is full)."""
        if self.answered or self.body_ended:
            return False
        guard = self.conn.guard
        return self.outstanding >= LOAD_WINDOW or (
            self.outstanding > 0 and guard.pending_bytes > guard.limits.max_pending_bytes
        )

    # -- chunks ------------------------------------------------------------------------
    def _send(self, final: bool) -> None:
        """Send the chunks that are ready; ``final``: every pair parsed, whatever the
        window (at the end of the body, or before an invalid line)."""
        parser = self.parser
        while self.failure is None and parser.pairs:
            full = len(parser.pairs) >= 2 * LOAD_PAIRS or parser.chars >= LOAD_CHARS
            if not final and not (full and self.outstanding < LOAD_WINDOW):
                break
            pairs, ends = parser.take(LOAD_PAIRS, LOAD_CHARS)
            self._submit(pairs, ends[-1])
        error = parser.error
        if error is not None and self.failure is None:
            self._fail_line(error)
        if self.waiting:
            self.conn.hold_reading()

    def _submit(self, pairs: list[str], last: int) -> None:
        order = self.sent
        self.sent += 1
        self.outstanding += 1
        self.ends.append(last)
        size = sum(map(len, pairs))
        self.held += size
        self.conn.guard.pending_bytes += size

        def answered(outcome: Outcome) -> None:
            self._chunk_answered(order, size, outcome)

        outcome = self.conn.app.submit_pairs(pairs, self.upsert, answered)
        if outcome is not None:
            answered(outcome)

    def _chunk_answered(self, order: int, size: int, outcome: Outcome) -> None:
        conn = self.conn
        self.outstanding -= 1
        self.held -= size
        conn.guard.pending_bytes -= size
        last = self.ends.popleft()
        conn.reader.since = conn.guard.clock  # waiting for the backup is not the client's fault
        if isinstance(outcome, Loaded):
            self.applied += outcome.applied
            self.skipped += outcome.skipped
            if self.failure is None or order < self.failure.order:
                self.lines = last
        else:
            status, message, fields = _outcome_failure(outcome)
            self._fail(order, status, message, fields)
        if not self.answered:
            if self.failure is None and not self.body_ended:
                self._send(final=False)
            self._finish()
            if not self.waiting:
                conn.release_reading()

    # -- the reply ---------------------------------------------------------------------
    def _fail_line(self, error: LineError) -> None:
        self._fail(1 << 62, error.status, str(error), {"line": str(error.line)})

    def _fail(self, order: int, status: int, message: str, fields: dict[str, str]) -> None:
        failure = self.failure
        if failure is None or order < failure.order:
            self.failure = _Failure(order, status, message, fields)

    def _finish(self) -> None:
        """Answer once every chunk sent is answered, and the body ended or failed."""
        if self.answered or self.outstanding:
            return
        failure = self.failure
        if failure is None and not self.body_ended:
            return
        self.answered = True
        counts = {
            "lines": str(self.lines),
            "applied": str(self.applied),
            "skipped": str(self.skipped),
        }
        if failure is None:
            body = orjson.dumps({"success": "true", **counts})
            self.conn.load_answered(self, 200, body, b"")
            return
        fields = {**failure.fields, **counts}
        fields.setdefault("line", str(self.lines + 1))  # the first line not applied
        message = failure.message
        if "line" not in failure.fields and self.sent:
            message = f"line {fields['line']} and after not applied: {message}"
        status, body, extra = refusal_reply(
            self.conn.errors,
            LOAD_PATH,
            failure.status,
            message,
            fields,
            RETRY if failure.status == 503 else b"",
        )
        self.conn.load_answered(self, status, body, extra)
