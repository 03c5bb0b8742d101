"""Helpers for scenario tests: bundled images, tiny hand-assembled guests, and a run shortcut."""

from pathlib import Path

from hypervisor.sim import GUEST_IMAGES, KsmConfig, RunResult, SimConfig, Simulation


def image(name: str) -> str:
    return str(GUEST_IMAGES / name)


def flat_guest(tmp_path: Path, name: str, code: bytes) -> str:
    """A flat image of raw x86-64 machine code, entered at its first byte."""
    path = tmp_path / f"{name}.bin"
    path.write_bytes(code)
    return str(path)


def run(img: str, **kwargs: object) -> RunResult:
    ksm = kwargs.pop("ksm", None)
    cfg = SimConfig(image=img, ksm=ksm if isinstance(ksm, KsmConfig) else KsmConfig(), **kwargs)  # type: ignore[arg-type]
    return Simulation(cfg).run()


MASK64 = (1 << 64) - 1


def memtouch_checksum(pages: int, passes: int) -> int:
    """What memtouch prints as its final checksum, computed independently of the guest."""
    per_pass = 0
    for i in range(pages):
        base = ((i + 1) * 0x9E3779B97F4A7C15) & MASK64
        for j in range(0, 512, 8):
            per_pass = (per_pass + (base ^ j)) & MASK64
    return (per_pass * passes) & MASK64
