"""What _icount.c's block hook costs Unicorn 2.1.4 by itself, on the 16 guests of figure 4d (issue #13).

The same 16 `kernels` guests as benchmarks/hookfree.py (Unicorn's own MMU, memory
pre-mapped, a hook on OUT only), run three ways in one process, alternating: hook-free;
with hvsim's C block hook (cpu/_icount.c, registered as hvsim registers it, with a limit
it never reaches, so it only counts); and with two such hooks.  Unicorn 2.1.4 calls a
block hook that is the only one of its type straight from the translated code
(qemu/include/tcg/tcg-op.h gen_uc_tracecode -> uc_add_inline_hook), and two or more
through its helper_uc_tracecode (uc.c), which walks the hook list: the third column
shows what the direct call saves.  CPU seconds inside emu_start (`time.process_time`),
medians; the counters show that the hook counted every instruction.

`python -m benchmarks.block_hook [--reps N]`
"""

import argparse
import statistics
import time
from collections.abc import Sequence

from hypervisor.cpu.binding import ICount, add_icount_hook
from hypervisor.cpu.blocks import instruction_offsets
from hypervisor.sim import GUEST_IMAGES

from .hookfree import HookFreeGuest

VMS = 16
MEMORY = 64 << 20
_NEVER = 1 << 62
LABELS = ("hook-free", "one block hook (called directly)", "two block hooks (helper_uc_tracecode)")


def _run(hooks: int) -> tuple[float, int]:
    """(CPU seconds in emu_start, instructions the first hook of each guest counted)."""
    image = str(GUEST_IMAGES / "kernels.bin")
    guests = [HookFreeGuest(image, MEMORY, "", i, VMS) for i in range(VMS)]
    counters: list[ICount] = []
    callbacks: list[object] = []
    for guest in guests:
        uc = guest.uc

        def count(pc: int, size: int, uc: object = uc) -> int:
            return len(instruction_offsets(bytes(uc.mem_read(pc, size))))  # type: ignore[attr-defined]

        for k in range(hooks):
            ic, callback = add_icount_hook(uc, count)
            ic.limit = _NEVER
            # Both must outlive the run: the hook writes into ic's struct (a freed second ICount's memory
            # was once reused by the next guest's first, which then counted for two).
            callbacks.append((ic, callback))
            if k == 0:
                counters.append(ic)
    t0 = time.process_time()
    for guest in guests:
        guest.run()
    return time.process_time() - t0, sum(int(ic.counter) for ic in counters)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.block_hook", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    seconds: list[list[float]] = [[], [], []]
    counted = [0, 0, 0]
    for _ in range(args.reps):
        for hooks in range(3):
            s, counted[hooks] = _run(hooks)
            seconds[hooks].append(s)
    base = statistics.median(seconds[0])
    for hooks, label in enumerate(LABELS):
        m = statistics.median(seconds[hooks])
        runs = ", ".join(f"{s:.3f}" for s in sorted(seconds[hooks]))
        print(f"{label:40s} {m:.3f} s  (+{m - base:.3f} s; runs {runs})"
              + (f"  {counted[hooks]:,} instructions counted" if hooks else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
