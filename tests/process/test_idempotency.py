"""Safe retries against real processes: a write's Idempotency-Key survives kill -9 of
the primary (the backup's copy, table included, wins the handshake), a retry in
flight waits for the first attempt, and the Python client's retries carry a write
through the primary's death and restart to its true outcome."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from pbkv.client import Client
from tests.support.harness import Pair
from tests.support.keyed_writes import keyed, retry_them, write_three
from tests.support.raw_http import Raw, Reply


def in_sync(pair: Pair) -> None:
    pair.wait_stage("primary", "in_sync")
    pair.wait_stage("backup", "in_sync")


def test_a_retry_after_kill_9_of_the_primary_gets_the_original_reply(make_pair) -> None:
    pair = make_pair(errors="http")
    pair.start_both()
    address = pair.address["primary"]
    write_three(address)
    before = pair.status("primary")
    assert before is not None and before["idempotency_entries"] == 3

    pair.kill("primary")  # kill -9: the primary's copy and table are gone
    pair.start("primary")  # empty: it warm-starts from the backup's copy
    in_sync(pair)
    assert "primary stage cold_start -> warm_start" in pair.log("primary")
    status = pair.status("primary")
    assert status is not None and status["checksum"] == before["checksum"]
    assert status["idempotency_entries"] == 3

    retry_them(address)
    after = pair.status("primary")
    assert after is not None and after["checksum"] == before["checksum"]
    assert after["writes_replayed"] == 2 and after["idempotency_keys_reused"] == 1
    assert pair.dump("primary") == pair.dump("backup") == {"k": "v"}


def test_a_retry_in_flight_waits_for_the_first_attempt(make_pair) -> None:
    pair = make_pair(errors="http", ack_timeout="10")
    pair.start_both()
    address = pair.address["primary"]
    pair.signal("backup", signal.SIGSTOP)  # the first attempt waits for its ACK
    try:
        with Raw(address) as first, Raw(address) as retry:
            first.send(keyed("insert", "key=k&value=v", "wait-1"))
            time.sleep(0.3)
            retry.send(keyed("insert", "key=k&value=v", "wait-1"))
            time.sleep(0.3)
            pair.signal("backup", signal.SIGCONT)
            replies: list[Reply] = [first.reply(), retry.reply()]
    finally:
        pair.signal("backup", signal.SIGCONT)
    assert [reply.json for reply in replies] == [{"success": "true"}] * 2
    status = pair.status("primary")
    assert status is not None and status["writes_replicated"] == 1
    assert status["writes_replayed"] == 1


def test_the_client_carries_a_write_through_the_primarys_death(make_pair) -> None:
    pair = make_pair()
    pair.start_both()
    host, port = pair.address["primary"]
    with Client(host, port, timeout=2.0) as client:
        assert client.insert("before", "1") is True
    pair.kill("primary")
    result: dict[str, Any] = {}

    def write() -> None:
        with Client(host, port, timeout=2.0, retry_for=30.0) as client:
            try:
                result["insert"] = client.insert("during", "2")
                result["delete"] = client.delete("before")
            except Exception as exc:  # reported below
                result["error"] = exc

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.5)  # its first attempts are refused: nobody listens
    pair.start("primary")
    writer.join(40)
    assert not writer.is_alive()
    assert result == {"insert": True, "delete": "1"}
    in_sync(pair)
    assert pair.dump("primary") == pair.dump("backup") == {"during": "2"}
