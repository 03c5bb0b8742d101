"""Time series of a run, sampled at the end of every vCPU turn on the host CPU (for `--plot`)."""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .kvm.exits import ExitReason

if TYPE_CHECKING:
    from .sim import Simulation


@dataclass
class TimeSeries:
    label: str
    insns_per_ms: int
    ksm: bool = False  # KSM was on: the sharing counters mean something
    t_ms: list[float] = field(default_factory=list)
    ept_exits: list[int] = field(default_factory=list)
    pages_shared: list[int] = field(default_factory=list)
    pages_sharing: list[int] = field(default_factory=list)

    def sample(self, sim: "Simulation") -> None:
        ept = sum(v.stats.exit_reasons.get(ExitReason.EPT_VIOLATION, 0) for vm in sim.vms for v in vm.vcpus)
        counters = sim.ksm.counters() if sim.ksm is not None else {}
        self.t_ms.append(sim.now / self.insns_per_ms)
        self.ept_exits.append(ept)
        self.pages_shared.append(counters.get("pages_shared", 0))
        self.pages_sharing.append(counters.get("pages_sharing", 0))

    @classmethod
    def attach(cls, sim: "Simulation", label: str) -> "TimeSeries":
        series = cls(label, sim.config.insns_per_ms, sim.ksm is not None)
        sim.on_slice.append(series.sample)
        return series
