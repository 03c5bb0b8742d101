"""cpu/clock.py with _icount.c on a scratch Unicorn: where a slice that the block hook ends leaves RIP."""

from unicorn import Uc
from unicorn import x86_const as x86

from hypervisor.cpu import binding
from hypervisor.cpu.clock import VcpuClock

# loop: add rax, 1; add rbx, rax; dec rcx; jmp loop  (one block of four instructions)
_LOOP = bytes.fromhex("4883c001" "4801c3" "48ffc9" "ebf4")


def test_a_slice_the_block_hook_ends_leaves_rip_at_the_block_it_kept_from_starting() -> None:
    uc = binding.new_x86_64()
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, _LOOP)
    clock = VcpuClock(uc, 1000, lambda gva, size: bytes(uc.mem_read(gva, size)))
    for limit in (1, 10, 4_000):
        clock.start_slice(limit)
        clock.running = True
        assert binding.emu_start(uc, 0x1000, 0x2000) is None
        clock.running = False
        retired = clock.end_slice()
        assert clock.stopped
        assert retired == -(-limit // 4) * 4  # the first block boundary at or after the limit
        # Known from the hook, without a register read, and what Unicorn has.
        assert clock.rip_after_run() == 0x1000 == uc.reg_read(x86.UC_X86_REG_RIP)
    clock.close()


def _run_slice(uc: Uc, clock: VcpuClock, limit: int) -> None:
    clock.start_slice(limit)
    clock.running = True
    assert binding.emu_start(uc, 0x1000, 0x2000) is None
    clock.running = False
    clock.end_slice()


def test_the_block_that_started_last_is_read_from_its_cache_entry_until_left() -> None:
    uc = binding.new_x86_64()
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, _LOOP)
    clock = VcpuClock(uc, 1000, lambda gva, size: bytes(uc.mem_read(gva, size)))
    ic = clock.ic
    assert (ic.block_pc, ic.block_size, ic.block_count) == (0, 0, 0)  # none started yet
    _run_slice(uc, clock, 10)
    assert (ic.block_pc, ic.block_size, ic.block_count) == (0x1000, len(_LOOP), 4)
    ic.leave_block()
    assert (ic.block_pc, ic.block_size, ic.block_count) == (0, 0, 0)
    clock.close()


def test_a_generation_past_32_bits_empties_the_cache_and_starts_again_at_1() -> None:
    """_icount.c keeps the generation in the upper half of each entry's tag: at 2**32 it wraps to 1 with
    every entry dropped, so no count of an older generation can be taken for the code there now."""
    uc = binding.new_x86_64()
    uc.mem_map(0, 0x10000)
    uc.mem_write(0x1000, _LOOP)
    clock = VcpuClock(uc, 1000, lambda gva, size: bytes(uc.mem_read(gva, size)))
    ic = clock.ic
    assert ic.generation == 1
    _run_slice(uc, clock, 100)
    misses = int(ic.misses)
    _run_slice(uc, clock, 100)
    assert ic.misses == misses  # cached under generation 1
    ic.generation = (1 << 32) - 1
    ic.generation = 1 << 32
    assert ic.generation == 1
    assert (ic.block_pc, ic.block_size, ic.block_count) == (0x1000, len(_LOOP), 4)  # still readable
    _run_slice(uc, clock, 100)
    assert ic.misses == misses + 1  # generation 1 again, but the wrap emptied the cache: a miss
    assert clock.slice_retired == 100
    clock.close()
