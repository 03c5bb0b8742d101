"""The instructions that exit only under shadow paging: MOV to/from CR3 and INVLPG, found on code pages.

Without EPT, KVM runs the guest with CR3-load, CR3-store and INVLPG exiting
(2.6.32 vmx.c setup_vmcs_config: CPU_BASED_CR3_LOAD_EXITING, CPU_BASED_CR3_STORE_EXITING
and CPU_BASED_INVLPG_EXITING are cleared only when EPT is on).  Unicorn raises no event for
them, so, as cpu/sensitive_insns.py does for RDTSC, each guest code page is scanned when
first fetched for their opcode bytes (0f 22 /3, 0f 20 /3 with a register operand;
0f 01 /7 with a memory operand), and a one-address code hook is put wherever such an
instruction could start.  The hook decodes the instruction and takes the exit
(kvm/vcpu.py): for a CR3 load, kvm_set_cr3 with the source register's value; for INVLPG,
kvm_mmu_invlpg with the operand's address; then Unicorn executes the instruction itself
(its own TLB flush is the hardware's part).
"""

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from unicorn import Uc
from unicorn import x86_const as x86

from ..kvm.vcpu import Vcpu
from ..types import PAGE_SIZE
from .code_scan import CodeScanner
from .disasm import decode_one

_TERM = re.compile(r"^(?:(\w+)\*(\d)|(0x[0-9a-f]+|\d+)|(\w+))$")


def candidate_offsets(page: npt.NDArray[np.uint8]) -> list[int]:
    """Offsets where MOV to/from CR3 or INVLPG could begin its opcode (0f escape) on a code page."""
    out = []
    for off in np.flatnonzero(page[:-1] == 0x0F).tolist():
        nxt = int(page[off + 1])
        modrm = int(page[off + 2]) if off + 2 < PAGE_SIZE else None
        mov_cr3 = nxt in (0x20, 0x22) and (modrm is None or (modrm >> 3) & 7 == 3)
        invlpg = nxt == 0x01 and (modrm is None or ((modrm >> 3) & 7 == 7 and modrm >> 6 != 3))
        if mov_cr3 or invlpg:
            out.append(off)
    if page[-1] == 0x0F:
        out.append(PAGE_SIZE - 1)
    return out


def _reg(uc: Uc, name: str) -> int:
    return int(uc.reg_read(getattr(x86, f"UC_X86_REG_{name.upper()}")))


def effective_address(uc: Uc, ops: str, next_rip: int) -> int | None:
    """The address of a memory operand such as 'byte ptr [rax + rbx*8 - 0x10]' (None if not understood)."""
    start, end = ops.find("["), ops.find("]")
    if start < 0 or end < start:
        return None
    total = 0
    sign = 1
    for token in ops[start + 1:end].replace(" - ", " + -").split(" + "):
        token = token.strip()
        sign = -1 if token.startswith("-") else 1
        match = _TERM.match(token.lstrip("-"))
        if match is None:
            return None
        index, scale, disp, base = match.groups()
        if index is not None:
            total += _reg(uc, index) * int(scale)
        elif base is not None:
            total += next_rip if base == "rip" else _reg(uc, base)
        else:
            total += sign * int(disp, 0)
    return total & 0xFFFF_FFFF_FFFF_FFFF


class ShadowInsns(CodeScanner):
    """Finds one vCPU's CR3 accesses and INVLPGs and takes their exits (see the module docstring)."""

    def __init__(self, uc: Uc, vcpu: Vcpu, peek_code: Callable[[int, int], bytes],
                 stopping: Callable[[], bool]) -> None:
        super().__init__(uc)
        self.vcpu = vcpu
        self._peek_code = peek_code
        self._stopping = stopping

    def candidates(self, page: npt.NDArray[np.uint8]) -> list[int]:
        return candidate_offsets(page)

    def _at(self, uc: Uc, address: int, size: int, _ud: Any) -> None:
        if self._stopping():
            return  # the slice ends before this instruction; it is taken next slice
        insn = decode_one(self._peek_code(address, 16), address)
        if insn is None:
            return
        mnemonic, ops, length = insn
        if mnemonic == "mov" and ops.startswith("cr3, "):
            self.vcpu.handle_cr3_load(_reg(uc, ops[5:]), address)
        elif mnemonic == "mov" and ops.endswith(", cr3"):
            self.vcpu.handle_cr3_read(address)
        elif mnemonic == "invlpg":
            gva = effective_address(uc, ops, address + length)
            if gva is not None:
                self.vcpu.handle_invlpg(gva, address)


__all__ = ["ShadowInsns", "candidate_offsets", "effective_address"]
