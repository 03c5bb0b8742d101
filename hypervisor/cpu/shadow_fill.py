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

Emulation (the issue allows either choice; README "Fidelity notes"): as KVM does, the store
does not run.  The fill is refused, the run stops in the instruction, and at the slice end it
is decoded and emulated (`decode_store`): the value written to guest memory through the host
(kvm_write_guest), kvm_mmu_pte_write told, the register effects applied, RIP advanced.  The
forms emulated are the ones guests use on page tables: mov (register or immediate source),
stos without rep, xchg; any other store to a write-protected guest page table fails the VM
with a clear error.  CR3 loads and INVLPG exit at their own code hooks (cpu/shadow_insns.py).
"""

import re
from dataclasses import dataclass
from typing import Any

from mypy_extensions import trait
from unicorn import UC_MEM_FETCH, UC_MEM_WRITE, UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ
from unicorn import x86_const as x86

from ..errors import GuestError
from ..kvm.pte_write import kvm_mmu_pte_write
from ..kvm.shadow_mmu import ShadowFault, ShadowMmu
from ..kvm.shadow_page import PT64_BASE_ADDR_MASK, PT_WRITABLE
from ..types import PAGE_SHIFT, PAGE_SIZE, Gpa
from .disasm import decode_one
from .exceptions import PF_VECTOR
from .fill_state import FillState
from .shadow_insns import _reg, effective_address
from .walk import GuestFault

# Unicorn translates the page of unicorn_vcpu.UNTIL - 1 when a run starts; it gets the zero page.
UNTIL_PAGE = (0xFFFF_FFFF_FFFF_F000 - 1) >> PAGE_SHIFT
# A fault that KVM reports fixed and the walk still refuses, this many times in a row, is a bug
# (retries lost to the mmu_notifier race are bounded by the clock's livelock check instead).
_MAX_FIXES = 10_000
_MASK64 = (1 << 64) - 1
_SIZES = {"byte": 1, "word": 2, "dword": 4, "qword": 8}
_PTR_SIZE = re.compile(r"\b(byte|word|dword|qword) ptr")


class ShadowPtWrite:
    """A store to a write-protected guest page table, to be emulated (see the module docstring)."""

    def __init__(self, gfn: int, gva_page: int) -> None:
        self.gfn, self.gva_page = gfn, gva_page


@trait
class ShadowFill(FillState):
    """The shadow branch of UnicornVcpu's MMU (a mixin: UnicornVcpu provides the state and exit plumbing)."""

    uc: Any
    rip: int
    _exec_seen: Any
    shadow_insns: Any
    _ptwrite: ShadowPtWrite | None
    __deletable__ = ("uc",)  # UnicornVcpu.close()

    # Provided by UnicornVcpu.

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
            cr3 = self._read_cr3()
            if cr3 != self._cr3 and self.tlb_entries is not None:
                self.tlb_entries.clear()  # a CR3 write flushes Unicorn's TLB (QEMU's x86 CR3 update)
            self._cr3 = cr3
        if self._refused or self._resume_rip is not None:
            # After a stop was asked for behind an instruction (the exit port), Unicorn may begin the
            # next one before it stops: that access never happens for the guest, so it takes no exit.
            return False
        write = access == UC_MEM_WRITE
        if vaddr >> PAGE_SHIFT == UNTIL_PAGE:  # unicorn_vcpu.UNTIL's page: the zero page, no walk
            return self._fill_refused(vaddr, access, GuestFault("", PF_VECTOR), entry)
        try:
            spte, emulate = self._shadow_translate(vaddr, write)
        except Exception as why:  # GuestFault, a retry that ended the slice, MMIO
            return self._fill_refused(vaddr, access, why, entry)
        pfn = (spte & PT64_BASE_ADDR_MASK) >> PAGE_SHIFT
        if emulate:
            # The store does not run: the run stops in it, and it is emulated at the slice end.
            gpa = self.translate_peek(vaddr)
            self._ptwrite = ShadowPtWrite(-1 if gpa is None else gpa >> PAGE_SHIFT, vaddr >> PAGE_SHIFT)
            self.clock.stop_at(self.clock.exact())
            self._refused = True
            return False
        entry.paddr = pfn << PAGE_SHIFT
        entry.perms = UC_PROT_ALL if spte & PT_WRITABLE else UC_PROT_READ | UC_PROT_EXEC
        if fetch:
            self._code.fetched(vaddr, pfn)
            self.sensitive.scan(vaddr >> PAGE_SHIFT, pfn, self._frames_2d)
            self.shadow_insns.scan(vaddr >> PAGE_SHIFT, pfn, self._frames_2d)
        elif write:
            self._code.written(pfn)
        if self.tlb_entries is not None:  # --check: what this vCPU's TLB may hold now
            gpa = self.translate_peek(vaddr)
            if gpa is not None:
                self.tlb_entries[vaddr >> PAGE_SHIFT] = (gpa >> PAGE_SHIFT, pfn, entry.perms == UC_PROT_ALL)
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
        """Emulate the store the run stopped in (x86_emulate_insn -> emulator_write_phys): write guest
        memory through the host, kvm_mmu_pte_write, then the instruction's register effects and RIP."""
        pw, self._ptwrite = self._ptwrite, None
        if pw is None:
            return
        vcpu, rip = self.vcpu, self.rip
        mmu = vcpu.vm.mmu
        assert isinstance(mmu, ShadowMmu)
        insn = decode_one(self.peek_code(rip, 16), rip)
        store = None if insn is None else decode_store(self.uc, insn[0], insn[1], rip + insn[2])
        what = "undecodable bytes" if insn is None else f"{insn[0]} {insn[1]}".strip()
        if store is None or store.gva >> PAGE_SHIFT != pw.gva_page or pw.gfn < 0 \
                or (store.gva & 0xFFF) + store.size > PAGE_SIZE:
            vcpu.fail(f"a store to a write-protected guest page table at RIP {rip:#x} ({what}) is not one hvsim "
                      "emulates: mov, stos (without rep) and xchg with a memory destination inside one page "
                      "(see README, shadow paging)", GuestError)
            return
        assert insn is not None
        gpa = (pw.gfn << PAGE_SHIFT) | (store.gva & 0xFFF)
        old = int.from_bytes(vcpu.vm.read_guest(Gpa(gpa), store.size), "little")
        with vcpu.in_kvm():  # still the emulation exit: emulator_write_phys
            vcpu.vm.write_guest(Gpa(gpa), store.value.to_bytes(store.size, "little"))
            kvm_mmu_pte_write(mmu, vcpu, gpa, store.size, True)
        store.writeback(self.uc, old)
        self.rip = rip + insn[2]


