"""The suite's driver: sizes, the order of benchmarks, the table, the JSON."""

import argparse
import datetime
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypervisor.sim import DEFAULT_QUANTUM

from . import check_cost, fault_storm, growth, guest_speed, hotpaths, ksm_scan, modelling, scale, smp
from .baselines import BenchmarkError
from .common import (
    REPO_ROOT,
    Budget,
    Figure,
    Series,
    build_info,
    machine_info,
    render_markdown,
    render_series,
    render_table,
    warm_host_memory,
    write_json,
)

BENCHMARKS = ("guest_speed", "fault_storm", "ksm_scan", "scale", "modelling", "growth", "check_cost", "smp")
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results.json"  # .gitignore'd (benchmarks/results*.json)


@dataclass(frozen=True)
class Sizes:
    storm_pages: int
    refill_pages: int
    refill_passes: int
    ksm_pages: int
    scale_vms: int
    scale_mib: int
    scale_pages_to_scan: int
    scale_sleep_ms: int
    scale_spin: int
    growth_mib: tuple[int, ...]
    modelling_vms: int
    modelling_mib: int
    profile_storm_pages: int
    profile_refill_pages: int
    profile_ksm_pages: int
    check_vms: int = 3
    check_mib: int = 64
    check_cmdline: str = check_cost.CMDLINE


FULL = Sizes(storm_pages=65_536, refill_pages=65_536,
             refill_passes=2, ksm_pages=65_536, scale_vms=16, scale_mib=64, scale_pages_to_scan=16_384,
             scale_sleep_ms=20, scale_spin=2_000_000, growth_mib=(16, 64, 256, 1024), modelling_vms=16,
             modelling_mib=64,
             profile_storm_pages=65_536, profile_refill_pages=16_384, profile_ksm_pages=16_384)
