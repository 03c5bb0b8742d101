"""Shadow pages (struct kvm_mmu_page), their hash by gfn, and the x86-format spte of shadow paging.

Mirrors arch/x86/kvm/mmu.c of 2.6.32 (sndrzt/linux-2.6.32): a shadow page shadows one
guest page table (or, `direct`, one 2 MiB frame range of a guest large page) and is found
again through the hash by (gfn, role) (`kvm_mmu_get_page`), so that returning to an
address space reuses its shadow tree.  Its 512 sptes are real x86 ptes: a leaf maps a host
pfn with the permissions KVM computed, a link (non-leaf) points at a child shadow page and
is fully permissive.  `active` keeps creation order: recycling zaps the oldest-created page
first (`__kvm_mmu_free_some_pages`, FIFO: 2.6.32 does not touch a page on a hash hit).
"""

from dataclasses import dataclass, field
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

# x86 pte bits (arch/x86/kvm/mmu.c PT_*_MASK); the same bits in guest ptes and in shadow sptes.
PT_PRESENT: Final = 1 << 0
PT_WRITABLE: Final = 1 << 1
PT_USER: Final = 1 << 2
PT_ACCESSED: Final = 1 << 5
PT_DIRTY: Final = 1 << 6
PT_PAGE_SIZE: Final = 1 << 7
PT64_NX: Final = 1 << 63
PT64_BASE_ADDR_MASK: Final = ((1 << 52) - 1) & ~0xFFF
# 2.6.32 mmu.c: SPTE_HOST_WRITEABLE = 1 << PT_FIRST_AVAIL_BITS_SHIFT (9).
SPTE_HOST_WRITEABLE_X86: Final = 1 << 9
# shadow_trap_nonpresent_pte under bypass_guest_pf (2.6.32 vmx.c vmx_init:
# kvm_mmu_set_nonpresent_ptes(~0xffeull, 0ull)): present + reserved bits, so a #PF on it has
# P=1|RSVD and exits; shadow_notrap_nonpresent_pte (0) gives a P=0 #PF that goes to the guest.
SPTE_TRAP: Final = ~0xFFE & 0xFFFF_FFFF_FFFF_FFFF
SPTE_NOTRAP: Final = 0
# fetch() links a child table with every permission: access is enforced only in leaves.
LINK_BITS: Final = PT_PRESENT | PT_ACCESSED | PT_WRITABLE | PT_USER

# role.access bits (mmu.c ACC_*_MASK).
ACC_EXEC: Final = 1
ACC_WRITE: Final = PT_WRITABLE
ACC_USER: Final = PT_USER
ACC_ALL: Final = ACC_EXEC | ACC_WRITE | ACC_USER

# #PF error code bits (PFERR_*_MASK).
PFERR_PRESENT: Final = 1 << 0
PFERR_WRITE: Final = 1 << 1
PFERR_USER: Final = 1 << 2
PFERR_RSVD: Final = 1 << 3
PFERR_FETCH: Final = 1 << 4

PT64_ENT_PER_PAGE: Final = 512


def is_shadow_present_pte(spte: int) -> bool:
    """2.6.32 mmu.c: neither of the two non-present values (trap, notrap)."""
    return spte != SPTE_TRAP and spte != SPTE_NOTRAP


def spte_to_pfn(spte: int) -> int:
    return (spte & PT64_BASE_ADDR_MASK) >> 12


def shadow_index(gva: int, level: int) -> int:
    """SHADOW_PT_INDEX: the 9 bits of gva that index a table of `level`."""
    return (gva >> (12 + 9 * (level - 1))) & 511


class Role(NamedTuple):
    """union kvm_mmu_page_role, the fields hvsim's long-mode guests vary (glevels is always 4)."""

    level: int
    direct: bool
    access: int


