"""--plot draws rates in the bins they belong to, keeps every line visible, says when a run is too short,
and has no KSM panel without KSM; the progress line shows real work, not the --max-insns budget (issue #9)."""

import io
from pathlib import Path

from click.testing import CliRunner

from hypervisor.cli import main
from hypervisor.compare import run_compare
from hypervisor.observers import Progress
from hypervisor.plot import bin_ms, exits_per_ms, figure
from hypervisor.series import TimeSeries
from hypervisor.sim import GUEST_IMAGES, KsmConfig, SimConfig, Simulation

SAMEPAGE = str(GUEST_IMAGES / "samepage.bin")


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def series(t_ms: list[float], exits: list[int], ksm: bool = False) -> TimeSeries:
    return TimeSeries("r", 100_000, ksm, t_ms, exits, [0] * len(t_ms), [0] * len(t_ms))


def test_exits_per_ms_is_drawn_from_the_start_of_its_bin() -> None:
    # ten exits between 1 ms and 2 ms, none before or after
    x, y = exits_per_ms(series([0.5, 1.0, 1.5, 2.0, 2.5, 3.0], [0, 0, 5, 10, 10, 10]))
    assert list(x) == [0.0, 1.0, 2.0, 3.0]
    assert list(y) == [0.0, 10.0, 0.0, 0.0]  # steps-post: the value at x[i] holds from x[i] to x[i+1]


def test_short_runs_get_finer_bins_but_no_finer_than_a_time_slice() -> None:
    assert bin_ms([series([float(t) for t in range(1, 41)], [0] * 40)]) == 1.0
    assert bin_ms([series([0.1 * t for t in range(1, 31)], [0] * 30)]) == 0.1
    assert bin_ms([series([0.1 * t for t in range(1, 3)], [0] * 2)]) == 0.1


def sims_series(**ksm: bool) -> list[TimeSeries]:
    out: list[TimeSeries] = []

    def observe(label: str, sim: Simulation) -> None:
        out.append(TimeSeries.attach(sim, label))

    cfg = SimConfig(image=SAMEPAGE, vms=2, cmdline="pages=8 passes=6 spin=40000",
                    ksm=KsmConfig(enabled=True, sleep_millisecs=1))
    run_compare(cfg, observe=observe)
    return out


def test_era_plot_gives_every_run_its_own_style_and_keeps_the_legend_off_the_data() -> None:
    runs = sims_series()
    fig, warnings = figure(runs, "eras")
    assert warnings == []
    top, bottom = fig.axes
    styles = [(line.get_color(), str(line.get_linestyle()), line.get_marker()) for line in top.get_lines()]
    assert len(styles) == len(runs) and len(set(styles)) == len(runs)
    for part in (c for s in styles for c in s):
        assert part not in ("None", "")
    fig.canvas.draw()
    legend = top.get_legend().get_window_extent()
    for ax in (top, bottom):
        assert not legend.overlaps(ax.get_window_extent())
    # the KSM panel shows the KSM runs only
    assert len(bottom.get_lines()) == len([s for s in runs if s.ksm]) == len(runs) - 1


def test_a_run_without_ksm_gets_no_ksm_panel(tmp_path: Path) -> None:
    sim = Simulation(SimConfig(image=SAMEPAGE, cmdline="pages=8 passes=6 spin=40000"))
    ts = TimeSeries.attach(sim, "run")
    sim.run()
    fig, _ = figure([ts], "one run")
    assert len(fig.axes) == 1


def test_a_run_too_short_to_plot_says_so_on_the_plot_and_in_a_warning(tmp_path: Path) -> None:
    png = tmp_path / "hello.png"
    code, _, err = invoke("run", "hello", "--plot", str(png))
    assert code == 0
    assert "warning: --plot" in err and "too short to plot (0.0016 simulated ms in 1 time slice(s))" in err
    assert png.read_bytes()[:4] == b"\x89PNG"
    sim = Simulation(SimConfig(image=str(GUEST_IMAGES / "hello.bin")))
    ts = TimeSeries.attach(sim, "hello")
    sim.run()
    fig, _ = figure([ts], "hello")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert any("too short to plot" in t for t in texts) and not fig.axes[0].get_lines()


def finished_progress_line(max_insns: int) -> str:
    progress = Progress(True, stream=io.StringIO())
    sim = Simulation(SimConfig(image=SAMEPAGE, vms=2, cmdline="pages=4 passes=2 spin=2000", max_insns=max_insns))
    progress.observe("", sim)
    sim.run()
    return progress.line(sim)


def test_progress_shows_real_work_not_the_max_insns_budget() -> None:
    line = finished_progress_line(10**9)
    assert "2/2 VMs finished" in line and "insns" in line and "exits" in line
    assert "#" not in line and "[" not in line  # no bar scaled to a budget
    assert finished_progress_line(10**7)[1:] == line[1:]  # the budget does not show (the spinner turns)


def test_compare_progress_says_which_run_it_is() -> None:
    progress = Progress(True, runs=6, stream=io.StringIO())
    sim = Simulation(SimConfig(image=SAMEPAGE, cmdline="pages=4 passes=2 spin=2000"))
    progress.observe("2.6.32", sim)
    assert progress.line(sim).startswith("run 1/6 2.6.32: ")
