"""The pieces of an mm that are not its code: VMAs and their flags, madvise advice, fault outcomes, vmstat.

After include/linux/mm_types.h (struct vm_area_struct), include/linux/mm.h (VM_*),
include/uapi/asm-generic/mman-common.h (MADV_*); host/mm.py holds the code that uses them.
"""

from collections import Counter
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

from ..errors import HvsimError
from ..types import PAGE_SHIFT, Hva

VM_READ = 1 << 0
VM_WRITE = 1 << 1
VM_MERGEABLE = 1 << 31

MADV_DONTNEED = 4
MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13


class HostFault(Enum):
    """What handle_mm_fault did for a GUP call, so its caller can say what the exit cost.

    hvsim's own: the kernel's VM_FAULT_* flags do not tell a copy-on-write from a reuse.
    """

    NONE = "none"  # the pte already allowed the access
    FAULT = "fault"  # a page was faulted in (or a pte made young/writable in place)
    COW = "cow"  # do_wp_page copied the page

    # Members are singletons: hash by identity (C), not Enum's name hash (a Python call); these
    # key dicts once per fault.
    __hash__ = object.__hash__


class SegmentationFault(HvsimError):
    """A host access to an hva outside every VMA (a bug in the VMM, i.e. in hvsim)."""


@dataclass
class Vma:
    """struct vm_area_struct for an anonymous private mapping, with its ptes."""

    start: Hva
    end: Hva
    flags: int
    ptes: npt.NDArray[np.int64]

    @property
    def mergeable(self) -> bool:
        return bool(self.flags & VM_MERGEABLE)

    def __post_init__(self) -> None:
        self.ptes_view = self.ptes.data

    def index(self, hva: Hva) -> int:
        return (hva - self.start) >> PAGE_SHIFT

    @property
    def nr_pages(self) -> int:
        return (self.end - self.start) >> PAGE_SHIFT


class Vmstat:
    """The /proc/vmstat counters hvsim keeps (system-wide)."""

    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n
