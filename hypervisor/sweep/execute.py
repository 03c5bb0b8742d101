"""Running a sweep's missing points: a local process pool, or tasks on an existing Dask cluster.

Each point is one deterministic `Simulation`; the workers return its JSON report as text and
only this process writes files, so a Dask cluster's workers need hvsim installed (and the guest
images at the same paths) but no shared results directory.  A report is written to a temporary
name and renamed into place, so a killed sweep leaves whole reports and loses at most the
points in flight; re-running it skips every point whose report exists.
"""

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..errors import ConfigError, HvsimError
from ..observers import signals_handled_by
from ..report import to_json
from ..sim import SimConfig, Simulation
from .spec import Point, SweepSpec

REPORTS = "runs"
SCHEDULER_TIMEOUT = "10s"  # how long to keep trying to reach --scheduler


@dataclass(frozen=True)
class Outcome:
    """What a worker sends back: the report's text, or why the run could not be done."""

    report: str | None
    error: str | None = None
    exit_code: int = 0


def run_point(config: SimConfig, check: bool) -> Outcome:
    """One point, in a worker: the run's JSON report exactly as `hvsim run --json` prints it."""
    try:
        with Simulation(config, check=check) as sim:  # a worker runs many points: free each one
            result = sim.run()
    except HvsimError as err:
        return Outcome(None, str(err), err.exit_code)
    return Outcome(to_json(result.as_dict()))


class ReportStore:
    """RESULTS_DIR/runs/<point key>.json: one file per finished point."""

    def __init__(self, results: Path) -> None:
        self.dir = results / REPORTS
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the results directory {str(self.dir)!r}: {err.strerror}.") from None

    def path(self, point: Point) -> Path:
        return self.dir / f"{point.key}.json"

    def has(self, point: Point) -> bool:
        return self.path(point).is_file()

    def write(self, point: Point, text: str) -> None:
        final = self.path(point)
        partial = final.with_suffix(f".json.{os.getpid()}.partial")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, final)  # atomic: a reader never sees half a report


@dataclass
class SweepRun:
    """What one invocation did: points run now, points already done, failures, interruption."""

    ran: int = 0
    reused: int = 0
    failures: list[tuple[Point, Outcome]] = field(default_factory=list)
    signal: int | None = None


def _ignore_sigint() -> None:
    # Workers leave Ctrl-C to the parent, which lets points in flight finish and cancels the rest.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _stoppable(cancel: Callable[[], None], state: SweepRun) -> Iterator[None]:
    def handler(signum: int, _frame: object) -> None:
        if state.signal is not None:  # a second Ctrl-C: stop waiting for the points in flight
            raise KeyboardInterrupt
        state.signal = signum
        sys.stderr.write("\nhvsim: stopping: finishing the points in flight (Ctrl-C again to abandon them)\n")
        cancel()

    with signals_handled_by(handler):
        yield


def _local(todo: list[Point], jobs: int, done: Callable[[Point, Outcome], None], state: SweepRun) -> None:
    # forkserver, not fork: the calling process may have threads (a test's Dask client, say), and a
    # fork copies none of them but all their locks; the server imports hvsim once for every worker.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_ignore_sigint) as pool:
        futures: dict[Future[Outcome], Point] = {pool.submit(run_point, p.run.config, p.run.check): p
                                                 for p in todo}

        def cancel() -> None:
            for f in futures:
                f.cancel()

        with _stoppable(cancel, state):
            for future in as_completed(futures):
                if not future.cancelled():
                    done(futures[future], future.result())


def _dask(todo: list[Point], address: str, done: Callable[[Point, Outcome], None], state: SweepRun) -> None:
    try:
        from dask.distributed import Client
        from dask.distributed import as_completed as dask_completed
    except ImportError:
        raise ConfigError('--scheduler needs Dask distributed, an optional extra: pip install "hvsim[cluster]".') \
            from None
    try:
        client = Client(address, timeout=SCHEDULER_TIMEOUT)
    except (OSError, TimeoutError, ValueError) as err:
        raise ConfigError(f"--scheduler {address}: cannot reach a Dask scheduler there ({err}). Start one "
                          "(`dask scheduler`, then `dask worker ADDRESS`) or give its tcp://HOST:PORT.") from None
    try:
        # The point's key names its task: the same point is the same task on every cluster.
        futures: dict[Any, Point] = {client.submit(run_point, p.run.config, p.run.check, key=f"hvsim-{p.key}",
                                                   pure=False): p for p in todo}

        def cancel() -> None:
            client.cancel([f for f in futures if not f.done()])

        with _stoppable(cancel, state):
            for future in dask_completed(list(futures)):
                if not future.cancelled():
                    done(futures[future], future.result())
    finally:
        client.close()


def run_sweep(spec: SweepSpec, results: Path, jobs: int, scheduler: str | None, progress: bool) -> SweepRun:
    store = ReportStore(results)
    state = SweepRun()
    todo = [p for p in spec.points if not store.has(p)]
    state.reused = len(spec.points) - len(todo)
    if not todo:
        return state
    where = f"on {scheduler}" if scheduler else f"with {jobs} local worker(s)"
    label = f"{spec.path.name}: {len(todo)} of {len(spec.points)} point(s) {where}"
    with click.progressbar(length=len(todo), label=label, file=sys.stderr, show_pos=True,
                           hidden=not (progress and sys.stderr.isatty())) as bar:

        def done(point: Point, outcome: Outcome) -> None:
            if outcome.report is None:
                state.failures.append((point, outcome))
            else:
                store.write(point, outcome.report)
                state.ran += 1
            bar.update(1)

        if scheduler:
            _dask(todo, scheduler, done, state)
        else:
            _local(todo, jobs, done, state)
    return state
