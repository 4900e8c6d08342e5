/* kvmguest guest runtime: CPUs from the MADT, AP bring-up, LAPIC/IOAPIC, interrupts. */
#include "smp.h"

#define LAPIC_BASE 0xfee00000UL
#define IOAPIC_BASE 0xfec00000UL
#define MSR_APIC_BASE 0x1b
#define APIC_BASE_ENABLE (1UL << 11)
#define APIC_BASE_X2 (1UL << 10)
#define TRAMPOLINE 0x8000UL

/* xAPIC register offsets; the x2APIC MSR is 0x800 + offset / 16. */
#define APIC_ID 0x20
#define APIC_EOI 0xb0
#define APIC_SVR 0xf0
#define APIC_ICR 0x300
#define APIC_ICR_HI 0x310
#define APIC_LVT_TIMER 0x320
#define APIC_TIMER_INIT 0x380
#define APIC_TIMER_DIV 0x3e0

extern char ap_trampoline[], ap_trampoline_end[];
extern u64 rt_pdpt[], rt_pd_pool[];
void rt_load_idt(void);
void rt_irq_gate(u32 vector);
u64 rt_rsdp(void);

static int x2;
static void (*handlers[256])(u32);
static void (*ap_entry)(u32);
static volatile u32 cpus_online;

/* --- ACPI --------------------------------------------------------------------------- */
static const u8 *find_rsdp(void)
{
    u64 p = rt_rsdp();
    if (p) return (const u8 *)p;
    for (u64 a = 0xe0000; a < 0x100000; a += 16)
        if (!strncmp((const char *)a, "RSD PTR ", 8)) return (const u8 *)a;
    return 0;
}

static const u8 *find_table(const char *sig)
{
    const u8 *rsdp = find_rsdp();
    if (!rsdp) return 0;
    int xsdt = rsdp[15] >= 2 && *(const u64 *)(rsdp + 24);
    const u8 *root = (const u8 *)(xsdt ? *(const u64 *)(rsdp + 24) : *(const u32 *)(rsdp + 16));
    u32 len = *(const u32 *)(root + 4), size = xsdt ? 8 : 4;
    for (u32 off = 36; off + size <= len; off += size) {
        const u8 *t = (const u8 *)(xsdt ? *(const u64 *)(root + off) : *(const u32 *)(root + off));
        if (!strncmp((const char *)t, sig, 4)) return t;
    }
    return 0;
}

int cpu_count(void)
{
    static int n;
    if (n) return n;
    const u8 *madt = find_table("APIC");
    if (!madt) return n = 1;
    u32 len = *(const u32 *)(madt + 4);
    for (u32 off = 44; off + 2 <= len; off += madt[off + 1]) {
        if (madt[off + 1] == 0) break;
        if (madt[off] == 0 && (*(const u32 *)(madt + off + 4) & 1)) n++;
        if (madt[off] == 9 && (*(const u32 *)(madt + off + 12) & 1)) n++;   /* x2APIC */
    }
    if (n > MAX_CPUS) n = MAX_CPUS;
    return n ? n : (n = 1);
}

u32 isa_gsi(u32 irq)
{
    const u8 *madt = find_table("APIC");
    if (!madt) return irq;
    u32 len = *(const u32 *)(madt + 4);
    for (u32 off = 44; off + 2 <= len && madt[off + 1]; off += madt[off + 1])
        if (madt[off] == 2 && madt[off + 3] == irq) return *(const u32 *)(madt + off + 4);
    return irq;
}

/* --- mappings ----------------------------------------------------------------------- */
static void map_mmio(u64 addr)   /* a 2 MiB uncached identity mapping below 4 GiB */
{
    u64 gib = addr >> 30;
    u64 *pd = &rt_pd_pool[gib * 512];
    if (!(rt_pdpt[gib] & 1)) rt_pdpt[gib] = (u64)pd | 0x7;
    pd[(addr >> 21) & 511] = (addr & ~((2UL << 20) - 1)) | 0x9b;   /* P, RW, PWT, PCD, PS */
    __asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
}

/* --- local APIC ---------------------------------------------------------------------- */
static void apic_write(u32 reg, u32 v)
{
    if (x2) wrmsr(0x800 + reg / 16, v);
    else *(volatile u32 *)(LAPIC_BASE + reg) = v;
}

static u32 apic_read(u32 reg)
{
    return x2 ? (u32)rdmsr(0x800 + reg / 16) : *(volatile u32 *)(LAPIC_BASE + reg);
}

int apic_is_x2(void) { return x2; }

void apic_init(void)
{
    static int mapped;
    x2 = !cmdline_has("xapic");
    if (!x2 && !mapped) { map_mmio(LAPIC_BASE); mapped = 1; }
    u64 base = rdmsr(MSR_APIC_BASE) | APIC_BASE_ENABLE;
    wrmsr(MSR_APIC_BASE, x2 ? base | APIC_BASE_X2 : base);
    rt_irq_gate(SPURIOUS_VECTOR);
    apic_write(APIC_SVR, 0x100 | SPURIOUS_VECTOR);
    if (cpu_id() == 0) {
        /* Mask the 8259 PICs: ISA interrupts come through the IOAPIC. (Left as after
         * reset, a PIC would hand IRQ n to the boot CPU as vector n: an exception.) */
        outb(0x21, 0xff);
        outb(0xa1, 0xff);
    }
}

