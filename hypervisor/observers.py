"""What watches a run from outside: the trace file, the plot's time series, the progress line, signals.

None of it changes what the simulation does; the progress line alone reads the wall clock, only
to throttle its own redrawing.
"""

import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from .errors import OutputWriteError
from .events import NULL_TRACER, Tracer
from .plot import write_plot
from .series import TimeSeries
from .sim import Simulation
from .trace import TraceWriter

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Progress:
    """A one-line progress display on stderr: a spinner and the real work done so far.

    hvsim cannot know how long a guest will run (the --max-insns budget is a cap, not an
    estimate), so it shows no bar: simulated time, instructions, exits, how many VMs have
    finished and, for several runs (`compare`), which run this is.
    """

    SPINNER = "|/-\\"

    def __init__(self, enabled: bool, runs: int | None = None, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.runs = runs
        self.stream = stream if stream is not None else sys.stderr
        self.label = ""
        self.run_no = 0
        self._last = 0.0
        self._turn = 0

    def observe(self, label: str, sim: Simulation) -> None:
        if self.enabled:
            self.label = label
            self.run_no += 1
            sim.on_display.append(self._update)

    def line(self, sim: Simulation) -> str:
        self._turn += 1
        exits = sum(v.stats.exits for vm in sim.vms for v in vm.vcpus)
        done = len(sim.vms) - len({sim.vm_of[i] for i in sim.runnable()})
        which = f"run {self.run_no}/{self.runs} " if self.runs else ""
        prefix = f"{which}{self.label}: " if self.label else which
        spin = self.SPINNER[self._turn % len(self.SPINNER)]
        return (f"{prefix}{spin} sim {sim.now / sim.config.insns_per_ms:,.1f} ms"
                f"  {sim.now:,} insns  {exits:,} exits  {done}/{len(sim.vms)} VMs finished ")

    def _update(self, sim: Simulation) -> None:
        wall = time.monotonic()  # the display is throttled on wall time; the simulation never reads it
        if wall - self._last < 0.2:
            return
        self._last = wall
        self.stream.write("\r" + self.line(sim) + "\033[K")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\r\033[K")
            self.stream.flush()


class Observers:
    """The optional watchers of a run: trace file, plot series, progress line, signals.

    `finish` writes the files; what went wrong writing them is collected in `write_errors`
    (and what the user should know in `warnings`), so that the report is printed regardless.
    """

    def __init__(self, trace_path: str | None, trace_events: str | None, plot_path: str | None,
                 progress: bool, runs: int | None = None) -> None:
        self.trace = TraceWriter(trace_path, trace_events) if trace_path else None
        self.plot_path = plot_path
        self.series: list[TimeSeries] = []
        self.progress = Progress(progress and sys.stderr.isatty(), runs)
        self.signals: list[int] = []
        self.sims: list[Simulation] = []
        self.warnings: list[str] = []
        self.write_errors: list[str] = []

    @property
    def tracer(self) -> Tracer:
        return self.trace if self.trace is not None else NULL_TRACER

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
            if self.trace.error is not None:
                self.write_errors.append(self.trace.error + ".")
            elif self.trace.globs is not None and self.trace.written == 0 and self.sims:
                self.warnings.append(f"--trace-events matched no event of this run: {self.trace.path!r} "
                                     "holds none.")
        if self.plot_path and self.series:
            try:
                self.warnings += write_plot(self.plot_path, self.series, title)
            except OutputWriteError as err:
                self.write_errors.append(str(err))


@contextmanager
def signals_handled_by(handler: Callable[[int, object], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler(signum, frame)` inside the block; the previous handlers after it."""
    previous = {s: signal.getsignal(s) for s in EXIT_INTERRUPTED}
    for s in EXIT_INTERRUPTED:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def interruptible(stop: Callable[[int], None]) -> Iterator[None]:
    """SIGINT/SIGTERM ask the simulation to stop after the current time slice."""

    def handler(signum: int, _frame: object) -> None:
        stop(signum)

    with signals_handled_by(handler):
        yield
