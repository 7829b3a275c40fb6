"""Replies: the bytes of a response, the course's exact JSON for each outcome, and
the two error modes.

A request that reached a route and is refused (bad parameter, too large, not
accepted in this stage, replication failed, ...) is a ``RequestError`` or a
refusing outcome; ``refusal_reply`` alone turns it into a reply, in the error
mode of the ``errors`` setting: ``course`` (HTTP 200 with the route's course
failure shape, the reason in ``X-Pbkv-*`` headers) or ``http`` (a real status
with a JSON error body).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import NoReturn

import orjson

from pbkv.commands import (
    Command,
    Counted,
    DiskFailed,
    Done,
    Dumped,
    KeyReused,
    MemoryFull,
    Outcome,
    Refused,
    ReplicationFailed,
)
from pbkv.limits import LogThrottle
from pbkv.routes import COMMAND_PATHS
from pbkv.text import printable

log = logging.getLogger(__name__)

_REASONS = {
    200: b"OK",
    307: b"Temporary Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    417: b"Expectation Failed",
    422: b"Unprocessable Content",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
    507: b"Insufficient Storage",
}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
RETRY = b"Retry-After: 1\r\n"


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
_OK = _OK_HEAD + b"%b"


def response(status: int, body: bytes, extra: bytes = b"", close: bool = False) -> bytes:
    if status == 200 and not extra and not close:  # nearly every reply: one formatting
        return _OK % (len(body), body)
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


TRUE = b'{"success":"true"}'
_FALSE = b'{"success":"false"}'
_MISS = b'{"success":"false","value":""}'
_FOUND = b'{"success":"true","value":%b}'  # the value's JSON in one formatting


def outcome_reply(
    command: Command,
    outcome: Outcome,
    errors: str = "course",
    target: bytes | None = None,
    scheme: bytes = b"http",
) -> tuple[int, bytes, bytes]:
    """(status, body, extra headers) for an outcome of ``command`` in error mode ``errors``.

    ``target`` is the request target (None: unknown, or too long to repeat in a
    header): with it, a refusal naming the primary is a 307 in ``http`` mode.
    """
    if isinstance(outcome, Done):
        if command is Command.GET or command is Command.DELETE:
            if not outcome.ok:
                return 200, _MISS, b""
            return 200, _FOUND % orjson.dumps(outcome.value), b""
        return 200, (TRUE if outcome.ok else _FALSE), b""
    if isinstance(outcome, Counted):
        return 200, b'{"result":"%d"}' % outcome.count, b""
    if isinstance(outcome, Dumped):
        return 200, orjson.dumps(outcome.pairs), b""
    if isinstance(outcome, ReplicationFailed):
        return refusal_reply(errors, COMMAND_PATHS[command], 503, "replication failed", None, RETRY)
    if isinstance(outcome, Refused):
        stage = outcome.stage.value
        primary = outcome.primary
        if primary is not None:
            asked = "reads" if command.is_read else "writes"
            message = f"this server is the {outcome.role}; send {asked} to the primary at {primary}"
            fields = {"stage": stage, "primary": primary}
            if errors == "http" and target is not None:
                location = b"Location: %s://%s%s\r\n" % (
                    scheme,
                    _authority(primary),
                    _origin_form(target),
                )
                return 307, error_body(message, **fields), location
        else:
            message = f"not accepting this request in stage {stage}"
            fields = {"stage": stage}
        return refusal_reply(errors, COMMAND_PATHS[command], 503, message, fields, RETRY)
    if isinstance(outcome, MemoryFull):
        message = f"max_memory reached ({outcome.limit} bytes): write refused"
        return refusal_reply(errors, COMMAND_PATHS[command], 507, message)
    if isinstance(outcome, KeyReused):
        message = "Idempotency-Key already used for another request: nothing applied"
        return refusal_reply(errors, COMMAND_PATHS[command], 422, message)
    if isinstance(outcome, DiskFailed):
        if outcome.applied:
            message = (
                f"disk error: the write did not reach this server's disk ({outcome.reason}); "
                "not acknowledged: it may or may not survive"
            )
            return refusal_reply(errors, COMMAND_PATHS[command], 503, message, None, RETRY)
        message = f"disk error: writes refused until it clears ({outcome.reason})"
        return refusal_reply(errors, COMMAND_PATHS[command], 507, message, None, RETRY)
    raise TypeError(f"unknown outcome {outcome!r}")


# The longest request target a redirect repeats in its Location header; a longer one
# (a value sent in the query string) gets the plain 503 that names the primary: many
# clients refuse header lines this long, and the reply would double the request.
MAX_REDIRECT_TARGET = 8192


def _authority(primary: str) -> bytes:
    """``host:port`` as a URL's authority (an IPv6 host in brackets), safe in a header."""
    host, _, port = primary.rpartition(":")
    if ":" in host and not host.startswith("["):
        primary = f"[{host}]:{port}"
    return header_text(primary).replace(b" ", b"%20")


def _origin_form(target: bytes) -> bytes:
    """The path and query of a request target (``/kv/insert?key=k``), also from the
    absolute form (``http://host/kv/insert?key=k``) that proxies send. The reader
    has percent-encoded any byte >= 0x80 already."""
    if target.startswith(b"/"):
        return target.partition(b"#")[0]
    from pbkv.http.params import split_target  # params imports this module

    path, query = split_target(target)
    return path if query is None else path + b"?" + query


# -- refusals: the one place where the error mode shapes the reply ------------------------
# What course clients get from each route when a request fails.  The course defined
# no failure for countkey, dump, status and shutdown: they get the generic one, never
# a count or a dump that could be taken for data.  /metrics is for scrapers, which
# read statuses: it keeps real HTTP errors, as unknown paths (404) do.
COURSE_FAILURES: dict[bytes, bytes] = {
    b"/kv/get": _MISS,
    b"/kv/delete": _MISS,
    b"/kv/insert": _FALSE,
    b"/kv/update": _FALSE,
    b"/kvman/countkey": _FALSE,
    b"/kvman/dump": _FALSE,
    b"/kvman/status": _FALSE,
    b"/kvman/shutdown": _FALSE,
    b"/kvman/load": _FALSE,
}
_HEADER_TEXT_LIMIT = 300  # characters of a reason kept in a header or a log line


def header_text(text: str) -> bytes:
    """``text`` as a safe header value: printable ASCII only, with Python escapes
    (``\\n``, ``\\xe9``, ``\\u043a``) for everything else, so no CR/LF can split it."""
    return printable(text, _HEADER_TEXT_LIMIT).encode("ascii")


# A flood of bad requests must not flood the log.
_refusal_log = LogThrottle(per_window=20, window=1.0)


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
    shape = COURSE_FAILURES.get(path) if errors == "course" else None
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


def raise_method(allowed: bytes) -> NoReturn:
    raise RequestError(405, f"method not allowed here; use {allowed.decode()}")
