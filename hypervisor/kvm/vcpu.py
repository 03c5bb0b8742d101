"""A KVM vCPU: its stats and the exit handlers that vcpu_enter_guest's callers run.

The instruction-level backend (cpu/unicorn_vcpu.py) executes guest code and calls
these handlers on every exit it takes; this module decides what each exit means
(as arch/x86/kvm/vmx.c's kvm_vmx_exit_handlers do, plus the VMM's handling of the
exits KVM passes to userspace: port I/O for the console and the exit port).
"""

from enum import Enum
from typing import TYPE_CHECKING, Protocol

from ..guest.layout import COM1_PORT, EXIT_PORT
from ..types import Gfn
from .exits import ExitReason
from .mmu import FaultResult
from .stats import VcpuStats

if TYPE_CHECKING:
    from .vm import Vm

COM1_LSR_PORT = COM1_PORT + 5
LSR_THR_EMPTY = 0x60  # transmitter idle: a guest that polls before writing may write
# The hypervisor CPUID leaf KVM reports (KVM_CPUID_SIGNATURE): "KVMKVMKVM\0\0\0".
KVM_CPUID_SIGNATURE = 0x40000000
KVM_SIGNATURE_REGS = (0x4B4D564B, 0x564B4D56, 0x0000004D)


class VcpuBackend(Protocol):
    """What KVM needs from the thing that executes guest instructions."""

    def flush_tlb(self) -> None: ...


class VcpuState(Enum):
    RUNNABLE = "runnable"
    HALTED = "halted"  # HLT with interrupts off: the VM is done (status 0)
    EXITED = "exited"  # a byte was written to the exit port
    SHUTDOWN = "shutdown"  # triple fault
    FAILED = "failed"  # an exit the VMM cannot handle (MMIO outside memslots)


class Vcpu:
    def __init__(self, vm: "Vm", vcpu_id: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.stats = VcpuStats()
        self.state = VcpuState.RUNNABLE
        self.exit_status: int | None = None
        self.console = bytearray()
        self.failure: str | None = None
        self.arch: VcpuBackend = _NoBackend()
        # Simulated time stamp (instructions retired in the whole simulation) of the
        # exit being handled; set by the backend so traces can be stamped.
        self.insns = 0

    def _count_exit(self, reason: ExitReason) -> None:
        self.stats.exits += 1
        self.stats.exit_reasons[reason] += 1

    def handle_ept_violation(self, gfn: Gfn, write: bool, rip: int) -> FaultResult:
        """One EPT_VIOLATION exit: run the fault path once; RETRY means the guest faults again."""
        self._count_exit(ExitReason.EPT_VIOLATION)
        trace = self.vm.trace
        if trace is not None:
            trace("kvm_exit", {"vcpu": self.vcpu_id, "reason": "EPT_VIOLATION", "rip": rip,
                               "gpa": gfn << 12, "write": write})
        result = self.vm.mmu.tdp_page_fault(self, gfn, write)
        if result is FaultResult.MMIO:
            self.stats.mmio_exits += 1
        return result

    def handle_io(self, port: int, size: int, value: int, is_out: bool, rip: int) -> int:
        """IO_INSTRUCTION: KVM exits to userspace, where the VMM emulates the device."""
        self._count_exit(ExitReason.IO_INSTRUCTION)
        self.stats.io_exits += 1
        trace = self.vm.trace
        if trace is not None:
            trace("kvm_exit", {"vcpu": self.vcpu_id, "reason": "IO_INSTRUCTION", "rip": rip,
                               "port": port, "out": is_out})
        if is_out:
            if port == COM1_PORT:
                self.console.append(value & 0xFF)
            elif port == EXIT_PORT:
                self.exit_status = value & 0xFF
                self.state = VcpuState.EXITED
            return 0
        if port == COM1_LSR_PORT:
            return LSR_THR_EMPTY
        return (1 << (8 * size)) - 1  # nothing decodes the port: the bus floats high

    def handle_hlt(self, rip: int) -> None:
        """HLT with interrupts disabled can never wake up: the VMM ends the VM with status 0."""
        self._count_exit(ExitReason.HLT)
        self.stats.halt_exits += 1
        if self.vm.trace is not None:
            self.vm.trace("kvm_exit", {"vcpu": self.vcpu_id, "reason": "HLT", "rip": rip})
        self.state = VcpuState.HALTED
        self.exit_status = 0

    def handle_cpuid(self, leaf: int, subleaf: int, rip: int) -> tuple[int, int, int, int] | None:
        """CPUID always exits under VMX; KVM answers from its table.  None: use the CPU's model."""
        self._count_exit(ExitReason.CPUID)
        if self.vm.trace is not None:
            self.vm.trace("kvm_exit", {"vcpu": self.vcpu_id, "reason": "CPUID", "rip": rip, "leaf": leaf})
        if leaf == KVM_CPUID_SIGNATURE:
            ebx, ecx, edx = KVM_SIGNATURE_REGS
            return (KVM_CPUID_SIGNATURE + 1, ebx, ecx, edx)
        return None

    def handle_vmcall(self, rip: int) -> None:
        """VMCALL: a hypercall; hvsim implements none, so it returns -KVM_ENOSYS like KVM."""
        self._count_exit(ExitReason.VMCALL)
        self.stats.hypercalls += 1
        if self.vm.trace is not None:
            self.vm.trace("kvm_exit", {"vcpu": self.vcpu_id, "reason": "VMCALL", "rip": rip})

    def handle_triple_fault(self, why: str, rip: int) -> None:
        self._count_exit(ExitReason.TRIPLE_FAULT)
        if self.vm.trace is not None:
            self.vm.trace("kvm_exit", {"vcpu": self.vcpu_id, "reason": "TRIPLE_FAULT", "rip": rip})
        self.state = VcpuState.SHUTDOWN
        self.failure = why

    def fail(self, why: str) -> None:
        self.state = VcpuState.FAILED
        self.failure = why


class _NoBackend:
    def flush_tlb(self) -> None:
        pass
