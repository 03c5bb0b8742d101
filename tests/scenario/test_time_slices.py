"""Scenario tests: nothing a guest does or is counted for depends on where a time slice ends (--quantum)."""

from pathlib import Path
from typing import Any

import pytest

from hypervisor.guest.catalog import bundled_guests
from hypervisor.scheduler import HOST_TIMESLICE
from hypervisor.sim import DEFAULT_QUANTUM, GUEST_IMAGES, KsmConfig, RunResult

from .guests import flat_guest, image, run

QUANTA = (1, 2, 3, 7, 1000, DEFAULT_QUANTUM)

# Small parameters per bundled guest, so that quantum 1 (one emu_start per instruction) stays fast.
SMALL_CMDLINES = {
    "hello": "",
    "memtouch": "pages=2 passes=2",
    "samepage": "pages=2 passes=2 spin=10",
    "cowstorm": "pages=2 passes=3 spin=10 write_at=2",
    "kernels": "kernel=2 private=1 passes=2 spin=10",
    "bootstorm": "image=2 diverge=1 passes=2 spin=10",
    "forkserver": "pages=2 children=2 write_pct=50",
    "kvstore": "keys=16 ops=40 value_size=8",
    "samepage_c": "pages=2 passes=2 spin=10",
    "procs": "procs=2 shared=2 aliases=2 private=1 rounds=2 spin=10",
    "ptwrite": "pages=4 rounds=2",
    "smpcount": "count=30",
    "samepage_smp": "pages=3 passes=2 spin=10",
    "kernels_smp": "kernel=3 private=2 passes=2 spin=10",
}
TWO_VMS = ("samepage", "kernels", "bootstorm", "samepage_c", "kernels_smp")


def outcome(result: RunResult) -> list[tuple[Any, ...]]:
    """What must not depend on the quantum: per VM, console, ending, instructions and every exit count."""
    return [(v.console, v.state, v.exit_status, v.error, v.insns, v.exits, v.stats["pf_fixed"],
             v.stats["pf_retry"]) for v in result.vms]


def same_at_every_quantum(img: str, quanta: tuple[int, ...] = QUANTA, **kwargs: Any) -> list[tuple[Any, ...]]:
    outcomes = {q: outcome(run(img, quantum=q, **kwargs)) for q in quanta}
    reference = outcomes[quanta[-1]]
    for q, got in outcomes.items():
        assert got == reference, f"quantum {q} differs from quantum {quanta[-1]}"
    return reference


def test_every_bundled_guest_has_small_parameters_for_the_quantum_property() -> None:
    assert {g.name for g in bundled_guests(GUEST_IMAGES)} == set(SMALL_CMDLINES)


@pytest.mark.parametrize("vcpus", [1, 2])
@pytest.mark.parametrize("guest", sorted(SMALL_CMDLINES))
def test_bundled_guest_gives_the_same_console_status_and_counts_at_every_quantum(guest: str, vcpus: int) -> None:
    # With two vCPUs per VM each vCPU runs the guest over the VM's one memory (the SMP guests
    # split the work; the others each do all of it), in turns on the shared host CPU.
    img = next(str(g.image) for g in bundled_guests(GUEST_IMAGES) if g.name == guest)
    ref = same_at_every_quantum(img, cmdline=SMALL_CMDLINES[guest], vms=2 if guest in TWO_VMS else 1, vcpus=vcpus)
    assert all(state in ("halted", "exited") for _, state, *_ in ref)


@pytest.mark.parametrize("guest", ["procs", "ptwrite", "forkserver", "cowstorm"])
def test_shadow_paging_gives_the_same_console_status_and_counts_at_every_quantum(guest: str) -> None:
    # The emulated page-table store ends its slice early (cpu/shadow_fill.py): nothing may show it.
    img = next(str(g.image) for g in bundled_guests(GUEST_IMAGES) if g.name == guest)
    same_at_every_quantum(img, cmdline=SMALL_CMDLINES[guest], vms=2 if guest in TWO_VMS else 1, mmu="shadow")


def test_elf_guest_gives_the_same_counts_at_every_quantum() -> None:
    same_at_every_quantum(image("hello.elf"))


