"""Shadow paging (`--mmu shadow`) scenarios with exact exit counts, derived from 2.6.32/3.7 KVM.

The guest is guest_src/shadow_aliases.S (kept here assembled; a test reassembles it when GNU
binutils are installed).  Its phases end with `out %al, $0x80`, so the kvm_exit trace events
between two such markers are the exits of one phase.  One vCPU; 2.6.32 = VMX without EPT,
bypass_guest_pf=1, no host huge pages; the guest runs in long mode (paging64_*).  The pte-write
scenarios load KVM with oos_shadow=0 (every store to a shadowed table is emulated); the last
tests show the default, oos_shadow=1 (a written leaf table goes unsync).  References are to
sndrzt/linux-2.6.32 arch/x86/kvm/ and robacklin/linux-3.7.2 arch/x86/kvm/ unless named otherwise.
"""

import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from hypervisor.events import Event, KvmExit
from hypervisor.host.mm import pte_pfn
from hypervisor.kvm.shadow_mmu import ShadowMmu
from hypervisor.kvm.shadow_page import PT_WRITABLE, spte_to_pfn
from hypervisor.sim import KsmConfig, SimConfig, Simulation
from hypervisor.types import Gpa

from .guests import flat_guest

SOURCE = Path(__file__).parent / "guest_src" / "shadow_aliases.S"
GUEST_HEX = (
    "48c7c70000400048b85a5a5a5a5a5a5a5ab900040000f348ab48c7c30000300048c7030300400048c783800000000300400048c7c300"
    "50000048c783f80f000003003000e680488b04250000e03f488b04250000e13fe68048c7c1c0c62d0048ffc975fbe680488b042500"
    "00e03f488b04250000e13fe68048c7c30000300048c7830001000023204000e680488b04250000e23fe68048c783400100002330"
    "400048c783800100002340400048c783c001000023504000e68031c0e6f4")
D_GFN = 0x400


class Phases:
    """kvm_exit reasons per phase of the guest (a phase ends at an exit to port 0x80), and D's sptes
    (the rmap of gfn D) at the end of each phase."""

    def __init__(self) -> None:
        self.phases: list[Counter[str]] = [Counter()]
        self.d_sptes: list[list[int]] = []
        self.sim: Simulation | None = None

    enabled = True

    def event(self, record: Event, vm: int | None = None) -> None:
        if not isinstance(record, KvmExit):
            return
        if record.reason == "IO_INSTRUCTION" and record.info1 >> 16 == 0x80:
            self.phases.append(Counter())
            assert self.sim is not None
            mmu = self.sim.vms[0].mmu
            assert isinstance(mmu, ShadowMmu)
            self.d_sptes.append([int(sp.view[i]) for sp, i in mmu.rmap.sptes(D_GFN)])
        else:
            self.phases[-1][record.reason] += 1


def run_aliases(tmp_path: Path, kernel: str, oos_shadow: bool = False) -> tuple[Phases, dict[str, int], int]:
    """Run the guest with KSM merging quickly; (exits and D's sptes per phase, stats, D's pfn at the end)."""
    phases = Phases()
    cfg = SimConfig(image=flat_guest(tmp_path, "shadow_aliases", bytes.fromhex(GUEST_HEX)), mmu="shadow",
                    profile=kernel, ksm=KsmConfig(enabled=True, pages_to_scan=1000, sleep_millisecs=0),
                    oos_shadow=oos_shadow)
    with Simulation(cfg, tracer=phases, check=True) as sim:
        phases.sim = sim
        result = sim.run()
        hva = sim.vms[0].gpa_to_hva(Gpa(D_GFN << 12))
        assert hva is not None
        d_pfn = int(pte_pfn(sim.vms[0].mm.pte(hva)))
    vm = result.vms[0]
    assert (vm.state, vm.exit_status, vm.error) == ("exited", 0, None)
    assert len(phases.phases) == 8
    return phases, vm.stats, d_pfn


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None, reason="needs GNU binutils")
def test_the_shadow_scenario_guest_is_its_source_assembled(tmp_path: Path) -> None:
    obj, flat = tmp_path / "g.o", tmp_path / "g.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(SOURCE)], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(flat)], check=True)
    assert flat.read_bytes().hex() == GUEST_HEX


@pytest.fixture(scope="module")
def run_2_6_32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Phases, dict[str, int], int]:
    return run_aliases(tmp_path_factory.mktemp("a"), "2.6.32")


@pytest.fixture(scope="module")
def run_unsync(tmp_path_factory: pytest.TempPathFactory) -> tuple[Phases, dict[str, int], int]:
    return run_aliases(tmp_path_factory.mktemp("c"), "2.6.32", oos_shadow=True)


@pytest.fixture(scope="module")
def run_3_7(tmp_path_factory: pytest.TempPathFactory) -> tuple[Phases, dict[str, int], int]:
    return run_aliases(tmp_path_factory.mktemp("b"), "3.7")


def test_setup_exits_once_per_first_touched_page_and_once_for_the_pde_write(run_2_6_32: Any) -> None:
    phases = run_2_6_32[0].phases
    # The code page's fetch, the first write to D and to E (rep stosq), the first write to PT's
    # page: each a #PF exit (the direct shadow page's trap spte, nonpaging_prefetch_page), fixed by
    # FNAME(page_fault).  The store to PD[511]: the boot PD is shadowed (an indirect level-2 sp), so
    # set_spte -> mmu_need_write_protect refuses W, FNAME(page_fault) returns 1 and
    # kvm_mmu_page_fault emulates the store (kvm_mmu_pte_write: level 2 -> mmu_pde_zapped).
    assert phases[0] == Counter({"EXCEPTION_NMI": 5})


