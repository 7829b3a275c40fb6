"""Which build runs (pbkv/compiled.py): the decision, the staleness check and the
finder that loads the sources, without building anything."""

from __future__ import annotations

import os
from pathlib import Path

from pbkv import compiled

MODULES = ("pbkv.store", "pbkv.http.reader")


def package(tmp_path: Path) -> str:
    (tmp_path / "http").mkdir()
    (tmp_path / "store.py").write_text("x = 1\n")
    (tmp_path / "http" / "reader.py").write_text("y = 2\n")
    return str(tmp_path)


def test_the_compiled_build_runs_only_when_fresh_and_not_overridden() -> None:
    record = "pbkv.store 6 1\n"
    assert compiled.choose({}, record, []) == "compiled"
    assert compiled.choose({}, None, []) == "pure Python (not compiled)"
    assert compiled.choose({"PBKV_PURE_PYTHON": "1"}, record, []) == (
        "pure Python (PBKV_PURE_PYTHON is set)"
    )
    assert compiled.choose({"PBKV_PURE_PYTHON": ""}, record, []) == "compiled"
    assert compiled.choose({}, record, [], library=False) == (
        "pure Python (not compiled for this Python)"
    )
    assert compiled.choose({}, record, ["pbkv.store", "pbkv.core"]) == (
        "pure Python (compiled build older than pbkv.store, pbkv.core)"
    )


def test_a_source_changed_or_gone_since_the_build_is_stale(tmp_path: Path) -> None:
    folder = package(tmp_path)
    record = compiled.build_record(MODULES, folder)
    assert record.splitlines()[1].startswith("pbkv.http.reader 6 ")
    assert compiled.stale_sources(record, folder) == []
    (tmp_path / "store.py").write_text("x = 10\n")  # one byte more
    assert compiled.stale_sources(record, folder) == ["pbkv.store"]
    record = compiled.build_record(MODULES, folder)
    reader = tmp_path / "http" / "reader.py"
    stat = reader.stat()
    os.utime(reader, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same size, touched
    assert compiled.stale_sources(record, folder) == ["pbkv.http.reader"]
    reader.unlink()
    assert compiled.stale_sources(record, folder) == ["pbkv.http.reader"]


def test_the_finder_loads_the_listed_modules_from_their_sources(tmp_path: Path) -> None:
    folder = package(tmp_path)
    finder = compiled.SourcesOnly(MODULES, folder)
    spec = finder.find_spec("pbkv.http.reader", None)
    assert spec is not None and spec.origin == str(tmp_path / "http" / "reader.py")
    assert finder.find_spec("pbkv.cli", None) is None
    assert finder.find_spec("store", None) is None


def test_every_compiled_module_has_its_source() -> None:
    for module in compiled.MODULES:
        assert Path(compiled.source_path(module)).is_file(), module
