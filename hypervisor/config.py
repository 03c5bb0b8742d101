"""What a run is: the configuration dataclasses (SimConfig, KsmKnobs) and their validation.

A KSM knob is declared once, as a field of KsmKnobs whose metadata names its command-line
flag, whether it is a file of /sys/kernel/mm/ksm that ksmd reads (and is set on `Ksm` at
start), how its text is parsed and what values the kernel refuses.  The CLI, the JSON
report, the builder and the "given without --ksm" check all read these fields; adding a
knob is one field here and one click option in cli.py.
"""

import os
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .profiles import check_ksm_knobs, get_profile
from .races import RaceSpec
from .sizes import format_size
from .types import PAGE_SIZE
from .vmm import layout, loader

DEFAULT_QUANTUM = 10_000
DEFAULT_INSNS_PER_MS = 100_000  # a 100-MIPS CPU: about what Unicorn runs at, so 1 ms ~ 1 ms of wall time
DEFAULT_MAX_INSNS = 1_000_000_000
MIN_MEMORY = layout.HEAP_START_GPA
MAX_VMS = 256
# vCPUs per VM: each has its own stack carved below layout.STACK_TOP_GPA (layout.MAX_VCPUS of them fit).
MAX_VCPUS = layout.MAX_VCPUS
# Host-side bookkeeping per guest page beyond its frame (ptes, sptes, rmap_items, page flags).
_BYTES_PER_PAGE_OVERHEAD = 64

GUEST_IMAGES = loader.GUEST_IMAGES

_RUN_VALUES = "takes 0 (stop), 1 (run) or 2 (stop and unmerge everything)"


def image_label(path: str) -> str:
    """How reports name an image: a bundled guest by its file name, any other by the path given."""
    p = Path(path)
    return p.name if p.parent.resolve() == GUEST_IMAGES else path


