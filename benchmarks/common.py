"""What every benchmark shares: figures with their same-run baselines, a time budget, machine facts, rendering.

Every figure is a pair measured in the same process, interleaved (baseline, hvsim,
baseline, hvsim, ...), the median of the repetitions (issue #13: median of 3).  Since
issue #13 the baseline is the honest ceiling (hook-free Unicorn, the raw-ctypes
bare hook, memory bandwidth, everything counted); the baseline issue #6 used stays
beside it as the "old baseline" columns, so that the change of yardstick is visible.  The ratio of the two is the number
to compare across machines and commits; the absolute rates are for this machine only.
"""

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    """One acceptance threshold of issue #6 and whether this run met it (None: not measured)."""

    text: str
    met: bool | None


@dataclass
class Figure:
    """One line of the table: hvsim's number, its baseline from the same run, their ratio."""

    key: str
    number: str
    title: str
    value: float | None
    unit: str
    baseline: float | None = None
    baseline_name: str = ""
    ratio: float | None = None
    targets: list[Target] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    old_baseline: float | None = None
    old_baseline_name: str = ""
    old_ratio: float | None = None

    @property
    def met(self) -> bool | None:
        if not self.targets or any(t.met is None for t in self.targets):
            return None
        return all(t.met for t in self.targets)


@dataclass
class Series:
    """Target 5: time per page against size, for one workload (hvsim and its baseline)."""

    key: str
    title: str
    pages: list[int]
    hvsim_us_per_page: list[float | None]
    baseline_us_per_page: list[float | None]
    baseline_name: str
    notes: list[str] = field(default_factory=list)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def at_least(value: float | None, threshold: float, text: str) -> Target:
    return Target(text, None if value is None else value >= threshold)


def at_most(value: float | None, threshold: float, text: str) -> Target:
    return Target(text, None if value is None else value <= threshold)


class Budget:
    """Wall-clock allowance of one benchmark: sizes that would overrun it are skipped, and said so."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate: float) -> bool:
        return estimate <= self.remaining()


def collect() -> None:
    """Free the previous repetition's frames (Unicorn instances and their hooks form cycles)."""
    gc.collect()


def interleaved(pairs: int, baseline: Callable[[], float], hvsim: Callable[[], float],
                budget: Budget | None = None) -> tuple[list[float], list[float]]:
    """Run baseline and hvsim alternately `pairs` times (at least once each); return both lists of rates.

    Stops repeating early when the budget would not cover another pair.
    """
    base: list[float] = []
    mine: list[float] = []
    for i in range(max(1, pairs)):
        t0 = time.perf_counter()
        collect()
        base.append(baseline())
        collect()
        mine.append(hvsim())
        spent = time.perf_counter() - t0
        if budget is not None and i + 1 < pairs and not budget.allows(spent):
            break
    collect()
    return base, mine


def warm_host_memory(nbytes: int) -> float:
    """Touch and free nbytes once; return the seconds it took.

    The first touch of memory that the machine has never used costs several times
    more than later ones (measured up to 10 us per 4 KiB page on the VM this suite
    was written on, against about 1 us), whoever touches it: without this, whichever
    of hvsim or its baseline runs first pays for it and the first ratio is noise.
    """
    import numpy as np

    t0 = time.perf_counter()
    buf = np.empty(nbytes // 8, dtype=np.uint64)
    buf[:: 4096 // 8] = 1
    del buf
    return time.perf_counter() - t0


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mib": _mem_total_mib(),
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import numpy
        import unicorn

        import hypervisor

        info["numpy"] = numpy.__version__
        info["unicorn"] = unicorn.__version__
        info["hvsim"] = hypervisor.__version__
    except (ImportError, AttributeError):  # pragma: no cover - a broken install shows in the run itself
        pass
    info["git_commit"] = _git_commit()
    return info


def build_info() -> dict[str, Any]:
    """Which build of hvsim this process runs (README "The compiled build"): the name, whether HVSIM_PURE=1
    was set, and the compiled modules imported.  Call it once hvsim's model is imported."""
    from hypervisor._pure import build_name, compiled_modules

    modules = compiled_modules()
    return {"name": build_name(), "compiled": bool(modules), "hvsim_pure": os.environ.get("HVSIM_PURE") == "1",
            "compiled_modules": modules}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mib() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=False, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=False, timeout=5)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# --- rendering ------------------------------------------------------------------------


def fmt_num(x: float | None, unit: str = "") -> str:
    """3 significant digits; rates (units ending in /s) with k/M/G prefixes."""
    if x is None:
        return "-"
    if unit.endswith("/s"):
        for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(x) >= scale:
                return f"{x / scale:.3g} {prefix}{unit}"
        return f"{x:.3g} {unit}"
    text = f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{text} {unit}".rstrip()


def _met(m: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[m]


def _cells(f: Figure) -> tuple[str, ...]:
    base = f"{f.baseline_name}: {fmt_num(f.baseline, f.unit)}" if f.baseline_name else "-"
    old = f"{f.old_baseline_name}: {fmt_num(f.old_baseline, f.unit)}" if f.old_baseline_name else "-"
    target = "; ".join(t.text for t in f.targets) or "(information)"
    met = " ".join(_met(t.met) for t in f.targets) or "-"
    return (f.number, f.title, fmt_num(f.value, f.unit), base, fmt_num(f.ratio), target, met, old,
            fmt_num(f.old_ratio))


_HEADER = ("#", "figure", "hvsim", "baseline (same run)", "ratio", "target (#13)", "met", "old baseline (#6)",
           "old ratio")


def render_table(figures: Sequence[Figure]) -> str:
    return _grid([_HEADER, *(_cells(f) for f in figures)])


def render_series(series: Sequence[Series]) -> str:
    out = []
    for s in series:
        rows = [("pages", "hvsim us/page", f"{s.baseline_name} us/page", "hvsim / baseline")]
        for n, h, b in zip(s.pages, s.hvsim_us_per_page, s.baseline_us_per_page, strict=True):
            rows.append((f"{n:,}", fmt_num(h), fmt_num(b), fmt_num(ratio(h, b))))
        out.append(f"{s.title}\n{_grid(rows)}")
        out.extend(f"  note: {n}" for n in s.notes)
    return "\n".join(out)


def _grid(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(figures: Sequence[Figure]) -> str:
    lines = ["| " + " | ".join(_HEADER) + " |", "|---" * len(_HEADER) + "|"]
    lines.extend("| " + " | ".join(_cells(f)) + " |" for f in figures)
    return "\n".join(lines)


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, Figure | Series | Target):
        return asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    return str(obj)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
