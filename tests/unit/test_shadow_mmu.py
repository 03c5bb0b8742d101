"""The shadow MMU's pure parts and its rmap walks, without Unicorn (kvm/guest_walker.py, kvm/rmap.py,
kvm/shadow_page.py, kvm/shadow_mmu.py, kvm/shadow_notifier.py, kvm/pte_write.py, cpu/shadow_insns.py)."""

import contextlib
from typing import Any, NoReturn

import numpy as np
import pytest

from hypervisor.build import build_host, build_vm
from hypervisor.config import SimConfig, validate
from hypervisor.cpu.shadow_fill import decode_store
from hypervisor.cpu.shadow_insns import candidate_offsets, effective_address
from hypervisor.errors import ConfigError, InvariantViolation
from hypervisor.host.mm import MADV_DONTNEED, pte_pfn
from hypervisor.kvm.guest_walker import walk_addr
from hypervisor.kvm.mmu_interface import FaultHooks
from hypervisor.kvm.pte_write import need_remote_flush
from hypervisor.kvm.rmap import Rmap
from hypervisor.kvm.shadow_mmu import ShadowFault, ShadowMmu, to_ept_format
from hypervisor.kvm.shadow_page import (
    PFERR_PRESENT,
    PFERR_WRITE,
    PT_ACCESSED,
    PT_DIRTY,
    PT_WRITABLE,
    SPTE_NOTRAP,
    SPTE_TRAP,
    KvmMmuPage,
    Role,
    ShadowPageHash,
    is_shadow_present_pte,
    kvm_mmu_calculate_mmu_pages,
    spte_to_pfn,
)
from hypervisor.kvm.spte import SPTE_PFN_MASK, SPTE_READABLE, SPTE_WRITABLE
from hypervisor.kvm.vm import Vm
from hypervisor.profiles import get_profile
from hypervisor.shadow_check import check_shadow
from hypervisor.sim import GUEST_IMAGES
from hypervisor.types import PAGE_SIZE, Gfn, Gpa, Hva

# --- KVM's walk of the guest tables (FNAME(walk_addr), 2.6.32 paging_tmpl.h) -----------------------


def memory(entries: dict[int, int]) -> tuple[dict[int, int], Any, Any]:
    mem = dict(entries)

    def read(gpa: int) -> int:
        return mem.get(gpa, 0)

    def cmpxchg(gpa: int, old: int, new: int) -> bool:
        if mem.get(gpa, 0) != old:
            return False
        mem[gpa] = new
        return True

    return mem, read, cmpxchg


# PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000 -> page 0x9000 for gva 0; PD[1] a 2 MiB page.
TABLES = {0x1000: 0x2003, 0x2000: 0x3003, 0x3000: 0x4003, 0x3008: 0x600083, 0x4000: 0x9001}


def test_walk_addr_sets_accessed_in_every_level_and_dirty_only_on_a_write_fault() -> None:
    mem, read, cmpxchg = memory(TABLES | {0x4000: 0x9003})
    found, w = walk_addr(0x1000, 0x123, False, False, False, read, cmpxchg)
    assert found and w.gfn == 9 and w.level == 1
    assert all(mem[a] & PT_ACCESSED for a in (0x1000, 0x2000, 0x3000, 0x4000)) and not mem[0x4000] & PT_DIRTY
    found, w = walk_addr(0x1000, 0x123, True, False, False, read, cmpxchg)
    assert found and mem[0x4000] & PT_DIRTY and w.pte_access & PT_WRITABLE


def test_walk_addr_fails_with_the_error_code_of_the_guest_pf() -> None:
    _, read, cmpxchg = memory(TABLES)
    found, w = walk_addr(0x1000, 0x5000, False, False, False, read, cmpxchg)  # PT[5] absent
    assert not found and w.error_code == 0
    found, w = walk_addr(0x1000, 0x0, True, False, False, read, cmpxchg)  # PT[0] read-only, CR0.WP
    assert not found and w.error_code == PFERR_PRESENT | PFERR_WRITE


