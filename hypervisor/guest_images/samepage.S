# samepage - N identical pages that stay identical: a same-page-merging target.
#
# Command-line parameters:
#   pages=N      pages to fill at heap_start                  (default 64)
#   pattern=B    fill byte (only the low 8 bits are used)     (default 0x5a)
#   passes=K     read passes                                  (default 40)
#   spin=S       delay-loop iterations before each pass       (default 100000)
#
# The defaults give ksmd (default knobs) time for several full scans even with
# one VM, so that `hvsim compare samepage --vms 4` shows what each era does.
#
# Fills all 4096 bytes of N pages at heap_start with byte B (rep stosq).  Then
# K passes; each first spins S iterations of a register-only delay loop (no
# memory access, so a merger gets time to scan), then reads qword 0 of every
# page and sums them mod 2^64.
#
# Console output (H16 = exactly 16 lowercase hex digits):
#   samepage: pass 1 checksum H16\n           (one line per pass, 1..K)
#   ...
# then exit status 0 via port 0xF4.  Each pass's checksum is
# N * (B * 0x0101010101010101) mod 2^64.
# If heap_start + N*4096 > mem_size it prints instead
#   samepage: not enough memory\n
# and exits with status 2.

    .include "lib.S"

main:
    sub $24, %rsp                  # the values of params, in table order
    lea params(%rip), %rdi
    mov %rsp, %rsi
    call cmdline_params
    pop %r12                       # r12 = N
    pop %r13                       # r13 = K
    pop %r14                       # r14 = S
    mov %r12, %rdi
    lea name(%rip), %rsi
    call heap_fill_pattern
    mov %rax, %rbx                 # rbx = heap_start

    mov $1, %ebp                   # rbp = pass number
.Lpass:
    cmp %r13, %rbp
    ja .Lfinish
    mov %r14, %rdi
    call spin
    mov %rbx, %rdi                 # sum qword 0 of every page
    mov %r12, %rsi
    mov $1, %edx
    xor %ecx, %ecx
    call sum_pages
    lea name(%rip), %rdi
    mov %rbp, %rsi
    mov %rax, %rdx
    call put_pass_checksum
    inc %rbp
    jmp .Lpass

.Lfinish:
    xor %edi, %edi
    call exit

params:
    param pages, 64
    param passes, 40
    param spin, 100000
    .byte 0
name:   .asciz "samepage"
