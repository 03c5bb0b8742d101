"""`python -m hypervisor` is the `hvsim` command."""

from .cli import main

main()
