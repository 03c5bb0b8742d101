"""The guest page walk (cpu/walk.py) as pure logic over a dict of guest page-table entries: no Unicorn."""

import pytest

from hypervisor.cpu.exceptions import PF_ERR_PRESENT, PF_VECTOR
from hypervisor.cpu.walk import GuestFault, PagingStructureCache, walk_gva
from hypervisor.x86 import PTE_P, PTE_PS, PTE_RW

CR3 = 0x1000
PDPT, PD, PT = 0x2000, 0x3000, 0x4000


def tables(pml4e: int = PDPT | PTE_P | PTE_RW, pdpte: int = PD | PTE_P | PTE_RW,
           pde: int = PT | PTE_P | PTE_RW, pte: int = 0x7000 | PTE_P | PTE_RW) -> dict[int, int]:
    """One mapping of gva 0x40_1000 (PML4 0, PDPT 0, PD 2, PT 1) through four levels."""
    return {CR3: pml4e, PDPT: pdpte, PD + 2 * 8: pde, PT + 1 * 8: pte}


class Reader:
    """read_pte over a dict, counting the reads (absent entries are not present)."""

    def __init__(self, mem: dict[int, int]) -> None:
        self.mem = mem
        self.reads: list[int] = []

    def __call__(self, gpa: int) -> int:
        self.reads.append(gpa)
        return self.mem.get(gpa, 0)


def test_a_4k_mapping_returns_the_frame_plus_offset_and_writable() -> None:
    assert walk_gva(CR3, 0x40_1234, False, Reader(tables()), {}) == (0x7234, True)


def test_a_2m_pde_maps_the_whole_region() -> None:
    read = Reader(tables(pde=0x60_0000 | PTE_P | PTE_RW | PTE_PS))
    assert walk_gva(CR3, 0x45_6789, False, read, {}) == (0x65_6789, True)


def test_a_1g_pdpte_maps_by_2m_regions_inside_it() -> None:
    read = Reader(tables(pdpte=0x4000_0000 | PTE_P | PTE_RW | PTE_PS))
    assert walk_gva(CR3, 0x1234_5678, False, read, {}) == (0x5234_5678, True)


def test_writable_is_the_and_of_every_level() -> None:
    read = Reader(tables(pdpte=PD | PTE_P))
    assert walk_gva(CR3, 0x40_1000, False, read, {}) == (0x7000, False)


def test_a_write_through_a_read_only_level_is_a_present_page_fault() -> None:
    with pytest.raises(GuestFault) as fault:
        walk_gva(CR3, 0x40_1000, True, Reader(tables(pte=0x7000 | PTE_P)), {})
    assert (fault.value.vector, fault.value.error_code) == (PF_VECTOR, PF_ERR_PRESENT)


def test_a_missing_level_is_a_not_present_page_fault() -> None:
    with pytest.raises(GuestFault) as fault:
        walk_gva(CR3, 0x40_1000, False, Reader(tables(pde=0)), {})
    assert (fault.value.vector, fault.value.error_code) == (PF_VECTOR, 0)


def test_a_non_canonical_gva_is_a_general_protection_fault() -> None:
    with pytest.raises(GuestFault) as fault:
        walk_gva(CR3, 0x0000_8000_0000_0000, False, Reader(tables()), {})
    assert fault.value.vector == 13


def test_the_paging_structure_cache_spares_the_upper_levels_of_a_2m_region() -> None:
    read = Reader(tables() | {PT + 2 * 8: 0x9000 | PTE_P})
    cache: PagingStructureCache = {}
    walk_gva(CR3, 0x40_1000, False, read, cache)
    assert read.reads == [CR3, PDPT, PD + 2 * 8, PT + 8]
    read.reads.clear()
    assert walk_gva(CR3, 0x40_2000, False, read, cache) == (0x9000, False)
    assert read.reads == [PT + 2 * 8]  # only the leaf: PML4E, PDPTE and PDE came from the cache


def test_a_cached_walk_keeps_the_old_root_until_the_caller_empties_the_cache() -> None:
    # Why the vCPU must empty the cache on a CR3 change: the cache is keyed by gva only.
    other_root = 0x8000
    read = Reader(tables() | {other_root: 0})
    cache: PagingStructureCache = {}
    walk_gva(CR3, 0x40_1000, False, read, cache)
    assert walk_gva(other_root, 0x40_1000, False, read, cache) == (0x7000, True)
    cache.clear()
    with pytest.raises(GuestFault):
        walk_gva(other_root, 0x40_1000, False, read, cache)
