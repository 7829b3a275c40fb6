"""The client API of a real server process, byte for byte.

A standalone primary (it answers writes without a backup) in the ``http`` error mode
is started once for the module with the real ``bin/start_server``; the tests talk to
it over raw sockets so that what goes over the wire is exactly what is written here,
and compare whole replies as the course clients do.  Shutdown and start-up tests use
their own pairs.  The default ``course`` mode has its own tests in test_course_mode.py.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from pbkv.client import Client
from pbkv.http import Limits
from tests.support.harness import (
    Pair,
    _alive,
    _bindable,
    process_age,
    standalone_server,
    wait_for,
)
from tests.support.raw_http import (
    ERRORS,
    FORM,
    JSON_TYPE,
    Raw,
    Reply,
    assert_error,
    exchange,
    request,
)

LIMITS = Limits()
MAX_KEY = LIMITS.max_key_bytes
MAX_VALUE = LIMITS.max_value_bytes

# Strings that break naive encoders, decoders or reply builders.
TRICKY = [
    "a&b=c",
    "key=value&key=other",
    "1+1=2",
    "100%",
    "%41%",
    "%",
    "  spaced   out  ",
    "line\r\nbreak\n",
    "nul\0byte",
    "quote\"s and 'single'",
    "back\\slash\\",
    '{"json": ["in", "a", "value"]}',
    "emoji 😀🎉 and ключ",
    "\u2028\u2029\t",
    "?#;/",
]


# -- raw HTTP ----------------------------------------------------------------------------------
def encode(params: dict[str, str]) -> str:
    return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items())


def kv_request(path: str, params: dict[str, str], mode: str = "form") -> bytes:
    """A request to ``path`` with its parameters in a form body, the query or JSON."""
    method = "GET" if path in ("/kv/get", "/kvman/countkey", "/kvman/dump") else "POST"
    if method == "GET" or mode == "query":
        target = f"{path}?{encode(params)}" if params else path
        return request(method, target, b"" if method == "POST" else None)
    if mode == "json":
        return request("POST", path, json.dumps(params).encode(), JSON_TYPE)
    return request("POST", path, encode(params).encode("ascii"))


def assert_json_reply(reply: Reply, status: int, body: Any) -> None:
    assert reply.status == status, reply
    assert reply.headers["content-type"] == JSON_TYPE
    assert reply.json == body


# -- the shared server -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Pair]:
    """A standalone primary with real HTTP errors."""
    yield from standalone_server(tmp_path_factory, "http-mode", errors="http")


@pytest.fixture
def address(server: Pair) -> tuple[str, int]:
    return server.address["primary"]


@pytest.fixture
def tag() -> str:
    """A prefix that keeps one test's keys apart from every other test's."""
    return f"t{uuid.uuid4().hex[:10]}-"


def count(address: tuple[str, int]) -> int:
    reply = exchange(address, request("GET", "/kvman/countkey"))
    assert reply.status == 200
    return int(reply.json["result"])


def get(address: tuple[str, int], key: str) -> dict[str, str]:
    reply = exchange(address, kv_request("/kv/get", {"key": key}))
    assert reply.status == 200
    return reply.json


def open_connections(address: tuple[str, int]) -> int:
    """Client connections the server holds, not counting the one asking."""
    with Client(*address) as client:
        return client.status()["clients"] - 1


def assert_still_serving(address: tuple[str, int], keys_before: int, tag: str) -> None:
    """A fresh client is served, reads and writes work, and nothing else was written."""
    assert count(address) == keys_before
    with Client(*address) as client:
        assert client.insert(tag + "probe", "alive") is True
        assert client.get(tag + "probe") == "alive"
        assert client.delete(tag + "probe") == "alive"
        assert client.count() == keys_before


# -- every endpoint, whole replies ----------------------------------------------------------
def test_insert_update_delete_get_replies(address, tag):
    key = tag + "k"
    with Raw(address) as conn:

        def call(path: str, params: dict[str, str]) -> Reply:
            conn.send(kv_request(path, params))
            return conn.reply()

        assert_json_reply(call("/kv/get", {"key": key}), 200, {"success": "false", "value": ""})
        assert_json_reply(call("/kv/insert", {"key": key, "value": "v1"}), 200, {"success": "true"})
        assert_json_reply(
            call("/kv/insert", {"key": key, "value": "v2"}), 200, {"success": "false"}
        )
        assert_json_reply(call("/kv/get", {"key": key}), 200, {"success": "true", "value": "v1"})
        assert_json_reply(call("/kv/update", {"key": key, "value": "v3"}), 200, {"success": "true"})
        assert_json_reply(call("/kv/get", {"key": key}), 200, {"success": "true", "value": "v3"})
        assert_json_reply(
            call("/kv/update", {"key": tag + "missing", "value": "x"}), 200, {"success": "false"}
        )
        assert_json_reply(call("/kv/delete", {"key": key}), 200, {"success": "true", "value": "v3"})
        assert_json_reply(call("/kv/delete", {"key": key}), 200, {"success": "false", "value": ""})
        assert_json_reply(call("/kv/get", {"key": key}), 200, {"success": "false", "value": ""})
        # An empty value is a value.
        assert_json_reply(call("/kv/insert", {"key": key, "value": ""}), 200, {"success": "true"})
        assert_json_reply(call("/kv/get", {"key": key}), 200, {"success": "true", "value": ""})
        assert_json_reply(call("/kv/delete", {"key": key}), 200, {"success": "true", "value": ""})


def test_countkey_and_dump(address, tag):
    before = count(address)
    mine = {f"{tag}{n}": f"value {n}" for n in range(3)}
    with Client(*address) as client:
        for key, value in mine.items():
            assert client.insert(key, value) is True
    reply = exchange(address, request("GET", "/kvman/countkey"))
    assert_json_reply(reply, 200, {"result": str(before + 3)})

    reply = exchange(address, request("GET", "/kvman/dump"))
    assert reply.status == 200
    assert reply.headers["content-type"] == JSON_TYPE
    pairs = reply.json
    assert isinstance(pairs, list) and len(pairs) == before + 3
    for pair in pairs:
        assert isinstance(pair, list) and len(pair) == 2
        assert all(isinstance(item, str) for item in pair)
    dumped = dict(pairs)
    assert len(dumped) == len(pairs), "a key appears twice in the dump"
    assert {key: dumped[key] for key in mine} == mine


def test_status(address, server):
    keys = count(address)
    reply = exchange(address, request("GET", "/kvman/status"))
    assert reply.status == 200
    assert reply.headers["content-type"] == JSON_TYPE
    status = reply.json
    assert status["role"] == "primary"
    assert status["stage"] == "in_sync"
    assert status["keys"] == keys
    assert isinstance(status["checksum"], str) and status["checksum"]
    # Seconds since this server started: more than nothing, at most the process's age.
    assert 0 < status["uptime"] <= process_age(server.pid("primary")) + 0.02
    assert status["address"] == "%s:%d" % address


def test_checksum_follows_the_content(address, tag):
    def checksum() -> str:
        return exchange(address, request("GET", "/kvman/status")).json["checksum"]

    before = checksum()
    # Without keys: a keyed write's remembered reply stays in the checksum (it covers the
    # idempotency table), after the pair itself is gone.
    with Client(*address, idempotency_keys=False) as client:
        assert client.insert(tag + "c", "x") is True
        changed = checksum()
        assert changed != before
        assert client.delete(tag + "c") == "x"
    assert checksum() == before


def test_metrics_is_prometheus_text(address):
    exchange(address, kv_request("/kv/get", {"key": "metrics-probe"}))
    reply = exchange(address, request("GET", "/metrics"))
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode("utf-8")
    assert "# TYPE pbkv_requests" in text
    assert 'pbkv_requests_total{command="get",role="primary"}' in text
    for line in text.splitlines():
        assert line.startswith("#") or len(line.rsplit(" ", 1)) == 2, line


# -- parameters ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["form", "query", "json"])
def test_tricky_strings_round_trip(address, tag, mode):
    expected: dict[str, str] = {}
    with Raw(address) as conn:
        for n, text in enumerate(TRICKY):
            key, value = f"{tag}{n}{text}", text
            conn.send(kv_request("/kv/insert", {"key": key, "value": value}, mode))
            assert_json_reply(conn.reply(), 200, {"success": "true"})
            expected[key] = value
        for key, value in expected.items():
            conn.send(kv_request("/kv/get", {"key": key}))
            assert_json_reply(conn.reply(), 200, {"success": "true", "value": value})
        # Keys that only differ in encoding-sensitive characters stay apart.
        conn.send(kv_request("/kv/get", {"key": f"{tag}0a&b"}))
        assert_json_reply(conn.reply(), 200, {"success": "false", "value": ""})

        conn.send(request("GET", "/kvman/dump"))
        dumped = dict(conn.reply().json)
        assert {key: dumped[key] for key in expected} == expected

        for key, value in expected.items():
            conn.send(kv_request("/kv/update", {"key": key, "value": value + "!"}, mode))
            assert_json_reply(conn.reply(), 200, {"success": "true"})
            conn.send(kv_request("/kv/delete", {"key": key}, mode))
            assert_json_reply(conn.reply(), 200, {"success": "true", "value": value + "!"})


def test_empty_value_every_way(address, tag):
    for mode in ("form", "query", "json"):
        key = f"{tag}{mode}"
        reply = exchange(address, kv_request("/kv/insert", {"key": key, "value": ""}, mode))
        assert_json_reply(reply, 200, {"success": "true"})
        assert get(address, key) == {"success": "true", "value": ""}
    # Written without "=", as some clients send an empty value.
    body = f"key={quote(tag + 'bare', safe='')}&value".encode()
    assert_json_reply(
        exchange(address, request("POST", "/kv/insert", body)), 200, {"success": "true"}
    )
    assert get(address, tag + "bare") == {"success": "true", "value": ""}


def test_plus_in_a_form_body_is_a_space(address, tag):
    # Form encoding: a bare '+' is a space, '%2B' a plus sign.
    body = f"key={tag}plus&value=a+b%2Bc".encode()
    assert_json_reply(
        exchange(address, request("POST", "/kv/insert", body)), 200, {"success": "true"}
    )
    assert get(address, tag + "plus") == {"success": "true", "value": "a b+c"}


def test_key_in_query_value_in_body(address, tag):
    target = f"/kv/insert?key={quote(tag + 'split', safe='')}"
    reply = exchange(address, request("POST", target, b"value=from%20the%20body"))
    assert_json_reply(reply, 200, {"success": "true"})
    assert get(address, tag + "split") == {"success": "true", "value": "from the body"}


def test_absolute_form_target(address, tag):
    with Client(*address) as client:
        assert client.insert(tag + "abs", "v") is True
    target = f"http://pbkv.test/kv/get?key={tag}abs"
    reply = exchange(address, request("GET", target))
    assert_json_reply(reply, 200, {"success": "true", "value": "v"})


def test_query_longer_than_64_kib(address, tag):
    # Parameters in a request target longer than what URL parsers usually take.
    key = tag + "q" * 3000
    value = "%" * 30000  # 90000 bytes once percent-encoded
    with Raw(address) as conn:
        conn.send(kv_request("/kv/insert", {"key": key, "value": value}, "query"))
        assert_json_reply(conn.reply(), 200, {"success": "true"})
        conn.send(kv_request("/kv/get", {"key": key}))
        assert_json_reply(conn.reply(), 200, {"success": "true", "value": value})


def test_form_content_type_with_charset(address, tag):
    body = encode({"key": tag + "cs", "value": "é"}).encode()
    reply = exchange(address, request("POST", "/kv/insert", body, FORM + "; charset=UTF-8"))
    assert_json_reply(reply, 200, {"success": "true"})
    assert get(address, tag + "cs") == {"success": "true", "value": "é"}


def test_value_of_exactly_the_limit_and_one_byte_over(address, tag):
    before = count(address)
    key = tag + "big"
    # Every byte percent-encoded: the body is three times the value.
    value = "&" * MAX_VALUE
    reply = exchange(address, kv_request("/kv/insert", {"key": key, "value": value}))
    assert_json_reply(reply, 200, {"success": "true"})
    assert get(address, key) == {"success": "true", "value": value}

    too_big = "&" * (MAX_VALUE + 1)
    reply = exchange(address, kv_request("/kv/update", {"key": key, "value": too_big}))
    assert_error(reply, 413)
    reply = exchange(address, kv_request("/kv/insert", {"key": key + "2", "value": too_big}))
    assert_error(reply, 413)
    assert get(address, key) == {"success": "true", "value": value}
    assert count(address) == before + 1


@pytest.mark.parametrize("mode", ["query", "json"])
def test_value_limit_in_query_and_json(address, tag, mode):
    key = f"{tag}{mode}"
    value = "x" * MAX_VALUE
    reply = exchange(address, kv_request("/kv/insert", {"key": key, "value": value}, mode))
    assert_json_reply(reply, 200, {"success": "true"})
    assert get(address, key)["value"] == value
    reply = exchange(address, kv_request("/kv/insert", {"key": key, "value": value + "x"}, mode))
    assert_error(reply, 413)


def test_value_limit_counts_utf8_bytes(address, tag):
    before = count(address)
    value = "😀" * (MAX_VALUE // 4)  # four bytes each: exactly the limit
    reply = exchange(address, kv_request("/kv/insert", {"key": tag + "e", "value": value}))
    assert_json_reply(reply, 200, {"success": "true"})
    assert get(address, tag + "e")["value"] == value
    reply = exchange(address, kv_request("/kv/insert", {"key": tag + "f", "value": value + "a"}))
    assert_error(reply, 413)
    assert count(address) == before + 1


def test_key_of_exactly_the_limit_and_one_byte_over(address, tag):
    before = count(address)
    key = (tag + "k" * MAX_KEY)[:MAX_KEY]
    reply = exchange(address, kv_request("/kv/insert", {"key": key, "value": "v"}))
    assert_json_reply(reply, 200, {"success": "true"})
    assert get(address, key) == {"success": "true", "value": "v"}
    for path, params in [
        ("/kv/insert", {"key": key + "k", "value": "v"}),
        ("/kv/get", {"key": key + "k"}),
        ("/kv/delete", {"key": key + "k"}),
    ]:
        assert_error(exchange(address, kv_request(path, params)), 413)
    # Two-byte characters: 2048 of them fit, one more does not.
    wide = "é" * (MAX_KEY // 2)
    assert_json_reply(
        exchange(address, kv_request("/kv/insert", {"key": wide, "value": "w"})),
        200,
        {"success": "true"},
    )
    assert_error(
        exchange(address, kv_request("/kv/insert", {"key": wide + "a", "value": "w"})), 413
    )
    assert count(address) == before + 2
    with Client(*address) as client:
        assert client.delete(wide) == "w"


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "status"), ERRORS)
def test_errors(address, data, status):
    before = count(address)
    with Raw(address) as conn:
        conn.send(data)
        assert_error(conn.reply(), status)
        # A bad request does not cost the connection.
        conn.send(request("GET", "/kvman/countkey"))
        assert_json_reply(conn.reply(), 200, {"result": str(before)})


def test_refused_requests_write_nothing(address):
    before = count(address)
    for data, _ in (param.values for param in ERRORS):
        exchange(address, data)
    assert count(address) == before
    assert get(address, "a") == {"success": "false", "value": ""}


# -- connections -----------------------------------------------------------------------------
def test_keep_alive_many_requests_on_one_connection(address, tag):
    with Raw(address) as conn:
        local_port = conn.sock.getsockname()[1]
        for n in range(200):
            conn.send(kv_request("/kv/insert", {"key": f"{tag}{n}", "value": str(n)}))
            reply = conn.reply()
            assert_json_reply(reply, 200, {"success": "true"})
            assert "connection" not in reply.headers
            conn.send(kv_request("/kv/get", {"key": f"{tag}{n}"}))
            assert_json_reply(conn.reply(), 200, {"success": "true", "value": str(n)})
        assert conn.sock.getsockname()[1] == local_port


def test_pipelining_three_requests_in_one_write(address, tag):
    key = tag + "p"
    before = count(address)
    data = (
        kv_request("/kv/insert", {"key": key, "value": "piped"})
        + kv_request("/kv/get", {"key": key})
        + request("GET", "/kvman/countkey")
    )
    with Raw(address) as conn:
        conn.send(data)
        assert_json_reply(conn.reply(), 200, {"success": "true"})
        assert_json_reply(conn.reply(), 200, {"success": "true", "value": "piped"})
        assert_json_reply(conn.reply(), 200, {"result": str(before + 1)})


def test_pipelining_mixed_replies_stay_in_order(address, tag):
    requests: list[tuple[bytes, int, Any]] = []
    for n in range(50):
        key = f"{tag}{n}"
        requests += [
            (kv_request("/kv/insert", {"key": key, "value": str(n)}), 200, {"success": "true"}),
            (request("GET", "/nowhere"), 404, None),
            (kv_request("/kv/get", {"key": key}), 200, {"success": "true", "value": str(n)}),
            (kv_request("/kv/delete", {"key": key}), 200, {"success": "true", "value": str(n)}),
            (kv_request("/kv/update", {"key": key, "value": "x"}), 200, {"success": "false"}),
        ]
    with Raw(address) as conn:
        conn.send(b"".join(data for data, _, _ in requests))
        for _, status, body in requests:
            reply = conn.reply()
            if body is None:
                assert_error(reply, status)
            else:
                assert_json_reply(reply, status, body)


def test_a_read_pipelined_behind_a_write_sees_it_on_a_replicated_pair(make_pair):
    # On a pair a write is answered once the backup acknowledged it: a read sent
    # behind it on the same connection must wait for it, as a pipeline runs in
    # order (the replies kept their order, but reads answered from the data
    # acknowledged so far missed the write before them: 320 of 1,157).
    pair = make_pair(errors="http")
    pair.start_both()
    address = pair.address["primary"]
    stop = threading.Event()
    written = 0

    def writer() -> None:  # batches in flight from another client all along
        nonlocal written
        with Client(*address) as client:
            while not stop.is_set():
                client.insert(f"load-{written}", "x" * 100)
                written += 1

    thread = threading.Thread(target=writer)
    thread.start()
    missed: list[int] = []
    try:
        wait_for(lambda: written > 20, 10, what="the writer to run")
        with Raw(address) as conn:
            for n in range(300):
                key, value = f"piped-{n}", f"value-{n}"
                conn.send(
                    kv_request("/kv/insert", {"key": key, "value": value})
                    + kv_request("/kv/get", {"key": key})
                    + kv_request("/kv/update", {"key": key, "value": value + "b"})
                    + request("GET", "/kvman/countkey")
                    + kv_request("/kv/get", {"key": key})
                )
                assert_json_reply(conn.reply(), 200, {"success": "true"})
                seen = [conn.reply().json]
                assert_json_reply(conn.reply(), 200, {"success": "true"})
                seen += [int(conn.reply().json["result"]) > n, conn.reply().json]
                if seen != [
                    {"success": "true", "value": value},
                    True,
                    {"success": "true", "value": value + "b"},
                ]:
                    missed.append(n)
    finally:
        stop.set()
        thread.join(10)
    assert written > 20
    assert missed == [], f"in {len(missed)} of 300 pipelines a read missed the write before it"


def test_connection_close_is_honoured(address):
    with Raw(address) as conn:
        conn.send(request("GET", "/kvman/countkey", headers=("Connection: close",)))
        reply = conn.reply()
        assert reply.status == 200
        assert reply.headers["connection"].lower() == "close"
        assert conn.closed_by_server()


def test_http_1_0_without_keep_alive_is_closed(address):
    with Raw(address) as conn:
        conn.send(b"GET /kvman/countkey HTTP/1.0\r\n\r\n")
        assert conn.reply().status == 200
        assert conn.closed_by_server()


def test_connection_close_after_pipelined_requests(address, tag):
    data = kv_request("/kv/get", {"key": tag}) + request(
        "GET", "/kvman/countkey", headers=("Connection: close",)
    )
    with Raw(address) as conn:
        conn.send(data + kv_request("/kv/get", {"key": tag}))
        assert conn.reply().status == 200
        assert conn.reply().headers["connection"].lower() == "close"
        assert conn.closed_by_server()  # the request after the close is not answered


# -- robustness ------------------------------------------------------------------------------
def _bad_connection(address: tuple[str, int], data: bytes, tag: str) -> Reply | None:
    """Send ``data``, read the server's answer if any, and require that it closed."""
    before = count(address)
    connections = open_connections(address)
    reply = None
    with Raw(address) as conn:
        conn.send(data)
        try:
            reply = conn.reply()
        except ConnectionError:
            pass
        assert conn.closed_by_server()
    wait_for(lambda: open_connections(address) <= connections, what="the connection to go")
    assert_still_serving(address, before, tag)
    return reply


