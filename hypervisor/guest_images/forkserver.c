/* forkserver - a fork server: a parent region copied into N children by a copy-on-write
 * fork inside the guest (its own page tables and #PF handler), the children then diverging.
 *
 * Command-line parameters:
 *   pages=P      pages of the parent region                          (default 64)
 *   children=N   children forked from it                             (default 4)
 *   write_pct=W  percentage of the region's pages each child writes  (default 25)
 *
 * The parent maps P heap frames writable at 1 GiB in an address space of its own and fills
 * them (qword j of page i = ((i+1) * 0x9E3779B97F4A7C15) ^ j).  Each fork makes a new
 * address space mapping the same frames read-only, and the parent's own mappings become
 * read-only too.  Each child in turn runs in its address space and writes qword 1 of
 * W% of the pages (chosen by a PRNG seeded by the child's number); the first write to a
 * page takes a #PF (present, write) that the guest's handler resolves by copying the frame
 * and mapping the copy writable, then the write is retried.  Console output:
 *   "forkserver: child c wrote K pages copied C checksum H16\n"  for c = 1..N
 *   "forkserver: parent checksum H16 copies T\n"
 * (checksum: the sum of qwords 0 and 1 of every page as that address space sees it; the
 * parent's is unchanged by its children).  "forkserver: not enough memory\n" and status 2
 * if the heap cannot hold the region and every possible copy; status 3 if the page-table
 * pool runs out.
 */
#include <hvsim.h>

static unsigned long pages, region_pa, next_free;
static volatile unsigned long copies; /* changed by the #PF handler behind the compiler's back */

static void cow_fault(hv_frame *f)
{
    unsigned long va = f->cr2 & ~(HV_PAGE_SIZE - 1);
    if (f->error_code != 3 || va < HV_USER_BASE || va >= HV_USER_BASE + pages * HV_PAGE_SIZE) {
        hv_printf("forkserver: unexpected page fault at RIP %p, CR2 %p, error code 0x%lx\n", (void *)f->rip,
                  (void *)f->cr2, f->error_code);
        hv_exit(HV_EXCEPTION_STATUS(14));
    }
    unsigned long copy = next_free;
    next_free += HV_PAGE_SIZE;
    memcpy((void *)copy, (const void *)va, HV_PAGE_SIZE); /* the shared frame, read through va */
    if (hv_map(va, copy, HV_MAP_WRITE))
        hv_exit(3);
    copies++;
}

static unsigned long checksum(void)
{
    const unsigned long *region = (const unsigned long *)HV_USER_BASE;
    unsigned long sum = 0;
    for (unsigned long i = 0; i < pages; i++)
        sum += region[i * 512] + region[i * 512 + 1];
    return sum;
}

static hv_as_t fork_space(unsigned flags)
{
    hv_as_t as = hv_new_address_space();
    if (!as)
        hv_exit(3);
    hv_switch_address_space(as);
    for (unsigned long i = 0; i < pages; i++)
        if (hv_map(HV_USER_BASE + i * HV_PAGE_SIZE, region_pa + i * HV_PAGE_SIZE, flags))
            hv_exit(3);
    return as;
}

int main(void)
{
    pages = hv_param("pages", 64);
    unsigned long children = hv_param("children", 4), write_pct = hv_param("write_pct", 25);
    if (pages == 0 || pages > 512 || (children + 1) * pages > hv_heap_size() / HV_PAGE_SIZE) {
        hv_puts("forkserver: not enough memory\n");
        return 2;
    }
    region_pa = (unsigned long)hv_heap();
    next_free = region_pa + pages * HV_PAGE_SIZE;
    hv_set_handler(14, cow_fault);

    hv_as_t parent = fork_space(HV_MAP_WRITE);
    unsigned long *region = (unsigned long *)HV_USER_BASE;
    for (unsigned long i = 0; i < pages; i++)
        for (unsigned long j = 0; j < 512; j++)
            region[i * 512 + j] = ((i + 1) * 0x9E3779B97F4A7C15UL) ^ j;
    unsigned long before = checksum();

    hv_as_t child[64];
    if (children > 64)
        children = 64;
    for (unsigned long c = 0; c < children; c++)
        child[c] = fork_space(0);
    fork_space(0); /* the parent's own view becomes read-only as well (it is discarded after) */
    hv_switch_address_space(parent);
    for (unsigned long i = 0; i < pages; i++)
        hv_map(HV_USER_BASE + i * HV_PAGE_SIZE, region_pa + i * HV_PAGE_SIZE, 0);

    for (unsigned long c = 0; c < children; c++) {
        hv_switch_address_space(child[c]);
        unsigned long rng = (c + 1) * 0x2545F4914F6CDD1DUL, wrote = 0, copied = copies;
        for (unsigned long i = 0; i < pages; i++) {
            rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
            if (rng % 100 < write_pct) {
                region[i * 512 + 1] = rng;
                wrote++;
            }
        }
        hv_printf("forkserver: child %lu wrote %lu pages copied %lu checksum %016lx\n", c + 1, wrote,
                  copies - copied, checksum());
    }
    hv_switch_address_space(parent);
    unsigned long after = checksum();
    hv_printf("forkserver: parent checksum %016lx copies %lu\n", after, copies);
    return after == before ? 0 : 1;
}
