/*
 * A tiny bare-metal Firecracker guest for the real-Firecracker tests (README "Tested with a real
 * Firecracker").  Built by tests/firecracker/build_guest.py into an ELF "vmlinux" that Firecracker
 * boots with its Linux boot protocol: it loads the PT_LOAD segment at 1 MiB and jumps to _start in
 * 64-bit mode with the first 1 GiB identity-mapped, interrupts off, RSI = the boot_params page.
 * (A Linux guest does not boot on the nested KVM the suite runs on; this one needs nothing but
 * plain instructions, port I/O and MMIO.)
 *
 * What it does, all reported on the serial port (0x3f8, which Firecracker copies to its stdout):
 *   1. writes two 8-byte words into each of PATTERN_PAGES pages from PATTERN_BASE (and of
 *      HIGH_PAGES pages from 4 GiB if the guest has memory there), each word a function of its
 *      own address (see fill(): why two words and which ones);
 *   2. sets up the virtio-mmio balloon device if Firecracker has one (found on the command line);
 *   3. prints "guest: ready" and then obeys one-byte commands read from the serial port
 *      (Firecracker feeds its stdin into it).  The driver snapshots the VM here, so every
 *      command runs after a restore:
 *        'v'  ROUNDS verification rounds over the whole pattern: "guest: round N/M verify ok ..."
 *             or "guest: round N/M MISMATCH ..." (the first bad word and the bad-page count);
 *        'b'  inflate the balloon by the device's num_pages (set by the host with PATCH /balloon):
 *             hand the top pages of the pattern to the host, which drops them (MADV_DONTNEED, a
 *             UFFD_EVENT_REMOVE for the handler); from then on 'v' expects those pages to read 0;
 *        'q'  reset through the i8042 controller, which makes Firecracker exit.
 * Compiled with -mgeneral-regs-only: Firecracker starts the vCPU with CR4 = PAE only, so SSE
 * instructions would fault.
 */
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#ifndef PATTERN_BASE
#define PATTERN_BASE 0x1000000UL        /* 16 MiB: clear of the loader's low pages and of us */
#endif
#ifndef PATTERN_PAGES
#define PATTERN_PAGES 16384UL           /* 64 MiB */
#endif
#ifndef ROUNDS
#define ROUNDS 2
#endif
/* A guest larger than 3.25 GiB has a second memory region from 4 GiB (above the MMIO gap), which
   Firecracker hands over as a second handshake region: then HIGH_PAGES pages there are checked
   too (found in the e820 map). */
#define HIGH_BASE 0x100000000UL
#ifndef HIGH_PAGES
#define HIGH_PAGES 1024UL
#endif
#define PAGE 4096UL
#define SEED 0x5546464474E1C0DEUL

/* ---- entry: our own stack, then main(boot_params) ------------------------------------------ */
u8 stack[16384] __attribute__((aligned(16)));     /* used by _start */
void main(u8 *boot_params);
extern u8 stack[];
__asm__(".section .text.start\n"
        ".global _start\n"
        "_start:\n"
        "  lea stack+16384(%rip), %rsp\n"
        "  mov %rsi, %rdi\n"
        "  call main\n"
        "1: hlt\n"
        "  jmp 1b\n"
        ".text\n");

/* ---- port I/O and the serial port ------------------------------------------------------------ */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

#define COM1 0x3f8
static void putc(char c) { outb(COM1, (u8)c); }      /* Firecracker's UART never makes us wait */
static void puts(const char *s) { while (*s) putc(*s++); }
static void puthex(u64 v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts(buf + i);
}
static void putdec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(buf + i);
}

static void delay(void) { for (volatile u32 i = 0; i < 1000; i++) { } }   /* a few ms here */

/* Wait for one byte on the serial port.  Every LSR read is a VM exit, so poll gently. */
static u8 getc(void)
{
    while (!(inb(COM1 + 5) & 1))
        delay();
    return inb(COM1);
}

/* ---- the pattern ----------------------------------------------------------------------------- */
static inline u64 pattern(u64 addr) { return (addr ^ SEED) * 0x9E3779B97F4A7C15UL; }

/* This machine's nested KVM emulates every guest instruction (about 1 us each), so writing
   whole pages would take a minute: each page gets two words, the first one and one whose offset
   moves with the page number, so that across the pages every 8-byte slot of a page is checked
   (a page served from the wrong file offset, or only partly, is caught). */
static inline u64 word2(u64 page) { return page + ((page >> 12) * 8 * 97 % (PAGE - 8) & ~7UL) + 8; }

static struct { u64 base, pages; } ranges[2] = { { PATTERN_BASE, PATTERN_PAGES } };
static int nranges = 1;
static u64 checked_pages = PATTERN_PAGES;

static void fill(void)
{
    for (int r = 0; r < nranges; r++)
        for (u64 p = ranges[r].base; p < ranges[r].base + ranges[r].pages * PAGE; p += PAGE) {
            *(volatile u64 *)p = pattern(p);
            *(volatile u64 *)word2(p) = pattern(word2(p));
        }
}

