"""The one place hvsim reaches past the public API of Unicorn's Python binding: written for Unicorn 2.1.4 only.

What it reaches into, and why (everything else in cpu/ uses the public API):

* `uclib` (the loaded libunicorn) and `Uc._uch` (the engine handle): the TLB-fill hook and
  the instruction counter of _icount.c (and OUT's hook) are registered as raw C callbacks
  with uc_hook_add(), without the binding's Python wrapper layers per call; CR3 is read
  with a raw uc_reg_read() from inside the TLB-fill hook; a TLB flush is one uc_ctl(), and a
  run one uc_emu_start(), both called by _icount.c from their addresses (no ctypes call);
  _icount.c gets uc_emu_stop()'s address.
* `uc_tlb_entry`: the struct a TLB-fill hook fills.
* `Uc._hook_exception`: where the binding's own hook wrappers keep an exception raised
  in a hook; the raw TLB-fill and OUT hooks keep theirs there too, and `emu_start` here
  re-raises it.
* `UcContext.context` / `.size`: the saved CPU state, patched to reset QEMU's
  `env->old_exception` (see `reset_old_exception`).

`require_unicorn()` checks both the binding (`unicorn.__version__`) and the library
(`uc_version()`) and refuses any other version with a clear HvsimError, since these are
not interfaces Unicorn keeps stable.
"""

import contextlib
import ctypes
import struct
import weakref
from collections.abc import Callable
from functools import cache
from typing import Any

import unicorn
from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_OK,
    UC_HOOK_BLOCK,
    UC_HOOK_INSN,
    UC_HOOK_INTR,
    UC_HOOK_TLB_FILL,
    UC_MODE_64,
    Uc,
    UcError,
)
from unicorn import x86_const as x86

from ..errors import UnsupportedUnicorn
from . import _icount

try:
    from unicorn.unicorn_py3.unicorn import uc_tlb_entry, uclib
except ImportError:  # another Unicorn: require_unicorn() says which, before anything here is used
    uc_tlb_entry = uclib = None

UNICORN_VERSION = "2.1.4"
# uc_version()'s combined number is major << 24 | minor << 16 | patch << 8 | extra.
_UC_VERSION_COMBINED = 0x02_01_04

_OUT_CFUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p)
_TLB_FILL_CFUNC = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int,
                                   ctypes.POINTER(uc_tlb_entry), ctypes.c_void_p)


@cache
def unicorn_version_problem() -> str | None:
    """What is wrong with the installed Unicorn for this module, or None."""
    binding = getattr(unicorn, "__version__", "unknown")
    if binding != UNICORN_VERSION:
        return f"the installed Unicorn Python binding is {binding}"
    major, minor, combined = unicorn.uc_version()
    if combined >> 8 != _UC_VERSION_COMBINED:
        return f"the loaded libunicorn is {major}.{minor} (uc_version {combined:#x})"
    if uclib is None:
        return "the Unicorn binding has no unicorn.unicorn_py3.unicorn module"
    return None


def require_unicorn() -> None:
    problem = unicorn_version_problem()
    if problem is not None:
        raise UnsupportedUnicorn(
            f"{problem}, but hvsim's CPU model uses private parts of Unicorn {UNICORN_VERSION}'s binding "
            f"(hypervisor/cpu/binding.py) and runs on that version only: install it with "
            f"`pip install unicorn=={UNICORN_VERSION}` (the README's install command does).")


def new_x86_64() -> Uc:
    """A 64-bit x86 Unicorn instance, after checking that this module fits the installed Unicorn."""
    require_unicorn()
    return Uc(UC_ARCH_X86, UC_MODE_64)


def raw_hook_add(uc: Uc, htype: int, callback: ctypes.c_void_p, user_data: ctypes.c_void_p | None,
                 *insn: ctypes.c_int) -> None:
    """uc_hook_add() with a C callback pointer, over the whole address range (UC_HOOK_INSN: and the instruction)."""
    handle = ctypes.c_size_t()
    err = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), htype, callback, user_data, ctypes.c_uint64(1),
                            ctypes.c_uint64(0), *insn)
    if err != 0:
        raise RuntimeError(f"unicorn refused hook type {htype} (error {err})")


def _code_address(cfunc: Any) -> ctypes.c_void_p:
    """The C entry point of a ctypes callback, read without ctypes.cast (which makes the callback
    refer to itself, a cycle that keeps the vCPU alive until a full GC)."""
    return ctypes.c_void_p(ctypes.c_void_p.from_address(ctypes.addressof(cfunc)).value)


def _function_address(cfunc: Any) -> int:
    """The C entry point of a libunicorn function or a ctypes callback, as a number (for _icount.c)."""
    return _code_address(cfunc).value or 0


# uc_emu_start()'s address, which _icount.emu_start calls (0 without the binding: require_unicorn() refuses first).
_UC_EMU_START = _function_address(uclib.uc_emu_start) if uclib is not None else 0


