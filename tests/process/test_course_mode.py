"""The default ``course`` error mode on real server processes, as course scripts use it.

Course-era scripts use urllib, which raises on any status but 200, send writes by
``GET`` with query parameters, use keys of 8 KiB and more, and people type raw
UTF-8 into curl.  Every request that reaches a route is answered 200 with the
course's failure shape; the reason travels in ``X-Pbkv-*`` headers and the log.
The ``http`` mode's statuses are checked in test_http_server.py.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import string
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from pbkv.cli import main as cli
from pbkv.client import BadRequest, Client, NotPrimary, ReplicationFailed, Unavailable
from pbkv.config import Settings
from tests.support.harness import Pair, standalone_server
from tests.support.raw_http import ERRORS, JSON_TYPE, Raw, Reply, exchange, request

MAX_KEY = Settings().max_key_bytes
FALSE = {"success": "false"}
MISS = {"success": "false", "value": ""}
COURSE_FAILURE = {
    "/kv/get": MISS,
    "/kv/delete": MISS,
    "/kv/insert": FALSE,
    "/kv/update": FALSE,
    "/kvman/countkey": FALSE,
    "/kvman/dump": FALSE,
    "/kvman/status": FALSE,
    "/kvman/shutdown": FALSE,
}


class CourseScript:
    """A course test script: urllib, so any status but 200 raises ``HTTPError``."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.base = "http://%s:%d" % address

    def call(
        self, path: str, form: bytes | None = None, query: str | None = None
    ) -> tuple[Any, dict[str, str]]:
        """POST ``form`` (already encoded) or GET ``path?query``; (JSON reply, headers)."""
        url = self.base + path + (f"?{query}" if query is not None else "")
        with urllib.request.urlopen(url, data=form, timeout=10) as reply:
            assert reply.status == 200
            headers = {name.lower(): value for name, value in reply.headers.items()}
            return json.loads(reply.read()), headers

    def insert(self, key: str, value: str) -> tuple[Any, dict[str, str]]:
        return self.call("/kv/insert", f"key={quote(key)}&value={quote(value)}".encode())

    def get(self, key: str) -> tuple[Any, dict[str, str]]:
        return self.call("/kv/get", query=f"key={quote(key)}")

    def count(self) -> int:
        reply, _ = self.call("/kvman/countkey")
        return int(reply["result"])


@pytest.fixture(scope="module")
def server(standalone: Pair) -> Pair:
    """A standalone primary with the default settings (course mode)."""
    assert "errors" not in standalone.settings
    return standalone


@pytest.fixture(scope="module")
def http_server(tmp_path_factory) -> Iterator[Pair]:
    yield from standalone_server(tmp_path_factory, "http-mode", errors="http")


@pytest.fixture
def script(server: Pair) -> CourseScript:
    return CourseScript(server.address["primary"])


@pytest.fixture
def tag() -> str:
    return f"m{uuid.uuid4().hex[:10]}-"


def assert_refused(headers: dict[str, str], status: int, reason: str = "") -> None:
    assert headers["x-pbkv-status"] == str(status), headers
    assert reason in headers["x-pbkv-error"], headers


# -- the stress script: bad keys answered as the course answered them -----------------------
def test_empty_and_invalid_utf8_keys_get_the_course_failure(server, script, tag):
    before = script.count()
    reply, headers = script.insert("", "secret-value-1")
    assert reply == FALSE
    assert_refused(headers, 400, "key must not be empty")
    for body in (
        b"key=%CE%D2%E6%88%91&value=secret-value-2",  # GBK bytes, percent-encoded
        b"key=\xce\xd2&value=secret-value-3",  # GBK bytes, raw in the form body
    ):
        reply, headers = script.call("/kv/insert", body)
        assert reply == FALSE
        assert_refused(headers, 400, "UTF-8")
    reply, headers = script.call("/kv/get", query="key=%CE%D2%E6%88%91")
    assert reply == MISS
    assert_refused(headers, 400, "UTF-8")
    reply, headers = script.call("/kv/delete", b"key=")
    assert reply == MISS
    assert_refused(headers, 400, "empty")
    assert script.count() == before
    # The reason is in the log, the values are not.
    log = server.log("primary")
    assert "refused /kv/insert (400): key must not be empty" in log
    assert "secret-value" not in log
    # A logical failure carries no reason: it is not a refusal.
    reply, headers = script.insert(tag, "v")
    assert reply == {"success": "true"} and "x-pbkv-error" not in headers
    reply, headers = script.insert(tag, "again")
    assert reply == FALSE and "x-pbkv-error" not in headers
    reply, headers = script.get(tag + "missing")
    assert reply == MISS and "x-pbkv-error" not in headers


