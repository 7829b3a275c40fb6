"""The asyncio side of persistence (``pbkv/persist/driver.py``) on a real event loop
and a real folder: what is held until the fsync, a base written while serving,
loading at start, and a failed write."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from pbkv.commands import DiskFailed, Done, Outcome
from pbkv.config import Settings
from pbkv.persist import DataDir, LogWriteError, PersistError, Record, State
from pbkv.persist.driver import Persistence
from pbkv.store import ShardedStore, make_store

ADDRESS = ("127.0.0.1", 8080)


def on_loop(test: Callable[[Path], Coroutine[Any, Any, None]]) -> Callable[[Path], None]:
    """Run an ``async`` test on a fresh event loop (the driver needs a running one)."""

    @functools.wraps(test)
    def run(tmp_path: Path) -> None:
        asyncio.run(test(tmp_path))

    return run


def opened(tmp_path: Path, mode: str = "always", **kwargs: Any) -> Persistence:
    failures: list[str] = kwargs.pop("failures", [])
    clock: Callable[[], float] | None = kwargs.pop("clock", None)
    settings = Settings(persistence=mode, data_dir=str(tmp_path), **kwargs)
    return Persistence(settings, ADDRESS, asyncio.get_running_loop(), failures.append, clock=clock)


async def until_written(persistence: Persistence) -> None:
    deadline = time.monotonic() + 10
    while persistence.base is not None:
        assert time.monotonic() < deadline, "the base was never finished"
        await asyncio.sleep(0.001)


async def synced(persistence: Persistence) -> None:
    """Until no fsync is due or under way (they run in a thread: polled)."""
    await until(lambda: not (persistence.sync_scheduled or persistence.fsync_running))


async def turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def loaded(tmp_path: Path) -> tuple[State, dict[str, str]]:
    """What a restart would load from the folder."""
    store = make_store("sharded", 4)
    with DataDir.for_address(tmp_path, *ADDRESS) as datadir:
        state = datadir.load().fill(store)
    return state, dict(store.items())


@on_loop
async def test_a_first_start_writes_an_empty_base_and_recovers_nothing(tmp_path: Path) -> None:
    persistence = opened(tmp_path)
    assert persistence.recover(make_store("sharded", 4), State(7, 0, 0)) is None
    persistence.persist(Record.batch(7, 1, 0, ["a", "1"]))
    await synced(persistence)
    persistence.close()
    assert loaded(tmp_path) == (State(7, 1, 0), {"a": "1"})

    again = opened(tmp_path)
    store = make_store("sharded", 4)
    assert again.recover(store, State(99, 0, 0)) == State(7, 1, 0)
    assert dict(store.items()) == {"a": "1"} and again.recovered_pairs == 1
    again.close()


@on_loop
async def test_always_holds_replies_and_frames_until_the_fsync(tmp_path: Path) -> None:
    persistence = opened(tmp_path)
    persistence.recover(make_store("sharded", 4), State(7, 0, 0))
    order: list[str] = []
    replies: list[Outcome] = []
    reply = persistence.durable(replies.append)

    reply(Done(True))  # nothing appended: answered at once
    assert replies == [Done(True)]

    persistence.persist(Record.batch(7, 1, 0, ["a", "1"]))
    persistence.persist(Record.batch(7, 2, 0, ["b", "2"]))
    assert persistence.holding and persistence.datadir.dirty
    reply(Done(False))
    persistence.hold(lambda: order.append("ack 2"))
    assert replies == [Done(True)] and order == []
    await synced(persistence)
    # One fsync for both records, then everything held, in order.
    assert not persistence.datadir.dirty and persistence.syncs == 1
    assert replies == [Done(True), Done(False)] and order == ["ack 2"]
    assert not persistence.holding
    persistence.hold(lambda: order.append("heartbeat"))
    assert order == ["ack 2", "heartbeat"]
    persistence.close()


@on_loop
async def test_everysec_holds_nothing_and_syncs_on_a_timer(tmp_path: Path) -> None:
    persistence = opened(tmp_path, "everysec")
    persistence.recover(make_store("sharded", 4), State(7, 0, 0))
    persistence.start()
    persistence.persist(Record.batch(7, 1, 0, ["a", "1"]))
    assert not persistence.holding and persistence.datadir.dirty
    await until(lambda: not persistence.datadir.dirty)  # within the timer's second
    assert persistence.syncs >= 1
    persistence.close()


def filled(count: int) -> ShardedStore:
    store = make_store("sharded", 4)
    for i in range(count):
        store.write(f"key{i}", f"value{i}")
    return store


@on_loop
async def test_a_new_base_is_written_while_serving(tmp_path: Path) -> None:
    persistence = opened(tmp_path)
    persistence.recover(make_store("sharded", 4), State(7, 0, 0))
    persistence.datadir.chunk_pairs = 10  # many chunks, so the loop turns in between
    store = filled(500)
    persistence.persist_all(State(8, 40, 2), store)
    assert persistence.holding
    replies: list[Outcome] = []
    # Batches applied while the base is written: logged after it, on top of it.
    store.write("key1", "changed")
    persistence.persist(Record.batch(8, 41, 2, ["key1", "changed"]))
    store.write("key2", None)
    persistence.persist(Record.batch(8, 42, 2, ["key2", None]))
    persistence.durable(replies.append)(Done(True))
    deadline = time.monotonic() + 10
    while persistence.base is not None:
        assert replies == [] and time.monotonic() < deadline
        await asyncio.sleep(0.001)
    assert persistence.bases_written == 1
    await synced(persistence)
    assert replies == [Done(True)]
    persistence.close()
    state, data = loaded(tmp_path)
    assert state == State(8, 42, 2)
    assert data == dict(store.items())


@on_loop
async def test_a_newer_base_replaces_one_under_way(tmp_path: Path) -> None:
    persistence = opened(tmp_path)
    persistence.recover(make_store("sharded", 4), State(7, 0, 0))
    persistence.datadir.chunk_pairs = 10
    persistence.persist_all(State(8, 5, 0), filled(300))
    await turns(2)
    persistence.persist_all(State(9, 6, 0), filled(20))
    await until_written(persistence)
    persistence.close()
    assert loaded(tmp_path) == (State(9, 6, 0), dict(filled(20).items()))


@on_loop
async def test_a_failed_append_acknowledges_nothing(tmp_path: Path) -> None:
    failures: list[str] = []
    persistence = opened(tmp_path, failures=failures)
    persistence.recover(make_store("sharded", 4), State(7, 0, 0))
    replies: list[Outcome] = []
    persistence.persist(Record.batch(7, 1, 0, ["a", "1"]))
    persistence.durable(replies.append)(Done(True))

    def full(record: Record) -> int:
        raise LogWriteError("no space left on device")

    persistence.datadir.append = full  # type: ignore[method-assign]
    persistence.persist(Record.batch(7, 2, 0, ["b", "2"]))
    assert failures and "no space left on device" in failures[0]
    await synced(persistence)
    # The reply held for the fsync is a failure, never a success.
    assert len(replies) == 1 and not persistence.held
    (reply,) = replies
    assert isinstance(reply, DiskFailed) and reply.applied
    assert "no space left on device" in reply.reason
    refused = persistence.refusal()  # new writes: refused before they are applied
    assert refused is not None and not refused.applied
    persistence.close()


@on_loop
async def test_a_failed_folder_heals_with_a_new_base_of_the_store(tmp_path: Path) -> None:
    failures: list[str] = []
    persistence = opened(tmp_path, failures=failures)
    store = make_store("sharded", 4)
    persistence.recover(store, State(7, 0, 0))
    store.write("a", "1")
    persistence.persist(Record.batch(7, 1, 0, ["a", "1"]))
    real_append = persistence.datadir.append

    def full(record: Record) -> int:
        raise LogWriteError("no space left on device")

    persistence.datadir.append = full  # type: ignore[method-assign]
    store.write("b", "2")
    persistence.persist(Record.batch(7, 2, 0, ["b", "2"]))
    assert persistence.failed is not None
    store.write("c", "3")
    persistence.persist(Record.batch(7, 3, 0, ["c", "3"]))  # not logged: the store has it
    persistence.datadir.append = real_append  # type: ignore[method-assign]
    persistence._heal()  # what the once-a-second timer does while failed
    await until_written(persistence)
    assert persistence.failed is None and persistence.refusal() is None
    persistence.persist(Record.batch(7, 4, 0, ["d", "4"]))
    store.write("d", "4")
    persistence.close()
    assert loaded(tmp_path) == (State(7, 4, 0), {"a": "1", "b": "2", "c": "3", "d": "4"})


@on_loop
async def test_damage_refuses_to_load_naming_the_file_and_offset(tmp_path: Path) -> None:
    persistence = opened(tmp_path)
    persistence.recover(make_store("sharded", 4), State(7, 0, 0))
    for seq in range(1, 4):
        persistence.persist(Record.batch(7, seq, 0, [f"k{seq}", "v"]))
    await synced(persistence)
    persistence.close()
    (log,) = (tmp_path / "127.0.0.1-8080").glob("incr.*.log")
    data = bytearray(log.read_bytes())
    data[12] ^= 0xFF  # inside the first record
    log.write_bytes(bytes(data))
    with pytest.raises(PersistError, match=rf"{log.name}: .* at offset 8"):
        opened(tmp_path).recover(make_store("sharded", 4), State(1, 0, 0))


def apply(store: ShardedStore, record: Record) -> Record:
    store.apply(record.ops)
    return record


@on_loop
async def test_a_grown_log_is_rewritten_while_records_go_on(tmp_path: Path) -> None:
    persistence = opened(tmp_path, rewrite_min_bytes=2000, rewrite_percentage=100)
    store = make_store("sharded", 4)
    persistence.recover(store, State(7, 0, 0))
    persistence.datadir.chunk_pairs = 10
    for seq in range(1, 80):
        persistence.persist(apply(store, Record.batch(7, seq, 0, [f"k{seq}", "v" * 20])))
    await synced(persistence)
    datadir = persistence.datadir
    begin_rewrite = datadir.begin_rewrite
    threads: list[threading.Thread] = []

    def begin_in(*args: Any) -> Any:
        threads.append(threading.current_thread())
        return begin_rewrite(*args)

    datadir.begin_rewrite = begin_in  # type: ignore[method-assign]
    persistence._rewrite_if_grown()
    # Its start (an fsync, a new increment, a manifest) runs in the base thread: the
    # record of that moment waits in memory, then goes to the new increment.
    persistence.persist(apply(store, Record.batch(7, 80, 0, ["k1", None])))
    assert persistence.base is None and len(persistence.waiting) == 1
    # Started (the base it writes may be in place already: a small one is quick).
    await until(lambda: persistence.rewrites == 1)
    assert threads and threads[0] is not threading.current_thread()
    assert persistence.rewrites == 1 and not persistence.waiting
    persistence.persist(apply(store, Record.batch(7, 81, 0, ["k3", "during"])))
    await synced(persistence)
    assert not persistence.holding  # a rewrite under way holds nothing back
    await until_written(persistence)
    persistence.persist(apply(store, Record.batch(7, 82, 0, ["k2", "later"])))
    await synced(persistence)
    status = persistence.status()
    assert status["log_bytes"] < 1000 and status["snapshot"]["file"] != "base.1.snap"
    persistence._rewrite_if_grown()
    assert persistence.base is None  # not grown enough again
    persistence.close()
    folder = tmp_path / "127.0.0.1-8080"
    assert len(list(folder.glob("base.*.snap"))) == 1
    assert loaded(tmp_path) == (State(7, 82, 0), dict(store.items()))


def grown(tmp_path: Path, mode: str) -> tuple[Persistence, ShardedStore]:
    """A log grown past its rewrite settings, all of it appended."""
    persistence = opened(tmp_path, mode, rewrite_min_bytes=2000, rewrite_percentage=100)
    store = make_store("sharded", 4)
    persistence.recover(store, State(7, 0, 0))
    persistence.datadir.chunk_pairs = 10
    for seq in range(1, 80):
        persistence.persist(apply(store, Record.batch(7, seq, 0, [f"k{seq}", "v" * 20])))
    return persistence, store


@on_loop
async def test_always_holds_an_ack_of_a_record_that_waited_for_a_rewrites_start(
    tmp_path: Path,
) -> None:
    persistence, store = grown(tmp_path, "always")
    await synced(persistence)
    fsyncs = persistence.syncs
    persistence._rewrite_if_grown()
    persistence.persist(apply(store, Record.batch(7, 80, 0, ["k1", None])))
    fsyncs_seen: list[int] = []
    persistence.hold(lambda: fsyncs_seen.append(persistence.syncs))
    assert persistence.holding and fsyncs_seen == []
    await until(lambda: bool(fsyncs_seen))
    assert fsyncs_seen[0] > fsyncs  # released by an fsync of its record, in the new increment
    await until_written(persistence)
    persistence.close()
    assert loaded(tmp_path) == (State(7, 80, 0), dict(store.items()))


@on_loop
async def test_a_stop_while_a_rewrite_starts_keeps_the_records_that_waited(tmp_path: Path) -> None:
    persistence, store = grown(tmp_path, "everysec")
    persistence._rewrite_if_grown()
    persistence.persist(apply(store, Record.batch(7, 80, 0, ["k1", None])))
    persistence.close()  # waits for the start, gives its base up, appends the record
    assert loaded(tmp_path) == (State(7, 80, 0), dict(store.items()))
    assert not list((tmp_path / "127.0.0.1-8080").glob("temp-*"))


@on_loop
async def test_data_replaced_while_a_rewrite_starts_gives_the_rewrite_up(tmp_path: Path) -> None:
    persistence, store = grown(tmp_path, "everysec")
    persistence._rewrite_if_grown()
    persistence.persist(apply(store, Record.batch(7, 80, 0, ["k1", None])))
    replaced = filled(30)
    persistence.persist_all(State(8, 5, 0), replaced)
    await until_written(persistence)
    await turns()
    assert persistence.rewrites == 0 and persistence.bases_written == 1
    persistence.close()
    assert loaded(tmp_path) == (State(8, 5, 0), dict(replaced.items()))


@on_loop
async def test_a_rollback_into_a_base_that_may_hold_its_batches_writes_a_new_base(
    tmp_path: Path,
) -> None:
    persistence = opened(tmp_path, "everysec")
    store = make_store("sharded", 4)
    persistence.recover(store, State(7, 0, 0))  # the server's store, from now on
    for key, value in filled(200).items():
        store.write(key, value)
    persistence.datadir.chunk_pairs = 10
    persistence.persist_all(State(8, 10, 0), store)
    # Batches applied while the base is written: it may hold their writes.
    olds = store.apply_recording(["key1", "rolled back", "key2", None])
    persistence.persist(Record.batch(8, 11, 0, ["key1", "rolled back", "key2", None]))
    await until_written(persistence)
    assert persistence.fuzzy_until == 11
    store.undo(["key1", "rolled back", "key2", None], olds)
    persistence.persist(Record.rollback(State(8, 10, 0)))
    assert persistence.base is not None  # a new base, not a record the old one cannot take
    persistence.persist(Record.mark(State(9, 10, 0)))
    await until_written(persistence)
    await synced(persistence)
    persistence.close()
    assert loaded(tmp_path) == (State(9, 10, 0), dict(filled(200).items()))


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.001)


@on_loop
async def test_everysec_reports_how_long_records_waited_for_their_fsync(tmp_path: Path) -> None:
    clock = Clock()
    persistence = opened(tmp_path, "everysec", clock=clock)
    persistence.recover(make_store("sharded", 4), State(7, 0, 0))
    status = persistence.status()
    assert status["unsynced_ms"] == 0 and status["unsynced_max_ms"] == 0
    persistence.persist(Record.batch(7, 1, 0, ["a", "1"]))
    clock.now += 0.4
    persistence.persist(Record.batch(7, 2, 0, ["b", "2"]))  # younger: not the window
    clock.now += 0.3
    status = persistence.status()
    assert status["unsynced_ms"] == pytest.approx(700) and status["unsynced_max_ms"] == (
        pytest.approx(700)
    )
    persistence._every_second()  # the timer's fsync
    await until(lambda: not persistence.durability.pending)
    clock.now += 5
    status = persistence.status()
    assert status["unsynced_ms"] == 0 and status["unsynced_max_ms"] == pytest.approx(700)
    persistence.persist(Record.batch(7, 3, 0, ["c", "3"]))
    clock.now += 0.1
    persistence._every_second()
    await until(lambda: not persistence.durability.pending)
    assert persistence.status()["unsynced_max_ms"] == pytest.approx(700)  # the largest
    persistence.close()


@on_loop
async def test_always_makes_each_record_durable_within_its_turn(tmp_path: Path) -> None:
    clock = Clock()
    persistence = opened(tmp_path, clock=clock)
    persistence.recover(make_store("sharded", 4), State(7, 0, 0))
    persistence.persist(Record.batch(7, 1, 0, ["a", "1"]))
    clock.now += 0.002
    assert persistence.status()["unsynced_ms"] == pytest.approx(2)
    await until(lambda: not persistence.durability.pending)
    status = persistence.status()
    assert status["unsynced_ms"] == 0 and status["unsynced_max_ms"] == pytest.approx(2)
    persistence.close()


class GatedFsync:
    """``os.fsync`` in the fsync thread, each call waiting for a permit: the test
    decides when each fsync ends."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, error: OSError | None = None) -> None:
        self.permits = threading.Semaphore(0)
        self.started = 0
        self.finished = 0
        self.error = error
        real = os.fsync

        def fsync(fd: int) -> None:
            self.started += 1
            assert self.permits.acquire(timeout=10), "the test never let the fsync end"
            if self.error is not None:
                raise self.error
            real(fd)
            self.finished += 1

        monkeypatch.setattr("pbkv.persist.log.os.fsync", fsync)


