/*
 * virtio: drives kvmguest's virtio-mmio devices directly, as kvm-unit-tests' virtio tests
 * do (no Linux needed): finds them in the windows from 0xd0000000, negotiates features,
 * sets up a queue and checks what the device does.
 *
 *   (default)  blk: GET_ID, write sector 1 (a pattern), flush, read sectors 0-1 back and
 *              print sector 0's checksum; rng: a 64-byte buffer filled
 *   readonly   blk: the write must fail with IOERR and sector 1 keep its bytes
 *   loop       blk: a descriptor chain that loops: the device must say NEEDS_RESET
 *   console    console instead: write a line to hvc0, offer a receive buffer, print what
 *              arrives there (input given to the console) up to a newline
 *   net        net instead: send a frame (ethertype 0x88b5, "hello from the guest"), then
 *              wait for one back and print its payload
 *   reads=N    then read sector k (k = 2, 3, ... cycling over `sectors`), checking that it
 *              holds its own number, N times (0: forever); with oninput, N more after a
 *              byte on COM1 (a save races it: the restored guest goes on reading)
 *   writes=N   then write sector k (cycling) with (k, g), g counting writes, and read back
 *              another, checking it holds what this guest last wrote there (its RAM keeps
 *              that), or the image's (k, 0xaa..) if it never did; N times (0: forever),
 *              oninput as for reads; at the end every sector is checked. A disk restored
 *              from another instant than the RAM is caught
 */
#include "runtime/rt.h"

#define BASE 0xd0000000UL
#define WINDOW 0x1000
#define R(d, off) ((volatile u32 *)((d) + (off)))
#define ACK 1
#define DRIVER 2
#define DRIVER_OK 4
#define FEATURES_OK 8
#define NEEDS_RESET 64
#define QSIZE 16

struct desc { u64 addr; u32 len; u16 flags, next; } __attribute__((packed));
struct ring {
    struct desc desc[QSIZE];
    u16 avail_flags, avail_idx, avail[QSIZE], used_event;
    u8 pad[4096 - 16 * QSIZE - 6 - 2 * QSIZE];
    u16 used_flags, used_idx;
    struct { u32 id, len; } used[QSIZE];
    u16 avail_event;
} __attribute__((aligned(4096)));

static struct ring blkq, rngq;
static u8 header[16] __attribute__((aligned(16)));
static u8 data[1024] __attribute__((aligned(512)));
static volatile u8 status;
static u16 last_used;

static u64 find(u32 id)
{
    for (int i = 0; i < 8; i++) {
        u64 d = BASE + (u64)i * WINDOW;
        if (*R(d, 0) == 0x74726976 && *R(d, 8) == id) return d;
    }
    return 0;
}

static void cpu_relax_(void) { __asm__ volatile("pause" ::: "memory"); }

static void queue(u64 d, u32 index, struct ring *q)
{
    *R(d, 0x30) = index;
    *R(d, 0x38) = QSIZE;
    *R(d, 0x80) = (u32)(u64)q->desc; *R(d, 0x84) = 0;
    *R(d, 0x90) = (u32)(u64)&q->avail_flags; *R(d, 0x94) = 0;
    *R(d, 0xa0) = (u32)(u64)&q->used_flags; *R(d, 0xa4) = 0;
    *R(d, 0x44) = 1;
}

static struct ring netq[2], conq[2];
static u8 conin[64], conout[64];
static u8 rxbuf[2048], txbuf[128];

/* Offer one receive buffer, send one frame, wait for a frame back. */
static int net(u64 d)
{
    u8 mac[6];
    for (int i = 0; i < 6; i++) mac[i] = *(volatile u8 *)(d + 0x100 + i);
    printf("virtio: net at 0x%lx, mac %x:%x:%x:%x:%x:%x\n", d, mac[0], mac[1], mac[2], mac[3],
           mac[4], mac[5]);
    netq[0].desc[0] = (struct desc){ (u64)rxbuf, sizeof(rxbuf), 2, 0 };
    netq[0].avail[0] = 0;
    netq[0].avail_idx = 1;
    *R(d, 0x50) = 0;
    const char *msg = "hello from the guest";
    u32 n = 12;                                        /* virtio_net_hdr_v1: zeros */
    for (int i = 0; i < 6; i++) txbuf[n++] = 0xff;
    for (int i = 0; i < 6; i++) txbuf[n++] = mac[i];
    txbuf[n++] = 0x88; txbuf[n++] = 0xb5;
    for (const char *c = msg; *c; c++) txbuf[n++] = (u8)*c;
    while (n < 12 + 60) txbuf[n++] = 0;
    netq[1].desc[0] = (struct desc){ (u64)txbuf, n, 0, 0 };
    netq[1].avail[0] = 0;
    netq[1].avail_idx = 1;
    __asm__ volatile("mfence" ::: "memory");
    *R(d, 0x50) = 1;
    while (*(volatile u16 *)&netq[1].used_idx == 0) cpu_relax_();
    printf("virtio: frame sent\n");
    for (u16 got = 1;; got++) {            /* frames of other kinds (IPv6 ND...) skipped */
        while (*(volatile u16 *)&netq[0].used_idx != got) cpu_relax_();
        u32 len = netq[0].used[(got - 1) % QSIZE].len;
        if (len > 12 + 14 && rxbuf[12 + 12] == 0x88 && rxbuf[12 + 13] == 0xb5) {
            rxbuf[len < sizeof(rxbuf) ? len : sizeof(rxbuf) - 1] = 0;
            printf("virtio: frame received: %s\n", (char *)rxbuf + 12 + 14);
            return 0;
        }
        netq[0].avail[got % QSIZE] = 0;    /* the same buffer again */
        __asm__ volatile("mfence" ::: "memory");
        netq[0].avail_idx = (u16)(got + 1);
        *R(d, 0x50) = 0;
    }
}

