"""Builds hvsim's C pieces: always the instruction-counting hook of cpu/ (hypervisor/cpu/_icount.c); with
HVSIM_COMPILED=1, also the model's hot modules compiled by mypyc (README "Performance"; the .py files stay
the model, and HVSIM_PURE=1 selects them at run time, hypervisor/__init__.py)."""

import os
from pathlib import Path

from setuptools import Extension, setup

# What a TLB fill and an EPT_VIOLATION exit run through, and the scheduler (README "The compiled build":
# what each step measured).  Groups that mypyc compiles together or not at all: UnicornVcpu with its mixins
# (traits: an interpreted class may not inherit from a compiled one); the TDP MMU with the notifier base
# class it inherits; Ksm with its mixins (KsmScan over KsmStableTree, KsmUnstableTree, KsmMerge on
# KsmState: traits).
COMPILED_MODULES = [
    # cpu/: the vCPU, its mixins and their common trait, the clock and code pages of every fill, the walker
    "hypervisor/cpu/unicorn_vcpu.py",
    "hypervisor/cpu/tdp_fill.py",
    "hypervisor/cpu/shadow_fill.py",
    "hypervisor/cpu/fill_state.py",
    "hypervisor/cpu/exit_dispatch.py",
    "hypervisor/cpu/clock.py",
    "hypervisor/cpu/blocks.py",
    "hypervisor/cpu/code_pages.py",
    "hypervisor/cpu/walk.py",
    # kvm/: the exit handlers, the VM, the TDP MMU and what it shares with the shadow one
    "hypervisor/kvm/vcpu.py",
    "hypervisor/kvm/vm.py",
    "hypervisor/kvm/mmu.py",
    "hypervisor/kvm/mmu_interface.py",
    "hypervisor/kvm/kvm_mmu_notifier.py",
    "hypervisor/kvm/requests.py",
    "hypervisor/kvm/exits.py",
    "hypervisor/kvm/stats.py",
    "hypervisor/kvm/spte.py",
    "hypervisor/kvm/memslot.py",
    # host/: the mm's fault path, its frames and vmas, the notifier chain
    "hypervisor/host/mm.py",
    "hypervisor/host/vma.py",
    "hypervisor/host/frames.py",
    "hypervisor/host/mmu_notifier.py",
    # the scheduler's loop around every slice, and the Simulation whose clock and counters it moves each turn
    "hypervisor/scheduler.py",
    "hypervisor/sim.py",
    # the VMM's port bus and console, behind every port-I/O exit (a guest's console is one exit per byte)
    "hypervisor/vmm/devices.py",
    "hypervisor/vmm/console.py",
    # host/: ksmd, Ksm with its mixins (traits), the rmap_items, stable nodes and both trees' storage
    "hypervisor/host/ksm.py",
    "hypervisor/host/ksm_scan.py",
    "hypervisor/host/ksm_stable.py",
    "hypervisor/host/ksm_unstable.py",
    "hypervisor/host/ksm_merge.py",
    "hypervisor/host/ksm_items.py",
    "hypervisor/host/ksm_nodes.py",
    "hypervisor/host/ksm_buckets.py",
]

ext_modules = [Extension("hypervisor.cpu._icount", ["hypervisor/cpu/_icount.c"])]
if os.environ.get("HVSIM_COMPILED") != "1":
    # A pure build drops what an earlier compiled build left beside the .py files, which would shadow them.
    for module in COMPILED_MODULES:
        for stale in Path(module).parent.glob(Path(module).stem + ".*.so"):
            stale.unlink()
    for stale in Path("hypervisor").glob("_native__mypyc.*.so"):
        stale.unlink()
else:
    from mypyc.build import mypycify

    # The shared runtime goes inside the package, where an editable install finds it too.
    ext_modules += mypycify(COMPILED_MODULES, opt_level="3", group_name="hypervisor._native")

setup(ext_modules=ext_modules)
