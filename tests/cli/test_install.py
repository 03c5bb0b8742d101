"""A non-editable `pip install` of the checkout ships the bundled guests, their sources and the LICENSE:
`hvsim images` and `hvsim run hello` work from another directory (issue #9, item 6).

The install goes into a fresh venv with `--no-deps`: pip fetches only the build backend, as the
README's install does; the runtime dependencies are borrowed from this interpreter's
site-packages through a .pth file (a plain path entry: that directory's own .pth files, such
as an editable install's finder, are not run).
"""

import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.checkout import ROOT, copy_checkout


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with hvsim installed from a copy of the checkout (not editable); returns its bin/."""
    base = tmp_path_factory.mktemp("install")
    src = copy_checkout(base / "src")
    venv = base / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base)
    py = venv / "bin" / "python"
    purelib = run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], base).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    (Path(purelib) / "borrowed_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    # The build backend comes from the package index exactly as for the README's install (build isolation).
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(src)], base)
    shutil.rmtree(src)  # nothing may come from the source tree
    return venv / "bin"


def test_installed_package_is_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = run([str(installed / "python"), "-c", "import hypervisor; print(hypervisor.__file__)"], tmp_path)
    assert str(installed.parent) in where.stdout and str(ROOT) not in where.stdout


def test_installed_hvsim_images_lists_the_bundled_guests_from_another_directory(installed: Path,
                                                                                 tmp_path: Path) -> None:
    out = run([str(installed / "hvsim"), "images"], tmp_path).stdout
    for name in ("hello", "memtouch", "samepage", "cowstorm", "kernels"):
        assert any(line.startswith(name) for line in out.splitlines()), out
    assert str(installed.parent) in out  # the images live in the installed package
    where = run([str(installed / "python"), "-c", "from hypervisor.sim import GUEST_IMAGES; print(GUEST_IMAGES)"],
                tmp_path).stdout.strip()
    shipped = {p.name for p in Path(where).iterdir()}
    assert {"README.md", "lib.S", "samepage.S", "samepage.bin", "hello.elf"} <= shipped


def test_installed_hvsim_runs_a_bundled_guest_by_name_from_another_directory(installed: Path,
                                                                              tmp_path: Path) -> None:
    proc = run([str(installed / "hvsim"), "run", "hello"], tmp_path)
    assert "hello from hvsim vm 0" in proc.stdout and "halted (HLT) with status 0 after 160 instructions" in proc.stdout


def test_installed_distribution_carries_the_license(installed: Path, tmp_path: Path) -> None:
    code = ("import importlib.metadata as m; d = m.distribution('hvsim'); "
            "print([str(f) for f in d.files or [] if 'LICENSE' in str(f)]); print(d.metadata['License'])")
    out = run([str(installed / "python"), "-c", code], tmp_path).stdout
    assert "LICENSE" in out and "MIT" in out
