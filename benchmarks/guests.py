"""The benchmark guests: two tiny flat x86-64 images, kept here as bytes with their source.

They follow the boot protocol of hypervisor/vmm/layout.py (flat image loaded and
entered at 0x100000, long mode, first 1 GiB identity mapped) and use no boot
parameters: the two qwords right after the first instruction (`npages` at image
offset 8, `passes` at offset 16) are patched in before the image is written out,
so the same bytes run unchanged under hvsim and under bare Unicorn.

The bytes are what GNU as/ld/objcopy make of SOURCES (the flags of
scripts/build_guests.py); `assemble()` rebuilds them where binutils exist, and the
smoke test checks that they still match.  Keeping the bytes here means the suite
needs no assembler at run time.
"""

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Final

IMAGE_BASE: Final = 0x100000
HEAP: Final = 0x200000  # layout.HEAP_START_GPA: where guests put their data
STACK_TOP: Final = 0x80000  # layout.STACK_TOP_GPA
NPAGES_OFFSET: Final = 8
PASSES_OFFSET: Final = 16

TOUCH_SOURCE: Final = """\
# touch: write one byte to each of `npages` pages from HEAP (the first-touch fault
# storm), then `passes` read passes over the same pages, each after a CR3 reload
# that empties the TLB (every page is one TLB fill on a mapped page); then exit 0.
    .code64
    .text
    .globl _start
_start:
    jmp main
    .balign 8
npages: .quad 0
passes: .quad 0
main:
    mov npages(%rip), %rcx
    mov passes(%rip), %r8
    mov $0x200000, %edi
    mov %rcx, %rdx
    test %rdx, %rdx
    jz 2f
1:  movb $1, (%rdi)
    add $4096, %rdi
    dec %rdx
    jnz 1b
2:  test %r8, %r8
    jz 9f
    mov %cr3, %rax
    mov %rax, %cr3
    mov $0x200000, %edi
    mov %rcx, %rdx
    test %rdx, %rdx
    jz 4f
3:  movzbl (%rdi), %eax
    add $4096, %rdi
    dec %rdx
    jnz 3b
4:  dec %r8
    jmp 2b
9:  xor %eax, %eax
    mov $0xf4, %edx
    out %al, (%dx)
    hlt
"""

COMPUTE_SOURCE: Final = """\
# compute: forever, sweep `npages` pages from HEAP one 64-byte line at a time:
# load, multiply, add, rotate, xor, store (9 instructions, 2 memory accesses per
# line).  The first sweep maps the pages; afterwards the working set stays mapped.
    .code64
    .text
    .globl _start
_start:
    jmp main
    .balign 8
npages: .quad 0
passes: .quad 0
main:
    mov npages(%rip), %r12
    mov $0x200000, %ebx
    mov $0x9E3779B97F4A7C15, %r9
    xor %edx, %edx
    xor %esi, %esi
0:  mov %rbx, %rdi
    mov %r12, %rcx
    shl $6, %rcx
1:  mov (%rdi), %rax
    imul %r9, %rax
    add %rax, %rdx
    rol $13, %rdx
    xor %rdx, %rsi
    mov %rsi, 8(%rdi)
    add $64, %rdi
    dec %rcx
    jnz 1b
    jmp 0b
"""

TOUCH_BYTES: Final = bytes.fromhex(
    "eb16660f1f44000000000000000000000000000000000000488b0de9ffffff4c8b05eaffffffbf000020004889ca"
    "4885d2740fc607014881c70010000048ffca75f14d85c074270f20d80f22d8bf000020004889ca4885d2740f0fb6"
    "074881c70010000048ffca75f149ffc8ebd431c0baf4000000eef4"
)
COMPUTE_BYTES: Final = bytes.fromhex(
    "eb16660f1f440000000000000000000000000000000000004c8b25e9ffffffbb0000200049b9157c4a7fb979379e"
    "31d231f64889df4c89e148c1e106488b07490fafc14801c248c1c20d4831d6488977084883c74048ffc975e2ebd6"
)

SOURCES: Final = {"touch": TOUCH_SOURCE, "compute": COMPUTE_SOURCE}
IMAGES: Final = {"touch": TOUCH_BYTES, "compute": COMPUTE_BYTES}

# touch: instructions up to the end of the write pass (jmp + 6 setup + 4 per page),
# where RIP is at label 2; each read pass is 10 + 4 per page instructions.
TOUCH_LABEL_2: Final = IMAGE_BASE + 0x42


def touch_write_phase_insns(npages: int) -> int:
    return 7 + 4 * npages


def touch_read_pass_insns(npages: int) -> int:
    return 10 + 4 * npages


def image_bytes(name: str, npages: int, passes: int = 0) -> bytes:
    """The image with its two parameters patched in."""
    data = bytearray(IMAGES[name])
    struct.pack_into("<QQ", data, NPAGES_OFFSET, npages, passes)
    return bytes(data)


def write_image(directory: Path, name: str, npages: int, passes: int = 0) -> Path:
    path = directory / f"{name}-{npages}-{passes}.bin"
    path.write_bytes(image_bytes(name, npages, passes))
    return path


def binutils_available() -> bool:
    return all(shutil.which(tool) for tool in ("as", "ld", "objcopy"))


def assemble(source: str) -> bytes:
    """Assemble and link at IMAGE_BASE, as scripts/build_guests.py does (needs GNU binutils)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "g.S").write_text(source)
        for cmd in (
            ["as", "--64", "-o", "g.o", "g.S"],
            ["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "--build-id=none", f"-Ttext={IMAGE_BASE:#x}",
             "-e", "_start", "-z", "noexecstack", "-n", "-o", "g.elf", "g.o"],
            ["objcopy", "-O", "binary", "g.elf", "g.bin"],
        ):
            subprocess.run(cmd, cwd=work, check=True, capture_output=True)
        return (work / "g.bin").read_bytes()
