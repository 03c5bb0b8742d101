# hello - the smallest guest: greet on the console, then halt.
#
# Command-line parameters: none.
#
# Console output (N = vm_index in decimal):
#   hello from hvsim vm N\n
#
# Ends with a bare `hlt` (exit status 0), exercising the HLT exit rather than
# the exit port.

    .include "lib.S"

main:
    lea msg_hello(%rip), %rdi
    call puts
    mov BP_OFF_VM_INDEX(%r15), %rdi
    call put_dec
    mov $'\n', %edi
    call putc
.Lhalt:
    hlt
    jmp .Lhalt

msg_hello:
    .asciz "hello from hvsim vm "
