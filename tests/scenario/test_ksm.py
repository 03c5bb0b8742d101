"""Scenario tests of KSM under running guests: merges, the exits they cost per kernel era, the selftest numbers.

The exit counts asserted here are derived from the kernel's code paths; each test
says how.  "Merge" below is ksmd's write_protect_page + replace_page on a page
whose spte the guest has (it read or wrote the page before).
"""

from dataclasses import dataclass, field

import pytest

from hypervisor.compare import run_compare
from hypervisor.sim import KsmConfig, SimConfig, Simulation

from .guests import image

ALL_SCANS = 1_000_000  # pages_to_scan larger than all mergeable pages: one wake-up = one full scan


@dataclass
class Phases:
    """Exit counters of VM 0 sampled when the guest printed each pass line."""

    sim: Simulation
    at_line: dict[int, dict[str, int]] = field(default_factory=dict)
    at_merge: dict[str, int] = field(default_factory=dict)
    cow_ksm_at_merge: int = 0


def _exits(sim: Simulation) -> dict[str, int]:
    vcpu = sim.vms[0].vcpus[0]
    return {r.name: n for r, n in vcpu.stats.exit_reasons.items()}


def run_with_manual_ksmd(img: str, cmdline: str, profile: str, change_pte: bool = True,
                         merge_after_pass: int = 1) -> Phases:
    """Run one VM with ksmd stopped (run=0); right after the guest prints pass N, run two
    full scans by hand (the checksum gate needs two visits), so pages merge while the
    guest spins before pass N+1's accesses."""
    sim = Simulation(SimConfig(image=img, cmdline=cmdline, profile=profile, change_pte=change_pte,
                               ksm=KsmConfig(enabled=True, run=0, pages_to_scan=ALL_SCANS)))
    phases = Phases(sim)

    def watch(s: Simulation) -> None:
        lines = bytes(s.devices[0].console).decode().count("\n")
        if lines not in phases.at_line:
            phases.at_line[lines] = _exits(s)
            if lines == merge_after_pass:
                ksm = s.ksm
                assert ksm is not None
                ksm.ksm_do_scan(ALL_SCANS)
                ksm.ksm_do_scan(ALL_SCANS)
                phases.at_merge = _exits(s)
                phases.cow_ksm_at_merge = s.vmstat.counters["cow_ksm"]

    sim.on_slice.append(watch)
    sim.run()
    return phases


def ept_between(phases: Phases, start: dict[str, int], end: dict[str, int]) -> int:
    return end.get("EPT_VIOLATION", 0) - start.get("EPT_VIOLATION", 0)


N = 16  # identical pages in one VM: only they are duplicates (code, stack, tables are unique)
SAMEPAGE = f"pages={N} passes=3 spin=50000"


def test_samepage_pages_merge_into_one_ksm_page() -> None:
    phases = run_with_manual_ksmd(image("samepage.bin"), SAMEPAGE, "2.6.32")
    ksm = phases.sim.ksm
    assert ksm is not None
    counters = ksm.counters()
    assert (counters["pages_shared"], counters["pages_sharing"]) == (1, N - 1)


def test_2_6_32_change_pte_rereads_merged_pages_without_any_exit() -> None:
    # write_protect_page and replace_page each call set_pte_at_notify with a read-only
    # pte; KVM's change_pte rewrites the spte in place to the KSM page, read-only.
    # The re-read in pass 2 finds a present readable spte: no EPT_VIOLATION.
    phases = run_with_manual_ksmd(image("samepage.bin"), SAMEPAGE, "2.6.32")
    assert ept_between(phases, phases.at_merge, phases.at_line[2]) == 0
    sim = phases.sim
    assert sim.vms[0].stats.spte_changed == 2 * N  # each page: write-protect, then re-point
    assert sim.vmstat.counters["cow_ksm"] == 0
    assert sim.ksm is not None and sim.ksm.counters()["pages_sharing"] == N - 1


def test_2_6_32_without_change_pte_first_reread_takes_two_exits_and_breaks_the_merge() -> None:
    # Without ->change_pte KVM gets ->invalidate_page (__mmu_notifier_change_pte's fallback,
    # 2.6.32 mm/mmu_notifier.c): the merge zaps each spte.  The re-read faults (exit 1);
    # 2.6.32's gfn_to_pfn pins with write=1 (get_user_pages_fast(addr, 1, 1)), so GUP
    # write-faults the KSM page: do_wp_page copies it (cow_ksm + 1) and notifies through
    # ptep_clear_flush + set_pte_at_notify, i.e. the invalidate_page fallback, which
    # bumps mmu_notifier_seq; the fault fails mmu_notifier_retry and the guest faults
    # again (exit 2), now on a private writable page.
    phases = run_with_manual_ksmd(image("samepage.bin"), SAMEPAGE, "2.6.32", change_pte=False)
    assert ept_between(phases, phases.at_merge, phases.at_line[2]) == 2 * N
    sim = phases.sim
    assert sim.vmstat.counters["cow_ksm"] - phases.cow_ksm_at_merge == N
    assert sim.vms[0].vcpus[0].stats.pf_retry == N
    # do_wp_page sent no invalidate_page of its own: one fallback per COW, two per merge.
    assert sim.vms[0].mmu.notifier.calls["invalidate_page"] == N * 2 + N


