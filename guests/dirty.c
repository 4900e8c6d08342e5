/*
 * dirty: keeps re-writing a working set of pages, stamping each page with its pass
 * number, and verifies the whole set against its own record after every pass.
 *
 *   pages=N   working-set size in pages (default 256)
 *   base=A    first guest-physical address (default: 2 MiB above the image)
 *   passes=N  passes to run, then exit 0 (0 = run forever; default 4)
 *   oninput   run until a byte arrives on COM1, then passes=N more (a test's handshake:
 *             a guest raced by a save never finishes first, whatever the host's speed)
 *   quiet     print only every 16th pass
 *   flush     after stamping a page, ask pc-testdev to flush it (port 0xe4): the VMM
 *             write-protects the page for a moment, racing whatever reads guest RAM
 *             (a hostile guest's move; the hardening tests use it)
 *   hold      after the last pass, say "dirty: holding" and halt with interrupts off
 *             instead of exiting (its memory then stays as it is: for saving it
 *             several ways, as the QEMU-file tests do)
 *
 * The working set is the first N RAM pages at or above base, following the memory
 * map across holes (so it spans both memory slots when RAM crosses 3 GiB).
 * A page of pass p holds: word 0 = its own address, word 1 = p, last word =
 * address ^ p ^ SEED.  The record is just (pass, cursor): pages below the cursor
 * carry `pass`, the rest `pass - 1`.  Progress lives in guest RAM, so a restored
 * guest carries on from where it was saved.
 */
#include "runtime/rt.h"

#define SEED 0x5eed5eed5eed5eedUL
#define MAX_RANGES 16

static struct ram_range ws[MAX_RANGES];  /* the working set, as address ranges */
static int nws;
static u64 npages;
static volatile u64 pass, cursor;         /* the record */

static u64 page_addr(u64 i) { return ws_page(ws, nws, i); }

static void stamp(u64 addr, u64 p)
{
    volatile u64 *w = (volatile u64 *)addr;
    w[0] = addr;
    w[1] = p;
    w[511] = addr ^ p ^ SEED;
}

static u64 verify(void)
{
    u64 bad = 0;
    for (int r = 0, i = 0; r < nws; r++) {
        for (u64 a = ws[r].start; a < ws[r].end; a += PAGE_SIZE, i++) {
            u64 want = (u64)i < cursor ? pass : pass - 1;
            volatile u64 *w = (volatile u64 *)a;
            if (want == 0 && w[0] == 0 && w[1] == 0 && w[511] == 0) continue;
            if (w[0] != a || w[1] != want || w[511] != (a ^ want ^ SEED)) {
                if (bad < 8)
                    printf("BAD page 0x%lx: have (0x%lx, %lu, 0x%lx) want pass %lu\n",
                           a, w[0], w[1], w[511], want);
                bad++;
            }
        }
    }
    return bad;
}

int main(void)
{
    u64 base = cmdline_u64("base", ((u64)_end_image + (4UL << 20)) & ~((2UL << 20) - 1));
    npages = cmdline_u64("pages", 256);
    u64 passes = cmdline_u64("passes", 4);
    int quiet = cmdline_has("quiet");
    int flush = cmdline_has("flush");

    nws = ws_build(base, npages, ws, MAX_RANGES);
    if (!nws) fail("working set does not fit in RAM");
    printf("dirty: %lu pages in %d range(s) from 0x%lx, %lu passes\n",
           npages, nws, ws[0].start, passes);
    for (int r = 0; r < nws; r++)
        printf("dirty: range 0x%lx-0x%lx\n", ws[r].start, ws[r].end);

    pass = 1;
    u64 end = 0;
    for (;;) {
        for (cursor = 0; cursor < npages; cursor++) {
            stamp(page_addr(cursor), pass);
            if (flush)
                outl(TESTDEV_FLUSH_PORT, (u32)page_addr(cursor));
        }
        u64 bad = verify();
        if (bad) {
            printf("dirty: pass %lu: %lu bad pages\n", pass, bad);
            return 2;
        }
        if (!quiet || pass % 16 == 0)
            printf("dirty: pass %lu ok\n", pass);
        end = loop_end(pass, passes, end);
        if (end && pass >= end) break;
        pass++;
    }
    printf("dirty: verified %lu pages over %lu passes\n", npages, pass);
    if (cmdline_has("hold")) {
        printf("dirty: holding\n");
        for (;;) __asm__ volatile("cli; hlt");
    }
    return 0;
}
