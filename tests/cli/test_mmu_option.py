"""`--mmu tdp|shadow` and `--mmu-pages` on the command line."""

import json
from pathlib import Path

import pandas as pd
from click.testing import CliRunner

from hypervisor.cli import main


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_run_with_shadow_paging_counts_pf_exits_instead_of_ept_violations() -> None:
    code, out, _ = invoke("run", "hello", "--mmu", "shadow")
    assert code == 0 and "hello from hvsim vm 0" in out
    assert "kvm_exit(EXCEPTION_NMI)" in out and "EPT_VIOLATION" not in out


def test_json_reports_the_mmu_in_the_config() -> None:
    code, out, _ = invoke("run", "hello", "--mmu", "shadow", "--mmu-pages", "64", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["config"]["mmu"] == "shadow" and doc["config"]["mmu_pages"] == 64


def test_bad_mmu_options_are_clear_errors() -> None:
    code, _, err = invoke("run", "hello", "--mmu-pages", "100")
    assert code != 0 and "--mmu-pages sizes the shadow page cache: it needs --mmu shadow" in err
    code, _, err = invoke("run", "hello", "--mmu", "ept")
    assert code != 0 and "'ept' is not one of 'tdp', 'shadow'" in err


def test_compare_under_shadow_paging_labels_its_fault_exits() -> None:
    code, out, _ = invoke("compare", "hello", "--mmu", "shadow", "--kernels", "2.6.32,3.7", "-q")
    assert code == 0 and "shadow paging" in out and "EXCEPTION_NMI" in out.splitlines()[1]


def test_mmu_is_a_sweep_axis(tmp_path: Path) -> None:
    spec = tmp_path / "mmu.toml"
    spec.write_text('[run]\nimage = "hello"\n[axes]\nmmu = ["tdp", "shadow"]\n')
    code, _, err = invoke("sweep", str(spec), "-o", str(tmp_path / "out"), "-q")
    assert code == 0, err
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert list(table["mmu"]) == ["tdp", "shadow"]
    assert list(table["totals.exits.EXCEPTION_NMI"].fillna(0)) == [0, 3]


def test_oos_shadow_needs_shadow_paging() -> None:
    code, _, err = invoke("run", "hello", "--oos-shadow", "0")
    assert code != 0 and "--oos-shadow is a parameter of KVM's shadow MMU: it needs --mmu shadow" in err
    code, out, _ = invoke("run", "hello", "--mmu", "shadow", "--oos-shadow", "0", "--json")
    assert code == 0 and json.loads(out)["config"]["oos_shadow"] is False
