/* kvmguest guest runtime: serial console, exit, command line, memory map. */
#ifndef RT_H
#define RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;

#define PAGE_SIZE 4096UL
#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4
#define TESTDEV_FLUSH_PORT 0xe4   /* pc-testdev: flush the page at this address */

/* The guest's entry point: return value is the exit code. */
int main(void);

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* The kvmguest port (docs/fixtures.md): ask for a snapshot here (KVMGUEST_READY) or a
 * migration now (KVMGUEST_MIGRATE). Reading it gives how many times this guest has been
 * restored along its history, so kvmguest_request() returns 1 when the guest now runs
 * from a snapshot taken at the request (restored, reset or migrated), 0 when nothing
 * honoured it (the guest simply ran on). */
#define KVMGUEST_PORT 0xf8
#define KVMGUEST_READY 1
#define KVMGUEST_MIGRATE 2
static inline int kvmguest_request(u32 what)
{
    u32 before = inl(KVMGUEST_PORT);
    outl(KVMGUEST_PORT, what);
    return inl(KVMGUEST_PORT) != before;
}

void putc(char c);
void puts(const char *s);
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void __attribute__((noreturn)) exit(int code);
void __attribute__((noreturn)) fail(const char *why);

/* Command line: "key=value" words; numbers in decimal or 0x hex, with K/M/G suffixes. */
/* PVH module i (Linux: the initrd is module 0): 1 and its address and size, or 0. */
u32 rt_module(u32 i, u64 *addr, u64 *size);
const char *cmdline(void);
u64 cmdline_u64(const char *key, u64 dflt);
int cmdline_has(const char *word);
/* The end of a loop of n iterations, at iteration i (end: what it returned last time):
 * n, or with "oninput" 0 (run on) until a byte arrives on COM1, then i + n. */
u64 loop_end(u64 i, u64 n, u64 end);

/* RAM from the PVH memory map (type 1 entries), sorted by address. */
struct ram_range { u64 start, end; };
int ram_ranges(struct ram_range *out, int max);
u64 ram_top(void);

/* A working set: the first `pages` RAM pages at or above `base`, following the memory map
 * across holes, as address ranges (at most `max`); returns how many ranges, 0 if the RAM
 * runs out. ws_page() is the address of page i of it. */
int ws_build(u64 base, u64 pages, struct ram_range *ws, int max);
u64 ws_page(const struct ram_range *ws, int n, u64 i);

/* Identity-map the 2 MiB page holding `addr` (below 64 GiB) even if it is not RAM. */
void map_2m(u64 addr);

extern char _start_image[], _end_image[];

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
int strncmp(const char *a, const char *b, size_t n);
size_t strlen(const char *s);

#endif
