"""`--plot FILE.png`: EPT_VIOLATION exits per simulated millisecond and KSM sharing over simulated time.

For `compare`, one line per run on shared axes: the 2009 run's flat exit rate next to
the no-change_pte run's storm and the 2012/2024 runs' one-exit-per-merge, in one picture.
Runs often coincide exactly (2.6.32 with KSM off, 3.7 with 6.10), so every line has its own
colour, dash and marker, the markers of different lines fall on different samples, and the
legend sits outside the axes.  The KSM panel is drawn only for runs with KSM on.
matplotlib is optional (`pip install "hvsim[plot]"`).
"""

from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, OutputWriteError
from .series import TimeSeries

# A run spanning fewer bins than this gets finer bins (down to its time-slice length).
MIN_BINS = 10


def _matplotlib() -> object:
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise ConfigError('--plot needs matplotlib, which is an optional extra: pip install "hvsim[plot]".') from None
    return matplotlib


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or the ConfigError that says how to install it."""
    _matplotlib()
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt: Any, fig: Any, path: str | Path, dpi: int, cannot: str) -> None:
    """Write `fig` and close it; an OSError becomes the ConfigError `cannot` + the reason."""
    try:
        fig.savefig(path, dpi=dpi)
    except OSError as exc:
        raise ConfigError(f"{cannot}: {exc.strerror}.") from None
    finally:
        plt.close(fig)


def check_plot_file(flag: str, path: str) -> None:
    """Before the run: matplotlib is there and can write this file type (by its suffix)."""
    _matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    types = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in types:
        raise ConfigError(f"{flag} {path!r}: a plot is written as one of "
                          f"{', '.join('.' + t for t in sorted(types))} (by the suffix), e.g. {flag} eras.png.")


def bin_ms(runs: list[TimeSeries]) -> float:
    """1 ms, or a power-of-ten fraction of it for short runs, but never finer than a time slice."""
    duration = max((s.t_ms[-1] for s in runs if s.t_ms), default=0.0)
    samples = max((len(s.t_ms) for s in runs), default=0)
    slice_ms = duration / samples if samples else 0.0
    width = 1.0
    while duration / width < MIN_BINS and width / 10 >= slice_ms > 0:
        width /= 10
    return width


def exits_per_ms(series: TimeSeries, width: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The exit rate in bins of `width` ms, as (bin starts and the last bin's end, rate) for a steps-post line.

    The cumulative count is sampled at time-slice ends and interpolated linearly in between;
    each rate is drawn from its bin's start to its end (the last value is repeated so the
    last bin has its width).
    """
    t = np.asarray(series.t_ms, dtype=float)
    n = np.asarray(series.ept_exits, dtype=float)
    if t.size == 0:
        return np.zeros(0), np.zeros(0)
    edges = np.arange(0.0, float(np.ceil(t[-1] / width)) + 1.0) * width
    at_edges = np.interp(edges, np.concatenate(([0.0], t)), np.concatenate(([0.0], n)))
    rate = np.diff(at_edges) / width
    return edges, np.append(rate, rate[-1:])


_STYLES = ("-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)))
_MARKERS = ("o", "s", "^", "v", "D", "x", "P", "*")


def write_plot(path: str, runs: list[TimeSeries], title: str) -> list[str]:
    """Write the figure; returns warnings for the user (a run too short to plot)."""
    import matplotlib.pyplot as plt

    fig, warnings = figure(runs, title, path)
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise OutputWriteError(f"--plot {path!r}: cannot write the file: {exc.strerror or exc}.") from None
    finally:
        plt.close(fig)
    return warnings


def figure(runs: list[TimeSeries], title: str, path: str = "") -> tuple[Any, list[str]]:
    """The matplotlib Figure of the runs, and warnings for the user."""
    _matplotlib()
    import matplotlib.pyplot as plt

    ksm_runs = [s for s in runs if s.ksm]
    if ksm_runs:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    else:
        fig, top = plt.subplots(1, 1, figsize=(11, 4))
        bottom = None
    width = bin_ms(runs)
    duration = max((s.t_ms[-1] for s in runs if s.t_ms), default=0.0)
    samples = max((len(s.t_ms) for s in runs), default=0)
    if samples < 2 or duration / width < 2:
        note = (f"The run is too short to plot: {duration:.4f} simulated ms in {samples} time slice(s).\n"
                "A rate needs several time slices: run longer (more passes) or with a smaller --quantum.")
        for ax in (top, bottom):
            if ax is not None:
                ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=10)
                ax.set_yticks([])
        runs = []
        warnings = [f"--plot {path!r}: the run is too short to plot ({duration:.4f} simulated ms in "
                    f"{samples} time slice(s)); the figure says so."]
    else:
        warnings = []
    lines = []
    for n, series in enumerate(runs):
        x, y = exits_per_ms(series, width)
        style = dict(color=f"C{n % 10}", linestyle=_STYLES[n % len(_STYLES)], marker=_MARKERS[n % len(_MARKERS)],
                     linewidth=2.4 - 0.3 * (n % 5), markersize=5, fillstyle="none")
        # Markers on different samples for each line, so lines that coincide stay distinguishable.
        every = max(1, len(x) // 12)
        lines += top.plot(x, y, label=series.label, drawstyle="steps-post",
                          markevery=(n * every // max(1, len(runs)), every), **style)
        if bottom is not None and series.ksm:
            every = max(1, len(series.t_ms) // 12)
            mark = (n * every // max(1, len(runs)), every)
            bottom.plot(series.t_ms, series.pages_sharing, markevery=mark, **style)
            if len(ksm_runs) == 1:
                bottom.plot(series.t_ms, series.pages_shared, color=style["color"], linestyle=":",
                            label="pages_shared")
    if len(lines) > 1:
        top.legend(handles=lines, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="run")
    unit = "ms" if width == 1.0 else f"{width:g} ms bins"
    top.set_ylabel("EPT_VIOLATION exits / ms" + ("" if width == 1.0 else f"\n({unit})"))
    top.set_title(title)
    top.grid(alpha=0.3)
    last = bottom if bottom is not None else top
    last.set_xlabel("simulated time (ms)")
    if bottom is not None:
        bottom.set_ylabel("KSM pages_sharing" + (" / pages_shared (dotted)" if len(ksm_runs) == 1 else ""))
        bottom.grid(alpha=0.3)
    return fig, warnings
