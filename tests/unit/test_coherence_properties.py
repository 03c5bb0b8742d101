"""Property: whatever the host, KSM and the guest do, sptes stay coherent with host ptes.

Random programs of guest accesses (through the EPT_VIOLATION handler, then a store
straight into the frame the spte maps, as the CPU would), VMM writes, ksmd scans,
aging and unmerging run on a small guest; after every step the test checks:

* a present spte maps the frame the host pte maps, and is writable only if the
  host pte is (no secondary mapping of a stale or shared page);
* every frame's mapcount is the number of ptes that map it, its refcount equals
  its mapcount (no pin leaked), and no frame is referenced while free;
* guest memory holds exactly what was written (KSM never changes contents);
* no free frame keeps page state (PageKsm, a mapcount).

Host events are also fired between the steps of KVM's fault path and of ksmd's merge
(`race` arms an `--inject` spec of hypervisor/races.py), in every profile.
"""

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.host.frames import ZERO_PFN
from hypervisor.host.mm import MADV_MERGEABLE, HostMm, pte_pfn, pte_present, pte_special, pte_write
from hypervisor.kvm.mmu import FaultResult
from hypervisor.kvm.spte import is_shadow_present_pte, is_writable_pte, spte_permits, spte_to_pfn
from hypervisor.kvm.vm import GUEST_RAM_HVA
from hypervisor.profiles import PROFILES
from hypervisor.races import RaceSpec
from hypervisor.types import PAGE_SIZE, Gfn, Gpa, Hva

from .support import Guest, ModelledRaces, RacingWorld, full_scan, make_guest, race_specs

PAGES = 6

Op = tuple[str, Any, int]
ops = st.one_of(
    st.tuples(st.just("guest_read"), st.integers(0, PAGES - 1), st.just(0)),
    st.tuples(st.just("guest_write"), st.integers(0, PAGES - 1), st.integers(0, 3)),
    st.tuples(st.just("vmm_write"), st.integers(0, PAGES - 1), st.integers(0, 3)),
    st.tuples(st.just("scan"), st.integers(1, 2 * PAGES), st.just(0)),
    st.tuples(st.just("full_scans"), st.integers(1, 2), st.just(0)),  # what it takes to merge
    st.tuples(st.just("age"), st.integers(0, PAGES - 1), st.just(0)),
    st.tuples(st.just("zero_pages"), st.just(0), st.integers(0, 1)),
    st.tuples(st.just("unmerge_all"), st.just(0), st.just(0)),
    # arm an --inject spec (hypervisor/races.py), which fires when a later step reaches its point
    st.tuples(st.just("race"), race_specs(), st.just(0)),
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
    free = frames.refcount == 0
    free[ZERO_PFN] = False
    assert not (free & (frames.stable_node >= 0)).any(), "a free frame is still PageKsm"
    assert np.array_equal(frames.mapcount, mapcount)
    assert np.array_equal(frames.refcount, mapcount)
    assert g.vm.mmu.mmu_notifier_count == 0
    counters = g.host.ksm.counters()
    assert all(v >= 0 for k, v in counters.items() if k != "general_profit")


def run_program(era: str, change_pte: bool, program: list[Op], race: RaceSpec | None = None) -> None:
    """Run `program`; `race`, if given, is armed from the start, as `--inject` arms it for a run."""
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

    def forget(point: str, event: str, mm: HostMm, hva: Hva) -> None:
        if event == "invalidate_range":  # MADV_DONTNEED: the page reads as zeros again
            model[(hva - GUEST_RAM_HVA) // PAGE_SIZE][:] = bytes(PAGE_SIZE)

    if race is not None:
        program = [("race", race, 0), *program]
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
        elif name == "full_scans":
            for _ in range(a):
                full_scan(ksm)
        elif name == "age":
            g.mm.page_referenced(g.hva(a))
        elif name == "zero_pages":
            ksm.use_zero_pages = bool(b)
        elif name == "unmerge_all":
            ksm.set_run(2)
            ksm.set_run(1)
        elif name == "race":
            ModelledRaces(RacingWorld([g.vm], ksm), [a], forget)
        check_invariants(g, model)


def profiles_and_change_pte() -> list[tuple[str, bool]]:
    """Every profile, and without change_pte wherever KVM has it."""
    return [(name, cp) for name, p in PROFILES.items() for cp in ((True, False) if p.kvm_change_pte else (True,))]


@pytest.mark.parametrize(("era", "change_pte"), profiles_and_change_pte())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(race=st.none() | race_specs(), program=st.lists(ops, min_size=4, max_size=30))
def test_sptes_frames_and_contents_stay_coherent_under_any_mix_of_guest_host_and_ksm(
    era: str, change_pte: bool, race: RaceSpec | None, program: list[Op]
) -> None:
    run_program(era, change_pte, program, race)
