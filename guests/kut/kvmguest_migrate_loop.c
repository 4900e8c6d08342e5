/*
 * A hostile test of `kvmguest kut` itself: it asks for migration again and again
 * (migrate() of lib/migrate.c, argv[1] times, 20 by default), as a test that migrates
 * after every key would. The runner must not keep every snapshot along the way.
 */
#include "libcflat.h"
#include "migrate.h"
#include "asm/io.h"

#define COM1 0x3f8

int __getchar(void)
{
	if (inb(COM1 + 5) & 1)
		return inb(COM1);
	return -1;
}

int main(int argc, char **argv)
{
	long times = argc > 1 ? atol(argv[1]) : 20;

	for (long i = 0; i < times; i++) {
		migrate();
		printf("migrator: migration %ld done\n", i + 1);
	}
	report(true, "%ld migrations", times);
	return report_summary();
}
