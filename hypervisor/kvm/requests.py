"""vCPU requests and the IPIs ("kicks") that make a vCPU in guest mode exit to serve them.

Mirrors virt/kvm/kvm_main.c kvm_flush_remote_tlbs / make_all_cpus_request
(kvm_make_all_cpus_request, kvm_make_vcpu_request in 6.8) and the request block at the top
of arch/x86/kvm/x86.c vcpu_enter_guest.  The rule that picks which vCPUs are IPI'd is the
Profile's `kvm_flush_ipi_rule` (hypervisor/kernels.py):

* "pending_bit" (2.6.32 .. 2.6.38; sndrzt/linux-2.6.32 kvm_main.c make_all_cpus_request):
  test_and_set_bit of the request; a vCPU whose bit was already set is skipped (coalesced),
  any other vCPU that has run (vcpu->cpu != -1) on another pCPU than the flusher's is IPI'd,
  in guest mode or not.  Only a vCPU in guest mode takes an exit for it.
* "guest_mode" (2.6.39 .. 4.11; robacklin/linux-3.7.2 make_all_cpus_request): the request
  is always set; the IPI goes to vCPUs whose mode is not OUTSIDE_GUEST_MODE.
* "request_needs_ipi" (4.12+; jason50123/linux-4.12, sndrzt/linux-6.8 kvm_request_needs_ipi):
  KVM_REQ_TLB_FLUSH carries KVM_REQUEST_WAIT | NO_WAKEUP, so the same vCPUs as "guest_mode"
  are IPI'd and a halted vCPU is not woken.

remote_tlb_flush counts a call only if it sent at least one IPI (every version read);
5.15+ also counts every call in remote_tlb_flush_requests.

hvsim's model of concurrency: every vCPU has its own host CPU, ksmd another.  A RUNNABLE
vCPU that is not in KVM handling one of its own exits is IN_GUEST_MODE at every simulated
moment; a kicked vCPU takes its EXTERNAL_INTERRUPT exit, serves its requests in
vcpu_enter_guest and is back in guest mode before the flusher's next call (the flusher
waits for the IPI's ack: smp_call_function_many(wait=1)).  EXITING_GUEST_MODE therefore
never lasts past a kick.
"""

from enum import Enum
from typing import TYPE_CHECKING

from ..events import KvmFlushRemoteTlbs, KvmTlbFlush

if TYPE_CHECKING:
    from .vcpu import Vcpu
    from .vm import Vm

# Request bits (include/linux/kvm_host.h; bit 0 in 2.6.32 and 6.8).
KVM_REQ_TLB_FLUSH = 1 << 0


class VcpuMode(Enum):
    """vcpu->mode (2.6.39+; 2.6.32's KVM_REQ_KICK bit plays the part for kicks)."""

    OUTSIDE_GUEST_MODE = 0
    IN_GUEST_MODE = 1


def kvm_flush_remote_tlbs(vm: "Vm") -> None:
    """KVM_REQ_TLB_FLUSH on every vCPU of `vm`; IPIs per the Profile's rule; count the call if it IPI'd."""
    profile = vm.profile
    me = vm.running  # the vCPU whose thread is in KVM now (its own fault path), if any
    pending_bit = profile.kvm_flush_ipi_rule == "pending_bit"
    kicked: list[Vcpu] = []
    ipi = False
    for vcpu in vm.vcpus:
        if pending_bit:
            if vcpu.requests & KVM_REQ_TLB_FLUSH:
                continue  # test_and_set_bit found it set: neither re-requested nor IPI'd
            vcpu.requests |= KVM_REQ_TLB_FLUSH
            if vcpu.cpu != -1 and vcpu is not me:
                ipi = True
                if vcpu.mode is VcpuMode.IN_GUEST_MODE:
                    kicked.append(vcpu)
        else:
            vcpu.requests |= KVM_REQ_TLB_FLUSH
            # kvm_vcpu_exiting_guest_mode() != OUTSIDE_GUEST_MODE (IN -> EXITING).
            if vcpu.cpu != -1 and vcpu is not me and vcpu.mode is not VcpuMode.OUTSIDE_GUEST_MODE:
                ipi = True
                kicked.append(vcpu)
    # --inject kvm_flush_remote_tlbs:lost_flush: the requests are served but nobody flushes (a bug
    # to show that --check catches a vCPU left with stale translations).
    lost = vm.flush_lost is not None and vm.flush_lost()
    if profile.kvm_counts_flush_requests:
        vm.stats.remote_tlb_flush_requests += 1
    if ipi:
        vm.stats.remote_tlb_flush += 1
    # smp_call_function_many(ack_flush, wait=1): each target in guest mode VM-exits, and
    # (hvsim's timing rule) serves the request before the flusher goes on.
    for vcpu in kicked:
        if lost:
            vcpu.requests &= ~KVM_REQ_TLB_FLUSH
        vcpu.handle_external_interrupt()
    if me is not None and lost:
        me.requests &= ~KVM_REQ_TLB_FLUSH
    # The flusher's own vCPU (me) keeps the request: Vcpu.handle_ept_violation serves it in
    # vcpu_enter_guest, once however many flushes its fault raised.
    if vm.tracer.enabled:
        vm.tracer.event(KvmFlushRemoteTlbs(ipi, len(kicked)))


def vcpu_service_requests(vcpu: "Vcpu") -> None:
    """The request block of vcpu_enter_guest: KVM_REQ_TLB_FLUSH -> kvm_x86_ops->tlb_flush.

    The vCPU's whole TLB and its cached walks go (VPID + INVEPT single-context; 6.8
    kvm_vcpu_flush_tlb_all).  stat.tlb_flush counts a served request only from 4.10
    (kvm_vcpu_flush_tlb; 2.6.32 .. 3.7 call the op directly).
    """
    if not vcpu.requests & KVM_REQ_TLB_FLUSH:
        return
    vcpu.requests &= ~KVM_REQ_TLB_FLUSH
    if vcpu.vm.profile.kvm_tlb_flush_stat_counts_requests:
        vcpu.stats.tlb_flush += 1
    vcpu.arch.flush_tlb()
    tracer = vcpu.vm.tracer
    if tracer.enabled:
        tracer.event(KvmTlbFlush(vcpu.vcpu_id))
