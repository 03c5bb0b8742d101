"""The deterministic scheduler: builds the host, the VMs and their vCPUs, and runs them on simulated time.

Simulated time is instructions retired, summed over all vCPUs, as if they shared
one host CPU round-robin: each runnable vCPU runs for `quantum` instructions in
turn, and ksmd wakes whenever `sleep_millisecs` of simulated time (at
`insns_per_ms` instructions per millisecond) has passed since its last wake-up;
with sleep_millisecs=0 it runs between every two guest time slices.  ksmd's own
work takes no simulated time.  Same inputs -> same counts, byte for byte.
"""

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .check import CoherenceChecker
from .cpu.unicorn_vcpu import UnicornVcpu
from .errors import ConfigError, GuestError, GuestTimeout, HvsimError, InvariantViolation, Livelock
from .host.frames import FRAME_SLACK, FramePool
from .host.ksm import Ksm
from .host.mm import MADV_MERGEABLE, HostMm, Vmstat
from .host.mmu_notifier import NotifierEventSink
from .kvm.vcpu import VcpuState
from .kvm.vm import GUEST_RAM_HVA, Vm
from .profiles import Profile, check_ksm_knobs, get_profile
from .races import RaceInjector, RaceSpec
from .sizes import format_size
from .types import PAGE_SIZE, Hva
from .vmm import layout, loader
from .vmm.devices import LegacyDevices, legacy_devices

DEFAULT_QUANTUM = 10_000
DEFAULT_INSNS_PER_MS = 100_000  # a 100-MIPS CPU: about what Unicorn runs at, so 1 ms ~ 1 ms of wall time
DEFAULT_MAX_INSNS = 1_000_000_000
MIN_MEMORY = layout.HEAP_START_GPA
MAX_VMS = 256
# Host-side bookkeeping per guest page beyond its frame (ptes, sptes, rmap_items, page flags).
_BYTES_PER_PAGE_OVERHEAD = 64

# The bundled guests ship inside the package (package data); ./guest_images in a checkout links here.
GUEST_IMAGES = Path(__file__).resolve().parent / "guest_images"


def image_label(path: str) -> str:
    """How reports name an image: a bundled guest by its file name, any other by the path given."""
    p = Path(path)
    return p.name if p.parent.resolve() == GUEST_IMAGES else path


@dataclass(frozen=True)
class KsmConfig:
    enabled: bool = False
    run: int = 1
    pages_to_scan: int = 100
    sleep_millisecs: int = 20
    # None: the kernel's default (256 where the knob exists, 4.13+; smart_scan on from 6.7)
    max_page_sharing: int | None = None
    use_zero_pages: bool = False
    smart_scan: bool | None = None
    # (simulated ms, value): write /sys/kernel/mm/ksm/run at that time
    run_at: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class SimConfig:
    image: str
    memory: int = 64 << 20
    cmdline: str = ""
    vms: int = 1
    max_insns: int = DEFAULT_MAX_INSNS
    profile: str = "2.6.32"  # the kernel version modelled (--kernel; --profile is its old name)
    change_pte: bool = True
    ksm: KsmConfig = field(default_factory=KsmConfig)
    quantum: int = DEFAULT_QUANTUM
    insns_per_ms: int = DEFAULT_INSNS_PER_MS
    # hypervisor/races.py specs: host events fired at named points (POINT:EVENT[@N])
    inject: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"inject": list(self.inject),
            "image": self.image, "memory": self.memory, "cmdline": self.cmdline, "vms": self.vms,
            "max_insns": self.max_insns, "profile": self.profile, "change_pte": self.change_pte,
            "quantum": self.quantum, "insns_per_ms": self.insns_per_ms,
            "ksm": {"enabled": self.ksm.enabled, "run": self.ksm.run, "pages_to_scan": self.ksm.pages_to_scan,
                    "sleep_millisecs": self.ksm.sleep_millisecs, "max_page_sharing": self.ksm.max_page_sharing,
                    "use_zero_pages": self.ksm.use_zero_pages, "smart_scan": self.ksm.smart_scan,
                    "run_at": [list(x) for x in self.ksm.run_at]},
        }


