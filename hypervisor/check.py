"""`--check`: the coherence invariants of DESIGN.md, asserted at every event on the pages it touched.

The checker rides on the trace events (it is a trace consumer), so when it is off
the hot paths pay only the `trace is not None` test they already had.  Events are
delivered once the operation they name has completed (a notifier event after
every callback ran), so every event is a point where the invariants must hold,
with two allowances the kernel has too: a GUP pin held by a fault in flight makes
a frame's refcount exceed its mappings, and a page whose pte was just replaced
keeps its mapcount until page_remove_rmap right after the notification.

Incremental (issue #10 item 8).  Each event is checked only where it acts: the
gfn, hva or hva range its fields name in its VM (the host pte there, and the spte
of the gfn behind it) and the pfns it names or finds mapped there (`_HANDLERS`
says, event by event, what is checked; an event that names a range gets the
range checked, vectorised; `mmu_notifier_release` names the whole address space).
The frames an event touched are remembered, and at the end of the time slice
(no fault in flight) their counts are checked exactly against the ptes that map
them, and KSM pages among them are re-hashed.  A full sweep of every invariant
over all of memory (hypervisor/coherence.py's `sweep`) runs at the first slice end
after every `SWEEP_EVERY` events (exact counts; at an event, bounds only, if twice
that many pass without a slice end), and at the end of the run; `check()` is that
sweep, for tests to call at any point.  ksm-rmap-items is
judged only by the sweep (it is a property of KSM's trees, not of one page).

Point-of-change API (for the one `set_spte` of the MMU): `check_spte(vm, gfn)`
asserts spte-follows-pte, writable-spte and frame-mapped-not-free for that one
spte right where it was written, and remembers its frame for the slice end.

Invariants:
* spte-follows-pte: every present spte maps the pfn that the host pte of its hva maps now;
* writable-spte: a writable spte only where that host pte is writable;
* frame-mapped-not-free: no frame is free while a pte or spte maps it;
* refcount-equals-mappings: a frame's mapcount and refcount are the number of ptes that map
  it, checked exactly at the end of every time slice (no fault in flight, no pte being
  replaced) and as lower bounds in between;
* ksm-page-stable: a KSM page's content never changes (it is byte-equal to every page merged
  into it) and nothing maps it writable;
* free-frame-clean: a free frame keeps no page state (not PageKsm, no mapcount), so that
  whatever allocates it next gets an ordinary page (2.6.32 free_pages_check());
* tlb-follows-spte: after every kvm_flush_remote_tlbs, no vCPU that could run guest code (no
  flush request pending) holds a TLB entry (as its fills answered Unicorn since its last
  flush) for a gfn whose spte no longer maps that frame, or maps it read-only under a
  writable entry;
* ksm-rmap-items: every stable node counts exactly the live rmap_items that name it, and the
  unstable tree holds only live rmap_items marked unstable (a freed one left there would be
  merged later and counted forever).
"""

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from . import coherence
from . import events as ev
from .errors import InvariantViolation
from .kvm.mmu import check_spte_change
from .trace import format_event
from .types import PAGE_SHIFT, PAGE_SIZE

if TYPE_CHECKING:
    from .kvm.vm import Vm
    from .sim import Simulation

RING_SIZE = 24
# Events between two full sweeps of every invariant over all of memory (at the slice end
# that follows).  Each event is checked where it acts; the sweep catches what no event
# names (a pte changed without a notification, KSM's trees), at most this many events and
# one slice late, and costs about as much as checking a few hundred events.
SWEEP_EVERY = 1000


