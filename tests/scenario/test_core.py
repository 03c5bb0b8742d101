"""Scenario tests of the core: real guests boot in Unicorn on the simulated TDP MMU and take real exits."""

import struct
from pathlib import Path

import pytest

from hypervisor.sim import SimConfig, Simulation

from .guests import flat_guest, image, memtouch_checksum, run

# The pages every bundled guest touches besides its data: its code page, the three
# boot page-table pages its TLB misses walk (PML4, PDPT, PD), the boot-parameters
# page and its stack page.
FIXED_PAGES = 6


def test_hello_prints_its_line_and_halts_with_status_zero() -> None:
    result = run(image("hello.bin"))
    vm = result.vms[0]
    assert vm.console == "hello from hvsim vm 0\n"
    assert vm.state == "halted" and vm.exit_status == 0
    assert vm.exits["HLT"] == 1
    # One IO_INSTRUCTION exit per console byte.
    assert vm.exits["IO_INSTRUCTION"] == len(vm.console)
    assert vm.exits["EPT_VIOLATION"] == FIXED_PAGES
    assert vm.stats["pf_fixed"] == FIXED_PAGES


def test_each_vm_gets_its_own_index_and_its_own_exits() -> None:
    result = run(image("hello.bin"), vms=3)
    assert [v.console for v in result.vms] == [f"hello from hvsim vm {i}\n" for i in range(3)]
    assert all(v.exits == result.vms[0].exits for v in result.vms)
    assert result.totals()["exits"]["HLT"] == 3


def test_elf_image_loads_at_its_program_headers() -> None:
    result = run(image("hello.elf"))
    assert result.vms[0].console == "hello from hvsim vm 0\n"


@pytest.mark.parametrize("profile", ["2.6.32", "3.7", "6.10"])
def test_memtouch_first_pass_faults_once_per_page_and_later_passes_never(profile: str) -> None:
    pages = 512
    one = run(image("memtouch.bin"), cmdline=f"pages={pages} passes=1", profile=profile).vms[0]
    three = run(image("memtouch.bin"), cmdline=f"pages={pages} passes=3", profile=profile).vms[0]
    # The write pass faults each data page once (a write fault on an untouched page:
    # GUP allocates the frame, no notifier fires, the fault is fixed first time).
    assert one.exits["EPT_VIOLATION"] == pages + FIXED_PAGES
    # Read passes find every spte present and writable: no exits at all.
    assert three.exits["EPT_VIOLATION"] == one.exits["EPT_VIOLATION"]
    assert three.stats["pf_retry"] == 0
    expected = memtouch_checksum(pages, 3)
    assert three.console.splitlines()[-1] == f"memtouch: done pages={pages} passes=3 checksum {expected:016x}"
    assert three.exit_status == 0 and three.state == "exited"


def test_memtouch_checksum_is_right_for_4096_pages() -> None:
    vm = run(image("memtouch.bin"), cmdline="pages=4096 passes=3").vms[0]
    assert vm.console.splitlines()[-1].endswith(f"checksum {memtouch_checksum(4096, 3):016x}")
    assert vm.exits["EPT_VIOLATION"] == 4096 + FIXED_PAGES


def test_memtouch_reports_too_little_memory_with_status_2() -> None:
    vm = run(image("memtouch.bin"), memory=4 << 20, cmdline="pages=4096").vms[0]
    assert vm.console == "memtouch: not enough memory\n"
    assert vm.exit_status == 2


def test_same_command_gives_the_same_counts_every_time() -> None:
    a = run(image("memtouch.bin"), cmdline="pages=300 passes=2", vms=2)
    b = run(image("memtouch.bin"), cmdline="pages=300 passes=2", vms=2)
    assert a.as_dict() == b.as_dict()


def test_instructions_retired_do_not_depend_on_the_time_slice() -> None:
    a = run(image("memtouch.bin"), cmdline="pages=64 passes=2", quantum=10_000)
    b = run(image("memtouch.bin"), cmdline="pages=64 passes=2", quantum=777)
    assert a.vms[0].insns == b.vms[0].insns
    assert a.vms[0].console == b.vms[0].console


def test_cpuid_of_the_hypervisor_leaf_exits_and_answers_kvm(tmp_path: Path) -> None:
    # mov eax, 0x40000000; cpuid; mov [0x200000], ebx; hlt
    code = bytes.fromhex("b800000040") + b"\x0f\xa2" + bytes.fromhex("891c2500002000") + b"\xf4"
    sim = Simulation(SimConfig(image=flat_guest(tmp_path, "cpuid", code)))
    vm = sim.run().vms[0]
    assert vm.exits["CPUID"] == 1
    assert sim.vms[0].read_guest(0x200000, 4) == b"KVMK"  # type: ignore[arg-type]


def test_vmcall_exits_as_a_hypercall_and_returns_enosys(tmp_path: Path) -> None:
    # vmcall; mov [0x200000], rax; hlt
    code = b"\x0f\x01\xc1" + bytes.fromhex("48890425 00002000".replace(" ", "")) + b"\xf4"
    sim = Simulation(SimConfig(image=flat_guest(tmp_path, "vmcall", code)))
    vm = sim.run().vms[0]
    assert vm.exits["VMCALL"] == 1 and vm.stats["hypercalls"] == 1
    assert struct.unpack("<q", sim.vms[0].read_guest(0x200000, 8))[0] == -1000  # type: ignore[arg-type]
    assert vm.state == "halted"


def test_in_from_the_uart_status_port_reads_transmitter_empty(tmp_path: Path) -> None:
    # mov dx, 0x3fd; in al, dx; mov [0x200000], al; hlt
    code = bytes.fromhex("66bafd03") + b"\xec" + bytes.fromhex("88042500002000") + b"\xf4"
    sim = Simulation(SimConfig(image=flat_guest(tmp_path, "in", code)))
    vm = sim.run().vms[0]
    assert vm.exits["IO_INSTRUCTION"] == 1
    assert sim.vms[0].read_guest(0x200000, 1) == b"\x60"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "code", "why"),
    [
        ("ud2", b"\x0f\x0b", "#UD"),
        ("divide", bytes.fromhex("31c9f7f1"), "#DE divide error"),
        ("wild_jump", bytes.fromhex("48b80000000040000000ffe0"), "#PF page not present"),
    ],
)
def test_a_guest_fault_with_no_idt_is_a_triple_fault(tmp_path: Path, name: str, code: bytes, why: str) -> None:
    vm = run(flat_guest(tmp_path, name, code)).vms[0]
    assert vm.state == "shutdown"
    assert vm.exits["TRIPLE_FAULT"] == 1
    assert vm.error is not None and why in vm.error
    assert vm.where is not None and "RIP" in vm.where


def test_access_outside_every_memslot_stops_the_vm_with_the_gpa(tmp_path: Path) -> None:
    # mov rax, [0x30000000]; hlt   (768 MiB: identity-mapped by the guest, but RAM is 64 MiB)
    code = bytes.fromhex("488b042500000030") + b"\xf4"
    vm = run(flat_guest(tmp_path, "mmio", code)).vms[0]
    assert vm.state == "failed"
    assert vm.error is not None and "0x30000000" in vm.error and "outside every memslot" in vm.error


def test_a_runaway_guest_stops_at_max_insns_with_its_counts(tmp_path: Path) -> None:
    vm = run(flat_guest(tmp_path, "loop", b"\xeb\xfe"), max_insns=50_000, quantum=7_000).vms[0]
    assert vm.state == "failed" and vm.error is not None and "--max-insns" in vm.error
    assert vm.insns == 50_000
    assert vm.exits["EPT_VIOLATION"] >= 1