def test_get_writes_as_course_servers_accepted(script, tag):
    key = tag + "k &=%"
    reply, headers = script.call("/kv/insert", query=f"key={quote(key)}&value=v1")
    assert reply == {"success": "true"} and "x-pbkv-error" not in headers
    assert script.get(key)[0] == {"success": "true", "value": "v1"}
    assert script.call("/kv/update", query=f"key={quote(key)}&value=v2")[0] == {"success": "true"}
    assert script.call("/kv/delete", query=f"key={quote(key)}")[0] == {
        "success": "true",
        "value": "v2",
    }
    assert script.call("/kv/delete", query=f"key={quote(key)}")[0] == MISS
    # Reads by POST too.
    assert script.call("/kv/get", f"key={quote(key)}".encode())[0] == MISS
    assert "result" in script.call("/kvman/countkey", b"")[0]


def test_get_writes_are_405_in_http_mode(http_server, tag):
    address = http_server.address["primary"]
    reply = exchange(address, request("GET", f"/kv/insert?key={tag}&value=v"))
    assert reply.status == 405
    with Client(*address) as client:
        assert client.get(tag) is None


def test_random_keys_up_to_8282_characters(script):
    rng = random.Random(8282)
    alphabet = string.ascii_letters + string.digits + "é😀&=%+ "
    keys = ["".join(rng.choices(alphabet, k=n)) for n in (1, 100, 4097, 8192, 8282)]
    keys += ["".join(rng.choices(alphabet, k=rng.randint(4097, 8282))) for _ in range(10)]
    before = script.count()
    for key in keys:
        assert script.insert(key, "v" + key[:10])[0] == {"success": "true"}
    for key in keys:
        assert script.get(key)[0] == {"success": "true", "value": "v" + key[:10]}
    assert script.count() == before + len(keys)
    for key in keys:
        assert script.call("/kv/delete", f"key={quote(key)}".encode())[0]["success"] == "true"


def test_key_over_the_limit_gets_the_course_failure(script, tag):
    key = (tag + "k" * MAX_KEY)[:MAX_KEY]
    assert script.insert(key, "v")[0] == {"success": "true"}
    reply, headers = script.insert(key + "k", "v")
    assert reply == FALSE
    assert_refused(headers, 413, f"key longer than {MAX_KEY} bytes")
    reply, headers = script.get(key + "k")
    assert reply == MISS
    assert_refused(headers, 413)
    value = "x" * (1024 * 1024 + 1)
    reply, headers = script.call("/kv/update", f"key={quote(key)}&value={value}".encode())
    assert reply == FALSE
    assert_refused(headers, 413, "value longer than")
    assert script.get(key)[0] == {"success": "true", "value": "v"}


# -- every refusal of a route, whole replies -------------------------------------------------
def _route(data: bytes) -> tuple[str, str]:
    method, target, _ = data.split(b"\r\n", 1)[0].decode().split(" ")
    return method, target.split("?", 1)[0]


COURSE_REFUSALS = [
    param
    for param in ERRORS
    if param.values[1] != 404
    and not (param.values[1] == 405 and _route(param.values[0])[0] in ("GET", "POST"))
]


@pytest.mark.parametrize(("data", "status"), COURSE_REFUSALS)
def test_refusals_are_200_with_the_route_failure_shape(server, data, status):
    address = server.address["primary"]
    path = _route(data)[1]
    with Raw(address) as conn:
        conn.send(data)
        reply = conn.reply()
        assert reply.status == 200, reply
        assert reply.headers["content-type"] == JSON_TYPE
        assert reply.json == COURSE_FAILURE[path]
        assert reply.headers["x-pbkv-status"] == str(status)
        assert reply.headers["x-pbkv-error"]
        conn.send(request("GET", "/kvman/countkey"))  # the connection stays usable
        assert conn.reply().status == 200


@pytest.mark.parametrize(("data", "status"), [param for param in ERRORS if param.values[1] == 404])
def test_unknown_paths_stay_404(server, data, status):
    reply = exchange(server.address["primary"], data)
    assert reply.status == 404
    assert set(reply.json) == {"success", "error"}
    assert "x-pbkv-error" not in reply.headers


def test_malformed_http_still_closes_the_connection(server):
    with Raw(server.address["primary"]) as conn:
        conn.send(b"GET /kv/get?key=a HTTP/1.1\r\nContent-Length: x\r\n\r\n")
        reply = conn.reply()
        assert reply.status == 400
        assert reply.json["success"] == "false" and "error" in reply.json
        assert conn.closed_by_server()