class CoherenceChecker:
    """A `ev.Tracer` (events.py) that checks each event, then passes it downstream (the trace file)."""

    enabled = True

    def __init__(self, downstream: ev.Tracer = ev.NULL_TRACER, sweep_every: int = SWEEP_EVERY) -> None:
        self.sim: Simulation | None = None
        # (simulated time, event, its VM), formatted only when a violation is reported.
        self.ring: deque[tuple[int, ev.Event | None, int | None]] = deque(maxlen=RING_SIZE)
        self.downstream = downstream
        self.sweep_every = sweep_every
        self.checks = 0
        self.sweeps = 0
        self._in_check = False
        self._since_sweep = 0
        self._vm_of_mm: dict[str, int] = {}
        # What the events of this time slice touched, checked exactly at its end.
        self._pfns: set[int] = set()
        self._gfns: set[tuple[int, int]] = set()

    def attach(self, sim: "Simulation") -> None:
        for backend in getattr(sim, "backends", ()):
            backend.tlb_entries = {}  # the fills record what each vCPU's TLB may hold
        for vm in sim.vms:
            vm.mmu.spte_check = check_spte_change  # the spte rules at each point of change (kvm/mmu.py)
        self.sim = sim
        self._vm_of_mm = {vm.mm.name: i for i, vm in enumerate(sim.vms)}

    # --- event intake --------------------------------------------------------------------

    def event(self, record: ev.Event, vm: int | None = None) -> None:
        if self.downstream.enabled:
            self.downstream.event(record, vm)
        sim = self.sim
        self.ring.append((sim.clock() if sim is not None else 0, record, vm))
        if sim is None or self._in_check:
            return
        self._in_check = True
        try:
            handler = _HANDLERS.get(type(record))
            if handler is not None:
                handler(self, sim, record, vm)
            self._since_sweep += 1
            if self._since_sweep >= 2 * self.sweep_every:  # no slice end came to sweep at
                self._sweep(sim, strict=False)
            self.checks += 1
        finally:
            self._in_check = False

    def end_of_slice(self) -> None:
        """No fault is in flight: the frames this slice touched must have exact counts."""
        sim = self.sim
        self.ring.append((sim.clock() if sim is not None else 0, None, None))
        if sim is None or self._in_check:
            return
        self._in_check = True
        try:
            if self._since_sweep >= self.sweep_every:
                self._sweep(sim, strict=True)
            else:
                self._slice_touched(sim)
            self.checks += 1
        finally:
            self._in_check = False

    def end_of_run(self) -> None:
        """The last full sweep, exact counts."""
        self.check(strict_refcount=True)

    def check(self, strict_refcount: bool) -> None:
        """Every invariant over all of memory (a sweep); strict: no fault in flight, counts exact."""
        sim = self.sim
        if sim is None or self._in_check:
            return
        self._in_check = True
        try:
            self._sweep(sim, strict_refcount)
            self.checks += 1
        finally:
            self._in_check = False

    # --- point-of-change API ------------------------------------------------------------

    def check_spte(self, vm: "Vm", gfn: int) -> None:
        """Assert the invariants of one spte right after it changed (for the MMU's set_spte)."""
        if self.sim is None or self._in_check:
            return
        pfn = coherence.check_gfn(vm, gfn, self.sim.frames, self._fail)
        self._gfns.add((self._vm_index(vm), gfn))
        if pfn is not None:
            self._pfns.add(pfn)

    # --- what each event touched -------------------------------------------------------

    def _vm_index(self, vm: "Vm") -> int:
        sim = self.sim
        if sim is not None:
            for i, other in enumerate(sim.vms):
                if other is vm:
                    return i
        return vm.vm_id

    def _gfn(self, sim: "Simulation", vm: int, gfn: int) -> None:
        v = sim.vms[vm]
        if gfn >= v.mmu.sptes.shape[0]:
            return
        pfn = coherence.check_gfn(v, gfn, sim.frames, self._fail)
        self._gfns.add((vm, gfn))
        if pfn is not None:
            self._pfn(sim, pfn)

    def _hva(self, sim: "Simulation", vm: int, hva: int) -> None:
        pte_pfn, spte_pfn = coherence.check_hva(sim.vms[vm], hva, sim.frames, self._fail)
        if pte_pfn is not None:
            self._pfn(sim, pte_pfn, mapped=True)
        if spte_pfn is not None and spte_pfn != pte_pfn:
            self._pfn(sim, spte_pfn)

    def _range(self, sim: "Simulation", vm: int, start: int, end: int) -> None:
        if end - start == PAGE_SIZE:
            self._hva(sim, vm, start)
            return
        pfns = coherence.check_hva_range(sim.vms[vm], start, end, sim.frames, self._fail)
        self._pfns.update(pfns.tolist())

    def _pfn(self, sim: "Simulation", pfn: int, mapped: bool = False) -> None:
        """A frame an event named (or found mapped: then it has at least one mapping)."""
        frames = sim.frames
        self._pfns.add(pfn)
        free = frames.refcount_view[pfn] <= 0
        if (free and (frames.stable_node_view[pfn] >= 0 or frames.mapcount_view[pfn] != 0)) or (
                mapped and (free or frames.mapcount_view[pfn] <= 0)):
            self._exact(sim, [pfn], strict=False)

    def _named_pfns(self, sim: "Simulation", *pfns: int) -> None:
        for pfn in pfns:
            if 0 <= pfn < sim.frames.nr_frames:
                self._pfn(sim, pfn)

    def _exact(self, sim: "Simulation", pfns: list[int], strict: bool) -> None:
        arr = np.array(sorted(pfns), dtype=np.int64)
        coherence.check_pfns(sim.vms, sim.frames, arr, coherence.mapped_of(sim.vms, arr), strict, self._fail)

    def _slice_touched(self, sim: "Simulation") -> None:
        """At a slice end: re-check the pages this slice touched, then their frames' exact counts."""
        gfns, pfns = self._gfns, self._pfns
        self._gfns, self._pfns = set(), set()
        # A fault may have changed its gfn after its events (the pin it dropped, a retry).
        for vm, gfn in sorted(gfns):
            self._gfn(sim, vm, gfn)
        pfns |= self._pfns
        self._pfns = set()
        if not pfns:
            return
        self._exact(sim, list(pfns), strict=True)
        if sim.ksm is not None:
            coherence.check_ksm_pages(sim.ksm, sim.frames, np.array(sorted(pfns), dtype=np.int64), self._fail)

    def _sweep(self, sim: "Simulation", strict: bool) -> None:
        coherence.sweep(sim, strict, self._fail)
        self.sweeps += 1
        self._since_sweep = 0
        self._gfns, self._pfns = set(), set()

    # --- reporting ------------------------------------------------------------------------

    def _fail(self, invariant: str, detail: str) -> NoReturn:
        events = "\n".join("    " + _format(now, record, vm) for now, record, vm in self.ring)
        raise InvariantViolation(f"invariant {invariant} violated: {detail}. Last events:\n{events}")


