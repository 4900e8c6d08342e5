/*
 * ipi: CPU 0 sends fixed IPIs to every other CPU in turn; each answers with an IPI back.
 * Every IPI is counted on both sides and checked; the round-trip time is printed in TSC
 * cycles. With one CPU, CPU 0 sends itself IPIs.
 *
 *   rounds=N  rounds over all targets, then exit 0 (0 = forever; default 200)
 *   oninput   run until a byte arrives on COM1, then rounds=N more (a test's handshake)
 *   quiet     report every 256th round only
 */
#include "runtime/smp.h"

#define PING 0x50
#define PONG 0x51

static volatile u64 received[MAX_CPUS], replies, sent;
static int ncpu;

static void on_ping(u32 v)
{
    u32 id = cpu_id();
    received[id]++;
    apic_send_ipi(0, PONG);
}

static void on_pong(u32 v) { replies++; }

static void idle(u32 id)
{
    for (;;) sti_hlt();
}

int main(void)
{
    u64 rounds = cmdline_u64("rounds", 200);
    int quiet = cmdline_has("quiet");
    ncpu = cpu_count();
    set_irq_handler(PING, on_ping);
    set_irq_handler(PONG, on_pong);
    smp_start(idle);
    printf("ipi: %d cpus, %lu rounds\n", ncpu, rounds);
    u64 cycles = 0, best = ~0UL;
    u64 end = 0;
    for (u64 r = 1; !end || r <= end; r++) {
        for (int t = ncpu > 1 ? 1 : 0; t < ncpu; t++) {
            u64 want = replies + 1;
            u64 t0 = rdtsc();
            sent++;
            apic_send_ipi((u32)t, PING);
            sti();
            while (replies < want) cpu_relax();
            cli();
            u64 dt = rdtsc() - t0;
            cycles += dt;
            if (dt < best) best = dt;
        }
        u64 got = 0;
        for (int t = 0; t < ncpu; t++) got += received[t];
        if (got != sent || replies != sent) {
            printf("ipi: round %lu: sent %lu, received %lu, replies %lu\n", r, sent, got, replies);
            exit(2);
        }
        if (!quiet || r % 256 == 0) printf("ipi: round %lu ok (%lu ipis)\n", r, sent);
        end = loop_end(r, rounds, end);
    }
    printf("ipi: %lu ipis, all delivered once; round trip avg %lu, best %lu cycles\n",
           sent, cycles / sent, best);
    return 0;
}
