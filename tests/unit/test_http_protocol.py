"""HttpProtocol driven directly with a fake transport (no sockets)."""

from __future__ import annotations

import json

import pytest

from pbkv.commands import Done, Refused
from pbkv.http import HttpProtocol, Limits
from pbkv.http.pending import PendingReply, ready_bytes
from pbkv.http.replies import MAX_REDIRECT_TARGET
from pbkv.limits import CLOCK_STEP, ConnectionLimits, Guard
from pbkv.stages import Stage
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


def connect(
    app: App, errors: str = "http", guard: Guard | None = None
) -> tuple[HttpProtocol, FakeTransport]:
    protocol = HttpProtocol(app, Limits(), set(), errors, guard=guard)
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


# -- the replies a connection owes ------------------------------------------------------
INSERT = b"POST /kv/insert?key=k&value=v HTTP/1.1\r\n\r\n"


def get(key: str, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"GET /kv/get?key=%s HTTP/1.1\r\n%s\r\n" % (key.encode(), connection)


def test_a_pending_reply_has_named_fields_only() -> None:
    reply = PendingReply(close=True)
    assert (reply.data, reply.stream, reply.close) == (None, None, True)
    with pytest.raises(AttributeError):
        reply.other = 1  # type: ignore[attr-defined]


def test_ready_bytes_count_the_replies_known_so_far() -> None:
    queue = [PendingReply(False), PendingReply(False), PendingReply(True)]
    assert ready_bytes(queue) == 0
    queue[1].data = b"12345"
    queue[2].data = b"123"
    assert ready_bytes(queue) == 8


def test_a_reply_that_closes_is_the_last_one_sent() -> None:
    app = App()
    protocol, transport = connect(app)
    protocol.data_received(INSERT + get("a", close=True) + get("b"))
    app.pending[0](Done(True))
    assert bodies(transport.written) == [
        {"success": "true"},
        {"success": "true", "value": "value of a"},
    ]
    assert transport.written.count(b"Connection: close") == 1 and transport.closed


def unknown(name: str) -> bytes:
    """A request refused at once (404), whatever waits before it."""
    return b"GET /%s HTTP/1.1\r\n\r\n" % name.encode()


def test_replies_piling_up_behind_a_late_one_stop_reading_until_sent() -> None:
    # Reads behind a late write wait for it: refusals are what can pile up.
    app = App()
    protocol, transport = connect(app, guard=Guard(ConnectionLimits(max_reply_buffer=300)))
    protocol.data_received(INSERT + unknown("a"))
    assert not transport.paused  # one small reply waits: under the bound
    protocol.data_received(unknown("b" * 100) + unknown("c" * 100))
    assert transport.paused  # the replies waiting passed max_reply_buffer
    app.pending[0](Done(True))
    assert not transport.paused and len(bodies(transport.written)) == 4


def test_too_many_requests_in_flight_stop_reading() -> None:
    app = App()
    protocol, transport = connect(app, guard=Guard(ConnectionLimits(max_pipeline=2)))
    protocol.data_received(INSERT + INSERT)
    assert not transport.paused
    protocol.data_received(INSERT)
    assert transport.paused
    for respond in app.pending:
        respond(Done(True))
    assert not transport.paused and len(bodies(transport.written)) == 3


# -- timeouts: sweep(now) with a chosen now -----------------------------------------------
START = 1000.0  # the guard's clock when the connection is made
BOUNDS = ConnectionLimits(
    header_timeout=10.0, body_timeout=30.0, send_timeout=60.0, idle_timeout=300.0, max_clients=1
)


def timed(guard: Guard | None = None) -> tuple[HttpProtocol, FakeTransport, Guard]:
    """A connection whose guard's clock reads START (or ``guard``'s, shared)."""
    if guard is None:
        guard = Guard(BOUNDS)
        guard.tick(START)
    protocol, transport = connect(App(), guard=guard)
    return protocol, transport, guard


def status_and_body(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def after(seconds: float) -> float:
    """The first sweep at which ``seconds`` have surely passed since START (the stamps
    come from a clock the sweep advances a step at a time)."""
    return START + CLOCK_STEP + seconds + 0.01


def test_an_unfinished_head_times_out_after_header_timeout() -> None:
    protocol, transport, guard = timed()
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
    protocol, transport, guard = timed()
    protocol.data_received(b"POST /kv/insert HTTP/1.1\r\nContent-Length: 20\r\n\r\nkey=")
    protocol.sweep(after(10.0))  # past the header timeout: the body has its own
    assert transport.written == b""
    protocol.sweep(after(30.0))
    assert status_and_body(transport.written) == (
        408,
        {"success": "false", "error": "request body not received within 30 s"},
    )
    assert transport.closed and guard.timeouts == 1 and guard.pending_bytes == 20
    protocol.connection_lost(None)
    assert guard.pending_bytes == 0  # what the body held is given back


def test_a_phase_is_timed_from_when_it_began() -> None:
    protocol, transport, guard = timed()
    guard.tick(START + 25.0)
    protocol.data_received(b"GET /kv/get?key=a HTTP/1.1\r\n")  # the head begins at +25
    protocol.sweep(after(30.0))
    assert transport.written == b""
    protocol.sweep(after(35.0))
    assert status_and_body(transport.written)[0] == 408


def test_an_idle_connection_closes_quietly_after_idle_timeout() -> None:
    protocol, transport, _ = timed()
    protocol.data_received(b"GET /kv/get?key=a HTTP/1.1\r\n\r\n")
    answered = transport.written
    protocol.sweep(after(299.0))
    assert not transport.closed
    protocol.sweep(after(300.0))
    assert transport.closed and transport.written == answered


def test_a_connection_waiting_for_its_reply_is_not_idle() -> None:
    protocol, transport, _ = timed()
    protocol.data_received(INSERT)
    protocol.sweep(after(1000.0))
    assert not transport.closed and transport.written == b""


def test_replies_the_client_does_not_read_are_dropped_after_send_timeout() -> None:
    protocol, transport, guard = timed()
    protocol.pause_writing()  # the transport's buffer is full
    protocol.sweep(START + 60.0)  # stalled since START: counted from there
    assert not transport.aborted
    protocol.sweep(START + 60.01)
    assert transport.aborted and guard.timeouts == 1


def test_a_connection_over_max_clients_must_ask_for_the_channel_at_once() -> None:
    first, _, guard = timed()
    protocol, transport, _ = timed(guard)  # max_clients is 1: on probation
    protocol.sweep(START + CLOCK_STEP)
    assert transport.written == b""
    protocol.sweep(START + CLOCK_STEP + 0.01)
    assert status_and_body(transport.written) == (
        503,
        {"success": "false", "error": "too many client connections (max_clients 1)"},
    )
    assert b"Retry-After: 1\r\n" in transport.written
    assert guard.refused_clients.count == 1 and first.transport is not None


# -- a pipeline is carried out in order ---------------------------------------------------
class StoreApp(App):
    """Writes take effect when answered (as on a replicated primary), reads see them."""

    def __init__(self) -> None:
        super().__init__()
        self.store: dict[str, str] = {}
        self.reads: list[str] = []

    def read(self, command, key):
        self.reads.append(key)
        value = self.store.get(key)
        return Done(value is not None, value or "")

    def status(self):
        return {"keys": len(self.store)}

    def submit(self, command, key, value, respond):
        def apply(outcome: Done) -> None:
            if outcome.ok:
                self.store[key] = value
            respond(outcome)

        self.writes.append((command.value, key, value))
        self.pending.append(apply)
        return None


def insert(key: str, value: str) -> bytes:
    return b"POST /kv/insert?key=%s&value=%s HTTP/1.1\r\n\r\n" % (key.encode(), value.encode())


def test_a_read_behind_an_unanswered_write_sees_it():
    app = StoreApp()
    protocol, transport = connect(app)
    protocol.data_received(insert("k", "1") + get("k"))
    assert app.reads == []  # not read before the write is answered
    app.pending.pop(0)(Done(True))
    assert app.reads == ["k"]
    assert bodies(transport.written) == [{"success": "true"}, {"success": "true", "value": "1"}]


def test_a_write_behind_a_waiting_read_waits_too():
    app = StoreApp()
    protocol, transport = connect(app)
    protocol.data_received(
        insert("k", "1") + get("k") + insert("j", "2") + b"GET /kvman/status HTTP/1.1\r\n\r\n"
    )
    assert app.writes == [("insert", "k", "1")]  # j is not submitted before k is read
    app.pending.pop(0)(Done(True))
    assert app.writes == [("insert", "k", "1"), ("insert", "j", "2")]
    assert len(bodies(transport.written)) == 2  # the status waits for j
    app.pending.pop(0)(Done(True))
    assert bodies(transport.written)[1:] == [
        {"success": "true", "value": "1"},
        {"success": "true"},
        {"keys": 2},
    ]


def test_writes_behind_writes_go_at_once_and_reads_after_the_last():
    app = StoreApp()
    protocol, transport = connect(app)
    protocol.data_received(insert("a", "1") + insert("b", "2") + get("b") + get("a"))
    assert len(app.writes) == 2 and app.reads == []
    app.pending.pop(0)(Done(True))
    assert app.reads == []  # b is not answered yet
    app.pending.pop(0)(Done(False))  # refused: the reads see the store without it
    assert app.reads == ["b", "a"]
    assert bodies(transport.written) == [
        {"success": "true"},
        {"success": "false"},
        {"success": "false", "value": ""},
        {"success": "true", "value": "1"},
    ]


def test_reads_without_unanswered_writes_are_answered_at_once():
    app = StoreApp()
    protocol, transport = connect(app)
    protocol.data_received(get("a") + get("b"))
    assert app.reads == ["a", "b"] and len(bodies(transport.written)) == 2


def test_held_requests_are_dropped_with_their_connection():
    app = StoreApp()
    guard = Guard()
    protocol, transport = connect(app, guard=guard)
    protocol.data_received(insert("k", "1") + get("k" * 10) + insert("j", "2"))
    assert guard.pending_bytes == 2 + 10 + 2  # two writes and a waiting read's key
    protocol.connection_lost(None)
    assert guard.pending_bytes == 2  # the submitted write counts until answered
    app.pending.pop(0)(Done(True))
    assert guard.pending_bytes == 0 and app.reads == [] and len(app.writes) == 1


# -- unanswered writes count in max_pending_bytes ------------------------------------------
def test_unanswered_writes_count_until_answered_and_pause_reading_past_the_bound():
    app = App()
    guard = Guard(ConnectionLimits(max_pending_bytes=1000))
    protocol, transport = connect(app, guard=guard)
    protocol.data_received(insert("k1", "v" * 400) + insert("k2", "v" * 400))
    assert guard.pending_bytes == 804 and not transport.paused
    protocol.data_received(insert("k3", "v" * 400))
    assert guard.pending_bytes == 1206 and transport.paused  # not read until answered
    assert protocol.reader.paused  # a body already begun is not refused meanwhile
    app.pending.pop(0)(Done(True))
    assert guard.pending_bytes == 804 and not transport.paused
    for respond in app.pending:
        respond(Done(True))
    assert guard.pending_bytes == 0 and len(bodies(transport.written)) == 3


def test_a_connection_without_unanswered_writes_is_not_paused_by_others():
    guard = Guard(ConnectionLimits(max_pending_bytes=1000))
    writer, writer_transport = connect(App(), guard=guard)
    writer.data_received(insert("k", "v" * 2000))
    assert writer_transport.paused
    reader, reader_transport = connect(App(), guard=guard)
    reader.data_received(get("a"))
    standalone, standalone_transport = connect(App(answer_now=True), guard=guard)
    standalone.data_received(insert("s", "v" * 2000))
    assert not reader_transport.paused and not standalone_transport.paused
    assert guard.pending_bytes == 2001  # answered at once: counted no longer


# -- redirects to the primary -------------------------------------------------------------
REFUSED = Refused(Stage.IN_SYNC, "backup", primary="127.0.0.9:7000")


def locations(raw: bytes) -> list[str | None]:
    """The Location header of each reply (None where there is none)."""
    found: list[str | None] = []
    for part in raw.split(b"HTTP/1.1 ")[1:]:
        head = part.split(b"\r\n\r\n", 1)[0].decode()
        values = [
            line[len("Location: ") :]
            for line in head.split("\r\n")
            if line.startswith("Location: ")
        ]
        found.append(values[0] if values else None)
    return found


def test_writes_refused_late_redirect_each_to_its_own_target():
    """The target is the request's own even when the refusal comes after later
    requests were read (the reader holds another target by then)."""
    app = App()
    protocol, transport = connect(app)
    protocol.data_received(
        b"POST /kv/insert?key=a HTTP/1.1\r\nContent-Length: 7\r\n\r\nvalue=1"
        b"POST /kv/delete?key=b HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        b"GET /kv/get?key=c HTTP/1.1\r\n\r\n"
    )
    app.pending[1](REFUSED)
    app.pending[0](REFUSED)
    assert transport.written.count(b"HTTP/1.1 307 Temporary Redirect\r\n") == 2
    assert locations(transport.written) == [
        "http://127.0.0.9:7000/kv/insert?key=a",
        "http://127.0.0.9:7000/kv/delete?key=b",
        None,
    ]
    assert bodies(transport.written)[0]["primary"] == "127.0.0.9:7000"


def test_a_target_too_long_to_repeat_gets_the_503_naming_the_primary():
    app = App()
    protocol, transport = connect(app)
    value = "v" * MAX_REDIRECT_TARGET
    protocol.data_received(f"POST /kv/insert?key=a&value={value} HTTP/1.1\r\n\r\n".encode())
    app.pending[0](REFUSED)
    assert transport.written.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert locations(transport.written) == [None]
    assert bodies(transport.written)[0]["primary"] == "127.0.0.9:7000"


def test_a_redirect_from_a_tls_connection_says_https():
    app = App()
    protocol = HttpProtocol(app, Limits(), set(), "http")
    transport = FakeTransport()
    transport.get_extra_info = lambda name, default=None: (  # type: ignore[method-assign]
        object() if name == "sslcontext" else default
    )
    protocol.connection_made(transport)
    protocol.data_received(b"POST /kv/update?key=a&value=b HTTP/1.1\r\n\r\n")
    app.pending[0](REFUSED)
    assert locations(transport.written) == ["https://127.0.0.9:7000/kv/update?key=a&value=b"]
