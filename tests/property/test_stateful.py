"""Stateful property tests: random interleavings of guest accesses, ksmd, COW, madvise, munmap and aging
across several VMs, in every profile; after every step the coherence invariants hold and every byte a
guest reads is what a plain reference model of its memory says.

The guest's MMU here is the same fault path the Unicorn TLB-fill hook uses (a missing or
insufficient spte is an EPT_VIOLATION handled by KVM, retried until it is fixed), minus
instruction execution; page contents are read and written through the pfn the spte maps.
"""

from dataclasses import dataclass, field

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hypervisor.check import CoherenceChecker
from hypervisor.host.frames import FRAME_SLACK, FramePool
from hypervisor.host.ksm import Ksm
from hypervisor.host.mm import MADV_DONTNEED, MADV_MERGEABLE, MADV_UNMERGEABLE, HostMm, Vmstat
from hypervisor.kvm.mmu import FaultResult
from hypervisor.kvm.spte import spte_permits, spte_to_pfn
from hypervisor.kvm.vcpu import Vcpu
from hypervisor.kvm.vm import GUEST_RAM_HVA, Vm
from hypervisor.profiles import get_profile
from hypervisor.types import PAGE_SIZE, Gfn, Hva, Pfn

NR_VMS = 3
NR_PAGES = 8
SCRATCH_HVA = Hva(0x6000_0000_0000)
SCRATCH_PAGES = 4
EVENTS_SEEN: dict[str, int] = {}


@dataclass
class World:
    """What CoherenceChecker inspects (a Simulation without vCPU backends)."""

    frames: FramePool
    vms: list[Vm]
    ksm: Ksm
    now: int = 0
    model: dict[tuple[int, int], int] = field(default_factory=dict)


def seen(event: str) -> None:
    EVENTS_SEEN[event] = EVENTS_SEEN.get(event, 0) + 1


