"""KVM's software walk of the guest's page tables for shadow paging (FNAME(walk_addr), paging_tmpl.h).

Read in sndrzt/linux-2.6.32 arch/x86/kvm/paging_tmpl.h `FNAME(walk_addr)` and
`FNAME(gpte_access)`: from CR3 down to the leaf (a 4 KiB pte, or a PDE/PDPTE with PS),
checking presence, W (a supervisor write to a read-only page faults only with CR0.WP),
U/S; setting A in every level it passes and D in the leaf on a write fault
(`FNAME(cmpxchg_gpte)`, a host write through the memslot); accumulating the access
rights (`pt_access` of the tables above the leaf, `pte_access` including it).  On a
failure it returns the error code the guest's #PF will carry.  Pure logic over a
guest-memory reader and writer; unlike cpu/walk.py (the hardware walk of TDP), it runs
inside KVM and is what decides whether a guest #PF is injected.

hvsim's guests run in ring 0 with CR0.WP=1 and EFER.NXE=0 (the boot state), so NX is
not checked and every access is a supervisor access (simplification, README).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

from .shadow_page import (
    ACC_ALL,
    ACC_EXEC,
    PFERR_FETCH,
    PFERR_PRESENT,
    PFERR_USER,
    PFERR_WRITE,
    PT64_BASE_ADDR_MASK,
    PT_ACCESSED,
    PT_DIRTY,
    PT_PAGE_SIZE,
    PT_PRESENT,
    PT_USER,
    PT_WRITABLE,
)


@dataclass(slots=True)
class GuestWalker:
    """struct guest_walker: per level (index level - 1) the table gfn, pte gpa and pte read."""

    level: int = 4
    table_gfn: list[int] = field(default_factory=lambda: [0] * 4)
    pte_gpa: list[int] = field(default_factory=lambda: [0] * 4)
    ptes: list[int] = field(default_factory=lambda: [0] * 4)
    gfn: int = 0
    pt_access: int = ACC_ALL
    pte_access: int = ACC_ALL
    error_code: int = 0


def gpte_access(gpte: int) -> int:
    """FNAME(gpte_access) without NX (EFER.NXE is clear): W and U from the gpte, exec always."""
    return (gpte & (PT_WRITABLE | PT_USER)) | ACC_EXEC


def gpte_to_gfn(gpte: int) -> int:
    return (gpte & PT64_BASE_ADDR_MASK) >> 12


def walk_addr(cr3: int, addr: int, write_fault: bool, user_fault: bool, fetch_fault: bool,
              read_gpte: Callable[[int], int],
              cmpxchg_gpte: Callable[[int, int, int], bool]) -> tuple[bool, GuestWalker]:
    """FNAME(walk_addr) for 4-level long mode: (found, walker); on a fault walker.error_code is the #PF's.

    cmpxchg_gpte(gpa, old, new) writes new if the gpte still holds old; false restarts the walk.
    """
    walker = GuestWalker()
    while True:
        result = _walk_once(walker, cr3, addr, write_fault, user_fault, read_gpte, cmpxchg_gpte)
        if result is not None:
            break
    if not result:
        if write_fault:
            walker.error_code |= PFERR_WRITE
        if user_fault:
            walker.error_code |= PFERR_USER
        if fetch_fault:
            walker.error_code |= PFERR_FETCH
    return result, walker


def _walk_once(w: GuestWalker, cr3: int, addr: int, write_fault: bool, user_fault: bool,
               read_gpte: Callable[[int], int], cmpxchg_gpte: Callable[[int, int, int], bool]) -> bool | None:
    """One pass of the walk loop: True (found), False (fault: w.error_code), None (a gpte changed: walk again)."""
    w.level = 4
    pte = cr3
    pt_access = ACC_ALL
    pte_access = ACC_ALL
    while True:
        level = w.level
        index = (addr >> (12 + 9 * (level - 1))) & 511
        table_gfn = gpte_to_gfn(pte)
        pte_gpa = (table_gfn << 12) + index * 8
        w.table_gfn[level - 1] = table_gfn
        w.pte_gpa[level - 1] = pte_gpa
        pte = read_gpte(pte_gpa)
        if not pte & PT_PRESENT:
            w.error_code = 0
            return False
        # A supervisor write to a read-only page faults only with CR0.WP, which hvsim's boot sets.
        if (write_fault and not pte & PT_WRITABLE) or (user_fault and not pte & PT_USER):
            w.error_code = PFERR_PRESENT
            return False
        if not pte & PT_ACCESSED:
            if not cmpxchg_gpte(pte_gpa, pte, pte | PT_ACCESSED):
                return None
            pte |= PT_ACCESSED
        pte_access = pt_access & gpte_access(pte)
        w.ptes[level - 1] = pte
        if level == 1 or (level in (2, 3) and pte & PT_PAGE_SIZE):
            offset_mask = (1 << (12 + 9 * (level - 1))) - 1
            w.gfn = gpte_to_gfn(pte & ~offset_mask) + ((addr & offset_mask) >> 12)
            break
        pt_access = pte_access
        w.level -= 1
    if write_fault and not pte & PT_DIRTY:
        if not cmpxchg_gpte(w.pte_gpa[w.level - 1], pte, pte | PT_DIRTY):
            return None
        w.ptes[w.level - 1] = pte | PT_DIRTY
    w.pt_access = pt_access
    w.pte_access = pte_access
    return True


__all__ = ["GuestWalker", "gpte_access", "gpte_to_gfn", "walk_addr"]
