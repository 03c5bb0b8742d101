"""KVM_REQ_TLB_FLUSH and its kicks, per kernel (kvm/requests.py), on real KVM objects without Unicorn.

Sources: make_all_cpus_request and kvm_flush_remote_tlbs in virt/kvm/kvm_main.c of
sndrzt/linux-2.6.32 (test_and_set_bit coalescing, IPI whatever the vCPU's mode) and
robacklin/linux-3.7.2 (request always set, IPI iff mode != OUTSIDE_GUEST_MODE); both
count remote_tlb_flush only when an IPI went out.  6.8 (sndrzt/linux-6.8) also counts every
call in remote_tlb_flush_requests and bumps the vCPU's tlb_flush when it serves the request.
"""

import pytest

from hypervisor.kvm.exits import ExitReason
from hypervisor.kvm.requests import KVM_REQ_TLB_FLUSH, VcpuMode
from hypervisor.kvm.vcpu import Vcpu

from .support import Guest, make_guest


def smp_guest(era: str, nr_vcpus: int) -> tuple[Guest, list[Vcpu]]:
    """A guest with nr_vcpus vCPUs, each loaded on its own host CPU and in guest mode."""
    g = make_guest(era)
    vcpus = [g.vcpu] + [g.vm.create_vcpu() for _ in range(nr_vcpus - 1)]
    for i, vcpu in enumerate(vcpus[1:], start=2):
        vcpu.vcpu_load(i)
    return g, vcpus


def kicks(vcpu: Vcpu) -> int:
    return vcpu.stats.exit_reasons[ExitReason.EXTERNAL_INTERRUPT]


