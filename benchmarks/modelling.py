"""Issue #13's "cost of modelling": `hvsim run kernels --vms 16 --memory 64M --ksm` against hook-free Unicorn.

Whole-process wall time on both sides, each a fresh interpreter started the same
way: hvsim's CLI (`python -m hypervisor run kernels ... --ksm`: every exit, the
fault path, host mm, ksmd, the report), and benchmarks/hookfree.py running the
same 16 guests' programs one after the other on Unicorn's own MMU with a hook on
OUT only (`python -m benchmarks.hookfree kernels --vms 16 --memory 64M`).  The
guests are deterministic and never look at time, so both execute the same
instructions.  Alternating, median of the repetitions.  Both sides start from
bytecode: the repository's packages are compiled first, as `pip install` compiles
an installed package (an editable install under PYTHONDONTWRITEBYTECODE would
otherwise recompile every module at every start, which hvsim's CLI pays for more
modules than hookfree.py does).
"""

import compileall
import subprocess
import sys
import time

from .baselines import BenchmarkError
from .common import REPO_ROOT, Budget, Figure, at_most, median, ratio

TARGET = 1.5


def _wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise BenchmarkError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds


def _compile_bytecode() -> None:
    """Write the .pyc of hypervisor/ and benchmarks/ (what `pip install` does for an installed package)."""
    for package in ("hypervisor", "benchmarks"):
        if not compileall.compile_dir(REPO_ROOT / package, quiet=1):
            raise BenchmarkError(f"python -m compileall {package} failed: a module does not compile")


def run(*, vms: int, memory_mib: int, reps: int, budget: Budget) -> Figure:
    _compile_bytecode()
    common = ["kernels", "--vms", str(vms), "--memory", f"{memory_mib}M"]
    hv_argv = ["-m", "hypervisor", "run", *common, "--ksm"]
    free_argv = ["-m", "benchmarks.hookfree", *common]
    free: list[float] = []
    mine: list[float] = []
    for i in range(max(1, reps)):
        t0 = time.perf_counter()
        free.append(_wall(free_argv))
        mine.append(_wall(hv_argv))
        if i + 1 < reps and not budget.allows(time.perf_counter() - t0):
            break
    hv, base = median(mine), median(free)
    r = ratio(hv, base)
    return Figure("cost_of_modelling", "4d", f"cost of modelling: hvsim run kernels --vms {vms} --memory "
                  f"{memory_mib}M --ksm (whole process)", hv, "s", base, "hook-free Unicorn, same guests", r,
                  [at_most(r, TARGET, f"<= {TARGET} x hook-free")],
                  {"hvsim_s": mine, "hookfree_s": free, "hvsim_argv": hv_argv, "hookfree_argv": free_argv,
                   "timing": "whole process, wall clock, from bytecode"})
