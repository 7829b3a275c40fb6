"""CPU per request of pbkv's own Python, in one process: no sockets, no peer.

A standalone primary's ``Node`` and one ``HttpProtocol`` connection whose transport
only counts what it is given; requests are fed to the connection as a socket would
hand them over (one read each) and answered at once. What is left out is what every
server on uvloop pays alike (the read, the write, epoll) and the replication channel;
what remains is the Python a request costs: reading it, routing, parameters, the
store, building and queueing the reply. The bare protocol of ``bench/http_stacks.py``,
fed the same gets, is the floor.

This measure changes little with the load of a shared machine (CPU time of this
process, the best of several rounds), where throughput does, so it can tell apart
changes of a few percent. Another checkout's pbkv is measured beside this one's with
``--checkout PATH`` (one process each):

    python -m bench.request_cost
    python -m bench.request_cost --checkout ../before --requests 200000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvloop

REPO = Path(__file__).resolve().parent.parent
KEYS = 1000
VALUE = b"x" * 100
HOST = b"127.0.0.1:8080"
CONNECTIONS = 32  # for the replicated primary: the writes of one batch


class CountingTransport:
    """Takes what a connection writes and keeps only its size."""

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


def get_request(i: int) -> bytes:
    return b"GET /kv/get?key=k%09d HTTP/1.1\r\nHost: %b\r\n\r\n" % (i, HOST)


def insert_request(i: int) -> bytes:
    body = b"key=k%09d&value=%b" % (i, VALUE)
    return (
        b"POST /kv/insert HTTP/1.1\r\nHost: %b\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%b"
        % (HOST, len(body), body)
    )


def keyed_insert_request(i: int) -> bytes:
    """An insert carrying an ``Idempotency-Key`` of 36 characters, as the clients send."""
    body = b"key=k%09d&value=%b" % (i, VALUE)
    return (
        b"POST /kv/insert HTTP/1.1\r\nHost: %b\r\nIdempotency-Key: %036d\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%b"
        % (HOST, i, len(body), body)
    )


def _best(feed: Callable[[bytes], None], requests: Sequence[bytes], rounds: int) -> float:
    """Microseconds of CPU per request, the best round."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for request in requests:
            feed(request)
        best = min(best, (time.process_time() - started) / len(requests) * 1e6)
    return best


async def _measure_pbkv(count: int, rounds: int) -> dict[str, float]:
    from pbkv.testing.inprocess import standalone_connection

    transport = CountingTransport()
    feed = standalone_connection(transport).data_received
    for i in range(KEYS):
        feed(insert_request(i))
    gets = [get_request(i % KEYS) for i in range(count)]
    results = {"get": _best(feed, gets, rounds)}
    # Inserts of new keys each round (standalone: answered at once, nothing replicated).
    inserts = [insert_request(KEYS + i) for i in range(count * rounds)]
    results["insert"] = min(
        _best(feed, inserts[r * count : (r + 1) * count], 1) for r in range(rounds)
    )
    keyed = [keyed_insert_request(KEYS + count * rounds + i) for i in range(count * rounds)]
    results["keyed insert"] = min(
        _best(feed, keyed[r * count : (r + 1) * count], 1) for r in range(rounds)
    )
    if transport.writes != KEYS + count * rounds * 3:
        raise RuntimeError(f"{transport.writes} replies written: a request went unanswered")
    return results


class _ReplicatedApp:
    """The HTTP layer's App over a primary core in sync whose backup is played here:
    every batch is encoded as it would go out, and acknowledged at once."""

    accepts_replication = False

    def __init__(self) -> None:
        from pbkv.config import Settings
        from pbkv.primary import PrimaryCore
        from pbkv.stages import Stage
        from pbkv.store import make_store
        from pbkv.wire import FrameCodec

        self.core = PrimaryCore(Settings(), make_store("sharded", 16), 0.0, initial=Stage.IN_SYNC)
        self.core.confirmed = True
        self.core.codec = FrameCodec()
        # The backup's copy, for the checksum its ACK carries; the CPU it takes is the
        # backup's, counted apart and left out of the primary's (``backup_seconds``).
        self.backup = self.core.store.empty_like()
        self.backup_seconds = 0.0
        # A checkout from before ACKs carried the backup's checksum takes the seq alone
        # (looked up once: the rounds' time is the primary's).
        from pbkv.wire import Ack

        self.ack_checksum = "checksum" in {field.name for field in dataclasses.fields(Ack)}

    def read(self, command: Any, key: str) -> Any:
        return self.core.read(command, key)

    def submit(self, command: Any, key: str, value: Any, reply: Any, ident: Any = None) -> Any:
        outcome = self.core.submit(command, key, value, reply, ident)
        self.core.take_actions()  # FlushSoon: flushed once the round's requests are in
        return outcome

    def acknowledge_all(self) -> None:
        from pbkv.actions import Respond
        from pbkv.wire import Ack

        core, backup = self.core, self.backup
        core.flush(1.0)
        while core.in_flight:
            batch = core.in_flight[0]
            if not self.ack_checksum:
                core._batch_acked(Ack(batch.seq))  # type: ignore[call-arg]
                continue
            assert not batch.absent  # no load chunks here
            started = time.process_time()
            backup.apply(batch.ops)
            backup.idempotency.apply(batch.time, batch.keyed)
            ack = Ack(batch.seq, backup.checksum, len(backup))
            self.backup_seconds += time.process_time() - started
            core._batch_acked(ack)
            for action in core.take_actions():
                if type(action) is Respond:
                    action.reply(action.outcome)