class CoherenceMachine(RuleBasedStateMachine):
    profile_name = "2.6.32"
    change_pte = True

    @initialize()
    def build(self) -> None:
        profile = get_profile(self.profile_name, self.change_pte)
        frames = FramePool(NR_VMS * (NR_PAGES + SCRATCH_PAGES) + FRAME_SLACK)
        vmstat = Vmstat()
        ksm = Ksm(frames, profile)
        ksm.pages_to_scan = 7
        vms = []
        for i in range(NR_VMS):
            mm = HostMm(frames, profile, vmstat, f"vm{i}", ksm)
            vm = Vm(i, mm, profile, NR_PAGES * PAGE_SIZE)
            vm.create_vcpu()
            mm.madvise(GUEST_RAM_HVA, NR_PAGES * PAGE_SIZE, MADV_MERGEABLE)
            vms.append(vm)
        ksm.set_run(1)
        self.world = World(frames, vms, ksm)
        self.checker = CoherenceChecker()
        self.checker.attach(self.world)  # type: ignore[arg-type]
        self.scratch_mapped = [False] * NR_VMS

    # --- the guest's accesses ----------------------------------------------------------------

    def _access(self, vm: Vm, gfn: int, write: bool) -> Pfn:
        vcpu: Vcpu = vm.vcpus[0]
        for _ in range(8):
            spte = int(vm.mmu.sptes[gfn])
            if spte_permits(spte, write):
                return spte_to_pfn(spte)
            result = vcpu.handle_ept_violation(Gfn(gfn), write, 0)
            assert result is not FaultResult.MMIO
            if result is FaultResult.RETRY:
                seen("fault_retry")
        raise AssertionError(f"the fault on gfn {gfn:#x} did not converge")

    @rule(vm=st.integers(0, NR_VMS - 1), gfn=st.integers(0, NR_PAGES - 1))
    def guest_read(self, vm: int, gfn: int) -> None:
        pfn = self._access(self.world.vms[vm], gfn, write=False)
        expected = self.world.model.get((vm, gfn), 0)
        frame = self.world.frames.frames[pfn]
        assert int(frame[0]) == expected and bool(np.all(frame == expected)), (vm, gfn, expected)
        seen("guest_read")

    @rule(vm=st.integers(0, NR_VMS - 1), gfn=st.integers(0, NR_PAGES - 1),
          value=st.sampled_from([0, 0x5A, 0xA5]))
    def guest_write(self, vm: int, gfn: int, value: int) -> None:
        pfn = self._access(self.world.vms[vm], gfn, write=True)
        assert not self.world.frames.page_ksm(pfn), "a guest may never write a KSM page"
        self.world.frames.frames[pfn].fill(value)
        self.world.model[(vm, gfn)] = value
        seen("guest_write")

    # --- host events ---------------------------------------------------------------------------

    @rule(n=st.integers(1, 40))
    def ksmd(self, n: int) -> None:
        self.world.ksm.ksm_do_scan(n)
        seen("ksmd")
        if self.world.ksm.counters()["pages_sharing"]:
            seen("ksmd_left_pages_merged")

    @rule(vm=st.integers(0, NR_VMS - 1), gfn=st.integers(0, NR_PAGES - 1))
    def host_cow(self, vm: int, gfn: int) -> None:
        """The VMM writes guest RAM without changing it (virtio, a migration thread)."""
        self.world.vms[vm].mm.handle_mm_fault(Hva(GUEST_RAM_HVA + gfn * PAGE_SIZE), write=True)
        seen("host_cow")

    @rule(vm=st.integers(0, NR_VMS - 1), gfn=st.integers(0, NR_PAGES - 1))
    def madvise_dontneed(self, vm: int, gfn: int) -> None:
        self.world.vms[vm].mm.madvise(Hva(GUEST_RAM_HVA + gfn * PAGE_SIZE), PAGE_SIZE, MADV_DONTNEED)
        self.world.model.pop((vm, gfn), None)
        seen("madvise_dontneed")

    @rule(vm=st.integers(0, NR_VMS - 1), mergeable=st.booleans())
    def madvise_mergeable(self, vm: int, mergeable: bool) -> None:
        mm = self.world.vms[vm].mm
        mm.madvise(GUEST_RAM_HVA, NR_PAGES * PAGE_SIZE, MADV_MERGEABLE if mergeable else MADV_UNMERGEABLE)
        seen("madvise_mergeable" if mergeable else "madvise_unmergeable")

    @rule(vm=st.integers(0, NR_VMS - 1), gfn=st.integers(0, NR_PAGES - 1))
    def age(self, vm: int, gfn: int) -> None:
        self.world.vms[vm].mm.page_referenced(Hva(GUEST_RAM_HVA + gfn * PAGE_SIZE))
        seen("age")

    @rule(on=st.booleans())
    def smart_scan(self, on: bool) -> None:
        self.world.ksm.smart_scan = on
        seen("smart_scan_on" if on else "smart_scan_off")

    @rule(value=st.sampled_from([1, 2, 0]))
    def ksm_run(self, value: int) -> None:
        self.world.ksm.set_run(value)
        seen(f"ksm_run_{value}")

    @precondition(lambda self: not all(self.scratch_mapped))
    @rule(vm=st.integers(0, NR_VMS - 1), value=st.sampled_from([0x5A, 0x11]))
    def mmap_scratch(self, vm: int, value: int) -> None:
        """The VMM maps a mergeable buffer of its own (not guest RAM) and fills it."""
        if self.scratch_mapped[vm]:
            return
        mm = self.world.vms[vm].mm
        mm.mmap(SCRATCH_HVA, SCRATCH_PAGES * PAGE_SIZE)
        mm.madvise(SCRATCH_HVA, SCRATCH_PAGES * PAGE_SIZE, MADV_MERGEABLE)
        mm.write_bytes(SCRATCH_HVA, bytes([value]) * (SCRATCH_PAGES * PAGE_SIZE))
        self.scratch_mapped[vm] = True
        seen("mmap")

    @precondition(lambda self: any(self.scratch_mapped))
    @rule(vm=st.integers(0, NR_VMS - 1))
    def munmap_scratch(self, vm: int) -> None:
        if not self.scratch_mapped[vm]:
            return
        self.world.vms[vm].mm.munmap(SCRATCH_HVA, SCRATCH_PAGES * PAGE_SIZE)
        self.scratch_mapped[vm] = False
        seen("munmap")

    @invariant()
    def coherent(self) -> None:
        if hasattr(self, "checker"):
            self.checker.check(strict_refcount=True)


def machine_for(profile: str, change_pte: bool) -> type[CoherenceMachine]:
    return type(f"Machine_{profile}_{change_pte}", (CoherenceMachine,),
                {"profile_name": profile, "change_pte": change_pte})


SETTINGS = settings(max_examples=80, stateful_step_count=50, deadline=None)
Test_2_6_32 = SETTINGS(machine_for("2.6.32", True)).TestCase
Test_2_6_32_no_change_pte = SETTINGS(machine_for("2.6.32", False)).TestCase
Test_2_6_38_no_change_pte = SETTINGS(machine_for("2.6.38", False)).TestCase
Test_3_7 = SETTINGS(machine_for("3.7", True)).TestCase
Test_5_8 = SETTINGS(machine_for("5.8", True)).TestCase  # do_wp_page reuses a lone KSM page
Test_6_10 = SETTINGS(machine_for("6.10", True)).TestCase


def test_zz_the_property_tests_explored_every_event_kind() -> None:
    """Runs after the machines (file order): every rule fired, and faults lost the retry race."""
    for event in ("guest_read", "guest_write", "ksmd", "ksmd_left_pages_merged", "fault_retry", "host_cow",
                  "madvise_dontneed", "madvise_mergeable", "smart_scan_on",
                  "madvise_unmergeable", "age", "ksm_run_2", "mmap", "munmap"):
        assert EVENTS_SEEN.get(event, 0) > 0, (event, EVENTS_SEEN)


def test_zz_print_exploration_summary() -> None:
    print("property-test events:", dict(sorted(EVENTS_SEEN.items())))