def test_a_record_appended_during_an_fsync_waits_for_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> None:
        persistence = opened(tmp_path)
        persistence.recover(make_store("sharded", 4), State(7, 0, 0))
        gate = GatedFsync(monkeypatch)
        replies: list[str] = []
        persistence.persist(Record.batch(7, 1, 0, ["a", "1"]))
        persistence.durable(lambda _: replies.append("first"))(Done(True))
        await until(lambda: gate.started == 1)  # the fsync runs, the loop goes on
        persistence.persist(Record.batch(7, 2, 0, ["b", "2"]))
        persistence.durable(lambda _: replies.append("second"))(Done(True))
        persistence.hold(lambda: replies.append("ack 2"))
        await turns()
        assert replies == [] and gate.started == 1  # one fsync at a time
        gate.permits.release()
        await until(lambda: replies == ["first"])
        # The second record was appended after that fsync began: the next covers it.
        await until(lambda: gate.started == 2)
        assert replies == ["first"] and persistence.holding
        gate.permits.release()
        await until(lambda: replies == ["first", "second", "ack 2"])
        assert persistence.syncs == 2 and not persistence.holding
        persistence.close()
        assert loaded(tmp_path) == (State(7, 2, 0), {"a": "1", "b": "2"})

    asyncio.run(run())