@pytest.mark.parametrize("era", ["2.6.32", "3.7", "6.8"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_n_running_vcpus_take_n_kicks_per_flush_and_the_call_counts_once(era: str, n: int) -> None:
    g, vcpus = smp_guest(era, n)
    g.vm.kvm_flush_remote_tlbs()
    g.vm.kvm_flush_remote_tlbs()
    assert [kicks(v) for v in vcpus] == [2] * n
    assert [v.stats.irq_exits for v in vcpus] == [2] * n
    assert g.vm.stats.remote_tlb_flush == 2  # one per call that IPI'd, not one per vCPU
    # Each kicked vCPU served the request before re-entering guest mode.
    assert all(v.requests == 0 and v.mode is VcpuMode.IN_GUEST_MODE for v in vcpus)


def test_a_halted_vcpu_takes_no_kick_but_2_6_32_still_ipis_its_cpu_once_then_coalesces() -> None:
    # 2.6.32 make_all_cpus_request: test_and_set_bit; a clear bit -> IPI to vcpu->cpu (kept after
    # the HLT), whatever the mode; the halted vCPU is not in guest mode, so no exit.  The bit stays
    # set (kvm_vcpu_block does not wake for it): the next flush is coalesced, no IPI, no count.
    g, (vcpu,) = smp_guest("2.6.32", 1)
    vcpu.handle_hlt(0)
    g.vm.kvm_flush_remote_tlbs()
    assert kicks(vcpu) == 0 and vcpu.requests & KVM_REQ_TLB_FLUSH
    assert g.vm.stats.remote_tlb_flush == 1
    g.vm.kvm_flush_remote_tlbs()
    assert g.vm.stats.remote_tlb_flush == 1 and kicks(vcpu) == 0


@pytest.mark.parametrize("era", ["2.6.39", "3.7", "4.12", "6.8"])
def test_a_halted_vcpu_takes_no_kick_and_from_2_6_39_no_ipi(era: str) -> None:
    g, (running, halted) = smp_guest(era, 2)
    halted.handle_hlt(0)
    g.vm.kvm_flush_remote_tlbs()
    assert kicks(halted) == 0 and kicks(running) == 1
    assert halted.requests & KVM_REQ_TLB_FLUSH  # pending until it would run again
    assert g.vm.stats.remote_tlb_flush == 1  # the running vCPU's IPI
    running.handle_hlt(0)
    g.vm.kvm_flush_remote_tlbs()
    assert g.vm.stats.remote_tlb_flush == 1  # nobody in guest mode: no IPI, not counted


@pytest.mark.parametrize("era", ["2.6.32", "3.7"])
def test_a_vcpu_that_never_ran_gets_the_request_but_no_ipi(era: str) -> None:
    g = make_guest(era)
    fresh = g.vm.create_vcpu()  # vcpu->cpu == -1 (kvm_vcpu_init)
    g.vm.kvm_flush_remote_tlbs()
    assert fresh.requests & KVM_REQ_TLB_FLUSH and kicks(fresh) == 0
    assert kicks(g.vcpu) == 1 and g.vm.stats.remote_tlb_flush == 1


@pytest.mark.parametrize("era", ["2.6.32", "3.7", "6.8"])
def test_a_flush_raised_by_a_vcpus_own_fault_kicks_the_others_not_itself(era: str) -> None:
    # cpu != me in every version: the faulting vCPU's thread serves the request before re-entry.
    g, vcpus = smp_guest(era, 3)
    g.vm.running = vcpus[1]
    vcpus[1].mode = VcpuMode.OUTSIDE_GUEST_MODE
    g.vm.kvm_flush_remote_tlbs()
    g.vm.kvm_flush_remote_tlbs()
    g.vm.running = None
    assert [kicks(v) for v in vcpus] == [2, 0, 2]
    assert vcpus[1].requests & KVM_REQ_TLB_FLUSH  # pending until its fault returns to vcpu_enter_guest
    vcpus[1].enter_guest()
    assert vcpus[1].requests == 0 and vcpus[1].mode is VcpuMode.IN_GUEST_MODE
    # Served once for both flushes (from 4.10 tlb_flush counts served requests).
    assert vcpus[1].stats.tlb_flush == (1 if era == "6.8" else 0)


def test_2_6_32_coalesces_a_second_flush_while_the_first_is_still_pending() -> None:
    # The derivation behind "2.6.32: two kicks per merged page, or one if coalesced": the second
    # flush (replace_page's change_pte) finds the bit still set only if the vCPU has not yet
    # reached vcpu_enter_guest since the first; then test_and_set_bit skips it: no IPI, no count.
    g, (vcpu,) = smp_guest("2.6.32", 1)
    vcpu.mode = VcpuMode.OUTSIDE_GUEST_MODE  # kicked, not yet back in vcpu_enter_guest
    vcpu.requests |= KVM_REQ_TLB_FLUSH
    g.vm.kvm_flush_remote_tlbs()
    assert g.vm.stats.remote_tlb_flush == 0 and kicks(vcpu) == 0
    # From 2.6.39 the request is set again, and the vCPU outside guest mode is not IPI'd either.
    g3, (vcpu3,) = smp_guest("3.7", 1)
    vcpu3.mode = VcpuMode.OUTSIDE_GUEST_MODE
    g3.vm.kvm_flush_remote_tlbs()
    assert g3.vm.stats.remote_tlb_flush == 0 and kicks(vcpu3) == 0 and vcpu3.requests & KVM_REQ_TLB_FLUSH


@pytest.mark.parametrize(("era", "counted"), [("2.6.32", False), ("3.7", False), ("4.10", True), ("6.8", True)])
def test_the_vcpu_tlb_flush_stat_counts_served_requests_from_4_10(era: str, counted: bool) -> None:
    g, (vcpu,) = smp_guest(era, 1)
    g.vm.kvm_flush_remote_tlbs()
    assert vcpu.stats.tlb_flush == (1 if counted else 0)


@pytest.mark.parametrize(("era", "requests"), [("5.14", 0), ("5.15", 2), ("6.8", 2)])
def test_remote_tlb_flush_requests_counts_every_call_from_5_15(era: str, requests: int) -> None:
    g, (vcpu,) = smp_guest(era, 1)
    vcpu.handle_hlt(0)
    g.vm.kvm_flush_remote_tlbs()
    g.vm.kvm_flush_remote_tlbs()
    assert g.vm.stats.remote_tlb_flush_requests == requests and g.vm.stats.remote_tlb_flush == 0