@pytest.mark.parametrize(
    "data",
    [
        b"\x00\xff\xfe garbage \x01\x02\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /kv/get?key=a HTTP/9.9\r\n\r\n",
        b"GET /kv/get?key=a HTTP/1.1\r\nno colon here\r\n\r\n",
        b"\r\n\r\n\r\n" + bytes(range(256)),
    ],
    ids=["binary", "word", "no-target", "bad-version", "bad-header", "all-bytes"],
)
def test_garbage_is_answered_400_and_closed(address, tag, data):
    reply = _bad_connection(address, data, tag)
    if reply is not None:
        assert_error(reply, 400)


@pytest.mark.parametrize(
    "length", [b"-5", b"abc", b"5x", b"", b"99999999999999999999999999"], ids=repr
)
def test_bad_content_length(address, tag, length):
    data = (
        b"POST /kv/insert HTTP/1.1\r\nHost: x\r\nContent-Type: "
        + FORM.encode()
        + b"\r\nContent-Length: "
        + length
        + b"\r\n\r\nkey="
        + tag.encode()
        + b"&value=v"
    )
    reply = _bad_connection(address, data, tag)
    assert reply is not None
    assert_error(reply, 400)
    assert get(address, tag) == {"success": "false", "value": ""}


def test_two_content_lengths_are_refused(address, tag):
    body = f"key={tag}&value=v".encode()
    data = (
        b"POST /kv/insert HTTP/1.1\r\nContent-Type: "
        + FORM.encode()
        + b"\r\nContent-Length: %d\r\nContent-Length: 3\r\n\r\n" % len(body)
        + body
    )
    reply = _bad_connection(address, data, tag)
    assert reply is not None
    assert_error(reply, 400)
    assert get(address, tag) == {"success": "false", "value": ""}


