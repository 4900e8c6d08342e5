/* kvmguest guest runtime (C part): see entry.S for how we get here. */
#include <stdarg.h>
#include "rt.h"

#define HVM_START_MAGIC 0x336ec578
struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct hvm_memmap_entry { u64 addr, size; u32 type, reserved; };

struct rt_exc_frame { u64 vector, error, rip, cs, rflags, rsp, ss; };

static const struct hvm_start_info *start_info;
extern u64 rt_pml4[], rt_pdpt[], rt_pd_pool[];
extern u64 rt_exc_stubs[];
static u64 idt[256 * 2] __attribute__((aligned(16)));
extern char rt_irq_stubs[];

void *memset(void *d, int c, size_t n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, size_t n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }
size_t strlen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b) return (u8)*a - (u8)*b;
        if (!*a) return 0;
    }
    return 0;
}

/*
 * 16550 output, buffered a line at a time: wait for the transmit holding register to
 * be empty, then hand the UART up to a FIFO's worth (16 bytes) with one `rep outsb`,
 * which a VMM sees as a single exit.
 */
#define UART_FIFO 16
static char line_buf[UART_FIFO];
static unsigned line_len;

static void flush_line(void)
{
    const char *p = line_buf;
    unsigned long n = line_len;
    if (!n) return;
    while (!(inb(COM1 + 5) & 0x20))
        ;
    __asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"(COM1) : "memory");
    line_len = 0;
}

void putc(char c)
{
    if (c == '\n') putc('\r');
    line_buf[line_len++] = c;
    if (line_len == UART_FIFO || c == '\n') flush_line();
}

void puts(const char *s) { while (*s) putc(*s++); }

static void put_num(u64 v, unsigned base, int width, char pad, int neg)
{
    char buf[24];
    int i = 0;
    do { buf[i++] = "0123456789abcdef"[v % base]; v /= base; } while (v);
    if (neg) buf[i++] = '-';
    while (i < width) buf[i++] = pad;
    while (i) putc(buf[--i]);
}

void printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') { putc(*fmt); continue; }
        fmt++;
        char pad = ' ';
        int width = 0, lng = 0;
        if (*fmt == '0') { pad = '0'; fmt++; }
        while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l') { lng = 1; fmt++; }
        switch (*fmt) {
        case 'd': {
            long v = lng ? va_arg(ap, long) : va_arg(ap, int);
            put_num(v < 0 ? -(u64)v : (u64)v, 10, width, pad, v < 0);
            break;
        }
        case 'u': put_num(lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, width, pad, 0); break;
        case 'x': put_num(lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, width, pad, 0); break;
        case 'p': puts("0x"); put_num((u64)va_arg(ap, void *), 16, width, pad, 0); break;
        case 's': puts(va_arg(ap, const char *)); break;
        case 'c': putc((char)va_arg(ap, int)); break;
        case '%': putc('%'); break;
        default: putc('%'); putc(*fmt); break;
        }
    }
    va_end(ap);
}

/* isa-debug-exit convention: the VMM reports the value written as the result. */
void exit(int code)
{
    flush_line();
    outl(DEBUG_EXIT_PORT, (u32)code);
    for (;;) __asm__ volatile("cli; hlt");
}

void fail(const char *why)
{
    printf("FAIL: %s\n", why);
    exit(1);
}

const char *cmdline(void)
{
    if (!start_info || !start_info->cmdline_paddr) return "";
    return (const char *)start_info->cmdline_paddr;
}

static const char *find_word(const char *key, size_t *vlen_out)
{
    size_t klen = strlen(key);
    const char *p = cmdline();
    while (*p) {
        while (*p == ' ') p++;
        const char *w = p;
        while (*p && *p != ' ') p++;
        if ((size_t)(p - w) >= klen && !strncmp(w, key, klen) &&
            (w[klen] == '=' || w + klen == p)) {
            if (vlen_out) *vlen_out = (size_t)(p - w);
            return w + klen;
        }
    }
    return 0;
}

int cmdline_has(const char *word) { return find_word(word, 0) != 0; }

/* "oninput": the handshake a test holds a guest with (never a pass count): run until a
 * byte arrives on COM1, then `n` more iterations. Returns the last iteration to run: n
 * without "oninput"; with it 0 (run on) until the byte came, then i + n. */
u64 loop_end(u64 i, u64 n, u64 end)
{
    static int mode = -1;
    if (mode < 0) mode = cmdline_has("oninput");
    if (!mode || end) return mode ? end : n;
    if (!(inb(COM1 + 5) & 1)) return 0;
    inb(COM1);
    printf("go after %lu\n", i);
    return i + n;
}

u64 cmdline_u64(const char *key, u64 dflt)
{
    const char *v = find_word(key, 0);
    if (!v || *v != '=') return dflt;
    v++;
    u64 n = 0, base = 10;
    if (v[0] == '0' && v[1] == 'x') { base = 16; v += 2; }
    for (;; v++) {
        int d;
        if (*v >= '0' && *v <= '9') d = *v - '0';
        else if (base == 16 && *v >= 'a' && *v <= 'f') d = *v - 'a' + 10;
        else break;
        n = n * base + (u64)d;
    }
    if (*v == 'K') n <<= 10;
    else if (*v == 'M') n <<= 20;
    else if (*v == 'G') n <<= 30;
    return n;
}

