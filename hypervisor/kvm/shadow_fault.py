"""The shadow MMU's fault path: FNAME(page_fault), FNAME(fetch), mmu_set_spte/set_spte, FNAME(invlpg).

Read in sndrzt/linux-2.6.32 arch/x86/kvm/paging_tmpl.h `FNAME(page_fault)`, `FNAME(fetch)`,
`FNAME(invlpg)` and mmu.c `mmu_set_spte`, `set_spte`, `kvm_mmu_invlpg`.  A mixin of ShadowMmu
(kvm/shadow_mmu.py), which owns the shadow pages, the rmap and the one place an spte changes.
"""

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, cast

from ..host.mm import HostMm
from ..types import PAGE_SHIFT, Gfn, Hva
from .guest_walker import GuestWalker, gpte_to_gfn, walk_addr
from .memslot import Memslot
from .mmu import gfn_to_pfn
from .mmu_interface import FaultPathHooks, SpteChange
from .pte_prefetch import pte_prefetch
from .rmap import Rmap
from .shadow_page import (
    ACC_USER,
    ACC_WRITE,
    PFERR_WRITE,
    PT_ACCESSED,
    PT_DIRTY,
    PT_PRESENT,
    PT_USER,
    PT_WRITABLE,
    RMAP_RECYCLE_THRESHOLD,
    SPTE_HOST_WRITEABLE_X86,
    KvmMmuPage,
    is_shadow_present_pte,
    shadow_index,
    spte_to_pfn,
)

if TYPE_CHECKING:
    from ..profiles import Profile
    from .mmu_interface import KvmMmu
    from .shadow_mmu import ShadowMmu
    from .vcpu import Vcpu
    from .vm import Vm


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


class ShadowFaultPath:
    """The fault path of ShadowMmu (a mixin: ShadowMmu provides the pages, the rmap and set_spte)."""

    vm: "Vm"
    mm: HostMm
    profile: "Profile"
    rmap: Rmap
    trap: int
    hooks: FaultPathHooks | None
    mmu_notifier_seq: int
    _last_slot: Memslot | None

    def state(self, vcpu: "Vcpu") -> "ShadowVcpu":
        raise NotImplementedError

    def set_spte(self, sp: KvmMmuPage, index: int, new: int, change: SpteChange) -> bool:
        raise NotImplementedError

    def summarize(self, gfn: int) -> None:
        raise NotImplementedError

    def kvm_mmu_load(self, vcpu: "Vcpu") -> None:
        raise NotImplementedError

    def kvm_mmu_get_page(self, vcpu: "Vcpu", gfn: int, gaddr: int, level: int, direct: bool, access: int,
                         parent: tuple[KvmMmuPage, int] | None) -> KvmMmuPage:
        raise NotImplementedError

    def mmu_need_write_protect(self, gfn: int, can_unsync: bool = True) -> bool:
        raise NotImplementedError

    def drop_spte(self, sp: KvmMmuPage, index: int, value: int) -> bool:
        raise NotImplementedError

    def kvm_mmu_free_some_pages(self, vcpu: "Vcpu") -> None:
        raise NotImplementedError

    def kvm_unmap_rmapp(self, gfn: int) -> bool:
        raise NotImplementedError

    def mmu_notifier_retry(self, mmu_seq: int, hva: Hva) -> bool:
        raise NotImplementedError

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
            self.hooks.after_gfn_to_pfn(cast("KvmMmu", self), gfn, hva)
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
        index = shadow_index(gva, 1)
        ptwrite = self.mmu_set_spte(vcpu, sp, index, w.pte_access & access, write_fault,
                                    bool(w.ptes[w.level - 1] & PT_DIRTY), w.gfn, pfn, False, host_writable)
        if self.profile.kvm_pte_prefetch:
            pte_prefetch(cast("ShadowMmu", self), vcpu, sp, index)
        return ptwrite

    def make_spte(self, old: int, pte_access: int, dirty: bool, gfn: int, pfn: int, speculative: bool,
                  host_writable: bool, can_unsync: bool) -> tuple[int, bool]:
        """set_spte (2.6.32 mmu.c): the x86 spte, and whether W had to be refused (a shadowed table)."""
        spte = PT_PRESENT | PT_DIRTY | (0 if speculative else PT_ACCESSED) | (pfn << PAGE_SHIFT)
        if not dirty or not host_writable:
            pte_access &= ~ACC_WRITE
        if pte_access & ACC_USER:
            spte |= PT_USER
        if host_writable:
            spte |= SPTE_HOST_WRITEABLE_X86
        if pte_access & ACC_WRITE:
            spte |= PT_WRITABLE
            # "if spte was writable the hash lookup is unnecessary" for a sync (can_unsync false).
            if (can_unsync or not old & PT_WRITABLE or not is_shadow_present_pte(old)) and \
                    self.mmu_need_write_protect(gfn, can_unsync):
                return spte & ~PT_WRITABLE, True
        return spte, False

    def mmu_set_spte(self, vcpu: "Vcpu", sp: KvmMmuPage, index: int, pte_access: int, write_fault: bool,
                     dirty: bool, gfn: int, pfn: int, speculative: bool, host_writable: bool) -> bool:
        """mmu_set_spte: set_spte plus the rmap; true if a write had to be refused (ptwrite)."""
        old = int(sp.view[index])
        was_rmapped = False
        if is_shadow_present_pte(old):
            if pfn != spte_to_pfn(old):
                self.rmap.rmap_remove(sp, index)
                self.summarize(int(sp.gfns[index]))
            else:
                was_rmapped = True
        spte, refused = self.make_spte(old, pte_access, dirty, gfn, pfn, speculative, host_writable, True)
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
                kvm_mmu_pte_write(cast("ShadowMmu", self), vcpu, pte_gpa, 8, False)
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


__all__ = ["ShadowFault", "ShadowFaultPath", "ShadowVcpu"]
