"""Bulk load and export on real processes: ``pbkv dump`` and ``pbkv load`` round-trip
every pair, an invalid line stops a load with its number and every line before it
applied on both servers, the load route obeys the limits and both error modes, and a
load cut by ``kill -9`` of the primary leaves whole batches, in order, on the backup."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import pty
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pbkv.bulk import json_lines
from tests.support.harness import Pair, wait_for
from tests.support.raw_http import Raw, Reply

TRICKY = {
    "plain": "value",
    "crlf\r\n": "line\r\nbreak",
    "nul\0": "\0",
    'quo"te': '"\\',
    "emoji 😀": "韩国人 🎉",
    "empty": "",
    "comma,": ",;\t",
    "& = + %": "%20+",
}
LOAD_PAIRS = 4096  # pairs a load chunk (one replicated batch) holds


def pbkv(pair: Pair, *words: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The ``pbkv`` command against ``pair`` (its settings file)."""
    command = [sys.executable, "-m", "pbkv", "--config", str(pair.config), *words]
    return subprocess.run(command, input=stdin, capture_output=True, timeout=120)


def numbered(count: int, start: int = 0) -> list[tuple[str, str]]:
    return [(f"key-{i:08d}", f"value {i}\r\n") for i in range(start, start + count)]


def load_request(body: bytes, query: str = "", headers: tuple[str, ...] = ()) -> bytes:
    head = [f"POST /kvman/load{query} HTTP/1.1", "Host: pbkv.test", *headers]
    head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def start_load(
    pair: Pair, pairs: list[tuple[str, str]], folder: Path
) -> tuple[Path, subprocess.Popen[bytes]]:
    """``pairs`` written to a file in ``folder``, and ``pbkv load`` of it started."""
    data = folder / "pairs.jsonl"
    data.write_bytes(json_lines(pairs))
    command = [sys.executable, "-m", "pbkv", "--config", str(pair.config), "load", str(data)]
    return data, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def both_hold(pair: Pair, expected: dict[str, str]) -> None:
    for role in ("primary", "backup"):
        assert pair.dump(role) == expected, role


def test_dump_then_load_round_trips_every_pair_exactly(make_pair, tmp_path: Path) -> None:
    source = make_pair()
    source.start_both()
    expected = {**TRICKY, **dict(numbered(9000))}
    with source.client() as client:
        for key, value in TRICKY.items():
            assert client.insert(key, value)
    loaded = pbkv(source, "load", stdin=json_lines(numbered(9000)))
    assert loaded.returncode == 0, loaded.stderr
    assert b"loaded 9000 lines" in loaded.stdout and b"9000 pairs written" in loaded.stdout
    dump = tmp_path / "dump.jsonl"
    done = pbkv(source, "dump", str(dump))
    assert done.returncode == 0, done.stderr
    assert len(dump.read_bytes().splitlines()) == len(expected)

    target = make_pair()
    target.start_both()
    done = pbkv(target, "load", str(dump))
    assert done.returncode == 0, done.stderr
    assert f"{len(expected)} pairs written, 0 skipped".encode() in done.stdout
    both_hold(target, expected)

    # The same file again: insert mode keeps every pair (skipped), upsert writes them all.
    with target.client() as client:
        assert client.update("plain", "changed")
    done = pbkv(target, "load", str(dump))
    assert f"0 pairs written, {len(expected)} skipped".encode() in done.stdout, done.stdout
    assert target.dump("backup")["plain"] == "changed"
    done = pbkv(target, "load", "--mode", "upsert", str(dump))
    assert f"{len(expected)} pairs written, 0 skipped".encode() in done.stdout, done.stdout
    both_hold(target, expected)

    # CSV, from stdin.
    out = io.StringIO()
    csv.writer(out).writerows(expected.items())
    third = make_pair()
    third.start_both()
    done = pbkv(third, "load", "--csv", "-", stdin=out.getvalue().encode())
    assert done.returncode == 0, done.stderr
    both_hold(third, expected)


def test_an_invalid_line_is_named_and_every_line_before_it_is_on_both_servers(make_pair) -> None:
    pair = make_pair()
    pair.start_both()
    good = numbered(10_000)
    data = json_lines(good) + b'["half a pair"]\n' + json_lines(numbered(5, 10_000))
    done = pbkv(pair, "load", "-", stdin=data)
    assert done.returncode == 2
    assert b"line 10001: not a JSON array of two strings" in done.stderr, done.stderr
    assert b"10000 lines applied before it (10000 pairs written" in done.stderr, done.stderr
    both_hold(pair, dict(good))

    done = pbkv(pair, "load", "--csv", "-", stdin=b'a,1\n"b\nb",2\nc,3,extra\nd,4\n')
    assert done.returncode == 2 and b"line 4: " in done.stderr, done.stderr
    assert pair.dump("backup") == {**dict(good), "a": "1", "b\nb": "2"}


