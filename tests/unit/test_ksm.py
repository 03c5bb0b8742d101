"""KSM (host/ksm.py) on a plain host process, no guest: the kernel selftests' numbers and the eras."""

import pytest

from hypervisor.host.frames import ZERO_PFN
from hypervisor.host.ksm import RMAP_ITEM_SIZE
from hypervisor.host.mm import MADV_UNMERGEABLE, HostMm, pte_pfn, pte_write
from hypervisor.types import PAGE_SIZE, Hva

from .support import (
    AREA,
    ERAS,
    Host,
    NotifierLog,
    full_scan,
    is_mapped_writable,
    make_host,
    mapped_pfns,
    maps_zero_page,
    mergeable_area,
    page_hva,
    page_of,
    shared_and_sharing,
)


def host_with_pages(era: str, contents: list[bytes], nr_frames: int = 256) -> Host:
    """A host whose process has one mergeable area holding `contents`, one page each, and ksmd on."""
    host = make_host(era, nr_frames=nr_frames)
    mergeable_area(host.mm, len(contents))
    for i, data in enumerate(contents):
        host.mm.write_bytes(page_hva(AREA, i), data)
    host.ksm.set_run(1)
    return host


def identical(n: int, fill: int = 0x42) -> list[bytes]:
    return [page_of(fill)] * n


# --- the selftests' numbers ------------------------------------------------------------------


@pytest.mark.parametrize("era", ERAS)
def test_nothing_merges_on_the_first_full_scan(era: str) -> None:
    host = host_with_pages(era, identical(10))
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"]) == (0, 0)
    assert counters["full_scans"] == 1
    assert counters["pages_volatile"] == 10
    assert all(is_mapped_writable(host.mm, page_hva(AREA, i)) for i in range(10))


@pytest.mark.parametrize("era", ERAS)
def test_ten_identical_pages_merge_into_one_ksm_page_after_two_full_scans(era: str) -> None:
    host = host_with_pages(era, identical(10))
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 9)
    assert host.ksm.counters()["full_scans"] == 2
    pfns = set(mapped_pfns(host.mm, AREA, 10))
    assert len(pfns) == 1
    kpfn = pfns.pop()
    assert host.frames.page_ksm(kpfn)
    assert int(host.frames.mapcount[kpfn]) == 10
    assert not any(pte_write(host.mm.pte(page_hva(AREA, i))) for i in range(10))
    assert host.frames.allocated == 1


@pytest.mark.parametrize("era", ["2.6.32", "3.7", "4.12"])
def test_before_4_13_a_thousand_identical_pages_share_one_ksm_page_without_chains(era: str) -> None:
    # No max_page_sharing before 4.13 (2c653d0ee2ae): stable_tree_search always merges into
    # the one KSM page of that content, so the selftest case gives 1 shared, 999 sharing,
    # and sysfs has no max_page_sharing, stable_node_chains or stable_node_dups files.
    host = host_with_pages(era, identical(1000), nr_frames=1200)
    full_scan(host.ksm)
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"]) == (1, 999)
    assert "stable_node_chains" not in counters and "max_page_sharing" not in counters
    assert len(set(mapped_pfns(host.mm, AREA, 1000))) == 1


@pytest.mark.parametrize("era", ["4.13", "6.10"])
def test_from_4_13_a_thousand_identical_pages_at_max_page_sharing_256_make_a_chain_of_four(era: str) -> None:
    host = host_with_pages(era, identical(1000), nr_frames=1200)
    assert host.ksm.max_page_sharing == 256
    full_scan(host.ksm)
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"]) == (4, 996)
    assert (counters["stable_node_chains"], counters["stable_node_dups"]) == (1, 4)
    kpfns = set(mapped_pfns(host.mm, AREA, 1000))
    assert len(kpfns) == 4
    assert sorted(int(host.frames.mapcount[k]) for k in kpfns) == [232, 256, 256, 256]


@pytest.mark.parametrize("era", ERAS)
def test_two_merged_pages_each_written_with_a_different_byte_unmerge_after_one_more_scan(era: str) -> None:
    host = host_with_pages(era, identical(2))
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 1)
    host.mm.write_bytes(page_hva(AREA, 0), b"\x01")
    host.mm.write_bytes(page_hva(AREA, 1), b"\x02")
    assert host.vmstat.counters["cow_ksm"] == 2
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (0, 0)
    assert host.mm.read_bytes(page_hva(AREA, 0), 2) == b"\x01\x42"
    assert host.mm.read_bytes(page_hva(AREA, 1), 2) == b"\x02\x42"
    assert host.frames.allocated == 2  # the KSM page went with its last mapping


