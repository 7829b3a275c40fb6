"""The request reader: bytes in, complete requests (or a refusal) out, no I/O.

It holds the httptools parser and its callbacks, reads one request at a time
in the ``Phase`` it is in, bounds what a request may take (its head, its body,
the memory all unfinished requests of the server hold together, see
``pbkv/limits.py``) and reads raw UTF-8 in a request target as the
percent-encoding a careful client would have sent.  What it finds goes to its
``RequestHandler``: a complete request (its parts are the reader's attributes
until the handler returns), or an error after which the connection closes.
"""

from __future__ import annotations

import enum
import re
from typing import Protocol

import httptools

from pbkv.http.access import REPEATED
from pbkv.http.params import Limits
from pbkv.http.replies import RETRY, error_body
from pbkv.limits import SMALL_BODY, Guard
from pbkv.routes import LOAD_PATH
from pbkv.wire import UPGRADE_TOKEN


class Phase(enum.Enum):
    """Where the reader is in the current request."""

    IDLE = "idle"  # between requests
    REQUEST_LINE = "request line"
    HEADERS = "headers"
    BODY = "body"


# The members as module names: the hot path compares them by identity.
_IDLE = Phase.IDLE
_REQUEST_LINE = Phase.REQUEST_LINE
_HEADERS = Phase.HEADERS
_BODY = Phase.BODY


class BodyStream(Protocol):
    """A request body taken as it arrives instead of whole (a bulk load's)."""

    def chunk(self, data: bytes) -> None: ...

    def end(self) -> None: ...


class RequestHandler(Protocol):
    """What the reader reports to (``HttpProtocol`` implements it)."""

    def stream_began(self) -> BodyStream | None:
        """The head of a request to the bulk load's path is read: a stream for its body,
        or None to read it whole as any other."""

    def request_ready(self) -> None:
        """A complete request: its parts are the reader's attributes until this returns."""

    def refuse_and_close(self, status: int, message: str, extra: bytes = b"") -> None:
        """An error that ends the connection: answer it (after the replies due before
        it), then close."""

    def send_continue(self) -> None:
        """The client waits for ``100 Continue`` before its body (if no reply is due first)."""

    def upgrade_requested(self, leftover: bytes) -> None:
        """The request asks to become the replication channel; ``leftover`` was read with it."""

    def write_and_close(self, data: bytes) -> None:
        """Send ``data`` as it is and close (an HTTP/0.9 client takes no status line)."""

    def wait_for_room(self) -> bool:
        """No room under max_pending_bytes for the request being read: True when the
        connection waits for its own earlier requests to be answered (it is no longer
        read until then), False when the request is to be refused."""


_NON_ASCII = re.compile(rb"[\x80-\xff]")
_LINE_END = re.compile(rb"[\r\n]")
_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line that ends a head


def percent_encode_high(segment: bytes) -> bytes:
    """Bytes >= 0x80 as ``%XX``: what a careful client sends for raw UTF-8."""
    return _NON_ASCII.sub(lambda byte: b"%%%02X" % byte[0][0], segment)


_WATCHED_HEADERS = frozenset(
    {
        b"content-type",
        b"content-length",
        b"upgrade",
        b"authorization",
        b"origin",
        b"sec-fetch-site",
        b"expect",
        b"idempotency-key",
    }
)
# The usual spellings of header names, each with its lower case, b"" for one not
# watched: a request's headers are looked up, not lowered (a Python call per header
# when compiled); another spelling is lowered.
_SPELLINGS: dict[bytes, bytes] = {
    spelling: name if name in _WATCHED_HEADERS else b""
    for name in (
        *_WATCHED_HEADERS,
        b"host",
        b"user-agent",
        b"accept",
        b"accept-encoding",
        b"connection",
        b"keep-alive",
    )
    for spelling in (name, name.title(), name.upper())
}