async def _measure_replicated(count: int, rounds: int) -> dict[str, float]:
    """A replicated primary's Python per insert: requests arrive on CONNECTIONS
    connections, one each, and their batch is then sent and acknowledged (as at 64
    client connections, where a batch holds about that many writes)."""
    from pbkv.http import HttpProtocol, Limits

    app = _ReplicatedApp()
    connections = []
    for _ in range(CONNECTIONS):
        connection = HttpProtocol(app, Limits(), set(), "http")  # type: ignore[arg-type]
        connection.connection_made(CountingTransport())  # type: ignore[arg-type]
        connections.append(connection.data_received)

    def feed_rounds(requests: Sequence[bytes]) -> float:
        started, backup = time.process_time(), app.backup_seconds
        for i in range(0, len(requests), CONNECTIONS):
            for feed, request in zip(connections, requests[i : i + CONNECTIONS], strict=False):
                feed(request)
            app.acknowledge_all()
        spent = time.process_time() - started - (app.backup_seconds - backup)
        return spent / len(requests) * 1e6

    results = {}
    start = 10 * KEYS
    for name, make in (
        ("replicated insert", insert_request),
        ("replicated keyed", keyed_insert_request),
    ):
        best = float("inf")
        for _ in range(rounds):
            best = min(best, feed_rounds([make(start + i) for i in range(count)]))
            start += count
        results[name] = best
    return results


async def _measure_bare(count: int, rounds: int) -> dict[str, float]:
    from bench import http_stacks

    http_stacks.STORE.update({"k%09d" % i: VALUE.decode() for i in range(KEYS)})
    connection = http_stacks.BareProtocol()
    connection.connection_made(CountingTransport())  # type: ignore[arg-type]
    gets = [get_request(i % KEYS) for i in range(count)]
    return {"get": _best(connection.data_received, gets, rounds)}


def measure(which: str, count: int, rounds: int) -> dict[str, float]:
    if which == "bare":
        return uvloop.run(_measure_bare(count, rounds))
    results = uvloop.run(_measure_pbkv(count, rounds))
    results.update(uvloop.run(_measure_replicated(count, rounds)))
    return results


def _in_subprocess(which: str, checkout: Path | None, count: int, rounds: int) -> dict[str, float]:
    """One measure in a fresh process (``checkout``: whose pbkv it imports)."""
    command = [sys.executable, "-m", "bench.request_cost", "--one", which, "--json"]
    command += ["--requests", str(count), "--rounds", str(rounds)]
    env = dict(os.environ)
    if checkout is not None:
        env["PBKV_CHECKOUT"] = str(checkout)
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"{which} {checkout or ''} failed: {done.stderr.strip()[-500:]}")
    result: dict[str, float] = json.loads(done.stdout)
    return result


WRITES = ("insert", "keyed insert", "replicated insert", "replicated keyed")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.request_cost",
        description="CPU per request of pbkv's Python request path, in one process.",
    )
    ap.add_argument("--requests", type=int, default=100_000, help="per round (default 100000)")
    ap.add_argument("--rounds", type=int, default=5, help="the best is kept (default 5)")
    ap.add_argument(
        "--checkout", type=Path, action="append", default=[], help="another pbkv checkout"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--one", choices=("pbkv", "bare"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one is not None:
        checkout = os.environ.get("PBKV_CHECKOUT")
        if checkout:
            sys.path.insert(0, checkout)  # its pbkv, not this one's
        print(json.dumps(measure(args.one, args.requests, args.rounds)))
        return 0
    rows: dict[str, dict[str, float]] = {}
    rows["bare protocol"] = _in_subprocess("bare", None, args.requests, args.rounds)
    rows["pbkv"] = _in_subprocess("pbkv", None, args.requests, args.rounds)
    for checkout in args.checkout:
        rows[f"pbkv at {checkout}"] = _in_subprocess(
            "pbkv", checkout.resolve(), args.requests, args.rounds
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    bare = rows["bare protocol"]["get"]
    width = max(len(name) for name in rows)
    print(f"CPU per request (us), best of {args.rounds} rounds of {args.requests} requests")
    print(
        f"{'':<{width}}  {'get':>6}  {'vs bare':>7}  {'insert':>6}  {'keyed':>6}"
        f"  {'repl':>6}  {'keyed':>6}  {'ratio':>6}"
    )
    for name, row in rows.items():
        writes = [f"{row[w]:6.2f}" if w in row else f"{'':>6}" for w in WRITES]
        if "replicated keyed" in row:
            writes.append(f"{row['replicated insert'] / row['replicated keyed']:5.2f}x")
        print(f"{name:<{width}}  {row['get']:6.2f}  {row['get'] / bare:6.2f}x  {'  '.join(writes)}")
    print("insert: a standalone primary (answered at once, nothing replicated);")
    print("keyed: the same with an Idempotency-Key of 36 characters;")
    print(
        f"repl: a replicated primary, {CONNECTIONS} writes a batch, the backup played in process;"
    )
    print("ratio: repl / its keyed (inserts' throughput with keys over without, on one core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
