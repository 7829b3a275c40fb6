"""A connection's timeouts, driven through ``sweep(now)`` with a chosen ``now``."""

from __future__ import annotations

import json

from pbkv.commands import Done
from pbkv.http import HttpProtocol, Limits
from pbkv.limits import CLOCK_STEP, ConnectionLimits, Guard

START = 1000.0  # the guard's clock when the connection is made
BOUNDS = ConnectionLimits(
    header_timeout=10.0, body_timeout=30.0, send_timeout=60.0, idle_timeout=300.0, max_clients=1
)


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class App:
    accepts_replication = False

    def __init__(self) -> None:
        self.waiting: list = []

    def read(self, command, key):
        return Done(True, key)

    def submit(self, command, key, value, respond):
        self.waiting.append(respond)
        return None


def connect(guard: Guard | None = None) -> tuple[HttpProtocol, Transport, Guard]:
    if guard is None:
        guard = Guard(BOUNDS)
        guard.tick(START)
    protocol = HttpProtocol(App(), Limits(), set(), "http", guard=guard)
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport, guard


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def after(seconds: float) -> float:
    """The first sweep at which ``seconds`` have surely passed since START."""
    return START + CLOCK_STEP + seconds + 0.01


def test_an_unfinished_head_times_out_after_header_timeout() -> None:
    protocol, transport, guard = connect()
    protocol.data_received(b"GET /kv/get?key=a HTTP/1.1\r\n")
    protocol.sweep(START + CLOCK_STEP + 10.0)  # not yet: the stamp may be a step old
    assert transport.written == b"" and guard.timeouts == 0
    protocol.sweep(after(10.0))
    assert status_and_body(transport.written) == (
        408,
        {"success": "false", "error": "request head not received within 10 s"},
    )
    assert transport.closed and guard.timeouts == 1


def test_an_unfinished_body_times_out_after_body_timeout() -> None:
    protocol, transport, guard = connect()
    protocol.data_received(b"POST /kv/insert HTTP/1.1\r\nContent-Length: 20\r\n\r\nkey=")
    protocol.sweep(after(10.0))  # past the header timeout: the body has its own
    assert transport.written == b""
    protocol.sweep(after(30.0))
    assert status_and_body(transport.written)[0] == 408
    assert b"request body not received within 30 s" in transport.written
    assert transport.closed and guard.timeouts == 1 and guard.pending_bytes == 20
    protocol.connection_lost(None)
    assert guard.pending_bytes == 0  # what the body held is given back


def test_a_phase_is_timed_from_when_it_began() -> None:
    protocol, transport, guard = connect()
    guard.tick(START + 25.0)
    protocol.data_received(b"GET /kv/get?key=a HTTP/1.1\r\n")  # the head begins at +25
    protocol.sweep(after(30.0))
    assert transport.written == b""
    protocol.sweep(after(35.0))
    assert status_and_body(transport.written)[0] == 408


def test_an_idle_connection_closes_quietly_after_idle_timeout() -> None:
    protocol, transport, _ = connect()
    protocol.data_received(b"GET /kv/get?key=a HTTP/1.1\r\n\r\n")
    answered = transport.written
    protocol.sweep(after(299.0))
    assert not transport.closed
    protocol.sweep(after(300.0))
    assert transport.closed and transport.written == answered


def test_a_connection_waiting_for_its_reply_is_not_idle() -> None:
    protocol, transport, _ = connect()
    protocol.data_received(b"POST /kv/insert?key=k&value=v HTTP/1.1\r\n\r\n")
    protocol.sweep(after(1000.0))
    assert not transport.closed and transport.written == b""


def test_replies_the_client_does_not_read_are_dropped_after_send_timeout() -> None:
    protocol, transport, guard = connect()
    protocol.pause_writing()  # the transport's buffer is full
    protocol.sweep(START + 60.0)  # stalled since START: counted from there
    assert not transport.aborted
    protocol.sweep(START + 60.01)
    assert transport.aborted and guard.timeouts == 1


def test_a_connection_over_max_clients_must_ask_for_the_channel_at_once() -> None:
    first, _, guard = connect()
    protocol, transport, _ = connect(guard)  # max_clients is 1: on probation
    protocol.sweep(START + CLOCK_STEP)
    assert transport.written == b""
    protocol.sweep(START + CLOCK_STEP + 0.01)
    assert status_and_body(transport.written) == (
        503,
        {"success": "false", "error": "too many client connections (max_clients 1)"},
    )
    assert b"Retry-After: 1\r\n" in transport.written
    assert guard.refused_clients.count == 1 and first.transport is not None