def test_2_6_38_change_pte_rereads_merged_pages_without_any_exit() -> None:
    # 2.6.38 still has 2.6.32's notifier path (no range bracket until 3.7): write_protect_page
    # and replace_page call set_pte_at_notify; kvm_set_pte_rmapp rewrites the spte read-only
    # to the KSM page (3 rewrites per pair from 2.6.33: the first page is write-protected in
    # place, the second write-protected and replaced).  The re-read finds a present spte.
    phases = run_with_manual_ksmd(image("samepage.bin"), SAMEPAGE, "2.6.38")
    assert ept_between(phases, phases.at_merge, phases.at_line[2]) == 0
    sim = phases.sim
    assert sim.vmstat.counters["cow_ksm"] == 0
    assert sim.ksm is not None and sim.ksm.counters()["pages_sharing"] == N - 1


def test_2_6_38_without_change_pte_first_reread_takes_one_exit_and_the_page_stays_merged() -> None:
    # Without ->change_pte the fallback invalidate_page zaps the spte at each merge step.
    # The re-read faults (exit 1), but 2.6.38's hva_to_pfn pins with the fault's own intent
    # (write_fault=0): get_user_pages_fast(read) maps the KSM page, and the non-faulting
    # __get_user_pages_fast(write=1) upgrade fails on its read-only pte, so set_spte maps it
    # read-only (no SPTE_HOST_WRITEABLE): no COW, no retry.  Pass 3 re-reads without exits.
    phases = run_with_manual_ksmd(image("samepage.bin"), SAMEPAGE, "2.6.38", change_pte=False)
    assert ept_between(phases, phases.at_merge, phases.at_line[2]) == N
    assert ept_between(phases, phases.at_line[2], phases.at_line[3]) == 0
    sim = phases.sim
    assert sim.vmstat.counters["cow_ksm"] == 0
    assert sim.vms[0].vcpus[0].stats.pf_retry == 0
    assert sim.ksm is not None and sim.ksm.counters()["pages_sharing"] == N - 1


@pytest.mark.parametrize("profile", ["3.7", "6.10"])
def test_3_7_and_6_10_first_reread_takes_one_exit_and_sharing_survives(profile: str) -> None:
    # invalidate_range_start zaps the spte before set_pte_at(_notify); change_pte (3.7)
    # finds nothing to update.  The re-read faults once; GUP pins read-only (the read
    # fault's own intent) and the non-faulting write upgrade fails on the read-only
    # KSM pte, so the spte maps the KSM page read-only: no COW, no retry.
    phases = run_with_manual_ksmd(image("samepage.bin"), SAMEPAGE, profile)
    assert ept_between(phases, phases.at_merge, phases.at_line[2]) == N
    # Pass 3 re-reads again: the read-only spte serves it.
    assert ept_between(phases, phases.at_line[2], phases.at_line[3]) == 0
    sim = phases.sim
    assert sim.vmstat.counters["cow_ksm"] == 0
    assert sim.vms[0].stats.spte_changed == 0
    assert sim.ksm is not None and sim.ksm.counters()["pages_sharing"] == N - 1


@pytest.mark.parametrize(("profile", "change_pte"), [("2.6.32", True), ("2.6.32", False), ("2.6.38", True),
                                                     ("2.6.38", False), ("3.7", True), ("6.10", True)])
def test_guest_write_to_a_merged_page_takes_two_exits_in_every_profile(profile: str, change_pte: bool) -> None:
    # cowstorm writes each page in pass 2 after its spin, before reading.  The write
    # faults (exit 1: the spte is read-only or zapped); GUP(write) copies the KSM page
    # in do_wp_page, whose notification (change_pte -> zap, invalidate_page, or the
    # range bracket) bumps mmu_notifier_seq; the fault retries (exit 2) and maps the
    # private copy writable.  The reads that follow need no exit.
    phases = run_with_manual_ksmd(image("cowstorm.bin"), f"pages={N} passes=3 spin=50000 write_at=2",
                                  profile, change_pte)
    start = phases.at_merge
    end = phases.at_line[3]  # "cowstorm: wrote" is line 2, pass 2's checksum line 3
    assert 2 not in phases.at_line or ept_between(phases, start, phases.at_line[2]) == 2 * N
    assert ept_between(phases, start, end) == 2 * N
    assert phases.sim.vmstat.counters["cow_ksm"] - phases.cow_ksm_at_merge == N