def _format(now: int, record: ev.Event | None, vm: int | None) -> str:
    if record is None:
        return f"[insn {now}] slice_end:"
    who = f"vm{vm} " if vm is not None and not isinstance(record, ev.MmuNotifierCall) else ""
    return f"[insn {now}] {who}{record.name}: {format_event(record, vm)}".rstrip()


# --- what each event names, and so what is checked at it ---------------------------------------
# A handler gets the event's VM (None: a host-wide event; the VM-scoped ones always carry it).

Handler = Callable[[CoherenceChecker, "Simulation", Any, "int | None"], None]


def _on_page_fault(c: CoherenceChecker, sim: "Simulation", e: ev.KvmPageFault, vm: int | None) -> None:
    # Before the fault path runs: the gfn as it stands, and remembered for the slice end,
    # where the pin the fault took must be gone.
    if vm is not None:
        c._gfn(sim, vm, e.address >> PAGE_SHIFT)


def _on_set_spte(c: CoherenceChecker, sim: "Simulation", e: ev.KvmMmuSetSpte, vm: int | None) -> None:
    if vm is not None:
        c._gfn(sim, vm, e.gfn)


def _on_vm_hva(c: CoherenceChecker, sim: "Simulation", e: ev.KvmSetSpteHva | ev.KvmAgeHva | ev.CowKsm,
               vm: int | None) -> None:
    # kvm_set_spte_hva, kvm_age_hva, cow_ksm: one hva of the VM's mm (and the pfns named).
    if vm is not None:
        c._hva(sim, vm, e.hva)
    if isinstance(e, ev.CowKsm):
        c._named_pfns(sim, e.pfn, e.ksm_pfn)
    elif isinstance(e, ev.KvmSetSpteHva):
        c._named_pfns(sim, e.pfn)


