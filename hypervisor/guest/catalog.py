"""The bundled guests and their --cmdline parameters, read from the header comments of their sources.

Assembly guests (NAME.S, built to NAME.bin) open with `#` comment lines; C guests (NAME.c,
built with the guest SDK to NAME.elf) with a `/* ... */` block whose lines are read the same way.
"""

import re
from dataclasses import dataclass
from pathlib import Path

_PARAM = re.compile(r"^#\s+(\w+)=(\S+)\s+(.*?)\s*\(default ([^);]*)")
_TITLE = re.compile(r"^#\s*(\w+)\s+-\s+(.*)$")


@dataclass(frozen=True)
class GuestInfo:
    name: str
    image: Path
    summary: str
    params: tuple[tuple[str, str, str], ...]  # (name, default, description)


def bundled_guests(directory: Path) -> list[GuestInfo]:
    out = []
    for source in sorted([*directory.glob("*.S"), *directory.glob("*.c")]):
        if source.name.startswith("lib") and source.suffix == ".S":  # .include'd by the guests
            continue
        lines = source.read_text().splitlines()
        image = source.with_suffix(".bin")
        if source.suffix == ".c":
            lines, image = _c_header(lines), source.with_suffix(".elf")
        summary = ""
        params = []
        in_title = False
        for line in lines:
            if not line.startswith("#"):
                break
            title = _TITLE.match(line)
            if title and not summary:
                summary, in_title = title.group(2), True
            elif in_title and line.strip() != "#":
                summary += " " + line[1:].strip()
            else:
                in_title = False
            param = _PARAM.match(line)
            if param:
                params.append((param.group(1), param.group(4).strip(), param.group(3)))
        out.append(GuestInfo(source.stem, image, summary, tuple(params)))
    return out


def _c_header(lines: list[str]) -> list[str]:
    """The opening /* ... */ comment of a C source, as `#` lines."""
    out: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("*/") or (out and not stripped.startswith("*")):
            break
        if not out and not stripped.startswith("/*"):
            break
        out.append("#" + stripped[2:].removesuffix("*/") if stripped.startswith("/*") else "#" + stripped[1:])
        if stripped.endswith("*/"):
            break
    return out


def render_catalog(directory: Path) -> str:
    """`hvsim images`: every bundled guest, its --cmdline parameters and its image file."""
    lines = ["Run one with `hvsim run NAME` (every command takes a NAME or the path of an image file).", ""]
    guests = bundled_guests(directory)
    w = max((len(g.name) for g in guests), default=0)
    for guest in guests:
        params = " ".join(f"{name}={default}" for name, default, _ in guest.params) or "(no parameters)"
        lines += [f"{guest.name:<{w}} {guest.summary}", f"{'':<{w}} {params}", f"{'':<{w}} {guest.image}"]
    return "\n".join(lines) + "\n"