def test_first_touch_of_a_page_through_two_aliases_exits_once_per_alias(run_2_6_32: Any) -> None:
    phases, _stats, _ = run_2_6_32
    # gva1: PD[511]'s shadow slot is trap (mmu_pte_write_zap_pte) -> exit; FNAME(fetch) creates the
    # leaf sp for PT (kvm_mmu_get_page: mmu_cache_miss, rmap_write_protect(PT) drops the identity
    # map's writable spte of PT: a remote flush; FNAME(prefetch_page): trap for PT[0] and PT[16],
    # which are present) and installs gva1's spte.  gva2: its slot is trap too (no pte prefetch in
    # 2.6.32) -> a second exit.  D is then on three sptes: the identity map's, gva1's and gva2's.
    assert phases.phases[1] == Counter({"EXCEPTION_NMI": 2})
    assert len(phases.d_sptes[1]) == 3


def test_merged_aliased_page_is_reread_without_exit_under_2_6_32_change_pte(run_2_6_32: Any) -> None:
    phases, stats, d_pfn = run_2_6_32
    # ksmd: write_protect_page and replace_page each call set_pte_at_notify with a read-only pte
    # -> kvm_mmu_notifier_change_pte -> kvm_set_pte_rmapp rewrites every spte on D's rmap in place
    # (3 + 3), and E's one spte (1 + 1): spte_changed 8, no spte zapped by a notifier.
    assert stats["spte_changed"] == 8
    d_sptes = phases.d_sptes[3]
    assert len(d_sptes) == 3 and all(spte_to_pfn(s) == d_pfn and not s & PT_WRITABLE for s in d_sptes)
    # Every alias still maps the (merged) page: re-reading through both takes no exit.
    assert phases.phases[3] == Counter()


def test_merged_aliased_page_is_reread_with_one_exit_per_alias_under_3_7(run_3_7: Any) -> None:
    phases, stats, d_pfn = run_3_7
    # 3.7: write_protect_page/replace_page run inside invalidate_range_start/end; range_start ->
    # kvm_unmap_hva_range -> kvm_unmap_rmapp zaps every spte of D; change_pte then finds D's rmap
    # empty.  bypass_guest_pf is gone (vmx_vcpu_setup: PFEC mask = match = 0): every #PF exits.
    # Re-reading through gva1 and gva2: one exit each, read-only sptes on the KSM page.
    assert stats["spte_changed"] == 0
    assert phases.phases[3] == Counter({"EXCEPTION_NMI": 2})
    d_sptes = phases.d_sptes[3]
    assert len(d_sptes) == 2 and all(spte_to_pfn(s) == d_pfn and not s & PT_WRITABLE for s in d_sptes)


def test_pte_write_is_updated_in_place_and_its_page_used_without_exit(run_2_6_32: Any) -> None:
    phases = run_2_6_32[0].phases
    # PT is shadowed: the 8-byte store of PT[32] exits and is emulated; kvm_mmu_pte_write:
    # mmu_guess_page_from_pte_write pins gfn 0x402, the level-1 sp's slot 32 is recomputed
    # (mmu_pte_updated) by FNAME(update_pte): the gpte is present with A, so a speculative spte.
    assert phases[4] == Counter({"EXCEPTION_NMI": 1})
    # The guest then reads gva3: the spte is there, no exit (the CPU sets its A bit).
    assert phases[5] == Counter()


def test_third_unused_pte_write_in_a_row_floods_the_shadow_page(run_2_6_32: Any) -> None:
    phases, stats, _ = run_2_6_32
    # PT[40]: the last speculative spte (slot 32) was used, so the detector restarts (count 1);
    # PT[48]: slot 40 unused -> count 2, updated; PT[56]: count 3 -> flooded: kvm_mmu_zap_page(PT's
    # sp) and mmu_flooded.  Each store is one exit and one emulation.
    assert phases.phases[6] == Counter({"EXCEPTION_NMI": 3})
    assert stats["mmu_flooded"] == 1 and stats["mmu_shadow_zapped"] == 1
    # Emulated stores: PD[511] and PT[32], PT[40], PT[48], PT[56]; updated in place: the three
    # level-1 ones before the flood; the PD's slot was zapped (mmu_pde_zapped).
    assert (stats["insn_emulation"], stats["mmu_pte_write"], stats["mmu_pte_updated"],
            stats["mmu_pde_zapped"]) == (5, 5, 3, 1)


def test_with_oos_shadow_a_written_leaf_table_goes_unsync_and_its_stores_run_natively(run_unsync: Any) -> None:
    phases, stats, _ = run_unsync
    # The same guest with KVM's default oos_shadow=1.  The store of PT[32] still exits once (PT's
    # spte in the identity map is read-only), but mmu_need_write_protect finds PT's shadow page at
    # level 1 and kvm_unsync_page marks it unsync instead (mmu_unsync, a gauge): the spte becomes
    # writable, nothing is emulated and the store re-executes natively.
    assert phases.phases[4] == Counter({"EXCEPTION_NMI": 1})
    # PT's slot 32 was notrap (PT[32] absent at prefetch); mmu_convert_notrap made it trap, so the
    # first use of gva3 exits once (the guest's new pte is picked up by the fault).
    assert phases.phases[5] == Counter({"EXCEPTION_NMI": 1})
    # The three later stores to the unsync table: no exit at all, nothing emulated, no flooding.
    assert phases.phases[6] == Counter()
    assert stats["mmu_unsync"] == 1 and stats["mmu_flooded"] == 0
    # The only emulated store is the one to the level-2 PD, which never goes unsync.
    assert (stats["insn_emulation"], stats["mmu_pte_write"], stats["mmu_pde_zapped"]) == (1, 1, 1)
