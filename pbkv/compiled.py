"""Which build of pbkv's request path runs: compiled or pure Python.

``compile.sh`` compiles the modules a request and a batch go through (``MODULES``) with
mypyc when the machine has a C compiler (``bin/build_native``). The extension modules
sit beside their sources, and Python imports an extension before a source. The
sources stay the reference, and they run instead:

- when nothing was compiled (no compiler, or a plain ``pip install``);
- when ``PBKV_PURE_PYTHON`` is set (the tests that swap a function for a broken one
  need that: compiled code calls its functions directly);
- when the build is for another Python version (its shared library, ``LIBRARY``,
  is not there under this interpreter's name);
- when a source changed after the build: the build would run old code. The build
  writes each source's size and modification time to ``BUILD_FILE``; a source that
  no longer matches makes the whole package run as Python, with a warning.

Compiled or not, it is one package: an extension and its source never mix (the
compiled modules call each other natively, so either all of them load or none).

In a compiled module, what ``dataclasses`` generates (``__init__``, ``__eq__``) is
still Python: a frozen dataclass's ``__init__`` costs about ten times a compiled one.
The classes made per request or per batch (an outcome, a reply to send, a frame, a
batch and what records or undoes it) therefore write their ``__init__`` out, with
``object.__setattr__`` in a frozen one (compiled, a native store).  Two more rules
of compiled classes: ``dataclasses`` takes every class attribute of a compiled
dataclass for a field (so frames keep their types in a table), and ``__new__`` calls
``__init__`` (so a class that is copied, as frames are, rebuilds itself through
``__reduce__``).  ``tests/unit/test_request_path.py`` holds the request path to this:
a request of each kind runs no Python function of these modules.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

# The request path (HTTP in and out, the store, the cores and what they call per write,
# the replication frames) and the bulk load's parsers and endpoint.
MODULES = (
    "pbkv.actions",
    "pbkv.backup",
    "pbkv.bulk",
    "pbkv.catchup",
    "pbkv.commands",
    "pbkv.core",
    "pbkv.http.access",
    "pbkv.http.load",
    "pbkv.http.params",
    "pbkv.http.pending",
    "pbkv.http.protocol",
    "pbkv.http.reader",
    "pbkv.http.replies",
    "pbkv.idempotency",
    "pbkv.limits",
    "pbkv.metrics",
    "pbkv.node",
    "pbkv.persist.driver",
    "pbkv.persist.framing",
    "pbkv.persist.log",
    "pbkv.primary",
    "pbkv.routes",
    "pbkv.stages",
    "pbkv.store",
    "pbkv.text",
    "pbkv.wire",
)
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
BUILD_FILE = "_compiled.txt"  # written by bin/build_native, beside this module
# The group's shared library, as this interpreter would name it (built for another
# Python version, the build is not this interpreter's).
LIBRARY = "_native__mypyc" + importlib.machinery.EXTENSION_SUFFIXES[0]
PURE_VARIABLE = "PBKV_PURE_PYTHON"


def source_path(module: str, package_dir: str = PACKAGE_DIR) -> str:
    """The source file of ``module`` (a name in ``MODULES``)."""
    return os.path.join(package_dir, *module.split(".")[1:]) + ".py"


def _stamp(module: str, package_dir: str) -> tuple[int, int]:
    """Size and modification time (ns) of ``module``'s source."""
    stat = os.stat(source_path(module, package_dir))
    return stat.st_size, stat.st_mtime_ns


def build_record(modules: Sequence[str], package_dir: str = PACKAGE_DIR) -> str:
    """What the build writes to ``BUILD_FILE``: a line per module, with its source's size
    and modification time (ns) when it was compiled."""
    return "".join("%s %d %d\n" % (module, *_stamp(module, package_dir)) for module in modules)


def stale_sources(record: str, package_dir: str = PACKAGE_DIR) -> list[str]:
    """The modules of a build ``record`` whose source changed since (or is gone)."""
    stale = []
    for line in record.splitlines():
        module, size, mtime = line.split()
        try:
            if _stamp(module, package_dir) != (int(size), int(mtime)):
                stale.append(module)
        except OSError:
            stale.append(module)
    return stale


def choose(
    environ: Mapping[str, str], record: str | None, stale: Sequence[str], library: bool = True
) -> str:
    """Which build runs: ``compiled``, or why the sources run instead (``library``:
    whether the build's shared library is there for this interpreter)."""
    if environ.get(PURE_VARIABLE):
        return f"pure Python ({PURE_VARIABLE} is set)"
    if record is None:
        return "pure Python (not compiled)"
    if not library:
        return "pure Python (not compiled for this Python)"
    if stale:
        return f"pure Python (compiled build older than {', '.join(stale)})"
    return "compiled"


class SourcesOnly:
    """A finder that loads the compiled modules from their sources."""

    def __init__(self, modules: Sequence[str], package_dir: str) -> None:
        self.sources = {module: source_path(module, package_dir) for module in modules}

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        source = self.sources.get(name)
        if source is None:
            return None
        loader = importlib.machinery.SourceFileLoader(name, source)
        return importlib.util.spec_from_file_location(name, source, loader=loader)


def _read_record(package_dir: str) -> str | None:
    try:
        with open(os.path.join(package_dir, BUILD_FILE), encoding="ascii") as file:
            return file.read()
    except FileNotFoundError:
        return None


def _select() -> str:
    record = _read_record(PACKAGE_DIR)
    stale = stale_sources(record, PACKAGE_DIR) if record is not None else []
    library = os.path.exists(os.path.join(PACKAGE_DIR, LIBRARY))
    state = choose(os.environ, record, stale, library)
    if state != "compiled":
        sys.meta_path.insert(0, SourcesOnly(MODULES, PACKAGE_DIR))
    if stale and not os.environ.get(PURE_VARIABLE):
        print(f"pbkv: {state}; run ./compile.sh to compile again", file=sys.stderr)
    return state


# Decided once, when the package is imported (before any module of MODULES is).
BUILD = _select()
