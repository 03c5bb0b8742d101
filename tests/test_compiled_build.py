"""The opt-in compiled build (setup.py with HVSIM_COMPILED=1: the hot model modules through mypyc) runs
the same model as the .py source: built into a scratch copy of the package, it gives byte-identical JSON
reports to the same copy under HVSIM_PURE=1, which imports the .py files beside the compiled ones."""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

# Runs that go through every compiled module: the TDP fault path with KSM merges and COW breaks, the shadow
# MMU and its fill (an interpreted MMU subclassing the compiled notifier base), --check's invariants, an
# --inject through the compiled FaultHooks, SMP guests (remote TLB flushes: kvm/requests.py), a --trace
# (the exit records), and the exit hooks (port I/O, CPUID) of every bundled guest.
COMMANDS = [
    ["run", "samepage", "--vms", "2", "--ksm", "--json"],
    ["run", "samepage", "--vms", "2", "--ksm", "--mmu", "shadow", "--json"],
    ["run", "cowstorm", "--vms", "2", "--ksm", "--check", "--json"],
    ["run", "memtouch", "--memory", "16M", "--cmdline", "pages=1024", "--json"],
    ["run", "samepage", "--vms", "2", "--ksm", "--inject", "after_gfn_to_pfn:cow", "--json"],
    ["run", "samepage_smp", "--vcpus", "2", "--ksm", "--json"],
    ["run", "kernels", "--vms", "4", "--memory", "16M", "--ksm", "--json"],
    # ksmd compiled (host/ksm*.py) against the .py source in each era's shape: stable node chains and
    # smart_scan (6.10), run=2 unmerging everything and run=1 again (3.7), --check after every ksmd step
    # with use_zero_pages (6.8).
    ["run", "kernels", "--vms", "6", "--memory", "16M", "--ksm", "--kernel", "6.10", "--ksm-max-page-sharing", "2",
     "--ksm-smart-scan", "--ksm-pages-to-scan", "300", "--json"],
    ["run", "kernels", "--vms", "4", "--memory", "16M", "--ksm", "--kernel", "3.7", "--ksm-run-at", "30:2",
     "--ksm-run-at", "60:1", "--json"],
    ["run", "bootstorm", "--vms", "2", "--memory", "16M", "--ksm", "--kernel", "6.8", "--ksm-use-zero-pages",
     "--check", "--json"],
]
TRACED = ["run", "samepage", "--vms", "2", "--ksm", "--trace"]
# Every merge, chain and unmerge of ksmd in event order.
TRACED_KSM = ["run", "kernels", "--vms", "4", "--memory", "16M", "--ksm", "--kernel", "6.10", "--ksm-max-page-sharing",
              "2", "--trace-events", "ksm_*,mmu_notifier_*,kvm_set_spte_hva", "--trace"]


def compiled_modules() -> list[str]:
    """setup.py's COMPILED_MODULES, as module names."""
    tree = ast.parse((REPO_ROOT / "setup.py").read_text())
    paths = next(ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "COMPILED_MODULES" for t in node.targets))
    return sorted(path.removesuffix(".py").replace("/", ".") for path in paths)


# Imports the model, then prints where every module of setup.py's list came from and what the build reports.
PROBE = ("import json, importlib, hypervisor.sim; from hypervisor._pure import build_name, compiled_modules; "
         "print(json.dumps({'files': {n: importlib.import_module(n).__file__ for n in " + repr(compiled_modules())
         + "}, 'compiled': compiled_modules(), 'build': build_name()}))")


def can_compile() -> bool:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return (importlib.util.find_spec("mypyc") is not None and shutil.which(compiler) is not None
            and headers.exists())


def _env(pure: bool) -> dict[str, str]:
    # No pytest-cov in the children: the scratch copy is not the package whose coverage is gated.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COV_CORE_")}
    env.pop("HVSIM_COMPILED", None)
    env["HVSIM_PURE"] = "1" if pure else "0"
    return env


def _run(tree: Path, args: list[str], pure: bool) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=tree, env=_env(pure), capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode == 0, f"{args} (HVSIM_PURE={int(pure)}) exited {proc.returncode}:\n{proc.stderr}"
    return proc.stdout


@pytest.mark.skipif(not can_compile(), reason="needs mypyc, a C compiler and Python's headers")
def test_the_compiled_build_reports_exactly_what_the_python_source_reports(tmp_path: Path) -> None:
    tree = tmp_path / "hvsim"
    tree.mkdir()
    shutil.copytree(REPO_ROOT / "hypervisor", tree / "hypervisor",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, tree / name)
    build_env = _env(pure=False)
    build_env["HVSIM_COMPILED"] = "1"
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=build_env,
                           capture_output=True, text=True, check=False, timeout=600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]

    compiled = json.loads(_run(tree, ["-c", PROBE], pure=False))
    pure = json.loads(_run(tree, ["-c", PROBE], pure=True))
    assert all(path.endswith(".so") for path in compiled["files"].values()), compiled
    assert all(path.endswith(".py") for path in pure["files"].values()), pure
    # What the benchmark suite reports as the build (benchmarks/common.py build_info).
    assert (compiled["build"], compiled["compiled"]) == ("compiled", compiled_modules())
    assert (pure["build"], pure["compiled"]) == ("pure Python (HVSIM_PURE=1)", [])

    for args in COMMANDS:
        native = _run(tree, ["-m", "hypervisor", *args], pure=False)
        source = _run(tree, ["-m", "hypervisor", *args], pure=True)
        assert json.loads(native) == json.loads(source), args
        assert native == source, args
    for name, traced in (("trace", TRACED), ("ksm_trace", TRACED_KSM)):
        for pure_run in (False, True):
            _run(tree, ["-m", "hypervisor", *traced, f"{name}{int(pure_run)}.txt"], pure=pure_run)
        assert (tree / f"{name}0.txt").read_bytes() == (tree / f"{name}1.txt").read_bytes(), traced
