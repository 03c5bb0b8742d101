"""Kernel profiles: the behaviour flags of one kernel version, computed from the table in kernels.py.

Each field is one behaviour, read by host/ (how a pte change is announced to
secondary MMUs, how KSM merges and what it offers) or by kvm/ (whether KVM
implements change_pte, how its fault path pins pages and retries, how it ages).
Nothing in hvsim branches on a version number: `get_profile` turns a version
into a Profile, and the model reads the Profile.  The named eras of the first
hvsim (2.6.32, 3.7, 6.10) are simply kernel versions.
"""

from collections.abc import Iterable
from dataclasses import dataclass, fields, replace

from .errors import ConfigError
from .kernels import MAINLINE, behaviour_of, introduced, version_key

# The eras hvsim's first `--profile` offered; they stay valid names (they are versions).
PROFILE_ALIASES = ("2.6.32", "3.7", "6.10")
DEFAULT_PROFILE = "2.6.32"


@dataclass(frozen=True)
class Profile:
    name: str
    version: str
    summary: str
    # --- host: include/linux/mmu_notifier.h, mm/mmu_notifier.c -------------------------------
    # set_pte_at_notify runs change_pte before set_pte_at (3.7, 48af0d7cb3c8); before, after it.
    set_pte_at_notify_change_pte_first: bool
    # __mmu_notifier_change_pte sends ->invalidate_page to a notifier lacking ->change_pte (until 3.7).
    change_pte_falls_back_to_invalidate_page: bool
    # the ->change_pte op exists (until 6.10); without it set_pte_at_notify is plain set_pte_at.
    notifier_has_change_pte: bool
    # the ->invalidate_page op exists (until 4.13); later a one-page unmap is a one-page range.
    notifier_has_invalidate_page: bool
    # --- host: mm/memory.c ---------------------------------------------------------------------
    # do_wp_page's copy path is bracketed by invalidate_range_start/end (3.7, 6bdb913f0a70).
    do_wp_page_copy_in_invalidate_range: bool
    # do_wp_page reuses an anonymous page when its refcount is 1 (5.9); before, when its mapcount is 1.
    do_wp_page_reuse_by_refcount: bool
    # do_wp_page reuses the last mapping of a KSM page (refcount 1) in place (5.1 .. 5.8).
    do_wp_page_reuses_ksm_page: bool
    # --- host: mm/ksm.c -------------------------------------------------------------------------
    # write_protect_page/replace_page are bracketed by invalidate_range_start/end (3.7, 6bdb913f0a70).
    ksm_pte_updates_in_invalidate_range: bool
    # try_to_merge_two_pages copies into a fresh KSM page (2.6.32); later the first page becomes it.
    ksm_merge_allocates_kpage: bool
    # ksmd breaks COW of a KSM page left with one mapping or found outside the stable tree (2.6.32).
    ksm_unmerges_unshared_ksm_page: bool
    # max_page_sharing and stable node chains (4.13); before, a KSM page has no sharing limit.
    ksm_stable_node_chains: bool
    # the use_zero_pages knob exists (4.10).
    ksm_use_zero_pages: bool
    # the smart_scan knob exists and is on by default (6.7).
    ksm_smart_scan: bool
    # /sys/kernel/mm/ksm/general_profit exists (6.4).
    ksm_general_profit: bool
    # ksm_zero_pages exists and general_profit counts KSM's zero pages (6.6).
    ksm_counts_zero_pages: bool
    # --- kvm: virt/kvm/kvm_main.c, arch/x86/kvm/mmu.c -------------------------------------------
    # kvm_mmu_notifier_change_pte is registered (until 6.10).
    kvm_change_pte: bool
    # gfn_to_pfn pins with write=1 even for a read fault (until 2.6.38).
    kvm_gup_always_write: bool
    # kvm_age_rmapp under EPT: "always_old" (2.6.32), "zap" (emulated young), "accessed_bit" (EPT A/D).
    kvm_age_ept: str
    # kvm_mmu_notifier_change_pte bumps mmu_notifier_seq (until the generic walkers of 5.13).
    kvm_change_pte_bumps_seq: bool
    # kvm_mmu_notifier_change_pte does nothing unless an invalidation is in progress (5.15).
    kvm_change_pte_needs_invalidation: bool
    # the fault's retry check tests the invalidated range, not just "an invalidation is running".
    kvm_retry_range_based: bool
    # which vCPUs kvm_flush_remote_tlbs IPIs: "pending_bit", "guest_mode", "request_needs_ipi" (kvm/requests.py).
    kvm_flush_ipi_rule: str
    # a served KVM_REQ_TLB_FLUSH bumps the vCPU's tlb_flush stat (kvm_vcpu_flush_tlb).
    kvm_tlb_flush_stat_counts_requests: bool
    # the VM stat remote_tlb_flush_requests counts every kvm_flush_remote_tlbs call (5.15).
    kvm_counts_flush_requests: bool
    # --- kvm, shadow paging: arch/x86/kvm/vmx.c, mmu.c ------------------------------------------
    # bypass_guest_pf: a not-present guest #PF on a "notrap" spte goes to the guest without an exit (until 3.1).
    kvm_bypass_guest_pf: bool
    # FNAME(pte_prefetch): a fixed #PF also maps its 8-pte group's other mappable ptes (2.6.37).
    kvm_pte_prefetch: bool

    def without_change_pte(self) -> "Profile":
        """KVM registers its notifier without ->change_pte (the invalidate_page fallback, where it exists)."""
        return replace(self, name=f"{self.name}-no-change-pte", kvm_change_pte=False)

    @property
    def uses_change_pte(self) -> bool:
        return self.notifier_has_change_pte and self.kvm_change_pte


