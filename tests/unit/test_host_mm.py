"""HostMm (host/mm.py): demand faults, copy-on-write, GUP, munmap and VMM access to memory."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.host.frames import ZERO_PFN
from hypervisor.host.mm import (
    MADV_MERGEABLE,
    SegmentationFault,
    mk_pte,
    pte_pfn,
    pte_present,
    pte_write,
    pte_wrprotect,
    pte_young,
)
from hypervisor.types import PAGE_SIZE, Hva

from .support import AREA, ERAS, Host, NotifierLog, is_mapped_writable, make_host, maps_zero_page, page_hva, page_of

P0, P1 = AREA, page_hva(AREA, 1)


def host_with_area(era: str = "3.7", pages: int = 4) -> Host:
    host = make_host(era)
    host.mm.mmap(AREA, pages * PAGE_SIZE)
    return host


def write_protect(host: Host, hva: Hva) -> None:
    host.mm.set_pte_at(hva, pte_wrprotect(host.mm.pte(hva)))


# --- VMAs --------------------------------------------------------------------------------


def test_mmap_refuses_unaligned_empty_and_overlapping_ranges() -> None:
    host = host_with_area()
    with pytest.raises(ValueError):
        host.mm.mmap(Hva(0x2000_0001), PAGE_SIZE)
    with pytest.raises(ValueError):
        host.mm.mmap(Hva(0x2000_0000), 100)
    with pytest.raises(ValueError):
        host.mm.mmap(Hva(0x2000_0000), 0)
    with pytest.raises(ValueError, match="overlaps"):
        host.mm.mmap(Hva(AREA - PAGE_SIZE), 2 * PAGE_SIZE)


def test_find_vma_finds_the_mapping_holding_an_address_and_none_outside() -> None:
    host = host_with_area(pages=4)
    other = host.mm.mmap(Hva(0x3000_0000), PAGE_SIZE)
    vma = host.mm.find_vma(Hva(AREA + 4 * PAGE_SIZE - 1))
    assert vma is not None and vma.start == AREA and vma.nr_pages == 4
    assert host.mm.find_vma(Hva(AREA + 4 * PAGE_SIZE)) is None
    assert host.mm.find_vma(Hva(AREA - 1)) is None
    assert host.mm.find_vma(Hva(0x3000_0000)) is other


def test_find_vma_cache_goes_with_an_unmapped_vma() -> None:
    """2.6.32 mm/mmap.c: find_vma() caches the VMA it found in mm->mmap_cache, and
    detach_vmas_to_be_unmapped() kills the cache, so an unmapped range is never found again."""
    host = host_with_area(pages=4)
    other = host.mm.mmap(Hva(0x3000_0000), PAGE_SIZE)
    vma = host.mm.find_vma(Hva(AREA + PAGE_SIZE))
    assert vma is not None and host.mm.mmap_cache is vma
    host.mm.munmap(AREA, 4 * PAGE_SIZE)
    assert host.mm.mmap_cache is None
    assert host.mm.find_vma(Hva(AREA + PAGE_SIZE)) is None
    assert host.mm.find_vma(Hva(0x3000_0000)) is other and host.mm.mmap_cache is other


def test_madvise_mergeable_marks_the_vma_and_registers_the_mm_with_ksm() -> None:
    host = host_with_area(pages=4)
    host.mm.madvise(AREA, 4 * PAGE_SIZE, MADV_MERGEABLE)
    vma = host.mm.find_vma(AREA)
    assert vma is not None and vma.mergeable
    assert [slot.mm for slot in host.ksm.slots] == [host.mm]


def test_madvise_on_part_of_a_vma_is_refused() -> None:
    host = host_with_area(pages=4)
    with pytest.raises(ValueError):
        host.mm.madvise(AREA, PAGE_SIZE, MADV_MERGEABLE)


# --- demand faults -----------------------------------------------------------------------


def test_read_fault_maps_the_zero_page_read_only_without_allocating() -> None:
    host = host_with_area()
    host.mm.handle_mm_fault(P0, write=False)
    assert maps_zero_page(host.mm, P0)
    assert not pte_write(host.mm.pte(P0))
    assert host.frames.allocated == 0


def test_write_fault_allocates_a_zeroed_writable_frame_mapped_once() -> None:
    host = host_with_area()
    # Leave garbage in the frame the fault will get.
    dirty = host.frames.alloc_page()
    host.frames.frames[dirty].fill(0x5A)
    host.frames.put_page(dirty)
    host.mm.handle_mm_fault(P0, write=True)
    pfn = pte_pfn(host.mm.pte(P0))
    assert pfn == dirty
    assert is_mapped_writable(host.mm, P0)
    assert not host.frames.frames[pfn].any()
    assert (int(host.frames.refcount[pfn]), int(host.frames.mapcount[pfn])) == (1, 1)


def test_a_fault_outside_every_vma_is_a_segmentation_fault() -> None:
    host = host_with_area()
    with pytest.raises(SegmentationFault):
        host.mm.handle_mm_fault(Hva(0x5000_0000), write=False)


def test_write_fault_on_the_zero_page_copies_on_write_to_a_fresh_zeroed_frame() -> None:
    host = host_with_area()
    host.mm.handle_mm_fault(P0, write=False)
    host.mm.handle_mm_fault(P0, write=True)
    pfn = pte_pfn(host.mm.pte(P0))
    assert pfn != ZERO_PFN
    assert is_mapped_writable(host.mm, P0)
    assert not host.frames.frames[pfn].any()
    assert host.frames.allocated == 1
    assert host.vmstat.counters["cow_ksm"] == 0


def test_do_wp_page_reuses_an_exclusively_owned_anon_page_without_notifying() -> None:
    host = host_with_area("2.6.32")
    host.mm.write_bytes(P0, b"mine")
    pfn = pte_pfn(host.mm.pte(P0))
    write_protect(host, P0)
    log = NotifierLog()
    log.register(host.mm)
    host.mm.handle_mm_fault(P0, write=True)
    assert pte_pfn(host.mm.pte(P0)) == pfn
    assert is_mapped_writable(host.mm, P0)
    assert log.entries == []
    assert host.frames.allocated == 1


def test_do_wp_page_copies_a_page_another_pte_maps_and_does_not_count_cow_ksm() -> None:
    host = host_with_area()
    host.mm.write_bytes(P0, b"shared")
    pfn = pte_pfn(host.mm.pte(P0))
    # As after fork: a second read-only pte maps the same frame.
    host.frames.page_add_rmap(pfn)
    host.mm.set_pte_at(P1, mk_pte(pfn, writable=False))
    write_protect(host, P0)
    host.mm.handle_mm_fault(P0, write=True)
    new = pte_pfn(host.mm.pte(P0))
    assert new != pfn
    assert is_mapped_writable(host.mm, P0)
    assert host.mm.read_bytes(P0, 6) == b"shared"
    assert pte_pfn(host.mm.pte(P1)) == pfn
    assert (int(host.frames.refcount[pfn]), int(host.frames.mapcount[pfn])) == (1, 1)
    assert host.vmstat.counters["cow_ksm"] == 0


def test_do_wp_page_always_copies_a_ksm_page_and_counts_cow_ksm() -> None:
    host = host_with_area()
    host.mm.write_bytes(P0, b"ksm")
    pfn = pte_pfn(host.mm.pte(P0))
    host.frames.stable_node[pfn] = 0  # PageKsm, mapped by this pte only
    write_protect(host, P0)
    host.mm.handle_mm_fault(P0, write=True)
    assert pte_pfn(host.mm.pte(P0)) != pfn
    assert host.mm.read_bytes(P0, 3) == b"ksm"
    assert host.frames.is_free(pfn)
    assert host.vmstat.counters["cow_ksm"] == 1


def test_a_write_fault_on_a_present_writable_pte_only_marks_it_young_and_dirty() -> None:
    host = host_with_area()
    host.mm.handle_mm_fault(P0, write=True)
    pte = host.mm.pte(P0)
    host.mm.set_pte_at(P0, pte & ~(1 << 5))
    host.mm.handle_mm_fault(P0, write=True)
    assert host.mm.pte(P0) == pte
    assert host.frames.allocated == 1


@pytest.mark.parametrize(
    ("era", "expected"),
    [
        # 2.6.32 do_wp_page: ptep_clear_flush + set_pte_at_notify only, no trailing
        # invalidate_page (sndrzt/linux-2.6.32 mm/memory.c; mm/memory.c calls none).
        ("2.6.32", ["change_pte"]),
        ("2.6.38", ["change_pte"]),
        ("3.7", ["invalidate_range_start", "change_pte", "invalidate_range_end"]),
        ("6.10", ["invalidate_range_start", "invalidate_range_end"]),
    ],
)
def test_do_wp_page_copy_notifies_secondary_mmus_as_each_kernel_does(era: str, expected: list[str]) -> None:
    host = host_with_area(era)
    host.mm.handle_mm_fault(P0, write=False)
    log = NotifierLog()
    log.register(host.mm)
    host.mm.handle_mm_fault(P0, write=True)
    assert log.callbacks() == expected
    new_pte = host.mm.pte(P0)
    for _, callback, args in log.entries:
        if callback == "change_pte":
            assert args == (P0, new_pte) and pte_write(new_pte)
        elif callback.startswith("invalidate_range"):
            assert args == (P0, P0 + PAGE_SIZE)
        else:
            assert args == (P0,)


# --- get_user_pages ----------------------------------------------------------------------


def test_get_user_pages_for_write_breaks_cow_and_pins_the_new_page() -> None:
    host = host_with_area()
    host.mm.handle_mm_fault(P0, write=False)
    pfn = host.mm.get_user_pages(P0, write=True)
    assert pfn != ZERO_PFN
    assert pte_pfn(host.mm.pte(P0)) == pfn and is_mapped_writable(host.mm, P0)
    assert (int(host.frames.refcount[pfn]), int(host.frames.mapcount[pfn])) == (2, 1)
    host.mm.put_page(pfn)
    assert int(host.frames.refcount[pfn]) == 1


def test_get_user_pages_for_read_maps_the_zero_page_and_pins_nothing() -> None:
    host = host_with_area()
    assert host.mm.get_user_pages(P0, write=False) == ZERO_PFN
    assert maps_zero_page(host.mm, P0)
    assert host.frames.allocated == 0


def test_get_user_pages_fast_only_never_faults() -> None:
    host = host_with_area()
    assert host.mm.get_user_pages_fast_only(P0, write=False) is None
    assert host.mm.get_user_pages_fast_only(P0, write=True) is None
    assert host.mm.pte(P0) == 0
    host.mm.handle_mm_fault(P0, write=False)
    assert host.mm.get_user_pages_fast_only(P0, write=True) is None
    assert maps_zero_page(host.mm, P0)
    assert host.mm.get_user_pages_fast_only(P0, write=False) == ZERO_PFN
    assert host.mm.get_user_pages_fast_only(Hva(0x5000_0000), write=False) is None


def test_get_user_pages_fast_only_pins_a_page_the_pte_already_allows() -> None:
    host = host_with_area()
    host.mm.handle_mm_fault(P0, write=True)
    pfn = host.mm.get_user_pages_fast_only(P0, write=True)
    assert pfn == pte_pfn(host.mm.pte(P0))
    assert int(host.frames.refcount[pfn]) == 2


def test_get_user_pages_outside_every_vma_is_a_segmentation_fault() -> None:
    host = host_with_area()
    with pytest.raises(SegmentationFault):
        host.mm.get_user_pages(Hva(0x5000_0000), write=True)


# --- munmap, exit ------------------------------------------------------------------------


@pytest.mark.parametrize("era", ERAS)
def test_munmap_zaps_inside_one_invalidate_range_bracket_and_frees_the_frames(era: str) -> None:
    host = host_with_area(era, pages=4)
    host.mm.write_bytes(P0, page_of(1) * 2)
    host.mm.handle_mm_fault(page_hva(AREA, 3), write=False)
    log = NotifierLog()
    log.register(host.mm)
    host.mm.munmap(AREA, 4 * PAGE_SIZE)
    end = AREA + 4 * PAGE_SIZE
    assert log.entries == [
        ("rec", "invalidate_range_start", (AREA, end)),
        ("rec", "invalidate_range_end", (AREA, end)),
    ]
    assert host.frames.allocated == 0
    assert host.mm.find_vma(AREA) is None
    with pytest.raises(SegmentationFault):
        host.mm.pte(AREA)


def test_munmap_of_part_of_a_vma_is_refused() -> None:
    host = host_with_area(pages=4)
    with pytest.raises(ValueError):
        host.mm.munmap(AREA, PAGE_SIZE)


def test_a_frame_pinned_across_munmap_outlives_the_mapping() -> None:
    host = host_with_area()
    pfn = host.mm.get_user_pages(P0, write=True)
    host.mm.munmap(AREA, 4 * PAGE_SIZE)
    assert not host.frames.is_free(pfn)
    host.mm.put_page(pfn)
    assert host.frames.is_free(pfn)


def test_exit_mmap_calls_release_first_then_frees_everything() -> None:
    host = host_with_area()
    host.mm.write_bytes(P0, b"x")
    log = NotifierLog()
    log.register(host.mm)
    host.mm.exit_mmap()
    # release unhooks the notifier: the unmap that follows is not reported to it.
    assert log.callbacks() == ["release"]
    assert host.mm.mmu_notifiers == [] and host.mm.vmas == []
    assert host.frames.allocated == 0


# --- VMM access and aging ----------------------------------------------------------------


@settings(max_examples=60)
@given(st.integers(0, 3 * PAGE_SIZE), st.binary(min_size=1, max_size=2 * PAGE_SIZE + 10))
def test_write_bytes_then_read_bytes_returns_the_same_bytes(offset: int, data: bytes) -> None:
    host = host_with_area(pages=6)
    hva = Hva(AREA + offset)
    host.mm.write_bytes(hva, data)
    assert host.mm.read_bytes(hva, len(data)) == data
    # Around the written range, memory still reads as zeros.
    assert host.mm.read_bytes(AREA, offset) == bytes(offset)


def test_write_bytes_faults_each_touched_page_writable_exactly_once() -> None:
    host = host_with_area(pages=4)
    host.mm.write_bytes(Hva(AREA + PAGE_SIZE - 2), b"abcd")
    assert host.frames.allocated == 2
    assert is_mapped_writable(host.mm, P0) and is_mapped_writable(host.mm, P1)
    for pfn in (pte_pfn(host.mm.pte(P0)), pte_pfn(host.mm.pte(P1))):
        assert int(host.frames.refcount[pfn]) == 1  # the write's pin was dropped


def test_read_bytes_of_an_untouched_page_reads_zeros_without_faulting_it_in() -> None:
    host = host_with_area()
    assert host.mm.read_bytes(P0, 16) == bytes(16)
    assert not pte_present(host.mm.pte(P0))


def test_page_referenced_tests_and_clears_the_host_young_bit() -> None:
    host = host_with_area()
    assert not host.mm.page_referenced(P0)  # no pte
    host.mm.handle_mm_fault(P0, write=True)
    assert pte_young(host.mm.pte(P0))
    assert host.mm.page_referenced(P0)
    assert not pte_young(host.mm.pte(P0))
    assert not host.mm.page_referenced(P0)
