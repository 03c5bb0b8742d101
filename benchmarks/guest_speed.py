"""Target 1: guest speed, hvsim against hook-free Unicorn on the same bundled guests (issue #13).

Each workload is a bundled assembly guest with small parameters, run to its end:
a compute loop (`samepage`'s register-only spin), `memtouch` (a write pass and
read passes over its pages) and `kernels` (the identical-kernels guest).  Timing
is in-process: hvsim's side is `Simulation.run()` of one VM (setup excluded,
everything else included: time slices, exits, the scheduler); the baseline is
benchmarks/hookfree.py, the same boot state in Unicorn's own MMU, memory
pre-mapped, one `emu_start` over the whole program, a hook on OUT only (setup
excluded).  Both consoles must be identical: the same instructions ran.  The old
baseline (issue #6) is the same guest on the same hook-free Unicorn in `count=`
slices of the quantum, which makes Unicorn check a counter before every
instruction.  Rates are guest instructions (hvsim's count) per second.
"""

import time
from dataclasses import dataclass
from typing import Any

from hypervisor.sim import GUEST_IMAGES, SimConfig, Simulation

from .baselines import BenchmarkError
from .common import Budget, Figure, at_least, median, ratio
from .hookfree import HookFreeGuest

TARGET = 0.5


@dataclass(frozen=True)
class Workload:
    number: str
    title: str
    guest: str
    cmdline: str
    memory_mib: int


FULL = (
    Workload("1a", "compute loop (samepage spin)", "samepage", "pages=16 passes=4 spin=5000000", 8),
    Workload("1b", "memtouch", "memtouch", "pages=2048 passes=8", 16),
    Workload("1c", "kernels", "kernels", "kernel=2048 private=16 passes=10 spin=20000", 16),
)
QUICK = (
    Workload("1a", "compute loop (samepage spin)", "samepage", "pages=16 passes=2 spin=200000", 4),
    Workload("1b", "memtouch", "memtouch", "pages=256 passes=2", 4),
    Workload("1c", "kernels", "kernels", "kernel=256 private=16 passes=2 spin=20000", 4),
)


def _image(w: Workload) -> str:
    return str(GUEST_IMAGES / f"{w.guest}.bin")


def hvsim_run(w: Workload, quantum: int) -> tuple[int, float, bytes]:
    """(instructions, seconds of Simulation.run(), console)."""
    sim = Simulation(SimConfig(image=_image(w), memory=w.memory_mib << 20, cmdline=w.cmdline, quantum=quantum))
    t0 = time.perf_counter()
    result = sim.run()
    seconds = time.perf_counter() - t0
    if result.errors or result.vms[0].exit_status != 0:
        raise BenchmarkError(f"{w.guest} failed under hvsim: {result.errors or result.vms[0].state}")
    return result.sim_insns, seconds, bytes(sim.devices[0].console)


def hookfree_run(w: Workload, quantum: int | None) -> tuple[float, bytes]:
    """(seconds in emu_start, console); with a quantum, in count= slices (the old baseline)."""
    g = HookFreeGuest(_image(w), w.memory_mib << 20, w.cmdline)
    seconds = g.run() if quantum is None else g.run_in_slices(quantum)
    if g.exit_status != 0:
        raise BenchmarkError(f"{w.guest} exited with {g.exit_status} on hook-free Unicorn")
    return seconds, bytes(g.console)


def measure(w: Workload, quantum: int, reps: int, budget: Budget) -> Figure:
    free: list[float] = []
    sliced: list[float] = []
    mine: list[float] = []
    insns = 0
    for i in range(max(1, reps)):
        t0 = time.perf_counter()
        s_free, console_free = hookfree_run(w, None)
        insns, s_mine, console = hvsim_run(w, quantum)
        s_sliced, console_sliced = hookfree_run(w, quantum)
        if not console == console_free == console_sliced:
            raise BenchmarkError(f"{w.guest}: hvsim and hook-free Unicorn printed different consoles")
        free.append(insns / s_free)
        mine.append(insns / s_mine)
        sliced.append(insns / s_sliced)
        if i + 1 < reps and not budget.allows(time.perf_counter() - t0):
            break
    hv, base, old = median(mine), median(free), median(sliced)
    r = ratio(hv, base)
    details: dict[str, Any] = {"guest": w.guest, "cmdline": w.cmdline, "memory_mib": w.memory_mib,
                               "instructions": insns, "quantum": quantum, "timing": "in-process, setup excluded",
                               "hvsim_insn_per_s": mine, "hookfree_insn_per_s": free, "count_slices_insn_per_s": sliced}
    return Figure(f"guest_speed_{w.guest}", w.number,
                  f"guest speed, {w.title}: {w.cmdline}, {insns / 1e6:.3g} M insns", hv, "insn/s", base,
                  "hook-free Unicorn", r, [at_least(r, TARGET, f">= {TARGET} x hook-free")], details,
                  old_baseline=old, old_baseline_name="Unicorn count= slices", old_ratio=ratio(hv, old))


def run(*, quick: bool, quantum: int, reps: int, budget: Budget) -> list[Figure]:
    return [measure(w, quantum, reps, budget) for w in (QUICK if quick else FULL)]
