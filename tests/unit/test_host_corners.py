"""Corners of the host side (host/mm.py, host/mmu_notifier.py, host/ksm.py) that the scenarios never
reach: an mm without KSM, pinned pages, a merge partner that goes away mid-pass, and pages whose
content hashes collide (the trees are keyed by a 64-bit hash; only a whole-page memcmp merges)."""

import numpy as np
import pytest

from hypervisor.host.frames import FramePool
from hypervisor.host.ksm import _HASH_MULT, _HASH_SALT, UNSTABLE_FLAG, page_hash
from hypervisor.host.mm import MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, VM_MERGEABLE, HostMm, pte_write
from hypervisor.host.mmu_notifier import MmuNotifier, MmuNotifierOps, mmu_notifier_register, mmu_notifier_unregister
from hypervisor.types import PAGE_SIZE

from .support import (
    AREA,
    ERAS,
    Host,
    NotifierLog,
    full_scan,
    make_host,
    mapped_pfns,
    mergeable_area,
    page_hva,
    page_of,
    shared_and_sharing,
)

# --- the mm ---------------------------------------------------------------------------------


def test_madvise_mergeable_without_ksm_only_flags_the_vma() -> None:
    host = make_host()
    mm = HostMm(host.frames, host.profile, host.vmstat, "no-ksm", None)
    vma = mm.mmap(AREA, 2 * PAGE_SIZE)
    mm.madvise(AREA, 2 * PAGE_SIZE, MADV_MERGEABLE)
    assert vma.flags & VM_MERGEABLE
    mm.madvise(AREA, 2 * PAGE_SIZE, MADV_UNMERGEABLE)
    assert not vma.flags & VM_MERGEABLE
    mm.write_bytes(AREA, b"x")
    mm.munmap(AREA, 2 * PAGE_SIZE)
    assert mm.find_vma(AREA) is None and host.frames.allocated == 0


def test_madvise_advice_hvsim_does_not_model_is_refused_by_name() -> None:
    host = make_host()
    host.mm.mmap(AREA, PAGE_SIZE)
    with pytest.raises(ValueError, match="advice 14 is not modelled"):
        host.mm.madvise(AREA, PAGE_SIZE, 14)  # MADV_HUGEPAGE


def test_unregistering_a_notifier_without_release_just_removes_it() -> None:
    host = make_host()
    mn = MmuNotifier(MmuNotifierOps())
    mmu_notifier_register(mn, host.mm)
    mmu_notifier_unregister(mn, host.mm)
    assert mn not in host.mm.mmu_notifiers and not mn.calls


# Kernels with stable node chains (max_page_sharing, 4.13).
CHAIN_ERAS = ("4.13", "6.10")

# --- KSM: pages it must leave alone -----------------------------------------------------------


def host_with_pages(era: str, contents: list[bytes], max_page_sharing: int = 256) -> Host:
    host = make_host(era)
    mergeable_area(host.mm, len(contents))
    for i, data in enumerate(contents):
        host.mm.write_bytes(page_hva(AREA, i), data)
    host.ksm.max_page_sharing = max_page_sharing
    host.ksm.set_run(1)
    return host


def test_ksmd_with_no_mergeable_mm_scans_nothing() -> None:
    host = make_host()
    host.ksm.set_run(1)
    host.ksm.ksm_do_scan(100)
    assert host.ksm.counters()["pages_scanned"] == 0 and host.ksm.seqnr == 0


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("partner", ["stable", "unstable", "zero"])
def test_a_pinned_page_is_never_merged_whatever_it_would_merge_with(era: str, partner: str) -> None:
    # write_protect_page(): page_count != mapcount means someone (KVM mid-fault, O_DIRECT) holds a
    # pin and could still write the page, so try_to_merge_one_page gives up and the pte stays.
    fill = 0 if partner == "zero" else 0x42
    pages = {"stable": 3, "unstable": 2, "zero": 1}[partner]
    host = host_with_pages(era, [page_of(fill)] * pages)
    host.ksm.use_zero_pages = partner == "zero"
    # The last page is pinned. "stable": on the second pass the first two merge, then the last finds
    # their KSM page in the stable tree; "unstable": it finds the first page in the unstable tree;
    # "zero": it is all zeros, and use_zero_pages would map the zero page in its place.
    last = page_hva(AREA, pages - 1)
    pinned = host.mm.get_user_pages(last, write=False)
    for _ in range(3):
        full_scan(host.ksm)
    assert pte_write(host.mm.pte(last)) and mapped_pfns(host.mm, last, 1) == [pinned]
    assert host.ksm.ksm_zero_pages == 0
    host.mm.put_page(pinned)
    full_scan(host.ksm)
    full_scan(host.ksm)
    assert not pte_write(host.mm.pte(last))  # unpinned, it merges


