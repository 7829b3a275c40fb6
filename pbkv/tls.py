"""TLS contexts (standard ``ssl``) for the client API and the replication channel.

One port serves both.  With ``tls_cert``, ``tls_key`` and ``tls_ca`` set, the
server speaks only TLS there and asks every client for a certificate without
requiring one (``CERT_OPTIONAL``): plain clients need none, while the HTTP layer
accepts the replication Upgrade only on a connection whose certificate was
verified against ``tls_ca`` and names the configured primary.  The primary
presents its certificate and verifies the backup's against ``tls_ca`` and the
backup's configured address.

The listener accepts plain TCP and starts TLS itself (``Handshakes``), so that a
connection counts toward ``max_clients`` from accept and its handshake has a
deadline (``header_timeout``): asyncio and uvloop call a TLS server's protocol
only once the handshake is over, and wait 60 s for one by default.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, cast

from pbkv.config import Settings
from pbkv.limits import Guard, LogThrottle


def server_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=settings.tls_ca)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)  # type: ignore[arg-type]  # both set when tls
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def channel_context(settings: Settings) -> ssl.SSLContext | None:
    """The primary's side of the channel: its own certificate, the backup's verified."""
    if not settings.tls:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)  # type: ignore[arg-type]  # both set when tls
    return context


def client_context(cafile: str | None = None) -> ssl.SSLContext:
    """For clients: verify the server against ``cafile`` (or the system's CAs)."""
    return ssl.create_default_context(cafile=cafile)


class Handshakes:
    """The listener's side of TLS: a protocol factory for the plain TCP server.

    Each accepted connection counts toward ``max_clients`` from accept, not from the
    end of its handshake, and the handshake has a deadline (``header_timeout``).
    Over ``max_clients`` a connection handshakes in a small reserve (the replication
    channel gets through, as on a plain port); a newcomer past the reserve closes the
    oldest in it at once.  A completed handshake hands the encrypted transport to a
    protocol from ``serve``, which counts itself from then on.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        guard: Guard,
        deadline: float,
        serve: Callable[[], asyncio.Protocol],
    ) -> None:
        self.context = context
        self.guard = guard
        self.deadline = deadline
        self.serve = serve
        self.running: set[Handshake] = set()
        self.reserve: deque[Handshake] = deque()  # handshakes over max_clients, oldest first
        self.failed = LogThrottle("TLS handshakes failed, timed out or were closed")

    def __call__(self) -> Handshake:
        return Handshake(self)

    def close_all(self) -> None:
        for handshake in list(self.running):
            handshake.abort()


class Handshake(asyncio.Protocol):
    """One accepted connection until its TLS handshake is over."""

    def __init__(self, handshakes: Handshakes) -> None:
        self.handshakes = handshakes
        self.transport: asyncio.Transport | None = None
        self.counted = False  # in guard.clients
        self.left = False  # handed over, failed or closed: counted no more
        self._upgrade: Coroutine[Any, Any, asyncio.Transport | None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        handshakes = self.handshakes
        guard = handshakes.guard
        bounds = guard.limits
        handshakes.running.add(self)
        if guard.clients < bounds.max_clients:
            guard.clients += 1
            self.counted = True
        else:
            guard.refused_clients.hit(guard.clock)
            reserve = handshakes.reserve
            if len(reserve) >= bounds.reserved_clients:
                reserve.popleft().abort()
            reserve.append(self)
        self._upgrade = asyncio.get_running_loop().start_tls(
            transport,
            self,  # the protocol of the encrypted side until the handshake is over
            handshakes.context,
            server_side=True,
            ssl_handshake_timeout=handshakes.deadline,
        )
        # The coroutine's first step runs now, as an eager task's would: it puts the
        # TLS layer under the transport before its first bytes are read (uvloop
        # starts reading as soon as connection_made returns, so a task started on
        # the next turn could let the client's hello reach this protocol instead).
        self._step(None)

    def _step(self, _: object) -> None:
        upgrade = self._upgrade
        assert upgrade is not None
        try:
            waiting = upgrade.send(None)
        except StopIteration as finished:
            self._handshake_over(finished.value)
        except Exception:  # failed, timed out or closed: the connection is gone
            self._handshake_failed()
        else:
            waiting.add_done_callback(self._step)

    def _handshake_over(self, encrypted: asyncio.Transport | None) -> None:
        if self.left or encrypted is None or encrypted.is_closing():
            # Closed during the handshake (a reset or an EOF ends the wait without
            # an error) or since: nothing to serve.
            self._handshake_failed()
            return
        self._leave()
        protocol = self.handshakes.serve()
        encrypted.set_protocol(protocol)
        protocol.connection_made(encrypted)

    def _handshake_failed(self) -> None:
        self._leave()
        self.handshakes.failed.hit(self.handshakes.guard.clock)
        if self.transport is not None:
            self.transport.abort()

    def abort(self) -> None:
        self._leave()
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()

    def _leave(self) -> None:
        if self.left:
            return
        self.left = True
        handshakes = self.handshakes
        handshakes.running.discard(self)
        if self.counted:
            self.counted = False
            handshakes.guard.clients -= 1
        else:
            try:
                handshakes.reserve.remove(self)
            except ValueError:  # already pushed out of the reserve
                pass
