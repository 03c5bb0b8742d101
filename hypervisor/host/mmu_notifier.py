"""The mmu_notifier chain: how the host mm tells secondary MMUs (KVM) that a pte changed.

Mirrors include/linux/mmu_notifier.h and mm/mmu_notifier.c of 2.6.32: a notifier
is a struct of optional callbacks (`MmuNotifierOps`); an mm keeps the registered
notifiers in a list and every `mmu_notifier_*` call walks it.  A notifier whose
ops lack `change_pte` receives `invalidate_page` instead (the seed commit's
fallback).  The helpers at the bottom (`set_pte_at_notify`,
`ptep_clear_flush_notify`, `ptep_clear_flush_young_notify`) are how mm code
changes a pte that a secondary MMU may cache; which notifications they send
depends on the kernel era (hypervisor/profiles.py).
"""

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from ..events import MmuNotifierCall
from ..types import PAGE_SIZE, Hva

if TYPE_CHECKING:
    from ..profiles import Profile
    from .mm import HostMm


@dataclass(frozen=True)
class MmuNotifierOps:
    """struct mmu_notifier_ops: every callback optional, as in the kernel."""

    release: Callable[["MmuNotifier", "HostMm"], None] | None = None
    clear_flush_young: Callable[["MmuNotifier", "HostMm", Hva], bool] | None = None
    change_pte: Callable[["MmuNotifier", "HostMm", Hva, int], None] | None = None
    invalidate_page: Callable[["MmuNotifier", "HostMm", Hva], None] | None = None
    invalidate_range_start: Callable[["MmuNotifier", "HostMm", Hva, Hva], None] | None = None
    invalidate_range_end: Callable[["MmuNotifier", "HostMm", Hva, Hva], None] | None = None


@dataclass
class MmuNotifier:
    """struct mmu_notifier: the ops plus, for hvsim's reports, the calls it received."""

    ops: MmuNotifierOps
    calls: Counter[str] = field(default_factory=Counter)


def mmu_notifier_register(mn: MmuNotifier, mm: "HostMm") -> None:
    if mn in mm.mmu_notifiers:
        raise ValueError("notifier registered twice")
    mm.mmu_notifiers.append(mn)


def mmu_notifier_unregister(mn: MmuNotifier, mm: "HostMm") -> None:
    """Unregister runs ->release first, as the kernel does, so no spte outlives it."""
    if mn.ops.release is not None:
        mn.calls["release"] += 1
        mn.ops.release(mn, mm)
    mm.mmu_notifiers.remove(mn)


def _emit(mm: "HostMm", callback: str, start: Hva, end: Hva) -> None:
    """Announce a completed notifier call (after every callback ran: the state is coherent again)."""
    tracer = mm.tracer
    if tracer.enabled:
        tracer.event(MmuNotifierCall(callback, start, end))


def mmu_notifier_release(mm: "HostMm") -> None:
    """__mmu_notifier_release(): the mm is going away; each notifier is called once, then unhooked."""
    while mm.mmu_notifiers:
        mn = mm.mmu_notifiers.pop(0)
        if mn.ops.release is not None:
            mn.calls["release"] += 1
            mn.ops.release(mn, mm)
    _emit(mm, "release", Hva(0), Hva(0))


def _registered(mm: "HostMm", callback: str) -> Iterator[tuple[MmuNotifier, Any]]:
    """The notifiers of mm that implement `callback`, each call counted: the one dispatch loop."""
    for mn in list(mm.mmu_notifiers):
        op = getattr(mn.ops, callback)
        if op is not None:
            mn.calls[callback] += 1
            yield mn, op


def mmu_notifier_clear_flush_young(mm: "HostMm", address: Hva) -> bool:
    young = False
    for mn, op in _registered(mm, "clear_flush_young"):
        young |= bool(op(mn, mm, address))
    _emit(mm, "clear_flush_young", address, Hva(address + PAGE_SIZE))
    return young


def mmu_notifier_change_pte(mm: "HostMm", address: Hva, pte: int) -> None:
    """__mmu_notifier_change_pte(): ->change_pte, or (2.6.32 .. 3.6) ->invalidate_page where it is missing.

    3.7's 6bdb913f0a70 dropped the fallback (mm/mmu_notifier.c, read in 3.6.5 and
    3.7.2): a notifier without ->change_pte is covered by the invalidate_range_start/end
    that the same commit put around every set_pte_at_notify caller.
    """
    fallback = mm.profile.change_pte_falls_back_to_invalidate_page
    for mn in list(mm.mmu_notifiers):
        if mn.ops.change_pte is not None:
            mn.calls["change_pte"] += 1
            mn.ops.change_pte(mn, mm, address, pte)
        elif fallback and mn.ops.invalidate_page is not None:
            mn.calls["invalidate_page"] += 1
            mn.ops.invalidate_page(mn, mm, address)
    _emit(mm, "change_pte", address, Hva(address + PAGE_SIZE))


