"""hvsim: a simulator of the Linux/KVM memory-virtualization stack (TDP MMU, mmu_notifier, KSM)."""

__version__ = "0.1.0"
