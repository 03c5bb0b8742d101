"""A vCPU executed by Unicorn, with the TLB-fill hook acting as the hardware MMU (walk + EPT).

Overview (see DESIGN.md, "The Unicorn pattern that scales"):

* Unicorn runs in virtual-TLB mode over one mapping of the whole FramePool, so a
  Unicorn "physical" address is pfn * 4096 and every VM's vCPU sees the same frames.
* Each TLB miss calls the fill of the VM's MMU: cpu/tdp_fill.py (the guest walk, then the
  leaf spte of the gfn; a missing or insufficient spte is an EPT_VIOLATION exit handled right
  there by KVM's fault path) or cpu/shadow_fill.py (`--mmu shadow`: the walk of KVM's shadow
  tables, #PF exits).  The guest instruction then completes against the frame the spte maps.
* Port I/O, CPUID, VMCALL and HLT are exits too, each caught as Unicorn reports it
  (cpu/exit_dispatch.py; HLT here, in `run`).
* Every use of the Unicorn binding's private state (raw hooks, the engine handle,
  hook exceptions) goes through cpu/binding.py, which checks the Unicorn version.
* A guest exception (from the walk or from the CPU model) is delivered through the
  guest's IDT by cpu/exceptions.py at the end of the slice; with no IDT it is a
  triple fault.  CR3 is read on every instruction-fetch TLB fill (the first fill after any
  CR3 write is one), so an address-space switch drops the cached walks at once.
* Time is exact without a per-instruction hook: a C block hook (_icount.c) adds each
  translated block's instruction count and ends a slice at the first block boundary
  at or after its limit; where a run stops inside a block the clock counts from the
  block's start to RIP (cpu/clock.py, cpu/blocks.py, cpu/code_pages.py).  HLT is
  recognised by decoding the instruction that ended a run.  A retried fault costs
  simulated time (kvm/vcpu.py FAULT_RETRY_COST) and always ends the slice (so that
  where slices end never depends on the quantum); the access is taken again next.
* RDTSC/RDTSCP/RDRAND/RDSEED are found on code pages and answered from simulated
  state (cpu/sensitive_insns.py); CPUID from KVM's fixed table (kvm/cpuid.py).
"""

from typing import Any, Final

from unicorn import UC_TLB_VIRTUAL
from unicorn import x86_const as x86

from ..host.frames import FramePool
from ..kvm.mmu import TdpMmu
from ..kvm.mmu_interface import KvmMmu
from ..kvm.shadow_mmu import ShadowMmu
from ..kvm.spte import SPTE_PFN_MASK
from ..kvm.vcpu import NO_BACKEND, Vcpu, VcpuState
from ..types import PAGE_SHIFT, PAGE_SIZE
from ..vmm.loader import BootParams
from ..x86 import CR0_ET, CR0_PE, CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_LME, MSR_EFER
from .binding import (
    add_tlb_fill_hook,
    close_uc,
    cr3_reader,
    emu_start,
    new_x86_64,
    take_hook_exception,
    tlb_flusher,
)
from .clock import VcpuClock
from .code_pages import CodePages
from .disasm import disassemble_one
from .exceptions import (
    PF_ERR_WRITE,
    PF_VECTOR,
    DeliveryFailed,
    PendingException,
    enter_handler,
)
from .exit_dispatch import UD_VECTOR, ExitDispatch
from .sensitive_insns import SensitiveInsns
from .shadow_fill import ShadowFill, ShadowPtWrite
from .shadow_insns import ShadowInsns
from .tdp_fill import UC_MEM_FETCH, UC_MEM_WRITE, UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ, MmioAccess, SliceEnd, TdpFill
from .walk import GuestFault, PagingStructureCache, peek_bytes, translate_peek, walk_gva

# Unicorn translates the page of `until - 1` when a run starts; no guest reaches this
# address (it is above the canonical guest's identity map), so it is given the zero page.
UNTIL = 0xFFFF_FFFF_FFFF_F000
_UNTIL_PAGE = (UNTIL - 1) >> PAGE_SHIFT

