"""smart_scan (6.7+): pages that keep failing to merge are skipped on later passes, and cost no pages_to_scan."""

import pytest

from .support import full_scan, page_of, shared_and_sharing
from .test_ksm import host_with_pages, identical


def unique(n: int) -> list[bytes]:
    return [page_of(0x10 + i) for i in range(n)]


@pytest.mark.parametrize("era", ["6.7", "6.10"])
def test_smart_scan_off_scans_every_page_on_every_pass(era: str) -> None:
    host = host_with_pages(era, unique(4))
    host.ksm.smart_scan = False
    for _ in range(8):
        full_scan(host.ksm)
    counters = host.ksm.counters()
    assert counters["pages_skipped"] == 0 and counters["smart_scan"] == 0
    assert counters["pages_scanned"] == 4 * 8


@pytest.mark.parametrize(("era", "default"), [("2.6.32", None), ("6.6", None), ("6.7", 1), ("6.12", 1)])
def test_smart_scan_is_on_by_default_from_6_7_and_absent_before(era: str, default: int | None) -> None:
    # 6.7's "ksm: add smart page scanning" adds /sys/kernel/mm/ksm/smart_scan, default 1.
    host = host_with_pages(era, unique(4))
    for _ in range(8):
        full_scan(host.ksm)
    counters = host.ksm.counters()
    assert counters.get("smart_scan") == default
    assert (counters.get("pages_skipped", 0) > 0) is (default == 1)


def test_smart_scan_skips_unique_pages_from_their_fourth_visit_by_skip_age() -> None:
    host = host_with_pages("6.10", unique(1))
    host.ksm.smart_scan = True
    scanned = []
    for _ in range(12):
        before = host.ksm.pages_scanned
        full_scan(host.ksm)
        scanned.append(host.ksm.pages_scanned - before)
    # Visits 1-3 (age 0-2) are scanned.  Visit 4 (age 3) is scanned and earns skip_age(3) = 1
    # skip, spent on visit 5; visit 6 (age 5) earns 2, visit 9 (age 8) earns 4.
    assert scanned == [1, 1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 0]
    assert host.ksm.counters()["pages_skipped"] == scanned.count(0)


@pytest.mark.parametrize("era", ["6.7", "6.10"])
def test_smart_scan_still_merges_identical_pages_and_never_skips_ksm_pages(era: str) -> None:
    host = host_with_pages(era, identical(6) + unique(3))
    host.ksm.smart_scan = True
    for _ in range(10):
        full_scan(host.ksm)
    assert shared_and_sharing(host.ksm) == (1, 5)
    counters = host.ksm.counters()
    assert counters["pages_skipped"] > 0
    # Only the three unique pages are ever skipped: the six merged ones are KSM pages.
    assert counters["pages_scanned"] + counters["pages_skipped"] == 9 * 10


def test_skipped_pages_cost_no_pages_to_scan() -> None:
    host = host_with_pages("6.10", unique(8))
    host.ksm.smart_scan = True
    for _ in range(4):
        full_scan(host.ksm)  # every page is now age 4 with one skip earned
    passes = host.ksm.seqnr
    host.ksm.ksm_do_scan(3)
    # All eight are skipped, so three pages to scan are not enough to stop short of the pass's end.
    assert (host.ksm.pages_scanned, host.ksm.pages_skipped, host.ksm.seqnr) == (32, 8, passes + 1)
    host.ksm.ksm_do_scan(3)
    assert (host.ksm.pages_scanned, host.ksm.pages_skipped) == (35, 8)