static int setup(u64 d, struct ring *q, u32 want_lo)
{
    *R(d, 0x70) = 0;
    *R(d, 0x70) = ACK | DRIVER;
    *R(d, 0x14) = 1;
    if (!(*R(d, 0x10) & 1)) { printf("virtio: no VERSION_1\n"); return 0; }
    *R(d, 0x14) = 0;
    u32 lo = *R(d, 0x10) & want_lo;
    *R(d, 0x24) = 0; *R(d, 0x20) = lo;
    *R(d, 0x24) = 1; *R(d, 0x20) = 1;               /* VERSION_1 */
    *R(d, 0x70) = ACK | DRIVER | FEATURES_OK;
    if (!(*R(d, 0x70) & FEATURES_OK)) { printf("virtio: features refused\n"); return 0; }
    *R(d, 0x30) = 0;
    if (*R(d, 0x34) < QSIZE) { printf("virtio: queue too small\n"); return 0; }
    queue(d, 0, q);
    if (q == &netq[0]) queue(d, 1, &netq[1]);
    if (q == &conq[0]) queue(d, 1, &conq[1]);
    *R(d, 0x70) = ACK | DRIVER | FEATURES_OK | DRIVER_OK;
    return 1;
}

/* Make chain 0..n-1 available, notify, wait for the device to use it; its used length. */
static u32 submit(u64 d, struct ring *q, int n)
{
    for (int i = 0; i < n - 1; i++) { q->desc[i].flags |= 1; q->desc[i].next = (u16)(i + 1); }
    q->avail[q->avail_idx % QSIZE] = 0;
    __asm__ volatile("" ::: "memory");
    q->avail_idx++;
    __asm__ volatile("mfence" ::: "memory");
    *R(d, 0x50) = 0;
    while (*(volatile u16 *)&q->used_idx == last_used)
        if (*R(d, 0x70) & NEEDS_RESET) return ~0u;
    last_used++;
    *R(d, 0x64) = *R(d, 0x60);                      /* ack the interrupt */
    return q->used[(last_used - 1) % QSIZE].len;
}

static u32 request(u64 d, u32 type, u64 sector, void *buf, u32 len, int device_writes)
{
    *(u32 *)header = type; *(u32 *)(header + 4) = 0; *(u64 *)(header + 8) = sector;
    status = 0xff;
    blkq.desc[0] = (struct desc){ (u64)header, 16, 0, 0 };
    int n = 1;
    if (len) blkq.desc[n++] = (struct desc){ (u64)buf, len, device_writes ? 2 : 0, 0 };
    blkq.desc[n++] = (struct desc){ (u64)&status, 1, 2, 0 };
    submit(d, &blkq, n);
    return status;
}

static u32 sum(const u8 *p, u32 n) { u32 s = 0; for (u32 i = 0; i < n; i++) s = s * 31 + p[i]; return s; }


static int console(u64 d)
{
    const char *msg = "virtio: hello on hvc0\n";
    u32 n = 0;
    for (const char *c = msg; *c; c++) conout[n++] = (u8)*c;
    conq[1].desc[0] = (struct desc){ (u64)conout, n, 0, 0 };
    conq[1].avail[0] = 0;
    conq[1].avail_idx = 1;
    __asm__ volatile("mfence" ::: "memory");
    *R(d, 0x50) = 1;
    while (*(volatile u16 *)&conq[1].used_idx == 0) cpu_relax_();
    char line[128];
    u32 got = 0;
    for (u16 used = 0; got < sizeof(line) - 1;) {
        conq[0].desc[0] = (struct desc){ (u64)conin, sizeof(conin), 2, 0 };
        conq[0].avail[used % QSIZE] = 0;
        __asm__ volatile("mfence" ::: "memory");
        conq[0].avail_idx = (u16)(used + 1);
        *R(d, 0x50) = 0;
        while (*(volatile u16 *)&conq[0].used_idx == used) cpu_relax_();
        u32 len = conq[0].used[used % QSIZE].len;
        used++;
        for (u32 i = 0; i < len && got < sizeof(line) - 1; i++) line[got++] = (char)conin[i];
        if (got && line[got - 1] == '\n') break;
    }
    line[got] = 0;
    printf("virtio: hvc0 input: %s", line);
    return 0;
}

