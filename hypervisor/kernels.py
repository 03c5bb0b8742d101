"""The one table of kernel changes hvsim models: each row a behaviour, the release it appeared in, its commit.

A kernel version's `Profile` (hypervisor/profiles.py) starts from 2.6.32's
behaviour and applies, in release order, every row whose release is not later
than the version asked for.  The model (host/, kvm/) reads only Profile fields,
never a version number, so adding a kernel change is adding a row here and the
one place in the model that reads its field.

Each row says where it was read (tree and file; function names in the reason)
and whether the commit id was seen in stored text ("verified") or is from memory
("unverified").  The researcher's notes behind the rows are in the project's
kernel fact sheet; `hvsim kernels` prints this table.
"""

import textwrap
from dataclasses import dataclass

from .errors import ConfigError

# Every mainline release hvsim accepts, oldest first.
MAINLINE: tuple[str, ...] = (
    *(f"2.6.{n}" for n in range(32, 40)),
    *(f"3.{n}" for n in range(20)),
    *(f"4.{n}" for n in range(21)),
    *(f"5.{n}" for n in range(20)),
    *(f"6.{n}" for n in range(13)),
)
OLDEST, NEWEST = MAINLINE[0], MAINLINE[-1]


def version_key(version: str) -> int:
    """Position of a mainline release in MAINLINE (its order), or a ConfigError saying what is accepted."""
    try:
        return MAINLINE.index(version)
    except ValueError:
        raise ConfigError(
            f"unknown kernel version {version!r}: give a mainline release from {OLDEST} to {NEWEST}, "
            "e.g. 2.6.38, 3.7, 4.19 or 6.8 (`hvsim kernels` lists what changes between them)."
        ) from None


@dataclass(frozen=True)
class KernelChange:
    """One modelled behaviour change: from `version` on, Profile.`field` is `value`."""

    field: str
    value: bool | str
    version: str
    commit: str  # 12 hex digits, or "-" where no single commit is known
    title: str
    reason: str  # one line: what changes in the model
    read: str  # the trees and files the behaviour was read in
    verified: bool  # the commit id and title were seen in stored text (the behaviour is read in `read`)


# The Profile of 2.6.32, the oldest release hvsim models: the state every row changes.
# (Read in sndrzt/linux-2.6.32: mm/memory.c, mm/ksm.c, mm/mmu_notifier.c, include/linux/mmu_notifier.h,
# virt/kvm/kvm_main.c, arch/x86/kvm/mmu.c.)
BASELINE: dict[str, bool | str] = {
    "set_pte_at_notify_change_pte_first": False,
    "change_pte_falls_back_to_invalidate_page": True,
    "ksm_pte_updates_in_invalidate_range": False,
    "do_wp_page_copy_in_invalidate_range": False,
    "notifier_has_change_pte": True,
    "notifier_has_invalidate_page": True,
    "ksm_merge_allocates_kpage": True,
    "ksm_unmerges_unshared_ksm_page": True,
    "ksm_stable_node_chains": False,
    "ksm_use_zero_pages": False,
    "ksm_smart_scan": False,
    "do_wp_page_reuse_by_refcount": False,
    "do_wp_page_reuses_ksm_page": False,
    "kvm_change_pte": True,
    "kvm_gup_always_write": True,
    "kvm_age_ept": "always_old",
    "kvm_change_pte_bumps_seq": True,
    "kvm_change_pte_needs_invalidation": False,
    "kvm_retry_range_based": False,
    "kvm_bypass_guest_pf": True,
    "kvm_pte_prefetch": False,
    "ksm_general_profit": False,
    "ksm_counts_zero_pages": False,
    "kvm_flush_ipi_rule": "pending_bit",
    "kvm_tlb_flush_stat_counts_requests": False,
    "kvm_counts_flush_requests": False,
}

