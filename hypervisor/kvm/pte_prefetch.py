"""Pte prefetch (2.6.37+): a fixed fault also maps the other ptes of its 8-pte group that it can map at once.

Read in srinugnt2000/linux-2.6.37 arch/x86/kvm/paging_tmpl.h `FNAME(pte_prefetch)` and mmu.c
`__direct_pte_prefetch`, `direct_pte_prefetch_many`, `pte_prefetch_gfn_to_pfn`, virt/kvm/kvm_main.c
`hva_to_pfn` (atomic), `gfn_to_page_many_atomic`; the same in robacklin/linux-3.7.2.  After
FNAME(fetch) installs the faulting leaf, every other slot of its PTE_PREFETCH_NUM (8)-aligned group
that is still "trap" gets a speculative spte (no A bit): for a guest page table, if the guest pte is
present and accessed (an absent one makes the slot notrap); for a direct page (a guest large page),
the frames that follow.  The page must be pinnable without faulting (`__get_user_pages_fast` with
write=1: the host pte present and writable), so a page the host has not populated, or a KSM page,
ends the prefetch.
"""

from typing import TYPE_CHECKING

from ..types import PAGE_SHIFT, Gfn, Pfn
from .guest_walker import gpte_access, gpte_to_gfn
from .shadow_page import PT_ACCESSED, PT_DIRTY, PT_PRESENT, SPTE_NOTRAP, KvmMmuPage

if TYPE_CHECKING:
    from .shadow_mmu import ShadowMmu
    from .vcpu import Vcpu

PTE_PREFETCH_NUM = 8


def _atomic_pin(mmu: "ShadowMmu", gfn: int) -> Pfn | None:
    """hva_to_pfn(atomic): __get_user_pages_fast(hva, 1, write=1, ...); None if it would fault."""
    slot = mmu.vm.memslots.gfn_to_memslot(Gfn(gfn))
    if slot is None:
        return None
    return mmu.mm.get_user_pages_fast_only(slot.gfn_to_hva(Gfn(gfn)), write=True)


def pte_prefetch(mmu: "ShadowMmu", vcpu: "Vcpu", sp: KvmMmuPage, index: int) -> None:
    if sp.role.level != 1:
        return
    base = index & ~(PTE_PREFETCH_NUM - 1)
    if sp.role.direct:
        _direct_pte_prefetch(mmu, vcpu, sp, index, base)
        return
    table = mmu.vm.read_guest(((sp.gfn << PAGE_SHIFT) + base * 8), 8 * PTE_PREFETCH_NUM)  # type: ignore[arg-type]
    for i in range(base, base + PTE_PREFETCH_NUM):
        if i == index or int(sp.view[i]) != mmu.trap:
            continue
        gpte = int.from_bytes(table[(i - base) * 8:(i - base) * 8 + 8], "little")
        if not gpte & PT_PRESENT:
            if not sp.unsync:
                sp.view[i] = SPTE_NOTRAP
            continue
        if not gpte & PT_ACCESSED:
            continue
        gfn = gpte_to_gfn(gpte)
        pfn = _atomic_pin(mmu, gfn)
        if pfn is None:
            break
        mmu.mmu_set_spte(vcpu, sp, i, sp.role.access & gpte_access(gpte), False, bool(gpte & PT_DIRTY), gfn,
                         pfn, True, True)
        mmu.mm.put_page(pfn)  # kvm_release_pfn_clean in mmu_set_spte


def _direct_pte_prefetch(mmu: "ShadowMmu", vcpu: "Vcpu", sp: KvmMmuPage, index: int, base: int) -> None:
    """__direct_pte_prefetch: each run of trap slots before a non-trap one (or the faulting one)."""
    start = None
    for i in range(base, base + PTE_PREFETCH_NUM):
        if int(sp.view[i]) != mmu.trap or i == index:
            if start is None:
                continue
            if not _direct_prefetch_many(mmu, vcpu, sp, start, i):
                break
            start = None
        elif start is None:
            start = i


def _direct_prefetch_many(mmu: "ShadowMmu", vcpu: "Vcpu", sp: KvmMmuPage, start: int, end: int) -> bool:
    """gfn_to_page_many_atomic: pin the run's frames until one would fault; map those pinned."""
    pinned = []
    for i in range(start, end):
        pfn = _atomic_pin(mmu, sp.gfn + i)
        if pfn is None:
            break
        pinned.append((i, pfn))
    for i, pfn in pinned:
        mmu.mmu_set_spte(vcpu, sp, i, sp.role.access, False, True, sp.gfn + i, pfn, True, True)
        mmu.mm.put_page(pfn)
    return bool(pinned)


__all__ = ["PTE_PREFETCH_NUM", "pte_prefetch"]
