"""The host's x86 pte bits, named as in arch/x86/include/asm/pgtable_types.h (_PAGE_*), plus hvsim's software bit.

These are the host's ptes (hva -> pfn, host/mm.py); the guest's ptes are hypervisor/x86.py,
KVM's sptes kvm/spte.py.
"""

from typing import Final

from ..types import PAGE_SHIFT

_PAGE_PRESENT: Final = 1 << 0
_PAGE_RW: Final = 1 << 1
_PAGE_ACCESSED: Final = 1 << 5
_PAGE_DIRTY: Final = 1 << 6
_PAGE_SPECIAL: Final = 1 << 9  # a pte with no struct page behind it: the zero page
# 6.x marks a zero-page pte installed by KSM (use_zero_pages) so that ksm_zero_pages
# can be decremented when it goes; hvsim keeps that mark in a software bit.
_PAGE_KSM_ZERO: Final = 1 << 10
_PTE_FLAGS_MASK: Final = (1 << PAGE_SHIFT) - 1
