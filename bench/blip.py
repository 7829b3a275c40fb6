"""What a short replication blip costs a steady writer: pbkv against Redis.

The primary and the backup (Redis: the replica) run in two network namespaces
(``pbkv.testing.netns``); this script talks to both from a third one. With N pairs
loaded (16-byte keys, 100-byte values; 1,000,000 and 5,000,000 by default), a writer
on one connection inserts unique keys one after the other, each waiting for its
reply (Redis: ``SET`` then ``WAIT 1 0``, which blocks until the replica has it). Then,
one at a time:

* drop: every packet from the backup to the primary is dropped for 3 s (an iptables
  DROP rule in the primary's namespace, then removed);
* pause: the backup is stopped with SIGSTOP for 3 s, then SIGCONT.

For each it prints the time from the heal (rule removed, SIGCONT sent) to the first
write acknowledged after it, the writer's longest time without an acknowledgement,
the writes that failed, and the full copies of the database the blip caused: pbkv's
``resyncs_full`` / ``resyncs_partial`` where the status reports them, else the transfers
begun as the servers logged them (``transfers_completed``, also shown, counts every
synchronisation, one that found both sides equal and copied nothing too); Redis's
``sync_full`` / ``sync_partial_ok``. The servers' log lines are shown timed from the heal.
Target for pbkv: at most 100 ms from the heal to the first acknowledged write, at
every size, and no full transfer. Redis is the reference.

Needs root, iproute2 and iptables (the partition tests' requirements).

    python -m bench.blip                          # 1M and 5M pairs, both faults
    python -m bench.blip --keys 1000000 --no-redis
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import bulk, servers
from bench.resp_load import RespError, SyncRedis
from pbkv.client import Client, PbkvError, ReplicationFailed, Unavailable
from pbkv.testing import netns

DEFAULT_KEYS = (1_000_000, 5_000_000)
FAULTS = ("drop", "pause")
TARGET_MS = 100.0
WRITE_TIMEOUT = 30.0  # no single write may hang the run longer than this
RETRY_PAUSE = 0.001  # after a failed write: the resolution of "first write after the heal"
WARMUP_ACKS = 200  # acknowledged writes before the fault
AFTER_ACKS = 200  # and after the heal, before the writer stops
PBKV_COUNTERS = ("transfers_completed", "transfers_failed", "resyncs_partial", "resyncs_full")
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?:INFO|WARNING|ERROR) (.*)$")
REDIS_COUNTERS = ("sync_full", "sync_partial_ok", "sync_partial_err")


# ---------------------------------------------------------------- the writer


@dataclass(frozen=True, slots=True)
class Write:
    sent: float
    done: float
    outcome: str  # "ok", or why it failed


class Writer(threading.Thread):
    """Sequential writes of unique keys on one connection, each waiting for its reply.

    Started from a thread in the client namespace, it lives there too.
    """

    def __init__(self, prefix: str) -> None:
        super().__init__(daemon=True, name=f"writer-{prefix}")
        self.prefix = prefix
        self.writes: list[Write] = []
        self._stop_event = threading.Event()

    def write(self, key: str, value: str) -> str:
        """One write; returns "ok" or the reason it failed."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def run(self) -> None:
        i = 0
        try:
            while not self._stop_event.is_set():
                key, value = f"{self.prefix}-{i:09d}", bulk.value_of(i)
                i += 1
                sent = time.monotonic()
                outcome = self.write(key, value)
                self.writes.append(Write(sent, time.monotonic(), outcome))
                if outcome != "ok":
                    self._stop_event.wait(RETRY_PAUSE)
        finally:
            self.close()

    def acked(self, after: float = 0.0) -> list[float]:
        return [w.done for w in list(self.writes) if w.outcome == "ok" and w.done >= after]

    def halt(self) -> None:
        self._stop_event.set()
        self.join(WRITE_TIMEOUT + 5)
        if self.is_alive():
            raise RuntimeError(f"the writer {self.prefix} did not stop")


