"""pbkv: a primary-backup replicated, in-memory key-value server."""

from pbkv.client import (
    AsyncClient,
    BadRequest,
    Client,
    NotPrimary,
    PbkvError,
    ReplicationFailed,
    Unavailable,
)

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "NotPrimary",
    "PbkvError",
    "ReplicationFailed",
    "Unavailable",
]
__version__ = "0.1.0"
