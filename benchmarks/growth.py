"""Target 5 (issue #13): per-exit and per-page costs of one VM from 16 MiB to 1 GiB.

Each size is one VM (one mm for the KSM scan) of that much memory: the fault storm
(fault_storm.py's `touch` guest over every heap page: time per EPT_VIOLATION exit,
against the raw-ctypes bare hook at the same size) and the ksmd scan (ksm_scan.py's
workload over as many pages: time per fresh page and per unchanged merged page,
against memory bandwidth at the same size).  The figure is the cost at the largest
size over the cost at the smallest (1.0 is flat; issue #13's target is 1.3); the
old figure (issue #6) was the largest size over the best size.  Median of the
repetitions.  A size whose projected time would overrun the budget is skipped and
said so.

The fault storm runs twice at each size.  5a times hvsim's costs: both sides' frames
are backed by the machine before the clock starts (fault_storm.prefault), because the
machine's own first touch of a page (its kernel's fault, and in a VM its hypervisor's)
costs 1.5 to 11 us on the VM this was measured on, depending on what its memory did
before, and grows with the size for the bare hook as much as for hvsim.  5a-cold is
the storm as a user runs it, first touch included, with the bare hook's growth beside
it (information: the machine's growth, not hvsim's).
"""

import time
from pathlib import Path
from typing import Any

from . import fault_storm, ksm_scan
from .common import Budget, Figure, Series, at_most, interleaved, median, ratio
from .guests import HEAP

FLAT = 1.3
MARGIN = 1.5  # projection of the next size from this one's time per page, with room for growth


def _us(rate: float | None) -> float | None:
    return None if not rate else 1e6 / rate


def storm_pages(mib: int) -> int:
    return ((mib << 20) - HEAP) // 4096


def ksm_pages(mib: int) -> int:
    return (mib << 20) // 4096


def run(workdir: Path, *, sizes_mib: list[int], quantum: int, budget: Budget, reps: int) -> tuple[
        list[Figure], list[Series], dict[str, Any]]:
    raw: dict[str, Any] = {"fault_storm": [], "ksm": []}
    storm_h: list[float | None] = []
    storm_b: list[float | None] = []
    cold_h: list[float | None] = []
    cold_b: list[float | None] = []
    fresh_h: list[float | None] = []
    merged_h: list[float | None] = []
    bandwidth: list[float | None] = []
    notes: list[str] = []
    storm_cost = ksm_cost = 0.0
    for mib in sizes_mib:
        n = storm_pages(mib)
        if storm_cost and not budget.allows(MARGIN * storm_cost * n * reps):
            notes.append(f"{mib} MiB fault storm skipped: projected {MARGIN * storm_cost * n * reps:.0f} s")
            for lst in (storm_h, storm_b, cold_h, cold_b):
                lst.append(None)
        else:
            t0 = time.perf_counter()
            rates: dict[bool, tuple[list[float], list[float]]] = {}
            for warm in (True, False):
                rates[warm] = interleaved(
                    reps, lambda: fault_storm.bare_storm(n, quantum, warm=warm)["rate"],  # noqa: B023
                    lambda: fault_storm.hvsim_storm(workdir, n, quantum, max_per_vm=n, warm=warm)["rate"])  # noqa: B023
            storm_cost = (time.perf_counter() - t0) / (n * reps)
            for warm, (h_list, b_list) in ((True, (storm_h, storm_b)), (False, (cold_h, cold_b))):
                bases, mines = rates[warm]
                h_list.append(_us(median(mines)))
                b_list.append(_us(median(bases)))
                raw["fault_storm"].append({"mib": mib, "pages": n, "frames_prefaulted": warm,
                                           "hvsim_exits_per_s": mines, "bare_fills_per_s": bases})
        k = ksm_pages(mib)
        if ksm_cost and not budget.allows(MARGIN * ksm_cost * k * reps):
            notes.append(f"{mib} MiB ksmd scan skipped: projected {MARGIN * ksm_cost * k * reps:.0f} s")
            for lst in (fresh_h, merged_h, bandwidth):
                lst.append(None)
        else:
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                samples.append(ksm_scan.measure(k, merged_passes=3, max_per_mm=k))
                ksm_cost = (time.perf_counter() - t0) / k
            fresh_h.append(_us(median([x["fresh_pages_per_s"] for x in samples])))
            merged_h.append(_us(median([x["merged_pages_per_s"] for x in samples])))
            bandwidth.append(_us(median([x["bandwidth_pages_per_s"] for x in samples])))
            for sample in samples:
                sample.pop("ksm_counters", None)
            raw["ksm"].append({"mib": mib, "pages": k, "samples": samples})
    pages = [storm_pages(m) for m in sizes_mib]
    kpages = [ksm_pages(m) for m in sizes_mib]
    series = [
        Series("growth_fault_storm", "fault storm, one VM, frames prefaulted: us per first-touch exit", pages,
               storm_h, storm_b, "bare hook, raw ctypes", notes),
        Series("growth_ksm_fresh", "ksmd scan, one mm, fresh pages: us per page", kpages, fresh_h, bandwidth,
               "memory bandwidth", []),
        Series("growth_ksm_merged", "ksmd scan, one mm, unchanged merged pages: us per page", kpages, merged_h,
               bandwidth, "memory bandwidth", []),
    ]
    figs = []
    span = f"{sizes_mib[0]} MiB..{sizes_mib[-1]} MiB, one VM"
    for s, num, short in zip(series, ("5a", "5b", "5c"), ("fault storm, per exit", "ksmd scan fresh, per page",
                                                            "ksmd scan merged, per page"), strict=True):
        first, last = s.hvsim_us_per_page[0], s.hvsim_us_per_page[-1]
        best = min((x for x in s.hvsim_us_per_page if x is not None), default=None)
        figs.append(Figure(s.key, num, f"growth {span}: {short}", last, "us", first,
                           f"at {sizes_mib[0]} MiB", ratio(last, first),
                           [at_most(ratio(last, first), FLAT, f"largest/smallest <= {FLAT}")],
                           {"series": s.hvsim_us_per_page, "pages": s.pages, "mib": sizes_mib},
                           old_baseline=best, old_baseline_name="best size", old_ratio=ratio(last, best)))
    cold = Series("growth_fault_storm_cold", "fault storm, one VM, the machine's first touch included: us per exit",
                  pages, cold_h, cold_b, "bare hook, raw ctypes", [])
    series.append(cold)
    first, last = cold.hvsim_us_per_page[0], cold.hvsim_us_per_page[-1]
    b_first, b_last = cold.baseline_us_per_page[0], cold.baseline_us_per_page[-1]
    figs.insert(1, Figure(cold.key, "5a-cold", f"growth {span}: fault storm, per exit, first touch of the "
                          "machine's memory included", last, "us", first, f"at {sizes_mib[0]} MiB",
                          ratio(last, first), [],
                          {"series": cold.hvsim_us_per_page, "bare_series": cold.baseline_us_per_page,
                           "pages": cold.pages, "mib": sizes_mib},
                          old_baseline=b_last,
                          old_baseline_name="bare hook, same memory, at the largest size (its growth: old ratio)",
                          old_ratio=ratio(b_last, b_first)))
    return figs, series, raw
