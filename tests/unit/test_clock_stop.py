"""cpu/clock.py with _icount.c on a scratch Unicorn: where a slice that the block hook ends leaves RIP."""

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
