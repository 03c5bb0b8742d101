"""Disassembly of guest instructions for crash reports and traces (capstone)."""

from functools import lru_cache

import capstone


@lru_cache(maxsize=1)
def _md() -> capstone.Cs:
    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def disassemble_one(code: bytes, address: int) -> str:
    """The first instruction of `code` as 'mnemonic operands', or a note that it does not decode."""
    for insn in _md().disasm(code, address, 1):
        return f"{insn.mnemonic} {insn.op_str}".strip()
    return f"(undecodable bytes {code[:8].hex(' ')})"


def decode_one(code: bytes, address: int) -> tuple[str, str, int] | None:
    """(mnemonic, operands, length) of the first instruction of `code`, or None if it does not decode."""
    for insn in _md().disasm(code, address, 1):
        return insn.mnemonic, insn.op_str, insn.size
    return None
