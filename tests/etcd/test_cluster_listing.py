"""The members registered in a real etcd, as the clients and ``pbkv cluster`` find
them: a real pair registered under the cluster's prefix (as members register
themselves, ``HOST:PORT#RUN`` bound to a lease) and a registered member that
does not answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from pbkv.cli import main
from pbkv.client import AsyncClient, Client
from pbkv.coordinator import Coordinator
from pbkv.testing.etcd import EtcdServer
from tests.support.harness import Pair

GHOST = "127.0.0.9:1#dead"  # registered, but nobody listens there


@pytest.fixture
def registered(etcd: EtcdServer, prefix: str, tmp_path) -> Iterator[Pair]:
    """A started pair whose two servers, and a ghost, are registered under ``prefix``."""
    pair = Pair(tmp_path / "pair")
    try:
        pair.start_both()
        members = {
            "%s:%d#p1" % pair.address["primary"]: {"role": "primary", "epoch": 0},
            "%s:%d#b1" % pair.address["backup"]: {"role": "backup", "epoch": 0},
            GHOST: {"role": "spare", "epoch": 3},
        }

        async def register() -> None:
            # A generous timeout: on a loaded machine, grpc's first connection alone
            # has taken over 2 s (it failed as "tcp handshaker shutdown").
            async with await Coordinator.open(etcd.client_url, prefix, 10.0) as coordinator:
                lease = await coordinator.grant(60)
                for member, info in members.items():
                    await coordinator.register(member, info, lease)

        asyncio.run(register())
        yield pair
    finally:
        pair.cleanup()


def test_cluster_lists_the_registered_members(
    registered: Pair, etcd: EtcdServer, prefix: str, capsys
) -> None:
    primary, backup = ("%s:%d" % registered.address[role] for role in ("primary", "backup"))
    command = ["--coordinator", etcd.client_url, "--cluster", prefix, "cluster"]
    assert main(command) == 1  # the ghost does not answer
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"+ Cluster: {prefix} ")
    cells = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[3:-1]]
    assert cells == [
        [primary, "primary", "in_sync", "0", "-", "0", "-"],
        [backup, "backup", "in_sync", "0", "yes", "0", "-"],
        ["127.0.0.9:1", "spare", "unreachable", "3", "-", "-", "-"],
    ]
    assert main([*command, "--json"]) == 1
    listed = json.loads(capsys.readouterr().out)
    assert [row["member"] for row in listed] == [f"{primary}#p1", f"{backup}#b1", GHOST]


def test_cluster_without_members_or_etcd_says_so(etcd: EtcdServer, capsys) -> None:
    assert main(["--coordinator", etcd.client_url, "--cluster", "nobody-here", "cluster"]) == 2
    assert "no member of cluster 'nobody-here'" in capsys.readouterr().err
    dead = "http://127.0.0.1:1"
    assert main(["--coordinator", dead, "--timeout", "0.5", "cluster"]) == 2
    assert f"etcd at {dead}" in capsys.readouterr().err


def test_clients_from_the_coordinator_find_the_primary(
    registered: Pair, etcd: EtcdServer, prefix: str, capsys
) -> None:
    with Client.from_coordinator(etcd.client_url, prefix, timeout=5) as client:
        assert client.insert("from-etcd", "1")
        assert client.address == registered.address["primary"]

    async def scenario() -> None:
        client = await AsyncClient.from_coordinator(etcd.client_url, prefix, timeout=5)
        async with client:
            assert await client.get("from-etcd") == "1"
            assert client.address == registered.address["primary"]

    asyncio.run(scenario())
    command = ["--coordinator", etcd.client_url, "--cluster", prefix]
    assert main([*command, "update", "from-etcd", "2"]) == 0
    assert registered.client("backup").get("from-etcd") == "2"
    with pytest.raises(ValueError, match="no member"):
        Client.from_coordinator(etcd.client_url, "nobody-here")
