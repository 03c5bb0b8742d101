"""KVM statistics with the kernel's names (debugfs /sys/kernel/debug/kvm/*), plus hvsim's own few.

hvsim's additions are named for what they count and listed in HVSIM_ONLY so that
reports can tell them apart from counters the kernel has.
"""

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import TypeVar

from mypy_extensions import mypyc_attr

from .exits import ExitReason

_K = TypeVar("_K")


@mypyc_attr(native_class=False)
class Tally(Counter[_K]):
    """A Counter for counts bumped on every exit: collections.Counter defines __delitem__ in Python, which
    sends every store (`tally[key] += 1`) through a slot wrapper; with dict's own __delitem__ back, stores
    are dict's C code again (about 45 ns less per bump).  Deleting a missing key raises, as for a dict."""

    __delitem__ = dict.__delitem__  # type: ignore[assignment]  # (takes the key type, not any object)


@dataclass(slots=True)
class VcpuStats:
    """struct kvm_vcpu_stat (the x86 fields hvsim can produce)."""

    exits: int = 0
    pf_fixed: int = 0
    pf_guest: int = 0
    tlb_flush: int = 0
    invlpg: int = 0
    io_exits: int = 0
    irq_exits: int = 0
    mmio_exits: int = 0
    halt_exits: int = 0
    hypercalls: int = 0
    insn_emulation: int = 0
    insn_emulation_fail: int = 0
    # hvsim: faults that lost the mmu_notifier_retry race and were retried by the guest.
    pf_retry: int = 0
    exit_reasons: Tally[ExitReason] = field(default_factory=Tally)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "exit_reasons"}


@dataclass(slots=True)
class VmStats:
    """struct kvm_vm_stat (x86), plus hvsim's spte bookkeeping."""

    mmu_shadow_zapped: int = 0
    mmu_pte_write: int = 0
    mmu_pte_updated: int = 0
    mmu_flooded: int = 0
    mmu_recycled: int = 0
    mmu_cache_miss: int = 0
    mmu_pde_zapped: int = 0
    # A gauge, as in 2.6.32: shadow pages unsync now (kvm_unsync_page +1, kvm_unlink_unsync_page -1).
    mmu_unsync: int = 0
    remote_tlb_flush: int = 0
    # 5.15+: every kvm_flush_remote_tlbs call, IPI or not.
    remote_tlb_flush_requests: int = 0
    # hvsim: leaf sptes dropped by a notifier callback or by release.
    spte_zapped: int = 0
    # hvsim: leaf sptes rewritten in place by change_pte (kvm_set_pte_rmapp).
    spte_changed: int = 0
    # hvsim: leaf sptes installed by the fault path (kvmmmu:kvm_mmu_set_spte).
    spte_set: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


HVSIM_ONLY = frozenset({"pf_retry", "spte_zapped", "spte_changed", "spte_set"})
