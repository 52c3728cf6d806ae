#!/usr/bin/env python3
"""How long `watch --pid` stops its target, with and without --dontneed (README "--dontneed"
and "What --pid guarantees").  With --dontneed there are two stops (the copy is made between
them): the reported stop is the second, and the first is shown beside it.  Starts a C target
(gcc) with PAGES touched private anonymous pages and THREADS threads, attaches RUNS times each
way, prints median and max of target_stopped_s (ready/stats records) and the snapshot size.
Usage (root):

    python3 bench/pid_stop.py [--pages 4000] [--threads 4] [--runs 15] [--redis]

--redis: the same against a real redis-server (127.0.0.1, a free port) with 20,000 keys.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "uffdtool.py")

C_TARGET = r"""
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
static void *idle(void *a) { for (;;) pause(); return a; }
int main(int argc, char **argv) {
    long pages = atol(argv[1]), threads = atol(argv[2]);
    /* a few separate mappings, like a real heap */
    for (int k = 0; k < 8; k++) {
        char *p = mmap(0, pages / 8 * 4096, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        for (long i = 0; i < pages / 8; i++) p[i * 4096] = (char)(i + k);
    }
    pthread_t t;
    for (long i = 0; i < threads; i++) pthread_create(&t, 0, idle, 0);
    write(1, "ready\n", 6);
    for (;;) pause();
}
"""


def stop_times(pid, dontneed, runs):
    out = []
    for _ in range(runs):
        args = [sys.executable, TOOL, "watch", "--pid", str(pid), "--all-anon", "--json",
                "--quiet", "--duration", "0.2"] + (["--dontneed"] if dontneed else [])
        p = subprocess.run(args, capture_output=True, text=True, timeout=60)
        recs = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]

        def field(name):
            return next((r[name] for r in recs if name in r), 0)
        out.append((field("target_stopped_s"), field("snapshot_pages"),
                    field("precopy_stopped_s"), field("recopied_pages")))
    return out


def report(label, times):
    ms = [t[0] * 1000 for t in times]
    line = "%-36s median %6.2f ms  max %6.2f ms  snapshot_pages %d" % (
        label, statistics.median(ms), max(ms), times[-1][1])
    if times[-1][2]:
        pre = [t[2] * 1000 for t in times]
        line += "  (first stop: median %.2f ms; pages copied in the stop: median %d)" % (
            statistics.median(pre), statistics.median(t[3] for t in times))
    print(line)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=4000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--redis", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if a.redis:
            port = free_port()
            target = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no", "--dir", d],
                                      stdout=subprocess.DEVNULL)
            time.sleep(0.5)
            cmds = "".join("SET key:%d %s\n" % (i, "v" * 100) for i in range(20000))
            subprocess.run(["redis-cli", "-p", str(port)], input=cmds, text=True,
                           stdout=subprocess.DEVNULL, check=True)
            label = "redis-server"
        else:
            src = os.path.join(d, "t.c")
            open(src, "w").write(C_TARGET)
            subprocess.run(["gcc", "-O2", "-pthread", "-o", os.path.join(d, "t"), src], check=True)
            target = subprocess.Popen([os.path.join(d, "t"), str(a.pages), str(a.threads)],
                                      stdout=subprocess.PIPE)
            target.stdout.readline()
            label = "C target %d pages %d thr" % (a.pages, a.threads)
        try:
            report(label + ", register only", stop_times(target.pid, False, a.runs))
            report(label + ", --dontneed", stop_times(target.pid, True, a.runs))
            assert target.poll() is None, "the target died"
        finally:
            target.kill()
            target.wait()


if __name__ == "__main__":
    main()
