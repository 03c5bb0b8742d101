"""KVM's TDP MMU: the spte table, the page-fault path with its retry protocol, and KVM's mmu_notifier.

Mirrors arch/x86/kvm/mmu.c and virt/kvm/kvm_main.c of 2.6.32 (the era of
change_pte), with the later eras' differences taken from the Profile:

* `page_fault` (tdp_page_fault): read mmu_notifier_seq, resolve the pfn through host GUP
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

from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from ..errors import InvariantViolation
from ..events import KvmAgeHva, KvmMmuSetSpte, KvmSetSpteHva, KvmUnmapHvaRange
from ..host.mm import HostFault, HostMm, pte_pfn, pte_write
from ..types import PAGE_SIZE, Gfn, Hva, Pfn
from .kvm_mmu_notifier import KvmMmuNotifier
from .mmu_interface import FaultOutcome, FaultPathHooks, FaultResult, FaultWork, SpteChange, SpteCheck, outcome
from .spte import (
    SPTE_ACCESSED,
    SPTE_DIRTY,
    SPTE_HOST_WRITEABLE,
    SPTE_NONPRESENT,
    SPTE_PFN_MASK,
    SPTE_READABLE,
    SPTE_WRITABLE,
    is_accessed_spte,
    is_shadow_present_pte,
    make_spte,
    spte_clear_accessed,
    spte_set_pfn_readonly,
)

if TYPE_CHECKING:
    from ..profiles import Profile
    from .vcpu import Vcpu
    from .vm import Vm


# The A and D bits the EPT walk sets for a read and for a write.  (The constants of the fault path are
# Final: the compiled build reads a Final from a C static, any other module global from the module's dict.)
_WALK_READ: Final = SPTE_READABLE | SPTE_ACCESSED
_WALK_WRITE: Final = _WALK_READ | SPTE_WRITABLE | SPTE_DIRTY

# What the host's fault handler did -> the outcome of a fault that installed its spte.
_FIXED: Final = {HostFault.NONE: outcome(FaultResult.FIXED, FaultWork.MAP),
                 HostFault.FAULT: outcome(FaultResult.FIXED, FaultWork.HOST_FAULT),
                 HostFault.COW: outcome(FaultResult.FIXED, FaultWork.COW)}
_MMIO: Final = outcome(FaultResult.MMIO, FaultWork.MMIO)
_RETRY: Final = outcome(FaultResult.RETRY, FaultWork.RETRY)
# A retry that copied a page still paid for the copy (2.6.32 without change_pte).
_RETRY_COW: Final = outcome(FaultResult.RETRY, FaultWork.COW)
# Members the fault path tests, named once (an Enum member read from its class costs about 80 ns
# on Python 3.11, four times a plain name: EnumType defines __getattr__).
_INSTALL: Final = SpteChange.INSTALL
_HOST_COW: Final = HostFault.COW


def check_spte_change(gfn: Gfn, old: int, new: int, change: SpteChange) -> None:
    """--check at the point of change: the spte rules that hold whatever else is in flight.

    After 6.8 tdp_mmu.c handle_changed_spte(): a present leaf is never replaced by a
    present leaf of another pfn (there the notifier zaps first; 2.6.32's change_pte
    rewrite is the one exception, and it makes the spte read-only), and
    check_spte_writable_invariants(): a writable spte is host-writable.
    """
    if new & SPTE_WRITABLE and not new & SPTE_HOST_WRITEABLE:
        raise InvariantViolation(f"invariant spte-change violated: gfn {gfn:#x} spte {new:#x} is writable "
                                 f"but not host-writable ({change.value})")
    if (old & SPTE_READABLE and new & SPTE_READABLE and (old ^ new) & SPTE_PFN_MASK
            and (change is not SpteChange.REPOINT or new & SPTE_WRITABLE)):
        raise InvariantViolation(f"invariant spte-change violated: gfn {gfn:#x} present spte {old:#x} replaced "
                                 f"by {new:#x}, another pfn, without a zap ({change.value})")


def gfn_to_pfn(mm: HostMm, profile: "Profile", hva: Hva, write_fault: bool) -> tuple[Pfn, bool, HostFault]:
    """The host GUP of both MMUs' fault paths (gfn_to_pfn / hva_to_pfn, virt/kvm/kvm_main.c).

    Returns (pfn, may the spte be writable, what the host did); the caller drops the pin.
    """
    if profile.kvm_gup_always_write or write_fault:
        pfn, work = mm.get_user_pages_fault(hva, True)
        return pfn, True, work
    pfn, work = mm.get_user_pages_fault(hva, False)
    # hva_to_pfn_slow(): "map read fault as writable if possible".
    wpfn = mm.get_user_pages_fast_only(hva, write=True)
    if wpfn is not None:
        mm.put_page(pfn)
        return wpfn, True, work
    return pfn, False, work


class TdpMmu(KvmMmuNotifier):
    """The EPT MMU (implements kvm.mmu_interface.KvmMmu)."""

    def __init__(self, vm: "Vm") -> None:
        self.vm = vm
        self.profile = vm.profile
        self.mm: HostMm = vm.mm
        self.sptes: npt.NDArray[np.int64] = np.zeros(int(vm.memslots.max_gfn), dtype=np.int64)
        # Scalar access without numpy boxing on the fault path; the array is never replaced.
        self.sptes_view = self.sptes.data
        self.leaf_sptes: memoryview | None = self.sptes_view
        self._nr_gfns = int(self.sptes.shape[0])
        # Seams of the fault path where tests and --inject fire host events (issue #4's races).
        self.hooks: FaultPathHooks | None = None
        # --check: called at every spte change (check_spte_change, or the checker's own).
        self.spte_check: SpteCheck | None = None
        self._init_notifier()

    # --- the one place an spte changes ------------------------------------------------

    def set_spte(self, gfn: Gfn, old: int, new: int, change: SpteChange) -> bool:
        """Write `new` over `old` and do the bookkeeping; true if TLBs must be flushed.

        After 6.8 arch/x86/kvm/mmu/tdp_mmu.c handle_changed_spte() (stats, trace,
        invariant WARNs at the point of change); the caller batches the flush, as
        the kernel's zap and notifier paths do.  hvsim's traces keep their
        operation-level events (kvm_unmap_hva_range, kvm_set_spte_hva, kvm_age_hva,
        and kvm_mmu_set_spte for an install): no per-spte kvm_tdp_mmu_spte_changed.
        """
        self.sptes_view[gfn] = new
        if self.spte_check is not None:
            self.spte_check(gfn, old, new, change)
        vm = self.vm
        if change is _INSTALL:
            vm.stats.spte_set += 1
            if vm.tracer.enabled:
                vm.tracer.event(KvmMmuSetSpte(gfn, new, 1))
            # An install or upgrade needs no flush: a stale read-only entry only walks again.
            return False
        stats = vm.stats
        if change is SpteChange.ZAP:
            stats.spte_zapped += 1
            return bool(old & SPTE_READABLE)
        if change is SpteChange.REPOINT:
            stats.spte_changed += 1
            return bool(old & SPTE_READABLE)
        if change is SpteChange.AGE:
            return bool(old & ~new & SPTE_ACCESSED)
        return False  # WALK: the hardware set A/D; nothing cached can be stale

    def zap_sptes(self, lo: int, gfns: npt.NDArray[np.intp]) -> bool:
        """set_spte(gfn, old, nonpresent, ZAP) for the present sptes at lo + gfns, in one numpy step.

        The batched form of set_spte for range zaps and release (same counters, same
        --check rule per spte, same flush decision: true, they were present), so that a
        64 MiB munmap does not pay a Python call per page.
        """
        if not gfns.size:
            return False
        window = self.sptes[lo:]
        if self.spte_check is not None:
            for off, old in zip(gfns.tolist(), window[gfns].tolist(), strict=True):
                self.spte_check(Gfn(lo + off), old, SPTE_NONPRESENT, SpteChange.ZAP)
        window[gfns] = SPTE_NONPRESENT
        self.vm.stats.spte_zapped += int(gfns.size)
        return True

    def spte(self, gfn: int) -> int:
        return int(self.sptes_view[gfn]) if gfn < self._nr_gfns else 0

    def tlb_spte(self, vcpu: "Vcpu", gva: int, gfn: int) -> int:
        # With EPT a TLB entry combines the guest walk and the one spte of its gfn.
        return self.spte(gfn)

    def translate(self, gfn: int, write: bool) -> int:
        """The EPT walk on a TLB miss: the spte if it permits the access, with A (and D) set; else 0.

        The A/D update goes through set_spte unless already set, so a refill of a
        mapped page costs one read; the fill path in cpu/unicorn_vcpu.py inlines
        the already-set case.
        """
        spte = self.sptes_view[gfn] if gfn < self._nr_gfns else 0
        wanted = _WALK_WRITE if write else _WALK_READ
        if spte & wanted == wanted:
            return spte
        if not spte & SPTE_READABLE or (write and not spte & SPTE_WRITABLE):
            return 0
        new = spte | (wanted & (SPTE_ACCESSED | SPTE_DIRTY))
        self.set_spte(Gfn(gfn), spte, new, SpteChange.WALK)
        return new

    # --- the fault path --------------------------------------------------------------

    def page_fault(self, vcpu: "Vcpu", gfn: Gfn, write_fault: bool) -> FaultOutcome:
        """tdp_page_fault() (2.6.32 arch/x86/kvm/mmu.c), which the TDP MMU installs as its page_fault op
        (kvm_mmu_page_fault calls vcpu->arch.mmu.page_fault): the vCPU's EPT_VIOLATION exit calls it directly."""
        mmu_seq = self.mmu_notifier_seq
        hva = self.vm.memslots.gfn_to_hva(gfn)
        if hva is None:  # kvm_is_error_hva(): no memslot, an MMIO access
            return _MMIO
        pfn, writable, host = gfn_to_pfn(self.mm, self.profile, hva, write_fault)
        if self.hooks is not None:
            self.hooks.after_gfn_to_pfn(self, gfn, hva)
        # spin_lock(&kvm->mmu_lock)
        if self.mmu_notifier_retry(mmu_seq, hva):
            self.mm.put_page(pfn)
            vcpu.stats.pf_retry += 1
            return _RETRY_COW if host is _HOST_COW else _RETRY
        spte = make_spte(pfn, writable)
        if write_fault:
            spte |= SPTE_DIRTY
        self.set_spte(gfn, self.sptes_view[gfn], spte, _INSTALL)
        vcpu.stats.pf_fixed += 1
        # kvm_release_pfn_clean(): the spte holds no reference; notifiers keep it honest.
        self.mm.put_page(pfn)
        return _FIXED[host]

    # --- zapping and rmap walks ----------------------------------------------------------

    def _gfns_of_range(self, start: Hva, end: Hva) -> list[tuple[Gfn, Gfn]]:
        return [(lo, hi) for _, lo, hi in self.vm.memslots.hva_to_gfns(start, end)]

    def _zap_gfn_range(self, lo: int, hi: int) -> int:
        """Zap every present spte of gfns [lo, hi); how many there were."""
        present = np.flatnonzero(self.sptes[lo:hi])
        self.zap_sptes(lo, present)
        return int(present.size)

    def kvm_unmap_hva_range(self, start: Hva, end: Hva) -> bool:
        """Zap every present spte of [start, end); true if any was (a TLB flush is needed)."""
        zapped = 0
        for lo, hi in self._gfns_of_range(start, end):
            zapped += self._zap_gfn_range(lo, hi)
        if zapped and self.vm.tracer.enabled:
            self.vm.tracer.event(KvmUnmapHvaRange(start, end, zapped))
        return zapped > 0

    def kvm_set_spte_hva(self, hva: Hva, pte: int) -> None:
        """kvm_set_pte_rmapp(): zap if the new host pte is writable, else re-point read-only."""
        need_flush = False
        for lo, _hi in self._gfns_of_range(hva, Hva(hva + PAGE_SIZE)):
            spte = int(self.sptes_view[lo])
            if not is_shadow_present_pte(spte):
                continue
            if pte_write(pte):
                need_flush |= self.set_spte(lo, spte, SPTE_NONPRESENT, SpteChange.ZAP)
            else:
                need_flush |= self.set_spte(lo, spte, spte_set_pfn_readonly(spte, pte_pfn(pte)),
                                            SpteChange.REPOINT)
        if self.vm.tracer.enabled:
            self.vm.tracer.event(KvmSetSpteHva(hva, int(pte_pfn(pte)), need_flush))
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
                spte = int(self.sptes_view[lo])
                if is_shadow_present_pte(spte) and is_accessed_spte(spte):
                    young |= self.set_spte(lo, spte, spte_clear_accessed(spte), SpteChange.AGE)
        if self.vm.tracer.enabled:
            self.vm.tracer.event(KvmAgeHva(hva, young))
        return young

    def zap_all(self) -> None:
        """kvm_arch_flush_shadow(): every spte goes, with the table pages that held them."""
        present = np.flatnonzero(self.sptes)
        if present.size:
            # Shadow pages: one 512-entry leaf table per 2 MiB of gfns that had a spte.
            self.vm.stats.mmu_shadow_zapped += int(np.unique(present >> 9).size)
            self._zap_gfn_range(0, self._nr_gfns)
            self.vm.kvm_flush_remote_tlbs()


__all__ = ["FaultOutcome", "FaultResult", "FaultWork", "TdpMmu", "check_spte_change", "gfn_to_pfn"]
