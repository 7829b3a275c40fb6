"""Finding the primary on real processes: the backup's 307 to the primary in ``http``
mode (followed as ``curl -L`` follows it), clients given several addresses, and
``pbkv cluster``.

A replicated pair in each error mode serves the module (primary on 127.0.0.1,
backup on 127.0.0.2, started by the real scripts); tests that stop a server take
a pair of their own. Each test keeps to its own keys.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from pbkv.cli import main
from pbkv.client import AsyncClient, Client, OutcomeUnknown
from tests.support.harness import Pair, wait_for
from tests.support.raw_http import FORM, Raw, Reply, request


def started_pair(tmp_path_factory, mode: str) -> Iterator[Pair]:
    pair = Pair(tmp_path_factory.mktemp(f"finding-{mode}"), errors=mode)
    try:
        pair.start_both()
        yield pair
    finally:
        pair.cleanup()


@pytest.fixture(scope="module")
def http_pair(tmp_path_factory) -> Iterator[Pair]:
    """A replicated pair, in sync, in the ``http`` error mode."""
    yield from started_pair(tmp_path_factory, "http")


@pytest.fixture(scope="module")
def course_pair(tmp_path_factory) -> Iterator[Pair]:
    """A replicated pair, in sync, in the ``course`` error mode."""
    yield from started_pair(tmp_path_factory, "course")


@pytest.fixture
def tag() -> str:
    return f"f{uuid.uuid4().hex[:10]}-"


def address_text(pair: Pair, role: str) -> str:
    return "%s:%d" % pair.address[role]


def send(address: tuple[str, int], data: bytes) -> Reply:
    with Raw(address) as conn:
        conn.send(data)
        return conn.reply()


# -- 307 to the primary --------------------------------------------------------------------
def test_a_write_to_the_backup_is_a_307_to_the_primary(http_pair: Pair, tag: str):
    primary = address_text(http_pair, "primary")
    target = f"/kv/insert?key={tag}q"
    reply = send(http_pair.address["backup"], request("POST", target, b"value=v"))
    assert reply.status == 307
    assert reply.headers["location"] == f"http://{primary}{target}"
    assert "retry-after" not in reply.headers  # it would ask a follower to wait
    body = reply.json
    assert body == {
        "success": "false",
        "error": f"this server is the backup; send writes to the primary at {primary}",
        "stage": "in_sync",
        "primary": primary,
    }
    # Nothing was written anywhere.
    assert http_pair.client("primary").get(f"{tag}q") is None


@pytest.mark.parametrize("path", ["/kv/insert", "/kv/update", "/kv/delete"])
def test_following_the_redirect_lands_on_the_primary(http_pair: Pair, tag: str, path: str):
    """What ``curl -L`` does for a 307: the same method and body, to Location."""
    key = f"{tag}follow"
    primary = http_pair.client("primary")
    if path != "/kv/insert":
        assert primary.insert(key, "before")
    body = f"key={key}&value=after".encode()
    host, port = http_pair.address["backup"]
    hops: list[tuple[int, str]] = []
    status, reply = 0, b""
    for _ in range(3):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": FORM})
            response = conn.getresponse()
            status, reply = response.status, response.read()
            hops.append((status, f"{host}:{port}"))
            if status != 307:
                break
            location = urlsplit(response.getheader("Location", ""))
            assert location.path == path
            host, port = location.hostname or "", location.port or 80
        finally:
            conn.close()
    assert hops == [
        (307, address_text(http_pair, "backup")),
        (200, address_text(http_pair, "primary")),
    ]
    expected = (
        {"success": "true", "value": "before"} if path == "/kv/delete" else {"success": "true"}
    )
    assert json.loads(reply) == expected
    value = None if path == "/kv/delete" else "after"
    assert primary.get(key) == value
    backup = http_pair.client("backup")
    assert backup.get(key) == value  # replicated as any write to the primary


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_follows_the_redirect(http_pair: Pair, tag: str):
    host, port = http_pair.address["backup"]
    url = f"http://{host}:{port}/kv/insert"
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-L",
            "--max-redirs",
            "2",
            "-w",
            "\\n%{http_code} %{num_redirects}",
            "-d",
            f"key={tag}curl&value=v",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body, codes = result.stdout.rsplit("\n", 1)
    assert json.loads(body) == {"success": "true"}
    assert codes == "200 1"
    assert http_pair.client("primary").get(f"{tag}curl") == "v"


def test_a_read_on_the_backup_of_a_pair_is_served_not_redirected(http_pair: Pair, tag: str):
    assert http_pair.client("primary").insert(f"{tag}r", "v")
    http_pair.wait_stage("backup", "in_sync")
    reply = send(http_pair.address["backup"], request("GET", f"/kv/get?key={tag}r"))
    assert reply.status == 200


def test_course_mode_still_answers_200_with_the_primary_in_headers(course_pair: Pair, tag: str):
    primary = address_text(course_pair, "primary")
    reply = send(
        course_pair.address["backup"], request("POST", "/kv/insert", f"key={tag}c&value=v".encode())
    )
    assert reply.status == 200
    assert reply.json == {"success": "false"}
    assert "location" not in reply.headers
    assert reply.headers["x-pbkv-status"] == "503"
    assert reply.headers["x-pbkv-primary"] == primary


# -- clients of several servers ------------------------------------------------------------
@pytest.fixture(params=["http", "course"])
def either_pair(request) -> Pair:
    pair: Pair = request.getfixturevalue(f"{request.param}_pair")
    return pair


def test_a_client_of_both_servers_talks_to_the_primary(either_pair: Pair, tag: str):
    backup, primary = address_text(either_pair, "backup"), address_text(either_pair, "primary")
    with Client(addresses=[backup, primary], timeout=10) as client:
        assert client.insert(f"{tag}k", "v")
        assert client.update(f"{tag}k", "w")
        assert client.get(f"{tag}k") == "w"
        assert client.address == either_pair.address["primary"]
        assert client.status()["role"] == "primary"


def test_a_client_given_only_the_backup_is_sent_to_the_primary(either_pair: Pair, tag: str):
    backup = address_text(either_pair, "backup")
    with Client(addresses=[backup], timeout=10) as client:
        assert client.insert(f"{tag}k", "v")
        assert client.delete(f"{tag}k") == "v"
        assert client.addresses == [either_pair.address["backup"], either_pair.address["primary"]]


def test_an_async_client_of_both_servers_talks_to_the_primary(either_pair: Pair, tag: str):
    addresses = [address_text(either_pair, role) for role in ("backup", "primary")]

    async def scenario() -> None:
        async with AsyncClient(addresses=addresses, timeout=10) as client:
            assert await client.insert(f"{tag}a", "1")
            assert await client.get(f"{tag}a") == "1"
            assert client.address == either_pair.address["primary"]

    asyncio.run(scenario())
    assert either_pair.client("primary").get(f"{tag}a") == "1"


def test_the_cli_with_both_addresses_writes_to_the_primary(either_pair: Pair, tag: str, capsys):
    addresses = ",".join(address_text(either_pair, role) for role in ("backup", "primary"))
    assert main(["--address", addresses, "insert", f"{tag}cli", "v"]) == 0
    assert main(["--address", addresses, "get", f"{tag}cli"]) == 0
    assert capsys.readouterr().out == "v\n"


def test_a_write_waits_for_a_killed_primary_to_come_back(pair: Pair, tag: str):
    """The primary is down when the write is asked: the client tries both servers
    (refused, and the backup names the primary) with pauses, and the write lands
    once the restarted primary is in sync again."""
    pair.start_both()
    assert pair.client("primary").insert(f"{tag}before", "1")
    pair.kill("primary")
    addresses = [address_text(pair, role) for role in ("primary", "backup")]
    outcome: dict[str, object] = {}

    def write() -> None:
        outcome["asked"] = time.monotonic()
        try:
            with Client(addresses=addresses, timeout=10, failover=60) as client:
                outcome["result"] = client.insert(f"{tag}during", "2")
                outcome["address"] = client.address
        except Exception as exc:  # reported below
            outcome["error"] = exc

    writer = threading.Thread(target=write)
    writer.start()
    wait_for(lambda: "asked" in outcome, what="the write to be asked")
    restarting = time.monotonic()
    pair.start("primary")
    writer.join(60)
    assert not writer.is_alive()
    assert "error" not in outcome, outcome
    assert outcome["result"] is True
    assert outcome["address"] == pair.address["primary"]
    assert outcome["asked"] < restarting  # it was asked while the primary was down
    pair.wait_stage("backup", "in_sync")
    assert pair.dump("primary") == pair.dump("backup")
    assert pair.dump("primary")[f"{tag}during"] == "2"


def test_a_lost_write_is_not_sent_again(pair: Pair, tag: str):
    """A write that reached the primary and got no reply (the primary paused) is
    OutcomeUnknown at once (after the request timeout, not the failover time): it
    is not sent to the backup, nor again to the primary (a write without a key: with
    one, the client would send it again until the deadline)."""
    pair.start_both()
    addresses = [address_text(pair, role) for role in ("primary", "backup")]
    with Client(addresses=addresses, timeout=1.0, failover=30, idempotency_keys=False) as client:
        assert client.count() == 0
        pair.signal("primary", signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(OutcomeUnknown):
                client.insert(f"{tag}lost", "v")
            assert time.monotonic() - started < 10
        finally:
            pair.signal("primary", signal.SIGCONT)
    pair.wait_stage("primary", "in_sync")
    pair.wait_stage("backup", "in_sync")
    # Whether the resumed primary still carried it out is what "unknown" means.
    assert pair.dump("primary") == pair.dump("backup") in ({}, {f"{tag}lost": "v"})


# -- pbkv cluster ----------------------------------------------------------------------------
def cluster_cells(output: str) -> list[list[str]]:
    lines = output.splitlines()
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[3:-1]]


def test_cluster_lists_a_pair_by_its_addresses(either_pair: Pair, capsys):
    primary, backup = address_text(either_pair, "primary"), address_text(either_pair, "backup")
    assert main(["cluster", primary, backup]) == 0
    assert cluster_cells(capsys.readouterr().out) == [
        [primary, "primary", "in_sync", "0", "-", "0", "-"],
        [backup, "backup", "in_sync", "0", "yes", "0", "-"],
    ]


def test_cluster_lists_the_pair_of_the_settings(either_pair: Pair, capsys):
    assert main(["--config", str(either_pair.config), "cluster", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(row["address"], row["role"], row["reachable"]) for row in listed] == [
        (address_text(either_pair, "primary"), "primary", True),
        (address_text(either_pair, "backup"), "backup", True),
    ]


def test_cluster_lists_a_stopped_server_as_unreachable(pair: Pair, capsys):
    pair.start_both()
    pair.kill("backup")
    primary, backup = address_text(pair, "primary"), address_text(pair, "backup")
    assert main(["cluster", primary, backup]) == 1
    cells = cluster_cells(capsys.readouterr().out)
    assert cells[0][:2] == [primary, "primary"]
    assert cells[1] == [backup, "-", "unreachable", "-", "-", "-", "-"]
