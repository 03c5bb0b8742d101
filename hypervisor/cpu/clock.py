"""A vCPU's simulated clock: instructions retired, counted exactly in a slice, plus retried faults' cost; its TSC.

Instructions are counted per translated block by the C block hook of _icount.c,
which also ends the slice at the first block boundary at or after its limit.  Inside
a block the counter already holds the whole block, so the exact time at an
instruction is taken from RIP: the counter less the block's instructions from RIP on
(cpu/blocks.py knows where they start).  As with the per-instruction hook this
replaces, the instruction an exit or an exception happens in counts as begun (so a
faulting instruction counts once per try), and a data access abandoned at the end of
a slice does not.  A fault that lost the mmu_notifier_retry race is charged
FAULT_RETRY_COST instruction-times on the same counter; `time` = instructions + that
cost, and it is what the guest's TSC and the scheduler see.  Retries with no
instruction retired in between are counted for the livelock diagnosis.
"""

from collections.abc import Callable

from unicorn import Uc

from ..errors import Livelock
from ..kvm.vcpu import FAULT_RETRY_COST, LIVELOCK_RETRIES, Vcpu
from ..types import PAGE_SHIFT
from ..vmm.layout import TSC_KHZ
from .binding import add_icount_hook, rip_reader
from .blocks import BlockMap


class VcpuClock:
    __deletable__ = ("_miss_cb",)  # close() (mypyc: a compiled class names what it lets go)

    def __init__(self, uc: Uc, insns_per_ms: int, peek_code: Callable[[int, int], bytes]) -> None:
        self._insns_per_ms = insns_per_ms
        self.blocks = BlockMap(peek_code)
        self.miss_error: BaseException | None = None
        self.ic, self._miss_cb = add_icount_hook(uc, self._miss)
        self._read_rip = self.read_rip = rip_reader(uc)
        # This slice: instructions retired, and time spent in retried faults (part of the counter).
        self.slice_retired = 0
        self.stall_in_slice = 0
        # Before this slice: instructions retired, and time (instructions + retries).
        self._retired_before = 0
        self._time_before = 0
        # Retried faults since an instruction last retired (_retry_mark: instructions then).
        self._retry_mark = -1
        self.retries = 0
        # Set by the vCPU while Unicorn runs / while a TLB fill for an instruction fetch runs
        # (a fetch fill comes between blocks: the counter is exact there, whatever RIP says).
        self.running = False
        self.fetching = False
        # Time in the slice where the run stopped inside a block (an exception, a shutdown), if it did.
        self._stopped_at: int | None = None

    def close(self) -> None:
        """Drop the cycles through the vCPU (the miss callback, the code reader); Unicorn is closed already."""
        del self._miss_cb
        self.blocks.close()

    def _miss(self, pc: int, size: int) -> int:
        try:
            return self.blocks.count(pc, size)
        except BaseException as exc:  # kept, and re-raised by the vCPU after the run
            self.miss_error = exc
            return 0

    def forget_blocks(self) -> None:
        """The code behind some address may have changed: _icount.c's counts and the offsets go."""
        self.ic.generation += 1
        self.blocks.forget()

    def start_slice(self, limit: int, period: int = 0, hard: int = 0) -> None:
        """A slice ends at the first block boundary at or after `limit`; with `period`, that boundary only
        ends a host turn, and the next turns (of `period`) follow in the same run up to `hard`."""
        self._retired_before += self.slice_retired
        self._time_before += self.slice_retired + self.stall_in_slice
        self.slice_retired = self.stall_in_slice = 0
        self._stopped_at = None
        # _icount.c's struct for the run: counter 0, these limits, no turn ended, not stopped, no block started.
        self.ic.start_run(limit, period, hard)

    @property
    def turns_ended(self) -> tuple[int, int]:
        """(host turns that ended inside this slice, time in the slice where the last of them ended)."""
        return int(self.ic.turns), int(self.ic.turn_start)

    def exact(self, begun: bool = True) -> int:
        """Time in the slice at the instruction at RIP, during a run (it counts as begun if `begun`)."""
        ic = self.ic
        if self.fetching or not self.running:
            return int(ic.counter)
        offset = self._read_rip() - ic.block_pc
        if not 0 <= offset < ic.block_size:
            return int(ic.counter)
        before = self.blocks.before(ic.block_pc, ic.block_size, offset)
        return int(ic.counter) - int(ic.block_count) + before + (1 if begun else 0)

    def leave_block(self) -> None:
        """A hook moves RIP past the instruction at RIP (it counts as retired): Unicorn leaves the block
        there, so the counter drops the block's instructions after it."""
        ic = self.ic
        ic.counter = self.exact()
        ic.leave_block()

    def stop_at(self, time: int) -> None:
        """The run stops inside a block with `time` spent in the slice (first caller wins)."""
        if self._stopped_at is None:
            self._stopped_at = time

    def end_slice(self) -> int:
        """Instructions retired in the slice, once Unicorn returned."""
        ic = self.ic
        if self._stopped_at is not None:
            ic.counter = self._stopped_at
        self.slice_retired = int(ic.counter) - self.stall_in_slice
        return self.slice_retired

    def rip_after_run(self) -> int:
        """RIP once Unicorn returned: the block where the C hook stopped the run, else as Unicorn has it."""
        ic = self.ic
        if ic.stopped and self._stopped_at is None:
            return int(ic.stop_pc)
        return self._read_rip()

    def stop_now(self) -> None:
        """No further block starts in this slice."""
        self.ic.limit = self.ic.counter
        self.ic.period = 0

    def next_rip(self) -> int:
        """The address of the instruction after the one at RIP (inside the running block)."""
        ic = self.ic
        rip = self._read_rip()
        return int(ic.block_pc) + self.blocks.end_of(ic.block_pc, ic.block_size, rip - ic.block_pc)

    @property
    def stopped(self) -> bool:
        """The slice ended at a block boundary (the limit was reached), as opposed to Unicorn returning on its own."""
        return bool(self.ic.stopped) and self._stopped_at is None

    @property
    def time_in_slice(self) -> int:
        return self.exact()

    def fault_retried(self, vcpu: Vcpu, gfn: int) -> None:
        """A retried fault: charge its time.  LIVELOCK_RETRIES of them in a row with no instruction
        retired fail the vCPU and raise Livelock."""
        ic = self.ic
        ic.counter += FAULT_RETRY_COST
        self.stall_in_slice += FAULT_RETRY_COST
        retired = self._retired_before + self.exact() - self.stall_in_slice
        if retired != self._retry_mark:
            self._retry_mark, self.retries = retired, 0
        self.retries += 1
        if self.retries >= LIVELOCK_RETRIES:
            why = (f"livelock: the EPT violation at gpa {gfn << PAGE_SHIFT:#x} was retried {self.retries} times "
                   "with no instruction retired (the fault path never left an spte that allows the access: e.g. a "
                   "notifier ran between gfn_to_pfn and the mmu_notifier_retry check every time, as an --inject "
                   "at after_gfn_to_pfn makes it)")
            vcpu.fail(why, Livelock)
            raise Livelock(f"vm{vcpu.vm.vm_id}: {why}.")

    def tsc(self) -> int:
        """The guest's TSC: its time before the running instruction, at TSC_KHZ."""
        return (self._time_before + self.exact() - 1) * TSC_KHZ // self._insns_per_ms


__all__ = ["VcpuClock"]
