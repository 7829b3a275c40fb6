"""The multi-host topology of ``pbkv.testing.hosts``: hosts on one bridge, the
client in the hub reaching each, a host isolated from the others (both ways)
while the client still reaches it, heal, and teardown of everything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pbkv.launcher import process_alive
from pbkv.testing import hosts
from pbkv.testing.hosts import CLIENT, Hosts

pytestmark = pytest.mark.netns

PORT = 9000
# Accepts and closes connections for as long as it lives.
LISTENER = (
    "import socket, sys\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', int(sys.argv[1])))\n"
    "s.listen()\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    s.accept()[0].close()\n"
)
NAMES = ("a", "b", "c")


@pytest.fixture(scope="module")
def net() -> Iterator[Hosts]:
    reason = hosts.available()
    if reason is not None:
        pytest.skip(reason)
    with Hosts(NAMES) as topology:
        for name in NAMES:
            process = topology.popen(
                name, [sys.executable, "-c", LISTENER, str(PORT)], stdout=subprocess.PIPE
            )
            assert process.stdout is not None and process.stdout.readline() == b"listening\n"
        yield topology


def connects(net: Hosts, source: str, target: str, timeout: float = 0.5) -> bool:
    """Whether a TCP connection from ``source`` to ``target``'s listener opens."""
    with net.inside(source):
        try:
            socket.create_connection((net.addresses[target], PORT), timeout=timeout).close()
        except OSError:
            return False
    return True


def test_every_host_reaches_every_other_and_the_client_reaches_all(net: Hosts) -> None:
    for source in (CLIENT, *NAMES):
        for target in NAMES:
            assert connects(net, source, target), f"{source} -> {target}"


def test_isolation_blocks_hosts_both_ways_but_not_the_client(net: Hosts) -> None:
    net.isolate("b")
    try:
        for other in ("a", "c"):
            assert not connects(net, other, "b"), f"{other} -> b"
            assert not connects(net, "b", other), f"b -> {other}"
        assert connects(net, CLIENT, "b")
        assert connects(net, "a", "c") and connects(net, "c", "a")
    finally:
        net.heal()
    for other in ("a", "c"):
        assert connects(net, other, "b") and connects(net, "b", other)
    assert net.isolated == {}


def test_isolation_can_keep_a_host_reachable(net: Hosts) -> None:
    net.isolate("a", keep_reachable_from=[CLIENT, "c"])
    try:
        assert connects(net, "c", "a") and connects(net, "a", "c")
        assert not connects(net, "b", "a") and not connects(net, "a", "b")
    finally:
        net.heal()


def test_isolating_an_unknown_host_or_the_hub_is_refused(net: Hosts) -> None:
    with pytest.raises(ValueError):
        net.isolate("nowhere")
    with pytest.raises(ValueError):
        net.isolate(CLIENT)


def test_two_topologies_coexist_and_teardown_removes_namespaces_and_processes() -> None:
    reason = hosts.available()
    if reason is not None:
        pytest.skip(reason)
    with Hosts(2) as first, Hosts(2) as second:
        assert set(first.namespaces.values()).isdisjoint(second.namespaces.values())
        # A daemon the topology did not start itself goes too.
        first.run("h1", "sh", "-c", "sleep 300 >/dev/null 2>&1 &")
        pids = first.pids("h1")
        assert pids
        names = list(first.namespaces.values())
    assert not any(os.path.exists(f"/run/netns/{name}") for name in names)
    assert not any(process_alive(pid) for pid in pids)


def test_teardown_after_an_error_inside() -> None:
    reason = hosts.available()
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(RuntimeError, match="boom"), Hosts(1) as net:
        names = list(net.namespaces.values())
        raise RuntimeError("boom")
    assert not any(os.path.exists(f"/run/netns/{name}") for name in names)
