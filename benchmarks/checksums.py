"""Issue #13 item 4: does the cheap KSM checksum see every content change the old one saw, on real runs?

`python -m benchmarks.checksums [--quick]` runs the bundled workloads with KSM on
and wraps ksmd's batch scan (Ksm._scan_batch) of the run: before every batch it
records, for each page visited, a 128-bit BLAKE2 digest of its content (the
truth), host/ksm.py's page_checksum (the wrapping qword sum folded to 32 bits, the
change detector now) and the fold of the position-weighted 64-bit content hash
(page_hash, the change detector before #13).  On each revisit of an rmap_item it
counts whether the content changed and whether each checksum changed.  A checksum
"misses" when the content changed and it did not.  It also counts, over every
distinct content seen, how many share a checksum value with another content
(collisions; the trees are keyed by page_hash, never by the checksum).
"""

import argparse
import hashlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hypervisor.host.ksm import Ksm, VmaItems, page_checksum, page_hash
from hypervisor.sim import GUEST_IMAGES, KsmConfig, SimConfig, Simulation

# (guest, cmdline, vms, memory MiB); small parameters, several passes so that pages are revisited.
WORKLOADS: tuple[tuple[str, str, int, int], ...] = (
    ("memtouch", "pages=512 passes=6", 2, 8),
    ("samepage", "pages=256 passes=12 spin=20000", 2, 8),
    ("cowstorm", "pages=256 passes=12 spin=20000 write_at=4", 2, 8),
    ("kernels", "kernel=1024 private=64 passes=12 spin=20000", 3, 8),
    ("kvstore.elf", "ops=400000", 2, 16),
    ("bootstorm.elf", "", 2, 16),
)
QUICK = (
    ("kernels", "kernel=256 private=16 passes=6 spin=20000", 2, 4),
    ("cowstorm", "pages=64 passes=6 spin=20000 write_at=3", 2, 4),
)


def old_checksum(frames: Any, pfns: npt.NDArray[np.int64]) -> npt.NDArray[np.uint32]:
    """The change detector before #13: page_hash folded to 32 bits."""
    h = page_hash(frames, pfns)
    out: npt.NDArray[np.uint32] = (h ^ (h >> np.uint64(32))).astype(np.uint32)
    return out


@dataclass
class Tally:
    visits: int = 0
    revisits: int = 0
    changed: int = 0
    missed_new: int = 0
    missed_old: int = 0
    false_new: int = 0  # checksum changed, content did not (impossible for a function of content)
    contents: dict[bytes, tuple[int, int]] = field(default_factory=dict)

    def collisions(self, which: int) -> int:
        """Distinct contents whose checksum another distinct content also has."""
        seen: dict[int, int] = {}
        for pair in self.contents.values():
            seen[pair[which]] = seen.get(pair[which], 0) + 1
        return sum(c for c in seen.values() if c > 1)


class ChecksumRecorder:
    """A KsmObserver: at every visit of a page, its content's digest and both checksums of it."""

    def __init__(self, ksm: Ksm, tally: Tally) -> None:
        self.frames = ksm.frames
        self.tally = tally
        self.last: dict[tuple[int, int], tuple[bytes, int, int]] = {}

    def wakeup_start(self) -> None:
        pass

    def wakeup_end(self) -> None:
        pass

    def scan_batch(self, items: VmaItems, idxs: npt.NDArray[np.intp], pfns: npt.NDArray[np.int64]) -> None:
        frames, tally, last = self.frames, self.tally, self.last
        new = page_checksum(frames, pfns).tolist()
        old = old_checksum(frames, pfns).tolist()
        for k, (idx, pfn) in enumerate(zip(idxs.tolist(), pfns.tolist(), strict=True)):
            digest = hashlib.blake2b(frames.frames[pfn].tobytes(), digest_size=16).digest()
            tally.visits += 1
            tally.contents.setdefault(digest, (new[k], old[k]))
            key = (id(items), idx)
            prev = last.get(key)
            if prev is not None:
                tally.revisits += 1
                if prev[0] != digest:
                    tally.changed += 1
                    tally.missed_new += prev[1] == new[k]
                    tally.missed_old += prev[2] == old[k]
                elif prev[1] != new[k]:
                    tally.false_new += 1
            last[key] = (digest, new[k], old[k])


def record(ksm: Ksm, tally: Tally) -> None:
    ksm.observer = ChecksumRecorder(ksm, tally)


def run(workloads: Sequence[tuple[str, str, int, int]]) -> list[dict[str, Any]]:
    rows = []
    for name, cmdline, vms, mib in workloads:
        image = GUEST_IMAGES / (name if "." in name else f"{name}.bin")
        cfg = SimConfig(image=str(image), memory=mib << 20, vms=vms, cmdline=cmdline,
                        ksm=KsmConfig(enabled=True, pages_to_scan=1000, sleep_millisecs=5))
        sim = Simulation(cfg)
        assert sim.ksm is not None
        tally = Tally()
        record(sim.ksm, tally)
        t0 = time.perf_counter()
        result = sim.run()
        rows.append({
            "workload": f"{name} {cmdline} --vms {vms} --memory {mib}M", "seconds": time.perf_counter() - t0,
            "errors": result.errors, "visits": tally.visits, "revisits": tally.revisits,
            "content_changed": tally.changed, "missed_sum": tally.missed_new, "missed_old_hash": tally.missed_old,
            "sum_changed_without_content": tally.false_new, "distinct_contents": len(tally.contents),
            "colliding_contents_sum": tally.collisions(0), "colliding_contents_old_hash": tally.collisions(1),
        })
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checksums", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="two small workloads")
    args = p.parse_args(argv)
    rows = run(QUICK if args.quick else WORKLOADS)
    cols = ("visits", "revisits", "content_changed", "missed_sum", "missed_old_hash", "distinct_contents",
            "colliding_contents_sum", "colliding_contents_old_hash")
    print("| workload | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in rows:
        print(f"| {r['workload']} | " + " | ".join(f"{r[c]:,}" for c in cols) + " |")
        if r["errors"] or r["sum_changed_without_content"]:
            print(f"  errors: {r['errors']}; sum changed without content: {r['sum_changed_without_content']}")
    bad = any(r["missed_sum"] > r["missed_old_hash"] or r["errors"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
