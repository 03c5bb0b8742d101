"""KSM's unstable tree: this pass's merge candidates, not write-protected, rebuilt every full scan.

After mm/ksm.c unstable_tree_search_insert.
"""

from typing import TYPE_CHECKING

from ..types import Hva, Pfn
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
