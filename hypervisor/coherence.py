"""The coherence invariants of `--check`, as checks over all of memory (a sweep) or over a few pages.

`sweep` is the whole-machine check (every spte of every VM, every host pte, every
frame, KSM's trees); `check_gfns`, `check_hva_range` and `check_pfns` check only
the pages one event touched, with the same invariant names and messages, so that
hypervisor/check.py can judge each event at the point of change and sweep only
now and then.  Every check reports a violation through `fail(invariant, detail)`,
which raises.

A frame's mapping count (`mapped`: the host ptes that map it) is counted here from
the ptes, independently of the mapcount the model keeps; for a few frames it is
counted exactly (`mapped_of`), for the sweep all at once.
"""

from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, NoReturn

import numpy as np
import numpy.typing as npt

from .host.frames import ZERO_PFN, FramePool
from .host.ksm import STABLE_FLAG, UNSTABLE_FLAG, page_hash
from .host.pgtable_types import _PAGE_PRESENT, _PAGE_RW, _PAGE_SPECIAL
from .kvm.requests import KVM_REQ_TLB_FLUSH
from .kvm.spte import SPTE_PFN_MASK, SPTE_READABLE, SPTE_WRITABLE
from .shadow_check import check_shadow
from .types import PAGE_SHIFT, Gfn, Hva

if TYPE_CHECKING:
    from .host.ksm import Ksm
    from .host.mm import HostMm
    from .kvm.memslot import Memslot
    from .kvm.vcpu import Vcpu
    from .kvm.vm import Vm
    from .sim import Simulation

Fail = Callable[[str, str], NoReturn]
IntArray = npt.NDArray[np.int64]



# --- sptes against host ptes (per VM, per gfn window) ---------------------------------------


def check_slot_window(vm: "Vm", slot: "Memslot", lo: int, hi: int, frames: FramePool, fail: Fail) -> None:
    """spte-follows-pte, writable-spte and frame-mapped-not-free for the sptes of gfns [lo, hi) of one slot."""
    window = vm.mmu.sptes[lo:hi]
    present = np.flatnonzero(window & SPTE_READABLE)
    if not present.size:
        return
    slot_vma = vm.mm.find_vma(slot.userspace_addr)
    if slot_vma is None:
        fail("spte-follows-pte", f"vm{vm.vm_id} gfn {lo + int(present[0]):#x} has a spte but its hva has no VMA")
    first = slot_vma.index(slot.userspace_addr) + (lo - slot.base_gfn)
    host = slot_vma.ptes[first + present]
    spte_pfn = (window[present] & SPTE_PFN_MASK) >> PAGE_SHIFT
    bad = np.flatnonzero(((host & _PAGE_PRESENT) == 0) | ((host >> PAGE_SHIFT) != spte_pfn))
    if bad.size:
        gfn = Gfn(lo + int(present[bad[0]]))
        pte = int(host[bad[0]])
        now = f"pfn {pte >> PAGE_SHIFT:#x}" if pte & _PAGE_PRESENT else "no page"
        fail("spte-follows-pte", f"vm{vm.vm_id} gfn {gfn:#x} hva {slot.gfn_to_hva(gfn):#x}: the spte maps pfn "
             f"{int(spte_pfn[bad[0]]):#x} but the host pte maps {now}")
    wr = np.flatnonzero((window[present] & SPTE_WRITABLE).astype(bool) & ((host & _PAGE_RW) == 0))
    if wr.size:
        gfn = Gfn(lo + int(present[wr[0]]))
        fail("writable-spte", f"vm{vm.vm_id} gfn {gfn:#x} hva {slot.gfn_to_hva(gfn):#x} pfn "
             f"{int(spte_pfn[wr[0]]):#x}: the spte is writable but the host pte is read-only")
    freed = np.flatnonzero(frames.refcount[spte_pfn] <= 0)
    freed = freed[spte_pfn[freed] != ZERO_PFN]
    if freed.size:
        fail("frame-mapped-not-free", f"vm{vm.vm_id} gfn {lo + int(present[freed[0]]):#x}: the spte maps pfn "
             f"{int(spte_pfn[freed[0]]):#x}, which is free")


