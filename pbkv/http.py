"""The client API: HTTP/1.1 on ``httptools`` with a bare asyncio protocol.

Parsing belongs to httptools; this module routes, decodes parameters, checks
limits and turns outcomes into the course's exact JSON replies.  Replies on
one connection go out in request order even when a write is answered later
than a read behind it (pipelining).

A request that reached a route and is refused (bad parameter, too large, not
accepted in this stage, replication failed, ...) is a ``RequestError`` or a
refusing outcome; ``refusal_reply`` alone turns it into a reply, in the error
mode of the ``errors`` setting: ``course`` (HTTP 200 with the route's course
failure shape, the reason in ``X-Pbkv-*`` headers) or ``http`` (a real status
with a JSON error body).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

import httptools
import orjson

from pbkv.commands import (
    Command,
    Counted,
    Done,
    Dumped,
    MemoryFull,
    Outcome,
    Refused,
    ReplicationFailed,
)
from pbkv.config import Settings
from pbkv.limits import CLOCK_STEP, DUMP_PAIRS, SMALL_BODY, DumpStream, Guard
from pbkv.wire import UPGRADE_PATH, UPGRADE_TOKEN

log = logging.getLogger("pbkv")

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
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
    max_key_bytes: int = 64 * 1024
    max_value_bytes: int = 1024 * 1024

    @property
    def max_body_bytes(self) -> int:
        # Percent-encoding can triple every byte; leave room for names and separators.
        return 3 * (self.max_key_bytes + self.max_value_bytes) + 1024

    @property
    def max_head_bytes(self) -> int:
        # The query string may carry what a body can, plus room for ordinary headers.
        return self.max_body_bytes + 64 * 1024


@dataclass(frozen=True, slots=True)
class Access:
    """Who may do what (README "Security"); the default lets anyone do anything.

    The expected ``Authorization`` values are held whole (``b"Bearer <token>"``) so a
    request costs one constant-time comparison, and only when they are set.
    """

    client_token: bytes | None = None  # every request needs this Authorization value
    shutdown_secret: bytes | None = None  # /kvman/shutdown needs this one instead
    # Without a secret: the peer addresses that may shut the server down (and LOOPBACK).
    shutdown_from: frozenset[str] | None = None
    # The peer addresses that may open the replication channel (None: any).
    replication_from: frozenset[str] | None = None
    # TLS: the channel's client certificate must be verified and name one of these.
    replication_certificate_names: frozenset[str] | None = None


def _bearer(value: str | None) -> bytes | None:
    return None if value is None else b"Bearer " + value.encode("ascii")


def host_addresses(host: str) -> frozenset[str]:
    """The IP addresses a configured host name stands for (resolved once, at start)."""
    try:
        return frozenset({str(ipaddress.ip_address(host))})
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("cannot resolve %s (%s): no peer address will match it", host, exc)
        return frozenset()
    return frozenset(_normal(info[4][0]) for info in infos)


def _normal(address: str) -> str:
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def access_for(settings: Settings, role: str) -> Access:
    primary = host_addresses(settings.primary)
    # With a secret the owner proves itself; without one (protected mode), addresses.
    shutdown_from = None if settings.secret else primary | host_addresses(settings.backup)
    return Access(
        client_token=_bearer(settings.client_token),
        shutdown_secret=_bearer(settings.secret),
        shutdown_from=shutdown_from,
        # Kept with a secret too: until a peer has proved itself, only the primary's
        # address may even start a handshake.
        replication_from=primary if role == "backup" else frozenset(),
        replication_certificate_names=frozenset({settings.primary}) if settings.tls else None,
    )


def peer_ip(transport: asyncio.BaseTransport | None) -> str | None:
    """The connection's source address, normalised (None when unknown)."""
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not peer or not isinstance(peer, tuple):
        return None
    try:
        return _normal(peer[0])
    except ValueError:
        return None


# Loopback as a local process reaches it by default; the rest of 127.0.0.0/8 stands
# for other hosts in a single-machine pair (the course puts the backup on 127.0.0.2).
LOOPBACK = frozenset({"127.0.0.1", "::1"})


