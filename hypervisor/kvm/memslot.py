"""KVM memslots: contiguous gfn ranges backed by contiguous hva ranges of the VMM (kvm_memory_slot)."""

import bisect
from collections.abc import Iterator
from dataclasses import dataclass

from ..types import PAGE_SHIFT, Gfn, Hva


@dataclass(frozen=True)
class Memslot:
    id: int
    base_gfn: Gfn
    npages: int
    userspace_addr: Hva

    @property
    def end_gfn(self) -> Gfn:
        return Gfn(self.base_gfn + self.npages)

    def contains_gfn(self, gfn: Gfn) -> bool:
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def gfn_to_hva(self, gfn: Gfn) -> Hva:
        """__gfn_to_hva_memslot()."""
        return Hva(self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT))

    def hva_to_gfn(self, hva: Hva) -> Gfn | None:
        """The inverse, used by the notifier callbacks (kvm_handle_hva)."""
        offset = hva - self.userspace_addr
        if offset < 0 or offset >= self.npages << PAGE_SHIFT:
            return None
        return Gfn(self.base_gfn + (offset >> PAGE_SHIFT))


class Memslots:
    """struct kvm_memslots: the VM's slots, sorted by base_gfn, non-overlapping."""

    def __init__(self) -> None:
        self.slots: list[Memslot] = []
        self._bases: list[int] = []
        # The slot the last lookup found, tried first (6.8 include/linux/kvm_host.h
        # ____gfn_to_memslot(): slots->last_used_slot; 2.6.32 loops over the slots every time).
        self.last_used_slot: Memslot | None = None

    def add(self, slot: Memslot) -> None:
        if slot.npages <= 0:
            raise ValueError("a memslot needs at least one page")
        for other in self.slots:
            if other.base_gfn < slot.end_gfn and slot.base_gfn < other.end_gfn:
                raise ValueError(f"memslot {slot.id} overlaps memslot {other.id}")
        pos = bisect.bisect(self._bases, slot.base_gfn)
        self.slots.insert(pos, slot)
        self._bases.insert(pos, slot.base_gfn)

    def gfn_to_memslot(self, gfn: Gfn) -> Memslot | None:
        slot = self.last_used_slot
        if slot is not None and slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
            return slot
        pos = bisect.bisect(self._bases, gfn) - 1
        if pos >= 0 and self.slots[pos].contains_gfn(gfn):
            slot = self.last_used_slot = self.slots[pos]
            return slot
        return None

    def gfn_to_hva(self, gfn: Gfn) -> Hva | None:
        """gfn_to_hva() (2.6.32 virt/kvm/kvm_main.c): the hva behind gfn; None (bad_hva()) outside every slot."""
        slot = self.last_used_slot
        if slot is None or not slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
            slot = self.gfn_to_memslot(gfn)
            if slot is None:
                return None
        return Hva(slot.userspace_addr + ((gfn - slot.base_gfn) << PAGE_SHIFT))  # __gfn_to_hva_memslot()

    @property
    def max_gfn(self) -> Gfn:
        return Gfn(max((s.end_gfn for s in self.slots), default=0))

    def hva_to_gfns(self, start: Hva, end: Hva) -> list[tuple[Memslot, Gfn, Gfn]]:
        """Each slot's gfn range [lo, hi) that backs some of [start, end) (kvm_handle_hva_range)."""
        out = []
        for slot in self.slots:
            slot_end = slot.userspace_addr + (slot.npages << PAGE_SHIFT)
            lo, hi = max(start, slot.userspace_addr), min(end, slot_end)
            if lo < hi:
                first = slot.base_gfn + ((lo - slot.userspace_addr) >> PAGE_SHIFT)
                last = slot.base_gfn + ((hi - 1 - slot.userspace_addr) >> PAGE_SHIFT) + 1
                out.append((slot, Gfn(first), Gfn(last)))
        return out

    def __iter__(self) -> Iterator[Memslot]:
        return iter(self.slots)