@pytest.mark.parametrize("profile", ["2.6.32", "3.7"])
def test_ksm_merging_under_two_vms_gives_the_same_counts_at_every_quantum(profile: str) -> None:
    # ksmd wakes every simulated ms (1,000 instructions here): slices end where it is due,
    # so it sees the guests at the same points whatever the quantum.
    ksm = KsmConfig(enabled=True, sleep_millisecs=1, pages_to_scan=50)
    kwargs: dict[str, Any] = {"vms": 2, "cmdline": "pages=4 passes=3 spin=1500", "ksm": ksm,
                              "insns_per_ms": 1000, "profile": profile}
    ref = same_at_every_quantum(image("samepage.bin"), quanta=(1, 3, 1000, DEFAULT_QUANTUM), **kwargs)
    merged = run(image("samepage.bin"), **kwargs)
    assert merged.ksm is not None and merged.ksm["pages_sharing"] > 0
    if profile == "2.6.32":
        assert all(v.stats["spte_changed"] > 0 for v in merged.vms)  # change_pte rewrote sptes in place
    assert all(state == "exited" for _, state, *_ in ref)


def test_hlt_that_ends_a_time_slice_halts_the_guest(tmp_path: Path) -> None:
    # Issue #9 item 1: 1 + 2*4999 + 1 = 10,000 instructions, so the HLT is the last
    # instruction of the first default slice; the code after it must never run.
    code = bytes.fromhex("b987130000" "ffc9" "75fc" "f4" "b809000000" "e6f4" "f4")
    vm = run(flat_guest(tmp_path, "hlt_at_slice_end", code)).vms[0]
    assert (vm.state, vm.exit_status, vm.insns) == ("halted", 0, DEFAULT_QUANTUM)
    assert vm.exits.get("IO_INSTRUCTION", 0) == 0 and vm.exits["HLT"] == 1


@pytest.mark.parametrize("quantum", [1, 2, 5])
def test_hello_halts_after_160_instructions_at_small_quanta(quantum: int) -> None:
    vm = run(image("hello.bin"), quantum=quantum).vms[0]
    assert (vm.state, vm.insns, vm.exits["HLT"]) == ("halted", 160, 1)


# One guest per exit kind, each exit placed so that some quantum in 1..12 ends a slice
# right before it, right at it and right after it.
EXIT_GUESTS = {
    # mov al,'A'; mov dx,0x3f8; out dx,al; nop; mov al,7; out 0xf4,al; hlt
    "out_then_exit_port": "b041" "66baf803" "ee" "90" "b007" "e6f4" "f4",
    # mov dx,0x3fd; in al,dx; in al,dx; mov al,3; out 0xf4,al
    "in": "66bafd03" "ec" "ec" "b003" "e6f4",
    # cpuid twice (leaf 0, then the KVM signature leaf), then hlt
    "cpuid": "31c0" "0fa2" "b800000040" "0fa2" "f4",
    # vmcall twice, then hlt
    "vmcall": "0f01c1" "90" "0f01c1" "f4",
    # nop; nop; ud2: a fatal #UD
    "ud2": "90" "90" "0f0b",
    # xor ecx,ecx; div ecx: a fatal #DE
    "divide_error": "31c9" "f7f1",
    # write 3 fresh heap pages (EPT violations mid-slice and at slice ends), then hlt
    "ept_violations": "48c7c000002000" "c60001" "480500100000" "c60001" "480500100000" "c60001" "f4",
    # read a gpa beyond the memslots (128 MiB): MMIO the VMM does not emulate
    "mmio": "90" "48a10000000800000000" "f4",
    # jmp to a non-canonical address: a fatal fault in the page walk
    "noncanonical": "90" "48b80000000000800000" "ffe0",
}


@pytest.mark.parametrize("kind", sorted(EXIT_GUESTS))
def test_each_exit_kind_gives_the_same_result_wherever_a_slice_ends(kind: str, tmp_path: Path) -> None:
    img = flat_guest(tmp_path, kind, bytes.fromhex(EXIT_GUESTS[kind]))
    ref = same_at_every_quantum(img, quanta=(*range(1, 13), DEFAULT_QUANTUM))
    assert ref[0][1] in ("halted", "exited", "shutdown", "failed")


