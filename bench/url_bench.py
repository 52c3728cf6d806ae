#!/usr/bin/env python3
"""Benchmark of ``serve-file --url`` (README "Restoring from a URL"): a real nginx on 127.0.0.1
(tests/nginx_server.py) serves a SIZE MiB memory file; the shared C toucher (uffd_bench.c,
which plays Firecracker) restores it through uffdtool, once per configuration, in one run:

  file          --file SRC (the local baseline)
  cold C        --url with an empty --cache, --chunk C       (for each C of --chunks)
  warm C        --url with the cache the cold run filled
  demand cold   --url, empty cache, toucher order --order (default rand)
  prefetch cold the same with --prefetch of the working set recorded by a first run
                (both for each --latency-ms L: nginx answers each request L ms late, as an
                object store's time to the first byte; L > 0 needs libnginx-mod-http-echo)
  fill idle     --url, empty cache, --fill idle: seconds from handshake to fill_done

Prints a Markdown table (MiB/s of the toucher's timed run, seconds to the end of its run
including its first fault, ratios against the file run).  Standard library only.

    python3 bench/url_bench.py                      # 256 MiB, --readahead 64, chunks 1M,2M,4M
    python3 bench/url_bench.py --size-mib 64 --chunks 1M --latency-ms 0,50 --fetchers 8
"""
import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from nginx_server import Nginx  # noqa: E402

TOOL = os.path.join(ROOT, "uffdtool.py")
#: the shared C toucher beside the project (or its worktrees): ../shared/bench/uffd_bench.c
BENCH_C = next((p for p in (os.path.join(ROOT, up, "shared", "bench", "uffd_bench.c")
                            for up in ("..", os.path.join("..", ".."))) if os.path.exists(p)),
               None)


def build_toucher(src, work):
    out = os.path.join(work, "uffd_bench")
    subprocess.run(["gcc", "-O2", "-pthread", "-Wall", "-Wextra", "-o", out, src], check=True)
    return out


def make_source(path, mib):
    with open(path, "wb") as f:
        block = b""
        for i in range(mib):
            block = hashlib.sha256(block + i.to_bytes(4, "little")).digest() * 32768
            f.write(block)


