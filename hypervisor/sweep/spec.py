"""The sweep spec (TOML): a base run, axes crossed as a grid, axes zipped together; its points.

    [run]                      # the base run: `hvsim run`'s long options, underscores for dashes
    image = "samepage"         # a path (relative to the spec) or a bundled guest's name
    cmdline = "pages=64 passes=40"
    ksm = true
    [axes]                     # each a list of values; every combination is a point
    profile = ["2.6.32", "3.7"]
    no_change_pte = [false, true]
    [zip]                      # lists of one length that move together: one more axis
    vms = [2, 4]
    memory = ["32M", "64M"]

Axes vary in the order the spec lists them, the last fastest.  Each point is identified by
a hash of everything that determines its report: the full SimConfig, --check, the guest
image's bytes and hvsim's version.
"""

import hashlib
import itertools
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError
from ..sim import SimConfig

TABLES = ("run", "axes", "zip", "plot")


@dataclass(frozen=True)
class Axis:
    """One dimension of the grid: a single key, or several zipped keys moving together."""

    names: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]  # one tuple per step, a value per name

    @property
    def label(self) -> str:
        return "/".join(self.names)

    def value_label(self, step: tuple[Any, ...]) -> str:
        return "/".join(_show(v) for v in step)


@dataclass(frozen=True)
class RunPoint:
    """A point's full run: what Simulation needs, and whether --check watches it."""

    config: SimConfig
    check: bool = False


# The CLI's parser: a point's settings -> its RunPoint (see hypervisor/sweep/options.py).
PointParser = Callable[[dict[str, Any], str], RunPoint]


@dataclass(frozen=True)
class Point:
    index: int
    coords: dict[str, Any]  # axis key -> this point's value, as written in the spec
    run: RunPoint
    key: str  # the content hash naming its report

    def describe(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.coords.items()) or "the base run"


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    base: dict[str, Any]
    axes: tuple[Axis, ...]
    points: tuple[Point, ...]
    figures: tuple[str, ...]  # [plot] figures = [...]: what --plot draws

    @property
    def axis_keys(self) -> list[str]:
        return [name for axis in self.axes for name in axis.names]


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _lists(table: dict[str, Any], name: str) -> dict[str, list[Any]]:
    for key, values in table.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"[{name}] {key}: give a non-empty list of values, e.g. {key} = [1, 2].")
    return table


def _axes(doc: dict[str, Any]) -> tuple[Axis, ...]:
    axes: list[Axis] = []
    for table in doc:  # tomllib keeps the document's order: axes vary in the order written
        if table == "axes":
            for key, values in _lists(doc["axes"], "axes").items():
                axes.append(Axis((key,), tuple((v,) for v in values)))
        elif table == "zip" and doc["zip"]:
            zipped = _lists(doc["zip"], "zip")
            lengths = {len(v) for v in zipped.values()}
            if len(lengths) != 1:
                raise ConfigError("[zip]: every list must have the same length (they move together); got "
                                  + ", ".join(f"{k} {len(v)}" for k, v in zipped.items()) + ".")
            axes.append(Axis(tuple(zipped), tuple(zip(*zipped.values(), strict=True))))
    seen: set[str] = set()
    for axis in axes:
        for name in axis.names:
            if name in seen:
                raise ConfigError(f"{name!r} is an axis twice ([axes] and [zip]): keep one.")
            seen.add(name)
    return tuple(axes)


def resolve_image(value: str, spec_dir: Path) -> str:
    """A path relative to the spec's directory when there is such a file; else as written, for `hvsim run`'s
    own lookup (a path, or a bundled guest's name)."""
    path = Path(value).expanduser()
    candidate = path if path.is_absolute() else spec_dir / path
    return str(candidate.resolve()) if value and candidate.is_file() else value


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def point_key(run: RunPoint) -> str:
    """The name of a point's report: equal keys, byte-identical reports."""
    doc = {"hvsim": __version__, "config": run.config.as_dict(), "check": run.check,
           "image_sha256": _file_digest(run.config.image)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:20]


def load_spec(path: Path, parse_point: PointParser) -> SweepSpec:
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read the sweep spec {str(path)!r}: {err.strerror}.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML: {err}.") from None
    unknown = [t for t in doc if t not in TABLES]
    if unknown:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(unknown)}: a spec has [run], [axes], [zip] "
                          "and [plot].")
    for t in TABLES:
        if not isinstance(doc.get(t, {}), dict):
            raise ConfigError(f"{path}: {t} must be a table ([{t}]).")
    base = dict(doc.get("run", {}))
    axes = _axes(doc)
    for axis in axes:
        for name in axis.names:
            if name in base:
                raise ConfigError(f"{name!r} is both in [run] and an axis: keep it in one place.")
    if "image" not in base and not any("image" in a.names for a in axes):
        raise ConfigError(f"{path}: no image: add image = \"samepage\" (a bundled guest) or a path to [run].")
    figures = doc.get("plot", {}).get("figures", [])
    if not isinstance(figures, list) or not all(isinstance(f, str) for f in figures):
        raise ConfigError("[plot] figures: give a list of figure names, e.g. [\"ksm.pages_sharing\"].")
    points = []
    images: dict[str, str] = {}
    for index, steps in enumerate(itertools.product(*(a.values for a in axes))):
        coords = {name: value for axis, step in zip(axes, steps, strict=True)
                  for name, value in zip(axis.names, step, strict=True)}
        settings = {**base, **coords}
        point = ", ".join(f"{k}={_show(v)}" for k, v in coords.items())
        where = f"{path.name}, point {index}" + (f" ({point})" if point else "")
        image = settings["image"]
        if isinstance(image, str):
            if image not in images:
                images[image] = resolve_image(image, path.parent)
            settings["image"] = images[image]
        run = parse_point(settings, where)
        points.append(Point(index, coords, run, point_key(run)))
    return SweepSpec(path, base, axes, tuple(points), tuple(figures))
