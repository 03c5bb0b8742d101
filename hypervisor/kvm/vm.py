"""A KVM virtual machine (struct kvm): memslots, the MMU, vCPUs and VM-wide stats.

The VM reaches its host process only as the kernel's KVM does: it registers an
mmu_notifier on the VMM's mm and resolves pfns through GUP (inside kvm/mmu.py).
"""

from collections.abc import Callable

from ..events import NULL_TRACER, Tracer
from ..host.mm import HostMm
from ..host.mmu_notifier import mmu_notifier_register
from ..profiles import Profile
from ..types import PAGE_SHIFT, Gfn, Gpa, Hva
from .memslot import Memslot, Memslots
from .mmu import TdpMmu
from .requests import kvm_flush_remote_tlbs
from .shadow_mmu import ShadowMmu
from .stats import VmStats
from .vcpu import Vcpu

# Where the VMM maps guest RAM in its own address space (as QEMU's anonymous RAM block).
GUEST_RAM_HVA = Hva(0x7F00_0000_0000)

class Vm:
    def __init__(self, vm_id: int, mm: HostMm, profile: Profile, memory_size: int, tracer: Tracer = NULL_TRACER,
                 mmu: str = "tdp", mmu_pages: int | None = None, oos_shadow: bool = True):
        self.vm_id = vm_id
        self.mm = mm
        self.profile = profile
        self.memory_size = memory_size
        self.tracer = tracer
        self.stats = VmStats()
        self.memslots = Memslots()
        # KVM_SET_USER_MEMORY_REGION for slot 0: all of guest RAM from gpa 0.
        mm.mmap(GUEST_RAM_HVA, memory_size)
        self.memslots.add(Memslot(0, Gfn(0), memory_size >> PAGE_SHIFT, GUEST_RAM_HVA))
        # --mmu: EPT (TdpMmu) or shadow paging (ShadowMmu; mmu_pages models KVM_SET_NR_MMU_PAGES).  Both
        # implement kvm.mmu_interface.KvmMmu; code for one of them narrows with isinstance.  (The type is
        # the truth: the compiled build (setup.py) checks it where compiled code reads the attribute.)
        self.mmu: TdpMmu | ShadowMmu = ShadowMmu(self, mmu_pages, oos_shadow) if mmu == "shadow" else TdpMmu(self)
        mmu_notifier_register(self.mmu.notifier, mm)
        self.vcpus: list[Vcpu] = []
        # The vCPU whose thread is in KVM handling its own exit (the flusher's "me"), if any.
        self.running: Vcpu | None = None
        # Test-only (--inject kvm_flush_remote_tlbs:lost_flush): true -> this flush is lost.
        self.flush_lost: Callable[[], bool] | None = None

    def create_vcpu(self) -> Vcpu:
        vcpu = Vcpu(self, len(self.vcpus))
        self.vcpus.append(vcpu)
        return vcpu

    def destroy(self) -> None:
        """Let the VM go once its run is reported: unhook the MMU from the mm and drop the back-pointers
        (vCPU -> VM, MMU -> VM) that made reference cycles, so that reference counting frees the VM.
        Counts and traces nothing: this models freeing memory, not kvm_destroy_vm()'s zapping."""
        if self.mmu.notifier in self.mm.mmu_notifiers:
            self.mm.mmu_notifiers.remove(self.mmu.notifier)
        self.vcpus.clear()
        self.running = None
        self.flush_lost = None
        self.mmu.hooks = None
        del self.mmu.vm, self.mmu.notifier  # the notifier's ops are bound methods of the MMU
        self.tracer = NULL_TRACER

    def kvm_flush_remote_tlbs(self) -> None:
        """KVM_REQ_TLB_FLUSH on every vCPU, kicks per the kernel's rule (kvm/requests.py)."""
        kvm_flush_remote_tlbs(self)

    def gpa_to_hva(self, gpa: Gpa) -> Hva | None:
        slot = self.memslots.gfn_to_memslot(Gfn(gpa >> PAGE_SHIFT))
        if slot is None:
            return None
        return Hva(slot.gfn_to_hva(Gfn(gpa >> PAGE_SHIFT)) + (gpa & ((1 << PAGE_SHIFT) - 1)))

    def write_guest(self, gpa: Gpa, data: bytes) -> None:
        """The VMM writes guest RAM through its own mapping (host write faults, no exits)."""
        hva = self.gpa_to_hva(gpa)
        end = self.gpa_to_hva(Gpa(gpa + max(len(data), 1) - 1))
        if hva is None or end is None or end - hva != max(len(data), 1) - 1:
            raise ValueError(f"guest range {gpa:#x}+{len(data):#x} is not inside one memslot")
        self.mm.write_bytes(hva, data)

    def read_guest(self, gpa: Gpa, length: int) -> bytes:
        hva = self.gpa_to_hva(gpa)
        if hva is None:
            raise ValueError(f"gpa {gpa:#x} is outside every memslot")
        return self.mm.read_bytes(hva, length)
