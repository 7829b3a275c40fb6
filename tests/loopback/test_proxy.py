"""The fault-injecting TCP proxy, against a tiny echo server."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from pbkv.testing.proxy import FaultProxy
from tests.support.harness import wait_for

HOST = "127.0.0.1"


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.server.connections += 1  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            self.server.resets += 1  # type: ignore[attr-defined]


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__((HOST, 0), _Echo)
        self.connections = 0
        self.resets = 0

    @property
    def port(self) -> int:
        return self.server_address[1]


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    with FaultProxy(HOST, 0, HOST, echo.port) as running:
        yield running


def connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(proxy.address, timeout=timeout)


def receive(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes (fails on EOF)."""
    chunks = bytearray()
    while len(chunks) < size:
        data = sock.recv(size - len(chunks))
        assert data, f"EOF after {len(chunks)} of {size} bytes"
        chunks += data
    return bytes(chunks)


def round_trip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    return receive(sock, len(payload))


def nothing_arrives(sock: socket.socket, within: float = 0.3) -> bool:
    """True if no byte and no EOF arrives in the next ``within`` seconds."""
    sock.settimeout(within)
    try:
        sock.recv(1)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(5.0)
    return False


def test_forwards_both_ways_and_counts_bytes(proxy: FaultProxy, echo: EchoServer):
    payload = os.urandom(1 << 20)
    with connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert receive(sock, len(payload)) == payload
        sender.join()
    assert proxy.port != 0
    wait_for(lambda: proxy.active_connections == 0, 5, "the connection to close")
    stats = proxy.stats()
    assert stats["up_bytes_forwarded"] == stats["down_bytes_forwarded"] == len(payload)
    assert stats["up_bytes_received"] == len(payload)
    assert stats["up_bytes_dropped"] == stats["down_bytes_dropped"] == 0
    assert stats["connections_accepted"] == stats["connections_proxied"] == 1
    assert echo.connections == 1


def test_several_connections_at_once(proxy: FaultProxy):
    sockets = [connect(proxy) for _ in range(5)]
    try:
        for i, sock in enumerate(sockets):
            assert round_trip(sock, b"hello %d" % i) == b"hello %d" % i
        assert proxy.active_connections == 5
    finally:
        for sock in sockets:
            sock.close()
    wait_for(lambda: proxy.active_connections == 0, 5, "the connections to close")


def test_delay_is_added_to_each_direction(proxy: FaultProxy):
    with connect(proxy) as sock:
        started = time.monotonic()
        round_trip(sock, b"warm-up")
        baseline = time.monotonic() - started
        proxy.up.delay = 0.2
        started = time.monotonic()
        assert round_trip(sock, b"one") == b"one"
        up_only = time.monotonic() - started
        proxy.down.delay = 0.1
        started = time.monotonic()
        assert round_trip(sock, b"two") == b"two"
        both = time.monotonic() - started
        proxy.up.delay = proxy.down.delay = 0
        started = time.monotonic()
        round_trip(sock, b"three")
        none = time.monotonic() - started
    assert 0.2 <= up_only < 0.2 + baseline + 0.5
    assert 0.3 <= both < 0.3 + baseline + 0.5
    assert none < 0.2


def test_delay_keeps_the_order_of_chunks(proxy: FaultProxy):
    proxy.up.delay = 0.05
    with connect(proxy) as sock:
        parts = [b"%04d;" % i for i in range(200)]
        for part in parts:
            sock.sendall(part)
        assert receive(sock, sum(map(len, parts))) == b"".join(parts)


def test_negative_delay_and_rate_are_refused(proxy: FaultProxy):
    with pytest.raises(ValueError):
        proxy.up.delay = -1
    with pytest.raises(ValueError):
        proxy.down.rate = 0


def test_rate_limits_the_throughput(proxy: FaultProxy):
    payload = os.urandom(100_000)
    with connect(proxy) as sock:
        proxy.down.rate = 200_000  # bytes per second: 0.5 s for the payload
        started = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert receive(sock, len(payload)) == payload
        limited = time.monotonic() - started
        sender.join()
        proxy.down.rate = None
        started = time.monotonic()
        assert round_trip(sock, payload) == payload
        unlimited = time.monotonic() - started
    assert 0.4 <= limited < 2.0
    assert unlimited < 0.3


def test_drop_swallows_bytes_and_keeps_the_connection(proxy: FaultProxy):
    with connect(proxy) as sock:
        assert round_trip(sock, b"before") == b"before"
        proxy.down.drop = True
        sock.sendall(b"lost echo")
        wait_for(lambda: proxy.down.bytes_dropped == len(b"lost echo"), 5, "the echo dropped")
        assert nothing_arrives(sock)
        proxy.down.drop = False
        assert round_trip(sock, b"after") == b"after"
        proxy.up.drop = True
        sock.sendall(b"lost request")
        wait_for(lambda: proxy.up.bytes_dropped == len(b"lost request"), 5, "request dropped")
        assert nothing_arrives(sock)
        proxy.heal()
        assert round_trip(sock, b"healed") == b"healed"
    assert proxy.connections_proxied == 1


