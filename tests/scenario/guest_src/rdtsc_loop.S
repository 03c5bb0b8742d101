    .code64
    # exit status: the difference of two back-to-back RDTSC readings;
    # console: the low 32 bits of the sum of 64 readings taken in a loop, in hex
    rdtsc
    mov %eax, %r8d
    rdtsc
    sub %r8d, %eax
    mov %eax, %r9d
    xor %r10d, %r10d
    mov $64, %ecx
1:  rdtsc
    add %eax, %r10d
    dec %ecx
    jnz 1b
    mov $0x3f8, %dx
    mov $8, %ecx
2:  rol $4, %r10d
    mov %r10d, %eax
    and $15, %eax
    add $'0', %al
    cmp $'9', %al
    jbe 3f
    add $('a' - '9' - 1), %al
3:  out %al, %dx
    dec %ecx
    jnz 2b
    mov %r9d, %eax
    out %al, $0xf4
