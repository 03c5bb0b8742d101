"""The reverse map of shadow paging: every leaf spte that maps a gfn, from every shadow page.

2.6.32 mmu.c `gfn_to_rmap`/`rmap_add`/`rmap_remove` (sndrzt/linux-2.6.32): one rmap head
per gfn (hvsim has no large sptes, so only the level-1 rmap), holding the leaf sptes of
that gfn from any shadow page: aliases inside one address space, other address spaces,
other vCPUs' roots.  Only leaf sptes are on it (links are tracked by the child's
parent_ptes).  Insertion order is kept (the kernel fills its rmap descs left to right);
removal moves the last entry into the hole, as rmap_desc_remove_entry does.
"""

from .shadow_page import KvmMmuPage

# One rmap entry: the shadow page and the index of the spte in it (the kernel's u64 *spte).
RmapEntry = tuple[KvmMmuPage, int]


class Rmap:
    def __init__(self) -> None:
        self.heads: dict[int, list[RmapEntry]] = {}

    def rmap_add(self, gfn: int, sp: KvmMmuPage, index: int) -> int:
        """Add the spte; return how many the rmap held before (mmu_set_spte compares it to the threshold)."""
        chain = self.heads.setdefault(gfn, [])
        count = len(chain)
        chain.append((sp, index))
        sp.gfns[index] = gfn
        return count

    def rmap_remove(self, sp: KvmMmuPage, index: int) -> None:
        """Unlink the spte from the rmap of sp->gfns[index] (BUG in the kernel if it is not there)."""
        gfn = int(sp.gfns[index])
        chain = self.heads[gfn]
        pos = next(i for i, (s, idx) in enumerate(chain) if s is sp and idx == index)
        last = chain.pop()
        if pos < len(chain):
            chain[pos] = last
        if not chain:
            del self.heads[gfn]

    def sptes(self, gfn: int) -> list[RmapEntry]:
        """A copy of the rmap of gfn (callers change sptes while they walk it)."""
        return list(self.heads.get(gfn, ()))

    def __len__(self) -> int:
        return sum(len(c) for c in self.heads.values())


__all__ = ["Rmap", "RmapEntry"]
