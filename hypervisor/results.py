"""The run report's schema: per-VM results (VmResult), the run's (RunResult), and their JSON form (as_dict)."""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from . import __version__
from .config import SimConfig
from .errors import GuestError
from .profiles import Profile


@dataclass
class VmResult:
    id: int
    image: str
    state: str
    exit_status: int | None
    console: str
    insns: int
    exits: dict[str, int]
    stats: dict[str, int]
    notifier_calls: dict[str, int]
    error: str | None = None
    where: str | None = None
    # exit reason -> what the host did for it -> count (for perf-kvm-stat's cost model)
    exit_work: dict[str, dict[str, int]] = field(default_factory=dict)
    # the HvsimError class of `error` (GuestTimeout for --max-insns): exit codes come from it, not from the text
    error_kind: type[GuestError] | None = None
    # console bytes dropped between the kept head and tail (vmm/console.py)
    console_dropped: int = 0
    # --vcpus > 1: one row per vCPU (state, instructions, exits); empty with one vCPU
    vcpus: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "image": self.image, "state": self.state, "exit_status": self.exit_status,
            "console": self.console, "insns": self.insns, "exits": self.exits, "stats": self.stats,
            "notifier_calls": self.notifier_calls, "exit_work": self.exit_work,
        }
        if self.console_dropped:
            d["console_dropped"] = self.console_dropped
        if self.vcpus:
            d["vcpus"] = self.vcpus
        if self.error is not None:
            d["error"] = self.error
            d["where"] = self.where
            d["error_type"] = self.error_kind.__name__ if self.error_kind is not None else None
        return d


@dataclass
class RunResult:
    config: SimConfig
    profile: Profile
    vms: list[VmResult]
    sim_insns: int
    ksm: dict[str, int] | None
    vmstat: dict[str, int]
    interrupted: bool = False
    # --check: the violated invariant that ended the run, and how many checks passed
    violation: str | None = None
    checks: int | None = None
    injected: dict[str, int] | None = None
    # a vCPU livelocked in fault retries: the diagnosis that ended the run
    livelock: str | None = None
    # the part of sim_insns that was retried faults' cost (kvm.vcpu.FAULT_RETRY_COST each)
    retry_insns: int = 0

    @property
    def errors(self) -> list[str]:
        out = [f"vm{v.id}: {v.error}" for v in self.vms if v.error is not None]
        if self.violation is not None:
            out.append(self.violation)
        return out

    def totals(self) -> dict[str, dict[str, int]]:
        exits: Counter[str] = Counter()
        stats: Counter[str] = Counter()
        calls: Counter[str] = Counter()
        for v in self.vms:
            exits.update(v.exits)
            stats.update(v.stats)
            calls.update(v.notifier_calls)
        return {"exits": dict(exits), "stats": dict(stats), "notifier_calls": dict(calls)}

    @property
    def ksmd_completed_full_scan(self) -> bool | None:
        """Did ksmd get over all mergeable memory at least once (None: KSM off)?  KSM merges
        nothing before its second scan, so without one the KSM counters show no merging."""
        return None if self.ksm is None else self.ksm.get("full_scans", 0) > 0

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "hvsim_version": __version__,
            "config": self.config.as_dict(),
            "profile": {"name": self.profile.name, "kernel": self.profile.version, "summary": self.profile.summary},
            "sim_time": {"insns": self.sim_insns, "ms": self.sim_insns / self.config.insns_per_ms,
                         **({"retry_insns": self.retry_insns} if self.retry_insns else {})},
            "vms": [v.as_dict() for v in self.vms],
            "totals": self.totals(),
            "vmstat": self.vmstat,
        }
        if self.ksm is not None:
            d["ksm"] = self.ksm
            d["ksmd_completed_full_scan"] = self.ksmd_completed_full_scan
        if self.interrupted:
            d["interrupted"] = True
        if self.checks is not None:
            d["check"] = {"checks_passed": self.checks, "violation": self.violation}
        if self.injected is not None:
            d["injected"] = self.injected
        if self.livelock is not None:
            d["livelock"] = self.livelock
        return d


NOTIFIER_CALLBACKS = ("change_pte", "invalidate_page", "invalidate_range_start", "invalidate_range_end",
                      "clear_flush_young", "release")
