"""The `hvsim` console script: loads the CLI so that a Ctrl-C while it imports is a clean exit too."""

import gc
import os
import sys


def main() -> None:
    # hvsim does no BLAS work (no float linear algebra; ksm_items' integer `@` is numpy's own loop), but
    # numpy's import starts OpenBLAS's thread pool, whose threads spin for a while at start-up: about 0.1 s
    # of CPU per process, on the cores the guests run on.  One thread, unless the user chose otherwise;
    # set before anything imports numpy.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # numpy, unicorn and pandas take a noticeable moment to import; SIGINT then must not be a traceback.
    # The imports make some 100,000 objects that live as long as the process: the collector's passes over
    # them while importing (67 of them) find nothing to free, so it is off meanwhile, and gc.freeze()
    # then keeps those objects out of the run's own collections.
    gc.disable()
    try:
        from .cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("hvsim: interrupted while starting; nothing was run.\n")
        raise SystemExit(130) from None
    finally:
        gc.enable()
    gc.freeze()
    cli_main()
