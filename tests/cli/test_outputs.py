"""Output files are checked before the run (exit 2, one line); a write that fails during or after the run
still leaves the report printed and ends with exit 74, never 70 "internal error" (issue #9, item 8)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypervisor.cli import main
from hypervisor.errors import OutputWriteError
from hypervisor.sim import GUEST_IMAGES

HELLO = str(GUEST_IMAGES / "hello.bin")
SAMEPAGE_SHORT = ["--vms", "2", "--cmdline", "pages=4 passes=2 spin=2000"]


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def hvsim(*args: str, stdout: int | None = subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hypervisor", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=120, check=False)


def bad_paths(tmp: Path) -> list[tuple[str, str, str]]:
    afile = tmp / "afile"
    afile.write_text("")
    return [
        ("--trace", "/nonexistent/x.json", "the directory '/nonexistent' does not exist"),
        ("--trace", str(tmp), "is a directory"),
        ("--trace", str(afile / "x.txt"), "is not a directory"),
        ("--plot", str(tmp / "out.txt"), "a plot is written as one of"),
        ("--plot", str(tmp / "noext"), "a plot is written as one of"),
        ("--plot", str(tmp), "is a directory"),
        ("--plot", "/nonexistent/eras.png", "does not exist"),
        ("--trace", HELLO, f"would overwrite the input {HELLO!r}"),
        ("--trace", str(tmp / "newdir") + "/", "is a directory"),
        ("--plot", "", "needs a file name"),
    ]


@pytest.mark.parametrize("case", range(10))
@pytest.mark.parametrize("command", ["run", "compare", "ksm"])
def test_bad_output_paths_are_refused_before_the_run_in_one_line(tmp_path: Path, command: str, case: int) -> None:
    flag, path, why = bad_paths(tmp_path)[case]
    code, out, err = invoke(command, HELLO, flag, path)
    assert code == 2, err
    assert out == ""  # nothing ran
    assert err.startswith(f"hvsim: {flag} ") and why in err and err.count("\n") == 1


def test_the_same_file_for_two_outputs_is_refused(tmp_path: Path) -> None:
    same = str(tmp_path / "out.png")
    code, _, err = invoke("run", HELLO, "--trace", same, "--plot", same)
    assert code == 2 and "would overwrite --trace" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_output_is_refused_before_the_run(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    code, _, err = invoke("run", HELLO, "--trace", str(ro / "t.txt"))
    assert code == 2 and "permission denied" in err


def test_a_refused_run_creates_no_trace_file(tmp_path: Path) -> None:
    trace = tmp_path / "t.txt"
    code, _, _ = invoke("run", HELLO, "--trace", str(trace), "--memory", "1M")
    assert code == 2 and not trace.exists()


@pytest.mark.parametrize("trace", ["/dev/full", "/dev/full.json"])
def test_a_trace_on_a_full_disk_still_prints_the_report_and_exits_74(tmp_path: Path, trace: str) -> None:
    if trace.endswith(".json"):
        (tmp_path / "full.json").symlink_to("/dev/full")
        trace = str(tmp_path / "full.json")
    proc = hvsim("run", "samepage", *SAMEPAGE_SHORT, "--ksm", "--json", "--trace", trace)
    assert proc.returncode == OutputWriteError.exit_code, proc.stderr
    assert json.loads(proc.stdout)["vms"][1]["exit_status"] == 0  # the whole report
    assert f"hvsim: --trace '{trace}': No space left on device" in proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_plot_on_a_full_disk_still_prints_the_table_and_exits_74(tmp_path: Path) -> None:
    (tmp_path / "full.png").symlink_to("/dev/full")
    proc = hvsim("compare", "samepage", *SAMEPAGE_SHORT, "--plot", str(tmp_path / "full.png"))
    assert proc.returncode == OutputWriteError.exit_code, proc.stderr
    assert "attribution" in proc.stdout
    assert "cannot write the file: No space left on device" in proc.stderr and "Traceback" not in proc.stderr


def test_a_report_to_a_full_stdout_is_an_output_error_not_an_internal_one() -> None:
    with open("/dev/full", "w") as full:
        proc = hvsim("run", "hello", stdout=full.fileno())
    assert proc.returncode == OutputWriteError.exit_code
    assert proc.stderr == "hvsim: cannot write the report to standard output: No space left on device.\n"


def test_a_closed_pipe_ends_quietly() -> None:
    script = (f"{sys.executable} -m hypervisor compare samepage --vms 2 --cmdline 'pages=4 passes=2 spin=2000' "
              "| head -c 1 >/dev/null; echo ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    assert proc.stdout.strip() in ("0", "141")


def test_the_guest_failing_and_a_write_failing_keep_the_guests_exit_code(tmp_path: Path) -> None:
    loop = tmp_path / "loop.bin"
    loop.write_bytes(b"\xeb\xfe")
    proc = hvsim("run", str(loop), "--max-insns", "20000", "--trace", "/dev/full")
    assert proc.returncode == 5
    assert "No space left on device" in proc.stderr and "--max-insns" in proc.stderr


def test_build_guest_output_is_checked_like_every_output(tmp_path: Path) -> None:
    source = tmp_path / "p.c"
    source.write_text("int main(void) { return 0; }\n")
    for output, why in [("/nonexistent/p.elf", "does not exist"), (str(tmp_path), "is a directory"),
                        (str(source), "would overwrite the input")]:
        code, _, err = invoke("build-guest", str(source), "-o", output)
        assert code == 2 and err.startswith("hvsim: --output ") and why in err and err.count("\n") == 1
