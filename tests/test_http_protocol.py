"""HttpProtocol driven directly with a fake transport (no sockets)."""

from __future__ import annotations

import json

from pbkv.commands import Done
from pbkv.http import HttpProtocol, Limits


class FakeTransport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class App:
    accepts_replication = False

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.pending = []

    def read(self, command, key):
        if self.fail:
            raise RuntimeError("a bug")
        return Done(True, f"value of {key}")

    def submit(self, command, key, value, respond):
        self.pending.append(respond)  # answered later, like a replicated write
        return None


def connect(app: App) -> tuple[HttpProtocol, FakeTransport]:
    protocol = HttpProtocol(app, Limits(), set())
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


def bodies(raw: bytes) -> list[dict]:
    return [json.loads(part.split(b"\r\n\r\n", 1)[1]) for part in raw.split(b"HTTP/1.1 ")[1:]]


def test_a_bug_in_a_handler_answers_500_and_closes_instead_of_stalling():
    protocol, transport = connect(App(fail=True))
    protocol.data_received(b"GET /kv/get?key=a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 500 ")
    assert bodies(transport.written) == [{"success": "false", "error": "internal server error"}]
    assert transport.closed


def test_pipelined_replies_keep_request_order_when_a_write_answers_late():
    app = App()
    protocol, transport = connect(app)
    protocol.data_received(
        b"POST /kv/insert HTTP/1.1\r\nHost: x\r\nContent-Length: 13\r\n\r\nkey=a&value=1"
        b"GET /kv/get?key=b HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert transport.written == b""  # the read waits behind the write
    app.pending[0](Done(True))
    assert bodies(transport.written) == [
        {"success": "true"},
        {"success": "true", "value": "value of b"},
    ]
    assert not transport.closed
