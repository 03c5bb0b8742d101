"""The TLB fill under shadow paging: the CPU walks KVM's shadow tables, not the guest's.

With `--mmu shadow` the vCPU's CR3, as the hardware uses it, is KVM's shadow root
(vmx_set_cr3 loads root_hpa), so a Unicorn TLB miss walks the shadow page tables
(kvm/shadow_mmu.py `walk_shadow`) and sets the leaf spte's A bit, as a CPU does.  A miss
there is a #PF:

* on a "notrap" spte under bypass_guest_pf (2.6.32 .. 3.0) the #PF (P=0) goes straight
  to the guest: no exit (vmx.c PAGE_FAULT_ERROR_CODE_MASK/MATCH = 1);
* otherwise it exits (EXCEPTION_NMI, vector 14) and KVM's FNAME(page_fault) runs: it
  fixes the spte (the access is retried), injects a #PF into the guest (delivered through
  the guest's IDT by cpu/exceptions.py), or asks for the store to a shadowed guest page
  table to be emulated.

Emulation (an hvsim choice the issue allows, README "Fidelity notes"): the one store runs
natively against a writable mapping of the page-table frame given for this fill only; the
CPU stops after that instruction, the TLB is flushed, and the bytes that changed (with the
store size decoded from the instruction) are handed to kvm_mmu_pte_write.  Every store form
works (mov, stos, xchg, cmpxchg, or, and); a store that leaves the bytes as they were is
not seen.  CR3 loads and INVLPG exit at their own code hooks (cpu/shadow_insns.py).
"""

import re
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from unicorn import UC_MEM_FETCH, UC_MEM_WRITE, UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ

from ..kvm.pte_write import kvm_mmu_pte_write
from ..kvm.shadow_mmu import ShadowFault, ShadowMmu
from ..kvm.shadow_page import PT64_BASE_ADDR_MASK, PT_WRITABLE
from ..kvm.vcpu import Vcpu
from ..types import PAGE_SHIFT
from .disasm import decode_one
from .exceptions import PF_VECTOR
from .walk import GuestFault

# Unicorn translates the page of unicorn_vcpu.UNTIL - 1 when a run starts; it gets the zero page.
UNTIL_PAGE = (0xFFFF_FFFF_FFFF_F000 - 1) >> PAGE_SHIFT
# A fault that KVM reports fixed and the walk still refuses, this many times in a row, is a bug
# (retries lost to the mmu_notifier race are bounded by the clock's livelock check instead).
_MAX_FIXES = 10_000
_SIZES = {"byte": 1, "word": 2, "dword": 4, "qword": 8}
_PTR_SIZE = re.compile(r"\b(byte|word|dword|qword) ptr")


class ShadowPtWrite:
    """A store to a write-protected guest page table, let through once (see the module docstring)."""

    def __init__(self, gfn: int, pfn: int, before: npt.NDArray[np.uint8], rip: int) -> None:
        self.gfn, self.pfn, self.before, self.rip = gfn, pfn, before, rip


