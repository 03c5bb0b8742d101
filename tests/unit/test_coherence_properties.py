"""Property: whatever the host, KSM and the guest do, sptes stay coherent with host ptes.

Random programs of guest accesses (through the EPT_VIOLATION handler, then a store
straight into the frame the spte maps, as the CPU would), VMM writes, ksmd scans,
aging and unmerging run on a small guest; after every step the test checks:

* a present spte maps the frame the host pte maps, and is writable only if the
  host pte is (no secondary mapping of a stale or shared page);
* every frame's mapcount is the number of ptes that map it, its refcount equals
  its mapcount (no pin leaked), and no frame is referenced while free;
* guest memory holds exactly what was written (KSM never changes contents).
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.host.frames import ZERO_PFN
from hypervisor.host.mm import MADV_MERGEABLE, pte_pfn, pte_present, pte_special, pte_write
from hypervisor.kvm.mmu import FaultResult
from hypervisor.kvm.spte import is_shadow_present_pte, is_writable_pte, spte_permits, spte_to_pfn
from hypervisor.kvm.vm import GUEST_RAM_HVA
from hypervisor.types import PAGE_SIZE, Gfn, Gpa

from .support import Guest, make_guest

PAGES = 6

Op = tuple[str, int, int]
ops = st.one_of(
    st.tuples(st.just("guest_read"), st.integers(0, PAGES - 1), st.just(0)),
    st.tuples(st.just("guest_write"), st.integers(0, PAGES - 1), st.integers(0, 3)),
    st.tuples(st.just("vmm_write"), st.integers(0, PAGES - 1), st.integers(0, 3)),
    st.tuples(st.just("scan"), st.integers(1, 2 * PAGES), st.just(0)),
    st.tuples(st.just("age"), st.integers(0, PAGES - 1), st.just(0)),
    st.tuples(st.just("zero_pages"), st.just(0), st.integers(0, 1)),
    st.tuples(st.just("unmerge_all"), st.just(0), st.just(0)),
)


def fault_until_permitted(g: Guest, gfn: int, write: bool) -> None:
    for _ in range(4):
        if spte_permits(g.spte(gfn), write):
            return
        result = g.vcpu.handle_ept_violation(Gfn(gfn), write, rip=0)
        assert result in (FaultResult.FIXED, FaultResult.RETRY)
    raise AssertionError(f"gfn {gfn}: the guest never got {'write' if write else 'read'} access")


def check_invariants(g: Guest, model: list[bytearray]) -> None:
    frames = g.frames
    mapcount = np.zeros(frames.nr_frames, dtype=np.int64)
    for gfn in range(PAGES):
        pte = g.mm.pte(g.hva(gfn))
        if pte_present(pte) and not pte_special(pte):
            mapcount[pte_pfn(pte)] += 1
        spte = g.spte(gfn)
        if is_shadow_present_pte(spte):
            assert pte_present(pte), f"gfn {gfn}: spte present over a none host pte"
            assert spte_to_pfn(spte) == pte_pfn(pte), f"gfn {gfn}: spte maps a stale frame"
            if is_writable_pte(spte):
                assert pte_write(pte), f"gfn {gfn}: writable spte over a read-only host pte"
        assert g.vm.read_guest(Gpa(gfn * PAGE_SIZE), PAGE_SIZE) == bytes(model[gfn]), f"gfn {gfn} content"
    mapcount[ZERO_PFN] = 0
    assert np.array_equal(frames.mapcount, mapcount)
    assert np.array_equal(frames.refcount, mapcount)
    assert g.vm.mmu.mmu_notifier_count == 0
    counters = g.host.ksm.counters()
    assert all(v >= 0 for k, v in counters.items() if k != "general_profit")


def run_program(era: str, change_pte: bool, program: list[Op]) -> None:
    g = make_guest(era, change_pte, pages=PAGES, nr_frames=64)
    g.mm.madvise(GUEST_RAM_HVA, PAGES * PAGE_SIZE, MADV_MERGEABLE)
    ksm = g.host.ksm
    ksm.set_run(1)
    model = [bytearray(PAGE_SIZE) for _ in range(PAGES)]
    for gfn in range(PAGES):
        fill = bytes([gfn % 3]) * PAGE_SIZE
        g.vm.write_guest(Gpa(gfn * PAGE_SIZE), fill)
        model[gfn][:] = fill
    check_invariants(g, model)
    for name, a, b in program:
        if name == "guest_read":
            fault_until_permitted(g, a, write=False)
        elif name == "guest_write":
            fault_until_permitted(g, a, write=True)
            g.frames.frames[spte_to_pfn(g.spte(a)), 0] = b  # the guest's store, through the spte
            model[a][0] = b
        elif name == "vmm_write":
            g.vm.write_guest(Gpa(a * PAGE_SIZE), bytes([b]))
            model[a][0] = b
        elif name == "scan":
            ksm.ksm_do_scan(a)
        elif name == "age":
            g.mm.page_referenced(g.hva(a))
        elif name == "zero_pages":
            ksm.use_zero_pages = bool(b)
        elif name == "unmerge_all":
            ksm.set_run(2)
            ksm.set_run(1)
        check_invariants(g, model)


@pytest.mark.parametrize(("era", "change_pte"), [("2.6.32", True), ("2.6.32", False), ("3.7", True), ("6.10", True)])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=st.lists(ops, max_size=30))
def test_sptes_frames_and_contents_stay_coherent_under_any_mix_of_guest_host_and_ksm(
    era: str, change_pte: bool, program: list[Op]
) -> None:
    run_program(era, change_pte, program)