class PbkvWriter(Writer):
    def __init__(self, host: str, port: int, prefix: str) -> None:
        super().__init__(prefix)
        self.client = Client(host, port, timeout=WRITE_TIMEOUT, retry_for=0)  # failures counted

    def write(self, key: str, value: str) -> str:
        try:
            return "ok" if self.client.insert(key, value) else "refused: key exists"
        except ReplicationFailed:
            return "replication failed"
        except Unavailable:
            return "unavailable"
        except PbkvError as exc:
            return f"error {exc.status}"
        except OSError as exc:
            return f"connection: {type(exc).__name__}"

    def close(self) -> None:
        self.client.close()


class RedisWriter(Writer):
    def __init__(self, host: str, port: int, prefix: str) -> None:
        super().__init__(prefix)
        self.address = (host, port)
        self.conn: SyncRedis | None = None

    def write(self, key: str, value: str) -> str:
        try:
            if self.conn is None:
                self.conn = SyncRedis(*self.address, timeout=WRITE_TIMEOUT)
            self.conn.call("SET", key, value)
            replicas = self.conn.call("WAIT", 1, 0)
        except (OSError, RespError) as exc:
            self.close()
            return f"error: {type(exc).__name__}"
        return "ok" if isinstance(replicas, int) and replicas >= 1 else "not replicated"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ---------------------------------------------------------------- one blip


@dataclass
class System:
    """What the blip needs from a replicated pair, pbkv's or Redis's."""

    name: str
    backup_pid: Callable[[], int]
    counters: Callable[[], dict[str, Any]]
    wait_in_sync: Callable[[float], None]
    writer: Callable[[str], Writer]
    logs: dict[str, Path] = dataclasses.field(default_factory=dict)  # role -> server log


def _log_sizes(system: System) -> dict[str, int]:
    return {role: path.stat().st_size if path.exists() else 0 for role, path in system.logs.items()}


def _log_events(system: System, offsets: dict[str, int], heal: float) -> list[dict[str, Any]]:
    """The servers' log lines written since `offsets`, timed from the heal (wall clock)."""
    events = []
    for role, path in system.logs.items():
        with path.open("rb") as log:
            log.seek(offsets[role])
            lines = log.read().decode(errors="replace").splitlines()
        for line in lines:
            match = _LOG_LINE.match(line)
            if match is None:
                continue
            stamp, rest = match.groups()
            at = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if ": shard " in rest:  # a transfer's progress, one line per shard
                continue
            events.append({"at_s": round(at - heal, 3), "role": role, "event": rest})
    return sorted(events, key=lambda e: e["at_s"])


def _transfers_started(events: list[dict[str, Any]]) -> int:
    """Copies of the whole database begun, by either side (a log line each)."""
    return sum(1 for e in events if " transfer to " in e["event"] and " started: " in e["event"])


def _gap(acks: list[float], start: float, end: float) -> float:
    """Longest time in [start, end] without an acknowledgement (the ends count)."""
    times = [start, *(t for t in acks if start <= t <= end), end]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


@contextlib.contextmanager
def _fault(net: netns.Topology, kind: str, pid: int, seconds: float) -> Iterator[list[float]]:
    """Apply the fault, hold it `seconds`, heal it; yields [start, heal] once healed."""
    times: list[float] = []
    if kind == "drop":
        net.drop_from("backup")
        times.append(time.monotonic())
        try:
            time.sleep(seconds)  # the fault's length, not a wait for a condition
        finally:
            net.undrop_from("backup")
            times.append(time.monotonic())
    else:
        os.kill(pid, signal.SIGSTOP)
        times.append(time.monotonic())
        try:
            time.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
            times.append(time.monotonic())
    yield times


