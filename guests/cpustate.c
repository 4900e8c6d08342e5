/*
 * cpustate: holds known values in general-purpose and SSE registers across a long
 * loop, then checks them all.  A save/restore in the middle must keep every one.
 *   iters=N  loop iterations (default 2000000)
 */
#include "runtime/rt.h"

static const u64 want[12] = {
    0x1111111111111111UL, 0x2222222222222222UL, 0x3333333333333333UL,
    0x4444444444444444UL, 0x5555555555555555UL, 0x6666666666666666UL,
    0x7777777777777777UL, 0x8888888888888888UL, 0x9999999999999999UL,
    0xaaaaaaaaaaaaaaaaUL, 0xbbbbbbbbbbbbbbbbUL, 0xccccccccccccccccUL,
};
static u64 have[12];
static u64 xmm_have[16][2];
/* xmm_i = (0x0101..01 * i, ~that): distinct in both halves. */
static u64 xmm_want[16][2];

int main(void)
{
    u64 iters = cmdline_u64("iters", 2000000);
    for (int i = 0; i < 16; i++) {
        xmm_want[i][0] = 0x0101010101010101UL * (u64)(i + 1);
        xmm_want[i][1] = ~xmm_want[i][0];
    }
    printf("cpustate: holding 12 GPRs and 16 XMM registers for %lu iterations\n", iters);

    /* Load rbx, rdx, rsi, rdi, r8-r15 and xmm0-xmm15, spin, then store them all. */
    __asm__ volatile(
        "push %%rbp\n"
        "mov %[w], %%rax\n"
        "mov 0(%%rax), %%rbx\n"  "mov 8(%%rax), %%rdx\n"  "mov 16(%%rax), %%rsi\n"
        "mov 24(%%rax), %%rdi\n" "mov 32(%%rax), %%r8\n"  "mov 40(%%rax), %%r9\n"
        "mov 48(%%rax), %%r10\n" "mov 56(%%rax), %%r11\n" "mov 64(%%rax), %%r12\n"
        "mov 72(%%rax), %%r13\n" "mov 80(%%rax), %%r14\n" "mov 88(%%rax), %%r15\n"
        "mov %[xw], %%rax\n"
        "movdqu 0(%%rax), %%xmm0\n movdqu 16(%%rax), %%xmm1\n movdqu 32(%%rax), %%xmm2\n"
        "movdqu 48(%%rax), %%xmm3\n movdqu 64(%%rax), %%xmm4\n movdqu 80(%%rax), %%xmm5\n"
        "movdqu 96(%%rax), %%xmm6\n movdqu 112(%%rax), %%xmm7\n movdqu 128(%%rax), %%xmm8\n"
        "movdqu 144(%%rax), %%xmm9\n movdqu 160(%%rax), %%xmm10\n movdqu 176(%%rax), %%xmm11\n"
        "movdqu 192(%%rax), %%xmm12\n movdqu 208(%%rax), %%xmm13\n movdqu 224(%%rax), %%xmm14\n"
        "movdqu 240(%%rax), %%xmm15\n"
        "mov %[n], %%rcx\n"
        "1: dec %%rcx\n jnz 1b\n"
        "mov %[h], %%rax\n"
        "mov %%rbx, 0(%%rax)\n"  "mov %%rdx, 8(%%rax)\n"  "mov %%rsi, 16(%%rax)\n"
        "mov %%rdi, 24(%%rax)\n" "mov %%r8, 32(%%rax)\n"  "mov %%r9, 40(%%rax)\n"
        "mov %%r10, 48(%%rax)\n" "mov %%r11, 56(%%rax)\n" "mov %%r12, 64(%%rax)\n"
        "mov %%r13, 72(%%rax)\n" "mov %%r14, 80(%%rax)\n" "mov %%r15, 88(%%rax)\n"
        "mov %[x], %%rax\n"
        "movdqu %%xmm0, 0(%%rax)\n movdqu %%xmm1, 16(%%rax)\n movdqu %%xmm2, 32(%%rax)\n"
        "movdqu %%xmm3, 48(%%rax)\n movdqu %%xmm4, 64(%%rax)\n movdqu %%xmm5, 80(%%rax)\n"
        "movdqu %%xmm6, 96(%%rax)\n movdqu %%xmm7, 112(%%rax)\n movdqu %%xmm8, 128(%%rax)\n"
        "movdqu %%xmm9, 144(%%rax)\n movdqu %%xmm10, 160(%%rax)\n movdqu %%xmm11, 176(%%rax)\n"
        "movdqu %%xmm12, 192(%%rax)\n movdqu %%xmm13, 208(%%rax)\n movdqu %%xmm14, 224(%%rax)\n"
        "movdqu %%xmm15, 240(%%rax)\n"
        "pop %%rbp\n"
        :
        : [w] "i"(want), [n] "r"(iters),
          [h] "i"(have), [x] "i"(xmm_have), [xw] "i"(xmm_want)
        : "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
          "r13", "r14", "r15", "memory",
          "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");

    static const char *names[12] = {"rbx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11",
                                    "r12", "r13", "r14", "r15"};
    int bad = 0;
    for (int i = 0; i < 12; i++)
        if (have[i] != want[i]) { printf("BAD %s=0x%lx want 0x%lx\n", names[i], have[i], want[i]); bad++; }
    for (int i = 0; i < 16; i++)
        if (xmm_have[i][0] != xmm_want[i][0] || xmm_have[i][1] != xmm_want[i][1]) {
            printf("BAD xmm%d=0x%lx:%lx want 0x%lx:%lx\n", i, xmm_have[i][1], xmm_have[i][0],
                   xmm_want[i][1], xmm_want[i][0]);
            bad++;
        }
    if (bad) return 3;
    printf("cpustate: all 12 GPRs and 16 XMM registers intact\n");
    return 0;
}
