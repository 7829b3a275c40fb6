"""The layout of the tests themselves: every test file in the folder of its layer,
shared pieces in tests/support, and no test file importing another one."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
LAYERS = ("unit", "sim", "loopback", "etcd", "process", "netns")
# The fast lane (bin/run_tests --fast) runs these; none may start a server process.
FAST_LAYERS = ("unit", "sim", "loopback")
# What starts server processes: these names, and the fixtures of tests/conftest.py.
SERVER_STARTERS = {"Pair", "LocalPair", "LocalMembers", "NamespacePair", "standalone_server", "BIN"}
SERVER_FIXTURES = {"pair", "make_pair", "standalone"}


def imported_modules(path: Path) -> set[str]:
    package = ".".join(path.relative_to(TESTS.parent).parent.parts)
    return imported_by(path.read_text(), package)


def imported_by(source: str, package: str) -> set[str]:
    """Every module ``source`` imports, as absolute names (relative imports are
    resolved against ``package``, the package the source is in)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def is_test_module(name: str) -> bool:
    return name.rsplit(".", 1)[-1].startswith("test_")


def test_no_test_file_imports_another() -> None:
    offenders = {
        str(path.relative_to(TESTS)): sorted(filter(is_test_module, imported_modules(path)))
        for path in TESTS.rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_every_test_file_is_in_a_layer_folder() -> None:
    misplaced = [
        str(path.relative_to(TESTS))
        for path in TESTS.rglob("test_*.py")
        if path.relative_to(TESTS).parts[0] not in LAYERS
    ]
    assert misplaced == []


def server_starters(path: Path) -> set[str]:
    """Names and fixtures in ``path`` that start server processes."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found.update(a.name for a in node.names if a.name in SERVER_STARTERS)
        elif isinstance(node, ast.FunctionDef):
            found.update(a.arg for a in node.args.args if a.arg in SERVER_FIXTURES)
    return found


def test_the_fast_layers_start_no_server() -> None:
    offenders = {
        str(path.relative_to(TESTS)): sorted(server_starters(path))
        for layer in FAST_LAYERS
        for path in (TESTS / layer).rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}
    # The check itself finds them where they are.
    assert server_starters(TESTS / "process" / "test_course_flow.py")


def test_the_check_sees_every_way_of_importing_a_test_module() -> None:
    source = (
        "import tests.unit.test_cores\n"
        "from tests.process.test_http_server import Raw\n"
        "from . import test_wire\n"
        "from ..sim.test_simulation import run\n"
        "from tests.support.raw_http import request\n"
    )
    found = {name for name in imported_by(source, "tests.unit") if is_test_module(name)}
    assert found == {
        "tests.unit.test_cores",
        "tests.process.test_http_server",
        "tests.unit.test_wire",
        "tests.sim.test_simulation",
    }
