#!/usr/bin/env python3
"""Many VMs through one handler: `serve-file --peers` against one `serve-file` per VM.

For each readahead K and each count N of concurrent peers, N C touchers (uffd_bench
--fc-socket: each plays Firecracker with S MiB in 2 regions, random order, and verifies every
page) restore at once:

  daemon    one `uffdtool serve-file --firecracker-socket SOCK --peers 0`: one worker process
            per peer (stopped with SIGTERM once the touchers are done)
  separate  N `uffdtool serve-file --firecracker-socket SOCK_i` processes, one per VM

Reported per row: aggregate throughput (N x S MiB / the slowest toucher's wall time, from its
first touch to its last), the median time from the handshake to the first fault served
(`ready_s` of the toucher: for the daemon this includes the fork of the worker), and the
anonymous PSS (`Pss_Anon` of /proc/PID/smaps_rollup) per serving process, sampled while all N
are serving (the daemon's workers, and its parent separately; the source file's page cache is
shared by design and not counted).  Nothing is pinned and `--spin` is the default.

    python3 bench/peers_bench.py                      # N 1,2,4,8 x K 1,64, 128 MiB, 5 reps
    python3 bench/peers_bench.py --peers 1,2 --ks 64 --reps 9 --json /tmp/peers.json
    python3 bench/peers_bench.py --import --ks 1     # started as the installed command is

Needs gcc and the shared C toucher `uffd_bench.c` (--bench-c; by default beside the checkout
in ../shared/bench/, as CI lays it out).  Standard library only."""
import argparse
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "uffdtool.py")
#: how the tool is started: as a script (``--import``: as the installed ``uffdtool`` command
#: does, importing the module; the interpreter then frees the script's syntax tree, which
#: ``python3 uffdtool.py`` keeps for the life of the process: about 13 MB of anonymous memory)
LAUNCH = [sys.executable, TOOL]
IMPORT = [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import uffdtool; "
          "sys.exit(uffdtool.main())" % ROOT]
#: more serve-file arguments for both kinds of runs (--handler-args)
EXTRA = []
BENCH_C = [os.path.join(ROOT, "..", "shared", "bench", "uffd_bench.c"),
           "/work/shared/bench/uffd_bench.c"]


def build_toucher(src, cache):
    with open(src, "rb") as f:
        tag = hashlib.sha256(f.read()).hexdigest()[:12]
    exe = os.path.join(cache, "uffd_bench-" + tag)
    if not os.path.exists(exe):
        subprocess.run(["gcc", "-O2", "-pthread", "-o", exe + ".tmp", src], check=True)
        os.replace(exe + ".tmp", exe)
    return exe


def source_file(cache, mib):
    path = os.path.join(cache, "peers-src-%dMiB.bin" % mib)
    if not os.path.exists(path) or os.path.getsize(path) != mib << 20:
        with open(path + ".tmp", "wb") as f:
            f.write(random.Random(mib).randbytes(mib << 20))
        os.replace(path + ".tmp", path)
    return path


