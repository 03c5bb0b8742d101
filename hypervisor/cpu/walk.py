"""The guest's 4-level page walk (gva -> gpa), as the hardware walker does it; pure logic over a pte reader."""

from collections.abc import Callable

from ..types import PAGE_SIZE, Gpa
from .exceptions import PF_VECTOR

_PTE_P = 1 << 0
_PTE_RW = 1 << 1
_PTE_PS = 1 << 7
_PTE_ADDR = 0x000F_FFFF_FFFF_F000
UPPER_SHIFTS = (39, 30, 21)
LEAF_SHIFT = (12,)
LARGE_OFFSET = (1 << 21) - 1  # a large page is cached and handed out per 2 MiB region
_GP_VECTOR = 13


class GuestFault(Exception):
    """The walk hit a fault: delivered to the guest's IDT, or a triple fault without one."""

    def __init__(self, what: str, vector: int, error_code: int = 0) -> None:
        super().__init__(what)
        self.vector = vector
        self.error_code = error_code



def walk_levels(table: int, gva: int, shifts: tuple[int, ...],
                 read_pte: Callable[[int], int]) -> tuple[int, bool, bool]:
    """Walk the guest's paging levels `shifts` from `table`.

    Returns (base, large, writable): the next table or 4 KiB frame after the last
    level, or, when a PDPTE/PDE maps a large page, the base of the 2 MiB region of
    `gva` inside it (large); writable is the AND of the R/W bits on the way.
    """
    if not (gva < 0x0000_8000_0000_0000 or gva >= 0xFFFF_8000_0000_0000):
        raise GuestFault("#GP non-canonical address", _GP_VECTOR)
    table &= _PTE_ADDR
    writable = True
    for shift in shifts:
        pte = read_pte(table + (((gva >> shift) & 511) << 3))
        if not pte & _PTE_P:
            raise GuestFault("#PF page not present", PF_VECTOR)
        writable = writable and bool(pte & _PTE_RW)
        if shift in (30, 21) and pte & _PTE_PS:
            size_mask = (1 << shift) - 1
            return (pte & _PTE_ADDR & ~size_mask) | (gva & size_mask & ~LARGE_OFFSET), True, writable
        table = pte & _PTE_ADDR
    return table, False, writable


def translate_peek(cr3: int, gva: int, read_guest: Callable[[Gpa, int], bytes]) -> int | None:
    """gva -> gpa through the guest tables as the VMM reads them (no exits, no faults)."""

    def read_pte(pte_gpa: int) -> int:
        try:
            return int.from_bytes(read_guest(Gpa(pte_gpa), 8), "little")
        except ValueError:
            raise GuestFault("page table outside guest memory", PF_VECTOR) from None

    try:
        base, large, _ = walk_levels(cr3, gva, UPPER_SHIFTS + LEAF_SHIFT, read_pte)
    except GuestFault:
        return None
    return base | (gva & (LARGE_OFFSET if large else PAGE_SIZE - 1))


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