/* Pages [balloon_first, PATTERN_BASE + PATTERN_PAGES*PAGE) were given to the balloon: zeros. */
static u64 balloon_first = PATTERN_BASE + PATTERN_PAGES * PAGE;

static void verify(int round)
{
    u64 bad_pages = 0, zero_pages = 0, first_addr = 0, first_got = 0, first_want = 0;
    for (int r = 0; r < nranges; r++) {
        for (u64 p = ranges[r].base; p < ranges[r].base + ranges[r].pages * PAGE; p += PAGE) {
            int ballooned = r == 0 && p >= balloon_first, bad = 0;
            zero_pages += ballooned;
            u64 words[2] = { p, word2(p) };
            for (int w = 0; w < 2; w++) {
                u64 a = words[w], got = *(volatile u64 *)a, want = ballooned ? 0 : pattern(a);
                if (got != want) {
                    if (!bad_pages && !bad) { first_addr = a; first_got = got; first_want = want; }
                    bad = 1;
                }
            }
            bad_pages += bad;
        }
    }
    puts("guest: round "); putdec(round); puts("/"); putdec(ROUNDS);
    if (!bad_pages) {
        puts(" verify ok pages="); putdec(checked_pages);
        puts(" zero_pages="); putdec(zero_pages); puts("\n");
        return;
    }
    puts(" MISMATCH addr="); puthex(first_addr);
    puts(" got="); puthex(first_got); puts(" want="); puthex(first_want);
    puts(" bad_pages="); putdec(bad_pages); puts("\n");
}

/* ---- the virtio-mmio balloon (virtio 1.x, polled: no interrupts) ----------------------------- */
/* Firecracker appends "virtio_mmio.device=4K@0xd0000000:5" to the command line it writes at
   boot_params.cmd_line_ptr (offset 0x228) for each virtio device. */
static u64 find_mmio_device(u8 *boot_params)
{
    const char *key = "virtio_mmio.device=";
    const char *s = (const char *)(u64)*(u32 *)(boot_params + 0x228);
    for (; *s; s++) {
        int i = 0;
        while (key[i] && s[i] == key[i]) i++;
        if (key[i]) continue;
        s += i;
        while (*s && *s != '@') s++;
        if (s[0] != '@' || s[1] != '0' || s[2] != 'x') return 0;
        u64 v = 0;
        for (s += 3;; s++) {
            if (*s >= '0' && *s <= '9') v = v * 16 + (u64)(*s - '0');
            else if (*s >= 'a' && *s <= 'f') v = v * 16 + (u64)(*s - 'a' + 10);
            else break;
        }
        return v;
    }
    return 0;
}

/* Firecracker identity-maps only the first GiB.  Map GiB N (N < 512) with 2 MiB pages in a page
   directory of our own: GiB 3 uncached for the MMIO window (3.25-4 GiB), GiB 4 for high memory. */
#define PG_2M_RW 0x83                   /* present, writable, 2 MiB page */
#define PG_UNCACHED 0x18                /* PWT | PCD */
static u64 pd[2][512] __attribute__((aligned(4096)));
static void map_gib(u64 gib, u64 *dir, u64 flags)
{
    u64 cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    u64 *pml4 = (u64 *)(cr3 & ~0xfffUL);
    u64 *pdpt = (u64 *)(pml4[0] & 0xffffffffff000UL);
    for (u64 i = 0; i < 512; i++)
        dir[i] = ((gib << 30) + (i << 21)) | flags;
    pdpt[gib] = (u64)dir | 0x3;
    __asm__ volatile("mov %0, %%cr3" : : "r"(cr3) : "memory");
}

/* RAM at HIGH_BASE in the e820 map?  (boot_params: entry count at 0x1e8, entries at 0x2d0) */
static void find_high_memory(u8 *boot_params)
{
    u8 n = boot_params[0x1e8];
    for (u8 i = 0; i < n; i++) {
        u8 *e = boot_params + 0x2d0 + 20 * i;
        u64 addr = *(u64 *)e, size = *(u64 *)(e + 8);
        u32 type = *(u32 *)(e + 16);
        if (type == 1 && addr <= HIGH_BASE && addr + size >= HIGH_BASE + HIGH_PAGES * PAGE) {
            map_gib(HIGH_BASE >> 30, pd[1], PG_2M_RW);
            ranges[1].base = HIGH_BASE;
            ranges[1].pages = HIGH_PAGES;
            nranges = 2;
            checked_pages += HIGH_PAGES;
        }
    }
}

#define QSZ 16
struct desc { u64 addr; u32 len; u16 flags, next; };
struct avail { u16 flags, idx, ring[QSZ], used_event; };
struct used { u16 flags, idx; struct { u32 id, len; } ring[QSZ]; u16 avail_event; };
/* Two queues (inflate, deflate): Firecracker activates the device only when all are ready. */
struct vq { struct desc d[QSZ]; struct avail a; u8 pad[4096 - 16 * QSZ - sizeof(struct avail)];
            struct used u; } __attribute__((aligned(4096)));        /* each queue page-aligned */
