/* kvmguest guest runtime: several CPUs, local APICs, the IOAPIC, interrupts, locks. */
#ifndef SMP_H
#define SMP_H
#include "rt.h"

#define MAX_CPUS 64
#define SPURIOUS_VECTOR 0xff

static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" ::: "memory"); }
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (u64)hi << 32 | lo;
}
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return (u64)hi << 32 | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline u32 atomic_add(volatile u32 *p, u32 v)   /* returns the old value */
{
    __asm__ volatile("lock xaddl %0, %1" : "+r"(v), "+m"(*p) :: "memory");
    return v;
}
static inline u64 atomic_add64(volatile u64 *p, u64 v)
{
    __asm__ volatile("lock xaddq %0, %1" : "+r"(v), "+m"(*p) :: "memory");
    return v;
}

typedef struct { volatile u32 locked; } spinlock_t;
static inline void spin_lock(spinlock_t *l)
{
    u32 one = 1;
    for (;;) {
        u32 v = one;
        __asm__ volatile("xchgl %0, %1" : "+r"(v), "+m"(l->locked) :: "memory");
        if (!v) return;
        while (l->locked) cpu_relax();
    }
}
static inline void spin_unlock(spinlock_t *l) { __asm__ volatile("" ::: "memory"); l->locked = 0; }

/* A barrier for `n` CPUs, reusable (sense-reversing). */
struct barrier { volatile u32 count, sense; };
void barrier_wait(struct barrier *b, u32 n);

/* CPUs, from the ACPI MADT (as Linux finds them). */
int cpu_count(void);
u32 cpu_id(void);                         /* this CPU's APIC ID (= its index here) */
void smp_start(void (*ap_main)(u32 id)); /* start every AP; returns once all are online */

/* Local APIC: x2APIC (MSRs) unless the command line says "xapic" (MMIO at 0xfee00000). */
void apic_init(void);                     /* this CPU: enable its LAPIC (CPU 0: mask the PICs) */
int apic_is_x2(void);
void apic_eoi(void);
void apic_send_ipi(u32 dest, u32 vector);
void apic_timer_periodic(u32 vector, u32 count);
void apic_timer_stop(void);
int have_tsc_deadline(void);
void apic_timer_tsc_deadline(u32 vector);  /* deadline mode; arm with wrmsr(0x6e0, tsc) */
#define MSR_TSC_DEADLINE 0x6e0

/* IOAPIC: ISA IRQ `irq` (on the pin the MADT's overrides say: IRQ 0 is pin 2 under QEMU,
 * pin 0 under kvmguest, as KVM routes it) -> vector on CPU `dest`, edge, active high. */
u32 isa_gsi(u32 irq);
void ioapic_route(u32 irq, u32 vector, u32 dest);

/* Interrupt handlers for vectors 32..254; the runtime sends the EOI after the handler. */
void set_irq_handler(u32 vector, void (*h)(u32 vector));

/* 8254 PIT channel 0, periodic at `hz` (IRQ 0). */
void pit_periodic(u32 hz);

/* Interrupt-driven COM1 input (IRQ 4 through the IOAPIC to this CPU at `vector`): bytes
 * land in a ring; read_line() halts until a non-empty line arrives and returns its length
 * (the line end dropped, the rest cut to size - 1, NUL-terminated). */
void console_input_init(u32 vector);
u32 read_line(char *line, u32 size);
u32 console_interrupts(void);

#endif
