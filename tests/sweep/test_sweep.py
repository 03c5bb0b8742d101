"""`hvsim sweep`: one row per point, byte-identical reports to `hvsim run --json`, resumable after a kill,
and the same table from a Dask cluster as from the local pool."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from hypervisor.sim import GUEST_IMAGES

from .support import POINTS, SPEC, invoke, write_spec


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep run once, uninterrupted, with two local workers: what every other way must reproduce."""
    d = tmp_path_factory.mktemp("reference")
    code, out, err = invoke("sweep", str(write_spec(d)), "-o", str(d / "results"), "--jobs", "2")
    assert code == 0, out + err
    return d / "results"


def same_results(a: Path, b: Path) -> None:
    assert (a / "results.csv").read_bytes() == (b / "results.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(a / "results.parquet"), pd.read_parquet(b / "results.parquet"))
    reports = sorted(p.name for p in (a / "runs").glob("*.json"))
    assert reports == sorted(p.name for p in (b / "runs").glob("*.json"))
    for name in reports:
        assert (a / "runs" / name).read_bytes() == (b / "runs" / name).read_bytes()


def test_table_has_a_row_per_point_axes_first_then_every_figure(reference: Path) -> None:
    table = pd.read_parquet(reference / "results.parquet")
    assert len(table) == POINTS
    assert list(table.columns[:3]) == ["profile", "no_change_pte", "ksm_pages_to_scan"]
    assert list(table["profile"]) == ["2.6.32", "2.6.32", "3.7", "3.7", "6.10", "6.10"]
    assert list(table["no_change_pte"]) == [False, True] * 3
    for figure in ("totals.exits.EPT_VIOLATION", "totals.stats.pf_fixed", "ksm.pages_sharing", "vmstat.cow_ksm",
                   "sim_time.insns", "vms.1.exits.EPT_VIOLATION", "console_sha256", "point"):
        assert figure in table.columns
    # Every guest printed the same thing under every era.
    assert table["console_sha256"].nunique() == 1
    csv = pd.read_csv(reference / "results.csv")
    assert list(csv.columns) == list(table.columns)
    assert list(csv["totals.exits.EPT_VIOLATION"]) == list(table["totals.exits.EPT_VIOLATION"])
    # The change_pte story, from the table: 2.6.32 without change_pte breaks merges (COW), 3.7 never does.
    by = table.set_index(["profile", "no_change_pte"])

    def at(profile: str, no_change_pte: bool, figure: str) -> int:
        return int(by.loc[(profile, no_change_pte), figure])  # type: ignore[arg-type]

    assert at("2.6.32", True, "vmstat.cow_ksm") > 0
    assert at("2.6.32", False, "totals.stats.spte_changed") > 0
    assert at("3.7", False, "totals.stats.spte_changed") == 0


def test_each_report_is_what_hvsim_run_json_prints_for_that_point(reference: Path) -> None:
    table = pd.read_parquet(reference / "results.parquet")
    row = table.iloc[1]  # 2.6.32, no_change_pte, pages_to_scan 10
    code, out, err = invoke("run", str(GUEST_IMAGES / "samepage.bin"), "--cmdline", "pages=8 passes=6 spin=60000",
                            "--vms", "2", "--memory", "4M", "--ksm", "--ksm-sleep-ms", "0", "--profile", "2.6.32",
                            "--no-change-pte", "--ksm-pages-to-scan", "10", "--json", "-q")
    assert code == 0, err
    assert (reference / "runs" / f"{row['point']}.json").read_text() == out


def test_rerunning_a_finished_sweep_runs_nothing(reference: Path, tmp_path: Path) -> None:
    code, out, err = invoke("sweep", str(write_spec(tmp_path)), "-o", str(reference), "--jobs", "1")
    assert code == 0, err
    assert f"{POINTS} point(s), 0 run now, {POINTS} already done" in out


def test_a_killed_sweep_resumes_and_ends_with_the_uninterrupted_table(reference: Path, tmp_path: Path) -> None:
    spec, results = write_spec(tmp_path), tmp_path / "results"
    runs = results / "runs"
    # Its own session, so that the kill takes the pool's workers with it.
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor", "sweep", str(spec), "-o", str(results),
                             "--jobs", "1", "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(runs.glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = len(list(runs.glob("*.json")))
    assert 1 <= done < POINTS, "the kill should land mid-way"
    code, out, err = invoke("sweep", str(spec), "-o", str(results), "--jobs", "2")
    assert code == 0, err
    assert f"{POINTS - done} run now, {done} already done" in out
    for leftover in runs.glob("*.partial"):
        leftover.unlink()  # a report the kill caught mid-write: never renamed into place, never read
    same_results(reference, results)


def test_ctrl_c_finishes_the_points_in_flight_and_exits_130(tmp_path: Path) -> None:
    spec, results = write_spec(tmp_path), tmp_path / "results"
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor", "sweep", str(spec), "-o", str(results),
                             "--jobs", "1", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while not list((results / "runs").glob("*.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "finishing the points in flight" in err and "Re-run the same command" in err
    done = len(list((results / "runs").glob("*.json")))
    assert 1 <= done < POINTS and "Traceback" not in err
    assert f"{done} run now" in out  # the table of what finished is still written
    assert len(pd.read_csv(results / "results.csv")) == done


def test_the_same_sweep_on_a_dask_local_cluster_gives_identical_tables(reference: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("distributed")
    results = tmp_path / "results"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  scheduler_port=0, dashboard_address=None, silence_logs=40) as cluster:
        code, out, err = invoke("sweep", str(write_spec(tmp_path)), "-o", str(results),
                                "--scheduler", cluster.scheduler_address)
    assert code == 0, out + err
    assert f"{POINTS} run now" in out
    same_results(reference, results)


def test_plot_draws_a_png_per_figure(reference: Path, tmp_path: Path) -> None:
    code, out, err = invoke("sweep", str(write_spec(tmp_path)), "-o", str(reference), "--plot",
                            "--figure", "ksm.pages_sharing", "--figure", "totals.exits.EPT_VIOLATION")
    assert code == 0, err
    for name in ("ksm.pages_sharing.png", "totals.exits.EPT_VIOLATION.png"):
        data = (reference / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(reference / "plots" / name) in out


@pytest.mark.parametrize(("change", "message"), [
    ('profile = ["2.6.32", "9.9"]', "'9.9' is not one of"),
    ('ksm_pages_to_scann = [1, 2]', "unknown setting 'ksm_pages_to_scann'"),
    ('trace = ["a.json"]', "'trace' changes only what a run prints"),
    ('console = ["full"]', "'console' changes only what a run prints"),
    ('exit_with_guest_status = [true]', "'exit_with_guest_status' changes only what a run prints"),
    ('quantum = [1000, "two"]', "'two' is not a valid integer"),
    ('check = ["yes"]', "--check is a flag, write true or false"),
    ("vms = []", "give a non-empty list"),
])
def test_a_bad_point_is_a_clear_error_naming_the_point(tmp_path: Path, change: str, message: str) -> None:
    spec = write_spec(tmp_path, SPEC.replace('profile = ["2.6.32", "3.7", "6.10"]', change))
    code, out, err = invoke("sweep", str(spec), "-o", str(tmp_path / "r"))
    assert code == 2, out + err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "runs").exists() or not list((tmp_path / "r" / "runs").iterdir())


@pytest.mark.parametrize(("text", "message"), [
    ("[run\n", "not valid TOML"),
    ("[run]\nimage = 'samepage'\n[zip]\nvms = [1, 2]\nmemory = ['4M']\n", "same length"),
    ("[run]\nimage = 'samepage'\nvms = 2\n[axes]\nvms = [1, 2]\n", "both in [run] and an axis"),
    ("[runs]\n", "unknown table"),
])
def test_a_bad_spec_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    code, _, err = invoke("sweep", str(write_spec(tmp_path, text)), "-o", str(tmp_path / "r"))
    assert code == 2 and message in err, err


def test_a_point_that_cannot_run_is_reported_the_others_are_kept_and_a_rerun_retries_it(tmp_path: Path) -> None:
    (tmp_path / "empty.bin").write_bytes(b"")
    spec = write_spec(tmp_path, SPEC.replace('image = "samepage"\n', "").replace(
        'profile = ["2.6.32", "3.7", "6.10"]', 'image = ["samepage", "empty.bin"]'))
    code, out, err = invoke("sweep", str(spec), "-o", str(tmp_path / "r"), "--jobs", "2")
    assert code == 3, out + err  # ImageError's exit code
    assert "2 run now, 0 already done, 2 failed" in out
    assert "point 2 (image=empty.bin, no_change_pte=false, ksm_pages_to_scan=1000): guest image" in err
    assert len(pd.read_csv(tmp_path / "r" / "results.csv")) == 2
    code, out, _ = invoke("sweep", str(spec), "-o", str(tmp_path / "r"), "--jobs", "2")
    assert code == 3 and "0 run now, 2 already done, 2 failed" in out


def test_an_unknown_image_is_hvsim_runs_own_error_naming_the_point(tmp_path: Path) -> None:
    code, _, err = invoke("sweep", str(write_spec(tmp_path, "[run]\nimage = 'nosuchguest'\n")), "-o", str(tmp_path))
    assert code == 3, err  # ImageError, as `hvsim run nosuchguest`
    assert "sweep.toml, point 0: no guest image 'nosuchguest'" in err and "samepage" in err


def test_an_image_path_is_read_relative_to_the_spec(tmp_path: Path) -> None:
    (tmp_path / "guests").mkdir()
    (tmp_path / "guests" / "h.bin").write_bytes((GUEST_IMAGES / "hello.bin").read_bytes())
    (tmp_path / "specs").mkdir()
    spec = tmp_path / "specs" / "s.toml"
    spec.write_text("[run]\nimage = '../guests/h.bin'\nmemory = '4M'\n[axes]\nvms = [1, 2]\n")
    code, _, err = invoke("sweep", str(spec), "-q")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "specs" / "s-results" / "results.csv")
    assert list(table["vms"]) == [1, 2] and list(table["totals.exits.HLT"]) == [1, 2]


def test_hvsim_runs_own_checks_apply_to_every_point(tmp_path: Path) -> None:
    code, _, err = invoke("sweep", str(write_spec(tmp_path, SPEC.replace("ksm = true", "ksm = false"))))
    assert code == 2 and "point 0 (profile=2.6.32" in err and "--ksm-sleep-ms" in err and "without --ksm" in err


def test_jobs_and_scheduler_together_are_refused(tmp_path: Path) -> None:
    code, _, err = invoke("sweep", str(write_spec(tmp_path)), "--jobs", "2", "--scheduler", "tcp://127.0.0.1:1")
    assert code == 2 and "Give one of them" in err


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("distributed")
    monkeypatch.setattr("hypervisor.sweep.execute.SCHEDULER_TIMEOUT", "1s")
    code, _, err = invoke("sweep", str(write_spec(tmp_path)), "-o", str(tmp_path / "r"),
                          "--scheduler", "tcp://127.0.0.1:9")
    assert code == 2 and "cannot reach a Dask scheduler" in err, err


def test_reports_are_json_with_the_points_config(reference: Path) -> None:
    table = pd.read_parquet(reference / "results.parquet")
    for _, row in table.iterrows():
        doc = json.loads((reference / "runs" / f"{row['point']}.json").read_text())
        assert doc["config"]["profile"] == row["profile"]
        assert doc["config"]["change_pte"] is not bool(row["no_change_pte"])
        assert doc["config"]["ksm"]["pages_to_scan"] == row["ksm_pages_to_scan"]
