# lib.S - routines shared by the bundled hvsim guests (.include'd by each guest).
#
# Boot protocol (see hypervisor/vmm/layout.py): 64-bit long mode, ring 0,
# interrupts off, no IDT, the first 1 GiB identity mapped (gva == gpa), the flat
# image loaded at 0x100000 and entered at its first byte, RSI = boot-parameters
# page (0x2000), RSP = 0x80000.  With several vCPUs (--vcpus N) every vCPU enters
# `_start` this way, vCPU i with RDI = i and RSP = 0x80000 - i*0x4000 (its own
# stack); `main` receives RDI unchanged, and boot_params.nr_vcpus (offset 48)
# says N.  CPUID leaf 1 EBX[31:24] (the initial APIC ID) is the index too.  The image is never written: working data lives at
# heap_start and above, scratch space on the stack.
#
# Calling convention (System V-like, plus one reserved register):
#   * arguments in RDI, RSI, RDX, RCX (in that order); result in RAX;
#   * RAX, RCX, RDX, RSI, RDI, R8-R11 and the flags are clobbered by every routine;
#   * RBX, RBP, R12, R13, R14 and RSP are preserved;
#   * R15 holds the boot-parameters pointer for the whole run: each guest's entry
#     code does `mov %rsi, %r15` first and nothing may modify R15 afterwards;
#   * the direction flag is clear (the entry code does `cld`).
#
# Each guest does `.include "lib.S"` as its very first statement: this file
# begins with the entry point `_start` (the image's first byte), which saves the
# boot-parameters pointer in R15, clears the direction flag and jumps to the
# guest's `main`.  Including it first also defines the constants below before
# the guest uses them.
#
# Routines:
#   putc(RDI: byte)                  write the low byte of RDI to COM1 (one `out`)
#   puts(RDI: char *s)               write the NUL-terminated string s
#   put_hex64(RDI: value)            write exactly 16 lowercase hex digits, no 0x
#   put_dec(RDI: value)              write value as unsigned decimal
#   cmdline_get(RDI: char *key, RSI: default) -> RAX
#                                    value of token `key=VALUE` on the command
#                                    line (tokens are separated by spaces; any byte
#                                    <= 0x20 counts as a separator).  VALUE is
#                                    decimal or 0x/0X-prefixed hex, wrapping mod
#                                    2^64; a VALUE that is empty or not entirely
#                                    digits is ignored.  If the key occurs several
#                                    times the last valid occurrence wins; if it
#                                    is absent (or never valid) return default.
#   heap_pages() -> RAX              number of whole 4 KiB pages from heap_start to
#                                    min(mem_size, 1 GiB identity map); a guest
#                                    needing P pages at heap_start checks P <= RAX
#                                    (i.e. heap_start + P*4096 <= mem_size)
#   spin(RDI: iterations)            register-only delay loop (no memory access)
#   exit(RDI: status)                write the low byte of RDI to port 0xF4, then
#                                    `hlt` forever; does not return
#
# Routines for the workload guests.  NAME is the guest's name, a NUL-terminated
# string (e.g. "samepage"), which starts each line they print:
#   cmdline_params(RDI: table, RSI: u64 *values)
#                                    cmdline_get each entry of table, in table
#                                    order, storing the results to values[0],
#                                    values[1], ...  The table is a list of
#                                    `param KEY, DEFAULT` entries (macro below)
#                                    ended by `.byte 0`.
#   heap_check(RDI: pages, RSI: char *name) -> RAX
#                                    if pages <= heap_pages() return heap_start;
#                                    otherwise write "NAME: not enough memory\n"
#                                    and exit(2)
#   heap_fill_pattern(RDI: pages, RSI: char *name) -> RAX
#                                    heap_check(pages, name), then read the
#                                    parameter `pattern` (default 0x5a) and fill
#                                    every byte of those pages at heap_start with
#                                    its low 8 bits (rep stosq, in address order);
#                                    returns heap_start
#   sum_pages(RDI: first page, RSI: pages, RDX: qwords per page (>= 1),
#             RCX: bytes between them) -> RAX
#                                    sum mod 2^64 of the qwords at
#                                    first + i*4096 + j*RCX for page i = 0..pages-1
#                                    and j = 0..RDX-1, read in that order (i outer)
#   put_pass(RDI: char *name, RSI: pass)
#                                    write "NAME: pass K" (K = pass in decimal)
#   put_checksum(RDI: value)         write " checksum H16\n" (H16 = put_hex64)
#   put_pass_checksum(RDI: char *name, RSI: pass, RDX: checksum)
#                                    write "NAME: pass K checksum H16\n"

    .set COM1_PORT, 0x3f8
    .set EXIT_PORT, 0xf4
    .set BP_OFF_MEM_SIZE, 8
    .set BP_OFF_VM_INDEX, 16
    .set BP_OFF_NR_VMS, 24
    .set BP_OFF_CMDLINE_LEN, 32
    .set BP_OFF_HEAP_START, 40
    .set BP_OFF_NR_VCPUS, 48
    .set BP_OFF_CMDLINE, 64
    .set CMDLINE_MAX, 4096 - 64 - 1
    .set IDENTITY_MAP_SIZE, 0x40000000
    .set PAGE_SIZE, 4096
    .set GOLDEN64, 0x9E3779B97F4A7C15

