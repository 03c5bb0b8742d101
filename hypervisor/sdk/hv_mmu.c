/* hv_mmu.c - the hvsim guest SDK's page tables and IDT (see hvsim.h).
 *
 * Start-up builds the SDK's own address space from a pool of page-table pages in the
 * image: the first 1 GiB identity mapped with 2 MiB pages, except the first 2 MiB,
 * mapped with 4 KiB pages and page 0 left out (so NULL faults).  Every address space
 * shares that identity map (one PD, under PDPT entry 0) and has its own PML4 and PDPT;
 * hv_map() fills in the rest (from 1 GiB) on demand.  The IDT has 64-bit interrupt
 * gates for the 32 exception vectors, into crt0.S's stubs.
 */
#include "hvsim.h"

#define PTE_P 0x1UL
#define PTE_RW 0x2UL
#define PTE_PS 0x80UL
#define PTE_ADDR 0x000ffffffffff000UL

static unsigned long pt_pool[HV_PT_POOL_PAGES][512] __attribute__((aligned(4096)));
static unsigned pt_used;
static unsigned long *identity_pd;

static unsigned long *pt_alloc(void)
{
    if (pt_used >= HV_PT_POOL_PAGES)
        return 0;
    unsigned long *page = pt_pool[pt_used++];
    memset(page, 0, HV_PAGE_SIZE);
    return page;
}

static unsigned long read_cr3(void)
{
    unsigned long v;
    __asm__ volatile("mov %%cr3, %0" : "=r"(v));
    return v;
}

hv_as_t hv_new_address_space(void)
{
    unsigned long *pml4 = pt_alloc(), *pdpt = pml4 ? pt_alloc() : 0;
    if (!pdpt)
        return 0;
    pml4[0] = (unsigned long)pdpt | PTE_P | PTE_RW;
    pdpt[0] = (unsigned long)identity_pd | PTE_P | PTE_RW;
    return (hv_as_t)pml4;
}

void hv_switch_address_space(hv_as_t as)
{
    __asm__ volatile("mov %0, %%cr3" : : "r"(as) : "memory");
}

/* The leaf pte of va in the current address space, creating tables if create. */
static unsigned long *leaf_pte(unsigned long va, int create)
{
    unsigned long *table = (unsigned long *)(read_cr3() & PTE_ADDR);
    for (int shift = 39; shift > 12; shift -= 9) {
        unsigned long *e = &table[(va >> shift) & 511];
        if (!(*e & PTE_P)) {
            unsigned long *next = create ? pt_alloc() : 0;
            if (!next)
                return 0;
            *e = (unsigned long)next | PTE_P | PTE_RW;
        }
        table = (unsigned long *)(*e & PTE_ADDR);
    }
    return &table[(va >> 12) & 511];
}

int hv_map(unsigned long va, unsigned long pa, unsigned flags)
{
    if (va < HV_USER_BASE || va >= HV_USER_END || (va | pa) & (HV_PAGE_SIZE - 1) || pa >= hv_mem_size())
        return -1;
    unsigned long *pte = leaf_pte(va, 1);
    if (!pte)
        return -2;
    *pte = pa | PTE_P | (flags & HV_MAP_WRITE ? PTE_RW : 0);
    __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory");
    return 0;
}

int hv_unmap(unsigned long va)
{
    if (va < HV_USER_BASE || va >= HV_USER_END)
        return -1;
    unsigned long *pte = leaf_pte(va, 0);
    if (!pte || !(*pte & PTE_P))
        return -1;
    *pte = 0;
    __asm__ volatile("invlpg (%0)" : : "r"(va) : "memory");
    return 0;
}

void hv_mmu_init(void)
{
    unsigned long *pt0 = pt_alloc();
    identity_pd = pt_alloc();
    for (unsigned long i = 1; i < 512; i++)
        pt0[i] = (i << 12) | PTE_P | PTE_RW;
    identity_pd[0] = (unsigned long)pt0 | PTE_P | PTE_RW;
    for (unsigned long i = 1; i < 512; i++)
        identity_pd[i] = (i << 21) | PTE_P | PTE_RW | PTE_PS;
    hv_switch_address_space(hv_new_address_space());
}

/* The IDT */
struct gate {
    unsigned short offset_low, selector;
    unsigned char ist, type;
    unsigned short offset_mid;
    unsigned offset_high, reserved;
};

static struct gate idt[32] __attribute__((aligned(16)));
static hv_handler handlers[32];
extern const unsigned long hv_isr_stubs[32];

static const char *const names[32] = {
    "#DE divide error", "#DB debug", "NMI", "#BP breakpoint", "#OF overflow", "#BR bound range",
    "#UD invalid opcode", "#NM device not available", "#DF double fault", "coprocessor segment overrun",
    "#TS invalid TSS", "#NP segment not present", "#SS stack fault", "#GP general protection",
    "#PF page fault", "reserved", "#MF x87 floating point", "#AC alignment check", "#MC machine check",
    "#XM SIMD floating point", "#VE virtualization", "#CP control protection",
};

void hv_set_handler(unsigned vector, hv_handler fn)
{
    if (vector < 32)
        handlers[vector] = fn;
}

void hv_dispatch(hv_frame *f);
void hv_dispatch(hv_frame *f)
{
    if (f->vector < 32 && handlers[f->vector]) {
        handlers[f->vector](f);
        return;
    }
    const char *name = f->vector < 32 && names[f->vector] ? names[f->vector] : "exception";
    hv_printf("hvsim guest: %s (vector %lu) at RIP %p", name, f->vector, (void *)f->rip);
    if (f->vector == 14)
        hv_printf(", CR2 %p, error code 0x%lx", (void *)f->cr2, f->error_code);
    hv_puts("\n");
    hv_exit(HV_EXCEPTION_STATUS((int)f->vector));
}

void hv_idt_init(void)
{
    for (int v = 0; v < 32; v++) {
        unsigned long a = hv_isr_stubs[v];
        idt[v] = (struct gate){(unsigned short)a, 0x08, 0, 0x8e, (unsigned short)(a >> 16), (unsigned)(a >> 32), 0};
    }
    struct {
        unsigned short limit;
        unsigned long base;
    } __attribute__((packed)) idtr = {sizeof idt - 1, (unsigned long)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
}
