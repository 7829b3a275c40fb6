"""Every resource bound on real server processes: each test would fail without its guard."""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time

import orjson
import pytest

from pbkv.client import Client, PbkvError
from pbkv.http import Limits
from tests.support.forge import Writer
from tests.support.harness import Pair, wait_for
from tests.support.raw_http import JSON_TYPE, Raw, assert_error, exchange, request

FORM = "application/x-www-form-urlencoded"


def rss_mib(pair: Pair, role: str = "primary") -> float:
    with open(f"/proc/{pair.pid(role)}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def status(pair: Pair, role: str = "primary") -> dict:
    return wait_for(lambda: pair.status(role, timeout=5.0), 30, what=f"{role} status")


def partial_body(address: tuple[str, int], declared: int, sent: int) -> socket.socket:
    """A connection that declares ``declared`` body bytes, sends ``sent`` of them and stalls."""
    sock = socket.create_connection(address)
    sock.sendall(
        b"POST /kv/insert HTTP/1.1\r\nHost: t\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (FORM.encode(), declared)
        + b"key=a&value="
    )
    chunk = b"v" * 65536
    left = sent
    while left > 0:
        sock.sendall(chunk[:left])
        left -= len(chunk)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        while data := sock.recv(65536):
            del data
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def read_reply(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# -- memory freed on close ----------------------------------------------------------------
def test_rss_returns_near_baseline_after_500_partial_bodies_close(make_pair):
    # Room for all 500 bodies, so the memory is really taken (1.5 GB) and must come back.
    pair = make_pair(standalone="true", max_pending_bytes=str(2 * 1024**3))
    pair.start("primary")
    address = pair.address["primary"]
    baseline = rss_mib(pair)
    socks = [partial_body(address, 3_100_000, 3_000_000) for _ in range(500)]
    wait_for(lambda: status(pair)["pending_request_bytes"] >= 500 * 3_100_000, 60)
    held = rss_mib(pair)
    assert held > baseline + 1000, (baseline, held)  # the bodies were really buffered
    for sock in socks:
        sock.close()
    wait_for(lambda: status(pair)["clients"] <= 1, 60, what="the connections to close")
    # The allocator keeps some pages of freed small objects (protocol objects, parser
    # state, header strings) and Python's own arenas: 64 MiB is generous for that and
    # far below the 1.5 GB the bodies took (without the fixes over 200 MiB stayed).
    after = wait_for(lambda: (r := rss_mib(pair)) < baseline + 64 and r, 20, what="RSS to drop")
    assert after < baseline + 64, (baseline, held, after)


# -- backpressure -----------------------------------------------------------------------------
def test_pipelined_dumps_never_read_hold_only_a_bounded_buffer(make_pair):
    pair = make_pair(standalone="true", send_timeout="600")
    pair.start("primary")
    address = pair.address["primary"]
    with pair.client() as client:
        for i in range(5000):
            client.insert(f"key-{i:06d}", "v" * 100)
    expected = sorted(pair.dump("primary").items())
    baseline = rss_mib(pair)
    sock = socket.create_connection(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(request("GET", "/kvman/dump") * 300)  # 300 x 0.6 MB unread
    # The server produces only as fast as we read: watch it for two seconds.
    deadline = time.monotonic() + 2.0
    worst = 0.0
    while time.monotonic() < deadline:
        worst = max(worst, rss_mib(pair) - baseline)
        assert pair.status("primary") is not None  # other clients are still served
    assert worst < 40, worst  # without backpressure: 300 dumps, 190 MB
    # Reading drains everything: 300 complete, identical dumps in order.
    sock.settimeout(30)
    reader = sock.makefile("rb")
    for _ in range(300):
        line = reader.readline()
        assert line == b"HTTP/1.1 200 OK\r\n", line
        headers = {}
        while (line := reader.readline()) != b"\r\n":
            name, value = line.decode().split(":", 1)
            headers[name.lower()] = value.strip()
        assert headers["transfer-encoding"] == "chunked"
        body = b""
        while (size := int(reader.readline(), 16)) > 0:
            body += reader.read(size)
            assert reader.read(2) == b"\r\n"
        assert reader.read(2) == b"\r\n"
        assert sorted(map(tuple, json.loads(body))) == expected
    sock.close()


def test_a_client_that_never_reads_is_closed_after_send_timeout(make_pair):
    pair = make_pair(standalone="true", send_timeout="2")
    pair.start("primary")
    with pair.client() as client:
        for i in range(5000):
            client.insert(f"key-{i:06d}", "v" * 100)
    sock = socket.create_connection(pair.address["primary"])
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.sendall(request("GET", "/kvman/dump") * 100)
    wait_for(lambda: status(pair)["connections_timed_out"] >= 1, 15, what="the send timeout")
    wait_for(lambda: status(pair)["clients"] == 1, 10)
    sock.close()


# -- timeouts ---------------------------------------------------------------------------------
def test_a_head_sent_a_byte_at_a_time_gets_408_after_header_timeout(make_pair):
    pair = make_pair(standalone="true", header_timeout="1.5", idle_timeout="600")
    pair.start("primary")
    sock = socket.create_connection(pair.address["primary"])
    started = time.monotonic()
    head = b"GET /kv/get?key=a HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"x" * 1000
    sock.settimeout(0.2)
    reply = b""
    for byte in head:  # one byte every 0.2 s at most: the server must cut it off
        try:
            sock.sendall(bytes([byte]))
            reply += sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if reply:
            break
    elapsed = time.monotonic() - started
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert b"request head not received within 1.5 s" in reply
    assert 1.4 < elapsed < 5.0, elapsed
    assert closed_by_server(sock) or read_reply(sock, 5) == b""
    sock.close()


def test_a_stalled_body_gets_408_after_body_timeout(make_pair):
    pair = make_pair(standalone="true", body_timeout="1.5")
    pair.start("primary")
    sock = partial_body(pair.address["primary"], 1000, 10)
    reply = read_reply(sock, 10)
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert b"request body not received within 1.5 s" in reply
    sock.close()


def test_idle_timeout_counts_from_the_last_complete_request(make_pair):
    pair = make_pair(standalone="true", idle_timeout="2", header_timeout="60")
    pair.start("primary")
    address = pair.address["primary"]
    idle = socket.create_connection(address)
    idle.sendall(request("GET", "/kvman/countkey"))
    assert b'{"result":"0"}' in idle.recv(65536)
    trickle = socket.create_connection(address)
    trickle.sendall(b"GET /kvman/countkey HTTP/1.1\r\n")
    started = time.monotonic()
    # The idle connection closes; the one in the middle of a request does not (its
    # header timeout is long), although it sent nothing more either.
    assert read_reply(idle, 10) == b""
    assert time.monotonic() - started < 6
    trickle.sendall(b"Host: t\r\n\r\n")
    trickle.settimeout(5)
    assert b'{"result":"0"}' in trickle.recv(65536)
    idle.close()
    trickle.close()


# -- memory caps ------------------------------------------------------------------------------
def test_large_bodies_past_max_pending_bytes_are_refused_at_once(make_pair):
    pair = make_pair(standalone="true", max_pending_bytes=str(8 * 1024 * 1024))
    pair.start("primary")
    address = pair.address["primary"]
    held = [partial_body(address, 3_000_000, 100_000) for _ in range(2)]
    wait_for(lambda: status(pair)["pending_request_bytes"] >= 6_000_000, 10)
    third = partial_body(address, 3_000_000, 0)
    reply = read_reply(third, 5)  # refused before its body: no timeout involved
    assert reply.startswith(b"HTTP/1.1 503 "), reply
    assert b"max_pending_bytes" in reply and b"Retry-After: 1" in reply
    # Small requests still pass while the large bodies are held.
    with pair.client() as client:
        assert client.insert("small", "value")
    assert status(pair)["bodies_refused"] == 1
    for sock in held + [third]:
        sock.close()
    wait_for(lambda: status(pair)["pending_request_bytes"] == 0, 10)


def test_writes_past_max_memory_are_refused_and_deletes_still_pass(make_pair):
    limit = 50_000
    pair = make_pair(standalone="true", max_memory=str(limit))
    pair.start("primary")
    with pair.client() as client:
        inserted = 0
        with pytest.raises(PbkvError) as refused:
            while True:
                client.insert(f"key-{inserted}", "v" * 100)
                inserted += 1
        assert refused.value.status == 507
        assert f"max_memory reached ({limit} bytes)" in str(refused.value)
        assert 100 < inserted < limit // 100
        assert client.get(f"key-{inserted}") is None  # the refused write was applied nowhere
        state = client.status()
        assert state["max_memory"] == limit
        assert limit - 400 < state["memory_bytes"] <= limit
        assert client.delete("key-0") == "v" * 100
        assert client.insert("key-0", "v" * 100)  # room again
        assert client.update("key-0", "short")  # shrinking is always allowed
    metrics = Client(*pair.address["primary"]).status()
    assert metrics["memory_bytes"] <= limit


# -- connections ------------------------------------------------------------------------------
def test_max_clients_refuses_extra_clients_but_not_the_replication_channel(make_pair):
    pair = make_pair(max_clients="20")
    pair.start_both()
    backup = pair.address["backup"]
    held = [socket.create_connection(backup) for _ in range(20)]
    for sock in held:  # each one answered: all 20 are counted clients
        sock.sendall(request("GET", "/kvman/countkey"))
        sock.settimeout(5)
        assert b'{"result":"0"}' in sock.recv(65536)
    extra = [socket.create_connection(backup) for _ in range(40)]
    for sock in extra[:5]:
        sock.sendall(request("GET", "/kvman/countkey"))
        reply = read_reply(sock, 5)
        assert reply.startswith(b"HTTP/1.1 503 "), reply
        assert b"too many client connections (max_clients 20)" in reply
    # The primary restarts: its channel to the backup still gets through.
    pair.kill("primary")
    pair.start("primary")
    pair.wait_stage("primary", "in_sync", 20)
    with pair.client() as client:
        assert client.insert("after", "restart")
    log = pair.log("backup")
    assert 1 <= log.count("max_clients (20) reached") <= 3, log  # once per interval
    for sock in held + extra:
        sock.close()


def test_the_open_file_limit_fits_max_clients(standalone):
    with open(f"/proc/{standalone.pid('primary')}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    soft = int(line.split()[3])
    assert soft >= 10_000 + 32


# -- HTTP gaps --------------------------------------------------------------------------------
def test_expect_100_continue(standalone):
    address = standalone.address["primary"]
    body = b"key=expect&value=continue"
    with Raw(address) as conn:
        conn.send(
            b"POST /kv/insert HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
            b"Content-Type: %s\r\nContent-Length: %d\r\n\r\n" % (FORM.encode(), len(body))
        )
        assert conn.reader.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert conn.reader.readline() == b"\r\n"
        conn.send(body)
        assert conn.reply().json == {"success": "true"}
    # Too large: the final answer at once, without waiting for the body.
    with Raw(address) as conn:
        conn.send(
            b"POST /kv/insert HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
            b"Content-Length: 99999999\r\n\r\n"
        )
        assert_error(conn.reply(), 413)
    reply = exchange(
        address,
        b"POST /kv/insert HTTP/1.1\r\nHost: t\r\nExpect: magic\r\nContent-Length: 3\r\n\r\nk=v",
    )
    assert_error(reply, 417)


def test_http_0_9_gets_a_bare_body_and_other_versions_505(standalone):
    address = standalone.address["primary"]
    sock = socket.create_connection(address)
    sock.sendall(b"GET /kv/get?key=a\r\n\r\n")
    reply = read_reply(sock, 5)
    assert not reply.startswith(b"HTTP/"), reply
    assert json.loads(reply)["error"] == "HTTP/0.9 is not supported; use HTTP/1.1"
    sock.close()
    reply = exchange(address, b"GET /kv/get?key=a HTTP/2.0\r\nHost: t\r\n\r\n")
    assert "HTTP/2.0 is not supported" in assert_error(reply, 505)


def test_duplicate_json_names_and_bad_percent_escapes_are_refused(make_pair):
    pair = make_pair(standalone="true", errors="http")  # the statuses themselves
    pair.start("primary")
    address = pair.address["primary"]
    body = b'{"key":"dup","value":"a","value":"b"}'
    reply = exchange(address, request("POST", "/kv/insert", body, "application/json"))
    assert "'value' given more than once" in assert_error(reply, 400)
    reply = exchange(address, request("POST", "/kv/insert", b"key=a%zz&value=b"))
    assert "percent-escape" in assert_error(reply, 400)
    with Client(*address) as client:
        assert client.get("dup") is None and client.get("a%zz") is None
    # The default course mode refuses them the same way, as 200 with the course failure.
    pair.stop("primary")
    pair.configure(errors="course")
    pair.start("primary")
    reply = exchange(address, request("POST", "/kv/insert", body, "application/json"))
    assert reply.status == 200 and reply.body == b'{"success":"false"}'
    assert reply.headers["x-pbkv-status"] == "400"


# -- streamed dumps ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ten_dumps_of_a_million_pairs_with_a_writer_running(make_pair):
    from bench.bulk import load_pbkv

    pair = make_pair()
    pair.start_both()
    host, port = pair.address["primary"]
    keys = 1_000_000
    load_pbkv(host, port, keys)
    failures: list[str] = []
    written = 0
    stop = threading.Event()

    def writer() -> None:
        nonlocal written
        with Client(host, port, timeout=10) as client:
            while not stop.is_set():
                try:
                    assert client.insert(f"w-{written}", "x")
                    written += 1
                except Exception as exc:  # noqa: BLE001 - every failure is reported
                    failures.append(repr(exc))

    def dump(role: str, results: list[int]) -> None:
        # The servers are measured, not these readers: they yield the CPU to them.
        os.nice(10)  # this thread only (Linux)
        connection = http.client.HTTPConnection(*pair.address[role], timeout=60)
        connection.request("GET", "/kvman/dump")
        reply = connection.getresponse()
        assert reply.status == 200 and reply.getheader("Transfer-Encoding") == "chunked"
        results.append(len(orjson.loads(reply.read())))
        connection.close()

    # The readers yield the CPU to the servers; where we may (root), lift the servers
    # above other work on the machine too.
    for role in ("primary", "backup"):
        try:
            os.setpriority(os.PRIO_PROCESS, pair.pid(role), -5)
        except PermissionError:
            pass
    # Loading was heavy: start once the loop's recent lag has settled.
    wait_for(lambda: status(pair)["loop_lag_ms"] < 10, 30, what="the load's lag to pass")
    thread = threading.Thread(target=writer)
    thread.start()
    wait_for(lambda: written > 100, 10)
    worst = {"primary": 0.0, "backup": 0.0}

    def watch() -> None:  # loop_lag_ms covers 10 s: sample more often than that
        while not stop.is_set():
            for role in worst:
                if (state := pair.status(role, timeout=5)) is not None:
                    worst[role] = max(worst[role], state["loop_lag_ms"])
            stop.wait(1.0)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sizes: list[int] = []
    roles = ["primary"] * 7 + ["backup"] * 3  # dumps on the backup must not stall it either
    dumps = [threading.Thread(target=dump, args=(role, sizes)) for role in roles]
    for t in dumps:
        t.start()
    for t in dumps:
        t.join(120)
    stop.set()
    thread.join(10)
    watcher.join(10)
    turns, turns_cpu, slow, gc_pauses = {}, {}, {}, {}
    for role in worst:  # the last second of the dumps
        state = status(pair, role)
        worst[role] = max(worst[role], state["loop_lag_ms"])
        turns[role] = state["dump_turn_max_ms"]
        turns_cpu[role] = state["dump_turn_cpu_max_ms"]
        slow[role] = state["dump_turns_slow"]
        gc_pauses[role] = state["gc_pause_max_ms"]
    print("dump turns (ms)", turns, "in CPU time", turns_cpu, "loop lag (ms)", worst)
    print("turns over 20 ms of CPU", slow)
    print("longest gc pause per generation (ms)", gc_pauses)
    assert failures == []
    assert written > 100
    assert len(sizes) == 10 and all(keys <= size <= keys + written for size in sizes), sizes
    # What the dumps cost the loop: their turns (all of them together, a shard's copy
    # included) in the loop thread's CPU time, 1-8 ms at most when measured alone. A
    # dump that is not streamed (a whole million-pair reply built at once) takes
    # seconds, and a slower step makes thousands of turns slow. The thread's CPU time
    # also holds kernel work done while it ran: after the whole suite has left tens of
    # thousands of loopback connections closing, the longest turn measured 23-29 ms in
    # two runs of three, while the next ones stayed under the bound. So: at most two
    # turns over 20 ms in CPU time, none over 100 ms. On the clock, a turn and the loop
    # lag also hold the time another process had the CPU (15-50 ms measured for turns
    # of under 1 ms of CPU), so the clock gets a margin, not the design bound.
    assert slow["primary"] <= 2 and slow["backup"] <= 2, (slow, turns_cpu, gc_pauses)
    assert turns_cpu["primary"] < 100 and turns_cpu["backup"] < 100, (turns_cpu, turns)
    assert turns["primary"] < 250 and turns["backup"] < 250, (turns_cpu, turns, worst)
    assert worst["primary"] < 250 and worst["backup"] < 250, (turns_cpu, turns, worst)
    assert pair.stage("primary") == "in_sync"


def test_a_streamed_dump_reads_the_same_through_every_client(make_pair, capsys):
    import asyncio

    from pbkv.cli import escape, main
    from pbkv.client import AsyncClient

    pair = make_pair(standalone="true")
    pair.start("primary")
    host, port = pair.address["primary"]
    expected = {f"key-{i}": f"v{i} &=+%\r\n\0 😀" for i in range(5000)}  # many chunks
    with pair.client() as client:
        for key, value in expected.items():
            client.insert(key, value)
        pairs = client.dump()
        assert len(pairs) == 5000 and dict(pairs) == expected
        assert client.count() == 5000  # the connection is still usable after the stream
        assert list(client.iter_dump(block=4096)) == pairs  # read as it arrives
        assert client.count() == 5000

    async def dump_async() -> list[tuple[str, str]]:
        async with AsyncClient(host, port) as client:
            first = await client.dump()
            assert await client.count() == 5000
            return first

    assert dict(asyncio.run(dump_async())) == expected
    capsys.readouterr()
    assert main(["--host", host, "--port", str(port), "dump", "--tsv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(lines) == sorted(f"{escape(k)}\t{escape(v)}" for k, v in expected.items())
    # HTTP/1.0 has no chunked encoding: the body ends with the connection.
    sock = socket.create_connection((host, port))
    sock.sendall(b"GET /kvman/dump HTTP/1.0\r\n\r\n")
    raw = read_reply(sock, 10)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and b"chunked" not in head
    assert {k: v for k, v in json.loads(body)} == expected
    sock.close()


def test_a_dump_during_writes_holds_every_key_that_stayed(make_pair):
    pair = make_pair(standalone="true")
    pair.start("primary")
    host, port = pair.address["primary"]
    with pair.client() as client:
        for i in range(20000):
            client.insert(f"stay-{i}", "old")
    stop = threading.Event()

    def churn() -> None:  # inserts, updates and deletes all through the dump
        with Client(host, port) as client:
            i = 0
            while not stop.is_set():
                client.insert(f"new-{i}", "x")
                client.update(f"stay-{i % 20000}", "new")
                client.delete(f"new-{i}")
                i += 1

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        with Client(host, port) as client:
            for _ in range(3):
                pairs = client.dump()
                keys = [key for key, _ in pairs]
                assert len(keys) == len(set(keys))  # no key twice
                stayed = {key: value for key, value in pairs if key.startswith("stay-")}
                assert len(stayed) == 20000 and set(stayed.values()) <= {"old", "new"}
    finally:
        stop.set()
        writer.join(10)


def inserts_counted(pair: Pair) -> int:
    host, port = pair.address["primary"]
    text = exchange((host, port), request("GET", "/metrics")).body.decode()
    line = next(
        li for li in text.splitlines() if li.startswith("pbkv_requests_total{") and '"insert"' in li
    )
    return int(float(line.split()[-1]))


def test_a_connection_with_max_pipeline_unanswered_requests_is_not_read(make_pair):
    import signal

    pair = make_pair(max_pipeline="50", ack_timeout="5", peer_timeout="5")
    pair.start_both()
    pair.signal("backup", signal.SIGSTOP)  # no write is answered while it is stopped
    try:
        value = "v" * 1000
        body = f"key={{}}&value={value}"
        sock = socket.create_connection(pair.address["primary"])
        data = b"".join(request("POST", "/kv/insert", body.format(i).encode()) for i in range(3000))
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        deadline = time.monotonic() + 2.0
        worst = 0
        while time.monotonic() < deadline:
            worst = max(worst, inserts_counted(pair))
        # 50 unanswered, plus the rest of the chunk being parsed when reading paused.
        assert 50 <= worst < 1000, worst
    finally:
        pair.signal("backup", signal.SIGCONT)
    sock.settimeout(30)
    reader = sock.makefile("rb")
    answered = 0
    while answered < 3000:  # every request is read and answered in the end
        line = reader.readline()
        assert line.startswith(b"HTTP/1.1 "), line
        length = 0
        while (line := reader.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        reader.read(length)
        answered += 1
    sender.join(10)
    sock.close()


# -- parameters and unanswered writes -------------------------------------------------------------
def many_parameters(size: int, as_json: bool) -> bytes:
    """``n0=&n1=&...`` (or a JSON object of such members) of at most ``size`` bytes."""
    if as_json:
        members = b",".join(b'"n%d":""' % i for i in range(size // 6))
        return b"{" + members[: members.rindex(b",", 0, size - 2)] + b"}"
    pairs = b"&".join(b"n%d=" % i for i in range(size // 4))
    return pairs[: pairs.rindex(b"&", 0, size)]


def test_bodies_of_half_a_million_parameters_do_not_stall_the_loop(make_pair):
    # Each body decoded cost the loop 0.6 s (form) or 0.1-0.3 s (JSON): six at once
    # took the loop lag to 3.2 s, the backup declared the primary silent and writes
    # were answered "replication failed".
    pair = make_pair()
    pair.start_both()
    address = pair.address["primary"]
    limit = Limits().max_body_bytes
    bodies = [
        (many_parameters(limit - 1000, as_json), JSON_TYPE if as_json else FORM)
        for as_json in (False, True)
    ]
    assert all(3_000_000 < len(body) <= limit for body, _ in bodies)
    wait_for(lambda: status(pair)["loop_lag_ms"] < 50, 30, what="the start's lag to pass")
    replies: list[bytes] = []

    def attack(body: bytes, content_type: str) -> None:
        with socket.create_connection(address) as sock:
            sock.sendall(request("POST", "/kv/insert", body, content_type, ("Connection: close",)))
            replies.append(read_reply(sock, 30))

    with Writer(address) as writer:
        wait_for(lambda: writer.acknowledged > 20, 10, what="the writer to run")
        attackers = [threading.Thread(target=attack, args=bodies[n % 2]) for n in range(6)]
        for thread in attackers:
            thread.start()
        for thread in attackers:
            thread.join(60)
        lag = status(pair)["loop_lag_ms"]  # the worst of the last 10 s
    print("loop lag (ms)", lag, "writer's longest gap (s)", writer.longest_gap)
    assert writer.refused == [] and "replication failed" not in pair.log("primary")
    assert writer.longest_gap < 1.0
    assert lag < 200, lag  # 450 ms and more when the bodies were decoded
    assert len(replies) == 6
    for reply in replies:  # course mode: the course's failure, the reason in headers
        assert reply.startswith(b"HTTP/1.1 200 ") and b"\r\nX-Pbkv-Status: 400\r\n" in reply
        assert (
            reply.endswith(b'{"success":"false"}') and b" 16 " in reply and b"parameters" in reply
        )
    assert pair.stage("primary") == "in_sync"


def test_pipelined_large_writes_count_until_answered_and_rss_stays_bounded(make_pair):
    # Four connections each pipelining 100 inserts of 400 KB while the backup does not
    # answer: complete requests were read up to max_pipeline (1,024) per connection,
    # outside max_pending_bytes, all of them held in memory (160 MB and more).
    import signal

    pair = make_pair(max_pending_bytes=str(8 * 1024 * 1024), ack_timeout="60", peer_timeout="60")
    pair.start_both()
    address = pair.address["primary"]
    baseline = rss_mib(pair)
    value = "v" * 400_000
    pipelines = [
        b"".join(
            request("POST", "/kv/insert", f"key=c{c}-{i}&value={value}".encode())
            for i in range(100)
        )
        for c in range(4)
    ]
    socks = [socket.create_connection(address) for _ in pipelines]
    senders = [
        threading.Thread(target=sock.sendall, args=(data,))
        for sock, data in zip(socks, pipelines, strict=True)
    ]
    pair.signal("backup", signal.SIGSTOP)  # no write is answered while it is stopped
    try:
        # A small write first on each connection: past the bound, a connection with
        # writes of its own unanswered waits for them; one without any would have its
        # large body refused (503) instead.
        for c, sock in enumerate(socks):
            sock.sendall(request("POST", "/kv/insert", f"key=c{c}&value=first".encode()))
        wait_for(lambda: inserts_counted(pair) == 4, 20, what="the first writes")
        for sender in senders:
            sender.start()
        # Watch the primary for three seconds (the whole burst took under one).
        deadline = time.monotonic() + 3.0
        worst = held = 0
        while time.monotonic() < deadline:
            worst = max(worst, rss_mib(pair) - baseline)
            held = max(held, status(pair)["pending_request_bytes"])
        print(f"RSS grew {worst:.1f} MiB; pending_request_bytes at most {held}")
        # 8 MiB of writes held, twice (the values and the batches sent to the backup),
        # plus what each connection had read when it was paused.
        assert worst < 60, worst
        assert 8 * 1024 * 1024 < held < 8 * 1024 * 1024 + 4 * Limits().max_body_bytes, held
    finally:
        pair.signal("backup", signal.SIGCONT)
    for sock in socks:  # every write is read and acknowledged in the end
        sock.settimeout(60)
        reader = sock.makefile("rb")
        for _ in range(101):
            assert reader.readline() == b"HTTP/1.1 200 OK\r\n"
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert reader.read(length) == b'{"success":"true"}'
    for sender in senders:
        sender.join(10)
    for sock in socks:
        sock.close()
    assert status(pair)["pending_request_bytes"] == 0
    assert pair.dump("backup").keys() >= {f"c{c}-99" for c in range(4)}
