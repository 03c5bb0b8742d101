"""Sizes as users write them: '64M', '1G', '10T' <-> bytes (powers of two, as QEMU's -m)."""

from .errors import ConfigError

_SIZE_SUFFIXES = "KMGTPE"


def parse_size(text: str) -> int:
    """'64M', '1G', '65536', '4K', '10T' -> bytes (powers of two, as QEMU's -m)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in _SIZE_SUFFIXES:
        mult = 1 << (10 * (_SIZE_SUFFIXES.index(t[-1]) + 1))
        t = t[:-1]
    try:
        value = int(t, 0)
    except ValueError:
        raise ConfigError(f"--memory {text!r} is not a size: write e.g. 64M, 1G or 16777216.") from None
    return value * mult


def format_size(n: int) -> str:
    """Bytes as a user writes them: 65536 -> '64K', 1 << 30 -> '1G', 4097 -> '4097'."""
    for shift, suffix in ((60, "E"), (50, "P"), (40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)
