"""The pure parts of pbkv/limits.py: dump streams, the pump, the request-memory guard."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from pbkv.limits import SMALL_BODY, ConnectionLimits, DumpStream, Guard, LogThrottle, StreamPump
from pbkv.store import HashStore, ShardedStore


def drain(stream: DumpStream, between=lambda: None) -> bytes:
    out = b""
    while not stream.done:
        out += stream.next_chunk()
        between()
    return out


def test_a_dump_stream_is_the_json_of_the_whole_store():
    for store in (ShardedStore(4), HashStore()):
        for i in range(5000):
            store.put(f"k{i}", f'v{i} "quoted" 😀')
        body = drain(DumpStream(store, chunked=False, pairs_per_chunk=300))
        assert sorted(map(tuple, json.loads(body))) == sorted(store.items())
    assert drain(DumpStream(ShardedStore(4), chunked=False)) == b"[]"


def test_chunked_framing_ends_with_the_last_chunk():
    store = ShardedStore(2)
    store.put("a", "1")
    body = drain(DumpStream(store, chunked=True))
    assert body.endswith(b"0\r\n\r\n")
    decoded, rest = b"", body
    while True:
        size, _, rest = rest.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        decoded, rest = decoded + rest[: int(size, 16)], rest[int(size, 16) + 2 :]
    assert json.loads(decoded) == [["a", "1"]]


def test_each_shard_is_dumped_as_it_was_when_the_dump_reached_it():
    store = ShardedStore(4)
    for i in range(4000):
        store.put(f"k{i}", "old")
    stream = DumpStream(store, chunked=False, pairs_per_chunk=100)
    seen_at_copy: dict[int, dict[str, str]] = {}
    counter = iter(range(10**9))

    def write() -> None:  # a write between every two chunks, in every shard
        i = next(counter)
        shard = stream._shard
        if shard not in seen_at_copy and 0 <= shard < 4 and stream._pairs is not None:
            seen_at_copy[shard] = dict(store._shards[shard])  # the state the copy holds
        store.put(f"k{i % 4000}", f"new{i}")
        store.remove(f"k{(i * 7) % 4000}")
        store.put(f"extra{i}", "x")

    pairs = json.loads(drain(stream, write))
    expected = {k: v for snapshot in seen_at_copy.values() for k, v in snapshot.items()}
    assert len(pairs) == len(expected) and dict(map(tuple, pairs)) == expected


def test_the_pump_runs_each_step_once_per_turn_within_its_budget():
    async def run() -> list[str]:
        pump = StreamPump(budget=1.0)
        order: list[str] = []

        def step(name: str, times: int):
            def again() -> None:
                order.append(name)
                if order.count(name) < times:
                    pump.want(again)

            return again

        pump.want(step("a", 3))
        pump.want(step("b", 2))
        for _ in range(10):
            await asyncio.sleep(0)
        return order

    assert asyncio.run(run()) == ["a", "b", "a", "b", "a"]  # interleaved, not one by one


def test_the_pump_times_its_turns_on_the_clock_and_in_cpu_time():
    def busy(seconds: float) -> None:
        started = time.thread_time()
        while time.thread_time() - started < seconds:
            pass

    async def run(step) -> StreamPump:
        pump = StreamPump()
        pump.want(step)
        await asyncio.sleep(0)
        return pump

    # A turn the thread spent sleeping (as when another process has the CPU) is
    # long on the clock only; one spent computing is long in both.
    waiting = asyncio.run(run(lambda: time.sleep(0.03)))
    assert waiting.longest >= 0.03 and waiting.longest_cpu < 0.01
    working = asyncio.run(run(lambda: busy(0.03)))
    assert working.longest >= 0.03 and working.longest_cpu >= 0.03
    assert (waiting.slow_turns, working.slow_turns) == (0, 1)  # over SLOW_TURN in CPU time


def test_a_replaced_copy_is_freed_a_shard_per_turn_of_the_loop():
    from pbkv.config import Settings
    from pbkv.node import Node
    from pbkv.stages import Role

    async def run() -> list[int]:
        node = Node(Settings(), Role.BACKUP)  # not started: only its pump runs
        shards = [{f"k{s}-{i}": "v" for i in range(100)} for s in range(4)]
        node.discard(shards)
        left = []
        for _ in range(5):
            await asyncio.sleep(0)
            left.append(len(shards))
        return left

    assert asyncio.run(run()) == [3, 2, 1, 0, 0]


def test_room_for_large_bodies_but_small_ones_always_pass():
    guard = Guard(ConnectionLimits(max_pending_bytes=1_000_000))
    assert guard.room_for(900_000)
    guard.hold(900_000)
    assert not guard.room_for(200_000)
    assert guard.room_for(SMALL_BODY)
    guard.release(900_000)
    assert guard.pending_bytes == 0 and guard.room_for(1_000_000)


def test_a_limit_is_logged_once_per_interval(caplog):
    limit = LogThrottle("max_clients (3) reached", window=10.0)
    with caplog.at_level(logging.WARNING, logger="pbkv"):
        for t in range(25):
            limit.hit(float(t))
    assert [r.getMessage() for r in caplog.records] == [
        "max_clients (3) reached (1 times so far)",
        "max_clients (3) reached (11 times so far)",
        "max_clients (3) reached (21 times so far)",
    ]


def test_the_c_library_is_found_without_starting_a_process(monkeypatch) -> None:
    # ctypes.util.find_library runs ldconfig in a child: forking a server that holds
    # millions of pairs would stall its loop for tens of milliseconds on the first trim.
    import subprocess

    from pbkv import limits

    def no_child(*args: object, **kwargs: object) -> None:
        raise AssertionError("a child process was started")

    monkeypatch.setattr(subprocess, "Popen", no_child)
    monkeypatch.setattr(limits, "_LIBC", [])
    limits.trim_malloc()
    assert limits._LIBC[0] is not None  # glibc: malloc_trim was found and called
