"""KVM's TDP fault path (kvm/mmu.py tdp_page_fault) and its mmu_notifier_retry protocol."""

from collections.abc import Callable

import pytest

from hypervisor.host.frames import ZERO_PFN
from hypervisor.host.mm import pte_pfn, pte_wrprotect
from hypervisor.host.mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    set_pte_at_notify,
)
from hypervisor.kvm.exits import ExitReason
from hypervisor.kvm.mmu import FaultResult, TdpMmu
from hypervisor.kvm.spte import (
    SPTE_DIRTY,
    SPTE_HOST_WRITEABLE,
    SPTE_NONPRESENT,
    is_shadow_present_pte,
    is_writable_pte,
    spte_permits,
    spte_to_pfn,
)
from hypervisor.types import PAGE_SIZE, Gfn, Gpa, Hva

from .support import ERAS, AfterGfnToPfn, Guest, is_mapped_writable, make_guest, maps_zero_page

LATER_ERAS = ("3.7", "6.10")


def race(g: Guest, event: Callable[[TdpMmu, Gfn, Hva], None], skip_retry: bool = False) -> None:
    """Fire `event` between gfn_to_pfn and the mmu_lock section of the next fault."""
    g.vm.mmu.hooks = AfterGfnToPfn(event, skip_retry)  # type: ignore[arg-type]


def no_race(g: Guest) -> None:
    g.vm.mmu.hooks = None


# --- the plain fault path ----------------------------------------------------------------


@pytest.mark.parametrize("era", ERAS)
def test_every_ept_violation_counts_one_exit(era: str) -> None:
    g = make_guest(era)
    assert g.vcpu.handle_ept_violation(Gfn(2), write=True, rip=0x1000) is FaultResult.FIXED
    assert g.vcpu.handle_ept_violation(Gfn(3), write=False, rip=0x1004) is FaultResult.FIXED
    assert g.vcpu.stats.exits == 2
    assert g.vcpu.stats.exit_reasons[ExitReason.EPT_VIOLATION] == 2
    assert g.vcpu.stats.pf_fixed == 2 and g.vm.stats.spte_set == 2


def test_a_fault_outside_every_memslot_is_mmio_and_installs_nothing() -> None:
    g = make_guest("3.7", pages=16)
    assert g.vcpu.handle_ept_violation(Gfn(16), write=False, rip=0) is FaultResult.MMIO
    assert g.vcpu.stats.mmio_exits == 1 and g.vcpu.stats.exits == 1
    assert g.vcpu.stats.pf_fixed == 0 and not g.vm.mmu.sptes.any()


@pytest.mark.parametrize("era", ERAS)
def test_a_write_fault_maps_a_fresh_frame_writable_and_dirty_and_keeps_no_pin(era: str) -> None:
    g = make_guest(era)
    assert g.fault(4, write=True) is FaultResult.FIXED
    spte = g.spte(4)
    pfn = g.host_pfn(4)
    assert spte_to_pfn(spte) == pfn != ZERO_PFN
    assert is_writable_pte(spte) and spte & SPTE_HOST_WRITEABLE and spte & SPTE_DIRTY
    assert is_mapped_writable(g.mm, g.hva(4))
    assert int(g.frames.refcount[pfn]) == 1  # only the host pte: KVM released its pin


def test_gfn_to_pfn_pins_for_write_even_on_a_read_fault_in_2_6_32() -> None:
    g = make_guest("2.6.32")
    assert g.fault(4, write=False) is FaultResult.FIXED
    assert g.frames.allocated == 1
    assert is_mapped_writable(g.mm, g.hva(4))
    spte = g.spte(4)
    assert spte_to_pfn(spte) == g.host_pfn(4) != ZERO_PFN
    assert is_writable_pte(spte)
    assert not spte & SPTE_DIRTY


@pytest.mark.parametrize("era", LATER_ERAS)
def test_a_read_fault_maps_the_zero_page_read_only(era: str) -> None:
    g = make_guest(era)
    assert g.fault(4, write=False) is FaultResult.FIXED
    assert g.frames.allocated == 0
    assert maps_zero_page(g.mm, g.hva(4))
    spte = g.spte(4)
    assert spte_to_pfn(spte) == ZERO_PFN
    assert spte_permits(spte, write=False) and not spte_permits(spte, write=True)
    assert not spte & SPTE_HOST_WRITEABLE


@pytest.mark.parametrize("era", LATER_ERAS)
def test_a_read_fault_on_a_page_the_host_maps_writable_is_upgraded_to_writable(era: str) -> None:
    g = make_guest(era)
    g.vm.write_guest(Gpa(4 * PAGE_SIZE), b"data")
    assert g.fault(4, write=False) is FaultResult.FIXED
    assert spte_to_pfn(g.spte(4)) == g.host_pfn(4)
    assert is_writable_pte(g.spte(4)) and g.spte(4) & SPTE_HOST_WRITEABLE
    assert int(g.frames.refcount[g.host_pfn(4)]) == 1


