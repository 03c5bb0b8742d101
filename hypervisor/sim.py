"""A simulation run: the host, VMs and vCPUs of a SimConfig (built by build.py), run by the
scheduler (scheduler.py) on simulated time, and reported as a RunResult (results.py).

`with Simulation(config) as sim: result = sim.run()` frees the run as the block ends
(close()); many runs in one process (a sweep worker) then keep a flat memory use.
"""

from collections.abc import Callable

from .build import boot_vcpus, build_host, build_vm
from .check import CoherenceChecker
from .config import (
    DEFAULT_INSNS_PER_MS,
    DEFAULT_MAX_INSNS,
    DEFAULT_QUANTUM,
    GUEST_IMAGES,
    KSM_FLAGS,
    MAX_VMS,
    MIN_MEMORY,
    KsmConfig,
    KsmKnobs,
    SimConfig,
    host_memory_bytes,
    image_label,
    validate,
)
from .cpu.unicorn_vcpu import UnicornVcpu
from .errors import GuestError, HvsimError, InvariantViolation, Livelock
from .events import NULL_TRACER, Tracer
from .host.frames import FRAME_SLACK
from .kvm.vcpu import FLOATING_BUS, VcpuState
from .kvm.vm import Vm
from .profiles import get_profile
from .races import RaceInjector, RaceSpec
from .results import NOTIFIER_CALLBACKS, RunResult, VmResult
from .scheduler import Scheduler
from .smp import vm_totals
from .types import PAGE_SIZE
from .vmm import loader
from .vmm.devices import LegacyDevices

# Names that moved to config.py, results.py and build.py, still importable from here.
__all__ = ["DEFAULT_INSNS_PER_MS", "DEFAULT_MAX_INSNS", "DEFAULT_QUANTUM", "GUEST_IMAGES", "KSM_FLAGS", "MAX_VMS",
           "MIN_MEMORY", "NOTIFIER_CALLBACKS", "KsmConfig", "KsmKnobs", "RunResult", "SimConfig", "Simulation",
           "VmResult", "host_memory_bytes", "image_label", "validate"]


