/* flood: prints to the console as fast as it can, forever. */
#include "runtime/rt.h"

int main(void)
{
    for (u64 n = 0;; n++)
        printf("flood %lu: the quick brown fox jumps over the lazy dog\n", n);
}
