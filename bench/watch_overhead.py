"""How much `uffdtool watch -- CMD` slows a program that touches fresh anonymous memory (the
table in docs/benchmarks.md): wall time with and without watch, all rows alternating in the
same run, median of REPS.  Run from the checkout, as root:
    python3 bench/watch_overhead.py [--mib 256] [--reps 5]"""
import argparse
import os
import statistics
import subprocess
import sys
import time

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "uffdtool.py")


def runs(mib):
    touch = [sys.executable, "-c",
             "b = bytearray(%d << 20); b[::4096] = b'x' * %d" % (mib, (mib << 20) // 4096)]
    watch = [sys.executable, TOOL, "watch", "--quiet"]
    return {"without watch": touch,
            "watch (default: --readahead 1)": watch + ["--"] + touch,
            "watch --readahead 16": watch + ["--readahead", "16", "--"] + touch,
            "watch --spin 0 (no busy-poll)": watch + ["--spin", "0", "--"] + touch,
            "watch --spin 0 --readahead 16": watch + ["--spin", "0", "--readahead", "16", "--"]
            + touch}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="memory the program touches (MiB)")
    ap.add_argument("--reps", type=int, default=5, help="runs of each row")
    args = ap.parse_args()
    cmds = runs(args.mib)
    wall = {name: [] for name in cmds}
    for _ in range(args.reps):
        for name, cmd in cmds.items():
            t = time.monotonic()
            subprocess.run(cmd, check=True)
            wall[name].append(time.monotonic() - t)
    base = statistics.median(wall["without watch"])
    for name, ws in wall.items():
        m = statistics.median(ws)
        print("%-32s median %6.3f s  (x%.1f)  runs: %s"
              % (name, m, m / base, " ".join("%.3f" % w for w in ws)))


if __name__ == "__main__":
    main()