def test_walk_addr_of_a_2mib_guest_page_gives_the_4k_gfn_inside_it() -> None:
    _, read, cmpxchg = memory(TABLES)
    found, w = walk_addr(0x1000, 0x200000 + 0x5123, False, False, False, read, cmpxchg)
    assert found and w.level == 2 and w.gfn == 0x600 + 5


def test_walk_addr_walks_again_when_a_gpte_changes_under_its_cmpxchg() -> None:
    mem, read, _ = memory(TABLES | {0x4000: 0x9003})
    calls = []

    def racing(gpa: int, old: int, new: int) -> bool:
        calls.append(gpa)
        if len(calls) == 1:
            return False  # the guest changed the pte: FNAME(walk_addr) goes back to `walk`
        mem[gpa] = new
        return True

    found, _ = walk_addr(0x1000, 0, False, False, False, read, racing)
    assert found and calls[0] == calls[1] == 0x1000


# --- rmap, shadow page hash, sizes -----------------------------------------------------------------


def page(sp_id: int, level: int = 1) -> KvmMmuPage:
    return KvmMmuPage(sp_id, 0, Role(level, False, 7), np.zeros(512, dtype=np.uint64))


def test_rmap_add_returns_the_count_before_and_remove_fills_the_hole_with_the_last() -> None:
    rmap, a, b = Rmap(), page(1), page(2)
    assert [rmap.rmap_add(5, a, 0), rmap.rmap_add(5, b, 3), rmap.rmap_add(5, a, 7)] == [0, 1, 2]
    rmap.rmap_remove(a, 0)
    assert rmap.sptes(5) == [(a, 7), (b, 3)] and len(rmap) == 2
    rmap.rmap_remove(a, 7)
    rmap.rmap_remove(b, 3)
    assert 5 not in rmap.heads


def test_shadow_pages_are_found_by_gfn_and_role_and_recycled_oldest_first() -> None:
    pages = ShadowPageHash(64)
    first = pages.alloc(3, Role(1, False, 7), SPTE_TRAP)
    second = pages.alloc(3, Role(1, False, 3), SPTE_TRAP)
    assert pages.lookup(3, Role(1, False, 3)) is second and pages.lookup(3, Role(2, False, 7)) is None
    assert pages.oldest() is first and pages.n_used_mmu_pages == 2
    pages.move_to_head(first)
    assert pages.oldest() is second


def test_default_cache_size_is_two_percent_of_guest_pages_at_least_64() -> None:
    # 2.6.32 mmu.c kvm_mmu_calculate_mmu_pages: KVM_PERMILLE_MMU_PAGES 20, KVM_MIN_ALLOC_MMU_PAGES 64.
    assert kvm_mmu_calculate_mmu_pages(16384) == 327 and kvm_mmu_calculate_mmu_pages(1024) == 64


def test_trap_and_notrap_are_both_not_present() -> None:
    assert not is_shadow_present_pte(SPTE_TRAP) and not is_shadow_present_pte(SPTE_NOTRAP)
    assert is_shadow_present_pte(0x5000 | 1)


def test_need_remote_flush_when_a_present_spte_loses_its_page_or_a_permission() -> None:
    # 2.6.32 mmu.c need_remote_flush.
    old = 0x5000 | 0x67
    assert not need_remote_flush(SPTE_TRAP, old)
    assert need_remote_flush(old, SPTE_TRAP)
    assert need_remote_flush(old, 0x6000 | 0x67)
    assert need_remote_flush(old, old & ~PT_WRITABLE)
    assert not need_remote_flush(old & ~PT_WRITABLE, old)


def test_a_shadow_spte_in_ept_format_keeps_its_pfn_and_write_permission() -> None:
    assert to_ept_format(SPTE_TRAP) == to_ept_format(SPTE_NOTRAP) == 0
    ept = to_ept_format(0x5000 | 0x263)
    assert ept & SPTE_READABLE and ept & SPTE_WRITABLE and (ept & SPTE_PFN_MASK) >> 12 == 5


