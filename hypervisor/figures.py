"""A run's JSON report as a flat list of figures: every number in it, named by its path with dots.

`totals.exits.EPT_VIOLATION`, `ksm.pages_sharing`, `vms.0.stats.pf_fixed`, `sim_time.ms`: the
names `hvsim diff` prints and `hvsim sweep`'s table uses as columns.  The `config` subtree is the
run's input, not a figure; strings (consoles, summaries) are not figures either.
"""

import hashlib
from collections.abc import Iterator
from typing import Any

Figure = int | float

# Subtrees of a report that describe the run rather than measure it.
NOT_FIGURES = frozenset({"config", "hvsim_version", "profile"})


def _walk(node: Any, path: str) -> Iterator[tuple[str, Figure]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}.{i}")
    elif isinstance(node, bool):
        yield path, int(node)
    elif isinstance(node, int | float):
        yield path, node


def figures(report: dict[str, Any]) -> dict[str, Figure]:
    """Every figure of a run report, in the report's own order."""
    return dict(item for key, value in report.items() if key not in NOT_FIGURES for item in _walk(value, key))


def absent_means_zero(report: dict[str, Any], path: str) -> bool:
    """A figure missing from a report is a zero count when its parent table is there.

    Reports list only the exit reasons and counters that occurred: a run without any
    EXTERNAL_INTERRUPT exit has `totals.exits` but no `totals.exits.EXTERNAL_INTERRUPT`,
    which means 0.  A run without KSM has no `ksm` table at all: not applicable, not 0.
    """
    *parents, _leaf = path.split(".")
    node: Any = report
    for part in parents:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False
    return isinstance(node, dict)


def console_checksum(report: dict[str, Any]) -> str:
    """sha256 of every VM's console output in VM order (first 16 hex digits): equal output, equal sum."""
    h = hashlib.sha256()
    for vm in report.get("vms", []):
        text = str(vm.get("console", ""))
        h.update(f"{len(text)}:".encode())
        h.update(text.encode())
    return h.hexdigest()[:16]
