/*
 * init for the minimal kernel's test root disk. It makes no system call (user mode cannot
 * make one on a host that emulates kernel code): it proves what it read by the address
 * it faults at. It hashes the blob linked into it (BLOB: a file the test writes,
 * `.incbin`, a whole number of 8-byte words), which the kernel pages in from the disk as
 * it is touched: h = sum of word[i] * (2i + 1) mod 2^64, folded to 32 bits
 * (h ^ h >> 32), and writes to 0x500000000000 + (that << 12). The kernel logs
 * "init[1]: segfault at 5xxxxxxxx000" and panics ("Attempted to kill init!"), which
 * ends the run. Without a blob it faults at 0xdead000.
 */
#ifdef BLOB
__asm__(".section .rodata\n.balign 4096\n.global blob\nblob:\n.incbin \"" BLOB "\"\n"
        ".global blob_end\nblob_end:\n.previous");
extern const unsigned char blob[], blob_end[];
#endif

void _start(void)
{
    unsigned long addr = 0xdead000;
#ifdef BLOB
    const unsigned long *w = (const unsigned long *)blob;
    unsigned long h = 0, n = (unsigned long)(blob_end - blob) / 8;
    for (unsigned long i = 0; i < n; i++)
        h += w[i] * (2 * i + 1);
    addr = 0x500000000000UL + (((h ^ (h >> 32)) & 0xffffffffUL) << 12);
#endif
    *(volatile char *)addr = 1;
    for (;;)
        ;
}
