"""FramePool (host/frames.py): host physical frames, refcounts, mapcounts, the zero page."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypervisor.errors import HostOutOfMemory
from hypervisor.host.frames import ZERO_PFN, FramePool
from hypervisor.types import PAGE_SIZE, Pfn


def test_a_pool_needs_the_zero_page_and_one_more_frame() -> None:
    with pytest.raises(ValueError):
        FramePool(1)


def test_allocation_hands_out_the_lowest_free_pfns_first_and_never_the_zero_page() -> None:
    pool = FramePool(8)
    assert [pool.alloc_page() for _ in range(7)] == [1, 2, 3, 4, 5, 6, 7]
    assert pool.allocated == 7 and pool.nr_free == 0


def test_a_freed_frame_is_the_next_one_allocated() -> None:
    pool = FramePool(8)
    first = [pool.alloc_page() for _ in range(4)]
    pool.put_page(first[1])
    pool.put_page(first[2])
    assert pool.alloc_page() == first[2]
    assert pool.alloc_page() == first[1]
    assert pool.alloc_page() == 5


def test_two_pools_driven_alike_allocate_alike() -> None:
    def run() -> list[int]:
        pool = FramePool(32)
        out = []
        held: list[Pfn] = []
        for i in range(40):
            if i % 3 == 2:
                pool.put_page(held.pop(0))
            else:
                held.append(pool.alloc_page())
                out.append(int(held[-1]))
        return out

    assert run() == run()


def test_alloc_page_gives_a_zeroed_frame_with_refcount_one_and_no_mappings() -> None:
    pool = FramePool(4)
    pfn = pool.alloc_page()
    pool.frames[pfn].fill(0xAB)
    pool.put_page(pfn)
    again = pool.alloc_page()
    assert again == pfn
    assert not pool.frames[again].any()
    assert int(pool.refcount[again]) == 1 and int(pool.mapcount[again]) == 0
    assert not pool.page_ksm(again)


def test_alloc_page_without_zeroing_keeps_the_old_contents() -> None:
    pool = FramePool(4)
    pfn = pool.alloc_page()
    pool.frames[pfn].fill(0xAB)
    pool.put_page(pfn)
    assert pool.alloc_page(zero=False) == pfn
    assert int(pool.frames[pfn][0]) == 0xAB


def test_exhausting_the_pool_raises_host_out_of_memory() -> None:
    pool = FramePool(3)
    pool.alloc_page()
    pool.alloc_page()
    with pytest.raises(HostOutOfMemory):
        pool.alloc_page()
    assert HostOutOfMemory.exit_code == 6


def test_a_frame_is_freed_when_its_last_reference_goes() -> None:
    pool = FramePool(4)
    pfn = pool.alloc_page()
    pool.get_page(pfn)
    pool.put_page(pfn)
    assert not pool.is_free(pfn)
    pool.put_page(pfn)
    assert pool.is_free(pfn) and pool.allocated == 0 and pool.nr_free == 3


def test_page_add_rmap_and_remove_rmap_count_both_the_mapping_and_its_reference() -> None:
    pool = FramePool(4)
    pfn = pool.alloc_page()
    pool.page_add_rmap(pfn)
    pool.page_add_rmap(pfn)
    assert (int(pool.refcount[pfn]), int(pool.mapcount[pfn])) == (3, 2)
    pool.put_page(pfn)  # the allocation's reference
    pool.page_remove_rmap(pfn)
    assert (int(pool.refcount[pfn]), int(pool.mapcount[pfn])) == (1, 1)
    pool.page_remove_rmap(pfn)
    assert pool.is_free(pfn)


def test_put_page_on_a_free_frame_is_an_accounting_error() -> None:
    pool = FramePool(4)
    pfn = pool.alloc_page()
    pool.put_page(pfn)
    with pytest.raises(AssertionError):
        pool.put_page(pfn)


def test_freeing_a_frame_that_ptes_still_map_is_an_accounting_error() -> None:
    pool = FramePool(4)
    pfn = pool.alloc_page()
    pool.mapcount[pfn] = 1
    with pytest.raises(AssertionError):
        pool.put_page(pfn)


def test_the_zero_page_is_never_refcounted_mapped_or_freed() -> None:
    pool = FramePool(4)
    for _ in range(3):
        pool.get_page(ZERO_PFN)
        pool.page_add_rmap(ZERO_PFN)
        pool.page_remove_rmap(ZERO_PFN)
        pool.put_page(ZERO_PFN)
    pool.put_page(ZERO_PFN)
    assert int(pool.refcount[ZERO_PFN]) == 0 and int(pool.mapcount[ZERO_PFN]) == 0
    assert not pool.is_free(ZERO_PFN)
    assert not pool.page_ksm(ZERO_PFN)
    assert pool.nr_free == 3
    assert not pool.frames[ZERO_PFN].any()


def test_freeing_a_ksm_page_clears_page_ksm() -> None:
    pool = FramePool(4)
    pfn = pool.alloc_page()
    pool.stable_node[pfn] = 5
    assert pool.page_ksm(pfn)
    pool.put_page(pfn)
    assert not pool.page_ksm(pfn)


def test_copy_page_and_pages_identical_compare_whole_frames() -> None:
    pool = FramePool(4)
    a, b = pool.alloc_page(), pool.alloc_page()
    pool.frames[a][PAGE_SIZE - 1] = 9
    assert not pool.pages_identical(a, b)
    pool.copy_page(b, a)
    assert pool.pages_identical(a, b)
    assert int(pool.frames[b][PAGE_SIZE - 1]) == 9


def test_writing_a_frame_that_was_executed_bumps_the_code_epoch_once() -> None:
    pool = FramePool(4)
    a, b = pool.alloc_page(), pool.alloc_page()
    pool.exec_seen[b] = True
    pool.copy_page(b, a)
    pool.copy_page(b, a)
    assert pool.code_epoch == 1


@given(st.lists(st.booleans(), max_size=60))
def test_allocated_plus_free_is_always_every_frame_but_the_zero_page(ops: list[bool]) -> None:
    pool = FramePool(16)
    held: list[Pfn] = []
    for alloc in ops:
        if alloc and pool.nr_free:
            pfn = pool.alloc_page()
            assert pfn != ZERO_PFN and pfn not in held
            held.append(pfn)
        elif held:
            pool.put_page(held.pop())
        assert pool.allocated == len(held)
        assert pool.allocated + pool.nr_free == 15


def test_the_free_list_is_a_stack_of_int32_pfns_in_one_array_not_python_objects() -> None:
    pool = FramePool(16)
    held = [pool.alloc_page() for _ in range(10)]
    for pfn in held:
        pool.put_page(pfn)
    assert pool._freed.dtype == np.int32 and pool._freed.nbytes == 16 * 4
    assert pool.nr_free == 15
    assert [pool.alloc_page() for _ in range(3)] == held[::-1][:3]