def _blip(
    net: netns.Topology, system: System, kind: str, seconds: float, timeout: float
) -> dict[str, Any]:
    system.wait_in_sync(timeout)
    before = system.counters()
    offsets = _log_sizes(system)
    writer = system.writer(f"blip-{kind}")
    writer.start()
    try:
        servers.wait_for(
            lambda: len(writer.acked()) >= WARMUP_ACKS, 60, f"{system.name} writer to warm up"
        )
        with _fault(net, kind, system.backup_pid(), seconds) as (start, heal):
            heal_wall = time.time() - (time.monotonic() - heal)
        servers.wait_for(
            lambda: len(writer.acked(heal)) >= AFTER_ACKS,
            timeout,
            f"{system.name} to acknowledge writes after the {kind}",
        )
        end = time.monotonic()
    finally:
        writer.halt()
    system.wait_in_sync(timeout)
    after = system.counters()
    events = _log_events(system, offsets, heal_wall)
    writes = writer.writes
    acks = writer.acked()
    first = min(t for t in acks if t >= heal)
    failures: dict[str, int] = {}
    for w in writes:
        if w.outcome != "ok":
            failures[w.outcome] = failures.get(w.outcome, 0) + 1
    delta = {
        name: after[name] - before[name]
        for name in after
        if isinstance(after.get(name), int) and isinstance(before.get(name), int)
    }
    return {
        "system": system.name,
        "fault": kind,
        "blip_seconds": heal - start,
        "heal_to_first_ack_ms": (first - heal) * 1000,
        "max_gap_ms": _gap(acks, writes[0].sent, end) * 1000,
        "writes_acked": len(acks),
        "writes_failed": sum(failures.values()),
        "failures": failures,
        "counters_before": before,
        "counters_after": after,
        "counters_delta": delta,
        # pbkv: what the servers logged meanwhile, in seconds from the heal.
        "events": events,
        "transfers_started": _transfers_started(events) if system.logs else None,
    }


# ---------------------------------------------------------------- pbkv


def _pbkv_system(pair: servers.Pbkv) -> System:
    def status(role: str) -> dict[str, Any]:
        found = pair.status(role)
        if found is None:
            raise RuntimeError(f"pbkv {role} answers no status")
        return found

    def counters() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for role in ("primary", "backup"):
            s = status(role)
            out.update({f"{role}_{name}": s[name] for name in PBKV_COUNTERS if name in s})
        return out

    def in_sync() -> bool:
        a, b = pair.status("primary"), pair.status("backup")
        return bool(
            a
            and b
            and a["stage"] == b["stage"] == "in_sync"
            and (a["checksum"], a["keys"]) == (b["checksum"], b["keys"])
        )

    def backup_pid() -> int:
        pid = pair.pid("backup")
        if pid is None:
            raise RuntimeError("the pbkv backup is not running")
        return pid

    host, port = pair.address["primary"]
    return System(
        name="pbkv",
        backup_pid=backup_pid,
        counters=counters,
        wait_in_sync=lambda timeout: servers.wait_for(in_sync, timeout, "pbkv to be in sync"),
        writer=lambda prefix: PbkvWriter(host, port, prefix),
        logs={role: pair.log_path(role) for role in ("primary", "backup")},
    )


def _run_pbkv(
    net: netns.Topology,
    workdir: Path,
    keys: int,
    args: argparse.Namespace,
    say: Any,
    results: list[dict[str, Any]],
) -> None:
    pair = servers.Pbkv(
        workdir,
        f"pbkv-{keys}",
        serve_flags=shlex.split(args.pbkv_flags),
        hosts=dict(net.addresses),
        launch=net.command,
    )
    try:
        pair.start_all()
        host, port = pair.address["primary"]
        seconds = bulk.load_pbkv(host, port, keys, " while loading")
        say(f"pbkv: loaded {keys} pairs in {seconds:.1f} s")
        system = _pbkv_system(pair)
        for kind in args.faults:
            say(f"pbkv {keys}: {kind} for {args.blip_seconds} s")
            result = _blip(net, system, kind, args.blip_seconds, args.timeout)
            results.append({"keys": keys, "load_seconds": seconds, **result})
    finally:
        with contextlib.suppress(Exception):
            pair.cleanup()


# ---------------------------------------------------------------- Redis


