"""Builders shared by the unit tests: real hvsim objects, no Unicorn.

Every helper builds through hypervisor/build.py, as hvsim itself does (FramePool,
Vmstat, Ksm, HostMm, Vm), so a test reads as a small scenario: make a host,
map or write some pages, poke an event, look at ptes, sptes and counters.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hypothesis import strategies as st

from hypervisor.build import Host as BuiltHost
from hypervisor.build import build_host, build_mm, build_vm
from hypervisor.config import KsmKnobs
from hypervisor.host.frames import FramePool
from hypervisor.host.ksm import Ksm
from hypervisor.host.mm import MADV_MERGEABLE, HostMm, Vmstat, pte_pfn, pte_present, pte_special, pte_write
from hypervisor.host.mmu_notifier import MmuNotifier, MmuNotifierOps, mmu_notifier_register
from hypervisor.kvm.mmu import FaultResult, TdpMmu
from hypervisor.kvm.mmu_interface import FaultHooks, KvmMmu
from hypervisor.kvm.vcpu import Vcpu
from hypervisor.kvm.vm import GUEST_RAM_HVA, Vm
from hypervisor.profiles import Profile, get_profile
from hypervisor.races import EVENTS, FAULT_POINTS, KSM_POINTS, RaceInjector, RaceSpec
from hypervisor.types import PAGE_SIZE, Gfn, Hva, Pfn

ERAS = ("2.6.32", "2.6.38", "3.7", "6.10")
# A mapping the tests use when they drive HostMm without a Vm.
AREA = Hva(0x1000_0000)


@dataclass
class Host:
    """One simulated host: its frames, /proc/vmstat, KSM and one VMM process (mm)."""

    profile: Profile
    frames: FramePool
    vmstat: Vmstat
    ksm: Ksm
    mm: HostMm

    def new_mm(self, name: str) -> HostMm:
        return build_mm(self.built, name)

    @property
    def built(self) -> BuiltHost:
        return BuiltHost(self.profile, self.frames, self.vmstat, self.ksm)


def make_host(era: str = "3.7", change_pte: bool = True, nr_frames: int = 256) -> Host:
    """A host with KSM at its default knobs (not running until a test scans) and one mm, "qemu"."""
    host = build_host(get_profile(era, change_pte), nr_frames, KsmKnobs(enabled=True))
    assert host.ksm is not None
    return Host(host.profile, host.frames, host.vmstat, host.ksm, build_mm(host, "qemu"))


@dataclass
class Guest:
    """A host plus one VM on its mm, with one vCPU (no-op backend)."""

    host: Host
    vm: Vm
    vcpu: Vcpu

    @property
    def mm(self) -> HostMm:
        return self.host.mm

    @property
    def mmu(self) -> TdpMmu:
        """The VM's MMU, which these guests build as the TDP one."""
        assert isinstance(self.vm.mmu, TdpMmu)
        return self.vm.mmu

    @property
    def frames(self) -> FramePool:
        return self.host.frames

    def hva(self, gfn: int) -> Hva:
        return Hva(GUEST_RAM_HVA + gfn * PAGE_SIZE)

    def spte(self, gfn: int) -> int:
        return int(self.vm.mmu.sptes[gfn])

    def host_pfn(self, gfn: int) -> Pfn:
        return pte_pfn(self.mm.pte(self.hva(gfn)))

    def fault(self, gfn: int, write: bool) -> FaultResult:
        """One run of the TDP fault path (no exit counted: see vcpu.handle_ept_violation)."""
        return self.mmu.page_fault(self.vcpu, Gfn(gfn), write).result


def make_guest(era: str = "3.7", change_pte: bool = True, pages: int = 16, nr_frames: int = 256) -> Guest:
    host = make_host(era, change_pte, nr_frames)
    vm = build_vm(host.built, 0, pages * PAGE_SIZE, host.mm)
    vcpu = vm.create_vcpu()
    vcpu.vcpu_load(1)  # its thread runs it on host CPU 1, in guest mode: remote flushes kick it
    return Guest(host, vm, vcpu)


def page_of(fill: int) -> bytes:
    return bytes([fill]) * PAGE_SIZE


def mergeable_area(mm: HostMm, pages: int, addr: Hva = AREA) -> Hva:
    """mmap an anonymous area and mark it MADV_MERGEABLE (registers the mm with KSM)."""
    mm.mmap(addr, pages * PAGE_SIZE)
    mm.madvise(addr, pages * PAGE_SIZE, MADV_MERGEABLE)
    return addr


def page_hva(base: Hva, idx: int) -> Hva:
    return Hva(base + idx * PAGE_SIZE)


def full_scan(ksm: Ksm) -> None:
    """Run ksmd until full_scans goes up by one: one whole pass over every mergeable page."""
    before = ksm.seqnr
    for _ in range(8):
        ksm.ksm_do_scan(1 << 20)
        if ksm.seqnr != before:
            return
    raise AssertionError("ksmd never completed a pass (no mm registered?)")


def shared_and_sharing(ksm: Ksm) -> tuple[int, int]:
    c = ksm.counters()
    return c["pages_shared"], c["pages_sharing"]


def mapped_pfns(mm: HostMm, base: Hva, pages: int) -> list[Pfn]:
    return [pte_pfn(mm.pte(page_hva(base, i))) for i in range(pages)]


def is_mapped_writable(mm: HostMm, hva: Hva) -> bool:
    pte = mm.pte(hva)
    return pte_present(pte) and pte_write(pte)


def maps_zero_page(mm: HostMm, hva: Hva) -> bool:
    pte = mm.pte(hva)
    return pte_present(pte) and pte_special(pte) and pte_pfn(pte) == 0


