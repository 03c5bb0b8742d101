"""Target 5: time per page against size, for the fault storm and the KSM scan.

Each size runs the same workloads as targets 2 and 3 (fault_storm.py, ksm_scan.py)
with their baselines; the figure is the flatness of hvsim's series: its time per
page at the largest size over its best time per page at any size (1.0 is flat;
the target allows 1.5, for noise and for caches that a larger working set
outgrows).  A size whose projected time would overrun the budget is skipped and
said so: a series that stops early is itself a result.
"""

import time
from pathlib import Path
from typing import Any

from . import fault_storm, ksm_scan
from .common import Budget, Figure, Series, at_most, interleaved, ratio

FLAT = 1.5
# Projection of a size's time from the previous size's time per page, with room for growth.
MARGIN = 1.5


def _us(rate: float | None) -> float | None:
    return None if not rate else 1e6 / rate


def _flatness(series: list[float | None]) -> float | None:
    measured = [x for x in series if x is not None]
    if len(measured) < 2 or series[-1] is None:
        return None
    return series[-1] / min(measured)


def run(workdir: Path, *, sizes: list[int], quantum: int, budget: Budget, reps: int) -> tuple[
        list[Figure], list[Series], dict[str, Any]]:
    raw: dict[str, Any] = {"fault_storm": [], "ksm": []}
    storm_h: list[float | None] = []
    storm_b: list[float | None] = []
    fresh_h: list[float | None] = []
    merged_h: list[float | None] = []
    limit_f: list[float | None] = []
    limit_m: list[float | None] = []
    storm_notes: list[str] = []
    ksm_notes: list[str] = []
    # Seconds per page of the last size measured, to project the next one.
    storm_cost = ksm_cost = 0.0
    for n in sizes:
        # --- fault storm at n pages
        if storm_cost and not budget.allows(MARGIN * storm_cost * n * reps):
            storm_notes.append(f"{n:,} pages skipped: projected {MARGIN * storm_cost * n * reps:.0f} s "
                               "exceeds the budget")
            storm_h.append(None)
            storm_b.append(None)
        else:
            t0 = time.perf_counter()
            bases, mines = interleaved(reps, lambda: fault_storm.bare_storm(n, quantum)["rate"],  # noqa: B023
                                       lambda: fault_storm.hvsim_storm(workdir, n, quantum)["rate"])  # noqa: B023
            mine, base = max(mines), max(bases)
            storm_cost = (time.perf_counter() - t0) / (n * reps)
            storm_h.append(_us(mine))
            storm_b.append(_us(base))
            raw["fault_storm"].append({"pages": n, "vms": fault_storm.vm_split(n)[0], "hvsim_exits_per_s": mine,
                                       "bare_fills_per_s": base, "reps": reps})
        # --- KSM scan at n pages
        if ksm_cost and not budget.allows(MARGIN * ksm_cost * n):
            ksm_notes.append(f"{n:,} pages skipped: projected {MARGIN * ksm_cost * n:.0f} s exceeds the budget")
            for lst in (fresh_h, merged_h, limit_f, limit_m):
                lst.append(None)
        else:
            samples = []
            for _ in range(reps):  # the best of `reps` workloads, as long as the budget allows
                t0 = time.perf_counter()
                samples.append(ksm_scan.measure(n, merged_passes=3))
                ksm_cost = (time.perf_counter() - t0) / n
                if not budget.allows(MARGIN * ksm_cost * n * (len(sizes) - sizes.index(n))):
                    break
            tops = {key: max(k[key] for k in samples) for key in
                    ("fresh_pages_per_s", "merged_pages_per_s", "limit_fresh_pages_per_s", "limit_merged_pages_per_s")}
            fresh_h.append(_us(tops["fresh_pages_per_s"]))
            merged_h.append(_us(tops["merged_pages_per_s"]))
            limit_f.append(_us(tops["limit_fresh_pages_per_s"]))
            limit_m.append(_us(tops["limit_merged_pages_per_s"]))
            for k in samples:
                k.pop("ksm_counters", None)
            raw["ksm"].append({"pages": n, "best": tops, "samples": samples})
    series = [
        Series("growth_fault_storm", "fault storm: us per first-touch exit", sizes, storm_h, storm_b,
               "bare TLB-fill hook", storm_notes),
        Series("growth_ksm_fresh", "ksmd scan, fresh pages: us per page", sizes, fresh_h, limit_f,
               "numpy page_hash", ksm_notes),
        Series("growth_ksm_merged", "ksmd scan, unchanged merged pages: us per page", sizes, merged_h, limit_m,
               "numpy page_hash", []),
    ]
    figs = []
    shorts = ("fault storm", "ksmd scan, fresh", "ksmd scan, merged")
    for s, num, short in zip(series, ("5a", "5b", "5c"), shorts, strict=True):
        flat = _flatness(s.hvsim_us_per_page)
        last = s.hvsim_us_per_page[-1]
        best = min((x for x in s.hvsim_us_per_page if x is not None), default=None)
        figs.append(Figure(s.key, num, f"growth {s.pages[0]:,}..{s.pages[-1]:,} pages: {short}", last, "us/page",
                           best, "best size", ratio(last, best), [at_most(flat, FLAT, f"largest/best <= {FLAT}")],
                           {"series": s.hvsim_us_per_page, "pages": s.pages}))
    return figs, series, raw
