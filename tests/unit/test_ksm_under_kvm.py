"""A KSM merge under a guest's sptes, per era: the change_pte story without Unicorn.

The guest is played by direct calls to the vCPU's EPT_VIOLATION handler; an access
"needs an exit" exactly when spte_permits() says the hardware walk would fail.
"""

import pytest

from hypervisor.host.mm import MADV_MERGEABLE, pte_pfn
from hypervisor.kvm.mmu import FaultResult, TdpMmu
from hypervisor.kvm.spte import SPTE_HOST_WRITEABLE, SPTE_NONPRESENT, is_writable_pte, spte_permits, spte_to_pfn
from hypervisor.kvm.vm import GUEST_RAM_HVA
from hypervisor.types import PAGE_SIZE, Gfn, Gpa, Hva, Pfn

from .support import ERAS, AfterGfnToPfn, Guest, full_scan, is_mapped_writable, make_guest, page_of, shared_and_sharing

PAGES = 8
MERGED = (0, 1)


def guest_with_merged_pages(era: str, change_pte: bool = True) -> tuple[Guest, Pfn]:
    """Guest RAM is mergeable; gfns 0 and 1 hold equal data and are mapped by sptes; then KSM merges them."""
    g = make_guest(era, change_pte, pages=PAGES)
    g.mm.madvise(GUEST_RAM_HVA, PAGES * PAGE_SIZE, MADV_MERGEABLE)
    for gfn in MERGED:
        g.vm.write_guest(Gpa(gfn * PAGE_SIZE), page_of(0x33))
    for gfn in range(2, PAGES):
        g.vm.write_guest(Gpa(gfn * PAGE_SIZE), page_of(gfn))
    for gfn in MERGED:
        assert g.vcpu.handle_ept_violation(Gfn(gfn), write=False, rip=0) is FaultResult.FIXED
    g.host.ksm.set_run(1)
    full_scan(g.host.ksm)
    full_scan(g.host.ksm)
    assert shared_and_sharing(g.host.ksm) == (1, 1)
    kpfn = g.host_pfn(0)
    assert g.host_pfn(1) == kpfn and g.frames.page_ksm(kpfn)
    g.vcpu.stats.exits = 0
    return g, kpfn


def test_2_6_32_change_pte_repoints_the_sptes_read_only_at_the_ksm_page_without_a_zap() -> None:
    g, kpfn = guest_with_merged_pages("2.6.32")
    for gfn in MERGED:
        spte = g.spte(gfn)
        assert spte_to_pfn(spte) == kpfn
        assert spte_permits(spte, write=False) and not spte_permits(spte, write=True)
        assert not spte & SPTE_HOST_WRITEABLE
    assert g.vm.stats.spte_zapped == 0
    assert g.vm.stats.spte_changed == 4  # write_protect_page and replace_page, for each page


@pytest.mark.parametrize("era", ["3.7", "6.10"])
def test_later_eras_zap_the_sptes_of_merged_pages(era: str) -> None:
    g, _ = guest_with_merged_pages(era)
    assert [g.spte(gfn) for gfn in MERGED] == [SPTE_NONPRESENT, SPTE_NONPRESENT]
    assert g.vm.stats.spte_changed == 0 and g.vm.stats.spte_zapped == 2


@pytest.mark.parametrize("era", ["3.7", "6.10"])
def test_later_eras_refault_a_merged_page_read_only_with_one_exit_and_keep_the_merge(era: str) -> None:
    g, kpfn = guest_with_merged_pages(era)
    for gfn in MERGED:
        assert g.vcpu.handle_ept_violation(Gfn(gfn), write=False, rip=0) is FaultResult.FIXED
        assert spte_to_pfn(g.spte(gfn)) == kpfn and not is_writable_pte(g.spte(gfn))
    assert g.vcpu.stats.exits == 2
    assert g.host.vmstat.counters["cow_ksm"] == 0
    assert g.host_pfn(0) == g.host_pfn(1) == kpfn


