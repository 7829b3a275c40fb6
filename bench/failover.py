"""Failover under faults: three pbkv members with etcd against Redis with Sentinel.

Each system runs on "hosts" of its own (``pbkv.testing.hosts``: network namespaces
on one bridge); the writer and the reader run in the hub, which reaches every host:

* pbkv: one etcd (``pbkv.testing.etcd``, on host s1) and three members on n1, n2,
  n3, each started with ``bin/start_server -m HOST:PORT`` and the settings
  ``coordinator``, ``cluster``, ``lease_ttl`` and ``secret``; the client finds the
  primary by each member's ``/kvman/status`` ``role`` (and a refusal's ``primary``);
* Redis: one master and two replicas on n1, n2, n3 (persistence off, as pbkv keeps
  its data in memory), and three sentinels on s1, s2, s3 (quorum 2,
  ``down-after-milliseconds`` equal to pbkv's lease); the client finds the master
  with ``SENTINEL get-master-addr-by-name``, and a write is acknowledged only when
  ``WAIT 1 <wait-ms>`` after its ``SET`` reports at least one replica.

For each fault, on a fresh cluster: load N pairs (16-byte keys, 100-byte values;
Redis: pipelined, then confirmed on both replicas with ``WAIT 2``), start one writer
(unique keys, one at a time, following the primary after every failure), then hit
the primary:

* kill: ``kill -9``;
* restart: ``kill -9`` and, as soon as it is gone, the same server started again
  (well within the lease);
* partition: the primary's host cut off from every other host (the other servers
  and etcd / the sentinels) by iptables DROP both ways; the writer still reaches it.

Measured from the fault: the first read served (a read of the last write
acknowledged before the fault, sent after it, answered with that value; during the
partition, answers of the cut-off server do not count) and the first acknowledged
write (sent after the fault). Once both came (or the window ran out), the fault is
healed, the cluster given a lease and a second to settle, and every pair ever
acknowledged (the load and the writer's) read back from the primary: acknowledged
writes lost are those missing or changed.

Targets for pbkv: no acknowledged write lost; the first read within
lease + 0.5 s; the first acknowledged write within lease + 0.5 s + the time the new
backup took to be brought in sync (seen in the members' status), and sooner than
Sentinel's in the same run.

Needs root, iproute2, iptables; redis-server and redis-sentinel for Redis, etcd
for pbkv.

    python -m bench.failover                             # both systems, 1M pairs, every fault
    python -m bench.failover --only redis --pairs 100000 --faults kill partition
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import bulk, servers
from bench.resp_load import RespError, SyncRedis
from pbkv.client import Client, NotPrimary, PbkvError, ReplicationFailed, Unavailable
from pbkv.launcher import process_alive
from pbkv.testing import hosts
from pbkv.testing.etcd import EtcdServer, etcd_binary
from pbkv.testing.hosts import CLIENT, Hosts

DEFAULT_PAIRS = 1_000_000
SYSTEMS = ("pbkv", "redis")
FAULTS = ("kill", "restart", "partition")
SERVERS = ("n1", "n2", "n3")  # pbkv members, Redis servers
OTHERS = ("s1", "s2", "s3")  # Redis sentinels; etcd on s1
HOST_NAMES = SERVERS + OTHERS
PBKV_PORT = 8080
REDIS_PORT = 6379
SENTINEL_PORT = 26379
MASTER_NAME = "bench"
CLUSTER_NAME = "bench"
RETRY_PAUSE = 0.01  # after a failed request: the resolution of "first ... after the fault"
WARMUP_ACKS = 50  # acknowledged writes before the fault
WRONG_FOR = 2.0  # seconds of reads answered wrongly after the first ack: the value is lost
LOCATE_TIMEOUT = 0.3  # per server asked where the primary is
REQUEST_TIMEOUT = 10.0  # pbkv answers every request well within this (ack_timeout 2 s)
REFRESH = 0.1  # the reader asks where the primary is at least this often
SLACK = 0.5  # the targets' allowance on top of the lease


# ---------------------------------------------------------------- what a client sees


@dataclass(frozen=True, slots=True)
class Op:
    """One request: when it was sent and answered, how, and by which host."""

    sent: float
    done: float
    outcome: str  # "ok"; a read: "wrong" (answered, another value), or why it failed
    server: str | None


class Session:
    """One client connection that follows the primary (not thread-safe)."""

    def write(self, key: str, value: str) -> tuple[str, str | None]:
        """Write once; ("ok", host) only when acknowledged as the system defines it."""
        raise NotImplementedError

    def read(self, key: str, expected: str) -> tuple[str, str | None]:
        """Read once; ("ok", host) when answered with ``expected``."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class Loop(threading.Thread):
    """Writes (or reads) one request at a time until halted; started from a thread
    in the hub, it lives there too."""

    def __init__(self, session: Session, name: str) -> None:
        super().__init__(daemon=True, name=name)
        self.session = session
        self.ops: list[Op] = []
        self._stop_event = threading.Event()

    def step(self, i: int) -> tuple[str, str | None]:
        raise NotImplementedError

    def run(self) -> None:
        i = 0
        try:
            while not self._stop_event.is_set():
                sent = time.monotonic()
                outcome, server = self.step(i)
                self.ops.append(Op(sent, time.monotonic(), outcome, server))
                i += 1
                if outcome != "ok":
                    self._stop_event.wait(RETRY_PAUSE)
        finally:
            self.session.close()

    def halt(self, timeout: float = 60.0) -> None:
        self._stop_event.set()
        self.join(timeout)
        if self.is_alive():
            raise RuntimeError(f"{self.name} did not stop")


