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
        pos = bisect.bisect(self._bases, gfn) - 1
        if pos >= 0 and self.slots[pos].contains_gfn(gfn):
            return self.slots[pos]
        return None

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