def certificate_names(certificate: dict[str, Any] | None) -> set[str]:
    """The DNS names and IP addresses in a verified certificate's subjectAltName."""
    if not certificate:
        return set()
    return {
        value if kind == "DNS" else _normal(value)
        for kind, value in certificate.get("subjectAltName", ())
        if kind in ("DNS", "IP Address")
    }


OPEN = Access()


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


def outcome_reply(
    command: Command, outcome: Outcome, errors: str = "course"
) -> tuple[int, bytes, bytes]:
    """(status, body, extra headers) for an outcome of ``command`` in error mode ``errors``."""
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
        return refusal_reply(
            errors, _COMMAND_PATHS[command], 503, "replication failed", None, _RETRY
        )
    if isinstance(outcome, Refused):
        stage = outcome.stage.value
        if outcome.primary is not None:
            message = f"this server is the backup; send writes to the primary at {outcome.primary}"
            fields = {"stage": stage, "primary": outcome.primary}
        else:
            message = f"not accepting this request in stage {stage}"
            fields = {"stage": stage}
        return refusal_reply(errors, _COMMAND_PATHS[command], 503, message, fields, _RETRY)
    if isinstance(outcome, MemoryFull):
        message = f"max_memory reached ({outcome.limit} bytes): write refused"
        return refusal_reply(errors, _COMMAND_PATHS[command], 507, message)
    raise TypeError(f"unknown outcome {outcome!r}")


# -- refusals: the one place where the error mode shapes the reply ------------------------
# What course clients get from each route when a request fails.  The course defined
# no failure for countkey, dump, status and shutdown: they get the generic one, never
# a count or a dump that could be taken for data.  /metrics is for scrapers, which
# read statuses: it keeps real HTTP errors, as unknown paths (404) do.
_COURSE_FAILURES: dict[bytes, bytes] = {
    b"/kv/get": _MISS,
    b"/kv/delete": _MISS,
    b"/kv/insert": _FALSE,
    b"/kv/update": _FALSE,
    b"/kvman/countkey": _FALSE,
    b"/kvman/dump": _FALSE,
    b"/kvman/status": _FALSE,
    b"/kvman/shutdown": _FALSE,
}
_HEADER_TEXT_LIMIT = 300  # characters of a reason kept in a header or a log line


def header_text(text: str) -> bytes:
    """``text`` as a safe header value: printable ASCII only, with Python escapes
    (``\\n``, ``\\xe9``, ``\\u043a``) for everything else, so no CR/LF can split it."""
    return text[:_HEADER_TEXT_LIMIT].encode("unicode_escape")


class _Throttle:
    """At most ``per_second`` log lines a second; the lines left out are counted and
    reported with the next one, so a flood of bad requests cannot flood the log."""

    def __init__(self, per_second: int = 20) -> None:
        self.per_second = per_second
        self.window = 0.0
        self.used = 0
        self.skipped = 0

    def allow(self, now: float) -> int | None:
        """None: leave this line out; else how many were left out before it."""
        if now - self.window >= 1.0:
            self.window, self.used = now, 0
        if self.used >= self.per_second:
            self.skipped += 1
            return None
        self.used += 1
        skipped, self.skipped = self.skipped, 0
        return skipped


_refusal_log = _Throttle()


def refusal_reply(
    errors: str,
    path: bytes,
    status: int,
    message: str,
    fields: Mapping[str, str] | None = None,
    extra: bytes = b"",
) -> tuple[int, bytes, bytes]:
    """(status, body, extra headers) refusing a request to ``path``.

    ``http`` mode, or a path that is no course route: ``status`` with
    ``{"success":"false","error":message, **fields}``.  ``course`` mode: 200 with the
    route's course failure shape; ``X-Pbkv-Error`` holds the message, ``X-Pbkv-Status``
    the status ``http`` mode would have used and ``X-Pbkv-<Field>`` each field (stage,
    primary), so clients still learn why; the reason is also logged.
    """
    shape = _COURSE_FAILURES.get(path) if errors == "course" else None
    if shape is None:
        return status, error_body(message, **(fields or {})), extra
    reason = header_text(message)
    headers = b"X-Pbkv-Error: %s\r\nX-Pbkv-Status: %d\r\n" % (reason, status)
    for name, value in (fields or {}).items():
        headers += b"X-Pbkv-%s: %s\r\n" % (name.title().encode(), header_text(value))
    skipped = _refusal_log.allow(time.monotonic())
    if skipped is not None:
        more = f" ({skipped} more refusals not logged)" if skipped else ""
        log.info("refused %s (%d): %s%s", path.decode(), status, reason.decode(), more)
    return 200, shape, headers + extra