def check_gfn(vm: "Vm", gfn: int, frames: FramePool, fail: Fail) -> int | None:
    """check_slot_window for one gfn, with scalars (the per-event path); returns the pfn its spte maps."""
    spte = int(vm.mmu.sptes[gfn])
    if not spte & SPTE_READABLE:
        return None
    slot = vm.memslots.gfn_to_memslot(Gfn(gfn))
    if slot is None:
        return None
    vma = vm.mm.find_vma(slot.userspace_addr)
    if vma is None:
        fail("spte-follows-pte", f"vm{vm.vm_id} gfn {gfn:#x} has a spte but its hva has no VMA")
    pte = vma.ptes_view[((slot.userspace_addr - vma.start) >> PAGE_SHIFT) + gfn - slot.base_gfn]
    pfn = (spte & SPTE_PFN_MASK) >> PAGE_SHIFT
    if not pte & _PAGE_PRESENT or pte >> PAGE_SHIFT != pfn:
        now = f"pfn {pte >> PAGE_SHIFT:#x}" if pte & _PAGE_PRESENT else "no page"
        fail("spte-follows-pte", f"vm{vm.vm_id} gfn {gfn:#x} hva {slot.gfn_to_hva(Gfn(gfn)):#x}: the spte maps pfn "
             f"{pfn:#x} but the host pte maps {now}")
    if spte & SPTE_WRITABLE and not pte & _PAGE_RW:
        fail("writable-spte", f"vm{vm.vm_id} gfn {gfn:#x} hva {slot.gfn_to_hva(Gfn(gfn)):#x} pfn "
             f"{pfn:#x}: the spte is writable but the host pte is read-only")
    if frames.refcount_view[pfn] <= 0 and pfn != ZERO_PFN:
        fail("frame-mapped-not-free", f"vm{vm.vm_id} gfn {gfn:#x}: the spte maps pfn {pfn:#x}, which is free")
    return pfn


def check_hva(vm: "Vm", hva: int, frames: FramePool, fail: Fail) -> tuple[int | None, int | None]:
    """One hva of a VM's mm: its host pte (a KSM page never writable) and the spte of its gfn.

    Returns (pfn the host pte maps, pfn the spte maps), None where nothing is mapped.
    """
    pte_pfn = None
    vma = vm.mm.find_vma(Hva(hva))
    if vma is not None:
        pte = vma.ptes_view[(hva - vma.start) >> PAGE_SHIFT]
        if pte & _PAGE_PRESENT and not pte & _PAGE_SPECIAL:
            pte_pfn = pte >> PAGE_SHIFT
            if pte & _PAGE_RW and frames.stable_node_view[pte_pfn] >= 0:
                fail("ksm-page-stable", f"vm{vm.vm_id} hva {hva:#x} maps KSM page pfn {pte_pfn:#x} writable")
    spte_pfn = None
    for slot in vm.memslots:
        gfn = slot.hva_to_gfn(Hva(hva))
        if gfn is not None:
            spte_pfn = check_gfn(vm, gfn, frames, fail)
    return pte_pfn, spte_pfn


def check_pte_window(vm: "Vm", start: int, end: int, frames: FramePool, fail: Fail) -> IntArray:
    """ksm-page-stable (no KSM page mapped writable) for the host ptes of [start, end); returns their pfns."""
    out = [np.zeros(0, dtype=np.int64)]
    for vma in vm.mm.vmas:
        lo, hi = max(start, vma.start), min(end, vma.end)
        if lo >= hi:
            continue
        ptes = vma.ptes[vma.index(Hva(lo)) : vma.index(Hva(hi - 1)) + 1]
        normal = np.flatnonzero((ptes & _PAGE_PRESENT).astype(bool) & ~(ptes & _PAGE_SPECIAL).astype(bool))
        pfns = ptes[normal] >> PAGE_SHIFT
        ksm_writable = np.flatnonzero((frames.stable_node[pfns] >= 0) & (ptes[normal] & _PAGE_RW).astype(bool))
        if ksm_writable.size:
            hva = lo + (int(normal[ksm_writable[0]]) << PAGE_SHIFT)
            fail("ksm-page-stable", f"vm{vm.vm_id} hva {hva:#x} maps KSM page pfn "
                 f"{int(pfns[ksm_writable[0]]):#x} writable")
        out.append(pfns)
    return np.concatenate(out)


