"""CLI tests: what a user types, what they see, and the exit codes of bad input."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hypervisor.cli import main
from hypervisor.sim import GUEST_IMAGES

HELLO = str(GUEST_IMAGES / "hello.bin")
MEMTOUCH = str(GUEST_IMAGES / "memtouch.bin")
SAMEPAGE = str(GUEST_IMAGES / "samepage.bin")


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_run_hello_prints_console_and_a_kvm_stat_table() -> None:
    code, out, err = invoke("run", HELLO)
    assert code == 0, err
    assert "hello from hvsim vm 0" in out
    assert "kvm_exit(EPT_VIOLATION)" in out and "kvm_exit(HLT)" in out
    assert "Traceback" not in out + err


def test_run_json_has_the_documented_keys() -> None:
    code, out, _ = invoke("run", MEMTOUCH, "--memory", "64M", "--cmdline", "pages=64 passes=2", "--json", "--vms", "2")
    assert code == 0
    doc = json.loads(out)
    assert {"hvsim_version", "config", "vms", "totals"} <= doc.keys()
    vm = doc["vms"][0]
    assert {"id", "image", "exit_status", "console", "insns", "exits", "stats", "notifier_calls"} <= vm.keys()
    assert {"exits", "pf_fixed", "remote_tlb_flush", "mmu_shadow_zapped"} <= vm["stats"].keys()
    assert set(vm["notifier_calls"]) == {"change_pte", "invalidate_page", "invalidate_range_start",
                                         "invalidate_range_end", "clear_flush_young", "release"}
    assert doc["totals"]["exits"]["EPT_VIOLATION"] == 2 * vm["exits"]["EPT_VIOLATION"]
    assert doc["config"]["memory"] == 64 << 20 and doc["config"]["vms"] == 2


def test_run_ksm_adds_the_ksm_counters() -> None:
    code, out, _ = invoke("run", SAMEPAGE, "--vms", "2", "--ksm", "--ksm-sleep-ms", "0", "--cmdline",
                          "pages=8 passes=4 spin=20000", "--json", "--kernel", "6.4")
    assert code == 0
    doc = json.loads(out)
    assert doc["ksm"]["pages_sharing"] > 0 and "general_profit" in doc["ksm"]
    code, out, _ = invoke("run", SAMEPAGE, "--vms", "2", "--ksm", "--cmdline", "pages=8 passes=4 spin=20000")
    assert "/sys/kernel/mm/ksm/" in out and "pages_sharing" in out


def test_run_without_an_image_runs_the_change_pte_demo() -> None:
    code, out, err = invoke("run")
    assert code == 0, err
    assert "2.6.38 no change_pte" in out and "attribution" in out and "6.10" in out


def test_compare_json_has_runs_and_the_attribution() -> None:
    code, out, _ = invoke("compare", SAMEPAGE, "--vms", "2", "--cmdline", "pages=16 passes=10 spin=40000",
                          "--ksm-sleep-ms", "2", "--json")
    assert code == 0
    doc = json.loads(out)
    assert [r["label"] for r in doc["runs"]] == ["ksm off", "2.6.32", "2.6.32 no change_pte", "2.6.38",
                                                  "2.6.38 no change_pte", "3.7", "6.10"]
    saved = {a["what"]: a for a in doc["attribution"]}
    assert saved["change_pte in 2.6.32"]["exits_saved"] > 0
    assert saved["read-intent pinning (2.6.38)"]["before"] == "2.6.32 no change_pte"
    assert saved["read-intent pinning (2.6.38)"]["after"] == "2.6.38 no change_pte"


def test_compare_kernels_chooses_the_rows() -> None:
    code, out, err = invoke("compare", SAMEPAGE, "--vms", "2", "--cmdline", "pages=8 passes=4 spin=20000",
                            "--kernels", "3.6,3.6-no-change-pte,4.19", "--json")
    assert code == 0, err
    assert [r["label"] for r in json.loads(out)["runs"]] == ["ksm off", "3.6", "3.6 no change_pte", "4.19"]


@pytest.mark.parametrize(("args", "message"), [
    (("--kernels", "6.10-no-change-pte"), "Linux 6.10 has no change_pte to turn off"),
    (("--kernels", "3.8,9.9"), "unknown kernel version '9.9'"),
])
def test_compare_kernels_rejects_a_kernel_it_cannot_run(args: tuple[str, ...], message: str) -> None:
    code, _, err = invoke("compare", SAMEPAGE, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_run_kernel_picks_any_release_and_profile_stays_its_alias() -> None:
    code, out, err = invoke("run", SAMEPAGE, "--kernel", "4.19", "--cmdline", "pages=2 passes=1 spin=100")
    assert code == 0, err
    assert "profile 4.19" in out
    code, out, _ = invoke("run", SAMEPAGE, "--profile", "3.7", "--cmdline", "pages=2 passes=1 spin=100", "--json")
    assert code == 0 and json.loads(out)["profile"]["name"] == "3.7"
    code, _, err = invoke("run", SAMEPAGE, "--kernel", "4.19", "--profile", "3.7")
    assert code == 2 and "disagree" in err


def test_a_ksm_knob_the_kernel_lacked_is_refused_naming_the_release() -> None:
    code, _, err = invoke("ksm", SAMEPAGE, "--kernel", "4.12", "--ksm-max-page-sharing", "128")
    assert code == 2 and "appeared in 4.13" in err and "Traceback" not in err
    code, _, err = invoke("ksm", SAMEPAGE, "--kernel", "6.6", "--ksm-smart-scan")
    assert code == 2 and "appeared in 6.7" in err


def test_kernels_prints_the_table_of_changes() -> None:
    code, out, _ = invoke("kernels")
    assert code == 0
    assert "2.6.38" in out and "kvm_gup_always_write = False" in out and "6bdb913f0a70" in out
    code, out, _ = invoke("kernels", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["baseline"]["kvm_gup_always_write"] is True
    row = next(c for c in doc["changes"] if c["field"] == "change_pte_falls_back_to_invalidate_page")
    assert {"version": "3.7", "commit": "6bdb913f0a70"}.items() <= row.items()


def test_ksm_command_shows_sysfs_files() -> None:
    code, out, _ = invoke("ksm", SAMEPAGE, "--cmdline", "pages=10 passes=6 spin=20000", "--ksm-sleep-ms", "0",
                          "--ksm-pages-to-scan", "100000")
    assert code == 0
    assert "pages_shared         1" in out and "pages_sharing        9" in out


@pytest.mark.parametrize("command", ["run", "compare", "ksm", "kernels"])
def test_every_command_help_has_an_example(command: str) -> None:
    code, out, _ = invoke(command, "--help")
    assert code == 0 and "Example" in out


def test_missing_image_is_a_clear_error() -> None:
    code, _, err = invoke("run", "/nonexistent/guest.bin")
    assert code == 3 and "cannot read guest image" in err and "Traceback" not in err


def test_empty_image_is_a_clear_error(tmp_path: Path) -> None:
    img = tmp_path / "empty.bin"
    img.write_bytes(b"")
    code, _, err = invoke("run", str(img))
    assert code == 3 and "is empty" in err


@pytest.mark.parametrize(("memory", "why"), [("0", "positive multiple"), ("12345", "positive multiple"),
                                             ("1M", "too small"), ("lots", "not a size"), ("2G", "1 GiB")])
def test_bad_memory_size_is_refused_before_running(memory: str, why: str) -> None:
    code, _, err = invoke("run", HELLO, "--memory", memory)
    assert code == 2 and why in err


def test_zero_vms_is_refused() -> None:
    code, _, err = invoke("run", HELLO, "--vms", "0")
    assert code == 2 and "--vms 0" in err


def test_ksm_knobs_without_ksm_are_refused() -> None:
    code, _, err = invoke("run", HELLO, "--ksm-use-zero-pages")
    assert code == 2 and "--ksm" in err


def test_memory_beyond_the_host_is_refused_before_allocating() -> None:
    code, _, err = invoke("run", HELLO, "--vms", "256", "--memory", "1G")
    assert code == 2 and "host memory" in err


def test_runaway_guest_reports_counts_and_exits_5(tmp_path: Path) -> None:
    img = tmp_path / "loop.bin"
    img.write_bytes(b"\xeb\xfe")
    code, out, err = invoke("run", str(img), "--max-insns", "100000", "--json")
    assert code == 5 and "--max-insns" in err
    assert json.loads(out)["vms"][0]["insns"] == 100000


def test_triple_fault_names_rip_and_the_instruction(tmp_path: Path) -> None:
    img = tmp_path / "ud2.bin"
    img.write_bytes(b"\x90\x0f\x0b")
    code, out, err = invoke("run", str(img))
    assert code == 4 and "TRIPLE_FAULT" in err
    assert "RIP 0x100001: ud2" in out


def test_livelocked_fault_exits_10_with_the_report_printed() -> None:
    code, out, err = invoke("run", HELLO, "--inject", "after_gfn_to_pfn:invalidate_range@all")
    assert code == 10
    assert "livelock" in err and "retried 1000 times" in err
    assert "kvm_exit(EPT_VIOLATION)" in out and "pf_retry 1000" in out
