"""HttpProtocol driven directly with a fake transport (no sockets)."""

from __future__ import annotations

import json

import pytest

from pbkv.commands import Done
from pbkv.http import HttpProtocol, Limits
from tests.support.fake_transport import FakeTransport


class App:
    accepts_replication = False

    def __init__(self, fail: bool = False, answer_now: bool = False) -> None:
        self.fail = fail
        self.answer_now = answer_now
        self.pending = []
        self.writes: list[tuple[str, str, str | None]] = []

    def read(self, command, key):
        if self.fail:
            raise RuntimeError("a bug")
        return Done(True, f"value of {key}")

    def submit(self, command, key, value, respond):
        self.writes.append((command.value, key, value))
        if self.answer_now:
            return Done(True)
        self.pending.append(respond)  # answered later, like a replicated write
        return None


def connect(app: App, errors: str = "http") -> tuple[HttpProtocol, FakeTransport]:
    protocol = HttpProtocol(app, Limits(), set(), errors)
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


def test_a_bug_in_a_handler_in_course_mode_answers_the_failure_shape_and_closes():
    protocol, transport = connect(App(fail=True), "course")
    protocol.data_received(b"GET /kv/get?key=a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nX-Pbkv-Error: internal server error\r\n" in transport.written
    assert bodies(transport.written) == [{"success": "false", "value": ""}]
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


# -- raw bytes >= 0x80 in request targets -------------------------------------------------
RAW_GET = "GET /kv/get?key=韩国人 HTTP/1.1\r\nHost: x\r\n\r\n".encode()


def feed(protocol: HttpProtocol, data: bytes, cuts: list[int]) -> None:
    """``data`` in reads cut at ``cuts``."""
    for start, stop in zip([0, *cuts], [*cuts, len(data)], strict=True):
        protocol.data_received(data[start:stop])


def test_raw_utf8_target_is_read_as_percent_encoded():
    protocol, transport = connect(App())
    protocol.data_received(RAW_GET)
    assert bodies(transport.written) == [{"success": "true", "value": "value of 韩国人"}]
    assert not transport.closed


@pytest.mark.parametrize("cut", range(1, len(RAW_GET)))
def test_raw_utf8_target_split_at_every_byte(cut: int):
    protocol, transport = connect(App())
    feed(protocol, RAW_GET, [cut])
    assert bodies(transport.written) == [{"success": "true", "value": "value of 韩国人"}]


def test_raw_target_behind_a_body_with_raw_utf8_and_in_pipelined_requests():
    app = App(answer_now=True)
    protocol, transport = connect(app)
    body = "key=ключ&value=значение 😀".encode()
    data = (
        b"POST /kv/insert HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
        + RAW_GET
        + "GET /kv/get?key=a HTTP/1.1\r\nX-Note: café\r\n\r\n".encode()
        + "POST /kv/insert?key=ü&value=ö HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode()
    )
    for cuts in ([], [len(data) // 3, len(data) // 2], list(range(1, len(data), 7))):
        app.writes.clear()
        protocol, transport = connect(app)
        feed(protocol, data, cuts)
        assert app.writes == [("insert", "ключ", "значение 😀"), ("insert", "ü", "ö")], cuts
        assert bodies(transport.written) == [
            {"success": "true"},
            {"success": "true", "value": "value of 韩国人"},
            {"success": "true", "value": "value of a"},
            {"success": "true"},
        ]
        assert not transport.closed


def test_gbk_bytes_in_a_raw_target_are_invalid_utf8():
    protocol, transport = connect(App())
    protocol.data_received(b"GET /kv/get?key=\xce\xd2 HTTP/1.1\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 400 ")
    assert "UTF-8" in bodies(transport.written)[0]["error"]
    protocol, transport = connect(App(), "course")
    protocol.data_received(b"GET /kv/get?key=\xce\xd2 HTTP/1.1\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 200 ")
    assert bodies(transport.written) == [{"success": "false", "value": ""}]
    assert not transport.closed


@pytest.mark.parametrize(
    "data",
    [
        "GÉT /kv/get?key=a HTTP/1.1\r\n\r\n".encode(),
        "GET /kv/get?key=a HTTP/1.é\r\n\r\n".encode(),
        "é GET /kv/get HTTP/1.1\r\n\r\n".encode(),
    ],
)
def test_raw_bytes_outside_a_target_are_still_malformed(data: bytes):
    protocol, transport = connect(App(), "course")
    protocol.data_received(data)
    assert transport.written.startswith(b"HTTP/1.1 400 ")
    assert transport.closed


def test_raw_utf8_in_headers_and_bodies_goes_to_the_parser_untouched():
    app = App(answer_now=True)
    protocol, transport = connect(app)
    body = "key=ключ&value=ü".encode()
    chunked = "key=ä&value=中文".encode()
    protocol.data_received(
        b"POST /kv/insert HTTP/1.1\r\nX-Note: caf\xc3\xa9\r\nX-Other: \xff\r\n"
        b"Content-Length: %d\r\n\r\n%s"
        % (len(body), body)
        + RAW_GET
        + b"POST /kv/update HTTP/1.1\r\nX-Other: \xfe\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunked), chunked)
    )
    assert app.writes == [("insert", "ключ", "ü"), ("update", "ä", "中文")]
    assert bodies(transport.written) == [
        {"success": "true"},
        {"success": "true", "value": "value of 韩国人"},
        {"success": "true"},
    ]
    assert not transport.closed


def test_an_upgrade_hands_over_binary_bytes_read_with_it():
    from pbkv.wire import UPGRADE_PATH, UPGRADE_TOKEN

    class Backup(App):
        accepts_replication = True

        def upgrade(self, transport, leftover):
            self.handed = (transport, leftover)

    app = Backup()
    protocol, transport = connect(app)
    frames = bytes(range(256)) * 3  # not ASCII: must reach the channel as it is
    protocol.data_received(
        RAW_GET  # answered at once, so the upgrade behind it in the same read is taken
        + b"GET "
        + UPGRADE_PATH
        + b" HTTP/1.1\r\nUpgrade: "
        + UPGRADE_TOKEN
        + b"\r\nConnection: Upgrade\r\n\r\n"
        + frames
    )
    assert app.handed == (transport, frames)
    replies, _ = transport.written.split(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert bodies(replies) == [{"success": "true", "value": "value of 韩国人"}]
