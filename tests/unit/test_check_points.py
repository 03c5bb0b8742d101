"""--check at the point of change (issue #10 item 8): every event the model emits is judged on the
pages it names, and the MMU can assert one spte right where it writes it (`check_spte`)."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import hypervisor
from hypervisor import events
from hypervisor.check import _HANDLERS, NAMES_NO_PAGE, CoherenceChecker
from hypervisor.errors import InvariantViolation
from hypervisor.host.frames import FramePool
from hypervisor.host.ksm import Ksm
from hypervisor.kvm.spte import make_spte
from hypervisor.kvm.vm import Vm
from hypervisor.types import Gfn, Pfn

from .support import make_guest

MODEL = Path(hypervisor.__file__).parent


@dataclass
class Machine:
    frames: FramePool
    vms: list[Vm]
    ksm: Ksm | None

    def clock(self) -> int:
        return 0


def emitted_events() -> set[type]:
    """Every event record host/, kvm/ and cpu/ emit (`tracer.event(Record(...))`, an exit)."""
    found: set[type] = set()
    for sub in ("host", "kvm", "cpu"):
        for path in (MODEL / sub).rglob("*.py"):
            text = path.read_text()
            found |= {getattr(events, name) for name in re.findall(r"tracer\.event\(\s*(\w+)\(", text)}
            if "_trace_exit(" in text:
                found.add(events.KvmExit)
    return found


def test_every_event_the_model_emits_is_judged_or_declared_to_name_no_page() -> None:
    emitted = emitted_events()
    assert {events.KvmMmuSetSpte, events.MmuNotifierCall, events.KsmMergeOnePage, events.CowKsm} <= emitted
    assert emitted == {*events.RECORDS, events.MmuNotifierCall}
    assert emitted - set(_HANDLERS) - NAMES_NO_PAGE == set()


def _checked_guest() -> tuple[CoherenceChecker, Vm]:
    g = make_guest("3.7", pages=4)
    checker = CoherenceChecker()
    checker.attach(Machine(g.frames, [g.vm], None))  # type: ignore[arg-type]
    g.vcpu.handle_ept_violation(Gfn(1), write=True, rip=0)
    return checker, g.vm


def test_check_spte_accepts_the_spte_a_fault_installed() -> None:
    checker, vm = _checked_guest()
    checker.check_spte(vm, 1)
    checker.end_of_slice()


def test_check_spte_reports_a_spte_that_does_not_follow_its_host_pte_right_where_it_is_written() -> None:
    checker, vm = _checked_guest()
    vm.mmu.sptes[1] = make_spte(Pfn(3), False)
    with pytest.raises(InvariantViolation, match=r"spte-follows-pte violated: vm0 gfn 0x1 .*maps pfn 0x3"):
        checker.check_spte(vm, 1)


def test_an_event_is_checked_on_the_gfn_it_names_and_not_elsewhere() -> None:
    checker, vm = _checked_guest()
    vm.mmu.sptes[2] = make_spte(Pfn(3), True)  # stale, but no event names gfn 2
    checker.event(events.KvmMmuSetSpte(1, int(vm.mmu.sptes[1]), 1), vm=0)
    with pytest.raises(InvariantViolation, match=r"spte-follows-pte violated: vm0 gfn 0x2"):
        checker.event(events.KvmMmuSetSpte(2, int(vm.mmu.sptes[2]), 1), vm=0)


HLT = events.KvmExit(vcpu=0, reason="HLT", rip=0, info1=0, info2=0)


def test_the_sweep_catches_what_no_event_names_at_the_slice_end_after_sweep_every_events() -> None:
    checker, vm = _checked_guest()
    checker.sweep_every = 3
    vm.mmu.sptes[2] = make_spte(Pfn(3), True)
    for _ in range(3):
        checker.event(HLT, vm=0)
    with pytest.raises(InvariantViolation, match=r"spte-follows-pte violated: vm0 gfn 0x2"):
        checker.end_of_slice()


def test_without_slice_ends_the_sweep_runs_at_an_event_after_twice_sweep_every_events() -> None:
    checker, vm = _checked_guest()
    checker.sweep_every = 3
    vm.mmu.sptes[2] = make_spte(Pfn(3), True)
    for _ in range(5):
        checker.event(HLT, vm=0)
    with pytest.raises(InvariantViolation, match=r"spte-follows-pte violated: vm0 gfn 0x2.*Last events:\n.*kvm_exit"):
        checker.event(HLT, vm=0)