# --- the instructions that exit only under shadow paging ---------------------------------------------


def test_code_scan_finds_mov_to_and_from_cr3_and_invlpg_but_not_other_cr_moves() -> None:
    code = np.zeros(PAGE_SIZE, dtype=np.uint8)
    for off, insn in ((0, b"\x0f\x22\xd8"), (10, b"\x0f\x20\xd8"), (20, b"\x0f\x01\x38"), (30, b"\x0f\x22\xc0"),
                      (40, b"\x0f\x01\xf8")):
        code[off:off + 3] = np.frombuffer(insn, dtype=np.uint8)
    assert candidate_offsets(code) == [0, 10, 20]  # mov cr0 and swapgs (0f 01 f8: mod=3) are not


class FakeUc:
    def __init__(self, regs: dict[str, int]) -> None:
        self.regs = regs

    def reg_read(self, reg: int) -> int:
        from unicorn import x86_const as x86

        name = next(n for n in dir(x86) if n.startswith("UC_X86_REG_") and getattr(x86, n) == reg)
        return self.regs[name.removeprefix("UC_X86_REG_").lower()]


def test_invlpg_operand_address_is_computed_from_the_registers() -> None:
    uc = FakeUc({"rax": 0x1000, "rbx": 3, "rbp": 0x40000000})
    assert effective_address(uc, "byte ptr [rbp]", 0) == 0x40000000
    assert effective_address(uc, "byte ptr [rax + rbx*8 - 0x10]", 0) == 0x1000 + 24 - 0x10
    assert effective_address(uc, "byte ptr [rip + 0x20]", 0x500) == 0x520
    assert effective_address(uc, "byte ptr fs:[rax]", 0) == 0x1000
    assert effective_address(uc, "rax", 0) is None


# --- the rmap walks of the notifier callbacks, on a VM with aliases --------------------------------


def shadow_vm(kernel: str = "2.6.32") -> Vm:
    host = build_host(get_profile(kernel), 64)
    vm = build_vm(host, 0, 16 * PAGE_SIZE, mmu="shadow")
    vcpu = vm.create_vcpu()
    vcpu.vcpu_load(0)  # in guest mode on host CPU 0: a flush from the host side IPIs it
    # Guest tables in gfns 8..11; gfn 1 mapped at gvas 0x1000, 0x2000 and 0x9000.
    pml4, pdpt, pd, pt = 0x8000, 0x9000, 0xA000, 0xB000
    for table, entry in ((pml4, pdpt), (pdpt, pd), (pd, pt)):
        vm.write_guest(Gpa(table), (entry | 3).to_bytes(8, "little"))
    for gva_page in (1, 2, 9):
        vm.write_guest(Gpa(pt + gva_page * 8), (0x1000 | 3).to_bytes(8, "little"))
    vm.write_guest(Gpa(0x1000), b"\x5a" * PAGE_SIZE)
    mmu = vm.mmu
    assert isinstance(mmu, ShadowMmu)
    mmu.state(vcpu).cr3 = pml4
    for gva in (0x1000, 0x2000, 0x9000):
        assert mmu.walk_shadow(vcpu, gva, False)[0] == 0
        assert vcpu.handle_shadow_pf(gva, 0, 0) is ShadowFault.FIXED
    return vm


def sptes_of(vm: Vm, gfn: int) -> list[int]:
    mmu = vm.mmu
    assert isinstance(mmu, ShadowMmu)
    return [int(sp.view[i]) for sp, i in mmu.rmap.sptes(gfn)]


def test_three_aliases_of_a_gfn_are_three_sptes_on_its_rmap() -> None:
    vm = shadow_vm()
    sptes = sptes_of(vm, 1)
    assert len(sptes) == 3 and len({spte_to_pfn(s) for s in sptes}) == 1
    # Read faults on gptes whose D bit is clear: read-only sptes (2.6.32 set_spte, `dirty`).
    assert not any(s & PT_WRITABLE for s in sptes)
    assert vm.vcpus[0].stats.exits == 3 and vm.stats.spte_set == 3