@pytest.mark.parametrize("era", ["6.6", "6.10"])  # ksm_zero_pages exists from 6.6
def test_ten_zero_pages_merge_into_a_ksm_page_when_use_zero_pages_is_off(era: str) -> None:
    host = host_with_pages(era, identical(10, fill=0))
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 9)
    assert host.ksm.counters()["ksm_zero_pages"] == 0
    kpfn = mapped_pfns(host.mm, AREA, 1)[0]
    assert kpfn != ZERO_PFN and host.frames.page_ksm(kpfn)


@pytest.mark.parametrize("era", ["6.6", "6.10"])  # ksm_zero_pages exists from 6.6
def test_ten_zero_pages_map_the_zero_page_when_use_zero_pages_is_on(era: str) -> None:
    host = host_with_pages(era, identical(10, fill=0))
    host.ksm.use_zero_pages = True
    full_scan(host.ksm)
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"]) == (0, 0)
    assert counters["ksm_zero_pages"] == 10
    assert counters["general_profit"] == 10 * PAGE_SIZE - host.ksm.rmap_items * RMAP_ITEM_SIZE
    assert all(maps_zero_page(host.mm, page_hva(AREA, i)) for i in range(10))
    assert host.frames.allocated == 0


@pytest.mark.parametrize("era", ["6.6", "6.10"])  # ksm_zero_pages exists from 6.6
def test_writing_a_ksm_zero_page_gives_a_private_page_and_lowers_ksm_zero_pages(era: str) -> None:
    host = host_with_pages(era, identical(3, fill=0))
    host.ksm.use_zero_pages = True
    full_scan(host.ksm)
    full_scan(host.ksm)
    host.mm.write_bytes(page_hva(AREA, 1), b"z")
    assert host.ksm.counters()["ksm_zero_pages"] == 2
    assert host.vmstat.counters["cow_ksm"] == 0  # a zero pte has no KSM page behind it
    assert is_mapped_writable(host.mm, page_hva(AREA, 1))
    assert host.mm.read_bytes(page_hva(AREA, 1), 2) == b"z\x00"


@pytest.mark.parametrize("era", ERAS)
def test_run_2_unmerges_everything_and_keeps_every_page_intact(era: str) -> None:
    contents = [page_of(0xA0 + (i % 2)) for i in range(10)]
    host = host_with_pages(era, contents)
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (2, 8)
    host.ksm.set_run(2)
    counters = host.ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"], counters["pages_unshared"]) == (0, 0, 0)
    assert counters["full_scans"] == 0 and host.ksm.rmap_items == 0
    pfns = mapped_pfns(host.mm, AREA, 10)
    assert len(set(pfns)) == 10
    assert not any(host.frames.page_ksm(p) for p in pfns)
    for i, data in enumerate(contents):
        assert is_mapped_writable(host.mm, page_hva(AREA, i))
        assert host.mm.read_bytes(page_hva(AREA, i), PAGE_SIZE) == data
    assert host.frames.allocated == 10


def test_run_2_unmaps_ksm_zero_pages_too() -> None:
    host = host_with_pages("6.10", identical(4, fill=0))
    host.ksm.use_zero_pages = True
    full_scan(host.ksm)
    full_scan(host.ksm)
    host.ksm.set_run(2)
    assert host.ksm.counters()["ksm_zero_pages"] == 0
    for i in range(4):
        assert is_mapped_writable(host.mm, page_hva(AREA, i))
        assert host.mm.read_bytes(page_hva(AREA, i), PAGE_SIZE) == bytes(PAGE_SIZE)


def test_run_only_takes_0_1_or_2() -> None:
    host = make_host()
    with pytest.raises(ValueError):
        host.ksm.set_run(3)


def test_ksmd_wakeup_scans_pages_to_scan_pages_only_while_run_is_1() -> None:
    host = host_with_pages("3.7", identical(10))
    host.ksm.pages_to_scan = 4
    host.ksm.set_run(0)
    host.ksm.ksmd_wakeup()
    assert host.ksm.counters()["pages_scanned"] == 0
    host.ksm.set_run(1)
    host.ksm.ksmd_wakeup()
    assert host.ksm.counters()["pages_scanned"] == 4
    host.ksm.ksmd_wakeup()
    host.ksm.ksmd_wakeup()  # pages 9 and 10, then the pass ends
    assert host.ksm.counters()["pages_scanned"] == 10
    assert host.ksm.counters()["full_scans"] == 1


