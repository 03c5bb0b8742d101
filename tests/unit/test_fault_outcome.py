"""The fault path says what it did (FaultOutcome.work), --perf-kvm-stat prices each exit by it; set_spte.

Kernel facts: sndrzt/linux-2.6.32 virt/kvm/kvm_main.c gfn_to_pfn() pins with
get_user_pages_fast(write=1), so a read fault on a KSM page breaks its COW; without
->change_pte, mm/mmu_notifier.c __mmu_notifier_change_pte() falls back to
->invalidate_page, which bumps mmu_notifier_seq, and arch/x86/kvm/mmu.c
tdp_page_fault() then gives up on mmu_notifier_retry().
"""

from collections import Counter

import pytest

from hypervisor.costs import CostModel
from hypervisor.errors import InvariantViolation
from hypervisor.kvm.exits import ExitReason
from hypervisor.kvm.mmu import FaultResult, FaultWork, check_spte_change
from hypervisor.kvm.mmu_interface import SpteChange
from hypervisor.kvm.spte import SPTE_ACCESSED, SPTE_NONPRESENT, make_spte, spte_to_pfn
from hypervisor.types import PAGE_SIZE, Gfn, Gpa, Pfn

from .support import ERAS, AfterGfnToPfn, make_guest, page_of
from .test_ksm_under_kvm import guest_with_merged_pages

EPT = ExitReason.EPT_VIOLATION


def ept_work(counter: Counter[tuple[ExitReason, str]]) -> dict[str, int]:
    return {work: n for (reason, work), n in counter.items() if reason is EPT}


def test_2_6_32_without_change_pte_reread_of_a_merged_page_is_priced_as_the_cow_it_is() -> None:
    g, _ = guest_with_merged_pages("2.6.32", change_pte=False)
    g.vcpu.exit_work.clear()
    # The re-read breaks the merge (a host COW), whose invalidate_page makes the fault retry.
    assert g.vcpu.handle_ept_violation(Gfn(0), write=False, rip=0) is FaultResult.RETRY
    assert g.host.vmstat.counters["cow_ksm"] == 1
    assert ept_work(g.vcpu.exit_work) == {"cow": 1}
    # The re-executed read finds the page present and only maps it.
    assert g.vcpu.handle_ept_violation(Gfn(0), write=False, rip=0) is FaultResult.FIXED
    assert ept_work(g.vcpu.exit_work) == {"cow": 1, "map": 1}
    model = CostModel()
    assert model.exit_cycles("EPT_VIOLATION", "cow") > model.exit_cycles("EPT_VIOLATION", "retry")


@pytest.mark.parametrize("era", ERAS)
def test_first_touch_is_a_host_fault_and_a_refault_of_a_present_page_a_map(era: str) -> None:
    g = make_guest(era, pages=4)
    outcome = g.mmu.page_fault(g.vcpu, Gfn(1), True)
    assert (outcome.result, outcome.work) == (FaultResult.FIXED, FaultWork.HOST_FAULT)
    g.vm.write_guest(Gpa(2 * PAGE_SIZE), page_of(7))
    outcome = g.mmu.page_fault(g.vcpu, Gfn(2), False)
    assert (outcome.result, outcome.work) == (FaultResult.FIXED, FaultWork.MAP)


def test_a_gfn_outside_every_memslot_is_mmio_work() -> None:
    g = make_guest("2.6.32", pages=4)
    outcome = g.mmu.page_fault(g.vcpu, Gfn(4096), False)
    assert (outcome.result, outcome.work) == (FaultResult.MMIO, FaultWork.MMIO)


def test_a_retry_without_host_paging_work_is_priced_as_a_retry() -> None:
    g = make_guest("2.6.32", pages=4)
    g.vm.write_guest(Gpa(0), page_of(1))

    def notifier_runs(mmu: object, gfn: Gfn, hva: int) -> None:
        g.vm.mmu.mmu_notifier_seq += 1  # as a notifier between gfn_to_pfn and mmu_lock

    g.vm.mmu.hooks = AfterGfnToPfn(notifier_runs)
    assert g.vcpu.handle_ept_violation(Gfn(0), write=True, rip=0) is FaultResult.RETRY
    assert ept_work(g.vcpu.exit_work) == {"retry": 1}


def test_check_asserts_at_the_point_of_change_that_a_present_spte_is_not_repointed_writable() -> None:
    """6.8 tdp_mmu.c handle_changed_spte(): a present leaf never becomes a present leaf of another pfn
    (2.6.32's change_pte rewrite is the exception, and it is read-only)."""
    g = make_guest("2.6.32", pages=4)
    g.vm.mmu.spte_check = check_spte_change
    g.vm.write_guest(Gpa(0), page_of(1))
    assert g.vcpu.handle_ept_violation(Gfn(0), write=True, rip=0) is FaultResult.FIXED
    old = g.spte(0)
    other = make_spte(Pfn(spte_to_pfn(old) + 1), writable=True)
    with pytest.raises(InvariantViolation, match="spte-change"):
        g.mmu.set_spte(Gfn(0), old, other, SpteChange.REPOINT)
    readonly = make_spte(Pfn(spte_to_pfn(old) + 1), writable=False)
    assert g.mmu.set_spte(Gfn(0), old, readonly, SpteChange.REPOINT) is True  # flush: the pfn changed


def test_set_spte_decides_the_flush_and_the_counters_by_the_kind_of_change() -> None:
    g = make_guest("3.7", pages=4)
    mmu = g.mmu
    spte = make_spte(Pfn(5), writable=True, accessed=False)
    assert mmu.set_spte(Gfn(1), 0, spte, SpteChange.INSTALL) is False
    assert mmu.set_spte(Gfn(1), spte, spte | SPTE_ACCESSED, SpteChange.WALK) is False
    assert mmu.set_spte(Gfn(1), spte | SPTE_ACCESSED, spte, SpteChange.AGE) is True
    assert mmu.set_spte(Gfn(1), spte, SPTE_NONPRESENT, SpteChange.ZAP) is True
    assert (g.vm.stats.spte_set, g.vm.stats.spte_zapped, g.vm.stats.spte_changed) == (1, 1, 0)
