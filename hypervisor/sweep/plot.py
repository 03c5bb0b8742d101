"""`hvsim sweep --plot`: each figure against the first axis, a line per value of the second, a panel per
value of the third; further axes get a file each.  matplotlib is optional (`pip install "hvsim[plot]"`).
"""

import itertools
import re
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ConfigError
from ..plot import pyplot, save_figure
from .report import HEADLINE
from .spec import Axis, SweepSpec

STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D"]


def _column_values(table: pd.DataFrame, axis: Axis) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in table[list(axis.names)].itertuples(index=False, name=None)]


def _mask(table: pd.DataFrame, axis: Axis, step: tuple[Any, ...]) -> "pd.Series[bool]":
    mask = pd.Series(True, index=table.index)
    for name, value in zip(axis.names, step, strict=True):
        mask &= table[name].astype(str) == str(value)
    return mask


def _steps(table: pd.DataFrame, axis: Axis) -> list[tuple[Any, ...]]:
    """The axis's values in spec order, as the table holds them."""
    present = {tuple(str(v) for v in row) for row in _column_values(table, axis)}
    return [s for s in axis.values if tuple(str(v) for v in s) in present]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _figures(table: pd.DataFrame, spec: SweepSpec, wanted: list[str]) -> list[str]:
    """The figures to draw: --figure, else the spec's, else the headline columns the table has."""
    if not spec.axes:
        raise ConfigError("--plot needs at least one axis to draw the figures against.")
    figures = wanted or list(spec.figures) or [f for f in HEADLINE if f in table.columns]
    missing = [f for f in figures if f not in table.columns]
    if missing:
        raise ConfigError(f"--figure {missing[0]!r} is not a column of the results table; figures are named by "
                          "their path in the JSON report, e.g. totals.exits.EPT_VIOLATION or ksm.pages_sharing.")
    return figures


def _draw_panel(ax: Any, data: pd.DataFrame, figure: str, x_axis: Axis, line_axis: Axis | None) -> None:
    """One panel: `figure` against the x axis, a line per value of the line axis."""
    lines = _steps(data, line_axis) if line_axis is not None else [()]
    xs = _steps(data, x_axis)
    # A numeric axis (or zip group led by a number) is drawn to scale, labelled with every value.
    numeric = all(isinstance(s[0], int | float) and not isinstance(s[0], bool) for s in xs)
    for n, line in enumerate(lines):
        part = data[_mask(data, line_axis, line)] if line_axis is not None else data
        ys, pos = [], []
        for i, step in enumerate(xs):
            hit = part[_mask(part, x_axis, step)][figure]
            if len(hit) and not pd.isna(hit.iloc[0]):
                ys.append(float(hit.iloc[0]))
                pos.append(step[0] if numeric else i)
        label = f"{line_axis.label}={line_axis.value_label(line)}" if line_axis is not None else None
        # Lines often coincide (3.7 with and without change_pte): vary the style so none hides another.
        ax.plot(pos, ys, label=label, linestyle=STYLES[n % len(STYLES)],
                marker=MARKERS[n % len(MARKERS)], linewidth=2.4 - 0.4 * (n % 4), markersize=7 - n % 4)
    if not numeric:
        ax.set_xticks(range(len(xs)), [x_axis.value_label(s) for s in xs])
    else:
        if min(s[0] for s in xs) > 0 and max(s[0] for s in xs) >= 16 * min(s[0] for s in xs):
            ax.set_xscale("log", base=2)  # knobs swept by powers, e.g. pages_to_scan 8..512
        ax.set_xticks([s[0] for s in xs], [x_axis.value_label(s) for s in xs])
        ax.minorticks_off()
    ax.set_xlabel(x_axis.label)
    ax.grid(alpha=0.3)
    if line_axis:
        ax.legend(fontsize=8)


def plot_sweep(table: pd.DataFrame, spec: SweepSpec, wanted: list[str], directory: Path) -> list[Path]:
    plt = pyplot()
    figures = _figures(table, spec, wanted)
    x_axis = spec.axes[0]
    line_axis = spec.axes[1] if len(spec.axes) > 1 else None
    panel_axis = spec.axes[2] if len(spec.axes) > 2 else None
    rest_axes = list(spec.axes[3:])
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for figure in figures:
        for fixed in itertools.product(*(_steps(table, a) for a in rest_axes)):
            sub = table
            for axis, step in zip(rest_axes, fixed, strict=True):
                sub = sub[_mask(sub, axis, step)]
            panels = _steps(sub, panel_axis) if panel_axis is not None else [()]
            fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 3.8), sharey=True,
                                     squeeze=False)
            for ax, panel in zip(axes[0], panels, strict=True):
                data = sub[_mask(sub, panel_axis, panel)] if panel_axis is not None else sub
                _draw_panel(ax, data, figure, x_axis, line_axis)
                if panel_axis is not None:
                    ax.set_title(f"{panel_axis.label}={panel_axis.value_label(panel)}", fontsize=10)
            axes[0][0].set_ylabel(figure)
            suffix = "".join(f"-{a.label}={a.value_label(s)}" for a, s in zip(rest_axes, fixed, strict=True))
            fig.suptitle(f"{spec.path.name}: {figure}{suffix.replace('-', ' ', 1) if suffix else ''}", fontsize=11)
            fig.tight_layout()
            path = directory / f"{_slug(figure + suffix)}.png"
            save_figure(plt, fig, path, 100, f"--plot: cannot write {str(path)!r}")
            written.append(path)
    return written
