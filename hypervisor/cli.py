"""The `hvsim` command line: parses options, runs a Simulation (or a comparison), renders the report."""

import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from . import __version__
from .compare import render_compare, run_compare
from .errors import ConfigError, ConsoleMismatch, GuestError, GuestTimeout, HvsimError, InvariantViolation
from .profiles import DEFAULT_PROFILE, PROFILES
from .report import render_run, to_json
from .sim import (
    DEFAULT_INSNS_PER_MS,
    DEFAULT_MAX_INSNS,
    DEFAULT_QUANTUM,
    GUEST_IMAGES,
    KsmConfig,
    RunResult,
    SimConfig,
    Simulation,
    parse_size,
)

DEMO_IMAGE = GUEST_IMAGES / "samepage.bin"
DEMO_VMS = 4
DEMO_CMDLINE = "pages=64 passes=40 spin=100000"

EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}

F = TypeVar("F", bound=Callable[..., Any])


def _workload_options(f: F) -> F:
    options = [
        click.argument("image", required=False, type=click.Path(dir_okay=False)),
        click.option("--memory", default="64M", show_default=True, help="Guest RAM per VM (e.g. 64M, 1G)."),
        click.option("--cmdline", default="", help="The guest's command line (see `hvsim images`)."),
        click.option("--vms", default=1, show_default=True, type=int, help="Number of VMs, one vCPU each."),
        click.option("--max-insns", default=DEFAULT_MAX_INSNS, show_default=True, type=int,
                     help="Per-VM instruction budget; a guest still running then is reported as runaway."),
        click.option("--quantum", default=DEFAULT_QUANTUM, show_default=True, type=int,
                     help="Instructions per vCPU time slice."),
        click.option("--insns-per-ms", default=DEFAULT_INSNS_PER_MS, show_default=True, type=int,
                     help="Simulated CPU speed: guest instructions per simulated millisecond."),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables."),
        click.option("--check", is_flag=True,
                     help="Verify the coherence invariants after every exit, notifier call and ksmd step."),
        click.option("--inject", multiple=True, metavar="POINT:EVENT[@N]",
                     help="Fire a host event at a named point of the fault path or ksmd (repeatable), "
                          "e.g. after_gfn_to_pfn:cow@1; see README, Correctness."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _ksm_options(f: F) -> F:
    options = [
        click.option("--ksm-pages-to-scan", "pages_to_scan", default=100, show_default=True, type=int,
                     help="/sys/kernel/mm/ksm/pages_to_scan: pages per ksmd wake-up."),
        click.option("--ksm-sleep-ms", "sleep_ms", default=20, show_default=True, type=int,
                     help="/sys/kernel/mm/ksm/sleep_millisecs (simulated); 0 runs ksmd between every two "
                          "guest time slices."),
        click.option("--ksm-use-zero-pages", "use_zero_pages", is_flag=True,
                     help="/sys/kernel/mm/ksm/use_zero_pages: merge all-zero pages with the zero page."),
        click.option("--ksm-max-page-sharing", "max_page_sharing", default=256, show_default=True, type=int,
                     help="/sys/kernel/mm/ksm/max_page_sharing: mappings per KSM page before a duplicate."),
        click.option("--ksm-run", "ksm_run", default=1, show_default=True, type=click.IntRange(0, 2),
                     help="/sys/kernel/mm/ksm/run at start: 0 stop, 1 run, 2 stop and unmerge all."),
        click.option("--ksm-run-at", "run_at", multiple=True, metavar="MS:VALUE",
                     help="Write VALUE to /sys/kernel/mm/ksm/run at simulated millisecond MS (repeatable)."),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


def _parse_run_at(values: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for v in values:
        try:
            ms, run = v.split(":")
            out.append((int(ms), int(run)))
        except ValueError:
            raise ConfigError(f"--ksm-run-at {v!r}: write MS:VALUE, e.g. 500:2.") from None
    return tuple(out)


def _config(image: str | None, memory: str, cmdline: str, vms: int, max_insns: int, quantum: int,
            insns_per_ms: int, ksm: KsmConfig, profile: str = DEFAULT_PROFILE, change_pte: bool = True,
            inject: tuple[str, ...] = ()) -> SimConfig:
    if image is None:
        raise ConfigError("no guest image given: name one, e.g. guest_images/hello.bin (see `hvsim images`).")
    return SimConfig(image=image, memory=parse_size(memory), cmdline=cmdline, vms=vms, max_insns=max_insns,
                     profile=profile, change_pte=change_pte, ksm=ksm, quantum=quantum, insns_per_ms=insns_per_ms,
                     inject=inject)


@contextmanager
def _interruptible(stop: Callable[[int], None]) -> Iterator[None]:
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


def _fail(err: HvsimError) -> None:
    click.echo(f"hvsim: {err}", err=True)
    sys.exit(err.exit_code)


def _run_exit_code(result: RunResult, signum: int | None) -> int:
    if signum is not None:
        return EXIT_INTERRUPTED.get(signal.Signals(signum), 130)
    if result.violation is not None:
        return InvariantViolation.exit_code
    if any(v.error and "--max-insns" in v.error for v in result.vms):
        return GuestTimeout.exit_code
    if result.errors:
        return GuestError.exit_code
    return 0


def _guarded(fn: Callable[[], int]) -> None:
    """Every failure is a one-paragraph message and an exit code, never a traceback."""
    try:
        code = fn()
    except HvsimError as err:
        _fail(err)
    except click.exceptions.Exit:
        raise
    except Exception as exc:  # a bug in hvsim: still no traceback unless asked for
        if os.environ.get("HVSIM_DEBUG"):
            traceback.print_exc()
        click.echo(f"hvsim: internal error: {type(exc).__name__}: {exc}. This is a bug in hvsim; "
                   "rerun with HVSIM_DEBUG=1 for the traceback and report it.", err=True)
        sys.exit(70)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hvsim")
def main() -> None:
    """hvsim: a simulator of Linux/KVM memory virtualization (TDP MMU, mmu_notifier, KSM).

    \b
    Examples:
      hvsim run                                  # the change_pte demo (a short `compare`)
      hvsim run guest_images/hello.bin
      hvsim run guest_images/samepage.bin --vms 4 --ksm --profile 2.6.32
      hvsim compare guest_images/samepage.bin --vms 4
    """


@main.command()
@_workload_options
@click.option("--profile", type=click.Choice(list(PROFILES)), default=DEFAULT_PROFILE, show_default=True,
              help="Kernel era whose host mm, mmu_notifier and KVM semantics to model.")
@click.option("--no-change-pte", is_flag=True,
              help="KVM registers its notifier without ->change_pte (it gets ->invalidate_page instead).")
@click.option("--ksm", "ksm_on", is_flag=True, help="Mark guest RAM MADV_MERGEABLE and run ksmd.")
@_ksm_options
def run(image: str | None, memory: str, cmdline: str, vms: int, max_insns: int, quantum: int,
        insns_per_ms: int, as_json: bool, check: bool, inject: tuple[str, ...], profile: str,
        no_change_pte: bool, ksm_on: bool, pages_to_scan: int,
        sleep_ms: int, use_zero_pages: bool, max_page_sharing: int, ksm_run: int, run_at: tuple[str, ...]) -> None:
    """Run IMAGE in N VMs and report exits, MMU stats and (with --ksm) KSM counters.

    Without IMAGE, runs the bundled demo: `hvsim compare` of the samepage guest in 4 VMs.

    \b
    Examples:
      hvsim run guest_images/hello.bin
      hvsim run guest_images/memtouch.bin --memory 64M --cmdline "pages=4096 passes=3" --json
      hvsim run guest_images/samepage.bin --vms 4 --ksm --profile 2.6.32 --no-change-pte
    """

    def go() -> int:
        if image is None:
            return _compare(str(DEMO_IMAGE), memory, DEMO_CMDLINE, DEMO_VMS, max_insns, quantum, insns_per_ms,
                            as_json, KsmConfig(enabled=True, pages_to_scan=pages_to_scan, sleep_millisecs=sleep_ms,
                                               max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages),
                            check, inject)
        ksm = KsmConfig(enabled=ksm_on, run=ksm_run, pages_to_scan=pages_to_scan, sleep_millisecs=sleep_ms,
                        max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages,
                        run_at=_parse_run_at(run_at))
        cfg = _config(image, memory, cmdline, vms, max_insns, quantum, insns_per_ms, ksm, profile,
                      not no_change_pte, inject)
        sim = Simulation(cfg, check=check)
        got: list[int] = []

        def stop(signum: int) -> None:
            got.append(signum)
            sim.interrupted = True

        with _interruptible(stop):
            result = sim.run()
        click.echo(to_json(result.as_dict()) if as_json else render_run(result), nl=False)
        for line in result.errors:
            click.echo(f"hvsim: {line}", err=True)
        if got:
            click.echo("hvsim: interrupted; the report above is what the run had reached.", err=True)
        return _run_exit_code(result, got[0] if got else None)

    _guarded(go)


def _compare(image: str, memory: str, cmdline: str, vms: int, max_insns: int, quantum: int, insns_per_ms: int,
             as_json: bool, ksm: KsmConfig, check: bool = False, inject: tuple[str, ...] = ()) -> int:
    cfg = _config(image, memory, cmdline, vms, max_insns, quantum, insns_per_ms, ksm, inject=inject)
    result = run_compare(cfg, check=check)
    click.echo(to_json(result.as_dict()) if as_json else render_compare(result), nl=False)
    errors = [e for row in result.rows for e in row.result.errors]
    for e in errors:
        click.echo(f"hvsim: {e}", err=True)
    mismatches = result.console_mismatches()
    if mismatches:
        click.echo("hvsim: " + "; ".join(mismatches) + ". The guest's own computation must not depend on "
                   "the kernel era: this is a bug in hvsim.", err=True)
        return ConsoleMismatch.exit_code
    return GuestError.exit_code if errors else 0


@main.command()
@_workload_options
@_ksm_options
def compare(image: str | None, memory: str, cmdline: str, vms: int, max_insns: int, quantum: int,
            insns_per_ms: int, as_json: bool, check: bool, inject: tuple[str, ...], pages_to_scan: int,
            sleep_ms: int, use_zero_pages: bool,
            max_page_sharing: int, ksm_run: int, run_at: tuple[str, ...]) -> None:
    """Run IMAGE under KSM off, 2.6.32 with and without change_pte, 3.7 and 6.10, and tabulate.

    \b
    Example:
      hvsim compare guest_images/samepage.bin --vms 4 --cmdline "pages=64 passes=40 spin=100000"
    """

    def go() -> int:
        ksm = KsmConfig(enabled=True, run=ksm_run, pages_to_scan=pages_to_scan, sleep_millisecs=sleep_ms,
                        max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages,
                        run_at=_parse_run_at(run_at))
        return _compare(image or str(DEMO_IMAGE), memory, cmdline if image else (cmdline or DEMO_CMDLINE),
                        vms, max_insns, quantum, insns_per_ms, as_json, ksm, check, inject)

    _guarded(go)


@main.command()
@_workload_options
@click.option("--profile", type=click.Choice(list(PROFILES)), default=DEFAULT_PROFILE, show_default=True,
              help="Kernel era to model.")
@_ksm_options
def ksm(image: str | None, memory: str, cmdline: str, vms: int, max_insns: int, quantum: int,
        insns_per_ms: int, as_json: bool, check: bool, inject: tuple[str, ...], profile: str,
        pages_to_scan: int, sleep_ms: int, use_zero_pages: bool,
        max_page_sharing: int, ksm_run: int, run_at: tuple[str, ...]) -> None:
    """Run IMAGE with KSM on and show /sys/kernel/mm/ksm as the run left it.

    The knobs are named after the files in /sys/kernel/mm/ksm/ (run, pages_to_scan,
    sleep_millisecs, max_page_sharing, use_zero_pages).

    \b
    Example:
      hvsim ksm guest_images/samepage.bin --cmdline "pages=10 passes=20" --ksm-sleep-ms 0
    """

    def go() -> int:
        kcfg = KsmConfig(enabled=True, run=ksm_run, pages_to_scan=pages_to_scan, sleep_millisecs=sleep_ms,
                         max_page_sharing=max_page_sharing, use_zero_pages=use_zero_pages,
                         run_at=_parse_run_at(run_at))
        cfg = _config(image, memory, cmdline, vms, max_insns, quantum, insns_per_ms, kcfg, profile, inject=inject)
        result = Simulation(cfg, check=check).run()
        if as_json:
            click.echo(to_json({"ksm": result.ksm, "vmstat": result.vmstat, "config": cfg.as_dict()}), nl=False)
        else:
            from .report import ksm_lines

            click.echo("\n".join(ksm_lines(result.ksm or {}, result.vmstat)))
        for line in result.errors:
            click.echo(f"hvsim: {line}", err=True)
        return _run_exit_code(result, None)

    _guarded(go)