def test_a_failed_fsync_in_its_thread_fails_the_folder_and_acknowledges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> None:
        failures: list[str] = []
        persistence = opened(tmp_path, failures=failures)
        persistence.recover(make_store("sharded", 4), State(7, 0, 0))
        gate = GatedFsync(monkeypatch, OSError(errno.EIO, "Input/output error"))
        replies: list[Outcome] = []
        frames: list[str] = []
        persistence.persist(Record.batch(7, 1, 0, ["a", "1"]))
        persistence.durable(replies.append)(Done(True))
        persistence.hold(lambda: frames.append("ack 1"))
        gate.permits.release()
        await until(lambda: bool(failures))
        assert "fsync failed" in failures[0] and "Input/output error" in failures[0]
        (reply,) = replies
        assert isinstance(reply, DiskFailed) and reply.applied
        assert frames == [] and not persistence.held
        refused = persistence.refusal()
        assert refused is not None and not refused.applied
        persistence.close()

    asyncio.run(run())


def test_everysec_starts_no_fsync_while_one_runs_and_close_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> None:
        persistence = opened(tmp_path, "everysec")
        persistence.recover(make_store("sharded", 4), State(7, 0, 0))
        gate = GatedFsync(monkeypatch)
        persistence.persist(Record.batch(7, 1, 0, ["a", "1"]))
        persistence._every_second()
        await until(lambda: gate.started == 1)
        persistence.persist(Record.batch(7, 2, 0, ["b", "2"]))
        persistence._every_second()  # the last one still runs: left for the next second
        await turns()
        assert gate.started == 1 and not persistence.holding

        def let_it_end_once_closing() -> None:
            deadline = time.monotonic() + 10
            while not persistence._closed and time.monotonic() < deadline:
                time.sleep(0.001)
            gate.permits.release(2)  # the running fsync, then close's own

        helper = threading.Thread(target=let_it_end_once_closing)
        helper.start()
        persistence.close()
        helper.join()
        assert gate.finished == 2  # close waited for the running fsync, then synced
        assert loaded(tmp_path) == (State(7, 2, 0), {"a": "1", "b": "2"})

    asyncio.run(run())


