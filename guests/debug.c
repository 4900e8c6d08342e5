/*
 * debug: a guest to drive from gdb (built with debug info). Every CPU calls tick()
 * rounds=N times (default 10) with the round number; tick() adds it to the CPU's
 * own slot of per_cpu[] and, on the boot CPU, stores it in last_round. The boot CPU
 * then checks every slot (1 + 2 + ... + N), calls finish() with the sum and exits 0, or
 * 1 if one is wrong.
 */
#include "runtime/smp.h"

volatile u64 per_cpu[16];
volatile u64 last_round;
static u64 rounds;
static int ncpu;
static struct barrier bar;

__attribute__((noinline)) void tick(u32 cpu, u64 round)
{
    per_cpu[cpu] += round;
    if (cpu == 0)
        last_round = round;
}

__attribute__((noinline)) void finish(u64 sum)
{
    __asm__ volatile("" :: "r"(sum) : "memory");
}

static void work(u32 id)
{
    for (u64 r = 1; r <= rounds; r++)
        tick(id, r);
    barrier_wait(&bar, (u32)ncpu);
    if (id != 0)
        for (;;) hlt();
}

int main(void)
{
    rounds = cmdline_u64("rounds", 10);
    ncpu = cpu_count();
    if (ncpu > 16) fail("more than 16 cpus");
    printf("debug: %d cpus, %lu rounds\n", ncpu, rounds);
    smp_start(work);
    work(0);
    u64 want = rounds * (rounds + 1) / 2;
    for (int i = 0; i < ncpu; i++)
        if (per_cpu[i] != want) {
            printf("debug: cpu %d counted %lu, want %lu\n", i, per_cpu[i], want);
            return 1;
        }
    finish(want);
    printf("debug: every cpu counted %lu\n", want);
    return 0;
}
