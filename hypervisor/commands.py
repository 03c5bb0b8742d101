"""What `hvsim run`, `compare`, `ksm` and `history` do once cli.py has parsed their options.

The Options record the three commands share, the run itself (observers, --console
files, Ctrl-C), the report on stdout, the error lines on stderr and the exit code.
cli.py parses and calls these; nothing here reads the command line.
"""

import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import click

from .compare import COMPARE_RUNS, CompareResult, CompareRun, parse_kernels, render_compare, run_compare
from .config import KsmKnobs
from .costs import CostModel
from .errors import ConfigError, ConsoleMismatch, InvariantViolation
from .history import history_kernels, history_runs, render_history, write_history_plot
from .messages import after_run, emit, warn
from .observers import EXIT_INTERRUPTED, Observers, interruptible
from .options import check_outputs, cmdline_warnings, given, resolve_image, trace_warnings
from .profiles import DEFAULT_PROFILE
from .report import ksm_lines, ksm_scan_note, render_perf_kvm_stat, to_json
from .sim import GUEST_IMAGES, KsmConfig, RunResult, SimConfig, Simulation, validate
from .sizes import parse_size
from .vmm.console import console_paths

DEMO_IMAGE = GUEST_IMAGES / "samepage.bin"
DEMO_VMS = 4
DEMO_CMDLINE = "pages=64 passes=40 spin=100000"


@dataclass
class Options:
    """Everything the three commands share, parsed once."""

    image: str | None
    memory: str
    cmdline: str
    vms: int
    max_insns: int
    quantum: int
    insns_per_ms: int
    as_json: bool
    check: bool
    inject: tuple[str, ...]
    trace_path: str | None
    trace_events: str | None
    plot_path: str | None
    quiet: bool
    vcpus: int = 1
    mmu: str = "tdp"
    mmu_pages: int | None = None
    oos_shadow: int | None = None
    # The KSM knobs as click parsed them, by KsmKnobs field name (cli.py makes one option per field).
    ksm_values: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "Options":
        """A command's click parameters -> Options: its own fields, and every KsmKnobs knob given."""
        knobs = {f.name for f in KsmKnobs.knobs()}
        own = {f.name for f in fields(cls)} - {"ksm_values"}
        return cls(**{k: v for k, v in params.items() if k in own},
                   ksm_values={k: v for k, v in params.items() if k in knobs})

    def ksm(self, enabled: bool) -> KsmConfig:
        return KsmKnobs.from_options(enabled, self.ksm_values)

    def config(self, ksm: KsmConfig, profile: str = DEFAULT_PROFILE, change_pte: bool = True) -> SimConfig:
        if self.image is None:
            raise ConfigError("no guest image given: name one, e.g. `hello` or a file (see `hvsim images`).")
        cfg = SimConfig(image=self.image, memory=parse_size(self.memory), cmdline=self.cmdline, vms=self.vms,
                         vcpus=self.vcpus, max_insns=self.max_insns, profile=profile, change_pte=change_pte, ksm=ksm,
                         quantum=self.quantum, insns_per_ms=self.insns_per_ms, inject=self.inject,
                         mmu=self.mmu, mmu_pages=self.mmu_pages,
                         oos_shadow=None if self.oos_shadow is None else bool(self.oos_shadow))
        validate(cfg)
        for line in trace_warnings(self.trace_path, self.trace_events) + cmdline_warnings(cfg.image, cfg.cmdline):
            warn(line)
        return cfg

    def prepare(self, ctx: click.Context) -> None:
        """Before anything runs: IMAGE by name or path, and every output file."""
        if self.image is not None:
            self.image = resolve_image(self.image)
        check_outputs(ctx, [self.image] if self.image else [])


