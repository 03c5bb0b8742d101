"""Causal arrows in the Perfetto trace: each ksmd merge or zap links to the first exit it caused on that page."""

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hypervisor.cli import main
from hypervisor.kvm.vm import GUEST_RAM_HVA
from hypervisor.sim import GUEST_IMAGES
from hypervisor.trace import KSMD_PID, VMM_PID_BASE

PAGE = 4096


def trace(tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    out = tmp_path / "t.json"
    result = CliRunner().invoke(main, ["run", str(GUEST_IMAGES / "samepage.bin"), "--vms", "2", "--memory", "4M",
                                       "--ksm", "--ksm-sleep-ms", "0", "--cmdline", "pages=8 passes=4 spin=20000",
                                       "--trace", str(out), "-q", *extra])
    assert result.exit_code == 0, result.stderr
    events: list[dict[str, Any]] = json.loads(out.read_text())["traceEvents"]
    return events


def page_of_source(e: dict[str, Any]) -> tuple[int, int]:
    """(vm pid, gfn) of a ksm_merge_one_page or a one-page kvm_unmap_hva_range."""
    args = e["args"]
    if e["name"] == "ksm_merge_one_page":
        return VMM_PID_BASE + int(args["mm"].removeprefix("vm")), (args["hva"] - GUEST_RAM_HVA) // PAGE
    raise AssertionError("zaps carry their vm in the flow's own check")


def neighbour(events: list[dict[str, Any]], index: int, step: int) -> dict[str, Any]:
    """The trace event a flow record binds to: the nearest one in direction `step` that is not a flow record."""
    while events[index]["ph"] in ("s", "f"):
        index += step
    return events[index]


@pytest.mark.parametrize(("profile", "extra"), [("3.7", ()), ("2.6.32", ("--no-change-pte",))])
def test_every_flow_runs_from_a_ksmd_merge_or_zap_to_the_first_exit_on_that_page(
        tmp_path: Path, profile: str, extra: tuple[str, ...]) -> None:
    events = trace(tmp_path, "--profile", profile, *extra)
    starts = {e["id"]: i for i, e in enumerate(events) if e["ph"] == "s"}
    ends = {e["id"]: i for i, e in enumerate(events) if e["ph"] == "f"}
    assert ends, "merges under this profile zap sptes, so some exits must be linked"
    assert set(ends) <= set(starts)
    for flow, end in ends.items():
        s, f = events[starts[flow]], events[end]
        assert (s["name"], s["cat"]) == (f["name"], f["cat"]) and "bp" not in f
        # A flow start sits right after the instant it binds to (Perfetto binds it to the topmost slice),
        # a flow end right before its exit (it binds to the next slice).
        source, exit_ = neighbour(events, starts[flow], -1), neighbour(events, end, +1)
        assert source["pid"] == KSMD_PID and source["name"] in ("ksm_merge_one_page", "kvm_unmap_hva_range")
        assert (source["ts"], source["pid"]) == (s["ts"], s["pid"])
        assert exit_["name"] == "kvm_exit" and exit_["args"]["reason"] == "EPT_VIOLATION"
        assert (exit_["ts"], exit_["pid"]) == (f["ts"], f["pid"]) and f["ts"] >= s["ts"]
        gfn = exit_["args"]["info2"] // PAGE
        if source["name"] == "ksm_merge_one_page":
            assert page_of_source(source) == (f["pid"], gfn)
        else:
            assert source["args"]["start"] <= GUEST_RAM_HVA + gfn * PAGE < source["args"]["end"]
        # ... and it is the first exit on that page since the merge or zap.
        between = events[starts[flow]:events.index(exit_) + 1]
        assert [e for e in between if e["name"] == "kvm_exit" and e["pid"] == f["pid"]
                and e["args"]["info2"] // PAGE == gfn] == [exit_]


def test_change_pte_leaves_merged_pages_mapped_so_few_exits_are_caused(tmp_path: Path) -> None:
    with_change_pte = trace(tmp_path, "--profile", "2.6.32")
    without = trace(tmp_path, "--profile", "2.6.32", "--no-change-pte")
    linked = [sum(e["ph"] == "f" for e in events) for events in (with_change_pte, without)]
    assert linked[0] < linked[1]


def test_no_flows_when_exits_are_not_traced(tmp_path: Path) -> None:
    events = trace(tmp_path, "--profile", "3.7", "--trace-events", "ksm_*")
    assert not any(e["ph"] in ("s", "f") for e in events)
