"""VMX basic exit reasons, numbered and named as in arch/x86/include/uapi/asm/vmx.h."""

from enum import IntEnum


class ExitReason(IntEnum):
    EXCEPTION_NMI = 0
    EXTERNAL_INTERRUPT = 1
    TRIPLE_FAULT = 2
    CPUID = 10
    HLT = 12
    INVLPG = 14
    VMCALL = 18
    CR_ACCESS = 28
    IO_INSTRUCTION = 30
    MSR_READ = 31
    MSR_WRITE = 32
    EPT_VIOLATION = 48
    EPT_MISCONFIG = 49


# EXIT_QUALIFICATION bits of an EPT violation (Intel SDM 27-7).
EPT_VIOLATION_ACC_READ = 1 << 0
EPT_VIOLATION_ACC_WRITE = 1 << 1
EPT_VIOLATION_ACC_INSTR = 1 << 2
EPT_VIOLATION_READABLE = 1 << 3
EPT_VIOLATION_WRITABLE = 1 << 4
EPT_VIOLATION_EXECUTABLE = 1 << 5
