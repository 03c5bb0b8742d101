"""The bundled example sweeps parse, through `hvsim run`'s own option parser, into the grids they describe."""

from pathlib import Path

import pytest

from hypervisor.cli import _sweep_point
from hypervisor.sweep.report import HEADLINE
from hypervisor.sweep.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize(("name", "points", "axes"), [
    ("change_pte.toml", 24, ["ksm_pages_to_scan", "no_change_pte", "profile"]),
    ("vm_count.toml", 10, ["vms", "ksm_pages_to_scan", "profile"]),
])
def test_bundled_example_sweep_parses_into_its_grid(name: str, points: int, axes: list[str]) -> None:
    spec = load_spec(EXAMPLES / name, _sweep_point)
    assert len(spec.points) == points
    assert spec.axis_keys == axes
    assert len({p.key for p in spec.points}) == points  # every point its own report
    for figure in spec.figures:
        assert figure.split(".")[0] in ("totals", "ksm", "vmstat", "sim_time") or figure in HEADLINE
    first = spec.points[0].run.config
    assert first.ksm.enabled and first.image.endswith(".bin")
