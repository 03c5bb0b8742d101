"""A vCPU's simulated clock: instructions retired, counted exactly in a slice, plus retried faults' cost; its TSC.

Instructions are counted by the C code hook of _icount.c, which also ends the slice
when its limit is reached.  A fault that lost the mmu_notifier_retry race is charged
FAULT_RETRY_COST instruction-times on the same counter, so it uses up the slice as
instructions do; `time` = instructions + that cost, and it is what the guest's TSC
and the scheduler see.  Retries with no instruction retired in between are counted
for the livelock diagnosis.
"""

from unicorn import Uc

from ..errors import Livelock
from ..kvm.vcpu import FAULT_RETRY_COST, LIVELOCK_RETRIES, Vcpu
from ..types import PAGE_SHIFT
from ..vmm.layout import TSC_KHZ
from .binding import add_icount_hook


class VcpuClock:
    def __init__(self, uc: Uc, insns_per_ms: int) -> None:
        self._insns_per_ms = insns_per_ms
        self.ic = add_icount_hook(uc)
        # This slice: instructions retired, and time spent in retried faults (part of ic.counter).
        self.slice_retired = 0
        self.stall_in_slice = 0
        # Before this slice: instructions retired, and time (instructions + retries).
        self._retired_before = 0
        self._time_before = 0
        # Retried faults since an instruction last retired (_retry_mark: instructions then).
        self._retry_mark = -1
        self.retries = 0

    def start_slice(self, limit: int) -> None:
        self._retired_before += self.slice_retired
        self._time_before += self.slice_retired + self.stall_in_slice
        self.slice_retired = self.stall_in_slice = 0
        ic = self.ic
        ic.counter = 0
        ic.limit = limit
        ic.stopped = 0

    def end_slice(self, unfinished: bool) -> int:
        """Instructions retired in the slice; `unfinished`: the last one counted did not complete."""
        self.slice_retired = int(self.ic.counter) - self.stall_in_slice - (1 if unfinished else 0)
        return self.slice_retired

    def stop_now(self) -> None:
        """Make the C hook stop before the next instruction."""
        self.ic.limit = self.ic.counter

    @property
    def stopped(self) -> bool:
        """The C hook ended the slice (the limit was reached), as opposed to Unicorn returning on its own."""
        return bool(self.ic.stopped)

    @property
    def time_in_slice(self) -> int:
        return int(self.ic.counter)

    def fault_retried(self, vcpu: Vcpu, gfn: int) -> bool:
        """A retried fault: charge its time; true if that used up the slice.  LIVELOCK_RETRIES of them
        in a row with no instruction retired fail the vCPU and raise Livelock."""
        ic = self.ic
        ic.counter += FAULT_RETRY_COST
        self.stall_in_slice += FAULT_RETRY_COST
        retired = self._retired_before + int(ic.counter) - self.stall_in_slice
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
        return bool(ic.counter >= ic.limit)

    def tsc(self) -> int:
        """The guest's TSC: its time before the running instruction (counted already), at TSC_KHZ."""
        return (self._time_before + int(self.ic.counter) - 1) * TSC_KHZ // self._insns_per_ms


__all__ = ["VcpuClock"]
