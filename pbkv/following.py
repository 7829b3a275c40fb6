"""The asyncio driver of follow channels (``follower.py`` decides; this moves bytes).

On a member whose core is a backup with a confirmed copy, :class:`Following`
serves followers: each one gets a copy of the store taken on the loop, streamed a
few frames per turn, then every batch the core applies, forwarded after the turn
that queued its ACK (so forwarding never delays an acknowledgement). A follower
whose unsent bytes pass ``FOLLOW_QUEUE_BYTES`` is dropped.

On a spare, it follows the member the leadership names (``Member`` calls
:meth:`Following.follow` on every tick): it connects, proves the secret, and lets
the :class:`~pbkv.follower.Follower` install the copy and the batches in the
spare's core. When the core changes (a promotion, a fencing), every follow channel
closes; a promoted member remembers who followed it, to bring them in sync first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pbkv import tls
from pbkv.backup import BackupCore
from pbkv.follower import FOLLOW_PATH, FOLLOW_QUEUE_BYTES, Follower, Source
from pbkv.membership import parse_address
from pbkv.wire import UPGRADE_TOKEN, Batch

if TYPE_CHECKING:
    from pbkv.node import Node

log = logging.getLogger(__name__)

__all__ = ["Following"]

PUMP_FRAMES = 4  # copy frames queued per turn of the loop, per follower
MAX_FOLLOWERS = 4  # followers served at once (each holds a copy while it is sent)
MAX_RESPONSE_HEAD = 4096  # bytes of the source's answer to the upgrade request


class FollowChannel(asyncio.Protocol):
    """One follow channel's bytes, at either end; ``request``: the upgrade to send
    (the follower's end), whose ``101`` answer is read before bytes are handed on."""

    def __init__(
        self,
        on_bytes: Callable[[bytes], None],
        on_lost: Callable[[str], None],
        request: bytes | None = None,
    ) -> None:
        self.on_bytes = on_bytes
        self.on_lost = on_lost
        self.request = request
        self.head = b"" if request is not None else None  # the answer's head, until 101
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.request is not None:
            self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > MAX_RESPONSE_HEAD:
                    self.fail("the source's answer to the upgrade is too long")
                return
            head, data = self.head[:end], self.head[end + 4 :]
            self.head = None
            if not head.startswith(b"HTTP/1.1 101"):
                status = head.split(b"\r\n", 1)[0][:80].decode("ascii", "replace")
                self.fail(f"the source refused to be followed: {status}")
                return
            if not data:
                return
        self.on_bytes(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()
        if not self.closed:
            self.closed = True
            self.on_lost(f"connection closed ({exc or 'EOF'})")

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def wait_writable(self) -> None:
        await self._writable.wait()

    def write(self, chunks: list[bytes]) -> None:
        if self.transport is not None and not self.closed and chunks:
            self.transport.writelines(chunks)

    @property
    def unsent(self) -> int:
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    def fail(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            self.on_lost(reason)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Following:
    """Both ends of following, for one member's node (see the module's docstring)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.settings = node.settings
        self.loop = node.loop
        # As a source: our followers, and the batches applied this turn, to forward.
        self.sources: dict[FollowChannel, Source] = {}
        self.applied_now: list[Batch] = []
        self._forward_scheduled = False
        # Member names that followed us (as of our last core change, and since).
        self.followed_by: set[str] = set()
        # As a follower: whom we follow, and the channel.
        self.target: tuple[str, int] | None = None
        self.follower: Follower | None = None
        self.channel: FollowChannel | None = None
        self._connecting = False
        self._last_attempt = -float("inf")
        self.last_error = ""
        self.copies_installed = 0
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def enabled(self) -> bool:
        """Followed copies are kept in memory only (see ``follower.py``)."""
        return self.settings.secret is not None and not self.settings.persistent

    def start(self) -> None:
        self._tick()

    def stop(self) -> None:
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self._drop_follower("stopping")
        self.reset("stopping")
        for task in list(self._tasks):
            task.cancel()

    def _tick(self) -> None:
        now = time.monotonic()
        interval = self.settings.heartbeat_interval
        for channel, source in list(self.sources.items()):
            source.tick(now, interval, self.settings.peer_timeout)
            self._write(channel, source)
        follower = self.follower
        if follower is not None:
            follower.tick(now)
            self._after_follower()
        self._tick_handle = self.loop.call_later(interval, self._tick)

    def core_switched(self) -> None:
        """The node drives a new core: every follow channel closes; a backup core's
        batches are heard from now on."""
        self._drop_follower("the role changed")
        self.reset("the role changed")
        core = self.node.core
        if isinstance(core, BackupCore):
            core.tap = self
            self.followed_by.clear()  # a primary no more: nobody to prefer

    # -- as a source (BatchTap) -----------------------------------------------------------
    def accept(self, transport: asyncio.Transport, leftover: bytes) -> None:
        """A follow channel was upgraded to: serve it if we are a backup with a
        confirmed copy (a follower's copy is not to be followed)."""
        core = self.node.core
        if len(self.sources) >= MAX_FOLLOWERS:
            # Room for a newcomer only in place of the oldest that has not proved
            # the secret yet: unproven channels cannot keep followers out.
            unproven = [channel for channel, each in self.sources.items() if not each.proven]
            if unproven:
                source = self.sources[unproven[0]]
                source.close("over the followers allowed at once: the oldest unproven closes")
                self._write(unproven[0], source)
        if (
            not self.enabled
            or not isinstance(core, BackupCore)
            or not core.confirmed
            or len(self.sources) >= MAX_FOLLOWERS
        ):
            transport.close()
            return
        assert self.settings.secret is not None
        source = Source(self.settings.secret, self.settings.transfer_chunk, time.monotonic())
        channel: FollowChannel

        def on_bytes(data: bytes) -> None:
            self._source_bytes(channel, data)

        def on_lost(reason: str) -> None:
            self._source_lost(channel, reason)

        channel = FollowChannel(on_bytes, on_lost)
        transport.set_protocol(channel)
        channel.connection_made(transport)
        self.sources[channel] = source
        if leftover:
            channel.data_received(leftover)

    def _source_bytes(self, channel: FollowChannel, data: bytes) -> None:
        source = self.sources.get(channel)
        if source is None:
            return
        source.received(time.monotonic(), data)
        if source.wants_copy:
            core = self.node.core
            assert isinstance(core, BackupCore)
            started = time.perf_counter()
            copy = core.store.copy()  # consistent with core.seq: on the loop
            pause = time.perf_counter() - started
            source.start(copy, core.seq, core.history, core.epoch, time.monotonic())
            self.followed_by.add(source.member)
            log.info(
                "backup serves follower %s: a copy of %d pairs at seq %d (taken in %.1f ms)",
                source.member or "?",
                len(copy),
                core.seq,
                pause * 1000,
            )
            self._spawn(self._pump(channel, source))
        self._write(channel, source)

    def _source_lost(self, channel: FollowChannel, reason: str) -> None:
        source = self.sources.pop(channel, None)
        if source is not None:
            log.info("backup lost follower %s: %s", source.member or "?", reason)

    def _write(self, channel: FollowChannel, source: Source) -> None:
        channel.write(source.take())
        if source.closed is None and channel.unsent > FOLLOW_QUEUE_BYTES:
            source.close(f"the follower lags by over {FOLLOW_QUEUE_BYTES} unsent bytes")
        if source.closed is not None:
            self.sources.pop(channel, None)
            channel.close()
            log.info("backup drops follower %s: %s", source.member or "?", source.closed)

    async def _pump(self, channel: FollowChannel, source: Source) -> None:
        while channel in self.sources:
            more = source.pump(time.monotonic(), PUMP_FRAMES)
            self._write(channel, source)
            if not more:
                return
            await channel.wait_writable()
            await asyncio.sleep(0)

    def applied(self, frame: Batch) -> None:
        if not self.sources:
            return
        self.applied_now.append(frame)
        if not self._forward_scheduled:
            self._forward_scheduled = True
            self.loop.call_soon(self._forward)  # after this turn's ACKs are written

    def _forward(self) -> None:
        self._forward_scheduled = False
        frames, self.applied_now = self.applied_now, []
        now = time.monotonic()
        for channel, source in list(self.sources.items()):
            for frame in frames:
                source.forward(frame, now)
            self._write(channel, source)

    def reset(self, reason: str) -> None:
        self.applied_now = []
        for channel, source in list(self.sources.items()):
            source.close(reason)
            self._write(channel, source)

    # -- as a follower ---------------------------------------------------------------------
    def follow(self, target: str | None) -> None:
        """Follow the member ``target`` (``HOST:PORT``; None: nobody) from now on."""
        address = None
        if target is not None and self.enabled:
            with contextlib.suppress(ValueError):
                address = parse_address(target)
        if address == self.node.address:
            address = None
        if address != self.target:
            self._drop_follower("the member to follow changed")
            self.target = address
        core = self.node.core
        if (
            address is None
            or self.follower is not None
            or self._connecting
            or not isinstance(core, BackupCore)
            or core.channel_up
            or core.confirmed  # not the follower's to replace (see ``follower.py``)
        ):
            return
        now = time.monotonic()
        if now - self._last_attempt < self.settings.retry_max:
            return
        self._last_attempt = now
        self._spawn(self._connect(address, core))

    async def _connect(self, address: tuple[str, int], core: BackupCore) -> None:
        self._connecting = True
        host, port = address
        request = (
            b"GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n"
            % (
                FOLLOW_PATH,
                host.encode(),
                port,
                UPGRADE_TOKEN,
            )
        )
        follower = Follower(self.settings, core, core.member, time.monotonic())
        channel: FollowChannel

        def on_bytes(data: bytes) -> None:
            if self.follower is follower:
                follower.received(time.monotonic(), data)
                self._after_follower()

        def on_lost(reason: str) -> None:
            if self.follower is follower:
                follower.close(reason)
                self._after_follower()

        channel = FollowChannel(on_bytes, on_lost, request)
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: channel,
                    host,
                    port,
                    ssl=tls.channel_context(self.settings),
                    server_hostname=host if self.settings.tls else None,
                ),
                self.settings.peer_timeout,
            )
        except (TimeoutError, OSError) as exc:
            self.last_error = f"{host}:{port}: {exc or type(exc).__name__}"
            return
        finally:
            self._connecting = False
        if self.target != address or self.node.core is not core or core.channel_up:
            channel.close()
            return
        self.follower, self.channel = follower, channel
        self._after_follower()

    def _after_follower(self) -> None:
        follower, channel = self.follower, self.channel
        if follower is None or channel is None:
            return
        channel.write(follower.take())
        if follower.discard:
            self.node.discard(follower.discard)
            follower.discard = []
            self.copies_installed += 1
        if follower.closed is not None:
            self._drop_follower(follower.closed)

    def _drop_follower(self, reason: str) -> None:
        follower, channel = self.follower, self.channel
        self.follower = self.channel = None
        if channel is not None:
            channel.close()
        if follower is not None:
            self.last_error = follower.closed or reason
            log.info(
                "spare stops following %s: %s",
                "%s:%d" % self.target if self.target else "?",
                self.last_error,
            )

    def status(self) -> dict[str, Any]:
        follower = self.follower
        return {
            "following": None if self.target is None else "%s:%d" % self.target,
            "follow_step": None if follower is None else follower.step.value,
            "follow_lag": None if follower is None else follower.lag,
            "follow_batches_applied": 0 if follower is None else follower.batches_applied,
            "follow_copies_installed": self.copies_installed,
            "follow_last_error": self.last_error,
            "followers": sorted(source.member for source in self.sources.values()),
        }

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
