"""`hvsim sweep` from spec to table: load the spec, run the missing points, tabulate, plot, summarise."""

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..observers import EXIT_INTERRUPTED
from .execute import run_sweep
from .plot import plot_sweep
from .report import HEADLINE, render_summary
from .spec import PointParser, load_spec
from .table import build_table, table_checksum, write_tables


@dataclass(frozen=True)
class SweepOutcome:
    summary: str
    errors: list[str]
    exit_code: int


def sweep(spec_path: Path, results_dir: str | None, jobs: int | None, scheduler: str | None, plot: bool,
          figures: list[str], progress: bool, parse_point: PointParser) -> SweepOutcome:
    if jobs is not None and scheduler:
        raise ConfigError("--jobs is for the local pool; with --scheduler the Dask cluster's workers run "
                          "the points. Give one of them.")
    spec = load_spec(spec_path, parse_point)
    results = Path(results_dir) if results_dir else spec_path.with_name(spec_path.stem + "-results")
    state = run_sweep(spec, results, jobs or os.cpu_count() or 1, scheduler, progress)
    table = build_table(spec, results, [*HEADLINE, *spec.figures, *figures])
    _parquet, csv = write_tables(table, results)
    plots = plot_sweep(table, spec, figures, results / "plots") if plot else []
    summary = render_summary(spec, table, state, results, table_checksum(csv), plots)
    errors = [f"point {point.index} ({point.describe()}): {outcome.error}" for point, outcome in state.failures]
    if state.signal is not None:
        errors.append("interrupted; the table holds the points finished so far. Re-run the same command to run "
                      "the rest.")
        return SweepOutcome(summary, errors, EXIT_INTERRUPTED.get(signal.Signals(state.signal), 130))
    return SweepOutcome(summary, errors, state.failures[0][1].exit_code if state.failures else 0)