# One cmdline_params table entry: the key (NUL-terminated), then its default
# value as an unaligned little-endian qword.
    .macro param key, value
    .asciz "\key"
    .quad \value
    .endm

    .code64
    .text
    .globl _start
_start:
    mov %rsi, %r15                 # boot-parameters pointer, kept for the run
    cld
    # Put the VM index at the top of the stack: each VM's stack page then differs
    # from every other VM's, as real guests' stacks do, so KSM never merges it.
    pushq 16(%r15)
    jmp main

# putc(RDI: byte)
putc:
    mov %edi, %eax
    mov $COM1_PORT, %edx
    out %al, %dx
    ret

# puts(RDI: char *s)
puts:
    mov $COM1_PORT, %edx
.Lputs_loop:
    movzbl (%rdi), %eax
    test %eax, %eax
    jz .Lputs_done
    out %al, %dx
    inc %rdi
    jmp .Lputs_loop
.Lputs_done:
    ret

# put_hex64(RDI: value): 16 lowercase hex digits, most significant first
put_hex64:
    mov $COM1_PORT, %edx
    mov $16, %ecx
.Lhex_loop:
    rol $4, %rdi
    mov %edi, %eax
    and $0xf, %eax
    cmp $10, %eax
    jb .Lhex_digit
    add $('a' - '0' - 10), %eax
.Lhex_digit:
    add $'0', %eax
    out %al, %dx
    dec %ecx
    jnz .Lhex_loop
    ret

# put_dec(RDI: value): unsigned decimal, no leading zeros ("0" for zero)
put_dec:
    sub $32, %rsp                  # digit buffer, filled from the end
    lea 32(%rsp), %rsi             # rsi = one past the most recent digit
    mov %rdi, %rax
    mov $10, %ecx
.Ldec_loop:
    xor %edx, %edx
    div %rcx                       # rax = quotient, rdx = remainder
    add $'0', %edx
    dec %rsi
    mov %dl, (%rsi)
    test %rax, %rax
    jnz .Ldec_loop
    lea 32(%rsp), %rdi             # rdi = end of the digits
    mov $COM1_PORT, %edx
.Ldec_out:
    mov (%rsi), %al
    out %al, %dx
    inc %rsi
    cmp %rdi, %rsi
    jb .Ldec_out
    add $32, %rsp
    ret

# cmdline_get(RDI: char *key, RSI: default) -> RAX
#   rax result, rdi key, r8 scan cursor, r9 end of command line,
#   r10 key cursor / start of digits, r11 token cursor, rdx value, rsi base
cmdline_get:
    mov %rsi, %rax
    lea BP_OFF_CMDLINE(%r15), %r8
    mov BP_OFF_CMDLINE_LEN(%r15), %r9
    cmp $CMDLINE_MAX, %r9
    jbe .Lcg_len_ok
    mov $CMDLINE_MAX, %r9