def test_change_pte_rewrites_every_alias_in_place_with_one_remote_flush() -> None:
    vm = shadow_vm()
    hva = vm.gpa_to_hva(Gpa(0x1000))
    assert hva is not None
    mmu = vm.mmu
    assert isinstance(mmu, ShadowMmu)
    flushes = vm.stats.remote_tlb_flush
    read_only = (int(vm.mm.pte(hva)) & ~0x2 & ~0xFFFFFFFFFF000) | (7 << 12)
    mmu.kvm_set_spte_hva(hva, read_only)
    assert vm.stats.spte_changed == 3 and vm.stats.remote_tlb_flush == flushes + 1
    assert vm.vcpus[0].stats.irq_exits == 1  # the kick of the one vCPU in guest mode
    assert all(spte_to_pfn(s) == 7 and not s & PT_WRITABLE for s in sptes_of(vm, 1))
    # A writable new host pte zaps them all instead (kvm_set_pte_rmapp).
    mmu.kvm_set_spte_hva(hva, read_only | 0x2)
    assert sptes_of(vm, 1) == [] and vm.stats.spte_zapped == 3


def test_unmap_and_aging_walk_every_spte_of_the_gfn() -> None:
    vm = shadow_vm()
    hva = vm.gpa_to_hva(Gpa(0x1000))
    assert hva is not None
    mmu = vm.mmu
    assert isinstance(mmu, ShadowMmu)
    # kvm_age_rmapp: every spte with A (set by the fault path, speculative = false) is young.
    assert mmu.kvm_age_hva(hva) and not any(s & PT_ACCESSED for s in sptes_of(vm, 1))
    assert not mmu.kvm_age_hva(hva)
    assert mmu.kvm_unmap_hva_range(hva, Hva(hva + PAGE_SIZE)) and sptes_of(vm, 1) == []
    assert vm.stats.spte_zapped == 3


def test_host_pte_and_every_spte_agree_after_the_faults() -> None:
    vm = shadow_vm()
    hva = vm.gpa_to_hva(Gpa(0x1000))
    assert hva is not None
    assert {spte_to_pfn(s) for s in sptes_of(vm, 1)} == {int(pte_pfn(vm.mm.pte(hva)))}


def test_mmu_pages_is_refused_without_shadow_and_below_kvms_minimum() -> None:
    image = str(GUEST_IMAGES / "hello.bin")
    with pytest.raises(ConfigError, match="needs --mmu shadow"):
        validate(SimConfig(image=image, mmu_pages=100))
    with pytest.raises(ConfigError, match="at least 64"):
        validate(SimConfig(image=image, mmu="shadow", mmu_pages=10))
    with pytest.raises(ConfigError, match="tdp"):
        validate(SimConfig(image=image, mmu="ept"))


def violations(vm: Vm) -> list[str]:
    found: list[str] = []

    def fail(invariant: str, detail: str) -> NoReturn:
        found.append(invariant)
        raise InvariantViolation(detail)

    with contextlib.suppress(InvariantViolation):
        check_shadow(vm, fail)
    return found


def test_check_finds_a_writable_spte_on_a_shadowed_page_table() -> None:
    vm = shadow_vm()
    assert violations(vm) == []
    mmu = vm.mmu
    assert isinstance(mmu, ShadowMmu)
    # Map the leaf table (gfn 0xb) itself at gva 0x3000 writable, as data, behind KVM's back.
    sp, index = mmu.rmap.sptes(1)[0]
    mmu.rmap.rmap_add(0xB, sp, 3)
    sp.view[3] = (spte_to_pfn(int(sp.view[index])) << 12) | 0x263
    assert violations(vm) in (["shadowed-gfn-write-protected"], ["shadow-spte-follows-guest"],
                              ["spte-follows-pte"])