def test_truncated_body_then_hang_up(address, tag):
    before = count(address)
    connections = open_connections(address)
    body = f"key={tag}&value=some-value".encode()
    with Raw(address) as conn:
        # Claims 100 bytes more than it sends, then goes away.
        conn.send(
            b"POST /kv/insert HTTP/1.1\r\nContent-Type: "
            + FORM.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % (len(body) + 100)
            + body
        )
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.closed_by_server()  # no reply to a request that never ended
    wait_for(lambda: open_connections(address) <= connections, what="the connection to go")
    assert get(address, tag) == {"success": "false", "value": ""}
    assert_still_serving(address, before, tag)


def test_truncated_body_with_reset(address, tag):
    before = count(address)
    connections = open_connections(address)
    body = f"key={tag}&value=some-value".encode()
    conn = Raw(address)
    conn.send(
        b"POST /kv/insert HTTP/1.1\r\nContent-Type: "
        + FORM.encode()
        + b"\r\nContent-Length: 4096\r\n\r\n"
        + body
    )
    # Linger 0: close with a reset instead of a FIN.
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()
    wait_for(lambda: open_connections(address) <= connections, what="the connection to go")
    assert get(address, tag) == {"success": "false", "value": ""}
    assert_still_serving(address, before, tag)


def test_oversized_content_length_is_refused_before_the_body(address, tag):
    # Only the head is sent: the reply must come without the server waiting for a body.
    data = (
        b"POST /kv/insert HTTP/1.1\r\nContent-Type: "
        + FORM.encode()
        + b"\r\nContent-Length: %d\r\n\r\n" % (LIMITS.max_body_bytes + 1)
    )
    reply = _bad_connection(address, data, tag)
    assert reply is not None
    assert_error(reply, 413)
    assert reply.headers["connection"].lower() == "close"


