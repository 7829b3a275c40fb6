"""The ``pbkv`` command and the client library against a real server process.

One standalone primary per error mode (``course`` and ``http``), started with the
real ``bin/start_server``, serves the module: the CLI and the clients must give the
same results and the same errors in both.  Each test keeps to its own keys.  Shutdown
tests use their own servers.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import pytest

from pbkv.cli import escape, main
from pbkv.client import AsyncClient, BadRequest, Client
from pbkv.config import Settings
from tests.support.harness import (
    Pair,
    _alive,
    free_port,
    process_age,
    standalone_server,
    wait_for,
)

MAX_KEY = Settings().max_key_bytes

TRICKY = [
    "a&b=c",
    "1+1=2",
    "100%",
    "%41",
    "%",
    "  spaced   out  ",
    "line\r\nbreak\n",
    "tab\there",
    "nul\0byte",
    "quote\"s and 'single'",
    "back\\slash\\",
    "emoji 😀🎉 and ключ",
    "?#;/",
    "",
]


@pytest.fixture(scope="module", params=["course", "http"])
def server(request, tmp_path_factory) -> Iterator[Pair]:
    """A standalone primary in each error mode."""
    mode = request.param
    yield from standalone_server(tmp_path_factory, f"cli-{mode}", errors=mode)


@pytest.fixture
def tag() -> str:
    return f"c{uuid.uuid4().hex[:10]}-"


@pytest.fixture
def pbkv(server, capsys):
    """Run the CLI against the server: (exit status, stdout, stderr)."""
    host, port = server.address["primary"]

    def run(*words: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = main(["--host", host, "--port", str(port), *words])
        out, err = capsys.readouterr()
        return status, out, err

    return run


@pytest.fixture
def client(server) -> Iterator[Client]:
    with Client(*server.address["primary"], timeout=10.0) as connected:
        yield connected


# -- the command line --------------------------------------------------------------------------
def test_cli_insert_get_update_delete(pbkv, client, tag):
    key = tag + "k"
    assert pbkv("get", key) == (1, "", f"pbkv: key not found: {key}\n")
    assert pbkv("insert", key, "one") == (0, "", "")
    assert client.get(key) == "one"
    assert pbkv("insert", key, "two") == (1, "", f"pbkv: key already exists: {key}\n")
    assert pbkv("get", key) == (0, "one\n", "")
    assert pbkv("update", key, "three") == (0, "", "")
    assert client.get(key) == "three"
    assert pbkv("update", tag + "nope", "x") == (1, "", f"pbkv: key not found: {tag}nope\n")
    assert pbkv("delete", key) == (0, "three\n", "")
    assert pbkv("delete", key) == (1, "", f"pbkv: key not found: {key}\n")
    assert client.get(key) is None


def test_cli_json_output(pbkv, client, tag):
    key = tag + "j"
    assert pbkv("--json", "insert", key, 'va"l') == (0, '{"success": "true"}\n', "")
    assert pbkv("--json", "insert", key, "x") == (1, '{"success": "false"}\n', "")
    status, out, _ = pbkv("--json", "get", key)
    assert (status, json.loads(out)) == (0, {"success": "true", "value": 'va"l'})
    status, out, _ = pbkv("get", key, "--json")  # options after the command too
    assert (status, json.loads(out)) == (0, {"success": "true", "value": 'va"l'})
    status, out, _ = pbkv("--json", "update", tag + "missing", "x")
    assert (status, json.loads(out)) == (1, {"success": "false"})
    status, out, _ = pbkv("--json", "delete", key)
    assert (status, json.loads(out)) == (0, {"success": "true", "value": 'va"l'})
    status, out, _ = pbkv("--json", "delete", key)
    assert (status, json.loads(out)) == (1, {"success": "false", "value": ""})
    status, out, _ = pbkv("--json", "count")
    assert (status, json.loads(out)) == (0, {"result": str(client.count())})
    status, out, _ = pbkv("--json", "dump")
    assert status == 0
    assert [tuple(pair) for pair in json.loads(out)] == client.dump()
    status, out, _ = pbkv("--json", "status")
    assert status == 0
    assert json.loads(out)["role"] == "primary"


def test_cli_count_and_dump(pbkv, client, tag):
    pairs = {tag + "plain": "value", tag + "odd\tkey": "line\nbreak\\ and\r\0"}
    for key, value in pairs.items():
        assert pbkv("insert", key, value)[0] == 0
    status, out, err = pbkv("count")
    assert (status, err) == (0, "")
    assert int(out) == client.count()

    status, out, err = pbkv("dump", "--tsv")
    assert (status, err) == (0, "")
    lines = out.split("\n")
    assert lines.pop() == ""
    assert len(lines) == client.count()
    assert all(line.count("\t") == 1 for line in lines)
    assert f"{tag}plain\tvalue" in lines
    assert f"{tag}odd\\tkey\tline\\nbreak\\\\ and\\r\\0" in lines
    assert escape(f"{tag}odd\tkey") + "\t" + escape(pairs[tag + "odd\tkey"]) in lines


def test_cli_status(pbkv, server, client):
    status, out, err = pbkv("status")
    assert (status, err) == (0, "")
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {name: value.strip() for name, value in fields.items()}
    assert fields["role"] == "primary"
    assert fields["stage"] == "in_sync"
    assert fields["address"] == "%s:%d" % server.address["primary"]
    assert int(fields["keys"]) == client.count()
    assert fields["checksum"]
    # Seconds since this server started: more than nothing, at most the process's age.
    assert 0 < float(fields["uptime"]) <= process_age(server.pid("primary")) + 0.02


@pytest.mark.parametrize("text", TRICKY, ids=repr)
def test_cli_tricky_strings(pbkv, client, tag, text):
    key = tag + text
    assert pbkv("insert", key, text) == (0, "", "")
    assert client.get(key) == text
    assert pbkv("get", key) == (0, text + "\n", "")
    assert pbkv("update", key, text + text) == (0, "", "")
    assert pbkv("delete", key) == (0, text + text + "\n", "")
    assert client.get(key) is None


def test_cli_settings_file(server, capsys, tag):
    config = str(server.config)
    assert main(["--config", config, "insert", tag, "from the settings file"]) == 0
    assert main(["get", tag, "--config", config]) == 0
    assert capsys.readouterr().out == "from the settings file\n"


def test_cli_bad_requests_exit_2(pbkv, client):
    before = client.count()
    status, out, err = pbkv("insert", "", "v")
    assert (status, out) == (2, "")
    assert err.startswith("pbkv: ") and "key" in err and "400" in err
    status, out, err = pbkv("insert", "k" * (MAX_KEY + 1), "v")
    assert (status, out) == (2, "")
    assert "413" in err
    assert client.count() == before


def test_cli_connection_refused_exits_2(capsys):
    port = free_port(("127.0.0.1",))
    for words in (["get", "k"], ["insert", "k", "v"], ["count"], ["dump"], ["status"]):
        # One attempt: a write would otherwise be retried for --retry-for seconds first.
        assert main(["--host", "127.0.0.1", "--port", str(port), "--retry-for", "0", *words]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err == f"pbkv: cannot connect to 127.0.0.1:{port}: connection refused\n"


def test_cli_usage_error_exits_2(capsys):
    assert main(["insert", "only-a-key"]) == 2
    assert "usage" in capsys.readouterr().err


def test_cli_shutdown(make_pair, capsys):
    servers = make_pair(standalone="true")
    servers.start("primary")
    host, port = servers.address["primary"]
    pid = servers.pid("primary")
    assert pid is not None
    assert main(["--host", host, "--port", str(port), "shutdown"]) == 0
    wait_for(lambda: not _alive(pid), what="the server to exit")
    capsys.readouterr()
    assert main(["--host", host, "--port", str(port), "count"]) == 2
    assert "connection refused" in capsys.readouterr().err


# -- the blocking client -------------------------------------------------------------------
def test_client_every_method(client, tag):
    before = client.count()
    key = tag + "k"
    assert client.get(key) is None
    assert client.insert(key, "v1") is True
    assert client.insert(key, "v2") is False
    assert client.get(key) == "v1"
    assert client.update(key, "v3") is True
    assert client.update(tag + "missing", "v") is False
    assert client.count() == before + 1
    assert (key, "v3") in client.dump()
    assert client.dump_dict()[key] == "v3"
    assert len(client.dump()) == before + 1
    status = client.status()
    assert status["role"] == "primary" and status["stage"] == "in_sync"
    assert status["keys"] == before + 1
    assert client.delete(key) == "v3"
    assert client.delete(key) is None
    assert client.count() == before


def test_client_tricky_strings(client, tag):
    expected = {f"{tag}{n}{text}": text for n, text in enumerate(TRICKY)}
    for key, value in expected.items():
        assert client.insert(key, value) is True
    for key, value in expected.items():
        assert client.get(key) == value
    dumped = client.dump_dict()
    assert {key: dumped[key] for key in expected} == expected
    for key, value in expected.items():
        assert client.update(key, value + "&=") is True
        assert client.delete(key) == value + "&="


def test_client_limits(client, tag):
    big = "é" * (1024 * 1024 // 2)  # exactly 1 MiB of UTF-8
    assert client.insert(tag + "big", big) is True
    assert client.get(tag + "big") == big
    with pytest.raises(BadRequest) as info:
        client.update(tag + "big", big + "x")
    assert info.value.status == 413
    key = (tag + "k" * MAX_KEY)[:MAX_KEY]
    assert client.insert(key, "v") is True
    with pytest.raises(BadRequest) as info:
        client.get(key + "k")
    assert info.value.status == 413
    with pytest.raises(BadRequest) as info:
        client.insert("", "v")
    assert info.value.status == 400
    # The connection is still good after the errors.
    assert client.delete(key) == "v"
    assert client.delete(tag + "big") == big


def test_client_from_settings(server, tag):
    with Client.from_settings(server.config) as client:
        assert client.insert(tag, "x") is True
        assert client.status()["address"] == "%s:%d" % server.address["primary"]


# -- the asyncio client --------------------------------------------------------------------
def test_async_client_every_method(server, tag):
    host, port = server.address["primary"]

    async def scenario() -> None:
        async with AsyncClient(host, port, timeout=10.0) as client:
            before = await client.count()
            key = tag + "k"
            assert await client.get(key) is None
            assert await client.insert(key, "v1") is True
            assert await client.insert(key, "v2") is False
            assert await client.get(key) == "v1"
            assert await client.update(key, "v3") is True
            assert await client.update(tag + "missing", "v") is False
            assert await client.count() == before + 1
            assert (key, "v3") in await client.dump()
            assert (await client.dump_dict())[key] == "v3"
            status = await client.status()
            assert status["role"] == "primary" and status["keys"] == before + 1
            assert await client.delete(key) == "v3"
            assert await client.delete(key) is None
            assert await client.count() == before
            with pytest.raises(BadRequest) as info:
                await client.get("")
            assert info.value.status == 400
            with pytest.raises(BadRequest) as info:
                await client.insert(key, "x" * (1024 * 1024 + 1))
            assert info.value.status == 413
            assert await client.get(key) is None

    asyncio.run(scenario())


def test_async_client_tricky_strings_and_concurrency(server, tag):
    host, port = server.address["primary"]
    expected = {f"{tag}{n}{text}": text for n, text in enumerate(TRICKY)}

    async def scenario() -> None:
        async with AsyncClient.from_settings(server.config, timeout=10.0) as client:
            # Concurrent calls on one client take turns on its one connection.
            results = await asyncio.gather(
                *(client.insert(key, value) for key, value in expected.items())
            )
            assert results == [True] * len(expected)
            values = await asyncio.gather(*(client.get(key) for key in expected))
            assert values == list(expected.values())
        # Many clients at once, each on its own connection.
        clients = [AsyncClient(host, port, timeout=10.0) for _ in range(20)]
        try:
            values = await asyncio.gather(
                *(c.get(key) for c, key in zip(clients, expected, strict=False))
            )
            assert values == list(expected.values())[: len(values)]
            deleted = await asyncio.gather(
                *(c.delete(key) for c, key in zip(clients, expected, strict=False))
            )
            assert deleted == list(expected.values())[: len(deleted)]
        finally:
            for c in clients:
                await c.close()

    asyncio.run(scenario())


def test_async_client_shutdown(make_pair):
    servers = make_pair(standalone="true")
    servers.start("primary")
    host, port = servers.address["primary"]
    pid = servers.pid("primary")
    assert pid is not None

    async def scenario() -> None:
        client = AsyncClient(host, port, timeout=10.0)
        assert await client.insert("k", "v") is True
        await client.shutdown()

    asyncio.run(scenario())
    wait_for(lambda: not _alive(pid), what="the server to exit")
    with pytest.raises(ConnectionRefusedError), Client(host, port) as client:
        client.count()


def test_sync_client_shutdown(make_pair):
    servers = make_pair(standalone="true")
    servers.start("primary")
    pid = servers.pid("primary")
    assert pid is not None
    client = servers.client()
    assert client.insert("k", "v") is True
    client.shutdown()
    wait_for(lambda: not _alive(pid), what="the server to exit")
    assert servers.status("primary") is None
