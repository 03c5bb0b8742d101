"""KVM's TDP MMU: the spte table, the page-fault path with its retry protocol, and KVM's mmu_notifier.

Mirrors arch/x86/kvm/mmu.c and virt/kvm/kvm_main.c of 2.6.32 (the era of
change_pte), with the later eras' differences taken from the Profile:

* `tdp_page_fault`: read mmu_notifier_seq, resolve the pfn through host GUP
  (gfn_to_pfn; 2.6.32 always pins for write, later kernels pin with the fault's
  own intent and upgrade a read fault only through the non-faulting fast GUP),
  then, "under mmu_lock", give up if mmu_notifier_retry() says a notifier ran in
  between, else install the spte.
* The notifier callbacks (`kvm_mmu_notifier_*`): invalidate_page and
  invalidate_range_start zap, invalidate_range_end and change_pte bump
  mmu_notifier_seq, change_pte rewrites a spte read-only in place
  (kvm_set_pte_rmapp), clear_flush_young ages, release zaps everything.

TDP maps every gfn with one 4 KiB leaf spte, so the rmap of a gfn (the sptes that
map it) is that one slot of the spte array; no large pages.
"""

from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..host.mm import HostMm, pte_pfn, pte_write
from ..host.mmu_notifier import MmuNotifier, MmuNotifierOps
from ..types import PAGE_SIZE, Gfn, Hva, Pfn
from .memslot import Memslot
from .spte import (
    SPTE_DIRTY,
    SPTE_NONPRESENT,
    is_accessed_spte,
    is_shadow_present_pte,
    make_spte,
    spte_clear_accessed,
    spte_set_pfn_readonly,
)

if TYPE_CHECKING:
    from .vcpu import Vcpu
    from .vm import Vm


class FaultResult(Enum):
    FIXED = "fixed"  # spte installed: re-enter the guest, the access succeeds
    RETRY = "retry"  # mmu_notifier_retry: re-enter the guest, it faults again
    MMIO = "mmio"  # no memslot: an exit to userspace that hvsim's VMM does not emulate


# Named points of the fault path where tests can fire host events (issue #4's races).
RacePoint = Callable[["TdpMmu", Gfn, Hva], None]


