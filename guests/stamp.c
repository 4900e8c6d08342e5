/*
 * stamp: every CPU writes iteration stamps to pseudo-random pages of a working set that
 * may span both memory slots, forever: the concurrent writers of KVM's dirty_log_test,
 * for checking that dirty tracking misses no page while several vCPUs write.
 *
 *   pages=N  working-set size in pages (default 1024), from base=A (default 16 MiB),
 *            following the memory map across the hole below 4 GiB
 *
 * Word 0 of a page holds the last stamp written to it: (iteration << 8) | cpu.
 */
#include "runtime/smp.h"

#define MAX_RANGES 16

static struct ram_range ws[MAX_RANGES];
static int nws;
static u64 npages;

static u64 page_addr(u64 i) { return ws_page(ws, nws, i); }

static void writer(u32 id)
{
    u64 x = 0x9e3779b97f4a7c15UL * (id + 1);
    for (u64 it = 1;; it++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *(volatile u64 *)page_addr(x % npages) = (it << 8) | id;
    }
}

int main(void)
{
    u64 base = cmdline_u64("base", 16UL << 20);
    npages = cmdline_u64("pages", 1024);
    nws = ws_build(base, npages, ws, MAX_RANGES);
    if (!nws) fail("working set does not fit in RAM");
    smp_start(writer);
    printf("stamp: %d cpus writing %lu pages in %d range(s)\n", cpu_count(), npages, nws);
    writer(0);
    return 0;
}
