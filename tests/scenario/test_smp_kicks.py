"""Scenario tests: SMP guests on several vCPUs, and the kicks that KSM's remote TLB flushes cost them.

The model of concurrency (kvm/requests.py, README "SMP guests and kicks"): ksmd runs on its own
host CPU; a vCPU that is runnable at the simulated moment of a flush is in guest mode and takes
an EXTERNAL_INTERRUPT exit for the IPI, serves KVM_REQ_TLB_FLUSH in vcpu_enter_guest and is back
in guest mode before ksmd's next notifier call (the flusher waits for the IPI's ack).

One VM running samepage (N identical pages, re-read every pass) with KSM merging them, per kernel:

* 2.6.32 with change_pte: every page is write-protected (write_protect_page -> change_pte ->
  kvm_set_pte_rmapp rewrites the spte read-only -> kvm_flush_remote_tlbs) and replaced
  (replace_page -> change_pte -> rewrite -> flush): two flushes per merged page.  The first
  kicks the running vCPU, which serves the request (bit cleared) before replace_page's flush,
  so test_and_set_bit finds the bit clear and IPIs again: **two kicks**, not one (one only if
  the second flush came before the vCPU's request check, test_kvm_requests.py).  The sptes
  stay present (read-only on the KSM page): **no EPT violation** on the re-read.  2.6.32's
  fresh KSM page means all N pages are write-protected and replaced.
* 3.7: write_protect_page's invalidate_range_start zaps the spte and flushes once (one kick);
  replace_page's range_start finds no spte, no flush; the re-read takes **one EPT violation**.
  The first page of the pair is upgraded in place (write-protected only): N flushes for N pages.
"""

from typing import Any

import pytest

from hypervisor.sim import KsmConfig, RunResult

from .guests import image, run

N = 8
SAMEPAGE = f"pages={N} passes=6 spin=20000"
KSM = KsmConfig(enabled=True, sleep_millisecs=1, pages_to_scan=1000)


def one_vm(guest: str, profile: str, vcpus: int = 1, ksm: bool = True, **kw: Any) -> RunResult:
    return run(image(guest), profile=profile, vcpus=vcpus, cmdline=kw.pop("cmdline", SAMEPAGE),
               ksm=KSM if ksm else KsmConfig(), insns_per_ms=10_000, **kw)


def ept(result: RunResult) -> int:
    return result.vms[0].exits.get("EPT_VIOLATION", 0)


def kicks(result: RunResult) -> int:
    return result.vms[0].exits.get("EXTERNAL_INTERRUPT", 0)


def test_2_6_32_merge_under_a_running_vcpu_costs_two_kicks_per_page_and_no_ept_violation() -> None:
    base, merged = one_vm("samepage.bin", "2.6.32", ksm=False), one_vm("samepage.bin", "2.6.32")
    assert merged.ksm is not None and merged.ksm["pages_shared"] + merged.ksm["pages_sharing"] == N
    vm = merged.vms[0]
    assert vm.stats["spte_changed"] == 2 * N  # write_protect_page + replace_page, each rewrote the spte
    assert vm.stats["remote_tlb_flush"] == 2 * N and kicks(merged) == 2 * N
    assert vm.stats["irq_exits"] == kicks(merged) and vm.stats["tlb_flush"] == 0  # 2.6.32: served uncounted
    assert ept(merged) == ept(base)  # the re-reads hit the read-only sptes on the KSM page
    assert vm.console == base.vms[0].console


@pytest.mark.parametrize("profile", ["3.7", "6.8"])
def test_3_7_merge_under_a_running_vcpu_costs_one_kick_and_one_ept_violation_per_page(profile: str) -> None:
    base, merged = one_vm("samepage.bin", profile, ksm=False), one_vm("samepage.bin", profile)
    vm = merged.vms[0]
    assert vm.stats["spte_zapped"] == N and vm.stats["remote_tlb_flush"] == N and kicks(merged) == N
    assert ept(merged) == ept(base) + N
    assert kicks(merged) + ept(merged) - ept(base) == 2 * N  # the bill equals 2.6.32's two kicks per page


def test_without_change_pte_2_6_32_pays_one_kick_per_zap_and_breaks_the_merges_again() -> None:
    merged = one_vm("samepage.bin", "2.6.32", change_pte=False)
    vm = merged.vms[0]
    assert vm.stats["remote_tlb_flush"] == vm.stats["spte_zapped"] == kicks(merged) > N


@pytest.mark.parametrize("vcpus", [2, 4])
def test_n_running_vcpus_take_n_kicks_per_flush(vcpus: int) -> None:
    # 2.6.32: every flush comes from ksmd (no COW in this guest), while every vCPU still runs
    # its passes: each flush kicks each vCPU once.
    result = one_vm("samepage_smp.bin", "2.6.32", vcpus=vcpus)
    vm = result.vms[0]
    flushes = vm.stats["remote_tlb_flush"]
    assert flushes == 2 * N
    assert kicks(result) == vcpus * flushes
    assert [row["irq_exits"] for row in vm.vcpus] == [flushes] * vcpus
    assert vm.console == one_vm("samepage.bin", "2.6.32").vms[0].console  # the same lines as samepage


