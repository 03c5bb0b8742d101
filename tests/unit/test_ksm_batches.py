"""ksmd's batches (host/ksm_scan.py): what one batch of ksm_do_scan holds, as a KsmObserver sees it.

ksm_do_scan (mm/ksm.c) takes pages one at a time from scan_get_next_rmap_item; hvsim takes them in
batches of consecutive present pages of one VMA, which end at pages_to_scan, at the VMA's end, or
before an rmap_item whose page is gone (freed on the way, in address order).  A batch is found
from the first 512 ptes past the cursor when they decide it, else from the rest of the VMA: the
batches must not depend on that.
"""

import numpy as np
import numpy.typing as npt
import pytest

from hypervisor.host.ksm import VmaItems
from hypervisor.host.ksm_scan import _isin
from hypervisor.host.mm import MADV_DONTNEED

from .support import AREA, Host, full_scan, make_host, mergeable_area, page_hva, page_of

AREA_PAGES = 2048


class BatchLog:
    """A KsmObserver that keeps every batch's page indexes and counts the wake-ups."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.wakeups = 0
        self.awake = False

    def wakeup_start(self) -> None:
        assert not self.awake
        self.awake = True

    def wakeup_end(self) -> None:
        assert self.awake
        self.awake = False
        self.wakeups += 1

    def scan_batch(self, items: VmaItems, idxs: npt.NDArray[np.intp], pfns: npt.NDArray[np.int64]) -> None:
        assert [items.mm.pte(page_hva(AREA, i)) >> 12 for i in idxs.tolist()] == pfns.tolist()
        self.batches.append(idxs.tolist())


def host_with_pages_at(indexes: list[int], era: str = "3.7") -> tuple[Host, BatchLog]:
    host = make_host(era, nr_frames=AREA_PAGES)
    mergeable_area(host.mm, AREA_PAGES)
    for i in indexes:
        host.mm.write_bytes(page_hva(AREA, i), page_of(i & 0xFF))
    host.ksm.set_run(1)
    log = BatchLog()
    host.ksm.observer = log
    return host, log


FAR = [0, 1, 2, 3, 1500, 1501, 1502, 1503]  # the last four past the first 512 ptes


def test_a_batch_reaches_present_pages_past_the_first_512_ptes_of_the_vma() -> None:
    host, log = host_with_pages_at(FAR)
    host.ksm.ksmd_wakeup()
    assert log.batches == [FAR]
    assert log.wakeups == 1
    assert host.ksm.counters()["pages_scanned"] == len(FAR)


def test_a_batch_stops_at_pages_to_scan_inside_the_first_512_ptes() -> None:
    host, log = host_with_pages_at(list(range(300)))
    host.ksm.ksmd_wakeup()
    host.ksm.ksmd_wakeup()
    assert log.batches == [list(range(100)), list(range(100, 200))]


@pytest.mark.parametrize("gone", [2, 1501])
def test_a_batch_stops_before_an_rmap_item_whose_page_is_gone(gone: int) -> None:
    host, log = host_with_pages_at(FAR)
    full_scan(host.ksm)
    items_before = host.ksm.rmap_items
    host.mm.madvise(page_hva(AREA, gone), 4096, MADV_DONTNEED)
    log.batches.clear()
    full_scan(host.ksm)
    left = [i for i in FAR if i != gone]
    cut = left.index(next(i for i in left if i > gone))
    assert log.batches == [left[:cut], left[cut:]]
    assert host.ksm.rmap_items == items_before - 1


def test_the_observer_sees_a_wakeup_while_ksmd_does_not_run() -> None:
    host, log = host_with_pages_at(FAR)
    host.ksm.set_run(0)
    host.ksm.ksmd_wakeup()
    assert (log.wakeups, log.batches) == (1, [])


def test_membership_by_binary_search_answers_as_numpy_isin() -> None:
    rng = np.random.default_rng(13)
    for _ in range(200):
        values = rng.integers(0, 40, int(rng.integers(0, 30))).astype(np.uint32)
        pool = rng.integers(0, 40, int(rng.integers(0, 30))).astype(np.uint32)
        assert _isin(values, pool).tolist() == np.isin(values, pool).tolist()
