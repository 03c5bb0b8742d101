"""The `hvsim` console script: loads the CLI so that a Ctrl-C while it imports is a clean exit too."""

import os
import sys


def main() -> None:
    # hvsim does no BLAS work (no float linear algebra; ksm_items' integer `@` is numpy's own loop), but
    # numpy's import starts OpenBLAS's thread pool, whose threads spin for a while at start-up: about 0.1 s
    # of CPU per process, on the cores the guests run on.  One thread, unless the user chose otherwise;
    # set before anything imports numpy.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # numpy, unicorn and pandas take a noticeable moment to import; SIGINT then must not be a traceback.
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("hvsim: interrupted while starting; nothing was run.\n")
        raise SystemExit(130) from None
    cli_main()