def weakly(method: Callable[..., Any]) -> Callable[..., Any]:
    """`method`, called through a weak reference to its object: the binding's hook wrappers are
    reference cycles of their own, and must not keep the vCPU alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> Any:
        bound = ref()
        return bound(*args) if bound is not None else None

    return call


class Severable:
    """A hook's callable whose link to its method is cut when the vCPU closes (`sever`): the binding's hook
    wrappers are reference cycles of their own, which outlive hook_del until a full GC and must not keep
    the vCPU alive.  (`weakly` does that for objects that take weak references; the compiled build's
    native UnicornVcpu takes none.)"""

    __slots__ = ("method",)

    def __init__(self, method: Callable[..., Any]) -> None:
        self.method: Callable[..., Any] | None = method

    def __call__(self, *args: Any) -> Any:
        method = self.method
        return method(*args) if method is not None else None

    def sever(self) -> None:
        self.method = None


def close_uc(uc: Uc) -> None:
    """Delete every Python hook and uc_close() now, not when a full GC reaches the binding's cycles."""
    for handle in list(uc._callbacks):
        uc.hook_del(handle)
    uc._Uc__finalizer()


def add_tlb_fill_hook(uc: Uc, fill: Callable[[int, int, Any], bool],
                      on_exception: Callable[[], None] | None = None) -> object:
    """Register fill(vaddr, access, entry) as the raw UC_HOOK_TLB_FILL callback; entry is a uc_tlb_entry.

    An exception in fill is kept as the binding's own wrappers keep it (re-raised by
    `emu_start`), after calling on_exception; the fill is refused and the run stops.
    Returns the ctypes callback, which must stay alive as long as uc.
    """

    def raw(_handle: int, vaddr: int, access: int, entry: Any, _ud: object) -> bool:
        try:
            return fill(vaddr, access, entry.contents)
        except BaseException as exc:  # as the binding's own wrapper: record, stop
            if uc._hook_exception is None:
                uc._hook_exception = exc
            if on_exception is not None:
                on_exception()
            uc.emu_stop()
            return False

    callback = _TLB_FILL_CFUNC(raw)
    raw_hook_add(uc, UC_HOOK_TLB_FILL, _code_address(callback), None)
    return callback


def add_out_hook(uc: Uc, out: Callable[[int, int, int], None]) -> object:
    """Register out(port, size, value) as the raw UC_HOOK_INSN callback of OUT: one Python layer per port write,
    where the binding's hook_add adds three (its exception guard, its argument adapter, the weak method).

    An exception in `out` is kept as add_tlb_fill_hook keeps it.  Returns the ctypes callback, which must stay
    alive as long as uc, and be dropped with it (it refers to `out`'s object)."""

    def raw(_uc: int, port: int, size: int, value: int, _ud: object) -> None:
        try:
            out(port, size, value)
        except BaseException as exc:  # as the binding's own wrapper: record, stop
            if uc._hook_exception is None:
                uc._hook_exception = exc
            uc.emu_stop()

    callback = _OUT_CFUNC(raw)
    raw_hook_add(uc, UC_HOOK_INSN, _code_address(callback), None, ctypes.c_int(x86.UC_X86_INS_OUT))
    return callback


def _reg_reader(uc: Uc, reg_id: int) -> Callable[[], int]:
    """A cheap read of one 64-bit register (a raw uc_reg_read, about 0.4 us), for use inside hooks."""
    reg_read, uch = uclib.uc_reg_read, uc._uch
    buf = ctypes.c_uint64()
    ref = ctypes.byref(buf)

    def read() -> int:
        reg_read(uch, reg_id, ref)
        return buf.value

    return read


def tlb_flusher(uc: Uc) -> Callable[[], None]:
    """uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE) as one uc_ctl() call from C (KVM's remote flushes: one per kick)."""
    ctl, fn, uch = _icount.ctl, _function_address(uclib.uc_ctl), uc._uch.value
    # The binding's Uc.ctl encoding: op << 30 | nargs << 26 | ctl (no arguments).
    code = UC_CTL_IO_WRITE << 30 | UC_CTL_TLB_FLUSH

    def flush() -> None:
        err = ctl(fn, uch, code)
        if err != 0:
            raise UcError(err)

    return flush


def cr3_reader(uc: Uc) -> Callable[[], int]:
    """CR3, read inside the TLB-fill hook."""
    return _reg_reader(uc, x86.UC_X86_REG_CR3)


def emu_start(uc: Uc, begin: int, until: int) -> UcError | None:
    """uc.emu_start(): the UcError of a run the CPU model failed (None: it ended normally).

    When a hook raised and the run still ended normally, the binding raises that
    exception here; when the hook also failed the run (a refused TLB fill), the run's
    UcError is returned and the exception is left for `take_hook_exception`.  What
    the binding's Uc.emu_start does, as one uc_emu_start() called by _icount.c (no timeout,
    no count; no ctypes call): a vCPU runs once per host turn, tens of thousands of times in a run.
    """
    uc._hook_exception = None
    status = _icount.emu_start(_UC_EMU_START, uc._uch.value, begin, until)
    if status != UC_ERR_OK:
        return UcError(status)
    raised: BaseException | None = uc._hook_exception
    if raised is not None:
        raise raised
    return None