# -- routing -------------------------------------------------------------------------
_KV_ROUTES: dict[bytes, tuple[bytes, Command]] = {
    b"/kv/get": (b"GET", Command.GET),
    b"/kv/insert": (b"POST", Command.INSERT),
    b"/kv/update": (b"POST", Command.UPDATE),
    b"/kv/delete": (b"POST", Command.DELETE),
    b"/kvman/countkey": (b"GET", Command.COUNT),
    b"/kvman/dump": (b"GET", Command.DUMP),
}
_SHUTDOWN = b"/kvman/shutdown"
_ADMIN_ROUTES = {_SHUTDOWN, b"/kvman/status", b"/metrics"}
_ADMIN_METHODS = {
    b"/kvman/shutdown": (b"GET", b"POST"),
    b"/kvman/status": (b"GET",),
    b"/metrics": (b"GET",),
}
_COMMAND_PATHS = {command: path for path, (_, command) in _KV_ROUTES.items()}
# Course clients wrote by GET with query parameters (their servers took any method):
# in course mode every course route takes both of these.
_COURSE_METHODS = (b"GET", b"POST")
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


# -- raw bytes in a request target ----------------------------------------------------
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_LINE_END = re.compile(rb"[\r\n]")
_HEAD_END = re.compile(rb"\n\r?\n")  # the blank line that ends a head


def percent_encode_high(segment: bytes) -> bytes:
    """Bytes >= 0x80 as ``%XX``: what a careful client sends for raw UTF-8."""
    return _NON_ASCII.sub(lambda byte: b"%%%02X" % byte[0][0], segment)


# Where the parser is in the current message (kept only for bytes >= 0x80).
_AT_BETWEEN, _AT_REQUEST_LINE, _AT_HEADERS, _AT_BODY = range(4)