def run_exit_code(result: RunResult, signals: list[int]) -> int:
    if signals:
        return EXIT_INTERRUPTED.get(signal.Signals(signals[0]), 130)
    if result.violation is not None:
        return InvariantViolation.exit_code
    kinds = [v.error_kind for v in result.vms if v.error_kind is not None]
    return max(kind.exit_code for kind in kinds) if kinds else 0


def _open_consoles(path: str | None, vms: int) -> list[BinaryIO]:
    """--console: open every VM's console file before the run (the path was checked with the other outputs)."""
    files: list[BinaryIO] = []
    for name in console_paths(path, vms) if path else []:
        try:
            files.append(open(name, "wb"))  # noqa: SIM115 (closed by _close_consoles)
        except OSError as err:
            for f in files:
                f.close()
            raise ConfigError(f"--console {name!r}: cannot write it ({err.strerror}); give a writable file.") from None
    return files


def _close_consoles(path: str | None, files: list[BinaryIO], sim: Simulation, obs: Observers) -> None:
    """Close the console files; a write error of the run or of the close is an output error (exit 74)."""
    error = next((d.console.stream_error for d in sim.devices if d.console.stream_error), None)
    for f in files:
        try:
            f.close()
        except OSError as err:
            error = error or err
    if error is not None:
        obs.write_errors.append(f"--console {path}: writing the console failed ({error.strerror or error}); "
                                "the file is incomplete, the report is not.")


def guest_exit_status(result: RunResult) -> int | None:
    """--exit-with-guest-status: the first non-zero exit-port status in VM order, else 0; None if a VM
    did not end through the exit port or HLT (then hvsim's own exit code stands)."""
    if any(v.state not in ("exited", "halted") or v.exit_status is None for v in result.vms):
        return None
    return next((v.exit_status for v in result.vms if v.exit_status), 0)


def run_one(opts: Options, cfg: SimConfig, render: Callable[[RunResult], str],
            render_json: Callable[[RunResult], str] | None = None, console_path: str | None = None,
            with_guest_status: bool = False) -> int:
    obs = Observers(opts.trace_path, opts.trace_events, opts.plot_path, not opts.quiet and not opts.as_json)
    sim = Simulation(cfg, tracer=obs.tracer, check=opts.check)
    consoles = _open_consoles(console_path, cfg.vms)
    for devices, stream in zip(sim.devices, consoles, strict=False):
        devices.console.stream = stream
    obs.observe("", sim)
    try:
        with interruptible(obs.stop):
            result = sim.run()
    finally:
        _close_consoles(console_path, consoles, sim, obs)
    obs.finish(f"{Path(cfg.image).name}: {cfg.vms} VM(s), profile {result.profile.name}"
               f"{', KSM on' if cfg.ksm.enabled else ''}")
    emit(render_json(result) if opts.as_json and render_json else
         to_json(result.as_dict()) if opts.as_json else render(result))
    for line in result.errors:
        click.echo(f"hvsim: {line}", err=True)
    if obs.signals:
        click.echo("hvsim: interrupted; the report above is what the run had reached.", err=True)
    code = after_run(obs, [result], run_exit_code(result, obs.signals))
    status = guest_exit_status(result) if with_guest_status and code == 0 else None
    return code if status is None else status


