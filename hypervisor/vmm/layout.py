"""Guest-physical boot layout shared by the loader and the bundled guests (constants only).

The layout follows DESIGN.md's direct 64-bit boot, in the style of Firecracker: the
loader writes a GDT, identity-mapping page tables and a boot-parameters page below
1 MiB, loads the image at 1 MiB and enters it in long mode with RSI pointing at the
boot parameters.
"""

from typing import Final

GDT_GPA: Final = 0x1000
BOOT_PARAMS_GPA: Final = 0x2000
PML4_GPA: Final = 0x3000
PDPT_GPA: Final = 0x4000
PD_GPA: Final = 0x5000
STACK_BOTTOM_GPA: Final = 0x6000
STACK_TOP_GPA: Final = 0x80000
# vCPU i boots with RSP = STACK_TOP_GPA - i * VCPU_STACK_SIZE: its own stack in the boot area.
VCPU_STACK_SIZE: Final = 0x4000
MAX_VCPUS: Final = (STACK_TOP_GPA - STACK_BOTTOM_GPA) // VCPU_STACK_SIZE
IMAGE_LOAD_GPA: Final = 0x100000
# Guests place their working data from here; the loader refuses images that reach it.
HEAP_START_GPA: Final = 0x200000
MAX_FLAT_IMAGE_SIZE: Final = HEAP_START_GPA - IMAGE_LOAD_GPA
# The boot page tables identity-map this much guest-physical space with 2 MiB pages.
IDENTITY_MAP_SIZE: Final = 1 << 30

# struct boot_params: little-endian u64 fields at these offsets, then the command line.
BP_MAGIC: Final = 0x3150424D49535648  # "HVSIMBP1"
BP_OFF_MAGIC: Final = 0
BP_OFF_MEM_SIZE: Final = 8
BP_OFF_VM_INDEX: Final = 16
BP_OFF_NR_VMS: Final = 24
BP_OFF_CMDLINE_LEN: Final = 32
BP_OFF_HEAP_START: Final = 40
BP_OFF_NR_VCPUS: Final = 48
BP_OFF_CMDLINE: Final = 64
CMDLINE_MAX: Final = 4096 - BP_OFF_CMDLINE - 1

GDT_CODE64_SELECTOR: Final = 0x08
GDT_DATA_SELECTOR: Final = 0x10

COM1_PORT: Final = 0x3F8
EXIT_PORT: Final = 0xF4  # isa-debug-exit, as QEMU: the byte written is the exit status

# The guest's time stamp counter runs at this rate in simulated time (1 GHz: one tick is a
# simulated nanosecond): RDTSC returns the vCPU's simulated time since it was created,
# converted at the run's --insns-per-ms.  See cpu/sensitive_insns.py.
TSC_KHZ: Final = 1_000_000
