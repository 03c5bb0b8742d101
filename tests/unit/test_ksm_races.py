"""KSM with host events fired between its steps (issue #9, item 3): a KSM page freed mid-merge
must leave no KSM state behind in its frame, and a freed frame must come back clean.

The race points are the ones `--inject` uses (hypervisor/races.py): `ksm_before_replace_page`
(the page is write-protected, not yet replaced) and `ksm_after_replace_page` (the pte now maps
the KSM page).  Kernel facts (read in the sources named):

* 2.6.32 mm/ksm.c try_to_merge_two_pages(): a fresh kpage is alloc_page()d, both pages are
  replaced by it, then `put_page(kpage)`: if every pte of it went in between, the page is freed
  there.  2.6.32's stable tree is made of rmap_items, and get_ksm_page() finds a zapped one by
  following its address, so nothing stale is left.
* 3.7 mm/ksm.c cmp_and_merge_page(): the KSM page (`page`, held since
  scan_get_next_rmap_item()'s follow_page(FOLL_GET)) stays referenced across
  stable_tree_insert(), which sets its stable node; only ksm_do_scan()'s put_page(page) may free
  it.  A freed page loses PageKsm (2.6.32 mm/page_alloc.c free_hot_cold_page(): `if
  (PageAnon(page)) page->mapping = NULL`), so get_ksm_page() sees `page->mapping !=
  expected_mapping` and removes the stale node (remove_node_from_stable_tree()).
* A frame is allocated only with no mapping and no mapcount (2.6.32 mm/page_alloc.c
  free_pages_check() and prep_new_page(): bad_page() otherwise).
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from hypervisor.check import CoherenceChecker
from hypervisor.errors import InvariantViolation
from hypervisor.host.frames import ZERO_PFN, FramePool
from hypervisor.host.ksm import Ksm
from hypervisor.host.mm import MADV_DONTNEED, MADV_MERGEABLE, HostMm, pte_pfn, pte_present
from hypervisor.kvm.vm import GUEST_RAM_HVA, Vm
from hypervisor.profiles import PROFILES
from hypervisor.types import PAGE_SIZE, Gfn, Hva, Pfn

from .support import AREA, Guest, Host, full_scan, make_guest, make_host, mergeable_area, page_hva, page_of

RaceEvent = Callable[[HostMm, Hva], None]


def invalidate(mm: HostMm, hva: Hva) -> None:
    mm.madvise(hva, PAGE_SIZE, MADV_DONTNEED)


def host_cow(mm: HostMm, hva: Hva) -> None:
    mm.handle_mm_fault(hva, write=True)


def age(mm: HostMm, hva: Hva) -> None:
    mm.page_referenced(hva)


EVENTS: dict[str, RaceEvent] = {"invalidate_range": invalidate, "cow": host_cow, "age": age}
POINTS = ("ksm_before_replace_page", "ksm_after_replace_page")


@dataclass
class Machine:
    """What CoherenceChecker inspects: a Simulation's frames, VMs and KSM, without vCPU backends."""

    frames: FramePool
    vms: list[Vm]
    ksm: Ksm | None


def checker_of(g: Guest) -> CoherenceChecker:
    checker = CoherenceChecker()
    checker.attach(Machine(g.frames, [g.vm], g.host.ksm))  # type: ignore[arg-type]
    return checker


def free_frames_with_state(frames: FramePool) -> list[int]:
    """Free frames (refcount 0, not the zero page) that still say PageKsm or have a mapcount."""
    free = frames.refcount == 0
    free[ZERO_PFN] = False
    return [int(p) for p in np.flatnonzero(free & ((frames.stable_node >= 0) | (frames.mapcount != 0)))]


def racing_host(era: str, point: str, event: RaceEvent, pages: int = 2) -> Host:
    host = make_host(era)
    mergeable_area(host.mm, pages)
    for i in range(pages):
        host.mm.write_bytes(page_hva(AREA, i), page_of(0x42))
    host.ksm.set_run(1)
    host.ksm.race_points[point] = event
    return host


