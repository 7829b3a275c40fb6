"""Unit tests of the load generator and the course-style test, against a small fake server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast
from urllib.parse import parse_qs

import httptools
import orjson
import pytest
import uvloop

from bench import course_test, loadgen
from bench.course_test import CourseResult, format_report
from bench.loadgen import (
    InsertTemplate,
    get_request,
    host_header,
    insert_request,
    percentile,
    run_load,
    update_request,
)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- fake server


class _FakeConn(asyncio.Protocol):
    """Imitates /kv/insert, /kv/update and /kv/get of pbkv over a dict."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self.url)
        query = (url.query or b"").decode()
        body = b"".join(self.body).decode()
        self.url, self.body = b"", []
        params = {k: v[0] for k, v in parse_qs(query or body, keep_blank_values=True).items()}
        status, reply = self.server.handle(url.path.decode(), params)
        if self.server.silent:
            return  # imitate a hung server
        self.server.replies += 1
        close = self.server.close_every and self.server.replies % self.server.close_every == 0
        payload = orjson.dumps(reply)
        head = (
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        assert self.transport is not None
        self.transport.write(head.encode() + payload)
        if close:
            self.transport.close()


class FakeServer:
    """An asyncio server on its own thread and loop, on a free port."""

    def __init__(
        self,
        *,
        unavailable: bool = False,
        close_every: int = 0,
        silent: bool = False,
        corrupt: bool = False,
    ) -> None:
        self.data: dict[str, str] = {}
        self.unavailable = unavailable  # answer writes with 503
        self.close_every = close_every  # close the connection after every n-th reply
        self.silent = silent  # never answer
        self.corrupt = corrupt  # gets return a wrong value
        self.replies = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def handle(self, path: str, p: dict[str, str]) -> tuple[int, dict[str, str]]:
        if path in ("/kv/insert", "/kv/update") and self.unavailable:
            return 503, {"success": "false", "error": "not accepting writes", "stage": "x"}
        if path == "/kv/insert":
            if p["key"] in self.data:
                return 200, {"success": "false"}
            self.data[p["key"]] = p["value"]
            return 200, {"success": "true"}
        if path == "/kv/update":
            if p["key"] not in self.data:
                return 200, {"success": "false"}
            self.data[p["key"]] = p["value"]
            return 200, {"success": "true"}
        if path == "/kv/get":
            if p["key"] not in self.data:
                return 200, {"success": "false", "value": ""}
            value = self.data[p["key"]] + ("!" if self.corrupt else "")
            return 200, {"success": "true", "value": value}
        return 404, {"success": "false", "error": "unknown path"}

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        srv = self._loop.run_until_complete(
            self._loop.create_server(lambda: _FakeConn(self), "127.0.0.1", 0)
        )
        self.port = srv.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        srv.close()
        self._loop.run_until_complete(srv.wait_closed())
        self._loop.close()

    def __enter__(self) -> FakeServer:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer() as s:
        yield s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(port: int, workload: str, connections: int, **kw: object) -> loadgen.LoadResult:
    return uvloop.run(run_load("127.0.0.1", port, workload, connections, **kw))  # type: ignore[arg-type]


# ---------------------------------------------------------------- percentile


def test_percentile_empty_is_zero() -> None:
    assert percentile([], 50) == 0.0


def test_percentile_single_value() -> None:
    assert percentile([7.0], 0) == percentile([7.0], 99) == 7.0


def test_percentile_interpolates_between_ranks() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 90) == pytest.approx(90)


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([1.0], 101)


# ---------------------------------------------------------------- requests


class _Req:
    def __init__(self, raw: bytes) -> None:
        self.url = b""
        self.body = b""
        self.headers: dict[bytes, bytes] = {}
        self.complete = False
        self.parser = httptools.HttpRequestParser(self)
        self.parser.feed_data(raw)

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


AWKWARD = ["a b", "k&v=1", "plus+sign", "percent%20", "emoji 🙂", "é", "", "slash/?#"]


