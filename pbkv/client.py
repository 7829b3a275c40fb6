"""Python clients for a pbkv server: blocking :class:`Client` and asyncio :class:`AsyncClient`.

Both speak the course HTTP/JSON interface over one keep-alive connection and turn
replies into results with the same function, :func:`parse_reply`: a logical failure
(key missing, key exists) comes back as ``None`` or ``False``; anything else the server
refuses raises a :class:`PbkvError` subclass, in either error mode of the server (``http``:
a real status and a JSON error; ``course``: HTTP 200, the course failure shape and the
reason in ``X-Pbkv-*`` headers). Transport failures raise ``OSError``
(``ConnectionError``, ``TimeoutError``); a write sent whose reply never came raises
:class:`OutcomeUnknown` (a ``ConnectionError``): it may or may not have been applied.

**Several servers.** Given ``addresses`` (or built by ``from_coordinator``), a client
finds the primary and follows it through a failover, for ``failover`` seconds per
call (see :class:`Client`).

**Safe retries.** By default every write carries an ``Idempotency-Key`` of its own,
the same on each of its attempts. The server applies a key's write once and answers
a retry with the first reply, so a keyed write is also sent again after a lost
reply (:class:`OutcomeUnknown`), "replication failed" or a reply that it did not
reach the disk (:class:`NotDurable`), with back-off, until the deadline
(``failover``, also called ``retry_for``; with one server a keyed write follows a
primary a refusal names). Only when the deadline passes is an error raised, and it
says what is known of the write (``_report``): :class:`OutcomeUnknown` if an attempt
went out and was never answered (it may still be applied, later or elsewhere);
else the last :class:`ReplicationFailed` or :class:`NotDurable` (rewound or not
acknowledged by the primary that answered, present only in the rare case its
class describes); else, when every attempt was refused, the last refusal (nothing
was applied). With ``idempotency_keys=False`` a write is sent again only when it
certainly never reached a primary; see the rule in :class:`Client`.
"""

from __future__ import annotations

import asyncio
import collections
import http
import http.client
import json
import os
import select
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    "NotDurable",
    "NotPrimary",
    "OutcomeUnknown",
    "PbkvError",
    "REPLY_HEADERS",
    "ReplicationFailed",
    "Unavailable",
    "format_address",
    "member_addresses",
    "parse_address",
    "parse_reply",
    "server_address",
]

DEFAULT_TIMEOUT = 5.0
# How long a client of several servers keeps looking for the primary in one call:
# longer than a failover takes (a lease of a few seconds, then a promotion).
DEFAULT_FAILOVER = 15.0
# A client of one server with Idempotency-Keys retries a write for this long.
DEFAULT_RETRY_FOR = 10.0
IDEMPOTENCY_HEADER = "Idempotency-Key"
_WRITES = frozenset({"insert", "update", "delete"})
DEFAULT_PORT = 8080


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


class NotDurable(Unavailable):
    """503 "disk error: the write did not reach this server's disk": the primary (with
    ``persistence`` set) applied the write in memory, but its record did not reach its
    disk, so it was not acknowledged; it may or may not survive (the backup may hold
    it). Like :class:`ReplicationFailed`, its outcome is not known to be nothing."""


class NotPrimary(Unavailable):
    """The server is not the primary (a backup refusing a write, or a member refusing
    any request): a 503, or in ``http`` mode a 307 to the primary. ``primary`` is the
    primary's ``"host:port"``."""

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


class OutcomeUnknown(ConnectionError):
    """A write was sent and no reply came: the connection broke or the timeout passed.

    The server may or may not have applied it, so it is never sent again on its own;
    read the key to learn what happened. The transport's own error is ``__cause__``.
    """


def new_idempotency_key() -> str:
    """A fresh key for one write (a random UUID)."""
    return str(uuid.uuid4())


def _may_be_applied(exc: BaseException) -> bool:
    """Whether the attempt that raised ``exc`` may have been applied: it was sent in
    full and no answer came, the primary rewound it, or the primary applied it but not
    to its disk (a refusal applied nothing)."""
    return isinstance(exc, (OutcomeUnknown, ReplicationFailed, NotDurable))


