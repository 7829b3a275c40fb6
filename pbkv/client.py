"""Python clients for a pbkv server: blocking :class:`Client` and asyncio :class:`AsyncClient`.

Both speak the course HTTP/JSON interface over one keep-alive connection and turn
replies into results with the same function, :func:`parse_reply`: a logical failure
(key missing, key exists) comes back as ``None`` or ``False``; anything else the server
refuses raises a :class:`PbkvError` subclass, in either error mode of the server (``http``:
a real status and a JSON error; ``course``: HTTP 200, the course failure shape and the
reason in ``X-Pbkv-*`` headers). Transport failures raise ``OSError``
(``ConnectionError``, ``TimeoutError``).

Safe retries: by default every write carries an ``Idempotency-Key`` of its own, and
is sent again with the same key after a lost or refused connection, "replication
failed" or a stage refusal, with back-off, for up to ``retry_for`` seconds; a refusal
that names the primary (a backup, a member that does not lead) sends the next
attempt there. The server applies a key's write once and answers a retry with the
first reply, so the result is the write's true outcome. Only when the deadline passes
is an error raised: one that says the outcome is unknown (a connection lost after
sending, "replication failed") if any attempt may have been applied, else the last.
"""

from __future__ import annotations

import asyncio
import http
import http.client
import json
import os
import random
import select
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self, cast
from urllib.parse import quote, urlencode

import httptools

from pbkv.config import DEFAULT_CONFIG_PATH, ROLES, Settings, load_file, with_secrets
from pbkv.routes import BY_NAME

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "NotPrimary",
    "PbkvError",
    "REPLY_HEADERS",
    "ReplicationFailed",
    "Unavailable",
    "parse_reply",
    "server_address",
]

DEFAULT_TIMEOUT = 5.0
# Safe retries of writes (see the module docstring): for how long, from what first delay.
DEFAULT_RETRY_FOR = 10.0
RETRY_FIRST = 0.05
RETRY_CEILING = 1.0
IDEMPOTENCY_HEADER = "Idempotency-Key"
_WRITES = frozenset({"insert", "update", "delete"})


# --- errors -------------------------------------------------------------------------------


