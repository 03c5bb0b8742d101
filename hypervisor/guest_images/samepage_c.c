/* samepage_c - samepage (samepage.S) written in C with the guest SDK: N identical pages that
 * stay identical, re-read for K passes; the same console output as samepage.
 *
 * Command-line parameters:
 *   pages=N      pages to fill at the heap                    (default 64)
 *   pattern=B    fill byte (only the low 8 bits are used)     (default 0x5a)
 *   passes=K     read passes                                  (default 40)
 *   spin=S       delay-loop iterations before each pass       (default 100000)
 *
 * Console output: "samepage: pass k checksum H16\n" for k = 1..K, each checksum being
 * N * (B * 0x0101010101010101) mod 2^64; "samepage: not enough memory\n" and status 2
 * if the heap is smaller than N pages.
 */
#include <hvsim.h>

static void spin(unsigned long n)
{
    while (n--)
        __asm__ volatile(""); /* a register-only delay loop: no memory access */
}

int main(void)
{
    unsigned long pages = hv_param("pages", 64), passes = hv_param("passes", 40), delay = hv_param("spin", 100000);
    if (pages > hv_heap_size() / HV_PAGE_SIZE) {
        hv_puts("samepage: not enough memory\n");
        return 2;
    }
    unsigned long *heap = hv_heap();
    memset(heap, (int)(hv_param("pattern", 0x5a) & 0xff), pages * HV_PAGE_SIZE);
    for (unsigned long pass = 1; pass <= passes; pass++) {
        spin(delay);
        unsigned long sum = 0;
        for (unsigned long i = 0; i < pages; i++)
            sum += heap[i * (HV_PAGE_SIZE / 8)];
        hv_printf("samepage: pass %lu checksum %016lx\n", pass, sum);
    }
    return 0;
}
