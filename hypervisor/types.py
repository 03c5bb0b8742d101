"""Address-space vocabulary of KVM: gfn/gpa/gva on the guest side, hva/pfn on the host side."""

from typing import Final, NewType

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
PAGE_MASK: Final = ~(PAGE_SIZE - 1)

Gfn = NewType("Gfn", int)
Gpa = NewType("Gpa", int)
Gva = NewType("Gva", int)
Pfn = NewType("Pfn", int)
Hva = NewType("Hva", int)


def gpa_to_gfn(gpa: Gpa) -> Gfn:
    return Gfn(gpa >> PAGE_SHIFT)


def gfn_to_gpa(gfn: Gfn) -> Gpa:
    return Gpa(gfn << PAGE_SHIFT)


def pfn_to_hpa(pfn: Pfn) -> int:
    return pfn << PAGE_SHIFT


def page_align_down(addr: int) -> int:
    return addr & PAGE_MASK


def is_page_aligned(addr: int) -> bool:
    return addr & (PAGE_SIZE - 1) == 0
