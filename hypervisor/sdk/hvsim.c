/* hvsim.c - the hvsim guest SDK's runtime: boot parameters, console, printf, command line,
 * heap, string routines, and start-up (see hvsim.h for the API, crt0.S for the entry). */
#include "hvsim.h"

#include <stdarg.h>

#define COM1_PORT 0x3f8
#define EXIT_PORT 0xf4
#define BP_OFF_MEM_SIZE 8
#define BP_OFF_VM_INDEX 16
#define BP_OFF_CMDLINE_LEN 32
#define BP_OFF_HEAP_START 40
#define BP_OFF_CMDLINE 64
#define CMDLINE_MAX (4096 - 64 - 1)
#define IDENTITY_MAP_SIZE 0x40000000UL

unsigned char *hv_boot_params; /* set by _start */
extern char _end[];            /* end of the image (guest.ld) */

void hv_mmu_init(void);        /* hv_mmu.c */
void hv_idt_init(void);

static unsigned long bp_u64(unsigned off) { return *(volatile unsigned long *)(hv_boot_params + off); }

static inline void outb(unsigned short port, unsigned char value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

void hv_putc(char c) { outb(COM1_PORT, (unsigned char)c); }

void hv_puts(const char *s)
{
    while (*s)
        hv_putc(*s++);
}

_Noreturn void hv_exit(int status)
{
    outb(EXIT_PORT, (unsigned char)status);
    for (;;)
        __asm__ volatile("hlt");
}

unsigned long hv_mem_size(void) { return bp_u64(BP_OFF_MEM_SIZE); }
unsigned hv_vm_index(void) { return (unsigned)bp_u64(BP_OFF_VM_INDEX); }

void *hv_heap(void)
{
    unsigned long start = bp_u64(BP_OFF_HEAP_START);
    unsigned long end = ((unsigned long)_end + HV_PAGE_SIZE - 1) & ~(HV_PAGE_SIZE - 1);
    return (void *)(end > start ? end : start);
}

unsigned long hv_heap_size(void)
{
    unsigned long top = hv_mem_size() < IDENTITY_MAP_SIZE ? hv_mem_size() : IDENTITY_MAP_SIZE;
    unsigned long start = (unsigned long)hv_heap();
    return top > start ? (top - start) & ~(HV_PAGE_SIZE - 1) : 0;
}

unsigned long hv_rdtsc(void)
{
    unsigned lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((unsigned long)hi << 32) | lo;
}

/* memset and memcpy move qwords (rep stosq/movsq) and then the remaining bytes. */
void *memset(void *dst, int c, unsigned long n)
{
    void *d = dst;
    unsigned long q = n >> 3, r = n & 7, v = (unsigned char)c * 0x0101010101010101UL;
    __asm__ volatile("rep stosq" : "+D"(d), "+c"(q) : "a"(v) : "memory");
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(r) : "a"(v) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, unsigned long n)
{
    void *d = dst;
    unsigned long q = n >> 3, r = n & 7;
    __asm__ volatile("rep movsq" : "+D"(d), "+S"(src), "+c"(q) : : "memory");
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(r) : : "memory");
    return dst;
}

