"""The cost model behind `--perf-kvm-stat`: simulated cycles per exit, by reason and by what the host did.

hvsim counts exits exactly but does not time them; `perf kvm stat` users want time.
The defaults below are round, order-of-magnitude figures, not measurements of this
machine: a VM exit/entry round trip of about a thousand cycles on recent Intel parts
(the range kvm-unit-tests' x86/vmexit.c reports for cpuid and vmcall), an exit to
userspace and back (QEMU emulating a port) an order of magnitude more, and the host
work of an EPT violation on top of the round trip: the fault path and spte install,
a host page fault (allocate and zero a page), or a copy-on-write (allocate and copy).
Agesen et al., "Software Techniques for Avoiding Hardware Virtualization Exits"
(USENIX ATC 2012) discuss why these costs matter.  Override any of them with
`--exit-cost NAME=CYCLES` and the clock with `--cpu-mhz`.
"""

from dataclasses import dataclass, field

from .errors import ConfigError
from .kvm.exits import ExitReason

DEFAULT_CPU_MHZ = 2000

DEFAULT_CYCLES: dict[str, int] = {
    # one VM exit + entry, handled in the kernel
    "exit": 1200,
    # extra for an exit KVM passes to userspace (port I/O emulated by the VMM)
    "userspace": 12000,
    # extra for an EPT violation: the fault path, GUP of a present page, spte install
    "EPT_VIOLATION.map": 1500,
    # extra when GUP had to fault the host page in (allocate + zero 4 KiB)
    "EPT_VIOLATION.host_fault": 4000,
    # extra when GUP broke copy-on-write (allocate + copy 4 KiB + notifier calls)
    "EPT_VIOLATION.cow": 6000,
    # extra for a fault that lost the mmu_notifier_retry race (GUP done, result dropped)
    "EPT_VIOLATION.retry": 2500,
}


@dataclass
class CostModel:
    cycles: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_CYCLES))
    cpu_mhz: int = DEFAULT_CPU_MHZ

    def exit_cycles(self, reason: str, work: str) -> int:
        c = self.cycles
        total = c["exit"] + c.get(reason, 0)
        if work == "userspace":
            total += c["userspace"]
        elif work:
            total += c.get(f"{reason}.{work}", 0)
        return total

    def microseconds(self, cycles: float) -> float:
        return cycles / self.cpu_mhz

    def override(self, specs: tuple[str, ...]) -> None:
        for spec in specs:
            name, _, value = spec.partition("=")
            if name not in cost_names():
                raise ConfigError(f"--exit-cost {spec!r}: unknown name {name!r}; names: {', '.join(cost_names())}.")
            try:
                cycles = int(value)
            except ValueError:
                raise ConfigError(f"--exit-cost {spec!r}: write NAME=CYCLES, e.g. EPT_VIOLATION.cow=8000.") from None
            if cycles < 0:
                raise ConfigError(f"--exit-cost {spec!r}: cycles cannot be negative.")
            self.cycles[name] = cycles


def cost_names() -> tuple[str, ...]:
    """What --exit-cost can set: the entries above, and an exit reason (extra cycles on each exit of it)."""
    return (*DEFAULT_CYCLES, *(r.name for r in ExitReason))