.Lcg_len_ok:
    add %r8, %r9
.Lcg_skip_sep:                     # skip separators up to the next token
    cmp %r9, %r8
    jae .Lcg_done
    movzbl (%r8), %ecx
    test %ecx, %ecx
    jz .Lcg_done
    cmp $0x20, %ecx
    ja .Lcg_token
    inc %r8
    jmp .Lcg_skip_sep
.Lcg_token:                        # r8 = start of a token: does it begin "key="?
    mov %rdi, %r10
    mov %r8, %r11
.Lcg_cmp:
    movzbl (%r10), %ecx
    test %ecx, %ecx
    jz .Lcg_key_end
    cmp %r9, %r11
    jae .Lcg_skip_token
    cmp (%r11), %cl
    jne .Lcg_skip_token
    inc %r10
    inc %r11
    jmp .Lcg_cmp
.Lcg_key_end:
    cmp %r9, %r11
    jae .Lcg_skip_token
    cmpb $'=', (%r11)
    jne .Lcg_skip_token
    inc %r11                       # r11 = start of VALUE
    mov $10, %esi
    lea 2(%r11), %rcx              # a "0x" prefix needs two bytes before the end
    cmp %r9, %rcx
    ja .Lcg_digits
    cmpb $'0', (%r11)
    jne .Lcg_digits
    movzbl 1(%r11), %ecx
    or $0x20, %ecx
    cmp $'x', %ecx
    jne .Lcg_digits
    add $2, %r11
    mov $16, %esi
.Lcg_digits:
    mov %r11, %r10                 # r10 = first digit
    xor %edx, %edx
.Lcg_digit:
    cmp %r9, %r11
    jae .Lcg_value_end
    movzbl (%r11), %ecx
    cmp $0x20, %ecx                # separator or NUL ends the value
    jbe .Lcg_value_end
    sub $'0', %ecx
    cmp $10, %ecx
    jb .Lcg_have_digit
    add $'0', %ecx                 # not 0-9: try a-f / A-F
    or $0x20, %ecx
    sub $'a', %ecx
    cmp $6, %ecx
    jae .Lcg_skip_token            # not a digit at all: ignore this token
    add $10, %ecx
.Lcg_have_digit:
    cmp %rsi, %rcx
    jae .Lcg_skip_token            # digit too large for the base: ignore
    imul %rsi, %rdx
    add %rcx, %rdx
    inc %r11
    jmp .Lcg_digit
.Lcg_value_end:
    cmp %r10, %r11
    je .Lcg_skip_token             # empty value: ignore
    mov %rdx, %rax                 # valid: later occurrences override
    mov %r11, %r8
.Lcg_skip_token:                   # advance r8 past the rest of the token
    cmp %r9, %r8
    jae .Lcg_done
    movzbl (%r8), %ecx
    test %ecx, %ecx
    jz .Lcg_done
    cmp $0x20, %ecx
    jbe .Lcg_skip_sep
    inc %r8
    jmp .Lcg_skip_token
.Lcg_done:
    ret

# heap_pages() -> RAX: whole pages in [heap_start, min(mem_size, 1 GiB))
heap_pages:
    mov BP_OFF_MEM_SIZE(%r15), %rax
    mov $IDENTITY_MAP_SIZE, %ecx
    cmp %rcx, %rax
    jbe .Lhp_mem_ok
    mov %rcx, %rax
.Lhp_mem_ok:
    mov BP_OFF_HEAP_START(%r15), %rcx
    sub %rcx, %rax
    jb .Lhp_none
    shr $12, %rax
    ret
.Lhp_none:
    xor %eax, %eax
    ret

# spin(RDI: iterations): register-only delay loop
spin:
    test %rdi, %rdi
    jz .Lspin_done
.Lspin_loop:
    dec %rdi
    jnz .Lspin_loop
