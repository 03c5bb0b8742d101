"""One test per row of the kernel-change table whose effect the other unit tests do not already show.

Each test names the kernel behaviour, the release it changed in and what was read
(the rows of hypervisor/kernels.py cite the trees).
"""

import pytest

from hypervisor.host.mm import pte_pfn, pte_write, pte_wrprotect
from hypervisor.host.mmu_notifier import (
    mmu_notifier_change_pte,
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
)
from hypervisor.kvm.mmu import FaultResult
from hypervisor.kvm.spte import is_shadow_present_pte, spte_to_pfn
from hypervisor.types import PAGE_SIZE, Pfn

from .support import AREA, full_scan, make_guest, make_host, mergeable_area, page_hva, page_of


@pytest.mark.parametrize(("era", "copies"), [("5.8", False), ("5.9", True), ("6.12", True)])
def test_do_wp_page_reuses_by_mapcount_until_5_8_and_by_refcount_from_5_9(era: str, copies: bool) -> None:
    # A private page left read-only (as KSM's write_protect_page leaves one whose merge
    # failed) and held by a GUP reference: 2.6.32 .. 5.8 reuse it (reuse_swap_page looks
    # at the mapcount, 1); 5.9's "mm: do_wp_page() simplification" looks at the refcount
    # (2) and copies, so the holder of the reference keeps the old page.
    host = make_host(era)
    host.mm.mmap(AREA, 4 * PAGE_SIZE)
    host.mm.write_bytes(AREA, b"x")
    host.mm.set_pte_at(AREA, pte_wrprotect(host.mm.pte(AREA)))
    pinned = host.mm.get_user_pages(AREA, write=False)
    host.mm.handle_mm_fault(AREA, write=True)
    assert pte_write(host.mm.pte(AREA))
    assert (pte_pfn(host.mm.pte(AREA)) != pinned) is copies
    host.mm.put_page(pinned)


def test_2_6_32_cmp_and_merge_page_breaks_cow_of_a_ksm_page_the_stable_tree_no_longer_holds() -> None:
    # 2.6.32 mm/ksm.c cmp_and_merge_page: stable_tree_search found nothing and the page is
    # PageKsm ("got here by fork" or a failed break_ksm): break_cow.  2.6.33's stable_node
    # rework dropped that branch: the page stays a KSM page.
    results = {}
    for era in ("2.6.32", "2.6.38"):
        host = make_host(era)
        mergeable_area(host.mm, 2)
        for i in range(2):
            host.mm.write_bytes(page_hva(AREA, i), page_of(0x42))
        host.ksm.set_run(1)
        full_scan(host.ksm)
        full_scan(host.ksm)
        kpfn = pte_pfn(host.mm.pte(AREA))
        assert host.frames.page_ksm(kpfn)
        # The stable tree loses the node while both ptes still map the KSM page.
        for node in list(host.ksm.nodes.values()):
            host.ksm._erase_node(node)
        items = host.ksm.slots[0].vmas[0]
        host.ksm.cmp_and_merge_page(items, 0, kpfn, 0)
        results[era] = (pte_pfn(host.mm.pte(AREA)) != kpfn, host.vmstat.counters["cow_ksm"])
    assert results["2.6.32"] == (True, 1)
    assert results["2.6.38"] == (False, 0)


@pytest.mark.parametrize(("era", "retries"), [("5.11", True), ("5.12", False), ("6.8", False)])
def test_a_fault_outside_the_range_being_invalidated_retries_only_before_5_12(era: str, retries: bool) -> None:
    # Until 5.11 mmu_notifier_retry retries whenever mmu_notifier_count != 0; 5.12's
    # mmu_notifier_retry_hva (6.8: mmu_invalidate_retry_gfn) only for an address inside
    # the recorded range.  A fault inside it retries in every era.
    g = make_guest(era)
    start, end = g.hva(8), g.hva(12)
    mmu_notifier_invalidate_range_start(g.mm, start, end)
    assert (g.fault(2, write=False) is FaultResult.RETRY) is retries
    assert g.fault(9, write=False) is FaultResult.RETRY
    mmu_notifier_invalidate_range_end(g.mm, start, end)
    assert g.vm.mmu.mmu_notifier_range is None
    assert g.fault(9, write=False) is FaultResult.FIXED


