# memtouch - write a known pattern over P pages, then read it back K times.
#
# Command-line parameters:
#   pages=P    pages to touch at heap_start          (default 256)
#   passes=K   read passes                           (default 3)
#
# Write pass: for page i in 0..P-1 and qword j in 0..511, store
#   v(i, j) = ((i + 1) * 0x9E3779B97F4A7C15 mod 2^64) XOR j
# at heap_start + i*4096 + j*8.  Then K read passes; each reads qwords
# j = 0, 8, 16, ..., 504 (every 8th qword, 64 per page) of every page in order
# and sums them mod 2^64.
#
# Console output (H16 = exactly 16 lowercase hex digits, decimals unpadded):
#   memtouch: pass 1 checksum H16\n           (one line per pass, 1..K)
#   ...
#   memtouch: done pages=P passes=K checksum H16\n
# where the final checksum is the sum mod 2^64 of all per-pass sums; then exit
# status 0 via port 0xF4.
# If heap_start + P*4096 > mem_size it prints instead
#   memtouch: not enough memory\n
# and exits with status 2.

    .include "lib.S"

main:
    sub $16, %rsp                  # the values of params, in table order
    lea params(%rip), %rdi
    mov %rsp, %rsi
    call cmdline_params
    pop %r12                       # r12 = P
    pop %r13                       # r13 = K
    mov %r12, %rdi
    lea name(%rip), %rsi
    call heap_check
    mov %rax, %rbx                 # rbx = heap_start

    # write pass
    mov %rbx, %rdi                 # rdi = current page
    mov %r12, %rcx                 # rcx = pages left
    mov $GOLDEN64, %r8
    mov %r8, %r9                   # r9 = (i + 1) * GOLDEN64
    test %rcx, %rcx
    jz .Lwrite_done
.Lwrite_page:
    xor %edx, %edx                 # rdx = j
.Lwrite_qword:
    mov %r9, %rax
    xor %rdx, %rax
    mov %rax, (%rdi,%rdx,8)
    inc %edx
    cmp $512, %edx
    jb .Lwrite_qword
    add $PAGE_SIZE, %rdi
    add %r8, %r9
    dec %rcx
    jnz .Lwrite_page
.Lwrite_done:

    # read passes
    xor %r14d, %r14d               # r14 = sum of all pass sums
    mov $1, %ebp                   # rbp = pass number
.Lpass:
    cmp %r13, %rbp
    ja .Lfinish
    mov %rbx, %rdi                 # sum every 8th qword of every page
    mov %r12, %rsi
    mov $64, %edx
    mov $64, %ecx
    call sum_pages
    add %rax, %r14
    lea name(%rip), %rdi
    mov %rbp, %rsi
    mov %rax, %rdx
    call put_pass_checksum
    inc %rbp
    jmp .Lpass

.Lfinish:
    lea msg_done_pages(%rip), %rdi
    call puts
    mov %r12, %rdi
    call put_dec
    lea msg_done_passes(%rip), %rdi
    call puts
    mov %r13, %rdi
    call put_dec
    mov %r14, %rdi
    call put_checksum
    xor %edi, %edi
    call exit

params:
    param pages, 256
    param passes, 3
    .byte 0
name:             .asciz "memtouch"
msg_done_pages:   .asciz "memtouch: done pages="
msg_done_passes:  .asciz " passes="