# --- what stops a merge --------------------------------------------------------------------


@pytest.mark.parametrize("era", ERAS)
def test_a_page_pinned_by_get_user_pages_is_not_merged(era: str) -> None:
    host = host_with_pages(era, identical(2))
    pinned_hva = page_hva(AREA, 0)
    pinned = host.mm.get_user_pages(pinned_hva, write=False)
    assert int(host.frames.refcount[pinned]) != int(host.frames.mapcount[pinned])
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (0, 0)
    # write_protect_page put the pinned page's pte back as it was.
    assert pte_pfn(host.mm.pte(pinned_hva)) == pinned and is_mapped_writable(host.mm, pinned_hva)
    assert not host.frames.page_ksm(pinned)
    # Once the pin is released, the next pass merges them.
    host.mm.put_page(pinned)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 1)


@pytest.mark.parametrize("era", ERAS)
def test_pages_with_different_contents_stay_unshared(era: str) -> None:
    host = host_with_pages(era, [page_of(i) for i in range(1, 6)])
    full_scan(host.ksm)
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"]) == (0, 0)
    assert counters["pages_unshared"] == 5 and counters["pages_volatile"] == 0
    assert all(is_mapped_writable(host.mm, page_hva(AREA, i)) for i in range(5))


def test_a_page_that_changes_between_passes_stays_volatile() -> None:
    host = host_with_pages("3.7", identical(3))
    full_scan(host.ksm)
    host.mm.write_bytes(page_hva(AREA, 2), b"\x07")
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"]) == (1, 1)
    assert counters["pages_volatile"] == 1


def test_pages_outside_mergeable_areas_are_never_scanned() -> None:
    host = make_host("3.7")
    host.mm.mmap(AREA, 4 * PAGE_SIZE)
    host.mm.write_bytes(AREA, page_of(1) * 4)
    mergeable_area(host.mm, 2, Hva(0x2000_0000))
    host.mm.write_bytes(Hva(0x2000_0000), page_of(1) * 2)
    host.ksm.set_run(1)
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert host.ksm.counters()["pages_scanned"] == 4
    assert shared_and_sharing(host.ksm) == (1, 1)
    assert all(is_mapped_writable(host.mm, page_hva(AREA, i)) for i in range(4))


def test_untouched_and_zero_page_mappings_are_skipped_by_the_scan() -> None:
    host = make_host("3.7")
    mergeable_area(host.mm, 4)
    host.mm.handle_mm_fault(page_hva(AREA, 1), write=False)  # the zero page
    host.mm.write_bytes(page_hva(AREA, 3), b"x")
    host.ksm.set_run(1)
    full_scan(host.ksm)
    assert host.ksm.counters()["pages_scanned"] == 1
    assert host.ksm.rmap_items == 1


def test_ksm_do_scan_scans_at_most_n_pages_and_resumes_where_it_stopped() -> None:
    host = host_with_pages("3.7", identical(10))
    host.ksm.ksm_do_scan(3)
    assert host.ksm.counters()["pages_scanned"] == 3 and host.ksm.seqnr == 0
    host.ksm.ksm_do_scan(5)
    assert host.ksm.counters()["pages_scanned"] == 8 and host.ksm.seqnr == 0
    host.ksm.ksm_do_scan(5)
    assert host.ksm.counters()["pages_scanned"] == 10 and host.ksm.seqnr == 1


# --- the KSM page ----------------------------------------------------------------------------


@pytest.mark.parametrize("era", ERAS)
def test_merged_pages_are_byte_equal_to_their_ksm_page(era: str) -> None:
    contents = [page_of(7)[:-3] + b"end", page_of(7)[:-3] + b"end", page_of(9), page_of(9), page_of(9)]
    host = host_with_pages(era, contents)
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (2, 3)
    for i, data in enumerate(contents):
        kpfn = pte_pfn(host.mm.pte(page_hva(AREA, i)))
        assert host.frames.page_ksm(kpfn)
        assert host.frames.frames[kpfn].tobytes() == data
        assert host.mm.read_bytes(page_hva(AREA, i), PAGE_SIZE) == data


