/*
 * fixture: a guest made for kvmguest's test fixtures. It sets up a working set (its
 * "slow boot"), asks for a snapshot there through the kvmguest port, then obeys console
 * commands, one per line:
 *
 *   write K   change the first K pages of the working set (and count the command)
 *   check     say whether every page is as set up: "fixture: clean after N commands"
 *             or "fixture: dirty: P pages changed, N commands"
 *   migrate   ask for a migration through the port, then check every page
 *   exit      exit 0
 *
 *   pages=N   working-set size (default 256); base=A its first address
 *
 * A page of the working set holds its own address ^ SEED in word 0 and 0 in word 1; a
 * write stores the command count in word 1. After a reset to the snapshot every page is
 * clean again and the command count is back to 0.
 */
#include "runtime/smp.h"

#define SEED 0x5eed5eed5eed5eedUL
#define MAX_RANGES 16
#define VECTOR 0x44

static struct ram_range ws[MAX_RANGES];
static int nws;
static u64 npages;
static volatile u64 commands;

static u64 changed(void)
{
    u64 bad = 0;
    for (u64 i = 0; i < npages; i++) {
        volatile u64 *w = (volatile u64 *)ws_page(ws, nws, i);
        if (w[0] != (ws_page(ws, nws, i) ^ SEED) || w[1] != 0) bad++;
    }
    return bad;
}

static u64 parse_u64(const char *s)
{
    u64 v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
    return v;
}

int main(void)
{
    u64 base = cmdline_u64("base", ((u64)_end_image + (4UL << 20)) & ~((2UL << 20) - 1));
    npages = cmdline_u64("pages", 256);
    nws = ws_build(base, npages, ws, MAX_RANGES);
    if (!nws) fail("working set does not fit in RAM");
    for (u64 i = 0; i < npages; i++) {
        volatile u64 *w = (volatile u64 *)ws_page(ws, nws, i);
        w[0] = ws_page(ws, nws, i) ^ SEED;
        w[1] = 0;
    }
    cpu_count();
    apic_init();
    console_input_init(VECTOR);
    printf("fixture: %lu pages set up\n", npages);
    int snapshot = kvmguest_request(KVMGUEST_READY);
    printf("fixture: ready (%s, restored %u)\n", snapshot ? "from the snapshot" : "no snapshot",
           inl(KVMGUEST_PORT));

    char line[128];
    for (;;) {
        read_line(line, sizeof(line));
        if (!strncmp(line, "write ", 6)) {
            u64 k = parse_u64(line + 6);
            commands++;
            for (u64 i = 0; i < k && i < npages; i++)
                ((volatile u64 *)ws_page(ws, nws, i))[1] = commands;
            printf("fixture: wrote %lu pages\n", k < npages ? k : npages);
        } else if (!strncmp(line, "check", 5)) {
            u64 bad = changed();
            if (bad) printf("fixture: dirty: %lu pages changed, %lu commands\n", bad, commands);
            else printf("fixture: clean after %lu commands\n", commands);
        } else if (!strncmp(line, "migrate", 7)) {
            int migrated = kvmguest_request(KVMGUEST_MIGRATE);
            u64 bad = changed();
            printf("fixture: %s (restored %u), %lu pages changed, %lu commands\n",
                   migrated ? "migrated" : "not migrated", inl(KVMGUEST_PORT), bad, commands);
        } else if (!strncmp(line, "exit", 4)) {
            printf("fixture: bye\n");
            return 0;
        } else {
            printf("fixture: unknown command '%s'\n", line);
        }
    }
}
