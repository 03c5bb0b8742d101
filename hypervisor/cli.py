"""The `hvsim` command line: parses options, runs a Simulation (or a comparison), renders the report."""

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__, commands
from .cli_options import kernel_options, ksm_options, workload_options
from .compare import (
    DEFAULT_KERNELS,
)
from .config import KsmKnobs
from .costs import DEFAULT_CYCLES
from .errors import ConfigError, HvsimError
from .guest.catalog import render_catalog
from .kernels import kernels_as_dict, render_kernels
from .kvm.exits import ExitReason
from .messages import HvsimGroup, guarded
from .options import (
    OutputFile,
    check_outputs,
    kernel_of,
    refuse_given,
)
from .report import render_run, to_json
from .sim import (
    GUEST_IMAGES,
    SimConfig,
)
from .sweep.options import parse_settings

if TYPE_CHECKING:
    from .sweep.spec import RunPoint
# What only `sweep`, `diff` and `build-guest` use is imported by those commands (tomllib, the diff, the
# guest toolchain): `hvsim run` starts without them.

# `hvsim run` without IMAGE is `hvsim compare` of the demo: these options of `run` have no meaning there.
RUN_ONLY_PARAMS = ("kernel", "profile", "no_change_pte", "ksm_on", "perf_kvm_stat", "exit_cost", "cpu_mhz",
                   "console_path", "exit_with_guest_status")
# The KSM knobs (parameter names = KsmKnobs field names), refused alike by `run` without --ksm.
KSM_PARAMS = tuple(f.name for f in KsmKnobs.knobs())

def _run_config(ctx: click.Context, opts: commands.Options, kernel: str, no_change_pte: bool,
                ksm_on: bool) -> SimConfig:
    """`hvsim run`'s options -> the SimConfig it runs; `hvsim sweep` builds every point through here too."""
    if not ksm_on:
        refuse_given(ctx, KSM_PARAMS, "given without --ksm: add --ksm to turn KSM on.")
    opts.prepare(ctx)
    return opts.config(opts.ksm(ksm_on), kernel, not no_change_pte)


