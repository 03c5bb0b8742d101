"""Kernel-era profiles: the one place that knows how 2.6.32, 3.7 and 6.10 differ.

Each profile is a bundle of behaviour flags read by host/ (how a pte change is
announced to secondary MMUs, how KSM builds a KSM page) and by kvm/ (whether KVM
implements change_pte, how its fault path pins pages).  Nothing else in hvsim
branches on an era.
"""

from dataclasses import dataclass, replace

from .errors import ConfigError


@dataclass(frozen=True)
class Profile:
    name: str
    summary: str
    # mm: set_pte_at_notify() and ptep_clear_flush_notify() callers are bracketed by
    # mmu_notifier_invalidate_range_start/end (commit 6bdb913f0a70, 3.7).
    wrap_pte_updates_in_range: bool
    # mm: the mmu_notifier_ops still have ->change_pte (removed for 6.10).
    notifier_has_change_pte: bool
    # mm: the mmu_notifier_ops still have ->invalidate_page (removed in 4.13; later
    # kernels announce a single-page unmap as a one-page invalidate_range).
    notifier_has_invalidate_page: bool
    # kvm: kvm_mmu_notifier_change_pte is registered (2.6.32 .. 6.9).
    kvm_change_pte: bool
    # kvm: gfn_to_pfn pins with write=1 even for a read fault (2.6.32); later
    # kernels pass the fault's own intent to hva_to_pfn and upgrade a read fault to
    # writable only through the non-faulting fast GUP.
    kvm_gup_always_write: bool
    # ksm: try_to_merge_two_pages allocates a fresh KSM page and replaces both pages
    # with it (2.6.32); from 2.6.33 the first page becomes the KSM page in place.
    ksm_merge_allocates_kpage: bool

    def without_change_pte(self) -> "Profile":
        """KVM registers its notifier without ->change_pte (the invalidate_page fallback)."""
        return replace(self, name=f"{self.name}-no-change-pte", kvm_change_pte=False)

    @property
    def uses_change_pte(self) -> bool:
        return self.notifier_has_change_pte and self.kvm_change_pte


PROFILES: dict[str, Profile] = {
    "2.6.32": Profile(
        name="2.6.32",
        summary="2009: set_pte_at_notify calls change_pte; KVM rewrites the spte read-only in place; "
        "gfn_to_pfn always pins for write",
        wrap_pte_updates_in_range=False,
        notifier_has_change_pte=True,
        notifier_has_invalidate_page=True,
        kvm_change_pte=True,
        kvm_gup_always_write=True,
        ksm_merge_allocates_kpage=True,
    ),
    "3.7": Profile(
        name="3.7",
        summary="2012: set_pte_at_notify is wrapped in invalidate_range_start/end, so change_pte "
        "finds the spte already zapped; read faults pin read-only",
        wrap_pte_updates_in_range=True,
        notifier_has_change_pte=True,
        notifier_has_invalidate_page=True,
        kvm_change_pte=True,
        kvm_gup_always_write=False,
        ksm_merge_allocates_kpage=False,
    ),
    "6.10": Profile(
        name="6.10",
        summary="2024: change_pte deleted; a plain set_pte_at inside invalidate_range_start/end",
        wrap_pte_updates_in_range=True,
        notifier_has_change_pte=False,
        notifier_has_invalidate_page=False,
        kvm_change_pte=False,
        kvm_gup_always_write=False,
        ksm_merge_allocates_kpage=False,
    ),
}

DEFAULT_PROFILE = "2.6.32"


def get_profile(name: str, change_pte: bool = True) -> Profile:
    try:
        profile = PROFILES[name]
    except KeyError:
        known = ", ".join(PROFILES)
        raise ConfigError(f"unknown profile {name!r}: choose one of {known}") from None
    return profile if change_pte else profile.without_change_pte()
