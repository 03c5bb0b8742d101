"""Issue #13's honest guest-speed baseline: a bundled guest on hook-free Unicorn, the best Unicorn can do.

The same boot state hvsim gives a guest (vmm/loader.py writes the boot page
tables, GDT, boot parameters and image into a stand-in for the VM), in Unicorn's
own soft-MMU: all of guest memory `mem_map`ped up front (gpa = Unicorn address),
Unicorn walks the guest's page tables itself, no TLB-fill hook, no instruction
counting; one `emu_start` over the whole guest program (uc_emu_start() called as hvsim calls it, GIL
held), with one hook, on OUT (raw ctypes)
(console bytes kept, the exit port stops the run).  The bundled assembly guests
use only OUT and HLT to talk to the VMM, so nothing else is needed; the console
is compared with hvsim's to show that both ran the same instructions.

`python -m benchmarks.hookfree GUEST [--vms N] [--memory SIZE] [--cmdline ...]`
runs N such guests one after the other in one process (the whole-process side
of the "cost of modelling" figure) and prints each exit status.
"""

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any, cast

from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
from unicorn import x86_const as x86

# Only what loading a guest needs (the loader, the raw OUT hook): not hvsim's model, whose imports (numpy,
# capstone, KVM, KSM) would add about 0.12 s to every hook-free process and flatter figure 4d.
from hypervisor.cpu.binding import add_out_hook, emu_start
from hypervisor.vmm import loader
from hypervisor.vmm.loader import GUEST_IMAGES
from hypervisor.x86 import CR0_ET, CR0_PE, CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_LME, MSR_EFER

COM1 = 0x3F8
# Where emu_start runs until: an address no guest reaches (the one cpu/unicorn_vcpu.py's UNTIL names).
UNTIL = 0xFFFF_FFFF_FFFF_F000
EXIT_PORT = 0xF4
# The control registers hvsim's vCPU starts with (cpu/unicorn_vcpu.py: long mode, paging, WP).
_CR0 = CR0_PE | CR0_ET | CR0_WP | CR0_PG


class _PhysicalMemory:
    """What vmm/loader.py writes the boot state through (Vm.write_guest), backed by Unicorn memory."""

    def __init__(self, uc: Uc, memory_size: int, vm_id: int) -> None:
        self.uc = uc
        self.memory_size = memory_size
        self.vm_id = vm_id

    def write_guest(self, gpa: int, data: bytes) -> None:
        self.uc.mem_write(gpa, data)


class HookFreeGuest:
    """One bundled guest on Unicorn's own MMU, memory pre-mapped, a hook on OUT only."""

    def __init__(self, image_path: str, memory: int, cmdline: str = "", vm_id: int = 0, nr_vms: int = 1) -> None:
        image = loader.read_image(image_path)
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, memory)
        boot = loader.load(cast(Any, _PhysicalMemory(uc, memory, vm_id)), image, cmdline, nr_vms)
        uc.reg_write(x86.UC_X86_REG_GDTR, (0, boot.gdt_base, boot.gdt_limit, 0))
        uc.reg_write(x86.UC_X86_REG_CR3, boot.cr3)
        uc.reg_write(x86.UC_X86_REG_CR4, CR4_PAE)
        uc.msr_write(MSR_EFER, EFER_LME | EFER_LMA)
        uc.reg_write(x86.UC_X86_REG_CR0, _CR0)
        uc.reg_write(x86.UC_X86_REG_RSP, boot.rsp)
        uc.reg_write(x86.UC_X86_REG_RSI, boot.rsi)
        # Raw ctypes, as hvsim registers its own OUT hook (cpu/binding.py): the best a user could do.
        self._out_hook = add_out_hook(uc, self._out)
        self.uc = uc
        self.rip = boot.rip
        self.console = bytearray()
        self.exit_status: int | None = None

    def _out(self, port: int, size: int, value: int) -> None:
        if port == COM1:
            self.console.append(value & 0xFF)
        elif port == EXIT_PORT:
            self.exit_status = value & 0xFF
            self.uc.emu_stop()

    def run(self) -> float:
        """The whole guest program in one emu_start (it ends at the exit port or a HLT); seconds."""
        t0 = time.perf_counter()
        # One uc_emu_start() as hvsim makes it (GIL held, the OUT hook's callbacks find it theirs).
        failed = emu_start(self.uc, self.rip, UNTIL)
        seconds = time.perf_counter() - t0
        if failed is not None:
            raise failed
        self.rip = self.uc.reg_read(x86.UC_X86_REG_RIP)
        if self.exit_status is None:
            self.exit_status = 0  # a bare HLT, as hvsim reports it
        return seconds

    def run_in_slices(self, quantum: int) -> float:
        """The old baseline: the same program in Unicorn `count=` slices of `quantum`; seconds.

        Only for guests that end at the exit port (a slice that stops on a long `rep`
        leaves RIP where it was, so an unchanged RIP does not mean a HLT).
        """
        uc = self.uc
        t0 = time.perf_counter()
        while self.exit_status is None:
            uc.emu_start(self.rip, UNTIL, count=quantum)
            self.rip = uc.reg_read(x86.UC_X86_REG_RIP)
        return time.perf_counter() - t0


def run_guests(image_path: str, vms: int, memory: int, cmdline: str = "") -> tuple[float, list[HookFreeGuest]]:
    """`vms` guests one after the other (each its own Uc); the seconds spent in emu_start."""
    guests = [HookFreeGuest(image_path, memory, cmdline, i, vms) for i in range(vms)]
    return sum(g.run() for g in guests), guests


def _size(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].upper() in units else int(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.hookfree", description=__doc__.splitlines()[0])
    p.add_argument("guest", help="a bundled assembly guest (kernels, memtouch, samepage, ...) or a path")
    p.add_argument("--vms", type=int, default=1)
    p.add_argument("--memory", default="64M")
    p.add_argument("--cmdline", default="")
    args = p.parse_args(argv)
    image = args.guest if "/" in args.guest else str(GUEST_IMAGES / f"{args.guest}.bin")
    seconds, guests = run_guests(image, args.vms, _size(args.memory), args.cmdline)
    print(f"{args.vms} guests in {seconds:.3f} s of emu_start; exit status "
          f"{sorted({g.exit_status for g in guests}, key=str)}")
    return 0 if all(g.exit_status == 0 for g in guests) else 1


if __name__ == "__main__":
    sys.exit(main())