def test_2_6_32_merges_into_a_freshly_allocated_ksm_page() -> None:
    host = host_with_pages("2.6.32", identical(4))
    originals = set(mapped_pfns(host.mm, AREA, 4))
    full_scan(host.ksm)
    full_scan(host.ksm)
    kpfns = set(mapped_pfns(host.mm, AREA, 4))
    assert len(kpfns) == 1
    assert not kpfns & originals
    assert all(host.frames.is_free(p) for p in originals)


@pytest.mark.parametrize("era", ["3.7", "6.10"])
def test_later_eras_turn_the_first_page_of_the_pair_into_the_ksm_page_in_place(era: str) -> None:
    host = host_with_pages(era, identical(4))
    originals = mapped_pfns(host.mm, AREA, 4)
    full_scan(host.ksm)
    full_scan(host.ksm)
    kpfns = set(mapped_pfns(host.mm, AREA, 4))
    # try_to_merge_two_pages(page being scanned, page found in the unstable tree): the scanned
    # page (the second in address order; the first sits in the tree) is upgraded in place.
    assert kpfns == {originals[1]}
    assert [host.frames.is_free(p) for p in originals] == [True, False, True, True]
    assert host.frames.allocated == 1


@pytest.mark.parametrize("era", ERAS)
def test_writing_a_merged_page_breaks_cow_and_leaves_the_others_merged(era: str) -> None:
    host = host_with_pages(era, identical(3))
    full_scan(host.ksm)
    full_scan(host.ksm)
    kpfn = mapped_pfns(host.mm, AREA, 1)[0]
    host.mm.write_bytes(page_hva(AREA, 2), b"!")
    assert host.vmstat.counters["cow_ksm"] == 1
    assert pte_pfn(host.mm.pte(page_hva(AREA, 2))) != kpfn
    assert host.mm.read_bytes(page_hva(AREA, 2), 2) == b"!\x42"
    assert mapped_pfns(host.mm, AREA, 2) == [kpfn, kpfn]
    assert host.frames.frames[kpfn].tobytes() == page_of(0x42)


def test_2_6_32_unmerges_a_ksm_page_left_with_a_single_mapping() -> None:
    host = host_with_pages("2.6.32", identical(2))
    full_scan(host.ksm)
    full_scan(host.ksm)
    host.mm.write_bytes(page_hva(AREA, 0), b"\x01")
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (0, 0)
    assert is_mapped_writable(host.mm, page_hva(AREA, 1))
    assert not host.frames.page_ksm(mapped_pfns(host.mm, AREA, 2)[1])


@pytest.mark.parametrize("era", ["3.7", "6.10"])
def test_later_eras_keep_a_ksm_page_left_with_a_single_mapping(era: str) -> None:
    host = host_with_pages(era, identical(2))
    full_scan(host.ksm)
    full_scan(host.ksm)
    host.mm.write_bytes(page_hva(AREA, 0), b"\x01")
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 0)
    assert host.frames.page_ksm(mapped_pfns(host.mm, AREA, 2)[1])


def test_merging_across_two_processes_shares_one_ksm_page() -> None:
    host = make_host("6.10")
    other = host.new_mm("other")
    for mm in (host.mm, other):
        mergeable_area(mm, 2)
        mm.write_bytes(AREA, page_of(5) * 2)
    host.ksm.set_run(1)
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 3)
    assert set(mapped_pfns(host.mm, AREA, 2)) == set(mapped_pfns(other, AREA, 2))


@pytest.mark.parametrize("era", ERAS)
def test_pages_rewritten_with_equal_new_contents_merge_again_into_a_new_ksm_page(era: str) -> None:
    host = host_with_pages(era, identical(2))
    full_scan(host.ksm)
    full_scan(host.ksm)
    host.mm.write_bytes(AREA, page_of(0x77) * 2)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (0, 0)  # the old KSM page is gone; contents just changed
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 1)
    assert host.frames.allocated == 1
    assert host.mm.read_bytes(AREA, 2 * PAGE_SIZE) == page_of(0x77) * 2


