"""Target 3: ksmd's scan rate, for fresh pages and for unchanged already-merged pages, against numpy's limit.

The workload drives host/ directly (no guests): N anonymous pages faulted in with
handle_mm_fault, in mms of at most 65,536 pages (a 256 MiB VM each), every
content present exactly twice (page g and page g + N/2), all MADV_MERGEABLE.
With pages_to_scan covering every page, one ksm_do_scan is one full pass:

* pass 1, "fresh": every page is new to ksmd (rmap_item made, checksum taken);
* pass 2, "merging": checksums unchanged, pairs meet in the unstable tree and merge;
* pass 3+, "merged": nothing changed, every page is already in the stable tree.

The ceiling (issue #13) is memory bandwidth: numpy's reduction (a sum) over
contiguous uint64 views of the same frames, in the same run (bandwidth_limit): a
scan that must read every page cannot beat it.  The old limit (issue #6) stays
beside it: numpy computing host/ksm.py's position-weighted page_hash over the same
frames, which was the change detector before #13 and is now only the trees' key.
"""

import cProfile
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from hypervisor.build import build_host, build_mm
from hypervisor.config import KsmKnobs
from hypervisor.host.frames import FRAME_SLACK, FramePool
from hypervisor.host.ksm import _HASH_MULT, _HASH_SALT, page_hash
from hypervisor.host.mm import MADV_MERGEABLE, HostMm
from hypervisor.profiles import get_profile
from hypervisor.types import PAGE_SHIFT, PAGE_SIZE, Hva

from .baselines import BenchmarkError
from .common import Budget, Figure, at_least, collect, median, ratio

MAX_PAGES_PER_MM = 65_536
AREA = Hva(0x7F00_0000_0000)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(0xBF58476D1CE4E5B9)
LIMIT_BATCHES = (32, 64, 128)


