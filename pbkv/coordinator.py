"""The coordinator: etcd, through exactly the operations failover needs.

pbkv writes no consensus of its own (SPEC section 8): etcd decides who is primary,
and this module is the only one that talks to it. It wraps the ``aetcd`` client
in a few typed calls named for what they mean. ``aetcd`` (and grpc under it) is
imported only by :meth:`Coordinator.open`, so a server without a coordinator
never loads it.

Keys, under the cluster prefix ``P`` (values are JSON):

``P/leader``
    ``{"member": ADDRESS}``, bound to the primary's lease. Created only by a
    transaction that requires the key's ``create_revision`` to be 0 (it does not
    exist), so at most one member holds it; it vanishes with the lease.
``P/sync``
    ``{"epoch": E, "backup": ADDRESS | null}``: the primary of epoch E's in-sync
    backup, the only member that may be promoted after it. Each write is a
    compare-and-swap on the key's mod revision, as well as guarded by the epoch.
``P/members/ADDRESS``
    each member's own description (role, stage, ...), bound to its lease.

**The epoch is the leader key's create revision.** etcd's revision is one global
counter, raised by every change, so each creation of the leader key gets a
number higher than every earlier one: a later primary always has a higher
epoch, and no two primaries share one. The same revision identifies *this
holder's* key: a transaction comparing ``create_revision(P/leader) == E``
succeeds only while the key created at E still exists, not a later key of the
same name. This is how etcd's own election (``concurrency/election.go``: the
leader's key revision guards ``Proclaim`` and ``Resign``) and Patroni (every
write of the leader guarded by its leader key) keep an old leader from acting.

Guarantees of each operation:

- :meth:`~Coordinator.campaign` returns an epoch only if the key did not exist
  and is now this member's, bound to its lease; asked again with the same lease
  after a reply was lost, it returns the same epoch.
- :meth:`~Coordinator.resign` and :meth:`~Coordinator.record_sync` change
  nothing unless the leader key is still the one created at the given epoch:
  a member that lost leadership (its lease expired, someone else won) can
  neither delete its successor's key nor overwrite its in-sync record.
- :meth:`~Coordinator.record_sync` also changes nothing unless the record is
  still at the mod revision its caller last saw (``expected``): of the writes
  sent while the record was at one revision, at most one ever lands, so a
  write whose answer was lost cannot land later over a newer record. Asked
  again after its answer was lost, a write that landed answers its revision.
- :meth:`~Coordinator.leader` and :meth:`~Coordinator.sync` say which
  revision they read at (:class:`LeaderRead`, :class:`SyncRead`).
- :meth:`~Coordinator.keepalive` returns the TTL etcd restarted the lease with,
  or None once the lease is gone (etcd answers a refresh of an expired lease
  with TTL 0, not an error). The caller must read its monotonic clock *before*
  the call: the lease is only known valid for TTL from when the refresh was
  sent.
- Every call either completes or raises :class:`CoordinatorUnavailable` within
  the timeout given to :meth:`~Coordinator.open`. A write that timed out may
  still have been applied; each is safe to repeat.
- :meth:`~Coordinator.watch_leader` yields the leader as read, then each change;
  when the stream breaks it yields :class:`WatchLost` once, then, as soon as
  etcd answers again, the leader as read afresh. It is a hint for reacting
  quickly; the lease is what makes a primary's authority end.

With several endpoints, a call that finds one unreachable raises, and the next
call goes to the next endpoint; a call is never silently retried elsewhere.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from pbkv.config import parse_endpoints

__all__ = [
    "Coordinator",
    "CoordinatorError",
    "CoordinatorUnavailable",
    "Lease",
    "LeaseGone",
    "Leader",
    "LeaderChanged",
    "LeaderEvent",
    "LeaderRead",
    "MemberInfo",
    "SyncRead",
    "SyncRecord",
    "WatchLost",
    "sync_record_from",
    "sync_value",
]

T = TypeVar("T")

# grpc channel options. Reconnect quickly after etcd comes back (grpc's own back-off
# grows to two minutes). Keepalive pings find a stream whose peer went silent (a
# partition, a paused etcd), which would otherwise wait forever: a watch then breaks
# within keepalive_time + ping timeout (9 s). etcd refuses pings more often than
# every 5 s (--grpc-keepalive-min-time), hence 6 s. grpc (1.85) enforces a ping's
# timeout through ping_timeout_ms, not keepalive_timeout_ms (kept for older
# versions), and sends no keepalive ping while a bandwidth probe (itself a ping) is
# unanswered: the probe is off, the watch stream needs no window tuning.
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
    "grpc.keepalive_time_ms": 6000,
    "grpc.keepalive_timeout_ms": 3000,
    "grpc.http2.ping_timeout_ms": 3000,
    "grpc.http2.max_pings_without_data": 0,
    "grpc.http2.min_time_between_pings_ms": 6000,
    "grpc.http2.bdp_probe": 0,
}
# etcd's words when a lease bound to a key or refreshed no longer exists.
_LEASE_NOT_FOUND = "requested lease not found"


class CoordinatorError(Exception):
    """etcd refused or could not do what was asked."""


class CoordinatorUnavailable(CoordinatorError):
    """etcd did not answer within the timeout, or could not be reached."""


class LeaseGone(CoordinatorError):
    """The lease a key was to be bound to has expired or was revoked."""


# The values below are shared with the etcd model of the simulation
# (pbkv.testing.coordination), which offers the same operations on virtual time.


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: float  # seconds, as granted (etcd raises a short request to its minimum)


@dataclass(frozen=True, slots=True)
class Leader:
    member: str
    epoch: int  # the leader key's create revision


@dataclass(frozen=True, slots=True)
class LeaderRead:
    """The leader key as read at etcd revision ``revision``; None: no leader.
    The revision orders the read against the leader watch's events."""

    leader: Leader | None
    revision: int


