from __future__ import annotations

import pytest

from tests.support.etcd import running_etcd, unique_prefix


@pytest.fixture(scope="session")
def etcd(tmp_path_factory):
    """One etcd member for the session; tests keep apart by ``prefix``."""
    yield from running_etcd(tmp_path_factory.mktemp("etcd"))


@pytest.fixture
def own_etcd(tmp_path):
    """An etcd member for one test alone (to stop, pause or restart it)."""
    yield from running_etcd(tmp_path / "etcd")


@pytest.fixture
def prefix(request):
    return unique_prefix(request.node.name)