@on_loop
async def test_the_loops_stalls_are_kept_while_a_base_is_written(tmp_path: Path) -> None:
    persistence = opened(tmp_path)
    persistence.recover(make_store("sharded", 4), State(7, 0, 0))
    persistence.loop_lagged(0.5)  # no base under way: not the base's
    assert persistence.status()["base_loop_lag_ms"] == 0
    persistence.datadir.chunk_pairs = 10
    persistence.persist_all(State(8, 5, 0), filled(300))
    persistence.loop_lagged(0.004)
    persistence.loop_lagged(0.012)
    persistence.loop_lagged(0.002)
    await until_written(persistence)
    persistence.loop_lagged(0.3)  # after it: not the base's
    assert persistence.status()["base_loop_lag_ms"] == 12.0
    persistence.persist_all(State(9, 6, 0), filled(30))  # the next base starts afresh
    assert persistence.status()["base_loop_lag_ms"] == 0
    await until_written(persistence)
    persistence.close()


@pytest.mark.pure_python
def test_a_base_is_put_in_place_in_a_thread_and_a_newer_one_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def run() -> None:
        persistence = opened(tmp_path)
        persistence.recover(make_store("sharded", 4), State(7, 0, 0))
        datadir = persistence.datadir
        real_finish = datadir.finish_rewrite
        finishing = threading.Event()
        permit = threading.Semaphore(0)
        threads: list[threading.Thread] = []

        def finish_rewrite() -> Any:
            threads.append(threading.current_thread())
            finishing.set()
            assert permit.acquire(timeout=10)
            return real_finish()

        monkeypatch.setattr(datadir, "finish_rewrite", finish_rewrite)
        real_wait = persistence._wait_for_finishing
        waiting = threading.Event()

        def wait_for_finishing() -> None:
            waiting.set()
            real_wait()

        monkeypatch.setattr(persistence, "_wait_for_finishing", wait_for_finishing)

        def let_the_first_finish_once_the_loop_waits() -> None:
            assert finishing.wait(10) and waiting.wait(10)
            permit.release(2)  # the first base, then the second

        persistence.persist_all(State(8, 5, 0), filled(300))
        await until(finishing.is_set)  # the loop goes on meanwhile
        assert threads[0] is not threading.current_thread()
        helper = threading.Thread(target=let_the_first_finish_once_the_loop_waits)
        helper.start()
        # Replaced again while the first is put in place: the loop waits for it, then
        # starts the second, which wins.
        persistence.persist_all(State(9, 6, 0), filled(20))
        helper.join()
        await until_written(persistence)
        assert persistence.bases_written == 1 and len(threads) == 2
        persistence.close()
        assert loaded(tmp_path) == (State(9, 6, 0), dict(filled(20).items()))

    asyncio.run(run())


