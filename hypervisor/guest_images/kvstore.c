/* kvstore - a key-value store: an open-addressing hash table over the heap, driven by a
 * get/put mix with uniform or zipfian keys from a deterministic PRNG.
 *
 * Command-line parameters:
 *   keys=N       distinct keys                                        (default 4096)
 *   ops=O        operations                                           (default 50000)
 *   get_pct=G    percentage of operations that are gets               (default 90)
 *   value_size=V bytes per value, rounded up to 8                     (default 64)
 *   zipf=Z       1: zipfian keys (rank r drawn with weight 1/r); 0: uniform (default 1)
 *   seed=S       PRNG seed (splitmix64)                               (default 1)
 *
 * The table has the next power of two >= 2N slots of {key, value offset}; values live in a
 * slab after it, allocated on a key's first put.  A get of a key never put is a miss.  A put
 * writes V bytes derived from the key and the operation number.  Every get folds the value's
 * qwords into the checksum.  Console output:
 *   "kvstore: keys=N ops=O gets=G puts=P hits=H checksum H16\n"
 * and "kvstore: not enough memory\n" with status 2 if the heap is too small.
 */
#include <hvsim.h>

static unsigned long state;

static unsigned long splitmix64(void)
{
    unsigned long z = (state += 0x9E3779B97F4A7C15UL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
    return z ^ (z >> 31);
}

struct slot {
    unsigned long key; /* key + 1; 0 = empty */
    unsigned long value;
};

int main(void)
{
    unsigned long keys = hv_param("keys", 4096), ops = hv_param("ops", 50000);
    unsigned long get_pct = hv_param("get_pct", 90), zipf = hv_param("zipf", 1);
    unsigned long vq = (hv_param("value_size", 64) + 7) / 8;
    state = hv_param("seed", 1);
    unsigned long nslots = 1;
    while (nslots < 2 * keys)
        nslots <<= 1;
    unsigned long need = nslots * sizeof(struct slot) + keys * 8 + keys * vq * 8;
    if (keys == 0 || vq == 0 || need > hv_heap_size()) {
        hv_puts("kvstore: not enough memory\n");
        return 2;
    }
    struct slot *table = hv_heap();
    unsigned long *cdf = (unsigned long *)(table + nslots); /* zipf: cumulative weights of ranks 1..N */
    unsigned long *slab = cdf + keys, slab_used = 0;
    unsigned long total = 0;
    for (unsigned long r = 0; r < keys; r++)
        cdf[r] = total += (1UL << 40) / (r + 1);
    unsigned long gets = 0, puts = 0, hits = 0, sum = 0;
    for (unsigned long op = 0; op < ops; op++) {
        unsigned long key, x = splitmix64();
        if (zipf) {
            unsigned long target = x % total, lo = 0, hi = keys - 1;
            while (lo < hi) { /* the first rank whose cumulative weight exceeds target */
                unsigned long mid = (lo + hi) / 2;
                if (cdf[mid] > target)
                    hi = mid;
                else
                    lo = mid + 1;
            }
            key = lo;
        } else {
            key = x % keys;
        }
        int is_get = splitmix64() % 100 < get_pct;
        unsigned long h = (key * 0x9E3779B97F4A7C15UL) >> 20;
        struct slot *s = &table[h & (nslots - 1)];
        while (s->key && s->key != key + 1) /* linear probing */
            s = &table[(s - table + 1) & (nslots - 1)];
        if (is_get) {
            gets++;
            if (s->key) {
                hits++;
                for (unsigned long i = 0; i < vq; i++)
                    sum += slab[s->value + i];
            }
        } else {
            puts++;
            if (!s->key) {
                s->key = key + 1;
                s->value = slab_used;
                slab_used += vq;
            }
            for (unsigned long i = 0; i < vq; i++)
                slab[s->value + i] = (key << 32) ^ (op * 0x9E3779B97F4A7C15UL) ^ i;
        }
    }
    hv_printf("kvstore: keys=%lu ops=%lu gets=%lu puts=%lu hits=%lu checksum %016lx\n", keys, ops, gets, puts, hits,
              sum);
    return 0;
}
