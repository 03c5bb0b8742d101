"""Every bundled guest under `--mmu shadow`: the same console as under EPT, on every era; and what
the shadow-paging guests (procs, ptwrite) make KVM do."""

import pytest

from hypervisor.guest.catalog import bundled_guests
from hypervisor.sim import GUEST_IMAGES, KsmConfig, RunResult, SimConfig, Simulation

GUESTS = [g.name for g in bundled_guests(GUEST_IMAGES)]


def run(name: str, mmu: str, kernel: str = "2.6.32", check: bool = False, **kw: object) -> RunResult:
    image = next(g.image for g in bundled_guests(GUEST_IMAGES) if g.name == name)
    cfg = SimConfig(image=str(image), mmu=mmu, profile=kernel, **kw)  # type: ignore[arg-type]
    with Simulation(cfg, check=check) as sim:
        return sim.run()


@pytest.mark.parametrize("name", GUESTS)
def test_every_bundled_guest_prints_the_same_under_shadow_paging_as_under_ept(name: str) -> None:
    tdp, shadow = run(name, "tdp").vms[0], run(name, "shadow", check=True).vms[0]
    assert shadow.console == tdp.console and shadow.console
    assert (shadow.state, shadow.exit_status) == (tdp.state, tdp.exit_status)
    # Under shadow paging no EPT violation exists; the guest's faults are #PF exits instead.
    assert "EPT_VIOLATION" not in shadow.exits and shadow.exits["EXCEPTION_NMI"] > 0


@pytest.mark.parametrize("kernel", ["2.6.32", "2.6.38", "3.7", "6.8"])
@pytest.mark.parametrize("name", ["procs", "ptwrite"])
def test_shadow_guests_print_the_same_checksums_under_both_mmus_and_every_kernel(name: str, kernel: str) -> None:
    assert run(name, "shadow", kernel).vms[0].console == run(name, "tdp", "2.6.32").vms[0].console


def test_ptwrite_unmapped_read_is_a_pf_injected_by_kvm_after_invlpg() -> None:
    vm = run("ptwrite", "shadow", cmdline="pages=8 rounds=4", oos_shadow=False).vms[0]
    assert vm.console.endswith("faults 4\n")
    # hv_unmap: the emulated store of 0 makes the spte notrap (FNAME(update_pte)), then INVLPG makes
    # it trap (FNAME(invlpg) writes trap whatever was there), so the read exits and walk_addr fails:
    # kvm_inject_page_fault, once per round (2.6.32 paging_tmpl.h FNAME(page_fault)).
    assert vm.stats["pf_guest"] == 4
    # Every hv_map/hv_unmap ends with an INVLPG: 8 + 8 maps per round, the unmap, the handler's map.
    assert vm.exits["INVLPG"] == vm.stats["invlpg"] == 4 * (8 + 8 + 1 + 1)
    # Pte stores to the shadowed leaf table are emulated (kvm_mmu_pte_write); each burst of 8
    # unused ones floods the table's shadow page (the third write in a row), once per round.
    assert vm.stats["insn_emulation"] > 0 and vm.stats["mmu_pte_updated"] > 0
    assert vm.stats["mmu_flooded"] == 4
    # With KVM's default oos_shadow=1 the leaf table goes unsync on its first store: the later
    # stores run natively (no emulation, no flooding); each INVLPG then drops the stale spte.
    unsync = run("ptwrite", "shadow", cmdline="pages=8 rounds=4").vms[0]
    assert unsync.console == vm.console and unsync.stats["pf_guest"] == 4
    assert unsync.stats["mmu_flooded"] == 0 and unsync.stats["insn_emulation"] < vm.stats["insn_emulation"]
    assert unsync.exits["EXCEPTION_NMI"] < vm.exits["EXCEPTION_NMI"]


def test_procs_switches_cr3_with_one_exit_per_switch_and_reuses_each_shadow_root() -> None:
    vm = run("procs", "shadow", cmdline="procs=4 rounds=8 spin=100").vms[0]
    # Each round switches to each of the 4 spaces: 32 loads, plus the SDK's start-up switch and one
    # per new space while building them; kvm_set_cr3 -> the root is a hash hit from round 2 on.
    assert vm.exits["CR_ACCESS"] >= 32
    # Shadow pages: per space root (PML4), PDPT and the leaf tables; none is created twice.
    misses = vm.stats["mmu_cache_miss"]
    again = run("procs", "shadow", cmdline="procs=4 rounds=16 spin=100").vms[0]
    assert again.stats["mmu_cache_miss"] == misses  # 8 more rounds build nothing new
    assert again.exits["EXCEPTION_NMI"] == vm.exits["EXCEPTION_NMI"]  # and take no more faults


def test_a_small_shadow_page_cache_recycles_oldest_first_and_the_guest_does_not_notice() -> None:
    big = run("procs", "shadow", cmdline="procs=12 rounds=3 spin=100").vms[0]
    small = run("procs", "shadow", cmdline="procs=12 rounds=3 spin=100", mmu_pages=64).vms[0]
    assert small.console == big.console
    assert big.stats["mmu_recycled"] == 0 and small.stats["mmu_recycled"] > 0
    # Recycled address spaces are rebuilt on their next use: more misses and faults.
    assert small.stats["mmu_cache_miss"] > big.stats["mmu_cache_miss"]


def test_merged_shared_region_of_procs_is_rewritten_in_every_alias_by_2_6_32_change_pte() -> None:
    ksm = KsmConfig(enabled=True, pages_to_scan=1000, sleep_millisecs=2)
    cmdline = "procs=4 shared=16 aliases=2 rounds=40 spin=20000"
    old = run("procs", "shadow", "2.6.32", cmdline=cmdline, ksm=ksm).vms[0]
    new = run("procs", "shadow", "3.7", cmdline=cmdline, ksm=ksm).vms[0]
    assert old.console == new.console
    # 2.6.32: change_pte rewrites every spte of a merged gfn in place (4 spaces x 2 aliases = 8 per
    # gfn); 3.7 zaps them at invalidate_range_start and each alias faults back once.
    assert old.stats["spte_changed"] > 0 and new.stats["spte_changed"] == 0
    assert new.stats["spte_zapped"] > 0
