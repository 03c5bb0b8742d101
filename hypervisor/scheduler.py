"""The deterministic scheduler: vCPU time slices and host events (ksmd wake-ups, writes to
/sys/kernel/mm/ksm/run) as timed events on one simulated clock.

Overview.  Simulated time is instructions retired (plus retried faults' cost), summed over
all vCPUs, as if they shared one host CPU round-robin.  `Environment` is a heap of timed
host events in the manner of SimPy's: an event is (time, sequence number, action), and ties
go in the order the events were scheduled.  Only vCPU slices move the clock, so the slices are
a plain loop around the heap (`Scheduler._turns`), which runs what is due before each slice.  Each runnable
vCPU in turn holds the host CPU for one `HOST_TIMESLICE` of simulated time (the host
scheduler's slice, a constant of the model), and a turn ends early where the vCPU stops or
where the next host event is due (ksmd preempts it; the next vCPU runs after ksmd), so that
ksmd runs at its simulated time.  hvsim executes a turn in chunks of at most `quantum`
instructions (checks, progress and Ctrl-C happen between chunks); since every rule above is
in simulated time, the quantum changes no result.  After a chunk, the host events due by
then run (in time order), then the end-of-chunk checks and hooks, then the next chunk.
A lone runnable vCPU with nothing to do where its turn ends (`_lone`) runs its turns one
after another inside one run, up to the next host event or `LONE_RUN` instructions: the C block
hook (cpu/_icount.c) starts each next turn at the block boundary where the turn ended, as this
loop would, so that saves a Unicorn run and the scheduler's round trip per turn, and nothing else.
ksmd wakes every `sleep_millisecs` (at `insns_per_ms`); with sleep_millisecs=0 it runs after
every turn.  ksmd's own work takes no simulated time.  Same inputs -> same counts, byte for
byte, at every quantum.
"""

import heapq
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from .errors import GuestTimeout
from .kvm.vcpu import VcpuState
from .smp import stop_vm_after_failure

if TYPE_CHECKING:
    from .sim import Simulation

Action = Callable[[], None]

# Tested at every turn: a module constant is one lookup, an Enum member read through its class several.
_RUNNABLE: Final = VcpuState.RUNNABLE

# The host scheduler's time slice, in instructions: how long a runnable vCPU keeps the shared host
# CPU before the next one runs.  A model constant (the old default quantum), so that how VMs
# interleave, and so everything ksmd finds, never depends on --quantum.
HOST_TIMESLICE = 10_000
# The fast path for a lone vCPU (`Scheduler._lone`): its turns follow each other inside one run of
# at most this many instructions (a few milliseconds of wall time: Ctrl-C is seen between runs).
LONE_RUN = 100 * HOST_TIMESLICE


class Environment:
    """A heap of timed host events: by time, then the order of scheduling (a sequence number)."""

    def __init__(self) -> None:
        self._queue: list[tuple[int, int, Action]] = []
        self._seq = itertools.count()

    def schedule(self, at: int, action: Action) -> None:
        heapq.heappush(self._queue, (at, next(self._seq), action))

    def clear(self) -> None:
        self._queue.clear()

    def next_time(self) -> int | None:
        return self._queue[0][0] if self._queue else None

    def run_due(self, now: int) -> None:
        """Run every event due by `now` (host events take no simulated time: only slices move the clock)."""
        queue = self._queue
        while queue and queue[0][0] <= now:
            action = heapq.heappop(queue)[2]
            action()


