"""The host kernel's memory management: frames, process address spaces, mmu_notifier, KSM."""
