"""What an attacker sends: raw replication channels and forged transfers."""

from __future__ import annotations

import socket
from typing import Any

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
    return [FrameType.HELLO, "primary", True, checksum, count, 0, 1, []]


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
