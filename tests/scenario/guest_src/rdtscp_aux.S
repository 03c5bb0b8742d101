    .code64
    mov $0xc0000103, %ecx
    mov $7, %eax
    xor %edx, %edx
    wrmsr
    rdtscp
    mov %ecx, %eax
    out %al, $0xf4
