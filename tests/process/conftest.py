from __future__ import annotations

import pytest

from tests.support.harness import Pair, standalone_server


@pytest.fixture
def pair(tmp_path):
    """A primary and a backup on free ports, not yet started; killed afterwards."""
    servers = Pair(tmp_path)
    yield servers
    servers.cleanup()


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    """One standalone primary (answers writes without a backup) per test module."""
    yield from standalone_server(tmp_path_factory, "standalone")


@pytest.fixture
def make_pair(tmp_path):
    """Build a Pair with extra settings: ``make_pair(store="hash")``."""
    made: list[Pair] = []

    def make(**settings: str) -> Pair:
        directory = tmp_path / f"pair{len(made)}"
        directory.mkdir()
        servers = Pair(directory, **settings)
        made.append(servers)
        return servers

    yield make
    for servers in made:
        servers.cleanup()
