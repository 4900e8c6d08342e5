/* mmio: reads guest-physical memory where there is neither RAM nor a device. */
#include "runtime/rt.h"

int main(void)
{
    u64 addr = cmdline_u64("addr", 0x3f000000);   /* inside the first GiB */
    printf("mmio: reading 0x%lx\n", addr);
    map_2m(addr);
    u32 v = *(volatile u32 *)addr;
    printf("mmio: read 0x%x (no VMM stopped us)\n", v);
    return 1;
}