@dataclass(frozen=True, slots=True)
class SyncRecord:
    epoch: int
    backup: str | None


@dataclass(frozen=True, slots=True)
class SyncRead:
    """The in-sync record as read (None: there is none, or it is malformed) and
    the sync key's mod revision (0: absent), the ``expected`` of the next
    :meth:`Coordinator.record_sync`."""

    record: SyncRecord | None
    mod_revision: int


@dataclass(frozen=True, slots=True)
class MemberInfo:
    member: str
    info: dict[str, Any]
    lease: int


@dataclass(frozen=True, slots=True)
class LeaderChanged:
    """The leader key as of etcd revision ``revision``; None: there is no leader."""

    leader: Leader | None
    revision: int


@dataclass(frozen=True, slots=True)
class WatchLost:
    """The watch stream broke; what happened meanwhile comes as a fresh read."""

    reason: str


LeaderEvent = LeaderChanged | WatchLost


def _decode(value: bytes) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return None


def sync_value(epoch: int, backup: str | None) -> dict[str, Any]:
    """The in-sync record as stored (JSON)."""
    return {"epoch": epoch, "backup": backup}


def sync_record_from(value: Any) -> SyncRecord | None:
    """The in-sync record from its stored JSON value (None if malformed)."""
    if not isinstance(value, dict) or not isinstance(value.get("epoch"), int):
        return None
    backup = value.get("backup")
    return SyncRecord(epoch=value["epoch"], backup=backup if isinstance(backup, str) else None)


def _leader_from(kv: Any) -> Leader | None:
    """A Leader from an etcd key-value of the leader key (None if malformed)."""
    value = _decode(kv.value)
    if not isinstance(value, dict) or not isinstance(value.get("member"), str):
        return None
    return Leader(member=value["member"], epoch=int(kv.create_revision))


