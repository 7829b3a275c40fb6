"""The request reader without sockets: bytes in, requests and refusals out."""

from __future__ import annotations

import pytest

from pbkv.http.access import REPEATED
from pbkv.http.params import Limits
from pbkv.http.reader import Phase, RequestReader
from pbkv.http.replies import RETRY
from pbkv.limits import SMALL_BODY, ConnectionLimits, Guard


class Recorder:
    """A RequestHandler that writes down what the reader reports."""

    def __init__(self) -> None:
        self.reader: RequestReader
        self.requests: list[tuple[bytes, bytes, bytes, bool]] = []
        self.headers: list[tuple[bytes, bytes | None, bool]] = []  # the ones read
        self.refusals: list[tuple[int, str, bytes]] = []
        self.continues = 0
        self.upgrades: list[bytes] = []
        self.bare: list[bytes] = []
        self.waits = False  # whether the connection waits when there is no room

    def request_ready(self) -> None:
        reader = self.reader
        parser = reader.parser
        body = b"".join(reader.body)
        self.requests.append((parser.get_method(), reader.url, body, parser.should_keep_alive()))
        self.headers.append((reader.content_type, reader.authorization, reader.from_web_page))

    def refuse_and_close(self, status: int, message: str, extra: bytes = b"") -> None:
        self.refusals.append((status, message, extra))

    def send_continue(self) -> None:
        self.continues += 1

    def upgrade_requested(self, leftover: bytes) -> None:
        self.upgrades.append(leftover)

    def write_and_close(self, data: bytes) -> None:
        self.bare.append(data)

    def wait_for_room(self) -> bool:
        return self.waits


def reader_for(limits: Limits | None = None, guard: Guard | None = None) -> Recorder:
    handler = Recorder()
    handler.reader = RequestReader(handler, limits or Limits(), guard or Guard())
    return handler


GET = b"GET /kv/get?key=a HTTP/1.1\r\nHost: x\r\n\r\n"
INSERT = (
    b"POST /kv/insert HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 13\r\n\r\n"
    b"key=k&value=v"
)


def test_pipelined_requests_come_out_whole_and_in_order() -> None:
    handler = reader_for()
    handler.reader.feed(INSERT + GET + b"GET /kvman/countkey HTTP/1.0\r\n\r\n")
    assert handler.requests == [
        (b"POST", b"/kv/insert", b"key=k&value=v", True),
        (b"GET", b"/kv/get?key=a", b"", True),
        (b"GET", b"/kvman/countkey", b"", False),
    ]
    assert handler.refusals == [] and handler.reader.phase is Phase.IDLE


def test_a_request_fed_a_byte_at_a_time_goes_through_each_phase() -> None:
    handler = reader_for()
    reader = handler.reader
    phases = []
    for byte in range(len(INSERT)):
        reader.feed(INSERT[byte : byte + 1])
        phases.append(reader.phase)
    # The parser reports a header once its line is complete.
    seen = [phase for n, phase in enumerate(phases) if n == 0 or phases[n - 1] is not phase]
    assert seen == [Phase.REQUEST_LINE, Phase.HEADERS, Phase.BODY, Phase.IDLE]
    assert handler.requests == [(b"POST", b"/kv/insert", b"key=k&value=v", True)]


def test_the_headers_a_request_is_read_for() -> None:
    handler = reader_for()
    handler.reader.feed(
        b"POST /kv/insert HTTP/1.1\r\nContent-Type: application/json\r\n"
        b"Authorization:  Bearer t \r\nOrigin: https://example.org\r\nContent-Length: 2\r\n\r\n{}"
        + GET.replace(b"Host: x", b"Sec-Fetch-Site: none")
    )
    assert handler.headers == [
        (b"application/json", b"Bearer t", True),
        (b"", None, False),  # each request starts afresh; a browser's own navigation is fine
    ]


def test_raw_utf8_in_a_target_reads_as_percent_encoded() -> None:
    handler = reader_for()
    handler.reader.feed("GET /kv/get?key=韩国人 HTTP/1.1\r\n\r\n".encode())
    assert handler.requests == [(b"GET", b"/kv/get?key=%E9%9F%A9%E5%9B%BD%E4%BA%BA", b"", True)]


