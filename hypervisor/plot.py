"""`--plot FILE.png`: EPT_VIOLATION exits per simulated millisecond and KSM sharing over simulated time.

For `compare`, one line per run on shared axes: the 2009 run's flat exit rate next to
the no-change_pte run's storm and the 2012/2024 runs' one-exit-per-merge, in one picture.
matplotlib is optional (`pip install "hvsim[plot]"`).
"""

import numpy as np

from .errors import ConfigError
from .series import TimeSeries


def exits_per_ms(series: TimeSeries) -> tuple[np.ndarray, np.ndarray]:
    """Bucket the cumulative exit count into 1 ms bins of simulated time."""
    t = np.asarray(series.t_ms, dtype=float)
    n = np.asarray(series.ept_exits, dtype=float)
    if t.size == 0:
        return np.zeros(0), np.zeros(0)
    edges = np.arange(0.0, float(np.ceil(t[-1])) + 1.0)
    at_edges = np.interp(edges, np.concatenate(([0.0], t)), np.concatenate(([0.0], n)))
    return edges[1:], np.diff(at_edges)


def write_plot(path: str, runs: list[TimeSeries], title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError('--plot needs matplotlib, which is an optional extra: pip install "hvsim[plot]".') from None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    # Runs often coincide (2.6.32 with KSM off, 3.7 with 6.10): vary the style so none hides another.
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
    for n, series in enumerate(runs):
        x, y = exits_per_ms(series)
        style = styles[n % len(styles)]
        width = 2.4 - 0.3 * (n % 5)
        top.plot(x, y, label=series.label, linewidth=width, linestyle=style, drawstyle="steps-post")
        line = bottom.plot(series.t_ms, series.pages_sharing, label=f"{series.label} pages_sharing",
                           linewidth=width, linestyle=style)
        if len(runs) == 1:
            bottom.plot(series.t_ms, series.pages_shared, linestyle="--", color=line[0].get_color(),
                        label=f"{series.label} pages_shared")
    top.set_ylabel("EPT_VIOLATION exits / ms")
    top.set_title(title)
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_xlabel("simulated time (ms)")
    bottom.set_ylabel("KSM pages")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as exc:
        raise ConfigError(f"--plot {path!r}: cannot write the file: {exc.strerror}.") from None
    finally:
        plt.close(fig)
