"""What the vCPU, the VM and the mmu_notifier chain need from a KVM MMU, so that a second MMU plugs in.

`TdpMmu` (kvm/mmu.py, EPT) implements it today; a shadow-paging MMU (issue #12:
sptes reached through shadow pages, an rmap with many sptes per gfn) implements
the same calls.  The vCPU backend only asks `translate` on a TLB miss and takes an
exit into `page_fault` when that says no; the notifier only calls the `kvm_*_hva*`
handlers (virt/kvm/kvm_main.c -> arch/x86/kvm/mmu.c in 2.6.32).  Every spte change
inside an implementation goes through one `set_spte` (after 6.8 tdp_mmu.c
handle_changed_spte()).
"""

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from mypy_extensions import mypyc_attr

from ..host.mmu_notifier import MmuNotifier
from ..types import Gfn, Hva

if TYPE_CHECKING:
    from ..host.mm import HostMm
    from .vcpu import Vcpu


class FaultResult(Enum):
    """What the guest sees after one run of the fault path."""

    FIXED = "fixed"  # spte installed: re-enter the guest, the access succeeds
    RETRY = "retry"  # mmu_notifier_retry: re-enter the guest, it faults again
    MMIO = "mmio"  # no memslot: an exit to userspace that hvsim's VMM does not emulate


class FaultWork(Enum):
    """What the host did for one fault, the unit `--perf-kvm-stat` prices an EPT violation by.

    The values are the cost-model names (costs.py `EPT_VIOLATION.<work>`).
    """

    MAP = "map"  # GUP found the page present; the spte was installed
    HOST_FAULT = "host_fault"  # GUP faulted the host page in first
    COW = "cow"  # GUP broke copy-on-write (whether or not the spte then went in)
    RETRY = "retry"  # mmu_notifier_retry dropped the result; the host did no paging work
    MMIO = "mmio"  # no memslot: nothing mapped

    # Members are singletons: hash by identity (C), not Enum's name hash (a Python call); these
    # key dicts once per fault.
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class FaultOutcome:
    """The fault path's answer: what the guest sees and what it cost the host.

    Every combination exists once (`outcome()`), so the fault path allocates nothing.
    """

    result: FaultResult
    work: FaultWork


_OUTCOMES = {(r, w): FaultOutcome(r, w) for r in FaultResult for w in FaultWork}


def outcome(result: FaultResult, work: FaultWork) -> FaultOutcome:
    return _OUTCOMES[(result, work)]


class SpteChange(Enum):
    """Why an spte changes: decides its accounting, trace and flush in `set_spte`."""

    INSTALL = "install"  # the fault path (mmu_set_spte): kvmmmu:kvm_mmu_set_spte, spte_set
    ZAP = "zap"  # a notifier or release drops it: spte_zapped, remote flush
    REPOINT = "repoint"  # change_pte's in-place rewrite (kvm_set_pte_rmapp): spte_changed, remote flush
    AGE = "age"  # clear_flush_young clears A: remote flush if it was set
    WALK = "walk"  # the EPT walk sets A/D (hardware): nothing to account or flush
    PROTECT = "protect"  # shadow paging's rmap_write_protect clears W in place: remote flush if it was set


# Called under --check at every spte change: (gfn, old spte, new spte, why).
SpteCheck = Callable[[Gfn, int, int, SpteChange], None]


class FaultPathHooks(Protocol):
    """Seams in an MMU's fault path for tests and `--inject` (hypervisor/races.py); `FaultHooks` is a base
    that does nothing at each."""

    def after_gfn_to_pfn(self, mmu: "KvmMmu", gfn: Gfn, hva: Hva) -> None:
        """The pfn is resolved (and pinned), mmu_lock not yet taken: where a notifier can race the fault."""

    def skip_mmu_notifier_retry(self) -> bool:
        """True: drop the mmu_notifier_retry() check (tests that show why it exists)."""
        ...


@mypyc_attr(allow_interpreted_subclasses=True)  # races.py and tests subclass it (setup.py compiles this module)
class FaultHooks:
    """A `FaultPathHooks` that changes nothing; subclass it and override one seam."""

    def after_gfn_to_pfn(self, mmu: "KvmMmu", gfn: Gfn, hva: Hva) -> None:
        pass

    def skip_mmu_notifier_retry(self) -> bool:
        return False


class IgnoreMmuNotifierRetry(FaultHooks):
    """Test-only: the fault path installs what gfn_to_pfn returned even if a notifier ran meanwhile;
    the races of `inner` (e.g. an --inject's) still fire."""

    def __init__(self, inner: FaultPathHooks | None = None) -> None:
        self.inner = inner

    def after_gfn_to_pfn(self, mmu: "KvmMmu", gfn: Gfn, hva: Hva) -> None:
        if self.inner is not None:
            self.inner.after_gfn_to_pfn(mmu, gfn, hva)

    def skip_mmu_notifier_retry(self) -> bool:
        return True


class KvmMmu(Protocol):
    """A KVM MMU as the vCPU backend, the VM and the notifier chain use it."""

    notifier: MmuNotifier
    mm: "HostMm"
    spte_check: SpteCheck | None
    hooks: FaultPathHooks | None
    # A gfn-indexed view of the leaf sptes, where the MMU keeps them so (TDP); None where
    # a leaf is reached only through its tables (shadow paging).  Read-only for callers:
    # the TLB fill reads it to skip `translate` when the spte already permits the access.
    leaf_sptes: memoryview | None

    def translate(self, gfn: int, write: bool) -> int:
        """On a TLB miss: the leaf spte if it permits the access (A/D now set), else 0 (an exit)."""
        ...

    def spte(self, gfn: int) -> int:
        """The leaf spte mapping gfn (0 if none), as the exit qualification reports it."""
        ...

    def page_fault(self, vcpu: "Vcpu", gfn: Gfn, write_fault: bool) -> FaultOutcome: ...

    def tlb_spte(self, vcpu: "Vcpu", gva: int, gfn: int) -> int:
        """The spte (EPT format) that a TLB entry of `vcpu` for gva -> gfn must follow (0 if none);
        for `--check`'s tlb-follows-spte, so it changes nothing (no A bit set)."""
        ...

    def kvm_unmap_hva_range(self, start: Hva, end: Hva) -> bool: ...

    def kvm_set_spte_hva(self, hva: Hva, pte: int) -> None: ...

    def kvm_age_hva(self, hva: Hva) -> bool: ...

    def zap_all(self) -> None: ...


__all__ = ["FaultHooks", "FaultOutcome", "FaultPathHooks", "FaultResult", "FaultWork", "IgnoreMmuNotifierRetry",
           "KvmMmu", "SpteChange", "SpteCheck", "outcome"]
