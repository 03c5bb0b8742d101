"""The `hvsim` console script: loads the CLI so that a Ctrl-C while it imports is a clean exit too."""

import sys


def main() -> None:
    # numpy, unicorn and pandas take a noticeable moment to import; SIGINT then must not be a traceback.
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("hvsim: interrupted while starting; nothing was run.\n")
        raise SystemExit(130) from None
    cli_main()
