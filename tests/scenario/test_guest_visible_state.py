"""Scenario tests: no host state reaches a guest (RDTSC, RDTSCP, CPUID, RDRAND, RDSEED); runs stay byte-identical.

The guests are the tiny sources in guest_src/, kept here assembled (GUEST_BYTES); a test
reassembles them with GNU as when it is installed and checks the bytes still match.
"""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc, UcError
from unicorn import x86_const as x86

from hypervisor.cli import main
from hypervisor.cpu.sensitive_insns import candidate_offsets
from hypervisor.kvm.cpuid import CPUID_TABLE, kvm_find_cpuid_entry
from hypervisor.sim import DEFAULT_INSNS_PER_MS, DEFAULT_QUANTUM
from hypervisor.vmm.layout import TSC_KHZ

from .guests import flat_guest, run

SOURCES = Path(__file__).parent / "guest_src"
GUEST_BYTES = {
    "cpuid_leaves": "31c00fa24189d84189d14189cae82e000000b8000000400fa24189d84189c94189d2e819000000b8010000000fa2"
                    "c1e91e83e101c1ea0483e201678d0451e6f466baf8034489c6e80b0000004489cee8030000004489d6bf04000000"
                    "89f084c07401eec1ee08ffcf75f2c3",
    "rdtsc_loop": "0f314189c00f314429c04189c14531d2b9400000000f314101c2ffc975f766baf803b90800000041c1c2044489d083"
                  "e00f04303c3976020427eeffc975e94489c8e6f4",
    "rdtscp_aux": "b9030100c0b80700000031d20f300f01f989c8e6f4",
    "opcode_bytes_in_immediates": "b8480fc7f0bb0f310f3148b90ff8c70f01f9310fb005e6f4",
}
TICKS_PER_INSN = TSC_KHZ // DEFAULT_INSNS_PER_MS


def guest(tmp_path: Path, name: str) -> str:
    return flat_guest(tmp_path, name, bytes.fromhex(GUEST_BYTES[name]))


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None, reason="needs GNU binutils")
@pytest.mark.parametrize("name", sorted(GUEST_BYTES))
def test_test_guests_are_their_sources_assembled(name: str, tmp_path: Path) -> None:
    obj, flat = tmp_path / f"{name}.o", tmp_path / f"{name}.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(SOURCES / f"{name}.S")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(flat)], check=True)
    assert flat.read_bytes().hex() == GUEST_BYTES[name]


def test_unicorn_gives_no_instruction_hook_for_rdtsc_rdtscp_or_rdrand() -> None:
    # Why hvsim scans code pages for these instructions (cpu/sensitive_insns.py).
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    for insn in (x86.UC_X86_INS_RDTSC, x86.UC_X86_INS_RDTSCP, x86.UC_X86_INS_RDRAND):
        with pytest.raises(UcError):
            uc.hook_add(UC_HOOK_INSN, lambda *_: None, None, 1, 0, insn)


def test_rdtsc_counts_simulated_time_from_zero_at_the_documented_rate(tmp_path: Path) -> None:
    vm = run(guest(tmp_path, "rdtsc_loop")).vms[0]
    # Two back-to-back readings are 2 instructions apart (the first RDTSC and a mov).
    assert vm.exit_status == 2 * TICKS_PER_INSN
    # Reading k of the loop is taken after 7 + 4k instructions (the TSC starts at 0).
    expected = sum((7 + 4 * k) * TICKS_PER_INSN for k in range(64)) & 0xFFFF_FFFF
    assert vm.console == f"{expected:08x}"
    # RDTSC does not exit with KVM's default VMX controls: only the port writes and faults do.
    assert set(vm.exits) == {"IO_INSTRUCTION", "EPT_VIOLATION"}


def test_rdtsc_rate_follows_insns_per_ms(tmp_path: Path) -> None:
    vm = run(guest(tmp_path, "rdtsc_loop"), insns_per_ms=TSC_KHZ).vms[0]
    assert vm.exit_status == 2  # one tick per instruction


