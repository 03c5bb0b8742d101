"""The mmu_notifier chain (host/mmu_notifier.py): dispatch, per-era helpers, release."""

import pytest

from hypervisor.events import MmuNotifierCall, RecordingTracer
from hypervisor.host.mm import HostMm, mk_pte, pte_present, pte_write
from hypervisor.host.mmu_notifier import (
    MmuNotifier,
    MmuNotifierOps,
    mmu_notifier_change_pte,
    mmu_notifier_clear_flush_young,
    mmu_notifier_invalidate_page,
    mmu_notifier_invalidate_range_end,
    mmu_notifier_invalidate_range_start,
    mmu_notifier_register,
    mmu_notifier_release,
    mmu_notifier_unregister,
    ptep_clear_flush_notify,
    ptep_clear_flush_young_notify,
    set_pte_at_notify,
)
from hypervisor.types import PAGE_SIZE, Hva, Pfn

from .support import AREA, ERAS, Host, NotifierLog, make_host

END = Hva(AREA + PAGE_SIZE)


def host_with_page(era: str) -> Host:
    host = make_host(era)
    host.mm.mmap(AREA, 4 * PAGE_SIZE)
    host.mm.handle_mm_fault(AREA, write=True)
    return host


def test_every_callback_reaches_every_notifier_in_registration_order_and_is_counted() -> None:
    host = host_with_page("2.6.32")
    log = NotifierLog()
    a = log.register(host.mm, "a")
    b = log.register(host.mm, "b")
    pte = mk_pte(Pfn(3), writable=False)
    mmu_notifier_invalidate_range_start(host.mm, AREA, END)
    mmu_notifier_invalidate_range_end(host.mm, AREA, END)
    mmu_notifier_invalidate_page(host.mm, AREA)
    mmu_notifier_change_pte(host.mm, AREA, pte)
    mmu_notifier_clear_flush_young(host.mm, AREA)
    mmu_notifier_release(host.mm)
    assert log.entries == [
        ("a", "invalidate_range_start", (AREA, END)),
        ("b", "invalidate_range_start", (AREA, END)),
        ("a", "invalidate_range_end", (AREA, END)),
        ("b", "invalidate_range_end", (AREA, END)),
        ("a", "invalidate_page", (AREA,)),
        ("b", "invalidate_page", (AREA,)),
        ("a", "change_pte", (AREA, pte)),
        ("b", "change_pte", (AREA, pte)),
        ("a", "clear_flush_young", (AREA,)),
        ("b", "clear_flush_young", (AREA,)),
        ("a", "release", ()),
        ("b", "release", ()),
    ]
    for mn in (a, b):
        assert dict(mn.calls) == {
            "invalidate_range_start": 1,
            "invalidate_range_end": 1,
            "invalidate_page": 1,
            "change_pte": 1,
            "clear_flush_young": 1,
            "release": 1,
        }


def test_a_notifier_with_no_ops_is_walked_past_silently() -> None:
    host = host_with_page("2.6.32")
    empty = MmuNotifier(MmuNotifierOps())
    mmu_notifier_register(empty, host.mm)
    mmu_notifier_invalidate_range_start(host.mm, AREA, END)
    mmu_notifier_invalidate_range_end(host.mm, AREA, END)
    mmu_notifier_invalidate_page(host.mm, AREA)
    mmu_notifier_change_pte(host.mm, AREA, 0)
    assert not mmu_notifier_clear_flush_young(host.mm, AREA)
    mmu_notifier_release(host.mm)
    assert sum(empty.calls.values()) == 0


def test_registering_a_notifier_twice_is_refused() -> None:
    host = host_with_page("3.7")
    mn = NotifierLog().notifier("a")
    mmu_notifier_register(mn, host.mm)
    with pytest.raises(ValueError):
        mmu_notifier_register(mn, host.mm)


def test_every_dispatch_is_reported_to_the_mms_tracer() -> None:
    host = host_with_page("3.7")
    recorder = RecordingTracer()
    host.mm.tracer = recorder
    mmu_notifier_invalidate_range_start(host.mm, AREA, END)
    mmu_notifier_change_pte(host.mm, AREA, 0)
    mmu_notifier_invalidate_range_end(host.mm, AREA, END)
    mmu_notifier_release(host.mm)
    seen = [(e.callback, e.start, e.end) for e, _ in recorder.events if isinstance(e, MmuNotifierCall)]
    assert seen == [
        ("invalidate_range_start", AREA, END),
        ("change_pte", AREA, END),
        ("invalidate_range_end", AREA, END),
        ("release", 0, 0),
    ]


@pytest.mark.parametrize("era", ["2.6.32", "2.6.38", "3.6"])
def test_notifier_without_change_pte_gets_invalidate_page_until_3_6(era: str) -> None:
    # __mmu_notifier_change_pte's fallback, read in 2.6.32, 2.6.38 and 3.6.5 mm/mmu_notifier.c.
    host = host_with_page(era)
    log = NotifierLog()
    bare = log.register(host.mm, "bare", change_pte=False)
    log.register(host.mm, "full")
    pte = mk_pte(Pfn(3), writable=False)
    mmu_notifier_change_pte(host.mm, AREA, pte)
    assert log.entries == [("bare", "invalidate_page", (AREA,)), ("full", "change_pte", (AREA, pte))]
    assert bare.calls["invalidate_page"] == 1 and bare.calls["change_pte"] == 0


