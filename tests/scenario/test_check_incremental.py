"""--check is incremental (issue #10 item 8): each event is checked where it acts, with a full sweep
now and then.  Broken models are run under it and under a checker that sweeps all of memory at every
event and slice end (what --check did before); both must report the same violation, word for word."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from hypervisor import sim as simulation
from hypervisor.check import CoherenceChecker
from hypervisor.events import Event
from hypervisor.kvm.mmu import TdpMmu
from hypervisor.kvm.mmu_interface import FaultOutcome, IgnoreMmuNotifierRetry
from hypervisor.kvm.vcpu import Vcpu
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


def _leaky_fault(original: Callable[[TdpMmu, Vcpu, Gfn, bool], FaultOutcome]) -> Callable[..., FaultOutcome]:
    def fault(self: TdpMmu, vcpu: Vcpu, gfn: Gfn, write: bool) -> FaultOutcome:
        put = self.mm.put_page
        self.mm.put_page = lambda pfn: None  # type: ignore[method-assign]
        try:
            return original(self, vcpu, gfn, write)
        finally:
            self.mm.put_page = put  # type: ignore[method-assign]
    return fault


def _no_rewrite(self: TdpMmu, hva: Hva, pte: int) -> None:
    return None


@contextmanager
def broken(monkeypatch: pytest.MonkeyPatch, breakage: str) -> Iterator[None]:
    with monkeypatch.context() as m:
        if breakage == "leak_pin":  # the fault path keeps its GUP pin
            m.setattr(TdpMmu, "page_fault", _leaky_fault(TdpMmu.page_fault))
        elif breakage == "no_change_pte_rewrite":  # change_pte leaves the spte as it was
            m.setattr(TdpMmu, "kvm_set_spte_hva", _no_rewrite)
        yield


def _violation(monkeypatch: pytest.MonkeyPatch, checker: type[CoherenceChecker], profile: str,
               inject: tuple[str, ...], breakage: str) -> str | None:
    monkeypatch.setattr(simulation, "CoherenceChecker", checker)
    cfg = SimConfig(image=image("cowstorm.bin"), vms=2, memory=16 << 20, profile=profile,
                    cmdline="pages=16 passes=6 spin=20000 write_at=3", inject=inject,
                    ksm=KsmConfig(enabled=True, sleep_millisecs=0, pages_to_scan=200))
    with broken(monkeypatch, breakage):
        sim = Simulation(cfg, check=True)
        if breakage == "ignore_retry":
            for vm in sim.vms:
                vm.mmu.hooks = IgnoreMmuNotifierRetry(vm.mmu.hooks)
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
