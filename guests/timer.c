/*
 * timer: every CPU counts its LAPIC timer (periodic) and, where the CPU has it, its
 * TSC-deadline timer; CPU 0 also counts the PIT (IRQ 0 through the IOAPIC). CPU 0 checks,
 * every 10 PIT ticks and at least 200 ms of TSC time, that every other counter moved, and
 * at the end that each moved over the run; the guest fails if a timer stops. (Time is
 * the TSC's: KVM's PIT catches up on ticks a busy host delayed, in a burst, and its LAPIC
 * timer does not: ten PIT ticks can pass in a moment.)
 *
 *   ticks=N     PIT ticks to run (at 100 Hz), then exit 0 (0 = forever; default 100)
 *   oninput     run until a byte arrives on COM1, then ticks=N more (a test's handshake)
 *   lapic_us=N  LAPIC timer period in microseconds (default 2000)
 *   quiet       report every 100th PIT tick only
 */
#include "runtime/smp.h"

#define V_LAPIC 0x40
#define V_DEADLINE 0x41
#define V_PIT 0x42
#define PIT_HZ 100

static volatile u64 lapic[MAX_CPUS], deadline[MAX_CPUS], pit;
static u64 tsc_per_ms, lapic_count;
static int ncpu, use_deadline;

static void on_lapic(u32 v) { lapic[cpu_id()]++; }
static void on_pit(u32 v) { pit++; }

static void on_deadline(u32 v)
{
    deadline[cpu_id()]++;
    wrmsr(MSR_TSC_DEADLINE, rdtsc() + tsc_per_ms * 3);
}

/* On each CPU: the periodic LAPIC timer on the x2APIC... and the deadline timer? A LAPIC
 * has one timer: even CPUs run it periodic, odd CPUs in TSC-deadline mode (when there
 * is more than one CPU and the CPU has TSC-deadline); CPU 0 is always periodic. */
static void start_timers(u32 id)
{
    if (use_deadline && (id & 1)) {
        apic_timer_tsc_deadline(V_DEADLINE);
        wrmsr(MSR_TSC_DEADLINE, rdtsc() + tsc_per_ms * 3);
    } else {
        apic_timer_periodic(V_LAPIC, (u32)lapic_count);
    }
}

static void ap(u32 id)
{
    start_timers(id);
    for (;;) sti_hlt();
}

static u64 count_of(int c) { return (use_deadline && (c & 1)) ? deadline[c] : lapic[c]; }

int main(void)
{
    u64 ticks = cmdline_u64("ticks", 100);
    lapic_count = cmdline_u64("lapic_us", 2000) * 1000;   /* KVM's APIC timer runs at 1 GHz */
    int quiet = cmdline_has("quiet");
    ncpu = cpu_count();
    set_irq_handler(V_LAPIC, on_lapic);
    set_irq_handler(V_DEADLINE, on_deadline);
    set_irq_handler(V_PIT, on_pit);
    apic_init();
    ioapic_route(0, V_PIT, 0);
    pit_periodic(PIT_HZ);
    /* Calibrate the TSC against 10 PIT ticks. */
    u64 start = pit;
    while (pit == start) sti_hlt();
    u64 t0 = rdtsc();
    start = pit;
    while (pit < start + 10) sti_hlt();
    tsc_per_ms = (rdtsc() - t0) / (10 * 1000 / PIT_HZ);
    use_deadline = ncpu > 1 && have_tsc_deadline();
    smp_start(ap);
    start_timers(0);
    printf("timer: %d cpus, lapic every %lu us, %s, tsc %lu kHz\n", ncpu, lapic_count / 1000,
           use_deadline ? "odd cpus in tsc-deadline mode" : "no tsc-deadline", tsc_per_ms);
    u64 last[MAX_CPUS], first[MAX_CPUS];
    for (int c = 0; c < ncpu; c++) first[c] = last[c] = count_of(c);
    u64 begin = pit, check = pit, tcheck = rdtsc(), end = 0;
    for (;;) {
        sti_hlt();
        if (pit - check < 10 || rdtsc() - tcheck < 200 * tsc_per_ms) continue;
        check = pit;
        tcheck = rdtsc();
        for (int c = 0; c < ncpu; c++) {
            u64 now = count_of(c);
            if (now == last[c]) {
                printf("timer: cpu %d's timer stopped at %lu ticks (pit %lu)\n", c, now, pit);
                exit(2);
            }
            last[c] = now;
        }
        if (!quiet || (pit - begin) % 100 < 10)
            printf("timer: pit %lu ok, cpu0 lapic %lu\n", pit - begin, lapic[0]);
        end = loop_end(pit - begin, ticks, end);
        if (end && pit - begin >= end) break;
    }
    for (int c = 0; c < ncpu; c++)
        if (count_of(c) == first[c]) {
            printf("timer: cpu %d's timer never ticked (pit %lu)\n", c, pit);
            exit(2);
        }
    printf("timer: every timer ticked on %d cpus over %lu pit ticks\n", ncpu, pit - begin);
    return 0;
}