@pytest.mark.parametrize(("profile", "change_pte"), [("2.6.32", True), ("2.6.32", False), ("3.7", True)])
def test_one_vm_with_ksm_gives_the_same_ksm_counters_at_every_quantum(profile: str, change_pte: bool) -> None:
    # With one vCPU, simulated time is its own: ksmd wake-ups and the `run` write at 9 ms
    # (unmerge everything) land on the same instruction whatever the quantum.
    ksm = KsmConfig(enabled=True, sleep_millisecs=1, pages_to_scan=50, run_at=((9, 2),))
    results = [run(image("samepage.bin"), quantum=q, cmdline="pages=4 passes=4 spin=1500", ksm=ksm,
                   insns_per_ms=1000, profile=profile, change_pte=change_pte) for q in (1, 3, 1000, DEFAULT_QUANTUM)]
    assert all((r.ksm, r.vmstat, outcome(r)) == (results[0].ksm, results[0].vmstat, outcome(results[0]))
               for r in results)
    assert results[0].ksm is not None and results[0].ksm["pages_scanned"] > 0


def whole_report(result: RunResult) -> dict[str, Any]:
    """The run's JSON report without the quantum it was run at."""
    report = result.as_dict()
    report["config"].pop("quantum")
    return report


@pytest.mark.parametrize(("profile", "change_pte", "sleep_ms", "guest", "cmdline"), [
    ("2.6.32", False, 0, "samepage.bin", "pages=8 passes=6 spin=5000"),
    ("2.6.32", False, 1, "samepage.bin", "pages=8 passes=6 spin=5000"),
    ("3.7", True, 0, "cowstorm.bin", "pages=8 passes=6 spin=5000 write_at=3"),
])
def test_several_vms_with_ksm_give_the_same_whole_report_at_every_quantum(
        profile: str, change_pte: bool, sleep_ms: int, guest: str, cmdline: str) -> None:
    # Three VMs share the host CPU in turns of HOST_TIMESLICE simulated instructions, and ksmd
    # preempts a turn where it is due (or runs after each turn with sleep_millisecs=0): all
    # points of simulated time.  So the VMs interleave, and ksmd finds them, the same way at
    # every quantum, down to the COW breaks and re-merges of 2.6.32 without change_pte.
    ksm = KsmConfig(enabled=True, sleep_millisecs=sleep_ms, pages_to_scan=50)
    reports = [whole_report(run(image(guest), quantum=q, vms=3, cmdline=cmdline, ksm=ksm, insns_per_ms=10_000,
                                profile=profile, change_pte=change_pte)) for q in (7, 997, DEFAULT_QUANTUM)]
    assert reports[0] == reports[1] == reports[2]
    assert reports[0]["ksm"]["full_scans"] > 1


def test_a_slice_ends_at_the_first_block_boundary_at_or_after_its_limit() -> None:
    from hypervisor.cpu.blocks import MAX_BLOCK_INSNS
    from hypervisor.sim import SimConfig, Simulation

    cfg = SimConfig(image=image("samepage.bin"), memory=4 << 20, cmdline="pages=2 passes=2 spin=1000")
    with Simulation(cfg) as sim:
        backend = sim.backends[0]
        for limit in (1, 7, 50):
            retired = backend.run(limit)
            assert limit <= retired < limit + MAX_BLOCK_INSNS
            assert backend.clock.stopped  # stopped by the block hook, before a block