BEHAVIOUR_FIELDS = tuple(f.name for f in fields(Profile) if f.name not in ("name", "version", "summary"))


def _summary(b: dict[str, bool | str]) -> str:
    if not b["notifier_has_change_pte"]:
        notify = "no change_pte: a plain set_pte_at inside invalidate_range_start/end"
    elif b["ksm_pte_updates_in_invalidate_range"]:
        notify = "change_pte arrives after invalidate_range_start zapped the spte"
    else:
        notify = "set_pte_at_notify calls change_pte; KVM rewrites the spte read-only in place"
    gup = ("gfn_to_pfn always pins for write" if b["kvm_gup_always_write"]
           else "read faults pin read-only")
    return f"{notify}; {gup}"


def profile_for_kernel(version: str) -> Profile:
    b = behaviour_of(version)
    return Profile(name=version, version=version, summary=_summary(b), **b)  # type: ignore[arg-type]


# The three named eras' profiles, by name (tests and tools that iterate "every era" use it).
PROFILES: dict[str, Profile] = {name: profile_for_kernel(name) for name in PROFILE_ALIASES}


def get_profile(name: str, change_pte: bool = True) -> Profile:
    """The Profile of kernel `name` (any mainline release 2.6.32 .. 6.12), optionally without KVM's change_pte."""
    version_key(name)  # a clear error for an unknown version
    profile = profile_for_kernel(name)
    return profile if change_pte else profile.without_change_pte()


def check_ksm_knobs(profile: Profile, given: Iterable[tuple[str, str, str]]) -> None:
    """A KSM knob the kernel did not have is an error naming the release that introduced it.

    `given`: (flag, /sys/kernel/mm/ksm file, the Profile field that says the kernel has it) of each
    knob given (config.KsmKnobs.release_gated)."""
    for option, knob, field in given:
        if not getattr(profile, field):
            row = introduced(field)
            raise ConfigError(f"{option}: Linux {profile.version} has no /sys/kernel/mm/ksm/{knob}; it appeared "
                              f"in {row.version} (commit {row.commit}, \"{row.title}\"). Choose --kernel "
                              f"{row.version} or later, or drop the option.")


__all__ = ["BEHAVIOUR_FIELDS", "DEFAULT_PROFILE", "MAINLINE", "PROFILES", "PROFILE_ALIASES", "Profile",
           "check_ksm_knobs", "get_profile", "profile_for_kernel"]