def pss_anon(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Sampler(threading.Thread):
    """Reads Pss_Anon of the serving processes every 10 ms; keeps the last round in which all
    ``n`` were alive (``pids()`` says which they are at that moment), and in the same round
    that of ``also`` (the daemon's parent: PSS splits shared pages among their sharers, so
    only values read together add up)."""

    def __init__(self, pids, n, also=None):
        super().__init__(daemon=True)
        self.pids, self.n, self.also = pids, n, also
        self.last = None
        self.also_pss = None
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            pids = self.pids()
            if len(pids) == self.n:
                got = [pss_anon(p) for p in pids]
                other = pss_anon(self.also) if self.also else None
                if all(g is not None for g in got):
                    self.last, self.also_pss = got, other
            self.halt.wait(0.01)


def wait_path(path, procs, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            raise RuntimeError("handler did not come up: %s" % path)
        time.sleep(0.005)


def touchers(exe, socks, src, mib, timeout):
    procs = [subprocess.Popen([exe, "--fc-socket", s, "--src", src, "-s", str(mib), "-o", "rand",
                               "--regions", "2", "--seed", str(i), "--timeout", str(timeout)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, s in enumerate(socks)]
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout + 30)
        if p.returncode != 0:
            raise RuntimeError("toucher failed (%d): %s %s" % (p.returncode, o, e))
        r = json.loads(o)
        if r["verify"] != "ok":
            raise RuntimeError("toucher verify: %s" % o)
        out.append(r)
    return out


def run_daemon(exe, src, mib, n, k, work, timeout):
    sock, log = os.path.join(work, "d.sock"), os.path.join(work, "d.jsonl")
    h = subprocess.Popen(LAUNCH + ["serve-file", "--file", src,
                          "--firecracker-socket", sock, "--peers", "0", "--readahead", str(k),
                          "--no-fault-log", "--quiet", "--log", log] + EXTRA)
    try:
        wait_path(sock, [h])

        def workers():
            try:
                with open(log) as f:
                    return [json.loads(line)["worker"] for line in f
                            if '"peer-accepted"' in line]
            except (OSError, ValueError):
                return []
        sampler = Sampler(workers, n, also=h.pid)
        sampler.start()
        res = touchers(exe, [sock] * n, src, mib, timeout)
        sampler.halt.set()
        sampler.join()
        parent = sampler.also_pss
        h.send_signal(signal.SIGTERM)
        if h.wait(timeout) != 0:
            raise RuntimeError("daemon exit %d" % h.returncode)
        with open(log) as f:
            recs = [json.loads(line) for line in f]
    finally:
        if h.poll() is None:
            h.kill()
    done = [r for r in recs if r["event"] == "peer-done"]
    if len(done) != n:
        raise RuntimeError("%d peer-done records, expected %d" % (len(done), n))
    return res, sampler.last, parent, [r["pss_anon_kib"] for r in done]


def run_separate(exe, src, mib, n, k, work, timeout):
    socks = [os.path.join(work, "s%d.sock" % i) for i in range(n)]
    hs = [subprocess.Popen(LAUNCH + ["serve-file", "--file", src,
                            "--firecracker-socket", s, "--readahead", str(k), "--no-fault-log",
                            "--quiet"] + EXTRA) for s in socks]
    try:
        for s in socks:
            wait_path(s, hs)
        sampler = Sampler(lambda: [h.pid for h in hs if h.poll() is None], n)
        sampler.start()
        res = touchers(exe, socks, src, mib, timeout)
        sampler.halt.set()
        sampler.join()
        for h in hs:
            if h.wait(timeout) != 0:
                raise RuntimeError("serve-file exit %d" % h.returncode)
    finally:
        for h in hs:
            if h.poll() is None:
                h.kill()
    return res, sampler.last


def summarize(res, mib):
    wall = max(r["wall_s"] for r in res)
    return {"agg_mib_s": round(len(res) * mib / wall, 1),
            "us_per_page": round(statistics.median(r["us_per_page"] for r in res), 2),
            "ready_ms": round(statistics.median(r["ready_s"] for r in res) * 1e3, 2)}


def mean(xs):
    return round(statistics.mean(xs)) if xs else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default="1,2,4,8", help="concurrent peer counts (default 1,2,4,8)")
    ap.add_argument("--ks", default="1,64", help="--readahead values (default 1,64)")
    ap.add_argument("-s", "--size-mib", type=int, default=128,
                    help="MiB per VM (default 128: at 32 MiB a run lasts 20-40 ms, and where "
                         "the scheduler first puts the threads decides its speed)")
    ap.add_argument("--reps", type=int, default=5,
                    help="runs per configuration, interleaved (median; default 5)")
    ap.add_argument("--bench-c", help="path of uffd_bench.c")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--json", help="write every result here")
    ap.add_argument("--import", dest="import_", action="store_true",
                    help="start the tool by importing the module (like the installed uffdtool "
                         "command), not as the script uffdtool.py")
    ap.add_argument("--handler-args", default="",
                    help="more serve-file arguments for every handler, e.g. '--spin 0'")
    a = ap.parse_args(argv)
    EXTRA[:] = a.handler_args.split()
    if a.import_:
        LAUNCH[:] = IMPORT
    bench_c = a.bench_c or next((p for p in BENCH_C if os.path.exists(p)), None)
    if not bench_c:
        ap.error("uffd_bench.c not found: give --bench-c PATH")
    cache = os.path.join(tempfile.gettempdir(), "uffdtool-peers-bench")
    os.makedirs(cache, exist_ok=True)
    exe = build_toucher(bench_c, cache)
    src = source_file(cache, a.size_mib)
    ns = [int(x) for x in a.peers.split(",")]
    ks = [int(x) for x in a.ks.split(",")]
    rows = []
    for k in ks:
        runs = {n: [] for n in ns}
        for rep in range(a.reps):           # interleaved: a noisy moment hits every N alike
            for n in ns:
                with tempfile.TemporaryDirectory(prefix="peers-bench-") as work:
                    d, d_pss, parent, done_pss = run_daemon(exe, src, a.size_mib, n, k, work,
                                                            a.timeout)
                with tempfile.TemporaryDirectory(prefix="peers-bench-") as work:
                    s, s_pss = run_separate(exe, src, a.size_mib, n, k, work, a.timeout)
                runs[n].append({"daemon": summarize(d, a.size_mib), "separate":
                                summarize(s, a.size_mib), "worker_pss_kib": mean(d_pss or []),
                                "parent_pss_kib": parent, "peer_done_pss_kib": mean(done_pss),
                                "process_pss_kib": mean(s_pss or [])})
                print("K=%d N=%d rep %d %s" % (k, n, rep, json.dumps(runs[n][-1])),
                      file=sys.stderr, flush=True)
        for n in ns:
            # the ratio to ns[0] of each rep (both measured moments apart), then the median
            ratios = [r["daemon"]["agg_mib_s"] / b["daemon"]["agg_mib_s"]
                      for r, b in zip(runs[n], runs[ns[0]])]
            pick = sorted(runs[n], key=lambda r: r["daemon"]["agg_mib_s"])[len(runs[n]) // 2]
            rows.append(dict(pick, k=k, n=n, ratio=statistics.median(ratios),
                             ratio_range=(min(ratios), max(ratios))))
    print("| K | peers | daemon MiB/s (sum) | vs %d peer (range over reps) | µs/page per peer | "
          "separate MiB/s | ready ms daemon | ready ms separate | Pss_Anon KiB per worker | "
          "daemon parent | Pss_Anon KiB per process | worker/process |" % ns[0])
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        d, s = r["daemon"], r["separate"]
        pss = (r["worker_pss_kib"] / r["process_pss_kib"]) if r["worker_pss_kib"] and \
            r["process_pss_kib"] else None
        print("| %d | %d | %.1f | %.2f× (%.2f-%.2f) | %.2f | %.1f | %.2f | %.2f | %s | %s | %s "
              "| %s |" % (r["k"], r["n"], d["agg_mib_s"], r["ratio"], *r["ratio_range"],
                          d["us_per_page"], s["agg_mib_s"], d["ready_ms"], s["ready_ms"],
                          r["worker_pss_kib"], r["parent_pss_kib"], r["process_pss_kib"],
                          "%.2f" % pss if pss else "-"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
