"""Tests marked ``pure_python`` swap a function of pbkv for a broken one, to show that
a check catches the bug. Compiled modules call each other directly and never see the
swap, so these tests run on the sources only: ``bin/run_tests`` runs the in-process
layers once with ``PBKV_PURE_PYTHON=1`` (see ``pbkv/compiled.py``)."""

from __future__ import annotations

import pytest

from pbkv import compiled


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if compiled.BUILD != "compiled":
        return
    skip = pytest.mark.skip(reason="swaps pbkv's functions: runs with PBKV_PURE_PYTHON=1")
    for item in items:
        if item.get_closest_marker("pure_python"):
            item.add_marker(skip)
