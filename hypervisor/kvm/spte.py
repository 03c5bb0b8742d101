"""EPT-format shadow pte (spte) bits and pure int -> int helpers, after arch/x86/kvm/mmu.c.

A TDP spte maps a gfn to a host pfn: bits 0-2 are the EPT read/write/execute
permissions, 8 and 9 the accessed/dirty bits, 12-51 the pfn.  SPTE_HOST_WRITEABLE
(a software bit) records that the host pte allowed writes when the spte was made.
"""

from typing import Final

from ..types import PAGE_SHIFT, Pfn

SPTE_READABLE: Final = 1 << 0
SPTE_WRITABLE: Final = 1 << 1  # PT_WRITABLE_MASK
SPTE_EXECUTABLE: Final = 1 << 2
SPTE_ACCESSED: Final = 1 << 8
SPTE_DIRTY: Final = 1 << 9
SPTE_HOST_WRITEABLE: Final = 1 << 57
SPTE_PFN_MASK: Final = ((1 << 52) - 1) & ~((1 << PAGE_SHIFT) - 1)

# shadow_trap_nonpresent_pte: an empty slot faults with EPT_VIOLATION.
SPTE_NONPRESENT: Final = 0


# make_spte's bits, each set ORed once here: pure Python would OR the module-level names anew at every
# call, once per EPT_VIOLATION exit (the compiled build folds Final expressions itself).
_SPTE_PRESENT: Final = SPTE_READABLE | SPTE_EXECUTABLE
_SPTE_WRITABLE_HOST: Final = SPTE_WRITABLE | SPTE_HOST_WRITEABLE


def make_spte(pfn: Pfn, writable: bool, accessed: bool = True) -> int:
    spte = (pfn << PAGE_SHIFT) | _SPTE_PRESENT
    if writable:
        spte |= _SPTE_WRITABLE_HOST
    if accessed:
        spte |= SPTE_ACCESSED
    return spte


def is_shadow_present_pte(spte: int) -> bool:
    return bool(spte & SPTE_READABLE)


def is_writable_pte(spte: int) -> bool:
    return bool(spte & SPTE_WRITABLE)


def is_accessed_spte(spte: int) -> bool:
    return bool(spte & SPTE_ACCESSED)


def spte_to_pfn(spte: int) -> Pfn:
    return Pfn((spte & SPTE_PFN_MASK) >> PAGE_SHIFT)


def spte_set_pfn_readonly(spte: int, new_pfn: Pfn) -> int:
    """kvm_set_pte_rmapp()'s in-place rewrite: the new pfn, not writable, not host-writable."""
    new = (spte & ~SPTE_PFN_MASK) | (new_pfn << PAGE_SHIFT)
    return new & ~(SPTE_WRITABLE | SPTE_HOST_WRITEABLE)


def spte_clear_accessed(spte: int) -> int:
    return spte & ~SPTE_ACCESSED


def spte_permits(spte: int, write: bool) -> bool:
    """Would the hardware walk succeed for this access, or take an EPT violation?"""
    if not spte & SPTE_READABLE:
        return False
    return not write or bool(spte & SPTE_WRITABLE)
