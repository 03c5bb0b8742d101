"""`--trace FILE`: every event under its kernel tracepoint name, stamped with simulated time.

Two formats, chosen by the file name: `*.json` is Chrome trace-event JSON (opens in
Perfetto UI: one process per VM with its vCPU thread, one for ksmd, counter tracks
for exits and KSM sharing); anything else is text in the style of `trace-cmd report`:

    qemu-vm0-1000  [000]     0.000001600: kvm_exit: vcpu 0 reason EPT_VIOLATION rip 0x100000 ...

Timestamps are simulated: instructions retired, converted at --insns-per-ms.  The
events, with the kernel's names where the kernel has them: kvm_exit, kvm_page_fault,
kvmmmu:kvm_mmu_set_spte, kvm_set_spte_hva (change_pte), kvm_unmap_hva_range,
kvm_age_hva, ksm_start_scan/ksm_stop_scan, ksm_merge_one_page,
ksm_merge_with_ksm_page, ksm_remove_ksm_page; and hvsim's own mmu_notifier_<callback>
(each notifier call) and cow_ksm (a write that copied a KSM page).
"""

import fnmatch
import json
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

from .events import (
    RECORDS,
    CowKsm,
    Event,
    KsmMergeOnePage,
    KsmMergeWithKsmPage,
    KsmRemoveKsmPage,
    KsmStartScan,
    KsmStopScan,
    KvmAgeHva,
    KvmExit,
    KvmFlushRemoteTlbs,
    KvmMmuSetSpte,
    KvmPageFault,
    KvmSetSpteHva,
    KvmTlbFlush,
    KvmUnmapHvaRange,
    MmuNotifierCall,
)
from .flows import CausalFlows
from .kvm.exits import ExitReason
from .kvm.spte import SPTE_EXECUTABLE, SPTE_READABLE, SPTE_WRITABLE

if TYPE_CHECKING:
    from .sim import Simulation

KSMD_PID = 30
VMM_PID_BASE = 1000
RUN_PID_STRIDE = 100_000

_EPT = ExitReason.EPT_VIOLATION
_CATEGORY = {"kvm_mmu_set_spte": "kvmmmu", "cow_ksm": "mm"}


def _cat(event: str) -> str:
    if event in _CATEGORY:
        return _CATEGORY[event]
    if event.startswith("mmu_notifier_"):
        return "mmu_notifier"
    return event.split("_", 1)[0]


def _perms(spte: int) -> str:
    return (("r" if spte & SPTE_READABLE else "-") + ("w" if spte & SPTE_WRITABLE else "-")
            + ("x" if spte & SPTE_EXECUTABLE else "-"))


# One format per record type (events.py); the fields are the record's, by name.
_FORMATS: dict[type, Callable[[Any], str]] = {
    KvmExit: lambda e: (f"vcpu {e.vcpu} reason {e.reason} rip {e.rip:#x} info1 {e.info1:#018x} "
                        f"info2 {e.info2:#018x}"),
    KvmPageFault: lambda e: f"address {e.address:x} error_code {e.error_code:x}",
    KvmMmuSetSpte: lambda e: f"gfn {e.gfn:x} spte {e.spte:x} ({_perms(e.spte)}) level {e.level}",
    KvmSetSpteHva: lambda e: f"hva {e.hva:#x} (pfn {e.pfn:#x}, {'spte updated' if e.changed else 'no spte'})",
    KvmUnmapHvaRange: lambda e: f"mmu notifier unmap range: {e.start:#018x} -- {e.end:#018x} ({e.zapped} zapped)",
    KvmAgeHva: lambda e: f"mmu notifier age hva: {e.hva:#018x} young {int(e.young)}",
    # hvsim's events for KVM_REQ_TLB_FLUSH: the remote flush call, and one vCPU serving it.
    KvmFlushRemoteTlbs: lambda e: f"ipi {int(e.ipi)} kicks {e.kicks}",
    KvmTlbFlush: lambda e: f"vcpu {e.vcpu}",
    KsmStartScan: lambda e: f"seq {e.seq} rmap_items {e.rmap_items}",
    KsmStopScan: lambda e: f"seq {e.seq} rmap_items {e.rmap_items}",
    KsmMergeOnePage: lambda e: f"ksm pfn {e.ksm_pfn:#x} mm {e.mm} hva {e.hva:#x} pfn {e.pfn:#x}",
    KsmMergeWithKsmPage: lambda e: f"ksm pfn {e.ksm_pfn:#x} mm {e.mm} hva {e.hva:#x} pfn {e.pfn:#x}",
    KsmRemoveKsmPage: lambda e: f"pfn {e.pfn:#x}",
    CowKsm: lambda e: f"hva {e.hva:#x} ksm pfn {e.ksm_pfn:#x} new pfn {e.pfn:#x}",
}