def test_oversized_body_sent_in_full(address, tag):
    before = count(address)
    body = f"key={tag}&value=".encode() + b"%41" * (MAX_VALUE + 1)
    with Raw(address) as conn:
        conn.send(request("POST", "/kv/insert", body))
        assert_error(conn.reply(), 413)
    assert get(address, tag) == {"success": "false", "value": ""}
    assert_still_serving(address, before, tag)


def test_large_header_within_limits_is_served(address, tag):
    with Raw(address) as conn:
        header = "X-Padding: " + "p" * (256 * 1024)
        conn.send(request("GET", "/kvman/countkey", headers=(header,)))
        assert conn.reply().status == 200
        conn.send(kv_request("/kv/get", {"key": tag}))
        assert_json_reply(conn.reply(), 200, {"success": "false", "value": ""})


def test_huge_header_line_is_refused(address, tag):
    # One header line that never ends, exactly one byte over what the server buffers:
    # it has read everything when it refuses, so the reply is not lost to a reset.
    head = b"GET /kv/get?key=a HTTP/1.1\r\nX-Huge: "
    data = head + b"h" * (LIMITS.max_head_bytes + 1 - len(head))
    reply = _bad_connection(address, data, tag)
    assert reply is not None
    assert_error(reply, 413)


def test_huge_request_target_is_refused(address, tag):
    head = b"GET /kv/get?key="
    data = head + b"k" * (LIMITS.max_head_bytes + 1 - len(head))
    reply = _bad_connection(address, data, tag)
    assert reply is not None
    assert_error(reply, 413)


