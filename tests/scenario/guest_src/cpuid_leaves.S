    .code64
    # print the vendor of leaf 0 (EBX EDX ECX) and the KVM signature (EBX ECX EDX)
    xor %eax, %eax
    cpuid
    mov %ebx, %r8d; mov %edx, %r9d; mov %ecx, %r10d
    call p12
    mov $0x40000000, %eax
    cpuid
    mov %ebx, %r8d; mov %ecx, %r9d; mov %edx, %r10d
    call p12
    # exit status: RDRAND bit of leaf 1 ECX (0) + 2 * TSC bit of leaf 1 EDX (1)
    mov $1, %eax
    cpuid
    shr $30, %ecx
    and $1, %ecx
    shr $4, %edx
    and $1, %edx
    lea (%ecx,%edx,2), %eax
    out %al, $0xf4
p12: mov $0x3f8, %dx
    mov %r8d, %esi; call p4
    mov %r9d, %esi; call p4
    mov %r10d, %esi
p4: mov $4, %edi
1:  mov %esi, %eax
    test %al, %al
    jz 2f
    out %al, %dx
2:  shr $8, %esi
    dec %edi
    jnz 1b
    ret
