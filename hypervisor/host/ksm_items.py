"""KSM's bookkeeping: rmap_items (per-VMA numpy arrays), mm_slots, the scan cursor, checksums.

After mm/ksm.c (the stable nodes and tree: ksm_nodes.py).
`KsmState` names the state the other ksm_* modules share; `Ksm` (host/ksm.py) sets it up.
"""

from dataclasses import dataclass, field
from importlib.resources import files
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
from mypy_extensions import trait

from ..events import Tracer
from ..types import PAGE_SHIFT, Hva, Pfn
from .frames import FramePool
from .ksm_nodes import StableNode, StableNodeChain, StableNodes, StableTree

# Imported at run time, not only for the type checker: the compiled build's dataclass MmSlot reads HostMm's
# type object when this module initialises (a name imported under TYPE_CHECKING only is NULL there).
from .mm import HostMm, Vma

if TYPE_CHECKING:
    from ..profiles import Profile
    from .ksm_unstable import UnstableTree

# rmap_item flags
UNSTABLE_FLAG = 1
STABLE_FLAG = 2

# sizeof(struct ksm_rmap_item) on 64-bit, for general_profit
RMAP_ITEM_SIZE = 64

# page_hash's 512 odd multipliers, drawn once from numpy's PCG64 stream,
#     np.random.default_rng(0x4B534D).integers(1, 2**63, size=PAGE_SIZE // 8, dtype=np.uint64) | 1
# and kept in ksm_hash_mult.npy (tests/unit/test_host_corners.py draws them again and compares): so the trees'
# keys do not depend on numpy's generator, and hvsim does not import numpy.random at start-up (with it
# secrets, hmac and OpenSSL's libcrypto: about 10 ms of every process, issue #13 figure 4d).
def _hash_multipliers() -> npt.NDArray[np.uint64]:
    with (files("hypervisor.host") / "ksm_hash_mult.npy").open("rb") as f:
        mult: npt.NDArray[np.uint64] = np.load(f)
    return mult


_HASH_MULT = _hash_multipliers()
_HASH_SALT = np.uint64(0x9E3779B97F4A7C15)


_HASH_CHUNK = 64  # pages per step: small temporaries (malloc, cache) instead of one huge gather


