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

from .support import AREA, Guest, Host, KsmRace, full_scan, make_guest, make_host, mergeable_area, page_hva, page_of

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
    host.ksm.hooks = KsmRace(point, event)
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
    host.ksm.hooks = None
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
    g.host.ksm.hooks = KsmRace("ksm_after_replace_page", invalidate)
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


# --- a freed rmap_item keeps no place in the trees ---------------------------------------------


@pytest.mark.parametrize("era", list(PROFILES))
def test_an_rmap_item_freed_mid_pass_leaves_the_unstable_tree_and_is_never_merged(era: str) -> None:
    """munmap frees the rmap_items of an area; one inserted into the unstable tree by the current
    pass must leave it (remove_rmap_item_from_tree's rb_erase, 2.6.32 and 3.7 mm/ksm.c), or a page
    later mapped at its address is merged through the dead item and counted in the stable node
    forever."""
    host = make_host(era)
    a, b = Hva(0x1000_0000), Hva(0x2000_0000)
    for addr in (a, b):
        mergeable_area(host.mm, 1, addr)
        host.mm.write_bytes(addr, page_of(0x42))
    host.ksm.set_run(1)
    full_scan(host.ksm)
    host.ksm.ksm_do_scan(1)  # a's page goes into the unstable tree
    host.mm.munmap(a, PAGE_SIZE)
    assert len(host.ksm.unstable_tree) == 0
    mergeable_area(host.mm, 1, a)  # a new area at the same address, with the same content
    host.mm.write_bytes(a, page_of(0x42))
    host.ksm.ksm_do_scan(1)  # b: nothing live in the unstable tree to merge with
    assert host.ksm.counters()["pages_sharing"] == 0
    for _ in range(3):  # the rest of this pass; the new page's first checksum; the merge
        full_scan(host.ksm)
    assert (host.ksm.counters()["pages_shared"], host.ksm.counters()["pages_sharing"]) == (1, 1)
    assert [n.nr_items for n in host.ksm.nodes.values()] == [2]
    host.mm.munmap(a, PAGE_SIZE)
    host.mm.munmap(b, PAGE_SIZE)
    assert host.ksm.rmap_items == 0
    assert (host.ksm.counters()["pages_shared"], host.ksm.counters()["pages_sharing"]) == (0, 0)


def test_the_checker_reports_a_freed_rmap_item_left_in_the_unstable_tree() -> None:
    g = make_guest("3.7", pages=2)
    g.mm.madvise(GUEST_RAM_HVA, 2 * PAGE_SIZE, MADV_MERGEABLE)
    g.mm.write_bytes(g.hva(0), page_of(0x42))
    ksm = g.host.ksm
    ksm.set_run(1)
    full_scan(ksm)
    ksm.ksm_do_scan(1)
    items = ksm.slots[0].vmas[0]
    items.has_item[0] = False  # freed behind the tree's back
    with pytest.raises(InvariantViolation, match=r"ksm-rmap-items.*unstable tree holds the freed rmap_item"):
        checker_of(g).check(strict_refcount=False)


def test_the_checker_reports_a_stable_node_that_counts_a_dead_rmap_item() -> None:
    host = racing_host("3.7", "ksm_after_replace_page", age)
    host.ksm.hooks = None
    full_scan(host.ksm)
    full_scan(host.ksm)
    (node,) = host.ksm.nodes.values()
    node.nr_items += 1
    g = make_guest("3.7", pages=1)
    checker = CoherenceChecker()
    checker.attach(Machine(host.frames, [g.vm], host.ksm))  # type: ignore[arg-type]
    with pytest.raises(InvariantViolation, match=r"ksm-rmap-items.*counts 3 rmap_items but 2"):
        checker.check(strict_refcount=False)


# --- other state a freed frame could keep ---------------------------------------------------------


def test_a_freed_frame_that_held_guest_code_drops_its_translations_when_reused() -> None:
    """exec_seen is the one thing a free frame keeps, on purpose: its next user's content must
    invalidate the translated code Unicorn may still hold for that physical page."""
    pool = FramePool(4)
    pfn = pool.alloc_page()
    pool.exec_seen[pfn] = True
    pool.put_page(pfn)
    assert pool.alloc_page() == pfn
    assert pool.code_epoch == 1 and not pool.exec_seen[pfn]


def test_a_stale_stable_node_is_dropped_and_names_no_frame_once_its_frame_is_reused() -> None:
    host = racing_host("2.6.32", "ksm_after_replace_page", invalidate)
    full_scan(host.ksm)
    full_scan(host.ksm)
    (stale,) = host.ksm.nodes.values()
    assert host.frames.is_free(stale.kpfn)
    host.ksm.hooks = None
    for i in range(2):
        host.mm.write_bytes(page_hva(AREA, i), page_of(0x42))
    assert not host.frames.is_free(stale.kpfn)  # reused: first as an ordinary page
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert stale.id not in host.ksm.nodes
    assert not (host.frames.stable_node == stale.id).any()
    (node,) = host.ksm.nodes.values()
    kpfn = pte_pfn(host.mm.pte(page_hva(AREA, 0)))
    assert node.kpfn == kpfn and int(host.frames.stable_node[kpfn]) == node.id and node.nr_items == 2


def test_mapping_a_free_frame_is_an_accounting_error() -> None:
    """The path issue #9 took after the stale stable node: a merge mapped the free frame."""
    pool = FramePool(4)
    pfn = pool.alloc_page()
    pool.put_page(pfn)
    with pytest.raises(AssertionError, match="maps free frame"):
        pool.page_add_rmap(pfn)
