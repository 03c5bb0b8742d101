"""Target 1: steady-state guest speed, hvsim against raw Unicorn on the same code and time slicing.

The guest (`compute` in guests.py) sweeps a small working set forever: loads,
multiplies, stores, 9 instructions per 64-byte line.  hvsim runs it through the
whole Simulation scheduler (one VM, default quantum); after a warm-up that maps
the working set and lets Unicorn's TLB settle, the instructions retired over the
next `measure` instructions are timed from the scheduler's own slice boundaries.
Raw Unicorn runs the same bytes with all memory mapped and `count=` slices.
"""

import time
from pathlib import Path
from typing import Any

from hypervisor.sim import SimConfig, Simulation

from .baselines import BenchmarkError, RawUnicorn
from .common import Budget, Figure, at_least, interleaved, ratio
from .guests import HEAP, image_bytes, write_image


def _memory_for(pages: int) -> int:
    return max(4 << 20, HEAP + pages * 4096)


def hvsim_rate(workdir: Path, ws_pages: int, quantum: int, warm: int, measure: int) -> float:
    image = write_image(workdir, "compute", ws_pages)
    sim = Simulation(SimConfig(image=str(image), memory=_memory_for(ws_pages), quantum=quantum,
                               max_insns=warm + measure + 4 * quantum))
    marks: dict[str, float] = {}

    def on_slice(s: Simulation) -> None:
        if "t0" not in marks:
            if s.now >= warm:
                marks["i0"], marks["t0"] = s.now, time.perf_counter()
        elif s.now >= marks["i0"] + measure:
            marks["i1"], marks["t1"] = s.now, time.perf_counter()
            s.interrupted = True

    sim.on_slice.append(on_slice)
    result = sim.run()
    if "t1" not in marks:
        raise BenchmarkError(f"compute guest stopped early: {result.errors or result.vms[0].state}")
    return (marks["i1"] - marks["i0"]) / (marks["t1"] - marks["t0"])


def raw_rate(ws_pages: int, quantum: int, warm: int, measure: int) -> float:
    raw = RawUnicorn(image_bytes("compute", ws_pages), _memory_for(ws_pages))
    raw.run(warm, quantum)
    t0 = time.perf_counter()
    raw.run(measure, quantum)
    return measure / (time.perf_counter() - t0)


def run(workdir: Path, *, ws_pages: int, quantum: int, warm: int, measure: int, reps: int,
        budget: Budget) -> Figure:
    base, mine = interleaved(reps, lambda: raw_rate(ws_pages, quantum, warm, measure),
                             lambda: hvsim_rate(workdir, ws_pages, quantum, warm, measure), budget)
    best_raw, best_hv = max(base), max(mine)
    r = ratio(best_hv, best_raw)
    details: dict[str, Any] = {
        "working_set_pages": ws_pages, "quantum": quantum, "warmup_insns": warm, "measured_insns": measure,
        "hvsim_insn_per_s": mine, "raw_unicorn_insn_per_s": base,
    }
    return Figure("guest_speed", "1", f"guest speed, compute loop over {ws_pages} mapped pages", best_hv,
                  "insn/s", best_raw, "raw Unicorn, count= slices", r,
                  [at_least(r, 0.8, ">= 0.8 x raw")], details)