def _report(held: Exception | None, new: Exception) -> Exception:
    """Of two attempts that may have been applied (``held`` the earlier one), the one to
    report if the write ends without an answer: one sent and never answered
    (``OutcomeUnknown``) may still be applied, later or on another server, whatever
    later attempts met; a rewind (``ReplicationFailed``, ``NotDurable``) says only
    that the primary that answered does not hold it."""
    if isinstance(held, OutcomeUnknown) and not isinstance(new, OutcomeUnknown):
        return held
    return new


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
REPLY_HEADERS = (
    "retry-after",
    "location",
    "x-pbkv-error",
    "x-pbkv-status",
    "x-pbkv-stage",
    "x-pbkv-primary",
)


def _retry_after(header: str | None) -> float | None:
    if header is None:
        return None
    try:
        return float(header)
    except ValueError:  # an HTTP date: not worth parsing for a hint
        return None


def _error(
    status: int, body: Any, raw: bytes, retry_after: str | None, location: str | None = None
) -> PbkvError:
    """The exception for an error reply (HTTP error, or a 200 carrying ``"error"``); a
    refusal naming the primary (a 503 from a backup, a 307 to the primary) is
    :class:`NotPrimary`."""
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
    if status == 503 and message.startswith(_NOT_DURABLE):
        return NotDurable(status, message, fields, None, _retry_after(retry_after))
    if status in (307, 308) and "primary" not in fields and location:
        # A redirect without pbkv's body (a proxy's?): the primary is where it points.
        primary = urllib.parse.urlsplit(location).netloc
        if primary:
            fields = {**fields, "primary": primary}
    if status == 503 or "primary" in fields:
        stage = fields.get("stage")
        extra = (str(stage) if stage is not None else None, _retry_after(retry_after))
        if "primary" in fields:
            return NotPrimary(status, message, fields, *extra, primary=str(fields["primary"]))
        return Unavailable(status, message, fields, *extra)
    if 400 <= status < 500:
        return BadRequest(status, message, fields)
    return PbkvError(status, message, fields)


# A primary's reply to a write it applied in memory but could not log (pbkv.http.replies).
_NOT_DURABLE = "disk error: the write did not reach"


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
    if status >= 300 or failed:
        location = headers.get("location") if headers else None
        raise _error(status, body, raw, retry_after, location)
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


