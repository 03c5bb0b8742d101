"""Bad input, systematically: every case gets a one-paragraph message, a documented exit code,
no traceback, and whatever was measured before the failure."""

import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypervisor.cli import main
from hypervisor.cpu.blocks import MAX_BLOCK_INSNS
from hypervisor.errors import HvsimError
from hypervisor.sim import GUEST_IMAGES, SimConfig, Simulation

HELLO = str(GUEST_IMAGES / "hello.bin")
HELLO_ELF = (GUEST_IMAGES / "hello.elf").read_bytes()


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_one_paragraph(err: str) -> None:
    assert "Traceback" not in err
    assert err.startswith("hvsim: ")
    assert "\n\n" not in err.strip()


def elf(entry: int = 0x100000, paddr: int = 0x100000, phoff: int = 64, phnum: int = 1, filesz: int = 2,
        memsz: int = 2, offset: int = 120, machine: int = 62, code: bytes = b"\xf4\xf4", phentsize: int = 56) -> bytes:
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", 2, machine, 1, entry, phoff, 0, 0, 64, phentsize, phnum, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, offset, paddr, paddr, filesz, memsz, 0x1000)
    return header + ph + code


def write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


IMAGES = [
    ("empty", b"", "is empty"),
    ("short_elf", b"\x7fELF\x02\x01", "shorter than an ELF64 header"),
    ("elf32", b"\x7fELF\x01\x01" + bytes(58), "not a little-endian ELF64"),
    ("arm_elf", elf(machine=183), "not x86-64"),
    ("phdrs_outside", elf(phoff=10_000), "program headers (1 at offset 0x2710) lie outside the file (122 bytes)"),
    ("bad_phentsize", elf(phentsize=32), "e_phentsize is 32, but an ELF64 program header is 56 bytes"),
    ("large_phentsize", elf(phentsize=64), "e_phentsize is 64, but an ELF64 program header is 56 bytes"),
    ("no_phdrs", elf(phnum=0), "no program headers"),
    ("segment_bytes_outside", elf(offset=5_000), "outside the file"),
    ("filesz_gt_memsz", elf(filesz=8, memsz=2), "larger than p_memsz"),
    ("segment_in_boot_area", elf(paddr=0x1000, entry=0x1000), "overlaps the boot area"),
    ("segment_beyond_memory", elf(paddr=0x7F00000, entry=0x7F00000), "give a larger --memory"),
    ("entry_outside", elf(entry=0x300000), "entry point 0x300000 is not inside any loaded segment"),
    ("flat_too_big", b"\x90" * (0x100000 + 1), "must end below 0x200000"),
]


@pytest.mark.parametrize(("name", "data", "why"), IMAGES, ids=[i[0] for i in IMAGES])
def test_bad_image_is_refused_with_exit_3(tmp_path: Path, name: str, data: bytes, why: str) -> None:
    code, _, err = invoke("run", write(tmp_path, name, data))
    assert code == 3, err
    assert why in err
    assert_one_paragraph(err)


def test_huge_image_is_refused_before_reading_it(tmp_path: Path) -> None:
    p = tmp_path / "huge.bin"
    with p.open("wb") as f:
        f.truncate(300 << 20)  # sparse: no disk used, but 300 MiB to stat
    code, _, err = invoke("run", str(p))
    assert code == 3 and "at most 256 MiB" in err


def test_a_directory_is_not_an_image(tmp_path: Path) -> None:
    code, _, err = invoke("run", str(tmp_path))
    assert code in (2, 3) and "Traceback" not in err


OPTIONS = [
    (["--memory", "0"], 2, "positive multiple"),
    (["--memory", "-4K"], 2, "positive multiple"),
    (["--memory", "4097"], 2, "positive multiple"),
    (["--vms", "0"], 2, "--vms 0"),
    (["--vms", "-1"], 2, "--vms -1"),
    (["--vcpus", "0"], 2, "--vcpus 0: give between 1 and 30"),
    (["--vcpus", "31"], 2, "--vcpus 31: give between 1 and 30"),
    (["--max-insns", "0"], 2, "--max-insns"),
    (["--quantum", "0"], 2, "--quantum 0: a time slice"),
    (["--insns-per-ms", "-5"], 2, "--insns-per-ms -5: give a positive"),
    (["--profile", "2.4"], 2, "2.4"),
    (["--ksm-run", "3"], 2, "3"),
    (["--ksm", "--ksm-pages-to-scan", "0"], 2, "--ksm-pages-to-scan 0"),
    (["--ksm", "--ksm-sleep-ms", "-1"], 2, "--ksm-sleep-ms -1"),
    (["--ksm", "--ksm-max-page-sharing", "1"], 2, "--ksm-max-page-sharing 1: give at least 2"),
    (["--ksm", "--ksm-run-at", "5:7"], 2, "--ksm-run-at 5:7: /sys/kernel/mm/ksm/run takes 0"),
    (["--memory", "10T"], 2, "--memory 10T is larger than the 1 GiB"),
    (["--cmdline", "x" * 5000], 2, "--cmdline is 5000 bytes"),
    (["--ksm-use-zero-pages"], 2, "without --ksm"),
    (["--ksm", "--ksm-run-at", "soon"], 2, "MS:VALUE"),
    (["--inject", "nowhere:cow"], 2, "unknown point"),
    (["--inject", "after_gfn_to_pfn:explode"], 2, "unknown event"),
    (["--inject", "ksm_before_replace_page:cow"], 2, "needs --ksm"),
    (["--vms", "200", "--memory", "1G"], 2, "host memory"),
]