@pytest.mark.parametrize("key", [k for k in AWKWARD if k])
@pytest.mark.parametrize("value", AWKWARD)
def test_write_requests_round_trip(key: str, value: str) -> None:
    for build, path in ((insert_request, b"/kv/insert"), (update_request, b"/kv/update")):
        req = _Req(build(b"h:1", key, value))
        assert req.complete and req.parser.get_method() == b"POST" and req.url == path
        assert req.headers[b"content-type"] == b"application/x-www-form-urlencoded"
        assert int(req.headers[b"content-length"]) == len(req.body)
        form = parse_qs(req.body.decode("ascii"), keep_blank_values=True, strict_parsing=True)
        assert form == {"key": [key], "value": [value]}


@pytest.mark.parametrize("key", [k for k in AWKWARD if k])
def test_get_request_round_trip(key: str) -> None:
    req = _Req(get_request(b"h:1", key))
    assert req.complete and req.parser.get_method() == b"GET"
    url = httptools.parse_url(req.url)
    assert url.path == b"/kv/get"
    assert parse_qs(url.query.decode("ascii")) == {"key": [key]}
    assert req.headers[b"host"] == b"h:1"


def test_insert_template_matches_plain_builder() -> None:
    hh = host_header("127.0.0.1", 8080)
    t = InsertTemplate(hh, "pre fix&001-", "v a=l🙂")
    for i in (0, 7, 123456789):
        assert t.key(i) == f"pre fix&001-{i:09d}"
        assert t.request(i) == insert_request(hh, t.key(i), "v a=l🙂")


# ---------------------------------------------------------------- course report


def test_format_report_four_lines() -> None:
    r = CourseResult(
        total=1000,
        inserted=1000,
        verified=1000,
        insert_ms=[i / 10 for i in range(11)],
        get_ms=[i / 100 for i in range(11)],
    )
    assert format_report(r) == (
        "Result: success\n"
        "Insertion: 1000/1000\n"
        "Average latency: 0.50 ms/0.05 ms\n"
        "Percentile latency: 0.20/0.02, 0.50/0.05, 0.70/0.07, 0.90/0.09"
    )


def test_format_report_fail_and_empty() -> None:
    assert format_report(CourseResult(total=10, inserted=9, verified=9)) == (
        "Result: fail\nInsertion: 9/10\nAverage latency: 0.00 ms/0.00 ms\n"
        "Percentile latency: 0.00/0.00, 0.00/0.00, 0.00/0.00, 0.00/0.00"
    )
    assert not CourseResult(total=3, inserted=3, verified=2).success


# ---------------------------------------------------------------- run_load end to end


def test_insert_workload(server: FakeServer) -> None:
    r = load(server.port, "insert", 4, requests=203, value_size=17)
    assert (r.requests, r.ok, r.failed, r.errors) == (203, 203, 0, 0)
    assert len(r.insert_ms) == 203 and not r.get_ms
    assert r.insert_ms == sorted(r.insert_ms) and r.max_ms == r.insert_ms[-1]
    assert r.throughput > 0 and r.seconds > 0
    assert len(server.data) == 203
    assert all(v == "x" * 17 for v in server.data.values())


def test_get_workload_preloads(server: FakeServer) -> None:
    r = load(server.port, "get", 3, requests=300, keys=50, key_prefix="g/")
    assert (r.requests, r.ok, r.errors) == (300, 300, 0)
    assert len(r.get_ms) == 300 and not r.insert_ms
    assert len(server.data) == 50 and all(k.startswith("g/key-") for k in server.data)


def test_get_workload_without_preload_counts_misses(server: FakeServer) -> None:
    r = load(server.port, "get", 2, requests=20, keys=5, preload=False)
    assert (r.ok, r.failed, r.errors) == (0, 20, 0)


def test_mix_workload(server: FakeServer) -> None:
    r = load(server.port, "mix", 4, requests=400, keys=20, read_ratio=0.5, seed=1)
    assert r.ok == 400 and len(r.insert_ms) + len(r.get_ms) == 400
    assert 100 < len(r.get_ms) < 300
    assert len(server.data) == 20 + len(r.insert_ms)


