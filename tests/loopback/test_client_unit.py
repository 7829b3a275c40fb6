"""Client library and CLI against a small in-process imitation of a pbkv server
(``tests/support/fake_pbkv.py``), so the client's error mapping and its keep-alive
rules can be checked without starting a real server.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pbkv import cli
from pbkv.cli import escape, main, status_lines
from pbkv.client import (
    AsyncClient,
    BadRequest,
    Client,
    NotDurable,
    NotPrimary,
    OutcomeUnknown,
    PbkvError,
    ReplicationFailed,
    Unavailable,
    parse_reply,
    server_address,
)
from tests.support.fake_pbkv import STATUS, FakePbkv, closed_port, running_fake

TRICKY = [
    "a+b",
    "a&b=c",
    "100%",
    "%41%2B",
    "sp ace",
    "  leading and trailing  ",
    "emoji 🎉👍🏽",
    "line\r\nbreak",
    "nul\0byte",
    "quote\"'",
    "back\\slash",
    "slash/and?query#fragment",
    "ünïcödé 中文",
    "tab\there",
    ";,:@$!*()~[]{}|^`<>",
    "=",
    "&",
    "+",
    "?key=x&value=y",
]


@pytest.fixture
def server() -> Iterator[FakePbkv]:
    with running_fake() as srv:
        yield srv


def _wait_for_close(srv: FakePbkv) -> None:
    assert srv.closed.wait(5)
    srv.closed.clear()


# --- reply mapping ------------------------------------------------------------------------


def _reply(op: str, status: int, body: Any, retry_after: str | None = None) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_reply(op, status, raw, retry_after)


@pytest.mark.parametrize(
    ("op", "body", "expected"),
    [
        ("get", {"success": "true", "value": "v"}, "v"),
        ("get", {"success": "true", "value": ""}, ""),
        ("get", {"success": "false", "value": ""}, None),
        ("insert", {"success": "true"}, True),
        ("insert", {"success": "false"}, False),
        ("update", {"success": "true"}, True),
        ("update", {"success": "false"}, False),
        ("delete", {"success": "true", "value": "old"}, "old"),
        ("delete", {"success": "false", "value": ""}, None),
        ("count", {"result": "42"}, 42),
        ("dump", [["k1", "v1"], ["k2", ""]], [("k1", "v1"), ("k2", "")]),
        ("dump", [], []),
        ("status", STATUS, STATUS),
        ("shutdown", {"success": "true"}, None),
        ("shutdown", b"bye", None),
    ],
)
def test_reply_results(op: str, body: Any, expected: Any) -> None:
    assert _reply(op, 200, body) == expected


@pytest.mark.parametrize("status", [200, 500, 503])
def test_replication_failed_any_status(status: int) -> None:
    with pytest.raises(ReplicationFailed) as info:
        _reply("insert", status, {"success": "false", "error": "replication failed"})
    assert info.value.status == status
    assert info.value.error == "replication failed"


def test_unavailable_carries_stage_and_retry_after() -> None:
    body = {"success": "false", "error": "not accepting writes now", "stage": "cold_start"}
    with pytest.raises(Unavailable) as info:
        _reply("insert", 503, body, retry_after="2")
    err = info.value
    assert not isinstance(err, NotPrimary)
    assert (err.status, err.stage, err.retry_after) == (503, "cold_start", 2.0)
    assert err.body == body


def test_retry_after_date_is_ignored() -> None:
    with pytest.raises(Unavailable) as info:
        _reply("get", 503, {"success": "false", "error": "x"}, "Wed, 21 Oct 2015 07:28:00 GMT")
    assert info.value.retry_after is None and info.value.stage is None


def test_write_to_backup_names_the_primary() -> None:
    body = {"success": "false", "error": "not the primary", "primary": "127.0.0.1:8080"}
    with pytest.raises(NotPrimary) as info:
        _reply("update", 503, {**body, "stage": "in_sync"}, "1")
    assert isinstance(info.value, Unavailable)
    assert info.value.primary == "127.0.0.1:8080"
    assert info.value.stage == "in_sync"


@pytest.mark.parametrize("status", [400, 404, 405, 413])
def test_client_errors(status: int) -> None:
    with pytest.raises(BadRequest) as info:
        _reply("get", status, {"success": "false", "error": "empty key"})
    assert (info.value.status, info.value.error) == (status, "empty key")
    assert "empty key" in str(info.value) and str(status) in str(info.value)


def test_server_error_is_plain_pbkv_error() -> None:
    with pytest.raises(PbkvError) as info:
        _reply("get", 500, {"success": "false", "error": "boom"})
    assert type(info.value) is PbkvError
    assert info.value.error == "boom"


def test_error_without_json_uses_the_text() -> None:
    with pytest.raises(PbkvError) as info:
        _reply("count", 502, b"Bad Gateway from proxy")
    assert info.value.error == "Bad Gateway from proxy"
    assert info.value.body == {}
    with pytest.raises(BadRequest) as bad:
        _reply("count", 404, b"")
    assert bad.value.error == "Not Found"


def test_error_field_on_200_is_an_error() -> None:
    with pytest.raises(PbkvError) as info:
        _reply("insert", 200, {"success": "false", "error": "something odd"})
    assert info.value.status == 200


@pytest.mark.parametrize(
    ("op", "body"),
    [
        ("get", {"success": "maybe"}),
        ("get", {"success": "true"}),
        ("insert", ["not", "an", "object"]),
        ("count", {"result": "many"}),
        ("dump", {"k": "v"}),
        ("dump", [["k"]]),
        ("dump", [["k", 1]]),
        ("status", []),
        ("get", b"<html>"),
    ],
)
def test_malformed_replies(op: str, body: Any) -> None:
    with pytest.raises(PbkvError):
        _reply(op, 200, body)


# --- settings -----------------------------------------------------------------------------


def _settings(tmp_path: Path, **values: str) -> Path:
    path = tmp_path / "settings.conf"
    path.write_text(json.dumps(values))
    return path


def test_backup_on_same_address_uses_next_port(tmp_path: Path) -> None:
    path = _settings(tmp_path, primary="127.0.0.1", backup="127.0.0.1", port="9000")
    assert server_address(path, "primary") == ("127.0.0.1", 9000)
    assert server_address(path, "backup") == ("127.0.0.1", 9001)


def test_backup_on_other_address_uses_same_port(tmp_path: Path) -> None:
    path = _settings(tmp_path, primary="127.0.0.1", backup="127.0.0.2", port="8080")
    assert server_address(path) == ("127.0.0.1", 8080)
    assert server_address(path, "backup") == ("127.0.0.2", 8080)


def test_backup_port_overrides(tmp_path: Path) -> None:
    for backup in ("127.0.0.1", "127.0.0.2"):
        path = _settings(
            tmp_path, primary="127.0.0.1", backup=backup, port="8080", backup_port="7070"
        )
        assert server_address(path, "backup") == (backup, 7070)
        assert server_address(path, "primary") == ("127.0.0.1", 8080)


def test_course_default_file() -> None:
    path = Path(__file__).resolve().parents[2] / "conf" / "settings.conf"
    assert server_address(path, "primary") == ("127.0.0.1", 8080)
    assert server_address(path, "backup") == ("127.0.0.2", 8080)


def test_settings_errors(tmp_path: Path) -> None:
    good = _settings(tmp_path, primary="127.0.0.1", backup="127.0.0.2", port="8080")
    with pytest.raises(ValueError):
        server_address(good, "leader")
    with pytest.raises(ValueError):
        server_address(tmp_path / "missing.conf")
    bad = tmp_path / "bad.conf"
    bad.write_text("{not json")
    with pytest.raises(ValueError):
        server_address(bad)
    with pytest.raises(ValueError):
        server_address(_settings(tmp_path, primary="127.0.0.1", port="eighty"))


def test_from_settings(tmp_path: Path) -> None:
    path = _settings(tmp_path, primary="10.0.0.1", backup="10.0.0.1", port="9000")
    with Client.from_settings(path, "backup", timeout=1.0) as client:
        assert (client.host, client.port, client.timeout) == ("10.0.0.1", 9001, 1.0)
    aclient = AsyncClient.from_settings(str(path))
    assert (aclient.host, aclient.port) == ("10.0.0.1", 9000)


# --- blocking client ----------------------------------------------------------------------


def test_sync_operations(server: FakePbkv) -> None:
    with Client("127.0.0.1", server.port) as client:
        assert client.get("k") is None
        assert client.insert("k", "v1") is True
        assert client.insert("k", "again") is False
        assert client.get("k") == "v1"
        assert client.update("k", "v2") is True
        assert client.update("nope", "x") is False
        assert client.insert("e", "") is True
        assert client.get("e") == ""
        assert client.count() == 2
        assert client.dump() == [("k", "v2"), ("e", "")]
        assert client.dump_dict() == {"k": "v2", "e": ""}
        assert client.status()["keys"] == 2
        assert client.delete("k") == "v2"
        assert client.delete("k") is None
        assert client.count() == 1
        client.shutdown()
    assert server.requests[-1][:2] == ("GET", "/kvman/shutdown")
    assert server.connections == 1  # one keep-alive connection for everything


def test_sync_methods_and_encoding(server: FakePbkv) -> None:
    with Client("127.0.0.1", server.port) as client:
        client.insert("a b", "c&d")
        client.get("a b")
        client.count()
    assert server.requests == [
        ("POST", "/kv/insert", {"key": "a b", "value": "c&d"}),
        ("GET", "/kv/get", {"key": "a b"}),
        ("GET", "/kvman/countkey", {}),
    ]


def test_sync_tricky_strings_round_trip(server: FakePbkv) -> None:
    with Client("127.0.0.1", server.port) as client:
        for text in TRICKY:
            assert client.insert(text, text + "|" + text)
        assert server.data == {text: text + "|" + text for text in TRICKY}
        for text in TRICKY:
            assert client.get(text) == text + "|" + text
            assert client.update(text, text)
        assert client.dump_dict() == {text: text for text in TRICKY}
        for text in TRICKY:
            assert client.delete(text) == text
        assert client.count() == 0


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=st.text(st.characters(codec="utf-8"), min_size=1),
    value=st.text(st.characters(codec="utf-8")),
)
def test_any_text_round_trips(server: FakePbkv, key: str, value: str) -> None:
    with Client("127.0.0.1", server.port) as client:
        client.delete(key)
        assert client.insert(key, value)
        assert server.data[key] == value
        assert client.get(key) == value


def test_sync_errors(server: FakePbkv) -> None:
    with Client("127.0.0.1", server.port, retry_for=0) as client:
        with pytest.raises(BadRequest) as bad:
            client.get("")
        assert bad.value.error == "empty key"
        server.forced.append(
            (
                503,
                {"success": "false", "error": "not accepting writes", "stage": "warm_start"},
                {"Retry-After": "3"},
            )
        )
        with pytest.raises(Unavailable) as unavailable:
            client.insert("k", "v")
        assert (unavailable.value.stage, unavailable.value.retry_after) == ("warm_start", 3.0)
        server.forced.append(
            (503, {"success": "false", "error": "not the primary", "primary": "10.0.0.1:80"}, {})
        )
        with pytest.raises(NotPrimary) as not_primary:
            client.delete("k")
        assert not_primary.value.primary == "10.0.0.1:80"
        server.forced.append((200, {"success": "false", "error": "replication failed"}, {}))
        with pytest.raises(ReplicationFailed):
            client.update("k", "v")
        # Errors leave the connection usable.
        assert client.insert("k", "v")
    assert server.connections == 1


def test_sync_other_framings(server: FakePbkv) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"res\r\n9\r\nult":"7"}\r\n0\r\n\r\n'
    )
    until_close = b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"result":"8"}'
    server.raw += [chunked, until_close, b"garbage\r\n\r\n"]
    with Client("127.0.0.1", server.port) as client:
        assert client.count() == 7
        assert client.count() == 8
        with pytest.raises(PbkvError) as info:
            client.count()
        assert info.value.status == 0
        assert client.count() == 0


def test_sync_reconnects_after_idle_drop(server: FakePbkv) -> None:
    server.close_after_reply = True
    with Client("127.0.0.1", server.port) as client:
        assert client.insert("a", "1")
        _wait_for_close(server)
        assert client.insert("b", "2")  # noticed before sending: a write is safe here
        _wait_for_close(server)
        assert client.get("a") == "1"
    assert server.connections == 3
    assert [path for _, path, _ in server.requests] == ["/kv/insert", "/kv/insert", "/kv/get"]


def test_sync_read_resent_once_when_reused_connection_dies(server: FakePbkv) -> None:
    with Client("127.0.0.1", server.port) as client:
        assert client.insert("k", "v")
        server.hangups = 1
        assert client.get("k") == "v"
    assert [path for _, path, _ in server.requests] == ["/kv/insert", "/kv/get", "/kv/get"]


def test_sync_write_never_resent(server: FakePbkv) -> None:
    with Client("127.0.0.1", server.port, idempotency_keys=False) as client:
        assert client.count() == 0
        server.hangups = 1
        with pytest.raises(ConnectionError):
            client.insert("k", "v")
        assert [path for _, path, _ in server.requests] == ["/kvman/countkey", "/kv/insert"]
        assert client.count() == 0  # and the client recovers


def test_sync_fresh_connection_failure_not_resent(server: FakePbkv) -> None:
    server.hangups = 1
    with Client("127.0.0.1", server.port) as client, pytest.raises(ConnectionError):
        client.get("k")
    assert len(server.requests) == 1


def test_sync_refused_and_timeout(server: FakePbkv) -> None:
    with Client("127.0.0.1", closed_port()) as client, pytest.raises(ConnectionRefusedError):
        client.count()
    server.delay = 1.0
    with Client("127.0.0.1", server.port, timeout=0.2) as client, pytest.raises(TimeoutError):
        client.count()


# --- asyncio client -----------------------------------------------------------------------


def test_async_operations(server: FakePbkv) -> None:
    async def scenario() -> None:
        async with AsyncClient("127.0.0.1", server.port) as client:
            assert await client.get("k") is None
            assert await client.insert("k", "v1") is True
            assert await client.insert("k", "x") is False
            assert await client.update("k", "v2") is True
            assert await client.update("nope", "x") is False
            assert await client.get("k") == "v2"
            assert await client.count() == 1
            assert await client.dump() == [("k", "v2")]
            assert await client.dump_dict() == {"k": "v2"}
            assert (await client.status())["stage"] == "in_sync"
            assert await client.delete("k") == "v2"
            assert await client.delete("k") is None
            await client.shutdown()

    asyncio.run(scenario())
    assert server.connections == 1


def test_async_tricky_strings_and_concurrency(server: FakePbkv) -> None:
    async def scenario() -> None:
        async with AsyncClient("127.0.0.1", server.port) as client:
            results = await asyncio.gather(*(client.insert(t, t[::-1]) for t in TRICKY))
            assert all(results)
            values = await asyncio.gather(*(client.get(t) for t in TRICKY))
            assert values == [t[::-1] for t in TRICKY]
            assert await client.dump_dict() == {t: t[::-1] for t in TRICKY}

    asyncio.run(scenario())
    assert server.data == {t: t[::-1] for t in TRICKY}
    assert server.connections == 1


def test_async_errors(server: FakePbkv) -> None:
    async def scenario() -> None:
        async with AsyncClient("127.0.0.1", server.port, retry_for=0) as client:
            with pytest.raises(BadRequest):
                await client.delete("")
            server.forced.append(
                (
                    503,
                    {"success": "false", "error": "wait", "stage": "cold_start"},
                    {"Retry-After": "1"},
                )
            )
            with pytest.raises(Unavailable) as unavailable:
                await client.get("k")
            assert (unavailable.value.stage, unavailable.value.retry_after) == ("cold_start", 1.0)
            server.forced.append(
                (503, {"success": "false", "error": "backup", "primary": "127.0.0.1:8080"}, {})
            )
            with pytest.raises(NotPrimary) as not_primary:
                await client.insert("k", "v")
            assert not_primary.value.primary == "127.0.0.1:8080"
            server.forced.append((500, {"success": "false", "error": "replication failed"}, {}))
            with pytest.raises(ReplicationFailed):
                await client.insert("k", "v")
            assert await client.insert("k", "v")

    asyncio.run(scenario())
    assert server.connections == 1


def test_async_other_framings(server: FakePbkv) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"res\r\n9\r\nult":"7"}\r\n0\r\n\r\n'
    )
    until_close = b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"result":"8"}'
    server.raw += [chunked, until_close, b"garbage\r\n\r\n"]

    async def scenario() -> None:
        async with AsyncClient("127.0.0.1", server.port) as client:
            assert await client.count() == 7
            assert await client.count() == 8
            with pytest.raises(PbkvError) as info:
                await client.count()
            assert info.value.status == 0
            assert await client.count() == 0

    asyncio.run(scenario())


def test_async_keep_alive_rules(server: FakePbkv) -> None:
    async def scenario() -> None:
        async with AsyncClient("127.0.0.1", server.port, idempotency_keys=False) as client:
            server.close_after_reply = True
            assert await client.insert("a", "1")
            _wait_for_close(server)
            assert await client.insert("b", "2")  # idle drop noticed before sending
            _wait_for_close(server)
            server.close_after_reply = False
            assert await client.count() == 2
            server.hangups = 1
            assert await client.get("a") == "1"  # a read is sent again once
            server.hangups = 1
            with pytest.raises(ConnectionError):
                await client.update("a", "x")  # a write is not
            assert await client.get("a") == "1"

    asyncio.run(scenario())
    paths = [path for _, path, _ in server.requests]
    assert paths == [
        "/kv/insert",
        "/kv/insert",
        "/kvman/countkey",
        "/kv/get",
        "/kv/get",
        "/kv/update",
        "/kv/get",
    ]


def test_async_refused_and_timeout(server: FakePbkv) -> None:
    async def scenario() -> None:
        async with AsyncClient("127.0.0.1", closed_port()) as client:
            with pytest.raises(ConnectionRefusedError):
                await client.count()
        server.delay = 1.0
        async with AsyncClient("127.0.0.1", server.port, timeout=0.2) as client:
            with pytest.raises(TimeoutError):
                await client.count()

    asyncio.run(scenario())


# --- command line -------------------------------------------------------------------------


def _cli(server: FakePbkv, *args: str) -> int:
    return main(["--host", "127.0.0.1", "--port", str(server.port), *args])


def test_cli_reads_and_writes(server: FakePbkv, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(server, "insert", "k", "hello world") == 0
    assert _cli(server, "get", "k") == 0
    assert capsys.readouterr().out == "hello world\n"
    assert _cli(server, "insert", "k", "again") == 1
    assert "already exists" in capsys.readouterr().err
    assert _cli(server, "update", "k", "v2") == 0
    assert _cli(server, "update", "missing", "v") == 1
    assert "not found" in capsys.readouterr().err
    assert _cli(server, "count") == 0
    assert capsys.readouterr().out == "1\n"
    assert _cli(server, "delete", "k") == 0
    assert capsys.readouterr().out == "v2\n"
    assert _cli(server, "get", "k") == 1
    out, err = capsys.readouterr()
    assert out == "" and "key not found: k" in err
    assert _cli(server, "delete", "k") == 1
    assert _cli(server, "insert", "--", "-dash", "-5") == 0
    assert server.data == {"-dash": "-5"}


def test_cli_options_after_command(server: FakePbkv, capsys: pytest.CaptureFixture[str]) -> None:
    server.data["k"] = "v"
    assert main(["get", "k", "--json", "--port", str(server.port), "--host", "127.0.0.1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"success": "true", "value": "v"}


def test_cli_json(server: FakePbkv, capsys: pytest.CaptureFixture[str]) -> None:
    server.data.update({"a": "1", "b\t": "x\ny"})
    assert _cli(server, "--json", "get", "nope") == 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"success": "false", "value": ""} and err == ""
    assert _cli(server, "--json", "insert", "a", "2") == 1
    assert json.loads(capsys.readouterr().out) == {"success": "false"}
    assert _cli(server, "--json", "count") == 0
    assert json.loads(capsys.readouterr().out) == {"result": "2"}
    assert _cli(server, "--json", "dump") == 0
    assert json.loads(capsys.readouterr().out) == [["a", "1"], ["b\t", "x\ny"]]
    assert _cli(server, "--json", "status") == 0
    assert json.loads(capsys.readouterr().out)["peer"]["state"] == "up"


def test_cli_dump_escapes(server: FakePbkv, capsys: pytest.CaptureFixture[str]) -> None:
    server.data.update({"plain": "value", "t\tab": "new\nline\\", "cr\r": "nul\0"})
    assert _cli(server, "dump", "--tsv") == 0
    assert capsys.readouterr().out.splitlines() == [
        "plain\tvalue",
        "t\\tab\tnew\\nline\\\\",
        "cr\\r\tnul\\0",
    ]
    assert escape("a\\tb") == "a\\\\tb"  # a literal backslash-t stays distinguishable


def test_iter_dump_yields_every_pair_as_dump_does_and_the_client_goes_on(
    server: FakePbkv,
) -> None:
    server.data.update({f"k{i}": f"v{i}" for i in range(300)})
    server.data.update({"],[": '"],["', "back\\": "\\", "emoji 😀": "\r\n\0"})
    with Client("127.0.0.1", server.port) as client:
        whole = client.dump()
        assert list(client.iter_dump(block=7)) == whole and len(whole) == 303
        assert client.count() == 303  # the connection, read to its end, goes on
        first = next(client.iter_dump(block=64))  # left after one pair: closed
        assert first == whole[0]
        assert client.count() == 303  # a new connection
        pairs = client.iter_dump(block=64)
        assert next(pairs) == whole[0]
        assert client.count() == 303  # another call meanwhile ends the dump
        with pytest.raises(PbkvError):
            list(pairs)
        assert client.count() == 303


@pytest.mark.parametrize(
    "raw",
    [
        # Cut short within its announced length, then closed.
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b'[["a","b"],["c",',
        # Ended by the close, but not a whole array.
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b'[["a","b"],["c","d"],',
    ],
)
def test_a_dump_cut_short_raises_after_its_pairs_and_leaves_no_file(
    server: FakePbkv, tmp_path: Path, capsys: pytest.CaptureFixture[str], raw: bytes
) -> None:
    server.raw.append(raw)
    with Client("127.0.0.1", server.port) as client:
        pairs = client.iter_dump()
        assert next(pairs) == ("a", "b")
        with pytest.raises((OSError, PbkvError)):
            list(pairs)
    server.raw.append(raw)
    target = tmp_path / "dump.jsonl"
    assert _cli(server, "dump", str(target)) == 2
    assert "pbkv:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial copy


def test_a_refused_dump_raises_its_refusal(server: FakePbkv, tmp_path: Path) -> None:
    server.forced.append((503, {"success": "false", "error": "not now", "stage": "cold_start"}, {}))
    with Client("127.0.0.1", server.port) as client, pytest.raises(Unavailable):
        client.iter_dump()


def test_cli_status(server: FakePbkv, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(server, "status") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == status_lines({**STATUS, "keys": 0})
    assert "role:         primary" in lines
    assert "peer.address: 127.0.0.2:8080" in lines
    assert len({re.match(r"\S+:\s+", line).end() for line in lines}) == 1  # type: ignore[union-attr]
    assert status_lines({"ok": True, "lag": None, "n": 3}) == ["ok:  true", "lag: null", "n:   3"]


def test_cli_server_errors(server: FakePbkv, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli(server, "get", "") == 2
    assert "empty key" in capsys.readouterr().err
    server.forced.append(
        (503, {"success": "false", "error": "not the primary", "primary": "10.1.1.1:8080"}, {})
    )
    assert _cli(server, "--retry-for", "0", "insert", "k", "v") == 2
    assert "10.1.1.1:8080" in capsys.readouterr().err
    server.forced.append(
        (503, {"success": "false", "error": "not now", "stage": "cold_start"}, {"Retry-After": "1"})
    )
    assert _cli(server, "count") == 2
    err = capsys.readouterr().err
    assert "not now" in err and "cold_start" in err
    server.forced.append((500, {"success": "false", "error": "replication failed"}, {}))
    assert _cli(server, "--retry-for", "0", "update", "k", "v") == 2
    assert "replication failed" in capsys.readouterr().err


def test_cli_connection_refused(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    assert main(["--host", "127.0.0.1", "--port", str(port), "count"]) == 2
    assert f"cannot connect to 127.0.0.1:{port}" in capsys.readouterr().err


def test_cli_config_and_backup(
    server: FakePbkv, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = _settings(tmp_path, primary="127.0.0.1", backup="127.0.0.1", port=str(server.port - 1))
    assert main(["--config", str(conf), "--backup", "count"]) == 0
    assert capsys.readouterr().out == "0\n"
    conf = _settings(tmp_path, primary="127.0.0.1", backup="127.0.0.2", port=str(server.port))
    assert main(["--config", str(conf), "count"]) == 0
    assert main(["--config", str(tmp_path / "missing.conf"), "count"]) == 2
    assert "missing.conf" in capsys.readouterr().err


def test_cli_without_settings_file_uses_defaults(
    server: FakePbkv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no conf/settings.conf here
    assert main(["--port", str(server.port), "count"]) == 0


def test_cli_shutdown(server: FakePbkv) -> None:
    assert _cli(server, "shutdown") == 0
    assert server.requests[-1][1] == "/kvman/shutdown"


def test_cli_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "COMMAND" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["get"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["count", "extra"]) == 2


def test_cli_serve_passes_everything_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def serve_main(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    monkeypatch.setattr(cli, "serve_main", serve_main)
    words = ["--role", "backup", "--port", "9000", "-h", "--", "x", "--config=c.conf"]
    assert main(["serve", *words]) == 7
    assert main(["serve"]) == 7
    assert seen == [words, []]


def test_cli_serve_rejects_client_options_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "serve_main", lambda argv: 0)
    assert main(["--port", "1", "serve", "--role", "primary"]) == 2
    assert "after 'serve'" in capsys.readouterr().err


def test_the_package_exports_both_clients():
    import pbkv

    assert pbkv.Client is Client and pbkv.AsyncClient is AsyncClient


# --- course mode: HTTP 200, the course failure shape, the reason in X-Pbkv-* headers --------


def _course(op: str, body: Any, **headers: str) -> Any:
    raw = json.dumps(body).encode()
    named = {name.replace("_", "-"): value for name, value in headers.items()}
    return parse_reply(op, 200, raw, named.get("retry-after"), named)


@pytest.mark.parametrize(
    ("op", "body"),
    [
        ("get", {"success": "false", "value": ""}),
        ("delete", {"success": "false", "value": ""}),
        ("insert", {"success": "false"}),
        ("update", {"success": "false"}),
        ("count", {"success": "false"}),
        ("dump", {"success": "false"}),
        ("status", {"success": "false"}),
        ("shutdown", {"success": "false"}),
    ],
)
def test_course_refusals_raise_what_http_mode_raises(op: str, body: Any) -> None:
    with pytest.raises(BadRequest) as bad:
        _course(op, body, x_pbkv_error="key must not be empty", x_pbkv_status="400")
    assert (bad.value.status, bad.value.error) == (400, "key must not be empty")
    with pytest.raises(ReplicationFailed) as failed:
        _course(op, body, x_pbkv_error="replication failed", x_pbkv_status="503")
    assert failed.value.status == 503
    with pytest.raises(Unavailable) as refused:
        _course(
            op,
            body,
            x_pbkv_error="not accepting this request in stage warm_start",
            x_pbkv_status="503",
            x_pbkv_stage="warm_start",
            retry_after="1",
        )
    assert not isinstance(refused.value, NotPrimary)
    assert (refused.value.stage, refused.value.retry_after) == ("warm_start", 1.0)
    with pytest.raises(NotPrimary) as backup:
        _course(
            op,
            body,
            x_pbkv_error="this server is the backup",
            x_pbkv_status="503",
            x_pbkv_stage="in_sync",
            x_pbkv_primary="127.0.0.1:8080",
        )
    assert (backup.value.primary, backup.value.stage) == ("127.0.0.1:8080", "in_sync")
    assert backup.value.body["primary"] == "127.0.0.1:8080"
    # A refusal added later (say 401) keeps its status; without one it is the reply's.
    with pytest.raises(BadRequest) as later:
        _course(op, body, x_pbkv_error="needs a token", x_pbkv_status="401")
    assert later.value.status == 401
    with pytest.raises(PbkvError) as bare:
        _course(op, body, x_pbkv_error="odd")
    assert bare.value.status == 200 and bare.value.error == "odd"


def test_course_logical_failures_have_no_reason_and_stay_results() -> None:
    headers = {"retry-after": "1"}
    assert parse_reply("get", 200, b'{"success":"false","value":""}', None, headers) is None
    assert parse_reply("insert", 200, b'{"success":"false"}', None, headers) is False
    assert parse_reply("update", 200, b'{"success":"false"}', None, {}) is False
    assert parse_reply("delete", 200, b'{"success":"false","value":""}', None, None) is None


def test_course_reason_is_unescaped() -> None:
    with pytest.raises(BadRequest) as info:
        _course(
            "get",
            {"success": "false", "value": ""},
            x_pbkv_error="parameter '\\u043a\\u043b\\u044e\\u0447' given more than once",
            x_pbkv_status="400",
        )
    assert info.value.error == "parameter 'ключ' given more than once"


# -- safe retries: a write carries an Idempotency-Key and is sent again ---------------


def test_a_write_is_retried_with_its_key_after_a_lost_connection(server: FakePbkv) -> None:
    with Client("127.0.0.1", server.port) as client:
        server.hangups = 1  # the request read, the connection closed: no reply
        assert client.insert("k", "v") is True
        assert client.get("k") == "v"
    first, second, read = server.idempotency_keys
    assert first and first == second and read is None  # one key, both attempts; none on reads
    assert client.insert("k2", "v") is True
    assert server.idempotency_keys[-1] not in (None, first)  # a fresh key per write


def test_a_write_is_retried_through_replication_failed_and_stage_refusals(
    server: FakePbkv,
) -> None:
    server.forced += [
        (503, {"success": "false", "error": "replication failed"}, {"Retry-After": "1"}),
        (503, {"success": "false", "error": "not now", "stage": "warm_start"}, {}),
    ]
    with Client("127.0.0.1", server.port) as client:
        started = time.monotonic()
        assert client.delete("missing") is None
        assert time.monotonic() - started < 1.0  # its own back-off, not Retry-After
    assert len(set(server.idempotency_keys)) == 1 and len(server.idempotency_keys) == 3


def test_retries_end_at_the_deadline_with_the_last_error(server: FakePbkv) -> None:
    failed = (503, {"success": "false", "error": "replication failed"}, {})
    server.forced += [failed] * 100
    with (
        Client("127.0.0.1", server.port, retry_for=0.3) as client,
        pytest.raises(ReplicationFailed),
    ):
        client.update("k", "v")
    assert 2 <= len(server.requests) < 20
    server.forced.clear()
    with Client("127.0.0.1", server.port) as client:
        server.forced.append((400, {"success": "false", "error": "bad"}, {}))
        with pytest.raises(BadRequest):  # not retried: the same request gets the same answer
            client.insert("k", "v")
    assert server.requests[-1][1] == "/kv/insert" and len(server.forced) == 0


def test_a_write_follows_the_primary_a_refusal_names(server: FakePbkv) -> None:
    other = FakePbkv()
    thread = threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        named = {"success": "false", "error": "backup", "primary": f"127.0.0.1:{other.port}"}
        server.forced.append((503, named, {}))
        with Client("127.0.0.1", server.port) as client:
            assert client.insert("k", "v") is True
            assert (client.host, client.port) == ("127.0.0.1", other.port)
        assert other.data == {"k": "v"} and server.data == {}
        assert server.idempotency_keys == other.idempotency_keys[:1]

        server.forced.append((503, named, {}))

        async def scenario() -> None:
            async with AsyncClient("127.0.0.1", server.port) as client:
                assert await client.insert("a", "1") is True
                assert client.port == other.port
                other.hangups = 1
                assert await client.update("a", "2") is True  # after a lost connection

        asyncio.run(scenario())
        assert other.data == {"k": "v", "a": "2"}
        assert other.idempotency_keys[-2] == other.idempotency_keys[-1] is not None
    finally:
        other.shutdown()
        other.server_close()
        thread.join()


def test_the_cli_retries_a_write(server: FakePbkv, capsys: pytest.CaptureFixture[str]) -> None:
    server.forced.append((500, {"success": "false", "error": "replication failed"}, {}))
    assert _cli(server, "insert", "k", "v") == 0
    assert server.data == {"k": "v"}
    assert len(server.idempotency_keys) == 2 and server.idempotency_keys[0]


def test_an_unknown_outcome_is_what_a_failed_write_raises(server: FakePbkv) -> None:
    """After an attempt that may have been applied (sent, no answer), the error raised at
    the deadline says so, whatever the later attempts met (refusals, refused connects)."""
    refused = (503, {"success": "false", "error": "not now", "stage": "cold_start"}, {})
    server.hangups = 1
    server.forced += [refused] * 100
    with Client("127.0.0.1", server.port, retry_for=0.3) as client:
        with pytest.raises(ConnectionError) as lost:
            client.insert("k", "v")
        assert isinstance(lost.value.__cause__, Unavailable)
    server.forced.clear()

    async def one_attempt() -> None:
        async with AsyncClient("127.0.0.1", server.port, retry_for=0) as client:
            assert await client.count() == 0
            server.hangups = 1  # the reused connection dies with the write in it
            with pytest.raises(ConnectionError):
                await client.insert("k", "v")  # not sent again: one attempt

    before = len(server.requests)
    asyncio.run(one_attempt())
    assert [path for _, path, _ in server.requests[before:]] == ["/kvman/countkey", "/kv/insert"]


# -- what a keyed write that ends without an answer raises ------------------------------

NOT_DURABLE = (
    "disk error: the write did not reach this server's disk (fsync failed); "
    "not acknowledged: it may or may not survive"
)
FAILED = (503, {"success": "false", "error": "replication failed"}, {})
UNSAVED = (503, {"success": "false", "error": NOT_DURABLE}, {"Retry-After": "1"})
REFUSED = (503, {"success": "false", "error": "not now", "stage": "cold_start"}, {})


def test_a_write_not_on_the_primarys_disk_is_not_durable_in_both_modes() -> None:
    with pytest.raises(NotDurable) as http_mode:
        _reply("insert", 503, {"success": "false", "error": NOT_DURABLE})
    assert http_mode.value.retry_after is None
    with pytest.raises(NotDurable) as course_mode:
        _course(
            "delete",
            {"success": "false", "value": ""},
            x_pbkv_error=NOT_DURABLE,
            x_pbkv_status="503",
            retry_after="1",
        )
    assert course_mode.value.retry_after == 1.0
    with pytest.raises(PbkvError) as refused:  # refused before applying: not this one
        _reply("insert", 507, {"success": "false", "error": "disk error: writes refused"})
    assert not isinstance(refused.value, NotDurable)


def _ended(server: FakePbkv, use_async: bool, **options: Any) -> BaseException:
    """The error an insert raises once its retries reach a short deadline."""

    async def insert_async() -> None:
        async with AsyncClient("127.0.0.1", server.port, retry_for=0.3, **options) as client:
            await client.insert("k", "v")

    try:
        if use_async:
            asyncio.run(insert_async())
        else:
            with Client("127.0.0.1", server.port, retry_for=0.3, **options) as client:
                client.insert("k", "v")
    except Exception as exc:
        return exc
    raise AssertionError("the insert succeeded")


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("hangup", "later", "raised", "cause"),
    [
        # Sent and never answered, then rewound: it may still be applied (a request
        # still queued at a paused primary, say): unknown, not "replication failed".
        (True, FAILED, OutcomeUnknown, ReplicationFailed),
        (True, UNSAVED, OutcomeUnknown, NotDurable),
        (True, REFUSED, OutcomeUnknown, Unavailable),
        # Every attempt answered: the last rewind says what is known.
        (False, FAILED, ReplicationFailed, None),
        (False, UNSAVED, NotDurable, None),
        # Every attempt refused: nothing was applied.
        (False, REFUSED, Unavailable, None),
    ],
    ids=["lost-failed", "lost-unsaved", "lost-refused", "failed", "unsaved", "refused"],
)
def test_a_keyed_write_at_its_deadline_raises_what_is_known(
    server: FakePbkv,
    use_async: bool,
    hangup: bool,
    later: tuple[int, Any, dict[str, str]],
    raised: type[Exception],
    cause: type[Exception] | None,
) -> None:
    server.hangups = int(hangup)
    server.forced += [later] * 200
    error = _ended(server, use_async)
    assert type(error) is raised
    if cause is not None:
        assert isinstance(error.__cause__, cause)
    assert len(set(server.idempotency_keys)) == 1 and len(server.idempotency_keys) >= 2


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_rewind_then_a_refusal_raises_the_rewind(server: FakePbkv, use_async: bool) -> None:
    server.forced += [FAILED] + [REFUSED] * 200
    error = _ended(server, use_async)
    assert type(error) is ReplicationFailed and isinstance(error.__cause__, Unavailable)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_write_without_a_key_is_not_sent_again_after_not_durable(
    server: FakePbkv, use_async: bool
) -> None:
    server.forced += [UNSAVED] * 5
    error = _ended(server, use_async, idempotency_keys=False)
    assert type(error) is NotDurable
    assert [path for _, path, _ in server.requests] == ["/kv/insert"]
