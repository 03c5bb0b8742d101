"""KVM's mmu_notifier: the callbacks and the mmu_notifier_seq/count retry protocol, for every MMU.

Mirrors the arch-independent half of virt/kvm/kvm_main.c (`kvm_mmu_notifier_*`, read in 2.6.32,
3.7.2, 5.12.9, 5.15 and 6.8): each callback bumps or brackets the sequence and calls the MMU's
arch handler (`kvm_unmap_hva_range`, `kvm_set_spte_hva`, `kvm_age_hva`, `zap_all`), then
flushes remote TLBs once if the handler changed a spte.  TdpMmu (kvm/mmu.py) and ShadowMmu
(kvm/shadow_mmu.py) differ only in those handlers: one spte per gfn, or every spte on its rmap.
"""

from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr

from ..host.mm import HostMm
from ..host.mmu_notifier import MmuNotifier, MmuNotifierOps
from ..types import PAGE_SIZE, Hva

if TYPE_CHECKING:
    from ..profiles import Profile
    from .mmu_interface import FaultPathHooks
    from .vm import Vm


# TdpMmu compiles with this class (setup.py, HVSIM_COMPILED=1); ShadowNotifier stays interpreted.
@mypyc_attr(allow_interpreted_subclasses=True)
class KvmMmuNotifier:
    """KVM's registered notifier and its retry protocol (a base class of each MMU)."""

    # Vm.destroy() deletes these back-pointers; a compiled class allows that only for the attributes named here.
    __deletable__ = ("vm", "notifier")
    vm: "Vm"
    profile: "Profile"
    hooks: "FaultPathHooks | None"

    def _init_notifier(self) -> None:
        self.mmu_notifier_seq = 0
        self.mmu_notifier_count = 0
        # The union of the hva ranges being invalidated (mmu_invalidate_range_start/end in 6.x).
        self.mmu_notifier_range: tuple[Hva, Hva] | None = None
        ops = MmuNotifierOps(
            release=self._mn_release,
            clear_flush_young=self._mn_clear_flush_young,
            change_pte=self._mn_change_pte if self.profile.kvm_change_pte else None,
            invalidate_page=self._mn_invalidate_page if self.profile.notifier_has_invalidate_page else None,
            invalidate_range_start=self._mn_invalidate_range_start,
            invalidate_range_end=self._mn_invalidate_range_end,
        )
        self.notifier = MmuNotifier(ops)

    # --- the arch handlers each MMU provides ---------------------------------------------

    def kvm_unmap_hva_range(self, start: Hva, end: Hva) -> bool:
        raise NotImplementedError

    def kvm_set_spte_hva(self, hva: Hva, pte: int) -> None:
        raise NotImplementedError

    def kvm_age_hva(self, hva: Hva) -> bool:
        raise NotImplementedError

    def zap_all(self) -> None:
        raise NotImplementedError

    # --- the fault path's side of the protocol -------------------------------------------

    def mmu_notifier_retry(self, mmu_seq: int, hva: Hva) -> bool:
        """mmu_notifier_retry(): did a notifier run (or is one running) since mmu_seq was read?

        2.6.32: any invalidation in progress retries.  With the range-based check
        (mmu_invalidate_retry_gfn in 6.8, include/linux/kvm_host.h) only one whose
        range holds this fault's address does; a finished one still shows in the seq.
        """
        if self.hooks is not None and self.hooks.skip_mmu_notifier_retry():
            return False
        if self.mmu_notifier_count != 0:
            if not self.profile.kvm_retry_range_based:
                return True
            rng = self.mmu_notifier_range
            if rng is not None and rng[0] <= hva < rng[1]:
                return True
        return self.mmu_notifier_seq != mmu_seq

    # --- KVM's mmu_notifier_ops ----------------------------------------------------------

    def _mn_invalidate_page(self, mn: MmuNotifier, mm: HostMm, address: Hva) -> None:
        self.mmu_notifier_seq += 1
        if self.kvm_unmap_hva_range(address, Hva(address + PAGE_SIZE)):
            self.vm.kvm_flush_remote_tlbs()

    def _mn_change_pte(self, mn: MmuNotifier, mm: HostMm, address: Hva, pte: int) -> None:
        if self.profile.kvm_change_pte_needs_invalidation and self.mmu_notifier_count == 0:
            # 5.15 .. 6.9: nothing to do unless an invalidation is in progress (whose
            # range_start already zapped the spte; sndrzt/linux-5.15, linux-6.8 kvm_main.c).
            return
        if self.profile.kvm_change_pte_bumps_seq:
            # 2.6.32 .. 5.12 (read in 2.6.32, 3.7.2, 5.12.9): mmu_notifier_seq++, then rewrite.
            self.mmu_notifier_seq += 1
        self.kvm_set_spte_hva(address, pte)

    def _mn_invalidate_range_start(self, mn: MmuNotifier, mm: HostMm, start: Hva, end: Hva) -> None:
        self.mmu_notifier_count += 1
        rng = self.mmu_notifier_range
        # kvm_mmu_invalidate_range_add(): one range, widened while invalidations overlap.
        self.mmu_notifier_range = (start, end) if rng is None else (min(rng[0], start), max(rng[1], end))
        if self.kvm_unmap_hva_range(start, end):
            self.vm.kvm_flush_remote_tlbs()

    def _mn_invalidate_range_end(self, mn: MmuNotifier, mm: HostMm, start: Hva, end: Hva) -> None:
        self.mmu_notifier_seq += 1
        self.mmu_notifier_count -= 1
        if self.mmu_notifier_count == 0:
            self.mmu_notifier_range = None

    def _mn_clear_flush_young(self, mn: MmuNotifier, mm: HostMm, address: Hva) -> bool:
        young = self.kvm_age_hva(address)
        if young:
            self.vm.kvm_flush_remote_tlbs()
        return young

    def _mn_release(self, mn: MmuNotifier, mm: HostMm) -> None:
        self.zap_all()
