"""Unsync shadow pages (2.6.32 `oos_shadow`, default 1): a guest leaf table written by the guest stops
being write-protected until the next sync.

Read in sndrzt/linux-2.6.32 arch/x86/kvm/mmu.c `mmu_need_write_protect`, `kvm_unsync_page`,
`mmu_convert_notrap`, `kvm_sync_page`, `kvm_unlink_unsync_page`, `mmu_sync_children`,
`mmu_sync_roots`, `kvm_mmu_load` and paging_tmpl.h `FNAME(sync_page)`:

* a write fault that would make an spte of a level-1 shadowed table writable marks that shadow
  page unsync instead (`mmu_unsync`, a gauge) unless the table is shadowed under two roles; the
  store then runs natively and later stores to the table do not exit; its notrap sptes become
  trap, since the guest may now make a pte present unseen;
* a CR3 load (`kvm_mmu_load` for a new root, `kvm_mmu_sync_roots` for the same one) syncs every
  unsync page under the root: write-protect its table again, re-read each present spte's guest
  pte (drop it if the gpte now maps another gfn, is absent or has A clear; else recompute its
  access), zap the page if nothing is left present, and kvm_mmu_flush_tlb (tlb_flush);
* `kvm_mmu_get_page` meeting an unsync page of the gfn it looks up syncs it first.

hvsim walks the tree under the root for unsync pages instead of keeping the unsync_child bitmaps
(same pages found); `KVM_REQ_MMU_SYNC` from kvm_mmu_get_page is not modelled (README).
"""

from typing import TYPE_CHECKING

from .guest_walker import gpte_access, gpte_to_gfn
from .mmu_interface import SpteChange
from .shadow_page import (
    PT_ACCESSED,
    PT_DIRTY,
    PT_PRESENT,
    SPTE_HOST_WRITEABLE_X86,
    SPTE_NOTRAP,
    KvmMmuPage,
    is_shadow_present_pte,
    spte_to_pfn,
)

if TYPE_CHECKING:
    from .shadow_mmu import ShadowMmu
    from .vcpu import Vcpu


def kvm_unsync_page(mmu: "ShadowMmu", sp: KvmMmuPage) -> bool:
    """Mark sp unsync; true (keep it write-protected) if the table is also shadowed under another role."""
    if any(s.role != sp.role for s in mmu.pages.indirect_pages(sp.gfn)):
        return True
    mmu.vm.stats.mmu_unsync += 1
    sp.unsync = True
    if mmu.trap != SPTE_NOTRAP:  # mmu_convert_notrap
        for index in range(512):
            if int(sp.view[index]) == SPTE_NOTRAP:
                sp.view[index] = mmu.trap
    return False


def kvm_unlink_unsync_page(mmu: "ShadowMmu", sp: KvmMmuPage) -> None:
    sp.unsync = False
    mmu.vm.stats.mmu_unsync -= 1


def sync_page(mmu: "ShadowMmu", sp: KvmMmuPage) -> int:
    """FNAME(sync_page): recompute every present spte from its guest pte; how many stay present."""
    table = mmu.vm.read_guest(sp.gfn << 12, 4096)  # type: ignore[arg-type]
    present = 0
    for index in range(512):
        spte = int(sp.view[index])
        if not is_shadow_present_pte(spte):
            continue
        gpte = int.from_bytes(table[index * 8:index * 8 + 8], "little")
        gfn = int(sp.gfns[index])
        if gpte_to_gfn(gpte) != gfn or not gpte & PT_PRESENT or not gpte & PT_ACCESSED:
            mmu.drop_spte(sp, index, mmu.trap if gpte & PT_PRESENT else SPTE_NOTRAP)
            continue
        present += 1
        host_writable = bool(spte & SPTE_HOST_WRITEABLE_X86)
        new, _ = mmu.make_spte(spte, sp.role.access & gpte_access(gpte), bool(gpte & PT_DIRTY), gfn,
                               spte_to_pfn(spte), True, host_writable, False)
        if new != spte:
            mmu.set_spte(sp, index, new, SpteChange.PROTECT if new & ~spte == 0 else SpteChange.INSTALL)
    return present


def kvm_sync_page(mmu: "ShadowMmu", vcpu: "Vcpu", sp: KvmMmuPage) -> bool:
    """Sync one unsync page; true if it was zapped (nothing of it was left present)."""
    if mmu.rmap_write_protect(sp.gfn):
        mmu.vm.kvm_flush_remote_tlbs()
    kvm_unlink_unsync_page(mmu, sp)
    if not sync_page(mmu, sp):
        mmu.kvm_mmu_zap_page(sp)
        return True
    vcpu.stats.tlb_flush += 1  # kvm_mmu_flush_tlb
    vcpu.arch.flush_tlb()
    return False


def mmu_sync_roots(mmu: "ShadowMmu", vcpu: "Vcpu", root: KvmMmuPage) -> None:
    """mmu_sync_children(root): write-protect every unsync page under the root (one flush), sync each."""
    found: list[KvmMmuPage] = []
    stack, seen = [root], {root.sp_id}
    while stack:
        sp = stack.pop()
        for child in sp.children.values():
            if child.sp_id not in seen:
                seen.add(child.sp_id)
                stack.append(child)
                if child.unsync:
                    found.append(child)
    if not found:
        return
    found.sort(key=lambda s: s.sp_id)
    protected = False
    for sp in found:
        protected |= mmu.rmap_write_protect(sp.gfn)
    if protected:
        mmu.vm.kvm_flush_remote_tlbs()
    for sp in found:
        if sp.unsync and not sp.invalid:
            kvm_sync_page(mmu, vcpu, sp)


__all__ = ["kvm_sync_page", "kvm_unlink_unsync_page", "kvm_unsync_page", "mmu_sync_roots", "sync_page"]