def format_address(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (also the ``Host`` header's form)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_host_header = format_address


def parse_address(
    address: str | tuple[str, int], default_port: int = DEFAULT_PORT
) -> tuple[str, int]:
    """(host, port) of ``"host:port"``, ``"[v6]:port"``, a bare host (``default_port``)
    or a (host, port) pair. A member's name (``"host:port#run"``) gives its address.
    Raises ``ValueError``."""
    if isinstance(address, tuple):
        host, port = address
        return str(host), int(port)
    text = address.partition("#")[0].strip()
    if "://" in text:
        text = urllib.parse.urlsplit(text).netloc
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {address!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:  # a bare host, or a bare IPv6 address
        host, port_text = text, ""
    if not host:
        raise ValueError(f"bad address {address!r}: no host")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad address {address!r}: the port is not a number") from None
    if not 0 < port < 65536:
        raise ValueError(f"bad address {address!r}: port out of range")
    return host, port


async def member_addresses(
    coordinator: str, cluster: str = "pbkv", timeout: float = 2.0
) -> list[tuple[str, int]]:
    """The addresses of the members registered in etcd (``coordinator``: its client
    URLs, as the setting) under the cluster name ``cluster``. Raises
    ``pbkv.coordinator.CoordinatorError`` when etcd does not answer, ``ValueError``
    for a bad URL."""
    from pbkv.coordinator import Coordinator  # grpc and aetcd only when asked for

    async with await Coordinator.open(coordinator, cluster, timeout) as etcd:
        members = await etcd.members()
    found: list[tuple[str, int]] = []
    for member in members:
        try:
            address = parse_address(member.member)
        except ValueError:
            continue  # not a member's name: nobody to talk to
        if address not in found:
            found.append(address)
    return found


# --- blocking client ----------------------------------------------------------------------


# The operations a client of several servers carries to the primary. status() and
# shutdown() are about the server the client is at now, so they go nowhere else.
_FOLLOWED = frozenset({"get", "insert", "update", "delete", "count", "dump"})
_PAUSE_FIRST = 0.05  # back-off between rounds of looking for the primary: doubles...
_PAUSE_MAX = 1.0  # ...up to this
_PROBE_TIMEOUT = 2.0  # the longest a status probe of one server may take


class _Unsent(Exception):
    """The request certainly never reached the server in full (the connection could
    not be made, or sending failed before the last byte): nothing was applied."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _Endpoint:
    """Where a client connects, and how it finds the primary; shared by the blocking and
    the asyncio client.

    ``token`` is the server's ``client_token`` (sent as ``Authorization: Bearer``);
    ``ssl_context`` (or just ``cafile``) makes the client speak HTTPS.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        addresses: Sequence[str | tuple[str, int]] | None = None,
        failover: float | None = None,
        retry_for: float | None = None,
        idempotency_keys: bool = True,
    ) -> None:
        servers: list[tuple[str, int]] = []
        for address in addresses if addresses is not None else [(host, port)]:
            parsed = parse_address(address)
            if parsed not in servers:
                servers.append(parsed)
        if not servers:
            raise ValueError("no server address given")
        # Every server known: those given, then each primary a server named.
        self.addresses = servers
        self.host, self.port = servers[0]  # the server the client talks to now
        self.timeout = timeout
        # Writes carry a fresh Idempotency-Key (safe to send again); without keys a
        # write is sent again only when it certainly never reached a primary.
        self.idempotency_keys = idempotency_keys
        # Several servers: every followed call looks for the primary; one server: only
        # keyed writes are sent again (to it, or to a primary a refusal names).
        self.several = addresses is not None
        if failover is not None and retry_for is not None and failover != retry_for:
            raise ValueError("failover and retry_for are one deadline: give one of them")
        if failover is None:
            failover = retry_for
        if failover is None:
            if addresses is not None:
                failover = DEFAULT_FAILOVER
            else:
                failover = DEFAULT_RETRY_FOR if idempotency_keys else 0.0
        self.failover = failover
        # The primary is looked for before the first call (with several servers).
        self._located = failover <= 0 or not self.several
        self.token = token
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

    @property
    def address(self) -> tuple[str, int]:
        """The server the client talks to now."""
        return self.host, self.port

    @property
    def retry_for(self) -> float:
        """The other name of ``failover``: how long one call keeps trying."""
        return self.failover

    @retry_for.setter
    def retry_for(self, seconds: float) -> None:
        self.failover = seconds

    def _followed(self, op: str) -> bool:
        """Whether ``op`` goes through the loop that retries and follows the primary."""
        if self.failover <= 0 or op not in _FOLLOWED:
            return False
        return self.several or (op in _WRITES and self.idempotency_keys)

    def _keyed(self, op: str, headers: dict[str, str]) -> bool:
        """Give a write its Idempotency-Key (one for all its attempts): whether it has one."""
        if op in _WRITES and self.idempotency_keys:
            headers[IDEMPOTENCY_HEADER] = new_idempotency_key()
            return True
        return False

    def _headers(self, headers: dict[str, str], credential: str | None) -> dict[str, str]:
        """The request's headers plus its credential: ``credential`` or the token."""
        credential = credential if credential is not None else self.token
        if credential is None:
            return headers
        return {**headers, "Authorization": f"Bearer {credential}"}

    # -- finding the primary (the decisions; each client does the I/O) --------------------
    def _known(self, address: str) -> tuple[str, int] | None:
        """The address a server named, added to those known (None if unreadable)."""
        try:
            parsed = parse_address(address)
        except ValueError:
            return None
        if parsed not in self.addresses:
            self.addresses.append(parsed)
        return parsed

    def _probe_timeout(self, deadline: float) -> float:
        left = max(deadline - time.monotonic(), 0.05)
        return min(_PROBE_TIMEOUT, left, self.timeout or _PROBE_TIMEOUT)

    def _choose(
        self, statuses: Sequence[tuple[tuple[str, int], dict[str, Any] | None]]
    ) -> tuple[str, int] | None:
        """The primary, from the statuses of the servers that answered: one that says it
        is the primary (the highest epoch if several do), else the primary most of them
        name, else None."""
        best: tuple[str, int] | None = None
        best_epoch = -1
        for address, status in statuses:
            if status is not None and status.get("role") == "primary":
                epoch = status.get("epoch")
                rank = epoch if isinstance(epoch, int) else 0
                if best is None or rank > best_epoch:
                    best, best_epoch = address, rank
        if best is not None:
            return best
        named = collections.Counter(
            status["primary"]
            for _, status in statuses
            if status is not None and isinstance(status.get("primary"), str)
        )
        for name, _ in named.most_common():
            found = self._known(name)
            if found is not None:
                return found
        return None

    def _next_after(self, address: tuple[str, int]) -> tuple[str, int]:
        """The server after ``address`` in the list, round the end."""
        servers = self.addresses
        index = servers.index(address) if address in servers else -1
        return servers[(index + 1) % len(servers)]


def _after_failure(
    exc: Exception, keyed: bool, safe: bool, unknown: Exception | None
) -> tuple[Exception, str | None, Exception | None]:
    """What a failed attempt leaves, for both clients' retry loops: the error to report,
    the primary a refusal named, and the attempt that may have been applied, to report
    if the write ends without an answer (``_report`` of this one and ``unknown``, the
    earlier ones'). Raises when the call must end now."""
    if isinstance(exc, NotPrimary):
        return exc, exc.primary, unknown
    if _may_be_applied(exc):
        if not keyed:
            raise exc
        return exc, None, _report(unknown, exc)  # its key makes sending it again safe
    if isinstance(exc, Unavailable):  # refused in this stage: nothing was applied
        return exc, None, unknown
    if isinstance(exc, _Unsent):
        return exc.error, None, unknown
    if isinstance(exc, PbkvError):
        if unknown is not None:  # an earlier attempt may have been applied
            raise unknown from exc
        raise exc
    if isinstance(exc, OSError) and safe:
        return exc, None, unknown  # a read lost on the way: safe to ask again
    raise exc


class _Retrying:
    """One call's attempts until its deadline, without I/O, for both clients' retry
    loops (one blocks, one awaits): what each failure leaves (``_after_failure``),
    when the call must end, and the pause before a server tried in this round."""

    def __init__(self, deadline: float, first: tuple[str, int], keyed: bool, safe: bool) -> None:
        self.deadline, self.keyed, self.safe = deadline, keyed, safe
        self.tried = {first}  # the servers tried since the last pause
        self.pause = _PAUSE_FIRST
        self.error: Exception | None = None
        self.unknown: Exception | None = None  # an attempt that may have been applied

    def failed(self, exc: Exception) -> str | None:
        """Take a failed attempt; the primary its refusal named, if any."""
        self.error, named, self.unknown = _after_failure(exc, self.keyed, self.safe, self.unknown)
        return named

    def time_left(self, now: float) -> float:
        """Seconds left; past the deadline, raises what the call ends with."""
        left = self.deadline - now
        if left <= 0:
            error = self.error
            assert error is not None, "a failure comes before the deadline is checked"
            if self.unknown is not None and self.unknown is not error:
                raise self.unknown from error  # say that the outcome is unknown
            raise error
        return left

    def pause_before(self, following: tuple[str, int], left: float) -> float:
        """Seconds to wait before trying ``following``: none within a round, a
        doubling pause once a round went by without an answer."""
        wait = 0.0
        if following in self.tried:
            wait = min(self.pause, left)
            self.pause = min(self.pause * 2, _PAUSE_MAX)
            self.tried.clear()
        self.tried.add(following)
        return wait


class Client(_Endpoint):
    """Blocking client over one keep-alive connection; not thread-safe.

    ``Client(host, port)`` talks to that one server. A connection the server dropped
    while idle is replaced transparently; a write is never sent twice: if the
    connection fails after a write went out, :class:`OutcomeUnknown` is raised.

    ``Client(addresses=["10.0.0.1:8080", "10.0.0.2:8080"])`` (or
    :meth:`from_coordinator`) talks to the primary among those servers, and finds it
    again after a failover. Before its first call it asks the servers'
    ``/kvman/status`` for the one whose ``role`` is ``primary``. A get, insert,
    update, delete, count or dump then moves on when:

    - the connection cannot be made (refused, unreachable, timed out connecting);
    - the server refuses it naming the primary (a 503 from a backup, or a 307 to
      the primary in ``http`` mode): it goes to the named primary;
    - the server refuses it for its stage (a 503 without a primary, as from a primary
      that has no in-sync backup yet): it waits and asks again, or asks the
      others' status for a primary;
    - a read's connection broke after it was sent (a read is safe to repeat).

    It pauses between rounds (50 ms, doubling up to 1 s) and gives up ``failover``
    seconds (default 15) after the call began, raising the last error.
    ``status()`` and ``shutdown()`` go to the server the client is at now
    (``address``), nowhere else.

    **The rule for writes:** a write is sent again only when it certainly never
    reached a primary: the connection was never made, sending failed before the
    request's last byte, or the server answered with a refusal or a redirect (a
    refusal applies nothing). A write whose request went out in full and whose
    reply never came (the connection broke, the timeout passed) has an unknown
    outcome: it raises :class:`OutcomeUnknown` and is not sent again. Sending it
    again could apply it twice (an insert answered "exists" by its own first copy);
    safe retries need a request identity the server remembers.

    **Writes with an Idempotency-Key** (the default; ``idempotency_keys=False``
    turns keys off and the rule above holds): each write carries a fresh key, the
    same on all its attempts, so the server applies it at most once and answers a
    repeat with the first reply. Such a write is also sent again after an
    :class:`OutcomeUnknown`, :class:`ReplicationFailed` or :class:`NotDurable`,
    until the deadline; then the error raised says what is known (with the last
    error as ``__cause__`` when it is another): :class:`OutcomeUnknown` if any
    attempt was sent and never answered, else the last :class:`ReplicationFailed`
    or :class:`NotDurable`, else the last refusal (nothing was applied). A client of one
    server (``Client(host, port)``) with keys retries its writes there, or at a
    primary a refusal names; its reads are sent once, as before.

    ``failover`` and ``retry_for`` are two names for one deadline, in seconds from
    the start of a call (give either; 0: one attempt). The default is 15 with
    ``addresses``, else 10 with keys, else 0.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        addresses: Sequence[str | tuple[str, int]] | None = None,
        failover: float | None = None,
        retry_for: float | None = None,
        idempotency_keys: bool = True,
    ) -> None:
        super().__init__(
            host,
            port,
            timeout,
            token=token,
            ssl_context=ssl_context,
            cafile=cafile,
            addresses=addresses,
            failover=failover,
            retry_for=retry_for,
            idempotency_keys=idempotency_keys,
        )
        self._conn = self._connection()
        self._dumping: http.client.HTTPResponse | None = None  # a dump being read

    @classmethod
    def from_coordinator(
        cls,
        coordinator: str,
        cluster: str = "pbkv",
        timeout: float | None = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> Self:
        """A client of the members registered in etcd (``coordinator``: its URLs) under
        the cluster name ``cluster``; ``options`` as the constructor's. The member list
        is read once, here; a primary a member names later is added to it. Call it
        where no event loop runs (it runs one to ask etcd); raises ``ValueError``
        when no member is registered."""
        found = asyncio.run(member_addresses(coordinator, cluster, timeout or DEFAULT_TIMEOUT))
        if not found:
            raise ValueError(f"no member of cluster {cluster!r} is registered at {coordinator}")
        return cls(timeout=timeout, addresses=found, **options)

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

    def iter_dump(self, block: int = 1 << 20) -> Iterator[tuple[str, str]]:
        """Every (key, value) pair, read as the reply arrives: the dump is never held
        whole, here or in the server (``block``: bytes read at a time).

        The primary is found, and the request retried, as for ``dump`` until the
        reply begins; the pairs then come as they are read.  A reply cut short raises
        (``OSError``, or ``PbkvError`` for one that is not a whole dump) after the
        pairs before it.  Leaving the iteration early closes the connection (the
        next call opens another); so does another call made meanwhile, which ends
        the dump (its next read raises ``PbkvError``)."""
        reply = self._call("dump", stream=True)
        if not isinstance(reply, http.client.HTTPResponse):
            return iter(cast("list[tuple[str, str]]", reply))  # a reply read whole
        return self._read_dump(reply, block)

    def _read_dump(
        self, response: http.client.HTTPResponse, block: int
    ) -> Iterator[tuple[str, str]]:
        from pbkv.bulk import DumpError, DumpReader

        reader = DumpReader()
        try:
            while data := response.read(block):
                yield from reader.feed(data)
            yield from reader.end()
        except DumpError as exc:
            raise PbkvError(response.status, str(exc)) from None
        except http.client.IncompleteRead as exc:
            raise ConnectionError(f"the dump's reply ended early: {exc!r}") from None
        finally:
            if self._dumping is response:
                self._dumping = None
                if not response.isclosed():  # left unread: no other request can follow it
                    self._conn.close()

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

    def _connection(self) -> http.client.HTTPConnection:
        if self.ssl_context is not None:
            return http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self.ssl_context
            )
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _switch(self, address: tuple[str, int]) -> None:
        """Talk to ``address`` from now on."""
        if address != self.address:
            self._conn.close()
            self.host, self.port = address
            self._conn = self._connection()

    def _call(
        self,
        op: str,
        params: Mapping[str, str] | None = None,
        credential: str | None = None,
        stream: bool = False,
    ) -> Any:
        """``op`` sent, to the primary if it follows one, retried as the rules say; its
        result (``stream``: see ``_send``)."""
        method, target, body, headers = _request_parts(op, params)
        keyed = self._keyed(op, headers)
        headers = self._headers(headers, credential)
        safe = BY_NAME[op].safe
        if not self._followed(op):
            try:
                return self._send(op, method, target, body, headers, safe, stream)
            except _Unsent as exc:
                raise exc.error from None
        deadline = time.monotonic() + self.failover
        if not self._located:
            self._located = True
            self._switch(self._find_primary(deadline) or self.address)
        retrying = _Retrying(deadline, self.address, keyed, safe)
        while True:
            try:
                return self._send(op, method, target, body, headers, safe, stream)
            except Exception as exc:
                named = retrying.failed(exc)
            left = retrying.time_left(time.monotonic())
            following = self._known(named) if named else None
            if not self.several and following is None:
                following = self.address  # one server: try it again
            elif following is None or following == self.address:
                following = self._find_primary(deadline) or self._next_after(self.address)
            wait = retrying.pause_before(following, left)
            if wait:
                time.sleep(wait)
            self._switch(following)

    def _find_primary(self, deadline: float) -> tuple[str, int] | None:
        """Ask the servers' status, in order, until one says it is the primary."""
        statuses: list[tuple[tuple[str, int], dict[str, Any] | None]] = []
        for address in list(self.addresses):
            status = self._status_of(address, self._probe_timeout(deadline))
            statuses.append((address, status))
            if status is not None and status.get("role") == "primary":
                break
        return self._choose(statuses)

    def _status_of(self, address: tuple[str, int], timeout: float) -> dict[str, Any] | None:
        host, port = address
        probe = Client(host, port, timeout, token=self.token, ssl_context=self.ssl_context)
        try:
            with probe:
                return probe.status()
        except (OSError, PbkvError):
            return None

    def _send(
        self,
        op: str,
        method: str,
        target: str,
        body: bytes | None,
        headers: dict[str, str],
        safe: bool,
        stream: bool = False,
    ) -> Any:
        """The reply's result; with ``stream``, a 200 that is not a refusal is returned
        as the response itself, its body not read yet (a dump, read as it arrives)."""
        status, raw, replied, response = self._exchange(method, target, body, headers, safe, stream)
        if response is not None:
            self._dumping = response
            return response
        return parse_reply(op, status, raw, replied.get("retry-after"), replied)

    def _exchange(
        self,
        method: str,
        target: str,
        body: bytes | None,
        headers: dict[str, str],
        resendable: bool,
        stream: bool = False,
    ) -> tuple[int, bytes, dict[str, str], http.client.HTTPResponse | None]:
        """One request and its reply: (status, body, the headers of REPLY_HEADERS,
        None); with ``stream``, a 200 that is not a refusal comes back unread as the
        last item instead (its body then empty)."""
        if self._dumping is not None:  # a dump still being read: it ends here
            self._dumping = None
            self._conn.close()
        conn = self._conn
        for attempt in (1, 2):
            sock = conn.sock
            reused = sock is not None
            if sock is not None and _peer_closed(sock.fileno()):
                conn.close()
                reused = False
            try:
                if conn.sock is None:
                    conn.connect()
                # One sendall: if it fails the server never saw a whole request.
                conn.request(method, target, body=body, headers=headers)
            except OSError as exc:
                conn.close()
                if reused and attempt == 1 and isinstance(exc, ConnectionError):
                    continue
                raise _Unsent(exc) from exc
            except BaseException:
                conn.close()
                raise
            try:
                resp = conn.getresponse()
                if stream and resp.status == 200 and not resp.getheader("x-pbkv-error"):
                    return resp.status, b"", {}, resp
                raw = resp.read()
            except http.client.HTTPException as exc:
                conn.close()
                if isinstance(exc, ConnectionError):  # RemoteDisconnected: no reply at all
                    if reused and resendable and attempt == 1:
                        continue
                    raise self._lost(method, target, exc, resendable) from exc
                raise _bad_http(exc) from exc
            except OSError as exc:  # broken, or no reply within the timeout
                conn.close()
                if reused and resendable and attempt == 1 and isinstance(exc, ConnectionError):
                    continue
                raise self._lost(method, target, exc, resendable) from exc
            except BaseException:
                conn.close()
                raise
            replied = {}
            for name in REPLY_HEADERS:
                value = resp.getheader(name)
                if value is not None:
                    replied[name] = value
            return resp.status, raw, replied, None
        raise AssertionError("unreachable")

    def _lost(self, method: str, target: str, exc: OSError, resendable: bool) -> OSError:
        return exc if resendable else _outcome_unknown(self.address, method, target, exc)


def _outcome_unknown(
    address: tuple[str, int], method: str, target: str, exc: BaseException
) -> OutcomeUnknown:
    reason = str(exc) or type(exc).__name__
    path = target.partition("?")[0]
    return OutcomeUnknown(
        f"{format_address(*address)}: no reply to {method} {path} ({reason}): the write "
        "may or may not have been applied"
    )


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

    Same methods, results and errors as :class:`Client`, as coroutines, and the same
    rules with several servers (``addresses``, :meth:`from_coordinator`; a call
    looking for the primary holds the others back). For parallel requests use
    several clients.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        addresses: Sequence[str | tuple[str, int]] | None = None,
        failover: float | None = None,
        retry_for: float | None = None,
        idempotency_keys: bool = True,
    ) -> None:
        super().__init__(
            host,
            port,
            timeout,
            token=token,
            ssl_context=ssl_context,
            cafile=cafile,
            addresses=addresses,
            failover=failover,
            retry_for=retry_for,
            idempotency_keys=idempotency_keys,
        )
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def from_coordinator(
        cls,
        coordinator: str,
        cluster: str = "pbkv",
        timeout: float | None = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> Self:
        """As :meth:`Client.from_coordinator`, awaited."""
        found = await member_addresses(coordinator, cluster, timeout or DEFAULT_TIMEOUT)
        if not found:
            raise ValueError(f"no member of cluster {cluster!r} is registered at {coordinator}")
        return cls(timeout=timeout, addresses=found, **options)

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

    def _switch(self, address: tuple[str, int]) -> None:
        """Talk to ``address`` from now on."""
        if address != self.address:
            self._drop()
            self.host, self.port = address

    async def _call(
        self, op: str, params: Mapping[str, str] | None = None, credential: str | None = None
    ) -> Any:
        parts = _request_parts(op, params)
        keyed = self._keyed(op, parts[3])
        safe = BY_NAME[op].safe
        async with self._lock:
            if not self._followed(op):
                try:
                    return await self._send(op, parts, credential, safe)
                except _Unsent as exc:
                    raise exc.error from None
            return await self._follow(op, parts, credential, safe, keyed)

    async def _follow(
        self,
        op: str,
        parts: tuple[str, str, bytes | None, dict[str, str]],
        credential: str | None,
        safe: bool,
        keyed: bool = False,
    ) -> Any:
        """Carry ``op`` to the primary (the rules are :class:`Client`'s)."""
        deadline = time.monotonic() + self.failover
        if not self._located:
            self._located = True
            self._switch(await self._find_primary(deadline) or self.address)
        retrying = _Retrying(deadline, self.address, keyed, safe)
        while True:
            try:
                return await self._send(op, parts, credential, safe)
            except Exception as exc:
                named = retrying.failed(exc)
            left = retrying.time_left(time.monotonic())
            following = self._known(named) if named else None
            if not self.several and following is None:
                following = self.address  # one server: try it again
            elif following is None or following == self.address:
                following = await self._find_primary(deadline) or self._next_after(self.address)
            wait = retrying.pause_before(following, left)
            if wait:
                await asyncio.sleep(wait)
            self._switch(following)

    async def _find_primary(self, deadline: float) -> tuple[str, int] | None:
        """Ask every server's status at once; the primary is chosen from the answers."""
        servers = list(self.addresses)
        timeout = self._probe_timeout(deadline)
        statuses = await asyncio.gather(*(self._status_of(a, timeout) for a in servers))
        return self._choose(list(zip(servers, statuses, strict=True)))

    async def _status_of(self, address: tuple[str, int], timeout: float) -> dict[str, Any] | None:
        host, port = address
        probe = AsyncClient(host, port, timeout, token=self.token, ssl_context=self.ssl_context)
        try:
            async with probe:
                return await probe.status()
        except (OSError, PbkvError):
            return None

    async def _send(
        self,
        op: str,
        parts: tuple[str, str, bytes | None, dict[str, str]],
        credential: str | None,
        safe: bool,
    ) -> Any:
        method, target, body, headers = parts
        headers = self._headers(headers, credential)
        lines = [f"{method} {target} HTTP/1.1", f"Host: {_host_header(self.host, self.port)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + (body or b"")
        status, raw, replied = await self._exchange(request, safe, method, target)
        return parse_reply(op, status, raw, replied.get("retry-after"), replied)

    async def _exchange(
        self, request: bytes, resendable: bool, method: str = "", target: str = ""
    ) -> tuple[int, bytes, dict[str, str]]:
        for attempt in (1, 2):
            reused = self._writer is not None
            if reused and not self._idle_connection_alive():
                self._drop()
                reused = False
            sent = False  # whether any of the request may have gone out
            try:
                async with asyncio.timeout(self.timeout):
                    if self._writer is None:
                        self._reader, self._writer = await asyncio.open_connection(
                            self.host, self.port, ssl=self.ssl_context
                        )
                    sent = True
                    self._writer.write(request)
                    await self._writer.drain()
                    return await self._read_reply()
            except httptools.HttpParserError as exc:
                self._drop()
                raise _bad_http(exc) from exc
            except OSError as exc:  # refused, broken, or the timeout passed
                self._drop()
                if not sent:
                    raise _Unsent(exc) from exc
                # Unlike a blocking sendall, write() gives no proof the request stayed
                # unsent, so only requests that are safe to repeat are sent again.
                if resendable:
                    if reused and attempt == 1 and isinstance(exc, ConnectionError):
                        continue
                    raise
                raise _outcome_unknown(self.address, method, target, exc) from exc
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
