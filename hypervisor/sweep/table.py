"""The tidy results table: one row per point, a column per axis, then every figure of its report.

Figures are named by their path in the JSON report (hypervisor/figures.py).  A figure a run's
report lacks is 0 when its parent table is there (exit reasons that never happened) and
missing (<NA>) when it is not (the `ksm.*` of a run without KSM).  Written as
RESULTS_DIR/results.parquet (pyarrow) and RESULTS_DIR/results.csv.
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ConfigError
from ..figures import absent_means_zero, console_checksum, figures
from .execute import ReportStore
from .spec import SweepSpec

CONSOLE_COLUMN = "console_sha256"
POINT_COLUMN = "point"


def _axis_column(values: list[Any]) -> pd.Series:
    kinds = {type(v) for v in values}
    if len(kinds) > 1 or kinds & {list, dict}:  # mixed types (e.g. memory = ["64M", 65536]) as text
        return pd.Series([json.dumps(v) if isinstance(v, list | dict) else str(v) for v in values])
    return pd.Series(values)


def build_table(spec: SweepSpec, results: Path, wanted: Sequence[str] = ()) -> pd.DataFrame:
    """Every point whose report exists, in the spec's order.

    `wanted` figures get a column even when no run had them, as zeros where their table is
    there (no run had a cow_ksm: `vmstat.cow_ksm` is 0 throughout, and can be plotted).
    """
    store = ReportStore(results)
    points = [p for p in spec.points if store.has(p)]
    reports = [json.loads(store.path(p).read_text(encoding="utf-8")) for p in points]
    rows = [figures(r) for r in reports]
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    for name in wanted:
        if name not in names and any(absent_means_zero(r, name) for r in reports):
            names[name] = None
    columns: dict[str, pd.Series] = {}
    for key in spec.axis_keys:
        columns[key] = _axis_column([p.coords[key] for p in points])
    for name in names:
        values = [row[name] if name in row else (0 if absent_means_zero(report, name) else None)
                  for row, report in zip(rows, reports, strict=True)]
        present = [v for v in values if v is not None]
        integral = all(isinstance(v, int) for v in present)
        columns[name] = pd.Series(values, dtype="Int64" if integral else "Float64")
    columns[CONSOLE_COLUMN] = pd.Series([console_checksum(r) for r in reports], dtype="string")
    columns[POINT_COLUMN] = pd.Series([p.key for p in points], dtype="string")
    return pd.DataFrame(columns, index=pd.RangeIndex(len(points)))


def write_tables(table: pd.DataFrame, results: Path) -> tuple[Path, Path]:
    parquet, csv = results / "results.parquet", results / "results.csv"
    try:
        table.to_parquet(parquet, engine="pyarrow", index=False)
        table.to_csv(csv, index=False)
    except OSError as err:
        raise ConfigError(f"cannot write the results table in {str(results)!r}: {err.strerror}.") from None
    return parquet, csv


def table_checksum(csv: Path) -> str:
    """sha256 of results.csv: two sweeps with equal checksums produced the same table."""
    return hashlib.sha256(csv.read_bytes()).hexdigest()[:16]
