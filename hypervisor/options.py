"""What hvsim checks about its options beyond parsing them: which were given, guest names, output files,
and warnings about options that would have no effect.

cli.py parses; this module decides.  Refusals are raised before anything runs, one
error class per category (ConfigError for options, exit 2; ImageError for the image,
exit 3).  Warnings are lines for stderr; the run goes on.  An option names a file hvsim
writes by declaring `type=OutputFile()`: `check_outputs` then checks it with the others.
"""

import fnmatch
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import click
from click.core import ParameterSource

from .errors import ConfigError, ImageError
from .guest.catalog import bundled_guests
from .profiles import DEFAULT_PROFILE
from .races import RaceSpec
from .sim import GUEST_IMAGES, NOTIFIER_CALLBACKS, RunResult
from .trace import FORMATTED_EVENTS

# Every event name a trace can hold (what --trace-events globs are matched against).
TRACEPOINTS = (*FORMATTED_EVENTS, *(f"mmu_notifier_{c}" for c in NOTIFIER_CALLBACKS))


def given(ctx: click.Context, name: str) -> bool:
    """Whether the user gave option `name` on the command line (even at its default value)."""
    return ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def flag_of(ctx: click.Context, name: str) -> str:
    """The long flag of parameter `name`, e.g. 'sleep_ms' -> '--ksm-sleep-ms'."""
    for param in ctx.command.params:
        if param.name == name:
            return max(param.opts, key=len)
    return name


def refuse_given(ctx: click.Context, names: Iterable[str], why: str) -> None:
    """Refuse, naming every flag given among `names`: '--a, --b ' + why."""
    flags = [flag_of(ctx, n) for n in names if given(ctx, n)]
    if flags:
        raise ConfigError(f"{', '.join(flags)} {why}")


def bundled_names() -> list[str]:
    return [g.name for g in bundled_guests(GUEST_IMAGES)]


def resolve_image(text: str) -> str:
    """IMAGE as typed -> a path: an existing path as is, else a bundled guest by name ('samepage',
    'samepage.bin'), else an error that lists the bundled guests."""
    if not text:
        raise ImageError("IMAGE is empty: name a bundled guest (see `hvsim images`) or an image file.")
    if Path(text).exists():
        return text
    for guest in bundled_guests(GUEST_IMAGES):
        if text == guest.name:
            return str(guest.image)
    if os.sep in text:
        return text  # a path: the loader says why it cannot be read
    if text.endswith((".bin", ".elf")) and (GUEST_IMAGES / text).is_file():
        return str(GUEST_IMAGES / text)
    raise ImageError(f"no guest image {text!r}: it is not a file, nor the name of a bundled guest "
                     f"({', '.join(bundled_names())}; see `hvsim images`).")


class OutputFile(click.types.StringParamType):
    """Marks an option whose value is a file hvsim writes; `check` adds a check of its own (e.g. suffixes).

    Parsing accepts any string; `check_outputs` checks them all before the run, so that a bad
    path is one `hvsim:` line and exit 2, like every other invalid option.
    """

    name = "file"

    def __init__(self, check: Callable[[str, str], None] | None = None) -> None:
        self.check = check


def check_output_path(flag: str, path: str) -> Path:
    """A path hvsim can create or overwrite, or a ConfigError saying why not."""
    p = Path(path)
    if path == "":
        raise ConfigError(f"{flag} needs a file name.")
    if path.endswith(os.sep) or p.is_dir():
        raise ConfigError(f"{flag} {path!r} is a directory: give a file name, e.g. {flag} {p / 'out'}.")
    parent = p.parent
    if not parent.exists():
        raise ConfigError(f"{flag} {path!r}: the directory {str(parent)!r} does not exist; create it first.")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {path!r}: {str(parent)!r} is not a directory.")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise ConfigError(f"{flag} {path!r}: the file exists and is not writable.")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path!r}: cannot create files in {str(parent)!r} (permission denied).")
    return p


