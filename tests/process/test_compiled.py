"""The compiled build as servers run it: the status says which build runs, the
variable and a stale build make the sources run (pbkv/compiled.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pbkv import compiled

PACKAGE = Path(compiled.PACKAGE_DIR)
SHOW = "import pbkv.store, pbkv.compiled as c; print(c.BUILD); print(pbkv.store.__file__)"


def imported(root: Path, **variables: str) -> tuple[str, str, str]:
    """The build a fresh interpreter picks in ``root`` (its folder and path), where it
    imported the store from, and what it wrote to stderr."""
    env = {k: v for k, v in os.environ.items() if k != compiled.PURE_VARIABLE}
    env.update(variables, PYTHONPATH=str(root))
    done = subprocess.run(
        [sys.executable, "-c", SHOW],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    build, path = done.stdout.splitlines()
    return build, path, done.stderr


def test_the_variable_makes_the_sources_run() -> None:
    build, path, _ = imported(PACKAGE.parent, PBKV_PURE_PYTHON="1")
    assert build == "pure Python (PBKV_PURE_PYTHON is set)"
    assert path == str(PACKAGE / "store.py")


def copied_package(tmp_path: Path) -> Path:
    """A copy of the package with its build, in ``tmp_path`` (times kept: still fresh)."""
    copy = tmp_path / "pbkv"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.mark.skipif(compiled.BUILD != "compiled", reason="needs a compiled build")
def test_a_source_changed_after_the_build_makes_every_source_run(tmp_path: Path) -> None:
    copy = copied_package(tmp_path)
    build, path, _ = imported(tmp_path)
    assert (build, Path(path).suffix) == ("compiled", ".so")
    with open(copy / "core.py", "a") as source:
        source.write("\n")
    build, path, stderr = imported(tmp_path)
    assert build == "pure Python (compiled build older than pbkv.core)"
    assert path == str(copy / "store.py")
    assert "run ./compile.sh to compile again" in stderr


def test_a_server_reports_the_build_it_runs(make_pair) -> None:
    servers = make_pair(standalone="true")
    servers.start("primary")
    status = servers.status("primary")
    assert status is not None and status["build"] == compiled.BUILD


@pytest.mark.skipif(compiled.BUILD != "compiled", reason="needs a compiled build")
def test_a_build_without_its_library_for_this_python_runs_the_sources(tmp_path: Path) -> None:
    # As a build for another Python version looks to this one (its files' names differ).
    copy = copied_package(tmp_path)
    (copy / compiled.LIBRARY).unlink()
    build, path, _ = imported(tmp_path)
    assert build == "pure Python (not compiled for this Python)"
    assert path == str(copy / "store.py")
