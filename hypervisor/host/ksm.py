"""ksmd: Kernel Samepage Merging over the MADV_MERGEABLE areas of registered mms, after mm/ksm.c.

Overview.  Every wake-up, `ksm_do_scan(pages_to_scan)` advances a cursor over the
mm_slots (in registration order), their mergeable VMAs and the pages present in
them; each page it reaches has an rmap_item (here: a slot in per-VMA numpy arrays)
and goes through `cmp_and_merge_page`:

1. look for an equal page in the **stable tree** (KSM pages, write-protected);
   if one has room (`max_page_sharing`), merge into it;
2. else compute the page's checksum; if it changed since the last visit, remember
   it and stop (the page is volatile; so nothing merges before the second pass);
3. with `use_zero_pages`, an all-zero page is merged with the zero page;
4. else look in the **unstable tree** (this pass's candidates, not write-protected,
   reset at the start of every full scan): an equal page there is merged with this
   one into a new KSM page, which moves to the stable tree; else this page is
   inserted.

Merging a page is `write_protect_page` (clear the pte, then set_pte_at_notify a
read-only pte to the same pfn) followed by `replace_page` (clear, then
set_pte_at_notify a read-only pte to the KSM page), each wrapped in
invalidate_range_start/end from 3.7 on.  Era differences come from the Profile:
2.6.32 builds a fresh KSM page and replaces both pages with it, and unmerges a KSM
page left with a single mapping; later kernels turn the first page into the KSM
page in place and keep such pages merged.

Simplifications (see README, fidelity): the stable and unstable trees are hash
tables keyed by a 64-bit content hash, each hit confirmed by a whole-page memcmp,
instead of rbtrees ordered by memcmp (same merges for pages that hold still; the
kernel's unstable tree may also find a page whose content changed since insertion);
chains are pruned on every search rather than every
stable_node_chains_prune_millisecs.  The era's differences (chains from 4.13, smart_scan
on by default from 6.7, ...) come from the Profile (hypervisor/kernels.py).
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..types import PAGE_SHIFT, PAGE_SIZE, Hva, Pfn
from .frames import ZERO_PFN, FramePool
from .mm import (
    PAGE_DIRTY,
    mk_pte,
    pte_ksm_zero,
    pte_mkksmzero,
    pte_pfn,
    pte_present,
    pte_special,
    pte_write,
    pte_wrprotect,
)
from .mmu_notifier import (
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    set_pte_at_notify,
)

if TYPE_CHECKING:
    from ..profiles import Profile
    from .mm import HostMm, Vma

# rmap_item flags
UNSTABLE_FLAG = 1
STABLE_FLAG = 2

# sizeof(struct ksm_rmap_item) on 64-bit, for general_profit
RMAP_ITEM_SIZE = 64

_HASH_MULT = np.random.default_rng(0x4B534D).integers(1, 2**63, size=PAGE_SIZE // 8, dtype=np.uint64) | 1
_HASH_SALT = np.uint64(0x9E3779B97F4A7C15)


_HASH_CHUNK = 64  # pages per step: small temporaries (malloc, cache) instead of one huge gather


def page_hash(frames: FramePool, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """A 64-bit content hash per frame, vectorised: the trees' key (page_checksum is the change detector)."""
    n = int(pfns.shape[0])
    out: npt.NDArray[np.uint64] = np.empty(n, dtype=np.uint64)
    qwords = frames.qwords
    for lo in range(0, n, _HASH_CHUNK):
        part = qwords[pfns[lo : lo + _HASH_CHUNK]]
        part ^= _HASH_SALT
        out[lo : lo + _HASH_CHUNK] = part @ _HASH_MULT  # sum of products, exact mod 2**64
    return out


_FOLD_MULT = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd
_MIN_RUN = 8  # consecutive pfns worth a view of their own; shorter runs are gathered


