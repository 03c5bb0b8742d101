/* bootstorm - a boot storm: every VM loads the same image data, then the VMs diverge slowly,
 * the classic KSM win (many identical guests booted from one image).
 *
 * Command-line parameters:
 *   image=M      pages of "image" loaded at boot, identical in every VM   (default 256)
 *   diverge=D    pages each VM rewrites with its own data per pass        (default 4)
 *   passes=K     passes                                                   (default 40)
 *   spin=S       delay-loop iterations before each pass                   (default 200000)
 *
 * Boot: fills M pages with a xorshift64 stream seeded 0x2545F4914F6CDD1D (the same in every
 * VM; the "image").  Then K passes of: spin S, rewrite qword 1 of D pages chosen by a PRNG
 * seeded by the VM index (so each VM dirties different pages), sum qword 0 and 1 of every
 * page.  Console output: "bootstorm: booted M pages image H16\n", then per pass
 * "bootstorm: pass k diverged N checksum H16\n" (N = distinct pages this VM has rewritten
 * so far); "bootstorm: not enough memory\n" and status 2 if the heap is too small.
 */
#include <hvsim.h>

static void spin(unsigned long n)
{
    while (n--)
        __asm__ volatile("");
}

static unsigned long xorshift64(unsigned long *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

int main(void)
{
    unsigned long pages = hv_param("image", 256), diverge = hv_param("diverge", 4);
    unsigned long passes = hv_param("passes", 40), delay = hv_param("spin", 200000);
    /* one byte per page marks the pages this VM has rewritten; it lives after the image */
    unsigned long marks_pages = (pages + HV_PAGE_SIZE - 1) / HV_PAGE_SIZE;
    if (pages == 0 || pages + marks_pages > hv_heap_size() / HV_PAGE_SIZE) {
        hv_puts("bootstorm: not enough memory\n");
        return 2;
    }
    unsigned long *image = hv_heap();
    unsigned char *marks = (unsigned char *)(image + pages * 512);
    unsigned long x = 0x2545F4914F6CDD1DUL, sum = 0;
    for (unsigned long i = 0; i < pages * 512; i++)
        sum += image[i] = xorshift64(&x);
    hv_printf("bootstorm: booted %lu pages image %016lx\n", pages, sum);
    unsigned long rng = (hv_vm_index() + 1) * 0x9E3779B97F4A7C15UL, diverged = 0;
    for (unsigned long pass = 1; pass <= passes; pass++) {
        spin(delay);
        for (unsigned long d = 0; d < diverge; d++) {
            unsigned long page = xorshift64(&rng) % pages;
            image[page * 512 + 1] = rng;
            if (!marks[page]) {
                marks[page] = 1;
                diverged++;
            }
        }
        sum = 0;
        for (unsigned long i = 0; i < pages; i++)
            sum += image[i * 512] + image[i * 512 + 1];
        hv_printf("bootstorm: pass %lu diverged %lu checksum %016lx\n", pass, diverged, sum);
    }
    return 0;
}
