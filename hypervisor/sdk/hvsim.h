/* hvsim.h - the hvsim guest SDK: a freestanding x86-64 runtime for guests run by hvsim.
 *
 * Build a guest with `hvsim build-guest prog.c -o prog.elf`, run it with `hvsim run prog.elf`.
 * The start-up code (crt0.S, hvsim.c) runs in long mode at ring 0 with interrupts off; it
 * sets up the stack, an address space of its own (the first 1 GiB identity mapped, page 0
 * left unmapped so that a NULL dereference faults), an IDT for the 32 exception vectors,
 * then calls `int main(void)` and passes its return value to hv_exit().
 *
 * No floating point (guests are built with -mgeneral-regs-only), no libc: what a guest
 * needs is below.  Every routine is deterministic: a guest sees only its command line,
 * its memory size, its VM index and simulated time.
 */
#ifndef HVSIM_H
#define HVSIM_H

#define HV_PAGE_SIZE 4096UL
/* hv_map() maps 4 KiB pages at virtual addresses in [HV_USER_BASE, HV_USER_END);
 * below HV_USER_BASE is the identity map that every address space shares. */
#define HV_USER_BASE 0x40000000UL
#define HV_USER_END 0x8000000000UL
#define HV_MAP_WRITE 0x2u /* the page is writable (otherwise read-only) */
/* Exit status of a guest killed by the default exception handler: 128 + vector. */
#define HV_EXCEPTION_STATUS(vector) (128 + (vector))

/* Console (COM1, one port write per byte). */
void hv_putc(char c);
void hv_puts(const char *s); /* writes s as it is: no newline is added */
/* %d %u %x %lx %lu %ld %s %c %p %%, with a width, 0 padding and `-` left alignment
 * (e.g. "%08lx", "%-10s", "%5u"); returns the number of characters written. */
int hv_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Writes the low byte of status to the exit port (0xF4) and halts. */
_Noreturn void hv_exit(int status);

/* The value of the command line's last valid `key=VALUE` token, else dflt.  Tokens are
 * separated by bytes <= 0x20; VALUE is decimal or 0x-prefixed hex, wrapping mod 2^64;
 * an empty or non-numeric VALUE is ignored (the rules of the assembly guests' lib.S). */
unsigned long hv_param(const char *key, unsigned long dflt);

/* Guest memory: the heap is the page-aligned free memory after the image (from the
 * boot protocol's heap_start, 2 MiB, at the lowest) up to min(memory size, 1 GiB). */
void *hv_heap(void);
unsigned long hv_heap_size(void);
unsigned long hv_mem_size(void);
unsigned hv_vm_index(void);

/* The time stamp counter (rdtsc): the vCPU's simulated time, never the host's clock; it ticks at
 * 1 GHz of simulated time (10 ticks per instruction at the default --insns-per-ms). */
unsigned long hv_rdtsc(void);

/* The compiler emits calls to these. */
void *memset(void *dst, int c, unsigned long n);
void *memcpy(void *dst, const void *src, unsigned long n);
int memcmp(const void *a, const void *b, unsigned long n);
unsigned long strlen(const char *s);

/* Page tables, for guests that manage their own mappings.  An address space is the
 * physical address of its PML4 (the value loaded into CR3); page-table pages come from a
 * pool of HV_PT_POOL_PAGES pages inside the image.  hv_map/hv_unmap change the current
 * address space and do the INVLPG; va and pa are page aligned, va in the user range.
 * hv_map returns 0, -1 for a bad va or pa, -2 when the pool is used up; hv_unmap returns 0,
 * or -1 if va was not mapped.  hv_new_address_space returns 0 when the pool is used up. */
#define HV_PT_POOL_PAGES 192
typedef unsigned long hv_as_t;
int hv_map(unsigned long va, unsigned long pa, unsigned flags);
int hv_unmap(unsigned long va);
hv_as_t hv_new_address_space(void);
void hv_switch_address_space(hv_as_t as);

/* Exceptions.  A handler gets the interrupted state; when it returns, the interrupted
 * code resumes at frame->rip (for a fault: the faulting instruction, retried) with the
 * frame's registers.  cr2 is the faulting address of a #PF (the page's address: hvsim's
 * MMU reports faults per page).  Vectors 0-31; without a handler of its own, a vector's
 * default handler prints the exception, vector, RIP (and for #PF, CR2 and the error
 * code) and exits with HV_EXCEPTION_STATUS(vector). */
typedef struct hv_frame {
    unsigned long cr2;
    unsigned long r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    unsigned long vector, error_code, rip, cs, rflags, rsp, ss;
} hv_frame;
typedef void (*hv_handler)(hv_frame *frame);
void hv_set_handler(unsigned vector, hv_handler fn);

int main(void);

#endif
