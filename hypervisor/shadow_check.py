"""The shadow-paging invariants of `--check` (every VM run with `--mmu shadow`), checked in each sweep.

* shadow-spte-follows-guest: a present leaf spte maps the gfn its guest pte names (for a direct
  shadow page: the frame of the guest large page plus its index), and a link points at the shadow
  page of the table its guest entry names;
* spte-follows-pte: it maps the pfn the host pte of that gfn maps, and is writable only if the host
  pte is;
* shadowed-gfn-write-protected: no spte that maps a guest page table KVM shadows is writable
  (2.6.32 mmu.c rmap_write_protect, mmu_need_write_protect), unless the table's shadow page is
  unsync (then its sptes may also lag the guest's table until it is synced);
* spte-on-rmap: every present leaf spte is on the rmap of its gfn, and every rmap entry is one.
"""

from collections.abc import Callable
from typing import NoReturn

from .host.pgtable_types import _PAGE_PRESENT, _PAGE_RW
from .kvm.guest_walker import gpte_to_gfn
from .kvm.shadow_mmu import ShadowMmu
from .kvm.shadow_page import PT_PRESENT, PT_WRITABLE, is_shadow_present_pte, spte_to_pfn
from .kvm.vm import Vm
from .types import PAGE_SHIFT, Gfn, Gpa

Fail = Callable[[str, str], NoReturn]


def check_shadow(vm: Vm, fail: Fail) -> None:
    mmu = vm.mmu
    if not isinstance(mmu, ShadowMmu):
        return
    on_rmap = {(id(sp), index) for chain in mmu.rmap.heads.values() for sp, index in chain}
    for sp in mmu.pages.active.values():
        if sp.invalid:
            continue
        table = None if sp.role.direct else vm.read_guest(Gpa(sp.gfn << PAGE_SHIFT), 4096)
        for index in range(512):
            spte = int(sp.view[index])
            if not is_shadow_present_pte(spte):
                continue
            where = f"vm{vm.vm_id} shadow page of gfn {sp.gfn:#x} (level {sp.role.level}) slot {index}"
            gpte = 0 if table is None else int.from_bytes(table[index * 8:index * 8 + 8], "little")
            if sp.role.level > 1:
                child = sp.children.get(index)
                if child is None or (not child.role.direct and child.gfn != gpte_to_gfn(gpte)):
                    fail("shadow-spte-follows-guest", f"{where}: the link does not match guest entry {gpte:#x}")
                continue
            gfn = int(sp.gfns[index])
            if (id(sp), index) not in on_rmap:
                fail("spte-on-rmap", f"{where}: spte {spte:#x} of gfn {gfn:#x} is not on the gfn's rmap")
            want = sp.gfn + index if sp.role.direct else gpte_to_gfn(gpte)
            if table is not None and not gpte & PT_PRESENT:
                want = -1
            if gfn != want and not sp.unsync:
                fail("shadow-spte-follows-guest", f"{where}: the spte maps gfn {gfn:#x}, the guest pte "
                     f"{gpte:#x} says {want:#x}")
            hva = vm.gpa_to_hva(Gpa(gfn << PAGE_SHIFT))
            pte = 0 if hva is None else int(vm.mm.pte(hva))
            if not pte & _PAGE_PRESENT or pte >> PAGE_SHIFT != spte_to_pfn(spte):
                fail("spte-follows-pte", f"{where}: gfn {gfn:#x} spte maps pfn {spte_to_pfn(spte):#x}, "
                     f"host pte {pte:#x}")
            if spte & PT_WRITABLE and not pte & _PAGE_RW:
                fail("writable-spte", f"{where}: gfn {gfn:#x} spte is writable, the host pte is not")
    for gfn, chain in mmu.rmap.heads.items():
        # An unsync page's table may be written by the guest (and its sptes be stale) until the next sync.
        sps = mmu.pages.indirect_pages(gfn)
        shadowed = bool(sps) and not any(sp.unsync for sp in sps)
        for sp, index in chain:
            spte = int(sp.view[index])
            if not is_shadow_present_pte(spte) or int(sp.gfns[index]) != gfn or sp.role.level != 1:
                fail("spte-on-rmap", f"vm{vm.vm_id} rmap of gfn {gfn:#x} holds slot {index} of the shadow page "
                     f"of gfn {sp.gfn:#x}, which is {spte:#x} for gfn {int(sp.gfns[index]):#x}")
            if shadowed and spte & PT_WRITABLE:
                fail("shadowed-gfn-write-protected", f"vm{vm.vm_id} gfn {Gfn(gfn):#x} is a shadowed guest page "
                     f"table but spte {spte:#x} maps it writable")


__all__ = ["check_shadow"]