def _on_vm_range(c: CoherenceChecker, sim: "Simulation", e: ev.KvmUnmapHvaRange | ev.MmuNotifierCall,
                 vm: int | None) -> None:
    # kvm_unmap_hva_range and every mmu_notifier_* call: [start, end) of the VM's mm.
    start, end = e.start, e.end
    if start == end == 0:  # mmu_notifier_release: the whole address space
        start, end = 0, 1 << 64
    if vm is not None:
        c._range(sim, vm, start, end)


def _on_ksm_page(c: CoherenceChecker, sim: "Simulation", e: ev.KsmMergeOnePage | ev.KsmMergeWithKsmPage,
                 vm: int | None) -> None:
    # ksm_merge_one_page, ksm_merge_with_ksm_page: an hva of the mm named, the KSM page and the page.
    of_mm = c._vm_of_mm.get(e.mm)
    if of_mm is not None:
        c._hva(sim, of_mm, e.hva)
    c._named_pfns(sim, e.pfn, e.ksm_pfn)


def _on_pfn(c: CoherenceChecker, sim: "Simulation", e: ev.KsmRemoveKsmPage, vm: int | None) -> None:
    # ksm_remove_ksm_page: the frame of a stable node just removed.
    c._named_pfns(sim, e.pfn)


def _on_remote_flush(c: CoherenceChecker, sim: "Simulation", e: ev.KvmFlushRemoteTlbs, vm: int | None) -> None:
    # kvm_flush_remote_tlbs has returned: every vCPU of the VM has flushed or has the request
    # pending (served before it runs a guest instruction).
    for slot, backend in enumerate(getattr(sim, "backends", ())):
        if sim.vm_of[slot] == vm and backend.tlb_entries is not None:
            coherence.check_vcpu_tlb(backend.vcpu, backend.tlb_entries, c._fail)


def _on_exit(c: CoherenceChecker, sim: "Simulation", e: ev.KvmExit, vm: int | None) -> None:
    # kvm_exit names a page only for EPT_VIOLATION (info2, the gpa), checked at the
    # kvm_page_fault that follows it; the other exits (I/O, HLT, CPUID, VMCALL, triple
    # fault) change no pte, spte or frame.
    return


# Events that name no page: what changes with them is judged by the sweep.
NAMES_NO_PAGE: frozenset[type] = frozenset({ev.KsmStartScan, ev.KsmStopScan, ev.KvmTlbFlush})

_HANDLERS: dict[type, Handler] = {
    ev.KvmExit: _on_exit,
    ev.KvmFlushRemoteTlbs: _on_remote_flush,
    ev.KvmPageFault: _on_page_fault,
    ev.KvmMmuSetSpte: _on_set_spte,
    ev.KvmUnmapHvaRange: _on_vm_range,
    ev.KvmSetSpteHva: _on_vm_hva,
    ev.KvmAgeHva: _on_vm_hva,
    ev.CowKsm: _on_vm_hva,
    ev.KsmMergeOnePage: _on_ksm_page,
    ev.KsmMergeWithKsmPage: _on_ksm_page,
    ev.KsmRemoveKsmPage: _on_pfn,
    ev.MmuNotifierCall: _on_vm_range,
}
