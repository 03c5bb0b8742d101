"""The run report: text tables in the layout of the tools users know, and the JSON document.

The exit table follows `kvm_stat` (`Event  Total  %Total  CurAvg/s`, rows such as
`kvm_exit(EPT_VIOLATION)`), with CurAvg/s over simulated time; KSM counters are
listed as the files of /sys/kernel/mm/ksm/.
"""

import json
import math
import textwrap
from typing import Any

from .config import image_label
from .costs import CostModel
from .kvm.stats import HVSIM_ONLY
from .results import RunResult, VmResult

KSM_SYSFS_ORDER = (
    "run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages", "smart_scan", "pages_shared",
    "pages_sharing", "pages_unshared", "pages_volatile", "pages_scanned", "pages_skipped", "full_scans",
    "stable_node_chains", "stable_node_dups", "ksm_zero_pages", "general_profit",
)


def kvm_stat_table(exits: dict[str, int], sim_seconds: float) -> list[str]:
    total = sum(exits.values())
    lines = [f" {'Event':<40} {'Total':>10} {'%Total':>7} {'CurAvg/s':>10}"]
    for name, n in sorted(exits.items(), key=lambda kv: (-kv[1], kv[0])):
        pct = 100.0 * n / total if total else 0.0
        rate = n / sim_seconds if sim_seconds > 0 else 0.0
        lines.append(f" {'kvm_exit(' + name + ')':<40} {n:>10} {pct:>7.1f} {rate:>10.0f}")
    lines.append(f" {'Total':<40} {total:>10}")
    return lines


def stats_lines(stats: dict[str, int], calls: dict[str, int]) -> list[str]:
    kernel = [f"{k} {v}" for k, v in stats.items() if k not in HVSIM_ONLY and k != "exits" and v]
    ours = [f"{k} {v}" for k, v in stats.items() if k in HVSIM_ONLY and v]
    lines = [" kvm stats:  " + ("  ".join(kernel) if kernel else "(all zero)")]
    if ours:
        lines.append(" hvsim:      " + "  ".join(ours))
    called = [f"{k} {v}" for k, v in calls.items() if v]
    lines.append(" mmu_notifier calls received by KVM:  " + ("  ".join(called) if called else "none"))
    return lines


def ksm_lines(counters: dict[str, int], vmstat: dict[str, int]) -> list[str]:
    lines = [" /sys/kernel/mm/ksm/"]
    for name in KSM_SYSFS_ORDER:
        if name in counters:  # a file the modelled kernel did not have is not listed
            lines.append(f"   {name:<20} {counters[name]}")
    lines.append(f" /proc/vmstat cow_ksm  {vmstat.get('cow_ksm', 0)}")
    return lines


KSM_SCAN_ADVICE = ("Give the guest more time (more passes or spin in --cmdline) or let ksmd scan faster "
                   "(--ksm-sleep-ms, --ksm-pages-to-scan).")


def ksm_scan_note(counters: dict[str, int], sim_ms: float) -> list[str]:
    """A warning when the run ended before ksmd could have merged much (KSM merges from its
    second full scan: the first only takes checksums)."""
    scans = counters.get("full_scans", 0)
    if scans >= 2:
        return []
    if scans == 0:
        what = "ksmd did not complete a full scan of the mergeable memory"
        effect = "so nothing could merge yet"
    else:
        what = "ksmd completed only 1 full scan"
        effect = "and KSM merges only during its second, which had not finished"
    text = (f"{what} in the run's {sim_ms:.1f} simulated ms, {effect}. {KSM_SCAN_ADVICE}")
    return textwrap.wrap(text, 96, initial_indent=" note: ", subsequent_indent="       ")


