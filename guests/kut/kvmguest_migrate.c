/*
 * kvmguest's own kvm-unit-tests test of the suite's migration protocol on x86:
 * memory, timers, registers, MSRs, device state and a second vCPU are checked before
 * and after migrate_once() (lib/migrate.c), which the runner (`kvmguest kut`) answers
 * with a live save, a restore in a new process, and the key sent to the restored guest.
 *
 * Built in the kvm-unit-tests build folder against its library (kut.mk); x86 has no
 * __getchar() there, so it is defined here: COM1, polled.
 */
#include "libcflat.h"
#include "migrate.h"
#include "processor.h"
#include "apic.h"
#include "isr.h"
#include "smp.h"
#include "msr.h"
#include "acpi.h"
#include "asm/io.h"

#define COM1 0x3f8
#define TESTDEV_SCRATCH 0xe0
#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define CMOS_SCRATCH 0x40
#define TIMER_VECTOR 0xee
#define WORDS (128 * 1024)		/* 1 MiB of pattern */

int __getchar(void)
{
	if (inb(COM1 + 5) & 1)
		return inb(COM1);
	return -1;
}

static u64 pattern[WORDS];
static volatile u64 ticks;
static volatile int ap_ran;

static u64 word(u64 i)
{
	return (i + 1) * 0x9E3779B97F4A7C15ull;
}

static void timer_isr(isr_regs_t *regs)
{
	ticks++;
	eoi();
}

static void on_ap(void *data)
{
	ap_ran = apic_id();
}

static bool wait_ticks(u64 want)
{
	u64 start = rdtsc();

	while (ticks < want)
		if (rdtsc() - start > 20000000000ull)	/* far beyond any tick */
			return false;
	return true;
}

static u32 pm_timer(void)
{
	struct acpi_table_fadt *fadt = find_acpi_table_addr(FACP_SIGNATURE);

	return fadt ? inl(fadt->pm_tmr_blk) : 0;
}

int main(void)
{
	u64 r12 = 0x1212121212121212ull, r13 = 0x1313131313131313ull;
	u64 r14 = 0x1414141414141414ull, r15 = 0x1515151515151515ull;
	u64 tsc_before, tsc_after, t;
	u32 pm_before, pm_after;
	u64 i, bad = 0;

	for (i = 0; i < WORDS; i++)
		pattern[i] = word(i);
	wrmsr(MSR_KERNEL_GS_BASE, 0xffff888012345000ull);
	wrmsr(MSR_IA32_SYSENTER_ESP, 0xfeedface);
	outl(0xc0ffee42, TESTDEV_SCRATCH);
	outb(CMOS_SCRATCH, CMOS_INDEX);
	outb(0x5a, CMOS_DATA);

	handle_irq(TIMER_VECTOR, timer_isr);
	apic_write(APIC_TDCR, 0xb);			/* divide by 1 */
	apic_write(APIC_LVTT, TIMER_VECTOR | APIC_LVT_TIMER_PERIODIC);
	apic_write(APIC_TMICT, 1000000);
	sti();
	report(wait_ticks(3), "LAPIC timer ticks before migration");

	on_cpu(1, on_ap, NULL);
	report(ap_ran == 1, "vCPU 1 runs before migration");
	ap_ran = 0;

	tsc_before = rdtsc();
	pm_before = pm_timer();
	/* Callee-saved registers hold known values across the whole migration. */
	asm volatile("mov %[a], %%r12\n\tmov %[b], %%r13\n\tmov %[c], %%r14\n\tmov %[d], %%r15\n\t"
		     "call migrate_once\n\t"
		     "mov %%r12, %[a]\n\tmov %%r13, %[b]\n\tmov %%r14, %[c]\n\tmov %%r15, %[d]\n\t"
		     : [a] "+m"(r12), [b] "+m"(r13), [c] "+m"(r14), [d] "+m"(r15)
		     :
		     : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
		       "r13", "r14", "r15", "memory", "cc");
	tsc_after = rdtsc();
	pm_after = pm_timer();

	report(r12 == 0x1212121212121212ull && r13 == 0x1313131313131313ull &&
	       r14 == 0x1414141414141414ull && r15 == 0x1515151515151515ull,
	       "callee-saved registers survive migration");
	for (i = 0; i < WORDS; i++)
		bad += pattern[i] != word(i);
	report(bad == 0, "1 MiB of memory survives migration (%ld words differ)", bad);
	report(rdmsr(MSR_KERNEL_GS_BASE) == 0xffff888012345000ull &&
	       rdmsr(MSR_IA32_SYSENTER_ESP) == 0xfeedface, "MSRs survive migration");
	report(tsc_after > tsc_before, "TSC runs on after migration");
	t = ticks;
	report(wait_ticks(t + 3), "LAPIC timer ticks after migration");
	report(pm_after != pm_before, "ACPI PM timer runs on after migration");
	report(inl(TESTDEV_SCRATCH) == 0xc0ffee42, "pc-testdev scratch survives migration");
	outb(CMOS_SCRATCH, CMOS_INDEX);
	report(inb(CMOS_DATA) == 0x5a, "CMOS RAM survives migration");
	on_cpu(1, on_ap, NULL);
	report(ap_ran == 1, "vCPU 1 runs after migration");
	return report_summary();
}
