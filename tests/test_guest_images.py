"""The committed guest images (guest_images/*.bin, hello.elf) are what their sources build to."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_guests.py"


def binutils_available() -> bool:
    return all(shutil.which(tool) is not None for tool in ("as", "ld", "objcopy"))


@pytest.mark.skipif(not binutils_available(), reason="GNU binutils (as, ld, objcopy) not installed")
def test_committed_guest_images_match_their_sources() -> None:
    proc = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--check"], cwd=REPO_ROOT, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, f"build_guests.py --check exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
