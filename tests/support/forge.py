"""What an attacker sends: raw replication channels and forged transfers."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Any

from pbkv.client import Client
from pbkv.store import ShardedStore, shard_of
from pbkv.wire import FrameCodec, FrameType, checksum_to_bytes, encode

UPGRADE_REQUEST = (
    b"GET /kvrepl HTTP/1.1\r\nHost: backup\r\nUpgrade: pbkv-repl/1\r\nConnection: Upgrade\r\n\r\n"
)


def checksum_of(pairs: dict[str, str]) -> bytes:
    store = ShardedStore(1)
    for key, value in pairs.items():
        store.put(key, value)
    return checksum_to_bytes(store.checksum)


def forged_hello(count: int = 0, checksum: bytes = checksum_of({})) -> list[Any]:
    """A HELLO claiming to be a confirmed primary."""
    return [FrameType.HELLO, "primary", True, checksum, count, 0, 1, [], 0, "", False]


def transfer_frames(pairs: dict[str, str], shards: int = 16, moved: str | None = None) -> list:
    """A full transfer of ``pairs``, every checksum and count consistent with what is sent;
    ``moved`` goes in the shard after its own (the issue's wrong-shard attack)."""
    home = {key: shard_of(key, shards) for key in pairs}
    if moved is not None:
        home[moved] = (home[moved] + 1) % shards
    frames: list[list[Any]] = [[FrameType.SNAPSHOT_BEGIN, shards, len(pairs)]]
    for shard in range(shards):
        members = {k: v for k, v in pairs.items() if home[k] == shard}
        if members:
            flat = [item for pair in members.items() for item in pair]
            frames.append([FrameType.SHARD_CHUNK, shard, flat])
        frames.append([FrameType.SHARD_END, shard, checksum_of(members), len(members)])
    frames.append([FrameType.IDEMPOTENCY_CHUNK, 0, []])  # an empty idempotency table
    frames.append([FrameType.SNAPSHOT_END, checksum_of(pairs), len(pairs), 0])
    return frames


class RawChannel:
    """An HTTP Upgrade to /kvrepl from ``source`` (any 127.0.0.0/8 address works locally)."""

    def __init__(self, address: tuple[str, int], source: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout, source_address=(source, 0))
        self.sock.sendall(UPGRADE_REQUEST)
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(4096)
            if not data:
                break
            head += data
        self.head, _, self.rest = head.partition(b"\r\n\r\n")
        self.status = int(self.head.split()[1]) if self.head else 0
        self.decoder = FrameCodec()

    def body(self) -> bytes:
        """The rest of a refusal (the server closes after it)."""
        data = self.rest
        while chunk := self.sock.recv(4096):
            data += chunk
        return data

    def send(self, *frames: list[Any]) -> None:
        self.sock.sendall(b"".join(encode(frame) for frame in frames))

    def frames_until_closed(self) -> list[Any]:
        """Every frame the server sends until it closes the channel."""
        frames = self.decoder.feed(self.rest)
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            frames += self.decoder.feed(data)
        return frames

    def close(self) -> None:
        self.sock.close()


def upgrade_flood(address: tuple[str, int], source: str, seconds: float, threads: int = 2) -> int:
    """Upgrade after Upgrade to /kvrepl from ``source`` for ``seconds``: each reads its
    answer, sends a forged HELLO or nothing, and goes.  How many got 101."""
    deadline = time.monotonic() + seconds
    counts = [0] * threads
    hello = encode(forged_hello())

    def flood(index: int) -> None:
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(
                    address, timeout=2, source_address=(source, 0)
                ) as sock:
                    sock.sendall(UPGRADE_REQUEST)
                    if sock.recv(4096).startswith(b"HTTP/1.1 101 "):
                        counts[index] += 1
                        if counts[index] % 2:
                            sock.sendall(hello)
            except OSError:
                pass

    workers = [threading.Thread(target=flood, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts)


class Writer:
    """Inserts one key after another on a thread until closed: when each was
    acknowledged, and every refusal (``with Writer(address) as writer: ...``)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.acknowledged = 0
        self.refused: list[str] = []
        self.longest_gap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Writer:
        self._last: float | None = None
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stopped_at = time.monotonic()
        self._stop.set()
        self._thread.join(30)
        if self._last is not None:  # the writer may be stuck since its last acknowledgement
            self.longest_gap = max(self.longest_gap, self._stopped_at - self._last)

    def _run(self) -> None:
        with Client(*self.address, timeout=10, idempotency_keys=False) as client:
            while not self._stop.is_set():
                try:
                    ok = client.insert(f"writer-{self.acknowledged}-{time.monotonic()}", "x")
                except Exception as exc:  # noqa: BLE001 - every refusal is reported
                    self.refused.append(repr(exc))
                    continue
                now = time.monotonic()
                if not ok:
                    self.refused.append("insert answered false")
                    continue
                if self._last is not None:
                    self.longest_gap = max(self.longest_gap, now - self._last)
                self._last = now
                self.acknowledged += 1
