"""The CPUID table hvsim's VMM hands KVM (KVM_SET_CPUID2), and KVM's lookup in it.

Every value is fixed and documented here: a guest never sees the host's CPU, nor the
CPU model Unicorn emulates.  The table describes a 2009-class x86-64 part (family 6,
model 26, like the Nehalem CPUs 2.6.32 ran on) with only features hvsim's CPU really
executes, and with RDRAND/RDSEED absent (neither is in 2.6.32's supported cpuid 1.ecx
mask, arch/x86/kvm/x86.c do_cpuid_ent(); hvsim's CPU raises #UD for them).  RDTSCP is
offered and answered from simulated time (a simplification: 2.6.32's KVM masks it out,
"0 /* RDTSCP */" in the same function, and its VMX setup never enables it).

Lookup follows 2.6.32 kvm_find_cpuid_entry() and kvm_emulate_cpuid(): an exact match of
the function; otherwise the entry with the highest function of the same class (basic,
or extended with bit 31 set), as Intel CPUs answer an out-of-range leaf; no entry at
all gives zeros.  No leaf here has a significant index (subleaf).
"""

from typing import Final

KVM_CPUID_SIGNATURE: Final = 0x40000000
KVM_CPUID_FEATURES: Final = 0x40000001


def _regs(text: str) -> tuple[int, ...]:
    """A string as little-endian 32-bit registers, zero-padded to a multiple of 4 bytes."""
    raw = text.encode().ljust(-(-len(text) // 4) * 4, b"\0")
    return tuple(int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4))


def _four(regs: tuple[int, ...]) -> tuple[int, int, int, int]:
    a, b, c, d = regs
    return a, b, c, d


def _bits(*bits: int) -> int:
    return sum(1 << b for b in set(bits))


_VENDOR = _regs("GenuineIntel")  # EBX, EDX, ECX order below
_BRAND = _regs("hvsim virtual CPU".ljust(48, "\0"))

# cpuid 1.edx: FPU, PSE, TSC, MSR, PAE, CX8, PGE, CMOV, PAT, CLFLUSH, MMX, FXSR, SSE, SSE2
_LEAF1_EDX = _bits(0, 3, 4, 5, 6, 8, 13, 15, 16, 19, 23, 24, 25, 26)
# cpuid 1.ecx: SSE3, SSSE3, CX16, SSE4.1, SSE4.2, POPCNT, HYPERVISOR (no RDRAND: bit 30 clear)
_LEAF1_ECX = _bits(0, 9, 13, 19, 20, 23, 31)
# cpuid 0x80000001.edx: SYSCALL, NX, RDTSCP, LM; .ecx: LAHF_LM
_EXT1_EDX = _bits(11, 20, 27, 29)
_EXT1_ECX = _bits(0)

CPUID_TABLE: Final[dict[int, tuple[int, int, int, int]]] = {
    0x0: (0x1, _VENDOR[0], _VENDOR[2], _VENDOR[1]),
    # family 6 model 26 stepping 5; CLFLUSH line 8 qwords, 1 logical CPU, APIC id 0
    0x1: (0x000106A5, 0x00010800, _LEAF1_ECX, _LEAF1_EDX),
    KVM_CPUID_SIGNATURE: _four((KVM_CPUID_FEATURES, *_regs("KVMKVMKVM\0\0\0"))),
    KVM_CPUID_FEATURES: (0, 0, 0, 0),  # no paravirtual features (no kvmclock, no async PF)
    0x80000000: (0x80000008, 0, 0, 0),
    0x80000001: (0, 0, _EXT1_ECX, _EXT1_EDX),
    0x80000002: _four(_BRAND[0:4]),
    0x80000003: _four(_BRAND[4:8]),
    0x80000004: _four(_BRAND[8:12]),
    0x80000008: (0x00003028, 0, 0, 0),  # 40 physical, 48 virtual address bits
}


def kvm_find_cpuid_entry(function: int) -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX for CPUID leaf `function` (see the module docstring)."""
    entry = CPUID_TABLE.get(function)
    if entry is not None:
        return entry
    same_class = [f for f in CPUID_TABLE if (f ^ function) & 0x80000000 == 0]
    return CPUID_TABLE[max(same_class)] if same_class else (0, 0, 0, 0)


def vcpu_cpuid_entry(function: int, vcpu_index: int, nr_vcpus: int) -> tuple[int, int, int, int]:
    """The entry as the VMM sets it per vCPU (KVM_SET_CPUID2 is per vCPU): leaf 1 EBX[31:24] is the
    initial APIC ID = the vCPU's index and EBX[23:16] the logical processor count, with EDX.HTT
    (bit 28) when there are several, as Firecracker's CPUID normalization does
    (docs/cpu_templates/cpuid-normalization.md; from the researcher's notes, unverified here)."""
    eax, ebx, ecx, edx = kvm_find_cpuid_entry(function)
    if function == 0x1:
        ebx = (ebx & 0xFFFF) | (nr_vcpus & 0xFF) << 16 | (vcpu_index & 0xFF) << 24
        if nr_vcpus > 1:
            edx |= 1 << 28
    return eax, ebx, ecx, edx
