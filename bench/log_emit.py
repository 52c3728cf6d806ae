"""Cost of one JSON-lines record (EventLog.emit of a pagefault record to a file), the per-fault
price of --log without --no-fault-log.  Run from the checkout:
    python3 bench/log_emit.py [--records 200000] [--reps 5]"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import uffdtool  # noqa: E402


def once(path, n):
    log = uffdtool.EventLog(path, human=None)
    t = time.perf_counter()
    for i in range(n):
        log.emit("pagefault", address=0x7f0000000000 + i * 4096, flags=["write"], ptid=123,
                 resolved="copy", pages=1, us=3.2, ufd=5)
    log.close()
    return (time.perf_counter() - t) / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200000)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        us = [once(os.path.join(d, "log.jsonl"), a.records) for _ in range(a.reps)]
    print("EventLog.emit, pagefault record to a file: median %.2f us/record (min %.2f, %d x "
          "%d records)" % (statistics.median(us), min(us), a.reps, a.records))


if __name__ == "__main__":
    main()
