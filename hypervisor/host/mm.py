"""A host process address space (struct mm_struct): VMAs, ptes, demand faults, COW and GUP.

Mirrors the anonymous-memory paths of mm/memory.c: do_anonymous_page (a read
fault maps the shared zero page read-only, a write fault allocates a zeroed
frame), do_wp_page (copy-on-write, with reuse of an exclusively owned anonymous
page, never of a KSM page or the zero page; "exclusive" by mapcount, or by
refcount from 5.9), get_user_pages and the non-faulting
__get_user_pages_fast, madvise and munmap.  Every change to a pte that a
secondary MMU may have cached goes through host/mmu_notifier.py.

Host ptes use the x86 layout in one int64 per page (pfn << 12 | flag bits) in a
numpy array per VMA.  There is no host TLB: ptep_clear_flush only clears.
"""

import bisect
from typing import TYPE_CHECKING, Final

import numpy as np

from ..events import NULL_TRACER, CowKsm, Tracer
from ..profiles import Profile
from ..types import PAGE_SHIFT, PAGE_SIZE, Hva, Pfn, is_page_aligned
from .frames import ZERO_PFN, FramePool
from .mmu_notifier import (
    MmuNotifier,
    MmuNotifierRange,
    RangeSite,
    mmu_notifier_release,
    ptep_clear_flush_young_notify,
    set_pte_at_notify,
)
from .pgtable_types import (
    _PAGE_ACCESSED,
    _PAGE_DIRTY,
    _PAGE_KSM_ZERO,
    _PAGE_PRESENT,
    _PAGE_RW,
    _PAGE_SPECIAL,
)
from .vma import (
    MADV_DONTNEED,
    MADV_MERGEABLE,
    MADV_UNMERGEABLE,
    VM_MERGEABLE,
    VM_READ,
    VM_WRITE,
    HostFault,
    SegmentationFault,
    Vma,
    Vmstat,
)

if TYPE_CHECKING:
    from .ksm import Ksm

PAGE_DIRTY = _PAGE_DIRTY

# HostFault members, named once for the fault path (an Enum member read from its class costs
# about 80 ns on Python 3.11, four times a plain name: EnumType defines __getattr__).
_NO_FAULT: Final = HostFault.NONE
_FAULT: Final = HostFault.FAULT
_COW: Final = HostFault.COW


# The bits every pte mk_pte makes has, ORed once here (pure Python would OR the two names at every call).
_PAGE_PRESENT_ACCESSED: Final = _PAGE_PRESENT | _PAGE_ACCESSED


def mk_pte(pfn: Pfn, writable: bool, dirty: bool = False, special: bool = False) -> int:
    pte = (pfn << PAGE_SHIFT) | _PAGE_PRESENT_ACCESSED
    if writable:
        pte |= _PAGE_RW
    if dirty:
        pte |= _PAGE_DIRTY
    if special:
        pte |= _PAGE_SPECIAL
    return pte


def pte_present(pte: int) -> bool:
    return bool(pte & _PAGE_PRESENT)


def pte_write(pte: int) -> bool:
    return bool(pte & _PAGE_RW)


def pte_young(pte: int) -> bool:
    return bool(pte & _PAGE_ACCESSED)


def pte_special(pte: int) -> bool:
    return bool(pte & _PAGE_SPECIAL)


def pte_ksm_zero(pte: int) -> bool:
    return bool(pte & _PAGE_KSM_ZERO)


def pte_pfn(pte: int) -> Pfn:
    return Pfn(pte >> PAGE_SHIFT)


def pte_wrprotect(pte: int) -> int:
    return pte & ~_PAGE_RW


def pte_mkksmzero(pte: int) -> int:
    return pte | _PAGE_KSM_ZERO