@pytest.mark.parametrize(("era", "bumps"), [("2.6.32", True), ("5.12", True), ("5.13", False), ("6.9", False)])
def test_kvm_change_pte_bumps_mmu_notifier_seq_until_5_12(era: str, bumps: bool) -> None:
    # 2.6.32 .. 5.12.9 kvm_mmu_notifier_change_pte: mmu_notifier_seq++; 5.14-rc5 on: no bump
    # (the generic kvm_handle_hva_range walker never touches the sequence).
    g = make_guest(era)
    g.fault(3, write=True)
    seq = g.vm.mmu.mmu_notifier_seq
    mmu_notifier_invalidate_range_start(g.mm, g.hva(3), g.hva(4))
    mmu_notifier_change_pte(g.mm, g.hva(3), g.mm.pte(g.hva(3)))
    assert g.vm.mmu.mmu_notifier_seq - seq == int(bumps)
    mmu_notifier_invalidate_range_end(g.mm, g.hva(3), g.hva(4))


@pytest.mark.parametrize(("era", "rewrites"), [("5.14", True), ("5.15", False)])
def test_kvm_change_pte_outside_an_invalidation_does_nothing_from_5_15(era: str, rewrites: bool) -> None:
    # 5.15 .. 6.9: "if (!kvm->mmu_notifier_count) return;" before the walk.  Only a caller
    # that skipped invalidate_range_start could show it; the model's callers never do.
    g = make_guest(era)
    g.fault(3, write=False)
    new = Pfn(200)
    mmu_notifier_change_pte(g.mm, g.hva(3), pte_wrprotect(new << 12 | 1))
    spte = g.spte(3)
    assert is_shadow_present_pte(spte)
    assert (spte_to_pfn(spte) == new) is rewrites


@pytest.mark.parametrize(("era", "files"), [
    ("6.3", set()), ("6.4", {"general_profit"}), ("6.6", {"general_profit", "ksm_zero_pages"}),
])
def test_general_profit_appears_in_6_4_and_ksm_zero_pages_in_6_6(era: str, files: set[str]) -> None:
    host = make_host(era)
    assert {"general_profit", "ksm_zero_pages"} & set(host.ksm.counters()) == files


@pytest.mark.parametrize(("era", "reuses"), [("5.0", False), ("5.1", True), ("5.8", True), ("5.9", False)])
def test_do_wp_page_reuses_the_last_mapping_of_a_ksm_page_only_from_5_1_to_5_8(era: str, reuses: bool) -> None:
    # 5.1 .. 5.8 do_wp_page: a KSM page with refcount 1 and a stable node is taken over by
    # reuse_ksm_page (no copy, no notifier); 2.6.32 .. 5.0 and 5.9+ always copy a KSM page.
    host = make_host(era)
    mergeable_area(host.mm, 2)
    for i in range(2):
        host.mm.write_bytes(page_hva(AREA, i), page_of(0x42))
    host.ksm.set_run(1)
    full_scan(host.ksm)
    full_scan(host.ksm)
    kpfn = pte_pfn(host.mm.pte(AREA))
    host.mm.write_bytes(page_hva(AREA, 1), b"a")  # the other mapping copies: one left
    assert host.frames.page_ksm(kpfn) and int(host.frames.refcount[kpfn]) == 1
    host.mm.write_bytes(AREA, b"b")
    assert (pte_pfn(host.mm.pte(AREA)) == kpfn) is reuses
    assert host.vmstat.counters["cow_ksm"] == (1 if reuses else 2)
    full_scan(host.ksm)
    assert host.ksm.counters()["pages_shared"] == 0