def compare(opts: Options, cfg: SimConfig, runs: tuple[CompareRun, ...] = COMPARE_RUNS,
            render: Callable[[CompareResult], str] = render_compare,
            plot: Callable[[str, CompareResult], None] | None = None) -> int:
    """Run `runs` and print them (`plot`, if given, draws --plot instead of the time series)."""
    series_plot = opts.plot_path if plot is None else None
    obs = Observers(opts.trace_path, opts.trace_events, series_plot, not opts.quiet and not opts.as_json, len(runs))
    with interruptible(obs.stop):
        result = run_compare(cfg, check=opts.check, tracer=obs.tracer, observe=obs.observe, runs=runs)
    obs.finish(f"{Path(cfg.image).name}: {cfg.vms} VM(s), EPT_VIOLATION exits and KSM sharing per kernel")
    if plot is not None and opts.plot_path:
        plot(opts.plot_path, result)
    emit(to_json(result.as_dict()) if opts.as_json else render(result))
    results = [row.result for row in result.rows]
    errors = [e for r in results for e in r.errors]
    for e in errors:
        click.echo(f"hvsim: {e}", err=True)
    code = max((run_exit_code(r, []) for r in results), default=0)
    if obs.signals:
        click.echo("hvsim: interrupted; the table above is what the runs had reached.", err=True)
        code = EXIT_INTERRUPTED.get(signal.Signals(obs.signals[0]), 130)
    elif result.console_mismatches():
        click.echo("hvsim: " + "; ".join(result.console_mismatches()) + ". The guest's own computation must "
                   "not depend on the kernel: this is a bug in hvsim.", err=True)
        code = ConsoleMismatch.exit_code
    return after_run(obs, results, code)


def demo(ctx: click.Context, opts: Options, runs: tuple[CompareRun, ...] = COMPARE_RUNS) -> int:
    """`hvsim run` or `hvsim compare` without IMAGE: compare the samepage guest; given options are honoured."""
    _demo_workload(ctx, opts)
    opts.prepare(ctx)
    return compare(opts, opts.config(opts.ksm(True), runs[1].profile), runs)


def _demo_workload(ctx: click.Context, opts: Options) -> None:
    opts.image = str(DEMO_IMAGE)
    if not given(ctx, "cmdline"):
        opts.cmdline = DEMO_CMDLINE
    if not given(ctx, "vms"):
        opts.vms = DEMO_VMS


def compare_kernels(ctx: click.Context, opts: Options, kernels: str) -> int:
    """`hvsim compare`: KSM off, then each kernel of --kernels (the demo without IMAGE)."""
    runs = parse_kernels(kernels.split(","))
    if opts.image is None:
        return demo(ctx, opts, runs)
    opts.prepare(ctx)
    return compare(opts, opts.config(opts.ksm(True), runs[1].profile), runs)


def history(ctx: click.Context, opts: Options) -> int:
    """`hvsim history`: every release where a modelled behaviour changes, with and without change_pte."""
    runs = history_runs(history_kernels())
    if opts.image is None:
        _demo_workload(ctx, opts)
    opts.prepare(ctx)
    return compare(opts, opts.config(opts.ksm(True), runs[0].profile), runs, render_history, write_history_plot)


def perf_kvm_stat_render(exit_cost: tuple[str, ...], cpu_mhz: int) -> Callable[[RunResult], str]:
    """`run --perf-kvm-stat`'s report, timed by the cost model with the --exit-cost overrides."""
    if cpu_mhz <= 0:
        raise ConfigError("--cpu-mhz must be positive.")
    model = CostModel(cpu_mhz=cpu_mhz)
    model.override(exit_cost)
    return lambda result: render_perf_kvm_stat(result, model)


def ksm_run(opts: Options, cfg: SimConfig) -> int:
    """`hvsim ksm`: one run with KSM on, reported as /sys/kernel/mm/ksm (and /proc/vmstat) show it."""

    def render(result: RunResult) -> str:
        sim_ms = result.sim_insns / cfg.insns_per_ms
        lines = ksm_lines(result.ksm or {}, result.vmstat) + ksm_scan_note(result.ksm or {}, sim_ms)
        return "\n".join(lines) + "\n"

    def render_json(result: RunResult) -> str:
        return to_json({"ksm": result.ksm, "vmstat": result.vmstat, "config": cfg.as_dict(),
                        "ksmd_completed_full_scan": result.ksmd_completed_full_scan})

    return run_one(opts, cfg, render, render_json)


__all__ = ["DEMO_IMAGE", "Options", "compare", "compare_kernels", "demo", "guest_exit_status", "history", "ksm_run",
           "perf_kvm_stat_render", "run_exit_code", "run_one"]
