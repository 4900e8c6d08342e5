/*
 * insns: runs the instructions some hosts' KVM cannot emulate in guest kernel mode and
 * that kvmguest completes (kvmguest/complete.py): int3 (its #BP handler must see the
 * next instruction), fwait, ldmxcsr/stmxcsr with RIP-relative, stack and indexed
 * operands. On hardware that runs them (VMX/SVM) the results are the same: the guest
 * cannot tell who carried them out.
 */
#include "runtime/rt.h"

void rt_set_gate(u32 v, u64 handler);

volatile u64 bp_hits, bp_rip;
volatile u32 g_mxcsr, g_out[4];
extern char bp_handler[];
__asm__(".globl bp_handler\n"
        "bp_handler:\n"
        "    pushq %rax\n"
        "    movq 8(%rsp), %rax\n"          /* the RIP #BP reports: after the int3 */
        "    movq %rax, bp_rip(%rip)\n"
        "    incq bp_hits(%rip)\n"
        "    popq %rax\n"
        "    iretq\n");

static u64 bad;

static void check(int ok, const char *what)
{
    if (!ok) {
        printf("insns: BAD %s\n", what);
        bad++;
    }
}

int main(void)
{
    rt_set_gate(3, (u64)bp_handler);
    for (u64 i = 1; i <= 5; i++) {
        u64 expect;
        __asm__ volatile("leaq 1f(%%rip), %0\n\tint3\n1:" : "=r"(expect) :: "memory");
        check(bp_hits == i && bp_rip == expect, "int3: #BP must report the next instruction");
    }
    __asm__ volatile("fwait");

    /* ldmxcsr/stmxcsr: RIP-relative, on the stack, and base + index * scale */
    u32 modes[3] = {0x1f80 | 0x6000, 0x1f80 | 0x2000, 0x1f80};    /* round toward zero, down, nearest */
    g_mxcsr = modes[0];
    __asm__ volatile("ldmxcsr g_mxcsr(%%rip)\n\tstmxcsr g_out(%%rip)" ::: "memory");
    if (g_out[0] != modes[0]) printf("insns: stmxcsr gave 0x%x after ldmxcsr 0x%x\n", g_out[0], modes[0]);
    check(g_out[0] == modes[0], "ldmxcsr/stmxcsr, RIP-relative");
    volatile u32 local[2] = {0, modes[1]};
    u32 got;
    __asm__ volatile("ldmxcsr 4(%1)\n\tstmxcsr %0" : "=m"(got) : "r"(local) : "memory");
    check(got == modes[1], "ldmxcsr/stmxcsr, base + displacement");
    u64 idx = 2;
    g_out[2] = modes[2];
    __asm__ volatile("ldmxcsr (%1,%2,4)\n\tstmxcsr (%0,%2,4)"
                     :: "r"(&g_out[1]), "r"(g_out), "r"(idx) : "memory");
    check(g_out[3] == modes[2], "ldmxcsr/stmxcsr, base + index * 4");
    if (bad) return 1;
    printf("insns: int3 x5 (#BP at the next instruction), fwait, ldmxcsr/stmxcsr x3: all ok\n");
    return 0;
}