def test_a_head_over_its_limit_is_refused_and_counted_until_then() -> None:
    limits = Limits(max_key_bytes=10, max_value_bytes=10)
    guard = Guard()
    handler = reader_for(limits, guard)
    reader = handler.reader
    reader.feed(b"GET /kv/get?key=")
    assert guard.pending_bytes == reader.held == 16  # an unfinished head is held
    reader.feed(b"a" * limits.max_head_bytes)
    assert handler.refusals == [
        (413, f"request line and headers larger than {limits.max_head_bytes} bytes", b"")
    ]


def test_a_declared_body_over_its_limit_is_refused_and_ignored() -> None:
    limits = Limits(max_key_bytes=10, max_value_bytes=10)
    handler = reader_for(limits)
    size = limits.max_body_bytes + 1
    handler.reader.feed(
        b"POST /kv/insert HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size
    )
    assert handler.refusals == [
        (413, f"request body larger than {limits.max_body_bytes} bytes", b"")
    ]
    assert handler.requests == []


def test_a_chunked_body_over_its_limit_is_refused_as_it_arrives() -> None:
    limits = Limits(max_key_bytes=10, max_value_bytes=10)
    handler = reader_for(limits)
    size = limits.max_body_bytes + 1
    handler.reader.feed(
        b"POST /kv/insert HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % size
        + b"x" * size
        + b"\r\n0\r\n\r\n"
    )
    assert [status for status, _, _ in handler.refusals] == [413]
    assert handler.requests == []


def test_a_body_is_held_in_the_guard_until_its_request_completes() -> None:
    guard = Guard()
    handler = reader_for(guard=guard)
    reader = handler.reader
    reader.feed(INSERT[:-5])
    assert reader.phase is Phase.BODY and guard.pending_bytes == 13  # reserved in full
    reader.feed(INSERT[-5:])
    assert guard.pending_bytes == 0 and len(handler.requests) == 1


