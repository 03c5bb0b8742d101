"""Coherence evidence: --check over real runs, injected races with and without the retry protocol,
and differential runs (the guests' own computation never depends on the era or on KSM)."""

from pathlib import Path

import pytest

from hypervisor.errors import InvariantViolation
from hypervisor.kvm.mmu_interface import IgnoreMmuNotifierRetry
from hypervisor.sim import GUEST_IMAGES, KsmConfig, SimConfig, Simulation

from .guests import flat_guest, image

PROFILES = [("2.6.32", True), ("2.6.32", False), ("2.6.38", True), ("2.6.38", False), ("3.7", True),
            ("5.8", True), ("6.10", True)]
KSM = KsmConfig(enabled=True, pages_to_scan=1000, sleep_millisecs=1)


@pytest.mark.parametrize(("profile", "change_pte"), PROFILES)
def test_check_finds_every_invariant_holding_under_ksm_churn(profile: str, change_pte: bool) -> None:
    sim = Simulation(SimConfig(image=image("cowstorm.bin"), vms=3, profile=profile, change_pte=change_pte,
                               cmdline="pages=24 passes=10 spin=30000 write_at=6", ksm=KSM), check=True)
    result = sim.run()
    assert result.violation is None
    assert result.checks is not None and result.checks > 1000
    assert not result.errors


# A guest that reads an untouched page, then halts: mov rax, [0x200000]; hlt
READ_ONE = bytes.fromhex("488b042500002000") + b"\xf4"


def _race(tmp_path: Path, profile: str, spec: str, retry: bool) -> Simulation:
    sim = Simulation(SimConfig(image=flat_guest(tmp_path, "read_one", READ_ONE), profile=profile,
                               inject=(spec,)), check=True)
    if not retry:
        for vm in sim.vms:
            vm.mmu.hooks = IgnoreMmuNotifierRetry(vm.mmu.hooks)
    return sim


# The data read is the guest's 5th EPT violation (after its code page and the PML4, PDPT and
# PD pages its first TLB miss walks); the races below fire at that fault.
DATA_FAULT = 5


@pytest.mark.parametrize("profile", ["3.7", "6.10"])
def test_cow_between_gfn_to_pfn_and_the_retry_check_makes_the_fault_retry(tmp_path: Path, profile: str) -> None:
    # The read fault pins the zero page (GUP read); the VMM then writes the page: do_wp_page
    # replaces the zero page with a private frame inside invalidate_range_start/end, so
    # mmu_notifier_seq moved and the fault must not install its now-stale pfn.
    spec = f"after_gfn_to_pfn:cow@{DATA_FAULT}"
    result = _race(tmp_path, profile, spec, retry=True).run()
    assert result.violation is None
    assert result.injected == {spec: 1}
    vm = result.vms[0]
    assert vm.stats["pf_retry"] == 1
    assert vm.exits["EPT_VIOLATION"] == DATA_FAULT + 1  # the retried fault is one more exit
    assert vm.state == "halted"


@pytest.mark.parametrize("profile", ["3.7", "6.10"])
def test_without_the_retry_check_the_checker_catches_the_stale_spte(tmp_path: Path, profile: str) -> None:
    spec = f"after_gfn_to_pfn:cow@{DATA_FAULT}"
    result = _race(tmp_path, profile, spec, retry=False).run()
    assert result.violation is not None
    assert "spte-follows-pte" in result.violation
    assert "gfn 0x200" in result.violation and "maps pfn 0x0" in result.violation
    assert "mmu_notifier_invalidate_range_end" in result.violation  # the ring buffer shows the race


@pytest.mark.parametrize("profile", ["2.6.32", "3.7", "6.10"])
def test_invalidate_range_during_a_fault_retries_and_without_retry_maps_a_freed_frame(
        tmp_path: Path, profile: str) -> None:
    spec = f"after_gfn_to_pfn:invalidate_range@{DATA_FAULT}"
    ok = _race(tmp_path, profile, spec, retry=True).run()
    assert ok.violation is None and ok.vms[0].stats["pf_retry"] == 1
    bad = _race(tmp_path, profile, spec, retry=False).run()
    assert bad.violation is not None
    assert "spte-follows-pte" in bad.violation or "frame-mapped-not-free" in bad.violation