@pytest.mark.parametrize("era", LATER_ERAS)
def test_a_write_after_a_zero_page_read_cows_zaps_and_retries_once(era: str) -> None:
    g = make_guest(era)
    assert g.vcpu.handle_ept_violation(Gfn(4), write=False, rip=0) is FaultResult.FIXED
    seq = g.vm.mmu.mmu_notifier_seq
    # The write: gfn_to_pfn(write) COWs the zero page on the host; the bracket zaps the
    # read-only spte and moves mmu_notifier_seq under the in-flight fault.
    assert g.vcpu.handle_ept_violation(Gfn(4), write=True, rip=0) is FaultResult.RETRY
    assert g.spte(4) == SPTE_NONPRESENT
    assert g.vm.mmu.mmu_notifier_seq > seq and g.vm.mmu.mmu_notifier_count == 0
    assert g.vm.stats.spte_zapped == 1
    assert g.vcpu.stats.pf_retry == 1
    # The guest re-executes the write: now the host pte is writable and the fault sticks.
    assert g.vcpu.handle_ept_violation(Gfn(4), write=True, rip=0) is FaultResult.FIXED
    new = g.host_pfn(4)
    assert new != ZERO_PFN and spte_to_pfn(g.spte(4)) == new and is_writable_pte(g.spte(4))
    assert g.vcpu.stats.exits == 3 and g.vcpu.stats.pf_fixed == 2


# --- races ---------------------------------------------------------------------------------


@pytest.mark.parametrize("era", LATER_ERAS)
def test_a_host_cow_between_gfn_to_pfn_and_mmu_lock_makes_the_fault_retry(era: str) -> None:
    g = make_guest(era)
    calls: list[tuple[int, int]] = []

    def host_write(mmu: TdpMmu, gfn: Gfn, hva: Hva) -> None:
        calls.append((gfn, hva))
        mmu.mm.handle_mm_fault(hva, write=True)  # the VMM writes the zero page: COW

    race(g, host_write)
    assert g.fault(4, write=False) is FaultResult.RETRY
    assert calls == [(4, g.hva(4))]
    assert g.spte(4) == SPTE_NONPRESENT
    assert g.vcpu.stats.pf_retry == 1 and g.vcpu.stats.pf_fixed == 0 and g.vm.stats.spte_set == 0
    no_race(g)
    assert g.fault(4, write=False) is FaultResult.FIXED
    assert spte_to_pfn(g.spte(4)) == g.host_pfn(4) != ZERO_PFN


@pytest.mark.parametrize("era", ERAS)
def test_an_invalidate_range_between_gfn_to_pfn_and_mmu_lock_makes_the_fault_retry_and_drops_the_pin(
    era: str,
) -> None:
    g = make_guest(era)
    g.mm.write_bytes(g.hva(4), b"x")
    pfn = g.host_pfn(4)

    def invalidate(mmu: TdpMmu, gfn: Gfn, hva: Hva) -> None:
        assert int(mmu.mm.frames.refcount[pfn]) == 2  # the fault's GUP pin is held here
        mmu_notifier_invalidate_range_start(mmu.mm, hva, Hva(hva + PAGE_SIZE))
        mmu_notifier_invalidate_range_end(mmu.mm, hva, Hva(hva + PAGE_SIZE))

    race(g, invalidate)
    assert g.fault(4, write=True) is FaultResult.RETRY
    assert g.spte(4) == SPTE_NONPRESENT
    assert int(g.frames.refcount[pfn]) == 1


def test_a_ksm_style_write_protect_between_gfn_to_pfn_and_mmu_lock_makes_the_fault_retry_in_2_6_32() -> None:
    g = make_guest("2.6.32")

    def write_protect(mmu: TdpMmu, gfn: Gfn, hva: Hva) -> None:
        set_pte_at_notify(mmu.mm, hva, pte_wrprotect(mmu.mm.pte(hva)))  # change_pte: seq++

    race(g, write_protect)
    assert g.fault(4, write=True) is FaultResult.RETRY
    assert g.spte(4) == SPTE_NONPRESENT


def test_a_host_event_that_notifies_nobody_does_not_force_a_retry() -> None:
    g = make_guest("2.6.32")

    def host_write(mmu: TdpMmu, gfn: Gfn, hva: Hva) -> None:
        mmu.mm.handle_mm_fault(hva, write=True)  # already writable after the write pin

    race(g, host_write)
    assert g.fault(4, write=False) is FaultResult.FIXED


@pytest.mark.parametrize("era", ERAS)
def test_a_fault_while_an_invalidate_range_is_in_progress_retries_until_it_ends(era: str) -> None:
    g = make_guest(era)
    start, end = g.hva(0), g.hva(16)
    mmu_notifier_invalidate_range_start(g.mm, start, end)
    assert g.vm.mmu.mmu_notifier_count == 1
    assert g.fault(4, write=True) is FaultResult.RETRY
    assert g.fault(4, write=False) is FaultResult.RETRY
    assert not g.vm.mmu.sptes.any()
    mmu_notifier_invalidate_range_end(g.mm, start, end)
    assert g.fault(4, write=True) is FaultResult.FIXED
    assert is_shadow_present_pte(g.spte(4))


def test_a_retried_fault_releases_the_page_it_pinned() -> None:
    g = make_guest("2.6.32")
    g.vm.mmu.mmu_notifier_count = 1
    assert g.fault(4, write=False) is FaultResult.RETRY
    pfn = g.host_pfn(4)  # gfn_to_pfn faulted it in writable (2.6.32), then the fault gave up
    assert int(g.frames.refcount[pfn]) == 1 and int(g.frames.mapcount[pfn]) == 1


@pytest.mark.parametrize("era", LATER_ERAS)
def test_without_the_retry_check_a_racing_cow_leaves_the_spte_on_the_stale_page(era: str) -> None:
    g = make_guest(era)
    race(g, lambda mmu, gfn, hva: mmu.mm.handle_mm_fault(hva, write=True), skip_retry=True)
    assert g.fault(4, write=False) is FaultResult.FIXED
    # The guest now reads the zero page while the host (the VMM) has its own copy.
    assert spte_to_pfn(g.spte(4)) == ZERO_PFN
    assert pte_pfn(g.mm.pte(g.hva(4))) != ZERO_PFN
