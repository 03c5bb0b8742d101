"""Exit dispatch: the Unicorn instruction and interrupt hooks that turn guest instructions into KVM exits.

Port I/O, CPUID and VMCALL become the exits of kvm/vcpu.py (which hands port I/O on to
the VMM's port bus); SYSCALL, an invalid opcode and a CPU exception become a pending
guest exception, delivered by the vCPU at the end of the slice (cpu/exceptions.py).
Unicorn reports several of these as UC_ERR_EXCEPTION too, so each is caught by its
own hook (DESIGN.md, "The Unicorn pattern that scales").
"""

from typing import Final

from mypy_extensions import trait
from unicorn import UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, Uc
from unicorn import x86_const as x86

from ..kvm.vcpu import Vcpu, VcpuState
from .binding import Severable, add_out_hook
from .exceptions import EXCEPTION_NAMES, PendingException

_VMCALL = b"\x0f\x01\xc1"
_RUNNABLE: Final = VcpuState.RUNNABLE  # tested after every OUT (an Enum member through its class costs more)
_KVM_ENOSYS = (-1000) & 0xFFFF_FFFF_FFFF_FFFF
UD_VECTOR = 6


@trait
class ExitDispatch:
    """The exit hooks of UnicornVcpu (a mixin: the vCPU provides the state and the stop/peek primitives)."""

    uc: Uc
    vcpu: Vcpu
    __deletable__ = ("uc", "_out_cb")  # UnicornVcpu.close()
    _pending: PendingException | None
    _out_cb: object  # the raw OUT callback (binding.add_out_hook), dropped with the Uc

    def _stop_now(self, note: str | None = None, after: bool = False) -> None:
        raise NotImplementedError

    def peek_code(self, gva: int, length: int) -> bytes:
        raise NotImplementedError

    def _add_exit_hooks(self, uc: Uc) -> list[Severable]:
        """Registers the hooks; returns those that go through the binding's wrappers, for the vCPU to sever
        when it closes (binding.Severable: the compiled build's native vCPU takes no weak references)."""
        # OUT is the exit nearly every guest takes most (its console bytes): registered raw, one Python layer.
        self._out_cb = add_out_hook(uc, self._out)
        hooks = [Severable(m) for m in (self._in, self._cpuid, self._syscall, self._invalid_insn, self._interrupt)]
        in_, cpuid, syscall, invalid_insn, interrupt = hooks
        uc.hook_add(UC_HOOK_INSN, in_, None, 1, 0, x86.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, cpuid, None, 1, 0, x86.UC_X86_INS_CPUID)
        uc.hook_add(UC_HOOK_INSN, syscall, None, 1, 0, x86.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN_INVALID, invalid_insn)
        uc.hook_add(UC_HOOK_INTR, interrupt)
        return hooks

    def _rip_for_trace(self) -> int:
        if not self.vcpu.vm.tracer.enabled:
            return 0
        return int(self.uc.reg_read(x86.UC_X86_REG_RIP))

    def _out(self, port: int, size: int, value: int) -> None:
        self.vcpu.handle_io(port, size, value, True, self._rip_for_trace())
        if self.vcpu.state is not _RUNNABLE:
            self._stop_now(after=True)

    def _in(self, uc: Uc, port: int, size: int, _ud: object) -> int:
        return self.vcpu.handle_io(port, size, 0, False, self._rip_for_trace())

    def _cpuid(self, uc: Uc, _ud: object) -> int:
        leaf = uc.reg_read(x86.UC_X86_REG_EAX)
        subleaf = uc.reg_read(x86.UC_X86_REG_ECX)
        regs = self.vcpu.handle_cpuid(leaf, subleaf, self._rip_for_trace())
        for reg, value in zip((x86.UC_X86_REG_EAX, x86.UC_X86_REG_EBX, x86.UC_X86_REG_ECX, x86.UC_X86_REG_EDX),
                              regs, strict=True):
            uc.reg_write(reg, value)
        return 1

    def _syscall(self, uc: Uc, _ud: object) -> None:
        # EFER.SCE is clear in the boot state: SYSCALL raises #UD.
        rip = int(uc.reg_read(x86.UC_X86_REG_RIP))
        self._pending = PendingException(UD_VECTOR, 0, rip, "#UD syscall with EFER.SCE clear")
        self._stop_now()

    def _invalid_insn(self, uc: Uc, _ud: object) -> bool:
        rip = int(uc.reg_read(x86.UC_X86_REG_RIP))
        if self.peek_code(rip, 3) == _VMCALL:
            self.vcpu.handle_vmcall(rip)
            uc.reg_write(x86.UC_X86_REG_RAX, _KVM_ENOSYS)
            uc.reg_write(x86.UC_X86_REG_RIP, rip + 3)
            return True
        self._pending = PendingException(UD_VECTOR, 0, rip, "#UD invalid opcode")
        return False

    def _interrupt(self, uc: Uc, intno: int, _ud: object) -> None:
        # Unicorn hands the exception to this hook instead of the guest's IDT: hvsim delivers it (run()).
        name = EXCEPTION_NAMES.get(intno, f"exception vector {intno}")
        self._pending = PendingException(intno, 0, int(uc.reg_read(x86.UC_X86_REG_RIP)), name)
        self._stop_now()


__all__ = ["UD_VECTOR", "ExitDispatch"]