def test_check_finds_an_spte_missing_from_its_rmap() -> None:
    vm = shadow_vm()
    mmu = vm.mmu
    assert isinstance(mmu, ShadowMmu)
    sp, index = mmu.rmap.sptes(1)[0]
    mmu.rmap.rmap_remove(sp, index)
    assert violations(vm) == ["spte-on-rmap"]


def test_check_finds_an_spte_that_no_longer_follows_its_guest_pte() -> None:
    vm = shadow_vm()
    vm.write_guest(Gpa(0xB000 + 8), (0x2000 | 3).to_bytes(8, "little"))  # gva 0x1000 -> gfn 2, unseen
    assert violations(vm) == ["shadow-spte-follows-guest"]


def test_a_written_leaf_table_goes_unsync_unless_it_is_shadowed_under_two_roles() -> None:
    vm = shadow_vm()
    mmu = vm.mmu
    assert isinstance(mmu, ShadowMmu)
    leaf = mmu.pages.indirect_pages(0xB)[0]
    # 2.6.32 kvm_unsync_page: a second role of the same table keeps it write-protected.
    other = mmu.pages.alloc(0xB, Role(1, False, leaf.role.access ^ 4), SPTE_TRAP)
    assert mmu.mmu_need_write_protect(0xB) and not leaf.unsync
    mmu.kvm_mmu_zap_page(other)
    assert not mmu.mmu_need_write_protect(0xB) and leaf.unsync and vm.stats.mmu_unsync == 1
    # Upper-level tables always stay protected; oos_shadow=0 keeps leaf tables protected too.
    assert mmu.mmu_need_write_protect(0xA)
    mmu.oos_shadow = False
    assert not mmu.mmu_need_write_protect(0xB)  # already unsync: writable until the next sync


def test_a_cr3_load_syncs_an_unsync_table_and_drops_the_sptes_its_guest_changed() -> None:
    vm = shadow_vm()
    mmu = vm.mmu
    assert isinstance(mmu, ShadowMmu)
    vcpu = vm.vcpus[0]
    assert not mmu.mmu_need_write_protect(0xB)  # unsync
    vm.write_guest(Gpa(0xB000 + 8), (0x2000 | 3).to_bytes(8, "little"))  # gva 0x1000 -> gfn 2, unseen
    assert violations(vm) == []  # an unsync table may lag its guest
    mmu.kvm_set_cr3(vcpu, 0x8000)  # the same CR3: kvm_mmu_sync_roots
    leaf = mmu.pages.indirect_pages(0xB)[0]
    assert not leaf.unsync and vm.stats.mmu_unsync == 0
    assert len(sptes_of(vm, 1)) == 2 and violations(vm) == []  # gva 0x1000's spte went


@pytest.mark.parametrize(("kernel", "exits"), [("2.6.32", 3), ("2.6.37", 2), ("3.7", 2)])
def test_pte_prefetch_maps_the_accessed_neighbours_of_a_fault_from_2_6_37(kernel: str, exits: int) -> None:
    host = build_host(get_profile(kernel), 64)
    vm = build_vm(host, 0, 16 * PAGE_SIZE, mmu="shadow")
    vcpu = vm.create_vcpu()
    for table, entry in ((0x8000, 0x9000), (0x9000, 0xA000), (0xA000, 0xB000)):
        vm.write_guest(Gpa(table), (entry | 3).to_bytes(8, "little"))
    # gfn 1 at gvas 0x1000, 0x2000 (one 8-pte group) and 0x9000 (the next group), accessed ptes.
    for gva_page in (1, 2, 9):
        vm.write_guest(Gpa(0xB000 + gva_page * 8), (0x1000 | 0x23).to_bytes(8, "little"))
    vm.write_guest(Gpa(0x1000), b"\x5a" * PAGE_SIZE)  # the host page is there and writable
    mmu = vm.mmu
    assert isinstance(mmu, ShadowMmu)
    mmu.state(vcpu).cr3 = 0x8000
    for gva in (0x1000, 0x2000, 0x9000):
        spte, error_code = mmu.walk_shadow(vcpu, gva, False)
        if not spte:
            assert vcpu.handle_shadow_pf(gva, error_code, 0) is ShadowFault.FIXED
    # FNAME(pte_prefetch): the fault on 0x1000 also maps 0x2000 (same group, A set, pinnable);
    # 0x9000 is in another group.  2.6.32 has no prefetch: one exit per alias.
    assert vcpu.stats.exits == exits and len(sptes_of(vm, 1)) == 3


