"""What `hvsim sweep` prints: where the results went, and the head of the table's headline figures."""

from pathlib import Path

import pandas as pd

from .execute import SweepRun
from .spec import SweepSpec

# The figures of the change_pte story, shown on the console and drawn by --plot by default.
HEADLINE = ("totals.exits.EPT_VIOLATION", "totals.exits.EXTERNAL_INTERRUPT", "ksm.pages_sharing", "vmstat.cow_ksm",
            "totals.notifier_calls.change_pte", "totals.stats.spte_changed", "sim_time.ms")
MAX_ROWS = 40


def headline(table: pd.DataFrame) -> list[str]:
    return [f for f in HEADLINE if f in table.columns]


def render_summary(spec: SweepSpec, table: pd.DataFrame, state: SweepRun, results: Path, checksum: str,
                   plots: list[Path]) -> str:
    lines = [f"hvsim sweep: {spec.path}: {len(spec.points)} point(s), {state.ran} run now, "
             f"{state.reused} already done" + (f", {len(state.failures)} failed" if state.failures else "")]
    shown = table[spec.axis_keys + headline(table)]
    if len(shown):
        text = shown.head(MAX_ROWS).to_string(index=False)
        lines += text.splitlines()
        if len(shown) > MAX_ROWS:
            lines.append(f"... {len(shown) - MAX_ROWS} more row(s)")
    lines.append(f"{results / 'results.parquet'}, {results / 'results.csv'}: {len(table)} row(s) x "
                 f"{len(table.columns)} column(s); table sha256 {checksum}")
    lines.append(f"{results / 'runs'}/: the full JSON report of every point")
    lines += [f"{p}" for p in plots]
    return "\n".join(lines) + "\n"
