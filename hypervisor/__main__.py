"""`python -m hypervisor` is the `hvsim` command."""

from .entry import main

main()