@pytest.mark.parametrize("era", ERAS)
@pytest.mark.parametrize("how", ["munmap", "madv_dontneed"])
def test_an_unstable_tree_page_that_goes_away_mid_pass_merges_with_nothing(era: str, how: str) -> None:
    # munmap frees the tree page's rmap_item, which leaves the unstable tree with it (rb_erase in
    # remove_rmap_item_from_tree): the next equal page takes its place. MADV_DONTNEED leaves the item
    # in the tree with no page behind it: get_mergeable_page() fails in unstable_tree_search_insert(),
    # and the page being scanned gives up for this pass.
    host = make_host(era)
    other = host.new_mm("other")
    mergeable_area(host.mm, 1)
    mergeable_area(other, 1)
    host.mm.write_bytes(AREA, page_of(0x42))
    other.write_bytes(AREA, page_of(0x42))
    host.ksm.set_run(1)
    full_scan(host.ksm)  # checksums taken
    host.ksm.ksm_do_scan(1)  # host.mm's page enters the unstable tree
    assert host.ksm.counters()["pages_unshared"] == 1
    if how == "munmap":
        host.mm.munmap(AREA, PAGE_SIZE)
    else:
        host.mm.madvise(AREA, PAGE_SIZE, MADV_DONTNEED)
    host.ksm.ksm_do_scan(100)
    assert shared_and_sharing(host.ksm) == (0, 0)
    assert pte_write(other.pte(AREA))
    other_items = host.ksm.slots[-1].vmas[0]
    assert other_items.flags[0] == (UNSTABLE_FLAG if how == "munmap" else 0)


@pytest.mark.parametrize("era", ERAS)
def test_write_protect_page_leaves_a_clean_read_only_pte_alone_and_notifies_no_one(era: str) -> None:
    host = host_with_pages(era, [page_of(1)])
    log = NotifierLog()
    log.register(host.mm)
    pfn = mapped_pfns(host.mm, AREA, 1)[0]
    first = host.ksm.write_protect_page(host.mm, AREA, pfn)
    assert first is not None and not pte_write(first)
    log.clear()
    assert host.ksm.write_protect_page(host.mm, AREA, pfn) == first
    assert "change_pte" not in log.callbacks() and "invalidate_page" not in log.callbacks()


def test_break_ksm_where_nothing_is_mapped_does_nothing() -> None:
    host = make_host()
    allocated = host.mm.frames.allocated
    host.ksm.break_cow(host.mm, AREA)  # no VMA there
    host.mm.mmap(AREA, PAGE_SIZE)
    host.ksm.break_cow(host.mm, AREA)  # a VMA, no pte
    assert host.mm.frames.allocated == allocated  # no page was faulted in


# --- KSM: pages whose content hashes collide --------------------------------------------------


