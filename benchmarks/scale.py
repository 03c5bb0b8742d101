"""Target 4: many VMs of the identical-kernels guest, run until KSM has converged.

Runs in a child process of its own (`python -m benchmarks.scale PARAMS_JSON`) so
that its peak RSS (VmHWM) is this experiment's alone.  The guest is the bundled
`kernels` image with the kernel filling all of guest memory but its private and
untouched pages, and a long spin between its read passes (an idle guest).  ksmd
is switched on (run=1) once every guest has loaded its kernel, as an
administrator would after booting the VMs; the run is interrupted at
convergence: the end of a full scan that left pages_shared and pages_sharing as
the previous full scan left them, with every kernel page merged
(pages_sharing >= kernel pages x (VMs - 1)).

Reported: wall time (setup, run, and the part of the run spent in ksmd), peak
RSS against the guest memory actually touched, and the simulator's metadata per
guest page counted on the live objects (benchmarks/memory.py) after the run (4c)
and at its peak (4c-peak): the same walk after every ksmd wake-up, the largest
count kept.  ksmd's structures only grow inside a wake-up, so the largest of
these is their peak; mid-pass it is the unstable tree's, which holds a page of
every content the pass has seen once and is emptied at the next pass.  The
walks' time is left out of every wall time reported.
"""

import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from hypervisor.host.ksm import Ksm, VmaItems
from hypervisor.sim import GUEST_IMAGES, KsmConfig, SimConfig, Simulation
from hypervisor.types import PAGE_SIZE
from hypervisor.vmm.layout import HEAP_START_GPA

from .baselines import BenchmarkError
from .common import REPO_ROOT, Figure, Target, at_most, ratio
from .memory import count_metadata

PRIVATE_PAGES = 16
UNTOUCHED_PAGES = 8  # the kernels guest leaves these at the end of its heap


