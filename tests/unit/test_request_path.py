"""The request path runs no Python it could run compiled (see ``pbkv/compiled.py``).

A census of the Python functions called while HTTP requests of every kind are served
by a standalone primary, in one process: in the modules that ``compile.sh`` compiles,
no function ``dataclasses`` generated may run (a class made per request writes its
``__init__`` out), in either build; and in the compiled build no function of those
modules may run as Python at all.  ``test_cores.py`` takes the same census of
replicated writes.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from pbkv.testing.inprocess import standalone_connection
from tests.support.census import python_in_compiled_modules
from tests.support.fake_transport import FakeTransport

HOST = b"127.0.0.1"


def form(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST %b HTTP/1.1\r\nHost: %b\r\n%bContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (path, HOST, extra, len(body), body)
    )


def requests(i: int) -> list[bytes]:
    """One request of each kind, on key ``i``: every write's success and failure."""
    key = b"k%06d" % i
    keyed = b"Idempotency-Key: %036d\r\n" % i
    return [
        form(b"/kv/insert", b"key=%b&value=v" % key),
        form(b"/kv/insert", b"key=%b&value=v" % key),  # exists
        b"GET /kv/get?key=%b HTTP/1.1\r\nHost: %b\r\n\r\n" % (key, HOST),
        b"GET /kv/get?key=absent HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST,
        form(b"/kv/update", b"key=%b&value=w" % key),
        form(b"/kv/update", b"key=absent&value=w"),
        b"GET /kvman/countkey HTTP/1.1\r\nHost: %b\r\n\r\n" % HOST,
        form(b"/kv/delete", b"key=%b" % key),
        form(b"/kv/delete", b"key=%b" % key),  # missing
        form(b"/kv/insert", b"key=%b&value=v" % key, keyed),
        form(b"/kv/insert", b"key=%b&value=v" % key, keyed),  # the retry: remembered
    ]


def test_http_requests_of_every_kind_run_no_python_of_the_compiled_modules() -> None:
    async def serve() -> tuple[Counter[str], bytes]:
        transport = FakeTransport()
        connection = standalone_connection(transport)
        connection.data_received(requests(0)[0])  # first calls (imports, caches) first
        with python_in_compiled_modules() as seen:
            for i in range(1, 21):
                for request in requests(i):
                    connection.data_received(request)
        return seen, transport.written

    seen, written = asyncio.run(serve())
    # Every request was answered, with a 200.
    assert written.count(b"HTTP/1.1 ") == written.count(b"HTTP/1.1 200 OK") == 1 + 20 * 11
    assert seen == {}
