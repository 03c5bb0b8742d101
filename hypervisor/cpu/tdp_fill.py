"""The TDP (EPT) branch of a Unicorn vCPU's TLB fill: the guest walk, then the leaf spte of the gfn.

On a TLB miss the hardware walks the guest's 4-level page tables (cpu/walk.py `walk_gva`,
gva -> gpa; the walk's own reads of page-table pages go through the sptes, as a real EPT walk
does) and then looks up the leaf spte (gfn -> pfn).  A missing or read-only spte for the access
is an EPT_VIOLATION exit, handled right there by KVM's fault path (kvm/vcpu.py); a retried
fault is another exit.  cpu/shadow_fill.py is the `--mmu shadow` branch.
"""

from collections.abc import Callable
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import unicorn
from mypy_extensions import trait

from ..kvm.mmu import TdpMmu
from ..kvm.mmu_interface import FaultResult
from ..kvm.spte import SPTE_ACCESSED, SPTE_DIRTY, SPTE_PFN_MASK, SPTE_READABLE, SPTE_WRITABLE
from ..types import PAGE_SHIFT, PAGE_SIZE, Gfn
from .fill_state import FillState
from .walk import GuestFault, PagingStructureCache, walk_gva

_SPTE_RA: Final = SPTE_READABLE | SPTE_ACCESSED
_SPTE_RAWD: Final = _SPTE_RA | SPTE_WRITABLE | SPTE_DIRTY
# Named once for the exit loop (an Enum member read from its class costs about 80 ns on Python
# 3.11, four times a plain name: EnumType defines __getattr__).
_FAULT_MMIO: Final = FaultResult.MMIO
_FAULT_RETRY: Final = FaultResult.RETRY
# Unicorn's constants as Final ints: mypy sees the binding as untyped (Any), so the compiled build
# (setup.py) would look each name up in this module's globals and compare it as an object at every use.
UC_MEM_FETCH: Final[int] = unicorn.UC_MEM_FETCH
UC_MEM_WRITE: Final[int] = unicorn.UC_MEM_WRITE
UC_PROT_ALL: Final[int] = unicorn.UC_PROT_ALL
UC_PROT_EXEC: Final[int] = unicorn.UC_PROT_EXEC
UC_PROT_READ: Final[int] = unicorn.UC_PROT_READ


class SliceEnd(Exception):
    """A retried fault used up the slice: the access is abandoned and re-taken next slice."""


class MmioAccess(Exception):
    """The access reached a gpa outside every memslot."""

    def __init__(self, gpa: int) -> None:
        self.gpa = gpa


