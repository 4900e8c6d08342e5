/* ioloop: writes port 0x80 `iters` times (each a VM exit), then exits 0. */
#include "runtime/rt.h"

int main(void)
{
    u64 iters = cmdline_u64("iters", 1000);
    for (u64 i = 0; i < iters; i++)
        outb(0x80, (u8)i);
    return 0;
}
