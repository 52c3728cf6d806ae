"""A target for `uffdtool watch --pid` (README, "uffdtool watch"): maps a 16-page private
anonymous buffer, prints its address, then rewrites one of pages 0-3 every 50 ms for SECONDS
(default 3) and exits 0.  Usage: python3 examples/demo_target.py [SECONDS] > addr.txt &"""
import ctypes
import mmap
import sys
import time

PAGE = mmap.PAGESIZE


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    m = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    print("0x%x" % ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        m[(i % 4) * PAGE + 8] = 1
        i += 1
        time.sleep(0.05)


if __name__ == "__main__":
    main()
