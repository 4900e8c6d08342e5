/*
 * echo: interrupt-driven serial input. COM1's received-data interrupt (IRQ 4, through the
 * IOAPIC) fills a line buffer; each complete line is echoed back as "echo: LINE" until
 * the line "quit".
 */
#include "runtime/smp.h"

#define VECTOR 0x44

int main(void)
{
    cpu_count();
    apic_init();
    console_input_init(VECTOR);
    printf("echo: ready\n");
    char line[128];
    for (;;) {
        u32 len = read_line(line, sizeof(line));
        printf("echo: %s\n", line);
        if (len == 4 && !strncmp(line, "quit", 4)) break;
    }
    printf("echo: bye after %u interrupts\n", console_interrupts());
    return 0;
}
