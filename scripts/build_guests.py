"""Rebuild the bundled guest images (guest_images/*.S -> *.bin, plus hello.elf) with GNU binutils,
and the C guests (guest_images/*.c -> *.elf) with the guest SDK (`hvsim build-guest`)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO_ROOT / "hypervisor" / "guest_images"
# Guests that are also kept as ELF64 executables (for the ELF loader tests).
ELF_GUESTS = ("hello",)
# Must match hypervisor/vmm/layout.py (IMAGE_LOAD_GPA, MAX_FLAT_IMAGE_SIZE); not
# imported so that this script runs without the simulator package.
IMAGE_LOAD_GPA = 0x100000
MAX_FLAT_IMAGE_SIZE = 0x100000

AS_FLAGS = ("--64",)
LD_FLAGS = (
    "-m",
    "elf_x86_64",
    "-nostdlib",
    "-static",
    "--build-id=none",
    f"-Ttext={IMAGE_LOAD_GPA:#x}",
    "-e",
    "_start",
    "-z",
    "noexecstack",
    # No page alignment: one PT_LOAD holding just .text at exactly IMAGE_LOAD_GPA
    # (the ELF headers are not part of any loaded segment).
    "-n",
)


class BuildError(Exception):
    """A tool failed or an image broke the layout's limits."""


def c_guest_sources(src_dir: Path) -> list[Path]:
    """Every C guest source in src_dir, sorted by name."""
    return sorted(src_dir.glob("*.c"))


def build_c_guest(source: Path, out_dir: Path) -> Path:
    """Build one C guest with the SDK, as `hvsim build-guest` does."""
    sys.path.insert(0, str(REPO_ROOT))
    from hypervisor.guest.build import GuestBuildError
    from hypervisor.guest.build import build_guest as sdk_build

    out = out_dir / f"{source.stem}.elf"
    try:
        sdk_build([source], out)
    except GuestBuildError as exc:
        raise BuildError(str(exc)) from None
    out.chmod(0o644)
    return out


def guest_sources(src_dir: Path) -> list[Path]:
    """Every guest source in src_dir (all *.S but the lib*.S files guests .include), sorted by name."""
    return sorted(p for p in src_dir.glob("*.S") if not p.name.startswith("lib"))


def run(cmd: Sequence[str], cwd: Path) -> None:
    """Run one tool, raising BuildError with its output if it fails."""
    proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    if proc.stderr.strip():
        # Warnings (e.g. from ld) would hide layout mistakes; treat them as errors.
        raise BuildError(f"{' '.join(cmd)} warned:\n{proc.stderr}")


def build_guest(source: Path, out_dir: Path, work_dir: Path) -> list[Path]:
    """Assemble, link and flatten one guest; return the output files written to out_dir."""
    name = source.stem
    src_dir = source.parent
    obj = work_dir / f"{name}.o"
    elf = work_dir / f"{name}.elf"
    bin_path = out_dir / f"{name}.bin"
    # Relative source name and cwd = source dir keep absolute paths out of the outputs.
    run(["as", *AS_FLAGS, "-I", ".", "-o", str(obj), source.name], cwd=src_dir)
    run(["ld", *LD_FLAGS, "-o", str(elf), str(obj)], cwd=work_dir)
    run(["objcopy", "-O", "binary", str(elf), str(bin_path)], cwd=work_dir)
    bin_path.chmod(0o644)
    size = bin_path.stat().st_size
    if size == 0 or size > MAX_FLAT_IMAGE_SIZE:
        raise BuildError(f"{bin_path.name}: flat image size {size} outside (0, {MAX_FLAT_IMAGE_SIZE:#x}]")
    outputs = [bin_path]
    if name in ELF_GUESTS:
        elf_out = out_dir / f"{name}.elf"
        elf_out.write_bytes(elf.read_bytes())
        elf_out.chmod(0o644)
        outputs.append(elf_out)
    return outputs


def build_all(src_dir: Path, out_dir: Path) -> list[Path]:
    """Build every guest in src_dir into out_dir; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="hvsim-guests-") as tmp:
        for source in guest_sources(src_dir):
            outputs.extend(build_guest(source, out_dir, Path(tmp)))
    for source in c_guest_sources(src_dir):
        outputs.append(build_c_guest(source, out_dir))
    return outputs


def check(src_dir: Path, committed_dir: Path) -> list[str]:
    """Rebuild into a temporary directory; return the committed images that differ or are missing."""
    stale: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hvsim-guests-check-") as tmp:
        for fresh in build_all(src_dir, Path(tmp)):
            committed = committed_dir / fresh.name
            if not committed.is_file():
                stale.append(f"{committed} (missing)")
            elif committed.read_bytes() != fresh.read_bytes():
                stale.append(f"{committed} (differs from its source)")
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out",
        type=Path,
        default=GUEST_DIR,
        help="directory for the images (default: guest_images/); with --check, the images to verify",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="build into a temporary directory and exit 1 if any image in --out differs",
    )
    args = parser.parse_args(argv)
    out_dir: Path = args.out
    try:
        if args.check:
            stale = check(GUEST_DIR, out_dir)
            for entry in stale:
                print(f"stale: {entry}", file=sys.stderr)
            if stale:
                print("run scripts/build_guests.py to rebuild the guest images", file=sys.stderr)
                return 1
            print(f"all guest images in {out_dir} match their sources")
            return 0
        for path in build_all(GUEST_DIR, out_dir):
            print(f"built {path} ({path.stat().st_size} bytes)")
    except (BuildError, OSError) as exc:
        print(f"build_guests: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