@dataclass
class VmResult:
    id: int
    image: str
    state: str
    exit_status: int | None
    console: str
    insns: int
    exits: dict[str, int]
    stats: dict[str, int]
    notifier_calls: dict[str, int]
    error: str | None = None
    where: str | None = None
    # exit reason -> what the host did for it -> count (for perf-kvm-stat's cost model)
    exit_work: dict[str, dict[str, int]] = field(default_factory=dict)
    # the HvsimError class of `error` (GuestTimeout for --max-insns): exit codes come from it, not from the text
    error_kind: type[GuestError] | None = None
    # console bytes dropped between the kept head and tail (vmm/console.py)
    console_dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "image": self.image, "state": self.state, "exit_status": self.exit_status,
            "console": self.console, "insns": self.insns, "exits": self.exits, "stats": self.stats,
            "notifier_calls": self.notifier_calls, "exit_work": self.exit_work,
        }
        if self.console_dropped:
            d["console_dropped"] = self.console_dropped
        if self.error is not None:
            d["error"] = self.error
            d["where"] = self.where
            d["error_type"] = self.error_kind.__name__ if self.error_kind is not None else None
        return d


@dataclass
class RunResult:
    config: SimConfig
    profile: Profile
    vms: list[VmResult]
    sim_insns: int
    ksm: dict[str, int] | None
    vmstat: dict[str, int]
    interrupted: bool = False
    # --check: the violated invariant that ended the run, and how many checks passed
    violation: str | None = None
    checks: int | None = None
    injected: dict[str, int] | None = None
    # a vCPU livelocked in fault retries: the diagnosis that ended the run
    livelock: str | None = None
    # the part of sim_insns that was retried faults' cost (kvm.vcpu.FAULT_RETRY_COST each)
    retry_insns: int = 0

    @property
    def errors(self) -> list[str]:
        out = [f"vm{v.id}: {v.error}" for v in self.vms if v.error is not None]
        if self.violation is not None:
            out.append(self.violation)
        return out

    def totals(self) -> dict[str, dict[str, int]]:
        exits: Counter[str] = Counter()
        stats: Counter[str] = Counter()
        calls: Counter[str] = Counter()
        for v in self.vms:
            exits.update(v.exits)
            stats.update(v.stats)
            calls.update(v.notifier_calls)
        return {"exits": dict(exits), "stats": dict(stats), "notifier_calls": dict(calls)}

    @property
    def ksmd_completed_full_scan(self) -> bool | None:
        """Did ksmd get over all mergeable memory at least once (None: KSM off)?  KSM merges
        nothing before its second scan, so without one the KSM counters show no merging."""
        return None if self.ksm is None else self.ksm.get("full_scans", 0) > 0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "hvsim_version": __version__,
            "config": self.config.as_dict(),
            "profile": {"name": self.profile.name, "kernel": self.profile.version, "summary": self.profile.summary},
            "sim_time": {"insns": self.sim_insns, "ms": self.sim_insns / self.config.insns_per_ms,
                         **({"retry_insns": self.retry_insns} if self.retry_insns else {})},
            "vms": [v.as_dict() for v in self.vms],
            "totals": self.totals(),
            "vmstat": self.vmstat,
        }
        if self.ksm is not None:
            d["ksm"] = self.ksm
            d["ksmd_completed_full_scan"] = self.ksmd_completed_full_scan
        if self.interrupted:
            d["interrupted"] = True
        if self.checks is not None:
            d["check"] = {"checks_passed": self.checks, "violation": self.violation}
        if self.injected is not None:
            d["injected"] = self.injected
        if self.livelock is not None:
            d["livelock"] = self.livelock
        return d


NOTIFIER_CALLBACKS = ("change_pte", "invalidate_page", "invalidate_range_start", "invalidate_range_end",
                      "clear_flush_young", "release")


