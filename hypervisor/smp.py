"""A VM's several vCPUs seen as one VM in the report: summed stats, the VM's state, per-vCPU rows.

The VM ends when its exit port is written (every vCPU EXITED) or when every vCPU has halted;
a vCPU that failed (triple fault, MMIO outside memory, --max-insns) makes the VM's result that
failure.
"""

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any

from .kvm.exits import ExitReason
from .kvm.stats import VcpuStats
from .kvm.vcpu import Vcpu, VcpuState
from .kvm.vm import Vm

_FAILED = (VcpuState.SHUTDOWN, VcpuState.FAILED)


@dataclass
class VmTotals:
    vcpu: Vcpu  # the vCPU whose state is the VM's (see vm_state_vcpu)
    exit_work: Counter[tuple[ExitReason, str]] = field(default_factory=Counter)
    per_vcpu: list[dict[str, Any]] = field(default_factory=list)


def stop_vm_after_failure(vm: Vm) -> None:
    """A vCPU shut down (triple fault) or failed: the VMM ends the whole VM, as QEMU does on
    KVM_EXIT_SHUTDOWN with -no-reboot; its other vCPUs stop where they are."""
    if any(v.state in _FAILED for v in vm.vcpus):
        for vcpu in vm.vcpus:
            if vcpu.state is VcpuState.RUNNABLE:
                vcpu.vmm_stop()


def vm_state_vcpu(vm: Vm) -> Vcpu:
    """The vCPU that speaks for the VM: the first failed one, else the first that saw the exit port,
    else the first still runnable (the run was cut short), else vCPU 0 (all halted)."""
    for states in (_FAILED, (VcpuState.EXITED,), (VcpuState.RUNNABLE,)):
        for vcpu in vm.vcpus:
            if vcpu.state in states:
                return vcpu
    return vm.vcpus[0]


def vm_totals(vm: Vm, insns: list[int]) -> tuple[VcpuStats, VmTotals]:
    """Every vCPU's stats summed (kvm_stat's view of a VM), and the VM's state and per-vCPU rows."""
    total = VcpuStats()
    totals = VmTotals(vm_state_vcpu(vm))
    for vcpu in vm.vcpus:
        for f in fields(VcpuStats):
            if f.name == "exit_reasons":
                total.exit_reasons.update(vcpu.stats.exit_reasons)
            else:
                setattr(total, f.name, getattr(total, f.name) + getattr(vcpu.stats, f.name))
        totals.exit_work.update(vcpu.exit_work)
    if len(vm.vcpus) > 1:
        totals.per_vcpu = [{"vcpu": v.vcpu_id, "state": v.state.value, "insns": n, "exits": v.stats.exits,
                            "irq_exits": v.stats.irq_exits, "tlb_flush": v.stats.tlb_flush,
                            "exit_reasons": {r.name: c for r, c in sorted(v.stats.exit_reasons.items())}}
                           for v, n in zip(vm.vcpus, insns, strict=True)]
    return total, totals
