"""HVSIM_PURE=1 (hypervisor/_pure.py): hvsim's modules come from their .py files even where compiled
ones sit beside them; modules with no .py (the C hook) still load the ordinary way."""

import sys

import pytest

import hypervisor.cpu
import hypervisor.kvm
from hypervisor._pure import SourceFirstFinder, prefer_source


def test_the_source_first_finder_finds_the_py_file_of_a_model_module() -> None:
    spec = SourceFirstFinder().find_spec("hypervisor.kvm.mmu", list(hypervisor.kvm.__path__))
    assert spec is not None and spec.origin is not None and spec.origin.endswith("mmu.py")


def test_the_source_first_finder_leaves_the_c_hook_and_other_packages_to_the_usual_finders() -> None:
    finder = SourceFirstFinder()
    assert finder.find_spec("hypervisor.cpu._icount", list(hypervisor.cpu.__path__)) is None
    assert finder.find_spec("numpy", None) is None
    assert finder.find_spec("json.decoder", None) is None


def test_prefer_source_puts_the_finder_first_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, SourceFirstFinder)])
    prefer_source()
    prefer_source()
    assert isinstance(sys.meta_path[0], SourceFirstFinder)
    assert sum(isinstance(f, SourceFirstFinder) for f in sys.meta_path) == 1