@pytest.mark.parametrize("era", ["4.13", "6.10"])
def test_a_chain_collapses_back_to_one_stable_node_when_a_duplicate_dies(era: str) -> None:
    host = host_with_pages(era, identical(4))
    host.ksm.max_page_sharing = 2
    full_scan(host.ksm)
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"]) == (2, 2)
    assert (counters["stable_node_chains"], counters["stable_node_dups"]) == (1, 2)
    pfns = mapped_pfns(host.mm, AREA, 4)
    assert pfns[0] == pfns[1] != pfns[2] == pfns[3]
    host.mm.write_bytes(page_hva(AREA, 2), b"a")
    host.mm.write_bytes(page_hva(AREA, 3), b"b")
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"]) == (1, 1)
    assert (counters["stable_node_chains"], counters["stable_node_dups"]) == (0, 0)


@pytest.mark.parametrize("era", ["6.6", "6.10"])  # ksm_zero_pages exists from 6.6
def test_munmap_of_ksm_zero_pages_lowers_ksm_zero_pages(era: str) -> None:
    host = host_with_pages(era, identical(4, fill=0))
    host.ksm.use_zero_pages = True
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert host.ksm.counters()["ksm_zero_pages"] == 4
    host.mm.munmap(AREA, 4 * PAGE_SIZE)
    assert host.ksm.counters()["ksm_zero_pages"] == 0


def test_general_profit_is_the_sharing_saving_minus_the_rmap_items() -> None:
    host = host_with_pages("6.10", identical(10))
    full_scan(host.ksm)
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert counters["general_profit"] == 9 * PAGE_SIZE - 10 * RMAP_ITEM_SIZE


# --- notifications ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("era", "per_pte_update"),
    [
        ("2.6.32", ["change_pte"]),
        ("3.7", ["invalidate_range_start", "change_pte", "invalidate_range_end"]),
        ("6.10", ["invalidate_range_start", "invalidate_range_end"]),
    ],
)
def test_a_merge_notifies_secondary_mmus_as_each_era_does(era: str, per_pte_update: list[str]) -> None:
    host = host_with_pages(era, identical(2))
    full_scan(host.ksm)
    log = NotifierLog()
    log.register(host.mm)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 1)
    # 2.6.32: write_protect_page + replace_page for both pages (a fresh KSM page);
    # later: write_protect_page for the page kept in place, both for the other one.
    updates = 4 if era == "2.6.32" else 3
    assert log.callbacks() == per_pte_update * updates
    for _, callback, args in log.entries:
        if callback == "change_pte":
            assert not pte_write(args[1])
        else:
            assert args[1] - args[0] == PAGE_SIZE


# --- VMA changes -----------------------------------------------------------------------------


