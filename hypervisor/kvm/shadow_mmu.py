"""KVM's shadow MMU (`--mmu shadow`): shadow pages built from the guest's own page tables.

Mirrors arch/x86/kvm/mmu.c and paging_tmpl.h of 2.6.32 (sndrzt/linux-2.6.32), with the
later eras' differences from the Profile:

* `shadow_page_fault` = FNAME(page_fault) (kvm/shadow_fault.py): KVM's walk of the guest tables (kvm/guest_walker.py);
  a walk failure injects a #PF into the guest (`pf_guest`); else the pfn is pinned through
  the same host GUP as TDP (kvm/mmu.py `gfn_to_pfn`), the mmu_notifier retry check runs,
  the cache is refilled (`kvm_mmu_free_some_pages`) and `fetch` builds the missing shadow
  levels and installs the leaf (`mmu_set_spte`/`set_spte`).  A write that the leaf must
  refuse because its gfn is a shadowed guest page table returns EMULATE (ptwrite); with
  oos_shadow a leaf table goes unsync instead (kvm/unsync.py).
* Shadow pages come from the hash (`kvm_mmu_get_page`); a new indirect one write-protects
  its guest table gfn (`rmap_write_protect`) and is prefetched with trap/notrap sptes
  (FNAME(prefetch_page), only while bypass_guest_pf makes the two differ).
* Zapping (`kvm_mmu_zap_page`), recycling and roots are in this module; the rmap walks of
  the notifier callbacks in kvm/shadow_notifier.py; guest page-table writes in kvm/pte_write.py.

Simplifications (README "Fidelity notes"): 2.6.32's unsync rules in every kernel, no pte
prefetch (2.6.37+), no large sptes (hvsim's host has no huge pages, so KVM maps every guest
large page with 4 KiB sptes), no NX and no user-mode accesses (the guests run in ring 0).
"""

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..events import KvmMmuSetSpte
from ..host.mm import HostMm
from ..types import PAGE_SHIFT, Gfn
from .memslot import Memslot
from .mmu_interface import FaultOutcome, FaultPathHooks, SpteChange, SpteCheck
from .rmap import Rmap
from .shadow_fault import ShadowFault, ShadowFaultPath, ShadowVcpu
from .shadow_notifier import ShadowNotifier
from .shadow_page import (
    ACC_ALL,
    KVM_MIN_FREE_MMU_PAGES,
    KVM_REFILL_PAGES,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_WRITE,
    PT_ACCESSED,
    PT_PRESENT,
    PT_WRITABLE,
    SPTE_HOST_WRITEABLE_X86,
    SPTE_NOTRAP,
    SPTE_TRAP,
    KvmMmuPage,
    Role,
    ShadowPageHash,
    is_shadow_present_pte,
    kvm_mmu_calculate_mmu_pages,
    shadow_index,
    spte_to_pfn,
)
from .spte import SPTE_DIRTY, SPTE_HOST_WRITEABLE, SPTE_WRITABLE, make_spte
from .unsync import kvm_sync_page, kvm_unlink_unsync_page, kvm_unsync_page, mmu_sync_roots

if TYPE_CHECKING:
    from .vcpu import Vcpu
    from .vm import Vm


def to_ept_format(spte: int) -> int:
    """A shadow leaf spte in kvm/spte.py's EPT format (0 if not present), for the checks both MMUs share."""
    if not is_shadow_present_pte(spte):
        return 0
    ept = make_spte(spte_to_pfn(spte), False, bool(spte & PT_ACCESSED))  # type: ignore[arg-type]
    if spte & PT_WRITABLE:
        ept |= SPTE_WRITABLE | SPTE_DIRTY
    if spte & SPTE_HOST_WRITEABLE_X86:
        ept |= SPTE_HOST_WRITEABLE
    return ept