def test_load_replies_in_course_mode_carry_the_reason_in_headers(make_pair) -> None:
    pair = make_pair(client_token="letmein", max_value_bytes="16")
    pair.start_both()
    address = pair.address["primary"]
    auth = ("Authorization: Bearer letmein",)
    with Raw(address) as conn:
        conn.send(load_request(json_lines(numbered(3))))
        refused = conn.reply()
        conn.send(load_request(json_lines(numbered(3)), "?mode=upsert", auth))
        done = conn.reply()
        long_value = json_lines([("k", "x" * 17)])
        conn.send(load_request(json_lines(numbered(2, 3)) + long_value, "", auth))
        too_long = conn.reply()
        conn.send(load_request(b"", "?mode=merge", auth))
        bad_mode = conn.reply()
        conn.send(load_request(b"", "", (*auth, "Idempotency-Key: abc")))
        keyed = conn.reply()
    assert (refused.status, refused.body) == (200, b'{"success":"false"}')
    assert refused.headers["x-pbkv-status"] == "401"
    assert done.json == {"success": "true", "lines": "3", "applied": "3", "skipped": "0"}
    assert (too_long.status, too_long.body) == (200, b'{"success":"false"}')
    assert too_long.headers["x-pbkv-status"] == "413"
    assert too_long.headers["x-pbkv-error"] == "line 3: value longer than 16 bytes"
    assert (too_long.headers["x-pbkv-line"], too_long.headers["x-pbkv-lines"]) == ("3", "2")
    assert bad_mode.headers["x-pbkv-status"] == "400"
    assert keyed.headers["x-pbkv-status"] == "400"
    assert "Idempotency-Key" in keyed.headers["x-pbkv-error"]
    both_hold(pair, dict(numbered(5)))


def test_load_refusals_in_http_mode(make_pair) -> None:
    pair = make_pair(errors="http", max_memory="40000")
    pair.start_both()
    primary, backup = pair.address["primary"], pair.address["backup"]
    with Raw(backup) as conn:
        conn.send(load_request(json_lines(numbered(3))))
        to_backup = conn.reply()
    assert to_backup.status == 503
    assert to_backup.json["primary"] == "%s:%d" % primary
    with Raw(primary) as conn:
        conn.send(load_request(b'["a","1"]\n{"b":"2"}\n'))
        invalid = conn.reply()
        # Each pair takes about 160 bytes: max_memory stops the load in its second chunk.
        conn.send(load_request(json_lines(numbered(2 * LOAD_PAIRS, 100))))
        full = conn.reply()
        conn.send(b"GET /kvman/countkey HTTP/1.1\r\nHost: x\r\n\r\n")
        count = conn.reply()  # the connection still serves
    assert invalid.status == 400
    assert invalid.json["error"].startswith("line 2: not a JSON array of two strings")
    assert (invalid.json["line"], invalid.json["lines"], invalid.json["applied"]) == ("2", "1", "1")
    assert full.status == 507, full
    assert full.json["line"] == "1" and full.json["applied"] == "0", full.json
    assert "max_memory" in full.json["error"]
    assert count.json == {"result": "1"}
    both_hold(pair, {"a": "1"})


def test_a_stalled_load_gets_408_after_body_timeout(make_pair) -> None:
    pair = make_pair(body_timeout="1.5")
    pair.start_both()
    with Raw(pair.address["primary"], timeout=20) as conn:
        head = b"POST /kvman/load HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = json_lines(numbered(LOAD_PAIRS + 10))
        conn.send(head + b"%x\r\n%s\r\n" % (len(body), body) + b'5\r\n["a"')  # then stalls
        reply: Reply = conn.reply()
        assert reply.headers["x-pbkv-status"] == "408"
        assert "request body not received within 1.5 s" in reply.headers["x-pbkv-error"]
        assert reply.headers["x-pbkv-lines"] == str(LOAD_PAIRS + 10)
        assert conn.reply().status == 408  # then the connection closes
        assert conn.closed_by_server()
    both_hold(pair, dict(numbered(LOAD_PAIRS + 10)))


def test_a_load_cut_by_kill_9_of_the_primary_leaves_whole_batches_in_order(
    make_pair, tmp_path: Path
) -> None:
    pair = make_pair()
    pair.start_both()
    pairs = numbered(400_000)
    data, load = start_load(pair, pairs, tmp_path)
    try:
        # Some batches acknowledged (by the backup, to the primary), then the crash.
        acked = wait_for(
            lambda: (s := pair.status("primary")) is not None and s["batches_acked"] >= 3 and s,
            60,
            what="three acknowledged load batches",
            interval=0.005,
        )
        pair.signal("primary", signal.SIGKILL)
        _, err = load.communicate(timeout=60)
    finally:
        load.kill()
    assert load.returncode == 2, err  # the load did not finish: it was cut
    held = pair.dump("backup")
    # Whole chunks, in file order: a prefix of the file, a multiple of a chunk long, and
    # at least what the primary had acknowledged when it was killed.
    assert len(held) % LOAD_PAIRS == 0
    assert len(held) >= acked["batches_acked"] * LOAD_PAIRS
    assert held == dict(pairs[: len(held)])

    # The primary comes back from the backup's copy; the same load again in insert mode
    # skips what is there and writes the rest.
    pair.start("primary")
    pair.wait_stage("primary", "in_sync")
    assert pair.dump("primary") == held
    done = pbkv(pair, "load", str(data))
    assert done.returncode == 0, done.stderr
    summary = f"{len(pairs) - len(held)} pairs written, {len(held)} skipped".encode()
    assert summary in done.stdout, done.stdout
    assert pair.status("backup")["keys"] == len(pairs)


