"""How hvsim talks to its user: one `hvsim:` line per refusal (click's usage errors included), warnings,
the report on stdout, the exit code after the report when an output file failed, and `guarded`: every
failure of a command as one line and an exit code, never a traceback."""

import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from .errors import HvsimError, OutputWriteError
from .observers import EXIT_INTERRUPTED, Observers
from .options import result_warnings
from .sim import RunResult


class _UsageLine(click.ClickException):
    """click's usage errors, shown as one `hvsim:` line (exit 2) like every refusal of hvsim's own."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"hvsim: {self.format_message()}", err=True)


def _one_line(err: click.UsageError) -> _UsageLine:
    where = err.ctx.command_path if err.ctx is not None else "hvsim"
    message = err.format_message().rstrip()
    return _UsageLine(f"{message}{'' if message.endswith('.') else '.'} See `{where} --help`.")


_HELP_ERRORS = (getattr(click.exceptions, "NoArgsIsHelpError", ()),)  # click >= 8.2: bare `hvsim` shows help


class HvsimGroup(click.Group):
    """hvsim's command group: a usage error, at any level, is one line."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as err:
            if isinstance(err, _HELP_ERRORS):
                raise
            raise _one_line(err) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:
            if isinstance(err, _HELP_ERRORS):
                raise
            raise _one_line(err) from None


def warn(line: str) -> None:
    click.echo(f"hvsim: warning: {line}", err=True)


def emit(text: str) -> None:
    """The report on stdout; a stdout that cannot take it is an output error, not an internal one."""
    try:
        click.echo(text, nl=False)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputWriteError(f"cannot write the report to standard output: {exc.strerror or exc}.") from None


def after_run(obs: Observers, results: list[RunResult], code: int) -> int:
    """Warnings and output-file errors after the report; a write error turns a success into exit 74."""
    for line in obs.warnings + result_warnings(results):
        warn(line)
    for line in obs.write_errors:
        click.echo(f"hvsim: {line}", err=True)
    return code or (OutputWriteError.exit_code if obs.write_errors else 0)


def guarded(fn: Callable[[], int]) -> None:
    """Every failure is a one-paragraph message and an exit code, never a traceback."""
    try:
        code = fn()
    except BrokenPipeError:
        # The reader went away (`hvsim run ... | head`): stop quietly, as other Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except HvsimError as err:
        click.echo(f"hvsim: {err}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside a run (loading, allocating, writing output): no traceback
        click.echo("hvsim: interrupted before the run could report anything.", err=True)
        sys.exit(EXIT_INTERRUPTED[signal.SIGINT])
    except Exception as exc:  # a bug in hvsim: still no traceback unless asked for
        if os.environ.get("HVSIM_DEBUG"):
            traceback.print_exc()
        click.echo(f"hvsim: internal error: {type(exc).__name__}: {exc}. This is a bug in hvsim; "
                   "rerun with HVSIM_DEBUG=1 for the traceback and report it.", err=True)
        sys.exit(70)
    sys.exit(code)
