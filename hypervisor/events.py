"""The events a run emits, once: a small typed record per tracepoint, the `Tracer` Protocol, the null tracer.

A leaf module (it imports nothing of hvsim's but types.py), so that `host/` and `kvm/` both emit
these records without importing each other.  A record's field names, in order, are the names
every consumer relies on: the trace formats (trace.py), the Perfetto flows (flows.py), the
`--check` handlers (check.py); `fields()` gives them as the trace's argument dict.

Hot paths build a record only when `tracer.enabled` (the null tracer's is False), so a run
without --trace or --check pays one attribute test per event site.

To add an event: a record here (its `name` the kernel tracepoint's name where there is one),
listed in `Event`; emit it where the model does the work; give it a format in trace.py and a
handler in check.py (tests fail on an event without either).
"""

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Union


class _Record:
    """What every record has: its tracepoint name, and its fields as the trace's argument dict."""

    __slots__ = ()
    name: ClassVar[str]
    __match_args__: ClassVar[tuple[str, ...]]  # the dataclass's field names, in order

    def fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__match_args__}


# --- kvm/ ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KvmExit(_Record):
    """trace_kvm_exit: a VM exit, its reason and exit information."""

    name: ClassVar[str] = "kvm_exit"
    vcpu: int
    reason: str
    rip: int
    info1: int
    info2: int


@dataclass(frozen=True, slots=True)
class KvmPageFault(_Record):
    """trace_kvm_page_fault: the EPT violation's gpa and exit qualification."""

    name: ClassVar[str] = "kvm_page_fault"
    vcpu: int
    address: int
    error_code: int


@dataclass(frozen=True, slots=True)
class KvmMmuSetSpte(_Record):
    """kvmmmu:kvm_mmu_set_spte: an spte written (TdpMmu.set_spte)."""

    name: ClassVar[str] = "kvm_mmu_set_spte"
    gfn: int
    spte: int
    level: int


@dataclass(frozen=True, slots=True)
class KvmSetSpteHva(_Record):
    """kvm_set_spte_hva: the change_pte notifier, and whether it rewrote an spte."""

    name: ClassVar[str] = "kvm_set_spte_hva"
    hva: int
    pfn: int
    changed: bool


@dataclass(frozen=True, slots=True)
class KvmUnmapHvaRange(_Record):
    """kvm_unmap_hva_range: an invalidate_range_start that zapped sptes."""

    name: ClassVar[str] = "kvm_unmap_hva_range"
    start: int
    end: int
    zapped: int


@dataclass(frozen=True, slots=True)
class KvmAgeHva(_Record):
    """kvm_age_hva: the clear_flush_young notifier."""

    name: ClassVar[str] = "kvm_age_hva"
    hva: int
    young: bool


@dataclass(frozen=True, slots=True)
class KvmFlushRemoteTlbs(_Record):
    """hvsim's own: one kvm_flush_remote_tlbs call returned; whether it IPI'd, how many vCPUs it kicked
    out of guest mode (no kernel tracepoint; the kernel counts it in remote_tlb_flush when it IPI'd)."""

    name: ClassVar[str] = "kvm_flush_remote_tlbs"
    ipi: bool
    kicks: int


@dataclass(frozen=True, slots=True)
class KvmTlbFlush(_Record):
    """hvsim's own: a vCPU served KVM_REQ_TLB_FLUSH in vcpu_enter_guest (its TLB and walk cache went)."""

    name: ClassVar[str] = "kvm_tlb_flush"
    vcpu: int


# --- host/ --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _KsmScanMark(_Record):
    seq: int
    rmap_items: int


@dataclass(frozen=True, slots=True)
class KsmStartScan(_KsmScanMark):
    """ksm_start_scan: a ksmd wake-up begins (its full-scan count, its rmap_items)."""

    name: ClassVar[str] = "ksm_start_scan"


@dataclass(frozen=True, slots=True)
class KsmStopScan(_KsmScanMark):
    name: ClassVar[str] = "ksm_stop_scan"