class Writer(Loop):
    """Unique keys ``<prefix><9 digits>``, values ``bulk.value_of``; remembers the
    acknowledged ones."""

    def __init__(self, session: Session, prefix: str) -> None:
        super().__init__(session, "writer")
        self.prefix = prefix
        self.acked: list[tuple[str, str]] = []

    def item(self, i: int) -> tuple[str, str]:
        return f"{self.prefix}{i:09d}", bulk.value_of(DEFAULT_PAIRS * 10 + i)

    def step(self, i: int) -> tuple[str, str | None]:
        key, value = self.item(i)
        outcome, server = self.session.write(key, value)
        if outcome == "ok":
            self.acked.append((key, value))
        return outcome, server


class Reader(Loop):
    """Reads one key, asking anew where the primary is every ``REFRESH`` seconds
    (as a Sentinel client told of a switch would): a server that keeps answering
    after losing its role must not keep the reader."""

    def __init__(self, session: Session, key: str, value: str) -> None:
        super().__init__(session, "reader")
        self.key, self.value = key, value
        self._located = time.monotonic()

    def step(self, i: int) -> tuple[str, str | None]:
        now = time.monotonic()
        if now - self._located >= REFRESH:
            self.session.close()
            self._located = now
        return self.session.read(self.key, self.value)


def first_after(ops: Iterable[Op], start: float, exclude: str | None = None) -> float | None:
    """When the first request sent at or after ``start`` succeeded (not counting
    answers from ``exclude``)."""
    times = [
        op.done
        for op in ops
        if op.sent >= start and op.outcome == "ok" and (exclude is None or op.server != exclude)
    ]
    return min(times) if times else None


def tally(ops: Iterable[Op]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op.outcome] = counts.get(op.outcome, 0) + 1
    return counts


# ---------------------------------------------------------------- a cluster


class Cluster:
    """What a fault run needs from a system; one instance per fault, on fresh hosts."""

    name = "?"

    def __init__(self, net: Hosts, workdir: Path, args: argparse.Namespace) -> None:
        self.net = net
        self.dir = workdir
        self.args = args
        self.host_of = {net.addresses[h]: h for h in HOST_NAMES}

    def start(self) -> None:
        raise NotImplementedError

    def load(self, pairs: int) -> float:
        """Load pairs 0..pairs-1, every one acknowledged; returns the seconds taken."""
        raise NotImplementedError

    def primary(self) -> str | None:
        """The host the system names as its primary now (None when it names none)."""
        raise NotImplementedError

    def session(self) -> Session:
        raise NotImplementedError

    def kill(self, host: str) -> float:
        """kill -9 the server on ``host`` and return once it is gone, with the time
        the signal was sent (the process dies with it)."""
        raise NotImplementedError

    def restart(self, host: str) -> None:
        """Start the server on ``host`` again (in the background)."""
        raise NotImplementedError

    def lost(self, acknowledged: Callable[[], Iterable[tuple[str, str]]]) -> int:
        """How many of the acknowledged pairs the primary lacks or holds changed."""
        raise NotImplementedError

    def observe(self, start: float) -> None:
        """Begin watching the cluster from the fault (optional)."""

    def details(self, start: float) -> dict[str, Any]:
        """Extra figures from the watch (optional)."""
        return {}

    def stop(self) -> None:
        pass


# ---------------------------------------------------------------- Redis + Sentinel


def sentinel_binary() -> str | None:
    return shutil.which("redis-sentinel")


