"""The replies a connection owes: request order, closing, and the reply-buffer bound."""

from __future__ import annotations

import json

import pytest

from pbkv.commands import Done
from pbkv.http import HttpProtocol, Limits
from pbkv.http.pending import PendingReply, ReplyQueue
from pbkv.limits import ConnectionLimits, Guard


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class App:
    """Reads answer at once; writes wait until the test answers them."""

    accepts_replication = False

    def __init__(self) -> None:
        self.waiting: list = []

    def read(self, command, key):
        return Done(True, key)

    def submit(self, command, key, value, respond):
        self.waiting.append(respond)
        return None


def connect(guard: Guard | None = None) -> tuple[HttpProtocol, Transport, App]:
    app = App()
    protocol = HttpProtocol(app, Limits(), set(), "http", guard=guard)
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport, app


def get(key: str, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"GET /kv/get?key=%s HTTP/1.1\r\n%s\r\n" % (key.encode(), connection)


INSERT = b"POST /kv/insert?key=k&value=v HTTP/1.1\r\n\r\n"


def bodies(raw: bytes) -> list[dict]:
    return [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in raw.split(b"HTTP/1.1 ")[1:]]


def test_a_pending_reply_has_named_fields_only() -> None:
    reply = PendingReply(close=True)
    assert (reply.data, reply.stream, reply.close) == (None, None, True)
    with pytest.raises(AttributeError):
        reply.other = 1  # type: ignore[attr-defined]


def test_ready_bytes_count_the_replies_known_so_far() -> None:
    queue = ReplyQueue()
    first, second, third = PendingReply(False), PendingReply(False), PendingReply(True)
    queue.extend([first, second, third])
    assert queue.ready_bytes() == 0
    second.data = b"12345"
    third.data = b"123"
    assert queue.ready_bytes() == 8
    assert queue.popleft() is first


def test_a_late_write_holds_back_the_reads_behind_it() -> None:
    protocol, transport, app = connect()
    protocol.data_received(INSERT + get("a") + get("b"))
    assert transport.written == b""  # the read's replies wait for the write's
    app.waiting.pop()(Done(True))
    assert bodies(transport.written) == [
        {"success": "true"},
        {"success": "true", "value": "a"},
        {"success": "true", "value": "b"},
    ]
    assert not transport.closed


def test_a_reply_that_closes_is_the_last_one_sent() -> None:
    protocol, transport, app = connect()
    protocol.data_received(INSERT + get("a", close=True) + get("b"))
    app.waiting.pop()(Done(True))
    assert bodies(transport.written) == [{"success": "true"}, {"success": "true", "value": "a"}]
    assert transport.written.count(b"Connection: close") == 1 and transport.closed


def test_replies_piling_up_behind_a_late_one_stop_reading_until_sent() -> None:
    guard = Guard(ConnectionLimits(max_reply_buffer=300))
    protocol, transport, app = connect(guard)
    protocol.data_received(INSERT + get("a"))
    assert not transport.paused  # one small reply waits: under the bound
    protocol.data_received(get("b" * 100) + get("c" * 100))
    assert transport.paused  # the replies waiting passed max_reply_buffer
    app.waiting.pop()(Done(True))
    assert not transport.paused and len(bodies(transport.written)) == 4


def test_too_many_requests_in_flight_stop_reading() -> None:
    guard = Guard(ConnectionLimits(max_pipeline=2))
    protocol, transport, app = connect(guard)
    protocol.data_received(INSERT + INSERT)
    assert not transport.paused
    protocol.data_received(INSERT)
    assert transport.paused
    for respond in app.waiting:
        respond(Done(True))
    assert not transport.paused and len(bodies(transport.written)) == 3
