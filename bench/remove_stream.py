"""Serving under Firecracker v1.14's balloon free-page reporting: faults/s while a Python peer
(tests/fc_client.py FcClient.balloon) removes a random 2 MiB range every millisecond and its
other thread reads random pages elsewhere, checking each one.  serve-file --file,
--on-remove zero, no per-fault log; each row is a fresh handler and peer.  Run from the
checkout, as root (the README's "Hardening" section has the numbers):
    python3 bench/remove_stream.py [--seconds 10] [--mib 64] [--readahead 1 16]"""
import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from fc_client import FcClient  # noqa: E402

TOOL = os.path.join(ROOT, "uffdtool.py")


def one_run(d, data, readahead, seconds):
    sock, log, mem = (os.path.join(d, n) for n in ("uffd.sock", "log.jsonl", "mem.bin"))
    for path in (sock, log):
        if os.path.exists(path):
            os.unlink(path)
    tool = subprocess.Popen([sys.executable, TOOL, "serve-file", "--file", mem, "--on-remove",
                             "zero", "--readahead", str(readahead), "--no-fault-log",
                             "--quiet", "--log", log, "--firecracker-socket", sock])
    c = FcClient([len(data)])
    try:
        c.handshake(sock)
        c.touch(0, 0, len(data))                 # all present: from here on, faults are refills
        t0 = time.monotonic()
        res = c.balloon(data, seconds)
        elapsed = time.monotonic() - t0
    finally:
        c.close()
    tool.wait(30)
    with open(log) as f:
        st = [r for r in map(json.loads, f) if r["event"] == "stats"][-1]
    refills = st["faults"] - len(data) // c.ps // readahead
    return {"readahead": readahead, "seconds": round(elapsed, 2), "removes": res["removes"],
            "removes_s": round(res["removes"] / elapsed), "reads": res["reads"],
            "faults": st["faults"], "faults_s": round(max(refills, 0) / elapsed),
            "eagain": st.get("eagain", 0), "bad": len(res["bad"]),
            "p50_us": st["latency_us"].get("p50"), "p99_us": st["latency_us"].get("p99")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--mib", type=int, default=64, help="guest memory (MiB, 2 MiB chunks)")
    ap.add_argument("--readahead", type=int, nargs="+", default=[1, 16])
    a = ap.parse_args()
    data = random.Random(1).randbytes(a.mib << 20)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "mem.bin"), "wb") as f:
            f.write(data)
        for ra in a.readahead:
            print(json.dumps(one_run(d, data, ra, a.seconds)), flush=True)


if __name__ == "__main__":
    main()
