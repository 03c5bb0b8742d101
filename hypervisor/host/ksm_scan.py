"""ksmd's scan: ksm_do_scan in batches, cmp_and_merge_page, rmap_item removal, 6.7's smart_scan (mm/ksm.c)."""

from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt
from mypy_extensions import trait

from ..events import KsmMergeWithKsmPage, KsmStartScan, KsmStopScan
from ..types import PAGE_SHIFT, Pfn
from .frames import ZERO_PFN
from .ksm_items import (
    STABLE_FLAG,
    UNSTABLE_FLAG,
    VmaItems,
    page_checksum,
    page_checksum_one,
    page_hash,
)
from .ksm_merge import KsmMerge
from .ksm_stable import KsmStableTree
from .ksm_unstable import KsmUnstableTree
from .pgtable_types import _PAGE_PRESENT, _PAGE_SPECIAL

if TYPE_CHECKING:
    pass

_PRESENT_OR_SPECIAL: Final = _PAGE_PRESENT | _PAGE_SPECIAL
_FIRST_WINDOW: Final = 512  # ptes _next_batch looks at first (a 64 MiB VMA has 16,384)


def _isin(values: npt.NDArray[np.uint32], pool: npt.NDArray[np.uint32]) -> npt.NDArray[np.bool_]:
    """np.isin(values, pool), by binary search in the sorted pool.

    np.isin sorts through np.unique, whose first call imports numpy.ma (20 ms, in the middle of a run),
    and costs some 40 us a call on a batch's few hundred values.
    """
    if pool.size == 0:
        return np.zeros(values.shape[0], dtype=np.bool_)
    ordered = pool.copy()
    ordered.sort()  # the methods, not np.sort and np.searchsorted: no Python-level wrapper between
    pos = ordered.searchsorted(values)
    np.minimum(pos, ordered.size - 1, out=pos)
    found: npt.NDArray[np.bool_] = ordered[pos] == values
    return found