def take_hook_exception(uc: Uc) -> BaseException | None:
    """The exception a hook raised in the last run (an invariant violation, a bug), cleared; None if none."""
    raised: BaseException | None = uc._hook_exception
    uc._hook_exception = None
    return raised


MISS_CFUNC = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64)

# _icount.c's struct icount, which Python reads and writes between and during runs (its fields as attributes).
ICount = _icount.ICount


def add_icount_hook(uc: Uc, miss: Callable[[int, int], int]) -> tuple[ICount, object]:
    """Register _icount.c's block counter as a raw UC_HOOK_BLOCK; `miss(pc, size)` gives the instruction
    count of a block the cache lacks (0: it failed).  Returns the (zeroed) struct and the ctypes callback,
    which must stay alive as long as uc.

    It must stay the vCPU's only block hook: Unicorn 2.1.4 calls the only hook of its type straight from
    the translated code (qemu/include/tcg/tcg-op.h gen_uc_tracecode, uc_add_inline_hook), and two or more
    through helper_uc_tracecode, which walks the hook list (two counting hooks cost three times what one
    does: benchmarks/block_hook.py)."""
    callback = MISS_CFUNC(miss)
    # Addresses read without ctypes.cast, whose reference cycles would keep the callback alive until a full GC.
    ic = ICount(_function_address(uclib.uc_emu_stop), _function_address(callback))
    ic.generation = 1  # the zeroed cache entries are of generation 0: never a hit
    raw_hook_add(uc, UC_HOOK_BLOCK, ctypes.c_void_p(_icount.hook_address()), ctypes.c_void_p(ic.address))
    return ic, callback


def rip_reader(uc: Uc) -> Callable[[], int]:
    """RIP, for the exact count inside a block."""
    return _reg_reader(uc, x86.UC_X86_REG_RIP)


class OldExceptionReset:
    """Clears QEMU's `env->old_exception` after hvsim delivered an exception raised by the CPU model.

    QEMU's check_exception() (target/i386/excp_helper.c) turns a second
    contributory fault into #DF, and a third into a shutdown, unless do_interrupt()
    reset old_exception to -1 in between; Unicorn never calls do_interrupt(), so
    after two handled #DE the model would report a #DF.  The field is found once
    per process by a probe (a #DE on a scratch Uc: the one int32 of the saved
    context that goes from -1 to 0), then reset through uc_context_save/restore.
    """

    _offset: int | None = None
    _probed = False

    @classmethod
    def offset(cls, probe: Callable[[], tuple[bytes, bytes]]) -> int | None:
        if not cls._probed:
            cls._probed = True
            before, after = probe()
            hits = [off for off in range(0, min(len(before), len(after)) - 3, 4)
                    if struct.unpack_from("<i", before, off)[0] == -1 and struct.unpack_from("<i", after, off)[0] == 0]
            cls._offset = hits[0] if len(hits) == 1 else None
        return cls._offset

    @staticmethod
    def patch(buffer_address: int, size: int, offset: int) -> None:
        if offset + 4 <= size:
            ctypes.memmove(buffer_address + offset, struct.pack("<i", -1), 4)


def probe_old_exception() -> tuple[bytes, bytes]:
    """Saved contexts of a scratch Uc before and after a #DE that its UC_HOOK_INTR caught (see OldExceptionReset)."""
    uc = new_x86_64()
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, bytes.fromhex("31c9f7f1"))  # xor ecx, ecx; div ecx
    uc.reg_write(x86.UC_X86_REG_RSP, 0x8000)
    before = context_bytes(uc)
    uc.hook_add(UC_HOOK_INTR, lambda u, _n, _d: u.emu_stop())
    with contextlib.suppress(UcError):
        uc.emu_start(0x1000, 0x2000)
    return before, context_bytes(uc)


def context_bytes(uc: Uc) -> bytes:
    ctx = uc.context_save()
    return ctypes.string_at(ctx.context, ctx.size)


def reset_old_exception(uc: Uc) -> None:
    """Set env->old_exception back to -1, as QEMU's do_interrupt() does after a delivery."""
    offset = OldExceptionReset.offset(probe_old_exception)
    if offset is None:
        return
    ctx = uc.context_save()
    OldExceptionReset.patch(ctypes.cast(ctx.context, ctypes.c_void_p).value or 0, ctx.size, offset)
    uc.context_restore(ctx)


__all__ = ["UNICORN_VERSION", "ICount", "Severable", "add_icount_hook", "add_out_hook", "add_tlb_fill_hook",
           "close_uc", "cr3_reader", "emu_start", "new_x86_64", "raw_hook_add", "require_unicorn",
           "reset_old_exception", "take_hook_exception", "tlb_flusher", "unicorn_version_problem", "weakly"]