@click.group(cls=HvsimGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hvsim")
def main() -> None:
    """hvsim: a simulator of Linux/KVM memory virtualization (TDP MMU, mmu_notifier, KSM).

    \b
    Examples:
      hvsim run                                  # the change_pte demo (a short `compare`)
      hvsim run hello                            # a bundled guest by name (`hvsim images`)
      hvsim run samepage --vms 4 --ksm --kernel 2.6.38
      hvsim compare samepage --vms 4
      hvsim kernels                              # what each kernel version means
      hvsim images
      hvsim sweep examples/change_pte.toml --plot   # a grid of runs -> results.parquet/.csv
      hvsim diff a.json b.json                      # two `run --json` reports side by side

    Shell completion (click): eval "$(_HVSIM_COMPLETE=bash_source hvsim)"
    """


@main.command()
@workload_options
@kernel_options
@click.option("--no-change-pte", is_flag=True,
              help="KVM registers its notifier without ->change_pte (up to 3.6 it then gets ->invalidate_page).")
@click.option("--ksm", "ksm_on", is_flag=True,
              help="Mark guest RAM MADV_MERGEABLE and run ksmd; the --ksm-* knobs need it.")
@ksm_options
@click.option("--perf-kvm-stat", is_flag=True,
              help="Print exits in `perf kvm stat report`'s layout, timed by a documented cost model.")
@click.option("--exit-cost", multiple=True, metavar="NAME=CYCLES",
              help="With --perf-kvm-stat: override a cost-model entry (repeatable), e.g. EPT_VIOLATION.cow=8000. "
                   f"NAME (default cycles): {', '.join(f'{k} ({v})' for k, v in DEFAULT_CYCLES.items())}, "
                   "or an exit reason, for extra cycles on every exit of it (default 0): "
                   f"{', '.join(r.name for r in ExitReason)}.")
@click.option("--cpu-mhz", default=2000, show_default=True, type=int,
              help="With --perf-kvm-stat: the clock of the cost model.")
@click.option("--console", "console_path", metavar="FILE", type=OutputFile(),
              help="Also write each VM's whole console to FILE (several VMs: FILE.vm0, FILE.vm1, ...); the "
                   "report keeps its first and last 64 KiB.")
@click.option("--exit-with-guest-status", is_flag=True,
              help="Exit with the status the guest wrote to the exit port (several VMs: the first non-zero one), "
                   "as QEMU's isa-debug-exit users expect; hvsim's own error codes still win.")
def run(kernel: str | None, profile: str | None, no_change_pte: bool, ksm_on: bool, perf_kvm_stat: bool,
        exit_cost: tuple[str, ...], cpu_mhz: int, console_path: str | None, exit_with_guest_status: bool,
        **kw: Any) -> None:
    """Run IMAGE in N VMs and report exits, MMU stats and (with --ksm) KSM counters.

    Without IMAGE, runs the bundled demo: `hvsim compare` of the samepage guest in 4 VMs.

    \b
    Examples:
      hvsim run hello
      hvsim run memtouch --memory 64M --cmdline "pages=4096 passes=3" --json
      hvsim run samepage --vms 4 --ksm --kernel 2.6.38 --no-change-pte
      hvsim run samepage --vms 4 --ksm --perf-kvm-stat --trace run.json
    """
    ctx = click.get_current_context()
    opts = commands.Options.from_params(kw)

    def go() -> int:
        if opts.image is None:
            refuse_given(ctx, RUN_ONLY_PARAMS, "cannot be given without IMAGE: `hvsim run` alone runs the demo, a "
                         "`compare` of every era; name an image for one run, e.g. `hvsim run samepage --ksm`.")
            return commands.demo(ctx, opts)
        if not perf_kvm_stat:
            refuse_given(ctx, ("exit_cost", "cpu_mhz"),
                         "given without --perf-kvm-stat, whose times they set: add --perf-kvm-stat.")
        elif opts.as_json:
            raise ConfigError("--perf-kvm-stat and --json are two report formats: give one of them.")
        cfg = _run_config(ctx, opts, kernel_of(kernel, profile), no_change_pte, ksm_on)
        render = commands.perf_kvm_stat_render(exit_cost, cpu_mhz) if perf_kvm_stat else render_run
        return commands.run_one(opts, cfg, render, console_path=console_path, with_guest_status=exit_with_guest_status)

    guarded(go)


@main.command()
@workload_options
@click.option("--kernels", "kernels", metavar="LIST", default=",".join(DEFAULT_KERNELS), show_default=True,
              help="Comma-separated kernels to run after KSM off; VERSION-no-change-pte is VERSION with KVM's "
                   "notifier lacking ->change_pte.")
@ksm_options
def compare(kernels: str, **kw: Any) -> None:
    """Run IMAGE with KSM off and under each kernel of --kernels, tabulate, and attribute each saving.

    By default: 2.6.32 and 2.6.38 each with and without change_pte, 3.7 and 6.10.

    \b
    Examples:
      hvsim compare samepage --vms 4 --cmdline "pages=64 passes=40 spin=100000"
      hvsim compare samepage --vms 4 --kernels 3.6,3.6-no-change-pte,3.7,4.19
      hvsim compare samepage --vms 4 --plot eras.png --trace eras.json
    """
    ctx = click.get_current_context()
    opts = commands.Options.from_params(kw)

    guarded(lambda: commands.compare_kernels(ctx, opts, kernels))


@main.command()
@workload_options
@kernel_options
@ksm_options
def ksm(kernel: str | None, profile: str | None, **kw: Any) -> None:
    """Run IMAGE with KSM on and show /sys/kernel/mm/ksm as the run left it.

    The knobs are named after the files in /sys/kernel/mm/ksm/ (run, pages_to_scan,
    sleep_millisecs, max_page_sharing, use_zero_pages, smart_scan).

    \b
    Example:
      hvsim ksm samepage --cmdline "pages=10 passes=6 spin=20000" --ksm-sleep-ms 0
    """
    ctx = click.get_current_context()
    opts = commands.Options.from_params(kw)

    def go() -> int:
        opts.prepare(ctx)
        return commands.ksm_run(opts, opts.config(opts.ksm(True), kernel_of(kernel, profile)))

    guarded(go)


@main.command()
@workload_options
@ksm_options
def history(**kw: Any) -> None:
    """Run IMAGE under every kernel release where a modelled behaviour changes, with and without change_pte.

    Prints EPT_VIOLATION exits and cow_ksm per release (2.6.32 .. 6.12) with the rows of
    `hvsim kernels` that change there; --plot FILE.png draws them, annotated by commit.
    Without IMAGE, the samepage demo in 4 VMs.

    \b
    Example:
      hvsim history samepage --vms 4 --cmdline "pages=64 passes=40 spin=100000" --plot history.png
    """
    ctx = click.get_current_context()
    opts = commands.Options.from_params(kw)

    guarded(lambda: commands.history(ctx, opts))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the table as one JSON document.")
def kernels(as_json: bool) -> None:
    """Print the table of kernel changes hvsim models: version, behaviour, commit, reason.

    `--kernel V` on run/ksm (and each entry of compare's --kernels) applies every row up to V.

    \b
    Example:
      hvsim kernels
      hvsim run samepage --vms 2 --ksm --kernel 2.6.38
    """
    click.echo(to_json(kernels_as_dict()) if as_json else render_kernels(), nl=False)


@main.command()
def images() -> None:
    """List the bundled guest images and their --cmdline parameters.

    \b
    Example:
      hvsim images
      hvsim run memtouch --cmdline "pages=4096 passes=3"
    """
    click.echo(render_catalog(GUEST_IMAGES), nl=False)


def _sweep_point(settings: dict[str, Any], where: str) -> "RunPoint":
    """A sweep point's settings through `hvsim run`'s own parser and config path."""
    from .sweep.spec import RunPoint

    ctx = parse_settings(run, settings, where)
    p = ctx.params
    opts = commands.Options.from_params(p)
    try:
        cfg = _run_config(ctx, opts, kernel_of(p["kernel"], p["profile"]), p["no_change_pte"], p["ksm_on"])
    except HvsimError as err:
        raise type(err)(f"{where}: {err}") from None
    return RunPoint(cfg, opts.check)


@main.command()
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("-o", "--results", "results_dir", metavar="RESULTS_DIR",
              help="Where reports and tables go (default: SPEC without .toml, plus '-results', beside it).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), help="Local worker processes (default: one per core).")
@click.option("--scheduler", metavar="tcp://HOST:PORT",
              help='Run the points on this Dask distributed scheduler instead (pip install "hvsim[cluster]").')
@click.option("--plot", is_flag=True, help="Also draw RESULTS_DIR/plots/FIGURE.png (needs matplotlib).")
@click.option("--figure", "figures", multiple=True, metavar="NAME",
              help="A figure --plot draws, e.g. ksm.pages_sharing (repeatable; default: [plot] figures of the "
                   "spec, else the headline exits, merges and notifier calls).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar on stderr.")
def sweep(spec: str, results_dir: str | None, jobs: int | None, scheduler: str | None, plot: bool,
          figures: tuple[str, ...], quiet: bool) -> None:
    """Run every point of the sweep SPEC (TOML) that has no report yet, and tabulate them all.

    SPEC has a [run] table (the base run: `hvsim run`'s long options with underscores, plus
    image), an [axes] table of lists crossed as a grid, and optionally a [zip] table of lists
    that move together. Re-running a sweep runs only the missing points.

    \b
    Examples:
      hvsim sweep examples/change_pte.toml --jobs 2 --plot
      hvsim sweep examples/vm_count.toml --scheduler tcp://127.0.0.1:8786
    """

    def go() -> int:
        from .sweep.command import sweep as run_spec  # pandas and pyarrow load only for sweeps

        outcome = run_spec(Path(spec), results_dir, jobs, scheduler, plot, list(figures), not quiet, _sweep_point)
        click.echo(outcome.summary, nl=False)
        for line in outcome.errors:
            click.echo(f"hvsim: {line}", err=True)
        return outcome.exit_code

    guarded(go)


@main.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--fail-on-diff", is_flag=True, help="Exit with status 1 when any figure differs.")
@click.option("--changed", "changed_only", is_flag=True, help="List only the figures that differ.")
def diff(a: str, b: str, fail_on_diff: bool, changed_only: bool) -> None:
    """Two saved run reports (`hvsim run --json`, or a sweep's runs/*.json) side by side.

    Every figure with both values and B - A, exits first; then what differs in the
    configuration and the guests' consoles.

    \b
    Examples (a.json and b.json from `hvsim run samepage --vms 2 --ksm --json`, then with --no-change-pte):
      hvsim diff a.json b.json --changed
      hvsim diff baseline.json new.json --fail-on-diff     # a regression check
    """

    from .diff import diff_reports, load_report, render_diff

    def go() -> int:
        result = diff_reports(load_report(a), load_report(b))
        click.echo(render_diff(result, a, b, changed_only), nl=False)
        return 1 if fail_on_diff and result.differs else 0

    guarded(go)


@main.command("build-guest")
@click.argument("sources", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=OutputFile(), metavar="PROG.elf", help="The ELF64 guest image to write.")
@click.option("--print-include-dir", is_flag=True, help="Print the directory of hvsim.h (the SDK) and exit.")
def build_guest_cmd(sources: tuple[Path, ...], output: str | None, print_include_dir: bool) -> None:
    """Compile C guests against hvsim's guest SDK (hvsim.h) with the system cc.

    \b
    Examples:
      hvsim build-guest prog.c -o prog.elf
      hvsim build-guest main.c table.c -o kv.elf && hvsim run kv.elf --cmdline "keys=1000"
      hvsim build-guest --print-include-dir
    """
    from .guest.build import SDK_DIR, build_guest

    if print_include_dir:
        click.echo(str(SDK_DIR))
        return

    def go() -> int:
        if output is None:
            raise ConfigError("no output file: give one with -o, e.g. `hvsim build-guest prog.c -o prog.elf`.")
        check_outputs(click.get_current_context(), [str(s) for s in sources])
        built = build_guest(list(sources), Path(output))
        if built.warnings:
            click.echo(built.warnings, err=True)
        click.echo(f"hvsim build-guest: wrote {built.path} ({built.size} bytes); run it with `hvsim run {built.path}`")
        return 0

    guarded(go)
