"""Issue #10 item 8: the cost of `--check` on a 3-VM, 64 MiB KSM-churn run, side by side with the plain run.

The workload is `hvsim run cowstorm --vms 3 --memory 64M --ksm --ksm-sleep-ms 0`
(ksmd wakes after every time slice): pages merge across the VMs, then the write pass
COW-breaks every merged page; every exit, notifier call and ksmd step is an event
the checker judges.  Both sides run `Simulation.run()` in this process (setup
excluded), alternating, median of the repetitions; the figure is the ratio
checked / plain.  `python -m benchmarks.check_cost` prints both sides alone.
"""

import sys
import time

from hypervisor.sim import GUEST_IMAGES, KsmConfig, SimConfig, Simulation

from .baselines import BenchmarkError
from .common import Budget, Figure, at_most, collect, median, ratio

TARGET = 1.5
CMDLINE = "pages=64 passes=40 spin=100000 write_at=30"  # cowstorm's defaults
QUICK_CMDLINE = "pages=16 passes=6 spin=20000 write_at=3"


def config(vms: int, memory_mib: int, cmdline: str) -> SimConfig:
    return SimConfig(image=str(GUEST_IMAGES / "cowstorm.bin"), vms=vms, memory=memory_mib << 20, cmdline=cmdline,
                     ksm=KsmConfig(enabled=True, sleep_millisecs=0))


def timed_run(cfg: SimConfig, check: bool) -> tuple[float, Simulation]:
    sim = Simulation(cfg, check=check)
    t0 = time.perf_counter()
    result = sim.run()
    seconds = time.perf_counter() - t0
    if result.errors or result.violation:
        raise BenchmarkError(f"cowstorm run failed: {result.violation or result.errors}")
    return seconds, sim


def run(*, vms: int, memory_mib: int, cmdline: str, reps: int, budget: Budget) -> Figure:
    cfg = config(vms, memory_mib, cmdline)
    plain: list[float] = []
    checked: list[float] = []
    checks = sweeps = 0
    for i in range(max(1, reps)):
        t0 = time.perf_counter()
        collect()
        plain.append(timed_run(cfg, False)[0])
        collect()
        seconds, sim = timed_run(cfg, True)
        checked.append(seconds)
        if sim.checker is not None:
            checks, sweeps = sim.checker.checks, sim.checker.sweeps
        if i + 1 < reps and not budget.allows(time.perf_counter() - t0):
            break
    collect()
    hv, base = median(checked), median(plain)
    r = ratio(hv, base)
    return Figure("check_cost", "6", f"--check cost: cowstorm --vms {vms} --memory {memory_mib}M --ksm "
                  f"--ksm-sleep-ms 0 (run only)", hv, "s", base, "the same run without --check", r,
                  [at_most(r, TARGET, f"<= {TARGET} x plain")],
                  {"checked_s": checked, "plain_s": plain, "cmdline": cmdline, "checks": checks, "sweeps": sweeps,
                   "timing": "Simulation.run(), setup excluded, wall clock"})


def main() -> int:
    cmdline = sys.argv[1] if len(sys.argv) > 1 else CMDLINE
    cfg = config(3, 64, cmdline)
    for check in (False, True, False, True):
        seconds, sim = timed_run(cfg, check)
        extra = f", {sim.checker.checks} checks, {sim.checker.sweeps} sweeps" if sim.checker is not None else ""
        print(f"check={check!s:5} {seconds:6.2f} s{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