int main(void)
{
    map_2m(BASE);
    if (cmdline_has("console")) {
        u64 d = find(3);
        if (!d) { printf("virtio: no console device\n"); return 1; }
        if (!setup(d, &conq[0], 0)) return 1;
        return console(d);
    }
    if (cmdline_has("net")) {
        u64 d = find(1);
        if (!d) { printf("virtio: no network device\n"); return 1; }
        if (!setup(d, &netq[0], 1u << 5)) return 1;
        return net(d);
    }
    u64 blk = find(2), rng = find(4);
    if (!blk) { printf("virtio: no block device\n"); return 1; }
    if (!setup(blk, &blkq, 1u << 9)) return 1;
    u64 sectors = *(volatile u64 *)(blk + 0x100);
    printf("virtio: blk at 0x%lx, %lu sectors\n", blk, sectors);

    if (cmdline_has("loop")) {
        blkq.desc[0] = (struct desc){ (u64)header, 16, 1, 1 };
        blkq.desc[1] = (struct desc){ (u64)data, 512, 1, 0 };     /* next: back to 0 */
        blkq.avail[blkq.avail_idx % QSIZE] = 0;
        blkq.avail_idx++;
        *R(blk, 0x50) = 0;
        while (!(*R(blk, 0x70) & NEEDS_RESET)) cpu_relax_();  /* served in another thread */
        printf("virtio: looping chain: status 0x%x%s\n", *R(blk, 0x70),
               (*R(blk, 0x70) & NEEDS_RESET) ? " (needs reset)" : "");
        return 0;
    }

    u8 id[20] = {0};
    request(blk, 8, 0, id, 20, 1);
    printf("virtio: id %s\n", (char *)id);
    for (int i = 0; i < 512; i++) data[i] = (u8)(i * 7 + 1);
    u32 st = request(blk, 1, 1, data, 512, 0);
    printf("virtio: write status %u\n", st);
    printf("virtio: flush status %u\n", request(blk, 4, 0, 0, 0, 0));
    for (int i = 0; i < 1024; i++) data[i] = 0;
    st = request(blk, 0, 0, data, 1024, 1);
    printf("virtio: read status %u, sector 0 sum %x, sector 1 sum %x\n", st, sum(data, 512),
           sum(data + 512, 512));

    if (rng && setup(rng, &rngq, 0)) {
        static u8 random[64];
        rngq.desc[0] = (struct desc){ (u64)random, 64, 2, 0 };
        last_used = 0;
        u32 got = submit(rng, &rngq, 1);
        printf("virtio: rng gave %u bytes, sum %x\n", got, sum(random, 64));
        last_used = blkq.used_idx;
    }

    u64 n = cmdline_u64("writes", ~0UL);
    if (n != ~0UL) {
        static u64 wrote[4096];                    /* what each sector was last given */
        u64 stop = 0, span = sectors - 2;
        if (sectors > 4096) span = 4096 - 2;
        for (u64 g = 1; !stop || g <= stop; g++) {
            u64 k = 2 + (g * 7) % span, c = 2 + (g * 13 + 5) % span;
            for (int i = 0; i < 512; i++) data[i] = (u8)(g + i);
            ((u64 *)data)[0] = k; ((u64 *)data)[1] = g;
            if (request(blk, 1, k, data, 512, 0) != 0) {
                printf("virtio: BAD write %lu to sector %lu\n", g, k);
                return 2;
            }
            wrote[k] = g;
            if (request(blk, 0, c, data, 512, 1) != 0 || ((u64 *)data)[0] != c ||
                ((u64 *)data)[1] != (wrote[c] ? wrote[c] : 0xaaaaaaaaaaaaaaaaUL)) {
                printf("virtio: BAD write %lu: sector %lu holds (%lu, %lx), last given %lu\n",
                       g, c, ((u64 *)data)[0], ((u64 *)data)[1], wrote[c]);
                return 2;
            }
            if (g % 256 == 0) printf("virtio: write %lu ok\n", g);
            stop = loop_end(g, n, stop);
        }
        for (u64 k = 2; k < 2 + span; k++)
            if (request(blk, 0, k, data, 512, 1) != 0 || ((u64 *)data)[0] != k ||
                ((u64 *)data)[1] != (wrote[k] ? wrote[k] : 0xaaaaaaaaaaaaaaaaUL)) {
                printf("virtio: BAD sector %lu at the end\n", k);
                return 2;
            }
        printf("virtio: every write kept\n");
        return 0;
    }

    u64 reads = cmdline_u64("reads", 0), end = 0;
    if (!cmdline_has("reads=0") && !reads) return 0;
    for (u64 r = 1; !end || r <= end; r++) {
        u64 k = 2 + r % (sectors - 2);
        if (request(blk, 0, k, data, 512, 1) != 0 || *(u64 *)data != k) {
            printf("virtio: BAD read %lu: sector %lu holds %lu\n", r, k, *(u64 *)data);
            return 2;
        }
        if (r % 256 == 0) printf("virtio: read %lu ok\n", r);
        end = loop_end(r, reads, end);
    }
    printf("virtio: every read right\n");
    return 0;
}
