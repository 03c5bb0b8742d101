"""`hvsim history`: one workload across every kernel release where a modelled behaviour changes, and its figure.

Runs KSM off (the baseline), then each release of `history_kernels()` (2.6.32, every
version with a row in hypervisor/kernels.py, 6.12) with KVM's change_pte and, where
the kernel has it, without.  The table gives EPT_VIOLATION exits and cow_ksm per
release; the figure (`--plot`, matplotlib) draws both across releases with every
release's rows annotated by commit, which is the picture of change_pte's history:
useful until 2.6.38 mostly by hiding 2.6.32's write pins, dead from 3.7, deleted in 6.10.
"""

from typing import Any

from .compare import CompareResult, CompareRow, CompareRun, fault_exit
from .kernels import CHANGES, NEWEST, OLDEST, version_key
from .plot import pyplot, save_figure
from .profiles import get_profile
from .sim import image_label


def history_kernels() -> list[str]:
    """2.6.32, each release in which a modelled behaviour changes, and 6.12, oldest first."""
    return sorted({OLDEST, NEWEST, *(c.version for c in CHANGES)}, key=version_key)


def history_runs(kernels: list[str]) -> tuple[CompareRun, ...]:
    runs = [CompareRun("ksm off", kernels[0], True, False)]
    for v in kernels:
        runs.append(CompareRun(v, v, True, True))
        if get_profile(v).uses_change_pte:
            runs.append(CompareRun(f"{v} no change_pte", v, False, True))
    return tuple(runs)


def _by_kernel(result: CompareResult) -> list[tuple[str, CompareRow, CompareRow | None]]:
    out = []
    for row in result.rows:
        if row.run.ksm and row.run.change_pte:
            out.append((row.run.profile, row, result.row(f"{row.run.profile} no change_pte")))
    return out


def render_history(result: CompareResult) -> str:
    cfg = result.base
    base = result.rows[0].ept_violations if result.rows else 0
    exit_name = fault_exit(cfg.mmu)
    cols = ("kernel", exit_name, "no change_pte", "cow_ksm", "no change_pte", "pages_sharing", "changes here")
    rows = []
    for v, row, bare in _by_kernel(result):
        here = ", ".join(f"{c.field}={c.value} ({c.commit})" for c in CHANGES if c.version == v) or "-"
        rows.append((v, str(row.ept_violations), "-" if bare is None else str(bare.ept_violations),
                     str(row.cow_ksm), "-" if bare is None else str(bare.cow_ksm),
                     str(row.summary()["pages_sharing"]), here))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols[:-1])]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths)) + "  {}"
    lines = [
        f"hvsim history: {image_label(cfg.image)}, {cfg.vms} VM(s)"
        f"{f' x {cfg.vcpus} vCPUs' if cfg.vcpus > 1 else ''} x {cfg.memory >> 20} MiB, cmdline {cfg.cmdline!r}, "
        f"ksm pages_to_scan {cfg.ksm.pages_to_scan} sleep_millisecs {cfg.ksm.sleep_millisecs}; "
        f"KSM off: {base} {exit_name}",
        fmt.format(*cols),
        fmt.format(*("-" * w for w in widths), "-" * len(cols[-1])),
        *(fmt.format(*r) for r in rows),
    ]
    return "\n".join(lines) + "\n"


def _draw_exits(top: Any, result: CompareResult, points: list[tuple[str, CompareRow, CompareRow | None]]) -> None:
    """EPT_VIOLATION per release, with and without change_pte; a red mark where a curve moves."""
    xs = list(range(len(points)))
    labels = [v for v, _, _ in points]
    top.axhline(result.rows[0].ept_violations, color="grey", linewidth=1, linestyle=":", label="KSM off")
    top.plot(xs, [r.ept_violations for _, r, _ in points], marker="o", linewidth=2, label="with change_pte")
    bare = [(x, b.ept_violations) for x, (_, _, b) in zip(xs, points, strict=True) if b is not None]
    top.plot([x for x, _ in bare], [y for _, y in bare], marker="s", linestyle="--", linewidth=2,
             label="KVM without change_pte")
    # Where a curve moves, mark the release with the commits it brought.
    top_y = max([r.ept_violations for _, r, _ in points] + [y for _, y in bare])
    marks = 0
    for x in xs[1:]:
        (_, row, b), (_, prev, pb) = points[x], points[x - 1]
        moved = row.ept_violations != prev.ept_violations or (b is None) != (pb is None) or (
            b is not None and pb is not None and b.ept_violations != pb.ept_violations)
        if moved:
            commits = sorted({c.commit for c in CHANGES if c.version == labels[x] and c.commit != "-"})
            top.axvline(x - 0.5, color="red", alpha=0.4, linewidth=1)
            top.annotate(f"{labels[x]}: " + ", ".join(commits), xy=(x - 0.45, top_y * (0.97 - 0.1 * (marks % 3))),
                         fontsize=7, color="red", va="top")
            marks += 1
    top.set_ylabel(f"{fault_exit(result.base.mmu)} exits")
    top.set_title(f"{result.base.image.rsplit('/', 1)[-1]} ({result.base.vms} VMs, {result.base.cmdline}): "
                  "exits and KSM COW breaks per kernel release")
    top.legend(fontsize=8, loc="upper right")
    top.grid(alpha=0.3)


def _draw_cow(bottom: Any, points: list[tuple[str, CompareRow, CompareRow | None]]) -> None:
    """cow_ksm per release as bars, each release's kernels.py rows (by commit) under its tick."""
    xs = list(range(len(points)))
    labels = [v for v, _, _ in points]
    bare = [x for x, (_, _, b) in zip(xs, points, strict=True) if b is not None]
    width = 0.38
    bottom.bar([x - width / 2 for x in xs], [r.cow_ksm for _, r, _ in points], width, label="with change_pte")
    bottom.bar([x + width / 2 for x in bare], [b.cow_ksm for _, _, b in points if b is not None], width,
               label="KVM without change_pte")
    bottom.set_ylabel("cow_ksm")
    bottom.legend(fontsize=8, loc="upper right")
    bottom.grid(alpha=0.3, axis="y")
    bottom.set_xticks(xs)
    bottom.set_xticklabels(labels, fontsize=8 if len(labels) > 16 else None)
    for x, v in zip(xs, labels, strict=True):
        here = [f"{c.commit if c.commit != '-' else '?'} {c.field}" for c in CHANGES if c.version == v]
        if here:
            bottom.annotate("\n".join(here), xy=(x, 0), xycoords=("data", "axes fraction"), xytext=(0, -22),
                            textcoords="offset points", rotation=90, ha="center", va="top", fontsize=6)


def write_history_plot(path: str, result: CompareResult) -> None:
    """EPT_VIOLATION and cow_ksm per release, with and without change_pte, each release's commits below it."""
    plt = pyplot()
    points = _by_kernel(result)
    if not points:
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 9), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    _draw_exits(top, result, points)
    _draw_cow(bottom, points)
    fig.tight_layout()
    fig.subplots_adjust(bottom=0.4)
    save_figure(plt, fig, path, 110, f"--plot {path!r}: cannot write the file")
