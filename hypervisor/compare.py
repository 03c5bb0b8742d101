"""`hvsim compare`: one workload under several kernels, side by side, with each saving attributed to its change.

Runs the same guests, with the same seed and time slicing, under KSM off (the
baseline) and then each kernel of the list (default: 2.6.32 and 2.6.38 with and
without KVM's change_pte, 3.7, 6.10).  The attribution compares runs that differ
in one thing the reader can name: what change_pte saved is a kernel with it
against the same kernel without it; what read-intent pinning saved is the last
always-write kernel against the first read-intent one (2.6.32 against 2.6.38),
both without change_pte; what the 3.7 bracket cost is the last unbracketed kernel
against the first bracketed one, both with change_pte.  Each pair also lists every
other table row that differs between its two kernels, so nothing is hidden.  Every
saving is billed in all exits: the EPT violations a change avoided against the
EXTERNAL_INTERRUPT exits (kicks of vCPUs in guest mode) its remote TLB flushes added.
"""

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import __version__
from .errors import ConfigError
from .events import NULL_TRACER, Tracer
from .kernels import changes_up_to, version_key
from .profiles import Profile, get_profile
from .races import KSM_POINTS, RaceSpec
from .report import KSM_SCAN_ADVICE
from .sim import KsmConfig, RunResult, SimConfig, Simulation, image_label

NO_CHANGE_PTE = "-no-change-pte"
DEFAULT_KERNELS = ("2.6.32", "2.6.32-no-change-pte", "2.6.38", "2.6.38-no-change-pte", "3.7", "6.10")


@dataclass(frozen=True)
class CompareRun:
    label: str
    profile: str  # the kernel version
    change_pte: bool
    ksm: bool


def parse_kernels(items: tuple[str, ...] | list[str]) -> tuple[CompareRun, ...]:
    """'2.6.38', '2.6.38-no-change-pte', ... -> the runs, KSM off (under the first kernel) first."""
    runs: list[CompareRun] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        version, cp = (item[: -len(NO_CHANGE_PTE)], False) if item.endswith(NO_CHANGE_PTE) else (item, True)
        version_key(version)
        if not cp and not get_profile(version).uses_change_pte:
            raise ConfigError(f"--kernels {item!r}: Linux {version} has no change_pte to turn off; "
                              f"list {version} alone.")
        label = version if cp else f"{version} no change_pte"
        if any(r.label == label for r in runs):
            raise ConfigError(f"--kernels lists {item!r} twice.")
        runs.append(CompareRun(label, version, cp, True))
    if not runs:
        raise ConfigError("--kernels is empty: list kernel versions, e.g. 2.6.32,2.6.32-no-change-pte,3.7.")
    return (CompareRun("ksm off", runs[0].profile, True, False), *runs)


COMPARE_RUNS = parse_kernels(DEFAULT_KERNELS)


@dataclass
class CompareRow:
    run: CompareRun
    result: RunResult

    @property
    def profile(self) -> Profile:
        return self.result.profile

    @property
    def ept_violations(self) -> int:
        """The MMU's fault exits: EPT_VIOLATION, or under --mmu shadow the #PF exits (EXCEPTION_NMI)."""
        return self.result.totals()["exits"].get(fault_exit(self.result.config.mmu), 0)

    @property
    def kicks(self) -> int:
        """EXTERNAL_INTERRUPT exits: vCPUs in guest mode kicked by remote TLB flushes."""
        return self.result.totals()["exits"].get("EXTERNAL_INTERRUPT", 0)

    @property
    def all_exits(self) -> int:
        return sum(self.result.totals()["exits"].values())

    @property
    def cow_ksm(self) -> int:
        return self.result.vmstat.get("cow_ksm", 0)

    def summary(self) -> dict[str, Any]:
        t = self.result.totals()
        ksm = self.result.ksm or {}
        return {
            "label": self.run.label,
            "kernel": self.run.profile,
            "change_pte": self.run.change_pte,
            "ksm": self.run.ksm,
            "EPT_VIOLATION": self.ept_violations if self.result.config.mmu == "tdp" else 0,
            "fault_exit": fault_exit(self.result.config.mmu),
            "fault_exits": self.ept_violations,
            "EXTERNAL_INTERRUPT": self.kicks,
            "exits": t["stats"].get("exits", 0),
            "exit_reasons": dict(sorted(t["exits"].items())),
            "change_pte_calls": t["notifier_calls"].get("change_pte", 0),
            "sptes_rewritten": t["stats"].get("spte_changed", 0),
            "sptes_zapped": t["stats"].get("spte_zapped", 0),
            "remote_tlb_flush": t["stats"].get("remote_tlb_flush", 0),
            "invalidate_page_calls": t["notifier_calls"].get("invalidate_page", 0),
            "invalidate_range_start_calls": t["notifier_calls"].get("invalidate_range_start", 0),
            "invalidate_range_end_calls": t["notifier_calls"].get("invalidate_range_end", 0),
            "pages_shared": ksm.get("pages_shared", 0),
            "pages_sharing": ksm.get("pages_sharing", 0),
            "cow_ksm": self.cow_ksm,
            "insns": self.result.sim_insns,
        }