def content(classes: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """Page contents, a deterministic function of the content class (splitmix-like, one row per page)."""
    first = classes.astype(np.uint64)[:, None] << np.uint64(9)
    x: npt.NDArray[np.uint64] = np.add(first, np.arange(1, 513, dtype=np.uint64), dtype=np.uint64)
    x *= _GOLDEN
    x ^= x >> np.uint64(29)
    x *= _MIX
    x ^= x >> np.uint64(32)
    return x


class KsmWorkload:
    def __init__(self, n_pages: int, profile: str = "2.6.32", max_per_mm: int = MAX_PAGES_PER_MM) -> None:
        if n_pages < 2 or n_pages % 2:
            raise ValueError("the KSM workload needs an even number of pages")
        per_mm = min(n_pages, max_per_mm)
        if n_pages % per_mm:
            raise ValueError(f"{n_pages} pages do not split into mms of {per_mm}")
        self.n_pages = n_pages
        # The host as build.py wires every run's: frames, vmstat, ksmd with its knobs; one mm per "VM".
        host = build_host(get_profile(profile), n_pages + 1 + FRAME_SLACK,
                          KsmKnobs(enabled=True, pages_to_scan=n_pages + 1))
        assert host.ksm is not None
        self.frames, self.ksm = host.frames, host.ksm
        self.mms: list[HostMm] = []
        half = n_pages // 2
        for k in range(n_pages // per_mm):
            mm = build_mm(host, f"mm{k}")
            vma = mm.mmap(AREA, per_mm * PAGE_SIZE)
            for i in range(per_mm):
                mm.handle_mm_fault(Hva(AREA + (i << PAGE_SHIFT)), write=True)
            pfns = vma.ptes >> PAGE_SHIFT
            for lo in range(0, per_mm, 1024):
                hi = min(per_mm, lo + 1024)
                classes = (np.arange(lo, hi, dtype=np.int64) + k * per_mm) % half
                self.frames.qwords[pfns[lo:hi]] = content(classes)
            mm.madvise(AREA, per_mm * PAGE_SIZE, MADV_MERGEABLE)
            self.mms.append(mm)
        self.ksm.set_run(1)

    def full_pass(self, profiler: cProfile.Profile | None = None) -> tuple[int, float]:
        """One full scan (ksm_do_scan until the pass wraps); (pages scanned, seconds)."""
        ksm = self.ksm
        seq, scanned = ksm.seqnr, ksm.pages_scanned
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        while ksm.seqnr == seq:
            ksm.ksm_do_scan(ksm.pages_to_scan)
        seconds = time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
        return ksm.pages_scanned - scanned, seconds

    def mapped_pfns(self) -> npt.NDArray[np.int64]:
        parts = [vma.ptes[(vma.ptes & 1) == 1] >> PAGE_SHIFT for mm in self.mms for vma in mm.vmas]
        out: npt.NDArray[np.int64] = np.concatenate(parts).astype(np.int64)
        return out


def numpy_limit(frames: FramePool, pfns: npt.NDArray[np.int64]) -> tuple[float, int]:
    """(pages per second, batch size): numpy's best throughput computing KSM's page hash over pfns.

    The same function as host/ksm.py page_hash (its multipliers and salt; checked
    against it on the first pages), written for speed rather than taken from hvsim,
    so that the limit does not move when hvsim's implementation does: a batch
    gathered with fancy indexing, XORed in place, and multiplied-and-summed as one
    uint64 matrix-vector product (exact mod 2**64); the best of LIMIT_BATCHES.
    """
    n = int(pfns.shape[0])
    best = (0.0, 0)
    qwords = frames.qwords
    for batch in LIMIT_BATCHES:
        out = np.empty(n, dtype=np.uint64)
        t0 = time.perf_counter()
        for lo in range(0, n, batch):
            part = qwords[pfns[lo : lo + batch]]
            part ^= _HASH_SALT
            out[lo : lo + batch] = part @ _HASH_MULT
        rate = n / (time.perf_counter() - t0)
        check = min(n, 8)
        if not np.array_equal(out[:check], page_hash(frames, pfns[:check])):
            raise BenchmarkError("the numpy limit no longer computes host/ksm.py's page_hash: update ksm_scan.py")
        best = max(best, (rate, batch))
    return best


def bandwidth_limit(frames: FramePool, pfns: npt.NDArray[np.int64]) -> float:
    """Pages per second of numpy summing the same frames through contiguous uint64 views (memory bandwidth)."""
    ordered = np.sort(pfns)
    starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)
    ends = np.append(starts[1:], ordered.size)
    runs = [(int(ordered[a]), int(ordered[a]) + int(b - a)) for a, b in zip(starts, ends, strict=True)]
    qwords = frames.qwords
    best = 0.0
    for _ in range(3):  # the best of three sweeps: a ceiling
        t0 = time.perf_counter()
        total = np.uint64(0)
        for lo, hi in runs:
            total += qwords[lo:hi].sum(dtype=np.uint64)
        best = max(best, ordered.size / (time.perf_counter() - t0))
    return best


def measure(n_pages: int, merged_passes: int = 2, max_per_mm: int = MAX_PAGES_PER_MM) -> dict[str, Any]:
    """One workload: the fresh pass, the merging pass, the best of `merged_passes` merged passes, and limits."""
    w = KsmWorkload(n_pages, max_per_mm=max_per_mm)
    bandwidth = bandwidth_limit(w.frames, w.mapped_pfns())
    limit_fresh, batch_fresh = numpy_limit(w.frames, w.mapped_pfns())
    pages, secs = w.full_pass()
    fresh = pages / secs
    pages_m, secs_m = w.full_pass()
    merging = pages_m / secs_m
    counters = w.ksm.counters()
    merged_fraction = (counters["pages_shared"] + counters["pages_sharing"]) / n_pages
    limit_merged, batch_merged = numpy_limit(w.frames, w.mapped_pfns())
    rates = []
    for _ in range(max(1, merged_passes)):
        p, s = w.full_pass()
        rates.append(p / s)
    out = {
        "pages": n_pages, "fresh_pages_per_s": fresh, "merging_pages_per_s": merging,
        "merged_pages_per_s": max(rates), "limit_fresh_pages_per_s": limit_fresh, "limit_fresh_batch": batch_fresh,
        "limit_merged_pages_per_s": limit_merged, "limit_merged_batch": batch_merged,
        "merged_fraction_after_pass_2": merged_fraction, "bandwidth_pages_per_s": bandwidth, "ksm_counters": counters,
        "fresh_pass_seconds": secs, "merging_pass_seconds": secs_m,
    }
    del w
    collect()
    return out


def run(*, n_pages: int, reps: int, budget: Budget) -> list[Figure]:
    samples: list[dict[str, Any]] = []
    for i in range(max(1, reps)):
        t0 = time.perf_counter()
        samples.append(measure(n_pages))
        if i + 1 < reps and not budget.allows(time.perf_counter() - t0):
            break
    if samples[0]["merged_fraction_after_pass_2"] < 0.99:
        raise BenchmarkError(f"KSM workload did not merge: {samples[0]['ksm_counters']}")

    def med(key: str) -> float:
        return median([s[key] for s in samples])

    fresh, merged, bw = med("fresh_pages_per_s"), med("merged_pages_per_s"), med("bandwidth_pages_per_s")
    lim_f, lim_m = med("limit_fresh_pages_per_s"), med("limit_merged_pages_per_s")
    details = {"pages": n_pages, "profile": "2.6.32", "samples": samples}
    r_f, r_m = ratio(fresh, bw), ratio(merged, bw)
    return [
        Figure("ksm_scan_fresh", "3a", f"ksmd scan, {n_pages:,} fresh pages", fresh, "pages/s", bw,
               "memory bandwidth (numpy sum over views)", r_f, [at_least(r_f, 0.5, ">= 0.5 x bandwidth")], details,
               old_baseline=lim_f, old_baseline_name="numpy weighted page_hash", old_ratio=ratio(fresh, lim_f)),
        Figure("ksm_scan_merged", "3b", f"ksmd scan, {n_pages:,} unchanged merged pages", merged, "pages/s", bw,
               "memory bandwidth (numpy sum over views)", r_m, [at_least(merged, 1_000_000, ">= 1M pages/s")],
               {"pages": n_pages, "see": "ksm_scan_fresh.details"},
               "a merged page is not read: information beside the bandwidth",
               old_baseline=lim_m, old_baseline_name="numpy weighted page_hash", old_ratio=ratio(merged, lim_m)),
    ]