def parse_run_at(texts: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """--ksm-run-at MS:VALUE (repeatable) -> ((ms, value), ...)."""
    out = []
    for v in texts:
        try:
            ms, run = v.split(":")
            out.append((int(ms), int(run)))
        except ValueError:
            raise ConfigError(f"--ksm-run-at {v!r}: write MS:VALUE, e.g. 500:2.") from None
        if out[-1][0] < 0:
            raise ConfigError(f"--ksm-run-at {v!r}: MS is a simulated time, from 0 on.")
    return tuple(out)


def _run_refused(value: int) -> str | None:
    return None if value in (0, 1, 2) else f"/sys/kernel/mm/ksm/run {_RUN_VALUES}"


def _run_at_refused(value: tuple[tuple[int, int], ...]) -> str | None:
    bad = [f"{ms}:{run}" for ms, run in value if run not in (0, 1, 2)]
    return f"{bad[0]}: /sys/kernel/mm/ksm/run {_RUN_VALUES}" if bad else None


def knob(default: Any, flag: str, help: str, *, sysfs: bool = True, parse: Callable[[Any], Any] | None = None,
         refuse: Callable[[Any], str | None] | None = None, off_flag: str | None = None,
         metavar: str | None = None, int_range: tuple[int, int] | None = None, since: str | None = None) -> Any:
    """A KsmKnobs field: its flag and --help text, whether Ksm gets it as a sysfs attribute at start, how the
    CLI's value is parsed, and `refuse(value)` -> why the kernel would refuse it (None: accepted).

    cli.py makes the click option from this alone (its kind from the default: False a flag, a tuple
    repeatable, an int or None an integer; `off_flag` the flag that turns a None-default bool off;
    `int_range` a range click enforces).  `since`: the Profile field that says the kernel has the knob
    (given on a kernel without it, it is refused, naming the release that added it)."""
    return field(default=default, metadata={"flag": flag, "help": help, "sysfs": sysfs, "parse": parse,
                                            "refuse": refuse, "off_flag": off_flag, "metavar": metavar,
                                            "int_range": int_range, "since": since})


@dataclass(frozen=True)
class KsmKnobs:
    """/sys/kernel/mm/ksm as the run starts (and `run` writes during it)."""

    enabled: bool = False
    run: int = knob(1, "--ksm-run", "/sys/kernel/mm/ksm/run at start: 0 stop, 1 run, 2 stop and unmerge all.",
                    sysfs=False, refuse=_run_refused, int_range=(0, 2))
    pages_to_scan: int = knob(100, "--ksm-pages-to-scan", "/sys/kernel/mm/ksm/pages_to_scan: pages per ksmd wake-up.",
                              refuse=lambda v: None if v > 0 else "give at least 1 page per ksmd wake-up")
    sleep_millisecs: int = knob(20, "--ksm-sleep-ms", "/sys/kernel/mm/ksm/sleep_millisecs (simulated); 0 runs ksmd "
                                "between every two guest time slices.",
                                refuse=lambda v: None if v >= 0 else "give 0 or more milliseconds")
    # mm/ksm.c max_page_sharing_store() (read in a 6.x tree) returns -EINVAL below 2 likewise.
    # None: the kernel's default (256 where the knob exists, 4.13+; smart_scan on from 6.7)
    max_page_sharing: int | None = knob(
        None, "--ksm-max-page-sharing", "/sys/kernel/mm/ksm/max_page_sharing (4.13+; default 256): mappings per "
        "KSM page before a duplicate.", refuse=lambda v: None if v is None or v >= 2
        else "give at least 2 (sharing needs two mappings; the kernel refuses less too)",
        since="ksm_stable_node_chains")
    use_zero_pages: bool = knob(False, "--ksm-use-zero-pages",
                                "/sys/kernel/mm/ksm/use_zero_pages: merge all-zero pages with the zero page.",
                                since="ksm_use_zero_pages")
    smart_scan: bool | None = knob(None, "--ksm-smart-scan", "/sys/kernel/mm/ksm/smart_scan (6.7+, on by default "
                                   "there): skip pages that keep failing to merge.", off_flag="--ksm-no-smart-scan",
                                   since="ksm_smart_scan")
    # (simulated ms, value): write /sys/kernel/mm/ksm/run at that time
    run_at: tuple[tuple[int, int], ...] = knob(
        (), "--ksm-run-at", "Write VALUE to /sys/kernel/mm/ksm/run at simulated millisecond MS (repeatable).",
        sysfs=False, parse=parse_run_at, refuse=_run_at_refused, metavar="MS:VALUE")

    @staticmethod
    def knobs() -> tuple[Field[Any], ...]:
        """Every knob (all fields but `enabled`), in report order."""
        return tuple(f for f in fields(KsmKnobs) if "flag" in f.metadata)

    @classmethod
    def from_options(cls, enabled: bool, values: Mapping[str, Any]) -> "KsmKnobs":
        """The knobs as the command line gave them: `values` by field name, as click parsed them."""
        kw = {}
        for f in cls.knobs():
            if f.name in values:
                parse = f.metadata["parse"]
                kw[f.name] = parse(values[f.name]) if parse is not None else values[f.name]
        return cls(enabled=enabled, **kw)

    def sysfs(self) -> dict[str, Any]:
        """The knobs ksmd reads, by their /sys/kernel/mm/ksm name (= the Ksm attribute); None: the kernel's
        default, left as Ksm has it."""
        return {f.name: getattr(self, f.name) for f in self.knobs()
                if f.metadata["sysfs"] and getattr(self, f.name) is not None}

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"enabled": self.enabled}
        for f in self.knobs():
            value = getattr(self, f.name)
            d[f.name] = [list(x) for x in value] if isinstance(value, tuple) else value
        return d

    def check(self) -> None:
        """Values the kernel refuses, as ConfigErrors naming the flag."""
        for f in self.knobs():
            refuse, value = f.metadata["refuse"], getattr(self, f.name)
            why = refuse(value) if refuse is not None else None
            if why is not None:
                # A repeatable knob's `why` names the item it refuses.
                raise ConfigError(f"{f.metadata['flag']} {why if isinstance(value, tuple) else f'{value}: {why}'}.")

    def release_gated(self) -> list[tuple[str, str, str]]:
        """(flag, sysfs file, Profile field) of every knob given that not every kernel had."""
        return [(f.metadata["flag"], f.name, f.metadata["since"]) for f in self.knobs()
                if f.metadata["since"] is not None and getattr(self, f.name) != f.default]

    def check_given(self) -> None:
        """Knobs changed from their defaults while KSM is off."""
        if not self.enabled:
            changed = [f.metadata["flag"] for f in self.knobs() if getattr(self, f.name) != f.default]
            if changed:
                raise ConfigError(f"{', '.join(changed)} given without --ksm: add --ksm to turn KSM on.")


# The name every caller knew before the knobs had a home of their own.
KsmConfig = KsmKnobs