@trait
class KsmScan(KsmStableTree, KsmUnstableTree, KsmMerge):
    def ksm_do_scan(self, scan_npages: int) -> None:
        """Scan up to scan_npages pages, in cursor order, in batches of consecutive present pages.

        A batch is vectorised where the kernel does nothing per page (a page already
        merged into the KSM page its rmap_item names) and its content hashes are taken
        in one numpy pass; every other page goes through cmp_and_merge_page one at a
        time, in address order, exactly as the per-page loop would.
        """
        if self.tracer.enabled:
            self.tracer.event(KsmStartScan(self.seqnr, self.rmap_items))
        budget = scan_npages
        while budget > 0:
            batch = self._next_batch(budget)
            if batch is None:
                break
            items, idxs, pfns = batch
            budget -= idxs.size
            self.pages_scanned += int(idxs.size)
            if self.observer is not None:
                self.observer.scan_batch(items, idxs, pfns)
            self._scan_batch(items, idxs, pfns)
        if self.tracer.enabled:
            self.tracer.event(KsmStopScan(self.seqnr, self.rmap_items))

    def _scan_batch(self, items: VmaItems, idxs: npt.NDArray[np.intp], pfns: npt.NDArray[np.int64]) -> None:
        frames = self.frames
        flags = items.flags[idxs]
        in_stable = (flags & STABLE_FLAG) != 0
        page_node = frames.stable_node[pfns]
        single: npt.NDArray[np.bool_] | None = None
        if self.profile.ksm_unmerges_unshared_ksm_page:
            # 2.6.32's ksm_do_scan: a KSM page in the stable tree is left alone unless it is
            # mapped only once, and then it is unmerged (gone by 2.6.33.3's ksm_do_scan).
            settled = in_stable & (page_node >= 0)
            single = settled & (frames.mapcount[pfns] == 1)
            work = (~settled | single).nonzero()[0]
        else:
            work = (~(in_stable & (page_node > 0) & (items.node[idxs] == page_node))).nonzero()[0]
        if work.size == 0:
            return
        checksums = page_checksum(frames, pfns[work])
        # Pages whose only effect would be "checksum changed: remember it" (not in any tree,
        # not a KSM page, no KSM page of the stable tree with their checksum, and no page of the
        # batch that takes the slow path, which could create one, has their checksum): settled in
        # one step.  Equal content means equal checksum, so the filter never lets a match through.
        widx = idxs[work]
        quick = (flags[work] == 0) & (page_node[work] < 0) & (checksums != items.oldchecksum[widx])
        if self.nodes:
            quick &= ~_isin(checksums, self.nodes.live_checksums())
        if quick.any():
            if not quick.all():
                quick &= ~_isin(checksums, checksums[~quick])
            items.oldchecksum[widx[quick]] = checksums[quick]
            slow = ~quick
            work, widx, checksums = work[slow], widx[slow], checksums[slow]
        # The trees' key, only for the pages that look them up.
        wpfns = pfns[work]
        hashes = page_hash(frames, wpfns)
        if single is None or not single.any():
            for idx, pfn, h, checksum in zip(widx.tolist(), wpfns.tolist(), hashes.tolist(), checksums.tolist(),
                                             strict=True):
                self.cmp_and_merge_page(items, idx, Pfn(pfn), h, checksum)
            return
        for idx, pfn, h, checksum, unmerge in zip(widx.tolist(), wpfns.tolist(), hashes.tolist(),
                                                  checksums.tolist(), single[work].tolist(), strict=True):
            if unmerge:
                self.break_cow(items.mm, items.hva(idx))
                self.remove_rmap_item_from_tree(items, idx)
                items.oldchecksum_view[idx] = checksum  # the content did not change
            else:
                self.cmp_and_merge_page(items, idx, Pfn(pfn), h, checksum)

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
            nr_ptes = vma.ptes.shape[0]
            # The stretch of the VMA from the cursor that decides this batch: the first _FIRST_WINDOW
            # ptes if they hold the budget-th present page or an item to free behind the first present
            # page (then the rest of the VMA could change nothing below), else the rest of the VMA.
            size = _FIRST_WINDOW
            while True:
                end = min(start + size, nr_ptes)
                window = vma.ptes[start:end]
                # present and not special: an anonymous page with a struct page
                anon = (window & _PRESENT_OR_SPECIAL) == _PAGE_PRESENT
                first = anon.nonzero()[0]
                first_stale = (items.has_item[start:end] > anon).nonzero()[0]  # an item, and no page for it
                if end == nr_ptes or (first.size and ((not self.smart_scan and first.size >= budget)
                                                      or bool((first_stale > first[0]).any()))):
                    break
                size = nr_ptes
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
            if not self.smart_scan:
                offs = offs[:budget]
                idxs = start + offs
                cur.address = vma.start + ((int(idxs[-1]) + 1) << PAGE_SHIFT)
                self._get_rmap_items(items, idxs)
                return items, idxs, window[offs] >> PAGE_SHIFT
            pfns = window[offs] >> PAGE_SHIFT
            skip = self._smart_scan_skips(items, start + offs, pfns, budget)
            idxs, pfns = start + offs[: skip.size], pfns[: skip.size]
            cur.address = vma.start + ((int(idxs[-1]) + 1) << PAGE_SHIFT)
            self._get_rmap_items(items, idxs)
            self._age_items(items, idxs, pfns, skip)
            keep = ~skip
            if not keep.any():
                continue  # every page reached was skipped: they cost no pages_to_scan
            return items, idxs[keep], pfns[keep]

    def _get_rmap_items(self, items: VmaItems, idxs: npt.NDArray[np.intp]) -> None:
        """get_next_rmap_item() for pages the cursor reached: a fresh item where there was none.

        An item's unstable-tree membership is per pass, so it is dropped here (the tree itself
        was reset at the start of the pass).
        """
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
            seen = idxs[unstable]
            items.flags[seen] &= np.uint8(STABLE_FLAG)
            self.unshared -= int(seen.size)

    def _smart_scan_skips(self, items: VmaItems, idxs: npt.NDArray[np.intp], pfns: npt.NDArray[np.int64],
                          budget: int) -> npt.NDArray[np.bool_]:
        """should_skip_rmap_item() (6.7+) over the candidate pages, up to the budget-th page not skipped.

        A page that is not a KSM page and whose rmap_item has been visited three times or
        more without merging is skipped on 1, 2, 4 or 8 of every following visits as it
        ages; a skipped page costs no pages_to_scan.
        """
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

    def _free_item(self, items: VmaItems, idx: int) -> None:
        self.remove_rmap_item_from_tree(items, idx)
        items.has_item[idx] = False
        self.rmap_items -= 1

    def remove_rmap_item_from_tree(self, items: VmaItems, idx: int) -> None:
        flags: int = items.flags_view[idx]
        items.flags_view[idx] = 0  # first: erasing the node below emits an event the checker reads
        if flags & STABLE_FLAG:
            node = self.nodes.get(items.node_view[idx])
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

    def cmp_and_merge_page(self, items: VmaItems, idx: int, pfn: Pfn, h: int, checksum: int | None = None) -> None:
        """`h` is the page's content hash, `checksum` its page_checksum (taken by the caller, batched)."""
        # A page already merged into the KSM page its rmap_item names never gets here: the
        # batch filter in _scan_batch is the kernel's "rmap_item->head == stable_node" return.
        frames = self.frames
        node_id: int = frames.stable_node_view[pfn] if pfn != ZERO_PFN else -1
        self.remove_rmap_item_from_tree(items, idx)
        if node_id > 0 and node_id in self.nodes:
            # A KSM page that lost its rmap_item (e.g. a forked mapping): re-append.
            self._stable_tree_append(items, idx, self.nodes[node_id])
            return
        node = self.stable_tree_search(pfn, h)
        if node is not None:
            if self.tracer.enabled:
                self.tracer.event(KsmMergeWithKsmPage(items.mm.name, items.hva(idx), int(node.kpfn), int(pfn)))
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
        if items.oldchecksum_view[idx] != checksum:
            items.oldchecksum_view[idx] = checksum
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
