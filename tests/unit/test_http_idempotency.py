"""The Idempotency-Key header through the HTTP layer into a real primary core: parsing
and bounds, replays, the 422 (and its course-mode shape), a retry in flight waiting."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pbkv.actions import Respond
from pbkv.commands import Command, Outcome
from pbkv.config import Settings
from pbkv.http import HttpProtocol, Limits
from pbkv.http.access import REPEATED
from pbkv.http.params import idempotency_key
from pbkv.http.replies import RequestError
from pbkv.primary import PrimaryCore
from pbkv.stages import Stage
from pbkv.store import make_store
from pbkv.wire import Ack
from tests.support.fake_transport import FakeTransport


class CoreApp:
    """The HTTP layer's App over a primary core in sync whose backup the test plays:
    ``acknowledge()`` acknowledges every batch sent."""

    accepts_replication = False

    def __init__(self) -> None:
        self.core = PrimaryCore(Settings(), make_store("sharded", 4), 0.0, initial=Stage.IN_SYNC)
        self.core.confirmed = True
        self.backup = self.core.store.empty_like()  # the copy the test's backup holds
        self.submitted: list[str | None] = []

    def read(self, command: Command, key: str) -> Outcome:
        return self.core.read(command, key)

    def submit(self, command, key, value, respond, idempotency=None) -> Outcome | None:
        self.submitted.append(idempotency)
        outcome = self.core.submit(command, key, value, respond, idempotency)
        self.core.take_actions()  # FlushSoon: the test flushes
        return outcome

    def acknowledge(self) -> None:
        core = self.core
        core.flush(1.0)
        backup = self.backup
        while core.in_flight:
            batch = core.in_flight[0]
            assert not batch.absent  # no load chunks here
            backup.apply(batch.ops)
            backup.idempotency.apply(batch.time, batch.keyed)
            core._batch_acked(Ack(batch.seq, backup.checksum, len(backup)))
        for action in core.take_actions():
            if isinstance(action, Respond):
                action.reply(action.outcome)


def connect(app: Any, errors: str = "http") -> tuple[HttpProtocol, FakeTransport]:
    protocol = HttpProtocol(app, Limits(), set(), errors)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


def post(path: str, body: str, key: str | None = None, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body.encode())}\r\n"
    head += "Content-Type: application/x-www-form-urlencoded\r\n"
    if key is not None:
        head += f"Idempotency-Key: {key}\r\n"
    return (head + extra + "\r\n" + body).encode()


def replies(raw: bytes) -> list[tuple[int, dict[str, Any], bytes]]:
    out = []
    for part in raw.split(b"HTTP/1.1 ")[1:]:
        head, body = part.split(b"\r\n\r\n", 1)
        out.append((int(head[:3]), json.loads(body), head))
    return out


def test_a_retry_gets_the_first_reply_and_is_not_applied_again() -> None:
    app = CoreApp()
    protocol, transport = connect(app)
    protocol.data_received(post("/kv/insert", "key=k&value=v", "abc-1"))
    app.acknowledge()
    protocol.data_received(post("/kv/delete", "key=k", "abc-2"))
    app.acknowledge()
    sent = app.core.batches_sent
    protocol.data_received(post("/kv/insert", "key=k&value=v", "abc-1"))
    protocol.data_received(post("/kv/delete", "key=k", '"abc-2"'))  # the draft's quoted form
    app.acknowledge()
    assert [(s, b) for s, b, _ in replies(transport.written)] == [
        (200, {"success": "true"}),
        (200, {"success": "true", "value": "v"}),
        (200, {"success": "true"}),
        (200, {"success": "true", "value": "v"}),
    ]
    assert app.core.batches_sent == sent and "k" not in app.core.store
    assert app.submitted == ["abc-1", "abc-2", "abc-1", "abc-2"]


def test_a_request_without_the_header_passes_no_key() -> None:
    app = CoreApp()
    protocol, transport = connect(app)
    protocol.data_received(post("/kv/insert", "key=k&value=v"))
    app.acknowledge()
    protocol.data_received(post("/kv/insert", "key=k&value=v"))
    app.acknowledge()
    assert app.submitted == [None, None]
    assert [b for _, b, _ in replies(transport.written)] == [
        {"success": "true"},
        {"success": "false"},
    ]
    assert len(app.core.store.idempotency) == 0


def test_the_same_key_with_another_request_is_422_and_changes_nothing() -> None:
    app = CoreApp()
    protocol, transport = connect(app)
    protocol.data_received(post("/kv/insert", "key=k&value=v", "abc"))
    app.acknowledge()
    checksum = app.core.store.checksum
    protocol.data_received(post("/kv/insert", "key=k&value=other", "abc"))
    protocol.data_received(post("/kv/update", "key=k&value=v", "abc"))
    status, body, _ = replies(transport.written)[1]
    assert status == 422
    assert body == {
        "success": "false",
        "error": "Idempotency-Key already used for another request: nothing applied",
    }
    assert replies(transport.written)[2][0] == 422
    assert app.core.store.checksum == checksum and app.core.store.get("k") == "v"


def test_course_mode_refuses_a_reused_key_with_the_routes_failure_shape() -> None:
    app = CoreApp()
    protocol, transport = connect(app, "course")
    protocol.data_received(post("/kv/insert", "key=k&value=v", "abc"))
    app.acknowledge()
    protocol.data_received(b"GET /kv/delete?key=k HTTP/1.1\r\nIdempotency-Key: abc\r\n\r\n")
    status, body, head = replies(transport.written)[1]
    assert (status, body) == (200, {"success": "false", "value": ""})
    assert b"\r\nX-Pbkv-Status: 422" in head
    assert b"X-Pbkv-Error: Idempotency-Key already used for another request" in head
    assert app.core.store.get("k") == "v"


@pytest.mark.parametrize(
    "header",
    [
        "",
        "a b",
        "x" * 256,
        '""',
        "café",
    ],
)
def test_a_malformed_key_is_a_400_and_nothing_is_applied(header: str) -> None:
    app = CoreApp()
    protocol, transport = connect(app)
    protocol.data_received(post("/kv/insert", "key=k&value=v", header))
    status, body, _ = replies(transport.written)[0]
    assert status == 400 and "Idempotency-Key" in body["error"]
    assert app.submitted == [] and "k" not in app.core.store


def test_a_key_given_twice_is_refused() -> None:
    app = CoreApp()
    protocol, transport = connect(app, "course")
    protocol.data_received(post("/kv/insert", "key=k&value=v", "a", "Idempotency-Key: a\r\n"))
    status, body, head = replies(transport.written)[0]
    assert (status, body) == (200, {"success": "false"})
    assert b"X-Pbkv-Status: 400" in head and app.submitted == []


def test_the_longest_key_is_taken_and_a_read_ignores_the_header() -> None:
    app = CoreApp()
    protocol, transport = connect(app)
    protocol.data_received(post("/kv/insert", "key=k&value=v", "x" * 255))
    app.acknowledge()
    protocol.data_received(b"GET /kv/get?key=k HTTP/1.1\r\nIdempotency-Key: a b\r\n\r\n")
    assert [b for _, b, _ in replies(transport.written)] == [
        {"success": "true"},
        {"success": "true", "value": "v"},
    ]


def test_a_retry_on_another_connection_while_the_first_is_in_flight_waits() -> None:
    app = CoreApp()
    first, first_transport = connect(app)
    retry, retry_transport = connect(app)
    first.data_received(post("/kv/insert", "key=k&value=v", "abc"))
    retry.data_received(post("/kv/insert", "key=k&value=v", "abc"))
    assert first_transport.written == retry_transport.written == b""
    app.acknowledge()
    assert replies(first_transport.written)[0][:2] == (200, {"success": "true"})
    assert replies(retry_transport.written)[0][:2] == (200, {"success": "true"})
    assert app.core.writes_replicated == 1


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b"8e03978e-40d5-4b1c-9f0e-1a2b3c4d5e6f", "8e03978e-40d5-4b1c-9f0e-1a2b3c4d5e6f"),
        (b'"8e03978e-40d5"', "8e03978e-40d5"),
        (b" order_17:retry ", "order_17:retry"),
        (b"---", "---"),
        (b"x" * 255, "x" * 255),
    ],
)
def test_a_valid_key_is_read_as_sent_whichever_way_it_is_checked(raw: bytes, key: str) -> None:
    assert idempotency_key(raw) == key


@pytest.mark.parametrize("raw", [b"", b"x" * 256, b"caf\xc3\xa9", b"a\x00b", REPEATED])
def test_an_invalid_key_is_refused_whichever_way_it_is_checked(raw: bytes) -> None:
    with pytest.raises(RequestError):
        idempotency_key(raw)
