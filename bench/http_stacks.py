"""Which HTTP stack should serve pbkv's client API? One trivial GET, measured on each.

Every stack answers ``GET /kv/get?key=k`` from a one-key dict with the reply pbkv sends,
``{"success":"true","value":"v"}`` (built with orjson), and 404 for any other path:

    bare      a bare asyncio Protocol on httptools with uvloop (what pbkv.http is built on)
    granian   granian, RSGI interface, one worker, one runtime thread, uvloop (and its
              Rust task implementation where it has one: Python 3.11 and older)
    uvicorn   uvicorn with httptools and uvloop, a bare ASGI app (no Server/Date headers)
    aiohttp   aiohttp.web on uvloop
    pbkv      pbkv itself: a standalone primary started with bin/start_server, key k
              inserted with POST /kv/insert

Each server runs in its own process (``python -m bench.http_stacks --serve STACK --port P``,
or bin/start_server for pbkv), every thread of it pinned to core 0. The load generator
(bench/loadgen.py: closed loop, one request in flight per keep-alive connection) runs in
this process, pinned to core 1. Every stack gets the same load: 50 connections, a short
warmup, then ``--duration`` seconds. The table also shows how busy each side was, in
percent of its one core: a server well under 100% is waiting for the load generator, not
the other way round.

    python -m bench.http_stacks                       # every stack, 5 s each
    python -m bench.http_stacks --stacks bare,pbkv --duration 2 --json

A stack whose optional package is missing is reported as skipped, with the pip command
that brings it; that is never an error.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httptools
import orjson
import uvloop

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
KEY = "k"
VALUE = "v"
STORE = {KEY: VALUE}
PATH = "/kv/get"
CONNECTIONS = 64  # as bench.compare's highest count, where the targets are set
SERVER_CPU = 0
LOAD_CPU = 1
START_TIMEOUT = 30.0
_NOT_FOUND = b'{"success":"false","error":"not found"}'
_MISS = b'{"success":"false","value":""}'


def reply(key: str | None) -> tuple[int, bytes]:
    """Status and body for /kv/get with this key: the one piece of logic every stack runs."""
    value = STORE.get(key) if key is not None else None
    if value is None:
        return 200, _MISS
    return 200, orjson.dumps({"success": "true", "value": value})


def _key(query: str) -> str | None:
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "key":
            return value
    return None


# ---------------------------------------------------------------- the servers


class BareProtocol(asyncio.Protocol):
    """One connection of the bare server: httptools parses, this answers in order."""

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_head(400, len(_NOT_FOUND), True) + _NOT_FOUND)
                self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        path, _, query = self.url.partition(b"?")
        if path == PATH.encode():
            status, body = reply(_key(query.decode("latin-1")))
        else:
            status, body = 404, _NOT_FOUND
        close = not self.parser.should_keep_alive()
        if self.transport is not None:
            self.transport.write(_head(status, len(body), close) + body)
            if close:
                self.transport.close()


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


def _head(status: int, length: int, close: bool) -> bytes:
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (
        status,
        _REASONS[status],
        length,
        b"Connection: close\r\n" if close else b"",
    )


async def _serve_bare(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(BareProtocol, HOST, port, backlog=1024)
    async with server:
        await server.serve_forever()


async def rsgi_app(scope: Any, proto: Any) -> None:
    """The granian (RSGI) application."""
    if scope.path == PATH:
        status, body = reply(_key(scope.query_string))
    else:
        status, body = 404, _NOT_FOUND
    proto.response_bytes(status, [("content-type", "application/json")], body)


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The uvicorn (ASGI) application."""
    if scope["path"] == PATH:
        status, body = reply(_key(scope["query_string"].decode("latin-1")))
    else:
        status, body = 404, _NOT_FOUND
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _serve_aiohttp(port: int) -> None:
    from aiohttp import web

    async def get(request: web.Request) -> web.Response:
        status, body = reply(request.query.get("key"))
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get(PATH, get)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, port, backlog=1024).start()
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve(stack: str, port: int, cpu: int) -> None:
    """Run one stack's server in this process, pinned to one core, until killed."""
    pin(os.getpid(), cpu)
    if stack == "bare":
        uvloop.run(_serve_bare(port))
    elif stack == "aiohttp":
        uvloop.run(_serve_aiohttp(port))
    elif stack == "uvicorn":
        import uvicorn

        uvicorn.run(
            asgi_app,
            host=HOST,
            port=port,
            loop="uvloop",
            http="httptools",
            lifespan="off",
            access_log=False,
            log_level="warning",
            server_header=False,
            date_header=False,
            backlog=1024,
        )
    elif stack == "granian":
        from granian import Granian

        Granian(
            "bench.http_stacks:rsgi_app",
            address=HOST,
            port=port,
            interface="rsgi",
            workers=1,
            runtime_threads=1,
            # Its fastest setting here; granian has it only below Python 3.12.
            task_impl="rust" if sys.version_info < (3, 12) else "asyncio",
            loop="uvloop",
            http="1",
            websockets=False,
            log_enabled=False,
            backlog=1024,
        ).serve()
    else:
        raise SystemExit(f"unknown stack {stack!r}")


