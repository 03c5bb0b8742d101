"""x86-64 architectural bits a guest sees: 4-level paging entries, the control registers and EFER of long mode.

Guest paging entries (the loader writes them, cpu/walk.py reads them) have the
layout of the Intel SDM vol. 3, 4.5 "4-level paging" (Linux names the same bits
_PAGE_* in arch/x86/include/asm/pgtable_types.h).  These are the *guest's* ptes:
the host's ptes are host/pgtable_types.py, KVM's sptes kvm/spte.py.
"""

from typing import Final

PTE_P: Final = 1 << 0  # present
PTE_RW: Final = 1 << 1  # writable
PTE_US: Final = 1 << 2  # user
PTE_A: Final = 1 << 5  # accessed
PTE_D: Final = 1 << 6  # dirty (a leaf)
PTE_PS: Final = 1 << 7  # page size: a PDPTE or PDE that maps a 1 GiB or 2 MiB page
PTE_NX: Final = 1 << 63  # execute disable (with EFER.NXE)
PTE_ADDR_MASK: Final = 0x000F_FFFF_FFFF_F000  # bits 12-51: the next table or the frame

CR0_PE: Final = 1 << 0
CR0_ET: Final = 1 << 4
CR0_WP: Final = 1 << 16
CR0_PG: Final = 1 << 31
CR4_PAE: Final = 1 << 5
MSR_EFER: Final = 0xC0000080
EFER_LME: Final = 1 << 8
EFER_LMA: Final = 1 << 10

# A gva is canonical when bits 63-47 are all equal (48-bit linear addresses).
CANONICAL_LOW_END: Final = 0x0000_8000_0000_0000
CANONICAL_HIGH_START: Final = 0xFFFF_8000_0000_0000
