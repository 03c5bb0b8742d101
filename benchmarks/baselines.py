"""The bare-hook Unicorn baseline, with no hvsim logic in it (hook-free Unicorn is in hookfree.py).

* `BareTlbUnicorn`: the same virtual-TLB setup hvsim uses (one `mem_map_ptr` over
  a FramePool-sized buffer allocated as hvsim allocates its frames), whose
  UC_HOOK_TLB_FILL callback in Python only fills the entry (identity, all
  permissions): no page walk, no sptes, no KVM.  The floor of this design for
  target 2 and for refills of mapped pages.  With `raw=True` (issue #13's floor) the
  hook is registered through raw ctypes, as hvsim registers its own
  (cpu/binding.py `add_tlb_fill_hook`): no binding wrapper between Unicorn and
  the Python fill, and each slice is one uc_emu_start() called with the GIL held, as
  hvsim calls it (cpu/binding.py `emu_start`, from _icount.c: the hook's ctypes callbacks
  then find the GIL theirs); without it, the binding's `hook_add` and `Uc.emu_start`
  (issue #6's floor).
"""

import ctypes
from typing import Any

import numpy as np
from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_INSN,
    UC_HOOK_TLB_FILL,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from hypervisor.build import build_host
from hypervisor.cpu import binding
from hypervisor.cpu.binding import add_tlb_fill_hook
from hypervisor.cpu.unicorn_vcpu import UNTIL
from hypervisor.profiles import get_profile
from hypervisor.types import PAGE_SIZE

from .guests import IMAGE_BASE, STACK_TOP

EXIT_PORT = 0xF4


# uc_emu_start(uc, begin, until, timeout, count) as a ctypes function that keeps the GIL (PYFUNCTYPE).
_UC_EMU_START_GIL_HELD = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                                           ctypes.c_uint64, ctypes.c_size_t)(binding._UC_EMU_START)


def emu_start_gil_held(uc: Any, begin: int, until: int, count: int = 0) -> None:
    """uc.emu_start(begin, until, count=count) with the GIL held during the run, as hvsim runs its vCPUs."""
    status = _UC_EMU_START_GIL_HELD(uc._uch, begin, until, 0, count)
    if status:
        raise UcError(status)


def run_in_slices(uc: Any, rip: int, insns: int, quantum: int, gil_held: bool = False) -> int:
    """Unicorn's own deterministic slicing: `count=` runs of `quantum`; returns the next RIP."""
    left = insns
    while left > 0:
        n = min(quantum, left)
        if gil_held:
            emu_start_gil_held(uc, rip, UNTIL, n)
        else:
            uc.emu_start(rip, UNTIL, count=n)
        rip = uc.reg_read(x86.UC_X86_REG_RIP)
        left -= n
    return rip


class BenchmarkError(RuntimeError):
    """A workload did not do what the benchmark relies on (a guest failed, a phase ended early)."""


class BareTlbUnicorn:
    """Virtual-TLB Unicorn whose Python TLB-fill hook does nothing but fill (identity map)."""

    def __init__(self, image: bytes, memory: int, raw: bool = False) -> None:
        # A host's frames as build.py allocates them for a run, so both see the same host page-fault costs.
        self.frames = build_host(get_profile("6.12"), memory // PAGE_SIZE).frames
        self.frames.data[IMAGE_BASE : IMAGE_BASE + len(image)] = np.frombuffer(image, dtype=np.uint8)
        self.memory = memory
        self.raw = raw
        self.fills = 0
        self.exited = False
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.mem_map_ptr(0, memory, UC_PROT_ALL, self.frames.data.ctypes.data)
        if raw:
            fill = self._fill
            self._raw_cb = add_tlb_fill_hook(uc, lambda vaddr, access, entry: fill(uc, vaddr, access, entry, None))
        else:
            uc.hook_add(UC_HOOK_TLB_FILL, self._fill)
        uc.hook_add(UC_HOOK_INSN, self._out, None, 1, 0, x86.UC_X86_INS_OUT)
        uc.reg_write(x86.UC_X86_REG_RSP, STACK_TOP)
        self.uc = uc
        self.rip = IMAGE_BASE

    def _fill(self, uc: Any, vaddr: int, access: int, entry: Any, _ud: object) -> bool:
        self.fills += 1
        if vaddr < self.memory:
            entry.paddr = vaddr & ~(PAGE_SIZE - 1)
            entry.perms = UC_PROT_ALL
        else:  # the page of `until - 1`, which Unicorn translates when a run ends
            entry.paddr = 0
            entry.perms = UC_PROT_READ | UC_PROT_EXEC
        return True

    def _out(self, uc: Any, port: int, size: int, value: int, _ud: object) -> None:
        if port == EXIT_PORT:
            self.exited = True
            uc.emu_stop()

    def run(self, insns: int, quantum: int) -> None:
        """Exactly `insns` instructions in `count=` slices (the guest must not exit meanwhile)."""
        self.rip = run_in_slices(self.uc, self.rip, insns, quantum, gil_held=self.raw)
        if self.exited:
            raise BenchmarkError("the guest exited before the phase ended")

    def run_to_exit(self, quantum: int, limit: int) -> None:
        uc = self.uc
        done = 0
        while not self.exited:
            if done >= limit:
                raise BenchmarkError(f"the guest did not exit within {limit} instructions")
            if self.raw:
                emu_start_gil_held(uc, self.rip, UNTIL, quantum)
            else:
                uc.emu_start(self.rip, UNTIL, count=quantum)
            self.rip = uc.reg_read(x86.UC_X86_REG_RIP)
            done += quantum
