"""KVM: memslots, the TDP MMU with its mmu_notifier implementation, vCPUs, exits and stats."""
