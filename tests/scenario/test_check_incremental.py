"""--check is incremental (issue #10 item 8): each event is checked where it acts, with a full sweep
now and then.  Broken models are run under it and under a checker that sweeps all of memory at every
event and slice end (what --check did before); both must report the same violation, word for word."""

from collections.abc import Callable
from dataclasses import replace

import pytest

from hypervisor import sim as simulation
from hypervisor.check import CoherenceChecker
from hypervisor.events import Event
from hypervisor.host.mm import HostMm, pte_pfn
from hypervisor.host.mmu_notifier import MmuNotifier
from hypervisor.kvm.kvm_mmu_notifier import KvmMmuNotifier
from hypervisor.kvm.mmu_interface import FaultHooks, IgnoreMmuNotifierRetry, KvmMmu
from hypervisor.sim import KsmConfig, SimConfig, Simulation
from hypervisor.types import Gfn, Hva

from .guests import image


class SweepEveryEvent(CoherenceChecker):
    """The checker as it was: every invariant over all of memory after every event and slice end."""

    def event(self, record: Event, vm: int | None = None) -> None:
        if self.downstream.enabled:
            self.downstream.event(record, vm)
        self.ring.append((self.sim.clock() if self.sim is not None else 0, record, vm))
        self.check(strict_refcount=False)

    def end_of_slice(self) -> None:
        self.ring.append((self.sim.clock() if self.sim is not None else 0, None, None))
        self.check(strict_refcount=True)


class KeepGupPin(FaultHooks):
    """The fault path keeps its GUP pin: one more reference on the page gfn_to_pfn just pinned."""

    def after_gfn_to_pfn(self, mmu: KvmMmu, gfn: Gfn, hva: Hva) -> None:
        mmu.mm.frames.get_page(pte_pfn(mmu.mm.pte(hva)))


def _change_pte_without_rewrite(mmu: KvmMmuNotifier) -> Callable[[MmuNotifier, HostMm, Hva, int], None]:
    """change_pte that bumps mmu_notifier_seq as 2.6.32's does but leaves the spte as it was."""
    def change_pte(mn: MmuNotifier, mm: HostMm, address: Hva, pte: int) -> None:
        mmu.mmu_notifier_seq += 1
    return change_pte


def broken(sim: Simulation, breakage: str) -> None:
    """Break each VM's MMU through its seams (fault-path hooks, the registered notifier ops), not by
    replacing methods: the compiled build's classes (setup.py) call their own methods directly."""
    for vm in sim.vms:
        if breakage == "ignore_retry":
            vm.mmu.hooks = IgnoreMmuNotifierRetry(vm.mmu.hooks)
        elif breakage == "leak_pin":
            vm.mmu.hooks = KeepGupPin()
        elif breakage == "no_change_pte_rewrite":
            vm.mmu.notifier.ops = replace(vm.mmu.notifier.ops, change_pte=_change_pte_without_rewrite(vm.mmu))


def _violation(monkeypatch: pytest.MonkeyPatch, checker: type[CoherenceChecker], profile: str,
               inject: tuple[str, ...], breakage: str) -> str | None:
    monkeypatch.setattr(simulation, "CoherenceChecker", checker)
    cfg = SimConfig(image=image("cowstorm.bin"), vms=2, memory=16 << 20, profile=profile,
                    cmdline="pages=16 passes=6 spin=20000 write_at=3", inject=inject,
                    ksm=KsmConfig(enabled=True, sleep_millisecs=0, pages_to_scan=200))
    sim = Simulation(cfg, check=True)
    broken(sim, breakage)
    result = sim.run()
    return result.violation.split(". Last events:")[0] if result.violation else None


CASES = [
    ("3.7", ("after_gfn_to_pfn:cow@all",), "ignore_retry", "spte-follows-pte"),
    ("6.10", ("after_gfn_to_pfn:invalidate_range@all",), "ignore_retry", "spte-follows-pte"),
    ("2.6.32", ("after_gfn_to_pfn:invalidate_range@all",), "ignore_retry", "spte-follows-pte"),
    ("2.6.32", (), "leak_pin", "refcount-equals-mappings"),
    ("2.6.32", (), "no_change_pte_rewrite", "writable-spte"),
    ("3.7", ("ksm_after_replace_page:cow@all",), "ignore_retry", None),
]


@pytest.mark.parametrize(("profile", "inject", "breakage", "invariant"), CASES)
def test_a_broken_model_is_caught_as_by_a_sweep_at_every_event(
        monkeypatch: pytest.MonkeyPatch, profile: str, inject: tuple[str, ...], breakage: str,
        invariant: str | None) -> None:
    everywhere = _violation(monkeypatch, SweepEveryEvent, profile, inject, breakage)
    incremental = _violation(monkeypatch, CoherenceChecker, profile, inject, breakage)
    assert incremental == everywhere
    if invariant is None:
        assert incremental is None
    else:
        assert incremental is not None and incremental.startswith(f"invariant {invariant} violated")


def test_a_sweep_runs_every_sweep_every_events_and_at_the_end() -> None:
    cfg = SimConfig(image=image("cowstorm.bin"), vms=2, memory=16 << 20,
                    cmdline="pages=16 passes=6 spin=20000 write_at=3",
                    ksm=KsmConfig(enabled=True, sleep_millisecs=0, pages_to_scan=200))
    sim = Simulation(cfg, check=True)
    assert sim.checker is not None
    sim.checker.sweep_every = 100
    result = sim.run()
    assert result.violation is None
    # checks counts events and slice ends; a sweep follows every sweep_every of them (at the
    # next slice end, a few dozen events later at most here), and one ends the run.
    assert sim.checker.checks > 2 * sim.checker.sweep_every
    assert sim.checker.sweeps >= 1 + sim.checker.checks // (2 * sim.checker.sweep_every)