# The command-line flag of each KSM knob, for messages.
KSM_FLAGS = {"run": "--ksm-run", "run_at": "--ksm-run-at", "pages_to_scan": "--ksm-pages-to-scan",
             "sleep_millisecs": "--ksm-sleep-ms", "max_page_sharing": "--ksm-max-page-sharing",
             "use_zero_pages": "--ksm-use-zero-pages", "smart_scan": "--ksm-smart-scan"}


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 << 30


def validate(config: SimConfig) -> None:
    memory = format_size(config.memory)
    if config.memory <= 0 or config.memory % PAGE_SIZE:
        raise ConfigError(f"--memory {memory} is not a positive multiple of {PAGE_SIZE} bytes.")
    if config.memory < MIN_MEMORY:
        raise ConfigError(f"--memory {memory} is too small: guests need at least "
                          f"{MIN_MEMORY >> 20} MiB (boot area and image below {MIN_MEMORY:#x}).")
    if config.memory > layout.IDENTITY_MAP_SIZE:
        raise ConfigError(f"--memory {memory} is larger than the 1 GiB the boot page tables map; "
                          "give at most 1G.")
    loader.cmdline_bytes(config.cmdline)
    if not 1 <= config.vms <= MAX_VMS:
        raise ConfigError(f"--vms {config.vms}: give between 1 and {MAX_VMS} VMs.")
    if config.max_insns <= 0:
        raise ConfigError("--max-insns must be a positive number of instructions.")
    if config.quantum <= 0:
        raise ConfigError(f"--quantum {config.quantum}: a time slice is a positive number of instructions.")
    if config.insns_per_ms <= 0:
        raise ConfigError(f"--insns-per-ms {config.insns_per_ms}: give a positive simulated CPU speed.")
    k = config.ksm
    runs = "takes 0 (stop), 1 (run) or 2 (stop and unmerge everything)"
    if k.run not in (0, 1, 2):
        raise ConfigError(f"--ksm-run {k.run}: /sys/kernel/mm/ksm/run {runs}.")
    for ms, value in k.run_at:
        if value not in (0, 1, 2):
            raise ConfigError(f"--ksm-run-at {ms}:{value}: /sys/kernel/mm/ksm/run {runs}.")
    if k.pages_to_scan <= 0:
        raise ConfigError(f"--ksm-pages-to-scan {k.pages_to_scan}: give at least 1 page per ksmd wake-up.")
    if k.sleep_millisecs < 0:
        raise ConfigError(f"--ksm-sleep-ms {k.sleep_millisecs}: give 0 or more milliseconds.")
    # mm/ksm.c max_page_sharing_store() (read in a 6.x tree) returns -EINVAL below 2 likewise.
    if k.max_page_sharing is not None and k.max_page_sharing < 2:
        raise ConfigError(f"--ksm-max-page-sharing {k.max_page_sharing}: give at least 2 (sharing needs two "
                          "mappings; the kernel refuses less too).")
    for spec in config.inject:
        RaceSpec.parse(spec)
    if not k.enabled:
        default = KsmConfig()
        changed = [flag for name, flag in KSM_FLAGS.items() if getattr(k, name) != getattr(default, name)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} given without --ksm: add --ksm to turn KSM on.")
    check_ksm_knobs(get_profile(config.profile, config.change_pte), k.max_page_sharing, k.use_zero_pages,
                    k.smart_scan)
    need = config.vms * config.memory * (PAGE_SIZE + _BYTES_PER_PAGE_OVERHEAD) // PAGE_SIZE
    have = host_memory_bytes()
    if need > have * 3 // 4:
        raise ConfigError(f"{config.vms} VMs of {config.memory >> 20} MiB need about {need >> 20} MiB of "
                          f"host memory if every page is touched; this machine has {have >> 20} MiB. "
                          "Give fewer or smaller VMs.")


def events_of_vm(trace: Callable[[str, dict[str, Any]], None], vm_id: int) -> Callable[[str, dict[str, Any]], None]:
    def emit(event: str, fields: dict[str, Any]) -> None:
        trace(event, {"vm": vm_id, **fields})

    return emit


