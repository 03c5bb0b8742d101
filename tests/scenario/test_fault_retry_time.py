"""Scenario tests: a retried fault costs simulated time, and a vCPU that only retries is diagnosed as livelocked."""

from typing import Any

from hypervisor.kvm.vcpu import FAULT_RETRY_COST, LIVELOCK_RETRIES
from hypervisor.sim import KsmConfig

from .guests import image, run

# MADV_DONTNEED of the faulting page between gfn_to_pfn and mmu_notifier_retry, on every
# fault: no fault can ever complete.
EVERY_FAULT_ZAPPED = ("after_gfn_to_pfn:invalidate_range@all",)


def test_a_vcpu_that_only_retries_ends_the_run_with_a_livelock_diagnosis() -> None:
    result = run(image("hello.bin"), inject=EVERY_FAULT_ZAPPED)
    vm = result.vms[0]
    assert result.livelock is not None and "livelock" in result.livelock
    assert vm.state == "failed" and vm.error is not None and "retried 1000 times" in vm.error
    assert vm.insns == 0 and vm.stats["pf_retry"] == LIVELOCK_RETRIES
    # Every retry is an EPT_VIOLATION exit, and costs the vCPU simulated time.
    assert vm.exits["EPT_VIOLATION"] == LIVELOCK_RETRIES
    assert result.sim_insns == result.retry_insns == LIVELOCK_RETRIES * FAULT_RETRY_COST


def test_retried_faults_count_against_max_insns() -> None:
    result = run(image("hello.bin"), inject=EVERY_FAULT_ZAPPED, max_insns=100_000)
    vm = result.vms[0]
    assert result.livelock is None
    assert vm.error is not None and "--max-insns" in vm.error
    assert vm.stats["pf_retry"] == 100_000 // FAULT_RETRY_COST


def test_retries_and_their_cost_do_not_depend_on_the_quantum() -> None:
    outcomes = {q: run(image("hello.bin"), inject=EVERY_FAULT_ZAPPED, quantum=q) for q in (1, 7, 250, 10_000)}
    assert len({(r.sim_insns, r.vms[0].exits["EPT_VIOLATION"], r.vms[0].stats["pf_retry"])
                for r in outcomes.values()}) == 1


def test_ksmd_woken_inside_every_fault_no_longer_livelocks_the_guests() -> None:
    # Issue #9 item 2: with retries free of time, ksmd (run between slices) never ran and the
    # fault was retried forever.  Now the slice ends, ksmd settles, and the guests finish.
    kwargs: dict[str, Any] = {"vms": 2, "profile": "3.7", "cmdline": "pages=4 passes=3 spin=2000"}
    ksm = KsmConfig(enabled=True, sleep_millisecs=0)
    plain = run(image("samepage.bin"), ksm=ksm, **kwargs)
    injected = run(image("samepage.bin"), ksm=ksm, inject=("after_gfn_to_pfn:ksm_scan@all",),
                   max_insns=100_000, **kwargs)
    assert injected.livelock is None and injected.injected
    assert sum(v.stats["pf_retry"] for v in injected.vms) > 0
    for a, b in zip(plain.vms, injected.vms, strict=True):
        assert (b.state, b.exit_status, b.console, b.insns) == (a.state, a.exit_status, a.console, a.insns)
    # The retries' cost is simulated time on top of the instructions.
    retries = sum(v.stats["pf_retry"] for v in injected.vms)
    assert injected.sim_insns == sum(v.insns for v in injected.vms) + retries * FAULT_RETRY_COST
