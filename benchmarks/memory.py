"""Target 4's metadata count: every byte the simulator keeps beside the frames, found by walking live objects.

Starting from a Simulation, the walk follows attributes of hvsim's own objects and
the items of containers (never into Unicorn, ctypes, functions or classes).  Each
numpy array is counted once, by the memory it owns (views of the FramePool's frame
buffer are the frames, counted apart), under the name `Owner.attribute` of the
first place it was found.  Everything else reached (lists, dicts, ints, small
objects) is summed with sys.getsizeof as "Python objects": the per-page arrays are
the design's budget (64 bytes, Linux's rmap_item), the Python objects show what
is not arrays yet.
"""

import ctypes
import enum
import sys
import types
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_SKIP_TYPES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType, type,
               ctypes._SimpleCData, ctypes.Structure, ctypes.Array, enum.Enum)


@dataclass
class MetadataCount:
    frame_bytes: int = 0
    arrays: Counter[str] = field(default_factory=Counter)
    python_bytes: Counter[str] = field(default_factory=Counter)

    @property
    def array_bytes(self) -> int:
        return sum(self.arrays.values())

    @property
    def python_total(self) -> int:
        return sum(self.python_bytes.values())

    def per_page(self, guest_pages: int) -> dict[str, Any]:
        return {
            "guest_pages": guest_pages,
            "frame_buffer_bytes": self.frame_bytes,
            "arrays_bytes_per_page": self.array_bytes / guest_pages,
            "python_bytes_per_page": self.python_total / guest_pages,
            "arrays_by_name": {k: v / guest_pages for k, v in sorted(self.arrays.items(), key=lambda kv: -kv[1])},
            "python_by_owner": {k: v / guest_pages for k, v in self.python_bytes.most_common(12)},
        }


def _root(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _ours(obj: object) -> bool:
    return type(obj).__module__.startswith("hypervisor")


def count_metadata(root: object, frame_buffer: np.ndarray[Any, Any]) -> MetadataCount:
    out = MetadataCount(frame_bytes=int(frame_buffer.nbytes))
    seen: set[int] = {id(frame_buffer)}
    # Depth first, in attribute order, so that an array shared by several owners is named after
    # the first (TdpMmu.sptes, not the vCPU backend's cached reference to it).
    stack: list[tuple[object, str]] = [(root, type(root).__name__)]
    while stack:
        obj, label = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            base = _root(obj)
            if id(base) not in seen or base is obj:
                seen.add(id(base))
                if base is not frame_buffer:
                    out.arrays[label] += int(base.nbytes)
            continue
        if isinstance(obj, _SKIP_TYPES) or type(obj).__module__.split(".")[0] in ("unicorn", "capstone", "ctypes"):
            continue
        out.python_bytes[label.split("[")[0]] += sys.getsizeof(obj)
        children: list[tuple[object, str]] = []
        if isinstance(obj, dict):
            for k, v in obj.items():
                children.append((k, _item_label(k, label)))
                children.append((v, _item_label(v, label)))
        elif isinstance(obj, list | tuple | set | frozenset | deque):
            children.extend((v, _item_label(v, label)) for v in obj)
        elif _ours(obj):
            owner = type(obj).__name__
            names = list(getattr(obj, "__dict__", {}))
            for cls in type(obj).__mro__:
                slots = getattr(cls, "__slots__", ())
                names.extend(s for s in ((slots,) if isinstance(slots, str) else slots) if s not in names)
                if cls.__module__.startswith("hypervisor."):
                    # A class of the compiled build (setup.py) keeps its attributes in getset descriptors.
                    names.extend(n for n, d in vars(cls).items() if isinstance(d, types.GetSetDescriptorType)
                                 and not n.startswith("__") and n not in names)
            for name in names:
                v = getattr(obj, name, None)
                children.append((v, type(v).__name__ if _ours(v) else f"{owner}.{name}"))
        stack.extend(reversed(children))
    return out


def _item_label(item: object, container_label: str) -> str:
    return type(item).__name__ if _ours(item) else f"{container_label}[]"
