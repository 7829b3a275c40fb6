"""Chaos on real processes: clients, a seeded nemesis and a linearizability check.

The driver starts a primary and a backup with the real scripts (see
:mod:`pbkv.testing.cluster`), runs concurrent asyncio clients doing random
get/insert/update/delete on a small key set against the primary, and records every
request in a :class:`~pbkv.testing.linearizability.History`. Meanwhile a nemesis,
every 0.5-2 s, does one of: ``kill -9`` the primary or the backup and restart it
after a random delay, ``/kvman/shutdown`` the backup and restart it, or SIGSTOP a
server for a while and SIGCONT it. At the end everything is resumed and restarted,
the pair must return to in sync with equal dumps, and the history must be
linearizable with the primary's dump as the final state::

    python -m pbkv.testing.chaos --duration 60 --seed 5

How outcomes enter the history (as in :mod:`pbkv.testing.sim`):

- a definite reply (found / missing, inserted / exists, ...) is a completed operation;
- a refused request (503: not accepting it in this stage) was applied nowhere and
  observed nothing, so it is left out; so is a request whose connection was refused,
  since it was never sent;
- "replication failed", a timeout, or a connection that broke after the request went
  out leave a write indeterminate (it may take effect at any later moment, or never)
  and a read unanswered (it constrains nothing).

The nemesis keeps the guarantee's precondition, that the two servers are never both
down: it crashes or shuts down a server only when the other one runs, answers, and
holds a confirmed copy of the data (``/kvman/status`` field ``confirmed``, in a stage
where no transfer can replace that copy), and it never pauses both at once. With
``--standalone`` the primary runs without a backup and crashing it loses acknowledged
writes: that mode shows the check catching a broken pair.

The seed draws the clients' requests and the nemesis' schedule; real processes add
their own timing, so a seed reproduces the schedule, not every interleaving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pbkv.client import AsyncClient, PbkvError, ReplicationFailed, Unavailable
from pbkv.stages import Role
from pbkv.testing.cluster import ROLES, LocalPair
from pbkv.testing.linearizability import History, Operation, Result, check

__all__ = ["FAULTS", "ChaosOptions", "ChaosReport", "main", "run_chaos"]

log = logging.getLogger(__name__)

KILL, SHUTDOWN, PAUSE = "kill", "shutdown", "pause"
FAULTS = (KILL, SHUTDOWN, PAUSE)
# The stages in which a server's confirmed copy cannot be replaced by a transfer
# between the guard's look and the crash: a backup only ever receives one after it
# left in sync, and a confirmed primary never fetches one.
_SAFE_STAGES = {"primary": ("in_sync", "bootstrapping_secondary"), "backup": ("in_sync",)}
_KINDS = ("get", "get", "insert", "update", "delete")


def _other(role: str) -> str:
    return Role(role).peer


@dataclass(frozen=True)
class ChaosOptions:
    """One run. Times are in seconds; pairs are (low, high) bounds of a uniform draw."""

    duration: float = 60.0
    seed: int = 0
    clients: int = 8
    keys: int = 20
    request_timeout: float = 3.0
    # Each client waits up to this long between requests (load shaping only).
    think_time: float = 0.0
    fault_gap: tuple[float, float] = (0.5, 2.0)
    down_time: tuple[float, float] = (0.1, 2.0)
    pause_time: tuple[float, float] = (0.2, 3.0)
    faults: tuple[str, ...] = FAULTS
    roles: tuple[str, ...] = ROLES
    # The primary alone, answering writes without a backup; no guard (loses data).
    standalone: bool = False
    settle_timeout: float = 30.0
    check_timeout: float = 60.0
    # Server settings on top of the fast test timeouts, e.g. {"store": "hash"}.
    settings: Mapping[str, str] = field(default_factory=dict)

    def moves(self) -> list[tuple[str, str]]:
        """The (fault, role) pairs the nemesis chooses from."""
        roles = ("primary",) if self.standalone else self.roles
        return [
            (fault, role)
            for fault in self.faults
            for role in roles
            if not (fault == SHUTDOWN and role == "primary")
        ]


@dataclass
class ChaosReport:
    """What a run did and whether the pair kept its guarantees."""

    options: ChaosOptions
    operations: list[Operation] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    timeline: list[str] = field(default_factory=list)
    dumps: dict[str, dict[str, str]] = field(default_factory=dict)
    verdict: Result | None = None
    problems: list[str] = field(default_factory=list)
    logs: dict[str, list[str]] = field(default_factory=dict)
    elapsed: float = 0.0
    check_seconds: float = 0.0

    @property
    def seed(self) -> int:
        return self.options.seed

    @property
    def final(self) -> dict[str, str] | None:
        """The primary's dump once the pair was back in sync."""
        return self.dumps.get("primary")

    @property
    def dumps_equal(self) -> bool:
        return "primary" in self.dumps and all(d == self.final for d in self.dumps.values())

    @property
    def ok(self) -> bool:
        return not self.problems and self.verdict is not None and self.verdict.ok is True

    def count(self, fault: str, role: str) -> int:
        return self.faults[f"{fault} {role}"]

    def summary(self) -> str:
        o = self.outcomes
        lines = [
            f"chaos seed {self.seed}: {len(self.operations)} operations in "
            f"{self.elapsed:.1f}s with {self.options.clients} clients: "
            f"{o['acknowledged']} writes acknowledged, {o['rejected']} writes rejected, "
            f"{o['found'] + o['missing']} reads answered, {o['indeterminate']} indeterminate, "
            f"{o['unanswered']} reads unanswered, {o['refused']} refused (left out)",
        ]
        faults = ", ".join(f"{name} x{n}" for name, n in sorted(self.faults.items())) or "none"
        lines.append(f"faults: {faults}; {self.skipped} skipped by the guard")
        if self.final is not None:
            same = "equal" if self.dumps_equal else "DIFFERENT"
            lines.append(f"final: {len(self.final)} keys; dumps of {', '.join(self.dumps)} {same}")
        if self.verdict is None:
            verdict = "not checked"
        else:
            verdict = {True: "linearizable", False: "NOT linearizable", None: "unknown"}[
                self.verdict.ok
            ]
        lines.append(f"verdict: {verdict} (checked in {self.check_seconds:.1f}s)")
        lines += [f"problem: {problem}" for problem in self.problems]
        lines.append("result: PASS" if self.ok else "result: FAIL")
        return "\n".join(lines)

    def details(self) -> str:
        """Everything needed to chase a failure: seed, explanation, faults, log tails."""
        lines = [f"seed {self.seed}; replay: {self.replay_command()}"]
        if self.verdict is not None and self.verdict.ok is not True:
            lines += ["checker:", self.verdict.explanation]
        lines.append("nemesis timeline:")
        lines += [f"  {entry}" for entry in self.timeline]
        for role, tail in self.logs.items():
            lines.append(f"last lines of the {role} log:")
            lines += [f"  {line}" for line in tail]
        return "\n".join(lines)

    def replay_command(self) -> str:
        """The command line that runs the same schedule again."""
        o, default = self.options, ChaosOptions()
        words = ["python -m pbkv.testing.chaos", f"--duration {o.duration:g}", f"--seed {o.seed}"]
        for name in ("clients", "keys", "request_timeout", "think_time"):
            if getattr(o, name) != getattr(default, name):
                words.append(f"--{name.replace('_', '-')} {getattr(o, name):g}")
        if o.faults != default.faults:
            words.append(f"--faults '{','.join(o.faults)}'")
        if o.roles != default.roles:
            words.append(f"--roles {','.join(o.roles)}")
        if o.standalone:
            words.append("--standalone")
        words += [f"--set {name}={value}" for name, value in o.settings.items()]
        return " ".join(words)