def check_outputs(ctx: click.Context, inputs: Iterable[str] = ()) -> None:
    """Check every OutputFile option given: writable, not a directory, not an input, no two the same."""
    seen: dict[str, str] = {str(Path(i).resolve()): f"the input {i!r}" for i in inputs}
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if not isinstance(param.type, OutputFile) or value is None:
            continue
        flag = max(param.opts, key=len)
        p = check_output_path(flag, value)
        if param.type.check is not None:
            param.type.check(flag, value)
        key = str(p.resolve())
        if key in seen and not p.is_char_device():
            raise ConfigError(f"{flag} {value!r} would overwrite {seen[key]}: give another file name.")
        seen[key] = flag


def trace_warnings(trace_path: str | None, trace_events: str | None) -> list[str]:
    """Before the run: a filter without a trace, and globs that match no tracepoint hvsim has."""
    if trace_events is None:
        return []
    if trace_path is None:
        return ["--trace-events has no effect without --trace FILE."]
    out = []
    for glob in (g.strip() for g in trace_events.split(",")):
        if glob and not any(fnmatch.fnmatchcase(name, glob) for name in TRACEPOINTS):
            out.append(f"--trace-events {glob!r} matches no event; the events are {', '.join(TRACEPOINTS)}.")
    return out


def _guest_reads(value: str) -> bool:
    """Whether the bundled guests' cmdline_get (guest_images/lib.S) takes VALUE: decimal, or 0x-prefixed hex."""
    if value[:2] in ("0x", "0X"):
        return len(value) > 2 and all(c in "0123456789abcdefABCDEF" for c in value[2:])
    return value.isascii() and value.isdigit()


def cmdline_warnings(image: str, cmdline: str) -> list[str]:
    """For a bundled guest: --cmdline tokens it would ignore (unknown keys, values it cannot read)."""
    guest = next((g for g in bundled_guests(GUEST_IMAGES) if g.image == Path(image)), None)
    if guest is None:
        return []
    known = [name for name, _, _ in guest.params]
    out = []
    # lib.S's cmdline_get splits on any byte <= 0x20.
    for token in "".join(" " if ord(c) <= 0x20 else c for c in cmdline).split():
        key, eq, value = token.partition("=")
        if not known:
            out.append(f"--cmdline {token!r}: {guest.name} takes no parameters and ignores it.")
        elif not eq:
            out.append(f"--cmdline {token!r} is not KEY=VALUE; {guest.name} ignores it.")
        elif key not in known:
            out.append(f"--cmdline {token!r}: {guest.name} has no parameter {key!r} (it has {', '.join(known)}) "
                       "and ignores it.")
        elif not _guest_reads(value):
            out.append(f"--cmdline {token!r}: {guest.name} reads decimal or 0x-hex values only and ignores this "
                       "one.")
    return out


def result_warnings(results: Iterable[RunResult]) -> list[str]:
    """After the run(s): --ksm-run-at times the run never reached, --inject specs that never fired."""
    out: list[str] = []
    runs = [r for r in results if not r.interrupted]
    ksm_runs = [r for r in runs if r.ksm is not None]
    if ksm_runs:
        cfg = ksm_runs[0].config
        longest = max(r.sim_insns for r in ksm_runs)
        for ms, value in cfg.ksm.run_at:
            if ms * cfg.insns_per_ms > longest:
                end = longest / cfg.insns_per_ms
                when = f"{end:.1f}" if end >= 1 else f"{end:.4f}"
                out.append(f"--ksm-run-at {ms}:{value} was never applied: the run ended at {when} simulated ms.")
    if runs and runs[0].config.inject:
        fired: dict[str, int] = {}
        for r in runs:
            for spec, n in (r.injected or {}).items():
                fired[spec] = fired.get(spec, 0) + n
        for text in runs[0].config.inject:
            if not fired.get(str(RaceSpec.parse(text))):
                out.append(f"--inject {text} never fired: the run never reached that point that many times.")
    return out


def kernel_of(kernel: str | None, profile: str | None) -> str:
    """--kernel VERSION, or its older spelling --profile ERA; both only if they agree."""
    if kernel is not None and profile is not None and kernel != profile:
        raise ConfigError(f"--kernel {kernel} and --profile {profile} disagree: give one of them "
                          "(--profile is the old name of --kernel).")
    return kernel or profile or DEFAULT_PROFILE
