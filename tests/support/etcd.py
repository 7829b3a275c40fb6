"""etcd for tests: one throwaway member, or a skip that says why there is none.

``running_etcd`` is the body of a fixture (``yield from running_etcd(directory)``);
a test that needs etcd to itself (stopping, pausing it) takes its own, the others
share one per session and keep apart by key prefix.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from pbkv.testing.etcd import ETCD_MISSING, EtcdServer, etcd_binary

_prefixes = itertools.count(1)


def running_etcd(directory: Path) -> Iterator[EtcdServer]:
    if etcd_binary() is None:
        pytest.skip(ETCD_MISSING)
    with EtcdServer(directory) as server:
        yield server


def unique_prefix(test_name: str) -> str:
    """A cluster prefix no other test of the session uses."""
    return f"test{next(_prefixes)}-{re.sub(r'[^A-Za-z0-9_.-]', '_', test_name)[:60]}"
