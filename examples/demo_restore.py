"""A target for `uffdtool serve-file --pid ... --dontneed` (README, "--pid and -- CMD"): maps a
64-page private anonymous buffer, fills pages 0-31 with 0x55 bytes (pages 32-63 stay untouched),
prints its address, and once a line arrives on stdin prints the md5 of the whole buffer.
Usage: python3 examples/demo_restore.py <> go > addr.txt &   (go: a FIFO)"""
import ctypes
import hashlib
import mmap
import sys

PAGE = mmap.PAGESIZE


def main():
    m = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m[:32 * PAGE] = b"\x55" * (32 * PAGE)
    print("0x%x" % ctypes.addressof(ctypes.c_char.from_buffer(m)), flush=True)
    sys.stdin.readline()
    print("md5 of the %d KiB: %s" % (len(m) >> 10, hashlib.md5(m[:]).hexdigest()), flush=True)


if __name__ == "__main__":
    main()