def redis_missing() -> str | None:
    """None when Redis and Sentinel are installed, else what is missing."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian: apt-get install redis-server)"
    if sentinel_binary() is None:
        return "redis-sentinel is not installed (Debian: apt-get install redis-sentinel)"
    return None


class RedisSession(Session):
    def __init__(self, cluster: RedisCluster) -> None:
        self.cluster = cluster
        self.conn: SyncRedis | None = None
        self.server: str | None = None

    def _connected(self) -> SyncRedis | None:
        if self.conn is None:
            host = self.cluster.primary()
            if host is None:
                return None
            timeout = self.cluster.args.wait_ms / 1000 + 2.0
            self.conn = SyncRedis(self.cluster.net.addresses[host], REDIS_PORT, timeout)
            self.server = host
        return self.conn

    def write(self, key: str, value: str) -> tuple[str, str | None]:
        try:
            conn = self._connected()
            if conn is None:
                return "no master named", None
            conn.call("SET", key, value)
            replicas = conn.call("WAIT", 1, self.cluster.args.wait_ms)
        except (OSError, RespError) as exc:
            server = self.server
            self.close()
            return f"error: {type(exc).__name__}", server
        if isinstance(replicas, int) and replicas >= 1:
            return "ok", self.server
        server = self.server
        self.close()  # ask the sentinels again before the next write
        return "not replicated", server

    def read(self, key: str, expected: str) -> tuple[str, str | None]:
        try:
            conn = self._connected()
            if conn is None:
                return "no master named", None
            value = conn.call("GET", key)
        except (OSError, RespError) as exc:
            server = self.server
            self.close()
            return f"error: {type(exc).__name__}", server
        if value == expected.encode():
            return "ok", self.server
        server = self.server
        self.close()
        return "wrong", server

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None
        self.server = None


class RedisCluster(Cluster):
    name = "redis"

    def __init__(self, net: Hosts, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(net, workdir, args)
        binary = shutil.which("redis-server")
        sentinel = sentinel_binary()
        assert binary is not None and sentinel is not None
        self.sentinel_binary = sentinel
        self.redis: dict[str, servers.Redis] = {}
        for host in SERVERS:
            server = servers.Redis(
                binary, workdir, f"redis-{host}", net.addresses[host], net.command(host)
            )
            server.port = REDIS_PORT  # a host of its own: the usual port is free
            self.redis[host] = server
        self.sentinels: dict[str, subprocess.Popen[bytes]] = {}

    # Reachable only inside the namespaces, which protected mode does not know.
    EXTRA = ("--protected-mode", "no")

    def start(self) -> None:
        master = self.redis[SERVERS[0]]
        master.start(extra=self.EXTRA)
        for host in SERVERS[1:]:
            self.redis[host].start(replicaof=master, extra=self.EXTRA)
        for host in SERVERS[1:]:
            self.redis[host].wait_link_up(self.args.timeout)
        for host in OTHERS:
            self._start_sentinel(host, master)
        servers.wait_for(self._sentinels_ready, self.args.timeout, "the sentinels to meet")

    def _start_sentinel(self, host: str, master: servers.Redis) -> None:
        folder = self.dir / f"sentinel-{host}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"
        conf.write_text(
            "\n".join(
                [
                    f"port {SENTINEL_PORT}",
                    f"bind {self.net.addresses[host]}",
                    "protected-mode no",
                    "daemonize no",
                    f"dir {folder}",
                    f"logfile {folder / 'sentinel.log'}",
                    f"sentinel monitor {MASTER_NAME} {master.host} {REDIS_PORT} 2",
                    f"sentinel down-after-milliseconds {MASTER_NAME} {self.args.lease * 1000}",
                    f"sentinel parallel-syncs {MASTER_NAME} 1",
                    "",
                ]
            )
        )
        self.sentinels[host] = self.net.popen(
            host, [self.sentinel_binary, str(conf)], stdout=subprocess.DEVNULL
        )

    def _sentinel(self, host: str, *command: str) -> Any:
        with SyncRedis(self.net.addresses[host], SENTINEL_PORT, LOCATE_TIMEOUT) as s:
            return s.call(*command)

    def _sentinels_ready(self) -> bool:
        """Every sentinel knows both replicas and the two other sentinels."""
        try:
            for host in OTHERS:
                replicas = self._sentinel(host, "SENTINEL", "REPLICAS", MASTER_NAME)
                others = self._sentinel(host, "SENTINEL", "SENTINELS", MASTER_NAME)
                if len(replicas) != 2 or len(others) != 2:
                    return False
        except (OSError, RespError):
            return False
        return True

    def primary(self) -> str | None:
        for host in OTHERS:
            try:
                reply = self._sentinel(host, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
            except (OSError, RespError):
                continue
            if isinstance(reply, list) and reply and isinstance(reply[0][1], bytes):
                return self.host_of.get(reply[0][1].decode())
        return None

    def session(self) -> Session:
        return RedisSession(self)

    def load(self, pairs: int) -> float:
        master = self.redis[SERVERS[0]]
        started = time.monotonic()
        bulk.load_redis(master, pairs)
        # WAIT counts replicas that have this connection's last write, and with it
        # everything written before it on every connection: the whole load.
        with master.client(self.args.timeout) as r:
            r.call("SET", "failover-load-done", "1")
            replicas = r.call("WAIT", 2, int(self.args.timeout * 1000))
        if replicas != 2:
            raise RuntimeError(f"redis: the load reached {replicas} of 2 replicas")
        return time.monotonic() - started

    def kill(self, host: str) -> float:
        process = self.redis[host].proc
        assert process is not None
        sent = time.monotonic()
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        self.redis[host].proc = None
        return sent

    def restart(self, host: str) -> None:
        self.redis[host].start(extra=self.EXTRA)  # as it first started: a master

    def lost(self, acknowledged: Callable[[], Iterable[tuple[str, str]]]) -> int:
        host = self.primary()
        if host is None:
            raise RuntimeError("redis: the sentinels name no master")
        missing = 0
        batch: list[tuple[str, str]] = []
        with self.redis[host].client(self.args.timeout) as r:

            def check() -> int:
                values = r.call("MGET", *(key for key, _ in batch))
                assert isinstance(values, list)
                return sum(
                    1
                    for (_, value), (_, got) in zip(batch, values, strict=True)
                    if got != value.encode()
                )

            for pair in acknowledged():
                batch.append(pair)
                if len(batch) == 1000:
                    missing += check()
                    batch.clear()
            if batch:
                missing += check()
        return missing

    def stop(self) -> None:
        for server in self.redis.values():
            with contextlib.suppress(Exception):
                server.stop()
        for process in self.sentinels.values():
            if process.poll() is None:
                process.kill()
            process.wait()


# ---------------------------------------------------------------- pbkv members + etcd


class PbkvSession(Session):
    def __init__(self, cluster: PbkvCluster) -> None:
        self.cluster = cluster
        self.client: Client | None = None
        self.server: str | None = None
        self.hint: str | None = None  # a refusal's "primary": HOST:PORT

    def _connected(self) -> Client | None:
        if self.client is None:
            host = self.cluster.host_of.get((self.hint or "").partition(":")[0])
            self.hint = None
            if host is None:
                host = self.cluster.primary()
            if host is None:
                return None
            self.client = Client(  # one attempt: the bench counts every failure
                self.cluster.net.addresses[host], PBKV_PORT, timeout=REQUEST_TIMEOUT, retry_for=0
            )
            self.server = host
        return self.client

    def _failed(self, exc: Exception) -> tuple[str, str | None]:
        server = self.server
        if isinstance(exc, NotPrimary):
            self.hint = exc.primary or None
        self.close()
        if isinstance(exc, ReplicationFailed):
            return "replication failed", server
        if isinstance(exc, Unavailable):
            return f"refused ({exc.stage})", server
        if isinstance(exc, PbkvError):
            return f"error {exc.status}", server
        return f"error: {type(exc).__name__}", server

    def write(self, key: str, value: str) -> tuple[str, str | None]:
        try:
            client = self._connected()
            if client is None:
                return "no primary named", None
            inserted = client.insert(key, value)
        except (OSError, PbkvError) as exc:
            return self._failed(exc)
        return ("ok" if inserted else "refused: key exists"), self.server

    def read(self, key: str, expected: str) -> tuple[str, str | None]:
        try:
            client = self._connected()
            if client is None:
                return "no primary named", None
            value = client.get(key)
        except (OSError, PbkvError) as exc:
            return self._failed(exc)
        return ("ok" if value == expected else "wrong"), self.server

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
        self.server = None


class StatusWatch(threading.Thread):
    """Polls every member's /kvman/status, recording (time, host, status)."""

    def __init__(self, cluster: PbkvCluster, interval: float = 0.05) -> None:
        super().__init__(daemon=True, name="status-watch")
        self.cluster = cluster
        self.interval = interval
        self.samples: list[tuple[float, str, dict[str, Any]]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            for host in SERVERS:
                status = self.cluster.status(host)
                if status is not None:
                    self.samples.append((time.monotonic(), host, status))
            self._stop_event.wait(self.interval)

    def halt(self) -> None:
        self._stop_event.set()
        self.join(10)

    def transfer_seconds(self, start: float) -> float:
        """How long the member that received the new primary's data took to receive
        it (its own ``last_transfer_seconds``, from the first frame to the checksum),
        for transfers that ended after ``start``; the longest (0: none)."""
        took = 0.0
        before: dict[str, int] = {}  # by member name: a restarted member is a new one
        for t, _, status in self.samples:
            done = status.get("transfers_completed", 0)
            name = str(status.get("member"))
            if t < start:
                before[name] = done
            elif done > before.get(name, 0) and status.get("core_role") == "backup":
                took = max(took, float(status.get("last_transfer_seconds", 0.0)))
        return took

    def resync_kind(self, start: float) -> str:
        """How the first member brought in sync after ``start`` got there: "a catch-up"
        (the spare had followed the backup), "a full transfer", or "" (not seen). Only
        the first: the member restarted when a kill is healed comes later."""
        first: dict[str, tuple[int, int]] = {}  # each member's counts when first seen
        for t, _, status in self.samples:
            counts = (status.get("transfers_completed", 0), status.get("catchups") or 0)
            name = str(status.get("member"))
            was = first.setdefault(name, counts)
            if t >= start and status.get("core_role") == "backup" and counts[0] > was[0]:
                return "a catch-up" if counts[1] > was[1] else "a full transfer"
        return ""


class PbkvCluster(Cluster):
    name = "pbkv"

    def __init__(self, net: Hosts, workdir: Path, args: argparse.Namespace) -> None:
        super().__init__(net, workdir, args)
        self.etcd: EtcdServer | None = None
        self.config = workdir / "pbkv" / "settings.conf"
        self.config.parent.mkdir(parents=True, exist_ok=True)
        self.starting: list[subprocess.Popen[bytes]] = []
        self.watch: StatusWatch | None = None

    def run_dir(self, host: str) -> Path:
        return self.dir / "pbkv" / host

    def _script(self, script: str, host: str) -> list[str]:
        return self.net.command(
            host,
            str(servers.BIN / script),
            "-m",
            f"{self.net.addresses[host]}:{PBKV_PORT}",
            "--config",
            str(self.config),
            "--run-dir",
            str(self.run_dir(host)),
        )

    def start(self) -> None:
        with self.net.inside(OTHERS[0]):  # etcd binds, and is started, on s1
            self.etcd = EtcdServer(self.dir / "etcd", host=self.net.addresses[OTHERS[0]])
            self.etcd.start(self.args.timeout)
        settings = {
            "coordinator": self.etcd.client_url,
            "cluster": CLUSTER_NAME,
            "lease_ttl": str(self.args.lease),
            "secret": secrets.token_hex(16),
            "errors": "http",
        }
        self.config.write_text(json.dumps(settings))
        for host in SERVERS:  # n1 first: it normally becomes the primary
            self.run_dir(host).mkdir(parents=True, exist_ok=True)
            done = subprocess.run(
                self._script("start_server", host),
                capture_output=True,
                text=True,
                timeout=self.args.timeout,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"pbkv: bin/start_server -m on {host} failed ({done.returncode}): "
                    f"{((done.stderr or done.stdout).strip().splitlines() or ['?'])[-1]}"
                )
        servers.wait_for(self._in_sync, self.args.timeout, "pbkv to have a backup in sync")

    def status(self, host: str, timeout: float = LOCATE_TIMEOUT) -> dict[str, Any] | None:
        try:
            found = servers.http_get_json(
                self.net.addresses[host], PBKV_PORT, "/kvman/status", timeout
            )
        except (OSError, ValueError, http.client.HTTPException):
            return None
        return found if isinstance(found, dict) else None

    def _in_sync(self) -> bool:
        host = self.primary()
        status = self.status(host) if host is not None else None
        return bool(status and status.get("in_sync_backup"))

    def primary(self) -> str | None:
        best: tuple[int, str] | None = None
        for host in SERVERS:
            status = self.status(host)
            if status is None or status.get("role") != "primary":
                continue
            epoch = status.get("epoch")
            rank = (epoch if isinstance(epoch, int) else -1, host)
            if best is None or rank > best:
                best = rank
        return None if best is None else best[1]

    def session(self) -> Session:
        return PbkvSession(self)

    def load(self, pairs: int) -> float:
        host = self.primary()
        if host is None:
            raise RuntimeError("pbkv: no member is the primary")
        seconds = bulk.load_pbkv(self.net.addresses[host], PBKV_PORT, pairs, " while loading")
        servers.wait_for(self._in_sync, self.args.timeout, "pbkv to have a backup in sync")
        # As Redis's replicas are both confirmed: the spare follows the backup's stream.
        servers.wait_for(self._spare_follows, self.args.timeout, "the pbkv spare to follow")
        return seconds

    def _spare_follows(self) -> bool:
        for host in SERVERS:
            status = self.status(host)
            if status is not None and status.get("role") == "spare":
                return status.get("follow_step") == "following"
        return False

    def pid(self, host: str) -> int | None:
        name = f"member-{self.net.addresses[host]}-{PBKV_PORT}.pid"
        for path in (self.run_dir(host) / "run" / name, self.run_dir(host) / name):
            with contextlib.suppress(OSError, ValueError):
                pid = int(path.read_text())
                if process_alive(pid):
                    return pid
        return None

    def kill(self, host: str) -> float:
        pid = self.pid(host)
        pids = [pid] if pid is not None else self.net.pids(host)
        if not pids:
            raise RuntimeError(f"pbkv: nothing runs on {host}")
        sent = time.monotonic()
        for each in pids:
            os.kill(each, signal.SIGKILL)
        servers.wait_for(
            lambda: not any(process_alive(p) for p in pids), 10, f"the member on {host} to die"
        )
        return sent

    def restart(self, host: str) -> None:
        self.starting.append(
            subprocess.Popen(
                self._script("start_server", host),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def observe(self, start: float) -> None:
        self.watch = StatusWatch(self)
        self.watch.start()

    def details(self, start: float) -> dict[str, Any]:
        if self.watch is None:
            return {}
        self.watch.halt()
        roles = []
        last: dict[str, tuple[Any, Any]] = {}
        for t, host, status in self.watch.samples:
            seen = (status.get("role"), status.get("stage"))
            if last.get(host) != seen:
                last[host] = seen
                roles.append({"at_s": round(t - start, 3), "host": host, "role_stage": seen})
        return {
            "transfer_s": self.watch.transfer_seconds(start),
            "resync": self.watch.resync_kind(start),
            "status_changes": roles,
        }

    def lost(self, acknowledged: Callable[[], Iterable[tuple[str, str]]]) -> int:
        host = self.primary()
        if host is None:
            raise RuntimeError("pbkv: no member is the primary")
        with Client(self.net.addresses[host], PBKV_PORT, timeout=self.args.timeout) as client:
            held = client.dump_dict()
        return sum(1 for key, value in acknowledged() if held.get(key) != value)

    def stop(self) -> None:
        if self.watch is not None and self.watch.is_alive():
            self.watch.halt()
        for host in SERVERS:
            pid = self.pid(host)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for process in self.starting:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
        if self.etcd is not None:
            self.etcd.cleanup()


def pbkv_missing() -> str | None:
    if etcd_binary() is None:
        return "etcd is not installed (Debian: apt-get install etcd-server)"
    return None


# ---------------------------------------------------------------- one fault


def _settled(condition: Callable[[], Any], seconds: float) -> None:
    """Wait ``seconds`` (a settling time, not a condition) and then for ``condition``."""
    time.sleep(seconds)
    servers.wait_for(condition, 60, "the cluster to name a primary", step=0.05)


def run_fault(
    cluster: Cluster, fault: str, args: argparse.Namespace, say: Callable[[str], None]
) -> dict[str, Any]:
    cluster.start()
    load_seconds = cluster.load(args.pairs)
    say(f"{cluster.name} {fault}: loaded {args.pairs} pairs in {load_seconds:.1f} s")
    target = cluster.primary()
    if target is None:
        raise RuntimeError(f"{cluster.name}: no primary before the fault")
    writer = Writer(cluster.session(), f"w-{fault}-")
    writer.start()
    reader: Reader | None = None
    try:
        servers.wait_for(
            lambda: len(writer.acked) >= WARMUP_ACKS, 60, f"{cluster.name} writer to warm up"
        )
        key, value = writer.acked[-1]  # acknowledged before the fault
        reader = Reader(cluster.session(), key, value)
        if fault == "partition":
            cluster.observe(time.monotonic())
            cluster.net.isolate(target)
            start = time.monotonic()  # the rules are in: whatever is sent now is cut off
        else:
            cluster.observe(time.monotonic())
            start = cluster.kill(target)
            if fault == "restart":
                cluster.restart(target)
        reader.start()
        excluded = target if fault == "partition" else None
        deadline = start + args.window
        while time.monotonic() < deadline:
            first_write = first_after(writer.ops, start)
            first_read = first_after(reader.ops, start, excluded)
            if first_write is not None and first_read is not None:
                break
            if first_write is not None:  # reads still wrong long after writes resumed
                wrong = [op.done for op in reader.ops if op.sent >= first_write]
                if (
                    wrong
                    and reader.ops[-1].outcome == "wrong"
                    and wrong[-1] - wrong[0] >= WRONG_FOR
                ):
                    break
            time.sleep(0.01)
    finally:
        writer.halt()
        if reader is not None:
            reader.halt()
    details = cluster.details(start)
    if fault == "partition":
        cluster.net.heal()
    acked = list(writer.acked)

    def acknowledged() -> Iterable[tuple[str, str]]:
        for i in range(args.pairs):
            yield bulk.key_of(i), bulk.value_of(i)
        yield from acked

    lost: int | None = None
    unchecked = None
    try:  # the timings stand even when the cluster never recovers
        _settled(cluster.primary, args.lease + 1.0)
        lost = cluster.lost(acknowledged)
    except (RuntimeError, TimeoutError, OSError, PbkvError, RespError) as exc:
        unchecked = f"{type(exc).__name__}: {exc}"
    first_write = first_after(writer.ops, start)
    first_read = first_after(reader.ops, start, excluded)
    wrong_reads = [op.done for op in reader.ops if op.sent >= start and op.outcome == "wrong"]
    return {
        "system": cluster.name,
        "fault": fault,
        "pairs": args.pairs,
        "load_s": load_seconds,
        "faulted_host": target,
        "first_read_s": None if first_read is None else first_read - start,
        "first_ack_s": None if first_write is None else first_write - start,
        "reads_wrong_from_s": min(wrong_reads) - start if wrong_reads else None,
        "acknowledged": args.pairs + len(acked),
        "lost": lost,
        "unchecked": unchecked,  # why the lost writes could not be counted
        "writes": tally(op for op in writer.ops if op.sent >= start),
        "reads": tally(op for op in reader.ops),
        **details,
    }


def run_case(
    system: str, fault: str, workdir: Path, args: argparse.Namespace, say: Callable[[str], None]
) -> dict[str, Any]:
    folder = workdir / f"{system}-{fault}"
    folder.mkdir(parents=True)
    kind = PbkvCluster if system == "pbkv" else RedisCluster
    with Hosts(HOST_NAMES) as net, net.inside(CLIENT):
        cluster = kind(net, folder, args)
        try:
            return run_fault(cluster, fault, args, say)
        finally:
            cluster.stop()


# ---------------------------------------------------------------- report


def targets(results: list[dict[str, Any]], lease: int) -> list[dict[str, Any]]:
    redis = {r["fault"]: r for r in results if r["system"] == "redis" and "error" not in r}
    out: list[dict[str, Any]] = []
    for r in results:
        if r["system"] != "pbkv" or "error" in r:
            continue
        fault = r["fault"]
        out.append({"target": f"pbkv {fault}: 0 acknowledged writes lost", "met": r["lost"] == 0})
        read, ack = r["first_read_s"], r["first_ack_s"]
        out.append(
            {
                "target": f"pbkv {fault}: first read <= lease + {SLACK} s ({lease + SLACK:.1f} s)",
                "met": read is not None and read <= lease + SLACK,
            }
        )
        bound = lease + SLACK + r.get("transfer_s", 0.0)
        out.append(
            {
                "target": f"pbkv {fault}: first acked write <= lease + {SLACK} s + transfer "
                f"({bound:.2f} s)",
                "met": ack is not None and ack <= bound,
            }
        )
        theirs = redis.get(fault, {}).get("first_ack_s")
        if fault in redis:
            out.append(
                {
                    "target": f"pbkv {fault}: first acked write sooner than Sentinel's",
                    "met": ack is not None and (theirs is None or ack < theirs),
                }
            )
    return out


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    if ours is None or theirs is None or theirs <= 0:
        return "n/a"
    return f"{ours / theirs:.2f}x"


def print_report(report: dict[str, Any]) -> None:
    results = report["results"]
    print()
    print(
        f"failover with {report['pairs']} pairs loaded; lease = down-after = "
        f"{report['lease']} s; Redis WAIT 1 {report['wait_ms']} ms"
    )
    head = (
        f"{'system':<6} {'fault':<9} {'first read s':>12} {'first acked write s':>19} "
        f"{'acked writes lost':>19}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        if "error" in r:
            print(f"{r['system']:<6} {r['fault']:<9} error: {r['error']}")
            continue
        lost = "unchecked" if r["lost"] is None else f"{r['lost']} of {r['acknowledged']}"
        print(
            f"{r['system']:<6} {r['fault']:<9} {_seconds(r['first_read_s']):>12} "
            f"{_seconds(r['first_ack_s']):>19} {lost:>19}"
        )
    for skipped, why in report["skipped"].items():
        print(f"{skipped}: skipped ({why})")
    measured = {(r["system"], r["fault"]): r for r in results if "error" not in r}
    ratios = []
    for fault in report["faults"]:
        ours, theirs = measured.get(("pbkv", fault)), measured.get(("redis", fault))
        if ours and theirs:
            ratios.append(
                f"  {fault:<9} first read {_ratio(ours['first_read_s'], theirs['first_read_s'])}"
                f", first acked write {_ratio(ours['first_ack_s'], theirs['first_ack_s'])}"
            )
    if ratios:
        print("\npbkv / redis:")
        print("\n".join(ratios))
    notes = []
    for r in results:
        if "error" in r:
            continue
        where = f"{r['system']} {r['fault']}"
        if r.get("unchecked"):
            notes.append(f"  {where}: lost writes not counted: {r['unchecked']}")
        if r.get("reads_wrong_from_s") is not None:
            notes.append(
                f"  {where}: reads answered with another value (the pair lost) from "
                f"{r['reads_wrong_from_s']:.2f} s"
            )
        if r.get("transfer_s") or r.get("resync"):
            how = f" by {r['resync']}" if r.get("resync") else ""
            notes.append(
                f"  {where}: new backup brought in sync{how} in {r.get('transfer_s', 0.0):.2f} s"
            )
        failed = {k: v for k, v in r["writes"].items() if k != "ok"}
        if failed:
            shown = ", ".join(f"{k} {v}" for k, v in sorted(failed.items()))
            notes.append(f"  {where}: writes not acknowledged after the fault: {shown}")
    if notes:
        print("\nnotes:")
        print("\n".join(notes))
    if report["targets"]:
        print("\ntargets:")
        for t in report["targets"]:
            print(f"  {t['target']:<70} {'met' if t['met'] else 'MISSED'}")


# ---------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.failover",
        description="Failover after kill -9, kill -9 + restart and a partition of the "
        "primary: pbkv (three members, etcd) against Redis (Sentinel).",
    )
    ap.add_argument("--only", choices=SYSTEMS, help="measure one system only")
    ap.add_argument(
        "--pairs", type=int, default=DEFAULT_PAIRS, help="pairs loaded (default 1,000,000)"
    )
    ap.add_argument("--faults", nargs="+", choices=FAULTS, default=list(FAULTS))
    ap.add_argument(
        "--lease",
        type=int,
        default=3,
        help="pbkv's lease_ttl and Sentinel's down-after, in seconds (default 3)",
    )
    ap.add_argument(
        "--wait-ms", type=int, default=250, help="Redis: the timeout of WAIT 1 (default 250)"
    )
    ap.add_argument(
        "--window", type=float, default=60.0, help="seconds to wait for service after a fault"
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for any set-up step")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead")
    ap.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    return ap


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # so that every `finally` cleans up


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.pairs < 1 or args.lease < 2 or args.wait_ms < 1 or args.window <= 0:
        print("failover: --pairs, --wait-ms and --window must be positive, --lease >= 2")
        return 2
    say = servers.progress_printer(args.json)
    reason = hosts.available()
    if reason is not None:
        print(f"failover: cannot build the network namespaces: {reason}", file=sys.stderr)
        return 2
    systems = [args.only] if args.only else list(SYSTEMS)
    skipped: dict[str, str] = {}
    for system, missing in (("pbkv", pbkv_missing()), ("redis", redis_missing())):
        if system in systems and missing is not None:
            skipped[system] = missing
            systems.remove(system)
    if not systems:
        print(f"failover: nothing to measure: {skipped}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, _terminate)
    workdir = Path(tempfile.mkdtemp(prefix="pbkv-failover-"))
    results: list[dict[str, Any]] = []
    try:
        for fault in args.faults:
            for system in systems:
                say(f"{system} {fault}: starting")
                try:
                    results.append(run_case(system, fault, workdir, args, say))
                except (RuntimeError, TimeoutError, OSError, PbkvError, RespError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    say(f"{system} {fault}: failed: {error}")
                    results.append({"system": system, "fault": fault, "error": error})
    finally:
        if args.keep:
            say(f"failover: logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report: dict[str, Any] = {
        "pairs": args.pairs,
        "lease": args.lease,
        "wait_ms": args.wait_ms,
        "faults": args.faults,
        "pbkv_revision": servers.pbkv_revision(),
        "results": results,
        "skipped": skipped,
        "targets": targets(results, args.lease),
    }
    if "redis" in systems:
        report["redis_version"] = servers.redis_version(shutil.which("redis-server") or "")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
