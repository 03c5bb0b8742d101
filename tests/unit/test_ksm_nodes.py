"""host/ksm_nodes.py: stable nodes as arrays indexed by id, and the stable tree's compact buckets."""

import numpy as np

from hypervisor.host.ksm_nodes import StableNode, StableNodes, StableTree
from hypervisor.types import Pfn


def test_node_ids_are_handed_out_in_order_and_never_reused() -> None:
    nodes = StableNodes()
    a = nodes.new(Pfn(5), 0xAB, 7)
    b = nodes.new(Pfn(6), 0xCD, 8)
    nodes.kill(a)
    c = nodes.new(Pfn(7), 0xEF, 9)
    assert (a, b, c) == (1, 2, 3)
    assert a not in nodes and b in nodes and c in nodes and len(nodes) == 2
    assert [n.id for n in nodes.values()] == [2, 3]


def test_a_stable_node_is_a_view_of_the_arrays_at_its_id() -> None:
    nodes = StableNodes()
    node = nodes[nodes.new(Pfn(0x42), 2**63 + 1, 0xDEAD)]
    assert (node.kpfn, node.key, node.checksum, node.nr_items, node.chain) == (0x42, 2**63 + 1, 0xDEAD, 0, None)
    node.nr_items += 3
    assert int(nodes.nr_items[node.id]) == 3 and nodes.get(node.id) == node
    assert nodes.get(99) is None


def test_the_arrays_grow_by_doubling_and_keep_every_node() -> None:
    nodes = StableNodes()
    ids = [nodes.new(Pfn(i), i, i) for i in range(1, 200)]
    assert [StableNode(nodes, i).kpfn for i in ids] == list(range(1, 200))
    assert nodes.live.shape[0] == 256
    np.testing.assert_array_equal(np.sort(nodes.live_checksums()), np.arange(1, 200, dtype=np.uint32))


def test_a_chain_names_its_dups_and_they_name_it() -> None:
    nodes = StableNodes()
    a, b = nodes.new(Pfn(1), 9, 0), nodes.new(Pfn(2), 9, 0)
    chain = nodes.new_chain(9, [a, b])
    assert nodes[a].chain is chain and nodes[b].chain is chain and chain.dups == [a, b]


def test_set_entries_replaces_a_keys_entries_in_order() -> None:
    tree = StableTree()
    tree.set_entries(7, [3])
    assert tree.entries(7) == [3] and len(tree) == 1
    tree.set_entries(7, [3, -1])
    assert tree.entries(7) == [3, -1] and sorted(tree.all_entries()) == [-1, 3]
    copy = tree.entries(7)
    copy.append(5)  # entries() hands out a copy
    assert tree.entries(7) == [3, -1]
    tree.set_entries(7, [])
    assert not tree and tree.entries(7) == []
