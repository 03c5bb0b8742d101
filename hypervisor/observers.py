"""What watches a run from outside: the trace file, the plot's time series, the progress line, signals.

None of it changes what the simulation does; the progress line alone reads the wall clock, only
to throttle its own redrawing.
"""

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .plot import write_plot
from .series import TimeSeries
from .sim import Simulation
from .trace import TraceWriter

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Progress:
    """A one-line progress bar on stderr: simulated time, instructions against the budget, exits."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.label = ""
        self._last = 0.0

    def observe(self, label: str, sim: Simulation) -> None:
        if self.enabled:
            self.label = label
            sim.on_slice.append(self._update)

    def _update(self, sim: Simulation) -> None:
        wall = time.monotonic()  # the display is throttled on wall time; the simulation never reads it
        if wall - self._last < 0.2:
            return
        self._last = wall
        budget = sim.config.max_insns * len(sim.vms)
        exits = sum(vm.vcpus[0].stats.exits for vm in sim.vms)
        done = min(1.0, sim.now / budget)
        bar = "#" * int(20 * done)
        prefix = f"{self.label}: " if self.label else ""
        sys.stderr.write(f"\r{prefix}[{bar:<20}] sim {sim.now / sim.config.insns_per_ms:10.1f} ms  "
                         f"{sim.now:>13,} insns  {exits:>9,} exits ")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


class Observers:
    """The optional watchers of a run: trace file, plot series, progress bar, signals."""

    def __init__(self, trace_path: str | None, trace_events: str | None, plot_path: str | None,
                 progress: bool) -> None:
        self.trace = TraceWriter(trace_path, trace_events) if trace_path else None
        self.plot_path = plot_path
        self.series: list[TimeSeries] = []
        self.progress = Progress(progress and sys.stderr.isatty())
        self.signals: list[int] = []
        self.sims: list[Simulation] = []

    @property
    def trace_fn(self) -> Callable[[str, dict[str, Any]], None] | None:
        return self.trace.event if self.trace is not None else None

    def observe(self, label: str, sim: Simulation) -> None:
        self.sims.append(sim)
        if self.trace is not None:
            self.trace.bind(sim, label)
        if self.plot_path:
            self.series.append(TimeSeries.attach(sim, label or sim.config.image))
        self.progress.observe(label, sim)
        if self.signals:
            sim.interrupted = True

    def stop(self, signum: int) -> None:
        self.signals.append(signum)
        for sim in self.sims:
            sim.interrupted = True

    def finish(self, title: str) -> None:
        self.progress.finish()
        if self.trace is not None:
            self.trace.close()
        if self.plot_path:
            write_plot(self.plot_path, self.series, title)


@contextmanager
def interruptible(stop: Callable[[int], None]) -> Iterator[None]:
    """SIGINT/SIGTERM ask the simulation to stop after the current time slice."""
    previous = {s: signal.getsignal(s) for s in EXIT_INTERRUPTED}

    def handler(signum: int, _frame: object) -> None:
        stop(signum)

    for s in EXIT_INTERRUPTED:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