class Scheduler:
    """One run's events: vCPU slices round-robin, ksmd wake-ups, `--ksm-run-at` writes."""

    def __init__(self, sim: "Simulation") -> None:
        self.sim = sim
        self.env = Environment()
        cfg = sim.config
        self.ksm_period = cfg.ksm.sleep_millisecs * cfg.insns_per_ms
        self._next_tick = self.ksm_period
        # The run's limits, read at every turn.
        self._quantum = cfg.quantum
        self._max_insns = cfg.max_insns
        # What is left of the running vCPU's turn on the host CPU.
        self._turn_left = HOST_TIMESLICE

    def run(self) -> None:
        sim = self.sim
        ksm = sim.ksm
        if ksm is not None:
            for ms, value in sorted(sim.config.ksm.run_at):
                if ms == 0:
                    ksm.set_run(value)  # due before the first instruction
                else:
                    self.env.schedule(ms * sim.config.insns_per_ms, self._ksm_run_write(value))
            if self.ksm_period:
                self.env.schedule(self.ksm_period, self._ksmd_tick)
        try:
            self._turns()
        finally:
            self.env.clear()  # the queued actions refer back here (and to the Simulation)

    def _turns(self) -> None:
        """The slices in order, with the host events due run before each one and before its end-of-slice
        checks: the order a heap of (time, HOST < END_OF_SLICE < SLICE) events gives, without putting the
        slices on the heap (only slices move the clock, so everything due at a slice's end is due now)."""
        sim = self.sim
        env = self.env
        i = self._next_runnable(-1) if not sim.interrupted else None
        while i is not None:
            env.run_due(sim.now)
            turn_over = self._slice(i)
            if turn_over is None:  # out of --max-insns: no slice ran, the next vCPU's turn
                i = self._next_runnable(i)
                continue
            env.run_due(sim.now)
            self._end_of_slice(turn_over)
            env.run_due(sim.now)
            if sim.interrupted:
                return
            if turn_over:
                i = self._next_runnable(i)

    def _next_runnable(self, after: int) -> int | None:
        """Round-robin: the first runnable vCPU after index `after`, wrapping round."""
        backends = self.sim.backends
        n = len(backends)
        for k in range(after + 1, after + 1 + n):
            i = k % n
            if backends[i].vcpu.state is _RUNNABLE:
                return i
        return None

    def _budget(self, i: int, due: int | None) -> int:
        sim = self.sim
        # Retried faults count against --max-insns at their cost: a livelocked vCPU runs out too.
        # (Two-argument min()s: the compiled build does those inline, a longer one through the builtin.)
        budget = min(min(self._quantum, self._turn_left), self._max_insns - sim.insns[i] - sim.stalls[i])
        if budget > 0 and due is not None:
            budget = min(budget, due - sim.now)
        return budget

    def _slice(self, i: int) -> bool | None:
        """Run vCPU i for one chunk; whether its turn is over (None: it was out of --max-insns)."""
        sim = self.sim
        due = self.env.next_time()
        budget = self._budget(i, due)
        if budget <= 0:
            sim.backends[i].vcpu.fail(f"still running after --max-insns {self._max_insns} instructions",
                                     GuestTimeout)
            stop_vm_after_failure(sim.vms[sim.vm_of[i]])
            self._turn_left = HOST_TIMESLICE
            return None
        backend = sim.backends[i]
        lone = self._lone(i)
        sim.context, sim._running = ("vcpu", sim.vm_of[i]), backend
        try:
            if lone:
                # Up to the next host event, --max-insns or LONE_RUN; the turns end inside the run.
                hard = min(LONE_RUN, self._max_insns - sim.insns[i] - sim.stalls[i])
                backend.run(hard if due is None else min(hard, due - sim.now), self._turn_left, HOST_TIMESLICE)
            else:
                backend.run(budget)
        finally:
            # A slice that ended in an error (livelock, violated invariant) still took its time.
            sim._running = None
            clock = backend.clock
            retired, stalled = clock.slice_retired, clock.stall_in_slice
            took = retired + stalled
            sim.insns[i] += retired
            sim.stalls[i] += stalled
            sim.now += took
            sim.context = ("vmm", 0)
            turns, turn_start = clock.turns_ended if lone else (0, 0)
            if turns:
                self._turn_left = HOST_TIMESLICE - (took - turn_start)
            else:
                self._turn_left -= took
        runnable = backend.vcpu.state is _RUNNABLE
        if not runnable:  # only the vCPU that ran can have failed in its slice
            stop_vm_after_failure(sim.vms[sim.vm_of[i]])
        # The turn goes on unless it is used up, the vCPU stopped, or a host event is due: all
        # points of simulated time, never where a chunk happened to end.
        turn_over = self._turn_left <= 0 or (due is not None and sim.now >= due) or not runnable
        if turn_over:
            self._turn_left = HOST_TIMESLICE
            if sim.ksm is not None and self.ksm_period == 0:
                self.env.schedule(sim.now, self._ksmd_wakeup)
        return turn_over

    def _lone(self, i: int) -> bool:
        """Whether vCPU i's turns may follow each other inside one run: it is the only runnable vCPU (so
        the next turn is its own), and nothing happens where a turn ends (no --check, no per-turn
        samples, ksmd not woken after every turn); the host events bound the run.  The turns end
        where the scheduler would end them (_icount.c), so the results are the same."""
        sim = self.sim
        if sim.checker is not None or sim.on_slice or (sim.ksm is not None and self.ksm_period == 0):
            return False
        return self._next_runnable(i) == i  # round-robin comes back to vCPU i itself

    def _end_of_slice(self, turn_over: bool) -> None:
        sim = self.sim
        if sim.checker is not None:
            sim.checker.end_of_slice()
        if turn_over:
            # Samples (--plot, trace counters, progress) are taken where a turn ends, a point of
            # simulated time, so that they do not depend on --quantum either.
            for hook in sim.on_slice:
                hook(sim)
        for hook in sim.on_display:
            hook(sim)

    def _as_ksmd(self, work: Action) -> None:
        sim = self.sim
        sim.context = ("ksmd", 0)
        try:
            work()
        finally:
            sim.context = ("vmm", 0)

    def _ksmd_wakeup(self) -> None:
        ksm = self.sim.ksm
        assert ksm is not None
        self._as_ksmd(ksm.ksmd_wakeup)

    def _ksmd_tick(self) -> None:
        """ksmd's periodic wake-up; the next one is due sleep_millisecs after this one was."""
        self._ksmd_wakeup()
        self._next_tick += self.ksm_period
        self.env.schedule(self._next_tick, self._ksmd_tick)

    def _ksm_run_write(self, value: int) -> Action:
        def write() -> None:
            ksm = self.sim.ksm
            assert ksm is not None
            self._as_ksmd(lambda: ksm.set_run(value))

        return write