static struct vq vq[2];
#define MAX_BALLOON_PAGES 1024          /* 4 MiB, in descriptors of 256 page numbers each */
static u32 pfns[MAX_BALLOON_PAGES];

static volatile u32 *balloon;           /* the device's MMIO registers, or 0 */
static u32 rd(u32 off) { return balloon[off / 4]; }
static void wr(u32 off, u32 v) { balloon[off / 4] = v; }

static void balloon_init(u8 *boot_params)
{
    u64 base = find_mmio_device(boot_params);
    if (!base) { puts("guest: no balloon\n"); return; }
    if (base < 0xC0000000UL) { puts("guest: balloon outside GiB 3\n"); return; }
    map_gib(3, pd[0], PG_2M_RW | PG_UNCACHED);
    balloon = (volatile u32 *)base;
    if (rd(0x0) != 0x74726976 || rd(0x4) != 2 || rd(0x8) != 5) {
        puts("guest: device at "); puthex(base); puts(" is not a virtio 1 balloon\n");
        balloon = 0;
        return;
    }
    wr(0x70, 0); wr(0x70, 1); wr(0x70, 1 | 2);             /* reset, ACKNOWLEDGE, DRIVER */
    wr(0x24, 1); wr(0x20, 1);                              /* accept VIRTIO_F_VERSION_1 only */
    wr(0x70, 1 | 2 | 8);                                   /* FEATURES_OK */
    for (u32 q = 0; q < 2; q++) {
        wr(0x30, q);
        wr(0x38, QSZ);
        wr(0x80, (u32)(u64)vq[q].d); wr(0x84, 0);
        wr(0x90, (u32)(u64)&vq[q].a); wr(0x94, 0);
        wr(0xa0, (u32)(u64)&vq[q].u); wr(0xa4, 0);
        wr(0x44, 1);                                       /* QueueReady */
    }
    wr(0x70, 1 | 2 | 8 | 4);                               /* DRIVER_OK */
    puts("guest: balloon at "); puthex(base); puts(" status="); puthex(rd(0x70)); puts("\n");
}

/* Give the host the top num_pages pages of the pattern and wait until it has dropped them
   (Firecracker advances the used index after its MADV_DONTNEED). */
static void balloon_inflate(void)
{
    if (!balloon) { puts("guest: balloon FAILED no device\n"); return; }
    u32 n = rd(0x100);                                     /* config.num_pages */
    if (n == 0 || n > MAX_BALLOON_PAGES) {
        puts("guest: balloon FAILED num_pages="); putdec(n); puts("\n");
        return;
    }
    u64 first = PATTERN_BASE + (PATTERN_PAGES - n) * PAGE;
    for (u32 i = 0; i < n; i++)
        pfns[i] = (u32)((first >> 12) + i);
    struct desc *d = vq[0].d;
    struct avail *a = &vq[0].a;
    u16 start = a->idx, k = 0;
    for (u32 i = 0; i < n; i += 256, k++) {
        u32 cnt = n - i < 256 ? n - i : 256;
        d[k].addr = (u64)&pfns[i]; d[k].len = cnt * 4; d[k].flags = 0; d[k].next = 0;
        a->ring[(u16)(start + k) % QSZ] = k;
    }
    __asm__ volatile("" : : : "memory");
    a->idx = (u16)(start + k);
    wr(0x50, 0);                                           /* QueueNotify: the inflate queue */
    volatile u16 *used_idx = &vq[0].u.idx;
    for (u64 spin = 0; *used_idx != (u16)(start + k); spin++) {
        if (spin > 10000) { puts("guest: balloon FAILED timeout\n"); return; }
        delay();
    }
    wr(0x104, n);                                          /* config.actual */
    balloon_first = first;
    puts("guest: balloon inflated pages="); putdec(n); puts(" first="); puthex(first); puts("\n");
}

/* ---- main ------------------------------------------------------------------------------------ */
void main(u8 *boot_params)
{
    puts("guest: start\n");
    find_high_memory(boot_params);
    fill();
    puts("guest: filled base="); puthex(PATTERN_BASE); puts(" pages="); putdec(PATTERN_PAGES);
    if (nranges == 2) {
        puts(" high_base="); puthex(HIGH_BASE); puts(" high_pages="); putdec(HIGH_PAGES);
    }
    puts("\n");
    balloon_init(boot_params);
    puts("guest: ready\n");
    for (;;) {
        u8 c = getc();
        if (c == 'v') {
            for (int r = 1; r <= ROUNDS; r++)
                verify(r);
            puts("guest: done\n");
        } else if (c == 'b') {
            balloon_inflate();
        } else if (c == 'q') {
            puts("guest: reset\n");
            outb(0x64, 0xfe);                              /* i8042 reset: Firecracker exits */
        }
    }
}
