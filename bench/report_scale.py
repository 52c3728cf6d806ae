#!/usr/bin/env python3
"""Scale of ``uffdtool report``: time and peak RSS for a log of N page faults (default 1,000,000).

The log is what serve-file writes for a Firecracker restore with the fault log on: a handshake
with two regions (4 GiB in all), then N pagefault records (``pid``, ``us``), every one on a
different page in random order (the worst case for the report's memory: all pages distinct),
then stats and exit.  Each view runs in its own process; peak RSS is that process's ru_maxrss.

    python3 bench/report_scale.py [--faults N] [--keep DIR]
"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "uffdtool.py")
PS = 4096


def write_log(path, n, seed=1):
    rnd = random.Random(seed)
    pages = 1 << 20                                        # 4 GiB of guest memory
    base0, base1 = 0x7f0000000000, 0x7e0000000000
    split = 3 << 18                                        # region 0: 3 GiB, region 1: 1 GiB
    order = rnd.sample(range(pages), n) if n <= pages else [rnd.randrange(pages)
                                                            for _ in range(n)]
    with open(path, "w") as f:
        f.write(json.dumps({"t": 0.001, "event": "start", "command": "serve-file",
                            "argv": ["uffdtool", "serve-file", "--file", "vm.mem",
                                     "--firecracker-socket", "/tmp/fc.sock", "--log", path],
                            "time": time.time()}) + "\n")
        f.write('{"t":0.002,"event":"ready","socket":"/tmp/fc.sock"}\n')
        f.write(json.dumps({"t": 0.1, "event": "handshake", "pid": 4242, "page_size": PS,
                            "regions": 2, "bytes": pages * PS,
                            "layout": [{"base": base0, "size": split * PS, "offset": 0},
                                       {"base": base1, "size": (pages - split) * PS,
                                        "offset": split * PS}]},
                           separators=(",", ":")) + "\n")
        t, buf = 0.1, []
        for i, p in enumerate(order):
            t += 2e-5
            addr = base0 + p * PS if p < split else base1 + (p - split) * PS
            buf.append('{"t":%.6f,"event":"pagefault","address":%d,"flags":[],"ptid":0,'
                       '"resolved":"copy","pages":1,"us":%.1f,"ufd":4,"pid":4242}\n'
                       % (t, addr, 5 + rnd.random() * 40))
            if len(buf) >= 10000:
                f.write("".join(buf))
                buf = []
        f.write("".join(buf))
        f.write('{"t":%.6f,"event":"stats","faults_missing":%d}\n' % (t + 0.001, n))
        f.write('{"t":%.6f,"event":"exit","status":0,"reason":"peer closed the socket"}\n'
                % (t + 0.002))


def run(args):
    """(wall seconds, CPU seconds, peak RSS MiB) of one ``uffdtool report`` process."""
    t = time.monotonic()
    p = subprocess.Popen([sys.executable, TOOL, "report"] + args, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.monotonic() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit("report failed: %s" % args)
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faults", type=int, default=1000000)
    ap.add_argument("--keep", metavar="DIR", help="write the log and outputs here")
    ap.add_argument("--write-log", metavar="FILE", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.write_log:
        return write_log(a.write_log, a.faults)
    d = a.keep or tempfile.mkdtemp(prefix="report-scale-")
    os.makedirs(d, exist_ok=True)
    log = os.path.join(d, "scale.jsonl")
    t = time.monotonic()
    # in another process: a child's ru_maxrss starts from the size of the process it forked from
    subprocess.run([sys.executable, __file__, "--faults", str(a.faults), "--write-log", log],
                   check=True)
    print("log: %d faults, %.0f MiB, written in %.1f s" % (
        a.faults, os.path.getsize(log) / 2**20, time.monotonic() - t))
    base = run(["--help"])
    print("%-22s %6.2f s wall %6.2f s CPU  peak RSS %6.1f MiB" % ("(python + import)", *base))
    for name, extra in (("terminal", []), ("html", ["-o", os.path.join(d, "scale.html")]),
                        ("svg", ["-o", os.path.join(d, "scale.svg")])):
        print("%-22s %6.2f s wall %6.2f s CPU  peak RSS %6.1f MiB" % (
            "report " + name, *run([log] + extra)))
    if not a.keep:
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)


if __name__ == "__main__":
    main()
