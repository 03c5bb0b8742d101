"""Guest speed and exits per second with 1, 2 and 4 vCPUs per VM (issue #16).

One VM runs `samepage_smp` (each vCPU fills and re-reads its share of identical pages) with
KSM merging them under 2.6.32 (two remote TLB flushes per merged page, each kicking every
running vCPU) and 3.7 (one flush and one EPT violation per page).  hvsim's side is
`Simulation.run()` (setup excluded).  Rates: guest instructions (all vCPUs) per wall second,
and exits of every reason (EXTERNAL_INTERRUPT kicks among them) per wall second; the
baseline of each figure is the same run with one vCPU.
"""

import time
from typing import Any

from hypervisor.sim import GUEST_IMAGES, KsmConfig, SimConfig, Simulation

from .baselines import BenchmarkError
from .common import Budget, Figure, median, ratio

VCPUS = (1, 2, 4)
FULL_CMDLINE = "pages=256 passes=20 spin=200000"
QUICK_CMDLINE = "pages=32 passes=4 spin=20000"


def smp_run(profile: str, vcpus: int, cmdline: str) -> tuple[int, int, int, float]:
    """(instructions, exits, kicks, seconds of Simulation.run())."""
    cfg = SimConfig(image=str(GUEST_IMAGES / "samepage_smp.bin"), memory=16 << 20, cmdline=cmdline, vcpus=vcpus,
                    profile=profile, ksm=KsmConfig(enabled=True, sleep_millisecs=1, pages_to_scan=1000),
                    insns_per_ms=10_000)
    with Simulation(cfg) as sim:
        t0 = time.perf_counter()
        result = sim.run()
        seconds = time.perf_counter() - t0
    vm = result.vms[0]
    if result.errors or vm.exit_status != 0:
        raise BenchmarkError(f"samepage_smp --vcpus {vcpus} failed: {result.errors or vm.state}")
    return vm.insns, sum(vm.exits.values()), vm.exits.get("EXTERNAL_INTERRUPT", 0), seconds


def run(*, quick: bool, reps: int, budget: Budget) -> list[Figure]:
    cmdline = QUICK_CMDLINE if quick else FULL_CMDLINE
    figures = []
    for profile in ("2.6.32", "3.7"):
        speeds: dict[int, float] = {}
        for vcpus in VCPUS:
            rates: list[float] = []
            exit_rates: list[float] = []
            insns = exits = kicks = 0
            for i in range(max(1, reps)):
                t0 = time.perf_counter()
                insns, exits, kicks, seconds = smp_run(profile, vcpus, cmdline)
                rates.append(insns / seconds)
                exit_rates.append(exits / seconds)
                if i + 1 < reps and not budget.allows(time.perf_counter() - t0):
                    break
            speeds[vcpus] = median(rates)
            details: dict[str, Any] = {"profile": profile, "vcpus": vcpus, "cmdline": cmdline, "instructions": insns,
                                       "exits": exits, "kicks": kicks, "insn_per_s": rates,
                                       "exits_per_s": exit_rates, "exits_per_s_median": median(exit_rates)}
            figures.append(Figure(
                f"smp_{profile}_{vcpus}vcpu", "16", f"SMP guest speed, samepage_smp --vcpus {vcpus} --kernel {profile} "
                f"with KSM: {insns / 1e6:.3g} M insns, {exits} exits ({kicks} kicks), "
                f"{median(exit_rates):,.0f} exits/s", speeds[vcpus], "insn/s", speeds[1], "1 vCPU",
                ratio(speeds[vcpus], speeds[1]), [], details))
    return figures
