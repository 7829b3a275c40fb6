"""Clients of several servers finding the primary, against in-process imitations of
pbkv servers on real sockets (``tests/support/fake_pbkv.py``): which server each
request went to, and that a write is sent again only when it certainly never
reached a primary. (The same against real servers: tests/process.)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from pbkv.cli import main
from pbkv.client import (
    AsyncClient,
    Client,
    NotPrimary,
    OutcomeUnknown,
    Unavailable,
    format_address,
    parse_address,
    parse_reply,
)
from tests.support.fake_pbkv import FakePbkv, closed_port, running_fake


@pytest.fixture
def one() -> Iterator[FakePbkv]:
    with running_fake() as srv:
        yield srv


@pytest.fixture
def two() -> Iterator[FakePbkv]:
    with running_fake() as srv:
        yield srv


def paths(server: FakePbkv) -> list[str]:
    return [path for _, path, _ in server.requests]


def data_paths(server: FakePbkv) -> list[str]:
    return [path for path in paths(server) if path != "/kvman/status"]


# -- addresses -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("10.0.0.1:9000", ("10.0.0.1", 9000)),
        ("10.0.0.1", ("10.0.0.1", 8080)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::1]", ("::1", 8080)),
        ("::1", ("::1", 8080)),
        ("db.example:81", ("db.example", 81)),
        ("127.0.0.1:8080#4f2a", ("127.0.0.1", 8080)),  # a member's name
        ("http://127.0.0.1:8080", ("127.0.0.1", 8080)),
        (("h", 1), ("h", 1)),
    ],
)
def test_parse_address(text: str | tuple[str, int], address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize("text", ["", ":80", "h:port", "h:0", "h:65536", "[::1", "[::1]x"])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_format_address_brackets_ipv6() -> None:
    assert format_address("::1", 80) == "[::1]:80"
    assert format_address("10.0.0.1", 80) == "10.0.0.1:80"


def test_a_307_without_a_pbkv_body_names_the_primary_by_its_location() -> None:
    headers = {"location": "http://10.0.0.7:8080/kv/insert"}
    with pytest.raises(NotPrimary) as refused:
        parse_reply("insert", 307, b"", None, headers)
    assert (refused.value.status, refused.value.primary) == (307, "10.0.0.7:8080")


def test_one_address_is_the_old_client(one: FakePbkv) -> None:
    """No looking for the primary: a refusal is raised as it comes, to the caller
    (without keys: a client of one server retries only keyed writes)."""
    one.primary = "10.9.9.9:1"
    with Client("127.0.0.1", one.port, idempotency_keys=False) as client:
        assert client.failover == 0
        with pytest.raises(NotPrimary):
            client.insert("k", "v")
        one.redirects = True
        with pytest.raises(NotPrimary) as redirected:
            client.get("k")
        assert redirected.value.status == 307
    assert paths(one) == ["/kv/insert", "/kv/get"]


# -- the blocking client ---------------------------------------------------------------------
def test_the_primary_is_found_by_status_before_the_first_call(one: FakePbkv, two: FakePbkv) -> None:
    one.primary = two.address  # one is a backup
    with Client(addresses=[one.address, two.address], failover=5) as client:
        assert client.insert("k", "v")
        assert client.get("k") == "v"
        assert client.address == ("127.0.0.1", two.port)
    assert paths(one) == ["/kvman/status"]
    assert data_paths(two) == ["/kv/insert", "/kv/get"]


@pytest.mark.parametrize("redirects", [False, True], ids=["503", "307"])
def test_a_refusal_naming_the_primary_sends_the_write_there(
    one: FakePbkv, two: FakePbkv, redirects: bool
) -> None:
    with Client(addresses=[one.address, two.address], failover=5) as client:
        assert client.insert("a", "1")  # one is the primary
        one.primary, one.redirects = two.address, redirects  # a failover
        assert client.insert("b", "2")
        assert client.address == ("127.0.0.1", two.port)
    assert data_paths(one) == ["/kv/insert", "/kv/insert"]
    assert data_paths(two) == ["/kv/insert"]
    assert two.data == {"b": "2"}


def test_a_primary_named_that_was_not_given_is_followed(one: FakePbkv, two: FakePbkv) -> None:
    one.primary = two.address
    with Client(addresses=[one.address], failover=5) as client:
        assert client.update("k", "v") is False
        assert client.addresses == [("127.0.0.1", one.port), ("127.0.0.1", two.port)]
    assert data_paths(two) == ["/kv/update"]


def test_a_server_that_refuses_connections_is_passed_over(two: FakePbkv) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    with Client(addresses=[dead, two.address], failover=5) as client:
        assert client.insert("k", "v")
        two.data.clear()
        assert client.count() == 0


def test_a_write_lost_after_it_was_sent_is_not_sent_again(one: FakePbkv, two: FakePbkv) -> None:
    addresses = [one.address, two.address]
    with Client(addresses=addresses, failover=5, idempotency_keys=False) as client:
        assert client.count() == 0
        one.hangups = 1  # reads the insert, then hangs up without a reply
        with pytest.raises(OutcomeUnknown, match="may or may not have been applied"):
            client.insert("k", "v")
        assert client.count() == 0  # and the client carries on
    assert data_paths(one) == ["/kvman/countkey", "/kv/insert", "/kvman/countkey"]
    assert data_paths(two) == []


def test_a_keyed_write_lost_after_it_was_sent_is_sent_again_with_its_key(
    one: FakePbkv, two: FakePbkv
) -> None:
    with Client(addresses=[one.address, two.address], failover=5) as client:
        assert client.count() == 0
        one.hangups = 1  # reads the insert, then hangs up without a reply
        assert client.insert("k", "v") is True
    assert data_paths(one) == ["/kvman/countkey", "/kv/insert", "/kv/insert"]
    keys = [
        key
        for key, path in zip(one.idempotency_keys, paths(one), strict=True)
        if path == "/kv/insert"
    ]
    assert keys[0] and keys[0] == keys[1]
    assert data_paths(two) == []


def test_a_write_without_a_reply_in_time_is_not_sent_again(one: FakePbkv, two: FakePbkv) -> None:
    addresses = [one.address, two.address]
    with Client(addresses=addresses, timeout=0.3, failover=5, idempotency_keys=False) as client:
        assert client.count() == 0
        one.delay = 1.0
        with pytest.raises(OutcomeUnknown) as lost:
            client.delete("k")
        assert isinstance(lost.value.__cause__, TimeoutError)
    assert data_paths(one) == ["/kvman/countkey", "/kv/delete"]
    assert data_paths(two) == []


def test_a_read_lost_after_it_was_sent_is_asked_again(one: FakePbkv, two: FakePbkv) -> None:
    one.data["k"] = "v"
    two.primary = one.address  # two is a backup: the answer must come from one
    with Client(addresses=[one.address, two.address], failover=5) as client:
        assert client.count() == 1
        one.hangups = 3  # the read, its resend on a fresh connection, a status probe
        assert client.get("k") == "v"
    assert data_paths(one) == ["/kvman/countkey", "/kv/get", "/kv/get", "/kv/get"]
    assert data_paths(two) == []


def test_a_stage_refusal_is_waited_out(one: FakePbkv) -> None:
    one.stage_refusals = 2  # a new primary with no in-sync backup yet
    with Client(addresses=[one.address], failover=5) as client:
        started = time.monotonic()
        assert client.insert("k", "v")
        waited = time.monotonic() - started
    assert data_paths(one) == ["/kv/insert"] * 3
    assert 0.05 <= waited < 2  # two pauses: 50 ms, then 100 ms


def test_it_gives_up_when_the_failover_time_is_over(one: FakePbkv) -> None:
    dead = [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"]
    with Client(addresses=dead, failover=0.5) as client:
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            client.insert("k", "v")
        assert 0.5 <= time.monotonic() - started < 3
    one.stage_refusals = 1000
    with Client(addresses=[one.address], failover=0.3) as client, pytest.raises(Unavailable):
        client.get("k")


def test_two_servers_naming_each_other_are_asked_with_pauses(one: FakePbkv, two: FakePbkv) -> None:
    one.primary, two.primary = two.address, one.address
    client = Client(addresses=[one.address, two.address], failover=0.6)
    with client, pytest.raises(NotPrimary):
        client.insert("k", "v")
    tries = len(data_paths(one)) + len(data_paths(two))
    assert 2 <= tries <= 20  # back-off, not a tight loop


def test_status_and_shutdown_stay_with_the_server_at_hand(one: FakePbkv, two: FakePbkv) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    with Client(addresses=[dead, two.address], failover=5) as client:
        with pytest.raises(ConnectionRefusedError):
            client.status()  # the first server, not looked for
        assert client.count() == 0
        assert client.status()["role"] == "primary"  # now at the primary
    assert data_paths(two) == ["/kvman/countkey"]


# -- the asyncio client ------------------------------------------------------------------
def test_async_follows_a_failover_and_never_resends_a_lost_write(
    one: FakePbkv, two: FakePbkv
) -> None:
    async def scenario() -> None:
        addresses = [one.address, two.address]
        async with AsyncClient(addresses=addresses, failover=5, idempotency_keys=False) as client:
            assert await client.insert("a", "1")
            one.primary, one.redirects = two.address, True
            assert await client.insert("b", "2")
            assert client.address == ("127.0.0.1", two.port)
            two.hangups = 1
            with pytest.raises(OutcomeUnknown):
                await client.update("b", "3")
            assert await client.get("b") == "2"

    asyncio.run(scenario())
    assert data_paths(one) == ["/kv/insert", "/kv/insert"]
    assert data_paths(two) == ["/kv/insert", "/kv/update", "/kv/get"]


def test_async_finds_the_primary_past_a_dead_server(one: FakePbkv, two: FakePbkv) -> None:
    one.primary = two.address

    async def scenario() -> None:
        dead = f"127.0.0.1:{closed_port()}"
        client = AsyncClient(addresses=[dead, one.address, two.address], failover=5)
        async with client:
            assert await client.insert("k", "v")
            assert await client.dump() == [("k", "v")]

    asyncio.run(scenario())
    assert paths(one) == ["/kvman/status"]
    assert data_paths(two) == ["/kv/insert", "/kvman/dump"]


def test_async_waits_out_a_stage_and_gives_up_in_time(one: FakePbkv) -> None:
    async def scenario() -> None:
        one.stage_refusals = 2
        async with AsyncClient(addresses=[one.address], failover=5) as client:
            assert await client.insert("k", "v")
        dead = [f"127.0.0.1:{closed_port()}"]
        async with AsyncClient(addresses=dead, failover=0.3) as client:
            started = time.monotonic()
            with pytest.raises(ConnectionRefusedError):
                await client.count()
            assert 0.3 <= time.monotonic() - started < 3

    asyncio.run(scenario())
    assert data_paths(one) == ["/kv/insert"] * 3


def test_async_write_lost_mid_request_on_a_single_address_is_outcome_unknown(
    one: FakePbkv,
) -> None:
    async def scenario() -> None:
        async with AsyncClient(
            "127.0.0.1", one.port, timeout=0.3, idempotency_keys=False
        ) as client:
            one.delay = 1.0
            with pytest.raises(OutcomeUnknown):
                await client.insert("k", "v")

    asyncio.run(scenario())
    assert data_paths(one) == ["/kv/insert"]


# -- the command line ----------------------------------------------------------------------
def test_cli_addresses_find_the_primary(
    one: FakePbkv, two: FakePbkv, capsys: pytest.CaptureFixture[str]
) -> None:
    one.primary = two.address
    dead = f"127.0.0.1:{closed_port()}"
    assert main(["--address", f"{dead},{one.address}", "-a", two.address, "insert", "k", "v"]) == 0
    assert main(["get", "k", "--address", f"{one.address},{two.address}"]) == 0
    assert capsys.readouterr().out == "v\n"
    assert data_paths(one) == []
    assert data_paths(two) == ["/kv/insert", "/kv/get"]


def test_cli_gives_up_after_failover_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    dead = [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"]
    assert main(["-a", ",".join(dead), "--failover", "0.2", "count"]) == 2
    err = capsys.readouterr().err
    assert "connection refused" in err and "no primary found among 2 servers" in err


def test_cli_reports_a_lost_write(one: FakePbkv, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's writes carry a key: a lost one is sent again with it until --failover
    passes, then reported as a write whose outcome is unknown."""
    one.delay = 1.0  # no reply in time: to the status probe, then to the delete
    assert main(["-a", one.address, "--timeout", "0.3", "--failover", "1", "delete", "k"]) == 2
    assert "may or may not have been applied" in capsys.readouterr().err
    assert set(data_paths(one)) == {"/kv/delete"}
    keys = {
        key
        for key, path in zip(one.idempotency_keys, paths(one), strict=True)
        if path == "/kv/delete"
    }
    assert len(keys) == 1 and None not in keys


