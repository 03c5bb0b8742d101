"""`hvsim diff A.json B.json`: two run reports, every figure side by side with its difference.

Exits come first (`totals.exits.*`, then each VM's), then the rest in report order; a figure one
report lacks counts as 0 where its table is there (hypervisor/figures.py).  Configuration and
console differences are listed after the figures.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .figures import Figure, absent_means_zero, figures


@dataclass(frozen=True)
class FigureDiff:
    name: str
    a: Figure | None
    b: Figure | None

    @property
    def delta(self) -> Figure | None:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def differs(self) -> bool:
        return self.a != self.b


@dataclass(frozen=True)
class ReportDiff:
    rows: list[FigureDiff]
    config: list[tuple[str, Any, Any]]
    consoles: list[int]  # VMs whose console output differs

    @property
    def differs(self) -> bool:
        return any(r.differs for r in self.rows)


def load_report(path: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read {path!r}: {err.strerror}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path!r} is not JSON ({err}): give a report written by `hvsim run --json`.") from None
    if not isinstance(doc, dict) or "totals" not in doc:
        raise ConfigError(f"{path!r} is not a run report: give one written by `hvsim run --json` or a sweep's "
                          "runs/*.json.")
    return doc


def _exits_first(name: str) -> tuple[int, str]:
    if name.startswith("totals.exits."):
        return (0, "")
    if ".exits." in name:
        return (1, "")
    return (2, "")


def _flat(node: Any, path: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{path}.{k}" if path else str(k)))
        return out
    return {path: node}


def diff_reports(a: dict[str, Any], b: dict[str, Any]) -> ReportDiff:
    fa, fb = figures(a), figures(b)
    names = list(fa)
    at = {n: i for i, n in enumerate(names)}
    previous = -1
    for n in fb:  # B's own figures go right after their neighbours in B, not at the end
        if n in at:
            previous = at[n]
            continue
        names.insert(previous + 1, n)
        at = {m: i for i, m in enumerate(names)}
        previous = at[n]
    names.sort(key=_exits_first)  # stable: report order within each group

    def value(report: dict[str, Any], flat: dict[str, Figure], name: str) -> Figure | None:
        if name in flat:
            return flat[name]
        return 0 if absent_means_zero(report, name) else None

    rows = [FigureDiff(n, value(a, fa, n), value(b, fb, n)) for n in names]
    ca, cb = _flat(a.get("config", {})), _flat(b.get("config", {}))
    config = [(k, ca.get(k), cb.get(k)) for k in dict.fromkeys([*ca, *cb]) if ca.get(k) != cb.get(k)]
    va, vb = a.get("vms", []), b.get("vms", [])
    consoles = [i for i in range(max(len(va), len(vb)))
                if i >= len(va) or i >= len(vb) or va[i].get("console") != vb[i].get("console")]
    return ReportDiff(rows, config, consoles)


def _num(v: Figure | None) -> str:
    if v is None:
        return "-"
    return f"{v:,}" if isinstance(v, int) else f"{v:,.3f}"


def render_diff(d: ReportDiff, a_name: str, b_name: str, changed_only: bool = False) -> str:
    rows = [r for r in d.rows if r.differs or not changed_only]
    width = max([len("figure"), *(len(r.name) for r in rows)])
    lines = [f"A = {a_name}", f"B = {b_name}", "",
             f"{'figure':<{width}}  {'A':>14}  {'B':>14}  {'B - A':>14}"]
    lines.append(f"{'-' * width}  {'-' * 14}  {'-' * 14}  {'-' * 14}")
    for r in rows:
        delta = r.delta
        shown = "" if not r.differs else ("n/a" if delta is None else f"{delta:+,}" if isinstance(delta, int)
                                          else f"{delta:+,.3f}")
        lines.append(f"{r.name:<{width}}  {_num(r.a):>14}  {_num(r.b):>14}  {shown:>14}")
    n = sum(r.differs for r in d.rows)
    lines.append("")
    lines.append(f"{n} of {len(d.rows)} figures differ." if n else f"all {len(d.rows)} figures are equal.")
    for key, va, vb in d.config:
        lines.append(f"config.{key}: A {json.dumps(va)}, B {json.dumps(vb)}")
    for i in d.consoles:
        lines.append(f"vm{i}: the console output differs.")
    return "\n".join(lines) + "\n"