def test_2_6_32_without_change_pte_zaps_and_the_next_read_exits_twice_and_unmerges() -> None:
    g, kpfn = guest_with_merged_pages("2.6.32", change_pte=False)
    assert g.spte(0) == SPTE_NONPRESENT
    assert g.vm.mmu.notifier.calls["invalidate_page"] == 4
    # gfn_to_pfn pins for write: the guest's read breaks KSM's sharing through a host COW,
    # whose notification makes that fault retry; the re-executed read then sticks.
    assert g.vcpu.handle_ept_violation(Gfn(0), write=False, rip=0) is FaultResult.RETRY
    assert g.vcpu.handle_ept_violation(Gfn(0), write=False, rip=0) is FaultResult.FIXED
    assert g.vcpu.stats.exits == 2
    assert g.host.vmstat.counters["cow_ksm"] == 1
    assert g.host_pfn(0) != kpfn and is_mapped_writable(g.mm, g.hva(0))
    assert spte_to_pfn(g.spte(0)) == g.host_pfn(0)


@pytest.mark.parametrize(
    ("era", "calls"),
    [
        ("2.6.32", {"change_pte": 4}),
        ("3.7", {"invalidate_range_start": 3, "change_pte": 3, "invalidate_range_end": 3}),
        ("6.10", {"invalidate_range_start": 3, "invalidate_range_end": 3}),
    ],
)
def test_kvm_receives_the_merge_as_each_era_sends_it(era: str, calls: dict[str, int]) -> None:
    g, _ = guest_with_merged_pages(era)
    assert dict(g.vm.mmu.notifier.calls) == calls


@pytest.mark.parametrize("era", ERAS)
def test_a_guest_write_to_a_merged_page_costs_two_exits_and_one_cow(era: str) -> None:
    g, kpfn = guest_with_merged_pages(era)
    if era != "2.6.32":
        assert g.vcpu.handle_ept_violation(Gfn(0), write=False, rip=0) is FaultResult.FIXED
        g.vcpu.stats.exits = 0
    assert not spte_permits(g.spte(0), write=True)
    assert g.vcpu.handle_ept_violation(Gfn(0), write=True, rip=0) is FaultResult.RETRY
    assert g.spte(0) == SPTE_NONPRESENT
    assert g.vcpu.handle_ept_violation(Gfn(0), write=True, rip=0) is FaultResult.FIXED
    assert g.vcpu.stats.exits == 2
    assert g.host.vmstat.counters["cow_ksm"] == 1
    new = g.host_pfn(0)
    assert new != kpfn and spte_to_pfn(g.spte(0)) == new and is_writable_pte(g.spte(0))
    assert g.vm.read_guest(Gpa(0), PAGE_SIZE) == page_of(0x33)
    # The other guest page still shares the KSM page.
    assert g.host_pfn(1) == kpfn


def test_ksm_does_not_merge_a_page_kvm_has_pinned_mid_fault() -> None:
    g = make_guest("2.6.32", pages=PAGES)
    g.mm.madvise(GUEST_RAM_HVA, PAGES * PAGE_SIZE, MADV_MERGEABLE)
    g.vm.write_guest(Gpa(0), page_of(0x33) * 2)
    g.host.ksm.set_run(1)
    full_scan(g.host.ksm)
    pinned: list[int] = []

    def ksmd_runs(mmu: TdpMmu, gfn: Gfn, hva: Hva) -> None:
        pfn = pte_pfn(mmu.mm.pte(hva))
        pinned.append(int(mmu.mm.frames.refcount[pfn]) - int(mmu.mm.frames.mapcount[pfn]))
        full_scan(g.host.ksm)

    g.vm.mmu.hooks = AfterGfnToPfn(ksmd_runs)  # type: ignore[arg-type]
    g.fault(0, write=False)
    assert pinned == [1]
    assert shared_and_sharing(g.host.ksm) == (0, 0)
    assert is_mapped_writable(g.mm, g.hva(0))