def test_a_large_body_without_room_is_refused_as_busy() -> None:
    guard = Guard(ConnectionLimits(max_pending_bytes=SMALL_BODY + 10))
    handler = reader_for(guard=guard)
    size = SMALL_BODY + 11
    handler.reader.feed(b"POST /kv/insert HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size)
    assert handler.refusals == [
        (
            503,
            "server busy: too many request bytes in progress "
            f"(max_pending_bytes {SMALL_BODY + 10}); retry later",
            RETRY,
        )
    ]
    assert guard.refused_bodies.count == 1 and guard.pending_bytes == 0


def test_a_large_body_begun_while_the_connection_is_paused_is_read_later_not_refused() -> None:
    # Reading paused (its earlier writes hold the room): the body comes once they are
    # answered; refusing it would close a well-behaved pipelining client.
    guard = Guard(ConnectionLimits(max_pending_bytes=SMALL_BODY + 10))
    size = SMALL_BODY + 11
    head = b"POST /kv/insert HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size
    handler = reader_for(guard=guard)
    handler.reader.paused = True
    handler.reader.feed(head)
    assert handler.refusals == [] and guard.pending_bytes == size
    # Not yet paused, but with writes of its own to wait for: it waits likewise.
    guard = Guard(ConnectionLimits(max_pending_bytes=SMALL_BODY + 10))
    handler = reader_for(guard=guard)
    handler.waits = True
    handler.reader.feed(head)
    assert handler.refusals == [] and guard.pending_bytes == size


def test_two_authorization_headers_are_no_credential() -> None:
    handler = reader_for()
    handler.reader.feed(GET.replace(b"Host: x\r\n", b"Authorization: Bearer t\r\n" * 2))
    handler.reader.feed(GET.replace(b"Host: x\r\n", b"Authorization: Bearer t\r\n"))
    assert [headers[1] for headers in handler.headers] == [REPEATED, b"Bearer t"]


def test_expect_100_continue_asks_for_the_interim_reply_and_others_are_refused() -> None:
    handler = reader_for()
    handler.reader.feed(INSERT.replace(b"Host: x\r\n", b"Expect: 100-continue\r\n"))
    assert handler.continues == 1 and len(handler.requests) == 1
    handler = reader_for()
    handler.reader.feed(INSERT.replace(b"Host: x\r\n", b"Expect: something-else\r\n"))
    assert handler.refusals == [(417, "only 'Expect: 100-continue' is understood", b"")]
    assert handler.continues == 0 and handler.requests == []


@pytest.mark.parametrize(
    ("version", "refusals", "bare"),
    [
        (b"2.0", [(505, "HTTP/2.0 is not supported; use HTTP/1.1", b"")], []),
        (b"0.9", [], [b'{"success":"false","error":"HTTP/0.9 is not supported; use HTTP/1.1"}']),
    ],
)
def test_other_http_versions_are_refused(version, refusals, bare) -> None:
    handler = reader_for()
    handler.reader.feed(b"GET /kv/get?key=a HTTP/" + version + b"\r\n\r\n")
    assert (handler.refusals, handler.bare, handler.requests) == (refusals, bare, [])
    assert handler.reader.closing is (version == b"0.9")  # no status line: closed at once


def test_malformed_bytes_are_refused() -> None:
    handler = reader_for()
    handler.reader.feed(b"GET /kv/get HTTP/1.1\r\nBad Header\r\n\r\n")
    assert [status for status, _, _ in handler.refusals] == [400]
    assert handler.refusals[0][1].startswith("malformed HTTP request: ")


def test_an_upgrade_hands_over_the_bytes_read_after_it() -> None:
    handler = reader_for()
    reader = handler.reader
    reader.feed(
        b"GET /kvrepl HTTP/1.1\r\nUpgrade: pbkv-repl/1\r\nConnection: Upgrade\r\n\r\n\x00\x01"
    )
    assert handler.upgrades == [b"\x00\x01"] and handler.requests == []
    assert reader.upgrade and reader.url == b"/kvrepl"


def test_over_max_clients_only_an_upgrade_is_read() -> None:
    handler = reader_for(guard=Guard(ConnectionLimits(max_clients=7)))
    handler.reader.upgrade_only = True
    handler.reader.feed(GET)
    assert handler.refusals == [(503, "too many client connections (max_clients 7)", RETRY)]
    assert handler.requests == []


def test_nothing_is_read_once_closing_or_closed() -> None:
    handler = reader_for()
    reader = handler.reader
    reader.closing = True
    reader.feed(GET)
    assert handler.requests == [] and reader.phase is Phase.IDLE
    reader.close()
    reader.feed(GET)
    assert reader.parser is None and reader.body == []


def test_bodies_that_wait_for_room_stop_at_twice_max_pending_bytes() -> None:
    size = SMALL_BODY + 11
    head = b"POST /kv/insert HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size
    guard = Guard(ConnectionLimits(max_pending_bytes=2 * size + 10))
    waiting = []
    for _ in range(5):  # connections with writes of their own pending
        handler = reader_for(guard=guard)
        handler.waits = True
        handler.reader.feed(head)
        waiting.append(handler)
    # Two fit under the bound, two more wait in the second one, then 503.
    assert [len(handler.refusals) for handler in waiting] == [0, 0, 0, 0, 1]
    assert guard.pending_bytes == 4 * size


@pytest.mark.parametrize(
    "spell",
    [bytes.lower, bytes.title, bytes.upper, lambda name: name.swapcase().title().swapcase()],
    ids=["lower", "title", "upper", "mixed"],
)
def test_header_names_are_read_in_any_case(spell) -> None:
    """The usual spellings are looked up, any other is lowered: all read alike, and a
    header that is not watched (Host) changes nothing whatever its case."""
    names = [b"host", b"content-type", b"authorization", b"origin", b"idempotency-key"]
    host, content_type, authorization, origin, ident = map(spell, names)
    handler = reader_for()
    handler.reader.feed(
        b"POST /kv/insert HTTP/1.1\r\n%b: x\r\n%b: text/plain\r\n%b: Bearer t\r\n"
        b"%b: http://a\r\n%b: k-1\r\nContent-Length: 0\r\n\r\n"
        % (host, content_type, authorization, origin, ident)
    )
    assert handler.refusals == []
    assert handler.headers == [(b"text/plain", b"Bearer t", True)]
    assert handler.reader.idempotency_key == b"k-1"
