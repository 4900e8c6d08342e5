/*
 * insns: runs the instructions some hosts' KVM cannot emulate in guest kernel mode and
 * that kvmguest completes (kvmguest/complete.py): int3 (its #BP handler must see the
 * next instruction), fwait, ldmxcsr/stmxcsr with RIP-relative, stack and indexed
 * operands, and the faults a CPU raises for them: #GP (non-canonical), #SS (through rbp),
 * #PF (not present; read-only under CR0.WP, while without WP the write goes through), an
 * operand crossing into another page (aliased, and unmapped). On hardware that runs them
 * (VMX/SVM) the results are the same: the guest cannot tell who carried them out.
 * `insns mmio` ends with stmxcsr into MMIO, which kvmguest refuses by name.
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

/* #GP, #SS and #PF: record the vector, error code and CR2, resume at f_resume. */
volatile u64 f_vector, f_code, f_cr2, f_resume;
extern char gp_handler[], ss_handler[], pf_handler[];
#define FAULT_HANDLER(name, vec) \
    __asm__(".globl " #name "\n" #name ":\n" \
            "    pushq %rax\n" \
            "    movq 8(%rsp), %rax\n    movq %rax, f_code(%rip)\n" \
            "    movq $" #vec ", f_vector(%rip)\n" \
            "    movq %cr2, %rax\n    movq %rax, f_cr2(%rip)\n" \
            "    movq f_resume(%rip), %rax\n    movq %rax, 16(%rsp)\n" \
            "    popq %rax\n    addq $8, %rsp\n    iretq\n");
FAULT_HANDLER(gp_handler, 13)
FAULT_HANDLER(ss_handler, 12)
FAULT_HANDLER(pf_handler, 14)

#define MB (1UL << 20)
#define AREA (32 * MB)          /* identity-mapped 2 MiB pages the checks rearrange */
#define ALIAS (36 * MB)
#define RO (40 * MB)
#define HOLE (44 * MB)
#define PDE(a) rt_pd_pool[(a) >> 21]
extern u64 rt_pd_pool[];

static void flush(u64 a) { __asm__ volatile("invlpg (%0)" :: "r"(a) : "memory"); }

/* stmxcsr (store) or ldmxcsr at `at`: the vector it faulted with (0: none). */
static u64 mx(int store, u64 at)
{
    f_vector = 0;
    if (store)
        __asm__ volatile("leaq 1f(%%rip), %%rax\n\tmovq %%rax, f_resume(%%rip)\n\t"
                         "stmxcsr (%0)\n1:" :: "r"(at) : "rax", "memory");
    else
        __asm__ volatile("leaq 1f(%%rip), %%rax\n\tmovq %%rax, f_resume(%%rip)\n\t"
                         "ldmxcsr (%0)\n1:" :: "r"(at) : "rax", "memory");
    return f_vector;
}