int memcmp(const void *a, const void *b, unsigned long n)
{
    const unsigned char *x = a, *y = b;
    for (unsigned long i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

unsigned long strlen(const char *s)
{
    unsigned long n = 0;
    while (s[n])
        n++;
    return n;
}

/* The command line, parsed as lib.S's cmdline_get does. */
unsigned long hv_param(const char *key, unsigned long dflt)
{
    const char *p = (const char *)hv_boot_params + BP_OFF_CMDLINE;
    unsigned long len = bp_u64(BP_OFF_CMDLINE_LEN);
    const char *end = p + (len > CMDLINE_MAX ? CMDLINE_MAX : len);
    unsigned long result = dflt;
    while (p < end && *p) {
        if ((unsigned char)*p <= 0x20) {
            p++;
            continue;
        }
        const char *t = p, *k = key;
        while (*k && t < end && *t == *k)
            t++, k++;
        if (!*k && t < end && *t == '=') {
            t++;
            unsigned long base = 10, value = 0;
            if (t + 2 <= end && t[0] == '0' && (t[1] | 0x20) == 'x') {
                t += 2;
                base = 16;
            }
            const char *digits = t;
            int valid = 1;
            while (t < end && (unsigned char)*t > 0x20) {
                unsigned c = (unsigned char)*t, d;
                if (c - '0' < 10)
                    d = c - '0';
                else if (((c | 0x20) - 'a') < 6)
                    d = (c | 0x20) - 'a' + 10;
                else {
                    valid = 0;
                    break;
                }
                if (d >= base) {
                    valid = 0;
                    break;
                }
                value = value * base + d;
                t++;
            }
            if (valid && t > digits)
                result = value;
        }
        while (p < end && (unsigned char)*p > 0x20) /* the rest of the token */
            p++;
    }
    return result;
}

/* hv_printf */
static int put_field(const char *s, unsigned long n, int width, int left, char pad)
{
    int out = 0;
    if (!left)
        for (; width > (int)n; width--, out++)
            hv_putc(pad);
    for (unsigned long i = 0; i < n; i++, out++)
        hv_putc(s[i]);
    for (; width > out; out++)
        hv_putc(' ');
    return out;
}

static int put_number(unsigned long v, int neg, unsigned base, const char *prefix, int width, int left, int zero)
{
    char buf[24];
    int n = 0, plen = (int)strlen(prefix) + neg;
    do {
        buf[sizeof buf - 1 - n++] = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    int out = 0;
    if (zero && !left) {
        if (neg)
            hv_putc('-'), out++;
        hv_puts(prefix);
        out += (int)strlen(prefix);
        for (int w = width - plen; w > n; w--, out++)
            hv_putc('0');
        return out + put_field(buf + sizeof buf - n, (unsigned long)n, 0, 0, ' ');
    }
    char tmp[32];
    int t = 0;
    if (neg)
        tmp[t++] = '-';
    for (const char *q = prefix; *q; q++)
        tmp[t++] = *q;
    for (int i = 0; i < n; i++)
        tmp[t++] = buf[sizeof buf - n + i];
    return put_field(tmp, (unsigned long)t, width, left, ' ');
}

int hv_printf(const char *fmt, ...)
{
    va_list ap;
    int out = 0;
    va_start(ap, fmt);
    for (const char *f = fmt; *f; f++) {
        if (*f != '%') {
            hv_putc(*f);
            out++;
            continue;
        }
        f++;
        int left = 0, zero = 0, width = 0, lng = 0;
        for (;; f++) {
            if (*f == '-')
                left = 1;
            else if (*f == '0')
                zero = 1;
            else
                break;
        }
        while (*f >= '0' && *f <= '9')
            width = width * 10 + (*f++ - '0');
        while (*f == 'l')
            lng = 1, f++;
        switch (*f) {
        case 'd': {
            long v = lng ? va_arg(ap, long) : va_arg(ap, int);
            unsigned long mag = v < 0 ? 0UL - (unsigned long)v : (unsigned long)v;
            out += put_number(mag, v < 0, 10, "", width, left, zero);
            break;
        }
        case 'u':
            out += put_number(lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 0, 10, "", width, left, zero);
            break;
        case 'x':
            out += put_number(lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned), 0, 16, "", width, left, zero);
            break;
        case 'p':
            out += put_number((unsigned long)va_arg(ap, void *), 0, 16, "0x", width, left, zero);
            break;
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            out += put_field(s, strlen(s), width, left, ' ');
            break;
        }
        case 'c': {
            char c = (char)va_arg(ap, int);
            out += put_field(&c, 1, width, left, ' ');
            break;
        }
        case '%':
            hv_putc('%');
            out++;
            break;
        case '\0':
            f--;
            break;
        default: /* not a conversion hv_printf knows: print it as it is */
            hv_putc('%');
            hv_putc(*f);
            out += 2;
        }
    }
    va_end(ap);
    return out;
}

_Noreturn void hv_start(void);
_Noreturn void hv_start(void)
{
    hv_mmu_init();
    hv_idt_init();
    hv_exit(main());
}
