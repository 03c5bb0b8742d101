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
        lines = bytes(s.vms[0].vcpus[0].console).decode().count("\n")
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
    # Without ->change_pte KVM gets ->invalidate_page: the merge zaps each spte.  The
    # re-read faults (exit 1); 2.6.32's gfn_to_pfn pins with write=1, so GUP write-faults
    # the KSM page: do_wp_page copies it (cow_ksm + 1) and notifies (change_pte falls
    # back to invalidate_page, then the trailing invalidate_page): mmu_notifier_seq
    # moved, the fault fails mmu_notifier_retry and the guest faults again (exit 2),
    # now on a private writable page.
    phases = run_with_manual_ksmd(image("samepage.bin"), SAMEPAGE, "2.6.32", change_pte=False)
    assert ept_between(phases, phases.at_merge, phases.at_line[2]) == 2 * N
    sim = phases.sim
    assert sim.vmstat.counters["cow_ksm"] - phases.cow_ksm_at_merge == N
    assert sim.vms[0].vcpus[0].stats.pf_retry == N


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


@pytest.mark.parametrize(("profile", "change_pte"), [("2.6.32", True), ("2.6.32", False), ("3.7", True),
                                                     ("6.10", True)])
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


def test_selftest_1000_pages_at_max_page_sharing_256_give_4_shared_996_sharing() -> None:
    ksm = KsmConfig(enabled=True, pages_to_scan=ALL_SCANS, sleep_millisecs=0, max_page_sharing=256)
    c = _ksm_run(image("samepage.bin"), "pages=1000 passes=6 spin=20000", ksm=ksm)
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
    c = _ksm_run(image("samepage.bin"), "pages=10 pattern=0 passes=6 spin=20000", ksm=ksm)
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


def test_compare_tells_the_2009_2012_2024_story_with_identical_guest_output() -> None:
    result = run_compare(COMPARE_CFG)
    assert result.console_mismatches() == []
    rows = {r.run.label: r for r in result.rows}
    base = rows["ksm off"].ept_violations
    # 2009: with change_pte, KSM costs the running guests no exit at all.
    assert rows["2.6.32"].ept_violations == base
    assert rows["2.6.32"].summary()["pages_sharing"] > 0
    # 2009 without change_pte: every re-read breaks the merge (two exits, one COW) and
    # ksmd merges again later, so COWs outnumber the pages that were ever merged.
    no_cp = rows["2.6.32 no change_pte"].summary()
    assert no_cp["cow_ksm"] > 32 * 3 and no_cp["EPT_VIOLATION"] > base + 2 * no_cp["cow_ksm"] // 2
    # 2012 and 2024: one exit per merged page touched again; change_pte changes nothing.
    assert rows["3.7"].summary()["sptes_changed_by_change_pte"] == 0
    with_cp, without_cp = rows["3.7"].result.totals(), rows["3.7 no change_pte"].result.totals()
    assert with_cp["exits"] == without_cp["exits"] and with_cp["stats"] == without_cp["stats"]
    assert with_cp["notifier_calls"]["change_pte"] > 0 == without_cp["notifier_calls"]["change_pte"]
    for label in ("3.7", "6.10"):
        s = rows[label].summary()
        assert s["cow_ksm"] == 0 and s["pages_sharing"] == rows["2.6.32"].summary()["pages_sharing"]
        assert base < s["EPT_VIOLATION"] < no_cp["EPT_VIOLATION"]
    assert rows["3.7"].result.totals()["exits"] == rows["6.10"].result.totals()["exits"]
    assert rows["3.7"].result.ksm == rows["6.10"].result.ksm
    assert result.avoided_exits()["2.6.32"] == no_cp["EPT_VIOLATION"] - base


def test_smart_scan_skips_pages_that_never_merge_without_changing_what_merges() -> None:
    # Long enough for unique pages (code, stack, boot params) to age past three visits.
    cmd = "pages=16 passes=30 spin=20000"
    plain = _ksm_run(image("samepage.bin"), cmd, vms=2, profile="6.10")
    smart = _ksm_run(image("samepage.bin"), cmd, vms=2, profile="6.10",
                     ksm=KsmConfig(enabled=True, pages_to_scan=ALL_SCANS, sleep_millisecs=0, smart_scan=True))
    assert plain["pages_skipped"] == 0 and smart["pages_skipped"] > 0
    assert (smart["pages_shared"], smart["pages_sharing"]) == (plain["pages_shared"], plain["pages_sharing"])