def test_free_space_is_checked_every_quarter_headroom_appended_or_50_ms_while_there_is_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statvfs per write would cost more than the write's record: while there is
    room the space is looked at again once the records appended since the last look
    reach a quarter of the headroom (what they may take of it), or after 50 ms (the
    disk may be filled by others); while there is not, at every write, so the first
    write after space was freed is accepted."""

    async def run() -> None:
        now = [100.0]
        headroom = 1 << 20
        persistence = opened(tmp_path, "everysec", clock=lambda: now[0], disk_headroom=headroom)
        persistence.recover(make_store("sharded", 4), State(7, 0, 0))
        free = [1 << 30]  # bytes
        checks: list[float] = []
        real = os.statvfs(tmp_path)

        def statvfs(path: Any) -> os.statvfs_result:
            checks.append(now[0])
            blocks = free[0] // real.f_frsize
            return os.statvfs_result((*real[:4], blocks, *real[5:]))  # f_bavail is the fifth

        monkeypatch.setattr(os, "statvfs", statvfs)
        assert [persistence.refusal() for _ in range(3)] == [None] * 3
        assert checks == [100.0]
        # Records appended: no look until they add up to a quarter of the headroom.
        value = "v" * 10_000
        seq = 0
        while persistence.datadir.bytes_appended < headroom // 4:
            assert persistence.refusal() is None and checks == [100.0]
            seq += 1
            persistence.persist(Record.batch(7, seq, 0, [f"k{seq}", value]))
        assert seq > 20  # many appends, one look
        assert persistence.refusal() is None and checks == [100.0, 100.0]
        # Time alone: a look 50 ms after the last.
        now[0] = 100.049
        free[0] = 1 << 16  # filled by others meanwhile: seen at the next look
        assert persistence.refusal() is None and len(checks) == 2
        now[0] = 100.05
        refused = persistence.refusal()
        assert isinstance(refused, DiskFailed) and "disk full" in refused.reason
        assert persistence.refusal() is not None and checks[2:] == [100.05, 100.05]
        free[0] = 1 << 30  # freed: the next write is accepted, at once
        assert persistence.refusal() is None and len(checks) == 5
        assert persistence.refusal() is None and len(checks) == 5
        assert persistence.writes_refused == 2
        persistence.close()

    asyncio.run(run())