def test_duration_limit_stops_by_itself(server: FakeServer) -> None:
    started = time.monotonic()
    r = load(server.port, "insert", 2, duration=0.3, warmup=0.1)
    assert time.monotonic() - started < 3
    assert r.requests > 0 and r.errors == 0
    assert 0.2 < r.seconds < 1.0
    # Warmup requests went to the server but are not in the figures.
    assert len(server.data) > r.requests


def test_duplicate_inserts_count_as_false_not_errors(server: FakeServer) -> None:
    load(server.port, "insert", 2, requests=10, key_prefix="dup")
    r = load(server.port, "insert", 2, requests=10, key_prefix="dup")
    assert (r.ok, r.failed, r.errors) == (0, 10, 0)


def test_503_is_counted_not_fatal() -> None:
    with FakeServer(unavailable=True) as s:
        r = load(s.port, "insert", 3, requests=30)
    assert (r.requests, r.ok, r.failed, r.errors) == (30, 0, 0, 30)


def test_reconnects_when_server_closes() -> None:
    with FakeServer(close_every=7) as s:
        r = load(s.port, "insert", 3, requests=100)
    assert (r.requests, r.ok, r.errors) == (100, 100, 0)


def test_hung_server_times_out() -> None:
    started = time.monotonic()
    with FakeServer(silent=True) as s:
        r = load(s.port, "insert", 2, requests=4, timeout=0.2)
    assert time.monotonic() - started < 5
    assert r.ok == 0 and r.errors == 4


def test_unreachable_raises() -> None:
    with pytest.raises(OSError):
        load(free_port(), "insert", 2, requests=4)


def test_loadgen_cli_json(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--host", "127.0.0.1", "--port", str(server.port), "-c", "2", "-n", "50", "--json"]
    assert loadgen.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    for name in ("workload", "connections", "requests", "errors", "seconds", "throughput"):
        assert name in out
    for name in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "ok"):
        assert name in out
    assert out["requests"] == 50 and out["ok"] == 50 and out["workload"] == "insert"


def test_loadgen_cli_human_reads_settings(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "settings.conf"
    conf.write_text(
        json.dumps({"primary": "127.0.0.1", "backup": "127.0.0.2", "port": str(server.port)})
    )
    assert loadgen.main(["--config", str(conf), "-n", "10", "-c", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "req/s" in out and "p99" in out


# ---------------------------------------------------------------- course test end to end


def test_course_test_success(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--host", "127.0.0.1", "--port", str(server.port), "--count", "120"]
    assert course_test.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert lines[:2] == ["Result: success", "Insertion: 120/120"]
    assert lines[2].startswith("Average latency: ") and lines[2].endswith(" ms")
    assert lines[3].startswith("Percentile latency: ") and lines[3].count("/") == 4
    assert len(server.data) == 120


def test_course_test_detects_wrong_values(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer(corrupt=True) as s:
        rc = course_test.main(["--host", "127.0.0.1", "--port", str(s.port), "--count", "20"])
    assert rc == 1
    assert capsys.readouterr().out.splitlines()[:2] == ["Result: fail", "Insertion: 20/20"]


def _settings(tmp_path: Path, port: int) -> Path:
    conf = tmp_path / "settings.conf"
    conf.write_text(json.dumps({"primary": "127.0.0.1", "backup": "127.0.0.2", "port": str(port)}))
    return conf


def _bin_test(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(ROOT / "bin" / "test"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd="/",
    )


def test_bin_test_prints_exactly_four_lines(server: FakeServer, tmp_path: Path) -> None:
    done = _bin_test("--config", str(_settings(tmp_path, server.port)), "--count", "50")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 5
    assert lines[:2] == ["Result: success", "Insertion: 50/50"]


def test_bin_test_unreachable_exits_2(tmp_path: Path) -> None:
    done = _bin_test("--config", str(_settings(tmp_path, free_port())))
    assert done.returncode == 2
    assert done.stdout == "" and "cannot reach" in done.stderr


def test_bin_test_reruns_do_not_collide(server: FakeServer, tmp_path: Path) -> None:
    conf = str(_settings(tmp_path, server.port))
    for _ in range(2):
        assert _bin_test("--config", conf, "--count", "10").returncode == 0
    assert len(server.data) == 20
