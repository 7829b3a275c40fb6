"""The members of a cluster as ``pbkv cluster`` lists them (as ``patronictl list``
does): each server's address, role, stage, epoch, whether it is the primary's
in-sync backup, its replication lag and its lease left.

The servers come from addresses, or from the members registered in etcd
(:func:`registered`); each is asked its ``/kvman/status`` at once
(:func:`gather`), and :func:`rows` turns the answers into rows. A server that
does not answer is listed as unreachable, with what etcd says of it. Without a
coordinator a pair's statuses hold no epoch lease: those columns show ``-``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pbkv.client import AsyncClient, PbkvError, format_address, parse_address

__all__ = ["Entry", "Row", "gather", "registered", "rows", "table"]

MISSING = "-"
UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class Entry:
    """One server to list: its address, what etcd says of it, and its status (None:
    it did not answer)."""

    address: tuple[str, int]
    registered: dict[str, Any] | None
    status: dict[str, Any] | None
    member: str | None = None  # its name in etcd ("host:port#run")


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the listing (None: the server did not say)."""

    address: str
    member: str | None
    reachable: bool
    role: str | None
    stage: str | None
    epoch: int | None
    in_sync: bool | None  # None for a primary, or when nobody knows
    lag: int | None
    lease_left: float | None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


async def registered(
    coordinator: str, cluster: str, timeout: float
) -> list[tuple[str, tuple[str, int], dict[str, Any]]]:
    """(member name, address, registered info) of each member registered in etcd."""
    from pbkv.coordinator import Coordinator  # grpc and aetcd only when asked for

    async with await Coordinator.open(coordinator, cluster, timeout) as etcd:
        members = await etcd.members()
    found = []
    for member in members:
        try:
            address = parse_address(member.member)
        except ValueError:
            continue
        found.append((member.member, address, member.info))
    return found


async def gather(
    addresses: Sequence[tuple[str, int]], timeout: float | None, **options: Any
) -> list[dict[str, Any] | None]:
    """Every server's status, asked at once (None where there was no answer);
    ``options`` (token, ssl_context) as the client's."""

    async def status_of(address: tuple[str, int]) -> dict[str, Any] | None:
        host, port = address
        try:
            async with AsyncClient(host, port, timeout, **options) as client:
                return await client.status()
        except (OSError, PbkvError):
            return None

    return list(await asyncio.gather(*(status_of(address) for address in addresses)))


def _address_of(name: object) -> tuple[str, int] | None:
    if not isinstance(name, str):
        return None
    try:
        return parse_address(name)
    except ValueError:
        return None


def _in_sync_addresses(entries: Sequence[Entry]) -> set[tuple[str, int]] | None:
    """The addresses the primaries name as in sync (their in-sync backup or the one
    recorded in etcd); None when no primary names any (a pair's primary)."""
    named: set[tuple[str, int]] | None = None
    for entry in entries:
        status = entry.status
        if status is None or status.get("role") != "primary":
            continue
        for field in ("in_sync_backup", "recorded_backup"):
            if field in status:
                named = named if named is not None else set()
                address = _address_of(status[field])
                if address is not None:
                    named.add(address)
    return named


def _number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def rows(entries: Sequence[Entry]) -> list[Row]:
    """The rows of ``entries``, in their order."""
    in_sync = _in_sync_addresses(entries)
    listed = []
    for entry in entries:
        status = entry.status
        known = status if status is not None else (entry.registered or {})
        role = known.get("role") if isinstance(known.get("role"), str) else None
        member = entry.member or (status or {}).get("member")
        stage: str | None = None
        synced: bool | None = None
        lag: int | None = None
        lease: float | None = None
        if status is not None:  # answered: its own word on everything
            stage = status.get("stage") if isinstance(status.get("stage"), str) else None
            if role != "primary":
                if in_sync is not None:
                    synced = entry.address in in_sync
                elif stage is not None:
                    synced = stage == "in_sync"
            lag = _number(status.get("lag"))
            if status.get("follow_lag") is not None:  # a spare: behind the backup it follows
                lag = _number(status.get("follow_lag"))
            left = status.get("lease_left")
            lease = float(left) if isinstance(left, int | float) else None
        listed.append(
            Row(
                format_address(*entry.address),
                member if isinstance(member, str) else None,
                status is not None,
                role,
                stage,
                _number(known.get("epoch")),
                synced,
                lag,
                lease,
            )
        )
    return listed


_COLUMNS = ("Member", "Role", "Stage", "Epoch", "In sync", "Lag", "Lease left")


def _cells(row: Row) -> tuple[str, ...]:
    def text(value: object) -> str:
        return MISSING if value is None else str(value)

    in_sync = MISSING if row.in_sync is None else ("yes" if row.in_sync else "no")
    lease = MISSING if row.lease_left is None else f"{row.lease_left:.1f}s"
    stage = row.stage if row.reachable else UNREACHABLE
    return (
        row.address,
        text(row.role),
        text(stage),
        text(row.epoch),
        in_sync,
        text(row.lag),
        lease,
    )


def table(listed: Sequence[Row], title: str | None = None) -> str:
    """The rows as a box table, as ``patronictl list`` prints its members."""
    lines = [_COLUMNS, *(_cells(row) for row in listed)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(_COLUMNS))]
    rule = "+" + "+".join("-" * (width + 2) for width in widths) + "+"

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| "
            + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))
            + " |"
        )

    top = rule
    if title is not None:
        label = f"+ Cluster: {title} "
        top = label + rule[len(label) :] if len(label) < len(rule) else label.rstrip() + " +"
    body = [line(cells) for cells in lines[1:]]
    return "\n".join([top, line(_COLUMNS), rule, *body, rule])
