"""A guest store to a shadowed page table: kvm_mmu_pte_write, and the flood detector.

Read in sndrzt/linux-2.6.32 arch/x86/kvm/mmu.c `kvm_mmu_pte_write`,
`mmu_guess_page_from_pte_write`, `kvm_mmu_access_page`, `mmu_pte_write_zap_pte`,
`mmu_pte_write_new_pte`, `need_remote_flush`, `mmu_pte_write_flush_tlb` and paging_tmpl.h
`FNAME(update_pte)`.  The store has already reached guest memory (hvsim executes the one
instruction against a temporarily writable mapping, cpu/shadow_fill.py, where KVM's
emulator writes through kvm_write_guest); here every shadow page of the written gfn
either has the spte at that offset recomputed (a level-1 page: mmu_pte_updated, and a
speculative spte without A if the new gpte is present and accessed) or zapped (an upper
level: mmu_pde_zapped), or, for a misaligned write or the third write in a row to the
same table with the last speculative spte unused ("flooded"), the whole shadow page is
zapped (mmu_flooded).
"""

from typing import TYPE_CHECKING

from ..host.mm import HostFault
from ..types import PAGE_SHIFT, Gfn, Pfn
from .guest_walker import gpte_access, gpte_to_gfn
from .mmu import gfn_to_pfn
from .shadow_page import (
    PT64_BASE_ADDR_MASK,
    PT64_NX,
    PT_ACCESSED,
    PT_DIRTY,
    PT_PRESENT,
    PT_USER,
    PT_WRITABLE,
    SPTE_NOTRAP,
    is_shadow_present_pte,
)

if TYPE_CHECKING:
    from .shadow_mmu import ShadowMmu
    from .vcpu import Vcpu

_PERM_MASK = PT_PRESENT | PT_WRITABLE | PT_USER | PT64_NX  # PT64_PERM_MASK


def need_remote_flush(old: int, new: int) -> bool:
    if not is_shadow_present_pte(old):
        return False
    if not is_shadow_present_pte(new):
        return True
    if (old ^ new) & PT64_BASE_ADDR_MASK:
        return True
    old ^= PT64_NX
    new ^= PT64_NX
    return bool(old & ~new & _PERM_MASK)


def kvm_mmu_pte_write(mmu: "ShadowMmu", vcpu: "Vcpu", gpa: int, nbytes: int, guest_initiated: bool) -> None:
    """The store of nbytes at gpa (already in guest memory) to a gfn that may be a shadowed page table."""
    vm = mmu.vm
    st = mmu.state(vcpu)
    gfn = gpa >> PAGE_SHIFT
    offset = gpa & 0xFFF
    gentry = int.from_bytes(vm.read_guest(gpa & ~7, 8), "little")  # type: ignore[arg-type]
    # mmu_guess_page_from_pte_write: a 4- or 8-byte aligned store of a present gpte pins its page.
    guess: tuple[int, int, int] | None = None
    if nbytes in (4, 8) and gpa % nbytes == 0 and gentry & PT_PRESENT:
        slot = vm.memslots.gfn_to_memslot(Gfn(gpte_to_gfn(gentry)))
        if slot is not None:
            seq = mmu.mmu_notifier_seq
            pfn, _writable, _host = gfn_to_pfn(mmu.mm, mmu.profile, slot.gfn_to_hva(Gfn(gpte_to_gfn(gentry))), True)
            guess = (gpte_to_gfn(gentry), pfn, seq)
    # kvm_mmu_access_page: an emulated access to the last speculatively mapped gfn counts as a use.
    last = st.last_pte_updated
    if last is not None and st.last_pte_gfn == gfn:
        spte = int(last[0].view[last[1]])
        if is_shadow_present_pte(spte) and not spte & PT_ACCESSED:
            last[0].view[last[1]] = spte | PT_ACCESSED
    mmu.kvm_mmu_free_some_pages(vcpu)
    vm.stats.mmu_pte_write += 1
    flooded = False
    if guest_initiated:
        last = st.last_pte_updated
        last_used = last is not None and bool(int(last[0].view[last[1]]) & PT_ACCESSED)
        if gfn == st.last_pt_write_gfn and not last_used:
            st.last_pt_write_count += 1
            flooded = st.last_pt_write_count >= 3
        else:
            st.last_pt_write_gfn, st.last_pt_write_count, st.last_pte_updated = gfn, 1, None
    for sp in mmu.pages.indirect_pages(gfn):
        if sp.invalid:
            continue
        misaligned = bool((offset ^ (offset + nbytes - 1)) & ~7) or nbytes < 4
        if misaligned or flooded:
            mmu.kvm_mmu_zap_page(sp)
            vm.stats.mmu_flooded += 1
            continue
        index = offset >> 3
        old = int(sp.view[index])
        mmu.drop_spte(sp, index, mmu.trap)  # mmu_pte_write_zap_pte
        if sp.role.level != 1:
            vm.stats.mmu_pde_zapped += 1
        else:
            vm.stats.mmu_pte_updated += 1
            _update_pte(mmu, vcpu, sp, index, gentry, guess)
        if need_remote_flush(old, int(sp.view[index])):
            vm.kvm_flush_remote_tlbs()
        else:
            vcpu.stats.tlb_flush += 1  # kvm_mmu_flush_tlb
            vcpu.arch.flush_tlb()
    if guess is not None:
        mmu.mm.put_page(Pfn(guess[1]))  # kvm_release_pfn_clean


def _update_pte(mmu: "ShadowMmu", vcpu: "Vcpu", sp: object, index: int, gpte: int,
                guess: tuple[int, int, int] | None) -> None:
    """FNAME(update_pte): notrap for an absent gpte; a speculative spte for a present, accessed one."""
    from .shadow_page import KvmMmuPage

    assert isinstance(sp, KvmMmuPage)
    if ~gpte & (PT_PRESENT | PT_ACCESSED):
        if not gpte & PT_PRESENT:
            sp.view[index] = SPTE_NOTRAP
        return
    if guess is None or gpte_to_gfn(gpte) != guess[0]:
        return
    gfn, pfn, seq = guess
    slot = mmu.vm.memslots.gfn_to_memslot(Gfn(gfn))
    if slot is None or mmu.mmu_notifier_retry(seq, slot.gfn_to_hva(Gfn(gfn))):
        return
    pte_access = sp.role.access & gpte_access(gpte)
    mmu.mmu_set_spte(vcpu, sp, index, pte_access, False, bool(gpte & PT_DIRTY), gfn, pfn, True, True)


__all__ = ["HostFault", "kvm_mmu_pte_write", "need_remote_flush"]
