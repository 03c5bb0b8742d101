"""KVM's mmu_notifier callbacks under shadow paging: every one walks the rmap, all sptes of a gfn.

2.6.32 mmu.c (sndrzt/linux-2.6.32) `kvm_handle_hva` with `kvm_unmap_rmapp` (invalidate_page,
invalidate_range_start: every spte of the gfn is dropped to trap), `kvm_set_pte_rmapp`
(change_pte: a writable new host pte zaps them all, a read-only one rewrites every one in
place to the new pfn, W and SPTE_HOST_WRITEABLE cleared, other bits kept), `kvm_age_rmapp`
(clear_flush_young: shadow_accessed_mask is PT_ACCESSED_MASK, so every spte with A makes
the gfn young and loses A).  One kvm_flush_remote_tlbs per callback that changed
something.  The callbacks and the mmu_notifier_seq/count protocol are kvm/kvm_mmu_notifier.py.
"""

from typing import TYPE_CHECKING

from ..events import KvmAgeHva, KvmSetSpteHva, KvmUnmapHvaRange
from ..host.mm import pte_pfn, pte_write
from ..types import PAGE_SIZE, Hva
from .kvm_mmu_notifier import KvmMmuNotifier
from .mmu_interface import SpteChange
from .shadow_page import PT64_BASE_ADDR_MASK, PT_ACCESSED, PT_WRITABLE, SPTE_HOST_WRITEABLE_X86, KvmMmuPage

if TYPE_CHECKING:
    from ..profiles import Profile
    from .mmu_interface import FaultPathHooks
    from .rmap import Rmap
    from .vm import Vm


class ShadowNotifier(KvmMmuNotifier):
    """The notifier half of ShadowMmu (a mixin: ShadowMmu provides rmap, trap, set_spte, drop_spte)."""

    vm: "Vm"
    profile: "Profile"
    rmap: "Rmap"
    trap: int
    hooks: "FaultPathHooks | None"

    def set_spte(self, sp: KvmMmuPage, index: int, new: int, change: SpteChange) -> bool:
        raise NotImplementedError

    def drop_spte(self, sp: KvmMmuPage, index: int, value: int) -> bool:
        raise NotImplementedError

    def _gfns(self, start: Hva, end: Hva) -> range:
        out = [range(lo, hi) for _, lo, hi in self.vm.memslots.hva_to_gfns(start, end)]
        return out[0] if len(out) == 1 else range(0)

    def kvm_unmap_rmapp(self, gfn: int) -> bool:
        """Drop every spte of gfn to trap; true if there was one."""
        zapped = False
        for sp, index in self.rmap.sptes(gfn):
            zapped |= self.drop_spte(sp, index, self.trap)
        return zapped

    def kvm_unmap_hva_range(self, start: Hva, end: Hva) -> bool:
        heads = self.rmap.heads
        gfns = self._gfns(start, end)
        # Whichever is shorter is walked; gfn order either way (kvm_handle_hva_range).
        todo = sorted(g for g in heads if g in gfns) if len(gfns) > len(heads) else [g for g in gfns if g in heads]
        zapped = sum(len(heads[g]) for g in todo)
        for gfn in todo:
            self.kvm_unmap_rmapp(gfn)
        if zapped and self.vm.tracer.enabled:
            self.vm.tracer.event(KvmUnmapHvaRange(start, end, zapped))
        return zapped > 0

    def kvm_set_spte_hva(self, hva: Hva, pte: int) -> None:
        """kvm_set_pte_rmapp on every spte of the gfn: zap (writable host pte) or re-point read-only."""
        need_flush = False
        for gfn in self._gfns(hva, Hva(hva + PAGE_SIZE)):
            for sp, index in self.rmap.sptes(gfn):
                need_flush = True
                if pte_write(pte):
                    self.drop_spte(sp, index, self.trap)
                else:
                    spte = int(sp.view[index])
                    new = (spte & ~PT64_BASE_ADDR_MASK) | (int(pte_pfn(pte)) << 12)
                    self.set_spte(sp, index, new & ~(PT_WRITABLE | SPTE_HOST_WRITEABLE_X86), SpteChange.REPOINT)
        if self.vm.tracer.enabled:
            self.vm.tracer.event(KvmSetSpteHva(hva, int(pte_pfn(pte)), need_flush))
        if need_flush:
            self.vm.kvm_flush_remote_tlbs()

    def kvm_age_hva(self, hva: Hva) -> bool:
        """kvm_age_rmapp: shadow sptes have a real A bit; every one set makes the page young."""
        young = False
        for gfn in self._gfns(hva, Hva(hva + PAGE_SIZE)):
            for sp, index in self.rmap.sptes(gfn):
                spte = int(sp.view[index])
                if spte & PT_ACCESSED:
                    young |= self.set_spte(sp, index, spte & ~PT_ACCESSED, SpteChange.AGE)
        if self.vm.tracer.enabled:
            self.vm.tracer.event(KvmAgeHva(hva, young))
        return young