class Simulation:
    def __init__(self, config: SimConfig, tracer: Tracer = NULL_TRACER, check: bool = False) -> None:
        validate(config)
        self.profile = get_profile(config.profile, config.change_pte)
        image = loader.read_image(config.image)
        loader.check_fits(image, config.memory)
        self.config = config
        self.image = image
        self.checker = CoherenceChecker(tracer) if check else None
        if self.checker is not None:
            tracer = self.checker
        self.tracer = tracer
        self.failure: HvsimError | None = None
        self.livelock: Livelock | None = None
        pages = config.memory // PAGE_SIZE
        host = build_host(self.profile, config.vms * pages + FRAME_SLACK, config.ksm, tracer)
        self.frames, self.vmstat, self.ksm = host.frames, host.vmstat, host.ksm
        self.vms: list[Vm] = []
        # Every vCPU of every VM, VM by VM: the scheduler's round-robin order.  A vCPU's place in
        # this list is its "slot"; vm_of[slot] is its VM's index.
        self.backends: list[UnicornVcpu] = []
        self.vm_of: list[int] = []
        self.devices: list[LegacyDevices] = []  # per VM: the VMM's port bus, COM1 and the exit port
        # Per slot: instructions retired, and simulated time spent in retried faults
        # (kvm.vcpu.FAULT_RETRY_COST each).
        self.insns: list[int] = []
        self.stalls: list[int] = []
        for i in range(config.vms):
            vm = build_vm(host, i, config.memory, mmu=config.mmu, mmu_pages=config.mmu_pages,
                          oos_shadow=config.oos_shadow is not False)
            backends, devices = boot_vcpus(host, vm, image, config.cmdline, config.vms, config.insns_per_ms,
                                           config.vcpus)
            self.backends += backends
            self.vm_of += [i] * len(backends)
            self.devices.append(devices)
            self.vms.append(vm)
        self.insns = [0] * len(self.backends)
        self.stalls = [0] * len(self.backends)
        # Each vCPU thread runs on its own host CPU (ksmd on another), in guest mode from the start.
        for slot, backend in enumerate(self.backends):
            backend.vcpu.vcpu_load(slot)
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
        # Called where a vCPU turn on the host CPU ends (scheduler.py), never where a --quantum chunk ends.
        self.on_slice: list[Callable[[Simulation], None]] = []
        # Display only (the progress line): called after every Unicorn run, wherever it ended, so it
        # must record nothing; unlike on_slice it leaves the scheduler's lone-vCPU fast path on.
        self.on_display: list[Callable[[Simulation], None]] = []

    def __enter__(self) -> "Simulation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Tear the run down so that reference counting frees it at once (no full GC needed).

        The model is a graph of back-pointers (vCPU <-> backend, VM <-> MMU, notifiers on the mm,
        checker and injector -> Simulation); a sweep worker runs many Simulations in one process.
        """
        for backend in self.backends:
            backend.close()
        for vm in self.vms:
            for vcpu in vm.vcpus:
                vcpu.pio = FLOATING_BUS  # the devices' exit port held the vCPU's vmm_exit
        self.devices.clear()
        for vm in self.vms:
            vm.destroy()
            # exit_mmap()'s end of the VMM process: its mm leaves KSM; the traces held the checker.
            vm.mm.ksm = None
            vm.mm.tracer = NULL_TRACER
        if self.ksm is not None:
            self.ksm.tracer = NULL_TRACER
            self.ksm.hooks = None
        self.on_slice.clear()
        self.on_display.clear()
        self.tracer = NULL_TRACER
        self.checker = self.injector = None

    def clock(self) -> int:
        """Simulated time now, in instructions retired, exact inside a time slice too."""
        running = self._running
        return self.now + (running.time_in_slice if running is not None else 0)

    def runnable(self) -> list[int]:
        """The slots (indexes into backends) of the vCPUs that can still run."""
        return [i for i, b in enumerate(self.backends) if b.vcpu.state is VcpuState.RUNNABLE]

    def backend_of(self, vm: int, vcpu: int = 0) -> UnicornVcpu:
        return self.backends[self.vm_of.index(vm) + vcpu]

    def run(self) -> RunResult:
        """Run to the end (or to an interruption); a violated invariant ends the run, reported in the result."""
        try:
            Scheduler(self).run()
            if self.checker is not None:
                self.checker.end_of_run()
        except InvariantViolation as err:
            self.failure = err
        except Livelock as err:
            self.livelock = err
        return self.result()

    def result(self) -> RunResult:
        out = []
        for i, vm in enumerate(self.vms):
            slots = [s for s, v in enumerate(self.vm_of) if v == i]
            vcpu_stats, vm_result = vm_totals(vm, [self.insns[s] for s in slots])
            vcpu = vm_result.vcpu
            exits = {r.name: n for r, n in sorted(vcpu_stats.exit_reasons.items())}
            stats = {**vcpu_stats.as_dict(), **vm.stats.as_dict()}
            calls = {name: vm.mmu.notifier.calls.get(name, 0) for name in NOTIFIER_CALLBACKS}
            error = where = None
            error_kind: type[GuestError] | None = None
            if vcpu.state in (VcpuState.SHUTDOWN, VcpuState.FAILED):
                error, error_kind = vcpu.failure, vcpu.failure_kind or GuestError
                where = self.backends[slots[vcpu.vcpu_id]].describe_rip()
                if len(slots) > 1:
                    where = f"vCPU {vcpu.vcpu_id} {where}"
                if vcpu.state is VcpuState.SHUTDOWN:
                    error = f"TRIPLE_FAULT: {error}"
            work: dict[str, dict[str, int]] = {}
            for (reason, kind), n in sorted(vm_result.exit_work.items()):
                work.setdefault(reason.name, {})[kind] = n
            out.append(VmResult(i, self.image.path, vcpu.state.value, vcpu.exit_status,
                                self.devices[i].console.text(), sum(self.insns[s] for s in slots), exits, stats,
                                calls, error, where, work, error_kind, self.devices[i].console.dropped,
                                vm_result.per_vcpu))
        return RunResult(self.config, self.profile, out, self.now,
                         self.ksm.counters() if self.ksm is not None else None,
                         dict(self.vmstat.counters), self.interrupted,
                         str(self.failure) if self.failure is not None else None,
                         self.checker.checks if self.checker is not None else None,
                         dict(self.injector.fired) if self.injector is not None else None,
                         str(self.livelock) if self.livelock is not None else None, sum(self.stalls))

