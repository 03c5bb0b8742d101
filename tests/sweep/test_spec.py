"""A point's key names its report: it changes with anything that could change the report, and nothing else."""

from dataclasses import replace
from pathlib import Path

import pytest

from hypervisor.sim import GUEST_IMAGES, KsmConfig, SimConfig
from hypervisor.sweep import spec
from hypervisor.sweep.spec import RunPoint, point_key

BASE = RunPoint(SimConfig(image=str(GUEST_IMAGES / "samepage.bin"), vms=2, ksm=KsmConfig(enabled=True)))


def test_the_key_is_stable_for_one_configuration() -> None:
    assert point_key(BASE) == point_key(RunPoint(replace(BASE.config)))


def test_the_key_changes_with_the_config_the_check_flag_and_hvsims_version(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = {point_key(BASE), point_key(RunPoint(replace(BASE.config, vms=3))),
            point_key(RunPoint(replace(BASE.config, ksm=KsmConfig(enabled=True, pages_to_scan=7)))),
            point_key(RunPoint(BASE.config, check=True))}
    monkeypatch.setattr(spec, "__version__", "99.0")
    keys.add(point_key(BASE))
    assert len(keys) == 5


def test_the_key_changes_with_the_images_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"\xf4")
    b.write_bytes(b"\xf4")
    ka = point_key(RunPoint(SimConfig(image=str(a))))
    b.write_bytes(b"\x90\xf4")
    assert ka != point_key(RunPoint(SimConfig(image=str(b)))) != point_key(RunPoint(SimConfig(image=str(a))))