def test_cli_refuses_a_bad_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-a", "host:port", "count"]) == 2
    assert "bad address" in capsys.readouterr().err


def test_cli_cluster_lists_the_servers_given(
    one: FakePbkv, two: FakePbkv, capsys: pytest.CaptureFixture[str]
) -> None:
    one.status_fields = {"role": "primary", "stage": "in_sync", "epoch": 0, "lag": 0}
    two.primary = one.address
    two.status_fields = {"stage": "in_sync", "epoch": 0, "lag": 0}
    dead = f"127.0.0.1:{closed_port()}"
    assert main(["cluster", one.address, two.address, "--address", dead]) == 1  # one unreachable
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split("|")[1:-1] == [
        f" {'Member':<15} ",
        " Role    ",
        " Stage       ",
        " Epoch ",
        " In sync ",
        " Lag ",
        " Lease left ",
    ]
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[3:6]]
    assert cells == [
        [one.address, "primary", "in_sync", "0", "-", "0", "-"],
        [two.address, "backup", "in_sync", "0", "yes", "0", "-"],
        [dead, "-", "unreachable", "-", "-", "-", "-"],
    ]
    assert main(["cluster", one.address, two.address, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(row["address"], row["role"], row["in_sync"]) for row in listed] == [
        (one.address, "primary", None),
        (two.address, "backup", True),
    ]
    assert paths(one) == paths(two) == ["/kvman/status", "/kvman/status"]