static void faults(void)
{
    rt_set_gate(12, (u64)ss_handler);
    rt_set_gate(13, (u64)gp_handler);
    rt_set_gate(14, (u64)pf_handler);
    u32 mxcsr;
    __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));

    check(mx(1, 0x0000800000000000UL) == 13 && f_code == 0, "stmxcsr non-canonical: #GP(0)");
    check(mx(0, 0xffff7fffffff0000UL) == 13 && f_code == 0, "ldmxcsr non-canonical: #GP(0)");
    f_vector = 0;
    __asm__ volatile("pushq %%rbp\n\tmovq %0, %%rbp\n\t"
                     "leaq 1f(%%rip), %%rax\n\tmovq %%rax, f_resume(%%rip)\n\t"
                     "stmxcsr (%%rbp)\n1:\tpopq %%rbp"
                     :: "r"(0x0000900000000000UL) : "rax", "memory");
    check(f_vector == 12 && f_code == 0, "stmxcsr non-canonical through rbp: #SS(0)");

    u64 far = 0x4000000010UL;      /* 256 GiB: no page table maps it */
    check(mx(1, far) == 14 && f_code == 2 && f_cr2 == far, "stmxcsr unmapped: #PF W");
    check(mx(0, far) == 14 && f_code == 0 && f_cr2 == far, "ldmxcsr unmapped: #PF R");

    PDE(RO) = RO | 0x85;           /* present, user, 2 MiB: read-only */
    flush(RO);
    volatile u32 *ro = (volatile u32 *)(RO + 0x100);
    *(volatile u32 *)(RO + 0x104) = 0;
    u64 cr0;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %0, %%cr0" :: "r"(cr0 | (1UL << 16)) : "memory");   /* WP */
    check(mx(1, (u64)ro) == 14 && f_code == 3 && f_cr2 == (u64)ro,
          "stmxcsr to a read-only page under CR0.WP: #PF P|W");
    __asm__ volatile("mov %0, %%cr0" :: "r"(cr0 & ~(1UL << 16)) : "memory");
    *ro = 0;
    check(mx(1, (u64)ro) == 0 && *ro == mxcsr, "stmxcsr to a read-only page without WP");
    PDE(RO) = RO | 0x87;
    flush(RO);

    /* An operand across a page boundary whose second page maps elsewhere. */
    PDE(AREA + 2 * MB) = ALIAS | 0x87;
    flush(AREA + 2 * MB);
    u64 cross = AREA + 2 * MB - 2;
    *(volatile u32 *)(AREA + 2 * MB - 4) = 0;
    *(volatile u32 *)ALIAS = 0xaaaa0000;
    check(mx(1, cross) == 0 && *(volatile u16 *)(AREA + 2 * MB - 2) == (u16)mxcsr &&
          *(volatile u32 *)ALIAS == (0xaaaa0000 | mxcsr >> 16),
          "stmxcsr across two pages mapped apart");
    u32 other = mxcsr ^ 0x6000;
    *(volatile u16 *)(AREA + 2 * MB - 2) = (u16)other;
    *(volatile u16 *)ALIAS = (u16)(other >> 16);
    u32 now;
    check(mx(0, cross) == 0, "ldmxcsr across two pages mapped apart");
    __asm__ volatile("stmxcsr %0" : "=m"(now));
    check(now == other, "ldmxcsr across two pages loads both halves");
    __asm__ volatile("ldmxcsr %0" :: "m"(mxcsr));
    PDE(AREA + 2 * MB) = (AREA + 2 * MB) | 0x87;
    flush(AREA + 2 * MB);

    /* Crossing into a page that is not mapped: #PF in the second page, nothing written. */
    PDE(HOLE + 2 * MB) = 0;
    flush(HOLE + 2 * MB);
    *(volatile u32 *)(HOLE + 2 * MB - 4) = 0;
    check(mx(1, HOLE + 2 * MB - 2) == 14 && f_code == 2 && f_cr2 >= HOLE + 2 * MB &&
          f_cr2 < HOLE + 2 * MB + 2 && *(volatile u32 *)(HOLE + 2 * MB - 4) == 0,
          "stmxcsr crossing into an unmapped page: #PF there, nothing written");
    PDE(HOLE + 2 * MB) = (HOLE + 2 * MB) | 0x87;
    flush(HOLE + 2 * MB);
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
    faults();
    if (bad) return 1;
    printf("insns: int3 x5 (#BP at the next instruction), fwait, ldmxcsr/stmxcsr x3: all ok\n");
    printf("insns: #GP, #SS, #PF (not present, read-only under WP), operands across pages: all ok\n");
    if (cmdline_has("mmio")) {
        PDE(48 * MB) = 0xfec00000UL | 0x87;            /* 48 MiB -> the IOAPIC's page */
        flush(48 * MB);
        printf("insns: stmxcsr into MMIO next\n");
        mx(1, 48 * MB + 0x1000);
        printf("insns: the stmxcsr into MMIO went through\n");
    }
    return 0;
}