class ShadowMmu(ShadowNotifier, ShadowFaultPath):
    """The shadow MMU (implements kvm.mmu_interface.KvmMmu; the TLB fill uses `walk_shadow`)."""

    def __init__(self, vm: "Vm", n_max_mmu_pages: int | None = None, oos_shadow: bool = True) -> None:
        self.vm = vm
        self.profile = vm.profile
        self.mm: HostMm = vm.mm
        self.leaf_sptes: memoryview | None = None
        # For --check and tests, not for the fill: per gfn, its rmap's sptes summed up in the EPT
        # format of kvm/spte.py (the pfn they map; writable if one is), kept by set_spte.
        self.sptes: npt.NDArray[np.int64] = np.zeros(int(vm.memslots.max_gfn), dtype=np.int64)
        # bypass_guest_pf (2.6.32 .. 3.0): a trap and a notrap non-present value; later both 0.
        self.trap = SPTE_TRAP if self.profile.kvm_bypass_guest_pf else SPTE_NOTRAP
        nr_pages = int(vm.memslots.max_gfn)
        self.pages = ShadowPageHash(n_max_mmu_pages or kvm_mmu_calculate_mmu_pages(nr_pages))
        self.rmap = Rmap()
        # The 2.6.32 module parameter oos_shadow (default 1): leaf tables the guest writes go unsync.
        self.oos_shadow = oos_shadow
        self.vcpus: dict[int, ShadowVcpu] = {}
        self._last_slot: Memslot | None = None
        # Seams of the fault path where tests and --inject fire host events (as TdpMmu's).
        self.hooks: FaultPathHooks | None = None
        self.spte_check: SpteCheck | None = None
        self._init_notifier()

    def state(self, vcpu: "Vcpu") -> ShadowVcpu:
        st = self.vcpus.get(vcpu.vcpu_id)
        if st is None:
            st = self.vcpus[vcpu.vcpu_id] = ShadowVcpu()
        return st

    # --- the one place a shadow spte changes ------------------------------------------

    def set_spte(self, sp: KvmMmuPage, index: int, new: int, change: SpteChange) -> bool:
        """Write `new` into sp's slot `index` and account it; true if TLBs must be flushed."""
        old = int(sp.view[index])
        sp.view[index] = new
        leaf = sp.role.level == 1
        if leaf:
            gfn = int(sp.gfns[index])
            if self.spte_check is not None:
                self.spte_check(Gfn(gfn), to_ept_format(old), to_ept_format(new), change)
            self.summarize(gfn)
        stats = self.vm.stats
        if change is SpteChange.INSTALL:
            if leaf:
                stats.spte_set += 1
                tracer = self.vm.tracer
                if tracer.enabled:
                    tracer.event(KvmMmuSetSpte(int(sp.gfns[index]), new, 1))
            return False
        was_present = is_shadow_present_pte(old)
        if change is SpteChange.ZAP:
            if leaf and was_present:
                stats.spte_zapped += 1
            return was_present
        if change is SpteChange.REPOINT:
            stats.spte_changed += 1
            return was_present
        if change is SpteChange.AGE:
            return bool(old & ~new & PT_ACCESSED)
        if change is SpteChange.PROTECT:
            return bool(old & ~new & PT_WRITABLE)
        return False  # WALK: the CPU set A

    def summarize(self, gfn: int) -> None:
        """Recompute sptes[gfn] from the rmap of gfn."""
        best = 0
        for sp, index in self.rmap.heads.get(gfn, ()):
            ept = to_ept_format(int(sp.view[index]))
            if ept & SPTE_WRITABLE or not best:
                best = ept
        if gfn < self.sptes.shape[0]:
            self.sptes[gfn] = best

    def spte(self, gfn: int) -> int:
        """The first leaf spte on gfn's rmap (0 if none)."""
        chain = self.rmap.heads.get(gfn)
        return int(chain[0][0].view[chain[0][1]]) if chain else 0

    def translate(self, gfn: int, write: bool) -> int:
        raise NotImplementedError("shadow paging translates gvas: the TLB fill calls walk_shadow")

    def page_fault(self, vcpu: "Vcpu", gfn: Gfn, write_fault: bool) -> FaultOutcome:
        raise NotImplementedError("shadow paging takes #PF exits: the vCPU calls shadow_page_fault")

    # --- the CPU's walk of the shadow tables (what the TLB fill does) --------------------

    def walk_shadow(self, vcpu: "Vcpu", gva: int, write: bool) -> tuple[int, int]:
        """The hardware walk from the vCPU's shadow root: (leaf spte, 0) if it permits the access
        (A now set), else (0, #PF error code); error code -1 means a notrap spte, whose P=0 #PF
        goes straight to the guest without an exit (bypass_guest_pf)."""
        st = self.state(vcpu)
        if st.root is None or st.root.invalid:
            self.kvm_mmu_load(vcpu)
        sp = st.root
        assert sp is not None
        wbit = PFERR_WRITE if write else 0
        for level in (4, 3, 2, 1):
            index = shadow_index(gva, level)
            spte = int(sp.view[index])
            if spte == SPTE_NOTRAP:
                return 0, (-1 if self.trap != SPTE_NOTRAP else wbit)
            if spte == SPTE_TRAP:
                return 0, PFERR_PRESENT | PFERR_RSVD | wbit
            if level > 1:
                sp = sp.children[index]
                continue
            if write and not spte & PT_WRITABLE:
                return 0, PFERR_PRESENT | PFERR_WRITE
            if not spte & PT_ACCESSED:
                new = spte | PT_ACCESSED
                self.set_spte(sp, index, new, SpteChange.WALK)
                spte = new
            return spte, 0
        raise AssertionError("unreachable")

    def tlb_spte(self, vcpu: "Vcpu", gva: int, gfn: int) -> int:
        """The leaf spte the vCPU's current shadow root gives gva, in EPT format (0 if none): the
        hardware walk of walk_shadow without its side effects."""
        sp = self.state(vcpu).root
        for level in (4, 3, 2):
            if sp is None or sp.invalid:
                return 0
            sp = sp.children.get(shadow_index(gva, level))
        spte = int(sp.view[shadow_index(gva, 1)]) if sp is not None else 0
        return to_ept_format(spte) if spte not in (SPTE_TRAP, SPTE_NOTRAP) else 0

    # --- roots: kvm_mmu_load, mmu_free_roots, kvm_set_cr3 --------------------------------

    def kvm_mmu_load(self, vcpu: "Vcpu") -> None:
        """kvm_mmu_load -> kvm_mmu_free_some_pages, mmu_alloc_roots (hash hit or mmu_cache_miss)."""
        st = self.state(vcpu)
        self.mmu_free_roots(st)
        self.kvm_mmu_free_some_pages(vcpu)
        root = self.kvm_mmu_get_page(vcpu, st.cr3 >> PAGE_SHIFT, 0, 4, False, ACC_ALL, None)
        root.root_count += 1
        st.root = root
        mmu_sync_roots(self, vcpu, root)

    def mmu_free_roots(self, st: ShadowVcpu) -> None:
        root, st.root = st.root, None
        if root is not None:
            root.root_count -= 1
            if root.invalid and root.root_count == 0:
                self.pages.free(root)

    def kvm_set_cr3(self, vcpu: "Vcpu", cr3: int) -> None:
        """A CR3 load (a CR_ACCESS exit), 2.6.32 x86.c kvm_set_cr3: the same value syncs the roots
        (kvm_mmu_sync_roots) and flushes the TLB (kvm_mmu_flush_tlb); a new one drops the root
        (paging_new_cr3) and the next entry loads the new one (kvm_mmu_load: a hash hit or a miss)."""
        st = self.state(vcpu)
        if cr3 == st.cr3 and st.root is not None:
            if not st.root.invalid:
                mmu_sync_roots(self, vcpu, st.root)  # kvm_mmu_sync_roots
            vcpu.stats.tlb_flush += 1
            vcpu.arch.flush_tlb()
            return
        st.cr3 = cr3
        self.mmu_free_roots(st)
        self.kvm_mmu_load(vcpu)

    # --- shadow pages: get, zap, recycle ------------------------------------------------

    def kvm_mmu_get_page(self, vcpu: "Vcpu", gfn: int, gaddr: int, level: int, direct: bool, access: int,
                         parent: tuple[KvmMmuPage, int] | None) -> KvmMmuPage:
        role = Role(level, direct, access)
        for other in list(self.pages.by_gfn.get(gfn, ())):
            if other.unsync and not other.invalid:
                kvm_sync_page(self, vcpu, other)
        sp = self.pages.lookup(gfn, role)
        if sp is not None:
            if parent is not None:
                sp.parent_ptes.append(parent)
            return sp
        self.vm.stats.mmu_cache_miss += 1
        sp = self.pages.alloc(gfn, role, self.trap)
        if parent is not None:
            sp.parent_ptes.append(parent)
        if not direct:
            if self.rmap_write_protect(gfn):
                self.vm.kvm_flush_remote_tlbs()
            if self.trap != SPTE_NOTRAP:
                self._prefetch_page(sp)
        return sp

    def _prefetch_page(self, sp: KvmMmuPage) -> None:
        """FNAME(prefetch_page): trap where the guest pte is present, notrap where it is not."""
        table = self.vm.read_guest(sp.gfn << PAGE_SHIFT, 4096)  # type: ignore[arg-type]
        for index in range(512):
            gpte = int.from_bytes(table[index * 8:index * 8 + 8], "little")
            sp.view[index] = self.trap if gpte & PT_PRESENT else SPTE_NOTRAP

    def rmap_write_protect(self, gfn: int) -> bool:
        """Clear W in every spte mapping gfn (in place); true if one was writable."""
        protected = False
        for sp, index in self.rmap.sptes(gfn):
            spte = int(sp.view[index])
            if spte & PT_WRITABLE:
                protected |= self.set_spte(sp, index, spte & ~PT_WRITABLE, SpteChange.PROTECT)
        return protected

    def mmu_need_write_protect(self, gfn: int, can_unsync: bool = True) -> bool:
        """2.6.32 mmu_need_write_protect: a shadowed upper-level table stays write-protected; a leaf table
        goes unsync (oos_shadow) unless it is shadowed under two roles; with oos_shadow=0 it stays
        protected (and every guest store to it is emulated)."""
        sps = self.pages.indirect_pages(gfn)
        if not sps:
            return False
        sp = sps[0]  # kvm_mmu_lookup_page: the first in the hash bucket
        if sp.role.level != 1:
            return True
        if sp.unsync:
            return False
        if can_unsync and self.oos_shadow:
            return kvm_unsync_page(self, sp)
        return True

    def drop_spte(self, sp: KvmMmuPage, index: int, value: int) -> bool:
        """Take slot index out of use (rmap_remove a leaf, unlink a child) and store `value`; was it present?"""
        spte = int(sp.view[index])
        if not is_shadow_present_pte(spte):
            if spte != value:
                sp.view[index] = value
            return False
        if sp.role.level == 1:
            self.rmap.rmap_remove(sp, index)
        else:
            child = sp.children.pop(index)
            child.parent_ptes.remove((sp, index))
        return self.set_spte(sp, index, value, SpteChange.ZAP)

    def kvm_mmu_zap_page(self, sp: KvmMmuPage) -> None:
        """Unlink the page's children and parents; free it unless a vCPU uses it as its root."""
        self.vm.stats.mmu_shadow_zapped += 1
        if sp.unsync:
            kvm_unlink_unsync_page(self, sp)
        for index in range(512):
            self.drop_spte(sp, index, self.trap)
        for parent, index in list(sp.parent_ptes):
            self.drop_spte(parent, index, self.trap)
        if sp.root_count == 0:
            self.pages.free(sp)
        else:
            sp.invalid = True  # KVM_REQ_MMU_RELOAD: the vCPU reloads its root before its next walk
            self.pages.move_to_head(sp)
        self.vm.kvm_flush_remote_tlbs()
        for st in self.vcpus.values():
            st.last_pte_updated = None  # kvm_mmu_reset_last_pte_updated

    def kvm_mmu_free_some_pages(self, vcpu: "Vcpu") -> None:
        """Fewer than 5 free: zap the oldest-created pages until 25 are free, counting mmu_recycled."""
        pages = self.pages
        if pages.n_max_mmu_pages - pages.n_used_mmu_pages >= KVM_MIN_FREE_MMU_PAGES:
            return
        tries = len(pages.active)
        while pages.n_max_mmu_pages - pages.n_used_mmu_pages < KVM_REFILL_PAGES and tries > 0:
            sp = pages.oldest()
            if sp is None:
                break
            tries -= 1
            if sp.invalid:  # a zapped root still in use frees nothing; do not loop on it
                pages.move_to_head(sp)
                continue
            self.kvm_mmu_zap_page(sp)
            self.vm.stats.mmu_recycled += 1

    def zap_all(self) -> None:
        """kvm_arch_flush_shadow -> kvm_mmu_zap_all: every shadow page goes (a root in use is invalidated)."""
        for sp in list(self.pages.active.values()):
            if sp.sp_id in self.pages.active and not sp.invalid:
                self.kvm_mmu_zap_page(sp)


__all__ = ["ShadowFault", "ShadowMmu", "ShadowVcpu"]
