"""Issue #9 item 9: the bundled guests' defaults and the --help examples show the phenomenon they
are there for, and a run that ends before ksmd completed a full scan says so."""

import json

import pytest
from click.testing import CliRunner

from hypervisor.cli import main

SAMEPAGE = "samepage"  # by name, as the --help examples write it
COWSTORM = "cowstorm"
KERNELS = "kernels"
TOO_SHORT = "passes=2 spin=1000"  # over long before ksmd's first wake-up (20 simulated ms)


def invoke_json(*args: str) -> dict[str, object]:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    doc: dict[str, object] = json.loads(result.stdout)
    return doc


def test_compare_samepage_in_four_vms_with_default_parameters_shows_the_eras_apart() -> None:
    """`hvsim compare samepage --vms 4` (the --help example): every KSM run merges, and the
    eras differ in exits (2.6.32's change_pte saves them, later eras pay one per merged page)."""
    doc = invoke_json("compare", SAMEPAGE, "--vms", "4")
    runs = [r for r in doc["runs"] if r["ksm"]]  # type: ignore[attr-defined]
    assert all(r["report"]["ksmd_completed_full_scan"] for r in runs)
    assert all(r["report"]["ksm"]["full_scans"] >= 2 for r in runs)
    assert all(r["pages_sharing"] > 0 for r in runs)
    # general_profit is a 6.4+ file: only the 6.10 row has it.
    assert all(r["report"]["ksm"].get("general_profit", 1) > 0 for r in runs)
    assert "general_profit" in runs[-1]["report"]["ksm"] and "general_profit" not in runs[0]["report"]["ksm"]
    assert len({r["EPT_VIOLATION"] for r in runs}) > 1, "every era row is identical"


def test_run_samepage_in_four_vms_under_2_6_32_with_default_parameters_merges_at_a_profit() -> None:
    """`hvsim run samepage --vms 4 --ksm --profile 2.6.32` (the --help example)."""
    doc = invoke_json("run", SAMEPAGE, "--vms", "4", "--ksm", "--profile", "2.6.32")
    ksm = doc["ksm"]
    assert isinstance(ksm, dict) and ksm["pages_sharing"] > 0
    assert "general_profit" not in ksm  # 2.6.32 had no such file (6.4+)
    assert doc["ksmd_completed_full_scan"] is True


def test_cowstorm_with_default_parameters_breaks_pages_ksm_had_merged() -> None:
    doc = invoke_json("run", COWSTORM, "--ksm")
    vmstat = doc["vmstat"]
    assert isinstance(vmstat, dict) and vmstat["cow_ksm"] == 64  # every page was merged, then written


def test_kernels_with_default_parameters_merge_the_kernel_pages_across_two_vms() -> None:
    doc = invoke_json("run", KERNELS, "--vms", "2", "--ksm", "--kernel", "6.4")  # general_profit: 6.4+
    ksm = doc["ksm"]
    assert isinstance(ksm, dict) and ksm["pages_sharing"] >= 256 and ksm["general_profit"] > 0


def test_images_lists_the_new_defaults() -> None:
    out = CliRunner().invoke(main, ["images"]).stdout
    assert "pages=64 pattern=0x5a passes=40 spin=100000" in out
    assert "kernel=256 private=16 passes=20 spin=400000" in out


# --- a run too short for ksmd says so -------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "ksm"])
def test_a_run_that_ends_before_ksmd_completes_a_full_scan_says_so(command: str) -> None:
    args = [command, SAMEPAGE, "--cmdline", TOO_SHORT] + (["--ksm"] if command == "run" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.stderr
    assert "note: ksmd did not complete a full scan" in result.stdout
    assert "--ksm-sleep-ms" in result.stdout
    assert invoke_json(*args)["ksmd_completed_full_scan"] is False


def test_compare_names_the_runs_in_which_ksmd_completed_no_full_scan() -> None:
    result = CliRunner().invoke(main, ["compare", SAMEPAGE, "--cmdline", TOO_SHORT])
    assert result.exit_code == 0, result.stderr
    assert "note: ksmd did not complete a full scan in 2.6.32" in result.stdout
    doc = invoke_json("compare", SAMEPAGE, "--cmdline", TOO_SHORT)
    assert all(r["report"]["ksmd_completed_full_scan"] is False for r in doc["runs"] if r["ksm"])  # type: ignore[attr-defined]


def test_a_run_in_which_ksmd_completed_its_scans_has_no_note_and_ksm_off_has_no_field() -> None:
    args = ["run", SAMEPAGE, "--ksm", "--cmdline", "pages=4 passes=3 spin=2000", "--ksm-sleep-ms", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "note:" not in result.stdout
    assert "ksmd_completed_full_scan" not in invoke_json("run", SAMEPAGE, "--cmdline", TOO_SHORT)
