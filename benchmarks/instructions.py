"""Instructions per fault-storm exit under callgrind: exact, whatever else the machine is doing (issue #13, figure 2).

Timing a fault on a shared 2-core machine moves by 5-10 % with the load; callgrind's
instruction count does not. Each measurement runs the storm twice under
`valgrind --tool=callgrind`, at SMALL and at LARGE pages, and divides the difference in
instructions by the difference in exits, so that start-up, imports and the report
cancel out. `hvsim` is `Simulation.run()` of the `touch` guest (fault_storm.hvsim_storm);
`floor` is the bare raw-ctypes TLB-fill hook (fault_storm.bare_storm). Both builds are
measured as installed: set HVSIM_PURE=1 for the pure-Python model. OPENBLAS_NUM_THREADS=1
keeps numpy's idle BLAS threads out of the count.

`python -m benchmarks.instructions [--what hvsim|floor|both]` (about 3 minutes for both)
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

SMALL = 16_384
LARGE = 49_152
QUANTUM = 1_000_000


def _inner(what: str, pages: int) -> None:
    from . import fault_storm

    if what == "hvsim":
        with tempfile.TemporaryDirectory() as tmp:
            out = fault_storm.hvsim_storm(Path(tmp), pages, QUANTUM)
    else:
        out = fault_storm.bare_storm(pages, QUANTUM)
    print(f"exits={int(out.get('exits', out.get('fills', 0)))}")


def _callgrind(what: str, pages: int) -> tuple[int, int]:
    """(instructions, exits) of one run under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "callgrind.out"
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}",
             sys.executable, "-m", "benchmarks.instructions", "--inner", what, str(pages)],
            capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"callgrind run of {what} at {pages} pages failed:\n{proc.stderr[-2000:]}")
        exits = re.search(r"exits=(\d+)", proc.stdout)
        totals = re.search(r"^(?:summary|totals): (\d+)", out_file.read_text(), re.M)
        if exits is None or totals is None:
            raise SystemExit(f"no exit count or instruction total in the {what} run at {pages} pages")
        return int(totals.group(1)), int(exits.group(1))


def per_exit(what: str) -> float:
    small_insns, small_exits = _callgrind(what, SMALL)
    large_insns, large_exits = _callgrind(what, LARGE)
    return (large_insns - small_insns) / (large_exits - small_exits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("hvsim", "floor", "both"), default="both")
    parser.add_argument("--inner", nargs=2, metavar=("WHAT", "PAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        _inner(args.inner[0], int(args.inner[1]))
        return
    build = "pure Python" if os.environ.get("HVSIM_PURE") else "as installed"
    for what in (("hvsim", "floor") if args.what == "both" else (args.what,)):
        print(f"{what} ({build}): {per_exit(what):,.0f} instructions per exit "
              f"({LARGE:,} minus {SMALL:,} pages)")


if __name__ == "__main__":
    main()