def check_hva_range(vm: "Vm", start: int, end: int, frames: FramePool, fail: Fail) -> IntArray:
    """Every page of [start, end) in one VM: its host ptes, then the sptes of its gfns; returns the ptes' pfns."""
    pfns = check_pte_window(vm, start, end, frames, fail)
    for slot, lo, hi in vm.memslots.hva_to_gfns(Hva(start), Hva(end)):
        check_slot_window(vm, slot, lo, hi, frames, fail)
    return pfns


# --- frames: counts and page state ---------------------------------------------------------------


def _normal_pfns(mm: "HostMm") -> Iterable[IntArray]:
    for vma in mm.vmas:
        ptes = vma.ptes
        normal = (ptes & _PAGE_PRESENT).astype(bool) & ~(ptes & _PAGE_SPECIAL).astype(bool)
        yield ptes[normal] >> PAGE_SHIFT


def mapped_of(vms: "list[Vm]", pfns: IntArray) -> IntArray:
    """How many host ptes (of every VM's mm, not counting the zero page's) map each of `pfns`, counted."""
    every = np.concatenate([np.zeros(0, dtype=np.int64), *(p for vm in vms for p in _normal_pfns(vm.mm))])
    every.sort()
    counts = np.searchsorted(every, pfns, side="right") - np.searchsorted(every, pfns, side="left")
    counts[pfns == ZERO_PFN] = 0
    return counts.astype(np.int64)


def check_pfns(vms: "list[Vm]", frames: FramePool, pfns: IntArray, mapped: IntArray, strict: bool,
               fail: Fail) -> None:
    """free-frame-clean, refcount-equals-mappings and frame-mapped-not-free for these frames.

    `mapped[i]` is the number of ptes that map `pfns[i]`.  Strict (at a time-slice end:
    no fault in flight, no pte being replaced) the counts must be equal; in between,
    mapcount and refcount are only bounded below by the mappings.
    """
    refcount = frames.refcount[pfns].astype(np.int64)
    mapcount = frames.mapcount[pfns].astype(np.int64)
    stale = np.flatnonzero((refcount <= 0) & (pfns != ZERO_PFN)
                           & ((frames.stable_node[pfns] >= 0) | (mapcount != 0)))
    if stale.size:
        pfn = int(pfns[stale[0]])
        fail("free-frame-clean", f"pfn {pfn:#x} is free but keeps stable_node "
             f"{int(frames.stable_node[pfn])}, mapcount {int(frames.mapcount[pfn])}")
    bad = np.flatnonzero(mapcount != mapped) if strict else np.flatnonzero(mapcount < mapped)
    if bad.size:
        i = int(bad[0])
        fail("refcount-equals-mappings", f"pfn {int(pfns[i]):#x} has mapcount {int(mapcount[i])} but "
             f"{int(mapped[i])} ptes map it")
    low = np.flatnonzero(refcount < mapped)
    if low.size:
        i = int(low[0])
        fail("frame-mapped-not-free", f"pfn {int(pfns[i]):#x} is mapped by {int(mapped[i])} ptes but has "
             f"refcount {int(refcount[i])}")
    if strict:
        extra = np.flatnonzero((refcount != mapped) & (mapped > 0))
        if extra.size:
            i = int(extra[0])
            fail("refcount-equals-mappings", f"pfn {int(pfns[i]):#x} has refcount {int(refcount[i])} but "
                 f"{int(mapped[i])} mappings and no fault in flight (a leaked pin)")


def check_ksm_pages(ksm: "Ksm", frames: FramePool, pfns: IntArray | None, fail: Fail) -> None:
    """ksm-page-stable: a KSM page (of `pfns`, or every one) is byte-equal to what was merged into it."""
    if not ksm.nodes:
        return
    if pfns is None:
        nodes = [n for n in ksm.nodes.values() if int(frames.stable_node[n.kpfn]) == n.id]
    else:
        nodes = []
        for pfn in pfns.tolist():
            node = ksm.nodes.get(int(frames.stable_node[pfn]))
            if node is not None and node.kpfn == pfn:
                nodes.append(node)
    if not nodes:
        return
    hashes = page_hash(frames, np.array([n.kpfn for n in nodes], dtype=np.int64))
    for node, h in zip(nodes, hashes, strict=True):
        if int(h) != node.key:
            fail("ksm-page-stable", f"KSM page pfn {node.kpfn:#x} (stable node {node.id}) "
                 "changed content after it was merged")


