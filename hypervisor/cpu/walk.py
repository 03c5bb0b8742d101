"""The guest's 4-level page walk (gva -> gpa), as the hardware walker does it; pure logic over a pte reader.

`walk_gva` is what the vCPU's TLB fill runs: it takes the pte reader (which, in the
vCPU, reads guest page-table pages through the EPT, taking exits) and the
paging-structure cache it may use and fill, and returns (gpa, writable) or raises
GuestFault; it keeps no state of its own.
"""

from collections.abc import Callable
from typing import Final

from ..types import PAGE_SIZE, Gpa
from ..x86 import CANONICAL_HIGH_START, CANONICAL_LOW_END, PTE_ADDR_MASK, PTE_P, PTE_PS, PTE_RW
from .exceptions import PF_ERR_PRESENT, PF_VECTOR

# Final: the compiled build (setup.py) reads these from C statics, not from the module's dict, on every fill.
UPPER_SHIFTS: Final = (39, 30, 21)
LEAF_SHIFT: Final = (12,)
LARGE_OFFSET: Final = (1 << 21) - 1  # a large page is cached and handed out per 2 MiB region
_GP_VECTOR: Final = 13


class GuestFault(Exception):
    """The walk hit a fault: delivered to the guest's IDT, or a triple fault without one."""

    def __init__(self, what: str, vector: int, error_code: int = 0) -> None:
        super().__init__(what)
        self.vector = vector
        self.error_code = error_code


# The paging-structure cache: 2 MiB region of gva (gva >> 21) -> walk_levels' result for
# the upper levels (PML4E, PDPTE, PDE): (next table or 2 MiB region base, large, writable).
PagingStructureCache = dict[int, tuple[int, bool, bool]]


def walk_levels(table: int, gva: int, shifts: tuple[int, ...],
                 read_pte: Callable[[int], int]) -> tuple[int, bool, bool]:
    """Walk the guest's paging levels `shifts` from `table`.

    Returns (base, large, writable): the next table or 4 KiB frame after the last
    level, or, when a PDPTE/PDE maps a large page, the base of the 2 MiB region of
    `gva` inside it (large); writable is the AND of the R/W bits on the way.
    """
    if not (gva < CANONICAL_LOW_END or gva >= CANONICAL_HIGH_START):
        raise GuestFault("#GP non-canonical address", _GP_VECTOR)
    table &= PTE_ADDR_MASK
    writable = True
    for shift in shifts:
        pte = read_pte(table + (((gva >> shift) & 511) << 3))
        if not pte & PTE_P:
            raise GuestFault("#PF page not present", PF_VECTOR)
        writable = writable and bool(pte & PTE_RW)
        if shift in (30, 21) and pte & PTE_PS:
            size_mask = (1 << shift) - 1
            return (pte & PTE_ADDR_MASK & ~size_mask) | (gva & size_mask & ~LARGE_OFFSET), True, writable
        table = pte & PTE_ADDR_MASK
    return table, False, writable


def walk_gva(cr3: int, gva: int, write: bool, read_pte: Callable[[int], int],
             pscache: PagingStructureCache) -> tuple[int, bool]:
    """gva -> (gpa, writable) through the guest's 4-level tables rooted at cr3; raises GuestFault.

    The upper levels of each 2 MiB region come from `pscache` when it has them (as the
    hardware's paging-structure caches do) and are added to it otherwise; the caller
    empties it on a TLB flush or a CR3 change.  `writable` is the AND of the R/W bits
    of every level (the walk's result for a read); a write through a read-only level
    is a #PF with the present bit set in its error code.
    """
    upper = pscache.get(gva >> 21)
    if upper is None:
        upper = pscache[gva >> 21] = walk_levels(cr3, gva, UPPER_SHIFTS, read_pte)
    base, large, writable = upper
    if large:
        gpa = base | (gva & LARGE_OFFSET)
    else:
        frame, _, leaf_writable = walk_levels(base, gva, LEAF_SHIFT, read_pte)
        writable = writable and leaf_writable
        gpa = frame | (gva & (PAGE_SIZE - 1))
    if write and not writable:
        raise GuestFault("#PF write to a read-only page", PF_VECTOR, PF_ERR_PRESENT)
    return gpa, writable


def translate_peek(cr3: int, gva: int, read_guest: Callable[[Gpa, int], bytes]) -> int | None:
    """gva -> gpa through the guest tables as the VMM reads them (no exits, no faults)."""

    def read_pte(pte_gpa: int) -> int:
        try:
            return int.from_bytes(read_guest(Gpa(pte_gpa), 8), "little")
        except ValueError:
            raise GuestFault("page table outside guest memory", PF_VECTOR) from None

    try:
        return walk_gva(cr3, gva, False, read_pte, {})[0]
    except GuestFault:
        return None


def peek_bytes(cr3: int, gva: int, length: int, read_guest: Callable[[Gpa, int], bytes]) -> bytes:
    """Up to length bytes of guest memory from gva, as far as they translate (the VMM's view, no exits)."""
    out = bytearray()
    for addr in range(gva, gva + length):
        gpa = translate_peek(cr3, addr, read_guest)
        if gpa is None:
            break
        try:
            out += read_guest(Gpa(gpa), 1)
        except ValueError:
            break
    return bytes(out)