CHANGES: tuple[KernelChange, ...] = (
    KernelChange(
        "ksm_merge_allocates_kpage", False, "2.6.33", "80e148226028", "ksm: share anon page without allocating",
        "try_to_merge_two_pages turns the first page into the KSM page in place (one change_pte) instead "
        "of copying both into a fresh one (two each)",
        "sndrzt/linux-2.6.32, DesignA-Electronics/linux-2.6.33.3 mm/ksm.c", True),
    KernelChange(
        "ksm_unmerges_unshared_ksm_page", False, "2.6.33", "08beca44dfb0", "ksm: stable_node point to page and back",
        "ksmd no longer breaks COW of a KSM page left with one mapping (ksm_do_scan) or found outside "
        "the stable tree (cmp_and_merge_page); which 2.6.33 commit removed it is inferred",
        "sndrzt/linux-2.6.32, DesignA-Electronics/linux-2.6.33.3, zekezang/linux-2.6.38 mm/ksm.c", False),
    KernelChange(
        "kvm_age_ept", "zap", "2.6.34", "6316e1c8c6af", "KVM: VMX: emulate accessed bit for EPT",
        "kvm_age_rmapp under EPT without A/D bits: 2.6.32/2.6.33 always answer old; from 2.6.34 a present "
        "spte answers young and is zapped (kvm_unmap_rmapp), so the next access shows up",
        "sndrzt/linux-2.6.32, DesignA-Electronics/linux-2.6.33.3, urbanspr1nter/linux-2.6.34 arch/x86/kvm/mmu.c",
        True),
    KernelChange(
        "kvm_pte_prefetch", True, "2.6.37", "-", "(KVM: MMU: prefetch ptes when intercepted guest #PF)",
        "shadow paging: a fixed #PF also maps the other trap slots of its 8-pte group whose pages can be "
        "pinned without faulting (FNAME(pte_prefetch), __direct_pte_prefetch; only --mmu shadow)",
        "sndrzt/linux-2.6.32 (absent), srinugnt2000/linux-2.6.37, robacklin/linux-3.7.2 arch/x86/kvm/"
        "paging_tmpl.h, mmu.c", False),
    KernelChange(
        "kvm_gup_always_write", False, "2.6.38", "612819c3c6e6",
        "KVM: propagate fault r/w information to gup(), allow read-only memory",
        "hva_to_pfn pins with the fault's own intent; a read fault maps a write-protected (KSM) pte "
        "read-only instead of COW-breaking it",
        "srinugnt2000/linux-2.6.37, zekezang/linux-2.6.38 virt/kvm/kvm_main.c, arch/x86/kvm/mmu.c", False),
    KernelChange(
        "kvm_flush_ipi_rule", "guest_mode", "2.6.39", "6b7e2d099148", "KVM: Add \"exiting guest mode\" state",
        "make_all_cpus_request sets the request on every vCPU (no test_and_set coalescing) and IPIs only "
        "vCPUs not OUTSIDE_GUEST_MODE (2.6.32..2.6.38: every vCPU whose request bit was clear, any mode)",
        "sndrzt/linux-2.6.32, zekezang/linux-2.6.38, robacklin/linux-2.6.39.4, robacklin/linux-3.7.2 "
        "virt/kvm/kvm_main.c, arch/x86/kvm/x86.c", True),
    KernelChange(
        "kvm_bypass_guest_pf", False, "3.1", "-", "(KVM: MMU: remove bypass_guest_pf)",
        "shadow paging: the bypass_guest_pf module parameter and the trap/notrap non-present sptes are "
        "gone, so every guest #PF exits and is injected by KVM (only --mmu shadow is affected)",
        "sndrzt/linux-2.6.32, robacklin/linux-2.6.39.4, eastmoutain/Linux-3.0.1 (present); a 3.1.10 tree, "
        "AndDiSa/android_kernel_asus_grouper, and yuhc/linux-3.6.5 (absent) arch/x86/kvm/vmx.c", False),
    KernelChange(
        "kvm_age_ept", "accessed_bit", "3.6", "-", "(KVM: VMX: EPT accessed and dirty bits)",
        "kvm_age_rmapp tests and clears the EPT accessed bit when the CPU has one (hvsim's does) "
        "instead of zapping",
        "yuhc/linux-3.6.5 arch/x86/kvm/mmu.c, arch/x86/kvm/vmx.c (enable_ept_ad_bits)", False),
    KernelChange(
        "set_pte_at_notify_change_pte_first", True, "3.7", "48af0d7cb3c8",
        "mm: mmu_notifier: fix inconsistent memory between secondary MMU and host",
        "set_pte_at_notify calls change_pte before set_pte_at (2.6.32..3.6: after)",
        "yuhc/linux-3.6.5, robacklin/linux-3.7.2 include/linux/mmu_notifier.h", True),
    KernelChange(
        "change_pte_falls_back_to_invalidate_page", False, "3.7", "6bdb913f0a70",
        "mm: wrap calls to set_pte_at_notify with invalidate_range_start and invalidate_range_end",
        "__mmu_notifier_change_pte no longer sends invalidate_page to a notifier without change_pte",
        "yuhc/linux-3.6.5, robacklin/linux-3.7.2 mm/mmu_notifier.c", True),
    KernelChange(
        "ksm_pte_updates_in_invalidate_range", True, "3.7", "6bdb913f0a70",
        "mm: wrap calls to set_pte_at_notify with invalidate_range_start and invalidate_range_end",
        "write_protect_page and replace_page run inside invalidate_range_start/end: KVM zaps the spte "
        "before change_pte can rewrite it",
        "yuhc/linux-3.6.5, robacklin/linux-3.7.2 mm/ksm.c", True),
    KernelChange(
        "do_wp_page_copy_in_invalidate_range", True, "3.7", "6bdb913f0a70",
        "mm: wrap calls to set_pte_at_notify with invalidate_range_start and invalidate_range_end",
        "do_wp_page's copy path runs inside invalidate_range_start/end",
        "yuhc/linux-3.6.5, robacklin/linux-3.7.2 mm/memory.c", True),
    KernelChange(
        "kvm_tlb_flush_stat_counts_requests", True, "4.10", "-", "(kvm_vcpu_flush_tlb counts stat.tlb_flush)",
        "a served KVM_REQ_TLB_FLUSH bumps the vCPU's tlb_flush (kvm_vcpu_flush_tlb); 3.7.2 calls "
        "kvm_x86_ops->tlb_flush uncounted; first seen in 4.10.17, the release between is not bracketed",
        "robacklin/linux-3.7.2, pengdonglin137/linux-4.10.17 arch/x86/kvm/x86.c", False),
    KernelChange(
        "ksm_use_zero_pages", True, "4.11", "e86c59b1b12d",
        "mm/ksm: improve deduplication of zero pages with colouring",
        "the use_zero_pages knob (off by default): all-zero pages merge with the zero page",
        "pengdonglin137/linux-4.10.17, HCLS/linux-4.11 mm/ksm.c", True),
    KernelChange(
        "kvm_flush_ipi_rule", "request_needs_ipi", "4.12", "-", "(KVM: add KVM_REQUEST_WAIT and NO_WAKEUP flags)",
        "kvm_make_all_cpus_request IPIs per kvm_request_needs_ipi: TLB_FLUSH is WAIT|NO_WAKEUP, so the "
        "same vCPUs as 2.6.39 (mode != OUTSIDE_GUEST_MODE) and a halted vCPU is not woken",
        "HCLS/linux-4.11, jason50123/linux-4.12 virt/kvm/kvm_main.c, include/linux/kvm_host.h", False),
    KernelChange(
        "notifier_has_invalidate_page", False, "4.13", "5f32b265400d", "mm/mmu_notifier: kill invalidate_page",
        "no ->invalidate_page op: a one-page unmap is a one-page invalidate_range_start/end",
        "jason50123/linux-4.12, shizukanaskytree/linux-4.13.4 mm/, virt/kvm/kvm_main.c", True),
    KernelChange(
        "ksm_stable_node_chains", True, "4.13", "2c653d0ee2ae",
        "ksm: introduce ksm_max_page_sharing per page deduplication limit",
        "max_page_sharing (256) caps the mappings of one KSM page; beyond it stable node chains hold "
        "duplicates (before: no limit, N identical pages share one KSM page)",
        "jason50123/linux-4.12, shizukanaskytree/linux-4.13.4 mm/ksm.c", True),
    KernelChange(
        "do_wp_page_reuses_ksm_page", True, "5.1", "52d1e606ee73", "mm: reuse only-pte-mapped KSM page in do_wp_page()",
        "a write fault on the last mapping of a KSM page (refcount 1) reuses it in place (reuse_ksm_page): "
        "no copy, no notifier; release 5.1 inferred (absent in 5.0.1, present in 5.2.1)",
        "5.0.1, 5.2.1, 5.7.14, 5.8.1 mm/memory.c, mm/ksm.c", False),
    KernelChange(
        "do_wp_page_reuse_by_refcount", True, "5.9", "09854ba94c6a", "mm: do_wp_page() simplification",
        "do_wp_page reuses an anonymous page only when its refcount is 1 (before: when its mapcount is 1)",
        "sndrzt/linux-2.6.32 mm/memory.c, mm/swapfile.c (reuse_swap_page); 5.8.1, 5.9.1 mm/memory.c", True),
    KernelChange(
        "do_wp_page_reuses_ksm_page", False, "5.9", "09854ba94c6a", "mm: do_wp_page() simplification",
        "a KSM page is always copied again (reuse_ksm_page no longer called)",
        "5.8.1, 5.9.1, 5.12.9 mm/memory.c", True),
    KernelChange(
        "kvm_retry_range_based", True, "5.12", "4a42d848db14", "KVM: x86/mmu: Consider the hva in mmu_notifier retry",
        "a fault retries for an invalidation in progress only if its address is in the invalidated range "
        "(mmu_notifier_retry_hva; mmu_invalidate_retry_gfn in 6.8)",
        "CompressionDuck/linux-5.11, zhangyinjun/linux-5.12.9, sndrzt/linux-6.8 include/linux/kvm_host.h", False),
    KernelChange(
        "kvm_change_pte_bumps_seq", False, "5.13", "c13fda237f08",
        "KVM: Assert that notifier count is elevated in .change_pte()",
        "kvm_mmu_notifier_change_pte no longer bumps mmu_notifier_seq (5.12.9 does, 5.14-rc5 does not)",
        "zhangyinjun/linux-5.12.9, lsk-legends/linux-5.14 virt/kvm/kvm_main.c", False),
    KernelChange(
        "kvm_change_pte_needs_invalidation", True, "5.15", "071064f14d87",
        "KVM: Don't take mmu_lock for range invalidation unless necessary",
        "kvm_mmu_notifier_change_pte returns at once unless an invalidation is in progress",
        "lsk-legends/linux-5.14, sndrzt/linux-5.15, sndrzt/linux-6.8 virt/kvm/kvm_main.c", True),
    KernelChange(
        "kvm_counts_flush_requests", True, "5.15", "-", "(KVM: count remote TLB flush requests)",
        "kvm_flush_remote_tlbs bumps remote_tlb_flush_requests on every call (remote_tlb_flush only "
        "when it IPI'd)",
        "lsk-legends/linux-5.14, sndrzt/linux-5.15, sndrzt/linux-6.8 virt/kvm/kvm_main.c", False),
    KernelChange(
        "ksm_general_profit", True, "6.4", "-", "mm: add new KSM process and sysfs knobs",
        "/sys/kernel/mm/ksm/general_profit exists",
        "SToPire/linux-6.3.8, lewisevans2007/linux-6.4 mm/ksm.c", False),
    KernelChange(
        "ksm_counts_zero_pages", True, "6.6", "-", "ksm: count all zero pages placed by KSM",
        "/sys/kernel/mm/ksm/ksm_zero_pages exists and general_profit counts the zero pages KSM placed",
        "sndrzt/linux-6.5, linux-6.6.9 mm/ksm.c", False),
    KernelChange(
        "ksm_smart_scan", True, "6.7", "5e924ff54d08", "mm/ksm: add \"smart\" page scanning mode",
        "the smart_scan knob, on by default, and pages_skipped: pages that keep failing to merge are skipped",
        "linux-6.6.9, xlch88/kernel-6.7.3-cjktty mm/ksm.c", True),
    KernelChange(
        "kvm_change_pte", False, "6.10", "f3b65bbaed7c", "KVM: delete .change_pte MMU notifier callback",
        "KVM registers no change_pte (it could find no spte to change since 3.7)",
        "ec-jt/linux-6.9.0, shilei-massclouds/linux-6.12 virt/kvm/kvm_main.c", True),
    KernelChange(
        "notifier_has_change_pte", False, "6.10", "-", "mmu_notifier: remove the .change_pte() callback",
        "the op is gone and set_pte_at_notify is plain set_pte_at (\"mm: replace set_pte_at_notify() with "
        "just set_pte_at()\")",
        "ec-jt/linux-6.9.0, shilei-massclouds/linux-6.12 include/linux/mmu_notifier.h, mm/ksm.c", False),
)