# -- the protocol ------------------------------------------------------------------
_IDLE, _HEAD, _BODY = 0, 1, 2  # where a connection is in its current request
_WATCHED_HEADERS = frozenset(
    {
        b"content-type",
        b"content-length",
        b"upgrade",
        b"authorization",
        b"origin",
        b"sec-fetch-site",
        b"expect",
    }
)


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(
        self,
        app: App,
        limits: Limits,
        connections: set[HttpProtocol],
        errors: str = "course",
        access: Access = OPEN,
        guard: Guard | None = None,
    ) -> None:
        self.app = app
        self.limits = limits
        self.errors = errors
        self.access = access
        self.connections = connections
        self.guard = guard if guard is not None else Guard()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body: list[bytes] = []
        self._body_size = 0
        self._content_type = b""
        self._authorization: bytes | None = None
        self._from_web_page = False  # a browser sent it on a page's behalf
        self._too_large = False
        self._upgrade = False
        self._in_head = False  # between the first byte of a request and its blank line
        self._head_bytes = 0
        self._parse_at = _AT_BETWEEN  # for bytes >= 0x80 in a request line
        self._content_length = -1
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
            if data.isascii():
                self.parser.feed_data(data)
            else:
                self._feed_with_raw_bytes(data)
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

    def _feed_with_raw_bytes(self, data: bytes) -> None:
        """Feed ``data``, percent-encoding the bytes >= 0x80 of request lines.

        curl sends ``?key=韩国人`` as raw UTF-8, which llhttp refuses ("Invalid char
        in url query"); httptools offers no leniency for it (only for headers, chunks,
        versions and the like).  So, before parsing, such bytes of a request line
        become ``%XX``, as a careful client would have sent them; headers and bodies
        go to the parser untouched.  The data is fed up to each byte >= 0x80 and the
        parser's progress (``_parse_at``) says where that byte falls; each request line,
        head and body takes one feed, so the cost stays per message, not per byte.
        (The parser reports a header only once it is complete, so a byte >= 0x80 in
        the first header line counts as the target's when the read starts right at
        it or the header's text just before it repeats the target's end; it is
        then encoded too.  The headers pbkv reads are ASCII, so nothing changes.
        After a chunked body holding such bytes, the rest of that read goes to the
        parser as it is.)
        """
        pos, end = 0, len(data)
        while pos < end and not self._closing:
            found = _NON_ASCII.search(data, pos)
            if found is None:
                self._feed_slice(data, pos, end)
                return
            at = found.start()
            self._feed_slice(data, pos, at)
            if self._closing:
                return
            phase = self._parse_at
            if phase == _AT_REQUEST_LINE and self._in_target(data, pos, at):
                line_end = _LINE_END.search(data, at)
                pos = line_end.start() if line_end is not None else end
                self.parser.feed_data(percent_encode_high(data[at:pos]))
                if line_end is not None:
                    self._parse_at = _AT_HEADERS
                continue
            if phase in (_AT_REQUEST_LINE, _AT_HEADERS):  # the rest of the head at once
                head_end = _HEAD_END.search(data, at)
                pos = head_end.end() if head_end is not None else end
            elif phase == _AT_BODY and self._content_length >= 0:
                pos = min(end, at + max(1, self._content_length - self._body_size))
            else:  # a chunked body, or the first byte of a request (the parser refuses it)
                pos = end
            self._feed_slice(data, at, pos)

    def _in_target(self, data: bytes, start: int, at: int) -> bool:
        """Whether the parser, fed ``data[start:at]`` in its request line, stopped inside
        the target: then what it was fed ends with the target so far (which holds no
        space or line end); past the target it ends with a version or a header."""
        url = self._url
        n = min(at - start, len(url))
        return data[at - n : at] == url[len(url) - n :]

    def _feed_slice(self, data: bytes, start: int, stop: int) -> None:
        if start == stop:
            return
        try:
            self.parser.feed_data(data[start:stop])
        except httptools.HttpParserUpgrade as exc:
            raise httptools.HttpParserUpgrade(start + exc.args[0]) from None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._body = []
        self._body_size = 0
        self._content_type = b""
        self._authorization = None
        self._from_web_page = False
        self._too_large = False
        self._upgrade = False
        self._in_head = True
        self._head_bytes = 0
        self._parse_at = _AT_REQUEST_LINE
        self._content_length = -1
        self._declared = 0
        self._expect = b""
        self._phase = _HEAD
        self._since = self.guard.clock

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._parse_at = _AT_HEADERS
        lower = name.lower()
        if lower not in _WATCHED_HEADERS:  # Host, User-Agent...: the common case
            return
        if lower == b"content-type":
            self._content_type = value
        elif lower == b"content-length":
            try:
                self._declared = self._content_length = int(value)
                if self._declared > self.limits.max_body_bytes:
                    self._too_large = True
            except ValueError:
                pass  # httptools rejects it
        elif lower == b"upgrade" and value.strip().lower() == UPGRADE_TOKEN:
            self._upgrade = True
        elif lower == b"authorization":
            self._authorization = value.strip()
        elif lower == b"origin" or (lower == b"sec-fetch-site" and value.strip() != b"none"):
            self._from_web_page = True
        elif lower == b"expect":
            self._expect = value.strip().lower()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._parse_at = _AT_BODY
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
            guard = self.guard
            if declared > SMALL_BODY and not guard.room_for(declared):
                self._refuse_busy()
                return
            # Reserved up front: a stalled body counts in full (inline: the hot path).
            self._held += declared
            guard.pending_bytes += declared
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
        self._parse_at = _AT_BETWEEN
        guard = self.guard
        if self._held:
            guard.release(self._held)
            self._held = 0
        self._phase = _IDLE
        self._since = guard.clock
        if self._closing or self._too_large:
            return
        if self._upgrade and self.parser.should_upgrade():
            return  # data_received takes over
        keep_alive = self.parser.should_keep_alive()
        slot: list[Any] = [None, None, not keep_alive]
        self._pending.append(slot)
        path = b""
        try:
            path, query = split_target(self._url)
            self._dispatch(slot, path, query)
        except RequestError as exc:
            self._refuse(slot, path, exc.status, exc.message)
        except Exception:  # a bug must not stall this connection's later replies
            log.exception("internal error while handling a request")
            slot[2] = True
            self._refuse(slot, path, 500, "internal server error")
        self._body = []
        if len(self._pending) > guard.limits.max_pipeline:
            self._pause_reading()  # read on once replies have caught up

    # internals
    def _dispatch(self, slot: list[Any], path: bytes, query: bytes | None) -> None:
        method = self.parser.get_method()
        if self.access.client_token is not None:
            self._check_client_token(path)
        route = _KV_ROUTES.get(path)
        if route is None:
            self._admin(slot, path, method)
            return
        allowed, command = route
        if method != allowed and not (self.errors == "course" and method in _COURSE_METHODS):
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
        allowed = _ADMIN_METHODS[path]
        if method not in allowed and not (
            self.errors == "course" and method in _COURSE_METHODS and path in _COURSE_FAILURES
        ):
            raise_method(b", ".join(allowed))
        if path == b"/kvman/status":
            self._reply(slot, 200, orjson.dumps(self.app.status()))
        elif path == b"/metrics":
            body, content_type = self.app.metrics()
            self._reply(slot, 200, body, content_type=content_type.encode())
        else:
            self._check_shutdown()
            slot[2] = True
            self._after_reply = self.app.shutdown
            self._reply(slot, 200, b'{"success":"true"}')

    def _check_client_token(self, path: bytes) -> None:
        access = self.access
        if path == _SHUTDOWN and access.shutdown_secret is not None:
            return  # the secret, checked there, is the stronger credential
        expected = access.client_token
        given = self._authorization
        if expected is not None and (given is None or not hmac.compare_digest(given, expected)):
            raise RequestError(401, "this server needs Authorization: Bearer <client token>")

    def _check_shutdown(self) -> None:
        access = self.access
        if access.shutdown_secret is not None:
            given = self._authorization
            if given is None or not hmac.compare_digest(given, access.shutdown_secret):
                log.warning(
                    "refused /kvman/shutdown from %s: wrong or missing secret", self._peer()
                )
                raise RequestError(401, "shutdown needs Authorization: Bearer <secret>")
        elif access.shutdown_from is not None:
            if self._from_web_page:
                # A page the owner opened may send requests from loopback: refuse them.
                log.warning("refused /kvman/shutdown sent by a web page (Origin or Sec-Fetch-Site)")
                raise RequestError(403, "shutdown is not accepted from a web page")
            ip = peer_ip(self.transport)
            if ip is None or not (ip in access.shutdown_from or ip in LOOPBACK):
                log.warning("refused /kvman/shutdown from %s: not a server address", ip)
                raise RequestError(
                    403,
                    "shutdown is accepted only from 127.0.0.1, ::1 "
                    "or the configured server addresses",
                )

    def _peer(self) -> str:
        return peer_ip(self.transport) or "?"

    def _channel_refusal(self) -> str | None:
        """Why this connection may not become the replication channel (None: it may)."""
        access = self.access
        ip = peer_ip(self.transport)
        if access.replication_from is not None and ip not in access.replication_from:
            return f"the replication channel is accepted only from the primary, not from {ip}"
        names = access.replication_certificate_names
        if names is not None:
            assert self.transport is not None
            certificate = self.transport.get_extra_info("peercert")
            if not certificate:
                return "the replication channel needs a client certificate signed by tls_ca"
            if not names & certificate_names(certificate):
                return "the client certificate does not name the configured primary"
        return None

    def _answer(self, slot: list[Any], command: Command, outcome: Outcome) -> None:
        if isinstance(outcome, Dumped) and not isinstance(outcome.source, list):
            if len(outcome.source) > DUMP_PAIRS:
                self._stream_dump(slot, outcome.source)
                return
            outcome = Dumped(list(outcome.source.items()))  # small: one reply as before
        status, body, extra = outcome_reply(command, outcome, self.errors)
        self._reply(slot, status, body, extra)

    def _refuse(self, slot: list[Any], path: bytes, status: int, message: str) -> None:
        status, body, extra = refusal_reply(self.errors, path, status, message)
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
        refusal = self._channel_refusal()
        if refusal is not None:
            log.warning("refused a replication channel from %s: %s", self._peer(), refusal)
            self._fail(403, refusal)
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
