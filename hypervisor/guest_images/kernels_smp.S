# kernels_smp - kernels on every vCPU of the VM, each vCPU filling and updating its share of the pages.
#
# Command-line parameters:
#   kernel=M     identical "kernel" pages at heap_start       (default 256)
#   private=P    per-VM private pages right after them        (default 16)
#   passes=K     passes                                       (default 20)
#   spin=S       delay-loop iterations before each pass       (default 400000)
#
# vCPU i of n (RDI = i at entry, n = boot_params.nr_vcpus, see lib.S) owns
# kernel pages i, i+n, ... and private pages i, i+n, ...  Each page is filled
# with its own xorshift64 stream (x ^= x << 13; x ^= x >> 7; x ^= x << 17),
# seeded 0x2545F4914F6CDD1D XOR (p+1) * 0x9E3779B97F4A7C15 for kernel page p
# (identical in every VM) and (vm_index+1) * 0x9E3779B97F4A7C15 + q for
# private page q (different per VM), so the memory is the same whatever n.
# Then K passes: spin S; sum qword 0 of its kernel pages; increment qword 0 of
# its private pages and sum them; add both sums with `lock add` to the pass's
# totals in a shared page after the 8 untouched pages.  The last vCPU to
# finish prints
#   kernels: pass k kernel H16 private H16\n  (one line per pass, 1..K)
# and exits with status 0; the others halt.  The lines are the same for
# every number of vCPUs.
# If heap_start + (M + P + 8 + (16K+16)/4096)*4096 > mem_size it prints
#   kernels: not enough memory\n
# and exits with status 2.

    .include "lib.S"

    .set UNTOUCHED_PAGES, 8
    .set KERNEL_SEED, 0x2545F4914F6CDD1D

main:
    push %rdi                      # this vCPU's index: 16(%rsp) below
    sub $32, %rsp
    lea params(%rip), %rdi
    mov %rsp, %rsi
    call cmdline_params
    pop %r12                       # r12 = M
    pop %r13                       # r13 = P; now 0(%rsp) = K, 8(%rsp) = S, 16(%rsp) = index
    mov 8(%rsp), %r14              # r14 = S; 8(%rsp) is the pass number from here

    mov 0(%rsp), %rdi              # pages: the shared ones (K+1 pairs of qwords), saturating adds
    inc %rdi
    shl $4, %rdi
    add $4095, %rdi
    shr $12, %rdi
    add %r12, %rdi
    sbb %rax, %rax
    or %rax, %rdi
    add %r13, %rdi
    sbb %rax, %rax
    or %rax, %rdi
    add $UNTOUCHED_PAGES, %rdi
    sbb %rax, %rax
    or %rax, %rdi
    lea name(%rip), %rsi
    call heap_check
    mov %rax, %rbx                 # rbx = heap_start (the kernel pages)
    mov BP_OFF_NR_VCPUS(%r15), %rbp   # rbp = n

    mov 16(%rsp), %rcx             # "load the kernel": this vCPU's kernel pages
.Lkfill:
    cmp %r12, %rcx
    jae .Lkfilled
    push %rcx
    lea 1(%rcx), %rdx
    mov $GOLDEN64, %rax
    imul %rax, %rdx
    mov $KERNEL_SEED, %rax
    xor %rax, %rdx
    mov %rcx, %rdi
    shl $12, %rdi
    add %rbx, %rdi
    mov $1, %esi
    call xorshift_fill
    pop %rcx
    add %rbp, %rcx
    jmp .Lkfill
.Lkfilled:
    mov 16(%rsp), %rcx             # this vCPU's private pages
.Lpfill:
    cmp %r13, %rcx
    jae .Lpfilled
    push %rcx
    mov BP_OFF_VM_INDEX(%r15), %rdx
    inc %rdx
    mov $GOLDEN64, %rax
    imul %rax, %rdx
    add %rcx, %rdx
    lea (%r12,%rcx), %rdi
    shl $12, %rdi
    add %rbx, %rdi
    mov $1, %esi
    call xorshift_fill
    pop %rcx
    add %rbp, %rcx
    jmp .Lpfill
.Lpfilled:

    movq $1, 8(%rsp)
.Lpass:
    mov 8(%rsp), %rax
    cmp 0(%rsp), %rax
    ja .Ldone
    mov %r14, %rdi
    call spin
    xor %eax, %eax                 # rax = kernel sum
    mov 16(%rsp), %rcx
.Lksum:
    cmp %r12, %rcx
    jae .Lksummed
    mov %rcx, %rdx
    shl $12, %rdx
    add (%rbx,%rdx), %rax
    add %rbp, %rcx
    jmp .Lksum
.Lksummed:
    xor %esi, %esi                 # rsi = private sum
    mov 16(%rsp), %rcx
.Lpsum:
    cmp %r13, %rcx
    jae .Lpsummed
    lea (%r12,%rcx), %rdx
    shl $12, %rdx
    mov (%rbx,%rdx), %rdi
    inc %rdi
    mov %rdi, (%rbx,%rdx)
    add %rdi, %rsi
    add %rbp, %rcx
    jmp .Lpsum
.Lpsummed:
    lea UNTOUCHED_PAGES(%r12,%r13), %rdx
    shl $12, %rdx
    add %rbx, %rdx                 # rdx = the shared page
    mov 8(%rsp), %rcx
    shl $4, %rcx
    lock add %rax, (%rdx,%rcx)
    lock add %rsi, 8(%rdx,%rcx)
    incq 8(%rsp)
    jmp .Lpass

.Ldone:
    lea UNTOUCHED_PAGES(%r12,%r13), %rdx
    shl $12, %rdx
    add %rdx, %rbx                 # rbx = the shared page
    mov $1, %eax
    lock xadd %rax, (%rbx)
    inc %rax
    cmp %rbp, %rax
    jne .Lidle
    mov $1, %r12d                  # the last vCPU prints every pass's totals
.Lprint:
    cmp 0(%rsp), %r12
    ja .Lexit
    lea name(%rip), %rdi
    mov %r12, %rsi
    call put_pass
    lea msg_kernel(%rip), %rdi
    call puts
    mov %r12, %rax
    shl $4, %rax
    mov (%rbx,%rax), %rdi
    call put_hex64
    lea msg_private(%rip), %rdi
    call puts
    mov %r12, %rax
    shl $4, %rax
    mov 8(%rbx,%rax), %rdi
    call put_hex64
    mov $'\n', %edi
    call putc
    inc %r12
    jmp .Lprint
.Lexit:
    xor %edi, %edi
    call exit
.Lidle:
    hlt                            # interrupts are off: this vCPU is done
    jmp .Lidle

    .include "lib_xorshift.S"

params:
    param kernel, 256
    param private, 16
    param passes, 20
    param spin, 400000
    .byte 0
name:          .asciz "kernels"
msg_kernel:    .asciz " kernel "
msg_private:   .asciz " private "
