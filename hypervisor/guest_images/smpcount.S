# smpcount - every vCPU increments one shared counter with `lock inc`; the last to finish prints the total.
#
# Command-line parameters:
#   count=K      increments per vCPU                           (default 20000)
#
# Each vCPU (entered with its index in RDI, see lib.S) does K times
# `lock incq` on qword 0 of heap_start, then `lock xadd` 1 to qword 1 (the
# finished vCPUs).  The vCPU that makes it boot_params.nr_vcpus prints
#   smpcount: vcpus N total T\n
# (T = N * K when every increment is atomic) and exits with status 0; the
# others halt.  The output is the same at every --quantum.

    .include "lib.S"

main:
    push %rdi                      # this vCPU's index (its stack page differs from its siblings')
    sub $8, %rsp
    lea params(%rip), %rdi
    mov %rsp, %rsi
    call cmdline_params
    pop %r12                       # r12 = K
    mov $1, %edi
    lea name(%rip), %rsi
    call heap_check
    mov %rax, %rbx                 # rbx = shared page: counter, finished vCPUs
    mov %r12, %rcx
    test %rcx, %rcx
    jz .Ldone
.Linc:
    lock incq (%rbx)
    dec %rcx
    jnz .Linc
.Ldone:
    mov $1, %eax
    lock xadd %rax, 8(%rbx)
    inc %rax
    cmp BP_OFF_NR_VCPUS(%r15), %rax
    jne .Lidle
    lea name(%rip), %rdi
    call puts
    lea msg_vcpus(%rip), %rdi
    call puts
    mov BP_OFF_NR_VCPUS(%r15), %rdi
    call put_dec
    lea msg_total(%rip), %rdi
    call puts
    mov (%rbx), %rdi
    call put_dec
    mov $'\n', %edi
    call putc
    xor %edi, %edi
    call exit
.Lidle:
    hlt                            # interrupts are off: this vCPU is done
    jmp .Lidle

params:
    param count, 20000
    .byte 0
name:       .asciz "smpcount"
msg_vcpus:  .asciz ": vcpus "
msg_total:  .asciz " total "
