"""Where the instructions of a translated block start: for the per-block counts of _icount.c and exact counts.

Unicorn (QEMU's TCG) runs guest code in translated blocks; _icount.c adds a block's
instruction count when the block starts, so it needs the count once per block, and
the vCPU's clock needs, at an exit in the middle of a block, how many of its
instructions come before RIP.  Both come from decoding the block's bytes with
capstone: the offsets of its instructions, cached by the bytes themselves (x86
instruction lengths do not depend on the address), so a block is decoded once per
content however often the address-keyed caches are dropped.  A byte sequence
capstone cannot decode is the block's last instruction (QEMU ends a block at an
invalid opcode and counts it, as the per-instruction hook did).
"""

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from functools import lru_cache

import capstone

from ..types import PAGE_SIZE, Gpa

_MAX_CONTENTS = 1 << 14
# QEMU's TCG_MAX_INSNS: no translated block is longer, so no slice overshoots its limit by more.
MAX_BLOCK_INSNS = 512


@lru_cache(maxsize=1)
def _md() -> capstone.Cs:
    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


@lru_cache(maxsize=_MAX_CONTENTS)
def instruction_offsets(code: bytes) -> tuple[int, ...]:
    """Offsets in `code` (one translated block) where its instructions start."""
    offsets = []
    end = 0
    for address, size, _, _ in _md().disasm_lite(code, 0):
        offsets.append(address)
        end = address + size
    if end < len(code):
        offsets.append(end)  # an undecodable instruction ends the block
    return tuple(offsets)


def read_code(gva: int, length: int, translate: Callable[[int], int | None],
              read_guest: Callable[[Gpa, int], bytes]) -> bytes:
    """Up to `length` bytes from gva, a page at a time, as far as they translate (the VMM's view, no exits)."""
    out = bytearray()
    while length > 0:
        gpa = translate(gva)
        if gpa is None:
            break
        chunk = min(length, PAGE_SIZE - (gva & (PAGE_SIZE - 1)))
        try:
            out += read_guest(Gpa(gpa), chunk)
        except ValueError:
            break
        gva += chunk
        length -= chunk
    return bytes(out)


def _closed(gva: int, length: int) -> bytes:
    raise RuntimeError("the vCPU is closed")


class BlockMap:
    """One vCPU's view of its blocks: (address, size) -> instruction offsets, read through the guest's tables."""

    def __init__(self, peek_code: Callable[[int, int], bytes]) -> None:
        self._peek_code = peek_code
        self._offsets: dict[tuple[int, int], tuple[int, ...]] = {}

    def close(self) -> None:
        self._peek_code = _closed
        self._offsets.clear()

    def forget(self) -> None:
        """The code behind an address may have changed (cleared with _icount.c's cache)."""
        self._offsets.clear()

    def offsets(self, pc: int, size: int) -> tuple[int, ...]:
        key = (pc, size)
        found = self._offsets.get(key)
        if found is None:
            code = self._peek_code(pc, size)
            if len(code) != size:
                raise RuntimeError(f"a translated block at {pc:#x} ({size} bytes) is not readable through the "
                                   "guest's page tables")
            found = self._offsets[key] = instruction_offsets(code)
        return found

    def count(self, pc: int, size: int) -> int:
        return len(self.offsets(pc, size))

    def before(self, pc: int, size: int, offset: int) -> int:
        """Instructions of the block that start before `offset` (the instruction at RIP = pc + offset)."""
        return bisect_left(self.offsets(pc, size), offset)

    def end_of(self, pc: int, size: int, offset: int) -> int:
        """Where the instruction at `offset` of the block ends (the next one's offset, or the block's size)."""
        offsets = self.offsets(pc, size)
        after = bisect_right(offsets, offset)
        return offsets[after] if after < len(offsets) else size


__all__ = ["MAX_BLOCK_INSNS", "BlockMap", "instruction_offsets", "read_code"]
