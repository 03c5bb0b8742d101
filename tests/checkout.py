"""A copy of the checkout to build from, so that a test's `pip install .` or `pip wheel .` never builds in the
checkout itself (a pure build there would delete a compiled build's .so files, setup.py)."""

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__", ".mypy_cache",
                               ".ruff_cache", ".pytest_cache", ".hypothesis", "*.so", "benchmarks", "docs")


def copy_checkout(dest: Path) -> Path:
    """The sources a build needs, copied to `dest` (without venvs, caches, compiled modules)."""
    shutil.copytree(ROOT, dest, symlinks=True, ignore=_SKIP)
    return dest