def page_checksum(frames: FramePool, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
    """calc_checksum(): a change detector, the sum of the page's 512 qwords mod 2**64 folded to 32 bits.

    The kernel takes `jhash2(addr, PAGE_SIZE / 4, 17)` (2.6.32 mm/ksm.c calc_checksum)
    or `xxhash(addr, PAGE_SIZE, 0)` kept as a u32 (6.8 mm/ksm.c calc_checksum);
    cmp_and_merge_page only compares it with rmap_item->oldchecksum after the stable
    tree missed, and every merge is confirmed by memcmp_pages, so any function that
    changes when the content does will do.
    The sum is the cheapest one numpy vectorises: over a run of consecutive pfns it is
    one reduction over a view of the frames, no copy (benchmarks/checksums.py measured
    it against the position-weighted hash on the bundled workloads: the same changes
    seen).  Blind spot (README, fidelity): a change that keeps the sum, e.g. two qwords
    swapped, goes unseen for one visit.
    """
    n = int(pfns.shape[0])
    sums: npt.NDArray[np.uint64] = np.empty(n, dtype=np.uint64)
    qwords = frames.qwords
    starts = np.flatnonzero(np.diff(pfns, prepend=-2) != 1)
    lengths = np.diff(np.append(starts, n))
    long = lengths >= _MIN_RUN
    for start, length in zip(starts[long].tolist(), lengths[long].tolist(), strict=True):
        first = int(pfns[start])
        qwords[first : first + length].sum(axis=1, out=sums[start : start + length])
    scattered = np.flatnonzero(np.repeat(~long, lengths))
    for lo in range(0, scattered.size, _HASH_CHUNK):
        sel = scattered[lo : lo + _HASH_CHUNK]
        sums[sel] = qwords[pfns[sel]].sum(axis=1)
    # The high half of a multiplicative (Fibonacci) hash: an XOR fold of the halves would let a change
    # at bit i cancel one at bit i + 32 (benchmarks/checksums.py found one in bootstorm).
    folded: npt.NDArray[np.uint32] = ((sums * _FOLD_MULT) >> np.uint64(32)).astype(np.uint32)
    return folded


def page_checksum_one(frames: FramePool, pfn: Pfn) -> int:
    """page_checksum() of one frame, without the batch machinery."""
    total = int(frames.qwords[pfn].sum(dtype=np.uint64))
    return ((total * int(_FOLD_MULT)) & 0xFFFF_FFFF_FFFF_FFFF) >> 32


class VmaItems:
    """The rmap_items of one mergeable VMA, as arrays indexed by page."""

    def __init__(self, mm: "HostMm", vma: "Vma") -> None:
        self.mm = mm
        self.vma = vma
        n = vma.nr_pages
        self.has_item = np.zeros(n, dtype=np.bool_)
        self.flags = np.zeros(n, dtype=np.uint8)
        self.oldchecksum = np.zeros(n, dtype=np.uint32)
        self.node = np.zeros(n, dtype=np.int32)  # stable node id when STABLE_FLAG
        # smart_scan (6.7+): visits without a merge, and skips left before the next visit
        self.age = np.zeros(n, dtype=np.uint8)
        self.remaining_skips = np.zeros(n, dtype=np.uint8)

    def hva(self, idx: int) -> Hva:
        return Hva(self.vma.start + (idx << PAGE_SHIFT))


@dataclass
class StableNode:
    """struct ksm_stable_node: one KSM page and how many rmap_items map it."""

    id: int
    kpfn: Pfn
    key: int
    nr_items: int = 0  # rmap_hlist_len
    chain: "StableNodeChain | None" = None
    checksum: int = 0  # page_checksum of the KSM page (its content cannot change while it is one)


@dataclass
class StableNodeChain:
    """A stable node chain: duplicate KSM pages of one content (max_page_sharing reached)."""

    key: int
    dups: list[StableNode] = field(default_factory=list)


@dataclass
class MmSlot:
    mm: "HostMm"
    vmas: list[VmaItems] = field(default_factory=list)

    def items_of(self, vma: "Vma") -> VmaItems | None:
        return next((v for v in self.vmas if v.vma is vma), None)


@dataclass
class KsmCursor:
    """ksm_scan: the mm_slot being scanned and the next address in it, as the kernel keeps it
    (an address, not a position, so VMAs and mms may come and go under it)."""

    slot: int = 0
    address: int = 0
    in_pass: bool = False


ItemRef = tuple[VmaItems, int]
KsmTrace = Callable[[str, dict[str, Any]], None]
KsmRacePoint = Callable[["HostMm", Hva], None]


class Ksm:
    """The KSM subsystem: knobs and counters of /sys/kernel/mm/ksm, mm_slots, trees and ksmd's scan."""

    def __init__(self, frames: FramePool, profile: "Profile") -> None:
        self.frames = frames
        self.profile = profile
        # knobs
        self.run = 0
        self.pages_to_scan = 100
        self.sleep_millisecs = 20
        self.max_page_sharing = 256
        self.use_zero_pages = False
        # The kernel's defaults: smart_scan is on from 6.7 (its knob appeared on); the VMM may change it.
        self.smart_scan = profile.ksm_smart_scan
        # state
        self.slots: list[MmSlot] = []
        self.cursor = KsmCursor()
        self.seqnr = 0  # full_scans
        self.stable_tree: dict[int, list[StableNode | StableNodeChain]] = {}
        self.unstable_tree: dict[int, list[ItemRef]] = {}
        # Where each rmap_item inserted by this pass sits in the unstable tree (its bucket's
        # key), so that freeing it takes it out, as remove_rmap_item_from_tree's rb_erase does.
        self.unstable_key: dict[ItemRef, int] = {}
        self.nodes: dict[int, StableNode] = {}
        # page_checksum of every stable node's KSM page, with multiplicity: lets a scan batch
        # rule out a stable match for a page without taking its content hash.
        self.stable_checksums: Counter[int] = Counter()
        self._next_node_id = 1
        self.rmap_items = 0
        self.unshared = 0
        self.ksm_zero_pages = 0
        self.pages_scanned = 0
        self.pages_skipped = 0
        self.zero_hash = int(page_hash(frames, np.array([ZERO_PFN]))[0])
        self.trace: KsmTrace | None = None
        # Named points where tests fire host events (races); see hypervisor/races.py.
        self.race_points: dict[str, KsmRacePoint] = {}

    # --- registration (ksm_madvise / __ksm_enter / exit) ---------------------------------

    def ksm_enter(self, mm: "HostMm") -> None:
        slot = next((s for s in self.slots if s.mm is mm), None)
        if slot is None:
            slot = MmSlot(mm)
            # __ksm_enter: list_add_tail just behind the cursor's mm_slot, so a pass in
            # progress does not reach the new mm; it is first scanned on the next pass.
            if self.cursor.in_pass and self.cursor.slot < len(self.slots):
                self.slots.insert(self.cursor.slot, slot)
                self.cursor.slot += 1
            else:
                self.slots.append(slot)
        for vma in mm.vmas:
            if vma.mergeable and slot.items_of(vma) is None:
                slot.vmas.append(VmaItems(mm, vma))
        slot.vmas.sort(key=lambda v: v.vma.start)

    def _drop_vma_items(self, mm: "HostMm", vma: "Vma") -> None:
        slot = next((s for s in self.slots if s.mm is mm), None)
        items = slot.items_of(vma) if slot is not None else None
        if slot is None or items is None:
            return
        for idx in np.flatnonzero(items.has_item):
            self._free_item(items, int(idx))
        slot.vmas.remove(items)

    def vma_removed(self, mm: "HostMm", vma: "Vma") -> None:
        """munmap of a mergeable VMA: its rmap_items go (remove_trailing_rmap_items)."""
        self._drop_vma_items(mm, vma)

    # --- counters ----------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        shared = sharing = 0
        chains = dups = 0
        for entries in self.stable_tree.values():
            for entry in entries:
                if isinstance(entry, StableNodeChain):
                    chains += 1
                    dups += len(entry.dups)
                    nodes = entry.dups
                else:
                    nodes = [entry]
                for node in nodes:
                    if node.nr_items:
                        shared += 1
                        sharing += node.nr_items - 1
        volatile = max(0, self.rmap_items - shared - sharing - self.unshared)
        # general_profit counts KSM's zero pages from 6.6 (xu xin's series), not in 6.4/6.5.
        zero = self.ksm_zero_pages if self.profile.ksm_counts_zero_pages else 0
        profit = (sharing + zero) * PAGE_SIZE - self.rmap_items * RMAP_ITEM_SIZE
        out = {
            "run": self.run,
            "pages_to_scan": self.pages_to_scan,
            "sleep_millisecs": self.sleep_millisecs,
            "max_page_sharing": self.max_page_sharing,
            "use_zero_pages": int(self.use_zero_pages),
            "smart_scan": int(self.smart_scan),
            "pages_shared": shared,
            "pages_sharing": sharing,
            "pages_unshared": self.unshared,
            "pages_volatile": volatile,
            "full_scans": self.seqnr,
            "stable_node_chains": chains,
            "stable_node_dups": dups,
            "ksm_zero_pages": self.ksm_zero_pages,
            "general_profit": profit,
            "pages_scanned": self.pages_scanned,
            "pages_skipped": self.pages_skipped,
        }
        # Files the kernel did not have yet (their rows in hypervisor/kernels.py).
        absent = []
        if not self.profile.ksm_stable_node_chains:
            absent += ["max_page_sharing", "stable_node_chains", "stable_node_dups"]
        if not self.profile.ksm_use_zero_pages:
            absent.append("use_zero_pages")
        if not self.profile.ksm_smart_scan:
            absent += ["smart_scan", "pages_skipped"]
        if not self.profile.ksm_general_profit:
            absent.append("general_profit")
        if not self.profile.ksm_counts_zero_pages:
            absent.append("ksm_zero_pages")
        for name in absent:
            del out[name]
        return out

    def ksm_zero_page_unmapped(self) -> None:
        self.ksm_zero_pages -= 1

    # --- run control -------------------------------------------------------------------

    def set_run(self, value: int) -> None:
        """/sys/kernel/mm/ksm/run: 0 stop, 1 run, 2 stop and unmerge everything."""
        if value not in (0, 1, 2):
            raise ValueError("run takes 0, 1 or 2")
        self.run = value
        if value == 2:
            self.unmerge_and_remove_all_rmap_items()

    # --- ksmd ----------------------------------------------------------------------------

    def ksmd_wakeup(self) -> None:
        if self.run == 1:
            self.ksm_do_scan(self.pages_to_scan)

    def ksm_do_scan(self, scan_npages: int) -> None:
        """Scan up to scan_npages pages, in cursor order, in batches of consecutive present pages.

        A batch is vectorised where the kernel does nothing per page (a page already
        merged into the KSM page its rmap_item names) and its content hashes are taken
        in one numpy pass; every other page goes through cmp_and_merge_page one at a
        time, in address order, exactly as the per-page loop would.
        """
        if self.trace is not None:
            self.trace("ksm_start_scan", {"seq": self.seqnr, "rmap_items": self.rmap_items})
        budget = scan_npages
        while budget > 0:
            batch = self._next_batch(budget)
            if batch is None:
                break
            items, idxs, pfns = batch
            budget -= idxs.size
            self.pages_scanned += int(idxs.size)
            self._scan_batch(items, idxs, pfns)
        if self.trace is not None:
            self.trace("ksm_stop_scan", {"seq": self.seqnr, "rmap_items": self.rmap_items})

    def _scan_batch(self, items: VmaItems, idxs: npt.NDArray[np.intp], pfns: npt.NDArray[np.int64]) -> None:
        frames = self.frames
        flags = items.flags[idxs]
        in_stable = (flags & STABLE_FLAG) != 0
        page_node = frames.stable_node[pfns]
        if self.profile.ksm_unmerges_unshared_ksm_page:
            # 2.6.32's ksm_do_scan: a KSM page in the stable tree is left alone unless it is
            # mapped only once, and then it is unmerged (gone by 2.6.33.3's ksm_do_scan).
            settled = in_stable & (page_node >= 0)
            single = settled & (frames.mapcount[pfns] == 1)
            work = np.flatnonzero(~settled | single)
        else:
            single = np.zeros(idxs.size, dtype=np.bool_)
            work = np.flatnonzero(~(in_stable & (page_node > 0) & (items.node[idxs] == page_node)))
        if work.size == 0:
            return
        checksums = page_checksum(frames, pfns[work])
        # Pages whose only effect would be "checksum changed: remember it" (not in any tree,
        # not a KSM page, no KSM page of the stable tree with their checksum, and no page of the
        # batch that takes the slow path, which could create one, has their checksum): settled in
        # one step.  Equal content means equal checksum, so the filter never lets a match through.
        widx = idxs[work]
        quick = (flags[work] == 0) & (page_node[work] < 0) & (checksums != items.oldchecksum[widx])
        if self.stable_checksums:
            keys = np.fromiter(self.stable_checksums.keys(), dtype=np.uint32, count=len(self.stable_checksums))
            quick &= ~np.isin(checksums, keys)
        if quick.any():
            if not quick.all():
                quick &= ~np.isin(checksums, checksums[~quick])
            items.oldchecksum[widx[quick]] = checksums[quick]
            slow = ~quick
            work, checksums = work[slow], checksums[slow]
        # The trees' key, only for the pages that look them up.
        hashes = page_hash(frames, pfns[work])
        for pos, h, checksum in zip(work.tolist(), hashes.tolist(), checksums.tolist(), strict=True):
            idx, pfn = int(idxs[pos]), Pfn(int(pfns[pos]))
            if single[pos]:
                hva = items.hva(idx)
                self.break_cow(items.mm, hva)
                self.remove_rmap_item_from_tree(items, idx)
                items.oldchecksum[idx] = checksum  # the content did not change
            else:
                self.cmp_and_merge_page(items, idx, pfn, h, checksum)

    def _next_batch(self, budget: int) -> tuple[VmaItems, npt.NDArray[np.intp], npt.NDArray[np.int64]] | None:
        """scan_get_next_rmap_item() for up to `budget` consecutive pages of one VMA.

        Items of pages the cursor passes over (no longer present, or the zero page) are
        freed on the way, as get_next_rmap_item does; a batch stops before such an item
        so that its removal keeps its place in the order of events.
        """
        cur = self.cursor
        if not self.slots:
            return None
        if not cur.in_pass:
            # A new full scan: the unstable tree is rebuilt from scratch.
            self.unstable_tree.clear()
            self.unstable_key.clear()
            cur.in_pass = True
            cur.slot, cur.address = 0, 0
        while True:
            if cur.slot >= len(self.slots):
                cur.slot, cur.address, cur.in_pass = 0, 0, False
                self.seqnr += 1
                return None
            slot = self.slots[cur.slot]
            items = next((v for v in slot.vmas if v.vma.end > cur.address and v.vma.mergeable), None)
            if items is None:
                cur.slot += 1
                cur.address = 0
                continue
            vma = items.vma
            start = max(0, (cur.address - vma.start) >> PAGE_SHIFT)
            window = vma.ptes[start:]
            # present (bit 0) and not special (bit 9): an anonymous page with a struct page
            anon = ((window & 1) != 0) & ((window & (1 << 9)) == 0)
            stale = items.has_item[start:] & ~anon
            first = np.flatnonzero(anon)
            first_stale = np.flatnonzero(stale)
            if first.size == 0 or (first_stale.size and first_stale[0] < first[0]):
                # Free the items passed over up to the next present page (or the VMA's end).
                stop = window.shape[0] if first.size == 0 else int(first[0])
                for off in first_stale[first_stale < stop].tolist():
                    self._free_item(items, start + off)
                if first.size == 0:
                    cur.address = vma.end
                    continue
            begin = int(first[0])
            later_stale = first_stale[first_stale > begin]
            limit = int(later_stale[0]) if later_stale.size else window.shape[0]
            offs = first[first < limit]
            skip = self._smart_scan_skips(items, start + offs, window[offs] >> PAGE_SHIFT, budget)
            offs = offs[: budget if skip is None else skip.size]
            idxs = start + offs
            cur.address = vma.start + ((int(idxs[-1]) + 1) << PAGE_SHIFT)
            fresh = ~items.has_item[idxs]
            if fresh.any():
                new = idxs[fresh]
                items.has_item[new] = True
                items.flags[new] = 0
                items.oldchecksum[new] = 0
                items.age[new] = 0
                items.remaining_skips[new] = 0
                self.rmap_items += int(new.size)
            unstable = (items.flags[idxs] & UNSTABLE_FLAG) != 0
            if unstable.any():
                # Unstable membership is per pass: drop it (the tree itself was reset).
                seen = idxs[unstable]
                items.flags[seen] &= np.uint8(STABLE_FLAG)
                self.unshared -= int(seen.size)
            if skip is not None:
                self._age_items(items, idxs, window[offs] >> PAGE_SHIFT, skip)
                keep = ~skip
                if not keep.any():
                    continue  # every page reached was skipped: they cost no pages_to_scan
                idxs, offs = idxs[keep], offs[keep]
            return items, idxs, window[offs] >> PAGE_SHIFT

    def _smart_scan_skips(self, items: VmaItems, idxs: npt.NDArray[np.intp], pfns: npt.NDArray[np.int64],
                          budget: int) -> npt.NDArray[np.bool_] | None:
        """should_skip_rmap_item() (6.7+) over the candidate pages, up to the budget-th page not skipped.

        A page that is not a KSM page and whose rmap_item has been visited three times or
        more without merging is skipped on 1, 2, 4 or 8 of every following visits as it
        ages; a skipped page costs no pages_to_scan.  None when smart_scan is off.
        """
        if not self.smart_scan:
            return None
        known = items.has_item[idxs]
        age = np.where(known, items.age[idxs], 0)
        remaining = np.where(known, items.remaining_skips[idxs], 0)
        skip = (self.frames.stable_node[pfns] < 0) & (age >= 3) & (remaining > 0)
        kept = np.flatnonzero(~skip)
        reach = int(kept[budget - 1]) + 1 if kept.size >= budget else idxs.size
        out: npt.NDArray[np.bool_] = skip[:reach]
        return out

    def _age_items(self, items: VmaItems, idxs: npt.NDArray[np.intp], pfns: npt.NDArray[np.int64],
                   skip: npt.NDArray[np.bool_]) -> None:
        not_ksm = self.frames.stable_node[pfns] < 0
        age = items.age[idxs].astype(np.int32)
        remaining = items.remaining_skips[idxs].astype(np.int32)
        items.age[idxs] = np.where(not_ksm, np.minimum(age + 1, 255), age)
        # An old page allowed no more skips is scanned now and earns skip_age(age) skips.
        renew = not_ksm & (age >= 3) & (remaining == 0)
        earned = np.select([age <= 3, age <= 5, age <= 8], [1, 2, 4], 8)
        items.remaining_skips[idxs] = np.where(renew, earned, np.where(skip, remaining - 1, remaining))
        self.pages_skipped += int(skip.sum())
        for idx in idxs[skip & ((items.flags[idxs] & STABLE_FLAG) != 0)].tolist():
            self.remove_rmap_item_from_tree(items, int(idx))

    def _follow_page(self, mm: "HostMm", hva: Hva) -> Pfn | None:
        """follow_page() of an anonymous page: None for no pte or the zero page."""
        vma = mm.find_vma(hva)
        if vma is None:
            return None
        pte = int(vma.ptes[vma.index(hva)])
        if not pte_present(pte) or pte_special(pte):
            return None
        return pte_pfn(pte)

    def _free_item(self, items: VmaItems, idx: int) -> None:
        self.remove_rmap_item_from_tree(items, idx)
        items.has_item[idx] = False
        self.rmap_items -= 1

    def remove_rmap_item_from_tree(self, items: VmaItems, idx: int) -> None:
        flags = int(items.flags[idx])
        items.flags[idx] = 0  # first: erasing the node below emits an event the checker reads
        if flags & STABLE_FLAG:
            node = self.nodes.get(int(items.node[idx]))
            if node is not None:
                node.nr_items -= 1
                if node.nr_items == 0 and self.frames.stable_node[node.kpfn] != node.id:
                    self._erase_node(node)
        if flags & UNSTABLE_FLAG:
            # 2.6.32/3.7 remove_rmap_item_from_tree(): an item inserted by this scan is
            # rb_erase()d ("be careful when an mm is exiting"); left in the tree, a freed item
            # would be merged later and counted in its stable node forever.
            self._unstable_erase(items, idx)
            self.unshared -= 1

    # --- cmp_and_merge_page ------------------------------------------------------------

    def cmp_and_merge_page(self, items: VmaItems, idx: int, pfn: Pfn, h: int, checksum: int | None = None) -> None:
        """`h` is the page's content hash, `checksum` its page_checksum (taken by the caller, batched)."""
        # A page already merged into the KSM page its rmap_item names never gets here: the
        # batch filter in _scan_batch is the kernel's "rmap_item->head == stable_node" return.
        frames = self.frames
        node_id = int(frames.stable_node[pfn]) if pfn != ZERO_PFN else -1
        self.remove_rmap_item_from_tree(items, idx)
        if node_id > 0 and node_id in self.nodes:
            # A KSM page that lost its rmap_item (e.g. a forked mapping): re-append.
            self._stable_tree_append(items, idx, self.nodes[node_id])
            return
        node = self.stable_tree_search(pfn, h)
        if node is not None:
            if self.trace is not None:
                self.trace("ksm_merge_with_ksm_page", {"mm": items.mm.name, "hva": items.hva(idx),
                                                       "ksm_pfn": int(node.kpfn), "pfn": int(pfn)})
            if self.try_to_merge_one_page(items.mm, items.hva(idx), pfn, node.kpfn):
                self._stable_tree_append(items, idx, node)
            return
        if self.profile.ksm_unmerges_unshared_ksm_page and node_id >= 0:
            # 2.6.32's cmp_and_merge_page (sndrzt/linux-2.6.32 mm/ksm.c): a KSM page the stable
            # tree no longer knows ("got here by fork", or a failed break_ksm) gets its COW
            # broken, and the scan goes on with the old KSM page, so a merge of it fails.
            self.break_cow(items.mm, items.hva(idx))
        if checksum is None:
            checksum = page_checksum_one(frames, pfn)
        if int(items.oldchecksum[idx]) != checksum:
            items.oldchecksum[idx] = checksum
            return
        if self.use_zero_pages and h == self.zero_hash and frames.pages_identical(pfn, ZERO_PFN):
            if self.try_to_merge_one_page(items.mm, items.hva(idx), pfn, ZERO_PFN):
                self.ksm_zero_pages += 1
            return
        tree = self.unstable_tree_search_insert(items, idx, pfn, h)
        if tree is None:
            return
        tree_items, tree_idx, tree_pfn = tree
        kpfn = self.try_to_merge_two_pages(items, idx, pfn, tree_items, tree_idx, tree_pfn)
        if kpfn is None:
            return
        # The tree item leaves the unstable tree; both join the new stable node.
        self._unstable_remove(tree_items, tree_idx)
        new = self.stable_tree_insert(kpfn, h)
        self._stable_tree_append(tree_items, tree_idx, new)
        self._stable_tree_append(items, idx, new)
        # Only now may the KSM page go (3.7 cmp_and_merge_page: `page` stays referenced across
        # stable_tree_insert; ksm_do_scan's put_page drops it).  If host events zapped every
        # pte of it meanwhile, it is freed here, loses PageKsm, and the node is stale.
        frames.put_page(kpfn)

    # --- stable tree ---------------------------------------------------------------------

    def _get_ksm_page(self, node: StableNode) -> bool:
        """get_ksm_page(): is the node's KSM page still alive and still this node's?"""
        return int(self.frames.stable_node[node.kpfn]) == node.id

    def _candidate(self, node: StableNode) -> bool:
        if not self.profile.ksm_stable_node_chains:
            return node.nr_items > 0  # before 4.13 a KSM page has no sharing limit
        return 0 < node.nr_items < self.max_page_sharing

    def stable_tree_search(self, pfn: Pfn, h: int) -> StableNode | None:
        entries = self.stable_tree.get(h)
        if not entries:
            return None
        for entry in list(entries):
            if isinstance(entry, StableNodeChain):
                for dup in list(entry.dups):
                    if not self._get_ksm_page(dup):
                        self._erase_node(dup)
                live = entry.dups
                if not live:
                    continue
                if not self.frames.pages_identical(pfn, live[0].kpfn):
                    continue
                room = [d for d in live if self._candidate(d)]
                if not room:
                    return None  # equal content, but every copy is full
                return max(room, key=lambda d: d.nr_items)
            if not self._get_ksm_page(entry):
                self._erase_node(entry)
                continue
            if self.frames.pages_identical(pfn, entry.kpfn):
                return entry if self._candidate(entry) else None
        return None

    def stable_tree_insert(self, kpfn: Pfn, h: int) -> StableNode:
        if self.frames.is_free(kpfn):
            # set_page_stable_node() on a page nobody holds: the node would outlive the frame.
            raise AssertionError(f"stable_tree_insert on free frame {kpfn:#x}")
        node = StableNode(self._next_node_id, kpfn, h)
        node.checksum = page_checksum_one(self.frames, kpfn)
        self.stable_checksums[node.checksum] += 1
        self._next_node_id += 1
        self.nodes[node.id] = node
        self.frames.stable_node[kpfn] = node.id
        entries = self.stable_tree.setdefault(h, [])
        if not self.profile.ksm_stable_node_chains:
            entries.append(node)  # no chains before 4.13 (2c653d0ee2ae)
            return node
        for pos, entry in enumerate(entries):
            if isinstance(entry, StableNodeChain):
                if entry.dups and self.frames.pages_identical(kpfn, entry.dups[0].kpfn):
                    node.chain = entry
                    entry.dups.append(node)
                    return node
            elif self._get_ksm_page(entry) and self.frames.pages_identical(kpfn, entry.kpfn):
                # A full node of the same content becomes a chain with both as dups.
                chain = StableNodeChain(h, [entry, node])
                entry.chain = node.chain = chain
                entries[pos] = chain
                return node
        entries.append(node)
        return node

    def _stable_tree_append(self, items: VmaItems, idx: int, node: StableNode) -> None:
        items.flags[idx] = STABLE_FLAG
        items.node[idx] = node.id
        node.nr_items += 1

    def _erase_node(self, node: StableNode) -> None:
        """remove_node_from_stable_tree(): its rmap_items lose their stable membership."""
        if node.id not in self.nodes:
            return
        del self.nodes[node.id]
        self.stable_checksums[node.checksum] -= 1
        if not self.stable_checksums[node.checksum]:
            del self.stable_checksums[node.checksum]
        if node.nr_items:
            for slot in self.slots:
                for items in slot.vmas:
                    for idx in np.flatnonzero((items.node == node.id) & (items.flags & STABLE_FLAG > 0)):
                        items.flags[int(idx)] = 0
            node.nr_items = 0
        entries = self.stable_tree.get(node.key, [])
        if node.chain is not None:
            chain = node.chain
            chain.dups.remove(node)
            if len(chain.dups) <= 1 and chain in entries:
                pos = entries.index(chain)
                if chain.dups:
                    chain.dups[0].chain = None
                    entries[pos] = chain.dups[0]
                else:
                    del entries[pos]
        elif node in entries:
            entries.remove(node)
        if not entries:
            self.stable_tree.pop(node.key, None)
        if int(self.frames.stable_node[node.kpfn]) == node.id:
            self.frames.stable_node[node.kpfn] = 0
        if self.trace is not None:  # once the node is gone (the checker runs on events)
            self.trace("ksm_remove_ksm_page", {"pfn": int(node.kpfn)})

    # --- unstable tree ---------------------------------------------------------------------

    def unstable_tree_search_insert(
        self, items: VmaItems, idx: int, pfn: Pfn, h: int
    ) -> tuple[VmaItems, int, Pfn] | None:
        bucket = self.unstable_tree.setdefault(h, [])
        for tree_items, tree_idx in bucket:
            tree_pfn = self._follow_page(tree_items.mm, tree_items.hva(tree_idx))
            if tree_pfn is None or self.frames.page_ksm(tree_pfn):
                return None  # get_mergeable_page() failed: give up for this page
            if tree_pfn == pfn:
                return None
            if self.frames.pages_identical(pfn, tree_pfn):
                return tree_items, tree_idx, tree_pfn
        bucket.append((items, idx))
        self.unstable_key[(items, idx)] = h
        items.flags[idx] = UNSTABLE_FLAG
        self.unshared += 1
        return None

    def _unstable_erase(self, items: VmaItems, idx: int) -> None:
        h = self.unstable_key.pop((items, idx), None)
        bucket = self.unstable_tree.get(h, []) if h is not None else []
        for pos, (it, i) in enumerate(bucket):
            if it is items and i == idx:
                del bucket[pos]
                break

    def _unstable_remove(self, items: VmaItems, idx: int) -> None:
        self._unstable_erase(items, idx)
        if items.flags[idx] & UNSTABLE_FLAG:
            items.flags[idx] = int(items.flags[idx]) & STABLE_FLAG
            self.unshared -= 1

    # --- merging ------------------------------------------------------------------------

    def try_to_merge_two_pages(
        self, items: VmaItems, idx: int, pfn: Pfn, tree_items: VmaItems, tree_idx: int, tree_pfn: Pfn
    ) -> Pfn | None:
        """Merge two equal pages into one KSM page; on success the caller holds a reference to it.

        The reference keeps the KSM page allocated until the caller has written its stable
        node (stable_tree_insert), even if host events zapped every pte of it in between:
        a stable node written into a free frame would survive the frame's reuse (issue #9).
        """
        hva, tree_hva = items.hva(idx), tree_items.hva(tree_idx)
        frames = self.frames
        if self.profile.ksm_merge_allocates_kpage:
            # 2.6.32: a fresh KSM page, a copy of this page; both pages are replaced by it.
            # 2.6.32 drops the allocation's reference here, because its stable tree holds
            # rmap_items, found again through their addresses; hvsim's stable nodes name the
            # KSM page's pfn (the 2.6.33+ design), so the reference is held as 2.6.33+ holds it.
            kpfn = frames.alloc_page(zero=False)
            frames.copy_page(kpfn, pfn)
            frames.stable_node[kpfn] = 0
            ok = self.try_to_merge_one_page(items.mm, hva, pfn, kpfn)
            if ok:
                ok = self.try_to_merge_one_page(tree_items.mm, tree_hva, tree_pfn, kpfn)
                if not ok:
                    self.break_cow(items.mm, hva)
            if not ok:
                frames.put_page(kpfn)
                return None
            return kpfn
        # 2.6.33+: this page becomes the KSM page in place; the tree page is replaced by it.
        # ksmd holds `page` from scan_get_next_rmap_item's follow_page(FOLL_GET) on; hvsim
        # takes that reference only here, for the merge and the insert (README, fidelity).
        frames.get_page(pfn)
        if not self.try_to_merge_one_page(items.mm, hva, pfn, None, ksmd_refs=1):
            frames.put_page(pfn)
            return None
        if not self.try_to_merge_one_page(tree_items.mm, tree_hva, tree_pfn, pfn):
            self.break_cow(items.mm, hva)
            frames.put_page(pfn)
            return None
        return pfn

    def try_to_merge_one_page(self, mm: "HostMm", hva: Hva, pfn: Pfn, kpfn: Pfn | None, ksmd_refs: int = 0) -> bool:
        if pfn == kpfn:
            return True
        orig_pte = self.write_protect_page(mm, hva, pfn, ksmd_refs)
        if orig_pte is None:
            return False
        if kpfn is None:
            self.frames.stable_node[pfn] = 0  # set_page_stable_node(page, NULL): PageKsm
            return True
        if self.race_points:
            self._race("ksm_before_replace_page", mm, hva)
        if not self.frames.pages_identical(pfn, kpfn):
            return False
        return self.replace_page(mm, hva, pfn, kpfn, orig_pte)

    def write_protect_page(self, mm: "HostMm", hva: Hva, pfn: Pfn, ksmd_refs: int = 0) -> int | None:
        """Make the pte read-only (and clean); None if the page is pinned or gone.

        `ksmd_refs`: references ksmd itself holds on the page (3.7's check is
        `page_mapcount(page) + 1 + swapped != page_count(page)`, the 1 being ksmd's).
        """
        wrap = self.profile.ksm_pte_updates_in_invalidate_range
        end = Hva(hva + PAGE_SIZE)
        if wrap:
            mmu_notifier_invalidate_range_start(mm, hva, end)
        try:
            pte = mm.pte(hva)
            if not pte_present(pte) or pte_pfn(pte) != pfn:
                return None
            if pte_write(pte) or pte & PAGE_DIRTY:
                entry = mm.ptep_clear_flush(hva)
                if int(self.frames.refcount[pfn]) != int(self.frames.mapcount[pfn]) + ksmd_refs:
                    # Someone (KVM mid-fault, O_DIRECT) holds a pin: merging could lose its writes.
                    mm.set_pte_at(hva, entry)
                    return None
                set_pte_at_notify(mm, hva, pte_wrprotect(entry) & ~PAGE_DIRTY)
            return mm.pte(hva)
        finally:
            if wrap:
                mmu_notifier_invalidate_range_end(mm, hva, end)

    def replace_page(self, mm: "HostMm", hva: Hva, pfn: Pfn, kpfn: Pfn, orig_pte: int) -> bool:
        wrap = self.profile.ksm_pte_updates_in_invalidate_range
        end = Hva(hva + PAGE_SIZE)
        if wrap:
            mmu_notifier_invalidate_range_start(mm, hva, end)
        try:
            if mm.pte(hva) != orig_pte:
                return False
            if kpfn == ZERO_PFN:
                new = pte_mkksmzero(mk_pte(ZERO_PFN, writable=False, special=True))
            else:
                self.frames.page_add_rmap(kpfn)
                new = mk_pte(kpfn, writable=False)
            mm.ptep_clear_flush(hva)
            set_pte_at_notify(mm, hva, new)
            self.frames.page_remove_rmap(pfn)
            if self.race_points:
                self._race("ksm_after_replace_page", mm, hva)
            if self.trace is not None:
                self.trace("ksm_merge_one_page", {"mm": mm.name, "hva": hva, "ksm_pfn": int(kpfn), "pfn": int(pfn)})
            return True
        finally:
            if wrap:
                mmu_notifier_invalidate_range_end(mm, hva, end)

    def _race(self, point: str, mm: "HostMm", hva: Hva) -> None:
        fire = self.race_points.get(point)
        if fire is not None:
            fire(mm, hva)

    def break_cow(self, mm: "HostMm", hva: Hva) -> None:
        """break_ksm(): a write fault on a KSM page gives the mm its own copy again."""
        vma = mm.find_vma(hva)
        if vma is None:
            return
        pte = int(vma.ptes[vma.index(hva)])
        if not pte_present(pte):
            return
        pfn = Pfn(pte >> PAGE_SHIFT)
        if self.frames.page_ksm(pfn) or pte_ksm_zero(pte):
            mm.handle_mm_fault(hva, write=True)

    # --- unmerging ------------------------------------------------------------------------

    def unmerge_vma(self, mm: "HostMm", vma: "Vma") -> None:
        """MADV_UNMERGEABLE / run=2 on one VMA: break every KSM mapping, drop the rmap_items."""
        for idx in range(vma.nr_pages):
            self.break_cow(mm, Hva(vma.start + (idx << PAGE_SHIFT)))
        self._drop_vma_items(mm, vma)

    def unmerge_and_remove_all_rmap_items(self) -> None:
        for slot in self.slots:
            for items in list(slot.vmas):
                vma = items.vma
                for idx in range(vma.nr_pages):
                    self.break_cow(slot.mm, Hva(vma.start + (idx << PAGE_SHIFT)))
                for item in np.flatnonzero(items.has_item):
                    self._free_item(items, int(item))
        for node in list(self.nodes.values()):
            self._erase_node(node)
        self.unstable_tree.clear()
        self.unstable_key.clear()
        self.cursor = KsmCursor()
        self.seqnr = 0