# ---------------------------------------------------------------- stacks


@dataclass(frozen=True)
class Stack:
    name: str
    label: str
    packages: tuple[tuple[str, str], ...]  # (module to import, what pip installs)
    version_of: str  # the distribution whose version the table shows


STACKS = (
    Stack("bare", "asyncio Protocol + httptools + uvloop", (), "httptools"),
    Stack("granian", "granian (RSGI)", (("granian", "granian"),), "granian"),
    Stack("uvicorn", "uvicorn + httptools + uvloop (ASGI)", (("uvicorn", "uvicorn"),), "uvicorn"),
    Stack("aiohttp", "aiohttp.web on uvloop", (("aiohttp", "aiohttp"),), "aiohttp"),
    Stack("pbkv", "pbkv standalone primary", (), "pbkv"),
)
BY_NAME = {s.name: s for s in STACKS}


def missing(stack: Stack) -> str | None:
    """Why the stack cannot run here (``not installed: pip install NAME``), or None."""
    absent = [pip for module, pip in stack.packages if importlib.util.find_spec(module) is None]
    return f"not installed: pip install {' '.join(absent)}" if absent else None


def version(dist: str, pbkv_root: Path = REPO) -> str:
    if dist == "pbkv":
        from bench.servers import pbkv_revision

        return pbkv_revision(pbkv_root)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------- cores and processes


def choose_cpus() -> tuple[int, int]:
    """(server core, load generator core): 0 and 1, or the first two this process may use
    (one core shared by both when there is only one)."""
    allowed = sorted(os.sched_getaffinity(0))
    if {SERVER_CPU, LOAD_CPU} <= set(allowed):
        return SERVER_CPU, LOAD_CPU
    return allowed[0], allowed[min(1, len(allowed) - 1)]


