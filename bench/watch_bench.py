#!/usr/bin/env python3
"""Benchmark: what watching costs per fault (README, "uffdtool watch", Performance).

Builds a C program that maps SIZE MiB of fresh private anonymous memory (MADV_NOHUGEPAGE, as
the Firecracker toucher does) and reads one byte of every page, timing only that loop.  In one
run, alternating, REPS times each, it measures the program alone and under each mode, and the
fast serving loop (``serve-file --zero --firecracker-socket``) with the shared C toucher
(``uffd_bench.c``) on the same page count; prints a table of µs per fault:

    added cost per fault = (touch time under the mode - touch time alone) / pages
    fast loop            = uffd_bench's us_per_page (all-in, kernel round trip included)

Usage (root, from the project root):  sudo python3 bench/watch_bench.py [--size MiB] [--reps N]
Python standard library only; needs gcc.
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = [sys.executable, os.path.join(ROOT, "uffdtool.py")]

TOUCHER = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}
int main(int argc, char **argv) {
    size_t size = (size_t)atol(argv[1]) << 20, ps = sysconf(_SC_PAGESIZE);
    int wait = argc > 2 && !strcmp(argv[2], "--wait");   /* --pid: touch after a line on stdin */
    char *a = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED) { perror("mmap"); return 2; }
    madvise(a, size, MADV_NOHUGEPAGE);
    if (wait) {
        char line[16];
        printf("0x%lx\n", (unsigned long)a); fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 2;
    }
    unsigned long sum = 0;
    double t0 = now();
    for (size_t off = 0; off < size; off += ps) sum += *(volatile char *)(a + off);
    double t1 = now();
    printf("{\"pages\":%zu,\"touch_s\":%.6f,\"sum\":%lu}\n", size / ps, t1 - t0, sum);
    return 0;
}
"""


def build(src, name, flags=()):
    cache = os.path.join(tempfile.gettempdir(), "uffdtool-bench")
    os.makedirs(cache, exist_ok=True)
    exe = os.path.join(cache, "%s-%s" % (name, hashlib.sha1(src.encode()).hexdigest()[:12]))
    if not os.path.exists(exe):
        c = exe + ".c"
        with open(c, "w") as f:
            f.write(src)
        subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, c] + list(flags), check=True)
    return exe


def touch_result(out):
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def run_cmd(prefix, toucher, size):
    """The toucher under ``prefix`` (a tool command line ending in '--', or []): its result."""
    r = subprocess.run(prefix + [toucher, str(size)], capture_output=True, text=True,
                       timeout=300)
    if r.returncode:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(prefix[-6:]), r.returncode,
                                               r.stderr[-500:]))
    return touch_result(r.stdout if "--json" not in prefix else r.stderr)


def _uffd_fds(pid):
    d = "/proc/%d/fd" % pid
    try:
        return [f for f in os.listdir(d) if "userfaultfd" in os.readlink(os.path.join(d, f))]
    except OSError:
        return []


def _tracer(pid):
    with open("/proc/%d/status" % pid) as f:
        return int(next(x for x in f if x.startswith("TracerPid:")).split()[1])


