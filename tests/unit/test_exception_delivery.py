"""Long-mode exception delivery through a guest IDT (cpu/exceptions.py), as pure logic over a memory dict."""

import struct

import pytest

from hypervisor.cpu.exceptions import DeliveryFailed, PendingException, deliver, parse_gate

IDT = 0x10000


def gate(offset: int, selector: int = 0x08, kind: int = 0xE, present: bool = True, ist: int = 0) -> tuple[int, int]:
    raw = struct.pack("<HHBBHII", offset & 0xFFFF, selector, ist, (0x80 if present else 0) | kind,
                      (offset >> 16) & 0xFFFF, offset >> 32, 0)
    low, high = struct.unpack("<QQ", raw)
    return low, high


def memory_with(vector: int, g: tuple[int, int]) -> dict[int, int]:
    return {IDT + vector * 16: g[0], IDT + vector * 16 + 8: g[1]}


def test_a_gate_descriptor_splits_its_offset_over_three_fields() -> None:
    g = parse_gate(*gate(0x1122_3344_5566_7788, selector=0x10, kind=0xF, ist=3))
    assert (g.offset, g.selector, g.kind, g.ist, g.present) == (0x1122_3344_5566_7788, 0x10, 0xF, 3, True)


def test_a_page_fault_pushes_ss_rsp_rflags_cs_rip_and_the_error_code_on_a_16_byte_aligned_stack() -> None:
    mem = memory_with(14, gate(0x101000))
    exc = PendingException(14, 0x3, rip=0x100500, note="#PF", cr2=0x40000000)
    entry = deliver(exc, (IDT, 0xFFF), rsp=0x7FF38, rflags=0x246, cs=0x08, ss=0x10,
                    read_qword=mem.__getitem__, write_qword=mem.__setitem__)
    assert entry.rsp == 0x7FF30 - 6 * 8
    assert [mem[entry.rsp + 8 * i] for i in range(6)] == [0x3, 0x100500, 0x08, 0x246, 0x7FF38, 0x10]
    assert (entry.rip, entry.cs) == (0x101000, 0x08)
    assert entry.rflags == 0x046  # an interrupt gate clears IF


def test_a_divide_error_has_no_error_code_and_a_trap_gate_keeps_if() -> None:
    mem = memory_with(0, gate(0x102000, kind=0xF))
    entry = deliver(PendingException(0, 0, 0x100010, "#DE"), (IDT, 0xFFF), rsp=0x80000, rflags=0x202, cs=0x08,
                    ss=0, read_qword=mem.__getitem__, write_qword=mem.__setitem__)
    assert entry.rsp == 0x80000 - 5 * 8 and mem[entry.rsp] == 0x100010
    assert entry.rflags == 0x202


@pytest.mark.parametrize(
    ("limit", "g", "why"),
    [
        (0, gate(0x1000), "with no IDT"),
        (0xFFF, gate(0x1000, present=False), "IDT gate 14 is not present"),
        (0xFFF, gate(0x1000, kind=0xC), "not a 64-bit interrupt or trap gate"),
        (0xFFF, gate(0x1000, ist=1), "IST 1"),
    ],
)
def test_an_exception_that_cannot_be_delivered_says_why(limit: int, g: tuple[int, int], why: str) -> None:
    mem = memory_with(14, g)
    with pytest.raises(DeliveryFailed, match=why):
        deliver(PendingException(14, 0, 0, "#PF"), (IDT, limit), 0x80000, 0x2, 0x08, 0,
                mem.__getitem__, mem.__setitem__)
