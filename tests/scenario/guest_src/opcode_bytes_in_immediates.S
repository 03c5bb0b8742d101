    .code64
    # the opcode bytes of rdrand rax and rdtsc inside immediates: nothing to answer
    mov $0xf0c70f48, %eax
    mov $0x310f310f, %ebx
    movabs $0x0f31f9010fc7f80f, %rcx
    mov $5, %al
    out %al, $0xf4
