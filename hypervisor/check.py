"""`--check`: the coherence invariants of DESIGN.md, verified after every exit, notifier call and ksmd step.

The checker rides on the trace events (it is a trace consumer), so when it is off
the hot paths pay only the `trace is not None` test they already had.  Events are
delivered once the operation they name has completed (a notifier event after
every callback ran), so every event is a point where the invariants must hold,
with two allowances the kernel has too: a GUP pin held by a fault in flight makes
a frame's refcount exceed its mappings, and a page whose pte was just replaced
keeps its mapcount until page_remove_rmap right after the notification.

Invariants:
* spte-follows-pte: every present spte maps the pfn that the host pte of its hva maps now;
* writable-spte: a writable spte only where that host pte is writable;
* frame-mapped-not-free: no frame is free while a pte or spte maps it;
* refcount-equals-mappings: a frame's mapcount and refcount are the number of ptes that map
  it, checked exactly at the end of every time slice (no fault in flight, no pte being
  replaced) and as lower bounds in between;
* ksm-page-stable: a KSM page's content never changes (it is byte-equal to every page merged
  into it) and nothing maps it writable;
* free-frame-clean: a free frame keeps no page state (not PageKsm, no mapcount), so that
  whatever allocates it next gets an ordinary page (2.6.32 free_pages_check());
* ksm-rmap-items: every stable node counts exactly the live rmap_items that name it, and the
  unstable tree holds only live rmap_items marked unstable (a freed one left there would be
  merged later and counted forever).
"""

from collections import Counter, deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvariantViolation
from .host.frames import ZERO_PFN
from .host.ksm import STABLE_FLAG, UNSTABLE_FLAG, page_hash
from .host.pgtable_types import _PAGE_PRESENT, _PAGE_RW, _PAGE_SPECIAL
from .kvm.spte import SPTE_PFN_MASK, SPTE_READABLE, SPTE_WRITABLE
from .trace import format_fields
from .types import PAGE_SHIFT, Gfn

if TYPE_CHECKING:
    from .host.ksm import Ksm
    from .sim import Simulation

RING_SIZE = 24

TraceFn = Callable[[str, dict[str, Any]], None]


