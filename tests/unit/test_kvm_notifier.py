"""KVM's mmu_notifier callbacks (kvm/mmu.py), per the reference's "KVM's side"."""

import pytest

from hypervisor.host.mm import mk_pte
from hypervisor.host.mmu_notifier import (
    mmu_notifier_change_pte,
    mmu_notifier_clear_flush_young,
    mmu_notifier_invalidate_page,
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_release,
    mmu_notifier_unregister,
)
from hypervisor.kvm.mmu import FaultResult
from hypervisor.kvm.spte import (
    SPTE_DIRTY,
    SPTE_EXECUTABLE,
    SPTE_HOST_WRITEABLE,
    SPTE_NONPRESENT,
    SPTE_READABLE,
    is_accessed_spte,
    is_shadow_present_pte,
    is_writable_pte,
    spte_to_pfn,
)
from hypervisor.types import PAGE_SIZE, Hva, Pfn

from .support import ERAS, Guest, make_guest

CHANGE_PTE_ERAS = ("2.6.32", "3.7")


def guest_with_sptes(era: str, gfns: tuple[int, ...] = (3,), change_pte: bool = True) -> Guest:
    """A guest whose vCPU has write-faulted `gfns` in: present, writable sptes."""
    g = make_guest(era, change_pte)
    for gfn in gfns:
        assert g.fault(gfn, write=True) is FaultResult.FIXED
        assert is_writable_pte(g.spte(gfn))
    return g


@pytest.mark.parametrize(
    ("era", "change_pte", "has_change_pte", "has_invalidate_page"),
    [
        ("2.6.32", True, True, True),
        ("2.6.32", False, False, True),
        ("3.7", True, True, True),
        ("3.7", False, False, True),
        ("6.10", True, False, False),
    ],
)
def test_kvm_registers_the_ops_its_era_has(
    era: str, change_pte: bool, has_change_pte: bool, has_invalidate_page: bool
) -> None:
    g = make_guest(era, change_pte)
    ops = g.vm.mmu.notifier.ops
    assert g.mm.mmu_notifiers == [g.vm.mmu.notifier]
    assert (ops.change_pte is not None) == has_change_pte
    assert (ops.invalidate_page is not None) == has_invalidate_page
    assert ops.release and ops.clear_flush_young and ops.invalidate_range_start and ops.invalidate_range_end


@pytest.mark.parametrize("era", CHANGE_PTE_ERAS)
def test_change_pte_with_a_read_only_pte_rewrites_the_spte_in_place_read_only(era: str) -> None:
    g = guest_with_sptes(era)
    g.vcpu.stats.tlb_flush = 0
    mmu = g.vm.mmu
    old = g.spte(3) | SPTE_DIRTY
    mmu.sptes[3] = old
    new_pfn = g.frames.alloc_page()
    seq, count = mmu.mmu_notifier_seq, mmu.mmu_notifier_count
    mmu_notifier_change_pte(g.mm, g.hva(3), mk_pte(new_pfn, writable=False))
    spte = g.spte(3)
    assert spte_to_pfn(spte) == new_pfn
    assert is_shadow_present_pte(spte) and not is_writable_pte(spte)
    assert not spte & SPTE_HOST_WRITEABLE
    assert spte & SPTE_READABLE and spte & SPTE_EXECUTABLE and spte & SPTE_DIRTY and is_accessed_spte(spte)
    assert g.vm.stats.spte_changed == 1 and g.vm.stats.spte_zapped == 0
    # One flush, one kick of the vCPU in guest mode; 2.6.32..3.7 serve it without counting tlb_flush.
    assert g.vm.stats.remote_tlb_flush == 1 and g.vcpu.stats.irq_exits == 1 and g.vcpu.stats.tlb_flush == 0
    assert (mmu.mmu_notifier_seq, mmu.mmu_notifier_count) == (seq + 1, count)


@pytest.mark.parametrize("era", CHANGE_PTE_ERAS)
def test_change_pte_with_a_writable_pte_zaps_the_spte(era: str) -> None:
    g = guest_with_sptes(era)
    mmu = g.vm.mmu
    seq = mmu.mmu_notifier_seq
    mmu_notifier_change_pte(g.mm, g.hva(3), mk_pte(g.frames.alloc_page(), writable=True))
    assert g.spte(3) == SPTE_NONPRESENT
    assert g.vm.stats.spte_zapped == 1 and g.vm.stats.spte_changed == 0
    assert g.vm.stats.remote_tlb_flush == 1
    assert mmu.mmu_notifier_seq == seq + 1


