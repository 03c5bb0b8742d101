/* procs - N address spaces over a shared region, the same frames mapped at several virtual
 * addresses in each, plus private pages; round-robin CR3 switches with a spin between them.
 *
 * Command-line parameters:
 *   procs=N     address spaces                                        (default 4)
 *   shared=S    pages of the shared region (at most 512)              (default 16)
 *   aliases=A   virtual addresses of each shared page per space (<=8) (default 2)
 *   private=P   private pages per address space (at most 512)         (default 4)
 *   rounds=R    rounds of switches through every address space        (default 8)
 *   spin=K      register-only iterations after each switch            (default 20000)
 *
 * The shared region is S heap frames, every byte 0x5a (identical pages: KSM merges them).
 * Each address space p (its own PML4, PDPT and, through hv_map, its own lower tables) maps
 * shared page i read-only at HV_USER_BASE + a * 2 MiB + i * 4 KiB for every alias a < A
 * (each alias in another leaf page table), and its P private frames writable at
 * HV_USER_BASE + 16 MiB + i * 4 KiB (qword j of private page i of space p starts as
 * ((p * P + i + 1) * 0x9E3779B97F4A7C15) ^ j).  Each round switches to every space in turn,
 * spins K iterations, sums qword 0 of every shared page through every alias, then adds 1 to
 * qword 0 of every private page and sums those.  Console output:
 *   "procs: round r checksum H16\n"                               for r = 1..R
 *   "procs: done procs=N shared=S aliases=A checksum H16\n"       (the sum of the round sums)
 * "procs: not enough memory\n" and status 2 if the heap cannot hold the frames; status 3 if
 * the page-table pool runs out; status 4 for parameters out of range.
 */
#include <hvsim.h>

#define PRIVATE_VA (HV_USER_BASE + (16UL << 20))
#define ALIAS_STRIDE (2UL << 20)

static void spin(unsigned long k)
{
    for (volatile unsigned long i = 0; i < k; i++)
        ;
}

int main(void)
{
    unsigned long n = hv_param("procs", 4), s = hv_param("shared", 16), a = hv_param("aliases", 2);
    unsigned long p = hv_param("private", 4), rounds = hv_param("rounds", 8), k = hv_param("spin", 20000);
    if (n < 1 || n > 32 || s < 1 || s > 512 || a < 1 || a > 8 || p > 512)
        return 4;
    unsigned long frames = s + n * p;
    if (frames * HV_PAGE_SIZE > hv_heap_size()) {
        hv_puts("procs: not enough memory\n");
        return 2;
    }
    unsigned char *heap = hv_heap();
    unsigned long shared_pa = (unsigned long)heap, private_pa = shared_pa + s * HV_PAGE_SIZE;
    memset(heap, 0x5a, s * HV_PAGE_SIZE);
    for (unsigned long q = 0; q < n * p; q++) {
        unsigned long *page = (unsigned long *)(private_pa + q * HV_PAGE_SIZE);
        for (unsigned long j = 0; j < 512; j++)
            page[j] = ((q + 1) * 0x9E3779B97F4A7C15UL) ^ j;
    }
    hv_as_t spaces[32];
    for (unsigned long q = 0; q < n; q++) {
        spaces[q] = hv_new_address_space();
        if (!spaces[q])
            return 3;
        hv_switch_address_space(spaces[q]);
        for (unsigned long al = 0; al < a; al++)
            for (unsigned long i = 0; i < s; i++)
                if (hv_map(HV_USER_BASE + al * ALIAS_STRIDE + i * HV_PAGE_SIZE, shared_pa + i * HV_PAGE_SIZE, 0))
                    return 3;
        for (unsigned long i = 0; i < p; i++)
            if (hv_map(PRIVATE_VA + i * HV_PAGE_SIZE, private_pa + (q * p + i) * HV_PAGE_SIZE, HV_MAP_WRITE))
                return 3;
    }
    unsigned long total = 0;
    for (unsigned long r = 1; r <= rounds; r++) {
        unsigned long sum = 0;
        for (unsigned long q = 0; q < n; q++) {
            hv_switch_address_space(spaces[q]);
            spin(k);
            for (unsigned long al = 0; al < a; al++)
                for (unsigned long i = 0; i < s; i++)
                    sum += *(volatile unsigned long *)(HV_USER_BASE + al * ALIAS_STRIDE + i * HV_PAGE_SIZE);
            for (unsigned long i = 0; i < p; i++) {
                volatile unsigned long *q0 = (volatile unsigned long *)(PRIVATE_VA + i * HV_PAGE_SIZE);
                *q0 += 1;
                sum += *q0;
            }
        }
        hv_printf("procs: round %lu checksum %016lx\n", r, sum);
        total += sum;
    }
    hv_printf("procs: done procs=%lu shared=%lu aliases=%lu checksum %016lx\n", n, s, a, total);
    return 0;
}
