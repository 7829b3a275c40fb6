"""Finding the primary on real processes: the backup's 307 to the primary in ``http``
mode (followed as ``curl -L`` follows it), clients given several addresses, and
``pbkv cluster``.

A replicated pair in each error mode serves the module (primary on 127.0.0.1,
backup on 127.0.0.2, started by the real scripts); tests that stop a server take
a pair of their own. Each test keeps to its own keys.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.support.harness import Pair
from tests.support.raw_http import FORM, Raw, Reply, request


def started_pair(tmp_path_factory, mode: str) -> Iterator[Pair]:
    pair = Pair(tmp_path_factory.mktemp(f"finding-{mode}"), errors=mode)
    try:
        pair.start_both()
        yield pair
    finally:
        pair.cleanup()


@pytest.fixture(scope="module")
def http_pair(tmp_path_factory) -> Iterator[Pair]:
    """A replicated pair, in sync, in the ``http`` error mode."""
    yield from started_pair(tmp_path_factory, "http")


@pytest.fixture(scope="module")
def course_pair(tmp_path_factory) -> Iterator[Pair]:
    """A replicated pair, in sync, in the ``course`` error mode."""
    yield from started_pair(tmp_path_factory, "course")


@pytest.fixture
def tag() -> str:
    return f"f{uuid.uuid4().hex[:10]}-"


def address_text(pair: Pair, role: str) -> str:
    return "%s:%d" % pair.address[role]


def send(address: tuple[str, int], data: bytes) -> Reply:
    with Raw(address) as conn:
        conn.send(data)
        return conn.reply()


# -- 307 to the primary --------------------------------------------------------------------
def test_a_write_to_the_backup_is_a_307_to_the_primary(http_pair: Pair, tag: str):
    primary = address_text(http_pair, "primary")
    target = f"/kv/insert?key={tag}q"
    reply = send(http_pair.address["backup"], request("POST", target, b"value=v"))
    assert reply.status == 307
    assert reply.headers["location"] == f"http://{primary}{target}"
    assert "retry-after" not in reply.headers  # it would ask a follower to wait
    body = reply.json
    assert body == {
        "success": "false",
        "error": f"this server is the backup; send writes to the primary at {primary}",
        "stage": "in_sync",
        "primary": primary,
    }
    # Nothing was written anywhere.
    assert http_pair.client("primary").get(f"{tag}q") is None


@pytest.mark.parametrize("path", ["/kv/insert", "/kv/update", "/kv/delete"])
def test_following_the_redirect_lands_on_the_primary(http_pair: Pair, tag: str, path: str):
    """What ``curl -L`` does for a 307: the same method and body, to Location."""
    key = f"{tag}follow"
    primary = http_pair.client("primary")
    if path != "/kv/insert":
        assert primary.insert(key, "before")
    body = f"key={key}&value=after".encode()
    host, port = http_pair.address["backup"]
    hops: list[tuple[int, str]] = []
    status, reply = 0, b""
    for _ in range(3):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": FORM})
            response = conn.getresponse()
            status, reply = response.status, response.read()
            hops.append((status, f"{host}:{port}"))
            if status != 307:
                break
            location = urlsplit(response.getheader("Location", ""))
            assert location.path == path
            host, port = location.hostname or "", location.port or 80
        finally:
            conn.close()
    assert hops == [
        (307, address_text(http_pair, "backup")),
        (200, address_text(http_pair, "primary")),
    ]
    expected = (
        {"success": "true", "value": "before"} if path == "/kv/delete" else {"success": "true"}
    )
    assert json.loads(reply) == expected
    value = None if path == "/kv/delete" else "after"
    assert primary.get(key) == value
    backup = http_pair.client("backup")
    assert backup.get(key) == value  # replicated as any write to the primary


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_follows_the_redirect(http_pair: Pair, tag: str):
    host, port = http_pair.address["backup"]
    url = f"http://{host}:{port}/kv/insert"
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "-L",
            "--max-redirs",
            "2",
            "-w",
            "\\n%{http_code} %{num_redirects}",
            "-d",
            f"key={tag}curl&value=v",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body, codes = result.stdout.rsplit("\n", 1)
    assert json.loads(body) == {"success": "true"}
    assert codes == "200 1"
    assert http_pair.client("primary").get(f"{tag}curl") == "v"


def test_a_read_on_the_backup_of_a_pair_is_served_not_redirected(http_pair: Pair, tag: str):
    assert http_pair.client("primary").insert(f"{tag}r", "v")
    http_pair.wait_stage("backup", "in_sync")
    reply = send(http_pair.address["backup"], request("GET", f"/kv/get?key={tag}r"))
    assert reply.status == 200


def test_course_mode_still_answers_200_with_the_primary_in_headers(course_pair: Pair, tag: str):
    primary = address_text(course_pair, "primary")
    reply = send(
        course_pair.address["backup"], request("POST", "/kv/insert", f"key={tag}c&value=v".encode())
    )
    assert reply.status == 200
    assert reply.json == {"success": "false"}
    assert "location" not in reply.headers
    assert reply.headers["x-pbkv-status"] == "503"
    assert reply.headers["x-pbkv-primary"] == primary
