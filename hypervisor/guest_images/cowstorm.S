# cowstorm - like samepage, but at pass W every page gets written (a burst of
# copy-on-write breaks of merged pages).
#
# Command-line parameters:
#   pages=N      pages to fill at heap_start                  (default 64)
#   pattern=B    fill byte (only the low 8 bits are used)     (default 0x5a)
#   passes=K     read passes                                  (default 40)
#   spin=S       delay-loop iterations before each pass       (default 100000)
#   write_at=W   1-based pass that writes, after its spin      (default 30;
#                0 or W > K means never write)
#
# With the defaults ksmd (default knobs) has merged the pages, in 1 to 4 VMs,
# well before pass W breaks them all.
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
    sub $32, %rsp                  # the values of params, in table order
    lea params(%rip), %rdi
    mov %rsp, %rsi
    call cmdline_params
    pop %r12                       # r12 = N
    pop %r13                       # r13 = K
    pop %r14                       # r14 = S; now 0(%rsp) = W
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
    mov %rbx, %rdi                 # sum qwords 0 and 1 of every page
    mov %r12, %rsi
    mov $2, %edx
    mov $8, %ecx
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
    param write_at, 30
    .byte 0
name:          .asciz "cowstorm"
msg_wrote:     .asciz "cowstorm: wrote "
msg_pages:     .asciz " pages\n"
