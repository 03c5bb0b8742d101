"""Every error hvsim shows a user is an HvsimError with a message and a documented exit code."""

from typing import ClassVar


class HvsimError(Exception):
    """Base of user-facing errors: `str(err)` is the one-paragraph message."""

    exit_code: ClassVar[int] = 1


class ConfigError(HvsimError):
    """An invalid option or combination of options."""

    exit_code = 2


class ImageError(HvsimError):
    """A guest image that cannot be loaded."""

    exit_code = 3


class GuestError(HvsimError):
    """The guest crashed (triple fault), touched memory outside its memslots, or ran away."""

    exit_code = 4


class GuestTimeout(GuestError):
    """The guest did not finish within --max-insns."""

    exit_code = 5


class HostOutOfMemory(HvsimError):
    """The simulated host ran out of frames."""

    exit_code = 6


class ConsoleMismatch(HvsimError):
    """`compare`: a guest printed different output under different profiles."""

    exit_code = 7


class InvariantViolation(HvsimError):
    """`--check`: a coherence invariant does not hold."""

    exit_code = 8


class OutputWriteError(HvsimError):
    """An output file (--trace, --plot, --console, the report on stdout) could not be written during or after the run.

    Exit code 74 is sysexits.h's EX_IOERR (as 70, an internal error, is EX_SOFTWARE).
    """

    exit_code = 74


class UnsupportedUnicorn(HvsimError):
    """The installed Unicorn is not the version hvsim's CPU model was written for (cpu/binding.py).

    Exit code 69 is sysexits.h's EX_UNAVAILABLE.
    """

    exit_code = 69


class Livelock(GuestError):
    """A vCPU kept retrying a fault (mmu_notifier_retry) without retiring an instruction."""

    exit_code = 10
