/* fault: triple-faults on purpose (an exception with no usable IDT). */
#include "runtime/rt.h"

int main(void)
{
    printf("fault: loading an empty IDT and raising #UD\n");
    struct { u16 limit; u64 base; } __attribute__((packed)) none = { 0, 0 };
    __asm__ volatile("lidt %0; ud2" :: "m"(none));
    return 1;  /* not reached */
}