@trait
class TdpFill(FillState):
    """The EPT branch of UnicornVcpu's MMU (a mixin: UnicornVcpu provides the state and exit plumbing).

    A mypyc trait, as are the other mixins of UnicornVcpu: the compiled build (setup.py) compiles them
    together with it, since mypyc lets a native class have one native base class plus traits only,
    and no interpreted class may inherit from a compiled one."""

    _pscache: PagingStructureCache
    _leaf_sptes: memoryview | None
    _nr_gfns: int
    _qwords: npt.NDArray[np.uint64]

    # The EPT MMU, typed as what it is (UnicornVcpu sets it under TDP only): the compiled build calls its
    # translate directly, where a bound method held as a Callable is a Python call with boxed arguments.
    _tdp_mmu: TdpMmu
    # The walk's pte reader: this vCPU's _read_pte, bound once (UnicornVcpu.__init__), since in the compiled
    # build naming a method as a value makes a new bound-method object each time, once per fill here.
    # It refers back to the vCPU: close() drops it.
    _pte_reader: Callable[[int], int]
    __deletable__ = ("_pte_reader",)  # UnicornVcpu.close()

    def _fill_refused(self, vaddr: int, access: int, why: Exception, entry: Any = None) -> bool:
        raise NotImplementedError

    # CR3 on fetch fills: a guest's mov to CR3 raises no event, but the cached upper levels of the
    # walks must go with it.  Unicorn 2.1.4 (QEMU 5) flushes its TLB on every CR3 write with paging
    # on (cpu_x86_update_cr3) and ends the translation block after a mov to CR; the next
    # instruction is looked up afresh, which fills its page for a fetch before it can make any data
    # access.  So the first fill after a CR3 write is a fetch fill, and reading CR3 on fetch fills
    # only (a raw call, ~0.4 us) sees every switch before the new address space is used.
    # (tests/unit/test_guest_walk.py: the cache keeps the old root until emptied;
    # tests/sdk/test_workloads.py: forkserver switches CR3 per child with the same counts at any
    # --quantum.)
    def _tlb_fill(self, vaddr: int, access: int, entry: Any) -> bool:
        """The hardware MMU on a Unicorn TLB miss (the TLB-fill hook under TDP): guest walk (gva -> gpa),
        then the EPT (gfn -> pfn)."""
        fetch = access == UC_MEM_FETCH
        if fetch:  # see above: a CR3 write shows first at a fetch fill
            cr3 = self._read_cr3()
            if cr3 != self._cr3:
                self._cr3 = cr3
                self._pscache.clear()
        if self._refused or self._resume_rip is not None:
            # After a stop behind an instruction (the exit port), Unicorn may begin the next one
            # before it stops: that access never happens for the guest, so it takes no exit.
            return False
        write = access == UC_MEM_WRITE
        if fetch:
            self.clock.fetching = True  # a fetch fill comes between instructions (cpu/clock.py exact())
        try:
            gpa, guest_writable = walk_gva(self._cr3, vaddr, write, self._pte_reader, self._pscache)
            gfn = gpa >> PAGE_SHIFT
            leaf = self._leaf_sptes
            if leaf is not None and gfn < self._nr_gfns:
                spte = leaf[gfn]
                wanted = _SPTE_RAWD if write else _SPTE_RA
                if spte & wanted != wanted:
                    # Permitted but A/D to set: translate (set_spte); not permitted: an exit.
                    permitted = spte & SPTE_READABLE and (not write or spte & SPTE_WRITABLE)
                    spte = self._tdp_mmu.translate(gfn, write) if permitted else 0
            else:
                spte = self._tdp_mmu.translate(gfn, write) if gfn < self._nr_gfns else 0
            if not spte:
                spte = self._ept(gfn, write, fetch, True)
        except (GuestFault, SliceEnd, MmioAccess) as why:
            return self._fill_refused(vaddr, access, why, entry)
        finally:
            if fetch:
                self.clock.fetching = False
        paddr = spte & SPTE_PFN_MASK
        pfn = paddr >> PAGE_SHIFT
        entry.paddr = paddr
        if spte & SPTE_WRITABLE and guest_writable:
            entry.perms = UC_PROT_ALL
        else:
            entry.perms = UC_PROT_READ | UC_PROT_EXEC
        if fetch:
            self._code.fetched(vaddr, pfn)
            self.sensitive.scan(vaddr >> PAGE_SHIFT, pfn, self._frames_2d)
        elif write:
            self._code.written(pfn)
        if self.tlb_entries is not None:
            self.tlb_entries[vaddr >> PAGE_SHIFT] = (gfn, pfn, entry.perms == UC_PROT_ALL)
        return True

    def _ept(self, gfn: int, write: bool, fetch: bool = False, translated: bool = False) -> int:
        """The leaf spte for gfn, taking EPT_VIOLATION exits until it permits the access.

        The MMU's translate sets the accessed (and, for a write, dirty) bit, as hardware with A/D does.
        `translated`: the caller's translate already said no.
        """
        if gfn >= self._nr_gfns:
            # Beyond every memslot: still an EPT violation, which KVM passes on as MMIO.
            self.vcpu.handle_ept_violation(Gfn(gfn), write, self._rip_for_trace(), fetch)
            raise MmioAccess(gfn << PAGE_SHIFT)
        mmu = self._tdp_mmu
        spte = 0 if translated else mmu.translate(gfn, write)
        while not spte:
            vcpu = self.vcpu
            rip = self._current_rip() if vcpu.vm.tracer.enabled else 0  # _rip_for_trace()
            result = vcpu.handle_ept_violation(Gfn(gfn), write, rip, fetch)
            if result is _FAULT_MMIO:
                raise MmioAccess(gfn << PAGE_SHIFT)
            spte = mmu.translate(gfn, write)
            if result is _FAULT_RETRY or not spte:
                self._fault_retried(gfn)  # the guest faults again: that costs time, and may livelock
        return spte

    def _read_pte(self, pte_gpa: int) -> int:
        """A guest page-table entry, read through the EPT as the hardware walker does."""
        spte = self._ept(pte_gpa >> PAGE_SHIFT, False)
        return int(self._qwords[(spte & SPTE_PFN_MASK) >> PAGE_SHIFT, (pte_gpa & (PAGE_SIZE - 1)) >> 3])
