"""Scenario tests: a write to the exit port ends the guest there; nothing after the OUT happens."""

from pathlib import Path

import pytest

from .guests import flat_guest, run

XOR_EAX_OUT_F4 = bytes([0x31, 0xC0, 0xE6, 0xF4])  # xor eax,eax; out 0xf4,al
STORE_TO_3MIB = bytes([0x89, 0x04, 0x25, 0x00, 0x00, 0x30, 0x00])  # mov [0x300000],eax
HLT = bytes([0xF4])


@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
def test_a_store_after_the_exit_port_write_takes_no_exit(tmp_path: Path, mmu: str) -> None:
    # Instructions are counted per translated block, so Unicorn may begin the instruction after
    # the OUT before it stops; its memory access must not become a fault exit (it never happens
    # for the guest): the same exits as a guest that ends with the OUT.
    ends_at_out = run(flat_guest(tmp_path, "out", XOR_EAX_OUT_F4 + HLT), mmu=mmu).vms[0]
    store_after = run(flat_guest(tmp_path, "store", XOR_EAX_OUT_F4 + STORE_TO_3MIB + HLT), mmu=mmu).vms[0]
    assert (store_after.state, store_after.exit_status, store_after.insns) == ("exited", 0, 2)
    assert store_after.exits == ends_at_out.exits
