"""`hvsim compare`: one workload under every kernel era, side by side: what change_pte saved, and when it stopped.

Runs the same guests, with the same seed and time slicing, under: KSM off (the
baseline), 2.6.32 with change_pte, 2.6.32 without it (KVM's notifier lacks
->change_pte and gets ->invalidate_page), 3.7 and 6.10.  "Exits avoided" is the
EPT_VIOLATION count of the no-change_pte run minus the run's own.
"""

import textwrap
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from . import __version__
from .races import KSM_POINTS, RaceSpec
from .report import KSM_SCAN_ADVICE
from .sim import KsmConfig, RunResult, SimConfig, Simulation, image_label


@dataclass(frozen=True)
class CompareRun:
    label: str
    profile: str
    change_pte: bool
    ksm: bool


COMPARE_RUNS = (
    CompareRun("ksm off", "2.6.32", True, False),
    CompareRun("2.6.32", "2.6.32", True, True),
    CompareRun("2.6.32 no change_pte", "2.6.32", False, True),
    CompareRun("3.7", "3.7", True, True),
    CompareRun("3.7 no change_pte", "3.7", False, True),
    CompareRun("6.10", "6.10", True, True),
)
REFERENCE = "2.6.32 no change_pte"


@dataclass
class CompareRow:
    run: CompareRun
    result: RunResult

    @property
    def ept_violations(self) -> int:
        return self.result.totals()["exits"].get("EPT_VIOLATION", 0)

    def summary(self) -> dict[str, Any]:
        t = self.result.totals()
        ksm = self.result.ksm or {}
        return {
            "label": self.run.label,
            "profile": self.run.profile,
            "change_pte": self.run.change_pte,
            "ksm": self.run.ksm,
            "EPT_VIOLATION": self.ept_violations,
            "exits": t["stats"].get("exits", 0),
            "change_pte_calls": t["notifier_calls"].get("change_pte", 0),
            "sptes_changed_by_change_pte": t["stats"].get("spte_changed", 0),
            "invalidate_page_calls": t["notifier_calls"].get("invalidate_page", 0),
            "invalidate_range_start_calls": t["notifier_calls"].get("invalidate_range_start", 0),
            "invalidate_range_end_calls": t["notifier_calls"].get("invalidate_range_end", 0),
            "pages_shared": ksm.get("pages_shared", 0),
            "pages_sharing": ksm.get("pages_sharing", 0),
            "cow_ksm": self.result.vmstat.get("cow_ksm", 0),
            "insns": self.result.sim_insns,
        }


@dataclass
class CompareResult:
    base: SimConfig
    rows: list[CompareRow]

    @property
    def interrupted(self) -> bool:
        return any(r.result.interrupted for r in self.rows)

    def avoided_exits(self) -> dict[str, int]:
        ref = next((r for r in self.rows if r.run.label == REFERENCE), None)
        if ref is None:
            return {}
        return {r.run.label: ref.ept_violations - r.ept_violations for r in self.rows if r.run.ksm}

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
        avoided = self.avoided_exits()
        runs = []
        for row in self.rows:
            s = row.summary()
            s["avoided_exits"] = avoided.get(row.run.label)
            s["report"] = row.result.as_dict()
            runs.append(s)
        doc: dict[str, Any] = {"hvsim_version": __version__, "config": self.base.as_dict(), "reference": REFERENCE,
               "runs": runs, "avoided_exits": avoided}
        if self.interrupted:
            doc["interrupted"] = True
        return doc


def run_compare(base: SimConfig, check: bool = False,
                trace: Callable[[str, dict[str, Any]], None] | None = None,
                observe: Callable[[str, Simulation], None] | None = None) -> CompareResult:
    """Run every era; `observe(label, sim)` sees each Simulation before it runs (traces, plots)."""
    rows = []
    for spec in COMPARE_RUNS:
        ksm = replace(base.ksm, enabled=spec.ksm) if spec.ksm else KsmConfig()
        # Without KSM there is no ksmd to inject into: the ksm_* injections apply to the KSM runs only.
        inject = base.inject if spec.ksm else tuple(t for t in base.inject if RaceSpec.parse(t).point not in KSM_POINTS)
        cfg = replace(base, profile=spec.profile, change_pte=spec.change_pte, ksm=ksm, inject=inject)
        sim = Simulation(cfg, trace=trace, check=check)
        if observe is not None:
            observe(spec.label, sim)
        result = sim.run()
        rows.append(CompareRow(spec, result))
        if sim.interrupted:
            break
    return CompareResult(base, rows)


def render_compare(result: CompareResult) -> str:
    avoided = result.avoided_exits()
    cfg = result.base
    cols = ("run", "EPT_VIOLATION", "change_pte", "sptes rewritten", "invalidate_page", "range_start/end",
            "pages_sharing", "cow_ksm", "exits avoided")
    rows = []
    for row in result.rows:
        s = row.summary()
        a = avoided.get(row.run.label)
        rows.append((
            row.run.label, str(s["EPT_VIOLATION"]), str(s["change_pte_calls"]), str(s["sptes_changed_by_change_pte"]),
            str(s["invalidate_page_calls"]),
            f"{s['invalidate_range_start_calls']}/{s['invalidate_range_end_calls']}",
            str(s["pages_sharing"]) if row.run.ksm else "-", str(s["cow_ksm"]),
            "-" if a is None else str(a),
        ))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [
        f"hvsim compare: {image_label(cfg.image)}, {cfg.vms} VM(s) x {cfg.memory >> 20} MiB, cmdline {cfg.cmdline!r}, "
        f"ksm pages_to_scan {cfg.ksm.pages_to_scan} sleep_millisecs {cfg.ksm.sleep_millisecs}",
        fmt.format(*cols),
        fmt.format(*("-" * w for w in widths)),
    ]
    lines += [fmt.format(*r) for r in rows]
    if result.interrupted:
        same = "INTERRUPTED: the runs above are what was reached"
    elif result.console_mismatches():
        same = "CONSOLE OUTPUT DIFFERED between runs"
    else:
        same = "every run printed the same console output"
    lines.append(f"exits avoided = EPT_VIOLATION of {REFERENCE!r} minus the run's own; {same}.")
    unscanned = [row.run.label for row in result.rows if row.result.ksmd_completed_full_scan is False]
    if unscanned:
        lines += textwrap.wrap(f"note: ksmd did not complete a full scan in {', '.join(unscanned)}, so nothing "
                               f"could merge there. {KSM_SCAN_ADVICE}", 100, subsequent_indent="      ")
    return "\n".join(lines) + "\n"
