/* hello: prints a greeting, its command line and its PVH modules, exits 0. */
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
    return 0;
}
