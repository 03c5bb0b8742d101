"""KSM's merge steps: write_protect_page, replace_page, try_to_merge_one/two_pages, break_cow (mm/ksm.c).

Every pte change is announced through host/mmu_notifier.py (set_pte_at_notify, MmuNotifierRange).
"""

from typing import TYPE_CHECKING

from mypy_extensions import trait

from ..events import KsmMergeOnePage
from ..types import PAGE_SHIFT, PAGE_SIZE, Hva, Pfn
from .frames import ZERO_PFN
from .ksm_items import (
    KsmState,
    VmaItems,
)
from .mm import (
    PAGE_DIRTY,
    mk_pte,
    pte_ksm_zero,
    pte_mkksmzero,
    pte_pfn,
    pte_present,
    pte_write,
    pte_wrprotect,
)
from .mmu_notifier import (
    MmuNotifierRange,
    RangeSite,
    set_pte_at_notify,
)

if TYPE_CHECKING:
    from .mm import HostMm


@trait
class KsmMerge(KsmState):
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
        if self.hooks is not None:
            self.hooks.ksm_before_replace_page(mm, hva)
        if not self.frames.pages_identical(pfn, kpfn):
            return False
        return self.replace_page(mm, hva, pfn, kpfn, orig_pte)

    def write_protect_page(self, mm: "HostMm", hva: Hva, pfn: Pfn, ksmd_refs: int = 0) -> int | None:
        """Make the pte read-only (and clean); None if the page is pinned or gone.

        `ksmd_refs`: references ksmd itself holds on the page (3.7's check is
        `page_mapcount(page) + 1 + swapped != page_count(page)`, the 1 being ksmd's).
        """
        with MmuNotifierRange(mm, hva, Hva(hva + PAGE_SIZE), RangeSite.KSM_WRITE_PROTECT):
            pte = mm.pte(hva)
            if not pte_present(pte) or pte_pfn(pte) != pfn:
                return None
            if pte_write(pte) or pte & PAGE_DIRTY:
                entry = mm.ptep_clear_flush(hva)
                if self.frames.refcount_view[pfn] != self.frames.mapcount_view[pfn] + ksmd_refs:
                    # Someone (KVM mid-fault, O_DIRECT) holds a pin: merging could lose its writes.
                    mm.set_pte_at(hva, entry)
                    return None
                set_pte_at_notify(mm, hva, pte_wrprotect(entry) & ~PAGE_DIRTY)
            return mm.pte(hva)

    def replace_page(self, mm: "HostMm", hva: Hva, pfn: Pfn, kpfn: Pfn, orig_pte: int) -> bool:
        with MmuNotifierRange(mm, hva, Hva(hva + PAGE_SIZE), RangeSite.KSM_REPLACE_PAGE):
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
            if self.hooks is not None:
                self.hooks.ksm_after_replace_page(mm, hva)
            if self.tracer.enabled:
                self.tracer.event(KsmMergeOnePage(mm.name, hva, int(kpfn), int(pfn)))
            return True

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
