# lib_xorshift.S - xorshift_fill, .include'd by kernels.S and kernels_smp.S where the routine stands.

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