# -- raw UTF-8 in the request target ---------------------------------------------------------
def _raw_get(address: tuple[str, int], target: str) -> Reply:
    with Raw(address) as conn:
        conn.send(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        return conn.reply()


@pytest.mark.parametrize("mode", ["course", "http"])
def test_raw_utf8_in_the_target_reads_as_percent_encoded(request, mode, tag):
    servers = request.getfixturevalue("server" if mode == "course" else "http_server")
    address = servers.address["primary"]
    key = tag + "韩国人"
    with Client(*address) as client:
        assert client.insert(key, "Korean") is True
    reply = _raw_get(address, f"/kv/get?key={key}")
    assert (reply.status, reply.json) == (200, {"success": "true", "value": "Korean"})
    assert "x-pbkv-error" not in reply.headers
    # Pipelined, with a raw UTF-8 form body in between.
    body = f"key={tag}ключ&value=значение".encode()
    with Raw(address) as conn:
        conn.send(
            f"GET /kv/get?key={key} HTTP/1.1\r\n\r\n".encode()
            + b"POST /kv/insert HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
            + f"GET /kv/insert?key={tag}ü&value=ö HTTP/1.1\r\n\r\n".encode()
        )
        assert conn.reply().json == {"success": "true", "value": "Korean"}
        assert conn.reply().json == {"success": "true"}
        third = conn.reply()
    with Client(*address) as client:
        assert client.get(tag + "ключ") == "значение"
        if mode == "course":  # a GET write
            assert third.json == {"success": "true"}
            assert client.get(tag + "ü") == "ö"
        else:
            assert third.status == 405
    # Raw bytes that are not UTF-8 are refused like their percent-encoded form.
    with Raw(address) as conn:
        conn.send(b"GET /kv/get?key=\xce\xd2\xe6\x88\x91 HTTP/1.1\r\n\r\n")
        reply = conn.reply()
    if mode == "course":
        assert (reply.status, reply.json) == (200, MISS)
        assert reply.headers["x-pbkv-status"] == "400"
    else:
        assert reply.status == 400


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_a_raw_utf8_url(server, tag):
    host, port = server.address["primary"]
    with Client(host, port) as client:
        assert client.insert(tag + "韩国人", "from curl") is True
    result = subprocess.run(
        ["curl", "-sS", "--globoff", f"http://{host}:{port}/kv/get?key={tag}韩国人"],
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"success": "true", "value": "from curl"}


# -- stage refusals and replication failures, on pairs ---------------------------------------
def test_stage_refusals_in_course_mode(pair: Pair, capsys):
    pair.start("primary")  # no backup: bootstrapping secondary, data unconfirmed
    address = pair.address["primary"]
    script = CourseScript(address)
    reply, headers = script.get("k")
    assert reply == MISS
    assert_refused(headers, 503, "not accepting this request in stage bootstrapping_secondary")
    assert headers["x-pbkv-stage"] == "bootstrapping_secondary"
    assert headers["retry-after"] == "1"
    assert script.insert("k", "v")[0] == FALSE
    assert script.call("/kvman/countkey")[0] == FALSE
    assert script.call("/kvman/dump")[0] == FALSE
    assert script.call("/kvman/status")[0]["stage"] == "bootstrapping_secondary"
    # The client library raises what it raises in http mode.
    with Client(*address, retry_for=0) as client, pytest.raises(Unavailable) as refused:
        client.insert("k", "v")
    assert (refused.value.status, refused.value.stage) == (503, "bootstrapping_secondary")
    assert refused.value.retry_after == 1.0
    assert not isinstance(refused.value, NotPrimary)
    # And so does the CLI, with the reason.
    host, port = address
    assert cli(["--host", host, "--port", str(port), "get", "k"]) == 2
    err = capsys.readouterr().err
    assert "not accepting this request in stage bootstrapping_secondary" in err
    assert "stage bootstrapping_secondary" in err


def test_backup_refusing_a_write_names_the_primary_in_course_mode(pair: Pair, capsys):
    pair.start("backup")  # alone: bootstrapping primary, serves reads
    address = pair.address["backup"]
    primary = "%s:%d" % pair.address["primary"]
    reply, headers = CourseScript(address).insert("k", "v")
    assert reply == FALSE
    assert headers["x-pbkv-primary"] == primary
    assert_refused(headers, 503, primary)
    with Client(*address, retry_for=0) as client:  # else it follows the primary named
        with pytest.raises(NotPrimary) as refused:
            client.delete("k")
        assert refused.value.primary == primary
        assert refused.value.stage == "bootstrapping_primary"
        assert client.get("k") is None
        with pytest.raises(BadRequest) as bad:
            client.get("")
        assert bad.value.status == 400 and "empty" in bad.value.error
    host, port = address
    # One attempt (a write would follow the primary named, which is not running).
    assert cli(["--host", host, "--port", str(port), "--retry-for", "0", "insert", "k", "v"]) == 2
    assert f"the primary is {primary}" in capsys.readouterr().err


def test_replication_failed_in_course_mode(pair: Pair):
    pair.start_both()
    script = CourseScript(pair.address["primary"])
    assert script.insert("before", "v")[0] == {"success": "true"}
    pair.signal("backup", signal.SIGSTOP)  # no acknowledgement within ack_timeout
    try:
        reply, headers = script.insert("during", "v")
        assert reply == FALSE
        assert headers["x-pbkv-error"] == "replication failed"
        assert headers["x-pbkv-status"] == "503"
        assert headers["retry-after"] == "1"
    finally:
        pair.signal("backup", signal.SIGCONT)
    pair.wait_stage("primary", "in_sync")
    with pair.client("primary") as client:
        assert client.get("before") == "v"
        assert client.get("during") is None  # rewound
        pair.signal("backup", signal.SIGSTOP)
        try:
            with pytest.raises(ReplicationFailed) as failed:
                client.insert("during", "v")
            assert failed.value.status == 503
        finally:
            pair.signal("backup", signal.SIGCONT)
