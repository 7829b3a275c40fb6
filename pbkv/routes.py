"""The client API's routes: one table of path, methods and command, read by the
server (``pbkv/http``) and by the clients (``pbkv/client.py``), so a request is
built from the same entry that answers it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pbkv.commands import Command


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # the clients' name for the operation
    path: str
    # The methods the server takes in the ``http`` error mode; clients send the first.
    methods: tuple[str, ...]
    command: Command | None  # None: an admin route the server answers itself
    # Changes nothing: a client may send it again when a reused connection turned out
    # dead before the reply came.
    safe: bool


ROUTES = (
    Route("get", "/kv/get", ("GET",), Command.GET, safe=True),
    Route("insert", "/kv/insert", ("POST",), Command.INSERT, safe=False),
    Route("update", "/kv/update", ("POST",), Command.UPDATE, safe=False),
    Route("delete", "/kv/delete", ("POST",), Command.DELETE, safe=False),
    Route("count", "/kvman/countkey", ("GET",), Command.COUNT, safe=True),
    Route("dump", "/kvman/dump", ("GET",), Command.DUMP, safe=True),
    Route("status", "/kvman/status", ("GET",), None, safe=True),
    Route("shutdown", "/kvman/shutdown", ("GET", "POST"), None, safe=False),
    Route("metrics", "/metrics", ("GET",), None, safe=True),
    # The backup's nudge to the primary: "I listen, connect now" (it only brings an
    # attempt forward, so it needs nothing more than any request).
    Route("listening", "/kvrepl/listening", ("POST",), None, safe=True),
)
BY_NAME = {route.name: route for route in ROUTES}

# -- the server's views, keyed by the bytes a request arrives with -----------------------
# Path -> (the method, the command, whether it is a read).
COMMAND_ROUTES: dict[bytes, tuple[bytes, Command, bool]] = {
    route.path.encode(): (route.methods[0].encode(), route.command, route.command.is_read)
    for route in ROUTES
    if route.command is not None
}
# Path -> the methods it takes.
ADMIN_ROUTES: dict[bytes, tuple[bytes, ...]] = {
    route.path.encode(): tuple(method.encode() for method in route.methods)
    for route in ROUTES
    if route.command is None
}
COMMAND_PATHS: dict[Command, bytes] = {
    command: path for path, (_, command, _) in COMMAND_ROUTES.items()
}
SHUTDOWN_PATH = BY_NAME["shutdown"].path.encode()
STATUS_PATH = BY_NAME["status"].path.encode()
METRICS_PATH = BY_NAME["metrics"].path.encode()
LISTENING_PATH = BY_NAME["listening"].path.encode()
# A spare follows a member's backup on this upgrade (``follower.py``).
FOLLOW_PATH = b"/kvrepl/follow"
# The bulk load: its body is read as it arrives (``pbkv/http/load.py``), not routed as
# a whole request, so it is in neither table above.
LOAD_PATH = b"/kvman/load"
