"""Corners of KVM's side (kvm/vcpu.py, kvm/vm.py) that the scenarios never reach: no Unicorn."""

import pytest

from hypervisor.kvm.exits import (
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_EXECUTABLE,
    EPT_VIOLATION_READABLE,
    EPT_VIOLATION_WRITABLE,
    ExitReason,
)
from hypervisor.kvm.mmu import FaultResult
from hypervisor.kvm.mmu_interface import IgnoreMmuNotifierRetry
from hypervisor.kvm.spte import make_spte
from hypervisor.kvm.vcpu import ept_exit_qualification
from hypervisor.types import PAGE_SIZE, Gfn, Gpa, Pfn

from .support import make_guest


def test_ept_exit_qualification_names_the_access_and_everything_the_spte_allowed() -> None:
    # SDM 27-7: bits 0-2 the access (read, write, fetch), bits 3-5 what the EPT entry permitted.
    spte = make_spte(Pfn(7), writable=True)
    assert ept_exit_qualification(write=False, fetch=True, spte=spte) == (
        EPT_VIOLATION_ACC_INSTR | EPT_VIOLATION_READABLE | EPT_VIOLATION_WRITABLE | EPT_VIOLATION_EXECUTABLE)
    assert ept_exit_qualification(write=True, fetch=False, spte=0) == EPT_VIOLATION_ACC_WRITE
    assert ept_exit_qualification(write=False, fetch=False, spte=make_spte(Pfn(7), writable=False)) == (
        EPT_VIOLATION_ACC_READ | EPT_VIOLATION_READABLE | EPT_VIOLATION_EXECUTABLE)


@pytest.mark.parametrize("era", ["3.7", "6.10"])
def test_a_fault_that_cows_and_skips_the_retry_check_is_costed_as_a_cow(era: str) -> None:
    # Only with the test-only switch off can a COWing fault complete: every COW notifies, so the
    # retry check would otherwise send the guest back in ("retry").
    g = make_guest(era)
    assert g.vcpu.handle_ept_violation(Gfn(2), write=False, rip=0) is FaultResult.FIXED
    g.vm.mmu.hooks = IgnoreMmuNotifierRetry()
    assert g.vcpu.handle_ept_violation(Gfn(2), write=True, rip=0) is FaultResult.FIXED
    assert g.vcpu.exit_work[(ExitReason.EPT_VIOLATION, "cow")] == 1


def test_a_gpa_outside_every_memslot_has_no_hva_and_the_vmm_cannot_read_or_write_it() -> None:
    g = make_guest(pages=4)
    outside = Gpa(4 * PAGE_SIZE)
    assert g.vm.gpa_to_hva(outside) is None
    with pytest.raises(ValueError, match="outside every memslot"):
        g.vm.read_guest(outside, 1)
    with pytest.raises(ValueError, match="not inside one memslot"):
        g.vm.write_guest(outside, b"x")


def test_a_vmm_write_that_runs_past_the_end_of_guest_ram_is_refused_whole() -> None:
    g = make_guest(pages=4)
    allocated = g.mm.frames.allocated
    with pytest.raises(ValueError, match="not inside one memslot"):
        g.vm.write_guest(Gpa(4 * PAGE_SIZE - 2), b"abcd")
    assert g.mm.frames.allocated == allocated  # nothing was written, not even the bytes that fit

