"""The storage of KSM's two trees: content hash -> int entries, in the order filed, in two numpy arrays.

Overview.  mm/ksm.c keeps root_stable_tree and root_unstable_tree as rbtrees ordered
by page content; hvsim files a tree's entries under a 64-bit content hash instead
(README, fidelity), and every hit is confirmed byte for byte by the caller.  A Python
dict of hash -> entry costs about 100 bytes an entry (the table, the key's int
object, the value's), more than the kernel's whole 64-byte rmap_item, and the
unstable tree holds up to one entry per guest page; so `ContentBuckets` is an
open-addressing table instead: `keys` (uint64) and `slots` (int32: an entry, 0 for
a slot never used, ERASED for a slot whose entry left), probed linearly from the
slot named by the hash's top bits: 12 bytes a slot, at a load kept between 1/8 and
3/4 (16 to 96 bytes an entry, 32 at a typical 3/8).

A key's entries come out in the order they were filed: a new entry takes the first
never-used slot along its probe path, and a slot is never used again until the
table is rebuilt (when used slots pass 3/4), so a later entry of a key always lies
further along the same path; the rebuild re-files the entries in that order too.
"""

import numpy as np
import numpy.typing as npt

EMPTY = 0
ERASED = -(2**31)  # no entry is this: node ids and rmap_item ids are > 0, chain ids small negatives
MAX_ENTRY = 2**31 - 1
_FIRST_CAPACITY = 64  # a power of two


class ContentBuckets:
    """Content hash -> entries (non-zero ints), each key's in the order filed."""

    keys: npt.NDArray[np.uint64]
    slots: npt.NDArray[np.int32]
    _key_view: memoryview
    _slot_view: memoryview
    _mask: int
    _shift: int

    def __init__(self) -> None:
        self.nr_entries = 0
        self._used = 0  # slots holding an entry or ERASED
        self._allocate(_FIRST_CAPACITY)

    def _allocate(self, capacity: int) -> None:
        self.keys = np.zeros(capacity, dtype=np.uint64)
        self.slots = np.zeros(capacity, dtype=np.int32)
        # Scalar views for the per-entry paths (no numpy scalar boxing).
        self._key_view = self.keys.data
        self._slot_view = self.slots.data
        self._mask = capacity - 1
        self._shift = 65 - capacity.bit_length()  # the home slot is the key's top log2(capacity) bits
        self._used = 0

    @property
    def capacity(self) -> int:
        return self._mask + 1

    def entries(self, key: int) -> list[int]:
        """The entries filed under `key`, in the order filed (a new list)."""
        return self.probe(key)[0]

    def probe(self, key: int) -> tuple[list[int], int]:
        """The key's entries in the order filed, and the never-used slot that ends its probe path."""
        out: list[int] = []
        keys, slots, mask = self._key_view, self._slot_view, self._mask
        slot = key >> self._shift
        # A never-used slot has key 0 and entry EMPTY: the key is read first, so a slot of
        # another key costs one read (a hash of 0 is a key like any other).
        while True:
            k: int = keys[slot]
            if k == key:
                entry: int = slots[slot]
                if entry == EMPTY:
                    break
                if entry != ERASED:
                    out.append(entry)
            elif not k and slots[slot] == EMPTY:
                break
            slot = (slot + 1) & mask
        return out, slot

    def add(self, key: int, entry: int, end: int = -1) -> int:
        """File `entry` under `key`, behind the key's other entries; its slot (until the next rebuild).

        `end`: the slot `probe(key)` returned, if nothing was filed or rebuilt since (saves a probe).
        """
        if (self._used + 1) * 4 > (self._mask + 1) * 3:
            self._rebuild()
            end = -1
        slot = end
        if slot < 0:
            slots, mask = self._slot_view, self._mask
            slot = key >> self._shift
            while slots[slot] != EMPTY:
                slot = (slot + 1) & mask
        self._key_view[slot] = key
        self._slot_view[slot] = entry
        self._used += 1
        self.nr_entries += 1
        return slot

    def entry_at(self, slot: int) -> int:
        """The entry in `slot` (EMPTY or ERASED if none, or if there is no such slot)."""
        if not 0 <= slot <= self._mask:
            return EMPTY
        entry: int = self._slot_view[slot]
        return entry

    def erase_at(self, slot: int) -> None:
        self._slot_view[slot] = ERASED
        self.nr_entries -= 1

    def erase_key(self, key: int) -> None:
        """Take every entry filed under `key` out."""
        _, end = self.probe(key)
        keys, slots, mask = self._key_view, self._slot_view, self._mask
        slot = key >> self._shift
        while slot != end:
            if keys[slot] == key and slots[slot] != ERASED:
                self.erase_at(slot)
            slot = (slot + 1) & mask
        self.shrink_if_sparse()

    def shrink_if_sparse(self) -> None:
        """Rebuild smaller once entries fill less than 1/8 of the slots (the unstable tree empties as pages merge)."""
        if self.nr_entries * 8 <= self._mask and self._mask >= _FIRST_CAPACITY:
            self._rebuild()

    def all_entries(self) -> list[int]:
        """Every entry, in slot order."""
        live = self.slots[(self.slots != EMPTY) & (self.slots != ERASED)]
        out: list[int] = live.tolist()
        return out

    def clear(self) -> None:
        self.nr_entries = 0
        self._allocate(_FIRST_CAPACITY)

    def __len__(self) -> int:
        return self.nr_entries

    def __bool__(self) -> bool:
        return self.nr_entries > 0

    def _rebuild(self) -> None:
        """Re-file the entries into a table where they fill at most half the slots (grown or shrunk)."""
        old_keys, old_slots = self.keys, self.slots
        capacity = _FIRST_CAPACITY
        while self.nr_entries * 2 > capacity:
            capacity *= 2
        # Read the old table from just past a never-used slot: no probe path crosses one, so
        # each key's entries come in the order they were filed.
        start = int(np.flatnonzero(old_slots == EMPTY)[0])
        order = np.concatenate((np.arange(start, old_slots.shape[0]), np.arange(start)))
        order = order[(old_slots[order] != EMPTY) & (old_slots[order] != ERASED)]
        self._allocate(capacity)
        entries: list[int] = old_slots[order].tolist()
        new_slots: list[int] = []
        slots, key_view, mask, shift = self._slot_view, self._key_view, self._mask, self._shift
        for key, entry in zip(old_keys[order].tolist(), entries, strict=True):
            slot = key >> shift
            while slots[slot] != EMPTY:
                slot = (slot + 1) & mask
            key_view[slot] = key
            slots[slot] = entry
            new_slots.append(slot)
        self._used = len(entries)
        self.moved(np.array(entries, dtype=np.int64), np.array(new_slots, dtype=np.int32))

    def moved(self, entries: npt.NDArray[np.int64], slots: npt.NDArray[np.int32]) -> None:
        """Called after a rebuild with every entry and its new slot (for owners that remember slots)."""
