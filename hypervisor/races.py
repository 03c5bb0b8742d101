"""Injected races: host events fired, deterministically, at named points of KVM's fault path and of ksmd.

The kernel's mmu_notifier_seq/mmu_notifier_count retry exists because the host can
change a pte while a KVM fault is between resolving the pfn (gfn_to_pfn) and
installing the spte.  A spec `POINT:EVENT[@N]` fires EVENT on the page involved the
N-th time (default: first; `@all`: every time) execution reaches POINT.

Points:
  after_gfn_to_pfn         KVM fault path: the pfn is pinned, mmu_lock not yet taken
  ksm_before_replace_page  ksmd: the page is write-protected, not yet replaced
  ksm_after_replace_page   ksmd: the pte now maps the KSM page
  kvm_flush_remote_tlbs    KVM: a remote TLB flush (only with lost_flush)
Events:
  cow               the VMM writes the page (a host write fault: do_wp_page if read-only)
  invalidate_range  MADV_DONTNEED of the page (zap_page_range in invalidate_range_start/end)
  age               one page-reclaim aging step (ptep_clear_flush_young_notify)
  ksm_scan          one ksmd wake-up (pages_to_scan pages); only at after_gfn_to_pfn
  lost_flush        the flush's requests are served without flushing any TLB (a deliberate
                    bug, for --check to catch); only at kvm_flush_remote_tlbs
"""

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError
from .host.mm import MADV_DONTNEED, HostMm
from .kvm.mmu_interface import FaultHooks, KvmMmu
from .types import PAGE_SIZE, Gfn, Hva

if TYPE_CHECKING:
    from .sim import Simulation

FAULT_POINTS = ("after_gfn_to_pfn",)
KSM_POINTS = ("ksm_before_replace_page", "ksm_after_replace_page")
FLUSH_POINTS = ("kvm_flush_remote_tlbs",)
EVENTS = ("cow", "invalidate_range", "age", "ksm_scan", "lost_flush")


@dataclass(frozen=True)
class RaceSpec:
    point: str
    event: str
    nth: int | None  # None: every time

    @classmethod
    def parse(cls, text: str) -> "RaceSpec":
        try:
            where, _, when = text.partition("@")
            point, event = where.split(":")
            nth = None if when == "all" else int(when or "1")
        except ValueError:
            raise ConfigError(f"--inject {text!r}: write POINT:EVENT[@N|@all], e.g. after_gfn_to_pfn:cow@3.") from None
        if point not in FAULT_POINTS + KSM_POINTS + FLUSH_POINTS:
            raise ConfigError(f"--inject {text!r}: unknown point {point!r}; points: "
                              f"{', '.join(FAULT_POINTS + KSM_POINTS + FLUSH_POINTS)}.")
        if event not in EVENTS:
            raise ConfigError(f"--inject {text!r}: unknown event {event!r}; events: {', '.join(EVENTS)}.")
        if (event == "lost_flush") != (point in FLUSH_POINTS):
            raise ConfigError(f"--inject {text!r}: lost_flush is the one event at kvm_flush_remote_tlbs, "
                              "and it happens nowhere else.")
        if event == "ksm_scan" and point in KSM_POINTS:
            raise ConfigError(f"--inject {text!r}: ksmd cannot be woken from inside ksmd.")
        if nth is not None and nth < 1:
            raise ConfigError(f"--inject {text!r}: N counts from 1.")
        return cls(point, event, nth)

    def __str__(self) -> str:
        return f"{self.point}:{self.event}@{'all' if self.nth is None else self.nth}"


class RaceInjector(FaultHooks):
    """The fault path's hooks (kvm/mmu_interface.FaultPathHooks) and ksmd's (host/ksm_items.KsmHooks)."""

    def __init__(self, sim: "Simulation", specs: list[RaceSpec]) -> None:
        self.sim = sim
        self.specs = specs
        self.arrivals: Counter[str] = Counter()
        self.fired: Counter[str] = Counter()
        if any(s.point in KSM_POINTS for s in specs) and sim.ksm is None:
            raise ConfigError("--inject at a ksm_* point needs --ksm.")
        for vm in sim.vms:
            vm.mmu.hooks = self
            if any(s.point in FLUSH_POINTS for s in specs):
                vm.flush_lost = self._at_flush
        if sim.ksm is not None:
            sim.ksm.hooks = self

    def after_gfn_to_pfn(self, mmu: KvmMmu, gfn: Gfn, hva: Hva) -> None:
        self._arrive("after_gfn_to_pfn", mmu.mm, hva)

    def _at_flush(self) -> bool:
        """kvm_flush_remote_tlbs: true if a lost_flush spec fires at this arrival."""
        self.arrivals["kvm_flush_remote_tlbs"] += 1
        n = self.arrivals["kvm_flush_remote_tlbs"]
        lost = False
        for spec in self.specs:
            if spec.point == "kvm_flush_remote_tlbs" and (spec.nth is None or spec.nth == n):
                self.fired[str(spec)] += 1
                lost = True
        return lost

    def ksm_before_replace_page(self, mm: HostMm, hva: Hva) -> None:
        self._arrive("ksm_before_replace_page", mm, hva)

    def ksm_after_replace_page(self, mm: HostMm, hva: Hva) -> None:
        self._arrive("ksm_after_replace_page", mm, hva)

    def _arrive(self, point: str, mm: HostMm, hva: Hva) -> None:
        # The event runs on another host CPU than the faulting vCPU's thread: its flushes IPI it.
        running = [(vm, vm.running) for vm in self.sim.vms]
        for vm, _ in running:
            vm.running = None
        try:
            self._arrive_here(point, mm, hva)
        finally:
            for vm, vcpu in running:
                vm.running = vcpu

    def _arrive_here(self, point: str, mm: HostMm, hva: Hva) -> None:
        self.arrivals[point] += 1
        n = self.arrivals[point]
        for spec in self.specs:
            if spec.point == point and (spec.nth is None or spec.nth == n):
                self.fired[str(spec)] += 1
                self._fire(spec.event, mm, hva)

    def _fire(self, event: str, mm: HostMm, hva: Hva) -> None:
        if event == "cow":
            mm.handle_mm_fault(hva, write=True)
        elif event == "invalidate_range":
            mm.madvise(hva, PAGE_SIZE, MADV_DONTNEED)
        elif event == "age":
            mm.page_referenced(hva)
        elif event == "ksm_scan" and self.sim.ksm is not None:
            self.sim.ksm.ksm_do_scan(self.sim.ksm.pages_to_scan)
