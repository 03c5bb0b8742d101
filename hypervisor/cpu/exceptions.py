"""Delivery of a guest exception through the guest's IDT, in long mode, as the CPU does it.

Unicorn 2.1 never delivers an exception through a guest IDT in system mode: its
cpu_handle_exception() (qemu/accel/tcg/cpu-exec.c) hands the vector to the
UC_HOOK_INTR callbacks, or stops with UC_ERR_EXCEPTION, and hvsim's own guest page
walk reports a #PF by failing the TLB fill.  So hvsim plays the CPU here, following
the Intel SDM vol. 3, 6.14 "Exception and interrupt handling in 64-bit mode": read
the 16-byte gate at IDTR.base + vector * 16, align RSP down to 16 bytes, push SS,
RSP, RFLAGS, CS, RIP and (for the vectors that have one) the error code, clear
IF for an interrupt gate (and TF, NT, RF), load CS:RIP from the gate.  CR2 takes
the faulting address of a #PF.

Simplifications (also in the README's fidelity notes): no IST (a gate with an IST
index is refused), no #DF delivery (a fault while delivering one is a triple
fault), and a #PF's CR2 is the page address of the access, because Unicorn's TLB
fill hook sees only the page.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

EXCEPTION_NAMES = {0: "#DE divide error", 1: "#DB", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD invalid opcode",
                   8: "#DF", 13: "#GP general protection", 14: "#PF page fault", 16: "#MF", 17: "#AC"}
# Vectors for which the CPU pushes an error code (SDM vol. 3, table 6-1).
HAS_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
PF_VECTOR = 14

PF_ERR_PRESENT = 1 << 0
PF_ERR_WRITE = 1 << 1

_GATE_INTERRUPT = 0xE
_GATE_TRAP = 0xF
_RFLAGS_TF = 1 << 8
_RFLAGS_IF = 1 << 9
_RFLAGS_NT = 1 << 14
_RFLAGS_RF = 1 << 16


@dataclass
class PendingException:
    """An exception raised by a guest instruction, waiting to be delivered at the end of the time slice."""

    vector: int
    error_code: int
    rip: int
    note: str  # what happened, as reported when it cannot be delivered (e.g. "#PF page not present at gva 0x0")
    cr2: int | None = None


class DeliveryFailed(Exception):
    """The exception cannot be delivered: no IDT, a bad gate, or a fault while pushing the frame."""


@dataclass(frozen=True)
class Gate:
    offset: int
    selector: int
    ist: int
    kind: int
    present: bool


def parse_gate(low: int, high: int) -> Gate:
    """A 64-bit IDT gate descriptor from its two little-endian qwords."""
    offset = (low & 0xFFFF) | ((low >> 32) & 0xFFFF_0000) | ((high & 0xFFFF_FFFF) << 32)
    return Gate(offset=offset, selector=(low >> 16) & 0xFFFF, ist=(low >> 32) & 7,
                kind=(low >> 40) & 0xF, present=bool(low >> 47 & 1))


@dataclass(frozen=True)
class EntryState:
    """Registers after delivery."""

    rip: int
    rsp: int
    rflags: int
    cs: int


def deliver(exc: PendingException, idtr: tuple[int, int], rsp: int, rflags: int, cs: int, ss: int,
            read_qword: Callable[[int], int], write_qword: Callable[[int, int], None]) -> EntryState:
    """Push the interrupt frame and return the handler's entry state; raises DeliveryFailed.

    read_qword/write_qword access guest linear addresses (through the guest page
    tables and the EPT, as the CPU's own accesses during delivery do) and raise
    DeliveryFailed when the address does not translate.
    """
    base, limit = idtr
    if exc.vector * 16 + 15 > limit:
        raise DeliveryFailed("with no IDT")
    addr = base + exc.vector * 16
    gate = parse_gate(read_qword(addr), read_qword(addr + 8))
    if not gate.present:
        raise DeliveryFailed(f"and IDT gate {exc.vector} is not present")
    if gate.kind not in (_GATE_INTERRUPT, _GATE_TRAP):
        raise DeliveryFailed(f"and IDT gate {exc.vector} is not a 64-bit interrupt or trap gate")
    if gate.ist:
        raise DeliveryFailed(f"and IDT gate {exc.vector} asks for IST {gate.ist} (hvsim models no TSS)")
    frame = [ss, rsp, rflags, cs, exc.rip]
    if exc.vector in HAS_ERROR_CODE:
        frame.append(exc.error_code)
    sp = rsp & ~0xF
    for value in frame:
        sp = (sp - 8) & 0xFFFF_FFFF_FFFF_FFFF
        write_qword(sp, value)
    new_flags = rflags & ~(_RFLAGS_TF | _RFLAGS_NT | _RFLAGS_RF)
    if gate.kind == _GATE_INTERRUPT:
        new_flags &= ~_RFLAGS_IF
    return EntryState(rip=gate.offset, rsp=sp, rflags=new_flags, cs=gate.selector)


def enter_handler(uc: Any, exc: PendingException, read_qword: Callable[[int], int],
                  write_qword: Callable[[int, int], None]) -> int:
    """Deliver exc on the Unicorn CPU uc: push the frame, load the handler's state; return its RIP."""
    from unicorn import x86_const as x86

    from ..vmm.layout import GDT_CODE64_SELECTOR
    from .binding import reset_old_exception

    idtr = uc.reg_read(x86.UC_X86_REG_IDTR)
    cs = int(uc.reg_read(x86.UC_X86_REG_CS)) or GDT_CODE64_SELECTOR  # Unicorn boots with a null CS selector
    entry = deliver(exc, (int(idtr[1]), int(idtr[2])), int(uc.reg_read(x86.UC_X86_REG_RSP)),
                    int(uc.reg_read(x86.UC_X86_REG_EFLAGS)), cs, int(uc.reg_read(x86.UC_X86_REG_SS)),
                    read_qword, write_qword)
    if exc.cr2 is not None:
        uc.reg_write(x86.UC_X86_REG_CR2, exc.cr2)
    if int(uc.reg_read(x86.UC_X86_REG_CS)) != entry.cs:
        uc.reg_write(x86.UC_X86_REG_CS, entry.cs)
    uc.reg_write(x86.UC_X86_REG_RSP, entry.rsp)
    uc.reg_write(x86.UC_X86_REG_EFLAGS, entry.rflags)
    if exc.vector != PF_VECTOR:
        reset_old_exception(uc)  # the CPU model raised it: undo QEMU's double-fault bookkeeping
    return entry.rip