class PbkvError(Exception):
    """The server refused a request, or answered with something that is not a pbkv reply.

    ``status`` is the HTTP status (0 when the reply was not valid HTTP; from a server in
    course mode, the status its http mode would have used), ``error`` the server's message
    and ``body`` the decoded JSON error (empty when there was none; from a server in course
    mode, rebuilt from its ``X-Pbkv-*`` headers).
    """

    def __init__(self, status: int, error: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{error} (HTTP {status})" if status else error)
        self.status = status
        self.error = error
        self.body: dict[str, Any] = body if body is not None else {}


class ReplicationFailed(PbkvError):
    """The backup did not acknowledge the write.

    The primary rewound it, but the outcome is indeterminate: in one rare case (the backup
    applied it, the network split, the primary restarted from that backup) it survives.
    """


class Unavailable(PbkvError):
    """503: the server does not accept this request in its current stage; try again later."""

    def __init__(
        self,
        status: int,
        error: str,
        body: dict[str, Any] | None = None,
        stage: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, error, body)
        self.stage = stage
        self.retry_after = retry_after


class NotPrimary(Unavailable):
    """A write was sent to the backup; ``primary`` is the primary's ``"host:port"``."""

    def __init__(
        self,
        status: int,
        error: str,
        body: dict[str, Any] | None = None,
        stage: str | None = None,
        retry_after: float | None = None,
        primary: str = "",
    ) -> None:
        super().__init__(status, error, body, stage, retry_after)
        self.primary = primary


class BadRequest(PbkvError):
    """4xx other than 503: malformed or missing parameter, empty key, too large, ..."""


# --- requests and replies (shared by both clients) ----------------------------------------


_FORM = "application/x-www-form-urlencoded"


def _encode(params: Mapping[str, str]) -> str:
    # quote, not quote_plus, and nothing "safe": '+', '/', '&', '=', '%' arrive as sent.
    return urlencode(params, quote_via=quote, safe="")


def _request_parts(
    op: str, params: Mapping[str, str] | None
) -> tuple[str, str, bytes | None, dict[str, str]]:
    """Method, target, body and extra headers of one request."""
    spec = BY_NAME[op]
    if spec.methods[0] == "GET":
        target = f"{spec.path}?{_encode(params)}" if params else spec.path
        return "GET", target, None, {}
    body = _encode(params or {}).encode("ascii")
    return "POST", spec.path, body, {"Content-Type": _FORM}


_NOT_JSON = object()

# Headers of a reply that parse_reply reads (names in lower case).
REPLY_HEADERS = ("retry-after", "x-pbkv-error", "x-pbkv-status", "x-pbkv-stage", "x-pbkv-primary")


def _retry_after(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        return float(header)
    except ValueError:  # an HTTP date: not worth parsing for a hint
        return None


def _error(status: int, body: Any, raw: bytes, retry_after: str | None) -> PbkvError:
    """The exception for an error reply (HTTP error, or a 200 carrying ``"error"``)."""
    fields: dict[str, Any] = body if isinstance(body, dict) else {}
    if "error" in fields:
        message = str(fields["error"])
    elif raw and body is _NOT_JSON:
        message = raw[:200].decode("utf-8", "replace").strip()
    else:
        try:
            message = http.HTTPStatus(status).phrase
        except ValueError:
            message = "unexpected reply"
    if message.startswith("replication failed"):
        return ReplicationFailed(status, message, fields)
    if status == 503 or "primary" in fields:
        stage = fields.get("stage")
        extra = (str(stage) if stage is not None else None, _retry_after(retry_after))
        if "primary" in fields:
            return NotPrimary(status, message, fields, *extra, primary=str(fields["primary"]))
        return Unavailable(status, message, fields, *extra)
    if 400 <= status < 500:
        return BadRequest(status, message, fields)
    return PbkvError(status, message, fields)


def _malformed(status: int, body: Any) -> PbkvError:
    return PbkvError(status, "unexpected reply", body if isinstance(body, dict) else {})


def _success(status: int, body: Any) -> bool:
    flag: object = body.get("success") if isinstance(body, dict) else None
    if flag not in ("true", "false"):
        raise _malformed(status, body)
    return flag == "true"


def _value(status: int, body: Any) -> str | None:
    if not _success(status, body):
        return None
    value = body.get("value")
    if not isinstance(value, str):
        raise _malformed(status, body)
    return value


def _count(status: int, body: Any) -> int:
    try:
        return int(body["result"])
    except (TypeError, KeyError, ValueError):
        raise _malformed(status, body) from None


def _pairs(status: int, body: Any) -> list[tuple[str, str]]:
    if not isinstance(body, list):
        raise _malformed(status, body)
    pairs: list[tuple[str, str]] = []
    for item in body:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], str)
        ):
            raise _malformed(status, body)
        pairs.append((item[0], item[1]))
    return pairs


