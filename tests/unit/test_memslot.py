"""Memslot arithmetic (kvm/memslot.py): gfn <-> hva, slot lookup, overlap, hva ranges."""

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from hypervisor.kvm.memslot import Memslot, Memslots
from hypervisor.types import PAGE_SIZE, Gfn, Hva

UA = Hva(0x7F00_0000_0000)


def two_slots() -> Memslots:
    """Slot 0: gfn [0, 16) at UA; slot 1: gfn [32, 40) at UA + 16 pages (contiguous in hva)."""
    slots = Memslots()
    slots.add(Memslot(1, Gfn(32), 8, Hva(UA + 16 * PAGE_SIZE)))
    slots.add(Memslot(0, Gfn(0), 16, UA))
    return slots


@given(
    base=st.integers(0, 1 << 30),
    npages=st.integers(1, 1 << 16),
    ua_page=st.integers(0, 1 << 35),
    offset=st.integers(0, (1 << 16) - 1),
    byte=st.integers(0, PAGE_SIZE - 1),
)
def test_gfn_to_hva_and_hva_to_gfn_round_trip_inside_a_slot(
    base: int, npages: int, ua_page: int, offset: int, byte: int
) -> None:
    assume(offset < npages)
    slot = Memslot(0, Gfn(base), npages, Hva(ua_page * PAGE_SIZE))
    gfn = Gfn(base + offset)
    hva = slot.gfn_to_hva(gfn)
    assert hva == ua_page * PAGE_SIZE + offset * PAGE_SIZE
    assert slot.hva_to_gfn(hva) == gfn
    assert slot.hva_to_gfn(Hva(hva + byte)) == gfn
    assert slot.contains_gfn(gfn)


@given(npages=st.integers(1, 64), past=st.integers(0, 1 << 20))
def test_hva_to_gfn_outside_the_slot_is_none(npages: int, past: int) -> None:
    slot = Memslot(0, Gfn(100), npages, UA)
    assert slot.hva_to_gfn(Hva(UA - 1 - past)) is None
    assert slot.hva_to_gfn(Hva(UA + npages * PAGE_SIZE + past)) is None
    assert not slot.contains_gfn(Gfn(99))
    assert not slot.contains_gfn(slot.end_gfn)


def test_gfn_to_memslot_finds_the_slot_holding_the_gfn_and_none_in_holes() -> None:
    slots = two_slots()
    for gfn in range(0, 16):
        slot = slots.gfn_to_memslot(Gfn(gfn))
        assert slot is not None and slot.id == 0
    for gfn in range(32, 40):
        slot = slots.gfn_to_memslot(Gfn(gfn))
        assert slot is not None and slot.id == 1
    for gfn in (16, 20, 31, 40, 1000):
        assert slots.gfn_to_memslot(Gfn(gfn)) is None
    assert slots.max_gfn == 40
    assert [s.id for s in slots] == [0, 1]


@pytest.mark.parametrize(("base", "npages"), [(0, 1), (15, 1), (10, 30), (31, 2), (39, 5), (0, 100)])
def test_adding_an_overlapping_memslot_is_refused(base: int, npages: int) -> None:
    slots = two_slots()
    with pytest.raises(ValueError, match="overlaps"):
        slots.add(Memslot(2, Gfn(base), npages, Hva(0x1000_0000)))
    assert len(slots.slots) == 2


def test_adjacent_memslots_do_not_overlap() -> None:
    slots = two_slots()
    slots.add(Memslot(2, Gfn(16), 16, Hva(0x1000_0000)))
    assert [s.id for s in slots] == [0, 2, 1]


def test_an_empty_memslot_is_refused() -> None:
    with pytest.raises(ValueError):
        Memslots().add(Memslot(0, Gfn(0), 0, UA))


def test_hva_to_gfns_splits_a_range_across_two_slots() -> None:
    slots = two_slots()
    # From the last 2 pages of slot 0 into the first 3 pages of slot 1.
    got = slots.hva_to_gfns(Hva(UA + 14 * PAGE_SIZE), Hva(UA + 19 * PAGE_SIZE))
    assert [(s.id, lo, hi) for s, lo, hi in got] == [(0, 14, 16), (1, 32, 35)]


def test_hva_to_gfns_rounds_an_unaligned_range_out_to_whole_pages() -> None:
    slots = two_slots()
    got = slots.hva_to_gfns(Hva(UA + 3 * PAGE_SIZE + 1), Hva(UA + 5 * PAGE_SIZE + 1))
    assert [(s.id, lo, hi) for s, lo, hi in got] == [(0, 3, 6)]


def test_hva_to_gfns_outside_every_slot_is_empty() -> None:
    slots = two_slots()
    assert slots.hva_to_gfns(Hva(UA - 10 * PAGE_SIZE), UA) == []
    assert slots.hva_to_gfns(Hva(UA + 24 * PAGE_SIZE), Hva(UA + 30 * PAGE_SIZE)) == []


@given(st.integers(-4 * PAGE_SIZE, 28 * PAGE_SIZE), st.integers(1, 32 * PAGE_SIZE))
def test_hva_to_gfns_returns_exactly_the_gfns_whose_page_meets_the_range(start_off: int, length: int) -> None:
    slots = two_slots()
    start, end = Hva(UA + start_off), Hva(UA + start_off + length)
    got = {(s.id, g) for s, lo, hi in slots.hva_to_gfns(start, end) for g in range(lo, hi)}
    expected = set()
    for slot in slots:
        for g in range(slot.base_gfn, slot.end_gfn):
            page = slot.gfn_to_hva(Gfn(g))
            if page < end and start < page + PAGE_SIZE:
                expected.add((slot.id, g))
    assert got == expected


def test_memslots_gfn_to_hva_finds_each_slot_whichever_was_used_last_and_none_outside() -> None:
    """2.6.32 kvm_main.c gfn_to_hva(): the slot's hva, bad_hva() (None here) outside every slot; the
    lookup tries 6.8's last_used_slot first, which must never answer for a gfn outside it."""
    slots = two_slots()
    for gfn, hva in ((33, UA + 17 * PAGE_SIZE), (2, UA + 2 * PAGE_SIZE), (39, UA + 23 * PAGE_SIZE),
                     (15, UA + 15 * PAGE_SIZE)):
        assert slots.gfn_to_hva(Gfn(gfn)) == hva
        assert slots.last_used_slot is slots.gfn_to_memslot(Gfn(gfn))
    for gfn in (16, 31, 40):
        assert slots.gfn_to_hva(Gfn(gfn)) is None
        assert slots.gfn_to_memslot(Gfn(gfn)) is None
