"""CLI tests: --console streams the whole console to a file, the report keeps a bounded one;
--exit-with-guest-status makes hvsim exit with the guest's status."""

import json
from pathlib import Path

from click.testing import CliRunner

from hypervisor.cli import main
from hypervisor.sim import GUEST_IMAGES
from hypervisor.vmm.console import HEAD_BYTES, TAIL_BYTES

HELLO = str(GUEST_IMAGES / "hello.bin")
# mov ecx,10000; mov dx,0x3f8; 1: mov al,'a'; 2: out dx,al; inc al; cmp al,'z'+1; jne 2b;
# mov al,'\n'; out dx,al; dec ecx; jnz 1b; mov al,9; out 0xf4,al  (270,000 console bytes, status 9)
SPAM = "b91027000066baf803b061eefec03c7b75f9b00aeeffc975f0b009e6f4"
SPAM_TEXT = b"abcdefghijklmnopqrstuvwxyz\n" * 10_000


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def spam(tmp_path: Path) -> str:
    img = tmp_path / "spam.bin"
    img.write_bytes(bytes.fromhex(SPAM))
    return str(img)


def test_console_file_gets_everything_and_the_report_a_bounded_console(tmp_path: Path) -> None:
    out = tmp_path / "console.txt"
    code, stdout, err = invoke("run", spam(tmp_path), "--console", str(out), "--json")
    assert code == 0, err
    assert out.read_bytes() == SPAM_TEXT
    vm = json.loads(stdout)["vms"][0]
    dropped = len(SPAM_TEXT) - HEAD_BYTES - TAIL_BYTES
    assert vm["console_dropped"] == dropped
    head, _, rest = vm["console"].partition(f"\n[hvsim: {dropped} bytes of console output dropped here]\n")
    assert head.encode() == SPAM_TEXT[:HEAD_BYTES] and rest.encode() == SPAM_TEXT[-TAIL_BYTES:]


def test_console_files_one_per_vm(tmp_path: Path) -> None:
    out = tmp_path / "c"
    code, _, err = invoke("run", HELLO, "--vms", "2", "--console", str(out))
    assert code == 0, err
    assert [(tmp_path / f"c.vm{i}").read_text() for i in range(2)] == [f"hello from hvsim vm {i}\n" for i in range(2)]


def test_console_path_is_checked_before_the_run(tmp_path: Path) -> None:
    code, out, err = invoke("run", HELLO, "--console", str(tmp_path / "no" / "such" / "dir"))
    assert code == 2 and "--console" in err and out == ""
    code, out, err = invoke("run", HELLO, "--console", str(tmp_path))
    assert code == 2 and "--console" in err


def test_console_write_error_mid_run_still_prints_the_report(tmp_path: Path) -> None:
    code, out, err = invoke("run", spam(tmp_path), "--console", "/dev/full")
    assert code == 74 and "No space left" in err
    assert "exited (port 0xf4) with status 9" in out


def test_exit_with_guest_status_returns_the_exit_port_status(tmp_path: Path) -> None:
    assert invoke("run", spam(tmp_path))[0] == 0  # by default hvsim's own exit codes
    assert invoke("run", spam(tmp_path), "--exit-with-guest-status")[0] == 9
    assert invoke("run", HELLO, "--exit-with-guest-status")[0] == 0  # HLT: status 0


def test_exit_with_guest_status_takes_the_first_nonzero_vm_and_leaves_errors_alone(tmp_path: Path) -> None:
    code, _, _ = invoke("run", spam(tmp_path), "--vms", "2", "--exit-with-guest-status")
    assert code == 9
    code, _, _ = invoke("run", spam(tmp_path), "--exit-with-guest-status", "--max-insns", "1000")
    assert code == 5  # the guest never reached its exit port: hvsim's --max-insns code stands
