"""Typed events (issue #10 item 5): each tracepoint is one record in hypervisor/events.py, every consumer
knows every record, and an event site builds no record while no tracer is attached."""

import sys
from dataclasses import FrozenInstanceError, fields
from typing import Any

import pytest

from hypervisor import events
from hypervisor.check import _HANDLERS, NAMES_NO_PAGE
from hypervisor.host.mm import MADV_MERGEABLE
from hypervisor.kvm.vm import GUEST_RAM_HVA
from hypervisor.trace import _FORMATS, FORMATTED_EVENTS, format_event
from hypervisor.types import PAGE_SIZE, Gfn

from .support import full_scan, make_guest, page_of

ALL_RECORDS = (*events.RECORDS, events.MmuNotifierCall)


def test_every_event_record_has_a_trace_format_and_a_check_handler() -> None:
    assert set(events.RECORDS) <= set(_FORMATS)
    assert set(ALL_RECORDS) <= set(_HANDLERS) | NAMES_NO_PAGE
    assert tuple(r.name for r in events.RECORDS) == FORMATTED_EVENTS


def test_a_records_trace_fields_are_its_dataclass_fields_in_order_with_the_vm_first() -> None:
    for record in events.RECORDS:
        assert list(record.__match_args__) == [f.name for f in fields(record)]  # type: ignore[arg-type]
    exit_ = events.KvmExit(vcpu=0, reason="HLT", rip=0x100000, info1=0, info2=0)
    assert events.event_fields(exit_, 2) == {"vm": 2, "vcpu": 0, "reason": "HLT", "rip": 0x100000, "info1": 0,
                                             "info2": 0}
    assert events.event_fields(events.MmuNotifierCall("change_pte", 0x1000, 0x2000), None) == {
        "start": 0x1000, "end": 0x2000}


def test_records_are_frozen_and_name_their_tracepoint() -> None:
    merge = events.KsmMergeOnePage(mm="vm0", hva=0x7F0000000000, ksm_pfn=5, pfn=9)
    with pytest.raises(FrozenInstanceError):
        merge.pfn = 1  # type: ignore[misc]
    assert merge.name == "ksm_merge_one_page"
    assert events.MmuNotifierCall("invalidate_range_start", 0, 0).name == "mmu_notifier_invalidate_range_start"
    assert format_event(merge, 0) == "ksm pfn 0x5 mm vm0 hva 0x7f0000000000 pfn 0x9"


def test_a_vm_tracer_stamps_its_vm_on_what_the_mm_and_the_mmu_emit() -> None:
    recorder = events.RecordingTracer()
    g = make_guest("3.7", pages=4)
    g.mm.tracer = g.vm.tracer = events.VmTracer(recorder, 3)
    g.vcpu.handle_ept_violation(Gfn(1), write=True, rip=0)
    assert {vm for _, vm in recorder.events} == {3}
    assert recorder.names() == ["kvm_exit", "kvm_page_fault", "kvm_mmu_set_spte"]


def test_the_null_tracer_is_off_and_takes_every_record() -> None:
    assert not events.NULL_TRACER.enabled
    events.NULL_TRACER.event(events.KsmRemoveKsmPage(pfn=1))


def _no_record(*_args: Any, **_kw: Any) -> None:
    raise AssertionError("an event record was built with no tracer attached")


def test_event_sites_build_no_record_without_a_tracer(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every module of the model that emits events sees a record class that fails when built.
    for name, module in list(sys.modules.items()):
        if name.startswith(("hypervisor.host.", "hypervisor.kvm.")):
            for record in ALL_RECORDS:
                if getattr(module, record.__name__, None) is record:
                    monkeypatch.setattr(module, record.__name__, _no_record)
    g = make_guest("2.6.32", pages=4)
    g.mm.madvise(GUEST_RAM_HVA, 4 * PAGE_SIZE, MADV_MERGEABLE)
    for gfn in range(2):
        g.mm.write_bytes(g.hva(gfn), page_of(0x5A))
        g.vcpu.handle_ept_violation(Gfn(gfn), write=False, rip=0)
    g.host.ksm.set_run(1)
    full_scan(g.host.ksm)
    full_scan(g.host.ksm)
    assert g.host.ksm.counters()["pages_sharing"] == 1
    g.vcpu.handle_ept_violation(Gfn(0), write=True, rip=0)  # COW of the KSM page, change_pte, notifiers
    assert g.host.vmstat.counters["cow_ksm"] == 1