def _redis_system(primary: servers.Redis, replica: servers.Redis) -> System:
    def counters() -> dict[str, Any]:
        stats = primary.info("stats")
        return {name: int(stats[name]) for name in REDIS_COUNTERS if name in stats}

    def in_sync() -> bool:
        mine = primary.info("replication").get("master_repl_offset")
        theirs = replica.info("replication")
        return theirs.get("master_link_status") == "up" and (
            theirs.get("slave_repl_offset") == mine
        )

    return System(
        name="redis",
        backup_pid=lambda: replica.pid,
        counters=counters,
        wait_in_sync=lambda timeout: servers.wait_for(in_sync, timeout, "redis to be in sync"),
        writer=lambda prefix: RedisWriter(primary.host, primary.port, prefix),
    )


def _run_redis(
    net: netns.Topology,
    binary: str,
    workdir: Path,
    keys: int,
    args: argparse.Namespace,
    say: Any,
    results: list[dict[str, Any]],
) -> None:
    primary = servers.Redis(
        binary,
        workdir,
        f"redis-primary-{keys}",
        host=net.addresses["primary"],
        prefix=net.command("primary"),
    )
    replica = servers.Redis(
        binary,
        workdir,
        f"redis-replica-{keys}",
        host=net.addresses["backup"],
        prefix=net.command("backup"),
    )
    try:
        # Reachable only inside the namespaces, which protected mode does not know.
        isolated = ["--protected-mode", "no"]
        primary.start(extra=isolated)
        seconds = bulk.load_redis(primary, keys)
        say(f"redis: loaded {keys} pairs in {seconds:.1f} s")
        replica.start(replicaof=primary, extra=isolated)
        replica.wait_link_up(args.timeout)
        system = _redis_system(primary, replica)
        for kind in args.faults:
            say(f"redis {keys}: {kind} for {args.blip_seconds} s")
            result = _blip(net, system, kind, args.blip_seconds, args.timeout)
            results.append({"keys": keys, "load_seconds": seconds, **result})
    finally:
        with contextlib.suppress(Exception):
            os.kill(replica.pid, signal.SIGCONT)
        replica.stop()
        primary.stop()


# ---------------------------------------------------------------- report


def _full_transfers(result: dict[str, Any]) -> int | None:
    """Full copies of the database the blip caused, as the primary counts them."""
    delta = result["counters_delta"]
    if result["system"] == "redis":
        return delta.get("sync_full")
    if "primary_resyncs_full" in delta:
        return delta["primary_resyncs_full"]
    # transfers_completed also counts a synchronisation that found both sides equal.
    return result["transfers_started"]


def _partial_resyncs(result: dict[str, Any]) -> int | None:
    delta = result["counters_delta"]
    return delta.get(
        "sync_partial_ok" if result["system"] == "redis" else "primary_resyncs_partial"
    )


def _targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in results:
        if r["system"] != "pbkv":
            continue
        where = f"pbkv {r['fault']} {r['keys']}"
        ms = r["heal_to_first_ack_ms"]
        out.append(
            {"target": f"{where}: heal to first ack <= 100 ms", "value": ms, "met": ms <= TARGET_MS}
        )
        full = r["full_transfers"]
        out.append({"target": f"{where}: no full transfer", "value": full, "met": full == 0})
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _print_table(report: dict[str, Any]) -> None:
    print()
    print(
        f"blip of {report['blip_seconds']} s under a steady writer "
        "(one connection, one write at a time; 16-byte keys, 100-byte values)"
    )
    head = (
        f"{'system':<6} {'pairs':>9} {'fault':<5} {'heal->ack ms':>12} {'longest gap ms':>14} "
        f"{'acked':>6} {'failed':>6} {'full transfers':>14} {'partial resyncs':>15}"
    )
    print(head)
    print("-" * len(head))
    for r in report["results"]:
        print(
            f"{r['system']:<6} {r['keys']:>9} {r['fault']:<5} "
            f"{r['heal_to_first_ack_ms']:>12.1f} {r['max_gap_ms']:>14.1f} "
            f"{r['writes_acked']:>6} {r['writes_failed']:>6} {_fmt(r['full_transfers']):>14} "
            f"{_fmt(r['partial_resyncs']):>15}"
        )
    if report.get("redis_skipped"):
        print(f"redis: skipped ({report['redis_skipped']})")
    if report.get("error"):
        print(f"stopped early, the rest not measured: {report['error']}")
    print()
    print("counters on the primary, before -> after (pbkv: also the backup's):")
    for r in report["results"]:
        shown = ", ".join(
            f"{name} {r['counters_before'].get(name)} -> {value}"
            for name, value in r["counters_after"].items()
        )
        print(f"  {r['system']} {r['keys']} {r['fault']}: {shown}")
    for r in report["results"]:
        if r["events"]:
            print(f"\n{r['system']} {r['keys']} {r['fault']}: logged, in seconds from the heal")
            for e in r["events"]:
                print(f"  {e['at_s']:+8.3f} {e['event']}")
    print()
    for t in report["targets"]:
        value = t["value"]
        shown = f"{value:.1f} ms" if isinstance(value, float) else f"{_fmt(value)} transfers"
        print(f"  {t['target']:<48} {shown:>14}: {'met' if t['met'] else 'MISSED'}")