def test_madv_unmergeable_breaks_every_merge_in_the_area() -> None:
    host = host_with_pages("3.7", identical(2))
    full_scan(host.ksm)
    full_scan(host.ksm)
    host.mm.madvise(AREA, 2 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert shared_and_sharing(host.ksm) == (0, 0)
    assert all(is_mapped_writable(host.mm, page_hva(AREA, i)) for i in range(2))
    vma = host.mm.find_vma(AREA)
    assert vma is not None and not vma.mergeable


def test_an_area_made_unmergeable_is_not_merged_again_by_later_scans() -> None:
    host = host_with_pages("3.7", identical(2))
    full_scan(host.ksm)
    full_scan(host.ksm)
    host.mm.madvise(AREA, 2 * PAGE_SIZE, MADV_UNMERGEABLE)
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (0, 0)
    assert all(is_mapped_writable(host.mm, page_hva(AREA, i)) for i in range(2))


def test_munmap_of_a_merged_area_drops_its_rmap_items_and_ksm_pages() -> None:
    host = host_with_pages("3.7", identical(4))
    full_scan(host.ksm)
    full_scan(host.ksm)
    host.mm.munmap(AREA, 4 * PAGE_SIZE)
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (0, 0)
    assert host.ksm.rmap_items == 0
    assert host.frames.allocated == 0


def three_areas(mm: HostMm) -> list[Hva]:
    """Mergeable areas A (1 page), B (1 page), C (2 pages), in address order."""
    areas = [Hva(AREA + j * 0x10_0000) for j in range(3)]
    for j, addr in enumerate(areas):
        mergeable_area(mm, 2 if j == 2 else 1, addr)
        mm.write_bytes(addr, page_of(j + 1) * (2 if j == 2 else 1))
    return areas


@pytest.mark.parametrize(("scanned_before", "unmapped"), [(2, 1), (3, 0)])
def test_munmap_during_a_pass_does_not_make_ksmd_rescan_pages(scanned_before: int, unmapped: int) -> None:
    host = make_host("3.7")
    areas = three_areas(host.mm)
    host.ksm.set_run(1)
    host.ksm.ksm_do_scan(scanned_before)
    host.mm.munmap(areas[unmapped], PAGE_SIZE)
    full_scan(host.ksm)
    # Every page left is visited once in the pass: 4 pages in all, minus none twice.
    assert host.ksm.counters()["pages_scanned"] == 4


def test_a_new_mergeable_area_below_the_cursor_waits_for_the_next_pass() -> None:
    host = make_host("3.7")
    high, low = Hva(0x2000_0000), Hva(0x1000_0000)
    mergeable_area(host.mm, 2, high)
    host.mm.write_bytes(high, page_of(1) * 2)
    host.ksm.set_run(1)
    host.ksm.ksm_do_scan(1)
    mergeable_area(host.mm, 2, low)
    host.mm.write_bytes(low, page_of(2) * 2)
    full_scan(host.ksm)
    # The kernel's cursor is an address: it finishes the high area and ends the pass.
    assert host.ksm.counters()["pages_scanned"] == 2


def test_an_mm_registered_mid_pass_is_first_scanned_in_the_next_pass() -> None:
    host = make_host("3.7")
    mergeable_area(host.mm, 2)
    host.mm.write_bytes(AREA, page_of(1) * 2)
    host.ksm.set_run(1)
    host.ksm.ksm_do_scan(1)
    late = host.new_mm("late")
    mergeable_area(late, 1)
    late.write_bytes(AREA, b"late")
    full_scan(host.ksm)
    assert host.ksm.counters()["pages_scanned"] == 2
    host.ksm.ksm_do_scan(1)
    assert host.ksm.counters()["pages_scanned"] == 3
    late_slot = next(slot for slot in host.ksm.slots if slot.mm is late)
    assert bool(late_slot.vmas[0].has_item[0])  # the new pass starts with it


def test_page_checksum_is_the_same_over_frame_views_and_gathered_frames() -> None:
    """calc_checksum (host/ksm.py page_checksum) is a function of content alone, however the pfns come."""
    import numpy as np

    from hypervisor.host.frames import FramePool
    from hypervisor.host.ksm import page_checksum

    frames = FramePool(64)
    frames.qwords[:] = np.random.default_rng(7).integers(0, 2**63, size=frames.qwords.shape, dtype=np.uint64)
    frames.qwords[40] = frames.qwords[3]
    run = np.arange(1, 33, dtype=np.int64)  # one run of consecutive pfns: summed over a view
    scattered = np.array([31, 7, 3, 40, 12], dtype=np.int64)  # gathered
    by_view = dict(zip(run.tolist(), page_checksum(frames, run).tolist(), strict=True))
    by_gather = dict(zip(scattered.tolist(), page_checksum(frames, scattered).tolist(), strict=True))
    assert all(by_gather[p] == by_view[p] for p in (31, 7, 3, 12))
    assert by_gather[40] == by_gather[3]  # equal content, equal checksum


def test_page_checksum_changes_with_one_qword_and_with_changes_32_bits_apart() -> None:
    """The change detector sees a one-bit change, and two changes at bits i and i + 32 (bootstorm's case)."""
    import numpy as np

    from hypervisor.host.frames import FramePool
    from hypervisor.host.ksm import page_checksum

    frames = FramePool(4)
    frames.qwords[1, 4] = 0x10000
    frames.qwords[1, 10] = 0x0101000101000000
    pfn = np.array([1], dtype=np.int64)
    before = int(page_checksum(frames, pfn)[0])
    frames.qwords[1, 4] = 0x10100
    frames.qwords[1, 10] = 0x0101010101000000
    after = int(page_checksum(frames, pfn)[0])
    frames.qwords[1, 7] ^= 1
    assert len({before, after, int(page_checksum(frames, pfn)[0])}) == 3


def test_page_checksum_of_one_frame_equals_the_batched_one() -> None:
    import numpy as np

    from hypervisor.host.frames import FramePool
    from hypervisor.host.ksm import page_checksum, page_checksum_one
    from hypervisor.types import Pfn

    frames = FramePool(8)
    frames.qwords[:] = np.random.default_rng(3).integers(0, 2**64 - 1, size=frames.qwords.shape, dtype=np.uint64)
    batched = page_checksum(frames, np.arange(8, dtype=np.int64)).tolist()
    assert [page_checksum_one(frames, Pfn(p)) for p in range(8)] == batched