@pytest.mark.parametrize("era", ["3.7", "4.12"])
def test_notifier_without_change_pte_gets_nothing_from_change_pte_from_3_7(era: str) -> None:
    # 6bdb913f0a70 dropped the fallback: the range bracket around every caller covers it.
    host = host_with_page(era)
    log = NotifierLog()
    log.register(host.mm, "bare", change_pte=False)
    mmu_notifier_change_pte(host.mm, AREA, mk_pte(Pfn(3), writable=False))
    assert log.entries == []


def test_notifier_with_neither_change_pte_nor_invalidate_page_gets_nothing_in_2_6_32() -> None:
    host = host_with_page("2.6.32")
    log = NotifierLog()
    log.register(host.mm, "bare", change_pte=False, invalidate_page=False)
    mmu_notifier_change_pte(host.mm, AREA, mk_pte(Pfn(3), writable=False))
    assert log.entries == []


@pytest.mark.parametrize(("era", "sends", "change_pte_first"),
                         [("2.6.32", True, False), ("3.6", True, False), ("3.7", True, True), ("6.10", False, False)])
def test_set_pte_at_notify_calls_change_pte_after_set_pte_at_until_3_6_and_before_it_from_3_7(
        era: str, sends: bool, change_pte_first: bool) -> None:
    # include/linux/mmu_notifier.h: 2.6.32 .. 3.6.5 set_pte_at, then mmu_notifier_change_pte;
    # 3.7 (48af0d7cb3c8) swaps them, so a notifier sees the old (cleared) pte; 6.10 has no
    # change_pte at all.
    host = host_with_page(era)
    log = NotifierLog()
    seen_pte: list[int] = []

    def change_pte(mn: MmuNotifier, mm: HostMm, addr: Hva, pte: int) -> None:
        seen_pte.append(mm.pte(addr))

    mmu_notifier_register(MmuNotifier(MmuNotifierOps(change_pte=change_pte)), host.mm)
    log.register(host.mm)
    old = host.mm.pte(AREA)
    new = mk_pte(Pfn(9), writable=False)
    set_pte_at_notify(host.mm, AREA, new)
    assert host.mm.pte(AREA) == new
    if sends:
        assert log.entries == [("rec", "change_pte", (AREA, new))]
        assert seen_pte == [old if change_pte_first else new]
    else:
        assert log.entries == [] and seen_pte == []


@pytest.mark.parametrize("era", ["2.6.32", "3.7"])
def test_ptep_clear_flush_notify_clears_then_sends_invalidate_page(era: str) -> None:
    host = host_with_page(era)
    before = host.mm.pte(AREA)
    log = NotifierLog()
    log.register(host.mm)
    assert ptep_clear_flush_notify(host.mm, AREA) == before
    assert not pte_present(host.mm.pte(AREA))
    assert log.entries == [("rec", "invalidate_page", (AREA,))]


def test_ptep_clear_flush_notify_sends_a_one_page_range_in_6_10() -> None:
    host = host_with_page("6.10")
    before = host.mm.pte(AREA)
    log = NotifierLog()
    log.register(host.mm)
    assert ptep_clear_flush_notify(host.mm, AREA) == before
    assert not pte_present(host.mm.pte(AREA))
    assert log.entries == [
        ("rec", "invalidate_range_start", (AREA, END)),
        ("rec", "invalidate_range_end", (AREA, END)),
    ]


@pytest.mark.parametrize(
    ("host_young", "secondary", "expected"),
    [
        (False, [False, False], False),
        (True, [False, False], True),
        (False, [False, True], True),
        (False, [True, False], True),
        (True, [True, True], True),
    ],
)
def test_ptep_clear_flush_young_notify_ors_the_host_bit_with_every_secondary_mmu(
    host_young: bool, secondary: list[bool], expected: bool
) -> None:
    host = host_with_page("2.6.32")
    if not host_young:
        host.mm.ptep_clear_flush_young(AREA)
    log = NotifierLog()
    for i, young in enumerate(secondary):
        log.register(host.mm, f"n{i}", young=young)
    assert ptep_clear_flush_young_notify(host.mm, AREA) is expected
    # Every secondary MMU is asked (no short circuit), and the host bit is now clear.
    assert log.callbacks() == ["clear_flush_young"] * len(secondary)
    assert not host.mm.ptep_clear_flush_young(AREA)


def test_unregister_calls_release_then_unhooks_the_notifier() -> None:
    host = host_with_page("3.7")
    log = NotifierLog()
    mn = log.register(host.mm, "a")
    log.register(host.mm, "b")
    mmu_notifier_unregister(mn, host.mm)
    assert log.entries == [("a", "release", ())]
    assert mn.calls["release"] == 1
    mmu_notifier_invalidate_page(host.mm, AREA)
    assert log.callbacks("a") == ["release"]
    assert log.callbacks("b") == ["invalidate_page"]


def test_release_unhooks_every_notifier_after_calling_it_once() -> None:
    host = host_with_page("6.10")
    log = NotifierLog()
    log.register(host.mm, "a")
    log.register(host.mm, "b")
    mmu_notifier_release(host.mm)
    mmu_notifier_release(host.mm)
    mmu_notifier_invalidate_range_start(host.mm, AREA, END)
    assert log.entries == [("a", "release", ()), ("b", "release", ())]
    assert host.mm.mmu_notifiers == []


@pytest.mark.parametrize("era", ERAS)
def test_set_pte_at_notify_of_a_writable_pte_reaches_change_pte_only_where_the_era_has_it(era: str) -> None:
    host = host_with_page(era)
    log = NotifierLog()
    log.register(host.mm)
    new = mk_pte(Pfn(4), writable=True)
    set_pte_at_notify(host.mm, AREA, new)
    assert pte_write(host.mm.pte(AREA))
    assert log.callbacks() == (["change_pte"] if host.profile.notifier_has_change_pte else [])