def test_invalid_utf8_in_a_form_body(address, tag):
    before = count(address)
    body = b"key=" + tag.encode() + b"\xff\xfe&value=\xc3\x28"
    with Raw(address) as conn:
        conn.send(request("POST", "/kv/insert", body))
        assert_error(conn.reply(), 400)
        conn.send(request("POST", "/kv/insert", b"key=" + tag.encode() + b"&value=ok\x80"))
        assert_error(conn.reply(), 400)
        conn.send(request("POST", "/kv/insert", b'{"key": "a\xff", "value": "v"}', JSON_TYPE))
        assert_error(conn.reply(), 400)
    assert_still_serving(address, before, tag)


def test_replication_upgrade_is_refused_by_a_primary(address, tag):
    from pbkv.wire import UPGRADE_PATH, UPGRADE_TOKEN

    data = (
        b"GET "
        + UPGRADE_PATH
        + b" HTTP/1.1\r\nUpgrade: "
        + UPGRADE_TOKEN
        + b"\r\nConnection: Upgrade\r\n\r\n"
    )
    reply = _bad_connection(address, data, tag)
    assert reply is not None
    assert_error(reply, 400)


# -- concurrency -----------------------------------------------------------------------------
def test_100_concurrent_clients(address, tag):
    clients, per_client = 100, 10
    before = count(address)
    start = threading.Barrier(clients)
    failures: list[str] = []

    def work(n: int) -> None:
        try:
            with Client(*address, timeout=30.0) as client:
                start.wait(timeout=30.0)
                for i in range(per_client):
                    key, value = f"{tag}{n}-{i}", f"value {n} {i} &=%"
                    if client.insert(key, value) is not True:
                        failures.append(f"insert {key}")
                    if client.get(key) != value:
                        failures.append(f"get {key}")
        except Exception as exc:  # reported below, with the client's number
            failures.append(f"client {n}: {exc!r}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60.0)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    assert count(address) == before + clients * per_client


def test_authorization_scheme_in_any_case_and_given_twice(make_pair):
    servers = make_pair(standalone="true", errors="http", client_token="the-token")
    servers.start("primary")
    address = servers.address["primary"]
    for scheme in ("Bearer", "bearer", "BEARER"):
        reply = exchange(
            address,
            request("GET", "/kvman/countkey", headers=(f"Authorization: {scheme} the-token",)),
        )
        assert_json_reply(reply, 200, {"result": "0"})
    # Twice, even the right token twice: refused, never the last one taken.
    for first in ("Bearer wrong", "Bearer the-token"):
        headers = (f"Authorization: {first}", "Authorization: Bearer the-token")
        reply = exchange(address, request("POST", "/kv/insert", b"key=k&value=v", headers=headers))
        assert "more than once" in assert_error(reply, 400)
    reply = exchange(
        address, request("GET", "/kvman/countkey", headers=("Authorization: Bearer the-token",))
    )
    assert_json_reply(reply, 200, {"result": "0"})


# -- shutdown and the scripts ------------------------------------------------------------------
def test_shutdown_replies_then_exits_and_frees_the_port(make_pair):
    servers = make_pair(standalone="true")
    servers.start("primary")
    address = servers.address["primary"]
    pid = servers.pid("primary")
    assert pid is not None and _alive(pid)
    with Client(*address) as client:
        assert client.insert("kept", "nowhere") is True

    with Raw(address) as conn:
        conn.send(request("GET", "/kvman/shutdown"))
        reply = conn.reply()
        assert_json_reply(reply, 200, {"success": "true"})
        assert reply.headers["connection"].lower() == "close"
        assert conn.closed_by_server()
    wait_for(lambda: not _alive(pid), what="the server process to exit")
    assert _bindable(*address)

    # The same role starts again at once, on the same port, with empty data.
    servers.start("primary")
    new_pid = servers.pid("primary")
    assert new_pid is not None and new_pid != pid
    with Client(*address) as client:
        assert client.count() == 0
        assert client.status()["stage"] == "in_sync"


def test_shutdown_by_post_answers_pending_pipelined_requests_first(make_pair):
    servers = make_pair(standalone="true")
    servers.start("primary")
    address = servers.address["primary"]
    pid = servers.pid("primary")
    with Raw(address) as conn:
        conn.send(
            kv_request("/kv/insert", {"key": "k", "value": "v"})
            + request("POST", "/kvman/shutdown", b"")
            + request("GET", "/kvman/countkey")
        )
        assert_json_reply(conn.reply(), 200, {"success": "true"})
        assert_json_reply(conn.reply(), 200, {"success": "true"})
        assert conn.closed_by_server()
    assert pid is not None
    wait_for(lambda: not _alive(pid), what="the server process to exit")
    assert _bindable(*address)


def test_start_server_reports_a_port_in_use(make_pair):
    servers = make_pair(standalone="true")
    host, port = servers.address["primary"]
    with socket.socket() as squatter:
        squatter.bind((host, port))
        squatter.listen()
        result = servers.start("primary", check=False)
        assert result.returncode != 0
        message = result.stdout + result.stderr
        assert f"{host}:{port}" in message
        assert "in use" in message.lower()
        assert servers.pid("primary") is None or not _alive(servers.pid("primary"))

    servers.start("primary")
    pid = servers.pid("primary")
    assert pid is not None and _alive(pid)
    assert servers.stage("primary") == "in_sync"
    result = servers.stop("primary")
    assert result.returncode == 0
    assert not _alive(pid)
    assert not Path(servers.pid_file("primary")).exists()
    assert _bindable(host, port)
    assert servers.status("primary") is None


def test_start_server_twice_refuses_the_second(make_pair):
    servers = make_pair(standalone="true")
    servers.start("primary")
    pid = servers.pid("primary")
    result = servers.start("primary", check=False)
    assert result.returncode != 0
    assert "already running" in result.stderr
    assert servers.pid("primary") == pid
    assert pid is not None and _alive(pid)
    servers.stop("primary")
    assert not _alive(pid)
    assert os.path.exists(servers.dir / "logs")
