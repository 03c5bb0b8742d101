"""A KVM vCPU: its stats and the exit handlers that vcpu_enter_guest's callers run.

The instruction-level backend (cpu/unicorn_vcpu.py) executes guest code and calls
these handlers on every exit it takes; this module decides what each exit means
(as arch/x86/kvm/vmx.c's kvm_vmx_exit_handlers do, plus the VMM's handling of the
exits KVM passes to userspace: port I/O goes to the VMM's port bus, vmm/devices.py).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import TYPE_CHECKING, Any, Final, Protocol

from ..errors import GuestError
from ..events import KvmExit, KvmPageFault
from ..types import PAGE_SHIFT, Gfn
from .cpuid import vcpu_cpuid_entry
from .exits import (
    EPT_VIOLATION_ACC_INSTR,
    EPT_VIOLATION_ACC_READ,
    EPT_VIOLATION_ACC_WRITE,
    EPT_VIOLATION_EXECUTABLE,
    EPT_VIOLATION_READABLE,
    EPT_VIOLATION_WRITABLE,
    ExitReason,
)
from .mmu import TdpMmu
from .mmu_interface import FaultResult, FaultWork
from .requests import VcpuMode, vcpu_service_requests
from .shadow_mmu import ShadowFault, ShadowMmu
from .spte import SPTE_EXECUTABLE, SPTE_READABLE, SPTE_WRITABLE
from .stats import Tally, VcpuStats

if TYPE_CHECKING:
    from .vm import Vm

# A fault that lost the mmu_notifier_retry race returns to the guest, which faults again:
# in KVM that is an exit, an entry and a gfn_to_pfn whose result was dropped.  hvsim charges
# each retried fault this much of the vCPU's simulated time, in instruction-times (2 us at
# the default 100,000 instructions per ms: the order of costs.py's "exit" plus
# "EPT_VIOLATION.retry" cycles), so that ksmd, --max-insns and signals go on while a vCPU
# retries.  Deterministic: a fixed cost per retry.
FAULT_RETRY_COST = 200
# This many retried faults in a row with no instruction retired in between is a livelock
# (a real race resolves in a retry or two; only a host event fired on every fault, such as
# an --inject at after_gfn_to_pfn, keeps it going).
LIVELOCK_RETRIES = 1000


# exit_work's key for an EPT violation, by the fault path's work.  Final (a C static in the compiled
# build), and its values typed Any so that the compiled build hands the key tuple to exit_work as it is: a
# value typed tuple[ExitReason, str] is unpacked into a C struct and packed into a new tuple at every use.
_EPT_WORK: Final[dict[FaultWork, Any]] = {work: (ExitReason.EPT_VIOLATION, work.value) for work in FaultWork}
# Members the exit paths test or set per exit, named once (an Enum member read from its class
# costs about 80 ns on Python 3.11, four times a plain name: EnumType defines __getattr__).
_EPT_VIOLATION: Final = ExitReason.EPT_VIOLATION
_FAULT_MMIO: Final = FaultResult.MMIO
_OUTSIDE_GUEST_MODE: Final = VcpuMode.OUTSIDE_GUEST_MODE
_IN_GUEST_MODE: Final = VcpuMode.IN_GUEST_MODE
_IO_INSTRUCTION: Final = ExitReason.IO_INSTRUCTION
_IO_WORK: Final[Any] = (ExitReason.IO_INSTRUCTION, "userspace")  # exit_work's key for port I/O (Any: as _EPT_WORK)


def ept_exit_qualification(write: bool, fetch: bool, spte: int) -> int:
    """EXIT_QUALIFICATION of an EPT violation: the access, and what the spte allowed (SDM 27-7)."""
    access = EPT_VIOLATION_ACC_WRITE if write else EPT_VIOLATION_ACC_READ
    qual = EPT_VIOLATION_ACC_INSTR if fetch else access
    if spte & SPTE_READABLE:
        qual |= EPT_VIOLATION_READABLE
    if spte & SPTE_WRITABLE:
        qual |= EPT_VIOLATION_WRITABLE
    if spte & SPTE_EXECUTABLE:
        qual |= EPT_VIOLATION_EXECUTABLE
    return qual


class VcpuBackend(Protocol):
    """What KVM needs from the thing that executes guest instructions."""

    def flush_tlb(self) -> None: ...

    @property
    def rip(self) -> int: ...


class PortIoBus(Protocol):
    """The VMM's port I/O bus, where KVM_EXIT_IO accesses go (vmm/devices.py PortBus)."""

    def pio_read(self, port: int, size: int) -> int: ...

    def pio_write(self, port: int, size: int, value: int) -> None: ...


