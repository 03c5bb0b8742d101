"""KSM's unstable tree: this pass's merge candidates, not write-protected, rebuilt every full scan.

After mm/ksm.c unstable_tree_search_insert and remove_rmap_item_from_tree (3.7.2, read in
robacklin/linux-3.7.2).  The tree holds rmap_item ids in the compact table of
host/ksm_buckets.py, filed under the page's content hash: an rmap_item of VMA `items`
at page `idx` is `items.rmap_item_base + idx`, the bases handed out in order as VMAs
first enter the tree in a pass (afresh every pass, when the tree is empty).  While an
rmap_item is in the tree, its `node` field holds its slot there, as 3.7's struct
rmap_item keeps its rb_node in the union that holds the stable node (`head`) when it
is in the stable tree; so erasing it costs one slot, and an item left over from an
earlier pass (the kernel tells those by the seqnr bits in rmap_item->address) is told
by its slot holding another item.
"""

from bisect import bisect_right
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from mypy_extensions import trait

from ..types import Hva, Pfn
from .ksm_buckets import EMPTY, ERASED, MAX_ENTRY, ContentBuckets
from .ksm_items import (
    STABLE_FLAG,
    UNSTABLE_FLAG,
    KsmState,
    VmaItems,
)
from .mm import (
    pte_pfn,
    pte_present,
    pte_special,
)

if TYPE_CHECKING:
    from .mm import HostMm


class UnstableTree(ContentBuckets):
    """root_unstable_tree: content hash -> the ids of the rmap_items this pass inserted, in order."""

    def __init__(self) -> None:
        super().__init__()
        self._bases: list[int] = []  # ascending: the first rmap_item id of each VMA in _owners
        self._owners: list[VmaItems] = []
        self._next_id = 1

    def clear(self) -> None:
        """The tree restarts empty (a new full scan): rmap_item ids are handed out afresh."""
        super().clear()
        for items in self._owners:
            items.rmap_item_base = 0
        self._bases.clear()
        self._owners.clear()
        self._next_id = 1

    def rmap_item_id(self, items: VmaItems, idx: int) -> int:
        if not items.rmap_item_base:
            if self._next_id + items.vma.nr_pages > MAX_ENTRY:
                raise OverflowError("KSM's unstable tree numbers at most 2**31 rmap_items (8 TiB) in one pass")
            items.rmap_item_base = self._next_id
            self._next_id += items.vma.nr_pages
            self._bases.append(items.rmap_item_base)
            self._owners.append(items)
        return items.rmap_item_base + idx

    def rmap_item(self, item_id: int) -> tuple[VmaItems, int]:
        """The VMA and page of an rmap_item id (of a VMA gone: its predecessor's, with an index past its end)."""
        pos = max(0, bisect_right(self._bases, item_id) - 1)
        items = self._owners[pos]
        return items, item_id - items.rmap_item_base

    def forget(self, items: VmaItems) -> None:
        """The VMA's rmap_items are gone (none of them is in the tree)."""
        if items.rmap_item_base:
            pos = self._bases.index(items.rmap_item_base)
            del self._bases[pos], self._owners[pos]

    def insert(self, key: int, items: VmaItems, idx: int, end: int = -1) -> None:
        """Insert the rmap_item under `key` (`end`: as for add)."""
        items.node_view[idx] = self.add(key, self.rmap_item_id(items, idx), end)

    def erase(self, items: VmaItems, idx: int) -> None:
        """rb_erase() if this pass inserted the rmap_item (its slot still holds it), else nothing."""
        if items.rmap_item_base:
            slot: int = items.node_view[idx]
            if self.entry_at(slot) == items.rmap_item_base + idx:
                self.erase_at(slot)
                self.shrink_if_sparse()

    def rmap_items(self) -> list[tuple[VmaItems | None, int]]:
        """Every rmap_item in the tree as (VMA, page), for the checker; (None, id) for an id below every VMA's."""
        out: list[tuple[VmaItems | None, int]] = []
        for item_id in self.all_entries():
            out.append(self.rmap_item(item_id) if self._bases and item_id >= self._bases[0] else (None, item_id))
        return out

    def moved(self, entries: npt.NDArray[np.int64], slots: npt.NDArray[np.int32]) -> None:
        owner = np.searchsorted(np.array(self._bases, dtype=np.int64), entries, side="right") - 1
        for pos, items in enumerate(self._owners):
            mine = owner == pos
            items.node[entries[mine] - items.rmap_item_base] = slots[mine]


@trait
class KsmUnstableTree(KsmState):
    def _follow_page(self, mm: "HostMm", hva: Hva) -> Pfn | None:
        """follow_page() of an anonymous page: None for no pte or the zero page."""
        vma = mm.find_vma(hva)
        if vma is None:
            return None
        pte = int(vma.ptes[vma.index(hva)])
        if not pte_present(pte) or pte_special(pte):
            return None
        return pte_pfn(pte)

    def unstable_tree_search_insert(
        self, items: VmaItems, idx: int, pfn: Pfn, h: int
    ) -> tuple[VmaItems, int, Pfn] | None:
        tree = self.unstable_tree
        tree_items_of_h, end = tree.probe(h)
        for tree_item in tree_items_of_h:
            tree_items, tree_idx = tree.rmap_item(tree_item)
            tree_pfn = self._follow_page(tree_items.mm, tree_items.hva(tree_idx))
            if tree_pfn is None or self.frames.page_ksm(tree_pfn):
                return None  # get_mergeable_page() failed: give up for this page
            if tree_pfn == pfn:
                return None
            if self.frames.pages_identical(pfn, tree_pfn):
                return tree_items, tree_idx, tree_pfn
        tree.insert(h, items, idx, end)
        items.flags_view[idx] = UNSTABLE_FLAG
        self.unshared += 1
        return None

    def _unstable_erase(self, items: VmaItems, idx: int) -> None:
        self.unstable_tree.erase(items, idx)

    def _unstable_remove(self, items: VmaItems, idx: int) -> None:
        self._unstable_erase(items, idx)
        flags: int = items.flags_view[idx]
        if flags & UNSTABLE_FLAG:
            items.flags_view[idx] = flags & STABLE_FLAG
            self.unshared -= 1


__all__ = ["EMPTY", "ERASED", "KsmUnstableTree", "UnstableTree"]