# ---------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.blip",
        description="A 3 s replication blip under a steady writer: pbkv vs Redis.",
    )
    ap.add_argument(
        "--keys", type=int, nargs="+", help="pairs loaded, one run per size (default 1M and 5M)"
    )
    ap.add_argument("--blip-seconds", type=float, help="length of each fault (default 3)")
    ap.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    ap.add_argument(
        "--quick", action="store_true", help="20,000 pairs and 2.5 s faults (a smoke test)"
    )
    ap.add_argument("--pbkv-flags", default="", help="extra `pbkv serve` flags")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for any recovery")
    servers.add_redis_arguments(ap)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    return ap


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that every `finally` cleans up


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.keys is None:
        args.keys = [20_000] if args.quick else list(DEFAULT_KEYS)
    if args.blip_seconds is None:
        # Longer than pbkv's default ack and peer timeouts (2 s), even when quick.
        args.blip_seconds = 2.5 if args.quick else 3.0
    if any(k < 1 for k in args.keys) or args.blip_seconds <= 0:
        print("blip: --keys and --blip-seconds must be positive", file=sys.stderr)
        return 2
    say = servers.progress_printer(args.json)
    reason = netns.available()
    if reason is not None:
        print(f"blip: cannot build the network namespaces: {reason}", file=sys.stderr)
        return 2
    found = servers.redis_for_run(args, "blip", say)
    if found is None:
        return 2
    redis_binary, redis_reason = found

    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="pbkv-blip-"))
    report: dict[str, Any] = {
        "blip_seconds": args.blip_seconds,
        "faults": args.faults,
        "key_bytes": bulk.KEY_BYTES,
        "value_bytes": bulk.VALUE_BYTES,
        "pbkv_revision": servers.pbkv_revision(),
        "pbkv_flags": args.pbkv_flags,
    }
    results: list[dict[str, Any]] = []  # filled as each blip ends: a failure keeps the rest
    try:
        with netns.Topology() as net, net.inside("client"):
            for keys in args.keys:
                _run_pbkv(net, workdir, keys, args, say, results)
                if redis_binary is not None:
                    _run_redis(net, redis_binary, workdir, keys, args, say, results)
    except (RuntimeError, TimeoutError, OSError) as exc:  # TopologyError is a RuntimeError
        report["error"] = f"{type(exc).__name__}: {exc}"
        say(f"blip: stopped early: {report['error']}")
    finally:
        if args.keep:
            say(f"blip: logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for r in results:
        r["full_transfers"] = _full_transfers(r)
        r["partial_resyncs"] = _partial_resyncs(r)
    report["results"] = results
    if redis_binary is not None:
        report["redis_version"] = servers.redis_version(redis_binary)
    else:
        report["redis_skipped"] = redis_reason
    report["targets"] = _targets(results)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