u32 cpu_id(void)
{
    u32 b, a = 1, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return b >> 24;
}

void apic_eoi(void) { apic_write(APIC_EOI, 0); }

static void apic_icr(u32 dest, u32 low)
{
    if (x2) {
        wrmsr(0x830, (u64)dest << 32 | low);
    } else {
        apic_write(APIC_ICR_HI, dest << 24);
        apic_write(APIC_ICR, low);
        while (apic_read(APIC_ICR) & (1 << 12)) cpu_relax();   /* delivery pending */
    }
}

void apic_send_ipi(u32 dest, u32 vector) { apic_icr(dest, 0x4000 | vector); }

void apic_timer_periodic(u32 vector, u32 count)
{
    apic_write(APIC_TIMER_DIV, 0xb);                 /* divide by 1 */
    apic_write(APIC_LVT_TIMER, (1 << 17) | vector);  /* periodic */
    apic_write(APIC_TIMER_INIT, count);
}

void apic_timer_stop(void)
{
    apic_write(APIC_LVT_TIMER, 1 << 16);             /* masked */
    apic_write(APIC_TIMER_INIT, 0);
}

int have_tsc_deadline(void)
{
    u32 a = 1, b, c = 0, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
    return (c >> 24) & 1;
}

void apic_timer_tsc_deadline(u32 vector) { apic_write(APIC_LVT_TIMER, (2 << 17) | vector); }

/* --- IOAPIC and PIT ------------------------------------------------------------------ */
void ioapic_route(u32 irq, u32 vector, u32 dest)
{
    u32 pin = isa_gsi(irq);
    static int mapped;
    if (!mapped) { map_mmio(IOAPIC_BASE); mapped = 1; }
    volatile u32 *sel = (volatile u32 *)IOAPIC_BASE, *win = (volatile u32 *)(IOAPIC_BASE + 0x10);
    *sel = 0x10 + pin * 2 + 1;
    *win = dest << 24;
    *sel = 0x10 + pin * 2;
    *win = vector;                                   /* fixed, physical, edge, high, unmasked */
}

void pit_periodic(u32 hz)
{
    u32 div = 1193182 / hz;
    outb(0x43, 0x34);                                /* channel 0, lo/hi, rate generator */
    outb(0x40, div & 0xff);
    outb(0x40, div >> 8);
}

/* --- interrupts ---------------------------------------------------------------------- */
void set_irq_handler(u32 vector, void (*h)(u32))
{
    handlers[vector] = h;
    rt_irq_gate(vector);
}

void rt_interrupt(u64 vector)
{
    if (handlers[vector]) handlers[vector]((u32)vector);
    if (vector != SPURIOUS_VECTOR) apic_eoi();
}

/* --- bring-up -------------------------------------------------------------------------- */
void barrier_wait(struct barrier *b, u32 n)
{
    u32 sense = b->sense;
    if (atomic_add(&b->count, 1) == n - 1) {
        b->count = 0;
        __asm__ volatile("" ::: "memory");
        b->sense = !sense;
    } else {
        while (b->sense == sense) cpu_relax();
    }
}

void rt_ap_main(u32 slot)
{
    rt_load_idt();
    apic_init();
    atomic_add(&cpus_online, 1);
    ap_entry(cpu_id());
    for (;;) sti_hlt();
}

void smp_start(void (*ap_main)(u32 id))
{
    int n = cpu_count();
    ap_entry = ap_main;
    apic_init();
    cpus_online = 1;
    memcpy((void *)TRAMPOLINE, ap_trampoline, (size_t)(ap_trampoline_end - ap_trampoline));
    for (int i = 1; i < n; i++) {
        apic_icr((u32)i, 0x4500);                    /* INIT, level assert */
        apic_icr((u32)i, 0x4600 | (TRAMPOLINE >> 12));   /* SIPI at 0x8000 */
    }
    while (cpus_online < (u32)n) cpu_relax();
}

/* --- COM1 input ------------------------------------------------------------------------ */
static volatile char rx_ring[256];
static volatile u32 rx_head, rx_tail, rx_interrupts;   /* the handler writes head */

static void on_rx(u32 v)
{
    rx_interrupts++;
    while (inb(COM1 + 5) & 1) {
        char c = (char)inb(COM1);
        if (rx_head - rx_tail < sizeof(rx_ring)) rx_ring[rx_head++ % sizeof(rx_ring)] = c;
    }
}

void console_input_init(u32 vector)
{
    set_irq_handler(vector, on_rx);
    ioapic_route(4, vector, cpu_id());
    outb(COM1 + 4, 0x0b);                         /* DTR, RTS, OUT2 */
    outb(COM1 + 1, 0x01);                         /* IER: received data available */
}

u32 read_line(char *line, u32 size)
{
    u32 len = 0;
    for (;;) {
        while (rx_tail == rx_head) sti_hlt();
        char c = rx_ring[rx_tail++ % sizeof(rx_ring)];
        if (c != '\r' && c != '\n') {
            if (len < size - 1) line[len++] = c;
            continue;
        }
        if (!len) continue;
        line[len] = 0;
        return len;
    }
}

u32 console_interrupts(void) { return rx_interrupts; }
