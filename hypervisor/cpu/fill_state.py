"""What both branches of UnicornVcpu's TLB fill (cpu/tdp_fill.py, cpu/shadow_fill.py) use of the vCPU.

A mypyc trait, as the branches are: UnicornVcpu provides these attributes and methods; the
branches declare here once what they read, so that each compiles against one declaration.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
from mypy_extensions import trait

from ..kvm.vcpu import Vcpu
from .clock import VcpuClock
from .code_pages import CodePages


@trait
class FillState:
    """The vCPU state and exit plumbing both TLB-fill branches use (provided by UnicornVcpu)."""

    vcpu: Vcpu
    clock: VcpuClock
    _code: CodePages
    _cr3: int
    _refused: bool
    _resume_rip: int | None
    _frames_2d: npt.NDArray[np.uint8]
    sensitive: Any
    tlb_entries: dict[int, tuple[int, int, bool]] | None

    _read_cr3: Callable[[], int]
    __deletable__ = ("sensitive", "_code")  # UnicornVcpu.close()

    def _rip_for_trace(self) -> int:
        raise NotImplementedError

    def _current_rip(self) -> int:
        raise NotImplementedError

    def _fault_retried(self, gfn: int) -> None:
        raise NotImplementedError
