"""pbkv: a primary-backup replicated, in-memory key-value server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Before any other module: whether the compiled build or the sources run.
from pbkv import compiled as compiled

if TYPE_CHECKING:
    from pbkv.client import (
        AsyncClient,
        BadRequest,
        Client,
        NotDurable,
        NotPrimary,
        OutcomeUnknown,
        PbkvError,
        ReplicationFailed,
        Unavailable,
    )

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "NotDurable",
    "NotPrimary",
    "OutcomeUnknown",
    "PbkvError",
    "ReplicationFailed",
    "Unavailable",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The client is imported when first asked for: a server starting does not need it.
    if name in __all__:
        from pbkv import client

        return getattr(client, name)
    raise AttributeError(f"module 'pbkv' has no attribute {name!r}")