def page_hash(frames: FramePool, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """A 64-bit content hash per frame, vectorised: the trees' key (page_checksum is the change detector)."""
    n = int(pfns.shape[0])
    out: npt.NDArray[np.uint64] = np.empty(n, dtype=np.uint64)
    qwords = frames.qwords
    for lo in range(0, n, _HASH_CHUNK):
        part = qwords[pfns[lo : lo + _HASH_CHUNK]]
        part ^= _HASH_SALT
        out[lo : lo + _HASH_CHUNK] = part @ _HASH_MULT  # sum of products, exact mod 2**64
    return out


_FOLD_MULT = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd
_MIN_RUN = 8  # consecutive pfns worth a view of their own; shorter runs are gathered
_ZERO_EDGE = np.zeros(1, dtype=np.int64)
# ndarray.sum without its Python-level wrapper (numpy/_core/_methods.py): the same uint64 sums mod 2**64.
_add_rows = np.add.reduce


def page_checksum(frames: FramePool, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
    """calc_checksum(): a change detector, the sum of the page's 512 qwords mod 2**64 folded to 32 bits.

    The kernel takes `jhash2(addr, PAGE_SIZE / 4, 17)` (2.6.32 mm/ksm.c calc_checksum)
    or `xxhash(addr, PAGE_SIZE, 0)` kept as a u32 (6.8 mm/ksm.c calc_checksum);
    cmp_and_merge_page only compares it with rmap_item->oldchecksum after the stable
    tree missed, and every merge is confirmed by memcmp_pages, so any function that
    changes when the content does will do.
    The sum is the cheapest one numpy vectorises: over a run of consecutive pfns it is
    one reduction over a view of the frames, no copy (benchmarks/checksums.py measured
    it against the position-weighted hash on the bundled workloads: the same changes
    seen).  Blind spot (README, fidelity): a change that keeps the sum, e.g. two qwords
    swapped, goes unseen for one visit.
    """
    n = int(pfns.shape[0])
    sums: npt.NDArray[np.uint64] = np.empty(n, dtype=np.uint64)
    qwords = frames.qwords
    # Where each run of consecutive pfns starts, and how long it is.
    edges = np.concatenate((_ZERO_EDGE, ((pfns[1:] - pfns[:-1]) != 1).nonzero()[0] + 1, np.array([n])))
    lengths = edges[1:] - edges[:-1]
    long = lengths >= _MIN_RUN
    if long.any():
        for start, length in zip(edges[:-1][long].tolist(), lengths[long].tolist(), strict=True):
            first = int(pfns[start])
            _add_rows(qwords[first : first + length], axis=1, out=sums[start : start + length])
        scattered = np.repeat(~long, lengths).nonzero()[0]
        for lo in range(0, scattered.size, _HASH_CHUNK):
            sel = scattered[lo : lo + _HASH_CHUNK]
            sums[sel] = _add_rows(qwords[pfns[sel]], axis=1)
    else:
        for lo in range(0, n, _HASH_CHUNK):
            _add_rows(qwords[pfns[lo : lo + _HASH_CHUNK]], axis=1, out=sums[lo : lo + _HASH_CHUNK])
    # The high half of a multiplicative (Fibonacci) hash: an XOR fold of the halves would let a change
    # at bit i cancel one at bit i + 32 (benchmarks/checksums.py found one in bootstorm).
    sums *= _FOLD_MULT
    sums >>= np.uint64(32)
    folded: npt.NDArray[np.uint32] = sums.astype(np.uint32)
    return folded


def page_checksum_one(frames: FramePool, pfn: Pfn) -> int:
    """page_checksum() of one frame, without the batch machinery."""
    total = int(frames.qwords[pfn].sum(dtype=np.uint64))
    return ((total * int(_FOLD_MULT)) & 0xFFFF_FFFF_FFFF_FFFF) >> 32


class VmaItems:
    """The rmap_items of one mergeable VMA, as arrays indexed by page."""

    def __init__(self, mm: "HostMm", vma: "Vma") -> None:
        self.mm = mm
        self.vma = vma
        n = vma.nr_pages
        self.has_item = np.zeros(n, dtype=np.bool_)
        self.flags = np.zeros(n, dtype=np.uint8)
        self.oldchecksum = np.zeros(n, dtype=np.uint32)
        # The stable node's id when STABLE_FLAG; its slot in the unstable tree when UNSTABLE_FLAG
        # (struct rmap_item's union of head and rb_node).
        self.node = np.zeros(n, dtype=np.int32)
        self.rmap_item_base = 0  # the unstable tree's id of the rmap_item at page 0 (ksm_unstable.py)
        # smart_scan (6.7+): visits without a merge, and skips left before the next visit
        self.age = np.zeros(n, dtype=np.uint8)
        self.remaining_skips = np.zeros(n, dtype=np.uint8)
        # Scalar views of the same memory for the per-page paths (no numpy scalar boxing); the arrays
        # are never replaced.
        self.flags_view = self.flags.data
        self.node_view = self.node.data
        self.oldchecksum_view = self.oldchecksum.data

    def hva(self, idx: int) -> Hva:
        return Hva(self.vma.start + (idx << PAGE_SHIFT))


@dataclass
class MmSlot:
    mm: "HostMm"
    vmas: list[VmaItems] = field(default_factory=list)

    def items_of(self, vma: "Vma") -> VmaItems | None:
        return next((v for v in self.vmas if v.vma is vma), None)


@dataclass
class KsmCursor:
    """ksm_scan: the mm_slot being scanned and the next address in it, as the kernel keeps it
    (an address, not a position, so VMAs and mms may come and go under it)."""

    slot: int = 0
    address: int = 0
    in_pass: bool = False


class KsmHooks(Protocol):
    """Named points of ksmd's merge where a test or `--inject` fires a host event (hypervisor/races.py)."""

    def ksm_before_replace_page(self, mm: "HostMm", hva: Hva) -> None:
        """try_to_merge_one_page: the page is write-protected, not yet compared and replaced."""

    def ksm_after_replace_page(self, mm: "HostMm", hva: Hva) -> None:
        """replace_page: the pte now maps the KSM page."""


class KsmObserver(Protocol):
    """What a measurement sees of ksmd, without replacing its methods (a compiled Ksm's cannot be): every
    wake-up, from either side, and every batch of pages before it is scanned (benchmarks/scale.py times
    the wake-ups; benchmarks/checksums.py records what each page held at each visit)."""

    def wakeup_start(self) -> None:
        """ksmd woke up (whether or not run is 1)."""

    def wakeup_end(self) -> None:
        """ksmd goes back to sleep."""

    def scan_batch(self, items: VmaItems, idxs: npt.NDArray[np.intp], pfns: npt.NDArray[np.int64]) -> None:
        """ksm_do_scan took these pages of one VMA (rmap_items, page indexes, pfns) as its next batch."""


@trait
class KsmState:
    """The state ksmd's parts share (struct ksm's globals in mm/ksm.c); `Ksm` initialises it.

    A mypyc trait, as the mixins over it are (KsmStableTree, KsmUnstableTree, KsmMerge, KsmScan): the
    compiled build (setup.py) compiles them with `Ksm`, and a native class may have one native base class
    plus traits only.
    """

    frames: FramePool
    profile: "Profile"
    # knobs (/sys/kernel/mm/ksm)
    run: int
    pages_to_scan: int
    sleep_millisecs: int
    max_page_sharing: int
    use_zero_pages: bool
    smart_scan: bool
    # mm_slots, the scan cursor and the trees
    slots: list[MmSlot]
    cursor: KsmCursor
    seqnr: int
    stable_tree: StableTree
    unstable_tree: "UnstableTree"
    nodes: StableNodes
    # counters
    rmap_items: int
    unshared: int
    ksm_zero_pages: int
    pages_scanned: int
    pages_skipped: int
    zero_hash: int
    tracer: Tracer
    hooks: KsmHooks | None
    observer: KsmObserver | None


__all__ = ["StableNode", "StableNodeChain", "StableNodes", "StableTree"]