def test_aging_during_a_fault_is_harmless_and_needs_no_retry(tmp_path: Path) -> None:
    result = _race(tmp_path, "3.7", "after_gfn_to_pfn:age@all", retry=True).run()
    assert result.violation is None
    assert result.vms[0].stats["pf_retry"] == 0


def test_ksm_scan_during_a_fault_cannot_merge_the_pinned_page(tmp_path: Path) -> None:
    # Two identical pages written by the guest, then re-read; a ksmd scan fired inside
    # each fault finds the faulting page pinned (page_count > mapcount) and leaves it.
    cfg = SimConfig(image=image("samepage.bin"), cmdline="pages=4 passes=4 spin=20000",
                    ksm=KsmConfig(enabled=True, pages_to_scan=1000, sleep_millisecs=0),
                    inject=("after_gfn_to_pfn:ksm_scan@all",))
    result = Simulation(cfg, check=True).run()
    assert result.violation is None and not result.errors
    assert result.ksm is not None and result.ksm["pages_sharing"] == 3


@pytest.mark.parametrize("profile", ["2.6.32", "3.7", "6.10"])
def test_a_host_write_between_write_protect_and_replace_page_aborts_the_merge(profile: str) -> None:
    # replace_page re-checks that the pte is the one write_protect_page left; the VMM's
    # write COWed the page in between, so this merge is abandoned (ksmd retries later).
    cfg = SimConfig(image=image("samepage.bin"), cmdline="pages=4 passes=6 spin=20000", profile=profile,
                    ksm=KsmConfig(enabled=True, pages_to_scan=1000, sleep_millisecs=0),
                    inject=("ksm_before_replace_page:cow@1",))
    result = Simulation(cfg, check=True).run()
    assert result.violation is None and not result.errors
    assert result.injected == {"ksm_before_replace_page:cow@1": 1}
    assert result.ksm is not None and result.ksm["pages_sharing"] == 3


def test_an_invariant_violation_is_a_clear_error_with_the_last_events(tmp_path: Path) -> None:
    sim = _race(tmp_path, "6.10", f"after_gfn_to_pfn:cow@{DATA_FAULT}", retry=False)
    result = sim.run()
    assert result.violation is not None
    assert result.violation.startswith("invariant spte-follows-pte violated: vm0 gfn 0x200 hva 0x7f0000200000")
    assert "Last events:" in result.violation
    assert InvariantViolation.exit_code == 8


# --- differential runs -------------------------------------------------------------------------

SMALL = {
    "hello.bin": "",
    "memtouch.bin": "pages=64 passes=2",
    "samepage.bin": "pages=16 passes=6 spin=20000",
    "cowstorm.bin": "pages=16 passes=6 spin=20000 write_at=3",
    "kernels.bin": "kernel=64 private=4 passes=4 spin=20000",
}
VARIANTS = [(p, cp, ksm) for p, cp in PROFILES for ksm in (False, True)] + [("3.7", False, True)]


def _outputs(img: str, cmdline: str, profile: str, change_pte: bool, ksm: bool,
             vms: int) -> list[tuple[str, int | None]]:
    cfg = SimConfig(image=str(GUEST_IMAGES / img), cmdline=cmdline, vms=vms, profile=profile, change_pte=change_pte,
                    ksm=KsmConfig(enabled=True, pages_to_scan=500, sleep_millisecs=1) if ksm else KsmConfig())
    result = Simulation(cfg).run()
    assert not result.errors
    return [(v.console, v.exit_status) for v in result.vms]


@pytest.mark.parametrize("img", sorted(SMALL))
def test_every_guest_prints_the_same_under_every_profile_with_and_without_ksm(img: str) -> None:
    reference = _outputs(img, SMALL[img], "2.6.32", True, False, 2)
    for profile, change_pte, ksm in VARIANTS:
        assert _outputs(img, SMALL[img], profile, change_pte, ksm, 2) == reference, (profile, change_pte, ksm)


@pytest.mark.slow
@pytest.mark.parametrize("img", sorted(SMALL))
def test_full_differential_matrix_with_default_guest_parameters(img: str) -> None:
    reference = _outputs(img, "", "2.6.32", True, False, 4)
    for profile, change_pte, ksm in VARIANTS:
        assert _outputs(img, "", profile, change_pte, ksm, 4) == reference, (profile, change_pte, ksm)
