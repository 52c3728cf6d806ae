/* A target for the --pid safety tests (tests/test_pid_safety.py) that checks itself.
 *
 *   victim sleep SECS   sleeps in 1 ms nanosleeps (stopped inside a syscall)
 *   victim spin SECS    spins in user space with a value in %xmm7 and MXCSR rounding upward
 *                       (both end after SECS or at SIGUSR2, whichever comes first)
 *   victim fork SECS    forks every 200 us; each child checks the data and exits (prints the
 *                       address of the first mapping after "ready")
 *   victim serve        3 threads (rseq, each holding a robust mutex), a sigaltstack; then
 *                       reads commands from stdin: "exit-threads", "signal", "check"
 * Every mode ends by checking its data (FNV-1a over 300 pages in three mappings), that no
 * signal is blocked (/proc/self/status SigBlk) and its rseq area; prints "ok" and exits 0, or
 * prints "BAD <what>" and exits 1.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fenv.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/rseq.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
static const long sizes[3] = {200, 64, 36};
static unsigned char *maps[3];
static uint64_t sum0;
static int bad;

static uint64_t fnv(void) {
    uint64_t h = 1469598103934665603ULL;
    for (int k = 0; k < 3; k++)
        for (long i = 0; i < sizes[k] * PAGE; i++)
            h = (h ^ maps[k][i]) * 1099511628211ULL;
    return h;
}

static void fill(void) {
    for (int k = 0; k < 3; k++) {
        maps[k] = mmap(0, sizes[k] * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        for (long i = 0; i < sizes[k] * PAGE; i++)
            maps[k][i] = (unsigned char)(i * 7 + k + i / PAGE);
    }
    sum0 = fnv();
}

static void fail(const char *what) { printf("BAD %s\n", what); fflush(stdout); bad = 1; }

static int rseq_cpu(void) {             /* glibc >= 2.35 registers rseq for every thread */
    if (!__rseq_size) return -3;
    struct rseq *r = (struct rseq *)((char *)__builtin_thread_pointer() + __rseq_offset);
    return (int)r->cpu_id;
}

static void finish(void) {
    if (fnv() != sum0) fail("data");
    if (rseq_cpu() < 0 && rseq_cpu() != -3) fail("rseq");
    char line[256];
    FILE *f = fopen("/proc/self/status", "r");
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "SigBlk:", 7) && strtoull(line + 7, 0, 16) != 0) fail("sigblk");
    fclose(f);
    if (!bad) printf("ok\n");
    fflush(stdout);
    exit(bad);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static volatile sig_atomic_t done;
static void on_usr2(int sig) { (void)sig; done = 1; }

static void sleep_mode(double secs) {
    double end = now() + secs;
    struct timespec ms = {0, 1000000};
    while (now() < end && !done)
        if (nanosleep(&ms, 0) && !done) fail("nanosleep");
}

static long long now_ns(void) {      /* integer only: no compiler use of %xmm registers */
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void spin_mode(double secs) {
    fesetround(FE_UPWARD);
    long long end = now_ns() + (long long)(secs * 1e9);
    uint64_t pat = 0x0123456789abcdefULL, got;
    __asm__ volatile("movq %0, %%xmm7" :: "r"(pat) : "xmm7");
    while (now_ns() < end && !done) {
        for (int i = 0; i < 100000; i++) {
            __asm__ volatile("movq %%xmm7, %0" : "=r"(got));
            if (got != pat) { fail("xmm7"); return; }
        }
    }
    if (fegetround() != FE_UPWARD) fail("mxcsr");
}

static void fork_mode(double secs) {
    double end = now() + secs;
    int live = 0, children = 0, badkids = 0, st;
    while (now() < end && !done) {
        pid_t c = fork();
        if (c == 0) _exit(fnv() != sum0);
        if (c > 0) { live++; children++; }
        usleep(200);
        while (live && (c = waitpid(-1, &st, live > 64 ? 0 : WNOHANG)) > 0) {
            live--;
            if (!WIFEXITED(st) || WEXITSTATUS(st)) badkids++;
        }
    }
    while (live && wait(&st) > 0) {
        live--;
        if (!WIFEXITED(st) || WEXITSTATUS(st)) badkids++;
    }
    if (badkids) { printf("BAD %d of %d children\n", badkids, children); fflush(stdout); bad = 1; }
}

/* serve mode */
static pthread_mutex_t robust[3];
static int go_pipe[2];
static volatile int on_alt;
static char *alt;

static void *worker(void *arg) {
    pthread_mutex_t *m = arg;
    pthread_mutex_lock(m);              /* held until the thread exits: the kernel marks it */
    if (rseq_cpu() < 0 && rseq_cpu() != -3) fail("thread rseq");
    char c;
    read(go_pipe[0], &c, 1);
    return 0;                           /* exits holding m: robust list walk at exit */
}

static void on_usr1(int sig) {
    char here;
    (void)sig;
    on_alt = &here >= alt && &here < alt + 65536;
}

static void serve_mode(void) {
    pthread_t t[3];
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pipe(go_pipe);
    for (int i = 0; i < 3; i++) {
        pthread_mutex_init(&robust[i], &a);
        pthread_create(&t[i], 0, worker, &robust[i]);
    }
    alt = mmap(0, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    stack_t ss = {.ss_sp = alt, .ss_size = 65536};
    sigaltstack(&ss, 0);
    struct sigaction sa = {.sa_handler = on_usr1, .sa_flags = SA_ONSTACK};
    sigaction(SIGUSR1, &sa, 0);
    usleep(100000);
    printf("ready\n");
    fflush(stdout);
    char cmd[64];
    while (fgets(cmd, sizeof cmd, stdin)) {
        if (!strncmp(cmd, "exit-threads", 12)) {
            write(go_pipe[1], "xxx", 3);
            for (int i = 0; i < 3; i++) {
                pthread_join(t[i], 0);          /* needs clear_child_tid */
                if (pthread_mutex_lock(&robust[i]) != EOWNERDEAD) fail("robust");
            }
            printf("joined\n");
        } else if (!strncmp(cmd, "signal", 6)) {
            raise(SIGUSR1);
            if (!on_alt) fail("altstack");
            printf("signalled\n");
        } else if (!strncmp(cmd, "check", 5)) {
            finish();
        }
        fflush(stdout);
    }
    finish();
}

int main(int argc, char **argv) {
    fill();
    signal(SIGUSR2, on_usr2);
    if (argc > 1 && !strcmp(argv[1], "serve")) serve_mode();
    printf("ready\n");
    if (argc > 1 && !strcmp(argv[1], "fork")) printf("%p\n", (void *)maps[0]);
    fflush(stdout);
    double secs = argc > 2 ? atof(argv[2]) : 1.0;
    if (argc > 1 && !strcmp(argv[1], "fork")) fork_mode(secs);
    if (argc > 1 && !strcmp(argv[1], "spin")) spin_mode(secs);
    else if (strcmp(argv[1], "fork")) sleep_mode(secs);
    finish();
}
