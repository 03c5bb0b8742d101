# cowstorm - like samepage, but at pass W every page gets written (a burst of
# copy-on-write breaks of merged pages).
#
# Command-line parameters:
#   pages=N      pages to fill at heap_start                  (default 64)
#   pattern=B    fill byte (only the low 8 bits are used)     (default 0x5a)
#   passes=K     read passes                                  (default 20)
#   spin=S       delay-loop iterations before each pass       (default 20000)
#   write_at=W   1-based pass that writes, after its spin      (default 10;
#                0 or W > K means never write)
#
# Fills all 4096 bytes of N pages at heap_start with byte B.  Then K passes.
# In pass W, after its spin and before its reads, it writes one byte into every page i
# (0-based) at offset 8: (i + 1 + 16*vm_index) & 0xff, so the byte differs per
# page and per VM.  Each pass spins S iterations of a register-only delay loop,
# then sums qword 0 and qword 1 of every page mod 2^64.
#
# Console output (H16 = exactly 16 lowercase hex digits):
#   cowstorm: pass 1 checksum H16\n           (one line per pass, 1..K)
#   ...
#   cowstorm: wrote N pages\n                 (in pass W, after the spin, before
#                                              that pass's checksum line)
#   cowstorm: pass W checksum H16\n
#   ...
# then exit status 0 via port 0xF4.
# If heap_start + N*4096 > mem_size it prints instead
#   cowstorm: not enough memory\n
# and exits with status 2.

    .include "lib.S"

main:
    sub $16, %rsp                  # 0(%rsp) = W
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
    lea key_write_at(%rip), %rdi
    mov $10, %esi
    call cmdline_get
    mov %rax, 0(%rsp)              # W

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
    cmp 0(%rsp), %rbp
    jne .Lno_write
    mov BP_OFF_VM_INDEX(%r15), %rax
    shl $4, %eax
    inc %eax                       # al = 1 + 16*vm_index for page 0
    lea 8(%rbx), %rdi
    mov %r12, %rcx
    test %rcx, %rcx
    jz .Lwrite_done
.Lwrite_page:
    mov %al, (%rdi)
    inc %eax
    add $PAGE_SIZE, %rdi
    dec %rcx
    jnz .Lwrite_page
.Lwrite_done:
    lea msg_wrote(%rip), %rdi
    call puts
    mov %r12, %rdi
    call put_dec
    lea msg_pages(%rip), %rdi
    call puts
.Lno_write:
    xor %eax, %eax                 # rax = this pass's sum
    mov %rbx, %rdi
    mov %r12, %rcx
    test %rcx, %rcx
    jz .Lread_done
.Lread_page:
    add (%rdi), %rax
    add 8(%rdi), %rax
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
key_write_at:  .asciz "write_at"
msg_nomem:     .asciz "cowstorm: not enough memory\n"
msg_pass:      .asciz "cowstorm: pass "
msg_checksum:  .asciz " checksum "
msg_wrote:     .asciz "cowstorm: wrote "
msg_pages:     .asciz " pages\n"
