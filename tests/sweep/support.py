"""A small sweep spec for the sweep tests: tiny guests, six points, about a second of work."""

from pathlib import Path

from click.testing import CliRunner

from hypervisor.cli import main

SPEC = """\
[run]
image = "samepage"
cmdline = "pages=8 passes=6 spin=60000"
vms = 2
memory = "4M"
ksm = true
ksm_sleep_ms = 0

[axes]
profile = ["2.6.32", "3.7", "6.10"]

[zip]
no_change_pte = [false, true]
ksm_pages_to_scan = [1000, 10]
"""

POINTS = 6


def write_spec(directory: Path, text: str = SPEC) -> Path:
    path = directory / "sweep.toml"
    path.write_text(text)
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr
