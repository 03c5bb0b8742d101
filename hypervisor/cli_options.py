"""The option groups that `hvsim run`, `compare`, `ksm` and `history` share, as click decorators."""

from collections.abc import Callable
from dataclasses import Field
from typing import Any, TypeVar

import click

from .config import KsmKnobs
from .options import OutputFile
from .plot import check_plot_file
from .profiles import DEFAULT_PROFILE, PROFILE_ALIASES
from .races import EVENTS, FAULT_POINTS, FLUSH_POINTS, KSM_POINTS
from .sim import DEFAULT_INSNS_PER_MS, DEFAULT_MAX_INSNS, DEFAULT_QUANTUM

F = TypeVar("F", bound=Callable[..., Any])


def _options(options: list[Callable[[F], F]]) -> Callable[[F], F]:
    def apply(f: F) -> F:
        for opt in reversed(options):
            f = opt(f)
        return f

    return apply


workload_options = _options([
    click.argument("image", required=False, type=click.Path()),
    click.option("--memory", default="64M", show_default=True, help="Guest RAM per VM (e.g. 64M, 1G)."),
    click.option("--cmdline", default="", help="The guest's command line (see `hvsim images`)."),
    click.option("--vms", default=1, show_default=True, type=int, help="Number of VMs."),
    click.option("--vcpus", default=1, show_default=True, type=int,
                 help="vCPUs per VM, each its own CPU over the VM's one memory (see README, SMP guests)."),
    click.option("--max-insns", default=DEFAULT_MAX_INSNS, show_default=True, type=int,
                 help="Per-vCPU instruction budget; a guest still running then is reported as runaway."),
    click.option("--quantum", default=DEFAULT_QUANTUM, show_default=True, type=int,
                 help="Instructions per vCPU time slice."),
    click.option("--insns-per-ms", default=DEFAULT_INSNS_PER_MS, show_default=True, type=int,
                 help="Simulated CPU speed: guest instructions per simulated millisecond."),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables."),
    click.option("--check", is_flag=True,
                 help="Verify the coherence invariants after every exit, notifier call and ksmd step."),
    click.option("--inject", multiple=True, metavar="POINT:EVENT[@N|@all]",
                 help="Fire a host event at a named point of the fault path or ksmd (repeatable), the N-th time "
                      "(default 1) or @all times it is reached, e.g. after_gfn_to_pfn:cow@3. "
                      f"POINT: {', '.join(FAULT_POINTS + KSM_POINTS + FLUSH_POINTS)} (ksm_* need KSM on). "
                      f"EVENT: {', '.join(EVENTS)} (ksm_scan only at after_gfn_to_pfn, lost_flush only at "
                      "kvm_flush_remote_tlbs)."),
    click.option("--trace", "trace_path", metavar="FILE", type=OutputFile(),
                 help="Write every event with its tracepoint name; FILE.json is Chrome trace JSON for Perfetto, "
                      "any other name trace-cmd-style text."),
    click.option("--trace-events", metavar="GLOB[,GLOB]", help="Only trace matching events, e.g. 'kvm_exit,ksm_*'."),
    click.option("--plot", "plot_path", metavar="FILE.png", type=OutputFile(check_plot_file),
                 help="Plot EPT_VIOLATION exits per simulated ms and KSM sharing (needs matplotlib)."),
    click.option("--quiet", "-q", is_flag=True, help="No progress line on stderr."),
    click.option("--mmu", type=click.Choice(["tdp", "shadow"]), default="tdp", show_default=True,
                 help="KVM's MMU: tdp (EPT) or shadow (shadow page tables, a host without EPT)."),
    click.option("--mmu-pages", type=int, default=None, metavar="N",
                 help="--mmu shadow: the shadow page cache size (KVM_SET_NR_MMU_PAGES, at least 64; default "
                      "max(guest pages * 20 / 1000, 64))."),
    click.option("--oos-shadow", type=click.IntRange(0, 1), default=None, metavar="0|1",
                 help="--mmu shadow: KVM's oos_shadow module parameter (default 1): 1 lets a guest page "
                      "table the guest writes go unsync, 0 keeps it write-protected (every store emulated)."),
])

kernel_options = _options([
    click.option("--kernel", metavar="VERSION", default=None,
                 help=f"Linux release whose host mm, mmu_notifier, KSM and KVM behaviour to model, "
                      f"2.6.32 .. 6.12 (default {DEFAULT_PROFILE}); `hvsim kernels` lists what changes."),
    click.option("--profile", type=click.Choice(list(PROFILE_ALIASES)), default=None,
                 help="The same as --kernel, for the three eras hvsim first offered."),
])

def _ksm_option(knob: "Field[Any]") -> Callable[[F], F]:
    """The click option of a KsmKnobs field, from its default and metadata (config.knob)."""
    m, default = knob.metadata, knob.default
    kw: dict[str, Any] = {"default": default, "help": m["help"], "metavar": m["metavar"]}
    if m["off_flag"] is not None:
        return click.option(f"{m['flag']}/{m['off_flag']}", knob.name, **kw)
    if default is False:
        kw["is_flag"] = True
    elif isinstance(default, tuple):
        kw["multiple"] = True
    else:
        kw["type"] = click.IntRange(*m["int_range"]) if m["int_range"] else int
        kw["show_default"] = default is not None
    return click.option(m["flag"], knob.name, **kw)


# One option per KsmKnobs field: adding a knob there adds its option to run, compare, ksm and history.
ksm_options = _options([_ksm_option(f) for f in KsmKnobs.knobs()])
