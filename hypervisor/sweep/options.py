"""A sweep point's settings, parsed by the same click command that parses `hvsim run`'s options.

A spec key is a long option name with its dashes written as underscores (`ksm_pages_to_scan`
is `--ksm-pages-to-scan`), plus `image`; a flag takes true or false.  The settings become an
argument list and go through click's own parser, so every point is checked exactly as the
command line would be (types, choices, ranges) and no option is handled twice.
"""

from typing import Any

import click

from ..errors import ConfigError

# Options that only change what a run prints or records, not what it computes: a sweep keeps
# the full JSON report of every point instead.
NOT_RUN_SETTINGS = frozenset({"json", "trace", "trace_events", "plot", "quiet", "perf_kvm_stat", "exit_cost",
                              "cpu_mhz", "console", "exit_with_guest_status"})


def _long_options(command: click.Command) -> dict[str, click.Option]:
    out: dict[str, click.Option] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for opt in param.opts:
                if opt.startswith("--"):
                    out[opt[2:].replace("-", "_")] = param
    return out


def settings_argv(command: click.Command, settings: dict[str, Any], where: str) -> list[str]:
    """{'ksm_pages_to_scan': 100, 'ksm': True, 'image': 'x.bin'} -> ['--ksm-pages-to-scan', '100', '--ksm', 'x.bin']."""
    options = _long_options(command)
    argv: list[str] = []
    image: str | None = None
    for key, value in settings.items():
        if key == "image":
            if not isinstance(value, str):
                raise ConfigError(f"{where}: image = {value!r}: give a path or a bundled guest's name as a string.")
            image = value
            continue
        if key in NOT_RUN_SETTINGS:
            raise ConfigError(f"{where}: {key!r} changes only what a run prints or records, not what it "
                              "computes; a sweep keeps every point's full JSON report instead: remove it.")
        opt = options.get(key)
        if opt is None:
            raise ConfigError(f"{where}: unknown setting {key!r}. Keys are `hvsim run`'s long option names with "
                              "underscores for dashes (e.g. ksm_pages_to_scan, no_change_pte), plus image; "
                              "see `hvsim run --help`.")
        flag = "--" + key.replace("_", "-")
        if opt.is_flag:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} = {value!r}: {flag} is a flag, write true or false.")
            if value:
                argv.append(flag)
        elif opt.multiple:
            for item in value if isinstance(value, list) else [value]:
                argv += [flag, _scalar(key, item, where)]
        else:
            argv += [flag, _scalar(key, value, where)]
    if image is not None:
        argv += ["--", image]
    return argv


def _scalar(key: str, value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: {key} = {value!r}: give a string or a number.")
    return str(value)


def parse_settings(command: click.Command, settings: dict[str, Any], where: str) -> click.Context:
    """The context `command` would run in for these settings (its params, and which were given);
    bad values are ConfigErrors naming `where`."""
    argv = settings_argv(command, settings, where)
    try:
        with command.make_context(command.name or "run", argv) as ctx:
            return ctx
    except click.ClickException as err:
        raise ConfigError(f"{where}: {err.format_message()}") from None