def test_rdtsc_guests_are_byte_identical_across_runs_quanta_and_vms(tmp_path: Path) -> None:
    img = guest(tmp_path, "rdtsc_loop")
    docs = [run(img, quantum=q, vms=2).as_dict() for q in (1, 3, 7, DEFAULT_QUANTUM, DEFAULT_QUANTUM)]
    for doc in docs:
        doc["config"].pop("quantum")
    assert all(doc == docs[0] for doc in docs)
    # Each vCPU's TSC counts its own time: both VMs print the same readings.
    assert docs[0]["vms"][0]["console"] == docs[0]["vms"][1]["console"]


def test_rdtscp_returns_the_time_and_tsc_aux(tmp_path: Path) -> None:
    vm = run(guest(tmp_path, "rdtscp_aux")).vms[0]
    assert vm.exit_status == 7  # ECX = IA32_TSC_AUX as the guest wrote it


def test_compare_sees_the_same_console_in_every_era_for_an_rdtsc_guest(tmp_path: Path) -> None:
    # Issue #9 item 4: host time made `compare` report a console mismatch "bug in hvsim".
    result = CliRunner().invoke(main, ["compare", guest(tmp_path, "rdtsc_loop"), "--vms", "2"])
    assert result.exit_code == 0, result.stderr
    assert "every run printed the same console output" in result.stdout


def test_cpuid_answers_from_the_fixed_table(tmp_path: Path) -> None:
    vm = run(guest(tmp_path, "cpuid_leaves")).vms[0]
    assert vm.console == "GenuineIntel" + "KVMKVMKVM"
    assert vm.exit_status == 2  # RDRAND not offered, TSC offered
    assert vm.exits["CPUID"] == 3


def test_cpuid_lookup_falls_back_to_the_highest_leaf_of_the_same_class_as_2_6_32() -> None:
    assert kvm_find_cpuid_entry(0) == CPUID_TABLE[0]
    basic = max(f for f in CPUID_TABLE if f < 0x80000000)
    extended = max(f for f in CPUID_TABLE if f >= 0x80000000)
    assert kvm_find_cpuid_entry(7) == CPUID_TABLE[basic]
    assert kvm_find_cpuid_entry(0x8000_0020) == CPUID_TABLE[extended]
    assert kvm_find_cpuid_entry(0x4000_0000)[0] == 0x4000_0001  # the KVM signature leaf stays
    assert not CPUID_TABLE[1][2] & (1 << 30)  # no RDRAND


@pytest.mark.parametrize(("code", "mnemonic"), [("900f31480fc7f0e6f4", "rdrand rax"), ("900fc7f8e6f4", "rdseed eax")])
def test_rdrand_and_rdseed_raise_undefined_opcode(code: str, mnemonic: str, tmp_path: Path) -> None:
    vm = run(flat_guest(tmp_path, "rng", bytes.fromhex(code))).vms[0]
    assert vm.state == "shutdown" and vm.error is not None and "#UD" in vm.error
    assert vm.where is not None and mnemonic in vm.where  # RIP stays on the instruction


def test_opcode_bytes_inside_other_instructions_are_left_alone(tmp_path: Path) -> None:
    vm = run(guest(tmp_path, "opcode_bytes_in_immediates")).vms[0]
    assert (vm.state, vm.exit_status, vm.insns) == ("exited", 5, 5)


def test_candidate_offsets_find_each_opcode_and_one_cut_by_the_page_end() -> None:
    page = np.zeros(4096, dtype=np.uint8)
    page[10:12] = (0x0F, 0x31)  # rdtsc
    page[20:23] = (0x0F, 0x01, 0xF9)  # rdtscp
    page[30:33] = (0x0F, 0x01, 0xD0)  # xgetbv: not a candidate
    page[40:43] = (0x0F, 0xC7, 0xF0)  # rdrand eax
    page[50:53] = (0x0F, 0xC7, 0x0E)  # cmpxchg8b [rsi]: not a candidate
    page[4095] = 0x0F  # the rest is on the next page
    assert candidate_offsets(page) == [10, 20, 40, 4095]
