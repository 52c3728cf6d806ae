"""The README's module example ("The module"): serve zero pages to 4 pages of this process's
own memory, touched by a thread through ctypes.memmove.  Run from the checkout, as root:
PYTHONPATH=. python3 examples/module_demo.py"""
import ctypes, threading, uffdtool as u  # noqa: E401

with u.Userfaultfd() as uffd:                      # syscall, else /dev/userfaultfd
    available, ioctls = uffd.api(u.Features.THREAD_ID)
    area = u.mmap_anon(4 * u.PAGE_SIZE)
    print(uffd.register(area, 4 * u.PAGE_SIZE))    # WAKE|COPY|ZEROPAGE|MOVE|POISON
    h = u.Handler(u.ZeroSource(), readahead=4)     # or u.FileSource("mem.bin", offset=0)
    h.add(uffd, [(area, 4 * u.PAGE_SIZE)])
    buf = ctypes.create_string_buffer(u.PAGE_SIZE)
    def touch():                                   # memmove drops the GIL while it faults
        ctypes.memmove(buf, area, u.PAGE_SIZE)
        h.stop()
    threading.Thread(target=touch).start()
    h.run(timeout=5)
    print(buf.raw == bytes(u.PAGE_SIZE))           # True: the page read as zeros
    print(h.stats.record())                        # faults, pages, latency p50/p99/max, wall time
