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
    lea key_pages(%rip), %rdi
    mov $256, %esi
    call cmdline_get
    mov %rax, %r12                 # r12 = P
    lea key_passes(%rip), %rdi
    mov $3, %esi
    call cmdline_get
    mov %rax, %r13                 # r13 = K

    call heap_pages
    cmp %rax, %r12
    jbe .Lmem_ok
    lea msg_nomem(%rip), %rdi
    call puts
    mov $2, %edi
    call exit
.Lmem_ok:
    mov BP_OFF_HEAP_START(%r15), %rbx   # rbx = heap_start

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
    xor %eax, %eax                 # rax = this pass's sum
    mov %rbx, %rdi
    mov %r12, %rcx
    test %rcx, %rcx
    jz .Lread_done
.Lread_page:
    xor %edx, %edx
.Lread_qword:
    add (%rdi,%rdx,8), %rax
    add $8, %edx
    cmp $512, %edx
    jb .Lread_qword
    add $PAGE_SIZE, %rdi
    dec %rcx
    jnz .Lread_page
.Lread_done:
    add %rax, %r14
    push %rax
    lea msg_pass(%rip), %rdi
    call puts
    mov %rbp, %rdi
    call put_dec
    lea msg_checksum(%rip), %rdi
    call puts
    pop %rdi
    call put_hex64
    mov $'\n', %edi
    call putc
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
    lea msg_checksum(%rip), %rdi
    call puts
    mov %r14, %rdi
    call put_hex64
    mov $'\n', %edi
    call putc
    xor %edi, %edi
    call exit

key_pages:        .asciz "pages"
key_passes:       .asciz "passes"
msg_nomem:        .asciz "memtouch: not enough memory\n"
msg_pass:         .asciz "memtouch: pass "
msg_checksum:     .asciz " checksum "
msg_done_pages:   .asciz "memtouch: done pages="
msg_done_passes:  .asciz " passes="