def run_one(toucher, src, sock, mib, handler_args, order="seq", env=None):
    """Start uffdtool serve-file with ``handler_args``, run the toucher; returns (toucher
    result dict, uffdtool records)."""
    log = sock + ".json"
    if os.path.exists(sock):
        os.unlink(sock)
    h = subprocess.Popen([sys.executable, TOOL, "serve-file", "--firecracker-socket", sock,
                          "--readahead", "64", "--quiet", "--log", log] + handler_args,
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        if h.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("handler failed: %s" % h.stderr.read())
        time.sleep(0.01)
    t = subprocess.run([toucher, "--fc-socket", sock, "--src", src, "-s", str(mib), "-o",
                        order], capture_output=True, text=True, timeout=300)
    h.wait(60)
    res = json.loads(t.stdout.strip().splitlines()[-1]) if t.stdout.strip() else {}
    if t.returncode or res.get("verify") != "ok":
        raise SystemExit("toucher failed (%d): %s %s %s" % (t.returncode, t.stdout, t.stderr,
                                                             h.stderr.read()))
    with open(log) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return res, recs


def fill_until_done(src, sock, url, cache, mib):
    """--fill idle with a peer that touches one page and then waits: seconds from handshake to
    fill_done."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fc_client import FcClient
    log = sock + ".json"
    if os.path.exists(sock):
        os.unlink(sock)
    h = subprocess.Popen([sys.executable, TOOL, "serve-file", "--firecracker-socket", sock,
                          "--readahead", "64", "--quiet", "--log", log, "--url", url,
                          "--cache", cache, "--fill", "idle", "--no-fault-log"])
    while not os.path.exists(sock):
        time.sleep(0.01)
    c = FcClient([mib << 20])
    c.handshake(sock)
    c.touch(0, 0, 4096)
    deadline = time.monotonic() + 300
    done = hs = None
    while time.monotonic() < deadline and done is None:
        with open(log) as f:
            for line in f:
                r = json.loads(line)
                if r["event"] == "handshake":
                    hs = r["t"]
                if r["event"] == "fill_done":
                    done = r
        time.sleep(0.02)
    with open(src, "rb") as f:
        ok = c.mismatches(0, f.read()) == []
    c.close()
    h.wait(30)
    return done["t"] - hs, done["pages"], ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--chunks", default="1M,2M,4M", help="chunk sizes of the cold/warm runs")
    ap.add_argument("--chunk", default="2M", help="chunk of the prefetch and fill runs")
    ap.add_argument("--order", default="rand", help="toucher order of the prefetch runs")
    ap.add_argument("--latency-ms", default="0,20,50",
                    help="per-request latencies of the demand/prefetch runs (default 0,20,50)")
    ap.add_argument("--fetchers", type=int, help="uffdtool --fetchers of every --url run")
    ap.add_argument("--reps", type=int, default=3,
                    help="runs of each configuration, interleaved; the best is reported (the "
                         "machine may be shared)")
    ap.add_argument("--work", help="work directory (default: a temporary one)")
    ap.add_argument("--toucher-source", default=BENCH_C, help="uffd_bench.c (default: %s)"
                    % BENCH_C)
    a = ap.parse_args()
    work = a.work or tempfile.mkdtemp(prefix="url-bench-")
    os.makedirs(work, exist_ok=True)
    if not a.toucher_source:
        raise SystemExit("no ../shared/bench/uffd_bench.c: give --toucher-source")
    toucher = build_toucher(os.path.abspath(a.toucher_source), work)
    a.lats = [int(x) for x in a.latency_ms.split(",")]
    try:
        ngx = Nginx(os.path.join(work, "nginx"), latency=any(a.lats))
    except RuntimeError as e:
        raise SystemExit("url_bench: %s (or give --latency-ms 0)" % e)
    src = os.path.join(ngx.root, "mem.bin")
    make_source(src, a.size_mib)
    url = ngx.url("mem.bin") + "?X-Signature=bench"
    a.url_at = lambda ms: ngx.url("mem.bin", ms / 1000) + "?X-Signature=bench"
    a.more = ["--fetchers", str(a.fetchers)] if a.fetchers else []
    sock = os.path.join(work, "h.sock")
    mib = a.size_mib

    def cache(name):
        d = os.path.join(work, "cache-" + name)
        shutil.rmtree(d, ignore_errors=True)
        return d

    best, rounds = {}, {}

    def row(name, res, recs):
        """Keep the best of the reps of ``name`` (highest throughput)."""
        st = [r for r in recs if r["event"] == "stats"][-1]
        total = res["ready_s"] + res["wall_s"]
        rounds.setdefault(name, []).append(res)
        if name in best and best[name][0]["mib_per_s"] >= res["mib_per_s"]:
            return best[name][0]
        p50 = (st.get("fetch_latency_us") or {}).get("p50")
        best[name] = (res, (name, res["mib_per_s"], total, st.get("fetched_bytes", 0) >> 20,
                            st.get("cache_hits", "-"), st.get("fetch_wait_s", "-"),
                            "-" if p50 is None else "%.1f" % (p50 / 1000), st["faults"]))
        return res
    try:
        ws = os.path.join(work, "ws.txt")
        run_one(toucher, src, sock, mib, ["--file", src, "--record", ws], a.order)
        for _ in range(a.reps):
            one_round(a, toucher, src, sock, mib, url, ws, cache, row)
        secs, pages, ok = fill_until_done(src, sock, url, cache("f"), mib)
    finally:
        ngx.stop()
    f, fo = best["file (local)"][0], best["file, order %s" % a.order][0]
    pairs = [(ms, best[demand_name(a, ms)][0], best[prefetch_name(a, ms)][0]) for ms in a.lats]
    rows = [v[1] for v in best.values()]
    report(a, mib, rows, f, fo, pairs, secs, pages, ok, rounds)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


def demand_name(a, ms):
    return "on-demand cold, order %s%s" % (a.order, ", %d ms" % ms if ms else "")


def prefetch_name(a, ms):
    return "--prefetch cold, order %s%s" % (a.order, ", %d ms" % ms if ms else "")


def one_round(a, toucher, src, sock, mib, url, ws, cache, row):
    """Every configuration once (the reps interleave them, so that a noisy moment of a
    shared machine does not hit one configuration only)."""
    row("file (local)", *run_one(toucher, src, sock, mib, ["--file", src]))
    for ch in a.chunks.split(","):
        d = cache(ch)
        args = ["--url", url, "--cache", d, "--chunk", ch] + a.more
        row("cold cache, chunk %s" % ch, *run_one(toucher, src, sock, mib, args))
        row("warm cache, chunk %s" % ch, *run_one(toucher, src, sock, mib, args))
    row("file, order %s" % a.order, *run_one(toucher, src, sock, mib, ["--file", src], a.order))
    for ms in a.lats:
        args = ["--url", a.url_at(ms), "--chunk", a.chunk] + a.more
        row(demand_name(a, ms), *run_one(toucher, src, sock, mib,
                                         args + ["--cache", cache("d")], a.order))
        row(prefetch_name(a, ms), *run_one(toucher, src, sock, mib,
                                           args + ["--cache", cache("p"), "--prefetch", ws],
                                           a.order))


def total_s(res):
    return res["ready_s"] + res["wall_s"]


def per_round(xs, ys, ratio):
    """The ratios of the runs of two configurations in the same rounds: "median (range)"."""
    import statistics
    r = sorted(ratio(x, y) for x, y in zip(xs, ys))
    return "median %.2fx, range %.2f-%.2f" % (statistics.median(r), r[0], r[-1])


def report(a, mib, rows, f, fo, pairs, secs, pages, ok, rounds):
    print("%d MiB, --readahead 64, nginx on 127.0.0.1, shared C toucher%s; one run of the "
          "script, best of %d interleaved reps\n"
          % (mib, ", --fetchers %d" % a.fetchers if a.fetchers else "", a.reps))
    print("| configuration | MiB/s (toucher's timed run) | s to the toucher's end | "
          "fetched MiB | cache hits (chunks) | s faults waited for fetches | fetch p50 ms | "
          "faults |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rate, total, fetched, hits, waited, p50, faults in rows:
        if isinstance(waited, float):
            waited = "%.3f" % waited
        print("| %s | %.0f | %.3f | %d | %s | %s | %s | %d |" % (
            name, rate, total, fetched, hits, waited, p50, faults))
    print()
    print("Best against best; in parentheses the ratios within each round (the reps run every "
          "configuration once, one after the other)\n")
    for name, rate, total, fetched, hits, *_ in rows:
        if name.startswith(("cold", "warm")):
            print("- %s: %.2fx the file's throughput (%s)" % (
                name, rate / f["mib_per_s"],
                per_round(rounds[name], rounds["file (local)"],
                          lambda x, y: x["mib_per_s"] / y["mib_per_s"])))
    for ms, dem, pre in pairs:
        print("- --prefetch cold vs on-demand cold (order %s, %d ms per request), time to the "
              "toucher's end: %.2fx faster (%s)" % (
                  a.order, ms, total_s(dem) / total_s(pre),
                  per_round(rounds[prefetch_name(a, ms)], rounds[demand_name(a, ms)],
                            lambda x, y: total_s(y) / total_s(x))))
    dem = pairs[0][1]
    print("- on-demand cold vs file (order %s, %d ms): %.2fx the file's throughput"
          % (a.order, pairs[0][0], dem["mib_per_s"] / fo["mib_per_s"]))
    print("- --fill idle (chunk %s): fill_done %.3f s after the handshake, %d pages, "
          "verified: %s" % (a.chunk, secs, pages, ok))


if __name__ == "__main__":
    main()
