/* ioloop: writes port 0x80 `iters` times (each a VM exit), then exits 0. With mmio=ADDR,
 * writes the 32-bit MMIO register at ADDR instead (a virtio QueueNotify, say). */
#include "runtime/rt.h"

int main(void)
{
    u64 iters = cmdline_u64("iters", 1000), addr = cmdline_u64("mmio", 0);
    if (addr) {
        map_2m(addr);
        for (u64 i = 0; i < iters; i++)
            *(volatile u32 *)addr = 0;
        return 0;
    }
    for (u64 i = 0; i < iters; i++)
        outb(0x80, (u8)i);
    return 0;
}