int ram_ranges(struct ram_range *out, int max)
{
    int n = 0;
    if (!start_info || start_info->version < 1) return 0;
    const struct hvm_memmap_entry *e = (const void *)start_info->memmap_paddr;
    for (u32 i = 0; i < start_info->memmap_entries && n < max; i++) {
        if (e[i].type != 1) continue;
        out[n].start = e[i].addr;
        out[n].end = e[i].addr + e[i].size;
        n++;
    }
    return n;
}

int ws_build(u64 base, u64 pages, struct ram_range *ws, int max)
{
    struct ram_range ram[16];
    int n = ram_ranges(ram, 16), nws = 0;
    for (int r = 0; r < n && pages && nws < max; r++) {
        u64 s = ram[r].start < base ? base : ram[r].start;
        s = (s + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
        if (s >= ram[r].end) continue;
        u64 avail = (ram[r].end - s) / PAGE_SIZE;
        u64 take = avail < pages ? avail : pages;
        ws[nws].start = s;
        ws[nws].end = s + take * PAGE_SIZE;
        nws++;
        pages -= take;
    }
    return pages ? 0 : nws;
}

u64 ws_page(const struct ram_range *ws, int n, u64 i)
{
    for (int r = 0; r < n; r++) {
        u64 count = (ws[r].end - ws[r].start) / PAGE_SIZE;
        if (i < count) return ws[r].start + i * PAGE_SIZE;
        i -= count;
    }
    return 0;
}

u64 ram_top(void)
{
    struct ram_range r[16];
    int n = ram_ranges(r, 16);
    u64 top = 0;
    for (int i = 0; i < n; i++) if (r[i].end > top) top = r[i].end;
    return top;
}

/* Identity-map all RAM above the first 8 MiB (entry.S mapped those). */
static void map_ram(void)
{
    u64 top = ram_top();
    if (top > 64UL << 30) top = 64UL << 30;
    struct ram_range r[16];
    int n = ram_ranges(r, 16);
    for (int i = 0; i < n; i++) {
        u64 a = r[i].start & ~((2UL << 20) - 1);
        if (a < (8UL << 20)) a = 8UL << 20;
        for (; a < r[i].end && a < top; a += 2UL << 20) {
            u64 gib = a >> 30;
            u64 *pd = &rt_pd_pool[gib * 512];
            rt_pdpt[gib] = (u64)pd | 0x7;
            pd[(a >> 21) & 511] = a | 0x87;
        }
    }
    __asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
}

void map_2m(u64 addr)
{
    u64 gib = addr >> 30;
    u64 *pd = &rt_pd_pool[gib * 512];
    if (!(rt_pdpt[gib] & 1))
        rt_pdpt[gib] = (u64)pd | 0x7;
    pd[(addr >> 21) & 511] = (addr & ~((2UL << 20) - 1)) | 0x83;
    __asm__ volatile("mov %%cr3, %%rax; mov %%rax, %%cr3" ::: "rax", "memory");
}

void rt_set_gate(u32 v, u64 h)
{
    idt[v * 2] = (h & 0xffff) | (0x08UL << 16) | (0x8eUL << 40) | ((h >> 16 & 0xffff) << 48);
    idt[v * 2 + 1] = h >> 32;
}

void rt_load_idt(void)
{
    struct { u16 limit; u64 base; } __attribute__((packed)) p = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" :: "m"(p));
}

/* Exceptions 0-19 now; the gate of an interrupt vector (its stub: 16 bytes each from
 * rt_irq_stubs, for vectors 32-255) is set when a handler is installed, so that a guest
 * without interrupts does not pay for 224 gates (CPL0 code is emulated on some hosts). */
static void setup_idt(void)
{
    for (u32 v = 0; v < 20; v++) rt_set_gate(v, rt_exc_stubs[v]);
    rt_load_idt();
}

void rt_irq_gate(u32 v) { rt_set_gate(v, (u64)rt_irq_stubs + (v - 32) * 16); }

u64 rt_rsdp(void) { return start_info ? start_info->rsdp_paddr : 0; }

struct hvm_modlist_entry { u64 paddr, size, cmdline_paddr, reserved; };

u32 rt_module(u32 i, u64 *addr, u64 *size)
{
    if (!start_info || i >= start_info->nr_modules || !start_info->modlist_paddr) return 0;
    const struct hvm_modlist_entry *m = (const void *)start_info->modlist_paddr;
    *addr = m[i].paddr;
    *size = m[i].size;
    return 1;
}

void rt_exception(struct rt_exc_frame *f)
{
    printf("EXCEPTION %lu at rip=0x%lx error=0x%lx rsp=0x%lx\n",
           f->vector, f->rip, f->error, f->rsp);
    exit(0x7f);
}

void rt_main(u32 start_info_paddr)
{
    start_info = (const struct hvm_start_info *)(u64)start_info_paddr;
    setup_idt();
    if (start_info->magic != HVM_START_MAGIC) fail("bad hvm_start_info magic");
    map_ram();
    exit(main());
}
