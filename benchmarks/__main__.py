"""`python -m benchmarks`: run the suite, print the table, write the JSON."""

import sys

from .suite import main

if __name__ == "__main__":
    sys.exit(main())