def test_partition_drops_both_ways(proxy: FaultProxy):
    with connect(proxy) as sock:
        proxy.partition()
        sock.sendall(b"nobody hears this")
        wait_for(lambda: proxy.up.bytes_dropped > 0, 5, "the bytes to be dropped")
        assert nothing_arrives(sock)
        assert proxy.up.drop and proxy.down.drop
        proxy.heal()
        assert round_trip(sock, b"back") == b"back"


def test_a_close_during_a_drop_arrives_after_it(proxy: FaultProxy):
    with connect(proxy) as sock:
        assert round_trip(sock, b"x") == b"x"
        proxy.up.drop = True
        sock.shutdown(socket.SHUT_WR)  # the echo server would close on this FIN
        assert nothing_arrives(sock)
        proxy.up.drop = False
        sock.settimeout(5.0)
        assert sock.recv(1) == b""  # the FIN went through, the server closed


def test_cut_resets_connections_and_refuses_new_ones(proxy: FaultProxy, echo: EchoServer):
    sock = connect(proxy)
    try:
        assert round_trip(sock, b"ping") == b"ping"
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"x")
            sock.recv(1)
    finally:
        sock.close()
    with pytest.raises(ConnectionRefusedError):
        connect(proxy).close()
    wait_for(lambda: echo.resets == 1, 5, "the echo server to see the reset")
    assert proxy.active_connections == 0
    proxy.heal()
    with connect(proxy) as again:
        assert round_trip(again, b"pong") == b"pong"


def test_unreachable_target_resets_the_client():
    with socket.socket() as placeholder:
        placeholder.bind((HOST, 0))
        dead_port = placeholder.getsockname()[1]  # nothing listens on it
        with FaultProxy(HOST, 0, HOST, dead_port) as proxy:
            # The proxy learns at once that the target is dead: its reset may reach
            # the client before connect() has returned (a busy machine), or later.
            with pytest.raises(ConnectionResetError), connect(proxy) as sock:
                sock.settimeout(5.0)
                sock.sendall(b"x")
                sock.recv(1)
            assert proxy.connect_failures == 1  # counted before the reset is sent
            assert proxy.connections_proxied == 0


def _flipped(sent: bytes, received: bytes) -> list[tuple[int, int]]:
    return [(i, a ^ b) for i, (a, b) in enumerate(zip(sent, received, strict=True)) if a != b]


@pytest.mark.parametrize("direction", ["up", "down"])
def test_corrupt_next_flips_exactly_one_bit_once(proxy: FaultProxy, direction: str):
    payload = bytes(range(256)) * 40  # 10240 bytes
    with connect(proxy) as earlier:  # already proxied when armed: left alone
        assert round_trip(earlier, b"open") == b"open"
        proxy.corrupt_next(direction, after_bytes=5000, bit=3)  # type: ignore[arg-type]
        assert round_trip(earlier, payload) == payload
        with connect(proxy) as target:
            echoed = round_trip(target, payload)
        assert _flipped(payload, echoed) == [(5000, 1 << 3)]
        with connect(proxy) as later:
            assert round_trip(later, payload) == payload
    assert proxy.corruptions == 1


def test_corrupt_offset_counts_from_the_start_of_the_connection(proxy: FaultProxy):
    proxy.corrupt_next("up", after_bytes=3)
    with connect(proxy) as sock:
        assert round_trip(sock, b"abc") == b"abc"  # bytes 0..2
        assert round_trip(sock, b"def") == bytes([ord("d") ^ 1]) + b"ef"  # byte 3
    assert proxy.corruptions == 1


def test_corrupt_next_validates_its_arguments(proxy: FaultProxy):
    with pytest.raises(ValueError):
        proxy.corrupt_next("sideways", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        proxy.corrupt_next("up", -1)
    with pytest.raises(ValueError):
        proxy.corrupt_next("up", 1, bit=8)


def test_close_resets_open_connections(echo: EchoServer):
    proxy = FaultProxy(HOST, 0, HOST, echo.port).start()
    sock = connect(proxy)
    try:
        assert round_trip(sock, b"hi") == b"hi"
        proxy.close()
        with pytest.raises(ConnectionResetError):
            sock.sendall(b"x")
            sock.recv(1)
    finally:
        sock.close()
        proxy.close()  # a second close does nothing
    with pytest.raises(RuntimeError):
        proxy.cut()
