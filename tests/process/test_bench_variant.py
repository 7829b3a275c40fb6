"""``bench.compare --variant label@CHECKOUT``: a variant's servers run that checkout's
code, not this one's (``python -m`` looks in the current folder first)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from bench.servers import Pbkv
from pbkv import compiled

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(compiled.BUILD != "compiled", reason="needs a compiled build")
def test_a_variants_servers_run_its_checkouts_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "bin", checkout / "bin")
    package = shutil.copytree(
        compiled.PACKAGE_DIR, checkout / "pbkv", ignore=shutil.ignore_patterns("__pycache__")
    )
    (package / compiled.LIBRARY).unlink()  # the copy runs its sources, and says so
    (checkout / ".venv").symlink_to(sys.prefix)  # the interpreter its scripts pick
    servers = Pbkv(tmp_path / "work", "variant", standalone=True, root=checkout)
    try:
        servers.start_all()
        status = servers.status()
        assert status is not None
        assert status["build"] == "pure Python (not compiled for this Python)"
        # Compared with this compiled process, it would be slower: the benchmark says so.
        assert servers.build == status["build"]
        warning = f"warning: pbkv variant runs {status['build']}, this benchmark compiled"
        assert warning in capsys.readouterr().err
    finally:
        servers.cleanup()