@dataclass
class NotifierLog:
    """Builds recording notifiers; every callback lands in one shared, ordered log.

    Entries are (notifier name, callback, args); `young` is what clear_flush_young reports.
    """

    entries: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)

    def notifier(
        self,
        name: str,
        *,
        change_pte: bool = True,
        invalidate_page: bool = True,
        young: bool = False,
    ) -> MmuNotifier:
        log = self.entries

        def on_release(mn: MmuNotifier, mm: HostMm) -> None:
            log.append((name, "release", ()))

        def on_young(mn: MmuNotifier, mm: HostMm, addr: Hva) -> bool:
            log.append((name, "clear_flush_young", (addr,)))
            return young

        def on_change_pte(mn: MmuNotifier, mm: HostMm, addr: Hva, pte: int) -> None:
            log.append((name, "change_pte", (addr, pte)))

        def on_invalidate_page(mn: MmuNotifier, mm: HostMm, addr: Hva) -> None:
            log.append((name, "invalidate_page", (addr,)))

        def on_start(mn: MmuNotifier, mm: HostMm, start: Hva, end: Hva) -> None:
            log.append((name, "invalidate_range_start", (start, end)))

        def on_end(mn: MmuNotifier, mm: HostMm, start: Hva, end: Hva) -> None:
            log.append((name, "invalidate_range_end", (start, end)))

        ops = MmuNotifierOps(
            release=on_release,
            clear_flush_young=on_young,
            change_pte=on_change_pte if change_pte else None,
            invalidate_page=on_invalidate_page if invalidate_page else None,
            invalidate_range_start=on_start,
            invalidate_range_end=on_end,
        )
        return MmuNotifier(ops)

    def register(self, mm: HostMm, name: str = "rec", **kwargs: bool) -> MmuNotifier:
        mn = self.notifier(name, **kwargs)
        mmu_notifier_register(mn, mm)
        return mn

    def callbacks(self, name: str | None = None) -> list[str]:
        return [cb for who, cb, _ in self.entries if name is None or who == name]

    def clear(self) -> None:
        self.entries.clear()



# --- host events fired between the steps of KVM's fault path and of ksmd ----------------------


def race_specs() -> st.SearchStrategy[RaceSpec]:
    """Any `--inject` spec hvsim accepts: a point of races.py, an event, the N-th arrival or every one.

    At the fault point only the first few arrivals: an invalidation at every fault would make
    every fault lose the retry race forever (a livelock the guest would see too).
    """
    host_events = [e for e in EVENTS if e != "lost_flush"]  # lost_flush is a KVM bug, not a host event
    fault = st.builds(RaceSpec, st.sampled_from(FAULT_POINTS), st.sampled_from(host_events), st.integers(1, 3))
    ksm = st.builds(RaceSpec, st.sampled_from(KSM_POINTS), st.sampled_from([e for e in host_events if e != "ksm_scan"]),
                    st.one_of(st.none(), st.integers(1, 3)))
    return st.one_of(fault, ksm)


@dataclass
class RacingWorld:
    """The parts of a Simulation that RaceInjector wires into: its VMs and KSM."""

    vms: Sequence[Vm]
    ksm: Ksm


class ModelledRaces(RaceInjector):
    """races.py's injector, armed by a property test: each event it fires is also reported to
    `on_fire(event, mm, hva)` so that the test's model of guest memory follows (MADV_DONTNEED
    drops a page's contents) and the test can count what it explored."""

    def __init__(self, world: RacingWorld, specs: list[RaceSpec], on_fire: Callable[[str, str, HostMm, Hva], None]):
        super().__init__(world, specs)  # type: ignore[arg-type]
        self.on_fire = on_fire
        self._point = ""

    def _arrive(self, point: str, mm: HostMm, hva: Hva) -> None:
        self._point = point
        super()._arrive(point, mm, hva)

    def _fire(self, event: str, mm: HostMm, hva: Hva) -> None:
        point = self._point
        super()._fire(event, mm, hva)
        self.on_fire(point, event, mm, hva)


def disarm_races(world: RacingWorld) -> None:
    world.ksm.hooks = None
    for vm in world.vms:
        vm.mmu.hooks = None


class AfterGfnToPfn(FaultHooks):
    """Fault-path hooks (kvm/mmu_interface.FaultPathHooks): `event(mmu, gfn, hva)` between gfn_to_pfn and
    mmu_lock; `skip_retry` also drops the mmu_notifier_retry check."""

    def __init__(self, event: Callable[[KvmMmu, Gfn, Hva], None] | None = None, skip_retry: bool = False) -> None:
        self.event = event
        self.skip_retry = skip_retry

    def after_gfn_to_pfn(self, mmu: KvmMmu, gfn: Gfn, hva: Hva) -> None:
        if self.event is not None:
            self.event(mmu, gfn, hva)

    def skip_mmu_notifier_retry(self) -> bool:
        return self.skip_retry


class KsmRace:
    """ksmd's hooks (host/ksm_items.KsmHooks) firing `event(mm, hva)` at the one point named."""

    def __init__(self, point: str, event: Callable[[HostMm, Hva], None]) -> None:
        assert point in KSM_POINTS
        self.point = point
        self.event = event

    def ksm_before_replace_page(self, mm: HostMm, hva: Hva) -> None:
        if self.point == "ksm_before_replace_page":
            self.event(mm, hva)

    def ksm_after_replace_page(self, mm: HostMm, hva: Hva) -> None:
        if self.point == "ksm_after_replace_page":
            self.event(mm, hva)