FORMATTED_EVENTS = tuple(record.name for record in RECORDS)


def format_event(record: Event, vm: int | None, insn: str | None = None) -> str:
    """The text after `name: ` in a trace-cmd-style line (and in --check's last events)."""
    if isinstance(record, MmuNotifierCall):
        return f"vm{vm} {record.start:#x} -- {record.end:#x}"
    text = _FORMATS[type(record)](record)
    return text + f" insn \"{insn}\"" if insn is not None else text


class TraceWriter:
    """A `Tracer` (events.py): pass the writer as a Simulation's tracer, then `bind` the simulation.

    The file is created when the first run is bound (so a run refused before it starts leaves
    none).  A write that fails (a full disk) stops the trace, not the run: `error` says why.
    """

    def __init__(self, path: str, events: str | None = None) -> None:
        self.path = path
        self.json = path.endswith(".json")
        self.globs = [g.strip() for g in events.split(",") if g.strip()] if events else None
        self.file: IO[str] | None = None
        self.error: str | None = None
        self.sim: Simulation | None = None
        self.run_index = -1
        self.label = ""
        self.written = 0
        self._first_json = True
        self._insn_cache: dict[tuple[int, int], str] = {}
        self._last_counters: dict[int, tuple[int, ...]] = {}
        # Flow arrows from ksmd's merges and zaps to the exits they caused (hypervisor/flows.py).
        self.flows = CausalFlows(self._json) if self.json and self.wants("kvm_exit") else None

    def _write(self, text: str) -> None:
        if self.error is not None:
            return
        try:
            if self.file is None:
                self.file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
                if self.json:
                    self.file.write('{"displayTimeUnit": "ns", "traceEvents": [\n')
            self.file.write(text)
        except OSError as exc:
            self.error = f"--trace {self.path!r}: {exc.strerror or exc}; the trace stops there"

    def wants(self, event: str) -> bool:
        return self.globs is None or any(fnmatch.fnmatchcase(event, g) for g in self.globs)

    def bind(self, sim: "Simulation", label: str = "") -> None:
        """Start a run: later events are stamped with this simulation's clock."""
        self._write("")  # create the file now
        self.sim = sim
        self.run_index += 1
        self.label = label
        self._insn_cache.clear()
        if self.flows is not None:
            self.flows.new_run()
        sim.on_slice.append(self._sample)
        if self.json:
            prefix = f"{label}: " if label else ""
            for vm in sim.vms:
                pid = self._pid(vm.vm_id)
                self._json({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"{prefix}vm{vm.vm_id}"}})
                for vcpu in vm.vcpus:  # one thread (track) per vCPU
                    self._json({"name": "thread_name", "ph": "M", "pid": pid, "tid": vcpu.vcpu_id,
                                "args": {"name": f"vcpu{vcpu.vcpu_id}"}})
            if sim.ksm is not None:
                pid = self._pid(None)
                self._json({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"{prefix}ksmd"}})
                self._json({"name": "thread_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "ksmd"}})
        elif label:
            self._write(f"# run: {label}\n")

    def _pid(self, vm: int | None) -> int:
        base = self.run_index * RUN_PID_STRIDE
        return base + (KSMD_PID if vm is None else VMM_PID_BASE + vm)

    def _json(self, obj: dict[str, Any]) -> None:
        self._write(("" if self._first_json else ",\n") + json.dumps(obj, separators=(",", ":")))
        self._first_json = False

    enabled = True

    def event(self, ev: Event, vm: int | None = None) -> None:
        event = ev.name
        if self.error is not None or not self.wants(event):
            return
        sim = self.sim
        if sim is None:
            return  # before the run starts (the loader): not traced
        insns = sim.clock()
        kind, who = sim.context
        if vm is None and kind == "vcpu":
            vm = who
        insn = self._insn(vm, ev.vcpu, ev.rip) if isinstance(ev, KvmExit) and vm is not None else None
        # A vCPU's event is its thread's, even when ksmd's flush caused it (a kick's exit).
        vcpu: int | None = getattr(ev, "vcpu", None)
        if vcpu is not None and vm is not None:
            kind = "vcpu"
        self.written += 1
        if self.json:
            ts = insns * 1000.0 / sim.config.insns_per_ms
            pid = self._pid(None if kind == "ksmd" else vm)
            args = ev.fields()
            if insn is not None:
                args["insn"] = insn
            record: dict[str, Any] = {"name": event, "cat": _cat(event), "ts": ts, "pid": pid, "tid": vcpu or 0,
                                      "args": args}
            if event == "ksm_start_scan":
                record.update(name="ksmd scan", ph="B")
            elif event == "ksm_stop_scan":
                record.update(name="ksmd scan", ph="E")
            else:
                record.update(ph="i", s="t")
            if self.flows is not None:
                self.flows.before(ev, vm, record)
            self._json(record)
            if self.flows is not None:
                self.flows.after(sim, ev, vm, record)
            return
        seconds = insns / sim.config.insns_per_ms / 1000.0
        comm = "ksmd" if kind == "ksmd" else f"qemu-vm{vm}"
        pid = KSMD_PID if kind == "ksmd" else VMM_PID_BASE + (vm or 0)
        task = f"{comm}-{pid}"
        self._write(f"{task:>16}  [000] {seconds:15.9f}: {event}: {format_event(ev, vm, insn)}\n")

    def _insn(self, vm: int, vcpu: int, rip: int) -> str:
        key = (vm, rip)
        text = self._insn_cache.get(key)
        if text is None and self.sim is not None:
            text = self._insn_cache[key] = self.sim.backend_of(vm, vcpu).instruction_at(rip)
        return text or "?"

    def _sample(self, sim: "Simulation") -> None:
        """Counter tracks (JSON only): EPT violations per VM, KSM sharing."""
        if not self.json:
            return
        ts = sim.now * 1000.0 / sim.config.insns_per_ms
        for vm in sim.vms:
            n = sum(v.stats.exit_reasons.get(_EPT, 0) for v in vm.vcpus)
            if self._changed(self._pid(vm.vm_id), (n,)):
                self._json({"name": "EPT_VIOLATION exits", "ph": "C", "ts": ts, "pid": self._pid(vm.vm_id),
                            "args": {"exits": n}})
        if sim.ksm is not None:
            c = sim.ksm.counters()
            if self._changed(self._pid(None), (c["pages_shared"], c["pages_sharing"])):
                self._json({"name": "ksm", "ph": "C", "ts": ts, "pid": self._pid(None),
                            "args": {"pages_shared": c["pages_shared"], "pages_sharing": c["pages_sharing"]}})

    def _changed(self, key: int, values: tuple[int, ...]) -> bool:
        if self._last_counters.get(key) == values:
            return False
        self._last_counters[key] = values
        return True

    def close(self) -> None:
        """Finish the file; a failed write or flush is left in `error`."""
        if self.file is None:
            return
        if self.json:
            self._write("\n]}\n")
        try:
            self.file.close()
        except OSError as exc:
            if self.error is None:
                self.error = f"--trace {self.path!r}: {exc.strerror or exc}; the trace is incomplete"