def check_rmap_items(ksm: "Ksm", fail: Fail) -> None:
    """ksm-rmap-items: stable nodes count their live rmap_items; the unstable tree holds only live ones."""
    live: set[int] = set()
    named = [np.zeros(0, dtype=np.int32)]
    for slot in ksm.slots:
        for items in slot.vmas:
            live.add(id(items))
            named.append(items.node[items.has_item & ((items.flags & STABLE_FLAG) != 0)])
    ids, counts = np.unique(np.concatenate(named), return_counts=True)
    counted: Counter[int] = Counter(dict(zip(ids.tolist(), counts.tolist(), strict=True)))
    for node in ksm.nodes.values():
        naming = counted.pop(node.id, 0)
        if naming != node.nr_items:
            fail("ksm-rmap-items", f"stable node {node.id} (KSM page pfn {node.kpfn:#x}) counts "
                 f"{node.nr_items} rmap_items but {naming} live ones name it")
    if counted:
        fail("ksm-rmap-items", f"rmap_items name stable node {min(counted)}, which is gone")
    for owner, idx in ksm.unstable_tree.rmap_items():
        if owner is None or id(owner) not in live or not 0 <= idx < owner.vma.nr_pages:
            fail("ksm-rmap-items", f"the unstable tree holds rmap_item {idx}, of no mergeable VMA")
        elif not owner.has_item[idx] or not owner.flags[idx] & UNSTABLE_FLAG:
            fail("ksm-rmap-items", f"the unstable tree holds the freed rmap_item of "
                 f"{owner.mm.name} hva {owner.hva(idx):#x}")


# --- the sweep --------------------------------------------------------------------------------------


def sweep(sim: "Simulation", strict: bool, fail: Fail) -> None:
    """Every invariant over all of memory: every VM's ptes and sptes, every frame, KSM's trees."""
    frames = sim.frames
    for vm in sim.vms:
        check_pte_window(vm, 0, 1 << 64, frames, fail)
        for slot in vm.memslots:
            check_slot_window(vm, slot, slot.base_gfn, slot.end_gfn, frames, fail)
        check_shadow(vm, fail)  # --mmu shadow: shadow pages against the guest's tables and the rmap
    every = np.arange(frames.nr_frames, dtype=np.int64)
    mapped = np.zeros(frames.nr_frames, dtype=np.int64)
    for vm in sim.vms:
        for pfns in _normal_pfns(vm.mm):
            mapped += np.bincount(pfns, minlength=frames.nr_frames)[: frames.nr_frames]
    mapped[ZERO_PFN] = 0
    check_pfns(sim.vms, frames, every, mapped, strict, fail)
    ksm = sim.ksm
    if ksm is not None:
        check_rmap_items(ksm, fail)
        check_ksm_pages(ksm, frames, None, fail)


def check_vcpu_tlb(vcpu: "Vcpu", entries: dict[int, tuple[int, int, bool]], fail: Fail) -> None:
    """tlb-follows-spte for one vCPU: unless a TLB flush request is pending, every entry its TLB
    may hold maps the frame its gfn's spte maps, and is writable only if the spte is."""
    if vcpu.requests & KVM_REQ_TLB_FLUSH or not entries:
        return
    mmu = vcpu.vm.mmu
    for page, (gfn, pfn, writable) in entries.items():
        spte = mmu.tlb_spte(vcpu, page << PAGE_SHIFT, gfn)
        if not spte & SPTE_READABLE or (spte & SPTE_PFN_MASK) >> PAGE_SHIFT != pfn or (
                writable and not spte & SPTE_WRITABLE):
            fail("tlb-follows-spte", f"vm{vcpu.vm.vm_id} vCPU {vcpu.vcpu_id} TLB maps gva {page << PAGE_SHIFT:#x} "
                                     f"(gfn {gfn:#x}) to pfn {pfn:#x}{' writable' if writable else ''} after a "
                                     f"remote TLB flush, but the spte is {spte:#x}")