@pytest.mark.parametrize("era", CHANGE_PTE_ERAS)
def test_change_pte_of_a_page_kvm_does_not_map_only_bumps_the_sequence(era: str) -> None:
    g = guest_with_sptes(era)
    mmu = g.vm.mmu
    seq = mmu.mmu_notifier_seq
    mmu_notifier_change_pte(g.mm, g.hva(5), mk_pte(Pfn(1), writable=False))
    mmu_notifier_change_pte(g.mm, Hva(0x1000), mk_pte(Pfn(1), writable=False))  # outside every memslot
    assert mmu.mmu_notifier_seq == seq + 2
    assert g.vm.stats.remote_tlb_flush == 0
    assert g.vm.stats.spte_changed == 0 and g.vm.stats.spte_zapped == 0
    assert is_writable_pte(g.spte(3))


def test_change_pte_reaches_kvm_without_change_pte_as_invalidate_page_and_zaps_in_2_6_32() -> None:
    g = guest_with_sptes("2.6.32", change_pte=False)
    mmu = g.vm.mmu
    seq = mmu.mmu_notifier_seq
    mmu_notifier_change_pte(g.mm, g.hva(3), mk_pte(Pfn(1), writable=False))
    assert g.spte(3) == SPTE_NONPRESENT
    assert g.vm.stats.spte_changed == 0 and g.vm.stats.spte_zapped == 1
    assert mmu.notifier.calls["invalidate_page"] == 1 and mmu.notifier.calls["change_pte"] == 0
    assert mmu.mmu_notifier_seq == seq + 1


@pytest.mark.parametrize("era", CHANGE_PTE_ERAS)
def test_invalidate_page_zaps_the_spte_and_bumps_the_sequence(era: str) -> None:
    g = guest_with_sptes(era, gfns=(3, 4))
    mmu = g.vm.mmu
    seq, count = mmu.mmu_notifier_seq, mmu.mmu_notifier_count
    mmu_notifier_invalidate_page(g.mm, g.hva(3))
    assert g.spte(3) == SPTE_NONPRESENT
    assert is_writable_pte(g.spte(4))
    assert g.vm.stats.spte_zapped == 1 and g.vm.stats.remote_tlb_flush == 1
    assert (mmu.mmu_notifier_seq, mmu.mmu_notifier_count) == (seq + 1, count)
    # Nothing left to zap: the sequence still moves, but no flush is needed.
    mmu_notifier_invalidate_page(g.mm, g.hva(3))
    assert mmu.mmu_notifier_seq == seq + 2 and g.vm.stats.remote_tlb_flush == 1


@pytest.mark.parametrize("era", ERAS)
def test_invalidate_range_start_zaps_the_range_and_raises_the_count_and_end_bumps_seq_and_lowers_it(
    era: str,
) -> None:
    g = guest_with_sptes(era, gfns=(1, 2, 3, 4, 8))
    mmu = g.vm.mmu
    seq = mmu.mmu_notifier_seq
    start, end = g.hva(2), g.hva(5)
    mmu_notifier_invalidate_range_start(g.mm, start, end)
    assert [g.spte(gfn) == SPTE_NONPRESENT for gfn in (1, 2, 3, 4, 8)] == [False, True, True, True, False]
    assert g.vm.stats.spte_zapped == 3 and g.vm.stats.remote_tlb_flush == 1
    assert (mmu.mmu_notifier_seq, mmu.mmu_notifier_count) == (seq, 1)
    mmu_notifier_invalidate_range_end(g.mm, start, end)
    assert (mmu.mmu_notifier_seq, mmu.mmu_notifier_count) == (seq + 1, 0)
    assert g.vm.stats.remote_tlb_flush == 1


def test_nested_invalidate_ranges_keep_the_count_raised_until_the_last_end() -> None:
    g = guest_with_sptes("6.10")
    mmu = g.vm.mmu
    a, b = g.hva(0), g.hva(16)
    mmu_notifier_invalidate_range_start(g.mm, a, b)
    mmu_notifier_invalidate_range_start(g.mm, a, Hva(a + PAGE_SIZE))
    assert mmu.mmu_notifier_count == 2
    mmu_notifier_invalidate_range_end(g.mm, a, Hva(a + PAGE_SIZE))
    assert mmu.mmu_notifier_count == 1
    mmu_notifier_invalidate_range_end(g.mm, a, b)
    assert mmu.mmu_notifier_count == 0 and mmu.mmu_notifier_seq == 2


