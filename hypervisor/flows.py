"""Causal arrows in the Perfetto trace: from each ksmd merge or zap to the first guest exit it caused.

When ksmd remaps a page (`ksm_merge_one_page`) or its notifier call zaps sptes
(`kvm_unmap_hva_range` while ksmd runs), the next EPT_VIOLATION exit a guest takes on that
page is the cost of that merge: a zapped spte faults on any access, a write-protected one on
the next write.  The trace links the two with a Chrome trace-event flow (v1): a flow start
(`"ph": "s"`) written right after the ksmd event and a flow end (`"ph": "f"`) written right
before the `kvm_exit`, with one `id` (and the same `name` and `cat`, which Perfetto's
importer also keys v1 flows on).

How Perfetto binds them (read in its trace_processor: importers/json/json_trace_parser_impl.cc,
importers/common/flow_tracker.cc and slice_tracker.cc, as vendored in klzgrad/naiveproxy): a
thread-scoped instant event becomes a zero-length slice that stays on its thread's slice stack
until the next slice starts there; an `s` binds to the topmost slice of its thread's stack (the
ksmd instant just written); an `f` without `"bp": "e"` waits for the next slice to begin on its
thread (the `kvm_exit` written just after it), which is also the Chrome format's default
binding.  `"bp": "e"` is left out on purpose: one version of the parser tests it against "b".
Since ksmd's work takes no simulated time, many events share a timestamp, so the flow events
are placed next to their instants in the file, relying on Perfetto's sort keeping file order
among equal timestamps (unverified: the sorter was not read).

A zap over a range wider than one page is linked only when every page of the range had a
present spte (`zapped` equals its length): otherwise the event does not say which pages it
zapped.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .events import Event, KsmMergeOnePage, KvmExit, KvmUnmapHvaRange
from .types import PAGE_SIZE, Hva

if TYPE_CHECKING:
    from .sim import Simulation

FLOW_NAME = "ksmd -> kvm_exit"
FLOW_CAT = "ksm"
SOURCES = (KsmMergeOnePage, KvmUnmapHvaRange)


class CausalFlows:
    """Pending causes per (vm, gfn), turned into flow start/end records as the trace is written."""

    def __init__(self, write: Callable[[dict[str, Any]], None]) -> None:
        self.write = write
        self.next_id = 1  # unique across the runs of one trace file (compare writes several)
        self.pending: dict[tuple[int, int], list[int]] = {}
        self.linked = 0

    def new_run(self) -> None:
        self.pending.clear()

    def _pages(self, sim: "Simulation", ev: KsmMergeOnePage | KvmUnmapHvaRange,
               vm_id: int | None) -> list[tuple[int, int]]:
        if isinstance(ev, KsmMergeOnePage):
            vms = [vm for vm in sim.vms if vm.mm.name == ev.mm]
            start, end = ev.hva, ev.hva + PAGE_SIZE
        elif vm_id is not None:
            vms = [sim.vms[vm_id]]
            start, end = ev.start, ev.end
        else:
            return []
        out = []
        for vm in vms:
            ranges = vm.memslots.hva_to_gfns(Hva(start), Hva(end))
            pages = [(vm.vm_id, gfn) for _, lo, hi in ranges for gfn in range(lo, hi)]
            if isinstance(ev, KvmUnmapHvaRange) and len(pages) != ev.zapped:
                continue  # some pages had no spte: which ones the event does not say
            out += pages
        return out

    def before(self, ev: Event, vm: int | None, record: dict[str, Any]) -> None:
        """Called right before `record` (the trace record of `ev`) is written: flow ends bind to it."""
        if isinstance(ev, KvmExit) and ev.reason == "EPT_VIOLATION" and vm is not None:
            for flow in self.pending.pop((vm, ev.info2 // PAGE_SIZE), []):
                self.linked += 1
                self.write({"name": FLOW_NAME, "cat": FLOW_CAT, "ph": "f", "id": flow, "ts": record["ts"],
                            "pid": record["pid"], "tid": record["tid"]})

    def after(self, sim: "Simulation", ev: Event, vm: int | None, record: dict[str, Any]) -> None:
        """Called right after `record` is written: flow starts bind to it."""
        if isinstance(ev, SOURCES) and sim.context[0] == "ksmd":
            for page in self._pages(sim, ev, vm):
                flow = self.next_id
                self.next_id += 1
                self.pending.setdefault(page, []).append(flow)
                self.write({"name": FLOW_NAME, "cat": FLOW_CAT, "ph": "s", "id": flow, "ts": record["ts"],
                            "pid": record["pid"], "tid": record["tid"]})