class InvalidateOnce(FaultHooks):
    """MADV_DONTNEED of the faulting page between gfn_to_pfn and mmu_lock, the first time only."""

    def __init__(self) -> None:
        self.fired = False

    def after_gfn_to_pfn(self, mmu: Any, gfn: Gfn, hva: Hva) -> None:
        if not self.fired:
            self.fired = True
            mmu.vm.mm.madvise(hva, PAGE_SIZE, MADV_DONTNEED)


def test_the_shadow_fault_path_keeps_the_mmu_notifier_retry_protocol() -> None:
    vm = shadow_vm()
    mmu = vm.mmu
    assert isinstance(mmu, ShadowMmu)
    vcpu = vm.vcpus[0]
    vm.write_guest(Gpa(0xB000 + 3 * 8), (0x3000 | 3).to_bytes(8, "little"))  # gva 0x3000 -> gfn 3
    mmu.hooks = InvalidateOnce()
    _, error_code = mmu.walk_shadow(vcpu, 0x3000, True)
    # invalidate_range_start/end ran after the pfn was read: mmu_notifier_retry says retry, nothing
    # is installed (FNAME(page_fault) out_unlock), and the guest faults again.
    assert vcpu.handle_shadow_pf(0x3000, error_code, 0) is ShadowFault.RETRY
    assert vcpu.stats.pf_retry == 1 and mmu.walk_shadow(vcpu, 0x3000, True)[0] == 0
    assert vcpu.handle_shadow_pf(0x3000, error_code, 0) is ShadowFault.FIXED
    assert mmu.walk_shadow(vcpu, 0x3000, True)[0] != 0


class WritableUc(FakeUc):
    def reg_write(self, reg: int, value: int) -> None:
        from unicorn import x86_const as x86

        name = next(n for n in dir(x86) if n.startswith("UC_X86_REG_") and getattr(x86, n) == reg)
        self.regs[name.removeprefix("UC_X86_REG_").lower()] = value


def test_the_page_table_stores_guests_use_are_decoded_for_emulation_and_others_refused() -> None:
    uc = WritableUc({"rax": 0x1234, "rbx": 0x5000, "rdi": 0x6000, "r15": 0x7008, "eax": 0x1234})
    mov = decode_store(uc, "mov", "qword ptr [r15], rax", 0)
    assert mov is not None and (mov.gva, mov.size, mov.value) == (0x7008, 8, 0x1234)
    imm = decode_store(uc, "mov", "qword ptr [rbx + 0xff8], 0x300003", 0)
    assert imm is not None and (imm.gva, imm.size, imm.value) == (0x5FF8, 8, 0x300003)
    stos = decode_store(uc, "stosq", "qword ptr [rdi], rax", 0)
    assert stos is not None and (stos.gva, stos.size, stos.value) == (0x6000, 8, 0x1234)
    stos.writeback(uc, 0)
    assert uc.regs["rdi"] == 0x6008  # stos advances rdi (DF clear)
    xchg = decode_store(uc, "xchg", "qword ptr [rbx], rax", 0)
    assert xchg is not None and xchg.gva == 0x5000
    xchg.writeback(uc, 0x99)
    assert uc.regs["rax"] == 0x99  # xchg hands back the old memory value
    # A read-modify-write or a load is not a form hvsim emulates: the VM fails with a clear error.
    assert decode_store(uc, "or", "qword ptr [rbx], 0x20", 0) is None
    assert decode_store(uc, "mov", "rax, qword ptr [rbx]", 0) is None
