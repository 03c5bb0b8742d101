"""Builds every bundled C guest from source once per test session (per xdist worker), in a private directory."""

from pathlib import Path

import pytest

from hypervisor.guest.build import build_guest
from hypervisor.sim import GUEST_IMAGES


@pytest.fixture(scope="session")
def c_guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("c-guests")
    built = {}
    for source in sorted(GUEST_IMAGES.glob("*.c")):
        built[source.stem] = str(build_guest([source], out / f"{source.stem}.elf").path)
    return built


def build_program(tmp_path: Path, name: str, text: str) -> str:
    """Write one C program and build it with the SDK; return the image's path."""
    src = tmp_path / f"{name}.c"
    src.write_text(text)
    return str(build_guest([src], tmp_path / f"{name}.elf").path)