def mmu_notifier_invalidate_page(mm: "HostMm", address: Hva) -> None:
    for mn, op in _registered(mm, "invalidate_page"):
        op(mn, mm, address)
    _emit(mm, "invalidate_page", address, Hva(address + PAGE_SIZE))


def mmu_notifier_invalidate_range_start(mm: "HostMm", start: Hva, end: Hva) -> None:
    for mn, op in _registered(mm, "invalidate_range_start"):
        op(mn, mm, start, end)
    _emit(mm, "invalidate_range_start", start, end)


def mmu_notifier_invalidate_range_end(mm: "HostMm", start: Hva, end: Hva) -> None:
    for mn, op in _registered(mm, "invalidate_range_end"):
        op(mn, mm, start, end)
    _emit(mm, "invalidate_range_end", start, end)


# --- the range bracket: every era decision about it lives here ---------------------------


class RangeSite(Enum):
    """The mm and KSM code that changes ptes a secondary MMU may cache, as the bracket sees it."""

    ZAP_PAGE_RANGE = "zap_page_range"  # munmap, MADV_DONTNEED: bracketed since 2.6.27
    DO_WP_PAGE_COPY = "do_wp_page"  # the COW copy: bracketed from 3.7 (6bdb913f0a70)
    KSM_WRITE_PROTECT = "write_protect_page"  # bracketed from 3.7 (6bdb913f0a70)
    KSM_REPLACE_PAGE = "replace_page"  # bracketed from 3.7 (6bdb913f0a70)


def _site_is_bracketed(profile: "Profile", site: RangeSite) -> bool:
    """Does the kernel of `profile` bracket this call site with invalidate_range_start/end?"""
    if site is RangeSite.DO_WP_PAGE_COPY:
        return profile.do_wp_page_copy_in_invalidate_range
    if site is RangeSite.ZAP_PAGE_RANGE:
        return True
    return profile.ksm_pte_updates_in_invalidate_range


class MmuNotifierRange:
    """`with MmuNotifierRange(mm, start, end, site):` invalidate_range_start ... invalidate_range_end.

    Named after the kernel's struct mmu_notifier_range, which carries the same mm, start and end from the
    start call to the end call (read in 6.8 include/linux/mmu_notifier.h; the version that introduced it
    is unverified).  A no-op where the kernel of mm's profile had no bracket at that
    site (2.6.32 .. 3.6 for the COW copy and KSM's pte updates: 6bdb913f0a70 added them in 3.7).  A class
    rather than a contextlib generator: every KSM merge opens two, and a generator-based `with` costs
    about 1.4 us in the compiled build.
    """

    def __init__(self, mm: "HostMm", start: Hva, end: Hva, site: RangeSite = RangeSite.ZAP_PAGE_RANGE) -> None:
        self.mm = mm
        self.start = start
        self.end = end
        self.bracketed = _site_is_bracketed(mm.profile, site)

    def __enter__(self) -> None:
        if self.bracketed:
            mmu_notifier_invalidate_range_start(self.mm, self.start, self.end)

    def __exit__(self, *exc: object) -> None:
        # Also on an exception, as the generator's try/finally did: the end call balances the start call.
        if self.bracketed:
            mmu_notifier_invalidate_range_end(self.mm, self.start, self.end)


# --- the helpers mm code uses to change a pte a secondary MMU may cache -----------------


def set_pte_at_notify(mm: "HostMm", address: Hva, pte: int) -> None:
    """Install `pte` and tell secondary MMUs through ->change_pte, in the kernel's order.

    include/linux/mmu_notifier.h: 2.6.32 .. 3.6 set the pte, then call change_pte; from
    3.7 (48af0d7cb3c8) change_pte comes first, so that a secondary MMU never keeps the
    old page while a CPU can already write the new one (the caller cleared and flushed
    the pte before).  Where the kernel has no ->change_pte (6.10) this is plain
    set_pte_at(): the caller's invalidate_range_start/end bracket is the only notification.
    """
    if not mm.profile.notifier_has_change_pte:
        mm.set_pte_at(address, pte)
    elif mm.profile.set_pte_at_notify_change_pte_first:
        mmu_notifier_change_pte(mm, address, pte)
        mm.set_pte_at(address, pte)
    else:
        mm.set_pte_at(address, pte)
        mmu_notifier_change_pte(mm, address, pte)


def ptep_clear_flush_notify(mm: "HostMm", address: Hva) -> int:
    """Clear and flush the pte, then ->invalidate_page (a one-page range where that op is gone)."""
    if mm.profile.notifier_has_invalidate_page:
        old = mm.ptep_clear_flush(address)
        mmu_notifier_invalidate_page(mm, address)
        return old
    with MmuNotifierRange(mm, address, Hva(address + PAGE_SIZE)):
        return mm.ptep_clear_flush(address)


def ptep_clear_flush_young_notify(mm: "HostMm", address: Hva) -> bool:
    """Young if the host pte or any secondary MMU saw an access since the last call."""
    young = mm.ptep_clear_flush_young(address)
    young |= mmu_notifier_clear_flush_young(mm, address)
    return young