def run_pid(args, toucher, size):
    """``watch --pid PID --all-anon ARGS`` on a waiting toucher; touch once attached."""
    t = subprocess.Popen([toucher, str(size), "--wait"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    t.stdout.readline()
    w = subprocess.Popen(TOOL + ["watch", "--pid", str(t.pid), "--all-anon"] + args,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not _uffd_fds(w.pid):            # injected and taken (registers while stopped)
            if time.monotonic() > deadline or w.poll() is not None:
                raise RuntimeError("watch --pid did not attach: %s" % w.stderr.read()[-500:])
            time.sleep(0.005)
        while _tracer(t.pid):                  # detached: the ranges are registered
            time.sleep(0.005)
        t.stdin.write("go\n")
        t.stdin.flush()
        res = touch_result(t.stdout.read())
        t.wait(30)
        return res
    finally:
        w.send_signal(2)
        w.wait(30)
        if t.poll() is None:
            t.kill()
            t.wait()


def run_fast_loop(fc_toucher, size, k=1):
    """serve-file --zero --firecracker-socket with the shared C toucher: its us_per_page."""
    d = tempfile.mkdtemp(prefix="uffdtool-bench-")
    sock = os.path.join(d, "h.sock")
    h = subprocess.Popen(TOOL + ["serve-file", "--zero", "--quiet", "--firecracker-socket",
                                 sock, "--readahead", str(k)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(sock):
            if time.monotonic() > deadline or h.poll() is not None:
                raise RuntimeError("serve-file did not listen: %s" % h.stderr.read()[-500:])
            time.sleep(0.005)
        r = subprocess.run([fc_toucher, "--fc-socket", sock, "-s", str(size), "-m", "zero"],
                           capture_output=True, text=True, timeout=300)
        out = touch_result(r.stdout)
        if r.returncode or out.get("verify") != "ok":
            raise RuntimeError("fc toucher: %s %s" % (r.returncode, r.stdout[-300:]))
        h.wait(10)
        return out
    finally:
        if h.poll() is None:
            h.kill()
            h.wait()


def find_fc_bench():
    for d in (os.path.join(ROOT, "..", "shared", "bench"), "/work/shared/bench"):
        p = os.path.join(d, "uffd_bench.c")
        if os.path.exists(p):
            return p
    sys.exit("uffd_bench.c (the shared Firecracker toucher) not found beside the checkout")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="MiB touched (default 256)")
    ap.add_argument("--reps", type=int, default=5, help="runs of each mode (default 5)")
    ap.add_argument("--modes", default="all",
                    help="comma list of: quiet,log,serve,pid,pidlog (default all)")
    ap.add_argument("--json", metavar="FILE", help="also write every raw result")
    a = ap.parse_args()
    toucher = build(TOUCHER, "watch-toucher")
    with open(find_fc_bench()) as f:
        fc = build(f.read(), "uffd_bench", ["-Wall"])
    log = tempfile.NamedTemporaryFile(prefix="uffdtool-bench-", suffix=".jsonl")
    w = TOOL + ["watch", "--quiet"]
    modes = {
        "plain": lambda: run_cmd([], toucher, a.size),
        "watch --quiet -- CMD": lambda: run_cmd(w + ["--"], toucher, a.size),
        "watch --quiet --log FILE -- CMD":
            lambda: run_cmd(w + ["--log", log.name, "--"], toucher, a.size),
        "serve-file --zero --no-fault-log -- CMD":
            lambda: run_cmd(TOOL + ["serve-file", "--zero", "--quiet", "--no-fault-log", "--"],
                            toucher, a.size),
        "watch --quiet --pid": lambda: run_pid(["--quiet"], toucher, a.size),
        "watch --quiet --log FILE --pid":
            lambda: run_pid(["--quiet", "--log", log.name], toucher, a.size),
    }
    keys = {"quiet": "watch --quiet -- CMD", "log": "watch --quiet --log FILE -- CMD",
            "serve": "serve-file --zero --no-fault-log -- CMD", "pid": "watch --quiet --pid",
            "pidlog": "watch --quiet --log FILE --pid"}
    if a.modes != "all":
        chosen = ["plain"] + [keys[m] for m in a.modes.split(",")]
        modes = {k: v for k, v in modes.items() if k in chosen}
    res = {k: [] for k in modes}
    fast = []
    for rep in range(a.reps):
        for name, fn in modes.items():
            res[name].append(fn()["touch_s"])
        fast.append(run_fast_loop(fc, a.size)["us_per_page"])
        print("rep %d done" % (rep + 1), file=sys.stderr)
    pages = (a.size << 20) // os.sysconf("SC_PAGE_SIZE")
    print("%d pages, %d reps alternating; median and (min) of each; added = (touch time - "
          "plain touch time) / pages" % (pages, a.reps))
    print("| run | touch time, s | µs per fault added | × fast loop's µs per page |")
    print("|---|---|---|---|")
    plain = {f.__name__: f(res["plain"]) for f in (statistics.median, min)}
    fl = {f.__name__: f(fast) for f in (statistics.median, min)}
    print("| plain (no tool) | %.3f (%.3f) | – | – |" % (plain["median"], plain["min"]))
    for name, ts in res.items():
        if name == "plain":
            continue
        m = {f.__name__: f(ts) for f in (statistics.median, min)}
        add = {k: (m[k] - plain[k]) * 1e6 / pages for k in m}
        print("| `%s` | %.3f (%.3f) | %.2f (%.2f) | %.2f× (%.2f×) |" % (
            name, m["median"], m["min"], add["median"], add["min"],
            add["median"] / fl["median"], add["min"] / fl["min"]))
    print("| fast loop: `serve-file --zero --firecracker-socket`, uffd_bench `us_per_page` "
          "(all-in) | – | %.2f (%.2f) | 1.00× |" % (fl["median"], fl["min"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"pages": pages, "touch_s": res, "fast_us_per_page": fast}, f)


if __name__ == "__main__":
    main()