def tree(pid: int) -> list[int]:
    """pid and all its descendants (granian runs its worker in a child process)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, ()))
    return found


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def pin(pid: int, cpu: int) -> None:
    """Every thread of pid and of its descendants onto one core.

    os.sched_setaffinity(pid, ...) moves only the thread whose id is pid; threads and
    processes started afterwards inherit the mask.
    """
    for p in tree(pid):
        for tid in _threads(p):
            try:
                os.sched_setaffinity(tid, {cpu})
            except (ProcessLookupError, PermissionError):
                pass


def cores_of(pid: int) -> list[int]:
    """The union of the cores every thread of the process tree may run on."""
    cores: set[int] = set()
    for p in tree(pid):
        for tid in _threads(p):
            try:
                cores |= os.sched_getaffinity(tid)
            except (ProcessLookupError, PermissionError):
                pass
    return sorted(cores)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of the process tree so far."""
    ticks = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _get(port: int, path: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def _answers(port: int) -> bool:
    try:
        return _get(port, f"{PATH}?key={KEY}") == {"success": "true", "value": VALUE}
    except (OSError, ValueError):
        return False


class Server:
    """One stack's server: start, the pid to pin and measure, stop."""

    def __init__(self, stack: str, workdir: Path, cpu: int, pbkv_root: Path = REPO) -> None:
        self.stack = stack
        self.pbkv_root = pbkv_root  # whose pbkv the "pbkv" stack runs
        self.cpu = cpu
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.pbkv: Any = None
        self.port = 0
        self.log = workdir / f"{stack}.log"

    def start(self) -> int:
        """Start, pin to the server core, wait until it answers; returns the pid."""
        from bench.servers import Pbkv, free_port

        if self.stack == "pbkv":
            self.pbkv = Pbkv(self.workdir, "pbkv", standalone=True, root=self.pbkv_root)
            self.port = self.pbkv.port
            self.pbkv.start("primary", wait=START_TIMEOUT)
            pid = self.pbkv.pid("primary")
            if pid is None:
                raise RuntimeError("the pbkv primary wrote no pid file")
            self._insert()
        else:
            self.port = free_port((HOST,))
            env = dict(os.environ, PYTHONPATH=str(REPO))
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "bench.http_stacks", "--serve", self.stack]
                    + ["--port", str(self.port), "--cpu", str(self.cpu)],
                    cwd=REPO,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            pid = self.proc.pid
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(self.port):
            if self.proc is not None and self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"exited {self.proc.returncode}: {' | '.join(tail)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no correct answer within {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
        pin(pid, self.cpu)  # pbkv, and any thread a stack started before its own pin
        return pid

    def _insert(self) -> None:
        request = urllib.request.Request(
            f"http://{HOST}:{self.port}/kv/insert",
            data=f"key={KEY}&value={VALUE}".encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        with urllib.request.urlopen(request, timeout=5) as r:
            answer = json.loads(r.read())
        if answer.get("success") != "true":
            raise RuntimeError(f"inserting the key failed: {answer}")

    def stop(self) -> None:
        if self.pbkv is not None:
            self.pbkv.cleanup()
            self.pbkv = None
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # The server leads its own process group (start_new_session): end that group only.
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


# ---------------------------------------------------------------- measuring


@dataclass
class Row:
    stack: str
    label: str
    version: str
    status: str  # "ok", "skipped" or "failed"
    reason: str = ""
    throughput: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    ratio: float | None = None  # throughput / the bare protocol's
    requests: int = 0
    errors: int = 0  # HTTP errors, lost connections, wrong values
    server_cpu_pct: float = 0.0  # of its one core, over the measured window
    server_us_per_request: float = 0.0  # its CPU time over the requests it served
    load_cpu_pct: float = 0.0
    server_cores: list[int] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # every round's req/s, in order


def _measure(
    port: int, pid: int, duration: float, warmup: float, connections: int
) -> dict[str, Any]:
    from bench.loadgen import GET, get_request, run_ops

    op = (GET, get_request(f"{HOST}:{port}".encode(), KEY), VALUE)
    streams = [itertools.repeat(op) for _ in range(connections)]

    def sample() -> tuple[float, float, float]:
        return time.perf_counter(), cpu_seconds(pid), time.process_time()

    async def load() -> tuple[Any, tuple[float, float, float]]:
        # CPU use is sampled over the measured window only (connecting and warmup excluded).
        marks: list[tuple[float, float, float]] = []
        handle = asyncio.get_running_loop().call_later(warmup, lambda: marks.append(sample()))
        result = await run_ops(
            HOST, port, streams, duration=duration, warmup=warmup, workload="get"
        )
        handle.cancel()
        return result, marks[0] if marks else sample()

    result, (wall_before, server_before, load_before) = uvloop.run(load())
    wall = max(time.perf_counter() - wall_before, 1e-9)
    server_seconds = cpu_seconds(pid) - server_before
    return {
        "throughput": result.throughput,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "requests": result.requests,
        "errors": result.errors + result.failed + result.mismatches,
        "server_cpu_pct": 100 * server_seconds / wall,
        "server_us_per_request": 1e6 * server_seconds / max(result.requests, 1),
        "load_cpu_pct": 100 * (time.process_time() - load_before) / wall,
    }


def run_stack(
    stack: Stack,
    duration: float,
    warmup: float,
    workdir: Path,
    cpu: int,
    connections: int,
    pbkv_root: Path = REPO,
) -> Row:
    row = Row(stack.name, stack.label, version(stack.version_of, pbkv_root), "ok")
    why = missing(stack)
    if why is not None:
        row.status, row.reason = "skipped", why
        return row
    server = Server(stack.name, workdir, cpu, pbkv_root)
    try:
        pid = server.start()
        row.server_cores = cores_of(pid)
        for key, value in _measure(server.port, pid, duration, warmup, connections).items():
            setattr(row, key, value)
        if row.throughput <= 0:
            row.status, row.reason = "failed", "no replies"
    except (OSError, RuntimeError, TimeoutError) as exc:
        row.status, row.reason = "failed", str(exc) or type(exc).__name__
    finally:
        server.stop()
    return row


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("uvloop", "httptools", "orjson", "granian", "uvicorn", "aiohttp", "pbkv"):
        out[dist] = version(dist)
    return out


# ---------------------------------------------------------------- report


def _fmt(row: Row) -> list[str]:
    if row.status != "ok":
        return [row.stack, row.version, f"{row.status} ({row.reason})"]
    ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "n/a"
    return [
        row.stack,
        row.version,
        f"{row.throughput:,.0f}",
        f"{row.p50_ms:.2f}",
        f"{row.p99_ms:.2f}",
        ratio,
        f"{row.server_cpu_pct:.0f}%",
        f"{row.server_us_per_request:.1f}",
        f"{row.load_cpu_pct:.0f}%",
        str(row.errors),
    ]


HEADER = ["stack", "version", "req/s", "p50 ms", "p99 ms", "vs bare", "server CPU"]
HEADER += ["us/req", "load CPU", "errors"]


def table(rows: Sequence[Row]) -> str:
    cells = [HEADER] + [_fmt(r) for r in rows]
    full = [c for c in cells if len(c) == len(HEADER)]
    widths = [max(len(c[i]) for c in full) for i in range(len(HEADER))]
    widths[:2] = [max(len(c[i]) for c in cells) for i in range(2)]
    lines = []
    for c in cells:
        if len(c) != len(HEADER):  # skipped or failed: the reason runs across the row
            lines.append(f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]}")
            continue
        parts = [f"{c[0]:<{widths[0]}}", f"{c[1]:<{widths[1]}}"]
        parts += [f"{v:>{w}}" for v, w in zip(c[2:], widths[2:], strict=True)]
        lines.append("  ".join(parts))
    return "\n".join(lines)


