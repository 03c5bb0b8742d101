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

from typing import TYPE_CHECKING

import numpy as np

from ..events import NULL_TRACER, Tracer
from ..types import PAGE_SHIFT, PAGE_SIZE, Hva
from .frames import ZERO_PFN, FramePool
from .ksm_items import (
    _HASH_MULT,
    _HASH_SALT,
    RMAP_ITEM_SIZE,
    STABLE_FLAG,
    UNSTABLE_FLAG,
    KsmCursor,
    KsmHooks,
    KsmObserver,
    KsmState,
    MmSlot,
    StableNode,
    StableNodeChain,
    StableNodes,
    StableTree,
    VmaItems,
    page_checksum,
    page_checksum_one,
    page_hash,
)
from .ksm_scan import KsmScan
from .ksm_unstable import UnstableTree

if TYPE_CHECKING:
    from ..profiles import Profile
    from .mm import HostMm, Vma

class Ksm(KsmScan):
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
        self.stable_tree = StableTree()
        self.unstable_tree = UnstableTree()
        self.nodes = StableNodes()
        self.rmap_items = 0
        self.unshared = 0
        self.ksm_zero_pages = 0
        self.pages_scanned = 0
        self.pages_skipped = 0
        self.zero_hash = int(page_hash(frames, np.array([ZERO_PFN]))[0])
        self.tracer: Tracer = NULL_TRACER
        # Named points where tests fire host events (races); see hypervisor/races.py.
        self.hooks: KsmHooks | None = None
        # What benchmarks observe of ksmd (KsmObserver).
        self.observer: KsmObserver | None = None

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
        self.unstable_tree.forget(items)

    def vma_removed(self, mm: "HostMm", vma: "Vma") -> None:
        """munmap of a mergeable VMA: its rmap_items go (remove_trailing_rmap_items)."""
        self._drop_vma_items(mm, vma)

    # --- counters ----------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        # Every live node is in the stable tree (alone or as a chain's dup), every chain too.
        nr_items = self.nodes.nr_items[self.nodes.live_ids()]
        mapped = nr_items[nr_items > 0]
        shared, sharing = int(mapped.size), int(mapped.sum()) - int(mapped.size)
        chains = len(self.nodes.chains)
        dups = sum(len(chain.dups) for chain in self.nodes.chains.values())
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

    def ksmd_wakeup(self) -> None:
        observer = self.observer
        if observer is not None:
            observer.wakeup_start()
        if self.run == 1:
            self.ksm_do_scan(self.pages_to_scan)
        if observer is not None:
            observer.wakeup_end()

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
        self.cursor = KsmCursor()
        self.seqnr = 0


__all__ = ["RMAP_ITEM_SIZE", "STABLE_FLAG", "UNSTABLE_FLAG", "_HASH_MULT", "_HASH_SALT", "Ksm", "KsmObserver",
           "KsmState", "StableNode", "StableNodeChain", "VmaItems", "page_checksum", "page_checksum_one", "page_hash"]
