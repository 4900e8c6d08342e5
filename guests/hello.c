/* hello: prints a greeting and its command line, exits 0. */
#include "runtime/rt.h"

int main(void)
{
    printf("Hello from a kvmguest guest!\n");
    printf("cmdline: %s\n", cmdline());
    return 0;
}