QUICK = Sizes(storm_pages=4_096, refill_pages=4_096,
              refill_passes=1, ksm_pages=2_048, scale_vms=2, scale_mib=4, scale_pages_to_scan=512,
              scale_sleep_ms=20, scale_spin=20_000, growth_mib=(4, 8, 16), modelling_vms=2, modelling_mib=8,
              profile_storm_pages=2_048, profile_refill_pages=2_048, profile_ksm_pages=1_024,
              check_vms=2, check_mib=8, check_cmdline=check_cost.QUICK_CMDLINE)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="hvsim's benchmark suite (issue #6): every figure beside a baseline measured in the same run; "
                    "prints the table and writes the JSON. See benchmarks/README.md.")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds (what the smoke test runs)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                   help="where to write the results (default: benchmarks/results.json)")
    p.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                   help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    p.add_argument("--reps", type=int, default=None,
                   help="repetitions of each hvsim/baseline pair, median kept (default 3; 1 with --quick)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds allowed to each benchmark (twice that to growth, which runs two series); "
                        "sizes that would overrun it are skipped, the scale run is interrupted "
                        "(default 90; 30 with --quick)")
    p.add_argument("--quantum", type=int, default=DEFAULT_QUANTUM, help="instructions per time slice")
    p.add_argument("--profile", action="store_true", help="also cProfile the hot paths and print their top entries")
    p.add_argument("--top", type=int, default=12, help="entries per profile (default 12)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be at least 1")
    return args


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    reps: int = args.reps or (1 if args.quick else 3)
    budget_s: float = args.budget or (30.0 if args.quick else 90.0)
    selected = [b for b in BENCHMARKS if not args.only or b in args.only]
    quantum: int = args.quantum
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    machine = machine_info()
    build = build_info()
    figures: list[Figure] = []
    series: list[Series] = []
    raw: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    errors: list[str] = []
    profiles: dict[str, Any] = {}
    warm_bytes = (max(sizes.growth_mib) << 20) + 2 * sizes.storm_pages * 4096
    warm_s = warm_host_memory(warm_bytes)
    _log(f"[benchmarks] warmed {warm_bytes >> 20} MiB of host memory in {warm_s:.1f} s")
    with tempfile.TemporaryDirectory(prefix="hvsim-bench-") as tmp:
        workdir = Path(tmp)
        for name in selected:
            _log(f"[benchmarks] {name} ...")
            t0 = time.perf_counter()
            budget = Budget(2 * budget_s if name == "growth" else budget_s)
            try:
                if name == "guest_speed":
                    figures.extend(guest_speed.run(quick=args.quick, quantum=quantum, reps=reps, budget=budget))
                elif name == "fault_storm":
                    figures.extend(fault_storm.run(workdir, n_pages=sizes.storm_pages, refill_pages=sizes.refill_pages,
                                                   refill_passes=sizes.refill_passes, quantum=quantum, reps=reps,
                                                   budget=budget, compiled=build["compiled"]))
                elif name == "ksm_scan":
                    figures.extend(ksm_scan.run(n_pages=sizes.ksm_pages, reps=reps, budget=budget))
                elif name == "scale":
                    params = {"vms": sizes.scale_vms, "memory_mib": sizes.scale_mib,
                              "pages_to_scan": sizes.scale_pages_to_scan, "sleep_millisecs": sizes.scale_sleep_ms,
                              "spin": sizes.scale_spin, "wall_budget": budget_s}
                    result = scale.run_child(params, timeout=3 * budget_s + 120)
                    raw["scale"] = result
                    figures.extend(scale.figures(result))
                elif name == "modelling":
                    figures.append(modelling.run(vms=sizes.modelling_vms, memory_mib=sizes.modelling_mib, reps=reps,
                                                 budget=budget))
                elif name == "check_cost":
                    figures.append(check_cost.run(vms=sizes.check_vms, memory_mib=sizes.check_mib,
                                                  cmdline=sizes.check_cmdline, reps=reps, budget=budget))
                elif name == "smp":
                    figures.extend(smp.run(quick=args.quick, reps=reps, budget=budget))
                elif name == "growth":
                    figs, ser, graw = growth.run(workdir, sizes_mib=list(sizes.growth_mib), quantum=quantum,
                                                 budget=budget, reps=reps)
                    figures.extend(figs)
                    series.extend(ser)
                    raw["growth"] = graw
            except BenchmarkError as err:
                errors.append(f"{name}: {err}")
                _log(f"[benchmarks] {name} FAILED: {err}")
            seconds[name] = time.perf_counter() - t0
            _log(f"[benchmarks] {name} done in {seconds[name]:.1f} s")
        if args.profile:
            _log("[benchmarks] profiling the hot paths ...")
            profiles = hotpaths.profile_all(workdir, storm_pages=sizes.profile_storm_pages,
                                            refill_pages=sizes.profile_refill_pages,
                                            ksm_pages=sizes.profile_ksm_pages, quantum=quantum, top=args.top)

    mode = "quick" if args.quick else "full"
    print(f"hvsim benchmarks ({mode}), {started}, commit {machine.get('git_commit')}")
    print(f"machine: {machine['cpu_model']}, {machine['cpus']} CPUs, {machine['memory_mib']} MiB, "
          f"{machine['platform']}, Python {machine['python']}, numpy {machine.get('numpy')}, "
          f"unicorn {machine.get('unicorn')}")
    compiled_note = f", {len(build['compiled_modules'])} modules compiled by mypyc" if build["compiled"] else ""
    print(f"build: {build['name']}{compiled_note}")
    print(f"every baseline measured in this run; median of {reps} interleaved repetitions; quantum {quantum}; "
          f"load average at start {machine.get('loadavg_at_start')}\n")
    print(render_table(figures))
    if series:
        print()
        print(render_series(series))
    met = [f.number for f in figures if f.met is True]
    unmet = [f.number for f in figures if f.met is False]
    print(f"\ntargets met: {', '.join(met) or 'none'}; not met: {', '.join(unmet) or 'none'}")
    if errors:
        print("errors:\n  " + "\n  ".join(errors))
    if args.markdown:
        print()
        print(render_markdown(figures))
    if profiles:
        print()
        print(hotpaths.render(profiles))
    data = {
        "suite": "hvsim-benchmarks", "format": 1, "mode": mode, "started": started, "machine": machine, "build": build,
        "quantum": quantum, "reps": reps, "budget_s": budget_s,
        "host_memory_warmup_s": warm_s, "benchmarks": selected, "seconds": seconds,
        "figures": figures, "series": series, "raw": raw, "profiles": profiles, "errors": errors,
        "targets_met": met, "targets_not_met": unmet,
    }
    write_json(args.json, data)
    print(f"\nJSON written to {args.json}")
    return 1 if errors else 0
