"""The EPT spte bit helpers (kvm/spte.py): pure int -> int functions."""

from hypothesis import given
from hypothesis import strategies as st

from hypervisor.kvm.spte import (
    SPTE_ACCESSED,
    SPTE_DIRTY,
    SPTE_EXECUTABLE,
    SPTE_HOST_WRITEABLE,
    SPTE_NONPRESENT,
    SPTE_PFN_MASK,
    SPTE_READABLE,
    SPTE_WRITABLE,
    is_accessed_spte,
    is_shadow_present_pte,
    is_writable_pte,
    make_spte,
    spte_clear_accessed,
    spte_permits,
    spte_set_pfn_readonly,
    spte_to_pfn,
)
from hypervisor.types import Pfn

pfns = st.integers(min_value=0, max_value=(1 << 40) - 1).map(Pfn)
any_spte = st.integers(min_value=0, max_value=(1 << 64) - 1)


def test_make_spte_writable_sets_read_write_exec_accessed_and_host_writeable() -> None:
    spte = make_spte(Pfn(0x1234), writable=True)
    assert spte == (0x1234 << 12) | SPTE_READABLE | SPTE_WRITABLE | SPTE_EXECUTABLE | SPTE_ACCESSED | (
        SPTE_HOST_WRITEABLE
    )


def test_make_spte_read_only_has_neither_writable_nor_host_writeable() -> None:
    spte = make_spte(Pfn(7), writable=False)
    assert not spte & SPTE_WRITABLE
    assert not spte & SPTE_HOST_WRITEABLE
    assert spte & SPTE_READABLE and spte & SPTE_EXECUTABLE


def test_make_spte_without_accessed_leaves_the_accessed_bit_clear() -> None:
    assert not is_accessed_spte(make_spte(Pfn(7), writable=True, accessed=False))


def test_nonpresent_spte_is_not_present_and_permits_nothing() -> None:
    assert not is_shadow_present_pte(SPTE_NONPRESENT)
    assert not spte_permits(SPTE_NONPRESENT, write=False)
    assert not spte_permits(SPTE_NONPRESENT, write=True)


@given(pfns, st.booleans(), st.booleans())
def test_make_spte_round_trips_pfn_and_permissions(pfn: Pfn, writable: bool, accessed: bool) -> None:
    spte = make_spte(pfn, writable, accessed)
    assert spte_to_pfn(spte) == pfn
    assert is_shadow_present_pte(spte)
    assert is_writable_pte(spte) == writable
    assert bool(spte & SPTE_HOST_WRITEABLE) == writable
    assert is_accessed_spte(spte) == accessed
    assert spte_permits(spte, write=False)
    assert spte_permits(spte, write=True) == writable


@given(any_spte, pfns)
def test_spte_set_pfn_readonly_clears_w_and_host_writable_and_keeps_other_bits(spte: int, new_pfn: Pfn) -> None:
    new = spte_set_pfn_readonly(spte, new_pfn)
    assert spte_to_pfn(new) == new_pfn
    assert not new & SPTE_WRITABLE
    assert not new & SPTE_HOST_WRITEABLE
    kept = ~(SPTE_PFN_MASK | SPTE_WRITABLE | SPTE_HOST_WRITEABLE)
    assert new & kept == spte & kept


@given(pfns, pfns)
def test_spte_set_pfn_readonly_keeps_a_present_spte_readable_accessed_and_dirty(old: Pfn, new_pfn: Pfn) -> None:
    spte = make_spte(old, writable=True) | SPTE_DIRTY
    new = spte_set_pfn_readonly(spte, new_pfn)
    assert spte_permits(new, write=False)
    assert not spte_permits(new, write=True)
    assert is_accessed_spte(new) and new & SPTE_DIRTY and new & SPTE_EXECUTABLE


@given(any_spte)
def test_spte_clear_accessed_clears_only_the_accessed_bit(spte: int) -> None:
    assert spte_clear_accessed(spte) == spte & ~SPTE_ACCESSED


@given(any_spte)
def test_spte_permits_needs_readable_for_any_access_and_writable_for_a_write(spte: int) -> None:
    readable = bool(spte & SPTE_READABLE)
    assert spte_permits(spte, write=False) == readable
    assert spte_permits(spte, write=True) == (readable and bool(spte & SPTE_WRITABLE))