class HostMm:
    """One VMM process's address space."""

    def __init__(
        self, frames: FramePool, profile: Profile, vmstat: Vmstat, name: str, ksm: "Ksm | None" = None
    ) -> None:
        self.frames = frames
        self.profile = profile
        self.vmstat = vmstat
        self.name = name
        self.ksm = ksm
        self.vmas: list[Vma] = []
        self._vma_starts: list[int] = []
        # find_vma's one-entry cache of the last VMA it found (2.6.32 mm/mmap.c mm->mmap_cache).
        self.mmap_cache: Vma | None = None
        self.mmu_notifiers: list[MmuNotifier] = []
        # Its events and its notifier calls (build.py gives a VM's mm a VmTracer).
        self.tracer: Tracer = NULL_TRACER

    # --- VMAs ------------------------------------------------------------------------

    def mmap(self, addr: Hva, length: int) -> Vma:
        """mmap(addr, length, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED)."""
        if not is_page_aligned(addr) or length <= 0 or not is_page_aligned(length):
            raise ValueError(f"mmap of unaligned range {addr:#x}+{length:#x}")
        end = Hva(addr + length)
        if any(v.start < end and addr < v.end for v in self.vmas):
            raise ValueError(f"mmap range {addr:#x}-{end:#x} overlaps a VMA")
        vma = Vma(addr, end, VM_READ | VM_WRITE, np.zeros(length >> PAGE_SHIFT, dtype=np.int64))
        pos = bisect.bisect(self._vma_starts, addr)
        self.vmas.insert(pos, vma)
        self._vma_starts.insert(pos, addr)
        return vma

    def find_vma(self, hva: Hva) -> Vma | None:
        """The VMA that holds hva, or None.  2.6.32 mm/mmap.c find_vma(): mm->mmap_cache first, then the
        tree (here a bisection of the sorted starts); the VMA found is cached.  (The kernel's returns the
        first VMA ending above addr, which the callers here would only test for holding it.)"""
        vma = self.mmap_cache
        if vma is not None and vma.start <= hva < vma.end:
            return vma
        pos = bisect.bisect(self._vma_starts, hva) - 1
        if pos >= 0:
            vma = self.vmas[pos]
            if hva < vma.end:
                self.mmap_cache = vma
                return vma
        return None

    def _segv(self, hva: Hva) -> SegmentationFault:
        return SegmentationFault(f"{self.name}: access to hva {hva:#x} outside every mapping")

    def _vma_or_segv(self, hva: Hva) -> Vma:
        vma = self.find_vma(hva)
        if vma is None:
            raise self._segv(hva)
        return vma

    def madvise(self, addr: Hva, length: int, advice: int) -> None:
        end = addr + length
        if advice == MADV_DONTNEED:
            # Drop the pages (a balloon, or a guest's discard): the next touch faults in a fresh one.
            for vma in self.vmas:
                lo, hi = max(addr, vma.start), min(end, vma.end)
                if lo < hi:
                    self.zap_page_range(vma, Hva(lo), Hva(hi))
            return
        for vma in self.vmas:
            if vma.start < end and addr < vma.end:
                if vma.start < addr or vma.end > end:
                    raise ValueError("madvise on part of a VMA is not modelled (VMA splitting)")
                if advice == MADV_MERGEABLE:
                    vma.flags |= VM_MERGEABLE
                    if self.ksm is not None:
                        self.ksm.ksm_enter(self)
                elif advice == MADV_UNMERGEABLE:
                    if vma.mergeable and self.ksm is not None:
                        self.ksm.unmerge_vma(self, vma)
                    vma.flags &= ~VM_MERGEABLE
                else:
                    raise ValueError(f"madvise advice {advice} is not modelled")

    def munmap(self, addr: Hva, length: int) -> None:
        """Unmap whole VMAs: zap_page_range inside invalidate_range_start/end, then drop them."""
        end = Hva(addr + length)
        for vma in [v for v in self.vmas if v.start < end and addr < v.end]:
            if vma.start < addr or vma.end > end:
                raise ValueError("munmap of part of a VMA is not modelled (VMA splitting)")
            self.zap_page_range(vma, vma.start, vma.end)
            if self.ksm is not None:
                self.ksm.vma_removed(self, vma)
            pos = self.vmas.index(vma)
            del self.vmas[pos]
            del self._vma_starts[pos]
            self.mmap_cache = None  # detach_vmas_to_be_unmapped(): "Kill the cache."

    def zap_page_range(self, vma: Vma, start: Hva, end: Hva) -> None:
        with MmuNotifierRange(self, start, end):
            lo, hi = vma.index(start), vma.index(end)
            for idx in np.flatnonzero(vma.ptes[lo:hi]):
                hva = Hva(start + (int(idx) << PAGE_SHIFT))
                self._drop_pte_mapping(self.ptep_clear_flush(hva))

    def exit_mmap(self) -> None:
        """Process exit: ->release first (KVM drops every spte), then the mappings go."""
        mmu_notifier_release(self)
        for vma in list(self.vmas):
            self.munmap(vma.start, vma.end - vma.start)

    # --- ptes ------------------------------------------------------------------------

    def pte(self, hva: Hva) -> int:
        vma = self._vma_or_segv(hva)
        return int(vma.ptes[vma.index(hva)])

    def set_pte_at(self, hva: Hva, pte: int) -> None:
        vma = self._vma_or_segv(hva)
        vma.ptes[vma.index(hva)] = pte

    def ptep_clear_flush(self, hva: Hva) -> int:
        vma = self._vma_or_segv(hva)
        idx = vma.index(hva)
        old = int(vma.ptes[idx])
        vma.ptes[idx] = 0
        return old

    def ptep_clear_flush_young(self, hva: Hva) -> bool:
        vma = self._vma_or_segv(hva)
        idx = vma.index(hva)
        old = int(vma.ptes[idx])
        vma.ptes[idx] = old & ~_PAGE_ACCESSED
        return bool(old & _PAGE_ACCESSED)

    def _drop_pte_mapping(self, old: int) -> None:
        """page_remove_rmap + put_page for the frame an old pte mapped."""
        if not pte_present(old):
            return
        if pte_ksm_zero(old) and self.ksm is not None:
            self.ksm.ksm_zero_page_unmapped()
        if not pte_special(old):
            self.frames.page_remove_rmap(pte_pfn(old))

    # --- faults ----------------------------------------------------------------------

    def handle_mm_fault(self, hva: Hva, write: bool) -> None:
        vma = self._vma_or_segv(hva)
        idx = vma.index(hva)
        self._handle_mm_fault(vma, idx, hva, write, vma.ptes_view[idx])

    def _handle_mm_fault(self, vma: Vma, idx: int, hva: Hva, write: bool, pte: int) -> HostFault:
        """handle_pte_fault() on the pte at vma.ptes[idx] (of hva), whose value `pte` the caller has just
        read: what the host had to do.  (The kernel's reads `entry = *pte` itself after handle_mm_fault's
        page-table walk, read in 3.x mm/memory.c, 2.6.32 unverified; nothing runs between the two reads
        here, so the caller's is that value.)"""
        if not pte & _PAGE_PRESENT:  # !pte_present(): no swap here, so pte_none
            self.do_anonymous_page(vma, idx, write)
        elif write and not pte & _PAGE_RW:  # !pte_write()
            return _COW if self.do_wp_page(vma, hva, pte) else _FAULT
        else:
            # The fault raced with another that already fixed the pte, or a young bit.
            vma.ptes[idx] = pte | _PAGE_ACCESSED | (_PAGE_DIRTY if write else 0)
        return _FAULT

    def do_anonymous_page(self, vma: Vma, idx: int, write: bool) -> None:
        """The pte at vma.ptes[idx] (the kernel's page_table) was none: the zero page for a read, a new
        frame for a write.  A fresh pte from none needs no notification: no secondary MMU can map it yet."""
        if not write:
            vma.ptes_view[idx] = mk_pte(ZERO_PFN, False, False, True)
            return
        frames = self.frames
        pfn = frames.alloc_page()
        # The allocation reference becomes the mapping's reference.
        frames.mapcount_view[pfn] = 1
        vma.ptes_view[idx] = mk_pte(pfn, True, True)

    def do_wp_page(self, vma: Vma, hva: Hva, orig_pte: int) -> bool:
        """Write fault on a present read-only pte: reuse the page if we own it, else copy it (true).

        Reuse: never a KSM page or the zero page (2.6.32's `PageAnon && !PageKsm`);
        an anonymous page is ours when its mapcount is 1 (2.6.32's reuse_swap_page,
        no swap here) or, from 5.9 (09854ba94c6a), when its refcount is 1, so a page
        someone holds a GUP reference on is copied.  The copy path (mm/memory.c, read
        in 2.6.32, 3.6.5 and 3.7.2): ptep_clear_flush, set_pte_at_notify with the new
        writable pte, drop the old page; from 3.7 inside invalidate_range_start/end.
        2.6.32 sends no other notification: no trailing invalidate_page.
        """
        old_pfn = pte_pfn(orig_pte)
        frames = self.frames
        is_ksm = not pte_special(orig_pte) and frames.page_ksm(old_pfn)
        if self.profile.do_wp_page_reuse_by_refcount:
            exclusive = not pte_special(orig_pte) and int(frames.refcount[old_pfn]) == 1
        else:
            exclusive = not pte_special(orig_pte) and int(frames.mapcount[old_pfn]) == 1
        if exclusive and not is_ksm:
            # The page is ours alone: upgrading the pte needs no notification.
            self.set_pte_at(hva, mk_pte(old_pfn, writable=True, dirty=True))
            return False
        if (is_ksm and self.profile.do_wp_page_reuses_ksm_page and int(frames.refcount[old_pfn]) == 1
                and int(frames.stable_node[old_pfn]) > 0):
            # 5.1 .. 5.8 reuse_ksm_page(): the last mapping of a KSM page with a stable node
            # takes it over (page_move_anon_rmap: it stops being a KSM page); no copy, and
            # wp_page_reuse sends no notification.  ksmd drops the stale stable node later.
            frames.stable_node[old_pfn] = -1
            self.set_pte_at(hva, mk_pte(old_pfn, writable=True, dirty=True))
            return False
        with MmuNotifierRange(self, hva, Hva(hva + PAGE_SIZE), RangeSite.DO_WP_PAGE_COPY):
            if pte_special(orig_pte):
                new_pfn = frames.alloc_page(zero=True)
            else:
                new_pfn = frames.alloc_page(zero=False)
                frames.copy_page(new_pfn, old_pfn)
            frames.mapcount[new_pfn] = 1
            if is_ksm:
                self.vmstat.count("cow_ksm")
                if self.tracer.enabled:
                    self.tracer.event(CowKsm(hva, int(old_pfn), int(new_pfn)))
            self.ptep_clear_flush(hva)
            set_pte_at_notify(self, hva, mk_pte(new_pfn, writable=True, dirty=True))
            self._drop_pte_mapping(orig_pte)
        return True

    # --- get_user_pages --------------------------------------------------------------

    def get_user_pages(self, hva: Hva, write: bool) -> Pfn:
        """get_user_pages_fast(addr, 1, write): fault the page in as needed and pin it."""
        return self.get_user_pages_fault(hva, write)[0]

    def get_user_pages_fault(self, hva: Hva, write: bool) -> tuple[Pfn, HostFault]:
        """get_user_pages(), also saying what the fault handler had to do for it.

        2.6.32 __get_user_pages(): find the VMA, follow_page(); while the pte does not allow
        the access, handle_mm_fault() and follow it again; get_page() the page found.
        """
        vma = self.find_vma(hva)
        if vma is None:
            raise self._segv(hva)  # the kernel's -EFAULT: a bug in the VMM, i.e. in hvsim
        idx = (hva - vma.start) >> PAGE_SHIFT
        ptes = vma.ptes_view
        pte = ptes[idx]
        if pte & _PAGE_PRESENT and (pte & _PAGE_RW or not write):  # follow_page() found it
            work = _NO_FAULT
        else:
            work = self._handle_mm_fault(vma, idx, hva, write, pte)
            pte = ptes[idx]
        pfn = Pfn(pte >> PAGE_SHIFT)  # pte_pfn()
        self.frames.get_page(pfn)
        return pfn, work

    def get_user_pages_fast_only(self, hva: Hva, write: bool) -> Pfn | None:
        """__get_user_pages_fast(): pin only if the pte already allows the access; never faults."""
        vma = self.find_vma(hva)
        if vma is None:
            return None
        pte = int(vma.ptes[vma.index(hva)])
        if not pte_present(pte) or (write and not pte_write(pte)):
            return None
        pfn = pte_pfn(pte)
        self.frames.get_page(pfn)
        return pfn

    def put_page(self, pfn: Pfn) -> None:
        self.frames.put_page(pfn)

    # --- aging -----------------------------------------------------------------------

    def page_referenced(self, hva: Hva) -> bool:
        """One aging step of page reclaim: test and clear young on the pte and in secondary MMUs."""
        if not pte_present(self.pte(hva)):
            return False
        return ptep_clear_flush_young_notify(self, hva)

    # --- access from the VMM itself (loading images, reading results) --------------------

    def write_bytes(self, hva: Hva, data: bytes) -> None:
        """copy_to_user(): write faults as needed, exactly as the VMM writing guest RAM."""
        pos = 0
        while pos < len(data):
            addr = Hva(hva + pos)
            offset = addr & (PAGE_SIZE - 1)
            chunk = min(PAGE_SIZE - offset, len(data) - pos)
            pfn = self.get_user_pages(Hva(addr - offset), write=True)
            self.frames.frames[pfn, offset : offset + chunk] = np.frombuffer(data, np.uint8, chunk, pos)
            self.frames.note_content_change(pfn)
            self.put_page(pfn)
            pos += chunk

    def read_bytes(self, hva: Hva, length: int) -> bytes:
        """copy_from_user() without faulting pages in: unmapped pages read as zeros."""
        out = bytearray()
        pos = 0
        while pos < length:
            addr = Hva(hva + pos)
            offset = addr & (PAGE_SIZE - 1)
            chunk = min(PAGE_SIZE - offset, length - pos)
            pte = self.pte(Hva(addr - offset))
            if pte_present(pte):
                out += self.frames.frames[pte_pfn(pte), offset : offset + chunk].tobytes()
            else:
                out += bytes(chunk)
            pos += chunk
        return bytes(out)


# The VMA pieces live in host/vma.py; mm.py re-exports them for its users.
__all__ = [
    "MADV_DONTNEED", "MADV_MERGEABLE", "MADV_UNMERGEABLE", "PAGE_DIRTY", "VM_MERGEABLE", "VM_READ", "VM_WRITE",
    "HostFault", "HostMm", "SegmentationFault", "Vma", "Vmstat", "mk_pte", "pte_ksm_zero", "pte_mkksmzero",
    "pte_pfn", "pte_present", "pte_special", "pte_write", "pte_wrprotect", "pte_young",
]
