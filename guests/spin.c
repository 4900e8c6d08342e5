/* spin: counts forever in memory and never exits on its own (for pause/timeouts). */
#include "runtime/rt.h"

volatile u64 spin_counter;

int main(void)
{
    printf("spin: counter at %p\n", (void *)&spin_counter);
    for (;;) spin_counter++;
}
