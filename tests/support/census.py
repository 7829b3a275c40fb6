"""Which Python functions of the compiled modules run (see ``pbkv/compiled.py``)."""

from __future__ import annotations

import collections
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from pbkv import compiled

COMPILED = set(compiled.MODULES)


@contextmanager
def python_in_compiled_modules() -> Iterator[collections.Counter[str]]:
    """Counts, by name, the Python functions of the compiled modules called meanwhile:
    those ``dataclasses`` generated for their classes (``<string>``), and, in the
    compiled build, any other (from the sources every function is Python: only the
    first kind counts there)."""
    seen: collections.Counter[str] = collections.Counter()
    any_function = compiled.BUILD == "compiled"

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        code = frame.f_code
        if code.co_filename == "<string>" and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"])
            if cls.__module__ in COMPILED:
                seen[f"{cls.__module__}.{cls.__qualname__}.{code.co_name} (generated)"] += 1
        elif any_function and frame.f_globals.get("__name__") in COMPILED:
            seen[f"{frame.f_globals['__name__']}.{code.co_qualname}"] += 1

    sys.setprofile(hook)
    try:
        yield seen
    finally:
        sys.setprofile(None)
