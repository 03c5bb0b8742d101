"""KSM's stable tree: KSM pages by content, and chains of duplicates past max_page_sharing.

After mm/ksm.c stable_tree_search/stable_tree_insert (chains from 4.13).  The nodes and
the tree's buckets are the compact structures of host/ksm_nodes.py; here a node is its id.
"""

import numpy as np
from mypy_extensions import trait

from ..events import KsmRemoveKsmPage
from ..types import Pfn
from .ksm_items import (
    STABLE_FLAG,
    KsmState,
    StableNode,
    VmaItems,
    page_checksum_one,
)


@trait
class KsmStableTree(KsmState):
    def _get_ksm_page(self, node_id: int) -> bool:
        """get_ksm_page(): is the node's KSM page still alive and still this node's?"""
        return bool(self.frames.stable_node_view[self.nodes.kpfn_view[node_id]] == node_id)

    def _candidate(self, node_id: int) -> bool:
        nr_items: int = self.nodes.nr_items_view[node_id]
        if not self.profile.ksm_stable_node_chains:
            return nr_items > 0  # before 4.13 a KSM page has no sharing limit
        return 0 < nr_items < self.max_page_sharing

    def stable_tree_search(self, pfn: Pfn, h: int) -> StableNode | None:
        nodes = self.nodes
        for entry in self.stable_tree.entries(h):
            if entry < 0:
                chain = nodes.chains[-entry]
                for dup in list(chain.dups):
                    if not self._get_ksm_page(dup):
                        self._erase(dup)
                live = chain.dups
                if not live:
                    continue
                if not self.frames.pages_identical(pfn, Pfn(nodes.kpfn_view[live[0]])):
                    continue
                room = [d for d in live if self._candidate(d)]
                if not room:
                    return None  # equal content, but every copy is full
                return StableNode(nodes, max(room, key=lambda d: int(nodes.nr_items_view[d])))
            if not self._get_ksm_page(entry):
                self._erase(entry)
                continue
            if self.frames.pages_identical(pfn, Pfn(nodes.kpfn_view[entry])):
                return StableNode(nodes, entry) if self._candidate(entry) else None
        return None

    def stable_tree_insert(self, kpfn: Pfn, h: int) -> StableNode:
        if self.frames.is_free(kpfn):
            # set_page_stable_node() on a page nobody holds: the node would outlive the frame.
            raise AssertionError(f"stable_tree_insert on free frame {kpfn:#x}")
        nodes = self.nodes
        node_id = nodes.new(kpfn, h, page_checksum_one(self.frames, kpfn))
        node = StableNode(nodes, node_id)
        self.frames.stable_node[kpfn] = node_id
        entries, end = self.stable_tree.probe(h)
        if not self.profile.ksm_stable_node_chains:
            self.stable_tree.add(h, node_id, end)  # no chains before 4.13 (2c653d0ee2ae)
            return node
        for pos, entry in enumerate(entries):
            if entry < 0:
                chain = nodes.chains[-entry]
                if chain.dups and self.frames.pages_identical(kpfn, Pfn(nodes.kpfn_view[chain.dups[0]])):
                    nodes.chain_view[node_id] = chain.id
                    chain.dups.append(node_id)
                    return node
            elif self._get_ksm_page(entry) and self.frames.pages_identical(kpfn, Pfn(nodes.kpfn_view[entry])):
                # A full node of the same content becomes a chain with both as dups.
                entries[pos] = -nodes.new_chain(h, [entry, node_id]).id
                self.stable_tree.set_entries(h, entries)
                return node
        self.stable_tree.add(h, node_id, end)
        return node

    def _stable_tree_append(self, items: VmaItems, idx: int, node: StableNode) -> None:
        items.flags_view[idx] = STABLE_FLAG
        items.node_view[idx] = node.id
        node.nr_items += 1

    def _erase_node(self, node: StableNode) -> None:
        self._erase(node.id)

    def _erase(self, node_id: int) -> None:
        """remove_node_from_stable_tree(): its rmap_items lose their stable membership."""
        nodes = self.nodes
        if node_id not in nodes:
            return
        nodes.kill(node_id)
        if nodes.nr_items_view[node_id]:
            for slot in self.slots:
                for items in slot.vmas:
                    for idx in np.flatnonzero((items.node == node_id) & (items.flags & STABLE_FLAG > 0)):
                        items.flags[int(idx)] = 0
            nodes.nr_items_view[node_id] = 0
        key = int(nodes.key[node_id])
        entries = self.stable_tree.entries(key)
        cid = nodes.chain_view[node_id]
        if cid:
            chain = nodes.chains[cid]
            chain.dups.remove(node_id)
            if len(chain.dups) <= 1 and -cid in entries:
                pos = entries.index(-cid)
                if chain.dups:
                    nodes.chain_view[chain.dups[0]] = 0
                    entries[pos] = chain.dups[0]
                else:
                    del entries[pos]
                del nodes.chains[cid]
        elif node_id in entries:
            entries.remove(node_id)
        self.stable_tree.set_entries(key, entries)
        kpfn = Pfn(nodes.kpfn_view[node_id])
        if self.frames.stable_node_view[kpfn] == node_id:
            self.frames.stable_node[kpfn] = 0
        if self.tracer.enabled:  # once the node is gone (the checker runs on events)
            self.tracer.event(KsmRemoveKsmPage(int(kpfn)))
