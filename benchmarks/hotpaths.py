"""cProfile of the three hot paths, each on the workload of its benchmark (`--profile`).

* tlb_fill:    the refill passes of fault_storm.py (TLB fills on present sptes, no exit);
* fault_path:  the first-touch storm of fault_storm.py (every fill is an EPT_VIOLATION);
* ksmd_fresh:  the first full ksmd pass of ksm_scan.py;
* ksmd_merged: a full pass over unchanged, already merged pages.

Each entry is a function's own time (tottime) per event of its workload (one
fill, one exit, one scanned page), so that a profile taken before an
optimisation and one taken after read side by side.  cProfile slows Python code
down by about 2x, unevenly: read the shares, not the absolute times.
"""

import cProfile
import pstats
from pathlib import Path
from typing import Any

from . import fault_storm, ksm_scan
from .common import REPO_ROOT


def _top(profiler: cProfile.Profile, events: int, top: int) -> dict[str, Any]:
    st = pstats.Stats(profiler)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = st.stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in raw.values())
    rows = []
    for (path, line, func), (_cc, nc, tt, ct, _callers) in sorted(raw.items(), key=lambda kv: -kv[1][2])[:top]:
        try:
            where = str(Path(path).resolve().relative_to(REPO_ROOT))
        except ValueError:
            where = Path(path).name if path != "~" else ""
        name = f"{where}:{line}({func})" if where else func
        rows.append({"function": name, "calls_per_event": nc / events, "tottime_us_per_event": 1e6 * tt / events,
                     "cumtime_us_per_event": 1e6 * ct / events, "share_of_total": tt / total if total else 0.0})
    return {"events": events, "total_us_per_event": 1e6 * total / events, "top": rows}


def profile_all(workdir: Path, *, storm_pages: int, refill_pages: int, ksm_pages: int, quantum: int,
                top: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pr = cProfile.Profile()
    r = fault_storm.hvsim_refill(workdir, refill_pages, 2, quantum, profiler=pr)
    out["tlb_fill"] = _top(pr, int(r["fills"]), top)
    pr = cProfile.Profile()
    s = fault_storm.hvsim_storm(workdir, storm_pages, quantum, profiler=pr)
    out["fault_path"] = _top(pr, int(s["exits"]), top)
    w = ksm_scan.KsmWorkload(ksm_pages)
    pr = cProfile.Profile()
    pages, _ = w.full_pass(profiler=pr)
    out["ksmd_fresh"] = _top(pr, pages, top)
    w.full_pass()
    pr = cProfile.Profile()
    pages, _ = w.full_pass(profiler=pr)
    out["ksmd_merged"] = _top(pr, pages, top)
    return out


def render(profiles: dict[str, Any]) -> str:
    lines = []
    for name, p in profiles.items():
        lines.append(f"{name}: {p['events']:,} events, {p['total_us_per_event']:.2f} us/event under cProfile")
        lines.append(f"  {'own us/ev':>9} {'cum us/ev':>9} {'calls/ev':>8} {'share':>6}  function")
        for row in p["top"]:
            lines.append(f"  {row['tottime_us_per_event']:9.3f} {row['cumtime_us_per_event']:9.3f} "
                         f"{row['calls_per_event']:8.2f} {100 * row['share_of_total']:5.1f}%  {row['function']}")
    return "\n".join(lines)