@pytest.mark.parametrize("era", ["3.7", "6.10"])
def test_clear_flush_young_clears_the_spte_accessed_bit_and_reports_young(era: str) -> None:
    g = guest_with_sptes(era)
    mmu = g.vm.mmu
    seq = mmu.mmu_notifier_seq
    assert is_accessed_spte(g.spte(3))
    assert mmu_notifier_clear_flush_young(g.mm, g.hva(3)) is True
    assert is_shadow_present_pte(g.spte(3)) and not is_accessed_spte(g.spte(3))
    assert is_writable_pte(g.spte(3))
    assert g.vm.stats.remote_tlb_flush == 1
    assert mmu_notifier_clear_flush_young(g.mm, g.hva(3)) is False
    assert g.vm.stats.remote_tlb_flush == 1
    assert mmu.mmu_notifier_seq == seq


def test_2_6_32_kvm_age_rmapp_under_ept_always_answers_old_and_leaves_the_spte() -> None:
    # 2.6.32 kvm_age_rmapp: "always return old for EPT" when shadow_accessed_mask is 0,
    # as it is with EPT (sndrzt/linux-2.6.32 arch/x86/kvm/mmu.c).
    g = guest_with_sptes("2.6.32")
    before = g.spte(3)
    assert mmu_notifier_clear_flush_young(g.mm, g.hva(3)) is False
    assert g.spte(3) == before
    assert g.vm.stats.remote_tlb_flush == 0


@pytest.mark.parametrize("era", ["2.6.34", "3.5"])
def test_kvm_age_rmapp_without_ept_accessed_bits_zaps_a_present_spte_and_answers_young(era: str) -> None:
    # 2.6.34 .. 3.5 kvm_age_rmapp: emulate the accessed bit for EPT by zapping the spte
    # (kvm_unmap_rmapp); the next guest access faults it back in.
    g = guest_with_sptes(era)
    assert mmu_notifier_clear_flush_young(g.mm, g.hva(3)) is True
    assert not is_shadow_present_pte(g.spte(3))
    assert g.vm.stats.remote_tlb_flush == 1
    assert mmu_notifier_clear_flush_young(g.mm, g.hva(3)) is False


@pytest.mark.parametrize("era", ["3.7", "6.10"])
def test_page_referenced_sees_a_guest_access_through_kvm_after_the_host_bit_is_cleared(era: str) -> None:
    g = guest_with_sptes(era)
    assert g.mm.page_referenced(g.hva(3))  # host pte young
    g.vm.mmu.sptes[3] |= 1 << 8  # the guest touched it again: EPT sets the accessed bit
    assert g.mm.page_referenced(g.hva(3))  # host pte old, the spte young
    assert not g.mm.page_referenced(g.hva(3))


@pytest.mark.parametrize("era", ERAS)
def test_release_zaps_every_spte(era: str) -> None:
    g = guest_with_sptes(era, gfns=(0, 5, 15))
    mmu_notifier_release(g.mm)
    assert not g.vm.mmu.sptes.any()
    assert g.vm.stats.spte_zapped == 3
    assert g.vm.stats.mmu_shadow_zapped == 1  # one leaf table covers gfns 0..511
    assert g.vm.stats.remote_tlb_flush == 1
    assert g.mm.mmu_notifiers == []


def test_unregistering_kvm_zaps_every_spte_through_release() -> None:
    g = guest_with_sptes("3.7", gfns=(1, 2))
    mmu_notifier_unregister(g.vm.mmu.notifier, g.mm)
    assert not g.vm.mmu.sptes.any()


def test_release_of_a_vm_with_no_sptes_flushes_nothing() -> None:
    g = make_guest("2.6.32")
    mmu_notifier_release(g.mm)
    assert g.vm.stats.remote_tlb_flush == 0 and g.vm.stats.mmu_shadow_zapped == 0


@pytest.mark.parametrize("era", ERAS)
def test_munmap_of_guest_ram_zaps_every_spte(era: str) -> None:
    g = guest_with_sptes(era, gfns=(0, 7))
    g.mm.munmap(g.hva(0), 16 * PAGE_SIZE)
    assert not g.vm.mmu.sptes.any()
    assert g.vm.mmu.mmu_notifier_count == 0
    assert g.frames.allocated == 0
