"""cpu/blocks.py: where a translated block's instructions start (per-block instruction counts, exact time mid-block)."""

from hypervisor.cpu.blocks import MAX_BLOCK_INSNS, BlockMap, instruction_offsets, read_code
from hypervisor.types import PAGE_SIZE, Gpa

# dec rcx (48 ff c9); jnz -5 (75 fb): the two-instruction spin loop of the bundled guests' lib.S
SPIN = b"\x48\xff\xc9\x75\xfb"


def test_instruction_offsets_are_where_each_instruction_of_the_block_starts() -> None:
    assert instruction_offsets(SPIN) == (0, 3)
    assert instruction_offsets(b"\x90" * 4) == (0, 1, 2, 3)


def test_an_undecodable_tail_is_the_blocks_last_instruction_as_qemu_counts_it() -> None:
    # nop; then 0f 0b (ud2 decodes) is fine; 0f ff is no instruction capstone knows
    assert instruction_offsets(b"\x90\x0f\xff") == (0, 1)


def test_a_block_map_counts_a_block_and_the_instructions_before_rip() -> None:
    reads: list[tuple[int, int]] = []

    def peek(gva: int, length: int) -> bytes:
        reads.append((gva, length))
        return SPIN[:length]

    blocks = BlockMap(peek)
    assert blocks.count(0x1000, 5) == 2
    assert [blocks.before(0x1000, 5, off) for off in (0, 3, 5)] == [0, 1, 2]
    assert [blocks.end_of(0x1000, 5, off) for off in (0, 3)] == [3, 5]
    assert reads == [(0x1000, 5)]  # decoded once per (address, size) until forgotten
    blocks.forget()
    blocks.count(0x1000, 5)
    assert len(reads) == 2


def test_code_is_read_a_page_at_a_time_as_far_as_it_translates() -> None:
    memory = bytes(range(256)) * (3 * PAGE_SIZE // 256)
    mapped = {0x10: 0x2, 0x11: 0x0}  # gva page -> gpa page; page 0x12 is not mapped

    def translate(gva: int) -> int | None:
        page = mapped.get(gva // PAGE_SIZE)
        return None if page is None else page * PAGE_SIZE + gva % PAGE_SIZE

    def read_guest(gpa: Gpa, length: int) -> bytes:
        return memory[gpa : gpa + length]

    start = 0x10 * PAGE_SIZE + PAGE_SIZE - 2
    assert read_code(start, 4, translate, read_guest) == memory[3 * PAGE_SIZE - 2 : 3 * PAGE_SIZE] + memory[:2]
    assert len(read_code(0x11 * PAGE_SIZE + PAGE_SIZE - 1, 8, translate, read_guest)) == 1


def test_no_translated_block_is_longer_than_qemus_limit() -> None:
    assert MAX_BLOCK_INSNS == 512  # QEMU 5's TCG_MAX_INSNS, which Unicorn 2.1.4 keeps
