"""A small Firecracker-like client of the UFFD handshake, for the serve-file tests.

It does what Firecracker v1.12 does (reference/peers.md section 1): creates a uffd with
O_CLOEXEC|O_NONBLOCK, UFFDIO_API with UFFD_FEATURE_EVENT_REMOVE, maps each guest region anonymous
MAP_PRIVATE, registers it MISSING, connects to the handler's socket and sends, in ONE sendmsg, the
compact JSON array of regions with SCM_RIGHTS=[uffd]; then it keeps the socket open and silent.

Regions are laid out like Firecracker's above 3.25 GiB: offsets are cumulative and each region
lies BELOW the previous one in the address space, with unregistered PROT_NONE guard pages between
them.  Pages are read with ``ctypes.memmove`` (no GIL held) in a thread, so a handler that dies
cannot hang the test: ``touch`` has a timeout, and ``close`` releases the uffd, which wakes any
blocked reader.
"""
import ctypes
import json
import os
import random
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import uffdtool as u  # noqa: E402


class FcClient:
    def __init__(self, sizes, page_size=u.PAGE_SIZE, hugetlb=False, register=True,
                 user_mode_only=False):
        self.ps = page_size
        self.sizes = list(sizes)
        # O_CLOEXEC | O_NONBLOCK; user_mode_only: what an unprivileged peer may open
        self.uffd = u.Userfaultfd(user_mode_only=user_mode_only)
        self.uffd.api(u.UFFD_FEATURE_EVENT_REMOVE)
        guard = page_size
        total = sum(self.sizes) + guard * (len(self.sizes) + 1)
        flags = u.MAP_PRIVATE | u.MAP_NORESERVE
        self.resv = u.mmap_anon(total, u.PROT_NONE, flags)
        self.total = total
        self.bases = []
        # region 0 at the top, each next region below the previous one (unsorted addresses)
        top = self.resv + total - guard
        for size in self.sizes:
            base = top - size
            mflags = u.MAP_PRIVATE | u.MAP_FIXED | (u.MAP_HUGETLB if hugetlb else 0)
            u.mmap_anon(size, u.PROT_READ | u.PROT_WRITE, mflags, addr=base)
            if not hugetlb:
                u.madvise(base, size, u.MADV_NOHUGEPAGE)
            if register:
                self.uffd.register(base, size)
            self.bases.append(base)
            top = base - guard
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.sock = None
        self._threads = []

    def _in_thread(self, fn, timeout, what):
        done = []

        def run():
            fn()
            done.append(True)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(timeout)
        if not done:
            self._threads.append(t)
            raise TimeoutError("%s: not served within %s s" % (what, timeout))

    def regions_json(self, **extra):
        regs = [{"base_host_virt_addr": b, "size": s, "offset": o, "page_size": self.ps,
                 "page_size_kib": self.ps}
                for b, s, o in zip(self.bases, self.sizes, self.offsets)]
        for r in regs:
            r.update(extra)
        return json.dumps(regs, separators=(",", ":")).encode()

    def connect(self, path, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                self.sock = s
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def send(self, data=None, fds=None):
        """One sendmsg: ``data`` (default: the regions JSON) + SCM_RIGHTS ``fds`` (default:
        [uffd]; [] sends no fd)."""
        data = self.regions_json() if data is None else data
        fds = [self.uffd.fileno()] if fds is None else fds
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                bytes(__import__("array").array("i", fds)))] if fds else []
        self.sock.sendmsg([data], anc)

    def handshake(self, path, timeout=10):
        self.connect(path, timeout)
        self.send()

    def addr(self, region, off=0):
        return self.bases[region] + off

    def touch(self, region, off, length, timeout=20):
        """Read ``length`` bytes of a region with ctypes.memmove in a thread; returns them, or
        raises TimeoutError if the handler did not serve them in time."""
        buf = ctypes.create_string_buffer(length)
        self._in_thread(lambda: ctypes.memmove(buf, self.bases[region] + off, length), timeout,
                        "region %d +0x%x" % (region, off))
        return buf.raw

    def touch_pages(self, region, offsets, timeout=20):
        """Read one byte of each page at ``offsets`` (in that order) in one thread."""
        one = ctypes.create_string_buffer(1)
        base = self.bases[region]

        def run():
            for off in offsets:
                ctypes.memmove(one, base + off, 1)
        self._in_thread(run, timeout, "touch_pages")

    def mismatches(self, region, expected):
        """Page offsets of ``region`` whose bytes differ from ``expected`` (whole region)."""
        got = self.touch(region, 0, self.sizes[region])
        return [off for off in range(0, len(got), self.ps)
                if got[off:off + self.ps] != expected[off:off + self.ps]]

    def remove(self, region, off, length, timeout=20):
        """MADV_DONTNEED: drops the pages and sends UFFD_EVENT_REMOVE (blocks until read)."""
        self._in_thread(lambda: u.madvise(self.bases[region] + off, length, u.MADV_DONTNEED),
                        timeout, "MADV_DONTNEED")

    def balloon(self, data, seconds, region=0, chunk=2 << 20, interval=1e-3, seed=1,
                timeout=60):
        """Free-page reporting as Firecracker v1.14 does it, against ``region`` served from
        ``data`` with --on-remove zero: one thread reads random pages and checks each against
        what it must hold (``data``, or zeros once its 2 MiB chunk was removed); another
        removes (MADV_DONTNEED -> UFFD_EVENT_REMOVE) a random chunk every ``interval`` s,
        never the one the reader is in at that moment (a flag each side sets before looking at
        the other's: the GIL orders them).  Returns {'reads', 'removes', 'bad': [(page,
        expected)], 'removed': set of chunks}; TimeoutError if a read was never served."""
        base, size, ps = self.bases[region], self.sizes[region], self.ps
        per_chunk = chunk // ps
        nchunks = size // chunk
        removed = bytearray(nchunks)
        cur, busy = [-1], [-1]
        out = {"reads": 0, "removes": 0, "bad": []}
        stop = time.monotonic() + seconds
        zero = bytes(ps)

        def reader():
            rnd = random.Random(seed)
            buf = ctypes.create_string_buffer(ps)
            while time.monotonic() < stop:
                p = rnd.randrange(size // ps)
                c = p // per_chunk
                cur[0] = c
                while busy[0] == c:
                    time.sleep(0)
                ctypes.memmove(buf, base + p * ps, ps)
                want = zero if removed[c] else data[p * ps:(p + 1) * ps]
                if buf.raw != want:
                    out["bad"].append((p, "zero" if removed[c] else "data"))
                cur[0] = -1
                out["reads"] += 1

        def remover():
            rnd = random.Random(seed + 1)
            while time.monotonic() < stop:
                c = rnd.randrange(nchunks)
                busy[0] = c
                if cur[0] != c:
                    u.madvise(base + c * chunk, chunk, u.MADV_DONTNEED)
                    removed[c] = 1
                    out["removes"] += 1
                busy[0] = -1
                time.sleep(interval)

        threads = [threading.Thread(target=f, daemon=True) for f in (reader, remover)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + seconds)
            if t.is_alive():
                self._threads.append(t)
                raise TimeoutError("balloon: a fault or a REMOVE was not served")
        out["removed"] = {c for c in range(nchunks) if removed[c]}
        return out

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.uffd.close()                 # wakes readers blocked on a dead handler
        for t in self._threads:
            t.join(5)
        if self.resv and not any(t.is_alive() for t in self._threads):
            u.munmap(self.resv, self.total)
            self.resv = 0


def main(argv=None):
    """Subprocess mode (for tests that need a peer that can be killed): connect, handshake,
    print 'sent <pid>', wait for a line on stdin, touch and verify everything against --src,
    print 'ok' or 'bad N', exit 0/1."""
    import argparse
    p = argparse.ArgumentParser()
    p.add_argument("--socket", required=True)
    p.add_argument("--src", required=True)
    p.add_argument("--sizes", required=True, help="comma-separated region sizes in bytes")
    p.add_argument("--touch-first", type=int, default=0, metavar="PAGES",
                   help="after the handshake, read the first PAGES pages of region 0 one by "
                        "one and print 'touched' before waiting for the line")
    p.add_argument("--user-mode-only", action="store_true",
                   help="open the uffd with UFFD_USER_MODE_ONLY (an unprivileged peer)")
    a = p.parse_args(argv)
    c = FcClient([int(x) for x in a.sizes.split(",")], user_mode_only=a.user_mode_only)
    c.handshake(a.socket)
    print("sent %d" % os.getpid(), flush=True)
    if a.touch_first:
        c.touch_pages(0, [i * c.ps for i in range(a.touch_first)])
        print("touched", flush=True)
    sys.stdin.readline()
    with open(a.src, "rb") as f:
        data = f.read()
    bad = 0
    for i, (off, size) in enumerate(zip(c.offsets, c.sizes)):
        bad += len(c.mismatches(i, data[off:off + size]))
    print("ok" if not bad else "bad %d" % bad, flush=True)
    c.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