def colliding_pages() -> tuple[bytes, bytes]:
    """Two different pages with the same page_hash, the trees' key.

    page_hash is sum((q[i] ^ SALT) * MULT[i]) mod 2**64; moving (q[0] ^ SALT) up by MULT[1] and
    (q[1] ^ SALT) down by MULT[0] changes the sum by MULT[1]*MULT[0] - MULT[0]*MULT[1] = 0.
    """
    mask = (1 << 64) - 1
    salt, m0, m1 = int(_HASH_SALT), int(_HASH_MULT[0]), int(_HASH_MULT[1])
    a = np.full(PAGE_SIZE // 8, 0x0123_4567_89AB_CDEF, dtype=np.uint64)
    b = a.copy()
    b[0] = (((int(a[0]) ^ salt) + m1) & mask) ^ salt
    b[1] = (((int(a[1]) ^ salt) - m0) & mask) ^ salt
    return a.tobytes(), b.tobytes()


def test_the_hash_multipliers_are_the_ones_numpys_pcg64_draws_for_seed_0x4b534d() -> None:
    # ksm_items keeps them in ksm_hash_mult.npy rather than importing numpy.random at every start.
    drawn = np.random.default_rng(0x4B534D).integers(1, 2**63, size=PAGE_SIZE // 8, dtype=np.uint64) | 1
    assert _HASH_MULT.dtype == np.uint64 and _HASH_MULT.shape == (PAGE_SIZE // 8,)
    assert np.array_equal(_HASH_MULT, drawn)


def test_the_colliding_pages_differ_and_hash_alike() -> None:
    a, b = colliding_pages()
    frames = FramePool(4)
    frames.frames[1] = np.frombuffer(a, dtype=np.uint8)
    frames.frames[2] = np.frombuffer(b, dtype=np.uint8)
    hashes = page_hash(frames, np.array([1, 2]))
    assert a != b and hashes[0] == hashes[1]


@pytest.mark.parametrize("era", ERAS)
def test_pages_whose_hashes_collide_merge_only_with_their_equals(era: str) -> None:
    # One hash bucket holds both contents, in the unstable tree (a, then b, then b's equal found
    # behind a) and in the stable tree (b's KSM page, then a's beside it).
    a, b = colliding_pages()
    host = host_with_pages(era, [a, b, b, a])
    full_scan(host.ksm)
    full_scan(host.ksm)
    pfns = mapped_pfns(host.mm, AREA, 4)
    assert pfns[0] == pfns[3] != pfns[1] == pfns[2]
    assert shared_and_sharing(host.ksm) == (2, 2)
    assert host.mm.read_bytes(AREA, 4 * PAGE_SIZE) == a + b + b + a


@pytest.mark.parametrize("era", CHAIN_ERAS)
def test_a_colliding_page_passes_a_stable_node_chain_by_and_gets_its_own_ksm_page(era: str) -> None:
    # max_page_sharing 2 makes the four b pages a chain of two KSM pages; the a pages share the
    # chain's hash but not its content, so they skip it in the search and stand beside it.
    a, b = colliding_pages()
    host = host_with_pages(era, [b, b, b, b, a, a], max_page_sharing=2)
    full_scan(host.ksm)
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert (counters["stable_node_chains"], counters["stable_node_dups"]) == (1, 2)
    assert shared_and_sharing(host.ksm) == (3, 3)
    pfns = mapped_pfns(host.mm, AREA, 6)
    assert len({pfns[4], pfns[5]}) == 1 and pfns[4] not in pfns[:4]
    full_scan(host.ksm)  # and they stay put on the next pass: the search skips the chain
    assert mapped_pfns(host.mm, AREA, 6) == pfns
    assert host.mm.read_bytes(AREA, 6 * PAGE_SIZE) == b * 4 + a * 2


@pytest.mark.parametrize("era", CHAIN_ERAS)
def test_a_stable_node_chain_search_prunes_a_dead_duplicate_and_keeps_the_rest(era: str) -> None:
    # Three KSM pages of one content (max_page_sharing 2); the third dies (its pages dropped). A page
    # scanned before ksmd's cursor reaches the dead one's rmap_items searches the chain first, erases
    # the dead dup there, and finds the two live ones full.
    host = host_with_pages(era, [page_of(9)] + [page_of(0x42)] * 6, max_page_sharing=2)
    full_scan(host.ksm)
    full_scan(host.ksm)
    counters = host.ksm.counters()
    assert (counters["stable_node_chains"], counters["stable_node_dups"]) == (1, 3)
    host.mm.madvise(page_hva(AREA, 5), 2 * PAGE_SIZE, MADV_DONTNEED)
    host.mm.write_bytes(AREA, page_of(0x42))
    host.ksm.ksm_do_scan(1)
    counters = host.ksm.counters()
    assert (counters["stable_node_chains"], counters["stable_node_dups"]) == (1, 2)
    assert shared_and_sharing(host.ksm) == (2, 2)
    assert pte_write(host.mm.pte(AREA))  # every copy is full: it stays unmerged


@pytest.mark.parametrize("era", ERAS)
def test_smart_scan_skipping_a_page_cowed_out_of_a_ksm_page_takes_it_out_of_the_stable_node(era: str) -> None:
    # should_skip_rmap_item() (6.7): a page visited three times without merging is skipped on its
    # fifth visit. Page 0 merges on its fourth, the VMM's write then COWs it out of the KSM page,
    # and the skip on the fifth visit also drops its rmap_item from the stable node.
    host = host_with_pages(era, [page_of(1), page_of(0x42), page_of(0x42)])
    host.ksm.smart_scan = True
    for _ in range(3):
        full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 1)
    host.mm.write_bytes(AREA, page_of(0x42))
    full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 2)
    host.mm.write_bytes(AREA, b"\x07")
    skipped = host.ksm.pages_skipped
    full_scan(host.ksm)
    assert host.ksm.pages_skipped == skipped + 1
    assert shared_and_sharing(host.ksm) == (1, 1)


@pytest.mark.parametrize("era", ERAS)
def test_ksmd_frees_the_rmap_item_of_a_dropped_page_and_scans_on_in_the_same_vma(era: str) -> None:
    # scan_get_next_rmap_item(): rmap_items the cursor passes over with no page behind them are
    # freed on the way (remove_trailing_rmap_items), then the next present page is scanned.
    host = host_with_pages(era, [page_of(1), page_of(2)])
    full_scan(host.ksm)
    assert host.ksm.rmap_items == 2
    host.mm.madvise(AREA, PAGE_SIZE, MADV_DONTNEED)
    scanned = host.ksm.pages_scanned
    host.ksm.ksm_do_scan(1)
    assert host.ksm.rmap_items == 1 and host.ksm.pages_scanned == scanned + 1
