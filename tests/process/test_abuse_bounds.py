"""Attacks on real server processes that once cost descriptors or memory: TLS
connections that never start their handshake, and pipelined large inserts while the
backup is paused.  Each test fails without its bound."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from bench.abuse import StatusPeaks, descriptors, pipelined_inserts, silent_socket_closed
from pbkv.limits import RESERVED_CLIENTS
from pbkv.store import PAIR_OVERHEAD
from tests.support.harness import Pair, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


# -- TLS handshakes ---------------------------------------------------------------------------
@pytest.fixture
def authority(tmp_path):
    from tests.support.certs import Authority  # cryptography is a test dependency

    return Authority(tmp_path / "certs")


def test_silent_tls_connections_count_from_accept_and_close_at_the_handshake_deadline(
    make_pair, authority
):
    max_clients, deadline, silent = 50, 8.0, 600
    primary_cert, primary_key = authority.issue("primary", "127.0.0.1")
    pair: Pair = make_pair(
        tls_ca=str(authority.ca_file),
        tls_cert=primary_cert,
        tls_key=primary_key,
        max_clients=str(max_clients),
        header_timeout=str(deadline),
    )
    backup_cert, backup_key = authority.issue("backup", "127.0.0.2")
    pair.start("backup", "--tls-cert", backup_cert, "--tls-key", backup_key)
    pair.start("primary")
    pair.wait_stage("primary", "in_sync")
    pid = pair.pid("backup")
    assert pid is not None
    baseline = descriptors(pid)

    # Connections that open TCP and never send a byte of their handshake.
    opened = time.monotonic()
    socks = [socket.create_connection(pair.address["backup"]) for _ in range(silent)]
    for sock in socks:
        sock.setblocking(False)
    # Counted from accept: past max_clients and the channel's reserve, closed at once.
    held = max_clients + RESERVED_CLIENTS
    wait_for(
        lambda: sum(map(silent_socket_closed, socks)) >= silent - held,
        5,
        what="extra closed at once",
    )
    assert descriptors(pid) <= baseline + held + 2
    assert time.monotonic() - opened < deadline

    # A blip while they are held: the primary's channel still gets through the reserve.
    pair.kill("primary")
    pair.start("primary")
    pair.wait_stage("primary", "in_sync", deadline)
    assert time.monotonic() - opened < deadline, "resynced only once the handshakes expired"

    # No descriptor is held past the handshake deadline (plus the sweep's step).
    wait_for(lambda: all(map(silent_socket_closed, socks)), deadline + 3, what="all closed")
    assert time.monotonic() - opened < deadline + 3
    wait_for(lambda: descriptors(pid) <= baseline + 2, 3, what="descriptors given back")
    with pair.client("backup") as client:  # a TLS client is served again
        assert client.count() == 0
    state = pair.status("backup")
    assert state is not None and state["tls_handshakes"] == 0
    assert state["tls_handshakes_failed"] >= silent
    for sock in socks:
        sock.close()


# -- max_memory and the writes in flight --------------------------------------------------------
VALUE = 400_000
CONNECTIONS, PIPELINED = 4, 100


def test_pipelined_large_inserts_with_the_backup_paused_stay_under_max_memory(make_pair):
    limit = 50_000_000
    one_request = VALUE + PAIR_OVERHEAD + 16
    pair: Pair = make_pair(max_memory=str(limit), errors="http")
    pair.start_both()
    peaks = StatusPeaks(pair)
    peaks.start()
    codes = asyncio.run(pipelined_inserts(pair, CONNECTIONS, PIPELINED, VALUE))
    peaks.stop.set()
    peaks.join(10)
    state = pair.status("primary")
    assert state is not None
    assert state["pending_write_bytes"] == 0
    assert set(codes) <= {200, 503, 507}, sorted(set(codes))
    seen = {"memory_bytes": peaks.memory, "with_pending": peaks.with_pending}
    assert max(peaks.memory, state["memory_bytes"]) <= limit + one_request, seen
    assert peaks.with_pending <= limit + one_request, seen
    assert codes.count(507) > 0  # the limit was reached
    # Nothing over the limit reached the backup either.
    backup = pair.status("backup")
    assert backup is not None and backup["memory_bytes"] <= limit + one_request
