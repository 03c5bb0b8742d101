"""`hvsim diff`: every figure of two run reports with its difference, exits first; --fail-on-diff for CI."""

import json
from pathlib import Path

from hypervisor.diff import diff_reports
from hypervisor.figures import figures
from hypervisor.sim import GUEST_IMAGES

from .support import invoke

RUN = ["run", str(GUEST_IMAGES / "samepage.bin"), "--vms", "2", "--memory", "4M", "--ksm", "--ksm-sleep-ms", "0",
       "--cmdline", "pages=8 passes=4 spin=20000", "--json", "-q"]


def report(tmp_path: Path, name: str, *extra: str) -> Path:
    code, out, err = invoke(*RUN, *extra)
    assert code == 0, err
    path = tmp_path / name
    path.write_text(out)
    return path


def test_figures_are_every_number_of_the_report_by_dotted_path_without_the_config() -> None:
    doc = {"config": {"vms": 2}, "sim_time": {"insns": 10, "ms": 0.1}, "vms": [{"exits": {"HLT": 1}, "console": "x"}],
           "interrupted": True}
    assert figures(doc) == {"sim_time.insns": 10, "sim_time.ms": 0.1, "vms.0.exits.HLT": 1, "interrupted": 1}


def test_an_exit_reason_one_report_lacks_counts_as_zero_and_exits_come_first() -> None:
    a = {"totals": {"exits": {"EPT_VIOLATION": 5}}, "vmstat": {"cow_ksm": 0}}
    b = {"totals": {"exits": {"EPT_VIOLATION": 7, "HLT": 1}}, "vmstat": {"cow_ksm": 0}, "ksm": {"pages_sharing": 3}}
    d = diff_reports(a, b)
    assert [(r.name, r.a, r.b, r.delta) for r in d.rows] == [
        ("totals.exits.EPT_VIOLATION", 5, 7, 2), ("totals.exits.HLT", 0, 1, 1), ("vmstat.cow_ksm", 0, 0, 0),
        ("ksm.pages_sharing", None, 3, None)]
    assert d.differs


def test_diff_of_change_pte_on_and_off_shows_the_extra_exits_and_fails_on_request(tmp_path: Path) -> None:
    a = report(tmp_path, "a.json", "--profile", "2.6.32")
    b = report(tmp_path, "b.json", "--profile", "2.6.32", "--no-change-pte")
    code, out, _ = invoke("diff", str(a), str(b))
    assert code == 0
    lines = out.splitlines()
    assert lines[3].split() == ["figure", "A", "B", "B", "-", "A"]
    assert lines[5].startswith("totals.exits.")  # exits first
    ept = next(line for line in lines if line.startswith("totals.exits.EPT_VIOLATION "))
    a_n, b_n = (json.loads(p.read_text())["totals"]["exits"]["EPT_VIOLATION"] for p in (a, b))
    assert ept.split() == ["totals.exits.EPT_VIOLATION", f"{a_n:,}", f"{b_n:,}", f"{b_n - a_n:+,}"]
    assert "config.change_pte: A true, B false" in out
    code, _, _ = invoke("diff", str(a), str(b), "--fail-on-diff")
    assert code == 1


def test_identical_reports_pass_fail_on_diff(tmp_path: Path) -> None:
    a = report(tmp_path, "a.json")
    b = report(tmp_path, "b.json")
    code, out, _ = invoke("diff", str(a), str(b), "--fail-on-diff", "--changed")
    assert code == 0 and "figures are equal" in out


def test_a_file_that_is_not_a_report_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    code, _, err = invoke("diff", str(bad), str(bad))
    assert code == 2 and "not a run report" in err
    code, _, err = invoke("diff", str(tmp_path / "missing.json"), str(bad))
    assert code == 2 and "cannot read" in err
