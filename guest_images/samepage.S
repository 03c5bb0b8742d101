# samepage - N identical pages that stay identical: a same-page-merging target.
#
# Command-line parameters:
#   pages=N      pages to fill at heap_start                  (default 64)
#   pattern=B    fill byte (only the low 8 bits are used)     (default 0x5a)
#   passes=K     read passes                                  (default 20)
#   spin=S       delay-loop iterations before each pass       (default 20000)
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
    lea key_pages(%rip), %rdi
    mov $64, %esi
    call cmdline_get
    mov %rax, %r12                 # r12 = N
    lea key_passes(%rip), %rdi
    mov $20, %esi
    call cmdline_get
    mov %rax, %r13                 # r13 = K
    lea key_spin(%rip), %rdi
    mov $20000, %esi
    call cmdline_get
    mov %rax, %r14                 # r14 = S

    call heap_pages
    cmp %rax, %r12
    jbe .Lmem_ok
    lea msg_nomem(%rip), %rdi
    call puts
    mov $2, %edi
    call exit
.Lmem_ok:
    mov BP_OFF_HEAP_START(%r15), %rbx   # rbx = heap_start

    lea key_pattern(%rip), %rdi
    mov $0x5a, %esi
    call cmdline_get
    movzbl %al, %eax
    mov $0x0101010101010101, %rcx
    imul %rcx, %rax                # rax = B in every byte
    mov %rbx, %rdi
    mov %r12, %rcx
    shl $9, %rcx                   # N * 512 qwords
    rep stosq

    mov $1, %ebp                   # rbp = pass number
.Lpass:
    cmp %r13, %rbp
    ja .Lfinish
    mov %r14, %rdi
    call spin
    xor %eax, %eax                 # rax = this pass's sum
    mov %rbx, %rdi
    mov %r12, %rcx
    test %rcx, %rcx
    jz .Lread_done
.Lread_page:
    add (%rdi), %rax
    add $PAGE_SIZE, %rdi
    dec %rcx
    jnz .Lread_page
.Lread_done:
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
    xor %edi, %edi
    call exit

key_pages:     .asciz "pages"
key_pattern:   .asciz "pattern"
key_passes:    .asciz "passes"
key_spin:      .asciz "spin"
msg_nomem:     .asciz "samepage: not enough memory\n"
msg_pass:      .asciz "samepage: pass "
msg_checksum:  .asciz " checksum "
