# kernels - the "identical guests" workload: a big read-mostly region that is
# identical in every VM (the "kernel"), a few private pages that keep changing,
# and a few pages never touched.
#
# Command-line parameters:
#   kernel=M     identical "kernel" pages at heap_start       (default 1024)
#   private=P    per-VM private pages right after them        (default 16)
#   passes=K     passes                                       (default 10)
#   spin=S       delay-loop iterations before each pass       (default 20000)
#
# Layout from heap_start: M kernel pages, then P private pages, then 8 pages
# that are never touched (included in the memory check).  Both regions are
# filled one qword at a time with a xorshift64 stream
#   x ^= x << 13; x ^= x >> 7; x ^= x << 17; store x
# continuous over the whole region: the kernel seeded with 0x2545F4914F6CDD1D
# (identical in every VM), the private pages seeded with
# (vm_index + 1) * 0x9E3779B97F4A7C15 mod 2^64 (different per VM).
# Then K passes: spin S iterations of a register-only delay loop; sum qword 0
# of every kernel page; increment qword 0 of every private page and sum those
# qwords after the increment (all sums mod 2^64).
#
# Console output (H16 = exactly 16 lowercase hex digits):
#   kernels: pass 1 kernel H16 private H16\n  (one line per pass, 1..K)
#   ...
# then exit status 0 via port 0xF4.
# If heap_start + (M + P + 8)*4096 > mem_size it prints instead
#   kernels: not enough memory\n
# and exits with status 2.

    .include "lib.S"

    .set UNTOUCHED_PAGES, 8
    .set KERNEL_SEED, 0x2545F4914F6CDD1D

main:
    sub $16, %rsp                  # 0(%rsp) = K, 8(%rsp) = private sum
    lea key_kernel(%rip), %rdi
    mov $1024, %esi
    call cmdline_get
    mov %rax, %r12                 # r12 = M
    lea key_private(%rip), %rdi
    mov $16, %esi
    call cmdline_get
    mov %rax, %r13                 # r13 = P
    lea key_passes(%rip), %rdi
    mov $10, %esi
    call cmdline_get
    mov %rax, 0(%rsp)              # K
    lea key_spin(%rip), %rdi
    mov $20000, %esi
    call cmdline_get
    mov %rax, %r14                 # r14 = S

    call heap_pages
    # need M + P + 8 <= available, without wrapping on huge M or P
    cmp %rax, %r12
    ja .Lnomem
    sub %r12, %rax
    cmp %rax, %r13
    ja .Lnomem
    sub %r13, %rax
    cmp $UNTOUCHED_PAGES, %rax
    jae .Lmem_ok
.Lnomem:
    lea msg_nomem(%rip), %rdi
    call puts
    mov $2, %edi
    call exit
.Lmem_ok:
    mov BP_OFF_HEAP_START(%r15), %rbx   # rbx = kernel pages
    mov %r12, %rbp
    shl $12, %rbp
    add %rbx, %rbp                      # rbp = private pages

    mov %rbx, %rdi                 # "load the kernel"
    mov %r12, %rsi
    mov $KERNEL_SEED, %rdx
    call xorshift_fill
    mov BP_OFF_VM_INDEX(%r15), %rdx
    inc %rdx
    mov $GOLDEN64, %rax
    imul %rax, %rdx                # (vm_index + 1) * GOLDEN64
    mov %rbp, %rdi
    mov %r13, %rsi
    call xorshift_fill

    # passes: the pass number and K live on the stack (no callee-saved
    # register left), rbx/rbp/r12/r13/r14 as set above
    mov $1, %eax
    push %rax                      # 0(%rsp) = pass, 8(%rsp) = K, 16(%rsp) = private sum
.Lpass:
    mov 0(%rsp), %rax
    cmp 8(%rsp), %rax
    ja .Lfinish
    mov %r14, %rdi
    call spin
    xor %eax, %eax                 # rax = kernel sum
    mov %rbx, %rdi
    mov %r12, %rcx
    test %rcx, %rcx
    jz .Lkernel_done
.Lkernel_page:
    add (%rdi), %rax
    add $PAGE_SIZE, %rdi
    dec %rcx
    jnz .Lkernel_page
.Lkernel_done:
    xor %edx, %edx                 # rdx = private sum
    mov %rbp, %rdi
    mov %r13, %rcx
    test %rcx, %rcx
    jz .Lprivate_done
.Lprivate_page:
    mov (%rdi), %rsi
    inc %rsi
    mov %rsi, (%rdi)
    add %rsi, %rdx
    add $PAGE_SIZE, %rdi
    dec %rcx
    jnz .Lprivate_page
.Lprivate_done:
    mov %rdx, 16(%rsp)
    push %rax                      # kernel sum; pass now at 8(%rsp)
    lea msg_pass(%rip), %rdi
    call puts
    mov 8(%rsp), %rdi
    call put_dec
    lea msg_kernel(%rip), %rdi
    call puts
    pop %rdi
    call put_hex64
    lea msg_private(%rip), %rdi
    call puts
    mov 16(%rsp), %rdi
    call put_hex64
    mov $'\n', %edi
    call putc
    incq 0(%rsp)
    jmp .Lpass

.Lfinish:
    xor %edi, %edi
    call exit

# xorshift_fill(RDI: first page, RSI: pages, RDX: seed): fill RSI pages with a
# xorshift64 stream, one qword per step.  Clobbers RAX, RCX, RDX, RSI, RDI.
xorshift_fill:
    shl $9, %rsi                   # qwords
    jz .Lxs_done
.Lxs_loop:
    mov %rdx, %rax
    shl $13, %rax
    xor %rax, %rdx
    mov %rdx, %rax
    shr $7, %rax
    xor %rax, %rdx
    mov %rdx, %rax
    shl $17, %rax
    xor %rax, %rdx
    mov %rdx, (%rdi)
    add $8, %rdi
    dec %rsi
    jnz .Lxs_loop
.Lxs_done:
    ret

key_kernel:    .asciz "kernel"
key_private:   .asciz "private"
key_passes:    .asciz "passes"
key_spin:      .asciz "spin"
msg_nomem:     .asciz "kernels: not enough memory\n"
msg_pass:      .asciz "kernels: pass "
msg_kernel:    .asciz " kernel "
msg_private:   .asciz " private "