def notifier_events_to(trace: Callable[[str, dict[str, Any]], None], vm_id: int) -> NotifierEventSink:
    def sink(callback: str, mm: HostMm, start: Hva, end: Hva) -> None:
        trace(f"mmu_notifier_{callback}", {"vm": vm_id, "start": start, "end": end})

    return sink


class Simulation:
    def __init__(self, config: SimConfig, trace: Callable[[str, dict[str, Any]], None] | None = None,
                 check: bool = False) -> None:
        validate(config)
        self.profile = get_profile(config.profile, config.change_pte)
        image = loader.read_image(config.image)
        loader.check_fits(image, config.memory)
        self.config = config
        self.image = image
        self.checker = CoherenceChecker(trace) if check else None
        if self.checker is not None:
            trace = self.checker.trace
        self.trace = trace
        self.failure: HvsimError | None = None
        self.livelock: Livelock | None = None
        pages = config.memory // PAGE_SIZE
        self.frames = FramePool(config.vms * pages + FRAME_SLACK)
        self.vmstat = Vmstat()
        self.ksm: Ksm | None = None
        if config.ksm.enabled:
            ksm = Ksm(self.frames, self.profile)
            ksm.pages_to_scan = config.ksm.pages_to_scan
            ksm.sleep_millisecs = config.ksm.sleep_millisecs
            if config.ksm.max_page_sharing is not None:
                ksm.max_page_sharing = config.ksm.max_page_sharing
            ksm.use_zero_pages = config.ksm.use_zero_pages
            if config.ksm.smart_scan is not None:
                ksm.smart_scan = config.ksm.smart_scan
            if trace is not None:
                ksm.trace = trace
            self.ksm = ksm
        self.vms: list[Vm] = []
        self.backends: list[UnicornVcpu] = []
        self.devices: list[LegacyDevices] = []  # per VM: the VMM's port bus, COM1 and the exit port
        self.insns: list[int] = []
        # Per VM: simulated time spent in retried faults (kvm.vcpu.FAULT_RETRY_COST each).
        self.stalls: list[int] = []
        for i in range(config.vms):
            mm = HostMm(self.frames, self.profile, self.vmstat, f"vm{i}", self.ksm)
            vm_trace = None
            if trace is not None:
                mm.notifier_event_sink = notifier_events_to(trace, i)
                vm_trace = mm.trace = events_of_vm(trace, i)
            vm = Vm(i, mm, self.profile, config.memory, vm_trace)
            boot = loader.load(vm, image, config.cmdline, config.vms)
            if self.ksm is not None:
                # The VMM marks guest RAM mergeable, as QEMU does with -machine mem-merge=on.
                mm.madvise(GUEST_RAM_HVA, config.memory, MADV_MERGEABLE)
            vcpu = vm.create_vcpu()
            devices = legacy_devices(vcpu.vmm_exit)
            vcpu.pio = devices.bus
            self.devices.append(devices)
            self.backends.append(UnicornVcpu(vcpu, self.frames, boot, config.insns_per_ms))
            self.vms.append(vm)
            self.insns.append(0)
            self.stalls.append(0)
        if self.checker is not None:
            self.checker.attach(self)
        self.injector = RaceInjector(self, [RaceSpec.parse(t) for t in config.inject]) if config.inject else None
        if self.ksm is not None:
            self.ksm.set_run(config.ksm.run)
        self.now = 0
        # Who runs now, for trace attribution: ("vcpu", vm index) or ("ksmd", 0).
        self.context: tuple[str, int] = ("vmm", 0)
        self._running: UnicornVcpu | None = None
        self.interrupted = False
        self.on_slice: list[Callable[[Simulation], None]] = []

    def clock(self) -> int:
        """Simulated time now, in instructions retired, exact inside a time slice too."""
        running = self._running
        return self.now + (running.time_in_slice if running is not None else 0)

    def runnable(self) -> list[int]:
        return [i for i, vm in enumerate(self.vms) if vm.vcpus[0].state is VcpuState.RUNNABLE]

    def run(self) -> RunResult:
        """Run to the end (or to an interruption); a violated invariant ends the run, reported in the result."""
        try:
            self._run()
        except InvariantViolation as err:
            self.failure = err
        except Livelock as err:
            self.livelock = err
        return self.result()

    def _run(self) -> None:
        cfg = self.config
        ksm = self.ksm
        ksm_period = cfg.ksm.sleep_millisecs * cfg.insns_per_ms
        next_ksm = ksm_period
        run_at = sorted(cfg.ksm.run_at)
        while ksm is not None and run_at and run_at[0][0] == 0:
            ksm.set_run(run_at.pop(0)[1])  # due before the first instruction
        while not self.interrupted:
            order = self.runnable()
            if not order:
                break
            for i in order:
                vcpu = self.vms[i].vcpus[0]
                # Retried faults count against --max-insns at their cost: a livelocked vCPU runs out too.
                budget = min(cfg.quantum, cfg.max_insns - self.insns[i] - self.stalls[i])
                if budget <= 0:
                    vcpu.fail(f"still running after --max-insns {cfg.max_insns} instructions", GuestTimeout)
                    continue
                if ksm is not None:
                    # A slice ends where ksmd is due (or `run` is written), so that ksmd runs at
                    # its simulated time and not wherever a quantum happens to end.
                    if ksm_period:
                        budget = min(budget, next_ksm - self.now)
                    if run_at:
                        budget = min(budget, run_at[0][0] * cfg.insns_per_ms - self.now)
                backend = self.backends[i]
                self.context, self._running = ("vcpu", i), backend
                try:
                    backend.run(budget)
                finally:
                    # A slice that ended in an error (livelock, violated invariant) still took its time.
                    self._running = None
                    self.insns[i] += backend.slice_retired
                    self.stalls[i] += backend.stall_in_slice
                    self.now += backend.slice_retired + backend.stall_in_slice
                if ksm is not None:
                    self.context = ("ksmd", 0)
                    while run_at and run_at[0][0] * cfg.insns_per_ms <= self.now:
                        ksm.set_run(run_at.pop(0)[1])
                    if ksm_period == 0:
                        ksm.ksmd_wakeup()
                    else:
                        while next_ksm <= self.now:
                            ksm.ksmd_wakeup()
                            next_ksm += ksm_period
                self.context = ("vmm", 0)
                if self.checker is not None:
                    self.checker.end_of_slice()
                for hook in self.on_slice:
                    hook(self)
                if self.interrupted:
                    break

    def result(self) -> RunResult:
        out = []
        for i, vm in enumerate(self.vms):
            vcpu = vm.vcpus[0]
            exits = {r.name: n for r, n in sorted(vcpu.stats.exit_reasons.items())}
            stats = {**vcpu.stats.as_dict(), **vm.stats.as_dict()}
            calls = {name: vm.mmu.notifier.calls.get(name, 0) for name in NOTIFIER_CALLBACKS}
            error = where = None
            error_kind: type[GuestError] | None = None
            if vcpu.state in (VcpuState.SHUTDOWN, VcpuState.FAILED):
                error, error_kind = vcpu.failure, vcpu.failure_kind or GuestError
                where = self.backends[i].describe_rip()
                if vcpu.state is VcpuState.SHUTDOWN:
                    error = f"TRIPLE_FAULT: {error}"
            work: dict[str, dict[str, int]] = {}
            for (reason, kind), n in sorted(vcpu.exit_work.items()):
                work.setdefault(reason.name, {})[kind] = n
            out.append(VmResult(i, self.image.path, vcpu.state.value, vcpu.exit_status,
                                self.devices[i].console.text(), self.insns[i], exits, stats, calls,
                                error, where, work, error_kind, self.devices[i].console.dropped))
        return RunResult(self.config, self.profile, out, self.now,
                         self.ksm.counters() if self.ksm is not None else None,
                         dict(self.vmstat.counters), self.interrupted,
                         str(self.failure) if self.failure is not None else None,
                         self.checker.checks if self.checker is not None else None,
                         dict(self.injector.fired) if self.injector is not None else None,
                         str(self.livelock) if self.livelock is not None else None, sum(self.stalls))

