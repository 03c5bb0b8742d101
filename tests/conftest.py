"""Suite-wide settings for a suite that runs in random order, on several processes, under coverage.

* Hypothesis: no deadlines and no too_slow health check (a test's wall time under `-n 2` and
  coverage says nothing about the code), and a failure prints the blob that replays it.
* pytest-randomly: the seed of the test order is repeated at the end of the output (`-q` hides the
  header that names it), with the command that replays that order.
* Coverage: the model packages (host mm, KVM, the scheduler) are summed per package and must each
  stay at or above MODEL_COVERAGE_GATE percent when the whole suite ran (no paths, -k or -m slow);
  slow tests run untraced.
"""

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("hvsim", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.load_profile("hvsim")

# Path prefixes (relative to the repository) whose coverage is gated, one line each in the summary.
MODEL_PACKAGES = ("hypervisor/host/", "hypervisor/kvm/", "hypervisor/sim.py")
MODEL_COVERAGE_GATE = 90.0
# -m selections that still count as the whole suite: a plain `pytest` (addopts), the whole check, none.
WHOLE_SUITE_MARKEXPRS = ("not slow", "slow or not slow", "")


@dataclass
class PackageCoverage:
    name: str
    statements: int = 0
    covered_lines: int = 0
    branches: int = 0
    covered_branches: int = 0

    @property
    def percent(self) -> float:
        """coverage.py's own figure with branch = true: lines and branches together."""
        total = self.statements + self.branches
        return 100.0 * (self.covered_lines + self.covered_branches) / total if total else 100.0

    @property
    def branch_percent(self) -> float:
        return 100.0 * self.covered_branches / self.branches if self.branches else 100.0


def model_package_coverage(data_file: str) -> list[PackageCoverage]:
    """Sum coverage.py's JSON report per model package, from the combined data of this run."""
    import coverage

    cov = coverage.Coverage(data_file=data_file)
    cov.load()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "coverage.json"
        cov.json_report(outfile=str(out))
        files = json.loads(out.read_text())["files"]
    packages = [PackageCoverage(name) for name in MODEL_PACKAGES]
    for path, entry in files.items():
        summary = entry["summary"]
        for package in packages:
            if "/" + package.name in "/" + Path(path).as_posix():
                package.statements += summary["num_statements"]
                package.covered_lines += summary["covered_lines"]
                package.branches += summary["num_branches"]
                package.covered_branches += summary["covered_branches"]
    return packages


def _coverage_data_file(config: pytest.Config) -> str | None:
    """The data file pytest-cov wrote for this run, or None when coverage was off."""
    plugin = config.pluginmanager.getplugin("_cov")
    controller = getattr(plugin, "cov_controller", None)
    cov = getattr(controller, "cov", None)
    if cov is None:
        return None
    return str(cov.config.data_file)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> object:
    # Outside pytest-cov's own wrapper: by the time this resumes it has combined the workers' data.
    result = yield
    config = session.config
    data_file = _coverage_data_file(config)
    if data_file is None or hasattr(config, "workerinput") or not Path(data_file).exists():
        return result
    packages = model_package_coverage(data_file)
    config.stash[_packages_key] = packages
    low = [p for p in packages if p.percent < MODEL_COVERAGE_GATE]
    if _ran_whole_suite(config) and low:
        session.testsfailed += 1
        config.stash[_gate_failed_key] = low
    return result


def _ran_whole_suite(config: pytest.Config) -> bool:
    """No paths, no -k, no --lf/--sw/--deselect, and the default marker selection (or every test)."""
    option = config.option
    return (config.args_source is pytest.Config.ArgsSource.TESTPATHS and option.markexpr in WHOLE_SUITE_MARKEXPRS
            and not option.keyword and not getattr(option, "lf", False) and not getattr(option, "stepwise", False)
            and not getattr(option, "deselect", None))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Slow tests are long matrices over paths the default selection already covers; traced, the
    # largest took 45 s instead of 7 s. Run untraced (pytest-cov's no_cover), they also leave the
    # coverage figures the same with and without -m slow.
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.no_cover)


_packages_key = pytest.StashKey[list[PackageCoverage]]()
_gate_failed_key = pytest.StashKey[list[PackageCoverage]]()


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    packages = config.stash.get(_packages_key, None)
    if packages:
        terminalreporter.write_line(f"model package coverage (gate {MODEL_COVERAGE_GATE:.0f}% on the whole suite):")
        for p in packages:
            terminalreporter.write_line(
                f"  {p.name:<20} {p.percent:5.1f}%  lines {p.covered_lines}/{p.statements}"
                f"  branches {p.covered_branches}/{p.branches} ({p.branch_percent:.1f}%)")
    for p in config.stash.get(_gate_failed_key, []):
        terminalreporter.write_line(f"FAIL: coverage of {p.name} is {p.percent:.1f}%, below {MODEL_COVERAGE_GATE:.0f}%:"
                                    " test its uncovered branches or explain them (README: The test suite)", red=True)
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int) and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(f"test order: pytest-randomly seed {seed}; replay it with --randomly-seed={seed}"
                                    " (add -p no:xdist to run that order in one process)")
