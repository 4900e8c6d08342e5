/*
 * echo: interrupt-driven serial input. COM1's received-data interrupt (IRQ 4, through the
 * IOAPIC) fills a line buffer; each complete line is echoed back as "echo: LINE" until
 * the line "quit".
 */
#include "runtime/smp.h"

#define COM1_IRQ 4
#define VECTOR 0x44

static volatile char ring[256];
static volatile u32 head, tail, interrupts;      /* the handler writes head, main reads */

static void on_rx(u32 v)
{
    interrupts++;
    while (inb(COM1 + 5) & 1) {
        char c = (char)inb(COM1);
        if (head - tail < sizeof(ring)) ring[head++ % sizeof(ring)] = c;
    }
}

int main(void)
{
    cpu_count();
    apic_init();
    set_irq_handler(VECTOR, on_rx);
    ioapic_route(COM1_IRQ, VECTOR, cpu_id());
    outb(COM1 + 4, 0x0b);                         /* DTR, RTS, OUT2 */
    outb(COM1 + 1, 0x01);                         /* IER: received data available */
    printf("echo: ready\n");
    char line[128];
    u32 len = 0;
    for (;;) {
        while (tail == head) sti_hlt();
        char c = ring[tail++ % sizeof(ring)];
        if (c != '\r' && c != '\n') {
            if (len < sizeof(line) - 1) line[len++] = c;
            continue;
        }
        if (!len) continue;
        line[len] = 0;
        printf("echo: %s\n", line);
        int quit = len == 4 && !strncmp(line, "quit", 4);
        len = 0;
        if (quit) break;
    }
    printf("echo: bye after %u interrupts\n", interrupts);
    return 0;
}