def test_2_6_32_a_ksm_page_whose_every_mapping_is_zapped_mid_merge_is_freed_without_its_ksm_state() -> None:
    # 2.6.32 replaces both pages of a pair with a fresh KSM page: zapping each right after its
    # replace_page leaves the KSM page mapped by nothing when try_to_merge_two_pages returns.
    host = racing_host("2.6.32", "ksm_after_replace_page", invalidate)
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert not any(pte_present(host.mm.pte(page_hva(AREA, i))) for i in range(2))
    assert free_frames_with_state(host.frames) == []
    # The next frame allocated (the KSM page's, freed last) is an ordinary anonymous page.
    host.ksm.race_points.clear()
    host.mm.handle_mm_fault(page_hva(AREA, 0), write=True)
    pfn = pte_pfn(host.mm.pte(page_hva(AREA, 0)))
    assert not host.frames.page_ksm(pfn)
    # ksmd finds the stable node stale (get_ksm_page) and drops it.
    full_scan(host.ksm)
    assert host.ksm.counters()["pages_shared"] == 0
    assert not host.ksm.nodes


def test_2_6_32_reuses_a_ksm_page_freed_mid_merge_as_a_writable_guest_page_not_a_ksm_page() -> None:
    """The run of issue #9 item 3, on one VM: the guest's next write fault gets the freed KSM frame."""
    g = make_guest("2.6.32", pages=4)
    g.mm.madvise(GUEST_RAM_HVA, 4 * PAGE_SIZE, MADV_MERGEABLE)
    for gfn in range(2):
        g.mm.write_bytes(g.hva(gfn), page_of(0x69))
    g.host.ksm.set_run(1)
    g.host.ksm.race_points["ksm_after_replace_page"] = invalidate
    full_scan(g.host.ksm)
    full_scan(g.host.ksm)
    checker = checker_of(g)
    g.vcpu.handle_ept_violation(Gfn(3), write=True, rip=0)
    assert not g.frames.page_ksm(g.host_pfn(3))
    checker.check(strict_refcount=True)


@pytest.mark.parametrize("era", list(PROFILES))
@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("event", list(EVENTS))
def test_no_event_between_ksm_steps_leaves_a_free_frame_with_ksm_state_or_a_ksm_page_writable(
    era: str, point: str, event: str
) -> None:
    host = racing_host(era, point, EVENTS[event], pages=6)
    for _ in range(4):
        full_scan(host.ksm)
        assert free_frames_with_state(host.frames) == []
        for i in range(6):
            pte = host.mm.pte(page_hva(AREA, i))
            if pte_present(pte) and host.frames.page_ksm(pte_pfn(pte)):
                assert not pte & 2, f"page {i} maps KSM page {pte_pfn(pte):#x} writable"
    # Every page still reads as written.
    for i in range(6):
        assert host.mm.read_bytes(page_hva(AREA, i), PAGE_SIZE) in (page_of(0x42), bytes(PAGE_SIZE))


def test_allocating_a_frame_that_still_says_page_ksm_is_a_bad_page_error() -> None:
    pool = FramePool(4)
    pfn = pool.alloc_page()
    pool.put_page(pfn)
    pool.stable_node[pfn] = 7  # what a write into a free frame would leave
    with pytest.raises(AssertionError, match="bad page state"):
        pool.alloc_page()


def test_the_checker_reports_a_free_frame_that_keeps_its_ksm_state() -> None:
    g = make_guest("2.6.32", pages=2)
    pfn = g.frames.alloc_page()
    g.frames.put_page(pfn)
    g.frames.stable_node[pfn] = 3
    checker = checker_of(g)
    with pytest.raises(InvariantViolation, match=f"free-frame-clean.*pfn {pfn:#x}"):
        checker.check(strict_refcount=False)


def test_a_stable_node_is_only_ever_set_on_a_held_frame() -> None:
    host = make_host("2.6.32")
    pfn = host.frames.alloc_page()
    host.frames.put_page(pfn)
    with pytest.raises(AssertionError, match="free frame"):
        host.ksm.stable_tree_insert(Pfn(pfn), 0)
