"""Who may do what through the client API (README "Security"): the client token,
the shutdown secret or addresses, and who may open the replication channel.

The checks take what a request carries (its ``Authorization`` value, the
connection's transport) and raise ``RequestError`` or name the refusal.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

from pbkv.config import Settings
from pbkv.http.replies import RequestError
from pbkv.routes import SHUTDOWN_PATH

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Access:
    """Who may do what (README "Security"); the default lets anyone do anything.

    The expected ``Authorization`` values are held whole (``b"Bearer <token>"``) so a
    request costs one constant-time comparison, and only when they are set (another
    spelling of the scheme costs a second one).
    """

    client_token: bytes | None = None  # every request needs this Authorization value
    shutdown_secret: bytes | None = None  # /kvman/shutdown needs this one instead
    # Without a secret: the peer addresses that may shut the server down (and LOOPBACK).
    shutdown_from: frozenset[str] | None = None
    # The peer addresses that may open the replication channel (None: any).
    replication_from: frozenset[str] | None = None
    # TLS: the channel's client certificate must be verified and name one of these.
    replication_certificate_names: frozenset[str] | None = None


OPEN = Access()

# Loopback as a local process reaches it by default; the rest of 127.0.0.0/8 stands
# for other hosts in a single-machine pair (the course puts the backup on 127.0.0.2).
LOOPBACK = frozenset({"127.0.0.1", "::1"})


# What the request reader holds when a request has two Authorization headers.
REPEATED = b"\xff repeated"


def _bearer(value: str | None) -> bytes | None:
    return None if value is None else b"Bearer " + value.encode("ascii")


def _credentials_hold(given: bytes | None, expected: bytes) -> bool:
    """Whether ``given`` is ``expected`` (``Bearer <secret>``), the scheme in any case
    and followed by any number of spaces (RFC 7235)."""
    if given is None:
        return False
    if hmac.compare_digest(given, expected):
        return True
    if given is REPEATED:
        raise RequestError(400, "Authorization given more than once")
    scheme, _, credentials = given.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(
        b"Bearer " + credentials.lstrip(b" "), expected
    )


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
    return frozenset(_normal(str(info[4][0])) for info in infos)


def _normal(address: str) -> str:
    ip = ipaddress.ip_address(address.partition("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def access_for(settings: Settings, role: str, member: bool = False) -> Access:
    """Who may do what on this server. A member of a coordinated cluster (``member``)
    has a secret (``pbkv serve`` insists): any member may lead, so the channel is
    open to every address and trusted by the proof of the secret alone."""
    if member:
        return Access(
            client_token=_bearer(settings.client_token),
            shutdown_secret=_bearer(settings.secret),
        )
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


def certificate_names(certificate: dict[str, Any] | None) -> set[str]:
    """The DNS names and IP addresses in a verified certificate's subjectAltName."""
    if not certificate:
        return set()
    return {
        value if kind == "DNS" else _normal(value)
        for kind, value in certificate.get("subjectAltName", ())
        if kind in ("DNS", "IP Address")
    }


# -- the checks ------------------------------------------------------------------------
def check_client_token(access: Access, path: bytes, given: bytes | None) -> None:
    """Refuse a request without the client token (called only when one is set)."""
    if path == SHUTDOWN_PATH and access.shutdown_secret is not None:
        return  # the secret, checked there, is the stronger credential
    expected = access.client_token
    if expected is not None and not _credentials_hold(given, expected):
        raise RequestError(401, "this server needs Authorization: Bearer <client token>")


def check_shutdown(
    access: Access,
    transport: asyncio.BaseTransport | None,
    given: bytes | None,
    from_web_page: bool,
) -> None:
    """Refuse ``/kvman/shutdown`` to anyone but the owner: the secret's holder or,
    without a secret, a server address that is not a web page's request."""
    if access.shutdown_secret is not None:
        if not _credentials_hold(given, access.shutdown_secret):
            log.warning(
                "refused /kvman/shutdown from %s: wrong or missing secret",
                peer_ip(transport) or "?",
            )
            raise RequestError(401, "shutdown needs Authorization: Bearer <secret>")
    elif access.shutdown_from is not None:
        if from_web_page:
            # A page the owner opened may send requests from loopback: refuse them.
            log.warning("refused /kvman/shutdown sent by a web page (Origin or Sec-Fetch-Site)")
            raise RequestError(403, "shutdown is not accepted from a web page")
        ip = peer_ip(transport)
        if ip is None or not (ip in access.shutdown_from or ip in LOOPBACK):
            log.warning("refused /kvman/shutdown from %s: not a server address", ip)
            raise RequestError(
                403,
                "shutdown is accepted only from 127.0.0.1, ::1 or the configured server addresses",
            )


def channel_refusal(access: Access, transport: asyncio.BaseTransport) -> str | None:
    """Why this connection may not become the replication channel (None: it may)."""
    ip = peer_ip(transport)
    if access.replication_from is not None and ip not in access.replication_from:
        return f"the replication channel is accepted only from the primary, not from {ip}"
    names = access.replication_certificate_names
    if names is not None:
        certificate = transport.get_extra_info("peercert")
        if not certificate:
            return "the replication channel needs a client certificate signed by tls_ca"
        if not names & certificate_names(certificate):
            return "the client certificate does not name the configured primary"
    return None
