"""Guest instructions that would show host state (RDTSC, RDTSCP, RDRAND, RDSEED), answered from simulated state.

Unicorn 2.1.4 executes RDTSC/RDTSCP with the host's time stamp counter and
RDRAND/RDSEED with the host's random numbers, and its UC_HOOK_INSN refuses all four
(UC_ERR_ARG; checked by experiment, see tests/scenario/test_guest_visible_state.py).
So each guest code page is scanned for their opcode bytes when it is first fetched
(`scan`, called from the TLB-fill hook), and a one-address code hook is placed wherever
such an instruction could start: at the opcode and at every legacy or REX prefix byte
before it.  Unicorn calls a code hook only where an instruction really starts, so the
same bytes inside another instruction (an immediate, a displacement) cost nothing;
guest code without these instructions runs with no extra hook at all.  When a hook
runs, the instruction is decoded and then:

* RDTSC, RDTSCP: EDX:EAX = the vCPU's TSC (`tsc()`), RDTSCP also ECX = TSC_AUX; the
  instruction is skipped by moving RIP, so Unicorn never executes it.  With KVM's
  default VMX controls RDTSC does not exit (2.6.32 vmx.c setup_vmcs_config() sets
  CPU_BASED_USE_TSC_OFFSETING and not CPU_BASED_RDTSC_EXITING), so no exit is counted.
* RDRAND, RDSEED: #UD (`undefined`).  hvsim's CPUID does not offer them (neither did
  2.6.32's KVM: its supported cpuid 1.ecx mask has no RDRAND), and a deterministic
  simulator has no honest random numbers to give; a guest that uses them anyway stops
  with a clear triple fault instead of seeing host entropy.

Self-modifying code is not supported (as elsewhere in hvsim): a page is scanned once
per (gva page, pfn), again only after the host rewrote a code frame.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from unicorn import Uc
from unicorn import x86_const as x86

from ..types import PAGE_SIZE
from .code_scan import CodeScanner
from .disasm import decode_one

MSR_TSC_AUX = 0xC0000103
_MASK32 = 0xFFFF_FFFF


def candidate_offsets(page: npt.NDArray[np.uint8]) -> list[int]:
    """Offsets in a code page where RDTSC (0f 31), RDTSCP (0f 01 f9), RDRAND or RDSEED (0f c7 /6, /7
    with a register operand) could begin its opcode; an opcode on the page's last bytes counts."""
    escape = np.flatnonzero(page == 0x0F)
    out = []
    for off in escape.tolist():
        nxt = int(page[off + 1]) if off + 1 < PAGE_SIZE else None
        third = int(page[off + 2]) if off + 2 < PAGE_SIZE else None
        rdtsc = nxt in (None, 0x31)
        rdtscp = nxt == 0x01 and third in (None, 0xF9)
        rdrand_rdseed = nxt == 0xC7 and (third is None or third & 0xF0 == 0xF0)  # mod=3, reg=6 or 7
        if rdtsc or rdtscp or rdrand_rdseed:
            out.append(off)
    return out


class SensitiveInsns(CodeScanner):
    """Finds and answers one vCPU's RDTSC/RDTSCP/RDRAND/RDSEED (see the module docstring)."""

    def __init__(self, uc: Uc, tsc: Callable[[], int], peek_code: Callable[[int, int], bytes],
                 undefined: Callable[[str, int], None], stopping: Callable[[], bool],
                 skipping: Callable[[], None] = lambda: None) -> None:
        super().__init__(uc)
        # Called before RIP moves past an answered instruction: Unicorn leaves the block there.
        self._skipping = skipping
        self._tsc = tsc
        self._peek_code = peek_code
        self._undefined = undefined
        self._stopping = stopping
        self.emulated = 0

    def candidates(self, page: npt.NDArray[np.uint8]) -> list[int]:
        return candidate_offsets(page)

    def _at(self, uc: Uc, address: int, size: int, _ud: Any) -> None:
        if self._stopping():
            return  # the slice ends before this instruction; it runs (and is answered) next slice
        insn = decode_one(self._peek_code(address, 16), address)
        if insn is None:
            return
        mnemonic, _, length = insn
        if mnemonic in ("rdtsc", "rdtscp"):
            tsc = self._tsc()
            uc.reg_write(x86.UC_X86_REG_RAX, tsc & _MASK32)
            uc.reg_write(x86.UC_X86_REG_RDX, (tsc >> 32) & _MASK32)
            if mnemonic == "rdtscp":
                uc.reg_write(x86.UC_X86_REG_RCX, uc.msr_read(MSR_TSC_AUX) & _MASK32)
            self._skipping()
            uc.reg_write(x86.UC_X86_REG_RIP, address + length)  # skip it: Unicorn must not run it
            self.emulated += 1
        elif mnemonic in ("rdrand", "rdseed"):
            self._undefined(f"#UD {mnemonic}: hvsim's CPUID offers no {mnemonic.upper()} (see README)", address)


__all__ = ["MSR_TSC_AUX", "SensitiveInsns", "candidate_offsets"]
