"""Raw HTTP for the tests of a real server's client API: requests written byte for
byte, replies parsed by hand, and the table of malformed requests with their status."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

import pytest

FORM = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Raw:
    """One client connection; requests are sent as given, replies parsed by hand."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Reply:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("connection closed before a reply")
        version, status, _reason = line.decode("latin-1").split(" ", 2)
        assert version == "HTTP/1.1", line
        headers: dict[str, str] = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, value = line.decode("latin-1").split(":", 1)
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value.strip()
        body = self.reader.read(int(headers["content-length"]))
        return Reply(int(status), headers, body)

    def closed_by_server(self) -> bool:
        """True once the server closed the connection (reads EOF; no more bytes)."""
        try:
            return self.reader.read(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(
    method: str,
    target: str,
    body: bytes | None = None,
    content_type: str = FORM,
    headers: tuple[str, ...] = (),
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: pbkv.test", *headers]
    if body is not None:
        lines += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def exchange(address: tuple[str, int], data: bytes) -> Reply:
    with Raw(address) as conn:
        conn.send(data)
        return conn.reply()


def assert_error(reply: Reply, status: int) -> str:
    """An HTTP error with exactly ``{"success": "false", "error": <message>}``."""
    assert reply.status == status, reply
    assert reply.headers["content-type"] == JSON_TYPE
    body = reply.json
    assert set(body) == {"success", "error"}, body
    assert body["success"] == "false"
    assert isinstance(body["error"], str) and body["error"]
    return body["error"]


ERRORS = [
    # (request, status)
    pytest.param(request("POST", "/kv/insert", b"value=x"), 400, id="insert-no-key"),
    pytest.param(request("POST", "/kv/insert", b"key=x"), 400, id="insert-no-value"),
    pytest.param(request("POST", "/kv/update", b"key=x"), 400, id="update-no-value"),
    pytest.param(request("POST", "/kv/update", b"value=x"), 400, id="update-no-key"),
    pytest.param(request("POST", "/kv/delete", b""), 400, id="delete-no-key"),
    pytest.param(request("GET", "/kv/get"), 400, id="get-no-key"),
    pytest.param(request("GET", "/kv/get?key="), 400, id="get-empty-key"),
    pytest.param(request("POST", "/kv/insert", b"key=&value=x"), 400, id="insert-empty-key"),
    pytest.param(request("POST", "/kv/delete", b"key="), 400, id="delete-empty-key"),
    pytest.param(request("GET", "/kv/get?key=%FF"), 400, id="query-bad-utf8"),
    pytest.param(request("POST", "/kv/insert", b"key=%FF&value=x"), 400, id="form-bad-utf8"),
    pytest.param(request("POST", "/kv/insert", b"key=a&value=%C3%28"), 400, id="value-bad-utf8"),
    pytest.param(request("POST", "/kv/insert", b"key=a&key=b&value=x"), 400, id="key-twice"),
    pytest.param(
        request("POST", "/kv/insert?key=a", b"key=b&value=x"), 400, id="key-in-query-and-body"
    ),
    pytest.param(
        request("POST", "/kv/insert", b'{"key": "a", "value":', JSON_TYPE), 400, id="json-cut"
    ),
    pytest.param(request("POST", "/kv/insert", b"key=a&value=b", JSON_TYPE), 400, id="json-form"),
    pytest.param(request("POST", "/kv/insert", b'["a", "b"]', JSON_TYPE), 400, id="json-list"),
    pytest.param(
        request("POST", "/kv/insert", b'{"key": 1, "value": "x"}', JSON_TYPE), 400, id="json-int"
    ),
    pytest.param(
        request("POST", "/kv/insert", b'{"key": "a", "value": null}', JSON_TYPE),
        400,
        id="json-null",
    ),
    pytest.param(request("GET", "/"), 404, id="root"),
    pytest.param(request("GET", "/kv/nothing?key=a"), 404, id="unknown-kv"),
    pytest.param(request("GET", "/kvman/nothing"), 404, id="unknown-kvman"),
    pytest.param(request("POST", "/kv/insert/", b"key=a&value=b"), 404, id="trailing-slash"),
    pytest.param(request("GET", "/KV/GET?key=a"), 404, id="upper-case"),
    pytest.param(request("GET", "/kv/insert?key=a&value=b"), 405, id="get-insert"),
    pytest.param(request("GET", "/kv/update?key=a&value=b"), 405, id="get-update"),
    pytest.param(request("GET", "/kv/delete?key=a"), 405, id="get-delete"),
    pytest.param(request("POST", "/kv/get", b"key=a"), 405, id="post-get"),
    pytest.param(request("POST", "/kvman/countkey", b""), 405, id="post-countkey"),
    pytest.param(request("POST", "/kvman/dump", b""), 405, id="post-dump"),
    pytest.param(request("PUT", "/kv/insert", b"key=a&value=b"), 405, id="put-insert"),
    pytest.param(request("DELETE", "/kv/delete?key=a"), 405, id="delete-method"),
    pytest.param(request("POST", "/kvman/status", b""), 405, id="post-status"),
]