@pytest.mark.parametrize(("args", "code", "why"), OPTIONS, ids=[" ".join(o[0]) for o in OPTIONS])
def test_bad_options_are_refused_with_exit_2(args: list[str], code: int, why: str) -> None:
    got, _, err = invoke("run", HELLO, *args)
    assert got == code, err
    assert why in err
    assert "Traceback" not in err


GUESTS = [
    ("triple_fault_ud2", b"\x0f\x0b", 4, "TRIPLE_FAULT: #UD"),
    ("divide_error", bytes.fromhex("31c9f7f1"), 4, "#DE divide error"),
    ("jump_unmapped", bytes.fromhex("48b80000000040000000ffe0"), 4, "#PF page not present"),
    ("outside_memslots", bytes.fromhex("488b042500000030f4"), 4, "outside every memslot"),
    ("endless_loop", b"\xeb\xfe", 5, "--max-insns"),
    ("syscall", b"\x0f\x05", 4, "#UD syscall"),
    ("noncanonical", bytes.fromhex("48b8000000000000ff7f488b00"), 4, "non-canonical"),
]


@pytest.mark.parametrize(("name", "code_bytes", "exit_code", "why"), GUESTS, ids=[g[0] for g in GUESTS])
def test_misbehaving_guests_end_with_a_report_and_their_counts(tmp_path: Path, name: str, code_bytes: bytes,
                                                               exit_code: int, why: str) -> None:
    code, out, err = invoke("run", write(tmp_path, name, code_bytes), "--max-insns", "20000", "--json")
    assert code == exit_code, err
    assert why in err
    assert_one_paragraph(err)
    doc = json.loads(out)  # the counts up to the failure are still reported
    vm = doc["vms"][0]
    assert vm["insns"] > 0 and vm["exits"]["EPT_VIOLATION"] >= 1 and why in vm["error"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(code=st.binary(min_size=1, max_size=256))
def test_fuzz_random_images_never_make_hvsim_raise(tmp_path: Path, code: bytes) -> None:
    path = write(tmp_path, "fuzz", code)
    try:
        result = Simulation(SimConfig(image=path, memory=4 << 20, max_insns=3000, quantum=1000)).run()
    except HvsimError:
        return
    vm = result.vms[0]
    assert vm.state in ("halted", "exited", "shutdown", "failed")
    # A slice ends at the first block boundary at or after its budget (cpu/_icount.c).
    assert vm.insns <= 3000 + MAX_BLOCK_INSNS


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(min_size=64, max_size=400), entry=st.integers(0, 2**64 - 1))
def test_fuzz_elf_headers_never_make_hvsim_raise(tmp_path: Path, data: bytes, entry: int) -> None:
    blob = bytearray(HELLO_ELF[:64]) + bytearray(data)
    blob[24:32] = struct.pack("<Q", entry)
    path = write(tmp_path, "fuzz.elf", bytes(blob))
    with contextlib.suppress(HvsimError):
        Simulation(SimConfig(image=path, memory=4 << 20, max_insns=3000)).run()


def wait_for_cpu_seconds(pid: int, seconds: float) -> None:
    """Wait until the process has run `seconds` of CPU time: a wall-clock sleep measures nothing on a
    busy machine (under `-n 2` the child may get a fraction of a core)."""
    ticks = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / ticks >= seconds:  # utime + stime
            return
        time.sleep(0.05)
    raise AssertionError(f"the child ran less than {seconds} s of CPU in 120 s")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_run_prints_its_report_so_far_marked_interrupted(sig: signal.Signals, code: int) -> None:
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypervisor", "run", str(GUEST_IMAGES / "samepage.bin"), "--json",
         "--cmdline", "pages=64 passes=1000000 spin=100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    wait_for_cpu_seconds(proc.pid, 2.0)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    doc = json.loads(out)
    assert doc["interrupted"] is True
    assert doc["vms"][0]["insns"] > 0 and "samepage: pass 1" in doc["vms"][0]["console"]
    assert "interrupted" in err and "Traceback" not in err


def test_ctrl_c_while_the_cli_imports_is_a_clean_exit_130(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import builtins

    from hypervisor import entry

    real_import = builtins.__import__

    def interrupted(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "cli" or name.endswith(".cli"):
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "hypervisor.cli", raising=False)
    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        entry.main()
    assert exit_info.value.code == 130
    assert "interrupted while starting" in capsys.readouterr().err