@dataclass(eq=False)
class KvmMmuPage:
    """struct kvm_mmu_page."""

    sp_id: int
    gfn: int
    role: Role
    spt: npt.NDArray[np.uint64]
    # Leaf slots: the gfn each present spte maps (sp->gfns, used by rmap_remove).
    gfns: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(PT64_ENT_PER_PAGE, dtype=np.int64))
    # Link slots: the child shadow page each present link points at (the spte holds its id).
    children: dict[int, "KvmMmuPage"] = field(default_factory=dict)
    # The link sptes that point here (sp->parent_pte / parent_ptes): (parent page, index).
    parent_ptes: list[tuple["KvmMmuPage", int]] = field(default_factory=list)
    root_count: int = 0
    invalid: bool = False
    unsync: bool = False

    def __post_init__(self) -> None:
        self.view = self.spt.data  # scalar access without numpy boxing

    def link_spte(self) -> int:
        """__pa(sp->spt) | PRESENT | ACCESSED | WRITABLE | USER: the id stands for the table's address."""
        return (self.sp_id << 12) | LINK_BITS


class ShadowPageHash:
    """kvm->arch.mmu_page_hash plus active_mmu_pages and the n_max_mmu_pages accounting."""

    def __init__(self, n_max_mmu_pages: int) -> None:
        self.by_gfn: dict[int, list[KvmMmuPage]] = {}
        self.active: dict[int, KvmMmuPage] = {}  # creation order: the first is the oldest
        self.n_max_mmu_pages = n_max_mmu_pages
        self._next_id = 1

    @property
    def n_used_mmu_pages(self) -> int:
        return len(self.active)

    def lookup(self, gfn: int, role: Role) -> KvmMmuPage | None:
        for sp in self.by_gfn.get(gfn, ()):
            if sp.role == role and not sp.invalid:
                return sp
        return None

    def indirect_pages(self, gfn: int) -> list[KvmMmuPage]:
        """The valid shadow pages shadowing guest page table gfn (kvm_mmu_lookup_page's candidates)."""
        return [sp for sp in self.by_gfn.get(gfn, ()) if not sp.role.direct and not sp.invalid]

    def alloc(self, gfn: int, role: Role, fill: int) -> KvmMmuPage:
        """kvm_mmu_alloc_page + hlist_add_head: a new page, its sptes all `fill`."""
        sp = KvmMmuPage(self._next_id, gfn, role, np.full(PT64_ENT_PER_PAGE, fill, dtype=np.uint64))
        self._next_id += 1
        self.by_gfn.setdefault(gfn, []).insert(0, sp)
        self.active[sp.sp_id] = sp
        return sp

    def free(self, sp: KvmMmuPage) -> None:
        """kvm_mmu_free_page: out of the hash and the active list."""
        self.by_gfn[sp.gfn].remove(sp)
        if not self.by_gfn[sp.gfn]:
            del self.by_gfn[sp.gfn]
        del self.active[sp.sp_id]

    def move_to_head(self, sp: KvmMmuPage) -> None:
        """A zapped root still in use goes to the head (the youngest end) of active_mmu_pages."""
        del self.active[sp.sp_id]
        self.active[sp.sp_id] = sp

    def oldest(self) -> KvmMmuPage | None:
        return next(iter(self.active.values()), None)


def kvm_mmu_calculate_mmu_pages(nr_pages: int) -> int:
    """2.6.32 mmu.c: max(memslot pages * KVM_PERMILLE_MMU_PAGES (20) / 1000, KVM_MIN_ALLOC_MMU_PAGES (64))."""
    return max(nr_pages * 20 // 1000, 64)


# kvm_mmu_free_some_pages: recycle when fewer than KVM_MIN_FREE_MMU_PAGES are free, up to KVM_REFILL_PAGES.
KVM_MIN_FREE_MMU_PAGES: Final = 5
KVM_REFILL_PAGES: Final = 25
# mmu_set_spte: an rmap longer than this is recycled (rmap_recycle).
RMAP_RECYCLE_THRESHOLD: Final = 1000
