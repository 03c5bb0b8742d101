"""The views users know: trace-cmd-style text traces (golden files), Chrome trace JSON for Perfetto,
perf-kvm-stat, /sys/kernel/mm/ksm, plots, progress and discoverability."""

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypervisor.cli import main
from hypervisor.sim import GUEST_IMAGES

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
SAMEPAGE = str(GUEST_IMAGES / "samepage.bin")


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("HVSIM_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with HVSIM_UPDATE_GOLDEN=1 if that is intended"


def test_text_trace_of_hello_matches_the_golden_file(tmp_path: Path) -> None:
    out = tmp_path / "hello.trace"
    code, _, err = invoke("run", str(GUEST_IMAGES / "hello.bin"), "--trace", str(out))
    assert code == 0, err
    check_golden("hello.trace", out.read_text())


@pytest.mark.parametrize("profile", ["2.6.32", "3.7", "6.10"])
def test_text_trace_of_a_ksm_merge_matches_the_golden_file(tmp_path: Path, profile: str) -> None:
    out = tmp_path / "merge.trace"
    code, _, err = invoke("run", SAMEPAGE, "--vms", "2", "--cmdline", "pages=2 passes=2 spin=20000", "--ksm",
                          "--ksm-sleep-ms", "0", "--ksm-pages-to-scan", "1000", "--profile", profile,
                          "--trace", str(out), "--trace-events", "ksm_*,mmu_notifier_*,kvm_set_spte_hva,cow_ksm")
    assert code == 0, err
    check_golden(f"merge-{profile}.trace", out.read_text())


def test_trace_lines_name_the_instruction_at_rip(tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    invoke("run", str(GUEST_IMAGES / "hello.bin"), "--trace", str(out), "--trace-events", "kvm_exit")
    first = out.read_text().splitlines()[0]
    assert "kvm_exit: vcpu 0 reason EPT_VIOLATION rip 0x100000 info1 0x0000000000000001" in first
    assert 'insn "mov r15, rsi"' in first


def test_json_trace_is_chrome_trace_event_format_with_vcpu_and_ksmd_tracks(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    code, _, err = invoke("compare", SAMEPAGE, "--vms", "2", "--cmdline", "pages=8 passes=6 spin=40000",
                          "--ksm-sleep-ms", "1", "--trace", str(out))
    assert code == 0, err
    doc = json.loads(out.read_text())
    events = doc["traceEvents"]
    assert events
    for e in events:
        assert {"ph", "pid", "name"} <= e.keys()
        assert e["ph"] == "M" or ("ts" in e and isinstance(e["ts"], (int, float)))
        assert e["ph"] == "C" or e["ph"] == "M" or "tid" in e
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert {"2.6.32: vm0", "2.6.32: vm1", "2.6.32: ksmd", "6.10: ksmd"} <= names
    phases = {e["ph"] for e in events}
    assert {"M", "i", "B", "E", "C"} <= phases
    exits = [e for e in events if e["name"] == "kvm_exit"]
    assert exits and all("insn" in e["args"] for e in exits)


def test_perf_kvm_stat_view_has_perfs_columns() -> None:
    code, out, _ = invoke("run", SAMEPAGE, "--vms", "2", "--ksm", "--ksm-sleep-ms", "0", "--no-change-pte",
                          "--cmdline", "pages=8 passes=6 spin=20000", "--perf-kvm-stat")
    assert code == 0
    assert "Analyze events for all VMs, all VCPUs:" in out
    assert "VM-EXIT    Samples  Samples%     Time%    Min Time    Max Time         Avg time" in out
    assert "EPT_VIOLATION" in out and "Total Samples:" in out


def test_exit_cost_overrides_change_the_times() -> None:
    args = ["run", str(GUEST_IMAGES / "hello.bin"), "--perf-kvm-stat"]
    _, default, _ = invoke(*args)
    _, cheap, _ = invoke(*args, "--exit-cost", "userspace=0", "--exit-cost", "exit=2000")
    assert "6.60us" in default and "1.00us" in cheap
    code, _, err = invoke(*args, "--exit-cost", "exit=lots")
    assert code == 2 and "NAME=CYCLES" in err


def test_plot_writes_a_real_png(tmp_path: Path) -> None:
    png = tmp_path / "eras.png"
    code, _, err = invoke("compare", SAMEPAGE, "--vms", "2", "--cmdline", "pages=8 passes=6 spin=40000",
                          "--ksm-sleep-ms", "1", "--plot", str(png))
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < len(data) < 2_000_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 800 and height >= 600


def test_progress_is_silent_when_stderr_is_not_a_terminal() -> None:
    code, _, err = invoke("run", SAMEPAGE, "--cmdline", "pages=8 passes=3 spin=20000")
    assert code == 0 and err == ""


def test_images_lists_every_bundled_guest_with_its_parameters() -> None:
    code, out, _ = invoke("images")
    assert code == 0
    for name in ("hello", "memtouch", "samepage", "cowstorm", "kernels"):
        assert any(line.startswith(name) for line in out.splitlines())
    assert "pages=256 passes=3" in out and "write_at=30" in out


@pytest.mark.parametrize("command", ["run", "compare", "ksm", "images"])
def test_help_shows_an_example(command: str) -> None:
    code, out, _ = invoke(command, "--help")
    assert code == 0 and "Example" in out


def test_history_runs_every_release_where_a_modelled_behaviour_changes_and_plots_it(tmp_path: Path) -> None:
    from hypervisor.history import history_kernels

    png = tmp_path / "history.png"
    code, out, err = invoke("history", SAMEPAGE, "--vms", "2", "--cmdline", "pages=8 passes=6 spin=40000",
                            "--ksm-sleep-ms", "1", "--plot", str(png))
    assert code == 0, err
    kernels = history_kernels()
    assert kernels[0] == "2.6.32" and kernels[-1] == "6.12" and {"2.6.38", "3.7", "4.13", "6.10"} <= set(kernels)
    rows = [line.split()[0] for line in out.splitlines()[3:]]
    assert rows == kernels
    assert "612819c3c6e6" in out and "6bdb913f0a70" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