def test_a_load_under_persistence_survives_both_servers_killed_mid_load_and_after(
    make_pair, tmp_path: Path
) -> None:
    """With ``always``: both servers killed during a load come back with the same whole
    chunks, a prefix of the file; the load run again completes, and once it is
    acknowledged, both killed again come back with every pair."""
    pair = make_pair(persistence="always", data_dir=str(tmp_path / "data"))
    pair.start_both()
    pairs = numbered(200_000)
    data, load = start_load(pair, pairs, tmp_path)
    try:
        wait_for(
            lambda: (s := pair.status("primary")) is not None and s["batches_acked"] >= 2,
            60,
            what="two acknowledged load batches",
            interval=0.005,
        )
        pair.kill("primary")
        pair.kill("backup")
        load.communicate(timeout=60)
    finally:
        load.kill()
    assert load.returncode == 2  # cut: nothing of it was acknowledged to the client

    def restart_both() -> dict[str, str]:
        pair.start("backup")
        pair.start("primary")
        pair.wait_stage("primary", "in_sync", 60)
        pair.wait_stage("backup", "in_sync", 60)
        held = pair.dump("primary")
        assert pair.dump("backup") == held
        return held

    held = restart_both()
    assert len(held) % LOAD_PAIRS == 0 and held == dict(pairs[: len(held)])
    done = pbkv(pair, "load", str(data))
    assert done.returncode == 0, done.stderr
    pair.kill("primary")
    pair.kill("backup")
    assert restart_both() == dict(pairs)


def test_pbkv_load_draws_its_progress_on_a_terminal_only(make_pair, tmp_path: Path) -> None:
    pair = make_pair()
    pair.start_both()
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(json_lines(numbered(300_000)))
    command = [sys.executable, "-m", "pbkv", "--config", str(pair.config), "load", str(data)]
    controller, terminal = pty.openpty()
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=terminal, timeout=120)
        os.close(terminal)
        drawn = b""
        with contextlib.suppress(OSError):  # EIO: the terminal's other end is closed
            while chunk := os.read(controller, 65536):
                drawn += chunk
    finally:
        os.close(controller)
    assert done.returncode == 0 and b"300000 pairs written" in done.stdout, done.stdout
    assert drawn.endswith(b"\r\x1b[K")  # the bar is cleared before the summary
    assert b"MB/s" in drawn and b"%" in drawn, drawn[-300:]
    again = pbkv(pair, "load", str(data))  # not a terminal: no bar
    assert again.returncode == 0 and b"\x1b[K" not in again.stderr and b"MB/s" not in again.stderr


@pytest.mark.parametrize("stall", [False, True])
def test_requests_after_a_load_on_its_connection_see_it(make_pair, stall: bool) -> None:
    pair = make_pair()
    pair.start_both()
    body = json_lines(numbered(3 * LOAD_PAIRS))
    get = b"GET /kv/get?key=key-%08d HTTP/1.1\r\nHost: x\r\n\r\n" % (3 * LOAD_PAIRS - 1)
    insert = b"POST /kv/insert?key=key-00000000&value=x HTTP/1.1\r\nHost: x\r\n\r\n"
    with Raw(pair.address["primary"], timeout=30) as conn:
        data = load_request(body) + get + insert
        if stall:  # the pipelined requests arrive in the same read as the body's end
            conn.send(data)
        else:
            sock = conn.sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(data), 65536):
                sock.sendall(data[start : start + 65536])
        assert conn.reply().json["applied"] == str(3 * LOAD_PAIRS)
        assert conn.reply().json == {"success": "true", "value": f"value {3 * LOAD_PAIRS - 1}\r\n"}
        assert conn.reply().json == {"success": "false"}  # the load wrote it first


def test_pbkv_load_meets_the_servers_limits_with_the_line_number(make_pair) -> None:
    pair = make_pair(max_value_bytes="16")
    pair.start_both()
    data = json_lines([("a", "1"), ("b", "2"), ("c", "3"), ("d", "x" * 17), ("e", "5")])
    done = pbkv(pair, "load", "-", stdin=data)
    assert done.returncode == 2
    assert b"line 4: value longer than 16 bytes; 3 lines applied before it" in done.stderr, (
        done.stderr
    )
    both_hold(pair, {"a": "1", "b": "2", "c": "3"})