def _object(status: int, body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise _malformed(status, body)
    return body


_RESULTS: dict[str, Callable[[int, Any], Any]] = {
    "get": _value,
    "insert": _success,
    "update": _success,
    "delete": _value,
    "count": _count,
    "dump": _pairs,
    "status": _object,
    "shutdown": lambda status, body: None,
}


def new_idempotency_key() -> str:
    """A fresh key for one write (a random UUID)."""
    return str(uuid.uuid4())


class _Retries:
    """The back-off of one write's attempts until its deadline (both clients)."""

    def __init__(self, retry_for: float) -> None:
        self.deadline = time.monotonic() + retry_for
        self.delay = RETRY_FIRST

    def next_delay(self, exc: BaseException) -> float | None:
        """How long to wait before the next attempt after ``exc``; None: raise it."""
        if not isinstance(exc, (OSError, ReplicationFailed, Unavailable)):
            return None  # a bad request, a reused key, max_memory: the same again
        delay = self.delay * (0.5 + random.random() / 2)
        self.delay = min(RETRY_CEILING, 2 * self.delay)
        if time.monotonic() + delay > self.deadline:
            return None
        return delay


def _may_be_applied(exc: BaseException) -> bool:
    """Whether the attempt that raised ``exc`` may have been applied: it was sent and
    no answer came (a refused connection sent nothing; a refusal applied nothing)."""
    if isinstance(exc, OSError):
        return not isinstance(exc, ConnectionRefusedError)
    return isinstance(exc, ReplicationFailed)


def _primary_named(exc: BaseException) -> tuple[str, int] | None:
    """The primary's address a refusal names (a write sent to a backup), if any."""
    if not isinstance(exc, NotPrimary) or not exc.primary:
        return None
    host, _, port = exc.primary.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None


def _header_text(value: str) -> str:
    """Undo the server's escaping of a reason in a header (printable ASCII only)."""
    try:
        return value.encode("latin-1").decode("unicode_escape")
    except (UnicodeError, ValueError):
        return value


def _course_refusal(status: int, headers: Mapping[str, str]) -> PbkvError:
    """The exception for a course-mode refusal: the same as the http mode's reply."""
    fields: dict[str, Any] = {"success": "false", "error": _header_text(headers["x-pbkv-error"])}
    for name in ("stage", "primary"):
        value = headers.get(f"x-pbkv-{name}")
        if value is not None:
            fields[name] = _header_text(value)
    try:
        status = int(headers.get("x-pbkv-status", status))
    except ValueError:
        pass
    return _error(status, fields, b"", headers.get("retry-after"))


def parse_reply(
    op: str,
    status: int,
    raw: bytes,
    retry_after: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """Turn one reply to ``op`` into its result, or raise the matching :class:`PbkvError`.

    ``op`` is one of get, insert, update, delete, count, dump, status, shutdown;
    ``retry_after`` is the reply's Retry-After header, if any; ``headers`` the reply's
    headers named in :data:`REPLY_HEADERS` (lower-case names), which carry the reason
    of a refusal from a server in course mode.
    """
    if headers and "x-pbkv-error" in headers:
        if retry_after is not None and "retry-after" not in headers:
            headers = {**headers, "retry-after": retry_after}
        raise _course_refusal(status, headers)
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = _NOT_JSON
    # "replication failed" may come as 200 or 5xx; a success reply never says "false" + error.
    failed = isinstance(body, dict) and body.get("success") == "false" and "error" in body
    if status >= 400 or failed:
        raise _error(status, body, raw, retry_after)
    if op == "shutdown":  # the server is going away; whatever it said first is fine
        return None
    if body is _NOT_JSON:
        raise PbkvError(status, "reply is not JSON")
    return _RESULTS[op](status, body)


# --- settings -----------------------------------------------------------------------------


def server_address(
    path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH, role: str = "primary"
) -> tuple[str, int]:
    """(host, port) of the primary or the backup, from a course-style settings file.

    The backup listens on ``backup_port`` if given, else on ``port + 1`` when both servers
    share an address, else on ``port``. Raises ``ValueError`` (``SettingsError``).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    return Settings(**load_file(os.fspath(path))).address_of(role)


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    """A context that verifies the server against ``cafile`` (or the system's CAs)."""
    return ssl.create_default_context(cafile=cafile)


# --- transport helpers --------------------------------------------------------------------


def _peer_closed(fileno: int) -> bool:
    """An idle keep-alive socket that is readable was closed by the server (or is junk)."""
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    return bool(poller.poll(0))


def _bad_http(exc: Exception) -> PbkvError:
    return PbkvError(0, f"bad HTTP reply: {exc}")


def _host_header(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- blocking client ----------------------------------------------------------------------


class _Endpoint:
    """Where a client connects; shared by the blocking and the asyncio client.

    ``token`` is the server's ``client_token`` (sent as ``Authorization: Bearer``);
    ``ssl_context`` (or just ``cafile``) makes the client speak HTTPS.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
        idempotency_keys: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.token = token
        # Writes carry a fresh Idempotency-Key, and are retried for up to retry_for
        # seconds (0: one attempt); without keys a write is never sent twice.
        self.retry_for = retry_for
        self.idempotency_keys = idempotency_keys
        if ssl_context is None and cafile is not None:
            ssl_context = tls_context(cafile)
        self.ssl_context = ssl_context

    @classmethod
    def from_settings(
        cls,
        path: str | os.PathLike[str] = DEFAULT_CONFIG_PATH,
        role: str = "primary",
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Self:
        """A client for the primary or the backup named in a settings file (with its
        client token, also from ``PBKV_CLIENT_TOKEN``, and HTTPS when it sets TLS)."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        settings = with_secrets(Settings(**load_file(os.fspath(path))))
        host, port = settings.address_of(role)
        context = tls_context(settings.tls_ca) if settings.tls else None
        return cls(host, port, timeout, token=settings.client_token, ssl_context=context)

    def _headers(self, headers: dict[str, str], credential: str | None) -> dict[str, str]:
        """The request's headers plus its credential: ``credential`` or the token."""
        credential = credential if credential is not None else self.token
        if credential is None:
            return headers
        return {**headers, "Authorization": f"Bearer {credential}"}


class Client(_Endpoint):
    """Blocking client over one keep-alive connection; not thread-safe.

    A connection the server dropped while idle is replaced transparently. A write
    carries an Idempotency-Key and is retried as the module docstring says; with
    ``idempotency_keys=False`` it is never sent twice: if the connection fails after
    it went out, the ``OSError`` is raised.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
        idempotency_keys: bool = True,
    ) -> None:
        super().__init__(
            host,
            port,
            timeout,
            token=token,
            ssl_context=ssl_context,
            cafile=cafile,
            retry_for=retry_for,
            idempotency_keys=idempotency_keys,
        )
        self._conn = self._connection()

    def _connection(self) -> http.client.HTTPConnection:
        if self.ssl_context is not None:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self.ssl_context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def get(self, key: str) -> str | None:
        """The value of ``key``, or None when it is missing."""
        return cast("str | None", self._call("get", {"key": key}))

    def insert(self, key: str, value: str) -> bool:
        """Add a new key; False when it already exists."""
        return cast(bool, self._call("insert", {"key": key, "value": value}))

    def update(self, key: str, value: str) -> bool:
        """Change an existing key; False when it is missing."""
        return cast(bool, self._call("update", {"key": key, "value": value}))

    def delete(self, key: str) -> str | None:
        """Remove ``key`` and return its old value, or None when it was missing."""
        return cast("str | None", self._call("delete", {"key": key}))

    def count(self) -> int:
        """Number of keys."""
        return cast(int, self._call("count"))

    def dump(self) -> list[tuple[str, str]]:
        """Every (key, value) pair."""
        return cast("list[tuple[str, str]]", self._call("dump"))

    def dump_dict(self) -> dict[str, str]:
        """The whole database as a dict."""
        return dict(self.dump())

    def status(self) -> dict[str, Any]:
        """The server's status object (role, stage, keys, checksum, ...)."""
        return cast("dict[str, Any]", self._call("status"))

    def shutdown(self, secret: str | None = None) -> None:
        """Ask the server to stop; it replies first, then exits.

        A server with a ``secret`` needs it here; otherwise the token (if any) is sent.
        """
        try:
            self._call("shutdown", credential=secret)
        finally:
            self.close()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(
        self, op: str, params: Mapping[str, str] | None = None, credential: str | None = None
    ) -> Any:
        if op in _WRITES and self.idempotency_keys:
            return self._keyed_call(op, params)
        method, target, body, headers = _request_parts(op, params)
        headers = self._headers(headers, credential)
        status, raw, replied = self._exchange(method, target, body, headers, BY_NAME[op].safe)
        return parse_reply(op, status, raw, replied.get("retry-after"), replied)

    def _keyed_call(self, op: str, params: Mapping[str, str] | None) -> Any:
        """A write with a fresh Idempotency-Key, sent until it has an outcome or its
        deadline passes (safe: the server applies the key's write once)."""
        method, target, body, headers = _request_parts(op, params)
        headers = self._headers({**headers, IDEMPOTENCY_HEADER: new_idempotency_key()}, None)
        retries = _Retries(self.retry_for)
        unknown: Exception | None = None  # an attempt that may have been applied
        while True:
            try:
                status, raw, replied = self._exchange(method, target, body, headers, False)
                return parse_reply(op, status, raw, replied.get("retry-after"), replied)
            except Exception as exc:
                if _may_be_applied(exc):
                    unknown = exc
                delay = retries.next_delay(exc)
                if delay is None:
                    if unknown is not None and unknown is not exc and not _may_be_applied(exc):
                        # Say that the outcome is unknown, as the earlier attempt's error does.
                        raise unknown from exc
                    raise
                primary = _primary_named(exc)
                if primary is not None and primary != (self.host, self.port):
                    self._conn.close()
                    self.host, self.port = primary
                    self._conn = self._connection()
                time.sleep(delay)

    def _exchange(
        self,
        method: str,
        target: str,
        body: bytes | None,
        headers: dict[str, str],
        resendable: bool,
    ) -> tuple[int, bytes, dict[str, str]]:
        conn = self._conn
        for attempt in (1, 2):
            sock = conn.sock
            reused = sock is not None
            if sock is not None and _peer_closed(sock.fileno()):
                conn.close()
                reused = False
            try:
                # One sendall: if it fails the server never saw a whole request.
                conn.request(method, target, body=body, headers=headers)
            except ConnectionError:
                conn.close()
                if reused and attempt == 1:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            try:
                resp = conn.getresponse()
                raw = resp.read()
            except ConnectionError:  # includes RemoteDisconnected: no reply at all
                conn.close()
                if reused and resendable and attempt == 1:
                    continue
                raise
            except http.client.HTTPException as exc:
                conn.close()
                raise _bad_http(exc) from exc
            except BaseException:
                conn.close()
                raise
            replied = {}
            for name in REPLY_HEADERS:
                value = resp.getheader(name)
                if value is not None:
                    replied[name] = value
            return resp.status, raw, replied
        raise AssertionError("unreachable")


# --- asyncio client -----------------------------------------------------------------------


_REPLY_HEADER_NAMES = frozenset(name.encode() for name in REPLY_HEADERS)


class _Reply:
    """httptools callbacks collecting one response."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.body = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.headers_done = False
        self.framed = False  # Content-Length or chunked: else the body ends at EOF
        self.complete = False
        self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in _REPLY_HEADER_NAMES:
            self.headers[lname.decode()] = value.decode("latin-1").strip()
        elif lname in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.body.extend(body)

    def on_message_complete(self) -> None:
        self.complete = True
        # Only valid inside the callback: the parser resets once the message is done.
        self.keep_alive = self.parser.should_keep_alive()


class AsyncClient(_Endpoint):
    """asyncio client over one keep-alive connection; concurrent calls take turns.

    Same methods, results and errors as :class:`Client`, as coroutines. For parallel
    requests use several clients.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8080,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
        idempotency_keys: bool = True,
    ) -> None:
        super().__init__(
            host,
            port,
            timeout,
            token=token,
            ssl_context=ssl_context,
            cafile=cafile,
            retry_for=retry_for,
            idempotency_keys=idempotency_keys,
        )
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def get(self, key: str) -> str | None:
        """The value of ``key``, or None when it is missing."""
        return cast("str | None", await self._call("get", {"key": key}))

    async def insert(self, key: str, value: str) -> bool:
        """Add a new key; False when it already exists."""
        return cast(bool, await self._call("insert", {"key": key, "value": value}))

    async def update(self, key: str, value: str) -> bool:
        """Change an existing key; False when it is missing."""
        return cast(bool, await self._call("update", {"key": key, "value": value}))

    async def delete(self, key: str) -> str | None:
        """Remove ``key`` and return its old value, or None when it was missing."""
        return cast("str | None", await self._call("delete", {"key": key}))

    async def count(self) -> int:
        """Number of keys."""
        return cast(int, await self._call("count"))

    async def dump(self) -> list[tuple[str, str]]:
        """Every (key, value) pair."""
        return cast("list[tuple[str, str]]", await self._call("dump"))

    async def dump_dict(self) -> dict[str, str]:
        """The whole database as a dict."""
        return dict(await self.dump())

    async def status(self) -> dict[str, Any]:
        """The server's status object (role, stage, keys, checksum, ...)."""
        return cast("dict[str, Any]", await self._call("status"))

    async def shutdown(self, secret: str | None = None) -> None:
        """Ask the server to stop; it replies first, then exits.

        A server with a ``secret`` needs it here; otherwise the token (if any) is sent.
        """
        try:
            await self._call("shutdown", credential=secret)
        finally:
            await self.close()

    async def close(self) -> None:
        writer = self._writer
        self._drop()
        if writer is not None:
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _drop(self) -> None:
        """Forget the connection without waiting (safe while being cancelled)."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    def _idle_connection_alive(self) -> bool:
        if self._reader is None or self._writer is None:
            return False
        if self._reader.at_eof() or self._writer.is_closing():
            return False
        sock = self._writer.get_extra_info("socket")
        return sock is None or not _peer_closed(sock.fileno())

    async def _call(
        self, op: str, params: Mapping[str, str] | None = None, credential: str | None = None
    ) -> Any:
        if op in _WRITES and self.idempotency_keys:
            return await self._keyed_call(op, params)
        request = self._request(op, params, self._headers({}, credential))
        async with self._lock:
            status, raw, replied = await self._exchange(request, BY_NAME[op].safe)
        return parse_reply(op, status, raw, replied.get("retry-after"), replied)

    def _request(self, op: str, params: Mapping[str, str] | None, extra: dict[str, str]) -> bytes:
        method, target, body, headers = _request_parts(op, params)
        headers.update(extra)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {_host_header(self.host, self.port)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")

    async def _keyed_call(self, op: str, params: Mapping[str, str] | None) -> Any:
        """A write with a fresh Idempotency-Key, sent until it has an outcome or its
        deadline passes (safe: the server applies the key's write once)."""
        extra = self._headers({IDEMPOTENCY_HEADER: new_idempotency_key()}, None)
        retries = _Retries(self.retry_for)
        unknown: Exception | None = None  # an attempt that may have been applied
        while True:
            try:
                request = self._request(op, params, extra)
                async with self._lock:
                    status, raw, replied = await self._exchange(request, False)
                return parse_reply(op, status, raw, replied.get("retry-after"), replied)
            except Exception as exc:
                if _may_be_applied(exc):
                    unknown = exc
                delay = retries.next_delay(exc)
                if delay is None:
                    if unknown is not None and unknown is not exc and not _may_be_applied(exc):
                        # Say that the outcome is unknown, as the earlier attempt's error does.
                        raise unknown from exc
                    raise
                primary = _primary_named(exc)
                if primary is not None and primary != (self.host, self.port):
                    self._drop()
                    self.host, self.port = primary
                await asyncio.sleep(delay)

    async def _exchange(
        self, request: bytes, resendable: bool
    ) -> tuple[int, bytes, dict[str, str]]:
        for attempt in (1, 2):
            reused = self._writer is not None
            if reused and not self._idle_connection_alive():
                self._drop()
                reused = False
            try:
                async with asyncio.timeout(self.timeout):
                    if self._writer is None:
                        self._reader, self._writer = await asyncio.open_connection(
                            self.host, self.port, ssl=self.ssl_context
                        )
                    self._writer.write(request)
                    await self._writer.drain()
                    return await self._read_reply()
            except ConnectionError:
                self._drop()
                # Unlike a blocking sendall, write() gives no proof the request stayed
                # unsent, so only requests that are safe to repeat are sent again.
                if reused and resendable and attempt == 1:
                    continue
                raise
            except httptools.HttpParserError as exc:
                self._drop()
                raise _bad_http(exc) from exc
            except BaseException:
                self._drop()
                raise
        raise AssertionError("unreachable")

    async def _read_reply(self) -> tuple[int, bytes, dict[str, str]]:
        assert self._reader is not None
        reply = _Reply()
        while not reply.complete:
            chunk = await self._reader.read(65536)
            if not chunk:
                if reply.headers_done and not reply.framed:
                    break  # body delimited by the end of the connection
                raise ConnectionResetError("server closed the connection without a full reply")
            reply.parser.feed_data(chunk)
        if not reply.keep_alive:
            self._drop()
        return reply.status, bytes(reply.body), reply.headers
