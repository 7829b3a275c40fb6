"""An in-process imitation of a pbkv server, on a real socket, for the client
library's and the CLI's tests: it speaks pbkv's HTTP/JSON replies and can be told
to misbehave (forced replies, hang up, drop idle connections, stall) or to claim
another role in its status.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

__all__ = ["STATUS", "FakePbkv", "closed_port", "running_fake"]

STATUS = {
    "role": "primary",
    "stage": "in_sync",
    "keys": 0,
    "checksum": "00ff",
    "peer": {"address": "127.0.0.2:8080", "state": "up"},
}


# --- the fake server ----------------------------------------------------------------------


class FakePbkv(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.port = self.server_address[1]
        self.data: dict[str, str] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.connections = 0
        # Test controls, each consumed by the next request(s).
        self.forced: list[tuple[int, Any, dict[str, str]]] = []
        self.idempotency_keys: list[str | None] = []  # each request's Idempotency-Key
        self.raw: list[bytes] = []
        self.hangups = 0  # read the request, then close without replying
        self.close_after_reply = False  # keep-alive reply, then close (an idle drop)
        self.delay = 0.0
        # Acting as a server that is not the primary: every /kv/ and /kvman/ data request
        # is refused naming this primary, with a 503 or, with ``redirects``, a 307.
        self.primary: str | None = None
        self.redirects = False
        self.status_fields: dict[str, Any] = {}  # merged into /kvman/status
        self.stage_refusals = 0  # refuse the next data requests for the stage (a 503)
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        self.closed.set()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a stalled reply written to a client that gave up is expected

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def refusal(self, target: str) -> tuple[int, Any, dict[str, str]] | None:
        """A stage refusal, or a non-primary's refusal naming the primary, if asked for
        (never for a status: that is how clients look for the primary)."""
        if target.startswith("/kvman/status"):
            return None
        if self.stage_refusals:
            self.stage_refusals -= 1
            body = {"success": "false", "error": "not accepting", "stage": "warm_start"}
            return 503, body, {"Retry-After": "1"}
        if self.primary is None:
            return None
        body = {"success": "false", "error": "not the primary", "stage": "in_sync"}
        body["primary"] = self.primary
        if self.redirects:
            return 307, body, {"Location": f"http://{self.primary}{target}"}
        return 503, body, {"Retry-After": "1"}

    def answer(self, method: str, path: str, params: dict[str, str]) -> tuple[int, Any]:
        """What pbkv itself would reply."""
        gets = {"/kv/get", "/kvman/countkey", "/kvman/dump", "/kvman/status", "/kvman/shutdown"}
        posts = {"/kv/insert", "/kv/update", "/kv/delete"}
        if path not in gets | posts:
            return 404, {"success": "false", "error": f"unknown path {path}"}
        if (method == "GET") != (path in gets):
            return 405, {"success": "false", "error": "method not allowed"}
        needed = ["value"] if path in ("/kv/insert", "/kv/update") else []
        if path.startswith("/kv/"):
            needed.append("key")
        for name in needed:
            if name not in params:
                return 400, {"success": "false", "error": f"missing parameter {name}"}
        if "key" in needed and not params["key"]:
            return 400, {"success": "false", "error": "empty key"}
        data, key = self.data, params.get("key", "")
        if path == "/kv/get":
            found = key in data
            return 200, {"success": "true" if found else "false", "value": data.get(key, "")}
        if path == "/kv/insert":
            if key in data:
                return 200, {"success": "false"}
            data[key] = params["value"]
            return 200, {"success": "true"}
        if path == "/kv/update":
            if key not in data:
                return 200, {"success": "false"}
            data[key] = params["value"]
            return 200, {"success": "true"}
        if path == "/kv/delete":
            if key not in data:
                return 200, {"success": "false", "value": ""}
            return 200, {"success": "true", "value": data.pop(key)}
        if path == "/kvman/countkey":
            return 200, {"result": str(len(data))}
        if path == "/kvman/dump":
            return 200, [[k, v] for k, v in data.items()]
        if path == "/kvman/status":
            status = {**STATUS, "keys": len(data)}
            if self.primary is not None:
                status.update(role="backup", primary=self.primary)
            return 200, {**status, **self.status_fields}
        return 200, {"success": "true"}  # shutdown


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakePbkv

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in two writes; without this, Nagle adds 40 ms a reply.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        srv = self.server
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("ascii") if length else ""
        query = body if self.command == "POST" else url.query
        params = dict(parse_qsl(query, keep_blank_values=True))
        with srv.lock:
            srv.requests.append((self.command, url.path, params))
            srv.idempotency_keys.append(self.headers.get("Idempotency-Key"))
            if srv.hangups:
                srv.hangups -= 1
                self.close_connection = True
                return
            raw = srv.raw.pop(0) if srv.raw else None
            forced = srv.forced.pop(0) if srv.forced else srv.refusal(self.path)
            if raw is None and forced is None:
                status, reply = srv.answer(self.command, url.path, params)
                forced = (status, reply, {})
        time.sleep(srv.delay)
        if raw is not None:
            self.wfile.write(raw)
            self.close_connection = True
            return
        assert forced is not None
        status, reply, headers = forced
        payload = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)
        if srv.close_after_reply:
            self.close_connection = True


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_fake() -> Iterator[FakePbkv]:
    """A FakePbkv serving from a thread; shut down afterwards."""
    srv = FakePbkv()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()
