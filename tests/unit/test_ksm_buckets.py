"""host/ksm_buckets.py and the unstable tree on it: content hash -> entries in the order filed, in numpy arrays."""

import random

import pytest

from hypervisor.host.ksm_buckets import ERASED, ContentBuckets
from hypervisor.types import PAGE_SIZE, Hva

from .support import full_scan, make_host, mergeable_area, page_of

TOP = 2**64 - 1  # its home is the table's last slot: its probe path wraps to slot 0


def test_a_keys_entries_come_out_in_the_order_filed_across_wraparound_and_rebuilds() -> None:
    table = ContentBuckets()
    keys = [TOP, TOP - 1, 5, TOP]
    filed: dict[int, list[int]] = {k: [] for k in keys}
    for n in range(1, 2000):
        key = keys[n % len(keys)]
        table.add(key, n)
        filed[key].append(n)
    assert table.capacity >= 2 * 1999  # grown by rebuilds on the way
    for key in keys:
        assert table.entries(key) == filed[key]
    assert table.entries(12345) == [] and len(table) == 1999


def test_the_table_agrees_with_a_dict_of_lists_under_random_filing_and_erasing() -> None:
    rng = random.Random(13)
    table = ContentBuckets()
    model: dict[int, list[int]] = {}
    keys = [rng.getrandbits(64) for _ in range(40)] + [TOP, 0]
    for n in range(1, 6000):
        key = rng.choice(keys)
        op = rng.random()
        if op < 0.6:
            table.add(key, n)
            model.setdefault(key, []).append(n)
        elif op < 0.8:
            table.erase_key(key)
            model.pop(key, None)
        else:
            entries = [e for e in model.get(key, []) if rng.random() < 0.5] + [n]
            table.add(key, n)  # set_entries' way, by hand: erase, then file anew
            table.erase_key(key)
            for e in entries:
                table.add(key, e)
            model[key] = entries
        if n % 500 == 0:
            assert {k: table.entries(k) for k in keys} == {k: model.get(k, []) for k in keys}
    assert len(table) == sum(len(v) for v in model.values())
    assert sorted(table.all_entries()) == sorted(e for v in model.values() for e in v)


def test_a_table_emptied_below_an_eighth_shrinks() -> None:
    table = ContentBuckets()
    for n in range(1, 1001):
        table.add(n << 50, n)
    big = table.capacity
    for n in range(1, 1001):
        table.erase_key(n << 50)
    assert table.capacity < big and not table and table.entries(7 << 50) == []


def test_an_erased_slot_keeps_its_place_on_the_probe_path() -> None:
    table = ContentBuckets()
    a, b = table.add(TOP, 1), table.add(TOP, 2)
    table.erase_at(a)
    assert table.entry_at(a) == ERASED and table.entries(TOP) == [2] and table.entry_at(b) == 2
    assert table.entry_at(-1) == 0 and table.entry_at(table.capacity) == 0


def test_an_rmap_items_node_field_holds_its_slot_in_the_unstable_tree_even_after_a_rebuild() -> None:
    host = make_host("3.7", nr_frames=1024)
    mergeable_area(host.mm, 300, Hva(0x1000_0000))
    mergeable_area(host.mm, 300, Hva(0x2000_0000))
    (slot,) = host.ksm.slots
    tree = host.ksm.unstable_tree
    first, second = slot.vmas
    for idx in range(300):
        tree.insert(idx << 40, first, idx)
        tree.insert(idx << 40, second, idx)
    assert tree.capacity >= 1024  # rebuilt on the way
    for items in (first, second):
        for idx in range(300):
            item_id = tree.entry_at(int(items.node[idx]))
            assert tree.rmap_item(item_id) == (items, idx)
    assert tree.entries(7 << 40) == [first.rmap_item_base + 7, second.rmap_item_base + 7]


def test_erasing_an_rmap_item_left_from_an_earlier_pass_leaves_this_passs_tree_alone() -> None:
    # 3.7 remove_rmap_item_from_tree: rb_erase only "if this rmap_item was inserted by this scan"
    # (the seqnr bits of rmap_item->address); here: only if its slot still holds it.
    host = make_host("3.7", nr_frames=64)
    mergeable_area(host.mm, 2, Hva(0x1000_0000))
    (slot,) = host.ksm.slots
    (items,) = slot.vmas
    tree = host.ksm.unstable_tree
    tree.insert(1 << 60, items, 0)
    tree.clear()  # a new pass; item 0 keeps its stale slot number
    tree.insert(1 << 60, items, 1)
    assert int(items.node[0]) == int(items.node[1])  # same home, same slot, another item now
    tree.erase(items, 0)
    assert tree.entries(1 << 60) == [items.rmap_item_base + 1]
    tree.erase(items, 1)
    assert not tree


@pytest.mark.parametrize("era", ["2.6.32", "3.7", "6.8"])
def test_pages_merge_through_the_unstable_tree_and_leave_it(era: str) -> None:
    host = make_host(era, nr_frames=256)
    base = mergeable_area(host.mm, 64, Hva(0x1000_0000))
    for i in range(64):
        host.mm.write_bytes(Hva(base + i * PAGE_SIZE), page_of(i % 32 + 1))
    host.ksm.set_run(1)
    full_scan(host.ksm)  # checksums
    full_scan(host.ksm)  # the first of each pair enters the unstable tree, the second merges with it
    c = host.ksm.counters()
    assert (c["pages_shared"], c["pages_sharing"], c["pages_unshared"]) == (32, 32, 0)
    assert len(host.ksm.unstable_tree) == 0 and len(host.ksm.stable_tree) == 32