def test_3_7_a_flush_from_a_vcpus_own_fault_kicks_only_its_siblings() -> None:
    result = one_vm("samepage_smp.bin", "3.7", vcpus=4)
    vm = result.vms[0]
    flushes = vm.stats["remote_tlb_flush"]
    assert flushes >= N
    # Each flush kicks every running vCPU except the one whose own fault raised it.
    assert 3 * flushes <= kicks(result) < 4 * flushes
    assert all(row["irq_exits"] <= flushes for row in vm.vcpus)


@pytest.mark.parametrize(("guest", "cmdline"), [("samepage_smp", "pages=7 passes=3 spin=3000"),
                                               ("kernels_smp", "kernel=7 private=3 passes=3 spin=3000")])
def test_smp_variants_print_the_same_lines_for_every_number_of_vcpus(guest: str, cmdline: str) -> None:
    # Each vCPU works on its share of the pages; the shares' sums meet in `lock add`ed totals.
    consoles = {n: [v.console for v in run(image(f"{guest}.bin"), vcpus=n, vms=2, cmdline=cmdline).vms]
                for n in (1, 2, 3, 4)}
    assert consoles[1] == consoles[2] == consoles[3] == consoles[4]
    assert consoles[1][0].count("\n") == 3


@pytest.mark.parametrize("vcpus", [1, 2, 4])
def test_smpcount_counts_every_locked_increment_of_every_vcpu(vcpus: int) -> None:
    result = one_vm("smpcount.bin", "2.6.32", vcpus=vcpus, ksm=False, cmdline="count=15000")
    vm = result.vms[0]
    assert vm.console == f"smpcount: vcpus {vcpus} total {15000 * vcpus}\n"
    assert vm.state == "exited" and vm.exit_status == 0
    assert vm.exits.get("HLT", 0) == vcpus - 1  # all but the last halted; the last wrote the exit port


def test_each_vcpu_finds_its_index_in_rdi_and_cpuid_and_the_count_in_boot_params(tmp_path: Any) -> None:
    from .guests import flat_guest

    # out 0x3f8 <- '0' + RDI; cpuid(1): out <- '0' + EBX[31:24]; out <- '0' + EBX[23:16];
    # out <- '0' + boot_params.nr_vcpus; hlt
    code = bytes.fromhex(
        "4889f8" "0430" "66baf803" "ee"            # mov rax,rdi; add al,'0'; mov dx,0x3f8; out dx,al
        "b801000000" "0fa2" "89d8" "c1e818" "0430" "66baf803" "ee"  # cpuid 1; eax=ebx>>24; out
        "89d8" "c1e810" "0430" "66baf803" "ee"     # eax=ebx>>16 (low byte: count); out
        "488b4630" "0430" "66baf803" "ee"          # mov rax,[rsi+48]; out
        "f4")
    result = run(flat_guest(tmp_path, "whoami", code), vcpus=3)
    vm = result.vms[0]
    assert vm.state == "halted" and vm.exits["HLT"] == 3
    assert sorted(vm.console[i:i + 4] for i in range(0, 12, 4)) == ["0033", "1133", "2233"]


@pytest.mark.parametrize("profile", ["2.6.32", "3.7"])
def test_kicks_and_every_count_are_the_same_at_every_quantum(profile: str) -> None:
    # ksmd preempts a vCPU's turn where it is due and kicks the vCPUs runnable at that simulated
    # moment: points of simulated time, never where a --quantum chunk ends.
    reports = []
    for quantum in (7, 997, 10_000):
        report = one_vm("samepage_smp.bin", profile, vcpus=2, vms=2, quantum=quantum,
                        cmdline="pages=6 passes=4 spin=3000").as_dict()
        report["config"].pop("quantum")
        reports.append(report)
    assert reports[0] == reports[1] == reports[2]
    assert sum(vm["exits"].get("EXTERNAL_INTERRUPT", 0) for vm in reports[0]["vms"]) > 0


def test_a_vcpu_that_triple_faults_ends_the_whole_vm(tmp_path: Any) -> None:
    from .guests import flat_guest

    # test rdi,rdi; jz +2; ud2; jmp $  -- vCPU 0 spins forever, vCPU 1 takes #UD with no IDT.
    img = flat_guest(tmp_path, "one_faults", bytes.fromhex("4885ff" "7402" "0f0b" "ebfe"))
    vm = run(img, vcpus=2).vms[0]
    assert vm.state == "shutdown" and vm.error is not None and "TRIPLE_FAULT" in vm.error
    assert vm.where is not None and vm.where.startswith("vCPU 1 ")
    assert [row["state"] for row in vm.vcpus] == ["stopped", "shutdown"]
    assert vm.insns < 3 * 10_000  # the spinning sibling stopped with the VM, not at --max-insns


def test_a_kick_is_traced_on_the_kicked_vcpus_own_track(tmp_path: Any) -> None:
    import json

    from click.testing import CliRunner

    from hypervisor.cli import main as cli_main

    out = tmp_path / "kicks.json"
    result = CliRunner().invoke(cli_main, ["run", "samepage_smp", "--vcpus", "2", "--ksm", "--ksm-sleep-ms", "1",
                                           "--insns-per-ms", "10000", "--cmdline", "pages=4 passes=3 spin=20000",
                                           "--trace", str(out)])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    kicks = [e for e in events if e.get("args", {}).get("reason") == "EXTERNAL_INTERRUPT"]
    assert kicks and {threads[(e["pid"], e["tid"])] for e in kicks} == {"vcpu0", "vcpu1"}
    served = [e for e in events if e.get("name") == "kvm_tlb_flush"]
    assert len(served) >= len(kicks)  # every kicked vCPU served its flush request
