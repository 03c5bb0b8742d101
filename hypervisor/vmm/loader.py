"""Loads a flat or ELF64 guest image and writes the boot state into guest RAM (the VMM's job).

Direct 64-bit boot in the style of Firecracker: a GDT, page tables that
identity-map the first 1 GiB with 2 MiB pages, and a boot-parameters page below
1 MiB; a flat image at 1 MiB, an ELF64 image at its program headers.  All writes
go through the VMM's own mapping of guest RAM (host write faults, no exits).
"""

import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, ImageError
from ..types import PAGE_SIZE, Gpa
from ..x86 import PTE_P, PTE_PS, PTE_RW
from . import layout

if TYPE_CHECKING:  # the loader only writes through it; benchmarks/hookfree.py loads without KVM's model
    from ..kvm.vm import Vm

# The bundled guests ship inside the package (package data); ./guest_images in a checkout links here.
GUEST_IMAGES = Path(__file__).resolve().parent.parent / "guest_images"

# Larger images than this are refused before anything is read into memory.
MAX_IMAGE_FILE_SIZE = 256 << 20

_ELF_MAGIC = b"\x7fELF"
_PT_LOAD = 1
_EM_X86_64 = 62
_ET_EXEC = 2
_ELF64_PHDR_SIZE = 56

_GDT = (
    0x0000000000000000,  # null
    0x00AF9B000000FFFF,  # 0x08: 64-bit code, DPL 0
    0x00CF93000000FFFF,  # 0x10: data, DPL 0
)


@dataclass(frozen=True)
class Segment:
    gpa: int
    data: bytes
    memsz: int


@dataclass(frozen=True)
class GuestImage:
    path: str
    kind: str  # "flat" or "elf"
    segments: tuple[Segment, ...]
    entry: int

    @property
    def end(self) -> int:
        return max(s.gpa + s.memsz for s in self.segments)


def read_image(path: str | Path) -> GuestImage:
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise ImageError(f"cannot read guest image {str(path)!r}: {exc.strerror}. "
                         "Give the path of a flat binary or ELF64 file (see `hvsim images`).") from None
    if p.is_dir():
        raise ImageError(f"guest image {str(path)!r} is a directory: give the path of a flat binary or ELF64 "
                         "file, or a bundled guest's name (see `hvsim images`).")
    if not p.is_file():
        raise ImageError(f"guest image {str(path)!r} is not a regular file.")
    if size == 0:
        raise ImageError(f"guest image {str(path)!r} is empty: there is no code to run.")
    if size > MAX_IMAGE_FILE_SIZE:
        raise ImageError(f"guest image {str(path)!r} is {size} bytes; hvsim loads images of at most "
                         f"{MAX_IMAGE_FILE_SIZE >> 20} MiB.")
    data = p.read_bytes()
    if data[:4] == _ELF_MAGIC:
        return _parse_elf(str(path), data)
    if len(data) > layout.MAX_FLAT_IMAGE_SIZE:
        raise ImageError(
            f"flat image {str(path)!r} is {len(data)} bytes, but a flat image is loaded at "
            f"{layout.IMAGE_LOAD_GPA:#x} and must end below {layout.HEAP_START_GPA:#x} "
            f"({layout.MAX_FLAT_IMAGE_SIZE} bytes at most); link a larger guest as ELF64."
        )
    return GuestImage(str(path), "flat", (Segment(layout.IMAGE_LOAD_GPA, data, len(data)),),
                      layout.IMAGE_LOAD_GPA)


def _parse_elf(path: str, data: bytes) -> GuestImage:
    def bad(why: str) -> ImageError:
        return ImageError(f"ELF image {path!r} cannot be loaded: {why}.")

    if len(data) < 64:
        raise bad("the file is shorter than an ELF64 header")
    if data[4] != 2 or data[5] != 1:
        raise bad("it is not a little-endian ELF64 file (hvsim runs x86-64 guests)")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    if e_machine != _EM_X86_64:
        raise bad(f"its machine is {e_machine}, not x86-64 ({_EM_X86_64})")
    if e_type != _ET_EXEC:
        raise bad("it is not an executable (ET_EXEC); link it statically at a fixed address")
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    if e_phnum == 0:
        raise bad("it has no program headers")
    # Linux's exec refuses the same: load_elf_phdrs() in fs/binfmt_elf.c (read in a linux-next tree,
    # ColinIanKing/linux-next 34480971) fails unless e_phentsize == sizeof(struct elf_phdr).
    if e_phentsize != _ELF64_PHDR_SIZE:
        raise bad(f"its e_phentsize is {e_phentsize}, but an ELF64 program header is {_ELF64_PHDR_SIZE} bytes")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise bad(f"its program headers ({e_phnum} at offset {e_phoff:#x}) lie outside the file "
                  f"({len(data)} bytes)")
    segments = []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", data, off)
        if p_type != _PT_LOAD:
            continue
        if p_filesz > p_memsz:
            raise bad(f"segment {i} has p_filesz {p_filesz:#x} larger than p_memsz {p_memsz:#x}")
        if p_offset + p_filesz > len(data):
            raise bad(f"segment {i}'s bytes (offset {p_offset:#x}, size {p_filesz:#x}) lie outside the file")
        if p_paddr < layout.IMAGE_LOAD_GPA:
            raise bad(f"segment {i} at {p_paddr:#x} overlaps the boot area below {layout.IMAGE_LOAD_GPA:#x}")
        segments.append(Segment(p_paddr, data[p_offset : p_offset + p_filesz], p_memsz))
    if not segments:
        raise bad("it has no PT_LOAD segment")
    if not any(s.gpa <= e_entry < s.gpa + s.memsz for s in segments):
        raise bad(f"its entry point {e_entry:#x} is not inside any loaded segment")
    return GuestImage(path, "elf", tuple(segments), e_entry)


