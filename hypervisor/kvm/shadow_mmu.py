"""KVM's shadow MMU (`--mmu shadow`): shadow pages built from the guest's own page tables.

Mirrors arch/x86/kvm/mmu.c and paging_tmpl.h of 2.6.32 (sndrzt/linux-2.6.32), with the
later eras' differences from the Profile:

* `page_fault` = FNAME(page_fault): KVM's walk of the guest tables (kvm/guest_walker.py);
  a walk failure injects a #PF into the guest (`pf_guest`); else the pfn is pinned through
  the same host GUP as TDP (kvm/mmu.py `gfn_to_pfn`), the mmu_notifier retry check runs,
  the cache is refilled (`kvm_mmu_free_some_pages`) and `fetch` builds the missing shadow
  levels and installs the leaf (`mmu_set_spte`/`set_spte`).  A write that the leaf must
  refuse because its gfn is a shadowed guest page table returns EMULATE (ptwrite).
* Shadow pages come from the hash (`kvm_mmu_get_page`); a new indirect one write-protects
  its guest table gfn (`rmap_write_protect`) and is prefetched with trap/notrap sptes
  (FNAME(prefetch_page), only while bypass_guest_pf makes the two differ).
* Zapping (`kvm_mmu_zap_page`), recycling and roots are in this module; the rmap walks of
  the notifier callbacks in kvm/shadow_notifier.py; guest page-table writes in kvm/pte_write.py.

Simplifications (README "Fidelity notes"): no unsync pages (2.6.32 with `oos_shadow=0`;
every store to a shadowed table is emulated), no pte prefetch (2.6.37+), no large sptes
(hvsim's host has no huge pages, so KVM maps every guest large page with 4 KiB sptes).
"""

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..events import KvmMmuSetSpte
from ..host.mm import HostMm
from ..types import PAGE_SHIFT, Gfn
from .guest_walker import GuestWalker, gpte_to_gfn, walk_addr
from .memslot import Memslot
from .mmu import gfn_to_pfn
from .mmu_interface import FaultOutcome, FaultPathHooks, SpteChange, SpteCheck
from .rmap import Rmap
from .shadow_notifier import ShadowNotifier
from .shadow_page import (
    ACC_ALL,
    ACC_USER,
    ACC_WRITE,
    KVM_MIN_FREE_MMU_PAGES,
    KVM_REFILL_PAGES,
    PFERR_PRESENT,
    PFERR_RSVD,
    PFERR_WRITE,
    PT_ACCESSED,
    PT_DIRTY,
    PT_PRESENT,
    PT_USER,
    PT_WRITABLE,
    RMAP_RECYCLE_THRESHOLD,
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


class ShadowFault(Enum):
    """What FNAME(page_fault) leaves the guest to do."""

    FIXED = "fixed"  # re-enter: the access succeeds
    RETRY = "retry"  # mmu_notifier_retry: re-enter, the guest faults again
    INJECT = "inject"  # the guest's own mapping refuses: a #PF is injected (pf_guest)
    EMULATE = "emulate"  # a write to a shadowed guest page table: emulate it, then kvm_mmu_pte_write
    MMIO = "mmio"  # no memslot


@dataclass(slots=True)
class ShadowVcpu:
    """The per-vCPU shadow state (vcpu->arch.mmu.root_hpa, cr3, and the pte-write detectors)."""

    root: KvmMmuPage | None = None
    cr3: int = 0
    last_pt_write_gfn: int = -1
    last_pt_write_count: int = 0
    last_pte_updated: tuple[KvmMmuPage, int] | None = None
    last_pte_gfn: int = -1
    # The #PF error code of the last INJECT outcome (walker.error_code).
    inject_error: int = 0


class ShadowMmu(ShadowNotifier):
    """The shadow MMU (implements kvm.mmu_interface.KvmMmu; the TLB fill uses `walk_shadow`)."""

    def __init__(self, vm: "Vm", n_max_mmu_pages: int | None = None) -> None:
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

    # --- roots: kvm_mmu_load, mmu_free_roots, kvm_set_cr3 --------------------------------

    def kvm_mmu_load(self, vcpu: "Vcpu") -> None:
        """kvm_mmu_load -> kvm_mmu_free_some_pages, mmu_alloc_roots (hash hit or mmu_cache_miss)."""
        st = self.state(vcpu)
        self.mmu_free_roots(st)
        self.kvm_mmu_free_some_pages(vcpu)
        root = self.kvm_mmu_get_page(vcpu, st.cr3 >> PAGE_SHIFT, 0, 4, False, ACC_ALL, None)
        root.root_count += 1
        st.root = root

    def mmu_free_roots(self, st: ShadowVcpu) -> None:
        root, st.root = st.root, None
        if root is not None:
            root.root_count -= 1
            if root.invalid and root.root_count == 0:
                self.pages.free(root)

    def kvm_set_cr3(self, vcpu: "Vcpu", cr3: int) -> None:
        """A CR3 load (a CR_ACCESS exit), 2.6.32 x86.c kvm_set_cr3: the same value syncs the roots (no
        unsync pages here) and flushes the TLB (kvm_mmu_flush_tlb); a new one drops the root
        (paging_new_cr3) and the next entry loads the new one (kvm_mmu_load: a hash hit or a miss)."""
        st = self.state(vcpu)
        if cr3 == st.cr3 and st.root is not None:
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

    def mmu_need_write_protect(self, gfn: int) -> bool:
        """2.6.32 with oos_shadow=0: a gfn shadowed as a guest page table stays write-protected."""
        return bool(self.pages.indirect_pages(gfn))

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

    # --- the fault path --------------------------------------------------------------

    def shadow_page_fault(self, vcpu: "Vcpu", gva: int, error_code: int) -> ShadowFault:
        """FNAME(page_fault) for one #PF exit."""
        st = self.state(vcpu)
        write_fault = bool(error_code & PFERR_WRITE)
        found, walker = walk_addr(st.cr3, gva, write_fault, False, False, self._read_gpte, self._cmpxchg_gpte)
        if not found:
            vcpu.stats.pf_guest += 1  # kvm_inject_page_fault
            st.inject_error = walker.error_code
            st.last_pt_write_count = 0  # "reset fork detector"
            return ShadowFault.INJECT
        gfn = Gfn(walker.gfn)
        slot = self._last_slot
        if slot is None or not slot.contains_gfn(gfn):
            slot = self._last_slot = self.vm.memslots.gfn_to_memslot(gfn)
            if slot is None:
                return ShadowFault.MMIO
        mmu_seq = self.mmu_notifier_seq
        hva = slot.gfn_to_hva(gfn)
        pfn, writable, host = gfn_to_pfn(self.mm, self.profile, hva, write_fault)
        if self.hooks is not None:
            self.hooks.after_gfn_to_pfn(self, gfn, hva)
        if self.mmu_notifier_retry(mmu_seq, hva):
            self.mm.put_page(pfn)
            vcpu.stats.pf_retry += 1
            return ShadowFault.RETRY
        self.kvm_mmu_free_some_pages(vcpu)
        ptwrite = self.fetch(vcpu, gva, walker, write_fault, pfn, writable)
        if not ptwrite:
            st.last_pt_write_count = 0
        vcpu.stats.pf_fixed += 1
        self.mm.put_page(pfn)  # kvm_release_pfn_clean: the spte holds no reference
        self.last_host_fault = host
        return ShadowFault.EMULATE if ptwrite else ShadowFault.FIXED

    def _read_gpte(self, gpa: int) -> int:
        return int.from_bytes(self.vm.read_guest(gpa, 8), "little")  # type: ignore[arg-type]

    def _cmpxchg_gpte(self, gpa: int, old: int, new: int) -> bool:
        if self._read_gpte(gpa) != old:
            return False
        self.vm.write_guest(gpa, new.to_bytes(8, "little"))  # type: ignore[arg-type]
        return True

    def fetch(self, vcpu: "Vcpu", gva: int, w: GuestWalker, write_fault: bool, pfn: int, host_writable: bool) -> bool:
        """FNAME(fetch): build the missing shadow levels for gva, install the leaf; true on ptwrite."""
        st = self.state(vcpu)
        if st.root is None or st.root.invalid:
            self.kvm_mmu_load(vcpu)
        sp = st.root
        assert sp is not None
        access = w.pt_access
        for level in (4, 3, 2):
            index = shadow_index(gva, level)
            if is_shadow_present_pte(int(sp.view[index])):
                sp = sp.children[index]
                continue
            if level <= w.level:
                direct = True
                large = w.ptes[w.level - 1]
                if not large & PT_DIRTY:
                    access &= ~ACC_WRITE
                table_gfn = gpte_to_gfn(large)
                if level == w.level - 1:  # delta 0: 1 GiB guest pages emulated with 4 KiB
                    table_gfn += shadow_index(gva, level)
            else:
                direct = False
                table_gfn = w.table_gfn[level - 2]
            child = self.kvm_mmu_get_page(vcpu, table_gfn, gva, level - 1, direct, access, (sp, index))
            if not direct and self._read_gpte(w.pte_gpa[level - 2]) != w.ptes[level - 2]:
                child.parent_ptes.remove((sp, index))  # kvm_mmu_put_page: the guest changed it meanwhile
                return False
            sp.children[index] = child
            self.set_spte(sp, index, child.link_spte(), SpteChange.INSTALL)
            sp = child
        return self.mmu_set_spte(vcpu, sp, shadow_index(gva, 1), w.pte_access & access, write_fault,
                                 bool(w.ptes[w.level - 1] & PT_DIRTY), w.gfn, pfn, False, host_writable)

    def mmu_set_spte(self, vcpu: "Vcpu", sp: KvmMmuPage, index: int, pte_access: int, write_fault: bool,
                     dirty: bool, gfn: int, pfn: int, speculative: bool, host_writable: bool) -> bool:
        """mmu_set_spte + set_spte: build the x86 spte; true if a write had to be refused (ptwrite)."""
        old = int(sp.view[index])
        was_rmapped = False
        if is_shadow_present_pte(old):
            if pfn != spte_to_pfn(old):
                self.rmap.rmap_remove(sp, index)
                self.summarize(int(sp.gfns[index]))
            else:
                was_rmapped = True
        spte = PT_PRESENT | PT_DIRTY | (0 if speculative else PT_ACCESSED) | (pfn << PAGE_SHIFT)
        if not dirty or not host_writable:
            pte_access &= ~ACC_WRITE
        if pte_access & ACC_USER:
            spte |= PT_USER
        if host_writable:
            spte |= SPTE_HOST_WRITEABLE_X86
        refused = False
        if pte_access & ACC_WRITE:
            spte |= PT_WRITABLE
            if self.mmu_need_write_protect(gfn):
                refused = True
                spte &= ~PT_WRITABLE
        if not was_rmapped:
            sp.gfns[index] = gfn
        self.set_spte(sp, index, spte, SpteChange.INSTALL)
        if refused:
            vcpu.arch.flush_tlb()  # kvm_x86_ops->tlb_flush: the local flush with no counter
        if not was_rmapped:
            count = self.rmap.rmap_add(gfn, sp, index)
            self.summarize(gfn)
            if count > RMAP_RECYCLE_THRESHOLD:
                self.kvm_unmap_rmapp(gfn)  # rmap_recycle
                self.vm.kvm_flush_remote_tlbs()
        if speculative:
            st = self.state(vcpu)
            st.last_pte_updated, st.last_pte_gfn = (sp, index), gfn
        return refused and write_fault

    def kvm_mmu_invlpg(self, vcpu: "Vcpu", gva: int) -> None:
        """kvm_mmu_invlpg (2.6.32 mmu.c): FNAME(invlpg), then a present and accessed guest pte is
        re-shadowed through kvm_mmu_pte_write (not guest-initiated); kvm_mmu_flush_tlb; invlpg+1."""
        from .pte_write import kvm_mmu_pte_write

        pte_gpa = self.fname_invlpg(vcpu, gva)
        if pte_gpa >= 0:
            gpte = self._read_gpte(pte_gpa)
            if gpte & PT_PRESENT and gpte & PT_ACCESSED:
                kvm_mmu_pte_write(self, vcpu, pte_gpa, 8, False)
        vcpu.stats.tlb_flush += 1
        vcpu.arch.flush_tlb()
        vcpu.stats.invlpg += 1

    def fname_invlpg(self, vcpu: "Vcpu", gva: int) -> int:
        """FNAME(invlpg): the leaf slot of gva becomes trap; returns the gpa of its guest pte (-1 if none).

        As in 2.6.32, a slot of a direct page (a guest large page) is taken for a guest pte at
        sp->gfn + index ("FIXME: properly handle invlpg on large guest pages")."""
        st = self.state(vcpu)
        sp = st.root
        if sp is None or sp.invalid:
            return -1
        for level in (4, 3, 2):
            index = shadow_index(gva, level)
            if not is_shadow_present_pte(int(sp.view[index])):
                return -1
            sp = sp.children[index]
        index = shadow_index(gva, 1)
        if self.drop_spte(sp, index, self.trap):
            self.vm.kvm_flush_remote_tlbs()
        return -1 if sp.role.direct else (sp.gfn << PAGE_SHIFT) + index * 8

    def zap_all(self) -> None:
        """kvm_arch_flush_shadow -> kvm_mmu_zap_all: every shadow page goes (a root in use is invalidated)."""
        for sp in list(self.pages.active.values()):
            if sp.sp_id in self.pages.active and not sp.invalid:
                self.kvm_mmu_zap_page(sp)


__all__ = ["ShadowFault", "ShadowMmu", "ShadowVcpu"]