@dataclass(frozen=True)
class Store:
    """One emulated store: where, how many bytes, what; and the register it updates afterwards."""

    gva: int
    size: int
    value: int
    reg: str | None = None  # stos: rdi advances by size; xchg: reg takes the old memory value
    kind: str = "mov"

    def writeback(self, uc: Any, old: int) -> None:
        if self.kind == "stos":
            uc.reg_write(x86.UC_X86_REG_RDI, (_reg(uc, "rdi") + self.size) & _MASK64)
        elif self.kind == "xchg" and self.reg is not None:
            uc.reg_write(getattr(x86, f"UC_X86_REG_{self.reg.upper()}"), old)


def decode_store(uc: Any, mnemonic: str, ops: str, next_rip: int) -> Store | None:
    """The store of `mnemonic ops` (Intel syntax, as capstone prints it), or None for a form not emulated."""
    match = _PTR_SIZE.search(ops)
    if match is None:
        return None
    size = _SIZES[match.group(1)]
    mask = (1 << (8 * size)) - 1
    if mnemonic in ("stosb", "stosw", "stosd", "stosq"):
        return Store(_reg(uc, "rdi"), size, _reg(uc, "rax") & mask, kind="stos")
    parts = [p.strip() for p in ops.split(", ")]
    if len(parts) != 2 or mnemonic not in ("mov", "xchg"):
        return None
    mem, other = (parts[0], parts[1]) if "[" in parts[0] else (parts[1], parts[0])
    if "[" not in mem or (mnemonic == "mov" and mem is not parts[0]):
        return None
    gva = effective_address(uc, mem, next_rip)
    if gva is None:
        return None
    if other[0].isdigit():
        if mnemonic != "mov":
            return None
        return Store(gva, size, int(other, 0) & mask)
    try:
        value = _reg(uc, other) & mask
    except AttributeError:
        return None
    return Store(gva, size, value, other if mnemonic == "xchg" else None, mnemonic)


__all__ = ["ShadowFill", "ShadowPtWrite"]