.Lspin_done:
    ret

# exit(RDI: status): report status on port 0xF4, then halt for good
exit:
    mov %edi, %eax
    mov $EXIT_PORT, %edx
    out %al, %dx
.Lexit_hlt:
    hlt
    jmp .Lexit_hlt

# cmdline_params(RDI: table, RSI: u64 *values)
#   rbx table cursor, rbp next value slot
cmdline_params:
    push %rbx
    push %rbp
    mov %rdi, %rbx
    mov %rsi, %rbp
.Lcp_entry:
    cmpb $0, (%rbx)
    je .Lcp_done                   # an empty key ends the table
    mov %rbx, %rdi                 # rdi = key
.Lcp_key:
    inc %rbx
    cmpb $0, -1(%rbx)
    jne .Lcp_key                   # rbx = just past the key's NUL
    mov (%rbx), %rsi               # rsi = default
    add $8, %rbx
    call cmdline_get
    mov %rax, (%rbp)
    add $8, %rbp
    jmp .Lcp_entry
.Lcp_done:
    pop %rbp
    pop %rbx
    ret

# heap_check(RDI: pages, RSI: char *name) -> RAX: heap_start, or exit(2)
heap_check:
    push %rbx
    push %rbp
    mov %rdi, %rbx
    mov %rsi, %rbp
    call heap_pages
    cmp %rax, %rbx
    ja .Lhc_nomem
    mov BP_OFF_HEAP_START(%r15), %rax
    pop %rbp
    pop %rbx
    ret
.Lhc_nomem:
    mov %rbp, %rdi
    call puts
    lea str_nomem(%rip), %rdi
    call puts
    mov $2, %edi
    call exit

# heap_fill_pattern(RDI: pages, RSI: char *name) -> RAX: heap_start
heap_fill_pattern:
    push %rbx
    push %rbp
    mov %rdi, %rbp                 # rbp = pages
    call heap_check
    mov %rax, %rbx                 # rbx = heap_start
    lea str_key_pattern(%rip), %rdi
    mov $0x5a, %esi
    call cmdline_get
    movzbl %al, %eax
    mov $0x0101010101010101, %rcx
    imul %rcx, %rax                # rax = the byte in every byte
    mov %rbx, %rdi
    mov %rbp, %rcx
    shl $9, %rcx                   # pages * 512 qwords
    rep stosq
    mov %rbx, %rax
    pop %rbp
    pop %rbx
    ret

# sum_pages(RDI: first page, RSI: pages, RDX: qwords per page, RCX: their spacing) -> RAX
#   r8 offset in the page, r9 qwords left in the page
sum_pages:
    xor %eax, %eax
    test %rsi, %rsi
    jz .Lsp_done
.Lsp_page:
    xor %r8d, %r8d
    mov %rdx, %r9
.Lsp_qword:
    add (%rdi,%r8), %rax
    add %rcx, %r8
    dec %r9
    jnz .Lsp_qword
    add $PAGE_SIZE, %rdi
    dec %rsi
    jnz .Lsp_page
.Lsp_done:
    ret

# put_pass(RDI: char *name, RSI: pass): "NAME: pass K"
put_pass:
    push %rsi
    call puts
    lea str_pass(%rip), %rdi
    call puts
    pop %rdi
    jmp put_dec

# put_pass_checksum(RDI: char *name, RSI: pass, RDX: checksum): "NAME: pass K checksum H16\n"
put_pass_checksum:
    push %rdx
    call put_pass
    pop %rdi
    # fall through
# put_checksum(RDI: value): " checksum H16\n"
put_checksum:
    push %rdi
    lea str_checksum(%rip), %rdi
    call puts
    pop %rdi
    call put_hex64
    mov $'\n', %edi
    jmp putc

str_key_pattern: .asciz "pattern"
str_nomem:       .asciz ": not enough memory\n"
str_pass:        .asciz ": pass "
str_checksum:    .asciz " checksum "

    .section .note.GNU-stack, "", @progbits
    .text
