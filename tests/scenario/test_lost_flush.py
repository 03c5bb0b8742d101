"""Scenario tests: --check catches a vCPU whose TLB missed a remote flush, under both MMUs."""

import pytest
from click.testing import CliRunner

from hypervisor.cli import main

RUN = ["run", "samepage_smp", "--vcpus", "2", "--ksm", "--kernel", "3.7", "--check",
       "--cmdline", "pages=8 passes=4 spin=20000"]


@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
def test_check_catches_a_tlb_that_missed_a_remote_flush(mmu: str) -> None:
    # 3.7 zaps the merged page's spte(s) and flushes; with that flush's requests served without
    # flushing (lost_flush), vCPU 0's TLB still maps the frame the spte no longer maps.
    clean = CliRunner().invoke(main, [*RUN, "--mmu", mmu])
    assert clean.exit_code == 0, clean.output
    lost = CliRunner().invoke(main, [*RUN, "--mmu", mmu, "--inject", "kvm_flush_remote_tlbs:lost_flush@1"])
    assert lost.exit_code == 8, lost.output
    assert "invariant tlb-follows-spte violated" in lost.stderr
    assert "after a remote TLB flush, but the spte is 0x0" in lost.stderr