class _Run:
    """The asyncio side of one run: clients, nemesis, settling."""

    def __init__(self, pair: LocalPair, options: ChaosOptions, report: ChaosReport) -> None:
        self.pair = pair
        self.options = options
        self.report = report
        self.rng = random.Random(options.seed)
        self.history = History(time.monotonic)
        self.left_out: set[int] = set()
        self.roles = ("primary",) if options.standalone else ROLES
        self.state = dict.fromkeys(self.roles, "up")  # "up", "down" or "paused"
        self.recoveries: set[asyncio.Task[None]] = set()
        self.start = time.monotonic()
        self.stop_at = self.start

    # -- helpers ------------------------------------------------------------------------
    def event(self, text: str) -> None:
        entry = f"{time.monotonic() - self.start:7.3f}s {text}"
        self.report.timeline.append(entry)
        log.info("nemesis: %s", text)

    async def blocking(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(function, *args)

    # -- the run ------------------------------------------------------------------------
    async def run(self) -> None:
        options = self.options
        if options.standalone:
            await self.blocking(self.pair.start, "primary", "--standalone")
        else:
            await self.blocking(self.pair.start, "backup")
            await self.blocking(self.pair.start, "primary")
        if not await self.settle():
            self.report.problems.append("the pair did not reach in sync before the load")
            return
        self.start = time.monotonic()
        self.stop_at = self.start + options.duration
        clients = [asyncio.create_task(self.client(c)) for c in range(options.clients)]
        nemesis = asyncio.create_task(self.nemesis())
        try:
            await asyncio.gather(*clients)
            await nemesis
            await asyncio.gather(*self.recoveries)
        finally:
            for task in [*clients, nemesis, *self.recoveries]:
                task.cancel()
        self.report.elapsed = time.monotonic() - self.start
        await self.recover_all()
        if await self.settle():
            await self.fetch_dumps()
        else:
            stages = {role: await self.blocking(self.pair.stage, role) for role in self.roles}
            self.report.problems.append(f"the pair did not return to in sync: {stages}")
        self.report.operations = [
            op for i, op in enumerate(self.history.operations()) if i not in self.left_out
        ]

    # -- clients --------------------------------------------------------------------------
    async def client(self, number: int) -> None:
        options = self.options
        rng = random.Random(f"{options.seed}/client/{number}")
        keys = [f"k{i}" for i in range(options.keys)]
        host, port = self.pair.address["primary"]
        outcomes = self.report.outcomes
        # One attempt a request: the history records each outcome as the server gave it.
        async with AsyncClient(host, port, timeout=options.request_timeout, retry_for=0) as conn:
            sent = 0
            while time.monotonic() < self.stop_at:
                kind = rng.choice(_KINDS)
                key = rng.choice(keys)
                value = f"c{number}.{sent}" if kind in ("insert", "update") else None
                sent += 1
                op = self.history.invoke(number, kind, key, value)
                try:
                    if kind == "get":
                        result: Any = await conn.get(key)
                    elif kind == "insert":
                        result = await conn.insert(key, value or "")
                    elif kind == "update":
                        result = await conn.update(key, value or "")
                    else:
                        result = await conn.delete(key)
                except ReplicationFailed:
                    self.history.indeterminate(op)
                    outcomes["indeterminate" if kind != "get" else "unanswered"] += 1
                except Unavailable as exc:
                    # 503 (or "not the primary"): applied nowhere, observed nothing.
                    self.left_out.add(op)
                    outcomes["refused"] += 1
                    await self.back_off(rng, exc.retry_after)
                except ConnectionRefusedError:
                    # Refused while connecting, so nothing was sent. (On an established
                    # TCP connection a reset is ECONNRESET, never ECONNREFUSED.)
                    self.left_out.add(op)
                    outcomes["refused"] += 1
                    await self.back_off(rng)
                except OSError:  # timeouts and connections broken after sending
                    self.history.indeterminate(op)
                    outcomes["indeterminate" if kind != "get" else "unanswered"] += 1
                except PbkvError as exc:
                    self.history.indeterminate(op)
                    outcomes["unexpected"] += 1
                    self.report.problems.append(f"unexpected reply to {kind} {key!r}: {exc}")
                else:
                    if kind in ("get", "delete"):
                        self.history.complete(op, result is not None, result)
                    else:
                        self.history.complete(op, bool(result))
                    if kind == "get":
                        outcomes["found" if result is not None else "missing"] += 1
                    else:
                        ok = result is not None if kind == "delete" else bool(result)
                        outcomes["acknowledged" if ok else "rejected"] += 1
                if options.think_time > 0:
                    await asyncio.sleep(rng.uniform(0, options.think_time))  # load shaping

    @staticmethod
    async def back_off(rng: random.Random, hint: float | None = None) -> None:
        """Pace a client whose request was turned away (a real client honours
        Retry-After): without it the clients would spin while the primary is down."""
        await asyncio.sleep(min(hint or 0.05, 0.1) * rng.uniform(0.5, 1.0))

    # -- nemesis ----------------------------------------------------------------------------
    async def nemesis(self) -> None:
        options = self.options
        moves = options.moves()
        if not moves:
            return
        while True:
            gap = self.rng.uniform(*options.fault_gap)
            if time.monotonic() + gap >= self.stop_at:
                return
            await asyncio.sleep(gap)  # the schedule: a random interval between faults
            # The least-used moves first, so a short run still covers all of them.
            fewest = min(self.report.faults[f"{f} {r}"] for f, r in moves)
            fault, role = self.rng.choice(
                [(f, r) for f, r in moves if self.report.faults[f"{f} {r}"] == fewest]
            )
            delay = self.rng.uniform(*(options.pause_time if fault == PAUSE else options.down_time))
            if not await self.inflict(fault, role, delay):
                self.report.skipped += 1

    async def inflict(self, fault: str, role: str, delay: float) -> bool:
        if self.state[role] != "up":
            return False
        if fault == PAUSE:
            if self.state.get(_other(role)) == "paused":
                return False  # never both stopped
            self.event(f"pause {role} for {delay:.2f}s")
            self.pair.signal(role, signal.SIGSTOP)
            self.state[role] = "paused"
            self.report.faults[f"{fault} {role}"] += 1
            self.spawn(self.resume_later(role, delay))
            return True
        if not await self.other_holds_a_copy(role):
            return False
        self.state[role] = "down"
        self.report.faults[f"{fault} {role}"] += 1
        if fault == KILL:
            self.event(f"kill -9 {role}, restart in {delay:.2f}s")
            await self.blocking(self.pair.kill, role)
        else:
            self.event(f"/kvman/shutdown {role}, restart in {delay:.2f}s")
            await self.blocking(self.pair.shutdown, role)
        self.spawn(self.restart_later(role, delay))
        return True

    async def other_holds_a_copy(self, role: str) -> bool:
        """The guard: the other server runs, answers and holds a confirmed copy."""
        if self.options.standalone:
            return True
        other = _other(role)
        if self.state[other] != "up":
            return False
        status = await self.blocking(self.pair.status, other, 1.0)
        return (
            status is not None
            and status.get("confirmed") is True
            and status.get("stage") in _SAFE_STAGES[other]
        )

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self.recoveries.add(task)
        task.add_done_callback(self.recoveries.discard)

    async def resume_later(self, role: str, delay: float) -> None:
        await asyncio.sleep(delay)  # the schedule: how long the process stays stopped
        self.resume(role)

    def resume(self, role: str) -> None:
        self.pair.signal(role, signal.SIGCONT)
        self.state[role] = "up"
        self.event(f"resume {role}")

    async def restart_later(self, role: str, delay: float) -> None:
        await asyncio.sleep(delay)  # the schedule: how long the server stays down
        await self.restart(role)

    async def restart(self, role: str) -> None:
        self.event(f"restart {role}")
        extra = ("--standalone",) if self.options.standalone else ()
        result = await self.blocking(lambda: self.pair.start(role, *extra, check=False))
        if result.returncode != 0:
            self.report.problems.append(
                f"restarting the {role} failed: {(result.stdout + result.stderr).strip()}"
            )
            return
        self.state[role] = "up"

    # -- the end -------------------------------------------------------------------------------
    async def recover_all(self) -> None:
        for role in self.roles:
            if self.state[role] == "up" and not self.pair.alive(role):
                self.report.problems.append(f"the {role} exited without being told to")
                self.state[role] = "down"
        for role in self.roles:
            if self.state[role] == "paused":
                self.resume(role)
        for role in self.roles:
            if self.state[role] == "down":
                await self.restart(role)

    async def settle(self) -> bool:
        """Wait until every server is in sync with the same content."""
        deadline = time.monotonic() + self.options.settle_timeout
        while time.monotonic() < deadline:
            statuses = [await self.blocking(self.pair.status, role, 1.0) for role in self.roles]
            if all(s is not None and s["stage"] == "in_sync" for s in statuses) and (
                len({(s["checksum"], s["keys"]) for s in statuses if s is not None}) == 1
            ):
                return True
            await asyncio.sleep(0.05)  # polling interval
        return False

    async def fetch_dumps(self) -> None:
        """Both dumps, equal; a late write may sit between the two for a moment."""
        deadline = time.monotonic() + self.options.settle_timeout
        while True:
            dumps = {role: await self.blocking(self.pair.dump, role) for role in self.roles}
            self.report.dumps = dumps
            if self.report.dumps_equal:
                return
            if time.monotonic() > deadline or not await self.settle():
                self.report.problems.append("the primary's and the backup's dumps differ")
                return


def run_chaos(options: ChaosOptions, directory: str | Path | None = None) -> ChaosReport:
    """Run one chaos session (servers in ``directory``, or a temporary one) and check it."""
    report = ChaosReport(options)
    with contextlib.ExitStack() as stack:
        if directory is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="pbkv-chaos-"))
        pair = stack.enter_context(LocalPair(Path(directory), **options.settings))
        try:
            asyncio.run(_Run(pair, options, report).run())
        except Exception as exc:  # a driver error: report it with the logs
            report.problems.append(f"the driver failed: {type(exc).__name__}: {exc}")
        finally:
            pair.cleanup()
        if report.final is not None:
            started = time.monotonic()
            report.verdict = check(
                report.operations, final=report.final, timeout=options.check_timeout
            )
            report.check_seconds = time.monotonic() - started
        roles = ("primary",) if options.standalone else ROLES
        for role in roles:
            if "Traceback" in pair.log(role):
                report.problems.append(f"the {role} log holds a traceback")
        if not report.ok:
            report.logs = {role: pair.log_tail(role, 40) for role in roles}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pbkv.testing.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--seed", type=int, default=0, help="draws requests and faults")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--keys", type=int, default=20, help="size of the key set")
    parser.add_argument(
        "--request-timeout", type=float, default=3.0, help="seconds before a request is given up"
    )
    parser.add_argument(
        "--think-time",
        type=float,
        default=ChaosOptions.think_time,
        help="longest pause of a client between two requests (seconds)",
    )
    parser.add_argument(
        "--faults",
        default=",".join(FAULTS),
        help=f"comma-separated subset of {', '.join(FAULTS)} (empty: no faults)",
    )
    parser.add_argument(
        "--roles", default=",".join(ROLES), help="which servers the nemesis may hit"
    )
    parser.add_argument(
        "--standalone",
        action="store_true",
        help="primary alone without replication: crashes lose writes (the check must fail)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting, e.g. --set store=hash --set transfer_chunk=4",
    )
    parser.add_argument("--dir", help="keep settings, logs and pid files here")
    parser.add_argument("--verbose", action="store_true", help="print the nemesis as it goes")
    args = parser.parse_args(argv)
    faults = tuple(f for f in args.faults.split(",") if f)
    roles = tuple(r for r in args.roles.split(",") if r)
    if not set(faults) <= set(FAULTS) or not set(roles) <= set(ROLES):
        parser.error(f"faults must be among {FAULTS} and roles among {ROLES}")
    if not all("=" in item for item in args.set):
        parser.error("--set takes NAME=VALUE")
    settings = dict(item.split("=", 1) for item in args.set)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    options = ChaosOptions(
        duration=args.duration,
        seed=args.seed,
        clients=args.clients,
        keys=args.keys,
        request_timeout=args.request_timeout,
        think_time=args.think_time,
        faults=faults,
        roles=roles,
        standalone=args.standalone,
        settings=settings,
    )
    report = run_chaos(options, args.dir)
    print(report.summary())
    if not report.ok:
        print(report.details())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
