"""HVSIM_PURE=1: import hvsim's modules from their .py source even where a mypyc build (setup.py,
HVSIM_COMPILED=1) left compiled extension modules beside them, so that one install runs either build."""

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from types import ModuleType


class SourceFirstFinder(importlib.abc.MetaPathFinder):
    """Finds hypervisor.* submodules among .py files only; anything without a .py (the C hook _icount)
    falls through to the ordinary finders."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith("hypervisor.") or path is None:
            return None
        for entry in path:
            finder = importlib.machinery.FileFinder(
                entry, (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES))
            spec = finder.find_spec(fullname, target)
            if spec is not None:
                return spec
        return None


def prefer_source() -> None:
    """Put the source-only finder ahead of every other (once)."""
    if not any(isinstance(finder, SourceFirstFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceFirstFinder())


def compiled_modules() -> list[str]:
    """The hvsim modules imported so far that run compiled (mypyc extension modules built from a .py of the
    package); hvsim's own C hook (_icount) and mypyc's shared runtime are not counted."""
    names = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None) or ""
        if (name.startswith("hypervisor.") and not name.rsplit(".", 1)[-1].startswith("_")
                and file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))):
            names.append(name)
    return sorted(names)


def build_name() -> str:
    """"compiled" when any compiled module was imported, else "pure Python" (HVSIM_PURE=1, or none built)."""
    if compiled_modules():
        return "compiled"
    return "pure Python (HVSIM_PURE=1)" if os.environ.get("HVSIM_PURE") == "1" else "pure Python"