def test_from_5_1_to_5_8_a_guest_write_to_the_last_mapping_of_a_ksm_page_takes_one_exit() -> None:
    # As above for the first N-1 pages (two exits, one COW each).  The last write finds the
    # KSM page with refcount 1: 5.1 .. 5.8's do_wp_page reuses it (reuse_ksm_page) without
    # a copy or a notifier, so mmu_notifier_seq does not move and the fault is fixed at once.
    phases = run_with_manual_ksmd(image("cowstorm.bin"), f"pages={N} passes=3 spin=50000 write_at=2", "5.8")
    assert ept_between(phases, phases.at_merge, phases.at_line[3]) == 2 * (N - 1) + 1
    assert phases.sim.vmstat.counters["cow_ksm"] - phases.cow_ksm_at_merge == N - 1


KSMD = KsmConfig(enabled=True, pages_to_scan=ALL_SCANS, sleep_millisecs=0)


def _ksm_run(img: str, cmdline: str, **kw: object) -> dict[str, int]:
    ksm = kw.pop("ksm", KSMD)
    sim = Simulation(SimConfig(image=img, cmdline=cmdline, ksm=ksm, **kw))  # type: ignore[arg-type]
    result = sim.run()
    assert result.ksm is not None and not result.errors
    return {**result.ksm, "cow_ksm": result.vmstat.get("cow_ksm", 0)}


def test_selftest_10_identical_pages_give_1_shared_9_sharing() -> None:
    c = _ksm_run(image("samepage.bin"), "pages=10 passes=6 spin=20000")
    assert (c["pages_shared"], c["pages_sharing"]) == (1, 9)


def test_selftest_1000_pages_before_4_13_give_1_shared_999_sharing_without_chains() -> None:
    # No max_page_sharing before 4.13 (2c653d0ee2ae; 4.12's mm/ksm.c has no limit).
    c = _ksm_run(image("samepage.bin"), "pages=1000 passes=6 spin=20000", profile="4.12")
    assert (c["pages_shared"], c["pages_sharing"]) == (1, 999)
    assert "stable_node_chains" not in c


def test_selftest_1000_pages_from_4_13_at_max_page_sharing_256_give_4_shared_996_sharing() -> None:
    ksm = KsmConfig(enabled=True, pages_to_scan=ALL_SCANS, sleep_millisecs=0, max_page_sharing=256)
    c = _ksm_run(image("samepage.bin"), "pages=1000 passes=6 spin=20000", ksm=ksm, profile="4.13")
    assert (c["pages_shared"], c["pages_sharing"]) == (4, 996)
    assert (c["stable_node_chains"], c["stable_node_dups"]) == (1, 4)


def test_selftest_two_merged_pages_written_with_different_bytes_unmerge() -> None:
    c = _ksm_run(image("cowstorm.bin"), "pages=2 passes=8 spin=20000 write_at=4")
    assert (c["pages_shared"], c["pages_sharing"]) == (0, 0)
    assert c["cow_ksm"] == 2


@pytest.mark.parametrize(("zero_pages", "expected"), [(False, (1, 9, 0)), (True, (0, 0, 10))])
def test_selftest_10_zero_pages_merge_with_the_zero_page_only_with_use_zero_pages(
        zero_pages: bool, expected: tuple[int, int, int]) -> None:
    ksm = KsmConfig(enabled=True, pages_to_scan=ALL_SCANS, sleep_millisecs=0, use_zero_pages=zero_pages)
    c = _ksm_run(image("samepage.bin"), "pages=10 pattern=0 passes=6 spin=20000", ksm=ksm, profile="6.6")
    assert (c["pages_shared"], c["pages_sharing"], c["ksm_zero_pages"]) == expected


def test_run_2_unmerges_everything_and_the_guests_data_is_intact() -> None:
    cmd = "pages=32 passes=12 spin=20000"
    plain = Simulation(SimConfig(image=image("samepage.bin"), cmdline=cmd, vms=2)).run()
    ksm = KsmConfig(enabled=True, pages_to_scan=ALL_SCANS, sleep_millisecs=0, run_at=((3, 2),))
    result = Simulation(SimConfig(image=image("samepage.bin"), cmdline=cmd, vms=2, ksm=ksm)).run()
    assert result.ksm is not None
    assert (result.ksm["pages_shared"], result.ksm["pages_sharing"], result.ksm["run"]) == (0, 0, 2)
    assert result.vmstat["cow_ksm"] > 0  # unmerging is a COW of every merged mapping
    assert [v.console for v in result.vms] == [v.console for v in plain.vms]


