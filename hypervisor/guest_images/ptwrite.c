/* ptwrite - maps and unmaps pages by writing its own page tables (with INVLPG), so that
 * guest page-table writes, write flooding and #PF injection all occur under shadow paging.
 *
 * Command-line parameters:
 *   pages=P    data pages, all mapped through one leaf page table (at most 512)  (default 8)
 *   rounds=R   rounds                                                            (default 4)
 *
 * P heap frames hold data (qword j of frame f = ((f+1) * 0x9E3779B97F4A7C15) ^ j).  The guest
 * runs in an address space of its own; virtual page i is HV_USER_BASE + i * 4 KiB.  Each
 * round r (0-based):
 *   1. "use" remap: for each i, map page i to frame (i + r) % P and read its qword 0 at once
 *      (each pte write is followed by a use of the page it maps);
 *   2. "burst" remap: map every page i to frame (i + r + 1) % P with no access in between,
 *      then read qword 0 of every page (several pte writes in a row to one table);
 *   3. unmap page 0 and read it: the #PF is taken by the guest's handler, which maps page 0
 *      to frame r % P again (and counts the fault); the read is retried.
 * Every map and unmap is an 8-byte store to the leaf pte followed by INVLPG (hv_map, hv_unmap).
 * Console output:
 *   "ptwrite: round r checksum H16 faults F\n"   for r = 1..R (sum of the qwords read)
 *   "ptwrite: done pages=P rounds=R checksum H16 faults F\n"
 * "ptwrite: not enough memory\n" and status 2 if the heap is too small; status 3 if the
 * page-table pool runs out; status 4 for parameters out of range.
 */
#include <hvsim.h>

static unsigned long pages, round, data_pa;
static volatile unsigned long faults; /* changed by the #PF handler behind the compiler's back */

static unsigned long va(unsigned long i) { return HV_USER_BASE + i * HV_PAGE_SIZE; }
static unsigned long frame(unsigned long f) { return data_pa + (f % pages) * HV_PAGE_SIZE; }

static void not_present(hv_frame *f)
{
    if ((f->cr2 & ~(HV_PAGE_SIZE - 1)) != va(0) || (f->error_code & 1)) {
        hv_printf("ptwrite: unexpected page fault at RIP %p, CR2 %p, error code 0x%lx\n", (void *)f->rip,
                  (void *)f->cr2, f->error_code);
        hv_exit(HV_EXCEPTION_STATUS(14));
    }
    if (hv_map(va(0), frame(round), HV_MAP_WRITE))
        hv_exit(3);
    faults++;
}

static unsigned long read0(unsigned long i) { return *(volatile unsigned long *)va(i); }

int main(void)
{
    pages = hv_param("pages", 8);
    unsigned long rounds = hv_param("rounds", 4);
    if (pages < 1 || pages > 512)
        return 4;
    if (pages * HV_PAGE_SIZE > hv_heap_size()) {
        hv_puts("ptwrite: not enough memory\n");
        return 2;
    }
    data_pa = (unsigned long)hv_heap();
    for (unsigned long f = 0; f < pages; f++) {
        unsigned long *page = (unsigned long *)frame(f);
        for (unsigned long j = 0; j < 512; j++)
            page[j] = ((f + 1) * 0x9E3779B97F4A7C15UL) ^ j;
    }
    hv_as_t as = hv_new_address_space();
    if (!as)
        return 3;
    hv_switch_address_space(as);
    hv_set_handler(14, not_present);
    unsigned long total = 0;
    for (round = 0; round < rounds; round++) {
        unsigned long sum = 0;
        for (unsigned long i = 0; i < pages; i++) {
            if (hv_map(va(i), frame(i + round), HV_MAP_WRITE))
                return 3;
            sum += read0(i);
        }
        for (unsigned long i = 0; i < pages; i++)
            if (hv_map(va(i), frame(i + round + 1), HV_MAP_WRITE))
                return 3;
        for (unsigned long i = 0; i < pages; i++)
            sum += read0(i);
        hv_unmap(va(0));
        sum += read0(0);
        hv_printf("ptwrite: round %lu checksum %016lx faults %lu\n", round + 1, sum, faults);
        total += sum;
    }
    hv_printf("ptwrite: done pages=%lu rounds=%lu checksum %016lx faults %lu\n", pages, rounds, total, faults);
    return 0;
}
