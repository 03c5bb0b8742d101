    .code64
    # Shadow-paging scenarios (tests/scenario/test_shadow.py).  Each phase ends with `out %al, $0x80`
    # (an IO_INSTRUCTION exit naming port 0x80), so a test counts the exits of each phase.
    # D = gfn 0x400, E = gfn 0x401: identical pages (KSM merges them).  PT = gfn 0x300: a leaf table
    # linked from PD[511] (gva 0x3fe00000..), mapping D at gva1 = 0x3fe00000 (PT[0]) and
    # gva2 = 0x3fe10000 (PT[16], another 8-pte group).
    mov $0x400000, %rdi
    movabs $0x5a5a5a5a5a5a5a5a, %rax
    mov $1024, %ecx
    rep stosq                       # D and E through the identity map
    mov $0x300000, %rbx
    movq $0x400003, 0(%rbx)         # PT[0]  = D | P | RW   (A and D clear)
    movq $0x400003, 128(%rbx)       # PT[16] = D | P | RW
    mov $0x5000, %rbx
    movq $0x300003, 4088(%rbx)      # PD[511] = PT | P | RW (the boot PD is shadowed: an emulated write)
    out %al, $0x80                  # marker 1
    mov 0x3fe00000, %rax            # (a) first read of D through gva1
    mov 0x3fe10000, %rax            #     and through gva2
    out %al, $0x80                  # marker 2
    mov $3000000, %rcx              # (b) spin while ksmd merges D and E
1:  dec %rcx
    jnz 1b
    out %al, $0x80                  # marker 3
    mov 0x3fe00000, %rax            #     re-read the merged D through both aliases
    mov 0x3fe10000, %rax
    out %al, $0x80                  # marker 4
    mov $0x300000, %rbx
    movq $0x402023, 256(%rbx)       # (c) PT[32] = gfn 0x402 | P | RW | A: updated in place
    out %al, $0x80                  # marker 5
    mov 0x3fe20000, %rax            #     use it: the speculative spte is there
    out %al, $0x80                  # marker 6
    movq $0x403023, 320(%rbx)       #     three pte writes in a row, none used:
    movq $0x404023, 384(%rbx)
    movq $0x405023, 448(%rbx)       #     the third floods
    out %al, $0x80                  # marker 7
    xor %eax, %eax
    out %al, $0xf4
