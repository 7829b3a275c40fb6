"""Real server processes for integration tests: ``pbkv.testing.cluster`` plus
bookkeeping of the clients a test opens, so teardown can close them."""

from __future__ import annotations

import os
from collections.abc import Iterator

from pbkv.client import Client
from pbkv.testing.cluster import (
    BIN,
    FAST_SETTINGS,
    REPO,
    LocalPair,
    _bindable,
    free_port,
    process_alive,
    wait_for,
)

__all__ = [
    "BIN",
    "FAST_SETTINGS",
    "REPO",
    "Pair",
    "free_port",
    "process_age",
    "standalone_server",
    "wait_for",
]

_alive = process_alive
_bindable = _bindable


class Pair(LocalPair):
    """A ``LocalPair`` whose clients are closed at cleanup."""

    def __init__(self, tmp, **settings: str) -> None:
        super().__init__(tmp, **settings)
        self._clients: list[Client] = []

    def client(self, role: str = "primary", timeout: float = 10.0) -> Client:
        client = super().client(role, timeout)
        self._clients.append(client)
        return client

    def cleanup(self) -> None:
        for client in self._clients:
            client.close()
        super().cleanup()


def standalone_server(tmp_path_factory, name: str, **settings: str) -> Iterator[Pair]:
    """A started standalone primary for a module-scoped fixture; killed afterwards."""
    servers = Pair(tmp_path_factory.mktemp(name), standalone="true", **settings)
    try:
        servers.start("primary")
        yield servers
    finally:
        servers.cleanup()


def process_age(pid: int) -> float:
    """Seconds since process ``pid`` started, from /proc (to bound an uptime it reports).
    Both clocks count whole ticks, so the age may be short by one tick of 10 ms."""
    with open(f"/proc/{pid}/stat") as stat:
        # Fields after the command name; the start time (field 22) is in ticks since boot.
        started = int(stat.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    with open("/proc/uptime") as uptime:
        return float(uptime.read().split()[0]) - started
