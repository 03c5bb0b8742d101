"""KSM's stable tree: KSM pages by content, and chains of duplicates past max_page_sharing.

After mm/ksm.c stable_tree_search/stable_tree_insert (chains from 4.13).
"""

from typing import TYPE_CHECKING

import numpy as np

from ..events import KsmRemoveKsmPage
from ..types import Pfn
from .ksm_items import (
    STABLE_FLAG,
    KsmState,
    StableNode,
    StableNodeChain,
    VmaItems,
    page_checksum_one,
)

if TYPE_CHECKING:
    pass


class KsmStableTree(KsmState):
    def _get_ksm_page(self, node: StableNode) -> bool:
        """get_ksm_page(): is the node's KSM page still alive and still this node's?"""
        return int(self.frames.stable_node[node.kpfn]) == node.id

    def _candidate(self, node: StableNode) -> bool:
        if not self.profile.ksm_stable_node_chains:
            return node.nr_items > 0  # before 4.13 a KSM page has no sharing limit
        return 0 < node.nr_items < self.max_page_sharing

    def stable_tree_search(self, pfn: Pfn, h: int) -> StableNode | None:
        entries = self.stable_tree.get(h)
        if not entries:
            return None
        for entry in list(entries):
            if isinstance(entry, StableNodeChain):
                for dup in list(entry.dups):
                    if not self._get_ksm_page(dup):
                        self._erase_node(dup)
                live = entry.dups
                if not live:
                    continue
                if not self.frames.pages_identical(pfn, live[0].kpfn):
                    continue
                room = [d for d in live if self._candidate(d)]
                if not room:
                    return None  # equal content, but every copy is full
                return max(room, key=lambda d: d.nr_items)
            if not self._get_ksm_page(entry):
                self._erase_node(entry)
                continue
            if self.frames.pages_identical(pfn, entry.kpfn):
                return entry if self._candidate(entry) else None
        return None

    def stable_tree_insert(self, kpfn: Pfn, h: int) -> StableNode:
        if self.frames.is_free(kpfn):
            # set_page_stable_node() on a page nobody holds: the node would outlive the frame.
            raise AssertionError(f"stable_tree_insert on free frame {kpfn:#x}")
        node = StableNode(self._next_node_id, kpfn, h)
        node.checksum = page_checksum_one(self.frames, kpfn)
        self.stable_checksums[node.checksum] += 1
        self._next_node_id += 1
        self.nodes[node.id] = node
        self.frames.stable_node[kpfn] = node.id
        entries = self.stable_tree.setdefault(h, [])
        if not self.profile.ksm_stable_node_chains:
            entries.append(node)  # no chains before 4.13 (2c653d0ee2ae)
            return node
        for pos, entry in enumerate(entries):
            if isinstance(entry, StableNodeChain):
                if entry.dups and self.frames.pages_identical(kpfn, entry.dups[0].kpfn):
                    node.chain = entry
                    entry.dups.append(node)
                    return node
            elif self._get_ksm_page(entry) and self.frames.pages_identical(kpfn, entry.kpfn):
                # A full node of the same content becomes a chain with both as dups.
                chain = StableNodeChain(h, [entry, node])
                entry.chain = node.chain = chain
                entries[pos] = chain
                return node
        entries.append(node)
        return node

    def _stable_tree_append(self, items: VmaItems, idx: int, node: StableNode) -> None:
        items.flags[idx] = STABLE_FLAG
        items.node[idx] = node.id
        node.nr_items += 1

    def _erase_node(self, node: StableNode) -> None:
        """remove_node_from_stable_tree(): its rmap_items lose their stable membership."""
        if node.id not in self.nodes:
            return
        del self.nodes[node.id]
        self.stable_checksums[node.checksum] -= 1
        if not self.stable_checksums[node.checksum]:
            del self.stable_checksums[node.checksum]
        if node.nr_items:
            for slot in self.slots:
                for items in slot.vmas:
                    for idx in np.flatnonzero((items.node == node.id) & (items.flags & STABLE_FLAG > 0)):
                        items.flags[int(idx)] = 0
            node.nr_items = 0
        entries = self.stable_tree.get(node.key, [])
        if node.chain is not None:
            chain = node.chain
            chain.dups.remove(node)
            if len(chain.dups) <= 1 and chain in entries:
                pos = entries.index(chain)
                if chain.dups:
                    chain.dups[0].chain = None
                    entries[pos] = chain.dups[0]
                else:
                    del entries[pos]
        elif node in entries:
            entries.remove(node)
        if not entries:
            self.stable_tree.pop(node.key, None)
        if int(self.frames.stable_node[node.kpfn]) == node.id:
            self.frames.stable_node[node.kpfn] = 0
        if self.tracer.enabled:  # once the node is gone (the checker runs on events)
            self.tracer.event(KsmRemoveKsmPage(int(node.kpfn)))