class TdpMmu:
    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.profile = vm.profile
        self.mm: HostMm = vm.mm
        self.sptes: npt.NDArray[np.int64] = np.zeros(int(vm.memslots.max_gfn), dtype=np.int64)
        # Scalar access without numpy boxing on the fault path; the array is never replaced.
        self.sptes_view = self.sptes.data
        self._last_slot: Memslot | None = None
        self.mmu_notifier_seq = 0
        self.mmu_notifier_count = 0
        # The union of the hva ranges being invalidated (mmu_invalidate_range_start/end in 6.x).
        self.mmu_notifier_range: tuple[Hva, Hva] | None = None
        self.race_points: dict[str, RacePoint] = {}
        # Test-only: skip mmu_notifier_retry() to show why it exists.
        self.ignore_mmu_notifier_retry = False
        ops = MmuNotifierOps(
            release=self._mn_release,
            clear_flush_young=self._mn_clear_flush_young,
            change_pte=self._mn_change_pte if self.profile.kvm_change_pte else None,
            invalidate_page=self._mn_invalidate_page if self.profile.notifier_has_invalidate_page else None,
            invalidate_range_start=self._mn_invalidate_range_start,
            invalidate_range_end=self._mn_invalidate_range_end,
        )
        self.notifier = MmuNotifier(ops)

    # --- the fault path --------------------------------------------------------------

    def gfn_to_pfn(self, hva: Hva, write_fault: bool) -> tuple[Pfn, bool]:
        """Pin the page behind hva; return (pfn, may the spte be writable)."""
        mm = self.mm
        if self.profile.kvm_gup_always_write:
            return mm.get_user_pages(hva, write=True), True
        if write_fault:
            return mm.get_user_pages(hva, write=True), True
        pfn = mm.get_user_pages(hva, write=False)
        # hva_to_pfn_slow(): "map read fault as writable if possible".
        wpfn = mm.get_user_pages_fast_only(hva, write=True)
        if wpfn is not None:
            mm.put_page(pfn)
            return wpfn, True
        return pfn, False

    def mmu_notifier_retry(self, mmu_seq: int, hva: Hva) -> bool:
        """mmu_notifier_retry(): did a notifier run (or is one running) since mmu_seq was read?

        2.6.32: any invalidation in progress retries.  With the range-based check
        (mmu_invalidate_retry_gfn in 6.8, include/linux/kvm_host.h) only one whose
        range holds this fault's address does; a finished one still shows in the seq.
        """
        if self.ignore_mmu_notifier_retry:
            return False
        if self.mmu_notifier_count != 0:
            if not self.profile.kvm_retry_range_based:
                return True
            rng = self.mmu_notifier_range
            if rng is not None and rng[0] <= hva < rng[1]:
                return True
        return self.mmu_notifier_seq != mmu_seq

    def tdp_page_fault(self, vcpu: "Vcpu", gfn: Gfn, write_fault: bool) -> FaultResult:
        slot = self._last_slot
        if slot is None or not slot.contains_gfn(gfn):
            slot = self._last_slot = self.vm.memslots.gfn_to_memslot(gfn)
            if slot is None:
                return FaultResult.MMIO
        mmu_seq = self.mmu_notifier_seq
        hva = slot.gfn_to_hva(gfn)
        pfn, writable = self.gfn_to_pfn(hva, write_fault)
        if self.race_points:
            point = self.race_points.get("after_gfn_to_pfn")
            if point is not None:
                point(self, gfn, hva)
        # spin_lock(&kvm->mmu_lock)
        if self.mmu_notifier_retry(mmu_seq, hva):
            self.mm.put_page(pfn)
            vcpu.stats.pf_retry += 1
            return FaultResult.RETRY
        spte = make_spte(pfn, writable)
        if write_fault:
            spte |= SPTE_DIRTY
        # Upgrading a present read-only spte needs no flush: a stale read-only TLB entry
        # only makes the next write walk again.
        self.sptes_view[gfn] = spte
        self.vm.stats.spte_set += 1
        vcpu.stats.pf_fixed += 1
        if self.vm.trace is not None:
            self.vm.trace("kvm_mmu_set_spte", {"gfn": gfn, "spte": spte, "level": 1})
        # kvm_release_pfn_clean(): the spte holds no reference; notifiers keep it honest.
        self.mm.put_page(pfn)
        return FaultResult.FIXED

    # --- zapping and rmap walks ----------------------------------------------------------

    def _gfns_of_range(self, start: Hva, end: Hva) -> list[tuple[Gfn, Gfn]]:
        return [(lo, hi) for _, lo, hi in self.vm.memslots.hva_to_gfns(start, end)]

    def kvm_unmap_hva_range(self, start: Hva, end: Hva) -> bool:
        """Zap every present spte of [start, end); true if any was (a TLB flush is needed)."""
        zapped = 0
        for lo, hi in self._gfns_of_range(start, end):
            window = self.sptes[lo:hi]
            present = np.flatnonzero(window)
            if present.size:
                window[present] = SPTE_NONPRESENT
                zapped += int(present.size)
        self.vm.stats.spte_zapped += zapped
        if zapped and self.vm.trace is not None:
            self.vm.trace("kvm_unmap_hva_range", {"start": start, "end": end, "zapped": zapped})
        return zapped > 0

    def kvm_set_spte_hva(self, hva: Hva, pte: int) -> None:
        """kvm_set_pte_rmapp(): zap if the new host pte is writable, else re-point read-only."""
        need_flush = False
        for lo, _hi in self._gfns_of_range(hva, Hva(hva + PAGE_SIZE)):
            spte = int(self.sptes[lo])
            if not is_shadow_present_pte(spte):
                continue
            need_flush = True
            if pte_write(pte):
                self.sptes[lo] = SPTE_NONPRESENT
                self.vm.stats.spte_zapped += 1
            else:
                self.sptes[lo] = spte_set_pfn_readonly(spte, pte_pfn(pte))
                self.vm.stats.spte_changed += 1
        if self.vm.trace is not None:
            self.vm.trace("kvm_set_spte_hva", {"hva": hva, "pfn": int(pte_pfn(pte)), "changed": need_flush})
        if need_flush:
            self.vm.kvm_flush_remote_tlbs()

    def kvm_age_hva(self, hva: Hva) -> bool:
        """kvm_age_rmapp() under EPT, per the Profile's kvm_age_ept.

        "always_old": 2.6.32 returns 0 when shadow_accessed_mask is 0, as it is for EPT
        (sndrzt/linux-2.6.32 arch/x86/kvm/mmu.c).  "zap": without EPT A/D bits a present
        spte counts as young and is zapped, so the next access faults it back (2.6.34
        .. 3.5 always; urbanspr1nter/linux-2.6.34).  "accessed_bit": with EPT A/D bits
        (3.6+, enable_ept_ad_bits; hvsim's EPT walk sets them) test and clear the bit.
        """
        mode = self.profile.kvm_age_ept
        young = False
        if mode == "always_old":
            pass
        elif mode == "zap":
            young = self.kvm_unmap_hva_range(hva, Hva(hva + PAGE_SIZE))
        else:
            for lo, _hi in self._gfns_of_range(hva, Hva(hva + PAGE_SIZE)):
                spte = int(self.sptes[lo])
                if is_shadow_present_pte(spte) and is_accessed_spte(spte):
                    young = True
                    self.sptes[lo] = spte_clear_accessed(spte)
        if self.vm.trace is not None:
            self.vm.trace("kvm_age_hva", {"hva": hva, "young": young})
        return young

    def zap_all(self) -> None:
        """kvm_arch_flush_shadow(): every spte goes, with the table pages that held them."""
        present = np.flatnonzero(self.sptes)
        if present.size:
            # Shadow pages: one 512-entry leaf table per 2 MiB of gfns that had a spte.
            self.vm.stats.mmu_shadow_zapped += int(np.unique(present >> 9).size)
            self.vm.stats.spte_zapped += int(present.size)
            self.sptes[:] = SPTE_NONPRESENT
            self.vm.kvm_flush_remote_tlbs()

    # --- KVM's mmu_notifier_ops -------------------------------------------------------

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


__all__ = ["FaultResult", "RacePoint", "TdpMmu"]