def changes_up_to(version: str) -> list[KernelChange]:
    """The rows in force in `version`, oldest first."""
    key = version_key(version)
    return [c for c in CHANGES if version_key(c.version) <= key]


def behaviour_of(version: str) -> dict[str, bool | str]:
    """Every Profile behaviour field's value in `version`: the baseline with the rows applied in order."""
    state = dict(BASELINE)
    for change in changes_up_to(version):
        state[change.field] = change.value
    return state


def introduced(field: str, value: bool | str = True) -> KernelChange:
    """The row that first gave `field` the value `value` (for 'your kernel lacks X' errors)."""
    return next(c for c in CHANGES if c.field == field and c.value == value)


def kernels_as_dict() -> dict[str, object]:
    """`hvsim kernels --json`: the baseline and every row."""
    return {"baseline": {"version": OLDEST, **BASELINE}, "releases": list(MAINLINE),
            "changes": [{"version": c.version, "field": c.field, "value": c.value, "commit": c.commit,
                         "title": c.title, "reason": c.reason, "read": c.read, "verified": c.verified}
                        for c in CHANGES]}


def render_kernels() -> str:
    """`hvsim kernels`: the table, oldest change first (commit title and reason under each row)."""
    cols = ("version", "behaviour (Profile field = value)", "commit", "verified")
    rows = [(c.version, f"{c.field} = {c.value}", c.commit, "yes" if c.verified else "unverified") for c in CHANGES]
    base = ", ".join(f"{k} = {v}" for k, v in BASELINE.items())
    widths = [max(len(col), *(len(r[i]) for r in rows)) for i, col in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [
        f"hvsim kernels: the kernel changes hvsim models, {OLDEST} to {NEWEST}",
        *textwrap.wrap(f"baseline {OLDEST}: {base}", 100, subsequent_indent="  "),
        "",
        fmt.format(*cols).rstrip(),
        fmt.format(*("-" * w for w in widths)),
    ]
    for change, row in zip(CHANGES, rows, strict=True):
        lines.append(fmt.format(*row).rstrip())
        title = change.title if change.title.startswith("(") else f'"{change.title}"'
        lines += textwrap.wrap(f"{title}: {change.reason}", 100, initial_indent=" " * 9, subsequent_indent=" " * 9)
    lines += [
        "",
        "--kernel V applies every row up to V; --profile 2.6.32|3.7|6.10 are the same as --kernel.",
        "verified: commit id and title seen in stored text (else from memory or inferred). Every behaviour",
        "was read in the kernel trees each row of hypervisor/kernels.py names.",
    ]
    return "\n".join(lines) + "\n"