@dataclass(frozen=True)
class Saving:
    """What one change saved: EPT_VIOLATION exits and COW breaks of `before` minus those of `after`."""

    what: str
    before: str  # run label without the change
    after: str  # run label with the change
    exits: int
    cow_ksm: int
    also_differs: tuple[str, ...]  # other table rows between the two kernels ("2.6.33 field = value")
    kicks: int = 0  # EXTERNAL_INTERRUPT exits of `before` minus those of `after` (negative: added)
    all_exits: int = 0  # exits of every reason, `before` minus `after`

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "before": self.before, "after": self.after, "exits_saved": self.exits,
                "kicks_saved": self.kicks, "all_exits_saved": self.all_exits,
                "cow_ksm_saved": self.cow_ksm, "also_differs": list(self.also_differs)}


def _saving(what: str, a: "CompareRow", b: "CompareRow", also: tuple[str, ...] = ()) -> Saving:
    """What going from run a (without the change) to run b (with it) saved, in every exit reason."""
    return Saving(what, a.run.label, b.run.label, a.ept_violations - b.ept_violations, a.cow_ksm - b.cow_ksm,
                  also, a.kicks - b.kicks, a.all_exits - b.all_exits)


def _rows_between(a: str, b: str, skip: str) -> tuple[str, ...]:
    lo, hi = sorted((a, b), key=version_key)
    seen = {id(c) for c in changes_up_to(lo)}
    return tuple(f"{c.version} {c.field} = {c.value}" for c in changes_up_to(hi)
                 if id(c) not in seen and c.field != skip)


@dataclass
class CompareResult:
    base: SimConfig
    rows: list[CompareRow]

    @property
    def interrupted(self) -> bool:
        return any(r.result.interrupted for r in self.rows)

    def row(self, label: str) -> CompareRow | None:
        return next((r for r in self.rows if r.run.label == label), None)

    def attribution(self) -> list[Saving]:
        """Each saving from a pair of runs that differ in the change named (see the module doc)."""
        out: list[Saving] = []
        ksm_rows = [r for r in self.rows if r.run.ksm]
        for row in ksm_rows:
            if not row.run.change_pte:
                continue
            bare = self.row(f"{row.run.profile} no change_pte")
            if bare is not None:
                out.append(_saving(f"change_pte in {row.run.profile}", bare, row))
        without = [r for r in ksm_rows if not r.profile.uses_change_pte]
        old = [r for r in without if r.profile.kvm_gup_always_write]
        new = [r for r in without if not r.profile.kvm_gup_always_write]
        if old and new:
            a = max(old, key=lambda r: version_key(r.run.profile))
            b = min(new, key=lambda r: version_key(r.run.profile))
            out.append(_saving("read-intent pinning (2.6.38)", a, b,
                               _rows_between(a.run.profile, b.run.profile, "kvm_gup_always_write")))
        with_cp = [r for r in ksm_rows if r.profile.uses_change_pte]
        open_ = [r for r in with_cp if not r.profile.ksm_pte_updates_in_invalidate_range]
        closed = [r for r in with_cp if r.profile.ksm_pte_updates_in_invalidate_range]
        if open_ and closed:
            a = max(open_, key=lambda r: version_key(r.run.profile))
            b = min(closed, key=lambda r: version_key(r.run.profile))
            out.append(_saving("the 3.7 invalidate_range bracket around KSM's pte updates", a, b,
                               _rows_between(a.run.profile, b.run.profile, "ksm_pte_updates_in_invalidate_range")))
        return out

    def console_mismatches(self) -> list[str]:
        if self.interrupted:
            return []
        out = []
        first = self.rows[0]
        for row in self.rows[1:]:
            for a, b in zip(first.result.vms, row.result.vms, strict=True):
                if a.console != b.console or a.exit_status != b.exit_status:
                    out.append(f"vm{a.id} printed different output (or exit status) under "
                               f"{row.run.label!r} than under {first.run.label!r}")
        return out

    def as_dict(self) -> dict[str, Any]:
        runs = []
        for row in self.rows:
            s = row.summary()
            s["report"] = row.result.as_dict()
            runs.append(s)
        doc: dict[str, Any] = {"hvsim_version": __version__, "config": self.base.as_dict(), "runs": runs,
                               "attribution": [s.as_dict() for s in self.attribution()]}
        if self.interrupted:
            doc["interrupted"] = True
        return doc


