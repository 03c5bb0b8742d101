"""`hvsim build-guest`: compiles freestanding C guests against the guest SDK (hypervisor/sdk) with the system cc."""

import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import HvsimError

SDK_DIR = Path(__file__).resolve().parent.parent / "sdk"
SDK_SOURCES = ("crt0.S", "hvsim.c", "hv_mmu.c")
LINKER_SCRIPT = "guest.ld"
# Freestanding, static, at a fixed address; no red zone (exception frames are pushed on the
# guest's stack), no SSE (the boot state does not enable it), no stack protector or CET
# notes, no unwind tables.
CFLAGS = ("-ffreestanding", "-nostdlib", "-static", "-mno-red-zone", "-fno-pie", "-no-pie", "-O2",
          "-mgeneral-regs-only", "-fno-stack-protector", "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
          "-fno-unwind-tables", "-std=gnu11", "-Wall")
LDFLAGS = ("-Wl,--build-id=none", "-Wl,-z,noexecstack", "-Wl,-n")


class GuestBuildError(HvsimError):
    """The C compiler is missing or could not build the guest."""

    exit_code = 9


@dataclass(frozen=True)
class BuiltGuest:
    path: Path
    size: int
    warnings: str


def compiler() -> str:
    """The compiler command: $CC if set, else cc."""
    return os.environ.get("CC", "cc")


def build_guest(sources: list[Path], output: Path) -> BuiltGuest:
    """Compile and link sources with the SDK into the ELF64 guest image `output`."""
    if not sources:
        raise GuestBuildError("no source files given: name the guest's .c files, e.g. "
                              "`hvsim build-guest prog.c -o prog.elf`.")
    for src in sources:
        if not src.is_file():
            raise GuestBuildError(f"source file {str(src)!r} does not exist.")
        if src.suffix not in (".c", ".S", ".s"):
            raise GuestBuildError(f"source file {str(src)!r} is not C (.c) or assembly (.S, .s).")
    cc = shlex.split(compiler())
    if not cc or shutil.which(cc[0]) is None:
        raise GuestBuildError(f"no C compiler: `{compiler()}` is not on PATH. hvsim build-guest compiles with the "
                              "system C compiler (cc, or $CC): install gcc or clang (e.g. `apt-get install gcc`).")
    cmd = [*cc, *CFLAGS, "-I", str(SDK_DIR), f"-Wl,-T,{SDK_DIR / LINKER_SCRIPT}", *LDFLAGS,
           *(str(SDK_DIR / s) for s in SDK_SOURCES), *(str(s) for s in sources), "-o", str(output)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise GuestBuildError(f"cannot run the C compiler `{cc[0]}`: {exc.strerror}.") from None
    if proc.returncode != 0:
        raise GuestBuildError(f"the C compiler failed (exit {proc.returncode}); its output:\n"
                              f"{(proc.stdout + proc.stderr).rstrip()}\ncommand: {shlex.join(cmd)}")
    return BuiltGuest(output, output.stat().st_size, (proc.stdout + proc.stderr).strip())
