# kernels - the "identical guests" workload: a big read-mostly region that is
# identical in every VM (the "kernel"), a few private pages that keep changing,
# and a few pages never touched.
#
# Command-line parameters:
#   kernel=M     identical "kernel" pages at heap_start       (default 256)
#   private=P    per-VM private pages right after them        (default 16)
#   passes=K     passes                                       (default 20)
#   spin=S       delay-loop iterations before each pass       (default 400000)
#
# With the defaults ksmd (default knobs) completes two full scans in 2 to 4 VMs,
# so the kernel pages merge across VMs (one VM alone has nothing to merge).
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
    sub $32, %rsp                  # the values of params, in table order
    lea params(%rip), %rdi
    mov %rsp, %rsi
    call cmdline_params
    pop %r12                       # r12 = M
    pop %r13                       # r13 = P; now 0(%rsp) = K, 8(%rsp) = S
    mov 8(%rsp), %r14              # r14 = S; 8(%rsp) is the private sum from here

    # need M + P + 8 pages: add with saturation, so huge M or P cannot wrap
    mov %r12, %rdi
    add %r13, %rdi
    sbb %rax, %rax
    or %rax, %rdi
    add $UNTOUCHED_PAGES, %rdi
    sbb %rax, %rax
    or %rax, %rdi
    lea name(%rip), %rsi
    call heap_check
    mov %rax, %rbx                      # rbx = kernel pages
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
    mov %rbx, %rdi                 # rax = kernel sum: qword 0 of every kernel page
    mov %r12, %rsi
    mov $1, %edx
    xor %ecx, %ecx
    call sum_pages
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
    lea name(%rip), %rdi
    mov 8(%rsp), %rsi
    call put_pass
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
