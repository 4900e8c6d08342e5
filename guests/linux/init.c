/*
 * init for the minimal kernel's test root disk: proves it ran without a system call
 * (user mode cannot make one on a host that emulates kernel code) by faulting at an
 * address the test knows. The kernel logs "init[1]: segfault at dead000" and panics
 * ("Attempted to kill init!"), which ends the run (exit 122).
 */
void _start(void)
{
    *(volatile char *)0xdead000 = 1;
    for (;;)
        ;
}