class CoherenceChecker:
    def __init__(self, downstream: TraceFn | None = None) -> None:
        self.sim: Simulation | None = None
        self.ring: deque[str] = deque(maxlen=RING_SIZE)
        self.downstream = downstream
        self.checks = 0
        self._in_check = False

    def attach(self, sim: "Simulation") -> None:
        self.sim = sim

    # --- event intake --------------------------------------------------------------------

    def trace(self, event: str, fields: dict[str, Any]) -> None:
        if self.downstream is not None:
            self.downstream(event, fields)
        self._record(event, fields)
        self.check(strict_refcount=False)

    def end_of_slice(self) -> None:
        self._record("slice_end", {})
        self.check(strict_refcount=True)

    def _record(self, event: str, fields: dict[str, Any]) -> None:
        now = self.sim.clock() if self.sim is not None else 0
        who = f"vm{fields['vm']} " if "vm" in fields and not event.startswith("mmu_notifier_") else ""
        self.ring.append(f"[insn {now}] {who}{event}: {format_fields(event, fields)}".rstrip())

    # --- the invariants --------------------------------------------------------------------

    def _fail(self, invariant: str, detail: str) -> None:
        events = "\n".join("    " + e for e in self.ring)
        raise InvariantViolation(f"invariant {invariant} violated: {detail}. Last events:\n{events}")

    def check(self, strict_refcount: bool) -> None:
        sim = self.sim
        if sim is None or self._in_check:
            return
        self._in_check = True
        try:
            self._check(sim, strict_refcount)
            self.checks += 1
        finally:
            self._in_check = False

    def _check(self, sim: "Simulation", strict_refcount: bool) -> None:
        frames = sim.frames
        mapped = np.zeros(frames.nr_frames, dtype=np.int64)
        for vm in sim.vms:
            mm = vm.mm
            for vma in mm.vmas:
                ptes = vma.ptes
                normal = np.flatnonzero((ptes & _PAGE_PRESENT).astype(bool) & ~(ptes & _PAGE_SPECIAL).astype(bool))
                pfns = ptes[normal] >> PAGE_SHIFT
                np.add.at(mapped, pfns, 1)
                ksm_writable = np.flatnonzero((frames.stable_node[pfns] >= 0) & (ptes[normal] & _PAGE_RW).astype(bool))
                if ksm_writable.size:
                    hva = vma.start + (int(normal[ksm_writable[0]]) << PAGE_SHIFT)
                    self._fail("ksm-page-stable", f"vm{vm.vm_id} hva {hva:#x} maps KSM page pfn "
                               f"{int(pfns[ksm_writable[0]]):#x} writable")
            sptes = vm.mmu.sptes
            for slot in vm.memslots:
                window = sptes[slot.base_gfn : slot.end_gfn]
                present = np.flatnonzero(window & SPTE_READABLE)
                if not present.size:
                    continue
                slot_vma = mm.find_vma(slot.userspace_addr)
                if slot_vma is None:
                    gfn = slot.base_gfn + int(present[0])
                    self._fail("spte-follows-pte", f"vm{vm.vm_id} gfn {gfn:#x} has a spte but its hva has no VMA")
                    return
                first = slot_vma.index(slot.userspace_addr)
                host = slot_vma.ptes[first + present]
                spte_pfn = (window[present] & SPTE_PFN_MASK) >> PAGE_SHIFT
                bad = np.flatnonzero(((host & _PAGE_PRESENT) == 0) | ((host >> PAGE_SHIFT) != spte_pfn))
                if bad.size:
                    i = int(present[bad[0]])
                    gfn = Gfn(slot.base_gfn + i)
                    hva = slot.gfn_to_hva(gfn)
                    pte = int(host[bad[0]])
                    now = f"pfn {pte >> PAGE_SHIFT:#x}" if pte & _PAGE_PRESENT else "no page"
                    self._fail("spte-follows-pte", f"vm{vm.vm_id} gfn {gfn:#x} hva {hva:#x}: the spte maps pfn "
                               f"{int(spte_pfn[bad[0]]):#x} but the host pte maps {now}")
                wr = np.flatnonzero((window[present] & SPTE_WRITABLE).astype(bool) & ((host & _PAGE_RW) == 0))
                if wr.size:
                    gfn = Gfn(slot.base_gfn + int(present[wr[0]]))
                    self._fail("writable-spte", f"vm{vm.vm_id} gfn {gfn:#x} hva {slot.gfn_to_hva(gfn):#x} pfn "
                               f"{int(spte_pfn[wr[0]]):#x}: the spte is writable but the host pte is read-only")
                freed = np.flatnonzero(frames.refcount[spte_pfn] <= 0)
                freed = freed[spte_pfn[freed] != ZERO_PFN]
                if freed.size:
                    gfn = slot.base_gfn + int(present[freed[0]])
                    self._fail("frame-mapped-not-free", f"vm{vm.vm_id} gfn {gfn:#x}: the spte maps pfn "
                               f"{int(spte_pfn[freed[0]]):#x}, which is free")
        mapped[ZERO_PFN] = 0
        free = frames.refcount <= 0
        free[ZERO_PFN] = False
        stale = np.flatnonzero(free & ((frames.stable_node >= 0) | (frames.mapcount != 0)))
        if stale.size:
            pfn = int(stale[0])
            self._fail("free-frame-clean", f"pfn {pfn:#x} is free but keeps stable_node "
                       f"{int(frames.stable_node[pfn])}, mapcount {int(frames.mapcount[pfn])}")
        mapcount = frames.mapcount.astype(np.int64)
        # Inside an operation that replaces a pte (replace_page, do_wp_page) the old page's
        # mapcount drops only after the new pte is announced, as in the kernel.
        bad = np.flatnonzero(mapcount != mapped) if strict_refcount else np.flatnonzero(mapcount < mapped)
        if bad.size:
            pfn = int(bad[0])
            self._fail("refcount-equals-mappings", f"pfn {pfn:#x} has mapcount {int(mapcount[pfn])} but "
                       f"{int(mapped[pfn])} ptes map it")
        refcount = frames.refcount.astype(np.int64)
        low = np.flatnonzero(refcount < mapped)
        if low.size:
            pfn = int(low[0])
            self._fail("frame-mapped-not-free", f"pfn {pfn:#x} is mapped by {int(mapped[pfn])} ptes but has "
                       f"refcount {int(refcount[pfn])}")
        if strict_refcount:
            extra = np.flatnonzero((refcount != mapped) & (mapped > 0))
            if extra.size:
                pfn = int(extra[0])
                self._fail("refcount-equals-mappings", f"pfn {pfn:#x} has refcount {int(refcount[pfn])} but "
                           f"{int(mapped[pfn])} mappings and no fault in flight (a leaked pin)")
        ksm = sim.ksm
        if ksm is not None:
            self._check_rmap_items(ksm)
        if ksm is not None and ksm.nodes:
            nodes = [n for n in ksm.nodes.values() if int(frames.stable_node[n.kpfn]) == n.id]
            if nodes:
                kpfns = np.array([n.kpfn for n in nodes], dtype=np.int64)
                hashes = page_hash(frames, kpfns)
                for node, h in zip(nodes, hashes, strict=True):
                    if int(h) != node.key:
                        self._fail("ksm-page-stable", f"KSM page pfn {node.kpfn:#x} (stable node {node.id}) "
                                   "changed content after it was merged")

    def _check_rmap_items(self, ksm: "Ksm") -> None:
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
                self._fail("ksm-rmap-items", f"stable node {node.id} (KSM page pfn {node.kpfn:#x}) counts "
                           f"{node.nr_items} rmap_items but {naming} live ones name it")
        if counted:
            self._fail("ksm-rmap-items", f"rmap_items name stable node {min(counted)}, which is gone")
        for entries in ksm.unstable_tree.values():
            for items, idx in entries:
                if id(items) not in live or not items.has_item[idx] or not items.flags[idx] & UNSTABLE_FLAG:
                    self._fail("ksm-rmap-items", f"the unstable tree holds the freed rmap_item of "
                               f"{items.mm.name} hva {items.hva(idx):#x}")
