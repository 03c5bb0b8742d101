/* crt0.S - the hvsim guest SDK's entry point and exception stubs.
 *
 * _start is entered in long mode with RSI = the boot-parameters page and RSP = the top
 * of the boot stack (hypervisor/vmm/layout.py).  It keeps the boot-parameters pointer,
 * puts the VM index at the top of the stack (so that no two VMs' stack pages are
 * identical, as the assembly guests do), and calls hv_start (hvsim.c), which never
 * returns.  hv_isr_stubs[v] is vector v's IDT entry point: it pushes a zero error code
 * where the CPU pushes none, then the vector, and hv_isr_common saves the registers
 * and CR2 as a struct hv_frame and calls hv_dispatch(frame).
 */
    .file "crt0.S"
    .section .text.start, "ax"
    .globl _start
_start:
    mov %rsi, hv_boot_params(%rip)
    mov $0x80000, %rsp
    pushq 16(%rsi)
    pushq $0
    cld
    call hv_start
1:  hlt
    jmp 1b

    .text
    .macro isr vector
isr\vector:
    .if (\vector == 8) || (\vector >= 10 && \vector <= 14) || (\vector == 17) || (\vector == 21) || (\vector == 29) || (\vector == 30)
    .else
    pushq $0
    .endif
    pushq $\vector
    jmp hv_isr_common
    .endm

    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    isr \v
    .endr

hv_isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %cr2, %rax
    push %rax
    mov %rsp, %rdi
    mov %rsp, %rbx
    and $-16, %rsp
    cld
    call hv_dispatch
    mov %rbx, %rsp
    add $8, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

    .section .rodata
    .globl hv_isr_stubs
    .balign 8
hv_isr_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad isr\v
    .endr

    .section .note.GNU-stack, "", @progbits
