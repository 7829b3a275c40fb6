"""The client side of a bulk load: a file streamed to ``POST /kvman/load``.

The file goes as it is read, a block at a time in HTTP chunks: a file of any size
takes a block of memory.  The primary parses and checks the lines (and names the
first invalid one); it reads them only as fast as its backup acknowledges (flow
control does the pacing).  A reply that comes before the body is all sent (the
load failed) stops the sending.  The reply is a ``LoadSummary`` or a
``LoadFailed``, in either error mode of the server.

Why not parse here: parsing a line costs this process more than it costs the
primary, and all three processes share the machine's cores; sending the lines as
they are left the most CPU to the servers (``docs/performance.md``, "Bulk load").
"""

from __future__ import annotations

import http.client
import io
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO
from urllib.parse import urlencode

import orjson

from pbkv.bulk import LineFormat, LoadMode
from pbkv.routes import LOAD_PATH

BLOCK = 1 << 20  # bytes read from the file at a time
_CONTENT_TYPES = {LineFormat.JSON: b"application/x-ndjson", LineFormat.CSV: b"text/csv"}


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
    running the load again in insert mode skips them)."""
    started = time.monotonic()
    host, port = address
    sock: socket.socket = socket.create_connection(address, timeout=timeout)
    try:
        if ssl_context is not None:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        target = load_target(mode, fmt)
        head = b"POST %s HTTP/1.1\r\nHost: %s:%d\r\n" % (target, host.encode(), port)
        head += b"Content-Type: %s\r\nTransfer-Encoding: chunked\r\n" % _CONTENT_TYPES[fmt]
        if token is not None:
            head += b"Authorization: Bearer %s\r\n" % token.encode()
        sock.sendall(head + b"\r\n")
        early = _send_blocks(sock, source, progress)
        response = http.client.HTTPResponse(_Replayed(early, sock) if early else sock)  # type: ignore[arg-type]
        response.begin()
        body = response.read()
        return _summary(response.status, response.headers, body, time.monotonic() - started)
    finally:
        sock.close()


def _send_blocks(
    sock: socket.socket, source: BinaryIO, progress: Callable[[int], None] | None
) -> bytes:
    """Send ``source`` a block per HTTP chunk until its end or an answer from the
    server (the load stopped: the rest would be read and dropped).  Returns the
    start of that answer when it had to be read to be told from TLS's own records."""
    read = 0
    while True:
        block = source.read(BLOCK)
        if not block:
            sock.sendall(b"0\r\n\r\n")
            return b""
        sock.sendall(b"%x\r\n%s\r\n" % (len(block), block))
        read += len(block)
        if progress is not None:
            progress(read)
        if select.select([sock], [], [], 0)[0]:
            if not isinstance(sock, ssl.SSLSocket):
                return b""  # the answer (or the end of the connection) is there to read
            early = _application_data(sock)
            if early is not None:
                return early


def _application_data(sock: ssl.SSLSocket) -> bytes | None:
    """What a TLS socket that polled readable holds for the application: None when
    it was only TLS's own records (a TLS 1.3 server sends session tickets after the
    handshake), b"" at the end of the connection."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(1 << 16)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return None
    finally:
        sock.settimeout(timeout)


class _Replayed(io.RawIOBase):
    """A socket whose first bytes were read already: ``http.client`` reads the reply
    through ``makefile``, which gives those bytes back before the rest."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self._head = head
        self._sock = sock

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        return self._sock.recv_into(buffer)


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