def run_compare(base: SimConfig, check: bool = False,
                tracer: Tracer = NULL_TRACER,
                observe: Callable[[str, Simulation], None] | None = None,
                runs: tuple[CompareRun, ...] = COMPARE_RUNS) -> CompareResult:
    """Run every kernel of `runs`; `observe(label, sim)` sees each Simulation before it runs (traces, plots)."""
    rows = []
    for spec in runs:
        ksm = replace(base.ksm, enabled=spec.ksm) if spec.ksm else KsmConfig()
        # Without KSM there is no ksmd to inject into: the ksm_* injections apply to the KSM runs only.
        inject = base.inject if spec.ksm else tuple(t for t in base.inject if RaceSpec.parse(t).point not in KSM_POINTS)
        cfg = replace(base, profile=spec.profile, change_pte=spec.change_pte, ksm=ksm, inject=inject)
        sim = Simulation(cfg, tracer=tracer, check=check)
        if observe is not None:
            observe(spec.label, sim)
        result = sim.run()
        rows.append(CompareRow(spec, result))
        if sim.interrupted:
            break
    return CompareResult(base, rows)


def _table(cols: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*cols), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]


def fault_exit(mmu: str) -> str:
    """The exit a missing or read-only mapping costs: an EPT violation, or a #PF exit under shadow paging."""
    return "EPT_VIOLATION" if mmu == "tdp" else "EXCEPTION_NMI"


def render_compare(result: CompareResult) -> str:
    cfg = result.base
    exit_name = fault_exit(cfg.mmu)
    base = result.rows[0].ept_violations if result.rows and not result.rows[0].run.ksm else None
    all_base = result.rows[0].all_exits if result.rows and not result.rows[0].run.ksm else None
    cols = ("run", exit_name, "over ksm off", "kicks", "all exits", "over ksm off", "cow_ksm",
            "pages_sharing", "change_pte", "sptes rewritten", "sptes zapped", "invalidate_page", "range_start/end",
            "remote TLB flushes")
    rows = []
    for row in result.rows:
        s = row.summary()
        rows.append((
            row.run.label, str(s["fault_exits"]),
            "-" if base is None or not row.run.ksm else f"{s['fault_exits'] - base:+d}",
            str(s["EXTERNAL_INTERRUPT"]), str(row.all_exits),
            "-" if all_base is None or not row.run.ksm else f"{row.all_exits - all_base:+d}",
            str(s["cow_ksm"]), str(s["pages_sharing"]) if row.run.ksm else "-",
            str(s["change_pte_calls"]), str(s["sptes_rewritten"]), str(s["sptes_zapped"]),
            str(s["invalidate_page_calls"]),
            f"{s['invalidate_range_start_calls']}/{s['invalidate_range_end_calls']}",
            str(s["remote_tlb_flush"]),
        ))
    lines = [
        f"hvsim compare: {image_label(cfg.image)}, {cfg.vms} VM(s) x {cfg.vcpus} vCPU(s) x {cfg.memory >> 20} MiB, "
        f"cmdline {cfg.cmdline!r}, {'shadow paging, ' if cfg.mmu == 'shadow' else ''}"
        f"ksm pages_to_scan {cfg.ksm.pages_to_scan} sleep_millisecs {cfg.ksm.sleep_millisecs}",
        *_table(cols, rows),
    ]
    savings = result.attribution()
    if savings:
        lines += ["", "attribution (each line compares two runs of this table):"]
        for sv in savings:
            verb = "saved" if sv.exits >= 0 else "cost"
            kick = "saved" if sv.kicks >= 0 else "added"
            net = "saved" if sv.all_exits >= 0 else "cost"
            lines.append(f"  {sv.what}: {verb} {abs(sv.exits)} {exit_name} exits and {abs(sv.cow_ksm)} cow_ksm, "
                         f"{kick} {abs(sv.kicks)} kicks (EXTERNAL_INTERRUPT): {net} {abs(sv.all_exits)} exits in all "
                         f"('{sv.before}' -> '{sv.after}')")
            if sv.also_differs:
                lines.append(f"    (the two kernels also differ in: {'; '.join(sv.also_differs)})")
    if result.interrupted:
        same = "INTERRUPTED: the runs above are what was reached"
    elif result.console_mismatches():
        same = "CONSOLE OUTPUT DIFFERED between runs"
    else:
        same = "every run printed the same console output"
    lines.append("kicks = EXTERNAL_INTERRUPT exits of vCPUs in guest mode IPI'd by kvm_flush_remote_tlbs; all exits = "
                 "every exit reason.")
    lines.append(f"sptes rewritten = in place by change_pte; zapped = by any notifier; {same}.")
    unscanned = [row.run.label for row in result.rows if row.result.ksmd_completed_full_scan is False]
    if unscanned:
        lines += textwrap.wrap(f"note: ksmd did not complete a full scan in {', '.join(unscanned)}, so nothing "
                               f"could merge there. {KSM_SCAN_ADVICE}", 100, subsequent_indent="      ")
    return "\n".join(lines) + "\n"
