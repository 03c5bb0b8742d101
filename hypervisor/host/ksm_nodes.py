"""KSM's stable nodes (struct ksm_stable_node) as arrays indexed by node id, and the stable tree's buckets.

Overview.  A stable node is a KSM page (`kpfn`), the content hash the tree files it
under (`key`), its rmap_hlist_len (`nr_items`), the page_checksum of its page and,
past max_page_sharing (4.13+ mm/ksm.c), the stable_node_chain it is a dup of.  They
live in `StableNodes`, one numpy array per field (about 30 bytes a node where a
Python object cost some 300); `StableNode` is a view of one id, made on demand, for
the code and the tests that read a node.  Ids are handed out in order and never
reused, as before: a gone node's id must not name a new one while an rmap_item or
`FramePool.stable_node` may still hold it, so the arrays grow (by doubling) with the
nodes ever made.

`StableTree` is the tree itself: content hash -> its entries, in the compact table
of host/ksm_buckets.py (a dict cost about 100 bytes a node); an entry is a node id
(> 0) or a chain (-chain id).  Chains are rare (one content shared past
max_page_sharing) and stay Python objects.
"""

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ..types import Pfn
from .ksm_buckets import ContentBuckets

_FIRST_CAPACITY = 64


@dataclass
class StableNodeChain:
    """A stable node chain: duplicate KSM pages of one content (max_page_sharing reached); dups are node ids."""

    id: int
    key: int
    dups: list[int] = field(default_factory=list)


class StableNodes:
    """Every stable node ever made, as arrays indexed by id; `live` marks those still in the tree."""

    def __init__(self) -> None:
        self.next_id = 1
        self.nr_live = 0
        self.chains: dict[int, StableNodeChain] = {}
        self._next_chain_id = 1
        self._allocate(_FIRST_CAPACITY)

    def _allocate(self, capacity: int) -> None:
        old = getattr(self, "live", None)
        fields: dict[str, npt.DTypeLike] = {"kpfn": np.int64, "key": np.uint64, "nr_items": np.int32,
                                            "checksum": np.uint32, "chain": np.int32, "live": np.bool_}
        for name, dtype in fields.items():
            array = np.zeros(capacity, dtype=dtype)
            if old is not None:
                array[: self.next_id] = getattr(self, name)[: self.next_id]
            setattr(self, name, array)
        # Scalar views for the per-node paths (no numpy scalar boxing).
        self.kpfn_view = self.kpfn.data
        self.nr_items_view = self.nr_items.data
        self.live_view = self.live.data
        self.chain_view = self.chain.data

    kpfn: npt.NDArray[np.int64]
    key: npt.NDArray[np.uint64]
    nr_items: npt.NDArray[np.int32]
    checksum: npt.NDArray[np.uint32]
    chain: npt.NDArray[np.int32]
    live: npt.NDArray[np.bool_]
    kpfn_view: memoryview
    nr_items_view: memoryview
    live_view: memoryview
    chain_view: memoryview

    def new(self, kpfn: Pfn, key: int, checksum: int) -> int:
        node_id = self.next_id
        if node_id >= self.live.shape[0]:
            self._allocate(2 * self.live.shape[0])
        self.next_id += 1
        self.kpfn[node_id] = kpfn
        self.key[node_id] = key
        self.checksum[node_id] = checksum
        self.nr_items[node_id] = 0
        self.chain[node_id] = 0
        self.live[node_id] = True
        self.nr_live += 1
        return node_id

    def kill(self, node_id: int) -> None:
        self.live_view[node_id] = False
        self.nr_live -= 1

    def new_chain(self, key: int, dups: list[int]) -> StableNodeChain:
        chain = StableNodeChain(self._next_chain_id, key, dups)
        self._next_chain_id += 1
        self.chains[chain.id] = chain
        for dup in dups:
            self.chain_view[dup] = chain.id
        return chain

    def live_ids(self) -> npt.NDArray[np.intp]:
        return np.flatnonzero(self.live[: self.next_id])

    def live_checksums(self) -> npt.NDArray[np.uint32]:
        """The page_checksum of every live node's KSM page (with repeats): a batch's stable-match filter."""
        out: npt.NDArray[np.uint32] = self.checksum[: self.next_id][self.live[: self.next_id]]
        return out

    # --- the mapping view: node id -> StableNode, over live nodes, in id order -----------------

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, int) and 0 < node_id < self.next_id and bool(self.live_view[node_id])

    def __len__(self) -> int:
        return self.nr_live

    def __bool__(self) -> bool:
        return self.nr_live > 0

    def __getitem__(self, node_id: int) -> "StableNode":
        if node_id not in self:
            raise KeyError(node_id)
        return StableNode(self, node_id)

    def get(self, node_id: int) -> "StableNode | None":
        return StableNode(self, node_id) if node_id in self else None

    def values(self) -> list["StableNode"]:
        return [StableNode(self, i) for i in self.live_ids().tolist()]


class StableNode:
    """struct ksm_stable_node: one KSM page and how many rmap_items map it (a view of StableNodes at one id)."""

    __slots__ = ("_nodes", "id")

    def __init__(self, nodes: StableNodes, node_id: int) -> None:
        self._nodes = nodes
        self.id = node_id

    @property
    def kpfn(self) -> Pfn:
        return Pfn(self._nodes.kpfn_view[self.id])

    @property
    def key(self) -> int:
        return int(self._nodes.key[self.id])

    @property
    def checksum(self) -> int:
        return int(self._nodes.checksum[self.id])

    @property
    def nr_items(self) -> int:
        n: int = self._nodes.nr_items_view[self.id]
        return n

    @nr_items.setter
    def nr_items(self, value: int) -> None:
        self._nodes.nr_items_view[self.id] = value

    @property
    def chain(self) -> StableNodeChain | None:
        cid = self._nodes.chain_view[self.id]
        return self._nodes.chains.get(cid) if cid else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StableNode) and other._nodes is self._nodes and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"StableNode(id={self.id}, kpfn={self.kpfn:#x}, nr_items={self.nr_items})"


class StableTree(ContentBuckets):
    """root_stable_tree: content hash -> the entries filed under it, in order: node ids (> 0) and chains (-chain id)."""

    def set_entries(self, key: int, entries: list[int]) -> None:
        """The key's entries become `entries`, in that order."""
        now = self.entries(key)
        if entries[: len(now)] != now:
            self.erase_key(key)
            now = []
        for entry in entries[len(now) :]:
            self.add(key, entry)
