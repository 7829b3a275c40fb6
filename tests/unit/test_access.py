"""Who may do what, at the HTTP layer (pbkv/http/access.py), with a fake transport."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pbkv.commands import Done
from pbkv.config import Settings
from pbkv.http import Access, HttpProtocol, Limits, access_for, certificate_names
from tests.support.fake_transport import FakeTransport as PlainTransport

UPGRADE = b"GET /kvrepl HTTP/1.1\r\nHost: x\r\nUpgrade: pbkv-repl/1\r\nConnection: Upgrade\r\n\r\n"


class FakeTransport(PlainTransport):
    """A connection from ``peer``, with a verified client ``certificate`` or none."""

    def __init__(self, peer: str, certificate: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.peer = peer
        self.certificate = certificate

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return (self.peer, 40000)
        if name == "peercert":
            return self.certificate
        return default


class App:
    def __init__(self, accepts_replication: bool = False) -> None:
        self.accepts_replication = accepts_replication
        self.stopped = False
        self.upgraded = False

    def read(self, command, key):
        return Done(True, "v")

    def submit(self, command, key, value, respond):
        return Done(True)

    def status(self):
        return {"role": "primary"}

    def metrics(self):
        return b"", "text/plain"

    def shutdown(self) -> None:
        self.stopped = True

    def upgrade(self, transport, leftover) -> None:
        self.upgraded = True


def request(
    access: Access,
    raw: bytes,
    peer: str = "127.0.0.1",
    app: App | None = None,
    certificate: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any], App]:
    """(status, body, app) of the first reply."""
    app = app or App()
    protocol = HttpProtocol(app, Limits(), set(), "http", access)
    transport = FakeTransport(peer, certificate)
    protocol.connection_made(transport)
    protocol.data_received(raw)
    if not transport.written:
        return 0, {}, app
    head, _, body = transport.written.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body else {}, app


def get(path: str, authorization: str | None = None) -> bytes:
    header = f"Authorization: {authorization}\r\n" if authorization else ""
    return f"GET {path} HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode()


PROTECTED = access_for(Settings(primary="127.0.0.1", backup="127.0.0.2"), "backup")
WITH_SECRET = access_for(Settings(secret="the-secret"), "backup")
WITH_TOKEN = access_for(Settings(client_token="the-token"), "primary")
BOTH = access_for(Settings(secret="the-secret", client_token="the-token"), "primary")


@pytest.mark.parametrize("peer", ["127.0.0.1", "::1", "127.0.0.2", "::ffff:127.0.0.2"])
def test_protected_mode_shutdown_from_loopback_or_a_server_address(peer: str) -> None:
    status, _, app = request(PROTECTED, get("/kvman/shutdown"), peer)
    assert status == 200 and app.stopped


@pytest.mark.parametrize("peer", ["127.0.0.9", "10.0.0.5", "::2"])
def test_protected_mode_shutdown_refused_from_elsewhere(peer: str) -> None:
    status, body, app = request(PROTECTED, get("/kvman/shutdown"), peer)
    assert status == 403 and not app.stopped
    assert "configured server addresses" in body["error"]


def test_shutdown_with_a_secret_needs_it_from_anywhere() -> None:
    for authorization in (None, "Bearer wrong", "Bearer the-secret2", "the-secret", "Basic x"):
        status, _, app = request(WITH_SECRET, get("/kvman/shutdown", authorization))
        assert status == 401 and not app.stopped, authorization
    status, _, app = request(WITH_SECRET, get("/kvman/shutdown", "Bearer the-secret"), "10.1.2.3")
    assert status == 200 and app.stopped


def test_client_token_needed_on_every_path() -> None:
    for path in ("/kv/get?key=a", "/kvman/countkey", "/kvman/dump", "/kvman/status", "/metrics"):
        for authorization in (None, "Bearer nope", "Bearer the-token2", "the-token"):
            status, body, _ = request(WITH_TOKEN, get(path, authorization))
            assert status == 401 and "client token" in body["error"], (path, authorization)
        status, _, _ = request(WITH_TOKEN, get(path, "Bearer the-token"))
        assert status == 200, path
    # Without a secret, shutdown takes the token and the address rule.
    status, _, app = request(WITH_TOKEN, get("/kvman/shutdown", "Bearer the-token"), "127.0.0.9")
    assert status == 403 and not app.stopped
    status, _, app = request(WITH_TOKEN, get("/kvman/shutdown", "Bearer the-token"))
    assert status == 200 and app.stopped


def test_with_secret_and_token_shutdown_takes_the_secret_not_the_token() -> None:
    status, _, app = request(BOTH, get("/kvman/shutdown", "Bearer the-token"))
    assert status == 401 and not app.stopped
    status, _, app = request(BOTH, get("/kvman/shutdown", "Bearer the-secret"))
    assert status == 200 and app.stopped
    status, _, _ = request(BOTH, get("/kv/get?key=a", "Bearer the-secret"))
    assert status == 401


def test_replication_upgrade_only_from_the_primary_address() -> None:
    status, body, app = request(PROTECTED, UPGRADE, "127.0.0.9", App(accepts_replication=True))
    assert status == 403 and not app.upgraded
    assert "only from the primary" in body["error"]
    status, _, app = request(PROTECTED, UPGRADE, "127.0.0.1", App(accepts_replication=True))
    assert status == 101 and app.upgraded


def test_tls_channel_needs_a_certificate_naming_the_primary() -> None:
    settings = Settings(tls_cert="c", tls_key="k", tls_ca="a", primary="127.0.0.1")
    access = access_for(settings, "backup")
    primary_cert = {"subjectAltName": (("IP Address", "127.0.0.1"),)}
    backup_cert = {"subjectAltName": (("IP Address", "127.0.0.2"), ("DNS", "backup.example"))}
    for certificate, expected in ((None, 403), ({}, 403), (backup_cert, 403), (primary_cert, 101)):
        app = App(accepts_replication=True)
        status, _, app = request(access, UPGRADE, "127.0.0.1", app, certificate)
        assert status == expected and app.upgraded == (expected == 101)
    assert certificate_names(backup_cert) == {"127.0.0.2", "backup.example"}


def test_open_access_changes_nothing() -> None:
    status, _, app = request(Access(), get("/kvman/shutdown"), "203.0.113.7")
    assert status == 200 and app.stopped


@pytest.mark.parametrize(
    "header",
    ["Origin: http://evil.example", "Sec-Fetch-Site: cross-site", "Sec-Fetch-Site: same-site"],
)
def test_protected_mode_refuses_a_shutdown_sent_by_a_web_page(header: str) -> None:
    raw = f"GET /kvman/shutdown HTTP/1.1\r\nHost: x\r\n{header}\r\n\r\n".encode()
    status, body, app = request(PROTECTED, raw, "127.0.0.1")
    assert status == 403 and not app.stopped
    assert "web page" in body["error"]
    # Typed into the address bar by the owner: allowed, like curl.
    typed = b"GET /kvman/shutdown HTTP/1.1\r\nHost: x\r\nSec-Fetch-Site: none\r\n\r\n"
    status, _, app = request(PROTECTED, typed, "127.0.0.1")
    assert status == 200 and app.stopped


def test_configured_host_names_resolve_once_to_their_addresses() -> None:
    access = access_for(Settings(primary="localhost", backup="127.0.0.2"), "backup")
    assert access.replication_from is not None and "127.0.0.1" in access.replication_from
    status, _, app = request(access, UPGRADE, "127.0.0.1", App(accepts_replication=True))
    assert status == 101 and app.upgraded


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR", "Bearer  "])
def test_the_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    status, _, _ = request(WITH_TOKEN, get("/kv/get?key=a", f"{scheme} the-token"))
    assert status == 200
    status, _, app = request(WITH_SECRET, get("/kvman/shutdown", f"{scheme} the-secret"))
    assert status == 200 and app.stopped
    # The credential itself is compared exactly.
    status, _, _ = request(WITH_TOKEN, get("/kv/get?key=a", f"{scheme} THE-TOKEN"))
    assert status == 401


def twice(path: str, first: str, second: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {first}\r\n"
        f"Authorization: {second}\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("first", "second"),
    [("Bearer wrong", "Bearer the-token"), ("Bearer the-token", "Bearer the-token")],
)
def test_two_authorization_headers_are_refused_not_the_last_taken(first: str, second: str) -> None:
    status, body, _ = request(WITH_TOKEN, twice("/kv/get?key=a", first, second))
    assert status == 400 and "more than once" in body["error"]
    secret_first, secret_second = (h.replace("the-token", "the-secret") for h in (first, second))
    status, body, app = request(WITH_SECRET, twice("/kvman/shutdown", secret_first, secret_second))
    assert status == 400 and "more than once" in body["error"] and not app.stopped


def test_two_authorization_headers_in_course_mode_get_the_course_refusal() -> None:
    protocol = HttpProtocol(App(), Limits(), set(), "course", WITH_TOKEN)
    transport = PlainTransport()
    protocol.connection_made(transport)
    protocol.data_received(twice("/kv/get?key=a", "Bearer the-token", "Bearer the-token"))
    head, _, body = transport.written.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body) == {
        "success": "false",
        "value": "",
    }
    assert b"\r\nX-Pbkv-Status: 400" in head and b"more than once" in head