def _vm_block(v: VmResult, sim_seconds: float) -> list[str]:
    lines = [f"== vm{v.id}: {image_label(v.image)} =="]
    if v.console:
        lines.append(" console:")
        lines += ["   " + line for line in v.console.rstrip("\n").split("\n")]
    ending = {"halted": "halted (HLT)", "exited": "exited (port 0xf4)", "runnable": "still runnable",
              "shutdown": "shut down (TRIPLE_FAULT)", "failed": "stopped by the VMM"}[v.state]
    status = "" if v.exit_status is None else f" with status {v.exit_status}"
    lines.append(f" {ending}{status} after {v.insns} instructions")
    if v.error:
        lines.append(f" error: {v.error}")
        if v.where:
            lines.append(f"        at {v.where}")
    lines += kvm_stat_table(v.exits, sim_seconds)
    lines += stats_lines(v.stats, v.notifier_calls)
    for row in v.vcpus:  # --vcpus > 1: each vCPU's share of the counts above
        reasons = "  ".join(f"{r} {n}" for r, n in row["exit_reasons"].items())
        lines.append(f" vCPU {row['vcpu']}: {row['state']}, {row['insns']} instructions, {row['exits']} exits"
                     + (f" ({reasons})" if reasons else ""))
    return lines


def render_run(result: RunResult) -> str:
    cfg = result.config
    sim_seconds = result.sim_insns / cfg.insns_per_ms / 1000.0
    vcpus = f" x {cfg.vcpus} vCPUs" if cfg.vcpus > 1 else ""
    head = (f"hvsim run: {cfg.vms} VM(s){vcpus} x {cfg.memory >> 20} MiB, profile {result.profile.name}, "
            f"KSM {'on' if result.ksm is not None else 'off'}; simulated time {result.sim_insns} instructions "
            f"= {sim_seconds * 1000:.1f} ms")
    if result.retry_insns:
        head += f" ({result.retry_insns} of them the cost of retried faults)"
    lines = [head]
    if result.interrupted:
        lines.append("INTERRUPTED: the counts below are what the run had reached.")
    for v in result.vms:
        lines.append("")
        lines += _vm_block(v, sim_seconds)
    if cfg.vms > 1:
        totals = result.totals()
        lines.append("")
        lines.append("== all VMs ==")
        lines += kvm_stat_table(totals["exits"], sim_seconds)
        lines += stats_lines(totals["stats"], totals["notifier_calls"])
    if result.ksm is not None:
        lines.append("")
        lines += ksm_lines(result.ksm, result.vmstat)
        lines += ksm_scan_note(result.ksm, sim_seconds * 1000)
    return "\n".join(lines) + "\n"


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"


def render_perf_kvm_stat(result: RunResult, model: CostModel) -> str:
    """`perf kvm stat report` layout, timed by the cost model (hypervisor/costs.py)."""
    samples: dict[str, dict[str, int]] = {}
    for vm in result.vms:
        for reason, kinds in vm.exit_work.items():
            for kind, n in kinds.items():
                samples.setdefault(reason, {}).setdefault(kind, 0)
                samples[reason][kind] += n
    rows = []
    for reason, kinds in samples.items():
        n = sum(kinds.values())
        costs = {k: model.microseconds(model.exit_cycles(reason, k)) for k in kinds}
        total = sum(costs[k] * c for k, c in kinds.items())
        mean = total / n
        var = sum(c * (costs[k] - mean) ** 2 for k, c in kinds.items()) / n
        rel = 100.0 * math.sqrt(var / n) / mean if mean else 0.0
        rows.append((reason, n, total, min(costs.values()), max(costs.values()), mean, rel))
    rows.sort(key=lambda r: (-r[1], r[0]))
    all_samples = sum(r[1] for r in rows)
    all_time = sum(r[2] for r in rows)
    lines = [
        "Analyze events for all VMs, all VCPUs:",
        "",
        f"{'VM-EXIT':>20} {'Samples':>10} {'Samples%':>9} {'Time%':>9} {'Min Time':>11} {'Max Time':>11} "
        f"{'Avg time':>16}",
        "",
    ]
    for reason, n, total, lo, hi, mean, rel in rows:
        lines.append(f"{reason:>20} {n:>10} {100.0 * n / all_samples:>8.2f}% {100.0 * total / all_time:>8.2f}% "
                     f"{lo:>9.2f}us {hi:>9.2f}us {mean:>11.2f}us ( +- {rel:6.2f}% )")
    lines += ["", f"Total Samples:{all_samples}, Total events handled time:{all_time:.2f}us.",
              f"(times from hvsim's cost model at {model.cpu_mhz} MHz, not measured: "
              "see --exit-cost in `hvsim run --help`)"]
    return "\n".join(lines) + "\n"