@dataclass(frozen=True)
class SimConfig:
    image: str
    memory: int = 64 << 20
    cmdline: str = ""
    vms: int = 1
    vcpus: int = 1
    max_insns: int = DEFAULT_MAX_INSNS
    profile: str = "2.6.32"  # the kernel version modelled (--kernel; --profile is its old name)
    change_pte: bool = True
    ksm: KsmKnobs = field(default_factory=KsmKnobs)
    quantum: int = DEFAULT_QUANTUM
    insns_per_ms: int = DEFAULT_INSNS_PER_MS
    # hypervisor/races.py specs: host events fired at named points (POINT:EVENT[@N])
    inject: tuple[str, ...] = ()
    # KVM's MMU: "tdp" (EPT) or "shadow"; mmu_pages: KVM_SET_NR_MMU_PAGES for shadow (None: KVM's default).
    mmu: str = "tdp"
    mmu_pages: int | None = None
    # --oos-shadow: KVM's oos_shadow module parameter (shadow only; None: the default, 1).
    oos_shadow: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"inject": list(self.inject),
            "image": self.image, "memory": self.memory, "cmdline": self.cmdline, "vms": self.vms,
            "vcpus": self.vcpus,
            "max_insns": self.max_insns, "profile": self.profile, "change_pte": self.change_pte,
            "quantum": self.quantum, "insns_per_ms": self.insns_per_ms, "ksm": self.ksm.as_dict(),
            "mmu": self.mmu, "mmu_pages": self.mmu_pages, "oos_shadow": self.oos_shadow,
        }


# The command-line flag of each KSM knob, for messages.
KSM_FLAGS = {f.name: f.metadata["flag"] for f in KsmKnobs.knobs()}


def host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 16 << 30


def _check_memory(config: SimConfig) -> None:
    memory = format_size(config.memory)
    if config.memory <= 0 or config.memory % PAGE_SIZE:
        raise ConfigError(f"--memory {memory} is not a positive multiple of {PAGE_SIZE} bytes.")
    if config.memory < MIN_MEMORY:
        raise ConfigError(f"--memory {memory} is too small: guests need at least "
                          f"{MIN_MEMORY >> 20} MiB (boot area and image below {MIN_MEMORY:#x}).")
    if config.memory > layout.IDENTITY_MAP_SIZE:
        raise ConfigError(f"--memory {memory} is larger than the 1 GiB the boot page tables map; "
                          "give at most 1G.")


def validate(config: SimConfig) -> None:
    _check_memory(config)
    loader.cmdline_bytes(config.cmdline)
    if not 1 <= config.vms <= MAX_VMS:
        raise ConfigError(f"--vms {config.vms}: give between 1 and {MAX_VMS} VMs.")
    if not 1 <= config.vcpus <= MAX_VCPUS:
        raise ConfigError(f"--vcpus {config.vcpus}: give between 1 and {MAX_VCPUS} vCPUs per VM "
                          f"(each vCPU has its own {layout.VCPU_STACK_SIZE >> 10} KiB boot stack below "
                          f"{layout.STACK_TOP_GPA:#x}).")
    if config.max_insns <= 0:
        raise ConfigError("--max-insns must be a positive number of instructions.")
    if config.quantum <= 0:
        raise ConfigError(f"--quantum {config.quantum}: a time slice is a positive number of instructions.")
    if config.insns_per_ms <= 0:
        raise ConfigError(f"--insns-per-ms {config.insns_per_ms}: give a positive simulated CPU speed.")
    if config.mmu not in ("tdp", "shadow"):
        raise ConfigError(f"--mmu {config.mmu!r}: give tdp (EPT) or shadow.")
    if config.oos_shadow is not None and config.mmu != "shadow":
        raise ConfigError("--oos-shadow is a parameter of KVM's shadow MMU: it needs --mmu shadow.")
    if config.mmu_pages is not None:
        if config.mmu != "shadow":
            raise ConfigError("--mmu-pages sizes the shadow page cache: it needs --mmu shadow.")
        if config.mmu_pages < 64:
            # kvm_vm_ioctl_set_nr_mmu_pages (2.6.32 x86.c) refuses fewer than KVM_MIN_ALLOC_MMU_PAGES.
            raise ConfigError(f"--mmu-pages {config.mmu_pages}: KVM_SET_NR_MMU_PAGES takes at least 64 pages.")
    config.ksm.check()
    for spec in config.inject:
        RaceSpec.parse(spec)
    config.ksm.check_given()
    k = config.ksm
    check_ksm_knobs(get_profile(config.profile, config.change_pte), k.release_gated())
    need = config.vms * config.memory * (PAGE_SIZE + _BYTES_PER_PAGE_OVERHEAD) // PAGE_SIZE
    have = host_memory_bytes()
    if need > have * 3 // 4:
        raise ConfigError(f"{config.vms} VMs of {config.memory >> 20} MiB need about {need >> 20} MiB of "
                          f"host memory if every page is touched; this machine has {have >> 20} MiB. "
                          "Give fewer or smaller VMs.")