def report(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    head = (
        f"GET {PATH}?key={KEY} -> {reply(KEY)[1].decode()}, {meta['connections']} keep-alive "
        f"connections, one request in flight each, {meta['warmup']:g} s warmup then "
        f"{meta['duration']:g} s per stack{_rounds_said(meta['rounds'])}\n"
        f"server pinned to core {meta['server_cpu']}, load generator (bench/loadgen.py) to "
        f"core {meta['load_cpu']}; {meta['cpu']}, {os.cpu_count()} cores\n"
    )
    legend = (
        "vs bare: requests/s over the bare protocol's. CPU: percent of one core over the "
        "measured window;\na load generator near 100% means the server could go faster "
        "than measured. us/req: the server's CPU time per request served."
    )
    names = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    every = "".join(
        f"\n{r.stack} rounds (req/s): {', '.join(f'{t:,.0f}' for t in r.rounds)}"
        for r in rows
        if len(r.rounds) > 1
    )
    return f"{head}\n{table(rows)}{every}\n\n{legend}\nversions: {names}"


def _rounds_said(rounds: int) -> str:
    if rounds == 1:
        return ""
    return f", {rounds} rounds of the stacks in turn; each stack's median round shown"


# ---------------------------------------------------------------- command line


def _stack_list(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown stack {', '.join(unknown) or '(none)'}; choose from {', '.join(BY_NAME)}"
        )
    return names


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.http_stacks",
        description="Requests/s of one trivial GET on several HTTP server stacks, one core each.",
    )
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per stack")
    ap.add_argument(
        "--warmup", type=float, help="unmeasured seconds first (default: duration/5, at most 1)"
    )
    ap.add_argument(
        "--stacks",
        type=_stack_list,
        default=list(BY_NAME),
        help=f"comma-separated, from {','.join(BY_NAME)} (default: all)",
    )
    ap.add_argument("--connections", type=int, default=CONNECTIONS, help=f"default {CONNECTIONS}")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every stack this many times, interleaved; each stack's median round "
        "is reported (default 1)",
    )
    ap.add_argument(
        "--pbkv-checkout",
        type=Path,
        default=REPO,
        help="run this checkout's pbkv as the pbkv stack (e.g. a previous commit's worktree)",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--serve", choices=[s.name for s in STACKS if s.name != "pbkv"],
                    help=argparse.SUPPRESS)  # fmt: skip
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, default=SERVER_CPU, help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.serve:
        if args.port is None:
            raise SystemExit("--serve needs --port")
        serve(args.serve, args.port, args.cpu)
        return 0
    if args.duration <= 0:
        raise SystemExit("--duration must be positive")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    warmup = args.warmup if args.warmup is not None else min(1.0, args.duration / 5)
    server_cpu, load_cpu = choose_cpus()
    # The load generator runs here: pin before starting servers, which pin themselves away.
    os.sched_setaffinity(0, {load_cpu})
    runs: dict[str, list[Row]] = {name: [] for name in args.stacks}
    with tempfile.TemporaryDirectory(prefix="http-stacks-") as tmp:
        # Round by round, every stack once: a spell of load from elsewhere on a shared
        # machine falls on one round of each stack, not on all the rounds of one.
        for _ in range(args.rounds):
            for name in args.stacks:
                row = run_stack(
                    BY_NAME[name],
                    args.duration,
                    warmup,
                    Path(tmp),
                    server_cpu,
                    args.connections,
                    args.pbkv_checkout.resolve(),
                )
                runs[name].append(row)
                _progress(row, quiet=args.json)
    rows = [median_round(runs[name]) for name in args.stacks]
    bare = next((r for r in rows if r.stack == "bare" and r.status == "ok"), None)
    for r in rows:
        if r.status == "ok" and bare is not None:
            r.ratio = r.throughput / bare.throughput
    meta = {
        "request": f"GET {PATH}?key={KEY}",
        "connections": args.connections,
        "duration": args.duration,
        "rounds": args.rounds,
        "warmup": warmup,
        "server_cpu": server_cpu,
        "load_cpu": load_cpu,
        "cpu": cpu_model(),
        "versions": versions(),
    }
    if args.json:
        print(json.dumps({**meta, "results": [asdict(r) for r in rows]}, indent=2))
    else:
        print(report(rows, meta))
    return 1 if any(r.status == "failed" for r in rows) else 0


def median_round(rows: Sequence[Row]) -> Row:
    """A stack's row: the round of median throughput (the lower of the middle two for
    an even count), with every round's req/s; the first failure or skip if any."""
    failed = next((r for r in rows if r.status != "ok"), None)
    if failed is not None:
        return failed
    ordered = sorted(rows, key=lambda r: r.throughput)
    middle = ordered[(len(ordered) - 1) // 2]
    middle.rounds = [r.throughput for r in rows]
    return middle


def _progress(row: Row, quiet: bool) -> None:
    if quiet:
        return
    done = f"{row.throughput:,.0f} req/s" if row.status == "ok" else row.status
    print(f"# {row.stack}: {done}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
