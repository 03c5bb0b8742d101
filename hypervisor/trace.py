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


_FORMATS: dict[str, Callable[[dict[str, Any]], str]] = {
    "kvm_exit": lambda f: (f"vcpu {f['vcpu']} reason {f['reason']} rip {f['rip']:#x} info1 {f['info1']:#018x} "
                           f"info2 {f['info2']:#018x}" + (f" insn \"{f['insn']}\"" if "insn" in f else "")),
    "kvm_page_fault": lambda f: f"address {f['address']:x} error_code {f['error_code']:x}",
    "kvm_mmu_set_spte": lambda f: f"gfn {f['gfn']:x} spte {f['spte']:x} ({_perms(f['spte'])}) level {f['level']}",
    "kvm_set_spte_hva": lambda f: (f"hva {f['hva']:#x} (pfn {f['pfn']:#x}, "
                                   f"{'spte updated' if f['changed'] else 'no spte'})"),
    "kvm_unmap_hva_range": lambda f: (f"mmu notifier unmap range: {f['start']:#018x} -- {f['end']:#018x} "
                                      f"({f['zapped']} zapped)"),
    # hvsim's events for KVM_REQ_TLB_FLUSH: the remote flush call, and one vCPU serving it.
    "kvm_flush_remote_tlbs": lambda f: f"ipi {int(f['ipi'])} kicks {f['kicks']}",
    "kvm_tlb_flush": lambda f: f"vcpu {f['vcpu']}",
    "kvm_age_hva": lambda f: f"mmu notifier age hva: {f['hva']:#018x} young {int(f['young'])}",
    "ksm_start_scan": lambda f: f"seq {f['seq']} rmap_items {f['rmap_items']}",
    "ksm_stop_scan": lambda f: f"seq {f['seq']} rmap_items {f['rmap_items']}",
    "ksm_merge_one_page": lambda f: f"ksm pfn {f['ksm_pfn']:#x} mm {f['mm']} hva {f['hva']:#x} pfn {f['pfn']:#x}",
    "ksm_merge_with_ksm_page": lambda f: (f"ksm pfn {f['ksm_pfn']:#x} mm {f['mm']} hva {f['hva']:#x} "
                                          f"pfn {f['pfn']:#x}"),
    "ksm_remove_ksm_page": lambda f: f"pfn {f['pfn']:#x}",
    "cow_ksm": lambda f: f"hva {f['hva']:#x} ksm pfn {f['ksm_pfn']:#x} new pfn {f['pfn']:#x}",
}


FORMATTED_EVENTS = tuple(_FORMATS)


def format_fields(event: str, fields: dict[str, Any]) -> str:
    fmt = _FORMATS.get(event)
    if fmt is not None:
        return fmt(fields)
    if event.startswith("mmu_notifier_"):
        return f"vm{fields['vm']} {fields['start']:#x} -- {fields['end']:#x}"
    return " ".join(f"{k} {v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}"
                    for k, v in fields.items() if k != "vm")


class TraceWriter:
    """A trace consumer: pass `writer.event` as a Simulation's trace, then `bind` the simulation.

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
                self._json({"name": "thread_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": "vcpu0"}})
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

    def event(self, event: str, fields: dict[str, Any]) -> None:
        if self.error is not None or not self.wants(event):
            return
        sim = self.sim
        if sim is None:
            return  # before the run starts (the loader): not traced
        insns = sim.clock()
        kind, who = sim.context
        vm = fields.get("vm", who if kind == "vcpu" else None)
        if event == "kvm_exit" and vm is not None:
            fields = {**fields, "insn": self._insn(vm, int(fields.get("vcpu", 0)), int(fields["rip"]))}
        self.written += 1
        if self.json:
            ts = insns * 1000.0 / sim.config.insns_per_ms
            pid = self._pid(None if kind == "ksmd" else vm)
            record: dict[str, Any] = {"name": event, "cat": _cat(event), "ts": ts, "pid": pid, "tid": 0,
                                      "args": {k: v for k, v in fields.items() if k != "vm"}}
            if event == "ksm_start_scan":
                record.update(name="ksmd scan", ph="B")
            elif event == "ksm_stop_scan":
                record.update(name="ksmd scan", ph="E")
            else:
                record.update(ph="i", s="t")
            if self.flows is not None:
                self.flows.before(sim, event, fields, record)
            self._json(record)
            if self.flows is not None:
                self.flows.after(sim, event, fields, record)
            return
        seconds = insns / sim.config.insns_per_ms / 1000.0
        comm = "ksmd" if kind == "ksmd" else f"qemu-vm{vm}"
        pid = KSMD_PID if kind == "ksmd" else VMM_PID_BASE + (vm or 0)
        task = f"{comm}-{pid}"
        self._write(f"{task:>16}  [000] {seconds:15.9f}: {event}: {format_fields(event, fields)}\n")

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

