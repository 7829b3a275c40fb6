"""TLS contexts (standard ``ssl``) for the client API and the replication channel.

One port serves both.  With ``tls_cert``, ``tls_key`` and ``tls_ca`` set, the
server speaks only TLS there and asks every client for a certificate without
requiring one (``CERT_OPTIONAL``): plain clients need none, while the HTTP layer
accepts the replication Upgrade only on a connection whose certificate was
verified against ``tls_ca`` and names the configured primary.  The primary
presents its certificate and verifies the backup's against ``tls_ca`` and the
backup's configured address.
"""

from __future__ import annotations

import ssl

from pbkv.config import Settings


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
