"""The wiring of a simulated machine, in one place: a host (frames, /proc/vmstat, KSM), a VMM process
(HostMm) per VM, the VM with its memslot and MMU, and a booted vCPU on Unicorn.

Simulation builds its runs here, and so do the unit tests (tests/unit/support.py) and the
benchmarks, so that every caller wires the layers the same way: the trace hooks on each
mm, guest RAM marked MADV_MERGEABLE when KSM is on, the ksmd knobs set from KsmKnobs.
"""

from dataclasses import dataclass

from .config import KsmKnobs
from .cpu.unicorn_vcpu import UnicornVcpu
from .events import NULL_TRACER, Tracer, VmTracer
from .host.frames import FramePool
from .host.ksm import Ksm
from .host.mm import MADV_MERGEABLE, HostMm, Vmstat
from .kvm.vm import GUEST_RAM_HVA, Vm
from .profiles import Profile
from .vmm import loader
from .vmm.devices import LegacyDevices, legacy_devices


@dataclass
class Host:
    """One simulated host: its kernel era, frames, /proc/vmstat, KSM (None: off) and where events go."""

    profile: Profile
    frames: FramePool
    vmstat: Vmstat
    ksm: Ksm | None
    tracer: Tracer = NULL_TRACER


def build_host(profile: Profile, nr_frames: int, ksm: KsmKnobs | None = None, tracer: Tracer = NULL_TRACER) -> Host:
    """Frames and vmstat; KSM when `ksm` is enabled, its sysfs knobs set (`run` is written by the caller,
    once every mm is registered, as a VMM writes it after starting its guests)."""
    frames = FramePool(nr_frames)
    ksmd: Ksm | None = None
    if ksm is not None and ksm.enabled:
        ksmd = Ksm(frames, profile)
        for name, value in ksm.sysfs().items():
            setattr(ksmd, name, value)
        ksmd.tracer = tracer
    return Host(profile, frames, Vmstat(), ksmd, tracer)


def build_mm(host: Host, name: str, vm_id: int | None = None) -> HostMm:
    """A VMM process's mm; with a tracer, its events (and its notifier calls) carry `vm_id`."""
    mm = HostMm(host.frames, host.profile, host.vmstat, name, host.ksm)
    if host.tracer.enabled and vm_id is not None:
        mm.tracer = VmTracer(host.tracer, vm_id)
    return mm


def build_vm(host: Host, vm_id: int, memory: int, mm: HostMm | None = None, mmu: str = "tdp",
             mmu_pages: int | None = None, oos_shadow: bool = True) -> Vm:
    """A VM with `memory` bytes of guest RAM in memslot 0, in its own VMM process unless `mm` is given."""
    if mm is None:
        mm = build_mm(host, f"vm{vm_id}", vm_id)
    return Vm(vm_id, mm, host.profile, memory, mm.tracer, mmu, mmu_pages, oos_shadow)


def boot_vcpu(host: Host, vm: Vm, image: loader.GuestImage, cmdline: str, nr_vms: int,
              insns_per_ms: int) -> tuple[UnicornVcpu, LegacyDevices]:
    """boot_vcpus with one vCPU."""
    backends, devices = boot_vcpus(host, vm, image, cmdline, nr_vms, insns_per_ms, 1)
    return backends[0], devices


def boot_vcpus(host: Host, vm: Vm, image: loader.GuestImage, cmdline: str, nr_vms: int,
               insns_per_ms: int, nr_vcpus: int) -> tuple[list[UnicornVcpu], LegacyDevices]:
    """Load `image` into the VM, mark its RAM mergeable when KSM is on, and create its vCPUs, each on its
    own Unicorn over the VM's one memory, with the VMM's legacy devices (port bus, COM1, the exit port)
    on their port I/O.  Every vCPU enters the image in long mode (as KVM_SET_MP_STATE RUNNABLE allows:
    no INIT-SIPI-SIPI); vCPU i gets RDI = i and its own stack (loader.BootParams.for_vcpu)."""
    boot = loader.load(vm, image, cmdline, nr_vms, nr_vcpus)
    if host.ksm is not None:
        # The VMM marks guest RAM mergeable, as QEMU does with -machine mem-merge=on.
        vm.mm.madvise(GUEST_RAM_HVA, vm.memory_size, MADV_MERGEABLE)
    vcpus = [vm.create_vcpu() for _ in range(nr_vcpus)]

    def vmm_exit(status: int) -> None:
        # The exit port ends the whole VM: the VMM stops every vCPU thread.
        for vcpu in vcpus:
            vcpu.vmm_exit(status)

    devices = legacy_devices(vmm_exit)
    backends = []
    for i, vcpu in enumerate(vcpus):
        vcpu.pio = devices.bus
        backends.append(UnicornVcpu(vcpu, host.frames, boot.for_vcpu(i), insns_per_ms))
    return backends, devices