class RequestReader:
    """Reads the requests of one connection (see the module docstring)."""

    __deletable__ = ["_handler", "_request_ready"]  # by close (compiled classes ask)

    def __init__(self, handler: RequestHandler, limits: Limits, guard: Guard) -> None:
        self.limits = limits
        self.guard = guard
        self._handler = handler
        self._request_ready = handler.request_ready  # bound once: called per request
        self.parser = httptools.HttpRequestParser(self)
        self.phase = _IDLE
        self.since = guard.clock  # when the phase began (on the guard's coarse clock)
        self.closing = False  # the connection is closing: nothing more is read
        self.upgrade_only = False  # over max_clients: only a replication upgrade is read
        # The connection is not read until its earlier requests are answered (or their
        # replies read): a body begun in the bytes already read is not refused for
        # lack of room while there is a second max_pending_bytes (the rest of it is
        # read only then; it counts in full from its headers, as always).
        self.paused = False
        # The request being read.
        self.url = b""
        self.body: list[bytes] = []
        self.content_type = b""
        self.authorization: bytes | None = None
        self.from_web_page = False  # a browser sent it on a page's behalf
        self.upgrade = False  # it asks for the replication channel
        self.refused = False  # answered already: the rest of it is ignored
        self.idempotency_key: bytes | None = None  # its Idempotency-Key header, as sent
        self.stream: BodyStream | None = None  # takes the body as it arrives (a bulk load)
        self._expect = b""
        self._head_bytes = 0
        self._body_size = 0
        self._content_length = -1  # as the header says (-1: none)
        self._declared = 0  # Content-Length, once it passed the limit check
        self.held = 0  # bytes of this request counted in guard.pending_bytes

    def feed(self, data: bytes) -> None:
        """Read ``data``; each request that completes goes to the handler at once."""
        if self.closing:
            return
        try:
            if data.isascii():
                self.parser.feed_data(data)
            else:
                self._feed_with_raw_bytes(data)
        except httptools.HttpParserUpgrade as exc:
            self._handler.upgrade_requested(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._handler.refuse_and_close(400, f"malformed HTTP request: {exc}")
            return
        phase = self.phase
        if phase is _REQUEST_LINE or phase is _HEADERS:
            # httptools buffers a request line and headers without bound: cap them.
            self._head_bytes += len(data)
            self._hold(len(data))
            if self._head_bytes > self.limits.max_head_bytes:
                self._handler.refuse_and_close(
                    413, f"request line and headers larger than {self.limits.max_head_bytes} bytes"
                )
            elif self._head_bytes > SMALL_BODY and not self._room_for(0):
                self._refuse_busy()

    def refuse_client(self) -> None:
        """Refuse this connection: the server has max_clients already."""
        self.refused = True
        limit = self.guard.limits.max_clients
        self._handler.refuse_and_close(
            503, f"too many client connections (max_clients {limit})", RETRY
        )

    def release(self) -> None:
        """Give back what the request being read holds in the guard."""
        if self.held:
            self.guard.release(self.held)
            self.held = 0

    def close(self) -> None:
        """The connection is gone: drop the parser, the handler and a partial body (the
        parser and the handler refer back to this reader: without the cycles, the
        connection is freed now, not at a later GC pass)."""
        self.closing = True
        self.parser = None  # type: ignore[assignment]  # nothing is fed after close
        del self._handler, self._request_ready
        self.body = []
        self.stream = None

    # -- raw bytes in a request target -------------------------------------------------
    def _feed_with_raw_bytes(self, data: bytes) -> None:
        """Feed ``data``, percent-encoding the bytes >= 0x80 of request lines.

        curl sends ``?key=韩国人`` as raw UTF-8, which llhttp refuses ("Invalid char
        in url query"); httptools offers no leniency for it (only for headers, chunks,
        versions and the like).  So, before parsing, such bytes of a request line
        become ``%XX``, as a careful client would have sent them; headers and bodies
        go to the parser untouched.  The data is fed up to each byte >= 0x80 and the
        parser's progress (``phase``) says where that byte falls; each request line,
        head and body takes one feed, so the cost stays per message, not per byte.
        (The parser reports a header only once it is complete, so a byte >= 0x80 in
        the first header line counts as the target's when the read starts right at
        it or the header's text just before it repeats the target's end; it is
        then encoded too.  The headers pbkv reads are ASCII, so nothing changes.
        After a chunked body holding such bytes, the rest of that read goes to the
        parser as it is.)
        """
        pos, end = 0, len(data)
        while pos < end and not self.closing:
            found = _NON_ASCII.search(data, pos)
            if found is None:
                self._feed_slice(data, pos, end)
                return
            at = found.start()
            self._feed_slice(data, pos, at)
            if self.closing:  # a request in that slice may have closed the connection
                return  # type: ignore[unreachable]  # mypy keeps the loop test's narrowing
            phase = self.phase
            if phase is _REQUEST_LINE and self._in_target(data, pos, at):
                line_end = _LINE_END.search(data, at)
                pos = line_end.start() if line_end is not None else end
                self.parser.feed_data(percent_encode_high(data[at:pos]))
                if line_end is not None:
                    self.phase = _HEADERS
                continue
            if phase is _REQUEST_LINE or phase is _HEADERS:  # the rest of the head at once
                head_end = _HEAD_END.search(data, at)
                pos = head_end.end() if head_end is not None else end
            elif phase is _BODY and self._content_length >= 0:
                pos = min(end, at + max(1, self._content_length - self._body_size))
            else:  # a chunked body, or the first byte of a request (the parser refuses it)
                pos = end
            self._feed_slice(data, at, pos)

    def _in_target(self, data: bytes, start: int, at: int) -> bool:
        """Whether the parser, fed ``data[start:at]`` in its request line, stopped inside
        the target: then what it was fed ends with the target so far (which holds no
        space or line end); past the target it ends with a version or a header."""
        url = self.url
        n = min(at - start, len(url))
        return data[at - n : at] == url[len(url) - n :]

    def _feed_slice(self, data: bytes, start: int, stop: int) -> None:
        if start == stop:
            return
        try:
            self.parser.feed_data(data[start:stop])
        except httptools.HttpParserUpgrade as exc:
            raise httptools.HttpParserUpgrade(start + exc.args[0]) from None

    # -- httptools callbacks -------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self._body_size = 0
        self.content_type = b""
        self.authorization = None
        self.from_web_page = False
        self.refused = False
        self.upgrade = False
        self.idempotency_key = None
        self._head_bytes = 0
        self._content_length = -1
        self._declared = 0
        self._expect = b""
        self.phase = _REQUEST_LINE
        self.since = self.guard.clock

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.phase = _HEADERS
        lower = _SPELLINGS.get(name)
        if lower is None:
            lower = name.lower()
            if lower not in _WATCHED_HEADERS:
                return
        elif not lower:  # Host, User-Agent...: the common case
            return
        if lower == b"idempotency-key":  # first: it comes with every write of a client
            # Twice is no key: refused where it is read, never one of them taken.
            self.idempotency_key = value if self.idempotency_key is None else REPEATED
        elif lower == b"content-type":
            self.content_type = value
        elif lower == b"content-length":
            try:
                self._declared = self._content_length = int(value)
                # A bulk load's body streams: its lines are bounded one by one.
                if self._declared > self.limits.max_body_bytes and not self.url.startswith(
                    LOAD_PATH
                ):
                    self.refused = True
            except ValueError:
                pass  # httptools rejects it
        elif lower == b"upgrade" and value.strip().lower() == UPGRADE_TOKEN:
            self.upgrade = True
        elif lower == b"authorization":
            # Twice is no credential: refused where it is checked, never the last one taken.
            self.authorization = value.strip() if self.authorization is None else REPEATED
        elif lower == b"origin" or (lower == b"sec-fetch-site" and value.strip() != b"none"):
            self.from_web_page = True
        elif lower == b"expect":
            self._expect = value.strip().lower()

    def on_headers_complete(self) -> None:
        self.phase = _BODY
        self.since = self.guard.clock
        if self.refused:
            self._handler.refuse_and_close(
                413, f"request body larger than {self.limits.max_body_bytes} bytes"
            )
            return
        if self.upgrade_only and not self.upgrade:
            self.refuse_client()
            return
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._wrong_version(version)
            return
        if self._expect and self._expect != b"100-continue":
            self.refused = True  # ignore the body
            self._handler.refuse_and_close(417, "only 'Expect: 100-continue' is understood")
            return
        if self.url.startswith(LOAD_PATH):
            self.stream = self._handler.stream_began()
            if self.stream is not None:
                if self._expect:
                    self._handler.send_continue()
                return
        declared = self._declared
        if declared:
            guard = self.guard
            if declared > SMALL_BODY and not self._room_for(declared):
                self._refuse_busy()
                return
            # Reserved up front: a stalled body counts in full (inline: the hot path).
            self.held += declared
            guard.pending_bytes += declared
        if self._expect:
            self._handler.send_continue()

    def on_body(self, body: bytes) -> None:
        if self.refused:
            return
        if self.stream is not None:
            self.stream.chunk(body)
            return
        self._body_size += len(body)
        if self._body_size > self.limits.max_body_bytes:
            self.refused = True
            self._handler.refuse_and_close(
                413, f"request body larger than {self.limits.max_body_bytes} bytes"
            )
            return
        if not self._declared:  # chunked: counted as it arrives
            self._hold(len(body))
            if self._body_size > SMALL_BODY and not self._room_for(0):
                self._refuse_busy()
                return
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.phase = _IDLE
        guard = self.guard
        if self.held:
            guard.release(self.held)
            self.held = 0
        self.since = guard.clock
        if self.closing or self.refused:
            return
        if self.upgrade and self.parser.should_upgrade():
            return  # feed hands the connection over
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.end()
            return
        self._request_ready()
        self.body = []

    # -- refusals ------------------------------------------------------------------------
    def _hold(self, size: int) -> None:
        self.held += size
        self.guard.hold(size)

    def _room_for(self, size: int) -> bool:
        guard = self.guard
        if guard.room_for(size):
            return True
        # A connection that waits for its own earlier requests (not read until they
        # are answered) may begin one more body, within a second max_pending_bytes:
        # many such connections together still get 503s past that.
        return guard.pending_bytes + size <= 2 * guard.limits.max_pending_bytes and (
            self.paused or self._handler.wait_for_room()
        )

    def _refuse_busy(self) -> None:
        guard = self.guard
        guard.refused_bodies.hit(guard.clock)
        self.refused = True  # ignore the rest of the body
        self._handler.refuse_and_close(
            503,
            "server busy: too many request bytes in progress (max_pending_bytes "
            f"{guard.limits.max_pending_bytes}); retry later",
            RETRY,
        )

    def _wrong_version(self, version: str) -> None:
        self.refused = True
        if version == "0.9":
            # An HTTP/0.9 client expects a bare body, no status line or headers.
            self.closing = True
            self._handler.write_and_close(error_body("HTTP/0.9 is not supported; use HTTP/1.1"))
            return
        self._handler.refuse_and_close(505, f"HTTP/{version} is not supported; use HTTP/1.1")
