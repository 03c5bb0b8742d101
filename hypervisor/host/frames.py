"""Host physical memory: one numpy array of 4 KiB frames with refcounts and page flags.

Mirrors the parts of struct page that hvsim needs (page count, PageKsm) as
structure-of-arrays indexed by pfn.  Frame 0 is the shared zero page
(ZERO_PAGE(0)): never allocated, never freed, not refcounted, as in Linux where
a zero-page pte is "special" and vm_normal_page() returns NULL for it.
"""

from typing import Final

import numpy as np
import numpy.typing as npt

from ..errors import HostOutOfMemory
from ..types import PAGE_SIZE, Pfn

# Final: the compiled build (setup.py) reads it from a C static, not from the module's dict, per get/put_page.
ZERO_PFN: Final = Pfn(0)
# Room for frames in flight beyond one per mapped page: KSM pages being built,
# a COW copy before the old frame is released.
FRAME_SLACK = 64


class FramePool:
    """All host frames.  `data` is what every vCPU's Unicorn maps as physical memory."""

    def __init__(self, nr_frames: int) -> None:
        if nr_frames < 2:
            raise ValueError("a FramePool needs the zero page and at least one frame")
        self.nr_frames = nr_frames
        # np.zeros is calloc: untouched frames cost no host memory.
        self.data: npt.NDArray[np.uint8] = np.zeros(nr_frames * PAGE_SIZE, dtype=np.uint8)
        self.frames = self.data.reshape(nr_frames, PAGE_SIZE)
        self.qwords = self.data.view(np.uint64).reshape(nr_frames, PAGE_SIZE // 8)
        # page_count(): host ptes mapping the frame plus transient GUP pins.
        self.refcount = np.zeros(nr_frames, dtype=np.int32)
        # page_mapcount(): host ptes mapping the frame (the zero page is not counted).
        self.mapcount = np.zeros(nr_frames, dtype=np.int32)
        # PageKsm and page_stable_node(): -1 not a KSM page; 0 a KSM page whose stable
        # node is not made yet; n > 0 the id of its StableNode.
        self.stable_node = np.full(nr_frames, -1, dtype=np.int32)
        # Set by the vCPU backend when a frame is fetched from; a host write into such a
        # frame (reuse, copy) must invalidate translated code, announced by code_epoch.
        self.exec_seen = np.zeros(nr_frames, dtype=np.bool_)
        self.code_epoch = 0
        # Scalar views of the same memory for the hot paths (no numpy scalar boxing); the
        # arrays are never replaced.
        self.refcount_view = self.refcount.data
        self.mapcount_view = self.mapcount.data
        self.exec_seen_view = self.exec_seen.data
        self.stable_node_view = self.stable_node.data
        # Deterministic allocation: freed frames first, last freed first; else the lowest
        # never-used frame.  Never-used frames are still calloc's zeros: no clearing.
        # The freed frames are a stack in one int32 array (4 bytes a frame, where a list of
        # Python ints cost 36), `_nr_freed` deep.
        self._next_fresh = 1
        self._freed = np.empty(nr_frames, dtype=np.int32)
        self._freed_view = self._freed.data
        self._nr_freed = 0

    @property
    def nr_free(self) -> int:
        return self.nr_frames - self._next_fresh + self._nr_freed

    @property
    def allocated(self) -> int:
        """Frames handed out and not freed since: every frame ever used (not the zero page) but the freed."""
        return self._next_fresh - 1 - self._nr_freed

    def alloc_page(self, zero: bool = True) -> Pfn:
        """alloc_page(): a frame with refcount 1 (the caller's reference)."""
        if self._nr_freed:
            self._nr_freed -= 1
            pfn = Pfn(self._freed_view[self._nr_freed])
            if zero:
                self.frames[pfn].fill(0)
        elif self._next_fresh < self.nr_frames:
            pfn = Pfn(self._next_fresh)
            self._next_fresh = pfn + 1
        else:
            raise HostOutOfMemory(
                f"the simulated host ran out of memory ({self.nr_frames} frames of {PAGE_SIZE} bytes); "
                "this is a bug in hvsim's frame accounting, please report it with the command line"
            )
        if self.stable_node_view[pfn] != -1 or self.mapcount_view[pfn] != 0:
            # prep_new_page()/check_new_page() (2.6.32 mm/page_alloc.c): a free page with a
            # mapping (PageKsm) or a mapcount is bad_page(); here it is a bug in hvsim.
            raise AssertionError(f"bad page state: allocating pfn {pfn:#x} with stable_node "
                                 f"{self.stable_node[pfn]}, mapcount {self.mapcount[pfn]}")
        self.refcount_view[pfn] = 1
        # exec_seen is the one state a free frame keeps on purpose: the next content written
        # into it must still drop the translated code of what it held before.
        if self.exec_seen_view[pfn]:
            self.note_content_change(pfn)
        return pfn

    def get_page(self, pfn: Pfn) -> None:
        if pfn != ZERO_PFN:
            self.refcount_view[pfn] += 1

    def put_page(self, pfn: Pfn) -> None:
        """Drop a reference; the frame is freed when the last one goes."""
        if pfn == ZERO_PFN:
            return
        rc = self.refcount_view
        count = rc[pfn] - 1
        if count < 0:
            raise AssertionError(f"put_page on free frame {pfn}")
        rc[pfn] = count
        if count == 0:
            if self.mapcount_view[pfn] != 0:
                raise AssertionError(f"frame {pfn} freed while {self.mapcount[pfn]} ptes map it")
            # free_hot_cold_page(): `if (PageAnon(page)) page->mapping = NULL`, so a freed
            # KSM page is no longer PageKsm and its stable node, if any, goes stale.
            self.stable_node_view[pfn] = -1
            self._freed_view[self._nr_freed] = pfn
            self._nr_freed += 1

    def page_add_rmap(self, pfn: Pfn) -> None:
        """A pte now maps the frame: the mapping holds a reference (get_page + page_add_*_rmap)."""
        if pfn != ZERO_PFN:
            if self.refcount_view[pfn] <= 0:
                # The caller must hold a reference to the page it maps (the kernel's
                # get_page() on a free page is VM_BUG_ON): mapping a free frame is a bug.
                raise AssertionError(f"a pte maps free frame {pfn:#x}")
            self.refcount[pfn] += 1
            self.mapcount[pfn] += 1

    def page_remove_rmap(self, pfn: Pfn) -> None:
        """A pte stopped mapping the frame: page_remove_rmap + put_page."""
        if pfn != ZERO_PFN:
            self.mapcount[pfn] -= 1
            self.put_page(pfn)

    def page_ksm(self, pfn: Pfn) -> bool:
        return pfn != ZERO_PFN and int(self.stable_node[pfn]) >= 0

    def copy_page(self, dst: Pfn, src: Pfn) -> None:
        """copy_user_highpage()."""
        self.qwords[dst] = self.qwords[src]
        self.note_content_change(dst)

    def note_content_change(self, pfn: Pfn) -> None:
        if self.exec_seen[pfn]:
            self.exec_seen[pfn] = False
            self.code_epoch += 1

    def pages_identical(self, a: Pfn, b: Pfn) -> bool:
        """memcmp() of two whole frames: KSM's final word on equality."""
        return bool(self.frames[a].tobytes() == self.frames[b].tobytes())

    def is_free(self, pfn: Pfn) -> bool:
        return pfn != ZERO_PFN and int(self.refcount[pfn]) == 0
