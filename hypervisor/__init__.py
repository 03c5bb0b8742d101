"""hvsim: a simulator of the Linux/KVM memory-virtualization stack (TDP MMU, mmu_notifier, KSM)."""

import os

__version__ = "0.1.0"

if os.environ.get("HVSIM_PURE") == "1":
    from ._pure import prefer_source

    prefer_source()