def _status_bytes(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmHWM: this process's peak RSS; VmRSS: its RSS now)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss_bytes() -> int:
    # VmHWM belongs to this process's own address space; getrusage's ru_maxrss would also
    # count the parent's RSS at fork time (Linux keeps the high-water mark across exec).
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_here(vms: int, memory_mib: int, pages_to_scan: int, sleep_millisecs: int, spin: int,
             wall_budget: float, peak_walk: bool = True) -> dict[str, Any]:
    """The experiment itself (in this process)."""
    rss_start = _status_bytes("VmRSS") or 0
    memory = memory_mib << 20
    guest_pages = memory // PAGE_SIZE
    kernel = guest_pages - HEAP_START_GPA // PAGE_SIZE - PRIVATE_PAGES - UNTOUCHED_PAGES
    cfg = SimConfig(
        image=str(GUEST_IMAGES / "kernels.bin"), memory=memory, vms=vms,
        cmdline=f"kernel={kernel} private={PRIVATE_PAGES} passes=1000000000 spin={spin}",
        max_insns=1 << 62,
        ksm=KsmConfig(enabled=True, run=0, pages_to_scan=pages_to_scan, sleep_millisecs=sleep_millisecs),
    )
    t0 = time.perf_counter()
    sim = Simulation(cfg)
    t_setup = time.perf_counter() - t0
    ksm = sim.ksm
    assert ksm is not None
    expected_sharing = kernel * (vms - 1)
    state: dict[str, Any] = {"ksmd_seconds": 0.0, "wakeups": 0, "max_allocated": 0, "last": None,
                             "converged": False, "scans_seen": ksm.seqnr, "ksm_started_ms": None,
                             "walk_seconds": 0.0, "walks": 0, "peak": None}
    class WakeupTimer:  # a KsmObserver: time what ksmd does at each wake-up
        def __init__(self, ksm: Ksm) -> None:
            self.ksm = ksm
            self.w0 = 0.0

        def wakeup_start(self) -> None:
            self.w0 = time.perf_counter()

        def wakeup_end(self) -> None:
            w1 = time.perf_counter()
            state["ksmd_seconds"] += w1 - self.w0
            state["wakeups"] += 1
            if peak_walk and self.ksm.run == 1:
                walk_peak(w1)

        def scan_batch(self, items: VmaItems, idxs: npt.NDArray[np.intp], pfns: npt.NDArray[np.int64]) -> None:
            pass

    def walk_peak(w1: float) -> None:
        meta = count_metadata(sim, sim.frames.data)
        total = meta.array_bytes + meta.python_total
        if state["peak"] is None or total > state["peak"][0]:
            state["peak"] = (total, meta, ksm.seqnr, ksm.pages_scanned, len(ksm.unstable_tree))
        state["walks"] += 1
        state["walk_seconds"] += time.perf_counter() - w1

    ksm.observer = WakeupTimer(ksm)
    run_start = time.perf_counter()

    def on_slice(s: Simulation) -> None:
        state["max_allocated"] = max(state["max_allocated"], s.frames.allocated)
        if time.perf_counter() - run_start - state["walk_seconds"] > wall_budget:
            s.interrupted = True
        if state["ksm_started_ms"] is None:
            # echo 1 > /sys/kernel/mm/ksm/run once every guest has loaded its kernel
            if all(b"kernels: pass 1 " in d.console.head for d in s.devices):
                ksm.set_run(1)
                state["ksm_started_ms"] = s.now / s.config.insns_per_ms
                state["ksm_started_s"] = time.perf_counter() - run_start
            return
        if ksm.seqnr != state["scans_seen"]:
            state["scans_seen"] = ksm.seqnr
            c = ksm.counters()
            key = (c["pages_shared"], c["pages_sharing"])
            if key == state["last"] and c["pages_sharing"] >= expected_sharing:
                state["converged"] = True
                s.interrupted = True
            state["last"] = key

    sim.on_slice.append(on_slice)
    result = sim.run()
    t_run = time.perf_counter() - run_start - state["walk_seconds"]
    if result.errors:
        raise BenchmarkError(f"kernels guests failed: {result.errors}")
    rss_peak = _peak_rss_bytes()
    meta = count_metadata(sim, sim.frames.data).per_page(vms * guest_pages)
    peak: dict[str, Any] | None = None
    if state["peak"] is not None:
        _, peak_count, peak_scan, peak_scanned, peak_unstable = state["peak"]
        peak = peak_count.per_page(vms * guest_pages)
        peak.update({"full_scans": peak_scan, "pages_scanned": peak_scanned, "unstable_tree_entries": peak_unstable,
                     "walks": state["walks"], "walk_seconds": state["walk_seconds"]})
    counters = result.ksm or {}
    touched = state["max_allocated"] * PAGE_SIZE
    return {
        "vms": vms, "memory_mib": memory_mib, "guest_pages": vms * guest_pages, "kernel_pages_per_vm": kernel,
        "pages_to_scan": pages_to_scan, "sleep_millisecs": sleep_millisecs, "spin": spin,
        "converged": state["converged"], "wall_budget_s": wall_budget,
        "setup_s": t_setup, "run_s": t_run, "wall_s": t_setup + t_run, "ksmd_s": state["ksmd_seconds"],
        "ksmd_wakeups": state["wakeups"], "sim_insns": result.sim_insns,
        "sim_ms": result.sim_insns / cfg.insns_per_ms, "full_scans": counters.get("full_scans"),
        "ksm_started_sim_ms": state["ksm_started_ms"], "ksm_started_wall_s": state.get("ksm_started_s"),
        "expected_pages_sharing": expected_sharing, "ksm": counters,
        "rss_at_start_bytes": rss_start, "rss_peak_bytes": rss_peak, "rss_now_bytes": _status_bytes("VmRSS"),
        "frames_peak_allocated": state["max_allocated"], "guest_memory_touched_bytes": touched,
        "metadata": meta, "metadata_peak": peak,
    }


def run_child(params: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run the experiment in a fresh interpreter; its JSON result comes back on stdout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.scale", json.dumps(params)], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise BenchmarkError(f"scale child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def figures(d: dict[str, Any]) -> list[Figure]:
    vms, mib = d["vms"], d["memory_mib"]
    name = f"{vms} VMs x {mib} MiB kernels, to KSM convergence"
    conv = "converged" if d["converged"] else f"NOT converged within {d['wall_budget_s']:.0f} s"
    wall = Figure("scale_wall", "4a", f"scale: {name}: wall time", d["wall_s"], "s", None, "", None,
                  [Target("KSM converged", d["converged"])], {k: v for k, v in d.items() if k != "metadata"},
                  f"{conv}; setup {d['setup_s']:.1f} s, ksmd {d['ksmd_s']:.1f} s of the run, "
                  f"{d['full_scans']} full scans, {d['sim_ms']:.0f} simulated ms")
    peak_mib = d["rss_peak_bytes"] / 2**20
    touched_mib = d["guest_memory_touched_bytes"] / 2**20
    rss = Figure("scale_rss", "4b", "scale: peak RSS (baseline: guest memory touched)", peak_mib, "MiB",
                 touched_mib, "frames touched", ratio(peak_mib, touched_mib), [],
                 {"rss_at_start_mib": d["rss_at_start_bytes"] / 2**20}, "information")
    meta = d["metadata"]
    arrays = meta["arrays_bytes_per_page"]
    per_page = arrays + meta["python_bytes_per_page"]
    md = Figure("scale_metadata", "4c", "scale: metadata per guest page, all-in (arrays + Python objects)", per_page,
                "B/page", 64.0, "Linux rmap_item", ratio(per_page, 64.0), [at_most(per_page, 64, "<= 64 B/page")],
                meta, f"numpy arrays {arrays:.1f} B/page, Python objects {meta['python_bytes_per_page']:.1f} B/page",
                old_baseline=arrays, old_baseline_name="#6 counted arrays only", old_ratio=ratio(arrays, 64.0))
    out = [wall, rss, md]
    peak = d.get("metadata_peak")
    if peak is not None:
        p_arrays = peak["arrays_bytes_per_page"]
        p_total = p_arrays + peak["python_bytes_per_page"]
        out.append(Figure(
            "scale_metadata_peak", "4c-peak",
            "scale: metadata per guest page at its peak (after a ksmd wake-up), all-in",
            p_total, "B/page", 64.0, "Linux rmap_item", ratio(p_total, 64.0), [at_most(p_total, 64, "<= 64 B/page")],
            peak, f"numpy arrays {p_arrays:.1f} B/page, Python objects {peak['python_bytes_per_page']:.1f} B/page; "
            f"full scan {peak['full_scans']}, {peak['unstable_tree_entries']} unstable tree entries; "
            f"largest of {peak['walks']} walks",
            old_baseline=p_arrays, old_baseline_name="arrays only", old_ratio=ratio(p_arrays, 64.0)))
    return out


def main(argv: list[str]) -> int:
    params = json.loads(argv[0])
    print(json.dumps(run_here(**params)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
