/*
 * hello: prints a greeting, its command line and its PVH modules, exits 0.
 *   reboot   then resets the machine through port 0xcf9, as Linux's reboot does
 *   panic    then prints Linux's panic line and spins, as a panicked kernel does
 *   panicline  prints Linux's panic line too, then exits 0 (only Linux's line ends a run)
 *   cpuid    prints CPUID leaves 1, 7 and 0xd as the guest sees them
 */
#include "runtime/rt.h"

int main(void)
{
    printf("Hello from a kvmguest guest!\n");
    printf("cmdline: %s\n", cmdline());
    u64 addr, size;
    for (u32 i = 0; rt_module(i, &addr, &size); i++) {
        const u8 *p = (const u8 *)addr;
        u64 sum = 0;
        for (u64 j = 0; j < size && j < 4096; j++) sum += p[j];
        printf("module %u: %lu bytes at 0x%lx, first page sums to %lu\n", i, size, addr, sum);
    }
    if (cmdline_has("cpuid")) {                  /* what the guest sees, as Linux reads it */
        u32 leaves[] = {1, 7, 0xd};
        for (u32 i = 0; i < 3; i++) {
            u32 a, b, c, d;
            __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(leaves[i]), "c"(0));
            printf("cpuid %x: eax=%x ebx=%x ecx=%x edx=%x\n", leaves[i], a, b, c, d);
        }
    }
    if (cmdline_has("reboot")) {
        outb(0xcf9, 0x06);                       /* hard reset */
        for (;;) __asm__ volatile("cli; hlt");
    }
    if (cmdline_has("panicline"))
        printf("Kernel panic - not syncing: hello only says so\n");
    if (cmdline_has("panic")) {
        printf("Kernel panic - not syncing: hello was asked to panic\n");
        for (;;) __asm__ volatile("pause");
    }
    return 0;
}