COMPARE_CFG = SimConfig(image=image("samepage.bin"), vms=3, cmdline="pages=32 passes=30 spin=60000",
                        ksm=KsmConfig(enabled=True, pages_to_scan=100, sleep_millisecs=5))


def test_compare_attributes_each_saving_to_the_change_that_made_it() -> None:
    result = run_compare(COMPARE_CFG)
    assert result.console_mismatches() == []
    rows = {r.run.label: r for r in result.rows}
    assert list(rows) == ["ksm off", "2.6.32", "2.6.32 no change_pte", "2.6.38", "2.6.38 no change_pte",
                          "3.7", "6.10"]
    base = rows["ksm off"].ept_violations
    s = {label: r.summary() for label, r in rows.items()}
    # 2.6.32 and 2.6.38 with change_pte: KSM costs the running guests no exit at all; every
    # merge step rewrote sptes in place, zapping none for KSM.
    for label in ("2.6.32", "2.6.38"):
        assert s[label]["EPT_VIOLATION"] == base and s[label]["cow_ksm"] == 0
        assert s[label]["sptes_rewritten"] > 0 and s[label]["pages_sharing"] > 0
    # 2.6.32 without it: every re-read breaks the merge (two exits, one COW), ksmd merges again.
    assert s["2.6.32 no change_pte"]["cow_ksm"] > 32 * 3
    # 2.6.38 without it: one exit per merged page re-read, no COW.
    assert s["2.6.38 no change_pte"]["cow_ksm"] == 0 and s["2.6.38 no change_pte"]["EPT_VIOLATION"] > base
    # 3.7 and 6.10: the bracket zaps before change_pte; nothing is rewritten.
    for label in ("3.7", "6.10"):
        assert s[label]["sptes_rewritten"] == 0 and s[label]["cow_ksm"] == 0 and s[label]["sptes_zapped"] > 0
    assert s["3.7"]["change_pte_calls"] > 0 == s["6.10"]["change_pte_calls"]
    # Remote TLB flushes: kvm_set_pte_rmapp flushes once per spte it rewrote (2.6.32: twice per
    # merged page, write-protect then re-point); range_start and invalidate_page once per zap.
    for label in ("2.6.32", "2.6.38"):
        assert s[label]["remote_tlb_flush"] == s[label]["sptes_rewritten"]
    for label in ("2.6.32 no change_pte", "2.6.38 no change_pte", "3.7", "6.10"):
        assert s[label]["remote_tlb_flush"] == s[label]["sptes_zapped"]
    saved = {sv.what: sv for sv in result.attribution()}
    cp32, cp38 = saved["change_pte in 2.6.32"], saved["change_pte in 2.6.38"]
    assert cp32.exits == s["2.6.32 no change_pte"]["EPT_VIOLATION"] - base
    assert cp38.exits == s["2.6.38 no change_pte"]["EPT_VIOLATION"] - base and cp38.cow_ksm == 0
    pin = saved["read-intent pinning (2.6.38)"]
    assert (pin.before, pin.after) == ("2.6.32 no change_pte", "2.6.38 no change_pte")
    assert pin.exits == cp32.exits - cp38.exits and pin.cow_ksm == s["2.6.32 no change_pte"]["cow_ksm"]
    assert any("ksm_merge_allocates_kpage" in d for d in pin.also_differs)
    bracket = saved["the 3.7 invalidate_range bracket around KSM's pte updates"]
    assert (bracket.before, bracket.after) == ("2.6.38", "3.7") and bracket.exits < 0


def test_smart_scan_skips_pages_that_never_merge_without_changing_what_merges() -> None:
    # Long enough for unique pages (code, stack, boot params) to age past three visits.
    cmd = "pages=16 passes=30 spin=20000"
    plain = _ksm_run(image("samepage.bin"), cmd, vms=2, profile="6.10",
                     ksm=KsmConfig(enabled=True, pages_to_scan=ALL_SCANS, sleep_millisecs=0, smart_scan=False))
    smart = _ksm_run(image("samepage.bin"), cmd, vms=2, profile="6.10",
                     ksm=KsmConfig(enabled=True, pages_to_scan=ALL_SCANS, sleep_millisecs=0, smart_scan=True))
    assert plain["pages_skipped"] == 0 and smart["pages_skipped"] > 0
    assert (smart["pages_shared"], smart["pages_sharing"]) == (plain["pages_shared"], plain["pages_sharing"])
