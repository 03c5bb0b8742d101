"""Which frame each guest code page was fetched from, so that the per-block instruction counts stay true.

_icount.c caches a translated block's instruction count by the block's address
(cpu/blocks.py decodes it).  The count holds while the code behind that address
stays: it is dropped when an instruction fetch maps the address's page to another
frame (a new address space, a page the host remapped), when the guest writes to a
frame it executed from (if the write takes a TLB fill: self-modifying code is not
supported), and when the host rewrites a code frame.  A TLB flush alone keeps the
counts and the frames seen: the first fetch from each page after it takes a fill,
which compares the page's frame with the one seen before.
"""

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from ..kvm.vm import Vm
from ..types import PAGE_SHIFT, PAGE_SIZE
from .blocks import read_code
from .clock import VcpuClock
from .walk import translate_peek


class CodePages:
    def __init__(self, vm: Vm, cr3: Callable[[], int], exec_seen: memoryview,
                 frame_bytes: npt.NDArray[np.uint8]) -> None:
        self._vm = vm
        self._cr3 = cr3
        self._exec_seen = exec_seen
        self._frame_bytes = frame_bytes  # FramePool.frames: pfn -> the frame's 4096 bytes
        self._frames: dict[int, int] = {}  # gva page -> the frame its code was last fetched from
        self.clock: VcpuClock | None = None

    def forget(self) -> None:
        self._frames.clear()
        if self.clock is not None:
            self.clock.forget_blocks()

    def fetched(self, vaddr: int, pfn: int) -> None:
        """A TLB fill for an instruction fetch from vaddr's page, mapped to frame pfn."""
        self._exec_seen[pfn] = True
        page = vaddr >> PAGE_SHIFT
        if self._frames.get(page, pfn) != pfn and self.clock is not None:
            self.clock.forget_blocks()  # this address's code now comes from another frame
        self._frames[page] = pfn

    def written(self, pfn: int) -> None:
        """A TLB fill for a guest write to frame pfn."""
        if self._exec_seen[pfn]:
            self.forget()

    def read(self, gva: int, length: int) -> bytes:
        """A translated block's bytes: from the frame its page was fetched from (what Unicorn translated), or,
        for a block across pages, a page at a time through the guest's tables (no exits)."""
        offset = gva & (PAGE_SIZE - 1)
        pfn = self._frames.get(gva >> PAGE_SHIFT)
        if pfn is not None and offset + length <= PAGE_SIZE:
            return self._frame_bytes[pfn, offset:offset + length].tobytes()
        read_guest = self._vm.read_guest
        return read_code(gva, length, lambda addr: translate_peek(self._cr3(), addr, read_guest), read_guest)


__all__ = ["CodePages"]
