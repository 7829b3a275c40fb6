"""A standalone primary in this process, reached by one HTTP connection whose transport
the caller gives (no socket): for measuring and inspecting the request path alone
(``bench/request_cost.py``, ``tests/unit/test_request_path.py``)."""

from __future__ import annotations

import asyncio
from typing import cast

from pbkv import config
from pbkv.http import HttpProtocol
from pbkv.node import Node
from pbkv.stages import Role


def standalone_connection(transport: object) -> HttpProtocol:
    """The connection, made on ``transport``; call on the running event loop."""
    settings = config.Settings(standalone=True)
    node = Node(settings, Role.PRIMARY)
    node.core.start(node.clock())
    node.core.drain(node)
    connection = HttpProtocol(
        node, node.limits, node.connections, settings.errors, node.access, node.guard
    )
    connection.connection_made(cast(asyncio.Transport, transport))
    return connection