class ShadowFill:
    """The shadow branch of UnicornVcpu's MMU (a mixin: UnicornVcpu provides the state and exit plumbing)."""

    vcpu: Vcpu
    _cr3: int
    _refused: bool
    _frames_2d: npt.NDArray[np.uint8]
    _exec_seen: Any
    sensitive: Any
    shadow_insns: Any
    _ptwrite: ShadowPtWrite | None

    _read_cr3: Callable[[], int]

    # Provided by UnicornVcpu.

    def _rip_for_trace(self) -> int:
        raise NotImplementedError

    def _current_rip(self) -> int:
        raise NotImplementedError

    def _fault_retried(self, gfn: int) -> None:
        raise NotImplementedError

    def flush_tlb(self) -> None:
        raise NotImplementedError

    def _fill_refused(self, vaddr: int, access: int, why: Exception, entry: Any = None) -> bool:
        raise NotImplementedError

    def _mmio_at(self, gpa: int) -> Exception:
        raise NotImplementedError

    def _stop_after_instruction(self) -> None:
        raise NotImplementedError

    def peek_code(self, gva: int, length: int) -> bytes:
        raise NotImplementedError

    def translate_peek(self, gva: int) -> int | None:
        raise NotImplementedError

    def _shadow_tlb_fill(self, vaddr: int, access: int, entry: Any) -> bool:
        """The CPU's walk of the shadow tables on a Unicorn TLB miss (exits handled here)."""
        fetch = access == UC_MEM_FETCH
        if fetch:
            # The load itself exited at its code hook (cpu/shadow_insns.py); here only the walks' view.
            self._cr3 = self._read_cr3()
        if self._refused:
            return False
        write = access == UC_MEM_WRITE
        if vaddr >> PAGE_SHIFT == UNTIL_PAGE:  # unicorn_vcpu.UNTIL's page: the zero page, no walk
            return self._fill_refused(vaddr, access, GuestFault("", PF_VECTOR), entry)
        try:
            spte, emulate = self._shadow_translate(vaddr, write)
        except Exception as why:  # GuestFault, a retry that ended the slice, MMIO
            return self._fill_refused(vaddr, access, why, entry)
        pfn = (spte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
        entry.paddr = pfn << PAGE_SHIFT
        entry.perms = UC_PROT_ALL if spte & PT_WRITABLE or emulate else UC_PROT_READ | UC_PROT_EXEC
        if emulate:
            gpa = self.translate_peek(vaddr)
            gfn = -1 if gpa is None else gpa >> PAGE_SHIFT
            self._ptwrite = ShadowPtWrite(gfn, pfn, self._frames_2d[pfn].copy(), self._current_rip())
            self._stop_after_instruction()
        if fetch:
            self._exec_seen[pfn] = True
            self.sensitive.scan(vaddr >> PAGE_SHIFT, pfn, self._frames_2d)
            self.shadow_insns.scan(vaddr >> PAGE_SHIFT, pfn, self._frames_2d)
        return True

    def _shadow_translate(self, vaddr: int, write: bool) -> tuple[int, bool]:
        """(leaf spte, emulate the store) for the access, taking #PF exits until the shadow tables allow
        it; raises GuestFault for a #PF the guest must handle (direct under bypass_guest_pf, or injected)."""
        vcpu = self.vcpu
        mmu = vcpu.vm.mmu
        assert isinstance(mmu, ShadowMmu)
        for _ in range(_MAX_FIXES):
            spte, error_code = mmu.walk_shadow(vcpu, vaddr, write)
            if spte:
                return spte, False
            if error_code == -1:
                raise GuestFault("#PF page not present (no exit: bypass_guest_pf)", PF_VECTOR, 0)
            result = vcpu.handle_shadow_pf(vaddr, error_code, self._rip_for_trace())
            if result is ShadowFault.INJECT:
                raise GuestFault("#PF injected by KVM", PF_VECTOR, mmu.state(vcpu).inject_error)
            if result is ShadowFault.MMIO:
                gpa = self.translate_peek(vaddr)
                raise self._mmio_at(vaddr if gpa is None else gpa)
            if result is ShadowFault.EMULATE:
                spte, _ = mmu.walk_shadow(vcpu, vaddr, False)
                return spte, True
            if result is ShadowFault.RETRY:
                self._fault_retried(vaddr >> PAGE_SHIFT)
        raise RuntimeError(f"hvsim bug: {_MAX_FIXES} #PF exits at gva {vaddr:#x} were fixed by KVM but the shadow "
                           "walk still refuses the access")

    def _shadow_frame_of(self, gva: int, write: bool) -> int:
        """The pfn behind gva for an access made while delivering an exception."""
        spte, _ = self._shadow_translate(gva, write)
        return (spte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT

    def _finish_ptwrite(self) -> None:
        """After the let-through store: drop the writable TLB entry and tell kvm_mmu_pte_write what changed."""
        pw, self._ptwrite = self._ptwrite, None
        if pw is None:
            return
        self.flush_tlb()
        mmu = self.vcpu.vm.mmu
        assert isinstance(mmu, ShadowMmu)
        changed = np.flatnonzero(self._frames_2d[pw.pfn] != pw.before)
        if not changed.size or pw.gfn < 0:
            return
        size = self._store_size(pw.rip)
        offset = int(changed[0]) & ~(size - 1)
        with self.vcpu.in_kvm():  # the rest of the emulation exit: emulator_write_phys -> kvm_mmu_pte_write
            kvm_mmu_pte_write(mmu, self.vcpu, (pw.gfn << PAGE_SHIFT) | offset, size, True)

    def _store_size(self, rip: int) -> int:
        """The size of the store the instruction at rip makes (its memory operand), 8 if not given."""
        insn = decode_one(self.peek_code(rip, 16), rip)
        if insn is None:
            return 8
        mnemonic, ops, _ = insn
        match = _PTR_SIZE.search(ops)
        if match is not None:
            return _SIZES[match.group(1)]
        return {"stosb": 1, "stosw": 2, "stosd": 4}.get(mnemonic, 8)


__all__ = ["ShadowFill", "ShadowPtWrite"]
