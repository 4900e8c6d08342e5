/*
 * smp: every CPU stamps its own share of a working set, then (after a barrier) checks
 * the share the next CPU wrote; a lock-protected counter and a barrier per pass.
 *
 *   pages=N   working-set size in pages (default 256), at base=A (default 16 MiB)
 *   passes=N  passes, then exit 0 (0 = run forever; default 20)
 *   oninput   run until a byte arrives on COM1, then passes=N more (a test's handshake)
 *   quiet     report every 16th pass only
 *
 * A page of pass p written by CPU c holds: word 0 its address, word 1 p, word 2 c, the
 * last word address ^ p ^ c ^ SEED. Progress lives in guest RAM and on the CPUs' own
 * stacks, so a restored guest carries on where it was saved.
 */
#include "runtime/smp.h"

#define SEED 0x5eed5eed5eed5eedUL

static u64 base, npages, passes;
static int ncpu, quiet;
static struct barrier bar;
static spinlock_t lock;
static volatile u64 counter;
static volatile u32 bad;

static void stamp(u64 i, u64 p, u64 c)
{
    volatile u64 *w = (volatile u64 *)(base + i * PAGE_SIZE);
    u64 a = (u64)w;
    w[0] = a;
    w[1] = p;
    w[2] = c;
    w[511] = a ^ p ^ c ^ SEED;
}

static int good(u64 i, u64 p, u64 c)
{
    volatile u64 *w = (volatile u64 *)(base + i * PAGE_SIZE);
    u64 a = (u64)w;
    return w[0] == a && w[1] == p && w[2] == c && w[511] == (a ^ p ^ c ^ SEED);
}

static volatile u64 end;           /* the last pass (0: run on), set by CPU 0 */

static void work(u32 id)
{
    u64 p;
    for (p = 1; !end || p <= end; p++) {
        for (u64 i = id; i < npages; i += (u64)ncpu)
            stamp(i, p, id);
        spin_lock(&lock);
        counter++;
        spin_unlock(&lock);
        barrier_wait(&bar, (u32)ncpu);
        u32 other = (id + 1) % (u32)ncpu;
        for (u64 i = other; i < npages; i += (u64)ncpu)
            if (!good(i, p, other)) atomic_add(&bad, 1);
        barrier_wait(&bar, (u32)ncpu);
        if (id == 0) {
            if (bad) {
                printf("smp: pass %lu: %u bad pages\n", p, bad);
                exit(2);
            }
            if (counter != p * (u64)ncpu) {
                printf("smp: pass %lu: counter %lu, want %lu\n", p, counter, p * (u64)ncpu);
                exit(3);
            }
            if (!quiet || p % 16 == 0) printf("smp: pass %lu ok\n", p);
            end = loop_end(p, passes, end);
        }
        barrier_wait(&bar, (u32)ncpu);
    }
    if (id == 0) {
        printf("smp: verified %lu pages on %d cpus over %lu passes\n", npages, ncpu, p - 1);
        exit(0);
    }
    for (;;) hlt();
}

int main(void)
{
    base = cmdline_u64("base", 16UL << 20);
    npages = cmdline_u64("pages", 256);
    passes = cmdline_u64("passes", 20);
    quiet = cmdline_has("quiet");
    ncpu = cpu_count();
    struct ram_range r[16];
    int n = ram_ranges(r, 16), fits = 0;
    for (int i = 0; i < n; i++)
        if (r[i].start <= base && base + npages * PAGE_SIZE <= r[i].end) fits = 1;
    if (!fits) fail("working set does not fit in one RAM range");
    printf("smp: %d cpus, %lu pages from 0x%lx, %lu passes\n", ncpu, npages, base, passes);
    smp_start(work);
    printf("smp: all %d cpus online\n", ncpu);
    work(0);
    return 0;
}