_HLT = b"\xf4"
_RUNNABLE: Final = VcpuState.RUNNABLE  # tested after every run (an Enum member through its class costs more)



class UnicornVcpu(ExitDispatch, ShadowFill, TdpFill):
    """Executes one KVM vCPU.  Implements kvm.vcpu.VcpuBackend (flush_tlb)."""

    # What close() deletes (mypyc: a compiled class names the attributes it lets go; the mixins name theirs).
    __deletable__ = ("_tlb_cb",)

    def __init__(self, vcpu: Vcpu, frames: FramePool, boot: BootParams, insns_per_ms: int) -> None:
        self.vcpu = vcpu
        self.frames = frames
        self.mmu: KvmMmu = vcpu.vm.mmu
        if isinstance(self.mmu, TdpMmu):
            self._tdp_mmu = self.mmu
        self._pte_reader = self._read_pte
        # Fast path of the fill (TDP): a leaf spte that already permits the access with A (and D)
        # set is used as read, no call; anything else goes through translate, and every spte
        # change through the MMU's set_spte.
        self._leaf_sptes = self.mmu.leaf_sptes
        # A gpa above every memslot is MMIO without asking the MMU (no spte can exist there).
        self._nr_gfns = int(vcpu.vm.memslots.max_gfn)
        self._qwords = frames.qwords
        self._code_epoch = frames.code_epoch
        self._code = CodePages(vcpu.vm, lambda: self._cr3, frames.exec_seen_view, frames.frames)
        # An instruction after which a run was stopped inside a block (a shutdown by port I/O).
        self._resume_rip: int | None = None
        self._stop_note: str | None = None
        self._pscache: PagingStructureCache = {}
        self._pending: PendingException | None = None
        # The access abandoned by SliceEnd: "fetch" (no instruction counted yet) or "data".
        self._abandoned: str | None = None
        # A TLB fill was refused this run: Unicorn may ask again for the same access (it does
        # for fetches); the answer stays no, without taking the exit twice.
        self._refused = False
        self._emulating = False
        # --check: what this vCPU's TLB may hold since its last flush, gva page -> (gfn, pfn,
        # writable), as the fills answered Unicorn (None: not recorded).
        self.tlb_entries: dict[int, tuple[int, int, bool]] | None = None
        # --mmu shadow: the fill walks KVM's shadow tables (cpu/shadow_fill.py).
        self._shadow = isinstance(self.mmu, ShadowMmu)
        self._ptwrite: ShadowPtWrite | None = None
        if isinstance(self.mmu, ShadowMmu):
            self.mmu.state(vcpu).cr3 = boot.cr3  # KVM_SET_SREGS: the VMM's CR3, no exit
        uc = new_x86_64()
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.mem_map_ptr(0, frames.nr_frames * PAGE_SIZE, UC_PROT_ALL, frames.data.ctypes.data)
        # The TLB-fill hook is registered raw (the binding's wrapper costs two Python layers per fill).
        self._read_cr3 = cr3_reader(uc)
        self._flush_unicorn_tlb = tlb_flusher(uc)
        self._tlb_cb = add_tlb_fill_hook(uc, self._shadow_fill_hook if self._shadow else self._tlb_fill, self._refuse)
        self._exit_hooks = self._add_exit_hooks(uc)
        self.clock = self._code.clock = VcpuClock(uc, insns_per_ms, self._code.read)
        self.uc = uc
        self._frames_2d = frames.frames
        self.sensitive = SensitiveInsns(uc, self.clock.tsc, self.peek_code, self._undefined_opcode,
                                        lambda: self.clock.stopped, self.clock.leave_block)
        self.shadow_insns = None  # --mmu shadow: its code hooks (cpu/shadow_insns.py)
        if self._shadow:
            self.shadow_insns = ShadowInsns(uc, vcpu, self.peek_code, lambda: self.clock.stopped)
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, boot.gdt_base, boot.gdt_limit, 0))
        uc.reg_write(x86.UC_X86_REG_IDTR, (0, 0, 0, 0))  # no IDT until the guest loads one
        uc.reg_write(x86.UC_X86_REG_CR3, boot.cr3)
        uc.reg_write(x86.UC_X86_REG_CR4, CR4_PAE)
        uc.msr_write(MSR_EFER, EFER_LME | EFER_LMA)
        uc.reg_write(x86.UC_X86_REG_CR0, CR0_PE | CR0_ET | CR0_WP | CR0_PG)
        uc.reg_write(x86.UC_X86_REG_RSP, boot.rsp)
        uc.reg_write(x86.UC_X86_REG_RSI, boot.rsi)
        uc.reg_write(x86.UC_X86_REG_RDI, boot.rdi)
        self.rip = boot.rip
        self._cr3 = boot.cr3
        vcpu.arch = self

    def close(self) -> None:
        """uc_close() this vCPU's Unicorn and drop what points back here, so that a finished
        Simulation is freed by reference counting (the hooks made cycles through the binding)."""
        close_uc(self.uc)
        del self.uc
        for hook in self._exit_hooks:
            hook.sever()
        # The raw TLB-fill and OUT callbacks go with the Uc that calls them: their closures hold the Uc.
        del self._tlb_cb, self._out_cb
        del self.sensitive  # it holds this vCPU's bound methods
        self.clock.close()
        del self._code  # it reads CR3 through this vCPU
        del self._pte_reader  # a bound method of this vCPU
        self.shadow_insns = None
        if self.vcpu.arch is self:
            self.vcpu.arch = NO_BACKEND

    # --- VcpuBackend -----------------------------------------------------------------

    def flush_tlb(self) -> None:
        """INVEPT / a remote TLB flush: Unicorn's TLB and the cached guest walks both go.

        The blocks' instruction counts stay: every fetch after the flush takes a TLB fill, which drops
        them if its page's code now comes from another frame (cpu/code_pages.py)."""
        self._flush_unicorn_tlb()
        self._pscache.clear()
        if self.tlb_entries is not None:
            self.tlb_entries.clear()

    # --- running ---------------------------------------------------------------------

    def run(self, max_insns: int, turn_left: int = 0, period: int = 0) -> int:
        """Run until max_insns retire or the vCPU stops; return the instructions retired.

        With `period`: the running host turn ends after `turn_left`, and further turns of `period`
        follow in this run (the scheduler's fast path for a lone vCPU; clock.turns_ended says where)."""
        vcpu = self.vcpu
        if self.frames.code_epoch != self._code_epoch:
            # A frame that held translated code was rewritten by the host.
            self.uc.ctl_flush_tb()
            self._code_epoch = self.frames.code_epoch
            self.sensitive.forget_scans()
            self._code.forget()
            if self._shadow:
                self.shadow_insns.forget_scans()
        clock = self.clock
        if period:
            clock.start_slice(min(turn_left, max_insns), period, max_insns)
        else:
            clock.start_slice(max_insns)
        self._clear_run_state()
        self._emulating = clock.running = True
        try:
            error = emu_start(self.uc, self.rip, UNTIL)
        finally:
            self._emulating = clock.running = clock.fetching = False
        retired = clock.end_slice()
        self.rip = clock.rip_after_run() if self._resume_rip is None else self._resume_rip
        raised = take_hook_exception(self.uc) or clock.miss_error
        if self._ptwrite is not None and raised is None:
            self._finish_ptwrite()  # the store to a guest page table, emulated (cpu/shadow_fill.py)
            return retired
        if raised is not None:
            # An exception in one of our hooks (an invariant violation, a bug): Unicorn
            # reports it as a failed run; the exception is what happened.
            raise raised
        if vcpu.state is not _RUNNABLE:
            return retired
        pending, self._pending = self._pending, None
        if self._abandoned is not None:
            pass  # the slice ended inside a retried fault; the guest takes it again next slice
        elif pending is not None and (error is not None or pending.vector != PF_VECTOR):
            self._take_exception(pending)
        elif error is not None:
            vcpu.handle_triple_fault(self._stop_note or f"the CPU model stopped: {error}", self.rip)
        elif not clock.stopped:
            # Unicorn returned on its own, not at the end of the slice: the instruction that
            # ended the run is recognised by what it is, not by how many instructions the
            # slice retired (an HLT can be the slice's last instruction).
            self._unicorn_returned()
        return retired

    def _clear_run_state(self) -> None:
        """What the hooks report about a run, cleared before it.  A method of its own: mypy narrows an
        attribute assigned None in run() to None across the emu_start call, and mypyc (setup.py) compiles
        that narrowing in, so run() would never see what the hooks set."""
        self._stop_note = None
        self._pending = None
        self._abandoned = None
        self._refused = False
        self._resume_rip = None

    def _unicorn_returned(self) -> None:
        if self.rip == UNTIL:
            self.vcpu.handle_triple_fault(f"execution reached {UNTIL:#x}, outside guest memory", self.rip)
        elif self.peek_code(self.rip - 1, 1) == _HLT:  # Unicorn leaves RIP after the HLT
            self.vcpu.handle_hlt(self.rip - 1)
        else:
            raise RuntimeError(f"Unicorn stopped at RIP {self.rip:#x} ({self.instruction_at(self.rip)!r}) "
                               "for no reason hvsim knows")

    def _take_exception(self, exc: PendingException) -> None:
        """Deliver exc through the guest's IDT (cpu/exceptions.py), or end the VM with a triple fault."""
        if exc.rip < 0:
            exc.rip = self.rip

        def read_qword(gva: int) -> int:
            return int(self._qwords[self._frame_of(gva, False), (gva & (PAGE_SIZE - 1)) >> 3])

        def write_qword(gva: int, value: int) -> None:
            self._qwords[self._frame_of(gva, True), (gva & (PAGE_SIZE - 1)) >> 3] = value

        try:
            self.rip = enter_handler(self.uc, exc, read_qword, write_qword)
        except DeliveryFailed as why:
            self.vcpu.handle_triple_fault(f"{exc.note} {why}", exc.rip)

    def _frame_of(self, gva: int, write: bool) -> int:
        """The pfn behind gva for an access made while delivering an exception (exits as the CPU's would)."""
        try:
            if self._shadow:
                return self._shadow_frame_of(gva, write)
            gpa, _ = walk_gva(self._cr3, gva, write, self._read_pte, self._pscache)
            spte = self._ept(gpa >> PAGE_SHIFT, write)
        except GuestFault as fault:
            raise DeliveryFailed(f"and pushing its frame faulted ({fault} at gva {gva:#x})") from None
        except MmioAccess as mmio:
            raise DeliveryFailed(f"and pushing its frame reached gpa {mmio.gpa:#x}, outside every memslot") from None
        return (spte & SPTE_PFN_MASK) >> PAGE_SHIFT

    def _stop_now(self, note: str | None = None, after: bool = False) -> None:
        """Stop in the instruction being executed (it counts as begun), or `after` it.  Unicorn stops at
        its next check (after port I/O: the next memory access or block); what it runs meanwhile is not
        counted, and RIP is put back."""
        clock = self.clock
        if self._emulating:
            clock.stop_at(clock.exact())
            if after and self._resume_rip is None:
                self._resume_rip = clock.next_rip()
        clock.stop_now()
        if note is not None:
            self._stop_note = note
        self.uc.emu_stop()

    # --- the MMU: guest page walk + EPT ----------------------------------------------------

    def _refuse(self) -> None:
        """A hook raised inside the TLB fill: refuse every further fill of this run."""
        self._refused = True

    def _shadow_fill_hook(self, vaddr: int, access: int, entry: Any) -> bool:
        """The TLB-fill hook under --mmu shadow: `_shadow_tlb_fill`, with the clock told whether this fill
        is for a fetch (under TDP the hook is `_tlb_fill`, which tells it itself)."""
        clock = self.clock
        clock.fetching = access == UC_MEM_FETCH
        try:
            return self._shadow_tlb_fill(vaddr, access, entry)
        finally:
            clock.fetching = False

    def _fill_refused(self, vaddr: int, access: int, why: Exception, entry: Any = None) -> bool:
        """A TLB fill that cannot complete: a guest exception, a slice ended by a retry, MMIO."""
        write = access == UC_MEM_WRITE
        if isinstance(why, GuestFault):
            if vaddr >> PAGE_SHIFT == _UNTIL_PAGE and entry is not None:
                entry.paddr = 0
                entry.perms = UC_PROT_READ | UC_PROT_EXEC
                return True
            self.clock.stop_at(self.clock.exact())
            self._stop_note = note = f"{why} at gva {vaddr:#x}"
            error_code = why.error_code | (PF_ERR_WRITE if write else 0)
            self._pending = PendingException(why.vector, error_code if why.vector == PF_VECTOR else 0, -1,
                                             note, vaddr if why.vector == PF_VECTOR else None)
        elif isinstance(why, SliceEnd):
            # The access is abandoned: its instruction (if it began) runs again next slice.
            self.clock.stop_at(self.clock.exact(begun=False))
            self._abandoned = "fetch" if access == UC_MEM_FETCH else "data"
        elif isinstance(why, MmioAccess):
            self.clock.stop_at(self.clock.exact())
            self.vcpu.fail(f"guest access to gpa {why.gpa:#x} (gva {vaddr:#x}) is outside every memslot "
                           f"(guest memory is {self.vcpu.vm.memory_size:#x} bytes)")
        else:
            raise why
        self._refused = True
        return False

    def _mmio_at(self, gpa: int) -> Exception:
        return MmioAccess(gpa)

    def _stop_after_instruction(self) -> None:
        """The C hook stops before the next instruction: the one running completes first."""
        self.clock.stop_now()

    def _current_rip(self) -> int:
        return int(self.uc.reg_read(x86.UC_X86_REG_RIP))

    def _fault_retried(self, gfn: int) -> None:
        """KVM re-entered the guest, which faults again: charge the retry's time and end the slice (always:
        the access is retaken mid-block, and where blocks start must not depend on the slice's limit)."""
        self.clock.fault_retried(self.vcpu, gfn)
        if self._emulating:
            raise SliceEnd()

    def _undefined_opcode(self, note: str, rip: int) -> None:
        """#UD: the instruction does not run (RIP stays on it); the exception is delivered at the slice end."""
        self._pending = PendingException(UD_VECTOR, 0, rip, note)
        self._stop_now()
        self.uc.reg_write(x86.UC_X86_REG_RIP, rip)

    # --- inspection without exits (reports) ----------------------------------------------

    def translate_peek(self, gva: int) -> int | None:
        """gva -> gpa through the guest tables as the VMM reads them (no exits, no faults)."""
        return translate_peek(self._cr3, gva, self.vcpu.vm.read_guest)

    def peek_code(self, gva: int, length: int) -> bytes:
        return peek_bytes(self._cr3, gva, length, self.vcpu.vm.read_guest)

    @property
    def time_in_slice(self) -> int:
        """Simulated time of the running slice: instructions retired plus retried faults' cost."""
        return self.clock.time_in_slice

    @property
    def slice_retired(self) -> int:
        return self.clock.slice_retired

    @property
    def stall_in_slice(self) -> int:
        return self.clock.stall_in_slice

    def instruction_at(self, rip: int) -> str:
        code = self.peek_code(rip, 16)
        return disassemble_one(code, rip) if code else "(not mapped)"

    def describe_rip(self) -> str:
        return f"RIP {self.rip:#x}: {self.instruction_at(self.rip)}"


__all__ = ["UnicornVcpu"]