@dataclass(frozen=True)
class BootParams:
    rip: int
    rsp: int
    rsi: int
    cr3: int
    gdt_base: int
    gdt_limit: int
    rdi: int = 0  # the vCPU's index (vCPU 0 is the boot vCPU)

    def for_vcpu(self, index: int) -> "BootParams":
        """vCPU `index`'s entry state: the same long-mode state, its own stack, its index in RDI."""
        return replace(self, rsp=layout.STACK_TOP_GPA - index * layout.VCPU_STACK_SIZE, rdi=index)


def check_fits(image: GuestImage, memory_size: int) -> None:
    if image.end > memory_size:
        raise ImageError(
            f"guest image {image.path!r} needs guest memory up to {image.end:#x} but the VM has only "
            f"{memory_size:#x} bytes; give a larger --memory."
        )
    if image.end > layout.IDENTITY_MAP_SIZE:
        raise ImageError(f"guest image {image.path!r} extends past the 1 GiB the boot page tables map.")


def cmdline_bytes(cmdline: str) -> bytes:
    """The guest's command line as the boot page holds it: UTF-8, at most CMDLINE_MAX bytes."""
    try:
        encoded = cmdline.encode()
    except UnicodeEncodeError as exc:
        # Undecodable argv bytes reach Python as lone surrogates U+DC80..U+DCFF (PEP 383).
        ch = ord(cmdline[exc.start])
        what = f"byte {ch - 0xDC00:#04x}" if 0xDC80 <= ch <= 0xDCFF else f"character {ch:#x}"
        raise ConfigError(f"--cmdline is not valid UTF-8 ({what} at offset {exc.start}); "
                          "guests read their command line as UTF-8 text.") from None
    if len(encoded) > layout.CMDLINE_MAX:
        raise ConfigError(f"--cmdline is {len(encoded)} bytes; at most {layout.CMDLINE_MAX} fit the boot page.")
    return encoded


def load(vm: "Vm", image: GuestImage, cmdline: str, nr_vms: int, nr_vcpus: int = 1) -> BootParams:
    """Write the boot state; the result is vCPU 0's entry state (`for_vcpu(i)` gives vCPU i's)."""
    check_fits(image, vm.memory_size)
    encoded = cmdline_bytes(cmdline)
    vm.write_guest(Gpa(layout.GDT_GPA), b"".join(struct.pack("<Q", d) for d in _GDT))
    params = bytearray(PAGE_SIZE)
    struct.pack_into("<QQQQQQ", params, 0, layout.BP_MAGIC, vm.memory_size, vm.vm_id, nr_vms, len(encoded),
                     layout.HEAP_START_GPA)
    struct.pack_into("<Q", params, layout.BP_OFF_NR_VCPUS, nr_vcpus)
    params[layout.BP_OFF_CMDLINE : layout.BP_OFF_CMDLINE + len(encoded)] = encoded
    vm.write_guest(Gpa(layout.BOOT_PARAMS_GPA), bytes(params[: layout.BP_OFF_CMDLINE + len(encoded) + 1]))
    vm.write_guest(Gpa(layout.PML4_GPA), struct.pack("<Q", layout.PDPT_GPA | PTE_P | PTE_RW))
    vm.write_guest(Gpa(layout.PDPT_GPA), struct.pack("<Q", layout.PD_GPA | PTE_P | PTE_RW))
    vm.write_guest(Gpa(layout.PD_GPA),
                   b"".join(struct.pack("<Q", (i << 21) | PTE_P | PTE_RW | PTE_PS) for i in range(512)))
    for seg in image.segments:
        if seg.data:
            vm.write_guest(Gpa(seg.gpa), seg.data)
    return BootParams(rip=image.entry, rsp=layout.STACK_TOP_GPA, rsi=layout.BOOT_PARAMS_GPA,
                      cr3=layout.PML4_GPA, gdt_base=layout.GDT_GPA, gdt_limit=len(_GDT) * 8 - 1)
