"""The client side of a bulk load: a file streamed to ``POST /kvman/load``.

The lines are parsed and checked here and go out packed, a load chunk at a time,
in HTTP chunks as the file is read: a file of any size takes a block of memory.
The server reads them only as fast as its backup acknowledges (flow control does
the pacing).  A reply that comes before the body is all sent (the load failed)
stops the sending.  The reply is a ``LoadSummary`` or a ``LoadFailed``, in either
error mode of the server.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlencode

import orjson

from pbkv.bulk import (
    MAX_PACKED_PAIRS,
    PACKED_CHARS,
    LineFormat,
    LineParser,
    LoadMode,
    PairLimits,
    packed_chunk,
)
from pbkv.metrics import CollectorPaused
from pbkv.routes import LOAD_PATH

BLOCK = 1 << 20  # bytes read from the file at a time
# The server's key and value limits are its own settings: here only a bound on what a
# line may hold in memory, and the server refuses (413, with the line) what passes its.
CLIENT_LIMITS = PairLimits(max_key_bytes=16 << 20, max_value_bytes=16 << 20)


@dataclass(frozen=True, slots=True)
class LoadSummary:
    lines: int  # lines read and applied (every one, on success)
    applied: int  # pairs written
    skipped: int  # pairs left as they were (insert mode: the key existed)
    seconds: float = 0.0


class LoadFailed(Exception):
    """The load stopped: every line before ``line`` is applied (``lines`` of them),
    nothing from it on (a refusal before any line: line 1)."""

    def __init__(
        self, status: int, reason: str, line: int | None, lines: int, applied: int, skipped: int
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.line = line
        self.lines = lines
        self.applied = applied
        self.skipped = skipped


def load_target(mode: LoadMode, fmt: LineFormat) -> bytes:
    return LOAD_PATH + b"?" + urlencode({"mode": mode.value, "format": fmt.value}).encode()


def load_stream(
    address: tuple[str, int],
    source: BinaryIO,
    mode: LoadMode = LoadMode.INSERT,
    fmt: LineFormat = LineFormat.JSON,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> LoadSummary:
    """Send ``source`` (JSON lines or CSV) to the primary at ``address``; raises
    ``LoadFailed`` when a line is invalid or the server refused the load, OSError
    when the connection failed (then the pairs acknowledged so far are there, and
    running the load again in insert mode skips them).

    The lines are parsed and checked here, and go out packed (``format=msgpack``, a
    load chunk each): the primary checks them again, but parsing them is this
    process's work, done while the servers apply the chunks before."""
    started = time.monotonic()
    host, port = address
    sock: socket.socket = socket.create_connection(address, timeout=timeout)
    parser = LineParser(fmt, CLIENT_LIMITS)
    try:
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        target = load_target(mode, LineFormat.PACKED)
        head = b"POST %s HTTP/1.1\r\nHost: %s:%d\r\n" % (target, host.encode(), port)
        head += b"Content-Type: application/msgpack\r\nTransfer-Encoding: chunked\r\n"
        if token is not None:
            head += b"Authorization: Bearer %s\r\n" % token.encode()
        sock.sendall(head + b"\r\n")
        with CollectorPaused():
            _send_lines(sock, source, parser, progress)
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
        summary = _summary(response.status, response.headers, body, time.monotonic() - started)
    finally:
        sock.close()
    error = parser.error
    if error is not None:  # every line before it is applied: the summary says how many
        raise LoadFailed(
            error.status, str(error), error.line, summary.lines, summary.applied, summary.skipped
        )
    return summary


def _send_lines(
    sock: socket.socket,
    source: BinaryIO,
    parser: LineParser,
    progress: Callable[[int], None] | None,
) -> None:
    """Read ``source`` a block at a time and send its pairs packed, a load chunk per
    HTTP chunk, until its end, an invalid line, or an answer from the server."""
    read = 0
    while True:
        block = source.read(BLOCK)
        if block:
            parser.feed(block)
        else:
            parser.end()
        final = not block or parser.error is not None
        out = []
        while parser.pairs and (
            final or len(parser.pairs) >= 2 * MAX_PACKED_PAIRS or parser.chars >= PACKED_CHARS
        ):
            pairs, ends = parser.take(MAX_PACKED_PAIRS, PACKED_CHARS)
            packed = packed_chunk(pairs, ends)
            out.append(b"%x\r\n%s\r\n" % (len(packed), packed))
        if final:
            out.append(b"0\r\n\r\n")
        sock.sendall(b"".join(out))
        read += len(block)
        if progress is not None:
            progress(read)
        if final or select.select([sock], [], [], 0)[0]:
            return  # the end, or an answer before it: the load stopped


def _summary(
    status: int, headers: http.client.HTTPMessage, body: bytes, seconds: float
) -> LoadSummary:
    try:
        reply = orjson.loads(body)
    except orjson.JSONDecodeError:
        reply = {}
    if not isinstance(reply, dict):
        reply = {}
    if status == 200 and reply.get("success") == "true":
        return LoadSummary(
            int(reply["lines"]), int(reply["applied"]), int(reply["skipped"]), seconds
        )
    if status == 200:  # the course error mode: the reasons are in headers
        status = int(headers.get("X-Pbkv-Status", "500"))
        fields = {
            name: headers.get(f"X-Pbkv-{name.title()}")
            for name in ("error", "line", "lines", "applied", "skipped")
        }
    else:
        fields = {
            name: reply.get(name) for name in ("error", "line", "lines", "applied", "skipped")
        }
    line = fields["line"]
    raise LoadFailed(
        status,
        str(fields["error"] or f"HTTP {status}"),
        int(line) if line else None,
        int(fields["lines"] or 0),
        int(fields["applied"] or 0),
        int(fields["skipped"] or 0),
    )