def test_the_trace_and_the_plot_series_do_not_depend_on_the_quantum(tmp_path: Path) -> None:
    # Counter samples (--trace JSON, --plot, progress) are taken where a vCPU's turn on the host
    # CPU ends, a point of simulated time; they used to be taken after every --quantum chunk.
    from click.testing import CliRunner

    from hypervisor.cli import main

    outputs = []
    for q in (7, 1000, DEFAULT_QUANTUM):
        trace = tmp_path / f"trace{q}.json"
        result = CliRunner().invoke(main, ["run", "samepage", "--vms", "2", "--ksm", "--ksm-sleep-ms", "1",
                                           "--cmdline", "pages=4 passes=6 spin=200", "--quantum", str(q),
                                           "--trace", str(trace), "--plot", str(tmp_path / f"p{q}.png"), "--quiet"])
        assert result.exit_code == 0, result.output
        outputs.append(trace.read_bytes() + (tmp_path / f"p{q}.png").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    assert b'"ph": "C"' in outputs[0] or b'"ph":"C"' in outputs[0]


def _report(img: str, turn_by_turn: bool, **kwargs: Any) -> tuple[dict[str, Any], int]:
    """(whole report, emu_start runs): plain, or with a per-turn hook, which makes every host turn a run
    of its own (the scheduler's lone-vCPU fast path stays off while anything happens where a turn ends)."""
    from hypervisor.sim import SimConfig, Simulation

    ksm = kwargs.pop("ksm", KsmConfig())
    sim = Simulation(SimConfig(image=img, ksm=ksm, **kwargs))
    runs = 0

    def counted(_sim: Simulation) -> None:
        nonlocal runs
        runs += 1

    # One display hook call after every slice, that is every backend.run (a display hook leaves the
    # lone-vCPU fast path on; the compiled build's UnicornVcpu.run cannot be replaced).
    sim.on_display.append(counted)
    if turn_by_turn:
        sim.on_slice.append(lambda _sim: None)
    return whole_report(sim.run()), runs


# Parameters per single-vCPU bundled guest for 100,000 to 300,000 instructions: several host turns.
TURNS_CMDLINES = {
    "hello": "", "memtouch": "pages=64 passes=4", "samepage": "pages=8 passes=4 spin=20000",
    "cowstorm": "pages=8 passes=4 spin=20000 write_at=2", "kernels": "kernel=16 private=4 passes=4 spin=20000",
    "bootstorm": "image=8 diverge=2 passes=4 spin=20000", "forkserver": "pages=16 children=4 write_pct=50",
    "kvstore": "keys=256 ops=2000 value_size=8", "samepage_c": "pages=8 passes=4 spin=20000",
    "procs": "procs=4 shared=4 aliases=2 private=2 rounds=2 spin=2000", "ptwrite": "pages=16 rounds=8",
}


def test_every_single_vcpu_bundled_guest_has_parameters_for_the_lone_vcpu_property() -> None:
    assert set(TURNS_CMDLINES) == set(SMALL_CMDLINES) - {"smpcount", "samepage_smp", "kernels_smp"}


@pytest.mark.parametrize("mmu", ["tdp", "shadow"])
@pytest.mark.parametrize("guest", sorted(TURNS_CMDLINES))
def test_a_lone_vcpu_runs_its_turns_in_one_run_with_the_same_report_as_turn_by_turn(guest: str, mmu: str) -> None:
    # One runnable vCPU and nothing to do where its turn ends: _icount.c starts its next turn at the
    # block boundary where the scheduler would have, inside the same emu_start; ksmd (every 5 turns
    # here) still preempts where it is due.
    img = next(str(g.image) for g in bundled_guests(GUEST_IMAGES) if g.name == guest)
    kwargs: dict[str, Any] = {"cmdline": TURNS_CMDLINES[guest], "insns_per_ms": 10_000, "mmu": mmu,
                              "ksm": KsmConfig(enabled=True, sleep_millisecs=5, pages_to_scan=50)}
    fast, fast_runs = _report(img, False, **kwargs)
    slow, slow_runs = _report(img, True, **kwargs)
    assert fast == slow
    assert fast_runs <= slow_runs


@pytest.mark.parametrize(("profile", "sleep_ms"), [("2.6.32", 1), ("3.7", 3)])
def test_a_lone_vcpu_with_ksmd_and_run_writes_gives_the_same_report_in_far_fewer_runs(profile: str,
                                                                                      sleep_ms: int) -> None:
    # ksmd's wake-ups and the `run` writes are host events: the runs end where they are due.
    ksm = KsmConfig(enabled=True, sleep_millisecs=sleep_ms, pages_to_scan=50, run_at=((9, 2), (30, 1)))
    kwargs: dict[str, Any] = {"cmdline": "pages=8 passes=6 spin=400000", "ksm": ksm, "insns_per_ms": 50_000,
                              "profile": profile}
    fast, fast_runs = _report(image("samepage.bin"), False, **kwargs)
    slow, slow_runs = _report(image("samepage.bin"), True, **kwargs)
    assert fast == slow
    assert fast["ksm"]["full_scans"] > 1
    turns = fast["sim_time"]["insns"] // HOST_TIMESLICE
    assert slow_runs >= turns > 4 * fast_runs