@dataclass(frozen=True, slots=True)
class _KsmPageMerge(_Record):
    mm: str
    hva: int
    ksm_pfn: int
    pfn: int


@dataclass(frozen=True, slots=True)
class KsmMergeOnePage(_KsmPageMerge):
    """ksm_merge_one_page: replace_page() mapped the KSM page at `hva` of mm `mm`."""

    name: ClassVar[str] = "ksm_merge_one_page"


@dataclass(frozen=True, slots=True)
class KsmMergeWithKsmPage(_KsmPageMerge):
    """ksm_merge_with_ksm_page: the page matched a stable-tree KSM page (the merge may still fail)."""

    name: ClassVar[str] = "ksm_merge_with_ksm_page"


@dataclass(frozen=True, slots=True)
class KsmRemoveKsmPage(_Record):
    name: ClassVar[str] = "ksm_remove_ksm_page"
    pfn: int


@dataclass(frozen=True, slots=True)
class CowKsm(_Record):
    """hvsim's own: a write fault copied a KSM page."""

    name: ClassVar[str] = "cow_ksm"
    hva: int
    ksm_pfn: int
    pfn: int


@dataclass(frozen=True, slots=True)
class MmuNotifierCall:
    """hvsim's own mmu_notifier_<callback>: one notifier call, as dispatched to the chain."""

    callback: str
    start: int
    end: int

    @property
    def name(self) -> str:
        return f"mmu_notifier_{self.callback}"

    def fields(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end}


Event = Union[KvmExit, KvmPageFault, KvmMmuSetSpte, KvmSetSpteHva, KvmUnmapHvaRange, KvmAgeHva,  # noqa: UP007
              KvmFlushRemoteTlbs, KvmTlbFlush, KsmStartScan, KsmStopScan, KsmMergeOnePage, KsmMergeWithKsmPage,
              KsmRemoveKsmPage, CowKsm, MmuNotifierCall]

RECORDS: tuple[type[_Record], ...] = (KvmExit, KvmPageFault, KvmMmuSetSpte, KvmSetSpteHva, KvmUnmapHvaRange,
                                      KvmAgeHva, KvmFlushRemoteTlbs, KvmTlbFlush, KsmStartScan, KsmStopScan,
                                      KsmMergeOnePage, KsmMergeWithKsmPage, KsmRemoveKsmPage, CowKsm)


def event_fields(record: Event, vm: int | None) -> dict[str, Any]:
    """The record as the trace's argument dict, with the VM first when it has one."""
    fields = record.fields()
    return fields if vm is None else {"vm": vm, **fields}


class Tracer(Protocol):
    """Where events go.  `enabled` False: emit nothing (and build no record)."""

    @property
    def enabled(self) -> bool: ...

    def event(self, record: Event, vm: int | None = None) -> None:
        """`vm`: the VM the event belongs to (None: host-wide, e.g. ksmd's scan)."""


class NullTracer:
    """No tracing: the default of every emitter."""

    def __init__(self) -> None:
        # An instance attribute, not a class one: the fault path reads it up to three times per exit, and
        # Python 3.11 specializes a read of an instance's own attribute, not of its class's through it.
        self.enabled = False

    def event(self, record: Event, vm: int | None = None) -> None:
        pass


NULL_TRACER: Tracer = NullTracer()


class VmTracer:
    """The tracer of one VM's mm, VM and notifier: stamps `vm_id` on what it passes downstream."""

    enabled = True

    def __init__(self, downstream: Tracer, vm_id: int) -> None:
        self.downstream = downstream
        self.vm_id = vm_id

    def event(self, record: Event, vm: int | None = None) -> None:
        self.downstream.event(record, self.vm_id if vm is None else vm)


class RecordingTracer:
    """Keeps every event (record, vm): for tests and for tools that read a run's events."""

    enabled = True

    def __init__(self) -> None:
        self.events: list[tuple[Event, int | None]] = []

    def event(self, record: Event, vm: int | None = None) -> None:
        self.events.append((record, vm))

    def names(self) -> list[str]:
        return [record.name for record, _ in self.events]
