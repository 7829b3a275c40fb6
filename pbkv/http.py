"""The client API: HTTP/1.1 on ``httptools`` with a bare asyncio protocol.

Parsing belongs to httptools; this module routes, decodes parameters, checks
limits and turns outcomes into the course's exact JSON replies.  Replies on
one connection go out in request order even when a write is answered later
than a read behind it (pipelining).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import httptools
import orjson

from pbkv.commands import Command, Counted, Done, Dumped, Outcome, Refused, ReplicationFailed
from pbkv.limits import CLOCK_STEP, DUMP_PAIRS, SMALL_BODY, DumpStream, Guard
from pbkv.wire import UPGRADE_PATH, UPGRADE_TOKEN

log = logging.getLogger("pbkv")

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    417: b"Expectation Failed",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
    507: b"Insufficient Storage",
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class App(Protocol):
    """What the HTTP layer needs from a server (``node.Node`` implements it)."""

    accepts_replication: bool

    def read(self, command: Command, key: str) -> Outcome: ...

    def submit(
        self, command: Command, key: str, value: str | None, respond: Callable[[Outcome], None]
    ) -> Outcome | None: ...

    def status(self) -> dict[str, Any]: ...

    def metrics(self) -> tuple[bytes, str]: ...

    def shutdown(self) -> None: ...

    def upgrade(self, transport: asyncio.Transport, leftover: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Limits:
    max_key_bytes: int = 4096
    max_value_bytes: int = 1024 * 1024

    @property
    def max_body_bytes(self) -> int:
        # Percent-encoding can triple every byte; leave room for names and separators.
        return 3 * (self.max_key_bytes + self.max_value_bytes) + 1024

    @property
    def max_head_bytes(self) -> int:
        # The query string may carry what a body can, plus room for ordinary headers.
        return self.max_body_bytes + 64 * 1024


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# -- replies -----------------------------------------------------------------------
def response(status: int, body: bytes, extra: bytes = b"", close: bool = False) -> bytes:
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (
        status,
        _REASONS.get(status, b"Error"),
        len(body),
    )
    if close:
        head += b"Connection: close\r\n"
    return head + extra + b"\r\n" + body


def error_body(message: str, **extra: str) -> bytes:
    return orjson.dumps({"success": "false", "error": message, **extra})


_TRUE = b'{"success":"true"}'
_FALSE = b'{"success":"false"}'
_MISS = b'{"success":"false","value":""}'
_RETRY = b"Retry-After: 1\r\n"


def outcome_reply(command: Command, outcome: Outcome) -> tuple[int, bytes, bytes]:
    """(status, body, extra headers) for an outcome of ``command``."""
    if isinstance(outcome, Done):
        if command is Command.GET or command is Command.DELETE:
            if not outcome.ok:
                return 200, _MISS, b""
            return 200, b'{"success":"true","value":' + orjson.dumps(outcome.value) + b"}", b""
        return 200, (_TRUE if outcome.ok else _FALSE), b""
    if isinstance(outcome, Counted):
        return 200, b'{"result":"%d"}' % outcome.count, b""
    if isinstance(outcome, Dumped):
        return 200, orjson.dumps(outcome.pairs), b""
    if isinstance(outcome, ReplicationFailed):
        return 503, b'{"success":"false","error":"replication failed"}', _RETRY
    if isinstance(outcome, Refused):
        stage = outcome.stage.value
        if outcome.primary is not None:
            body = error_body(
                f"this server is the backup; send writes to the primary at {outcome.primary}",
                stage=stage,
                primary=outcome.primary,
            )
        else:
            body = error_body(f"not accepting this request in stage {stage}", stage=stage)
        return 503, body, _RETRY
    raise TypeError(f"unknown outcome {outcome!r}")


# -- routing -------------------------------------------------------------------------
_KV_ROUTES: dict[bytes, tuple[bytes, Command]] = {
    b"/kv/get": (b"GET", Command.GET),
    b"/kv/insert": (b"POST", Command.INSERT),
    b"/kv/update": (b"POST", Command.UPDATE),
    b"/kv/delete": (b"POST", Command.DELETE),
    b"/kvman/countkey": (b"GET", Command.COUNT),
    b"/kvman/dump": (b"GET", Command.DUMP),
}
_ADMIN_ROUTES = {b"/kvman/shutdown", b"/kvman/status", b"/metrics"}
_ADMIN_METHODS = {
    b"/kvman/shutdown": (b"GET", b"POST"),
    b"/kvman/status": (b"GET",),
    b"/metrics": (b"GET",),
}
_NEEDS_VALUE = frozenset({Command.INSERT, Command.UPDATE})
_NEEDS_KEY = frozenset({Command.GET, Command.INSERT, Command.UPDATE, Command.DELETE})


_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _decode_component(raw: bytes) -> str:
    """One name or value of a form: ``+`` is a space, then percent-decoding, then UTF-8."""
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" in raw:
        if _BAD_ESCAPE.search(raw):
            raise RequestError(
                400, "malformed percent-escape (a % must be followed by two hex digits)"
            )
        raw = unquote_to_bytes(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "parameters are not valid UTF-8 after percent-decoding") from None


def _decode_pairs(form: bytes, into: dict[str, str]) -> None:
    """``application/x-www-form-urlencoded`` pairs, as ``parse_qsl`` with blank values
    kept, but on bytes: no detour through str for the common undecorated case."""
    for piece in form.split(b"&"):
        if not piece:
            continue
        raw_name, _, raw_value = piece.partition(b"=")
        name = _decode_component(raw_name)
        if name in into:
            raise RequestError(400, f"parameter {name!r} given more than once")
        into[name] = _decode_component(raw_value)


def parse_params(query: bytes | None, body: bytes, content_type: bytes) -> dict[str, str]:
    """Query string and form or JSON body, merged; a name may appear once."""
    params: dict[str, str] = {}
    if query:
        if not query.isascii():
            raise RequestError(400, "query string must be ASCII (percent-encode the rest)")
        _decode_pairs(query, params)
    if not body:
        return params
    if content_type.split(b";", 1)[0].strip().lower() == b"application/json":
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RequestError(400, f"body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RequestError(400, "a JSON body must be an object")
        if body.count(b":") > len(data):
            _refuse_duplicate_names(body)  # more colons than names: look closer
        for name, value in data.items():
            if not isinstance(value, str):
                raise RequestError(400, f"parameter {name!r} must be a string")
            if name in params:
                raise RequestError(400, f"parameter {name!r} given more than once")
            params[name] = value
        return params
    _decode_pairs(body, params)
    return params


def _refuse_duplicate_names(body: bytes) -> None:
    """orjson keeps the last of repeated names; a repeated parameter is an error here."""

    def check(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for name, value in pairs:
            if name in seen:
                raise RequestError(400, f"parameter {name!r} given more than once")
            seen[name] = value
        return seen

    try:
        json.loads(body, object_pairs_hook=check)
    except RecursionError:
        raise RequestError(400, "JSON body nested too deeply") from None


def split_target(target: bytes) -> tuple[bytes, bytes | None]:
    """Path and query string of a request target.

    ``httptools.parse_url`` refuses targets over 64 KiB, but a query string may
    carry a whole value, so the usual origin form ``/path?query`` is split here.
    """
    if target.startswith(b"/"):
        path, has_query, query = target.partition(b"?")
        return path, query.partition(b"#")[0] if has_query else None
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        raise RequestError(400, "malformed request target") from None
    return url.path or b"/", url.query


def key_and_value(
    command: Command, params: dict[str, str], limits: Limits
) -> tuple[str, str | None]:
    key = params.get("key")
    if command in _NEEDS_KEY:
        if key is None:
            raise RequestError(400, "missing parameter 'key'")
        if not key:
            raise RequestError(400, "key must not be empty")
        if len(key) > limits.max_key_bytes or len(key.encode()) > limits.max_key_bytes:
            raise RequestError(413, f"key longer than {limits.max_key_bytes} bytes")
    value = params.get("value")
    if command in _NEEDS_VALUE:
        if value is None:
            raise RequestError(400, "missing parameter 'value'")
        if len(value) > limits.max_value_bytes or len(value.encode()) > limits.max_value_bytes:
            raise RequestError(413, f"value longer than {limits.max_value_bytes} bytes")
    return key or "", value


# -- the protocol ------------------------------------------------------------------
_IDLE, _HEAD, _BODY = 0, 1, 2  # where a connection is in its current request


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(
        self,
        app: App,
        limits: Limits,
        connections: set[HttpProtocol],
        guard: Guard | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.connections = connections
        self.guard = guard if guard is not None else Guard()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._content_type = b""
        self._too_large = False
        self._upgrade = False
        self._in_head = False  # between the first byte of a request and its blank line
        self._head_bytes = 0
        # Replies in request order: [bytes, a DumpStream or None, close after it].
        self._pending: collections.deque[list[Any]] = collections.deque()
        self._closing = False
        self._after_reply: Callable[[], None] | None = None
        # Resource bounds (pbkv/limits.py holds the totals).
        self._phase = _IDLE
        self._since = self.guard.clock  # when the current phase began
        self._declared = 0  # Content-Length of the request being read
        self._expect = b""
        self._held = 0  # bytes of this request counted in guard.pending_bytes
        self._queued = 0  # reply bytes ready but waiting behind an unanswered request
        self._stream: DumpStream | None = None  # the dump being sent
        self._write_paused = False
        self._stalled_since = 0.0  # when writing paused or the close began
        self._reading_paused = False
        self._counted = False  # in guard.clients
        self._probation = False  # over max_clients: only a replication upgrade may stay

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.connections.add(self)
        guard = self.guard
        bounds = guard.limits
        self.transport.set_write_buffer_limits(high=bounds.max_reply_buffer)
        if guard.clients < bounds.max_clients:
            guard.clients += 1
            self._counted = True
            return
        # Over max_clients: the replication channel still gets through (a few
        # connections in reserve, each must ask for the upgrade at once).
        guard.refused_clients.hit(guard.clock)
        if len(guard.probation) >= bounds.reserved_clients:
            guard.probation.popleft()._refuse_client()
        self._probation = True
        guard.probation.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()
        self.connections.discard(self)
        self._closing = True
        self.transport = None
        # The parser holds this protocol as its callback object: break the cycle so
        # the connection (and a partial body) is freed now, not at a later GC pass.
        self.parser = None  # type: ignore[assignment]
        self._body = []
        self._pending.clear()
        self._stream = None

    def pause_writing(self) -> None:
        # The transport holds max_reply_buffer unsent bytes: stop reading requests
        # (and producing a dump) until the client has read them.
        self._write_paused = True
        self._stalled_since = self.guard.clock
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._maybe_resume_reading()
        if self._stream is not None:
            self.guard.pump.want(self._pump_stream)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._handle_upgrade(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")
            return
        if self._in_head:
            # httptools buffers a request line and headers without bound: cap them.
            self._head_bytes += len(data)
            self._hold(len(data))
            if self._head_bytes > self.limits.max_head_bytes:
                self._fail(
                    413, f"request line and headers larger than {self.limits.max_head_bytes} bytes"
                )
            elif self._head_bytes > SMALL_BODY and not self.guard.room_for(0):
                self._refuse_busy()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []
        self._body_size = 0
        self._content_type = b""
        self._too_large = False
        self._upgrade = False
        self._in_head = True
        self._head_bytes = 0
        self._declared = 0
        self._expect = b""
        self._phase = _HEAD
        self._since = self.guard.clock

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"content-type":
            self._content_type = value
        elif lower == b"content-length":
            try:
                self._declared = int(value)
                if self._declared > self.limits.max_body_bytes:
                    self._too_large = True
            except ValueError:
                pass  # httptools rejects it
        elif lower == b"upgrade" and value.strip().lower() == UPGRADE_TOKEN:
            self._upgrade = True
        elif lower == b"expect":
            self._expect = value.strip().lower()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._phase = _BODY
        self._since = self.guard.clock
        if self._too_large:
            self._fail(413, f"request body larger than {self.limits.max_body_bytes} bytes")
            return
        if self._probation and not self._upgrade:
            self._refuse_client()
            return
        version = self.parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._wrong_version(version)
            return
        if self._expect and self._expect != b"100-continue":
            self._too_large = True  # ignore the body
            self._fail(417, "only 'Expect: 100-continue' is understood")
            return
        declared = self._declared
        if declared:
            if not self.guard.room_for(declared):
                self._refuse_busy()
                return
            self._hold(declared)  # reserved up front: a stalled body counts in full
        if self._expect and not self._pending and self.transport is not None:
            # Replies go in request order: an interim reply only when none is due before it.
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return
        self._body_size += len(body)
        if self._body_size > self.limits.max_body_bytes:
            self._too_large = True
            self._fail(413, f"request body larger than {self.limits.max_body_bytes} bytes")
            return
        if not self._declared:  # chunked: counted as it arrives
            self._hold(len(body))
            if self._body_size > SMALL_BODY and not self.guard.room_for(0):
                self._refuse_busy()
                return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._held:
            self.guard.release(self._held)
            self._held = 0
        self._phase = _IDLE
        self._since = self.guard.clock
        if self._closing or self._too_large:
            return
        if self._upgrade and self.parser.should_upgrade():
            return  # data_received takes over
        keep_alive = self.parser.should_keep_alive()
        slot: list[Any] = [None, None, not keep_alive]
        self._pending.append(slot)
        try:
            self._dispatch(slot)
        except RequestError as exc:
            self._reply(slot, exc.status, error_body(exc.message))
        except Exception:  # a bug must not stall this connection's later replies
            log.exception("internal error while handling a request")
            slot[2] = True
            self._reply(slot, 500, error_body("internal server error"))
        self._body = []
        if len(self._pending) > self.guard.limits.max_pipeline:
            self._pause_reading()  # read on once replies have caught up

    # internals
    def _dispatch(self, slot: list[Any]) -> None:
        path, query = split_target(self._url)
        method = self.parser.get_method()
        route = _KV_ROUTES.get(path)
        if route is None:
            self._admin(slot, path, method)
            return
        allowed, command = route
        if method != allowed:
            raise_method(allowed)
        body = b"".join(self._body) if self._body else b""
        params = parse_params(query, body, self._content_type)
        key, value = key_and_value(command, params, self.limits)
        app = self.app
        if command is Command.GET or command is Command.COUNT or command is Command.DUMP:
            outcome: Outcome | None = app.read(command, key)
        else:
            outcome = app.submit(command, key, value, lambda o: self._answer(slot, command, o))
        if outcome is not None:
            self._answer(slot, command, outcome)

    def _admin(self, slot: list[Any], path: bytes, method: bytes) -> None:
        if path not in _ADMIN_ROUTES:
            if path == UPGRADE_PATH:
                raise RequestError(400, "the replication channel needs an Upgrade header")
            raise RequestError(404, f"unknown path {path.decode('utf-8', 'replace')}")
        if method not in _ADMIN_METHODS[path]:
            raise_method(b", ".join(_ADMIN_METHODS[path]))
        if path == b"/kvman/status":
            self._reply(slot, 200, orjson.dumps(self.app.status()))
        elif path == b"/metrics":
            body, content_type = self.app.metrics()
            self._reply(slot, 200, body, content_type=content_type.encode())
        else:
            slot[2] = True
            self._after_reply = self.app.shutdown
            self._reply(slot, 200, b'{"success":"true"}')

    def _answer(self, slot: list[Any], command: Command, outcome: Outcome) -> None:
        if isinstance(outcome, Dumped) and not isinstance(outcome.source, list):
            if len(outcome.source) > DUMP_PAIRS:
                self._stream_dump(slot, outcome.source)
                return
            outcome = Dumped(list(outcome.source.items()))  # small: one reply as before
        status, body, extra = outcome_reply(command, outcome)
        self._reply(slot, status, body, extra)

    def _stream_dump(self, slot: list[Any], store: Any) -> None:
        """A dump goes out in chunks as the client reads it (chunked encoding;
        to an HTTP/1.0 client, delimited by the end of the connection)."""
        if self.parser is not None and self.parser.get_http_version() == "1.0":
            slot[2] = True
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
            slot[1] = DumpStream(store, chunked=False)
        else:
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            head += b"Transfer-Encoding: chunked\r\n"
            head += b"Connection: close\r\n\r\n" if slot[2] else b"\r\n"
            slot[1] = DumpStream(store, chunked=True)
        slot[0] = head
        self._flush()

    def _reply(
        self,
        slot: list[Any],
        status: int,
        body: bytes,
        extra: bytes = b"",
        content_type: bytes | None = None,
    ) -> None:
        data = response(status, body, extra, close=slot[2])
        if content_type is not None:
            data = data.replace(b"application/json", content_type, 1)
        slot[0] = data
        self._flush()

    def _flush(self) -> None:
        pending = self._pending
        transport = self.transport
        if self._stream is not None:
            return  # a dump is on the wire; the slots behind it wait
        while pending and pending[0][0] is not None:
            data, stream, close = pending[0]
            if transport is None:
                pending.popleft()
                continue
            transport.write(data)
            if stream is not None:
                pending[0][0] = b""
                self._stream = stream
                self.guard.pump.want(self._pump_stream)  # within the pump's budget
                return
            pending.popleft()
            if close:
                self._close_after_write()
                return
        if pending:
            # Replies ready behind one still being worked on count against the bound too.
            self._queued = sum(len(slot[0]) for slot in pending if slot[0] is not None)
            if self._queued > self.guard.limits.max_reply_buffer:
                self._pause_reading()
                return
        else:
            self._queued = 0
        if self._reading_paused:
            self._maybe_resume_reading()

    def _pump_stream(self) -> None:
        """Send the next chunk of the dump, or finish it; the pump calls it once per turn."""
        stream = self._stream
        transport = self.transport
        if stream is None or transport is None:
            return
        if self._write_paused:
            return  # resume_writing queues this again
        chunk = stream.next_chunk()
        if chunk:
            transport.write(chunk)
        if not stream.done:
            self.guard.pump.want(self._pump_stream)
            return
        self._stream = None
        _data, _stream, close = self._pending.popleft()
        if close:
            self._close_after_write()
            return
        self._flush()

    def _close_after_write(self) -> None:
        self._closing = True
        self._stalled_since = self.guard.clock
        self._pending.clear()
        if self.transport is not None:
            self.transport.close()
        if self._after_reply is not None:
            after, self._after_reply = self._after_reply, None
            after()

    def _fail(self, status: int, message: str, extra: bytes = b"") -> None:
        """Answer an unrecoverable request error and close the connection."""
        if self._closing:
            return
        slot: list[Any] = [None, None, True]
        self._pending.append(slot)
        self._reply(slot, status, error_body(message), extra)

    def _refuse_busy(self) -> None:
        guard = self.guard
        guard.refused_bodies.hit(guard.clock)
        self._too_large = True  # ignore the rest of the body
        self._fail(
            503,
            "server busy: too many request bytes in progress (max_pending_bytes "
            f"{guard.limits.max_pending_bytes}); retry later",
            _RETRY,
        )

    def _refuse_client(self) -> None:
        self._too_large = True
        limit = self.guard.limits.max_clients
        self._fail(503, f"too many client connections (max_clients {limit})", _RETRY)

    def _wrong_version(self, version: str) -> None:
        self._too_large = True
        if version == "0.9":
            # An HTTP/0.9 client expects a bare body, no status line or headers.
            self._closing = True
            if self.transport is not None:
                self.transport.write(error_body("HTTP/0.9 is not supported; use HTTP/1.1"))
                self.transport.close()
            return
        self._fail(505, f"HTTP/{version} is not supported; use HTTP/1.1")

    def _hold(self, size: int) -> None:
        self._held += size
        self.guard.hold(size)

    def _leave(self) -> None:
        """Give back what this connection counted in the guard (once)."""
        guard = self.guard
        if self._held:
            guard.release(self._held)
            self._held = 0
        if self._counted:
            self._counted = False
            guard.clients -= 1
        elif self._probation:
            self._probation = False
            try:
                guard.probation.remove(self)
            except ValueError:
                pass

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _maybe_resume_reading(self) -> None:
        if (
            self._reading_paused
            and not self._write_paused
            and self.transport is not None
            and len(self._pending) <= self.guard.limits.max_pipeline
            and self._queued <= self.guard.limits.max_reply_buffer
        ):
            self._reading_paused = False
            self.transport.resume_reading()

    def _handle_upgrade(self, leftover: bytes) -> None:
        path = self._url.partition(b"?")[0]
        if not self._upgrade or path != UPGRADE_PATH or self._pending:
            self._fail(400, "unsupported upgrade")
            return
        if not self.app.accepts_replication:
            self._fail(400, "only the backup accepts a replication channel")
            return
        transport = self.transport
        self._leave()
        self.connections.discard(self)
        self._closing = True
        self.transport = None
        assert transport is not None
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: "
            + UPGRADE_TOKEN
            + b"\r\nConnection: Upgrade\r\n\r\n"
        )
        self.app.upgrade(transport, leftover)

    def sweep(self, now: float) -> None:
        """The node's periodic check (once a second): timeouts of this connection."""
        transport = self.transport
        if transport is None:
            return
        bounds = self.guard.limits
        if self._probation and not self._closing and now - self._since > CLOCK_STEP:
            self._refuse_client()  # the replication channel asks for its upgrade at once
            return
        if self._closing or self._write_paused:
            # Replies the client does not read: give up on them after send_timeout.
            if now - self._stalled_since > bounds.send_timeout:
                self.guard.timeouts += 1
                transport.abort()
            return
        # Stamps come from a clock the sweep advances: subtract its step so that no
        # timeout fires early (it fires up to two steps late).
        elapsed = now - self._since - CLOCK_STEP
        phase = self._phase
        if phase == _HEAD and elapsed > bounds.header_timeout:
            self.guard.timeouts += 1
            self._fail(408, f"request head not received within {bounds.header_timeout:g} s")
        elif phase == _BODY and elapsed > bounds.body_timeout:
            self.guard.timeouts += 1
            self._too_large = True
            self._fail(408, f"request body not received within {bounds.body_timeout:g} s")
        elif phase == _IDLE and not self._pending and elapsed > bounds.idle_timeout:
            transport.close()


def raise_method(allowed: bytes) -> None:
    raise RequestError(405, f"method not allowed here; use {allowed.decode()}")
