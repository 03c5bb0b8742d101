# samepage_smp - samepage on every vCPU of the VM, each vCPU filling and reading its share of the pages.
#
# Command-line parameters:
#   pages=N      pages to fill at heap_start                  (default 64)
#   pattern=B    fill byte (only the low 8 bits are used)     (default 0x5a)
#   passes=K     read passes                                  (default 40)
#   spin=S       delay-loop iterations before each pass       (default 100000)
#
# vCPU i of n (RDI = i at entry, n = boot_params.nr_vcpus, see lib.S) owns
# pages i, i+n, i+2n, ...: it fills them with byte B (rep stosq), then does K
# passes, each spinning S iterations and reading qword 0 of its pages; it adds
# its pass sum to a shared per-pass total with `lock add`.  A shared page after
# the N pages holds the finished-vCPU count (qword 0) and the totals (qword k
# for pass k).  The last vCPU to finish prints, exactly as samepage does,
#   samepage: pass 1 checksum H16\n           (one line per pass, 1..K)
# and exits with status 0; the others halt.  Each checksum is
# N * (B * 0x0101010101010101) mod 2^64, whatever the number of vCPUs.
# If heap_start + (N + 1 + (8K+8)/4096)*4096 > mem_size it prints instead
#   samepage: not enough memory\n
# and exits with status 2.

    .include "lib.S"

main:
    push %rdi                      # this vCPU's index; 0(%rsp) from here on
    sub $24, %rsp
    lea params(%rip), %rdi
    mov %rsp, %rsi
    call cmdline_params
    pop %r12                       # r12 = N
    pop %r13                       # r13 = K
    pop %r14                       # r14 = S
    lea 1(%r13), %rdi              # pages: N, then the shared page(s) with K + 1 qwords
    shl $3, %rdi
    add $4095, %rdi
    shr $12, %rdi
    add %r12, %rdi
    lea name(%rip), %rsi
    call heap_check
    mov %rax, %rbx                 # rbx = heap_start
    mov BP_OFF_NR_VCPUS(%r15), %rbp   # rbp = n
    lea pattern_key(%rip), %rdi
    mov $0x5a, %esi
    call cmdline_get
    movzbl %al, %eax
    mov $0x0101010101010101, %rdx
    imul %rdx, %rax                # rax = the fill qword
    mov 0(%rsp), %rdx              # rdx = page index, from this vCPU's own
.Lfill:
    cmp %r12, %rdx
    jae .Lfilled
    mov %rdx, %rdi
    shl $12, %rdi
    add %rbx, %rdi
    mov $512, %ecx
    rep stosq
    add %rbp, %rdx
    jmp .Lfill
.Lfilled:
    pushq $1                       # 0(%rsp) = pass, 8(%rsp) = vCPU index
.Lpass:
    cmp %r13, 0(%rsp)
    ja .Ldone
    mov %r14, %rdi
    call spin
    xor %eax, %eax                 # rax = this vCPU's sum for the pass
    mov 8(%rsp), %rcx
.Lsum:
    cmp %r12, %rcx
    jae .Lsummed
    mov %rcx, %rdx
    shl $12, %rdx
    add (%rbx,%rdx), %rax
    add %rbp, %rcx
    jmp .Lsum
.Lsummed:
    mov %r12, %rdx
    shl $12, %rdx
    add %rbx, %rdx                 # rdx = the shared page
    mov 0(%rsp), %rcx
    lock add %rax, (%rdx,%rcx,8)
    incq 0(%rsp)
    jmp .Lpass
.Ldone:
    mov %r12, %rdx
    shl $12, %rdx
    add %rdx, %rbx                 # rbx = the shared page
    mov $1, %eax
    lock xadd %rax, (%rbx)
    inc %rax
    cmp %rbp, %rax
    jne .Lidle
    mov $1, %r12d                  # the last vCPU prints every pass's total
.Lprint:
    cmp %r13, %r12
    ja .Lexit
    lea name(%rip), %rdi
    mov %r12, %rsi
    mov (%rbx,%r12,8), %rdx
    call put_pass_checksum
    inc %r12
    jmp .Lprint
.Lexit:
    xor %edi, %edi
    call exit
.Lidle:
    hlt                            # interrupts are off: this vCPU is done
    jmp .Lidle

params:
    param pages, 64
    param passes, 40
    param spin, 100000
    .byte 0
pattern_key: .asciz "pattern"
name:   .asciz "samepage"
