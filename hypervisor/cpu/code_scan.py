"""Hooks the guest instructions that must trap, found by scanning each code page once per mapping.

Unicorn has no exit for RDTSC, MOV CR3 or INVLPG, so hvsim scans a page's bytes when an
instruction fetch first maps it (gva page -> pfn), and puts a one-address code hook on every
byte where such an instruction may start, prefixes included.  sensitive_insns.py and
shadow_insns.py say which opcodes, and what their hooks do.
"""

from typing import Any

import numpy as np
import numpy.typing as npt
from unicorn import UC_HOOK_CODE, Uc

from ..types import PAGE_SIZE
from .binding import weakly

MAX_PREFIXES = 14  # an x86 instruction is at most 15 bytes
PREFIXES = frozenset([0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3, *range(0x40, 0x50)])


class CodeScanner:
    """One vCPU's scan for one family of instructions; subclasses name the opcodes and the hook."""

    def __init__(self, uc: Uc) -> None:
        self.uc = uc
        self._scanned: dict[int, int] = {}  # gva page -> pfn it was scanned at
        self._hooked: set[int] = set()

    def candidates(self, page: npt.NDArray[np.uint8]) -> list[int]:
        """Offsets in the page where an instruction of the family's opcodes may be."""
        raise NotImplementedError

    def _at(self, uc: Uc, address: int, size: int, _ud: Any) -> None:
        raise NotImplementedError

    def forget_scans(self) -> None:
        """The host rewrote a frame that held code: scan pages again when next fetched."""
        self._scanned.clear()

    def scan(self, gva_page: int, pfn: int, frames: npt.NDArray[np.uint8]) -> None:
        """A TLB fill for an instruction fetch from gva_page, mapped to frame pfn of `frames`."""
        if self._scanned.get(gva_page) == pfn:
            return
        self._scanned[gva_page] = pfn
        page = frames[pfn]
        base = gva_page * PAGE_SIZE
        for off in self.candidates(page):
            start = off
            while start > 0 and off - start < MAX_PREFIXES and int(page[start - 1]) in PREFIXES:
                start -= 1
            if start == 0 and off < MAX_PREFIXES:
                # Prefixes may begin on the page before: hook every possible start there too.
                start = off - MAX_PREFIXES
            for addr in range(base + start, base + off + 1):
                self._hook(addr)

    def _hook(self, addr: int) -> None:
        if addr in self._hooked or addr < 0:
            return
        self._hooked.add(addr)
        # Added from inside the TLB-fill hook, before Unicorn translates any block of this page.
        self.uc.hook_add(UC_HOOK_CODE, weakly(self._at), None, addr, addr)  # weakly: the binding's hooks are cycles