class VcpuState(Enum):
    RUNNABLE = "runnable"
    HALTED = "halted"  # HLT with interrupts off: the VM is done (status 0)
    EXITED = "exited"  # a byte was written to the exit port
    SHUTDOWN = "shutdown"  # triple fault
    FAILED = "failed"  # an exit the VMM cannot handle (MMIO outside memslots)
    STOPPED = "stopped"  # the VMM stopped the VM because a sibling vCPU shut down or failed


_RUNNABLE: Final = VcpuState.RUNNABLE  # tested on every entry (see _EPT_VIOLATION)


class Vcpu:
    def __init__(self, vm: "Vm", vcpu_id: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.stats = VcpuStats()
        self.state = VcpuState.RUNNABLE
        self.exit_status: int | None = None
        # The VMM attaches its port bus (vmm/devices.py); until then nothing decodes any port.
        self.pio: PortIoBus = FLOATING_BUS
        self.failure: str | None = None
        # Which HvsimError the failure is, so that callers classify it by type, never by its text.
        self.failure_kind: type[GuestError] | None = None
        self.arch: VcpuBackend = NO_BACKEND
        # (exit reason, what the host did for it) -> count, priced by --perf-kvm-stat.
        self.exit_work: Tally[tuple[ExitReason, str]] = Tally()
        # kvm/requests.py: pending request bits, vcpu->mode, and the host CPU it last ran on
        # (-1 until the VMM's vCPU thread first enters it: vcpu_load).
        self.requests = 0
        self.mode = VcpuMode.OUTSIDE_GUEST_MODE
        self.cpu = -1

    def vcpu_load(self, cpu: int) -> None:
        """The vCPU's thread runs it on host CPU `cpu` and enters guest mode (hvsim: at the run's start)."""
        self.cpu = cpu
        self.enter_guest()

    def enter_guest(self) -> None:
        """vcpu_enter_guest: serve pending requests, then guest mode (if the vCPU can still run)."""
        if self.requests:  # kvm_request_pending(): nearly every exit has none
            vcpu_service_requests(self)
        if self.state is _RUNNABLE and self.cpu != -1:
            self.mode = _IN_GUEST_MODE

    def _leave_guest(self) -> None:
        self.mode = _OUTSIDE_GUEST_MODE

    def handle_external_interrupt(self) -> None:
        """A host IPI reached the vCPU in guest mode: EXIT_REASON_EXTERNAL_INTERRUPT (irq_exits++,
        vmx.c handle_external_interrupt), then vcpu_enter_guest serves its requests and re-enters."""
        self._leave_guest()
        self._count_exit(ExitReason.EXTERNAL_INTERRUPT)
        self.stats.irq_exits += 1
        self.exit_work[(ExitReason.EXTERNAL_INTERRUPT, "")] += 1
        self._trace_exit(ExitReason.EXTERNAL_INTERRUPT, self.arch.rip)
        self.enter_guest()

    def _count_exit(self, reason: ExitReason) -> None:
        self.stats.exits += 1
        self.stats.exit_reasons[reason] += 1

    def _trace_exit(self, reason: ExitReason, rip: int, info1: int = 0, info2: int = 0) -> None:
        tracer = self.vm.tracer
        if tracer.enabled:
            tracer.event(KvmExit(self.vcpu_id, reason.name, rip, info1, info2))

    def handle_ept_violation(self, gfn: Gfn, write: bool, rip: int, fetch: bool = False) -> FaultResult:
        """One EPT_VIOLATION exit: run the fault path once; RETRY means the guest faults again.

        The exit is priced by the work the fault path says it did (FaultOutcome.work).
        """
        stats = self.stats
        stats.exits += 1  # _count_exit()
        stats.exit_reasons[_EPT_VIOLATION] += 1
        self.mode = _OUTSIDE_GUEST_MODE  # _leave_guest()
        vm = self.vm
        mmu = vm.mmu
        # EPT violations come from the EPT, i.e. the TDP MMU (as #PF exits come to the shadow one, handle_shadow_pf);
        # narrowed, the compiled build calls it directly instead of looking page_fault up on the object.
        assert isinstance(mmu, TdpMmu)
        if vm.tracer.enabled:
            qual = ept_exit_qualification(write, fetch, mmu.spte(gfn))
            self._trace_exit(_EPT_VIOLATION, rip, qual, gfn << PAGE_SHIFT)
            vm.tracer.event(KvmPageFault(self.vcpu_id, gfn << PAGE_SHIFT, qual))
        # This vCPU's thread is in KVM: a flush it raises IPIs the others, not itself.
        vm.running = self
        try:
            outcome = mmu.page_fault(self, gfn, write)
        finally:
            vm.running = None
        self.enter_guest()
        result = outcome.result
        if result is _FAULT_MMIO:
            stats.mmio_exits += 1
        self.exit_work[_EPT_WORK[outcome.work]] += 1
        return result

    # --- shadow paging's exits (kvm/shadow_mmu.py; vmx.c handle_exception, handle_cr, handle_invlpg) ---

    @contextmanager
    def in_kvm(self) -> Iterator[None]:
        """This vCPU's thread is in KVM handling its exit (a flush it raises IPIs the others, not itself);
        on the way back vcpu_enter_guest serves its requests (as handle_ept_violation does)."""
        self._leave_guest()
        self.vm.running = self
        try:
            yield
        finally:
            self.vm.running = None
        self.enter_guest()

    def handle_shadow_pf(self, gva: int, error_code: int, rip: int) -> "ShadowFault":
        """EXCEPTION_NMI with vector 14: FNAME(page_fault) once (kvm_mmu_page_fault)."""
        self._count_exit(ExitReason.EXCEPTION_NMI)
        self._trace_exit(ExitReason.EXCEPTION_NMI, rip, gva, error_code)
        mmu = self.vm.mmu
        assert isinstance(mmu, ShadowMmu)
        with self.in_kvm():
            result = mmu.shadow_page_fault(self, gva, error_code)
        self.exit_work[(ExitReason.EXCEPTION_NMI, result.value)] += 1
        if result is ShadowFault.MMIO:
            self.stats.mmio_exits += 1
        elif result is ShadowFault.EMULATE:
            self.stats.insn_emulation += 1
        return result

    def handle_cr3_load(self, cr3: int, rip: int) -> None:
        """CR_ACCESS (mov to cr3): kvm_set_cr3 switches the shadow root."""
        self._count_exit(ExitReason.CR_ACCESS)
        self.exit_work[(ExitReason.CR_ACCESS, "")] += 1
        self._trace_exit(ExitReason.CR_ACCESS, rip, 3)
        mmu = self.vm.mmu
        assert isinstance(mmu, ShadowMmu)
        with self.in_kvm():
            mmu.kvm_set_cr3(self, cr3)

    def handle_cr3_read(self, rip: int) -> None:
        """CR_ACCESS (mov from cr3): KVM hands the guest its own CR3."""
        self._count_exit(ExitReason.CR_ACCESS)
        self.exit_work[(ExitReason.CR_ACCESS, "")] += 1
        self._trace_exit(ExitReason.CR_ACCESS, rip, 0x13)

    def handle_invlpg(self, gva: int, rip: int) -> None:
        """INVLPG: kvm_mmu_invlpg drops the spte of that gva."""
        self._count_exit(ExitReason.INVLPG)
        self.exit_work[(ExitReason.INVLPG, "")] += 1
        self._trace_exit(ExitReason.INVLPG, rip, gva)
        mmu = self.vm.mmu
        assert isinstance(mmu, ShadowMmu)
        with self.in_kvm():
            mmu.kvm_mmu_invlpg(self, gva)

    def handle_io(self, port: int, size: int, value: int, is_out: bool, rip: int) -> int:
        """IO_INSTRUCTION: KVM exits to userspace, and the VMM's port bus emulates the device (vcpu.pio)."""
        self._count_exit(_IO_INSTRUCTION)
        self.stats.io_exits += 1
        self.exit_work[_IO_WORK] += 1
        if self.vm.tracer.enabled:
            # Exit qualification of an I/O instruction: size - 1, direction, port (SDM 27-5).
            qual = (size - 1) | ((0 if is_out else 1) << 3) | (port << 16)
            self._trace_exit(_IO_INSTRUCTION, rip, qual)
        if is_out:
            self.pio.pio_write(port, size, value)
            return 0
        return self.pio.pio_read(port, size)

    def vmm_exit(self, status: int) -> None:
        """The VMM ends the VM with this exit status (the isa-debug-exit device was written)."""
        self.exit_status = status
        self.state = VcpuState.EXITED
        self._leave_guest()

    def vmm_stop(self) -> None:
        """The VMM stops this vCPU's thread (it ends the VM after another vCPU's shutdown or failure)."""
        self.state = VcpuState.STOPPED
        self._leave_guest()

    def handle_hlt(self, rip: int) -> None:
        """HLT with interrupts disabled can never wake up: the VMM ends the VM with status 0."""
        self._count_exit(ExitReason.HLT)
        self.stats.halt_exits += 1
        self.exit_work[(ExitReason.HLT, "")] += 1
        self._trace_exit(ExitReason.HLT, rip)
        self.state = VcpuState.HALTED
        self.exit_status = 0
        self._leave_guest()

    def handle_cpuid(self, leaf: int, subleaf: int, rip: int) -> tuple[int, int, int, int]:
        """CPUID always exits under VMX; KVM answers from the VMM's fixed table (kvm/cpuid.py)."""
        self._count_exit(ExitReason.CPUID)
        self.exit_work[(ExitReason.CPUID, "")] += 1
        self._trace_exit(ExitReason.CPUID, rip, leaf, subleaf)
        return vcpu_cpuid_entry(leaf & 0xFFFF_FFFF, self.vcpu_id, len(self.vm.vcpus))

    def handle_vmcall(self, rip: int) -> None:
        """VMCALL: a hypercall; hvsim implements none, so it returns -KVM_ENOSYS like KVM."""
        self._count_exit(ExitReason.VMCALL)
        self.stats.hypercalls += 1
        self.exit_work[(ExitReason.VMCALL, "")] += 1
        self._trace_exit(ExitReason.VMCALL, rip)

    def handle_triple_fault(self, why: str, rip: int) -> None:
        self._count_exit(ExitReason.TRIPLE_FAULT)
        self.exit_work[(ExitReason.TRIPLE_FAULT, "")] += 1
        self._trace_exit(ExitReason.TRIPLE_FAULT, rip)
        self.state = VcpuState.SHUTDOWN
        self.failure = why
        self.failure_kind = GuestError
        self._leave_guest()

    def fail(self, why: str, kind: type[GuestError] = GuestError) -> None:
        self.state = VcpuState.FAILED
        self.failure = why
        self.failure_kind = kind
        self._leave_guest()


class _NoBackend:
    rip = 0

    def flush_tlb(self) -> None:
        pass


class _FloatingBus:
    def pio_read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def pio_write(self, port: int, size: int, value: int) -> None:
        pass


# A vCPU without an executor (unit tests, and a vCPU whose backend was closed).
NO_BACKEND: VcpuBackend = _NoBackend()
# A port bus with no device (unit tests, and a vCPU whose VMM is gone).
FLOATING_BUS: PortIoBus = _FloatingBus()
