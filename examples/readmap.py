"""A program for `uffdtool serve-file --range 0x600000000000:... -- CMD` (README, "--pid and
-- CMD"): maps MIB MiB (default 2) of private anonymous memory at the fixed address 0x600000000000
(MAP_FIXED_NOREPLACE), reads all of it and prints its md5.
Usage: python3 examples/readmap.py [MIB]"""
import ctypes
import hashlib
import sys

ADDRESS = 0x600000000000
PROT_READ_WRITE = 0x3
MAP_PRIVATE_ANONYMOUS_FIXED_NOREPLACE = 0x02 | 0x20 | 0x100000


def main():
    size = int(sys.argv[1] if len(sys.argv) > 1 else 2) << 20
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    a = libc.mmap(ADDRESS, size, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS_FIXED_NOREPLACE, -1, 0)
    if a != ADDRESS:
        sys.exit("readmap: mmap at 0x%x failed: %s" % (ADDRESS, ctypes.get_errno()))
    print(hashlib.md5(ctypes.string_at(a, size)).hexdigest(), flush=True)


if __name__ == "__main__":
    main()