class Coordinator:
    """One connection to etcd for one cluster prefix. Use :meth:`open`."""

    def __init__(self, clients: list[Any], prefix: str, timeout: float, errors: Any) -> None:
        self._clients = clients  # one aetcd.Client per endpoint
        self._current = 0
        self._timeout = timeout
        self._errors = errors  # aetcd.exceptions
        self.prefix = prefix.rstrip("/")
        self.leader_key = f"{self.prefix}/leader".encode()
        self.sync_key = f"{self.prefix}/sync".encode()
        self.members_prefix = f"{self.prefix}/members/".encode()

    @classmethod
    async def open(
        cls, endpoints: str | Sequence[str], prefix: str, timeout: float = 1.0
    ) -> Coordinator:
        """A coordinator over etcd at ``endpoints`` (URLs, comma-separated or a list,
        as the ``coordinator`` setting). No request is sent yet: etcd being down
        now shows on the first call, as later."""
        text = endpoints if isinstance(endpoints, str) else ",".join(endpoints)
        addresses = parse_endpoints(text)
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        # Imported here, not above: only a server with a coordinator pays for grpc.
        import aetcd
        import aetcd.exceptions

        clients = [
            aetcd.Client(host, port, timeout=timeout, options=dict(_CHANNEL_OPTIONS))
            for host, port in addresses
        ]
        return cls(clients, prefix, timeout, aetcd.exceptions)

    async def close(self) -> None:
        for client in self._clients:
            try:
                await asyncio.wait_for(client.close(), self._timeout)
            except (TimeoutError, self._errors.ClientError):
                pass

    async def __aenter__(self) -> Coordinator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- calling etcd --------------------------------------------------------------------
    @property
    def _client(self) -> Any:
        return self._clients[self._current]

    def _next_endpoint(self) -> None:
        self._current = (self._current + 1) % len(self._clients)

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        """Await one etcd call within the timeout, errors mapped to ours."""
        try:
            return await asyncio.wait_for(call, self._timeout)
        except TimeoutError:
            self._next_endpoint()
            raise CoordinatorUnavailable(
                f"etcd did not answer {what} within {self._timeout:g}s"
            ) from None
        except self._errors.ClientError as exc:
            raise self._mapped(what, exc) from None

    def _mapped(self, what: str, exc: BaseException) -> CoordinatorError:
        reason = str(exc) or type(exc).__name__
        if _LEASE_NOT_FOUND in reason:
            return LeaseGone(f"{what}: the lease is gone")
        if isinstance(exc, self._errors.InvalidArgumentError | self._errors.UnauthenticatedError):
            return CoordinatorError(f"etcd refused {what}: {reason}")
        self._next_endpoint()
        return CoordinatorUnavailable(f"etcd {what} failed: {reason}")

    # -- leases --------------------------------------------------------------------------
    async def grant(self, ttl: int) -> Lease:
        """A new lease; etcd may grant a longer TTL than asked (never shorter)."""
        lease = await self._call("lease grant", self._client.lease(ttl))
        return Lease(id=int(lease.id), ttl=float(lease.ttl))

    async def keepalive(self, lease: Lease) -> float | None:
        """Restart the lease's TTL: the seconds etcd now gives it, or None when the
        lease is gone (expired or revoked; etcd answers TTL 0, not an error)."""
        reply = await self._call("lease keepalive", self._client.refresh_lease(lease.id))
        if reply is None:  # the stream closed without an answer
            self._next_endpoint()
            raise CoordinatorUnavailable("etcd closed the keepalive stream without an answer")
        ttl = int(reply.TTL)
        return float(ttl) if ttl > 0 else None

    async def revoke(self, lease: Lease) -> None:
        """End the lease now, and every key bound to it; a lease already gone is fine."""
        try:
            await self._call("lease revoke", self._client.revoke_lease(lease.id))
        except LeaseGone:
            pass

    # -- leadership ----------------------------------------------------------------------
    async def campaign(self, member: str, lease: Lease) -> int | None:
        """Become leader if nobody is: the epoch, or None when another holds the key.

        The one transaction creates the key only if it does not exist, bound to the
        lease (which must be alive: else :class:`LeaseGone`), and reads it back."""
        client = self._client
        tx = client.transactions
        value = orjson.dumps({"member": member})
        succeeded, responses = await self._call(
            "campaign",
            client.transaction(
                compare=[tx.create(self.leader_key) == 0],
                success=[tx.put(self.leader_key, value, lease.id), tx.get(self.leader_key)],
                failure=[tx.get(self.leader_key)],
            ),
        )
        found = responses[-1]
        if not found:  # deleted between the compare and the read: cannot happen in a txn
            return None
        kv = found[0][1]
        if succeeded or (int(kv.lease) == lease.id and kv.value == value):
            # A repeated campaign whose first reply was lost finds its own key.
            return int(kv.create_revision)
        return None

    async def leader(self) -> LeaderRead:
        """The leader and the etcd revision the read saw."""
        found = await self._call(
            "leader read",
            self._client.get_range(self.leader_key, self.leader_key + b"\0"),
        )
        revision = int(found.header.revision)
        for kv in found:
            return LeaderRead(_leader_from(kv), revision)
        return LeaderRead(None, revision)

    async def resign(self, epoch: int) -> bool:
        """Delete the leader key if it is still the one created at ``epoch``."""
        _check_epoch(epoch)
        client = self._client
        tx = client.transactions
        succeeded, _ = await self._call(
            "resign",
            client.transaction(
                compare=[tx.create(self.leader_key) == epoch],
                success=[tx.delete(self.leader_key)],
                failure=[],
            ),
        )
        return bool(succeeded)

    # -- the in-sync record --------------------------------------------------------------
    async def record_sync(self, epoch: int, backup: str | None, *, expected: int) -> int | None:
        """Record ``backup`` as epoch ``epoch``'s in-sync backup, only while the
        leader key created at ``epoch`` exists and the record is still at mod
        revision ``expected`` (0: absent), the one the caller last saw: the
        record's new mod revision, or None when a guard fails (our key is gone:
        we must acknowledge nothing more; or another write of ours landed first).

        A repeat of a write that landed (its answer was lost) finds the record
        it wrote, under our key, and answers its revision."""
        _check_epoch(epoch)
        client = self._client
        tx = client.transactions
        value = sync_value(epoch, backup)
        succeeded, responses = await self._call(
            "in-sync record",
            client.transaction(
                compare=[
                    tx.create(self.leader_key) == epoch,
                    tx.mod(self.sync_key) == expected,
                ],
                success=[tx.put(self.sync_key, orjson.dumps(value)), tx.get(self.sync_key)],
                failure=[tx.get(self.leader_key), tx.get(self.sync_key)],
            ),
        )
        found = responses[-1]
        if not found:  # the sync key is absent: no write of ours landed
            return None
        kv = found[0][1]
        if succeeded:
            return int(kv.mod_revision)
        leader = responses[0]
        ours = bool(leader) and int(leader[0][1].create_revision) == epoch
        if ours and _decode(kv.value) == value:
            return int(kv.mod_revision)
        return None

    async def sync(self) -> SyncRead:
        """The in-sync record and the sync key's mod revision."""
        found = await self._call("in-sync read", self._client.get(self.sync_key))
        if found is None:
            return SyncRead(None, 0)
        return SyncRead(sync_record_from(_decode(found.value)), int(found.mod_revision))

    # -- members -------------------------------------------------------------------------
    async def register(self, member: str, info: dict[str, Any], lease: Lease) -> None:
        """Put (or replace) this member's description, bound to its lease."""
        key = self.members_prefix + member.encode()
        await self._call("register", self._client.put(key, orjson.dumps(info), lease.id))

    async def members(self) -> list[MemberInfo]:
        """Every registered member whose lease is alive, by address."""
        found = await self._call("member list", self._client.get_prefix(self.members_prefix))
        listed: list[MemberInfo] = []
        for kv in found:
            info = _decode(kv.value)
            name = bytes(kv.key[len(self.members_prefix) :]).decode(errors="replace")
            listed.append(
                MemberInfo(
                    member=name,
                    info=info if isinstance(info, dict) else {},
                    lease=int(kv.lease),
                )
            )
        return sorted(listed, key=lambda m: m.member)

    # -- watching the leader -------------------------------------------------------------
    async def watch_leader(
        self, retry_min: float = 0.05, retry_max: float = 1.0
    ) -> AsyncGenerator[LeaderEvent, None]:
        """The leader as read now, then every change (a put: the new holder and its
        epoch; a delete: None). When the stream breaks: one :class:`WatchLost`, then,
        once etcd answers (retried with doubling back-off), the leader as read
        afresh and its changes again. Close it with ``contextlib.aclosing``."""
        delay = retry_min
        lost = False
        while True:
            try:
                read = await self.leader()
                # From the revision after the read: no change falls in between.
                watch = await self._call(
                    "leader watch",
                    self._client.watch(self.leader_key, start_revision=read.revision + 1),
                )
            except CoordinatorError as exc:
                if not lost:
                    lost = True
                    yield WatchLost(str(exc))
                await asyncio.sleep(delay)
                delay = min(retry_max, delay * 2)
                continue
            watched_since = time.monotonic()
            lost = False
            try:
                yield LeaderChanged(read.leader, read.revision)
                async for event in watch:
                    if event.kind == "DELETE":
                        yield LeaderChanged(None, int(event.kv.mod_revision))
                    else:
                        yield LeaderChanged(_leader_from(event.kv), int(event.kv.mod_revision))
                reason = "etcd ended the watch"
            except self._errors.ClientError as exc:
                reason = str(self._mapped("leader watch", exc))
            finally:
                try:
                    await asyncio.wait_for(watch.cancel(), self._timeout)
                except (TimeoutError, self._errors.ClientError):
                    pass
            lost = True
            yield WatchLost(reason)
            # A watch that breaks as soon as it is made is retried ever more slowly.
            if time.monotonic() - watched_since > retry_max:
                delay = retry_min
            await asyncio.sleep(delay)
            delay = min(retry_max, delay * 2)


def _check_epoch(epoch: int) -> None:
    # Epoch 0 would compare equal to an absent key.
    if epoch < 1:
        raise ValueError(f"an epoch is a revision, at least 1, not {epoch}")
