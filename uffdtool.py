#!/usr/bin/env python3
"""uffdtool: userfaultfd for Linux, from Python, in one file (standard library only).

A command-line tool and an importable module.  It opens userfaultfds, registers memory of the
tool itself, of a child it starts or of a running process, logs every ``uffd_msg`` as JSON lines
and resolves the faults: with zero pages, or with the contents of a file (including as a drop-in
Firecracker page-fault handler).  The interface contract (flags, records, exit codes) is the
README's "CLI contract" section; changes to it are listed in CHANGELOG.md.

Contents (each section starts with a boxed banner; grep for ``#  N.``):
     1. Platform and libc        lazy libc, checked syscalls, per-arch syscall numbers, mmap helpers
     2. UAPI constants           names verbatim from <linux/userfaultfd.h>, flag sets with names
     3. Structs                  ctypes mirrors of the kernel structs, ``uffd_msg`` layout
     4. Errors                   one base class; exit codes; errno hints
     5. Userfaultfd              the object that owns one uffd
     6. Events                   PageFault/Fork/Remap/Remove/Unmap and ``decode_msgs``
     7. Event log and stats      the JSON-lines writer and the counters
     8. Page sources             zero, file + offset, the --dontneed snapshot, working sets,
                                 prefetch, a URL (Range GETs, the cache directory)
     9. Handler loop             serves faults and events on one or more uffds (one fault policy)
    10. ptrace (x86_64)          injecting ``userfaultfd()`` into another process, spawning CMD
    11. Targets                  one Target protocol: --self, -- CMD, --pid, Firecracker socket
    12. info
    13. selftest                 a registry of checks, each run in a forked child
    14. report                   ``uffdtool report``: a log drawn as tables, heat maps and curves
    15. CLI                      parser, target checks, exit status, the session runner, main

Library example::

    import mmap, uffdtool
    with uffdtool.Userfaultfd() as uffd:
        uffd.api(uffdtool.Features.THREAD_ID)
        area = uffdtool.mmap_anon(4 * uffdtool.PAGE_SIZE)
        print(uffd.register(area, 4 * uffdtool.PAGE_SIZE))   # WAKE|COPY|ZEROPAGE|MOVE|POISON
        # ... another process/thread touches the area; then:
        for ev in uffd.read_events():
            if isinstance(ev, uffdtool.PageFault):
                uffd.zeropage(ev.address & ~(uffdtool.PAGE_SIZE - 1), uffdtool.PAGE_SIZE)
"""

__version__ = "0.2.2"

import argparse
import array
import bisect
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import gc
import itertools
import json
import math
import mmap
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time

__all__ = [
    # the binding
    "Userfaultfd", "Features", "Ioctls", "RegisterMode", "FaultFlags", "Flags", "PAGE_SIZE",
    # events
    "PageFault", "Fork", "Remap", "Remove", "Unmap", "UnknownEvent", "decode_msgs",
    # errors
    "UffdToolError", "UsageError", "NotPermitted", "TargetError", "UffdError", "PtraceError",
    # page sources and working sets
    "ZeroSource", "FileSource", "SnapshotSource", "UrlSource", "read_working_set",
    "write_working_set", "write_working_sets", "Prefetcher",
    # serving: the Handler, what Handler.add returns (Served) and its Regions, log and stats
    "Handler", "Served", "Region", "EventLog", "Stats", "IdleFill",
    # targets (one protocol) and the pieces for other processes (ptrace, x86_64)
    "Target", "SelfTarget", "PidTarget", "SpawnTarget", "SelfServeTarget", "FirecrackerTarget",
    "parse_handshake", "inject_userfaultfd", "read_maps",
    # memory helpers and the CLI
    "mmap_anon", "munmap", "mremap", "madvise", "parse_size", "parse_range", "exit_status",
    "main",
]  # the UAPI constants (UFFD_*, UFFDIO_*) are module globals, deliberately not listed


###################################################################################################
#  1. Platform and libc
###################################################################################################

PAGE_SIZE = mmap.PAGESIZE
ARCH = platform.machine()

#: syscall numbers that os/ctypes do not wrap, per architecture (asm/unistd_64.h, asm-generic).
SYSCALLS = {
    "x86_64": dict(userfaultfd=323, pidfd_open=434, pidfd_getfd=438, process_madvise=440,
                   memfd_create=319, mremap=25, madvise=28, gettid=186,
                   kcmp=312, seccomp=317, prctl=157, get_robust_list=274),
    "aarch64": dict(userfaultfd=282, pidfd_open=434, pidfd_getfd=438, process_madvise=440,
                    memfd_create=279, mremap=216, madvise=233, gettid=178,
                    kcmp=272, seccomp=277, prctl=167, get_robust_list=100),
}

_libc = None


def libc():
    """The C library, loaded on first use so that ``import uffdtool`` never fails."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.syscall.restype = ctypes.c_long
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mremap.restype = ctypes.c_void_p
        lib.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                               ctypes.c_void_p]
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = lib
    return _libc


def _check(result, what, failed=-1):
    """Raise OSError(errno) with ``what`` when a libc call returned ``failed``."""
    if result == failed or result is None and failed == -1:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))
    return result


def sysno(name):
    """The number of syscall ``name`` on this architecture (OSError ENOSYS if unknown)."""
    try:
        return SYSCALLS[ARCH][name]
    except KeyError:
        raise OSError(errno.ENOSYS, "%s: no syscall number known for %s" % (name, ARCH))


def syscall(name, *args):
    """Call syscall ``name`` with integer arguments; return its result or raise OSError.

    Retries EINTR (ctypes calls get no PEP 475 retry)."""
    nr = sysno(name)
    cargs = [ctypes.c_long(a) for a in args]
    while True:
        r = libc().syscall(ctypes.c_long(nr), *cargs)
        if r != -1:
            return r
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, "%s: %s" % (name, os.strerror(err)))


PROT_NONE, PROT_READ, PROT_WRITE = 0, 1, 2
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_NORESERVE, MAP_POPULATE, MAP_HUGETLB = 0x4000, 0x8000, 0x40000
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4
MADV_DONTNEED, MADV_REMOVE, MADV_DONTFORK, MADV_FREE = 4, 9, 10, 8
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
MADV_POPULATE_READ, MADV_POPULATE_WRITE = 22, 23
MAP_FAILED = ctypes.c_void_p(-1).value


def mmap_anon(length, prot=PROT_READ | PROT_WRITE, flags=MAP_PRIVATE, fd=-1, offset=0, addr=0):
    """mmap(2) returning the address (an int).  Anonymous unless ``fd`` is given."""
    if fd == -1:
        flags |= MAP_ANONYMOUS
    r = libc().mmap(addr or None, length, prot, flags, fd, offset)
    if r is None or r == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, "mmap: %s" % os.strerror(err))
    return r


def munmap(addr, length):
    """munmap(2)."""
    _check(libc().munmap(addr, length), "munmap")


def mremap(addr, old_len, new_len, flags=MREMAP_MAYMOVE, new_addr=0):
    """mremap(2) returning the new address."""
    r = libc().mremap(addr, old_len, new_len, flags, new_addr or None)
    if r is None or r == MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, "mremap: %s" % os.strerror(err))
    return r


def madvise(addr, length, advice):
    """madvise(2)."""
    _check(libc().madvise(addr, length, advice), "madvise")


def mprotect(addr, length, prot):
    """mprotect(2)."""
    _check(libc().mprotect(addr, length, prot), "mprotect")


def trim_heap():
    """Give the C heap's free memory back to the kernel (glibc ``malloc_trim``; elsewhere a
    no-op): compiling this file leaves megabytes of freed heap, which a forking parent would
    otherwise hand down to every worker."""
    try:
        libc().malloc_trim(0)
    except AttributeError:
        pass


def read_sysfs(path, default=None):
    """The stripped text of a /proc or /sys file, or ``default`` when it cannot be read."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return default


def has_cap(bit):
    """Whether this process has capability ``bit`` in its effective set (/proc/self/status)."""
    for line in (read_sysfs("/proc/self/status", "") or "").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


CAP_SYS_PTRACE = 19


###################################################################################################
#  2. UAPI constants (include/uapi/linux/userfaultfd.h, Linux 6.18)
###################################################################################################

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
USERFAULTFD_DEV = "/dev/userfaultfd"

_IOC_WRITE, _IOC_READ = 1, 2


def _IOC(direction, typ, nr, size):
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _IOR(typ, nr, size):
    return _IOC(_IOC_READ, typ, nr, size)


def _IOWR(typ, nr, size):
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, size)


USERFAULTFD_IOC_NEW = _IOC(0, 0xAA, 0x00, 0)            # 0xAA00, on /dev/userfaultfd

# ioctl numbers (_UFFDIO_*): the bit positions of the ``ioctls`` masks.
_UFFDIO_REGISTER, _UFFDIO_UNREGISTER, _UFFDIO_WAKE, _UFFDIO_COPY = 0x00, 0x01, 0x02, 0x03
_UFFDIO_ZEROPAGE, _UFFDIO_MOVE, _UFFDIO_WRITEPROTECT, _UFFDIO_CONTINUE = 0x04, 0x05, 0x06, 0x07
_UFFDIO_POISON, _UFFDIO_API = 0x08, 0x3F

UFFDIO_API = _IOWR(UFFD_API, _UFFDIO_API, 24)            # 0xC018AA3F
UFFDIO_REGISTER = _IOWR(UFFD_API, _UFFDIO_REGISTER, 32)  # 0xC020AA00
UFFDIO_UNREGISTER = _IOR(UFFD_API, _UFFDIO_UNREGISTER, 16)  # 0x8010AA01
UFFDIO_WAKE = _IOR(UFFD_API, _UFFDIO_WAKE, 16)           # 0x8010AA02
UFFDIO_COPY = _IOWR(UFFD_API, _UFFDIO_COPY, 40)          # 0xC028AA03
UFFDIO_ZEROPAGE = _IOWR(UFFD_API, _UFFDIO_ZEROPAGE, 32)  # 0xC020AA04
UFFDIO_MOVE = _IOWR(UFFD_API, _UFFDIO_MOVE, 40)          # 0xC028AA05
UFFDIO_WRITEPROTECT = _IOWR(UFFD_API, _UFFDIO_WRITEPROTECT, 24)  # 0xC018AA06
UFFDIO_CONTINUE = _IOWR(UFFD_API, _UFFDIO_CONTINUE, 32)  # 0xC020AA07
UFFDIO_POISON = _IOWR(UFFD_API, _UFFDIO_POISON, 32)      # 0xC020AA08

# uffd_msg.event
UFFD_EVENT_PAGEFAULT, UFFD_EVENT_FORK, UFFD_EVENT_REMAP = 0x12, 0x13, 0x14
UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP = 0x15, 0x16

# uffd_msg.arg.pagefault.flags
UFFD_PAGEFAULT_FLAG_WRITE, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_MINOR = 1, 2, 4

# uffdio_api.features
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

# uffdio_register.mode
UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP, UFFDIO_REGISTER_MODE_MINOR = 1, 2, 4
# mode flags of the fill ioctls
UFFDIO_COPY_MODE_DONTWAKE, UFFDIO_COPY_MODE_WP = 1, 2
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1
UFFDIO_WRITEPROTECT_MODE_WP, UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1, 2
UFFDIO_CONTINUE_MODE_DONTWAKE, UFFDIO_CONTINUE_MODE_WP = 1, 2
UFFDIO_POISON_MODE_DONTWAKE = 1
UFFDIO_MOVE_MODE_DONTWAKE, UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1, 2


class Flags(int):
    """An int of bits that prints the names it knows and keeps unknown bits as a number.

    Subclasses set ``NAMES`` (bit value -> name); each name is also a class attribute.  A newer
    kernel's extra bits are never an error: ``str(Features(0x20001))`` is
    ``'PAGEFAULT_FLAG_WP|0x20000'``."""
    NAMES = {}

    def names(self):
        """Known bit names in bit order, then the unknown remainder as a hex string."""
        out, rest = [], int(self)
        for bit, name in sorted(self.NAMES.items()):
            if rest & bit:
                out.append(name)
                rest &= ~bit
        if rest:
            out.append(hex(rest))
        return out

    @property
    def unknown(self):
        """The bits that have no name here (0 when all are known)."""
        known = 0
        for bit in self.NAMES:
            known |= bit
        return int(self) & ~known

    def __str__(self):
        return "|".join(self.names()) or "0"

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__, self)

    def __or__(self, other):
        return type(self)(int(self) | int(other))

    def __and__(self, other):
        return type(self)(int(self) & int(other))

    def __contains__(self, other):
        return int(self) & int(other) == int(other)

    __ror__, __rand__ = __or__, __and__

    @classmethod
    def parse(cls, text):
        """Flags from ``'A,B|C'`` names (case-insensitive) or a number; ValueError if unknown."""
        value = 0
        by_name = {n.lower(): b for b, n in cls.NAMES.items()}
        for word in text.replace("|", ",").split(","):
            word = word.strip().lower()
            if not word:
                continue
            if word in by_name:
                value |= by_name[word]
            else:
                try:
                    value |= int(word, 0)
                except ValueError:
                    raise ValueError("unknown %s name %r (known: %s)" % (
                        cls.__name__, word, ", ".join(n.lower() for n in cls.NAMES.values())))
        return cls(value)


def _flag_class(name, prefix, doc):
    table = {v: k[len(prefix):] for k, v in globals().items()
             if k.startswith(prefix) and isinstance(v, int)}
    cls = type(name, (Flags,), {"NAMES": table, "__doc__": doc})
    for bit, bit_name in table.items():
        setattr(cls, bit_name, cls(bit))
    return cls


Features = _flag_class("Features", "UFFD_FEATURE_", "uffdio_api.features bits (17 on 6.18).")
Ioctls = type("Ioctls", (Flags,), {
    "__doc__": "uffdio_api.ioctls / uffdio_register.ioctls bits: 1 << _UFFDIO_*.",
    "NAMES": {1 << v: k[len("_UFFDIO_"):] for k, v in globals().items()
              if k.startswith("_UFFDIO_")}})
for _bit, _name in Ioctls.NAMES.items():
    setattr(Ioctls, _name, Ioctls(_bit))
RegisterMode = _flag_class("RegisterMode", "UFFDIO_REGISTER_MODE_", "uffdio_register.mode bits.")
FaultFlags = type("FaultFlags", (Flags,), {
    "__doc__": "uffd_msg.arg.pagefault.flags bits.",
    "NAMES": {1: "write", 2: "wp", 4: "minor"}})

UFFD_API_FEATURES = (1 << 17) - 1                  # every feature bit 6.18 knows
UFFD_API_IOCTLS = Ioctls(1 << _UFFDIO_REGISTER | 1 << _UFFDIO_UNREGISTER | 1 << _UFFDIO_API)


###################################################################################################
#  3. Structs (all fields u64 / s64, little-endian, no padding)
###################################################################################################

class uffdio_range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


class uffdio_move(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("move", ctypes.c_int64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64)]


class uffdio_continue(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("mapped", ctypes.c_int64)]


class uffdio_poison(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", ctypes.c_uint64), ("updated", ctypes.c_int64)]


#: struct uffd_msg (32 bytes, packed): u8 event, 7 reserved bytes, 24-byte union ``arg``.
UFFD_MSG_SIZE = 32
UFFD_MSG = struct.Struct("<B7xQQQ")       # event, then the union as three u64 words
assert UFFD_MSG.size == UFFD_MSG_SIZE


###################################################################################################
#  4. Errors
###################################################################################################

class UffdToolError(Exception):
    """Base of the tool's own errors: ``exit_code`` is the exit status (README, "CLI
    contract"); ``fields`` go into the ``error`` record (e.g. the handshake that was refused)."""
    exit_code = 1
    fields = {}


class UsageError(UffdToolError):
    """Bad flag, size, range or file: exit 2."""
    exit_code = 2


class NotPermitted(UffdToolError):
    """The kernel or the permissions do not allow it: exit 3.  The message names the fix."""
    exit_code = 3


class TargetError(UffdToolError):
    """The target (process, peer, check) failed: exit 1."""
    exit_code = 1


#: errnos of a uffd ioctl that mean the uffd's process (its mm) is gone: nothing left to serve
PEER_GONE = frozenset((errno.ESRCH, errno.ENOMEM))

#: attempts at one ioctl that keeps failing with EAGAIN (an event is pending: read it, retry)
FILL_RETRIES = 1000

#: errno -> hint appended to errors of opening a uffd.
OPEN_HINTS = {
    errno.EPERM: "needs CAP_SYS_PTRACE (run as root), vm.unprivileged_userfaultfd=1, "
                 "or read+write access to /dev/userfaultfd",
    errno.EACCES: "needs read+write access to /dev/userfaultfd (or CAP_SYS_PTRACE)",
    errno.ENOSYS: "this kernel has no userfaultfd (CONFIG_USERFAULTFD)",
    errno.ENOENT: "/dev/userfaultfd does not exist (kernel < 6.1?)",
}


class UffdError(OSError):
    """A userfaultfd syscall or ioctl failed.

    Attributes: ``errno``, ``op`` (e.g. ``'UFFDIO_COPY'``), ``addr``/``length`` where known, and
    ``done``: bytes the kernel completed before the error (0 when nothing was done)."""

    def __init__(self, err, op, addr=None, length=None, done=0, hint=None, detail=None):
        msg = "%s: %s" % (op, detail or os.strerror(err))
        if addr is not None:
            msg += " at 0x%x+0x%x" % (addr, length or 0)
        if hint:
            msg += " (%s)" % hint
        super().__init__(err, msg)
        self.op, self.addr, self.length, self.done, self.hint = op, addr, length, done, hint

    def __str__(self):
        return self.strerror


###################################################################################################
#  5. Userfaultfd
###################################################################################################

class Userfaultfd:
    """One userfaultfd.

    ``Userfaultfd()`` opens a new one: ``route='syscall'`` (userfaultfd(2)), ``'dev'``
    (/dev/userfaultfd + USERFAULTFD_IOC_NEW) or ``None`` (syscall, then the device).  The fd is
    O_CLOEXEC and, by default, O_NONBLOCK (needed for poll; reads then never block).
    ``user_mode_only`` adds UFFD_USER_MODE_ONLY (kernel-mode accesses then fail with EFAULT
    instead of faulting).  ``Userfaultfd.adopt(fd)`` wraps an fd that already did UFFDIO_API
    (received over a socket, or from a FORK event).

    Every ioctl has one method.  Fill methods return the bytes done; a partial fill (the kernel
    stopped early and returned EAGAIN with progress) returns fewer bytes than asked for, so the
    caller can retry from there.  Failures with nothing done raise ``UffdError`` (EAGAIN whether
    the kernel wrote 0 or -EAGAIN into the result field).

    Threads: wake, copy, zeropage and continue reuse preallocated ioctl arguments, which belong
    to the one thread that resolves faults; register, unregister and writeprotect build their
    own, so another thread (watch's tracer, arming new mappings) may call them meanwhile.
    """

    def __init__(self, *, nonblock=True, cloexec=True, user_mode_only=False, route=None, fd=None):
        self.route = "adopted"
        self.features = Features(0)      # enabled on this fd (what UFFDIO_API asked for)
        self.available = Features(0)     # what the kernel offered in UFFDIO_API
        self.ioctls = Ioctls(0)
        self._fd = -1
        if fd is None:
            flags = (os.O_CLOEXEC if cloexec else 0) | (os.O_NONBLOCK if nonblock else 0) | (
                UFFD_USER_MODE_ONLY if user_mode_only else 0)
            fd = self._open(flags, route)
        self._fd = fd
        self._rng = uffdio_range()
        self._copy = uffdio_copy()
        self._zero = uffdio_zeropage()
        self._cont = uffdio_continue()
        self._buf = bytearray(UFFD_MSG_SIZE * 64)

    def _open(self, flags, route):
        errors = []
        if route in (None, "syscall"):
            try:
                fd = syscall("userfaultfd", flags)
                self.route = "syscall"
                return fd
            except OSError as e:
                errors.append(("userfaultfd(2)", e.errno))
        if route in (None, "dev"):
            try:
                dev = os.open(USERFAULTFD_DEV, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fd = fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
                finally:
                    os.close(dev)
                self.route = "dev"
                return fd
            except OSError as e:
                errors.append((USERFAULTFD_DEV, e.errno))
        if route not in (None, "syscall", "dev"):
            raise ValueError("route must be None, 'syscall' or 'dev'")
        err = errors[0][1]
        detail = "; ".join("%s: %s" % (w, os.strerror(e)) for w, e in errors)
        raise UffdError(err, "cannot open a userfaultfd", detail=detail,
                        hint=OPEN_HINTS.get(err, "see 'uffdtool info'"))

    @classmethod
    def adopt(cls, fd, features=0):
        """Wrap an existing uffd (UFFDIO_API already done); it is closed with this object."""
        self = cls(fd=fd)
        self.features = Features(features)
        return self

    # -- fd plumbing ----------------------------------------------------------------------------
    def fileno(self):
        return self._fd

    @property
    def closed(self):
        return self._fd < 0

    def close(self):
        """Close the fd (idempotent).  Unresolved faults of its ranges then resolve as normal."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return "<Userfaultfd fd=%d route=%s features=%s>" % (self._fd, self.route, self.features)

    # -- one ioctl helper -----------------------------------------------------------------------
    def _ioctl(self, req, arg, op, addr=None, length=None):
        try:
            fcntl.ioctl(self._fd, req, arg, True)
        except OSError as e:
            raise UffdError(e.errno, op, addr, length) from None

    def _fill(self, req, arg, result, op, addr, length):
        """Run a fill ioctl; return bytes done (partial < length); raise when nothing was done.

        The result field is -errno or bytes done; EAGAIN with a positive count is partial
        progress (the kernel then discards the real error: mm/userfaultfd.c).  Nothing done is
        reported as 0 or -EAGAIN depending on the kernel: both raise UffdError(EAGAIN)."""
        try:
            fcntl.ioctl(self._fd, req, arg, True)
        except OSError as e:
            done = getattr(arg, result)
            if e.errno == errno.EAGAIN and done > 0:
                return done
            raise UffdError(e.errno, op, addr, length) from None
        return length

    # -- the ioctls -----------------------------------------------------------------------------
    def api(self, features=0):
        """UFFDIO_API (once per fd).  Returns (available Features, Ioctls of the fd).

        ``features`` are enabled on this fd; asking for one the kernel lacks raises EINVAL,
        EVENT_FORK without CAP_SYS_PTRACE raises EPERM."""
        arg = uffdio_api(UFFD_API, int(features), 0)
        try:
            fcntl.ioctl(self._fd, UFFDIO_API, arg, True)
        except OSError as e:
            hint = None
            if e.errno == errno.EPERM and int(features) & UFFD_FEATURE_EVENT_FORK:
                hint = "UFFD_FEATURE_EVENT_FORK needs CAP_SYS_PTRACE"
            elif e.errno == errno.EINVAL:
                hint = "feature not offered by this kernel, or UFFDIO_API already done"
            raise UffdError(e.errno, "UFFDIO_API", hint=hint) from None
        self.features = Features(features)
        self.available = Features(arg.features)
        self.ioctls = Ioctls(arg.ioctls)
        return self.available, self.ioctls

    def register(self, start, length, mode=UFFDIO_REGISTER_MODE_MISSING):
        """UFFDIO_REGISTER; returns the Ioctls this range allows."""
        arg = uffdio_register(uffdio_range(start, length), int(mode), 0)
        self._ioctl(UFFDIO_REGISTER, arg, "UFFDIO_REGISTER", start, length)
        return Ioctls(arg.ioctls)

    def unregister(self, start, length):
        """UFFDIO_UNREGISTER (wakes faulters blocked in the range)."""
        self._ioctl(UFFDIO_UNREGISTER, uffdio_range(start, length), "UFFDIO_UNREGISTER",
                    start, length)

    def wake(self, start, length):
        """UFFDIO_WAKE: wake threads faulting in the range (needed after EEXIST/DONTWAKE)."""
        rng = self._rng
        rng.start, rng.len = start, length
        self._ioctl(UFFDIO_WAKE, rng, "UFFDIO_WAKE", start, length)

    def copy(self, dst, src, length, mode=0):
        """UFFDIO_COPY ``length`` bytes from ``src`` (our address space) to ``dst``."""
        c = self._copy
        c.dst, c.src, c.len, c.mode, c.copy = dst, src, length, mode, 0
        return self._fill(UFFDIO_COPY, c, "copy", "UFFDIO_COPY", dst, length)

    def zeropage(self, start, length, mode=0):
        """UFFDIO_ZEROPAGE: map zero pages (not on hugetlb: EINVAL)."""
        z = self._zero
        z.range.start, z.range.len, z.mode, z.zeropage = start, length, mode, 0
        return self._fill(UFFDIO_ZEROPAGE, z, "zeropage", "UFFDIO_ZEROPAGE", start, length)

    def writeprotect(self, start, length, protect=True, dontwake=False):
        """UFFDIO_WRITEPROTECT: protect, or (protect=False) unprotect and wake the range."""
        mode = (UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | (
            UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0)
        w = uffdio_writeprotect(uffdio_range(start, length), mode)   # own argument: see class doc
        self._ioctl(UFFDIO_WRITEPROTECT, w, "UFFDIO_WRITEPROTECT", start, length)

    def continue_(self, start, length, mode=0):
        """UFFDIO_CONTINUE: map the page-cache pages of a MINOR range."""
        c = self._cont
        c.range.start, c.range.len, c.mode, c.mapped = start, length, mode, 0
        return self._fill(UFFDIO_CONTINUE, c, "mapped", "UFFDIO_CONTINUE", start, length)

    def poison(self, start, length, mode=0):
        """UFFDIO_POISON: later accesses get SIGBUS (or EFAULT in the kernel)."""
        p = uffdio_poison(uffdio_range(start, length), mode, 0)
        return self._fill(UFFDIO_POISON, p, "updated", "UFFDIO_POISON", start, length)

    def move(self, dst, src, length, mode=0):
        """UFFDIO_MOVE pages from ``src`` to ``dst`` (same process only)."""
        m = uffdio_move(dst, src, length, mode, 0)
        return self._fill(UFFDIO_MOVE, m, "move", "UFFDIO_MOVE", dst, length)

    # -- messages -------------------------------------------------------------------------------
    def read_events(self, max_msgs=64):
        """Every pending uffd_msg (up to ``max_msgs``) as typed events; [] when none is pending.

        On a blocking fd this waits for the first message.  A FORK event's ``ufd`` is the child's
        new uffd, already adopted as a ``Userfaultfd`` (with this one's features): closing it is
        the receiver's job (``decode_msgs`` alone gives the raw fd number)."""
        if max_msgs > len(self._buf) // UFFD_MSG_SIZE:
            self._buf = bytearray(UFFD_MSG_SIZE * max_msgs)
        try:
            n = os.readv(self._fd, [memoryview(self._buf)[:UFFD_MSG_SIZE * max_msgs]])
        except BlockingIOError:
            return []
        except OSError as e:
            raise UffdError(e.errno, "read") from None
        evs = decode_msgs(self._buf, n)
        for i, ev in enumerate(evs):
            if type(ev) is Fork:
                evs[i] = Fork(Userfaultfd.adopt(ev.ufd, self.features))
        return evs


###################################################################################################
#  6. Events
###################################################################################################

class _Event(tuple):
    """Base of the immutable event records (tuples with named fields)."""
    __slots__ = ()
    name = "?"

    def record(self):
        """The JSON-lines fields of this event (without ``t``; README, "CLI contract")."""
        return {"event": self.name}


def _event(cls_name, name, fields, json_names=None):
    json_names = json_names or fields

    def new(cls, *args):
        return tuple.__new__(cls, args)

    ns = {"__slots__": (), "name": name, "_fields": fields, "__new__": new,
          "__repr__": lambda self: "%s(%s)" % (cls_name, ", ".join(
              "%s=%s" % (f, hex(v) if isinstance(v, int) and v > 9 else v)
              for f, v in zip(fields, self)))}
    for i, f in enumerate(fields):
        ns[f] = property(lambda self, i=i: self[i])

    def record(self):
        r = {"event": name}
        r.update(zip(json_names, self))
        return r
    ns["record"] = record
    return type(cls_name, (_Event,), ns)


Fork = _event("Fork", "fork", ("ufd",))
Fork.__doc__ = """A UFFD_EVENT_FORK: ``ufd`` is the child's uffd (an fd number from
``decode_msgs``, a Userfaultfd from ``Userfaultfd.read_events``)."""
Fork.record = lambda self: {"event": "fork", "ufd": getattr(self.ufd, "fileno", lambda: self.ufd)()}
Remap = _event("Remap", "remap", ("from_", "to", "len"), ("from", "to", "len"))
Remove = _event("Remove", "remove", ("start", "end"))
Unmap = _event("Unmap", "unmap", ("start", "end"))
UnknownEvent = _event("UnknownEvent", "unknown", ("code", "raw"))
UnknownEvent.record = lambda self: {"event": "unknown", "code": self.code, "raw": self.raw.hex()}


class PageFault(_event("_PageFault", "pagefault", ("address", "flags", "ptid"))):
    """A UFFD_EVENT_PAGEFAULT: ``address``, ``flags`` (FaultFlags bits), ``ptid`` (0 without
    UFFD_FEATURE_THREAD_ID)."""
    __slots__ = ()
    write = property(lambda self: bool(self[1] & UFFD_PAGEFAULT_FLAG_WRITE))
    wp = property(lambda self: bool(self[1] & UFFD_PAGEFAULT_FLAG_WP))
    minor = property(lambda self: bool(self[1] & UFFD_PAGEFAULT_FLAG_MINOR))

    @property
    def kind(self):
        """'wp', 'minor' or 'missing': why the fault was raised."""
        f = self[1]
        return "wp" if f & UFFD_PAGEFAULT_FLAG_WP else "minor" if f & \
            UFFD_PAGEFAULT_FLAG_MINOR else "missing"

    def record(self):
        return {"event": "pagefault", "address": self[0],
                "flags": FaultFlags(self[1]).names(), "ptid": self[2]}


def decode_msgs(buf, n=None):
    """Decode ``n`` bytes (default: all) of packed 32-byte uffd_msg records into events.

    Pure: tests feed it bytes.  ``n`` is clamped to ``len(buf)``; a trailing partial record is
    ignored; unknown event codes become
    ``UnknownEvent(code, raw)``."""
    n = len(buf) if n is None else max(0, min(n, len(buf)))     # never past the buffer
    out = []
    unpack = UFFD_MSG.unpack_from
    for off in range(0, n - UFFD_MSG_SIZE + 1, UFFD_MSG_SIZE):
        ev, a, b, c = unpack(buf, off)
        if ev == UFFD_EVENT_PAGEFAULT:
            out.append(PageFault(b, a, c & 0xFFFFFFFF))
        elif ev == UFFD_EVENT_REMOVE:
            out.append(Remove(a, b))
        elif ev == UFFD_EVENT_UNMAP:
            out.append(Unmap(a, b))
        elif ev == UFFD_EVENT_REMAP:
            out.append(Remap(a, b, c))
        elif ev == UFFD_EVENT_FORK:
            out.append(Fork(a & 0xFFFFFFFF))
        else:
            out.append(UnknownEvent(ev, bytes(buf[off:off + UFFD_MSG_SIZE])))
    return out


###################################################################################################
#  7. Event log and stats
###################################################################################################

#: records of these events may wait in the log's buffer (uffd events: they come by the thousand
#: and only their order matters); any other record is written at once, with all before it
BATCHED_EVENTS = frozenset(("pagefault", "remove", "unmap", "remap", "fork"))
#: most bytes buffered before a write to a file; a pipe gets at most PIPE_BUF per write
LOG_BATCH = 64 << 10
PIPE_BUF = select.PIPE_BUF


class EventLog:
    """The one writer of JSON-lines records (README, "CLI contract") and of the human lines on
    stderr.

    ``dest``: None (no JSON), ``'-'`` (stdout), a path, or a file object.  Every record gets
    ``t`` (seconds since ``t0``) and ``event``.  ``human`` is where the human-readable lines
    go (None: nowhere, i.e. --quiet); ``human_faults`` says whether pagefault records also get
    a human line (watch: yes; serve-file: only with -v).  ``fields`` go into every record (a
    ``--peers`` worker's ``peer``).

    Writes (README, "Hardening"): every ``write()`` carries whole records only; a path is
    opened O_APPEND; on a pipe or socket each write is at most PIPE_BUF bytes (atomic).  The
    uffd event records (BATCHED_EVENTS) are buffered, up to LOG_BATCH bytes; any other record
    (``stats``, ``exit``, ``error``...), ``flush()`` (the Handler calls it before it sleeps)
    and ``close()`` write everything before them.  A log that cannot be written (ENOSPC, EIO)
    never stops the caller: the records are dropped and counted (``dropped``, the
    ``log_dropped`` field of every ``stats`` record), one line goes to ``errors``, and a
    record cut short by a full disk is cut off the file again."""

    def __init__(self, dest=None, human=sys.stderr, human_faults=True, t0=None,
                 errors=sys.stderr, fields=None):
        self.t0 = time.monotonic() if t0 is None else t0
        self._own = False
        self.fd = -1                  # the JSON destination as an fd (paths, stdout) ...
        self.out = None               # ... or as a file object (what a caller handed in)
        self.name = dest if isinstance(dest, str) else getattr(dest, "name", "log")
        if dest == "-":
            dest = sys.stdout
            self.name = "stdout"
        if isinstance(dest, str):
            try:
                self.fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND |
                                  os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise UsageError("cannot write log %s: %s" % (dest, e.strerror))
            self._own = True
        elif dest is not None:
            try:
                dest.flush()
                self.fd = dest.fileno()
            except (AttributeError, OSError, ValueError):
                self.out = dest       # no fd (e.g. io.StringIO): written record by record
        self._limit = LOG_BATCH
        self._regular = False
        if self.fd >= 0:
            try:
                mode = os.fstat(self.fd).st_mode
                self._regular = (mode & 0o170000) == 0o100000
                if mode & 0o170000 in (0o010000, 0o140000):       # FIFO, socket
                    self._limit = PIPE_BUF
            except OSError:
                pass
        self._buf = []
        self._buflen = 0
        self._lock = threading.Lock()  # watch's tracer thread emits too: one flush at a time
        self.dropped = 0              # records that could not be written
        self.errors = errors
        self._complained = False
        self._encode = json.JSONEncoder(separators=(",", ":")).encode
        self.human = human
        self.human_faults = human_faults
        self.json_faults = True       # False: pagefault records stay out of the JSON log too
        self.fields = dict(fields or {})
        self.names = {}               # pid -> command name, for the human lines (format_human)

    def fork_copy(self, **fields):
        """This log for a forked worker, made in the worker: the same destination on a dup of
        its fd, a buffer of its own (the parent ``flush``es before it forks), the same ``t0``,
        and ``fields`` in every record."""
        log = EventLog(None, human=self.human, human_faults=self.human_faults, t0=self.t0,
                       errors=self.errors, fields=dict(self.fields, **fields))
        if self.fd >= 0:
            log.fd, log._own = os.dup(self.fd), True
        else:
            log.out = self.out
        log.name, log._limit, log._regular = self.name, self._limit, self._regular
        log.json_faults = self.json_faults
        log.names = dict(self.names)
        return log

    @property
    def writing(self):
        """Whether there is a JSON destination (still)."""
        return self.fd >= 0 or self.out is not None

    @property
    def wants_faults(self):
        """Whether per-fault records are written anywhere (the hot path skips them if not)."""
        return (self.writing and self.json_faults) or (
            self.human is not None and self.human_faults)

    def now(self):
        return time.monotonic() - self.t0

    def emit(self, event, **fields):
        """Write one record (or buffer it: see the class doc); returns it."""
        rec = {"t": round(self.now(), 6), "event": event}
        rec.update(self.fields)
        rec.update(fields)
        if event == "stats":
            rec["log_dropped"] = self.dropped
        if self.writing and (event != "pagefault" or self.json_faults):
            line = self._encode(rec) + "\n"
            self._buf.append(line)
            self._buflen += len(line)
            if event not in BATCHED_EVENTS or self._buflen >= self._limit:
                self.flush()
        if self.human is not None and (event != "pagefault" or self.human_faults):
            try:
                self.human.write(format_human(rec, self.names) + "\n")
                self.human.flush()
            except (OSError, ValueError):
                self.human = None
        return rec

    def write_records(self, lines):
        """Buffer pagefault records already encoded as JSON lines (a list of whole lines: the
        Handler's fast loop formats its records itself); the same batching as ``emit``."""
        if not (self.writing and self.json_faults) or not lines:
            return
        self._buf.extend(lines)
        self._buflen += sum(map(len, lines))
        if self._buflen >= self._limit:
            self.flush()

    def flush(self):
        """Write every buffered record (whole records per write; see the class doc)."""
        if not self._buf:
            return
        with self._lock:
            self._flush()

    def _flush(self):
        lines, self._buf, self._buflen = self._buf, [], 0
        if self.out is not None:
            try:
                self.out.write("".join(lines))
                self.out.flush()
            except (OSError, ValueError) as e:
                self._lost(len(lines), e)
            return
        if self.fd < 0:
            self.dropped += len(lines)
            return
        i = 0
        while i < len(lines):
            chunk, n = [], 0          # whole records, at most _limit bytes (one record more)
            while i < len(lines) and (not chunk or n + len(lines[i]) <= self._limit):
                chunk.append(lines[i])
                n += len(lines[i])
                i += 1
            if not self._write(("".join(chunk)).encode()):
                self._lost(len(chunk) + len(lines) - i, self._error)
                return

    def _write(self, data):
        """Write ``data`` whole; False (``_error`` set) if it could not be.  A short write to a
        file is completed or, failing that, cut off again: no half record stays behind."""
        done = 0
        start = None
        while done < len(data):
            try:
                n = os.write(self.fd, data[done:] if done else data)
            except InterruptedError:
                continue
            except OSError as e:
                self._error = e
                if done and self._regular and start is not None:
                    try:
                        os.ftruncate(self.fd, start)
                    except OSError:
                        pass
                return False
            if not done and n < len(data) and self._regular:
                try:                  # where this write began: cut back to it on failure
                    start = os.lseek(self.fd, 0, os.SEEK_END) - n
                except OSError:
                    start = None
            done += n
        return True

    def _lost(self, n, e):
        self.dropped += n
        if isinstance(e, BrokenPipeError) or isinstance(e, ValueError):
            self._close_dest()        # reader went away: keep serving, stop logging
            return
        if not self._complained:
            self._complained = True
            try:
                self.errors.write("uffdtool: cannot write log %s: %s; serving goes on, the "
                                  "records not written are counted (log_dropped in stats)\n"
                                  % (self.name, getattr(e, "strerror", None) or e))
                self.errors.flush()
            except (AttributeError, OSError, ValueError):
                pass

    def _close_dest(self):
        if self._own and self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
        self.fd = -1
        self.out = None

    def close(self):
        self.flush()
        self._close_dest()


#: record fields that hold a command line: shown as a shell would quote it
_ARGV_FIELDS = ("cmd", "argv")


def _fmt_value(k, v):
    """``k=v`` for a human line: addresses in hex, a command line shell-quoted, lists joined
    with commas, dicts as ``{k=v ...}``, booleans as yes/no; never Python syntax."""
    if isinstance(v, bool):
        return "%s=%s" % (k, "yes" if v else "no")
    if isinstance(v, int) and k in ("address", "start", "end", "from", "to", "base", "dst"):
        return "%s=0x%x" % (k, v)
    if isinstance(v, list) and k in _ARGV_FIELDS:
        line = shlex.join(str(x) for x in v)
        return '%s="%s"' % (k, line.replace('"', '\\"')) if " " in line else "%s=%s" % (k, line)
    if isinstance(v, list):
        return "%s=%s" % (k, ",".join(
            "{%s}" % _fmt_fields(x) if isinstance(x, dict) else str(x) for x in v) or "-")
    if isinstance(v, dict):
        return "%s={%s}" % (k, _fmt_fields(v))
    return "%s=%s" % (k, v)


def _fmt_fields(d):
    """The ``k=v`` pairs of a dict, fields without a value (None) left out."""
    return " ".join(_fmt_value(k, v) for k, v in d.items() if v is not None)


def format_human(rec, names=None):
    """One readable line for a record: ``  1.234567 pagefault address=0x7f.. flags=write``.
    Fields without a value (None) are left out; ``names`` ({pid: command name}) adds the
    command name to a ``pid`` field: ``pid=1234/sort``."""
    rest = _fmt_fields({k: v for k, v in rec.items() if k not in ("t", "event")})
    if names and rec.get("pid") in names and rec.get("comm") is None:
        rest = rest.replace("pid=%d" % rec["pid"], "pid=%d/%s" % (rec["pid"], names[rec["pid"]]),
                            1)
    return "%10.6f %-9s %s" % (rec["t"], rec["event"], rest)


#: power-of-two buckets of ``latency_hist``: upper bounds 1 µs, 2 µs, ... 2**24 µs (16.8 s)
LAT_BUCKETS = 25


def latency_bucket(us):
    """Index k of the ``latency_hist`` bucket that holds ``us`` µs: the least k with
    ``us <= 2**k`` (0 up to 1 µs; slower than 2**24 µs counts in the last bucket)."""
    if us <= 1:
        return 0
    return min(LAT_BUCKETS - 1, (math.ceil(us) - 1).bit_length())


class Stats:
    """Counters and fault-service latencies for the final (and periodic) ``stats`` record.

    ``count`` is a plain dict of counters (faults by kind, pages/bytes filled by copy and zero,
    eexist, eagain, retries, events by type...); ``latency(us)`` adds one sample (a bounded
    array: beyond ``max_samples`` every other sample is dropped, which keeps percentiles fair).
    ``hist`` counts every sample per power-of-two bucket (``latency_hist``), also the dropped
    ones, so that consumers can add histograms of several runs or peers."""

    def __init__(self, max_samples=1 << 20):
        self.count = {}
        self.lat = array.array("f")
        self.hist = [0] * LAT_BUCKETS
        self._max = max_samples
        self._keep_every = 1
        self._seen = 0
        self.t0 = time.monotonic()
        self.providers = []           # callables returning more fields (a UrlSource's counters)

    def add(self, key, n=1):
        self.count[key] = self.count.get(key, 0) + n

    def latencies(self, samples):
        """Add many samples (µs) at once (the fast serving loop keeps its own buffer)."""
        if len(self.lat) + len(samples) < self._max and self._keep_every == 1:
            self._seen += len(samples)
            self.lat.extend(samples)
            hist = self.hist
            for us in samples:
                hist[latency_bucket(us)] += 1
        else:
            for us in samples:
                self.latency(us)

    def latency(self, us):
        self.hist[latency_bucket(us)] += 1
        self._seen += 1
        if self._seen % self._keep_every:
            return
        self.lat.append(us)
        if len(self.lat) >= self._max:
            self.lat = array.array("f", self.lat[::2])
            self._keep_every *= 2

    def percentiles(self):
        """{'p50': µs, 'p99': µs, 'max': µs} of the samples (empty dict when there are none)."""
        if not self.lat:
            return {}
        s = sorted(self.lat)

        def pick(q):
            return round(float(s[min(len(s) - 1, int(q * len(s)))]), 1)
        return {"p50": pick(0.50), "p99": pick(0.99), "max": round(float(s[-1]), 1),
                "samples": len(s)}

    def histogram(self):
        """``{"1": n, "2": n, "4": n, ...}``: samples per bucket, keyed by its upper bound in µs
        (empty buckets left out)."""
        return {str(1 << k): n for k, n in enumerate(self.hist) if n}

    def record(self, **extra):
        """The fields of a ``stats`` record."""
        rec = dict(sorted(self.count.items()))
        rec["latency_us"] = self.percentiles()
        rec["latency_hist"] = self.histogram()
        rec["wall_s"] = round(time.monotonic() - self.t0, 6)
        for fn in self.providers:
            rec.update(fn())
        rec.update(extra)
        return rec


###################################################################################################
#  8. Page sources
###################################################################################################

# -- zero and file sources ------------------------------------------------------------------------

class ZeroSource:
    """Fills with zero pages (UFFDIO_ZEROPAGE); on hugetlb, where ZEROPAGE is EINVAL, with a
    COPY from a zero-filled buffer."""
    kind = "zero"
    size = None                       # no length limit

    def __init__(self):
        self._zbuf = 0
        self._zlen = 0

    def fill(self, uffd, dst, length, offset, hugetlb=False):
        """Resolve ``[dst, dst+length)``; returns bytes done (see Userfaultfd._fill)."""
        if not hugetlb:
            return uffd.zeropage(dst, length)
        if self._zlen < length:
            self._zbuf, self._zlen = mmap_anon(length, PROT_READ), length
        return uffd.copy(dst, self._zbuf, length)

    def address(self, offset):
        return None

    def close(self):
        if self._zlen:
            munmap(self._zbuf, self._zlen)
            self._zlen = 0


class SourceChanged(TargetError):
    """The source file changed while it was being served (a snapshot must not): exit 1."""


#: inotify(7) events that mean a file's contents or size may have changed
IN_MODIFY, IN_ATTRIB = 0x2, 0x4


def inotify_watch(path, mask):
    """An inotify fd (O_NONBLOCK|O_CLOEXEC) watching ``path`` for ``mask``; -1 if inotify is
    not available (then only size and mtime are compared)."""
    lib = libc()
    try:
        fd = _check(lib.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1")
    except (OSError, AttributeError):
        return -1
    try:
        _check(lib.inotify_add_watch(fd, os.fsencode(path), mask), "inotify_add_watch")
    except OSError:
        os.close(fd)
        return -1
    return fd


def file_holes(fd, start, end):
    """The holes of ``[start, end)`` of a file (SEEK_DATA/SEEK_HOLE): sorted ``[a, b)`` file
    offsets, whole pages only (a page holding any data is data).  [] where unsupported."""
    holes, pos = [], start
    try:
        while pos < end:
            data = os.lseek(fd, pos, os.SEEK_DATA)
            if data > pos:
                holes.append((pos, min(data, end)))
            pos = os.lseek(fd, data, os.SEEK_HOLE)
    except OSError as e:
        if e.errno != errno.ENXIO:            # ENXIO: no data after pos (the rest is a hole)
            return []
        holes.append((pos, end))
    out = []
    for a, b in holes:
        a, b = -(-a // PAGE_SIZE) * PAGE_SIZE, b - b % PAGE_SIZE if b < end else end
        if a < b:
            out.append((a, b))
    return out


class FileSource:
    """Fills from a file: the page at source offset X comes from PATH at ``offset + X``.

    The file is mapped read-only, MAP_PRIVATE, its data populated up front so that disk I/O
    stays out of fault latency; UFFDIO_COPY copies from that mapping.  Holes of a sparse file
    (virtio-mem: unplugged memory) are found once (SEEK_DATA/SEEK_HOLE), never read, and
    served as zero pages (``holes``: source-offset ranges; ``hole_span``).  ``watch_fd`` is an
    inotify fd on the file; ``check()`` raises SourceChanged when the file was written to or
    its size or mtime changed since it was opened."""
    kind = "copy"

    def __init__(self, path, offset=0, populate=True):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise UsageError("cannot open %s: %s" % (path, e.strerror))
        self._fd = fd
        self.watch_fd = -1
        self._map = 0
        self._ptes_forked = False             # before_fork: fork copies the mapping's entries
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o170000 not in (0o100000, 0o060000):
                raise UsageError("%s is not a regular file or block device" % path)
            regular = st.st_mode & 0o170000 == 0o100000
            total = st.st_size if regular else _blkdev_size(fd)
            if offset < 0 or offset > total:
                raise UsageError("--offset %d is beyond the end of %s (%d bytes)"
                                 % (offset, path, total))
            self.path, self.offset, self.size = path, offset, total - offset
            self._stat = (st.st_size, st.st_mtime_ns) if regular else None
            self._maplen = total
            fholes = file_holes(fd, offset, total) if regular else []
            self.holes = [(a - offset, b - offset) for a, b in fholes]
            self._hole_starts = [a for a, b in self.holes]
            if total:
                flags = MAP_PRIVATE | (MAP_POPULATE if populate and not fholes else 0)
                self._map = mmap_anon(total, PROT_READ, flags, fd=fd)
                if populate and fholes:
                    self._populate_data(fholes, total)
            if regular:
                self.watch_fd = inotify_watch(path, IN_MODIFY | IN_ATTRIB)
        except BaseException:
            self.close()
            raise
        self.base = self._map + offset        # address of source offset 0

    def _populate_data(self, holes, total):
        """Read the data runs between ``holes`` into the mapping (never the holes)."""
        pos = 0
        for a, b in holes + [(total, total)]:
            a0 = pos - pos % PAGE_SIZE
            if a > a0:
                try:
                    madvise(self._map + a0, a - a0, MADV_POPULATE_READ)
                except OSError:
                    pass                      # kernel < 5.14: faults read it later
            pos = b

    def hole_span(self, off, length):
        """If source page ``off`` lies in a hole: the bytes of the hole from ``off`` (> 0);
        else minus the bytes of data from ``off`` up to the next hole (<= -length if none
        within ``length``)."""
        i = bisect.bisect_right(self._hole_starts, off) - 1
        if i >= 0 and off < self.holes[i][1]:
            return self.holes[i][1] - off
        if i + 1 < len(self.holes):
            return -(self.holes[i + 1][0] - off)
        return -length

    def check(self):
        """SourceChanged if the file changed since it was opened (inotify IN_MODIFY, or size or
        mtime differ); cheap when nothing happened (one non-blocking read)."""
        modified = False
        if self.watch_fd >= 0:
            try:
                data = os.read(self.watch_fd, 4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            for off in range(0, len(data) - 15, 16):
                wd, mask, cookie, n = struct.unpack_from("iIII", data, off)
                modified |= bool(mask & IN_MODIFY)
                # (names follow only for directories; this watches one file)
        if self._stat is None:
            return
        try:
            st = os.fstat(self._fd)
        except OSError:
            return
        now = (st.st_size, st.st_mtime_ns)
        if modified or now != self._stat:
            raise SourceChanged(
                "serving failed: the source file %s changed while serving (size %d -> %d%s); "
                "a snapshot must stay unchanged while it is served"
                % (self.path, self._stat[0], now[0],
                   ", modified" if now[0] == self._stat[0] else ""))

    def fill(self, uffd, dst, length, offset, hugetlb=False):
        return uffd.copy(dst, self.base + offset, length)

    def address(self, offset):
        """Our address of source offset ``offset`` (for verification and prefetch)."""
        return self.base + offset

    def before_fork(self):
        """Have fork copy the mapping's page table entries (a parent about to fork workers).

        A forked process inherits the mapping but not its page table entries: the kernel
        copies them only for a mapping that has anonymous pages, and leaves the others to
        page faults.  A UFFDIO_COPY from an unmapped source page takes the kernel's slow
        fault-and-retry path (half the throughput at ``--readahead 64``), and mapping the file
        again in each worker (MADV_POPULATE_READ) costs it about 0.3 µs per page before its
        first fault (README, "Many VMs").  So one data page is copied on write, with its own
        bytes: the mapping then has an anonymous page, and fork copies every entry (about a
        third of that cost, paid by the parent's fork).  Where that fails (write permission
        beyond the commit limit of a huge file), each worker maps the file again."""
        at = self._first_data_offset()
        if at is None or self._ptes_forked:
            return
        try:
            mprotect(self._map, self._maplen, PROT_READ | PROT_WRITE)
        except OSError:
            return
        try:
            ctypes.memmove(self._map + at, self._map + at, 1)
            self._ptes_forked = True
        finally:
            mprotect(self._map, self._maplen, PROT_READ)

    def _first_data_offset(self):
        """The mapping offset of the first byte of data served (not in a hole; None: none)."""
        pos = self.offset
        for a, b in self.holes:
            if a + self.offset > pos:
                break
            pos = b + self.offset
        return pos if self._map and pos < self._maplen else None

    def after_fork(self):
        """Make the source a forked worker's own (README, "Many VMs").  An inherited inotify
        fd is shared: one process would read the event that the others wait for, so the
        worker watches the file itself (a change before that still shows in size or mtime).
        And unless ``before_fork`` had fork copy them, it maps the file's pages again, in one
        call (MADV_POPULATE_READ, Linux 5.14)."""
        if self.watch_fd >= 0:
            os.close(self.watch_fd)
            self.watch_fd = inotify_watch(self.path, IN_MODIFY | IN_ATTRIB)
        if self._map and not self._ptes_forked:
            self._populate_data([(a + self.offset, b + self.offset) for a, b in self.holes],
                                self._maplen)

    def close(self):
        if self._map:
            munmap(self._map, self._maplen)
            self._map = 0
        for name in ("watch_fd", "_fd"):
            fd = getattr(self, name, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def _blkdev_size(fd):
    return os.lseek(fd, 0, os.SEEK_END)


# -- watch --pid --dontneed: the target's own pages, snapshotted ----------------------------------

class SnapshotSource:
    """Page source of ``watch --pid --dontneed``: the page at address A comes from a snapshot of
    A taken before MADV_DONTNEED (regions carry ``offset = original address``, which stays
    right after a REMAP); pages that were never present get zero pages.  ``install_missing``
    puts every page back that has not faulted yet, so detaching leaves the target's data
    complete."""
    kind = "copy"
    size = None

    def __init__(self):
        self.buf = None
        self.index = {}                  # page address -> offset in buf

    def adopt(self, buf, index):
        """Keep a ready snapshot: a ctypes buffer and ``{address: offset in it}``."""
        self.buf, self.index = buf, index

    def load(self, pages):
        """Keep ``{address: bytes}`` (one page each)."""
        blob = b"".join(pages[a] for a in sorted(pages))
        self.buf = ctypes.create_string_buffer(blob, max(1, len(blob)))
        self.index = {a: i * PAGE_SIZE for i, a in enumerate(sorted(pages))}

    def fill(self, uffd, dst, length, offset, hugetlb=False):
        done = 0
        base = ctypes.addressof(self.buf) if self.buf is not None else 0
        while done < length:
            src = self.index.get(offset + done)
            try:
                if src is None:
                    uffd.zeropage(dst + done, PAGE_SIZE)
                else:
                    uffd.copy(dst + done, base + src, PAGE_SIZE)
            except UffdError:
                if done:
                    return done          # stop at a present page; the faulting one is done
                raise
            done += PAGE_SIZE
        return done

    def install_missing(self, served, pending=None):
        """Copy every snapshot page still missing in ``served`` (a Served) back; returns pages.
        ``pending(served, attempt)`` (``Handler.read_pending``) is called on EAGAIN (an unread
        event, e.g. the target forked meanwhile), then the page is tried again."""
        n = 0
        base = ctypes.addressof(self.buf) if self.buf is not None else 0
        for r in list(served.regions):
            for a in range(r.offset, r.offset + (r.end - r.start), PAGE_SIZE):
                src = self.index.get(a)
                dst = r.start + (a - r.offset)
                if src is None or served.is_removed(dst):
                    continue
                for attempt in range(FILL_RETRIES + 1):
                    try:
                        served.uffd.copy(dst, base + src, PAGE_SIZE)
                        n += 1
                    except UffdError as e:
                        if e.errno in PEER_GONE or served.uffd.closed:
                            return n
                        if (e.errno == errno.EAGAIN and pending is not None and
                                attempt < FILL_RETRIES):
                            if not pending(served, attempt + 1):
                                return n
                            continue
                        if e.errno != errno.EEXIST:
                            raise
                    break
        return n

    def address(self, offset):
        return None

    def close(self):
        self.buf, self.index = None, {}


# -- working-set files (--record / --prefetch) and prefetch runs ----------------------------------

WORKING_SET_MAGIC = "# uffdtool working-set v"          # + version: v1 (wave 1), v2
WORKING_SET_END = "# end pages="


def write_working_set(path, pages, page_size, key="offset", pid=None):
    """Write a working set (v2): a header line, one hex number per line in first-fault order,
    and an end line with the count, atomically (a temporary file beside ``path``, fsync'd, then
    renamed over it: a full disk leaves the old file or none, never a cut one).

    Format (text)::

        # uffdtool working-set v2 page_size=4096 key=offset [pid=N]
        0x1000
        0x0
        ...
        # end pages=2

    ``key=offset``: offsets into the source (serve-file; they survive a restore at new host
    addresses).  ``key=address``: virtual addresses (watch, where there is no source).
    Raises TargetError (nothing written) when the file cannot be written."""
    head = "%s2 page_size=%d key=%s%s\n" % (WORKING_SET_MAGIC, page_size, key,
                                           "" if pid is None else " pid=%d" % pid)
    text = (head + "".join("0x%x\n" % p for p in pages) +
            "%s%d\n" % (WORKING_SET_END, len(pages))).encode()
    d, base = os.path.split(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix="." + base + ".", suffix=".tmp")
        try:
            try:
                os.fchmod(fd, os.stat(path).st_mode & 0o777)      # keep the file's mode
            except OSError:
                os.fchmod(fd, 0o644)
            view = memoryview(text)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise TargetError("cannot write working set %s: %s (nothing written)"
                          % (path, e.strerror or e))
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def parse_working_set(path):
    """Parse a working-set file (v1 or v2): returns (meta, pages, problem): the header's
    ``key=value`` fields (``key``, ``page_size`` as an int, ``pid``...), the numbers in order,
    and what is wrong with a v2 file's ``# end pages=N`` line (missing, another count, data
    after it: a file cut short by a full disk or a crash), or None.  UsageError if it is not a
    working-set file at all."""
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise UsageError("cannot read working set %s: %s" % (path, e.strerror))
    except UnicodeDecodeError:
        raise UsageError("%s is not a uffdtool working-set file (binary data)" % path)
    head = lines[0].split()
    version = None
    if len(head) > 3 and lines[0].startswith(WORKING_SET_MAGIC):
        version = head[3][1:]
    if version not in ("1", "2"):
        raise UsageError("%s is not a uffdtool working-set file (no '%s1' or '%s2' header)"
                         % (path, WORKING_SET_MAGIC, WORKING_SET_MAGIC))
    meta = dict(w.split("=", 1) for w in head if "=" in w)
    pages, end, problem = [], None, None
    for no, line in enumerate(lines[1:], 2):
        line = line.strip()
        if end is not None and line and problem is None:
            problem = "%s:%d: data after the '%s' line" % (path, no, WORKING_SET_END)
        if line.startswith(WORKING_SET_END):
            end = line[len(WORKING_SET_END):]
            continue
        if not line or line.startswith("#"):
            continue
        try:
            pages.append(int(line, 0))
        except ValueError:
            raise UsageError("%s:%d: not a number: %r" % (path, no, line[:40]))
    if version == "2" and problem is None:
        if end is None:
            problem = ("%s: truncated working set: no '%sN' line, the file is cut short (%d "
                       "pages read)" % (path, WORKING_SET_END, len(pages)))
        elif end != str(len(pages)):
            problem = "%s: working set says pages=%s but holds %d" % (path, end, len(pages))
    try:
        meta["page_size"] = int(meta.get("page_size", PAGE_SIZE))
    except ValueError:
        raise UsageError("%s: bad page_size in header" % path)
    meta.setdefault("key", "offset")
    return meta, pages, problem


def read_working_set(path):
    """Read a working-set file (v1 or v2) for ``--prefetch``: returns (key, page_size,
    [numbers]).  UsageError if malformed, also when a v2 file's ``# end pages=N`` line is
    missing or wrong (``parse_working_set``): a file cut short is refused."""
    meta, pages, problem = parse_working_set(path)
    if problem:
        raise UsageError(problem)
    return meta["key"], meta["page_size"], pages


def write_working_sets(path, sets, page_size, key="address"):
    """Write per-process working sets (``{pid: [pages]}``, in first-fault order of the
    processes): the first process's to ``path``, each other's to ``path.PID`` beside it (an
    address means something only in its own address space).  Returns the paths written."""
    if not isinstance(sets, dict):
        write_working_set(path, sets, page_size, key)
        return [path]
    items = list(sets.items()) or [(None, [])]
    out = []
    for i, (pid, pages) in enumerate(items):
        p = path if i == 0 else "%s.%s" % (path, pid)
        write_working_set(p, pages, page_size, key, pid)
        out.append(p)
    return out


#: largest fill issued by a prefetch step (one ioctl; demand faults are served between steps)
PREFETCH_RUN = 2 << 20


def coalesce_pages(offsets, rec_page_size, page_size, max_run=PREFETCH_RUN):
    """Sorted, disjoint ``[start, end)`` runs covering the pages at ``offsets`` (each
    ``rec_page_size`` long), aligned to ``page_size``; adjacent pages merge, runs are cut at
    ``max_run`` bytes (at least one page)."""
    max_run = max(page_size, max_run - max_run % page_size)
    spans = sorted(set((o - o % page_size, o + rec_page_size) for o in offsets if o >= 0))
    merged = []
    for a, b in spans:
        b = -(-b // page_size) * page_size
        if merged and a <= merged[-1][1]:
            if b > merged[-1][1]:
                merged[-1][1] = b
        else:
            merged.append([a, b])
    runs = []
    for a, b in merged:
        while a < b:
            runs.append((a, min(b, a + max_run)))
            a += max_run
    return runs


def split_runs(runs, bounds):
    """Cut ``[start, end)`` runs at every offset in ``bounds`` (the region boundaries)."""
    bounds = sorted(set(bounds))
    out = []
    for a, b in runs:
        i = bisect.bisect_right(bounds, a)
        while i < len(bounds) and bounds[i] < b:
            out.append((a, bounds[i]))
            a = bounds[i]
            i += 1
        out.append((a, b))
    return out


class Prefetcher:
    """Installs a recorded working set (source offsets) in large runs while the Handler idles.

    ``runs``: sorted ``[start, end)`` source-offset runs (``coalesce_pages``).  ``step()`` fills
    one run (one ioctl of at most PREFETCH_RUN bytes, skipping pages that are already present)
    and returns True while work remains; the Handler calls it only when no message is pending,
    so demand faults always come first.  ``claim(off, limit)`` lets a demand fault inside a
    pending run take the rest of that run at once (from the faulting page to the run's end),
    so a toucher that outruns the background steps still gets large fills."""

    def __init__(self, runs):
        self.runs = list(runs)                 # pending, sorted by start
        self.starts = [a for a, b in self.runs]

    def __bool__(self):
        return bool(self.runs)

    def claim(self, off, limit):
        """If ``off`` lies in a pending run: remove ``[off, min(run end, off+limit))`` from it and
        return that end; else None."""
        i = bisect.bisect_right(self.starts, off) - 1
        if i < 0:
            return None
        a, b = self.runs[i]
        if off >= b:
            return None
        e = min(b, off + limit)
        keep = [(x, y) for x, y in ((a, off), (e, b)) if y > x]
        self.runs[i:i + 1] = keep
        self.starts[i:i + 1] = [x for x, y in keep]
        return e

    def pop(self):
        """The next pending run, removed from the list (None when done)."""
        if not self.runs:
            return None
        self.starts.pop(0)
        return self.runs.pop(0)

    def push_front(self, run):
        """Put back (the rest of) a run that could not be completed now."""
        self.runs.insert(0, run)
        self.starts.insert(0, run[0])


# -- a URL: Range GETs with a local cache (README "Restoring from a URL") -------------------------

#: --chunk default: bytes per Range GET (the choice is measured in README "Restoring from a URL")
URL_CHUNK = 2 << 20
URL_FETCHERS, URL_RETRIES, URL_TIMEOUT = 4, 3, 10.0
#: fetch priorities, most urgent first: a waiting fault, sequential readahead, --prefetch, --fill
PRIO_DEMAND, PRIO_READAHEAD, PRIO_PREFETCH, PRIO_FILL = 0, 1, 2, 3
#: chunk states in ``UrlSource.have``: absent; present and used; present from readahead, not used
#: yet (its first use queues the next chunks); present in the cache, not counted as a hit yet
_ABSENT, _SEEN, _AHEAD, _CACHED = 0, 1, 2, 3
#: chunks' worth of memory kept for fetching into again (``UrlSource._to_pool``)
URL_POOL_CHUNKS = 16
#: most bytes one background request (--prefetch, --fill) asks for: consecutive queued chunks
URL_RUN = 16 << 20
#: weight of a new sample in the estimates of time to a response and transfer rate
URL_EWMA = 0.2
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class _Run:
    """A request's progress (UrlSource._extend, _soon): the chunk its response starts at, when
    it was sent and when the response came (perf_counter; None: not yet), and the bytes of the
    response read so far."""
    __slots__ = ("start", "sent", "first", "got")

    def __init__(self, start):
        self.start = start
        self.sent = self.first = None
        self.got = 0


class FetchError(TargetError):
    """A Range GET failed for good (exit 1: a serving failure).  ``fatal``: the object itself is
    wrong (changed, gone, a wrong Content-Range), so every later fetch would fail too."""

    def __init__(self, msg, fatal=False):
        super().__init__(msg)
        self.fatal = fatal


class _Transient(Exception):
    """A fetch failure worth retrying (network error, timeout, HTTP 5xx/408/429)."""


def redact_url(url):
    """``url`` without query string, fragment and user info: the only form logs and errors
    show (a presigned URL's signature is its query string)."""
    import urllib.parse
    p = urllib.parse.urlsplit(url)
    host = p.hostname or ""
    if ":" in host:
        host = "[%s]" % host
    if p.port:
        host += ":%d" % p.port
    return "%s://%s%s" % (p.scheme, host, p.path or "/")


def redact_argv(argv):
    """``argv`` for the ``start`` record: ``--url`` values redacted, ``--header`` values hidden
    (also in the ``--opt=value`` form and argparse's abbreviations)."""
    out, hide = [], None
    for a in argv:
        if hide is not None:
            out.append(hide(a))
            hide = None
            continue
        name, eq, value = a.partition("=")
        kind = (redact_url if len(name) > 2 and "--url".startswith(name) else
                _hide_header if len(name) > 3 and "--header".startswith(name) else None)
        if kind is None:
            out.append(a)
        elif eq:
            out.append(name + "=" + kind(value))
        else:
            out.append(a)
            hide = kind
    return out


def _hide_header(text):
    return text.partition(":")[0] + ": ***"


def parse_header(text):
    """``'NAME: VALUE'`` of --header -> (name, value).  Errors never show the value (a token)."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _TOKEN.match(name):
        raise UsageError("--header needs 'NAME: VALUE' with a valid header NAME")
    if any(ch in value for ch in "\r\n\0"):
        raise UsageError("--header %s: the value contains a line break or NUL" % name)
    if name.lower() in ("range", "if-match", "if-range", "if-unmodified-since", "host"):
        raise UsageError("--header %s: uffdtool sets that header itself" % name)
    return name, value


@functools.lru_cache(maxsize=None)
def _max_map_count():
    try:
        return int(read_sysfs("/proc/sys/vm/max_map_count", "65530"))
    except ValueError:
        return 65530


def _boot_id():
    return read_sysfs("/proc/sys/kernel/random/boot_id", "unknown")


class UrlSource:
    """Fills from an object on an HTTP(S) server (any object store: a presigned URL is a plain
    GET) with Range GETs of ``chunk`` bytes over keep-alive connections.

    The chunks land in one local mapping of the object's size (``base``, like FileSource's),
    from which UFFDIO_COPY copies: anonymous memory, or with ``cache`` a MAP_SHARED mapping of
    the cache entry's sparse file, where each chunk fetched now gets anonymous memory over it
    and is written to the file behind the serving (``_writer``).  ``ensure(off, n)`` makes the
    chunk holding ``off`` present (waiting for its fetch) before a fill; ``fetchers`` threads
    fetch, one of them only for waiting faults, so background work (readahead, ``plan`` of a
    --prefetch list, ``ready`` for --fill idle) never delays a fault by more than the fetch it
    waits for.

    The object is pinned at start (strong ETag, else Last-Modified, plus the size from the
    first ranged GET's Content-Range): every request carries If-Match/If-Range (or
    If-Unmodified-Since/If-Range), so a changed object answers 412 or 200, which is a serving
    failure (FetchError), never a page of the new object."""
    kind = "copy"

    def __init__(self, url, cache=None, chunk=URL_CHUNK, fetchers=URL_FETCHERS,
                 retries=URL_RETRIES, timeout=URL_TIMEOUT, headers=(), cacert=None, log=None):
        import urllib.parse
        if any(ord(ch) <= 32 or ord(ch) == 127 for ch in url):
            raise UsageError("--url: the URL contains spaces or control characters")
        p = urllib.parse.urlsplit(url)
        if p.scheme not in ("http", "https") or not p.hostname:
            raise UsageError("--url needs an http:// or https:// URL with a host (got %s)"
                             % (p.scheme + "://..." if p.scheme else "no scheme"))
        try:
            self.port = p.port or (443 if p.scheme == "https" else 80)
        except ValueError:
            raise UsageError("--url: bad port in %s://%s" % (p.scheme, p.hostname))
        if chunk < PAGE_SIZE or chunk & (chunk - 1):
            raise UsageError("--chunk must be a power of two of at least %d bytes" % PAGE_SIZE)
        if fetchers < 1 or retries < 0:
            raise UsageError("--fetchers must be at least 1 and --retries at least 0")
        self.display = redact_url(url)
        self.host, self.https = p.hostname, p.scheme == "https"
        self.target = (p.path or "/") + ("?" + p.query if p.query else "")
        self.user_headers = dict(parse_header(h) for h in headers)
        self.retries, self.timeout, self.nfetchers = retries, timeout, fetchers
        self.log = log or EventLog(None, human=None)
        self.ctx = self._ssl_context(cacert) if self.https else None
        self.pin = {}
        self.etag = self.last_modified = None
        self.chunk = chunk
        self.waker = None                 # the Handler's wake(): a background fetch completed
        self._handler = None              # the Handler serving from us (its regions)
        self.page_size = PAGE_SIZE
        self.failed = None                # a fatal FetchError: every later need raises it
        self.base = self._map = 0
        self._data_fd = self._map_fd = self._lock_fd = self._users_fd = -1
        self.cache_dir = None
        self.caching = False              # chunks are written to the cache directory
        self._shared = False              # the mapping is the cache file's
        self._cv = threading.Condition()
        self._queue, self._queued, self._pending, self._errors = [], {}, {}, {}
        self._running = {}                # chunks being read: chunk -> its fetcher's token
        self._later = {}                  # chunks a background request reads later: its _Run
        self._ttfb, self._rate = 0.01, 100e6   # estimates: s to a response, bytes/s after it
        self._skip = None                 # where the bytes of a chunk so fetched are dropped
        self._requests = 0                # requests in flight (a run of chunks is one)
        self._to_write = []               # fetched chunks the writer has still to persist
        self._unwritten = set()           # ... and those it is writing (their memory stays)
        self._last = -1                   # the chunk of the last fill (``ensure``)
        self._step = 1                    # readahead direction: 1 forwards, -1 backwards
        self._complete = []               # chunks all installed, kept until written
        self._pool = []                   # memory of given-back chunks, to fetch into again
        self._seq = 0
        self._threads = []
        self._closing = False
        self._lat = array.array("f")     # fetch latencies (µs)
        self.counts = {"fetches": 0, "fetched_bytes": 0, "fetch_retries": 0, "cache_hits": 0,
                       "cache_misses": 0, "fetch_waits": 0, "fetch_wait_s": 0.0,
                       "released_chunks": 0}
        first = self._probe(1 if cache else chunk)
        self.nchunks = -(-self.size // self.chunk)
        self._maplen = -(-self.size // PAGE_SIZE) * PAGE_SIZE
        self.have = bytearray(self.nchunks)
        if cache:
            self._open_cache(cache)
        self._anon = bytearray(self.nchunks)   # chunks where anonymous memory covers the file
        self._given = bytearray(self.nchunks)  # chunks installed, then given back (``_release``)
        if not self._map:
            self._map = mmap_anon(self._maplen, PROT_READ | PROT_WRITE,
                                  MAP_PRIVATE | MAP_NORESERVE)
        self.base = self._map
        if len(first) == min(self.chunk, self.size) and not self.have[0]:
            self._store(0, first, PRIO_DEMAND)
        self._start_fetchers()

    # -- setup ----------------------------------------------------------------------------------
    def _ssl_context(self, cacert):
        import ssl
        try:
            return ssl.create_default_context(cafile=cacert)
        except (OSError, ssl.SSLError) as e:
            raise UsageError("--cacert %s: %s" % (cacert, getattr(e, "strerror", None) or e))

    def _connect(self):
        import http.client
        if self.https:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _request(self, conn, a, b, pin=True):
        """Send ``GET`` of bytes ``[a, b)`` on ``conn[0]`` (connecting if needed); returns the
        response with its headers read.  Network failures raise _Transient."""
        import http.client
        hdrs = {"Range": "bytes=%d-%d" % (a, b - 1)}
        if pin:
            hdrs.update(self.pin)
        hdrs.update(self.user_headers)
        try:
            if conn[0] is None:
                conn[0] = self._connect()
            conn[0].request("GET", self.target, headers=hdrs)
            return conn[0].getresponse()
        except (OSError, http.client.HTTPException) as e:
            self._drop(conn)
            raise _Transient(self._net_reason(e))

    @staticmethod
    def _net_reason(e):
        import ssl
        if isinstance(e, ssl.SSLCertVerificationError):
            raise FetchError("TLS: %s (a private CA: give --cacert FILE)"
                             % (e.verify_message or "certificate verify failed"), fatal=True)
        if isinstance(e, TimeoutError):
            return "timed out"
        if isinstance(e, ssl.SSLError):
            return "TLS: %s" % (e.reason or type(e).__name__)
        if isinstance(e, OSError):
            return e.strerror or type(e).__name__
        return type(e).__name__     # an HTTPException: its text may quote the request

    @staticmethod
    def _drop(conn):
        if conn[0] is not None:
            conn[0].close()
            conn[0] = None

    def _with_retries(self, what, fn):
        """``fn()`` with up to ``retries`` retries of a _Transient (backoff 0.1 s doubling, at
        most 2 s, each counted in ``fetch_retries``); then FetchError."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except _Transient as e:
                reason = str(e)
                if attempt == self.retries:
                    break
                with self._cv:
                    self.counts["fetch_retries"] += 1
                time.sleep(min(2.0, 0.1 * (1 << attempt)))
        raise FetchError("GET %s %s: %s (after %d retries)"
                         % (self.display, what, reason, self.retries))

    def _status(self, resp):
        return "HTTP %d %s" % (resp.status, resp.reason)

    def _probe(self, length):
        """The first ranged GET: the object's size from Content-Range (a presigned GET URL
        allows no HEAD), its ETag/Last-Modified to pin, and its first bytes."""
        conn = [None]

        def once():
            resp = self._request(conn, 0, length, pin=False)
            st = resp.status
            if st in (500, 502, 503, 504, 408, 429) or st > 504:
                self._drop(conn)
                raise _Transient(self._status(resp))
            return resp
        resp = self._with_retries("bytes=0-%d" % (length - 1), once)
        try:
            where = "%s: %s" % (self.display, self._status(resp))
            if resp.status == 200:
                raise UsageError("%s: the server does not support Range requests (HTTP 200 "
                                 "with the whole object)" % self.display)
            if resp.status in (401, 403):
                raise NotPermitted(where + " (the URL's signature or the --header token is "
                                           "refused or expired?)")
            if resp.status == 416 and (resp.getheader("Content-Range") or "").endswith("/0"):
                raise UsageError("%s: the object is empty" % self.display)
            if resp.status != 206:
                raise UsageError(where)
            m = re.match(r"^bytes 0-(\d+)/(\d+)$", resp.getheader("Content-Range") or "")
            if not m or int(m.group(1)) + 1 != min(length, int(m.group(2))):
                raise FetchError("%s: wrong Content-Range %r for bytes=0-%d"
                                 % (self.display, resp.getheader("Content-Range"), length - 1))
            self.size = int(m.group(2))
            self.etag = resp.getheader("ETag")
            self.last_modified = resp.getheader("Last-Modified")
            if self.etag and not self.etag.startswith("W/"):
                self.pin = {"If-Match": self.etag, "If-Range": self.etag}
            elif self.last_modified:
                self.pin = {"If-Unmodified-Since": self.last_modified,
                            "If-Range": self.last_modified}
            else:
                self.log.emit("warning", message="%s has no ETag or Last-Modified: a change of "
                              "the object during the restore cannot be detected" % self.display)
            try:
                return resp.read()
            except (OSError, Exception):
                return b""
        finally:
            self._drop(conn)

    @property
    def validator(self):
        return self.etag or self.last_modified or ""

    # -- the cache directory --------------------------------------------------------------------
    def _open_cache(self, root):
        """Open (or create) the cache entry ``root/<key>``: ``data`` (sparse, the object's
        bytes), ``map`` (one byte per chunk, set only once the chunk is completely written),
        ``meta.json``, ``state``, ``lock`` (held exclusively to set up or close the entry) and
        ``users`` (held shared by every process using it).  Any failure: serve without a
        cache, said once."""
        import hashlib
        key = hashlib.sha256(("%s\n%d\n%s" % (self.display, self.size, self.validator))
                             .encode()).hexdigest()[:32]
        d = os.path.join(root, key)
        try:
            os.makedirs(d, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
            self._lock_fd = os.open(os.path.join(d, "lock"), flags, 0o600)
            self._users_fd = os.open(os.path.join(d, "users"), flags, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                self._init_entry(d)
                fcntl.flock(self._users_fd, fcntl.LOCK_SH)   # held while we use the entry
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._map = mmap_anon(self._maplen, PROT_READ, MAP_SHARED, fd=self._data_fd)
        except OSError as e:
            self._cache_failed(root, e)
            self._close_fds()
            return
        self.cache_dir = d
        self.caching = self._shared = True
        present = os.pread(self._map_fd, self.nchunks, 0)
        for c, v in enumerate(present):
            if v:
                self.have[c] = _CACHED
        self._populate_present()

    def _init_entry(self, d):
        """Under the exclusive lock: meta (the chunk size of an existing entry wins), data and
        map sized, and a map written before a host crash (state dirty, another boot) reset:
        the page cache may have lost data whose map byte reached the disk."""
        path = os.path.join(d, "meta.json")
        try:
            with open(path) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            meta = None
        if not meta or meta.get("size") != self.size or not isinstance(meta.get("chunk"), int):
            meta = {"url": self.display, "size": self.size, "validator": self.validator,
                    "chunk": self.chunk}
            with open(path + ".tmp", "w") as f:
                json.dump(meta, f)
            os.rename(path + ".tmp", path)
            stale = True
        else:
            stale = False
        if meta["chunk"] != self.chunk:
            self.log.emit("warning", message="the cache entry uses --chunk %d: using that"
                          % meta["chunk"])
            self.chunk = meta["chunk"]
            self.nchunks = -(-self.size // self.chunk)
            self.have = bytearray(self.nchunks)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        self._data_fd = os.open(os.path.join(d, "data"), flags, 0o600)
        self._map_fd = os.open(os.path.join(d, "map"), flags, 0o600)
        spath = os.path.join(d, "state")
        try:
            with open(spath) as f:
                boot, dirty = f.read().split()
        except (OSError, ValueError):
            boot, dirty = "", "1"
        if stale or (dirty == "1" and boot != _boot_id()):
            os.ftruncate(self._map_fd, 0)
        if os.fstat(self._data_fd).st_size != self.size:
            os.ftruncate(self._data_fd, self.size)
        os.ftruncate(self._map_fd, self.nchunks)
        with open(spath, "w") as f:
            f.write("%s 1\n" % _boot_id())

    def _cache_failed(self, root, e):
        """Serve without the cache from now on, and say so once.  The fds stay open until
        ``close`` (another fetcher may be using them)."""
        with self._cv:
            warn, self.caching = self.caching or self.cache_dir is None, False
        if warn:
            self.log.emit("warning", message="cache %s unusable (%s): serving without a cache"
                          % (root, e.strerror or e))

    def _close_fds(self):
        for name in ("_data_fd", "_map_fd", "_lock_fd", "_users_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def _populate_present(self):
        """Map the cached chunks now (as FileSource's MAP_POPULATE does), not at fault time."""
        c = 0
        while c < self.nchunks:
            if not self.have[c]:
                c += 1
                continue
            e = c
            while e < self.nchunks and self.have[e]:
                e += 1
            self._populate(c * self.chunk, min(self._maplen, e * self.chunk) - c * self.chunk)
            c = e

    def _populate(self, off, n):
        try:
            madvise(self._map + off, n, MADV_POPULATE_READ)
        except OSError:
            pass                              # only an optimisation (kernels < 5.14)

    # -- storing chunks -------------------------------------------------------------------------
    def _span(self, c):
        a = c * self.chunk
        return a, min(self.size, a + self.chunk)

    def _into(self, c):
        """Writable memory for chunk ``c`` in the mapping.  Where the mapping is the cache file,
        anonymous memory is put over the chunk first: the fetch lands there directly (one copy,
        from the socket) and is written to the cache behind the serving (``_writer``), so a
        slow disk does not slow a cold restore."""
        a, n = self._page_span(c)
        if not self._from_pool(a, n):
            if self._shared and not self._anon[c]:
                mmap_anon(n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED,
                          addr=self._map + a)
            try:                                # one call instead of a page fault per page
                madvise(self._map + a, n, MADV_POPULATE_WRITE)
            except OSError:
                pass
        if self._shared:
            self._anon[c] = 1
        return (ctypes.c_char * (self._span(c)[1] - a)).from_address(self._map + a)

    def _from_cache(self, c):
        """Chunk ``c`` is complete in the cache file (another process wrote it): map it."""
        a, n = self._page_span(c)
        if self._anon[c]:                       # a failed fetch of ours left anonymous memory
            mmap_anon(n, PROT_READ, MAP_SHARED | MAP_FIXED, fd=self._data_fd, offset=a,
                      addr=self._map + a)
            self._anon[c] = 0
        self._populate(a, n)
        self.have[c] = _CACHED

    def _store(self, c, buf, prio):
        """Chunk ``c`` has arrived (``buf``: bytes still to be copied into place, or None):
        mark it present and hand it to the cache writer."""
        if buf is not None:
            ctypes.memmove(self._into(c), bytes(buf), len(buf))
        self.have[c] = _AHEAD if prio == PRIO_READAHEAD else _SEEN
        if self.caching:
            with self._cv:
                self._unwritten.add(c)
                self._to_write.append(c)
                self._cv.notify_all()
            return True
        return False

    def _writer(self):
        """Writes fetched chunks to the cache file as they come, then sets their map byte (a
        chunk is visible to other processes only once completely written), then releases the
        chunk's lock.  As they come: a chunk's memory can be given back only once it is
        written, and another process may be waiting for its lock.  A full or failing disk: serve
        without the cache from then on (said once)."""
        while True:
            with self._cv:
                while not self._to_write:
                    if self._closing:
                        return
                    self._cv.wait()
                c = self._to_write.pop(0)
            try:
                if self.caching:
                    self._write_chunk(c)
                    os.pwrite(self._map_fd, b"\x01", c)
            except OSError as e:
                self._cache_failed(os.path.dirname(self.cache_dir), e)
            finally:
                self._unlock_chunk(c)
                with self._cv:
                    self._unwritten.discard(c)

    def _write_chunk(self, c):
        """Write chunk ``c`` from the mapping to the data file, through the page cache: the
        next restore on the host, and every other process using the entry, read it from
        there (with O_DIRECT the first warm restore read it from the disk, at a third of the
        speed)."""
        a, b = self._span(c)
        view = memoryview((ctypes.c_char * (b - a)).from_address(self._map + a)).cast("B")
        done = 0
        while done < b - a:
            done += os.pwrite(self._data_fd, view[done:], a + done)

    # -- fetchers -------------------------------------------------------------------------------
    def _start_fetchers(self):
        if self.caching:
            t = threading.Thread(target=self._writer, name="uffdtool-cache-writer", daemon=True)
            t.start()
            self._threads.append(t)
        for i in range(self.nfetchers):
            t = threading.Thread(target=self._fetcher, args=(i == 0 and self.nfetchers > 1,),
                                 name="uffdtool-fetch-%d" % i, daemon=True)
            t.start()
            self._threads.append(t)

    def _take(self, reserved, me):
        """What this fetcher (token ``me``) fetches next: the most urgent queued chunk it may
        take (the reserved one: demand only) with the chunks ``_extend`` adds, as (prio, first
        chunk, count, the request's _Run); None: nothing for it."""
        from heapq import heappop
        q = self._queue
        while q:
            prio, _, c = q[0]
            if self._queued.get(c) != prio:    # stale: taken at a higher priority, or done
                heappop(q)
                continue
            if reserved and prio != PRIO_DEMAND:
                return None
            heappop(q)
            del self._queued[c]
            self._later.pop(c, None)           # a demand for a chunk of another's run
            lo, n, run = self._extend(c, prio)
            if n == 1:
                self._running[c] = me
            return prio, lo, n, run
        return None

    def _extend(self, c, prio):
        """The chunks one request fetches for chunk ``c``: background work (--prefetch, --fill)
        takes the queued background chunks that follow ``c`` too, then those before it, up to
        URL_RUN bytes, because an object store's time to the first byte is most of a chunk's
        fetch (README "Restoring from a URL": fewer, larger requests).  Such a request's
        chunks wait in ``_later``: a fault that needs one before the request reaches it has it
        fetched on its own (``_submit``), and the request then skips its bytes.  Demand and
        readahead: ``c`` alone.  Returns (first chunk, count, the request's _Run)."""
        lo, hi = c, c + 1
        if prio >= PRIO_PREFETCH:
            most = max(1, URL_RUN // self.chunk)
            while hi - lo < most and hi < self.nchunks and self._background(hi):
                hi += 1
            while hi - lo < most and lo > 0 and self._background(lo - 1):
                lo -= 1
        run = _Run(lo)
        if hi - lo > 1:
            for k in range(lo, hi):
                self._queued.pop(k, None)
                self._later[k] = run
        return lo, hi - lo, run

    def _background(self, c):
        """Chunk ``c`` is missing and queued for background work only."""
        return not self.have[c] and self._queued.get(c, -1) >= PRIO_PREFETCH

    def _soon(self, run, c):
        """Whether the request ``run``, under way, brings chunk ``c`` no later than a request of
        its own would: the time to a response and the rate after it are estimated from the
        fetches so far, the rate of a response that is coming from what it has brought."""
        if run.sent is None:
            return False
        now = time.perf_counter()
        rate = self._rate
        if run.first is not None and run.got:       # (over at least a response's time)
            rate = run.got / max(now - run.first, self._ttfb, 1e-3)
        head = 0.0 if run.first else max(0.0, self._ttfb - (now - run.sent))
        need = (c - run.start) * self.chunk - run.got       # its bytes to come before c
        return head + need / rate <= self._ttfb

    def _fetcher(self, reserved):
        conn = [None]
        while True:
            with self._cv:
                item = None
                while not self._closing:
                    item = self._take(reserved, conn)
                    if item is not None:
                        break
                    self._cv.wait()
                if item is None:
                    self._drop(conn)
                    return
                prio, c, n, progress = item
            run = list(range(c, c + n))          # chunks of the request not done yet
            err = None
            try:
                self._fetch_run(run, conn, prio, progress)
            except FetchError as e:
                err = e
            except Exception as e:             # never leave a waiter waiting
                err = FetchError("fetching %s: %s" % (self.display, type(e).__name__))
            for k in run:
                if self._claim(k, conn):
                    self._done(k, err)

    def _claim(self, c, me):
        """Whether chunk ``c`` of fetcher ``me``'s request is still its to read (not fetched
        on its own meanwhile, for a fault: ``_extend``, nor mapped from the cache, where
        another process wrote it); if so, it is being read now."""
        ev = None
        with self._cv:
            if self._later.pop(c, None) is not None:
                self._queued.pop(c, None)          # a demand queued for it: stale now
                if self.have[c]:
                    ev = self._pending.pop(c, None)
                else:
                    self._running[c] = me
            mine = self._running.get(c) is me
        if ev is not None:
            ev.set()
        return mine

    def _done(self, c, err=None):
        """Chunk ``c``'s fetch has ended (stored, or failed with ``err``): wake its waiters."""
        with self._cv:
            if err is not None:
                self._errors[c] = err
                if err.fatal and self.failed is None:
                    self.failed = err
            ev = self._pending.pop(c, None)
            self._running.pop(c, None)
            self._cv.notify_all()
        if ev is not None:
            ev.set()
        if self.waker is not None:
            self.waker()

    def _requeue(self, chunks, prio):
        """Chunks of a run that this request will not fetch after all: back in the queue."""
        with self._cv:
            for k in chunks:
                self._later.pop(k, None)
                if not self.have[k] and k not in self._queued and k not in self._running:
                    self._push(k, prio)
            self._cv.notify_all()

    def _fetch_run(self, run, conn, prio, progress):
        """Fetch the consecutive chunks ``run`` with one Range GET (retried from the first chunk
        not in yet), each stored and its waiters woken as soon as its bytes are in; ``run``
        keeps the chunks not done.  With the cache, the first chunk waits for another process
        fetching it; a later one that another process holds or has written ends the run there
        (back to the queue)."""
        c = run[0]
        if self.have[c]:
            return self._cut(run, 1, prio)
        locked = set()                             # chunk locks held (the writer takes some)
        try:
            if self.caching and not self._lock_run(run, locked, prio):
                return
            a, b = self._span(c)[0], self._span(run[-1])[1]
            t = time.perf_counter()
            with self._cv:
                self._requests += 1
            try:
                self._with_retries("bytes=%d-%d" % (a, b - 1),
                                   lambda: self._get_run(conn, run, prio, locked, progress))
            finally:
                with self._cv:
                    self._requests -= 1
            us = (time.perf_counter() - t) * 1e6
            with self._cv:
                if len(self._lat) >= 1 << 16:     # bounded: keep every other sample
                    self._lat = self._lat[::2]
                self._lat.append(us)
                self.counts["fetches"] += 1
        finally:
            for k in locked:
                self._unlock_chunk(k)

    def _lock_run(self, run, locked, prio):
        """Take the cache's chunk locks for ``run`` (see _fetch_run); False: its first chunk is
        in the cache now (another process fetched it meanwhile), mapped from there."""
        if self._lock_chunk(run[0]):
            locked.add(run[0])
            if os.pread(self._map_fd, 1, run[0]) == b"\x01":
                self._from_cache(run[0])
                self._cut(run, 1, prio)
                return False
        for i in range(1, len(run)):
            k = run[i]
            if not self._lock_chunk(k, wait=False):
                self._cut(run, i, prio)
                break
            if os.pread(self._map_fd, 1, k) == b"\x01":
                self._unlock_chunk(k)
                self._cut(run, i, prio)
                break
            locked.add(k)
        return True

    def _cut(self, run, i, prio):
        """Fetch only ``run[:i]``: the rest goes back to the queue."""
        self._requeue(run[i:], prio)
        del run[i:]

    def _page_span(self, c):
        a, b = self._span(c)
        return a, -(-(b - a) // PAGE_SIZE) * PAGE_SIZE

    def _lock_chunk(self, c, wait=True):
        """A record lock on byte ``c`` of the map: processes sharing the cache fetch each chunk
        once (the kernel may call a lock wait between two processes EDEADLK although each
        holder only fetches: wait a little and try again).  ``wait=False``: only if free."""
        for _ in range(1000):
            try:
                fcntl.lockf(self._map_fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB), 1,
                            c, 0)
                return True
            except OSError as e:
                if not wait or e.errno not in (errno.EDEADLK, errno.EINTR):
                    return False
                time.sleep(0.001)
        return False

    def _unlock_chunk(self, c):
        try:
            fcntl.lockf(self._map_fd, fcntl.LOCK_UN, 1, c, 0)
        except OSError:
            pass

    def _get_run(self, conn, run, prio, locked, progress):
        """One ranged GET of the chunks ``run``, each read into its place and stored as it
        comes (then dropped from ``run``); checks status, Content-Range, size and validator."""
        a, b = self._span(run[0])[0], self._span(run[-1])[1]
        progress.sent, progress.first = time.perf_counter(), None
        progress.start, progress.got = run[0], 0
        resp = self._request(conn, a, b)
        progress.first = time.perf_counter()
        self._ttfb += (progress.first - progress.sent - self._ttfb) * URL_EWMA
        st = resp.status
        if st != 206:
            self._drop(conn)
            status = self._status(resp)
            if st in (500, 502, 503, 504, 408, 429) or st > 504:
                raise _Transient(status)
            if st in (200, 412):
                raise FetchError("%s changed during the restore (%s to a request pinned to %s)"
                                 % (self.display, status, self.validator or "its size"),
                                 fatal=True)
            raise FetchError("GET %s bytes=%d-%d: %s" % (self.display, a, b - 1, status),
                             fatal=st in (404, 410, 416))
        want = "bytes %d-%d/%d" % (a, b - 1, self.size)
        got = resp.getheader("Content-Range")
        etag, lm = resp.getheader("ETag"), resp.getheader("Last-Modified")
        if got != want or resp.length != b - a:
            self._drop(conn)
            raise FetchError("%s: wrong Content-Range %r (Content-Length %s) for bytes=%d-%d"
                             % (self.display, got, resp.length, a, b - 1), fatal=True)
        if (self.etag and etag and etag != self.etag) or (
                not self.etag and self.last_modified and lm and lm != self.last_modified):
            self._drop(conn)
            raise FetchError("%s changed during the restore (validator %s, pinned %s)"
                             % (self.display, etag or lm, self.validator), fatal=True)
        while run:
            c = run[0]
            span = self._span(c)
            mine = self._claim(c, conn)            # else fetched on its own for a fault: skip
            t = time.perf_counter()
            self._read_body(conn, resp, self._into(c) if mine else self._scratch(), span,
                            progress)
            self._rate += ((span[1] - span[0]) / max(time.perf_counter() - t, 1e-6) -
                           self._rate) * URL_EWMA
            with self._cv:
                self.counts["fetched_bytes"] += span[1] - span[0]
            run.pop(0)
            if not mine:
                locked.discard(c)                  # (the fetch that has it unlocks it)
                continue
            if self._store(c, None, prio):
                locked.discard(c)                  # the writer unlocks once written
            with self._cv:
                self.counts["cache_misses"] += 1
            self._done(c)

    def _scratch(self):
        """A chunk's worth of memory for bytes to skip (the fetchers share it: what lands
        there is never read)."""
        if self._skip is None:
            self._skip = bytearray(self.chunk)
        return self._skip

    def _read_body(self, conn, resp, into, span, progress):
        """Read bytes ``span`` of the response (``progress``, a _Run) into ``into``."""
        n = span[1] - span[0]
        view = memoryview(into).cast("B")[:n]
        got = 0
        try:
            while got < n:
                k = resp.readinto(view[got:])
                if not k:
                    raise _Transient("connection closed after %d bytes" % progress.got)
                got += k
                progress.got += k
        except (OSError, ValueError) as e:
            self._drop(conn)
            raise _Transient(self._net_reason(e) if isinstance(e, OSError) else "short body")
        except _Transient:
            self._drop(conn)
            raise

    def _submit(self, c, prio):
        """Queue chunk ``c`` at ``prio`` (or raise a queued one to it); returns its Event.
        Caller holds ``_cv``."""
        if self.have[c]:
            return None
        ev = self._pending.get(c)
        if ev is None:
            ev = self._pending[c] = threading.Event()
        if c in self._running:
            return ev                               # in flight: wait for it, no second fetch
        run = self._later.get(c)
        if run is not None and (prio != PRIO_DEMAND or self._soon(run, c)):
            return ev                               # a request under way brings it (sooner)
        old = self._queued.get(c)
        if old is None or prio < old:
            self._push(c, prio)
            self._cv.notify_all()
        return ev

    def _push(self, c, prio):
        """Put chunk ``c`` in the queue at ``prio`` (an entry at another priority goes stale).
        Caller holds ``_cv``."""
        import heapq
        self._queued[c] = prio
        self._seq += 1
        heapq.heappush(self._queue, (prio, self._seq, c))

    def _want(self, c, prio):
        """Ask for chunk ``c`` in the background (no wait)."""
        if self.have[c] or c in self._errors:
            return
        with self._cv:
            if not self.have[c]:
                self._submit(c, prio)

    def _demand(self, c):
        """Wait until chunk ``c`` is present (a fault needs it): FetchError if it cannot be."""
        if self.failed is not None:
            raise self.failed
        err = self._errors.get(c)
        if err is not None:
            raise err
        if self.caching and os.pread(self._map_fd, 1, c) == b"\x01":
            self._from_cache(c)                   # another process has fetched it
            return self._seen(c)
        with self._cv:
            ev = None if self.have[c] else self._submit(c, PRIO_DEMAND)
        if ev is not None:
            t = time.perf_counter()
            ev.wait()
            with self._cv:                       # faults that had to wait for the network
                self.counts["fetch_waits"] += 1
                self.counts["fetch_wait_s"] += time.perf_counter() - t
        if not self.have[c]:
            raise self.failed or self._errors.get(c) or FetchError(
                "%s: chunk %d was not fetched" % (self.display, c))
        if c and (self.have[c - 1] or self._given[c - 1]):   # sequential: fetch ahead
            self._readahead(c, 1)
        elif c + 1 < self.nchunks and (self.have[c + 1] or self._given[c + 1]):
            self._readahead(c, -1)                 # backwards (a large memmove may copy so)
        self._seen(c)

    def _readahead(self, c, step=None):
        """Fetch the next N-1 chunks from ``c`` in the direction of the faults (``step``; None:
        the last one), except those installed whole and given back already."""
        step = self._step = step or self._step
        top = self._needed()
        for i in range(1, max(2, self.nfetchers)):
            k = c + i * step
            if not 0 <= k < top:
                break
            if not self._given[k]:
                self._want(k, PRIO_READAHEAD)

    def _needed(self):
        """Chunks up to the end of the served regions' data (readahead stops there: an object
        store bills every byte)."""
        h = self._handler
        if h is None:
            return self.nchunks
        top = max((r.offset + r.end - r.start for s in list(h.served.values())
                   for r in s.regions if r.offset is not None), default=self.size)
        return min(self.nchunks, -(-top // self.chunk))

    def _seen(self, c):
        h = self.have[c]
        if h == _CACHED:
            with self._cv:
                self.counts["cache_hits"] += 1
        elif h == _AHEAD:
            self._readahead(c)
        self.have[c] = _SEEN

    # -- the source interface -------------------------------------------------------------------
    def ensure(self, off, n):
        """Make ``[off, off+n)`` fillable: wait for the chunk of ``off``; a longer fill is cut
        at the first chunk not here yet (which is then fetched in the background).  Returns the
        bytes that may be copied now (a whole number of pages)."""
        sh = self.chunk
        c = off // sh
        if c != self._last:
            self._switched(c)
        if self.have[c] != _SEEN:
            if self.have[c]:
                self._seen(c)
            else:
                self._demand(c)
        last = (off + n - 1) // sh
        k = c + 1
        while k <= last:
            if self.have[k] != _SEEN:
                if not self.have[k]:
                    if self.page_size > sh:         # huge pages: a fill is at least one page
                        self._demand(k)
                        k += 1
                        continue
                    self._want(k, PRIO_READAHEAD)
                    return k * sh - off
                self._seen(k)
            k += 1
        return n

    def fill(self, uffd, dst, length, offset, hugetlb=False):
        n = self.ensure(offset, length)
        return uffd.copy(dst, self.base + offset, n)

    # -- giving back the memory of chunks all installed -----------------------------------------
    def _switched(self, c):
        """The fills move on from chunk ``_last`` to ``c`` (in the serving thread, the only one
        that copies from the mapping): if every page of ``_last`` is installed (the Handler's
        hint), its memory is given back, so that a cold restore lives in a few chunks' worth of
        memory instead of a copy of the whole object, and the next fetches reuse pages the
        kernel has just had back (fresh pages cost more: README "Restoring from a URL")."""
        last, self._last = self._last, c
        if last >= 0 and self._installed(last):
            self._complete.append(last)
        if self._complete:
            with self._cv:
                done = [k for k in self._complete if k not in self._unwritten]
                self._complete = [k for k in self._complete if k in self._unwritten]
            for k in done:
                self._release(k)

    def _to_pool(self, a, n):
        """Move the pages of ``[a, a+n)`` of the mapping into the pool (mremap with
        MREMAP_DONTUNMAP, Linux 5.7: the range stays mapped, empty, so no other mapping can
        land there meanwhile).  A chunk fetched later gets them back by another mremap: no
        page to allocate, zero and fault in again, which cost as much as the fetch itself.
        Each chunk that had pooled pages stays a mapping of its own, so an object of more
        chunks than a quarter of vm.max_map_count does without (the process's other mmaps,
        Python's heap among them, must never meet that limit)."""
        if n != self.chunk or len(self._pool) >= URL_POOL_CHUNKS or \
                self.nchunks > _max_map_count() // 4:
            return False
        try:
            slot = mremap(self._map + a, n, n, MREMAP_MAYMOVE | MREMAP_DONTUNMAP)
        except OSError:
            return False                          # older kernel, or too many mappings
        with self._cv:
            self._pool.append(slot)
        return True

    def _from_pool(self, a, n):
        """Put pooled pages at ``[a, a+n)`` of the mapping (replacing what is there)."""
        if n != self.chunk:
            return False
        with self._cv:
            slot = self._pool.pop() if self._pool else 0
        if not slot:
            return False
        try:
            mremap(slot, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, self._map + a)
        except OSError:
            munmap(slot, n)
            return False
        return True

    def _installed(self, c):
        h = self._handler
        hint = None if h is None else h._present
        if hint is None or self.have[c] in (_ABSENT, _CACHED) or self.page_size != PAGE_SIZE:
            return False
        a, b = self._span(c)
        i, j = a // PAGE_SIZE, min(-(-b // PAGE_SIZE), len(hint))
        return i < j and hint.find(0, i, j) < 0

    def _release(self, c):
        """Give back chunk ``c``'s memory: it is absent again (a later need, e.g. a forked
        process's fault, maps it from the cache or fetches it again)."""
        a, n = self._page_span(c)
        if self._shared and not self._anon[c]:
            return                                # mapped from the cache: nothing of ours
        self.have[c] = _ABSENT
        self._given[c] = 1
        if not self._to_pool(a, n):
            madvise(self._map + a, n, MADV_DONTNEED)
        with self._cv:
            self.counts["released_chunks"] += 1

    def ready(self, off, n, prio=PRIO_PREFETCH):
        """Whether ``[off, off+n)`` can be filled without waiting; queues what is missing (for
        background work, which must not block the serving thread)."""
        if self.failed is not None:
            raise self.failed
        ok = True
        for c in range(off // self.chunk, min(self.nchunks, (off + n - 1) // self.chunk + 1)):
            if not self.have[c]:
                err = self._errors.get(c)
                if err is not None:
                    raise err
                ok = False
                self._want(c, prio)
            elif self.have[c] != _SEEN:
                self._seen(c)
        return ok

    def plan(self, runs, prio=PRIO_PREFETCH):
        """Queue the chunks of source-offset ``runs`` in their order (a --prefetch list in
        first-fault order: the chunks come in the order the last run needed them)."""
        for a, b in runs:
            for c in range(a // self.chunk, min(self.nchunks, (b - 1) // self.chunk + 1)):
                self._want(c, prio)

    def address(self, offset):
        """Where source offset ``offset`` is in our memory (valid after ``ensure``: a chunk all
        installed may have been given back)."""
        return self.base + offset

    def bind(self, handler):
        """Called by the Handler: its page size, its wake-up, its stats records."""
        self.page_size = handler.page_size
        self.waker = handler.wake
        self._handler = handler
        handler.stats.providers.append(self.stats_fields)

    def stats_fields(self):
        with self._cv:
            rec = dict(self.counts)
            rec["fetch_wait_s"] = round(rec["fetch_wait_s"], 6)
            lat = sorted(self._lat)
            rec["fetch_latency_us"] = {} if not lat else {
                "p50": round(lat[len(lat) // 2], 1),
                "p99": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1)}
            rec["in_flight"] = self._requests
            rec["chunk"] = self.chunk
            rec["cached"] = self.cache_dir is not None
        return rec

    def close(self):
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        deadline = time.monotonic() + 2
        for t in self._threads:             # the cache writer may need longer (a slow disk)
            t.join(max(0.0, deadline - time.monotonic()) + (8 if t.name.endswith("writer")
                                                             else 0))
        busy = any(t.is_alive() for t in self._threads)     # a fetch still waits on the network
        if self._lock_fd >= 0 and not busy:
            self._close_cache()
        if self._map and not busy:
            munmap(self._map, self._maplen)
            self._map = self.base = 0
            for slot in self._pool:
                munmap(slot, self.chunk)
            self._pool = []

    def _close_cache(self):
        """The last user of the entry syncs data, then map, and marks the state clean (under
        ``lock``, so that no process sets the entry up meanwhile)."""
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            fcntl.flock(self._users_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.fdatasync(self._data_fd)
            os.fdatasync(self._map_fd)
            with open(os.path.join(self.cache_dir, "state"), "w") as f:
                f.write("%s 0\n" % _boot_id())
        except OSError:
            pass                               # another process still uses it: it will
        self._close_fds()


###################################################################################################
#  9. Handler loop
###################################################################################################

# -- regions, the fault policy's span helper, per-uffd state --------------------------------------

class Region:
    """A registered range ``[start, end)`` of one uffd; ``offset`` is the source offset of
    ``start`` (None: no source data, zero-fill); ``name`` what the mapping is (``mappings``
    records: ``[heap]``, ``[anon]``, ``[shmem]``, ``[thread-stack]``...; None: unknown)."""
    __slots__ = ("start", "end", "offset", "name")

    def __init__(self, start, end, offset=None, name=None):
        self.start, self.end, self.offset, self.name = start, end, offset, name

    def __repr__(self):
        return "Region(0x%x-0x%x off=%s)" % (self.start, self.end, self.offset)


def file_regions(start, end, file_ranges, name=None):
    """``[start, end)`` as Regions: the parts inside a ``(lo, hi, offset)`` of ``file_ranges``
    (sorted, disjoint) take their source offsets from it, the rest has none (zero-filled)."""
    out, at = [], start
    for lo, hi, off in file_ranges:
        a, b = max(lo, at), min(hi, end)
        if a >= b:
            continue
        if at < a:
            out.append(Region(at, a, None, name))
        out.append(Region(a, b, off + (a - lo), name))
        at = b
    if at < end:
        out.append(Region(at, end, None, name))
    return out


def source_bytes(source, off, n):
    """Bytes ``[off, off+n)`` of ``source`` (a UrlSource fetches what is not here now)."""
    ensure = getattr(source, "ensure", None)
    out = bytearray()
    while n > 0:
        k = ensure(off, n) if ensure is not None else n
        out += ctypes.string_at(source.address(off), k)
        off, n = off + k, n - k
    return bytes(out)


def data_end(r, size, page_size):
    """End of the part of region ``r`` whose pages come from a source of ``size`` bytes (None:
    no limit), rounded up to a page: a fill from address A takes at most ``data_end - A``
    bytes, and a page at or past it lies past the end of the source (it gets a zero page).
    A region without a source offset has no data (returns its start)."""
    if r.offset is None:
        return r.start
    if size is None:
        return r.end
    return min(r.end, r.start + max(0, -(-(size - r.offset) // page_size) * page_size))


class Served:
    """The state kept per uffd: the fd, its regions (sorted), pages removed (on-remove=zero)."""

    def __init__(self, uffd, regions, pid=None, label=None):
        self.uffd = uffd
        self.regions = sorted(regions, key=lambda r: r.start)
        self.starts = [r.start for r in self.regions]
        self.removed = []           # sorted, disjoint [start, end) ranges for on-remove=zero
        self.pid = pid              # the process whose mm this uffd belongs to (tgid)
        self.label = label
        self.comm = None            # its command name (/proc/PID/comm), read when first needed
        self.mapped = None          # the mappings last logged (a ``mappings`` record) or None
        self.left = []              # ranges unregistered by on-remove=unregister: not followed

    def reindex(self):
        self.regions = [r for r in sorted(self.regions, key=lambda r: r.start) if r.end > r.start]
        self.starts = [r.start for r in self.regions]
        self.mapped = None          # changed: log the mappings again

    def mappings(self):
        """The registered mappings as ``mappings`` record entries: adjacent regions of the same
        name merged, ``{"start", "len", "name"}``."""
        out = []
        for r in self.regions:
            name = r.name or "[anon]"
            if out and out[-1][1] == r.start and out[-1][2] == name:
                out[-1][1] = r.end
            else:
                out.append([r.start, r.end, name])
        return [{"start": a, "len": b - a, "name": n} for a, b, n in out]

    def find(self, addr):
        """The region holding ``addr``, or None."""
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0:
            r = self.regions[i]
            if addr < r.end:
                return r
        return None

    def cut(self, start, end):
        """Forget ``[start, end)``: regions are trimmed or split (UNMAP, REMAP source)."""
        out = []
        for r in self.regions:
            if r.end <= start or r.start >= end:
                out.append(r)
                continue
            if r.start < start:
                out.append(Region(r.start, start, r.offset, r.name))
            if r.end > end:
                off = None if r.offset is None else r.offset + (end - r.start)
                out.append(Region(end, r.end, off, r.name))
        self.regions = out
        self.reindex()

    def clip_removed(self, addr, length, ps):
        """``length`` cut so that ``[addr, addr+length)`` lies wholly inside or wholly outside
        the removed ranges (at least one page): readahead from a kept page must not copy file
        data over a removed one, nor a removed page's zeros over kept ones."""
        i = bisect.bisect_right(self.removed, (addr, float("inf"))) - 1
        if i >= 0 and addr < self.removed[i][1]:
            n = self.removed[i][1] - addr
        elif i + 1 < len(self.removed):
            n = self.removed[i + 1][0] - addr
        else:
            return length
        return max(ps, min(length, n - n % ps))

    def is_removed(self, addr):
        i = bisect.bisect_right(self.removed, (addr, float("inf"))) - 1
        return i >= 0 and self.removed[i][0] <= addr < self.removed[i][1]


#: the fast loop's readahead hint has one byte per source page up to the highest region offset;
#: offsets beyond this many pages (a --zero source needs none, a peer may send any) go without
FAST_HINT_MAX_PAGES = 1 << 26

# -- the Handler ----------------------------------------------------------------------------------

#: The fast loop's pagefault record, formatted directly (the same fields and values as
#: ``serve_fault``'s record; json.dumps costs ~3 µs a fault), and its ``flags`` by
#: UFFD_PAGEFAULT_FLAG_WRITE (bit 0).  The records are written in batches of whole records of at
#: most LOG_LINES_BATCH bytes (PIPE_BUF), and before the loop sleeps or any other record.
PF_LINE = ('{"t":%.6f,"event":"pagefault","address":%d,"flags":%s,"ptid":%d,"pid":%s,'
           '"resolved":"%s","pages":%d,"us":%.1f,"ufd":%d%s}\n')
PF_FLAGS = ("[]", '["write"]')
LOG_LINES_BATCH = 4096

#: the fast loop times 1 fault in this many (a power of two); the general path times every fault
FAST_LATENCY_EVERY = 8


class _Clock:
    """Deadline, periodic tick and timers (``Handler.timers``) of ``Handler.run``."""

    def __init__(self, timeout, tick, interval, timers=()):
        now = time.monotonic()
        self.deadline = None if timeout is None else now + timeout
        self.tick = tick if interval else None
        self.interval = interval
        self.next_tick = now + interval if self.tick else None
        self.timers = [[now + every, every, fn] for every, fn in timers]
        self.active = self.deadline is not None or self.tick is not None or bool(self.timers)

    def check(self):
        """Run a due tick; return 'timeout' when the deadline has passed, else None."""
        if not self.active:
            return None
        now = time.monotonic()
        if self.next_tick is not None and now >= self.next_tick:
            self.tick()
            self.next_tick = now + self.interval
        for t in self.timers:
            if now >= t[0]:
                t[2]()
                t[0] = now + t[1]
        if self.deadline is not None and now >= self.deadline:
            return "timeout"
        return None

    def wait_ms(self):
        """poll() timeout until the next tick, timer or the deadline (None: wait forever)."""
        limits = [t for t in (self.deadline, self.next_tick) if t is not None]
        limits += [t[0] for t in self.timers]
        if not limits:
            return None
        return max(0, int((min(limits) - time.monotonic()) * 1000) + 1)


#: how long a Handler keeps reading an empty queue before it sleeps in poll(): when the faulting
#: thread runs on another CPU, sleeping costs two cross-CPU wake-ups per fault (about 50 µs on a
#: VM whose idle vCPUs halt at once); a fault-heavy workload faults again within microseconds.
DEFAULT_SPIN = 50e-6
#: how often SpinGate looks at the machine's run queues again (seconds)
SPIN_GATE_EVERY = 2e-3


class SpinGate:
    """Whether busy-polling may take a CPU now: only while the machine has no more runnable
    threads than CPUs (the count of /proc/loadavg, looked at every SPIN_GATE_EVERY seconds).
    On a full machine a spinning handler only takes CPU time from the threads it serves (and
    from the other VMs of a ``--peers`` daemon): measured with two peers on two CPUs, ``--spin``
    without the gate lost a quarter of the throughput at ``--readahead 1`` (README, "Many
    VMs").  No /proc: always spin, as before."""

    def __init__(self, every=SPIN_GATE_EVERY):
        self.every = every
        self.ncpu = os.cpu_count() or 1
        self._next = 0.0
        self._ok = True
        self._fd = None

    def __call__(self):
        now = time.perf_counter()
        if now >= self._next:
            self._next = now + self.every
            self._ok = self._runnable() <= self.ncpu
        return self._ok

    def _runnable(self):
        try:
            if self._fd is None:
                self._fd = os.open("/proc/loadavg", os.O_RDONLY | os.O_CLOEXEC)
            # "0.52 0.58 0.59 3/519 12345": runnable now / threads
            return int(os.pread(self._fd, 128, 0).split()[3].split(b"/")[0])
        except (OSError, ValueError, IndexError):
            self.every = float("inf")           # not this kernel's format: stop looking
            return 0

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Handler:
    """Serves page faults and events on one or more uffds until told to stop.

    ``source``: a ZeroSource or FileSource.  ``readahead``: pages per fill (from the faulting
    page, clamped to its region; a fill stopping at a present page is fine).  ``on_remove``:
    'unregister' (later faults there get kernel zero pages) or 'zero' (they get ZEROPAGE).
    ``log``: an EventLog; ``stats``: a Stats.  ``record``: a list that receives, in first-fault
    order, the source offset (or the address, for regions without a source) of every page that
    faulted.

    Resolution rules: MISSING -> fill from the source; WP -> unprotect (UFFDIO_WRITEPROTECT 0);
    MINOR -> UFFDIO_CONTINUE; EEXIST -> UFFDIO_WAKE; EAGAIN -> read pending events, then retry
    with a bounded backoff (no fault is ever dropped); ESRCH/ENOMEM -> that process is gone.
    FORK adopts the new uffd with a copy of the parent's regions; REMAP moves regions; UNMAP
    forgets them; REMOVE applies ``on_remove``.

    ``prefetch``: a Prefetcher (source-offset runs) installed while no message is pending.
    ``fast``: with one uffd, no per-fault log and a file/zero source, ``run`` uses a specialised
    loop (one ``os.read`` of one message, a preallocated ioctl argument, no allocation per
    fault); anything unusual (another event, an error, WP/MINOR, a removed page, a pending
    prefetch) goes through the same general code as the slow path, so the policies and the
    stats are the same.
    """

    def __init__(self, source=None, log=None, stats=None, readahead=1, on_remove="unregister",
                 page_size=PAGE_SIZE, record=None, hugetlb=False, prefetch=None, fast=True,
                 spin=DEFAULT_SPIN):
        self.source = source or ZeroSource()
        self.log = log or EventLog(None, human=None)
        self.stats = stats or Stats()
        self.readahead = max(1, int(readahead))
        self.on_remove = on_remove
        self.page_size = page_size
        self.hugetlb = hugetlb
        self.record = record
        self.prefetch = prefetch
        self._prefetch_said = False
        self.fast = fast
        self.fast_log = False         # the fast loop may write pagefault records (watch)
        self.log_mappings = False     # write ``mappings`` records (watch: ``announce``)
        self.spin = spin              # seconds to keep reading before sleeping in poll
        self.spin_gate = SpinGate()   # ... while the machine has a CPU to spare
        self._present = None          # fast loop's readahead hint (bytearray by source page)
        self.exact_regions = False    # True: a fault outside the regions is an error (Firecracker)
        self._holes = bool(getattr(self.source, "holes", None))     # a sparse source file
        self._recorded = set()
        self._zeros = None
        self._tgid = {}               # ptid -> tgid: the ``pid`` of a pagefault record
        self.served = {}              # fd -> Served
        self.on_fork = None           # hook: callable(parent Served, child Served)
        self.on_gone = None           # hook: callable(Served) when a uffd's process is gone
        self.on_event = None          # hook: callable(Served, event) after a non-fault event
        self.on_unknown = None        # hook: callable(Served, addr) -> [Region]: the regions of
        #                               registered memory the bookkeeping does not know
        self.timers = []              # (seconds, callable): run every so often by ``run``
        self.on_lost = None           # hook: callable(Served): install every page it lacks
        self.lost = []                # pids whose uffd could not be read any more (``lose``)
        self.stopping = False
        self._calls = []              # call_soon queue: (fn, args, kwargs), run by ``run``
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        bind = getattr(self.source, "bind", None)     # a UrlSource: page size, wake, stats
        if bind is not None:
            bind(self)

    # -- setup ----------------------------------------------------------------------------------
    def add(self, uffd, regions, pid=None, label=None):
        """Serve ``uffd`` for ``regions``: Region objects or (start, length[, offset]) tuples."""
        regs = [r if isinstance(r, Region) else Region(r[0], r[0] + r[1],
                                                       r[2] if len(r) > 2 else None)
                for r in regions]
        s = Served(uffd, regs, pid, label)
        self.served[uffd.fileno()] = s
        self.announce(s)
        return s

    def fault_pid(self, s, ptid):
        """The tgid of faulting thread ``ptid``: ``s.pid`` for the threads of the uffd's own
        process, the child's own tgid for a vfork child running in its parent's memory
        (/proc/PTID/status, cached; ``forget_tid`` when a thread is gone)."""
        t = self._tgid.get(ptid)
        if t is None:
            if not ptid:
                return s.pid
            t = self._tgid[ptid] = _tgid_of(ptid)
            if s.pid is None:         # a FORK child not yet named: its first faulting thread
                s.pid = t
            elif t != s.pid and t not in self.log.names:     # a vfork child: name it
                self.log.names[t] = _comm_of(t) or "?"
        return t

    def forget_tid(self, tid):
        self._tgid.pop(tid, None)

    def announce(self, s):
        """Log ``s``'s mappings (a ``mappings`` record) if they changed since last logged, when
        per-fault records are written: so that a reader can place every fault address."""
        if s.mapped is not None or not self.log_mappings or not self.log.wants_faults:
            return
        s.mapped = s.mappings()
        if s.comm is None and s.pid:
            s.comm = _comm_of(s.pid)
        if s.comm and s.pid:
            self.log.names[s.pid] = s.comm
        self.log.emit("mappings", pid=s.pid, comm=s.comm, ufd=s.uffd.fileno(),
                      mappings=s.mapped)

    def drop(self, s, reason, **fields):
        """Stop serving ``s`` (its process exited or its fd hung up) and close its uffd;
        ``fields`` go into the ``gone`` record (e.g. how the process ended)."""
        if self.served.pop(s.uffd.fileno(), None) is not None:
            self.stats.add("uffds_closed")
            self.log.emit("gone", ufd=s.uffd.fileno(), pid=s.pid, reason=reason, **fields)
            if self.on_gone:
                self.on_gone(s)
            s.uffd.close()

    @staticmethod
    def _more_fds(err):
        """On EMFILE (the kernel had no fd for a FORK event's new uffd; the event stays queued
        and the forking process waits): raise our RLIMIT_NOFILE (root may raise the hard limit
        too) so that the next read succeeds.  True if the limit went up."""
        if getattr(err, "errno", None) != errno.EMFILE:
            return False
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        for new in ((soft + 1024, max(hard, soft + 1024)), (hard, hard)):
            if new[0] > soft:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, new)
                    return True
                except (OSError, ValueError):
                    pass
        return False

    def lose(self, s, err):
        """``s``'s uffd cannot be read any more (EMFILE/ENFILE: no fd free for a FORK's new
        uffd; anything else): closing it would leave its process without a handler, reading
        zeros where data belongs.  So first install every page it still lacks (``on_lost``,
        the target's way), then close it and remember it in ``lost``: the run then fails
        (exit 1, never 0 after a lost uffd)."""
        why = os.strerror(err.errno) if getattr(err, "errno", None) else str(err)
        installed = 0
        if self.on_lost is not None:
            try:
                installed = self.on_lost(s) or 0
            except OSError:
                pass
        self.lost.append(s.pid)
        self.stats.add("uffds_lost")
        self.log.emit("error", message="the uffd of process %s could not be read (%s): %d "
                      "page(s) installed, then closed" % (s.pid, why, installed),
                      ufd=s.uffd.fileno())
        self.drop(s, "lost", error=why)

    # -- events ---------------------------------------------------------------------------------
    def handle(self, s, events):
        """Handle one batch read from ``s``: non-cooperative events first, then faults."""
        faults = []
        for ev in events:
            if type(ev) is PageFault:
                faults.append(ev)
            else:
                self.handle_event(s, ev)
        for f in faults:
            if s.uffd.closed:
                break
            self.serve_fault(s, f)

    def handle_event(self, s, ev):
        st = self.stats
        st.add("events_" + ev.name)
        rec = ev.record()
        if type(ev) is Fork:
            uffd = ev.ufd if isinstance(ev.ufd, Userfaultfd) else Userfaultfd.adopt(
                ev.ufd, s.uffd.features)
            child = Served(uffd, [Region(r.start, r.end, r.offset, r.name) for r in s.regions],
                           label="fork-of-%s" % (s.pid or s.uffd.fileno()))
            child.removed = list(s.removed)
            child.comm = s.comm               # fork keeps the command name
            self.served[uffd.fileno()] = child
            rec["parent_ufd"] = s.uffd.fileno()
            if self.on_fork:
                self.on_fork(s, child)
        elif type(ev) is Remap:
            self._remap(s, ev)
        elif type(ev) is Unmap:
            s.cut(ev.start, ev.end)
        elif type(ev) is Remove:
            self._remove(s, ev.start, ev.end)
            rec["policy"] = self.on_remove
        rec.setdefault("ufd", s.uffd.fileno())      # a Fork record's ufd is the child's
        if s.pid is not None:
            rec["pid"] = s.pid                # whose address space (a Fork's: the parent's)
        self.log.emit(rec.pop("event"), **rec)
        if type(ev) is Unmap and s.left:
            s.left = _cut_range(s.left, ev.start, ev.end)
        if self.on_event:
            self.on_event(s, ev)
        if type(ev) in (Remap, Unmap, Remove) and s.uffd.fileno() in self.served:
            self.announce(s)

    def _remap(self, s, ev):
        moved = []
        lo, hi = ev.from_, ev.from_ + ev.len
        for r in s.regions:
            a, b = max(r.start, lo), min(r.end, hi)
            if a < b:
                off = None if r.offset is None else r.offset + (a - r.start)
                moved.append(Region(a - lo + ev.to, b - lo + ev.to, off, r.name))
        s.cut(lo, hi)
        s.cut(ev.to, ev.to + ev.len)
        s.regions.extend(moved)
        s.reindex()

    def _remove(self, s, start, end):
        if self.on_remove == "zero":
            # Only pages with source data need remembering (they must not get it back); a
            # page without (watch) gets a zero page either way.
            if any(r.offset is not None and r.start < end and start < r.end
                   for r in s.regions):
                s.removed = _merge_range(s.removed, start, end)
            return
        # unregister each registered piece (the kernel wakes waiters in it)
        s.left = _merge_range(s.left, start, end)
        for r in list(s.regions):
            a, b = max(r.start, start), min(r.end, end)
            if a < b:
                try:
                    s.uffd.unregister(a, b - a)
                except UffdError as e:
                    if e.errno in PEER_GONE:
                        return self.drop(s, "exited")
                    if e.errno != errno.EINVAL:
                        raise
        s.cut(start, end)

    # -- faults ---------------------------------------------------------------------------------
    def serve_fault(self, s, f):
        """Resolve one PageFault on ``s``; logs it when the log wants faults."""
        t = time.perf_counter()
        if s.pid is None:
            self.fault_pid(s, f[2])
        ps = self.page_size
        addr = f[0] & ~(ps - 1)
        kind = f.kind
        st = self.stats
        st.add("faults_" + kind)
        pages = 0
        r = s.find(addr)
        if r is None and self._calls:
            # the tracer registered it and queued the bookkeeping before the tracee went on
            self.run_calls()
            if s.uffd.closed:
                return
            r = s.find(addr)
        if r is None and self.on_unknown is not None:
            r = self._adopt(s, addr)
        if r is None and kind == "missing":
            # Registered memory the bookkeeping does not know: a VMA grown in place by mremap
            # (no event) or past a REMAP's old length.  A wake alone would re-fault forever;
            # give it what the kernel would (a zero page).  Unmapped: ENOENT -> "gone".
            if self.exact_regions:
                self._outside(s, addr)
            how, pages = self._fill(s, lambda d, n: self._zero_fill(s, d, n, None), addr, ps,
                                    "zero")
        elif r is None and kind != "wp":
            how = "wake"            # range no longer ours (unmapped/unregistered): just wake
            self._retry(s, s.uffd.wake, addr, ps)
        elif kind == "wp":
            how = "wp"
            self._note(s, r, addr)            # a page written first is in the working set too
            self._retry(s, s.uffd.writeprotect, addr, ps, False)
        elif kind == "minor":
            self._note(s, r, addr)
            how, pages = self._fill(s, s.uffd.continue_, addr, ps, "continue")
        else:
            self._note(s, r, addr)
            if r.offset is None or (s.removed and s.is_removed(addr)):
                off, how = None, "zero"
                fill = self._zero_fill
            else:
                off = r.offset + (addr - r.start)
                fill = self._source_fill
                how = self.source.kind
            end = r.end
            if off is not None:
                end = data_end(r, self.source.size, ps)
                if addr >= end:                     # past the end of the source: zeros
                    off, how, fill, end = None, "zero", self._zero_fill, r.end
            length = min(self.readahead * ps, end - addr)
            if off is not None and self.prefetch:
                # a recorded page: take the rest of its prefetch run now (demand first)
                e = self.prefetch.claim(off, min(PREFETCH_RUN, end - addr))
                if e is not None and e - off > length:
                    length = e - off
                    st.add("prefetch_claimed")
            if off is not None and self._holes:
                span = self.source.hole_span(off, length)
                if span >= ps:                      # a hole of a sparse file: never read it
                    off, how, fill = None, "hole", self._zero_fill
                    length = min(length, span - span % ps)
                elif -span < length:                # data up to the next hole
                    length = max(ps, -(span // ps) * ps)
            if s.removed:                           # a fill never crosses a removed border
                length = s.clip_removed(addr, length, ps)
            how, pages = self._fill(s, lambda d, n: fill(s, d, n, off), addr, length, how)
        us = (time.perf_counter() - t) * 1e6
        st.latency(us)
        if self.log.wants_faults:
            pid = self.fault_pid(s, f[2])
            self.announce(s)
            rec = f.record()
            rec.pop("event")
            rec.update(pid=pid, resolved=how, pages=pages, us=round(us, 1), ufd=s.uffd.fileno())
            if pid != s.pid and s.pid is not None:
                rec["mm_pid"] = s.pid        # a vfork child: the address is in s.pid's mappings
            self.log.emit("pagefault", **rec)

    def _outside(self, s, addr):
        """A fault in registered memory outside every region the peer announced (the regions
        are the whole registered memory in its protocol): the peer is inconsistent.  It still
        gets a zero page (nothing else belongs there, and its thread must not hang), loudly."""
        self.stats.add("outside_regions")
        self.log.emit("error", message="fault at 0x%x: registered memory outside every "
                      "handshake region; served a zero page" % addr, address=addr,
                      ufd=s.uffd.fileno(), pid=s.pid)


    def _adopt(self, s, addr):
        """A fault in registered memory the bookkeeping does not know: take its regions from
        ``on_unknown`` (the target reads /proc/PID/maps).  This happens when an UNMAP event of
        an old mapping is read after the tracer registered a new one at the same addresses
        (munmap returns once the event is read, so another thread can map there first)."""
        regs = self.on_unknown(s, addr)
        if not regs:
            return None
        s.cut(min(x.start for x in regs), max(x.end for x in regs))
        s.regions.extend(regs)
        s.reindex()
        self.stats.add("regions_adopted")
        return s.find(addr)

    def _note(self, s, r, addr):
        """Add the faulting page to the working set: ``record`` is a list, or a dict of lists by
        process (``s.pid``: each address space has its own set)."""
        if self.record is not None and r is not None:
            key = addr if r.offset is None else r.offset + (addr - r.start)
            if type(self.record) is dict:
                k2 = (s.pid, key)
                if k2 not in self._recorded:
                    self._recorded.add(k2)
                    self.record.setdefault(s.pid, []).append(key)
            elif key not in self._recorded:
                self._recorded.add(key)
                self.record.append(key)

    # -- prefetch -------------------------------------------------------------------------------
    def prefetch_step(self):
        """Install one pending prefetch run (at most PREFETCH_RUN bytes, one ioctl).  Returns True
        while runs remain.  Pages already present are skipped; EAGAIN (an event is pending)
        puts the run back so that the loop reads the event first.  Runs never cross a region's
        source range (``split_runs``)."""
        pf = self.prefetch
        run = pf.pop() if pf else None
        if run is None:
            return False
        a, b = run
        ps = self.page_size
        st = self.stats
        for s in list(self.served.values()):
            for r in s.regions:
                if r.offset is None or not r.offset <= a < r.offset + (r.end - r.start):
                    continue
                b = min(b, r.offset + (r.end - r.start))
                dst = r.start + (a - r.offset)
                n = b - a
                for x, y in s.removed:            # never put file data over a removed page
                    if x <= dst < y:
                        skip = min(y - dst, n)
                        st.add("prefetch_skipped", skip // ps)
                        self._prefetch_rest(a + skip, b)
                        return True
                    if dst < x < dst + n:
                        n = x - dst
                if self._holes:                   # holes are zero pages: not read, not listed
                    span = self.source.hole_span(a, n)
                    if span >= ps:
                        skip = min(span - span % ps, n)
                        st.add("prefetch_skipped", skip // ps)
                        self._prefetch_rest(a + skip, b)
                        return True
                    if -span < n:
                        n = max(ps, -(span // ps) * ps)
                ready = getattr(self.source, "ready", None)
                if ready is not None and not ready(a, n):
                    self._prefetch_rest(a, b)
                    return None                   # fetching: wake() calls us again
                try:
                    done = self.source.fill(s.uffd, dst, n, a, self.hugetlb)
                except UffdError as err:
                    if err.errno == errno.EEXIST:
                        st.add("prefetch_present")
                        self._prefetch_rest(a + ps, b)
                        return True
                    if err.errno == errno.EAGAIN:
                        st.add("eagain")
                        self._prefetch_rest(a, b)
                        return True
                    if err.errno in PEER_GONE:
                        self.drop(s, "exited")
                        return bool(pf)
                    if err.errno in (errno.ENOENT, errno.EINVAL):
                        st.add("prefetch_skipped", n // ps)
                        self._prefetch_rest(a + n, b)
                        return bool(pf)
                    raise
                st.add("prefetch_pages", done // ps)
                st.add("prefetch_bytes", done)
                st.add("prefetch_ioctls")
                self.mark_filled(a, done)
                if done < n:                      # stopped at a present page: skip it
                    st.add("prefetch_present")
                    self._prefetch_rest(a + done + ps, b)
                else:
                    self._prefetch_rest(a + n, b)
                return True
        st.add("prefetch_skipped", (b - a) // ps)    # no region holds it (any more)
        return bool(pf)

    def _prefetch_finished(self):
        """Write ``prefetch_done`` once, when the whole prefetch list is installed (by idle
        steps, or by demand faults that claimed its runs): the end of the prefetch phase."""
        if self.prefetch is not None and not self.prefetch and not self._prefetch_said:
            self._prefetch_said = True
            self.log.emit("prefetch_done", pages=self.stats.count.get("prefetch_pages", 0))

    def _prefetch_rest(self, a, b):
        if a < b:
            self.prefetch.push_front((a, b))

    def mark_filled(self, off, n):
        """Source bytes ``[off, off+n)`` were filled outside the fast loop (prefetch, --fill
        idle): set them in its readahead hint, which a UrlSource also reads to give back the
        memory of chunks all installed."""
        hint = self._present
        if hint is not None and n > 0:
            shift = self.page_size.bit_length() - 1
            i, j = off >> shift, min(len(hint), (off + n) >> shift)
            if i < j:
                hint[i:j] = b"\x01" * (j - i)

    def _source_fill(self, s, dst, length, off):
        return self.source.fill(s.uffd, dst, length, off, self.hugetlb)

    def _zero_fill(self, s, dst, length, off):
        if self._zeros is None:
            self._zeros = self.source if isinstance(self.source, ZeroSource) else ZeroSource()
        return self._zeros.fill(s.uffd, dst, length, 0, self.hugetlb)

    def _fill(self, s, fill, addr, length, how):
        """Fill ``[addr, addr+length)`` with ``fill(dst, n)``; returns (resolution, pages)."""
        ps = self.page_size
        st = self.stats
        for attempt in range(FILL_RETRIES):
            try:
                done = fill(addr, length)
            except UffdError as e:
                if e.errno == errno.EEXIST:
                    st.add("eexist")
                    self._retry(s, s.uffd.wake, addr, ps)
                    return "exists", 0
                if e.errno == errno.EAGAIN:
                    st.add("eagain")
                    if not self.read_pending(s, attempt):
                        return "gone", 0
                    if s.uffd.closed or s.find(addr) is None:
                        return self._give_up(s, addr)
                    st.add("retries")
                    continue
                if e.errno in PEER_GONE:
                    self.drop(s, "exited")
                    return "gone", 0
                if e.errno == errno.ENOENT and length > ps:
                    # A readahead fill must lie in one VMA; a region split by mprotect (glibc
                    # arenas, thread stacks) makes a longer one ENOENT.  Fill just the faulting
                    # page, or its thread is never woken.
                    length = ps
                    st.add("readahead_clipped")
                    continue
                if e.errno == errno.ENOENT:        # the range went away under us
                    self.read_pending(s, attempt)
                    return self._give_up(s, addr)
                raise
            pages = done // ps
            st.add("pages_" + how, pages)
            st.add("bytes_" + how, done)
            if done < length:
                st.add("partial")
            return how, pages
        raise UffdError(errno.EAGAIN, "fill retries exhausted", addr, length)

    def install_missing(self, s, holes=None):
        """Install every page of ``s``'s source-backed regions that has not been filled yet
        (runs of up to PREFETCH_RUN bytes per ioctl; EEXIST: the page is already there), so
        that unregistering leaves no zero page where source data belongs.  Pages past the end
        of the source and removed pages (on-remove=zero) are left alone.  ``holes(start,
        end)``, if given, narrows ``[start, end)`` to the runs that may be missing (a hint, e.g.
        from /proc/PID/pagemap: one ioctl per run instead of one EEXIST per present page).
        Returns the pages installed.  A zero source has nothing to install (after
        unregistering, the kernel maps the same zero pages)."""
        installed = 0
        if self.source.kind == "zero":
            return 0
        for _ in range(10):             # again from the start if events changed the regions
            n, changed = self._install_regions(s, holes)
            installed += n
            if not changed:
                break
        return installed

    def _install_regions(self, s, holes):
        installed = attempt = 0
        for r in list(s.regions):
            end = data_end(r, self.source.size, self.page_size)
            if end <= r.start:
                continue
            runs = [(r.start, end)] if holes is None or end <= r.start else holes(r.start, end)
            for a, end in runs:
                n, changed = self._install_run(s, r, a, end, attempt)
                installed += n
                if changed is not None:         # regions changed (True) or s is gone
                    return installed, changed
        return installed, False

    def _install_run(self, s, r, a, end, attempt):
        """Install the missing pages of ``[a, end)`` in region ``r``: (pages, changed) where
        changed is None to go on, True when events changed the regions, False when ``s`` is
        gone."""
        ps = self.page_size
        installed = 0
        while a < end:
            if s.uffd.closed:
                return installed, False
            n = min(end - a, PREFETCH_RUN)
            for x, y in s.removed:
                if x <= a < y:
                    n, a = 0, min(y, end)
                    break
                if a < x < a + n:
                    n = x - a
            if n and self._holes:               # holes stay unfilled: the kernel's zeros
                span = self.source.hole_span(r.offset + (a - r.start), n)
                if span >= ps:
                    a = min(end, a + span - span % ps)
                    continue
                if -span < n:
                    n = max(ps, -(span // ps) * ps)
            if not n:
                continue
            try:
                done = self.source.fill(s.uffd, a, n, r.offset + (a - r.start), self.hugetlb)
            except UffdError as e:
                if e.errno == errno.EEXIST:
                    a += ps
                    continue
                if e.errno == errno.EAGAIN and attempt < FILL_RETRIES:
                    self.stats.add("eagain")
                    attempt += 1
                    if not self.read_pending(s, attempt):
                        return installed, False
                    if s.find(a) is not r:
                        return installed, True
                    continue
                if e.errno in PEER_GONE:
                    self.drop(s, "exited")
                    return installed, False
                if e.errno in (errno.ENOENT, errno.EINVAL, errno.EAGAIN):
                    a += n                      # not mapped (any more): nothing to keep
                    continue
                raise
            installed += done // ps
            a += done
        return installed, None

    def _give_up(self, s, addr):
        """Stop filling ``addr`` but wake its thread: it retries the access, which faults again
        if the page is still registered (a region the bookkeeping does not know yet, e.g. one
        just mapped at a recycled address) and otherwise takes its normal course.  Without the
        wake it would wait forever."""
        if not s.uffd.closed:
            try:
                s.uffd.wake(addr, self.page_size)
            except UffdError:
                pass
        return "gone", 0

    def _retry(self, s, op, *args):
        """Run a non-fill ioctl (wake, writeprotect), retrying EAGAIN after reading events."""
        for attempt in range(FILL_RETRIES):
            try:
                return op(*args)
            except UffdError as e:
                if e.errno == errno.EAGAIN:
                    self.stats.add("eagain")
                    self.read_pending(s, attempt)
                    continue
                if e.errno in PEER_GONE:
                    return self.drop(s, "exited")
                if e.errno in (errno.ENOENT, errno.EINVAL) and s.find(args[0]) is None:
                    if op != s.uffd.wake:         # e.g. WP on a range gone meanwhile
                        self._give_up(s, args[0])
                    return None
                raise

    def read_pending(self, s, attempt):
        """Read and handle what is pending on ``s`` (after EAGAIN); back off a little more on
        each attempt (at most 10 ms).  Returns False when ``s`` is gone."""
        if s.uffd.closed:
            return False
        try:
            evs = s.uffd.read_events()
        except UffdError:
            return False
        if evs:
            self.handle(s, evs)
        elif attempt:
            time.sleep(min(0.01, 0.00005 * attempt))
        return not s.uffd.closed

    # -- the loop -------------------------------------------------------------------------------
    def run(self, watch_fds=(), timeout=None, idle=None, tick=None, tick_interval=None):
        """Serve until every uffd is gone, ``stop()`` was called, a ``watch_fds`` fd becomes
        readable or hangs up (returns that fd), or ``timeout`` seconds pass (returns 'timeout').

        ``idle()`` is called whenever no message is pending (background work: it returns True
        while it has more to do, and must do little per call); a pending ``prefetch`` goes
        first.  ``tick()`` runs every ``tick_interval`` seconds (periodic stats).  Returns
        'done', 'stopped', 'timeout' or the fd that fired."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        polled = set()
        extra = set()
        for fd in watch_fds:
            fd = fd if isinstance(fd, int) else fd.fileno()
            extra.add(fd)
            poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        src_fd = getattr(self.source, "watch_fd", -1)    # the source file changed?
        if src_fd >= 0:
            poller.register(src_fd, select.POLLIN)
        clock = _Clock(timeout, tick, tick_interval, self.timers)
        user_idle = [idle]

        def idle_step():
            # None from a step: it waits for a background fetch; wake() makes the loop busy again
            self._prefetch_finished()
            if self.prefetch:
                more = self.prefetch_step()
                return more is not None and (more or user_idle[0] is not None)
            if user_idle[0] is not None:
                more = user_idle[0]()
                if more or more is None:
                    return bool(more)
                user_idle[0] = None
            return False
        busy = True
        spin_until = 0.0
        while not self.stopping:
            self.run_calls()
            for fd in list(self.served):
                if fd not in polled:
                    poller.register(fd, select.POLLIN)
                    polled.add(fd)
            for fd in list(polled):
                if fd not in self.served:
                    poller.unregister(fd)
                    polled.discard(fd)
            if not self.served and (not extra or not watch_fds):
                return "done"
            if self._fast_ok():
                s = next(iter(self.served.values()))
                res = self._run_fast(s, poller, extra, clock, idle_step, busy)
                if res is not None:
                    return res
                busy = bool(self.prefetch) or user_idle[0] is not None
                continue
            # Read first: on a shared CPU the next fault is usually queued already.
            got = False
            for s in list(self.served.values()):
                try:
                    evs = s.uffd.read_events()
                except UffdError as e:
                    if not self._more_fds(e):
                        self.lose(s, e)
                    continue
                if evs:
                    got = True
                    self.handle(s, evs)
            if got:
                spin_until = 0.0
                continue
            wait_ms = None
            if busy:
                busy = idle_step()
                if busy:
                    wait_ms = 0
            if self.spin and wait_ms is None and (spin_until or self.spin_gate()):
                now = time.perf_counter()         # busy-poll a moment before sleeping
                if not spin_until:
                    spin_until = now + self.spin
                if now < spin_until:
                    os.sched_yield()              # a faulter on this CPU runs first
                    continue
            res = clock.check()
            if res:
                return res
            if wait_ms is None:
                wait_ms = clock.wait_ms()
            if wait_ms != 0:
                self.log.flush()              # about to sleep: buffered records go out now
            for fd, ev in poller.poll(wait_ms):
                if fd == src_fd:
                    self.source.check()           # raises SourceChanged
                    continue
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)     # drain, or poll spins from now on
                    except OSError:
                        pass
                    busy = True                         # maybe idle work can go on (wake())
                    continue
                if fd in extra:
                    return fd
                if ev & (select.POLLHUP | select.POLLERR) and not ev & select.POLLIN:
                    s = self.served.get(fd)
                    if s is not None:
                        self.drop(s, "hangup")
        return "stopped"

    def run_calls(self):
        """Run the ``call_soon`` queue (in the thread in ``run``)."""
        while self._calls:
            fn, a, kw = self._calls.pop(0)
            fn(*a, **kw)

    def wake(self):
        """Make ``run`` try its idle work again (thread-safe; a UrlSource calls it when a
        background fetch completes)."""
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def call_soon(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the thread in ``run``, before it reads the next batch
        (thread-safe; wakes a ``run`` waiting in poll).  For another thread (watch's tracer) to
        add uffds or regions without racing the serving thread's bookkeeping."""
        self._calls.append((fn, args, kwargs))
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _fast_ok(self):
        return (self.fast and len(self.served) == 1 and self._fast_log_ok()
                and type(self.record) is not dict
                and self.source.kind in ("copy", "zero")
                and not (self.hugetlb and self.source.kind == "zero"))

    def _fast_log_ok(self):
        """The fast loop writes per-fault records when ``fast_log`` (watch) and only to the JSON
        log (a human line per fault takes the general path)."""
        log = self.log
        return not log.wants_faults or self.fast_log and (log.human is None or
                                                          not log.human_faults)

    def _run_fast(self, s, poller, extra, clock, idle_step, busy):
        """The hot loop for one uffd (see the class doc).  Serves until something needs the
        general loop (returns None) or ``run`` must return (returns its result).

        Per fault: one ``os.read`` of 32 bytes (read first, poll only when the queue is empty:
        a poll costs a syscall and, when it sleeps, two wake-ups), one ``unpack_from``, one
        ``pack_into`` into a preallocated ioctl argument and one ``fcntl.ioctl(fd, req, buf,
        True)``; counters are locals, flushed into ``self.stats`` when the loop leaves or
        ticks."""
        st = self.stats
        uffd = s.uffd
        fd = uffd.fileno()
        ps = self.page_size
        mask = ~(ps - 1)
        src = self.source
        zero = src.kind == "zero"
        ra = self.readahead * ps
        if zero:
            arg, req, res_off = bytearray(32), UFFDIO_ZEROPAGE, 24     # uffdio_zeropage
            put = struct.Struct("=QQ").pack_into                        # range.start, range.len
            base = 0
        else:
            arg, req, res_off = bytearray(40), UFFDIO_COPY, 32          # uffdio_copy
            put = struct.Struct("=QQQ").pack_into                       # dst, src, len
            base = src.base
        ensure = getattr(src, "ensure", None)          # a UrlSource: wait for the chunk
        how = src.kind
        # Readahead hint: pages this loop has filled, by source page.  A fill is cut short before
        # a page we know is present, so that the kernel need not stop there (a partial fill is
        # EAGAIN, and an exception costs Python ~1 µs).  Only a hint: a stale bit just shortens a
        # readahead (the faulting page itself is always filled); a missing bit costs a partial.
        shift = ps.bit_length() - 1
        hint = None
        top = max((r.offset + r.end - r.start for r in s.regions if r.offset is not None),
                  default=0)
        if src.size is not None:
            top = min(top, src.size + ps)
        if ra > ps and top >> shift <= FAST_HINT_MAX_PAGES:
            if self._present is None or len(self._present) < top >> shift:
                self._present = bytearray(top >> shift)
            hint = self._present
            ones = b"\x01" * (ra >> shift)
            find = hint.find
        read = os.read
        unpack = UFFD_MSG.unpack_from                  # event, flags, address, ptid
        ioctl = fcntl.ioctl
        perf = time.perf_counter
        lat = array.array("d")
        lat_append = lat.append
        rec = self.record
        recorded = self._recorded
        logged = self.log.wants_faults          # JSON records only (_fast_log_ok)
        tgids, fault_pid = self._tgid, self.fault_pid
        mono, log_t0 = time.monotonic, self.log.t0
        lines = []                              # formatted pagefault records not written yet
        line_bytes = 0
        uffd_no = fd
        poll = poller.poll
        log_flush = self.log.flush
        holes = self._holes
        src_fd = getattr(src, "watch_fd", -1)
        wake_r = self._wake_r
        POLLIN = select.POLLIN
        timed = clock.active
        PF, SPECIAL = UFFD_EVENT_PAGEFAULT, UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_MINOR
        LAT_MASK = FAST_LATENCY_EVERY - 1
        spin, spin_until, yield_cpu, may_spin = self.spin, 0.0, os.sched_yield, self.spin_gate
        faults = nbytes = partial = eagain = waits = 0      # faults: never reset (sampling)
        flushed = 0                                          # faults already in st
        lo = hi = roff = 0
        rhint = None
        slow = bool(s.removed) or bool(self.prefetch)

        def put_lines():
            """Write the batched pagefault records: whole records, at most LOG_LINES_BATCH
            bytes per write (PIPE_BUF: atomic on a pipe)."""
            nonlocal lines, line_bytes
            if lines:
                self.log.write_records(lines)
                lines, line_bytes = [], 0

        def flush():
            nonlocal flushed, nbytes, partial, eagain, waits
            put_lines()                 # before any other record (order) and any stats
            if waits:
                st.add("waits", waits)
            if faults > flushed:
                st.add("faults_missing", faults - flushed)
                st.add("pages_" + how, nbytes // ps)
                st.add("bytes_" + how, nbytes)
            if partial:
                st.add("partial", partial)
            if eagain:
                st.add("eagain", eagain)
            if lat:
                st.latencies([x * 1e6 for x in lat])
                del lat[:]
            flushed = faults
            nbytes = partial = eagain = waits = 0

        def general(msg):
            """Hand one message to the general code; False if the fast loop must stop.  The
            cached region is forgotten: the general code may have read events that changed the
            regions (an UNMAP, and a new mapping at the same addresses)."""
            nonlocal lo, hi
            flush()
            self.handle(s, decode_msgs(msg))
            lo = hi = 0
            return fd in self.served and len(self.served) == 1

        try:
            while True:
                try:
                    msg = read(fd, 32)
                except BlockingIOError:
                    # the queue is empty: background work, then wait
                    if self.stopping:
                        return "stopped"
                    if self._calls:                   # call_soon work (watch's tracer)
                        return None
                    if busy:
                        flush()
                        busy = idle_step()
                        slow = bool(s.removed) or bool(self.prefetch)
                        if fd not in self.served or len(self.served) != 1:
                            return None
                        if busy:
                            continue
                    if spin and (spin_until or may_spin()):     # busy-poll a moment
                        if not spin_until:
                            spin_until = perf() + spin
                        if perf() < spin_until:
                            yield_cpu()                # a faulter on this CPU runs first
                            continue
                    wait_ms = None
                    if timed:
                        flush()
                        res = clock.check()
                        if res:
                            return res
                        wait_ms = clock.wait_ms()
                    put_lines()                       # before sleeping: nothing waits
                    waits += 1
                    log_flush()                       # about to sleep: buffered records out
                    for pfd, ev in poll(wait_ms):
                        if pfd == fd:
                            if not ev & POLLIN:
                                flush()
                                self.drop(s, "hangup")
                                return None
                        elif pfd in extra:
                            return pfd
                        elif pfd == src_fd:
                            flush()
                            src.check()               # raises SourceChanged
                        elif pfd == wake_r:           # wake(): idle work may go on
                            try:
                                read(wake_r, 4096)
                            except OSError:
                                pass
                            if self._calls:
                                return None
                            busy = True
                        else:
                            return None               # a newly added uffd: general loop
                    continue
                except OSError as e:
                    flush()
                    if not self._more_fds(e):
                        self.lose(s, e)
                    return None
                spin_until = 0.0
                ev, flags, addr, ptid = unpack(msg)
                if ev != PF or flags & SPECIAL or slow:
                    if not general(msg):
                        return None
                    lo = hi = 0
                    slow = bool(s.removed) or bool(self.prefetch)
                    continue
                addr &= mask
                if not lo <= addr < hi:
                    # a new region: [lo, hi) is the part with source data (data_end), so a
                    # page past the end of the file, or of a region without data, goes general
                    # (with --zero, or watch, a region without data is zero-filled as a whole)
                    r = s.find(addr)
                    end = r.end if zero and r is not None else data_end(r, src.size, ps) \
                        if r is not None else 0
                    if r is None or addr >= end or holes and \
                            src.hole_span(r.offset, r.end - r.start) > r.start - r.end:
                        # (a region with holes of a sparse file also goes general)
                        if not general(msg):
                            return None
                        continue
                    lo, hi = r.start, end
                    # no source offset: the working set keys by address, no readahead hint
                    roff = r.offset if r.offset is not None else lo
                    rhint = hint if r.offset is not None else None
                n = hi - addr
                if n > ra:
                    n = ra
                off = roff + addr - lo
                if rhint is not None:
                    i = off >> shift
                    k = find(1, i + 1, i + (n >> shift))
                    if k >= 0:
                        n = (k - i) << shift
                if zero:
                    put(arg, 0, addr, n)
                else:
                    if ensure is not None:
                        n = ensure(off, n)
                    put(arg, 0, addr, base + off, n)
                sample = logged or not faults & LAT_MASK   # 1 fault in 8 (saves ~0.1 µs)
                if sample:
                    t0 = perf()
                try:
                    ioctl(fd, req, arg, True)
                except OSError as e:
                    done = int.from_bytes(arg[res_off:res_off + 8], "little", signed=True)
                    if e.errno == errno.EAGAIN and done > 0:
                        n = done
                        partial += 1
                    else:
                        if e.errno == errno.EAGAIN:
                            eagain += 1
                            flush()
                            self.read_pending(s, 0)
                            st.add("retries")
                        if not general(msg):
                            return None
                        lo = hi = 0
                        slow = bool(s.removed) or bool(self.prefetch)
                        continue
                if sample:
                    dt = perf() - t0
                    lat_append(dt)
                if rhint is not None:
                    i = off >> shift
                    rhint[i:i + (n >> shift)] = ones[:n >> shift]
                faults += 1
                nbytes += n
                if rec is not None and off not in recorded:
                    recorded.add(off)
                    rec.append(off)
                if logged:                          # the record serve_fault would write
                    ptid &= 0xFFFFFFFF
                    pid = tgids.get(ptid) or fault_pid(s, ptid)
                    if s.mapped is None:
                        put_lines()
                        self.announce(s)
                    line = PF_LINE % (mono() - log_t0, addr, PF_FLAGS[flags & 1], ptid,
                                      pid if pid is not None else "null", how, n >> shift,
                                      dt * 1e6, uffd_no,
                                      "" if pid == s.pid or s.pid is None else
                                      ',"mm_pid":%d' % s.pid)
                    lines.append(line)
                    line_bytes += len(line)
                    if line_bytes >= LOG_LINES_BATCH - 256:
                        put_lines()
                if not faults & 1023:              # a long burst: stop() and ticks still work
                    if self.stopping:
                        return "stopped"
                    if self._calls:               # call_soon work (watch's tracer)
                        return None
                    if src_fd >= 0:
                        flush()
                        src.check()
                    if timed:
                        flush()
                        res = clock.check()
                        if res:
                            return res
        finally:
            flush()

    def stop(self):
        """Ask ``run`` to return after the current batch (safe from a signal handler or another
        thread: it also wakes a ``run`` that is waiting in poll)."""
        self.stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def close(self):
        """Close every uffd still served and the wake-up pipe."""
        for s in list(self.served.values()):
            s.uffd.close()
        self.served.clear()
        self.spin_gate.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1


def _cut_range(ranges, start, end):
    """Remove ``[start, end)`` from a sorted list of disjoint ranges."""
    out = []
    for a, b in ranges:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return out


def _gaps(start, end, covered):
    """The parts of ``[start, end)`` outside the sorted, disjoint ``(a, b)`` ranges."""
    out, at = [], start
    for a, b in covered:
        if b <= at or a >= end:
            continue
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < end:
        out.append((at, end))
    return out


class IdleFill:
    """``serve-file --fill idle``: the Handler's ``idle`` work.  When no fault is waiting and the
    prefetch list is done, install every source page not present yet, in runs of up to
    PREFETCH_RUN bytes (one ioctl per call), region by region in source-offset order, so that
    the restore completes and the source is no longer needed.  A UrlSource fetches ahead in
    the background (``ready``); meanwhile the step returns None and the Handler sleeps until
    ``wake``.  Writes ``fill_done`` when everything is installed, and a progress line on the
    human stream about once a second."""

    def __init__(self, handler, log):
        self.h, self.log = handler, log
        self.todo = None
        self.cur = None
        self.total = self.passed = self.pages = 0
        self.t0 = self.next_line = 0.0
        self.finished = False

    def _plan(self):
        h = self.h
        size = h.source.size
        regs = sorted(((r.offset, s, r) for s in h.served.values() for r in s.regions
                       if r.offset is not None), key=lambda x: x[0])
        self.todo = []
        for off, s, r in regs:
            end = r.end if size is None else min(r.end, r.start + max(0, size - off))
            end = -(-end // h.page_size) * h.page_size if end > r.start else r.start
            if end > r.start:
                self.todo.append((s, r, end))
                self.total += end - r.start
        plan = getattr(h.source, "plan", None)
        if plan is not None:
            plan([(r.offset, r.offset + end - r.start) for s, r, end in self.todo], PRIO_FILL)
        self.t0 = self.next_line = time.monotonic()

    def __call__(self):
        """One step: True (more to do now), None (waiting for a fetch), False (done)."""
        if self.finished:
            return False
        if self.todo is None:
            self._plan()
        while True:
            if self.cur is None:
                if not self.todo:
                    return self._finish()
                s, r, end = self.todo.pop(0)
                self.cur = [s, r, r.start, end]
            s, r, a, end = self.cur
            if s.uffd.closed or s.uffd.fileno() not in self.h.served or s.find(a) is not r:
                self.passed += end - a             # gone or changed: nothing to keep there
                self.cur = None
                continue
            a = self._skip_present(r, a, end)
            if a >= end:
                self.cur = None
                continue
            self.cur[2] = a
            return self._step(s, r, a, end)

    def _skip_present(self, r, a, end):
        """The first page from ``a`` that the fast loop's readahead hint does not know as filled
        (only a hint: a page filled elsewhere costs one EEXIST)."""
        hint, shift = self.h._present, self.h.page_size.bit_length() - 1
        if hint is None:
            return a
        i = (r.offset + a - r.start) >> shift
        j = (r.offset + end - r.start) >> shift
        top = min(j, len(hint))                    # pages past the hint are not known filled
        k = hint.find(0, i, top) if i < top else i
        k = top if k < 0 else k
        self.passed += (k - i) << shift
        return a + ((k - i) << shift)

    def _step(self, s, r, a, end):
        h, ps = self.h, self.h.page_size
        n = min(PREFETCH_RUN, end - a)
        for x, y in s.removed:                     # never put source data over a removed page
            if x <= a < y:
                self.cur[2] = min(y, end)
                self.passed += self.cur[2] - a
                return True
            if a < x < a + n:
                n = x - a
        off = r.offset + (a - r.start)
        ready = getattr(h.source, "ready", None)
        if ready is not None and not ready(off, n, PRIO_FILL):
            return None
        try:
            done = h.source.fill(s.uffd, a, n, off, h.hugetlb)
        except UffdError as e:
            if e.errno == errno.EAGAIN:            # an event is pending: the loop reads it
                h.stats.add("eagain")
                return True
            if e.errno in (errno.ESRCH, errno.ENOMEM):
                h.drop(s, "exited")
                self.cur = None
                return True
            if e.errno not in (errno.EEXIST, errno.ENOENT, errno.EINVAL):
                raise
            done, n = 0, ps if e.errno == errno.EEXIST else n
        # nothing done: skip the present page (EEXIST) or the unmapped run; a short fill stopped
        # at a present page: skip that page too
        step = n if not done or done >= n else done + ps
        h.mark_filled(off, done)
        self.pages += done // ps
        h.stats.add("fill_pages", done // ps)
        self.cur[2] = a + step
        self.passed += step
        self._progress()
        return True

    def _progress(self):
        now = time.monotonic()
        if now < self.next_line or self.log.human is None:
            return
        self.next_line = now + 1.0
        try:
            self.log.human.write("fill: %.1f of %.1f MiB (%d%%), %d pages installed\n" % (
                self.passed / 1048576, self.total / 1048576,
                100 * self.passed // max(1, self.total), self.pages))
            self.log.human.flush()
        except (OSError, ValueError):
            pass

    def _finish(self):
        self.finished = True
        self.log.emit("fill_done", pages=self.pages, bytes=self.pages * self.h.page_size,
                      seconds=round(time.monotonic() - self.t0, 6))
        return False


def _merge_range(ranges, start, end):
    """Insert ``[start, end)`` into a sorted list of disjoint ranges, merging overlaps."""
    out = []
    for a, b in ranges:
        if b < start or a > end:
            out.append((a, b))
        else:
            start, end = min(a, start), max(b, end)
    out.append((start, end))
    out.sort()
    return out


###################################################################################################
#  10. ptrace (x86_64)
###################################################################################################

# Getting a uffd into another process (the technique, and what the README's "What --pid
# guarantees" promises):
#   --pid:  Attachment (seize + interrupt every thread) -> Injector.syscall(userfaultfd) at a
#           `syscall` insn (rip-2 or [vdso]) -> pidfd_getfd -> close() in the target -> restore
#           regs/mask at the final SIGTRAP signal-delivery-stop -> detach, all in try/finally.
#   -- CMD: spawn_traced (fork, PTRACE_SEIZE, seccomp RET_TRACE for mmap/brk/mremap, exec) and
#           SpawnTracer (inject at each execve exit-stop, report new private-anonymous memory).
# The uffd ioctls then run in the tool on the stolen fd: they act on the uffd's own mm.

# The syscalls injected into / filtered for an x86_64 target (asm/unistd_64.h).  These are the
# *target's* numbers, so they stay x86_64 even if the tool ever runs elsewhere.
NR_close, NR_mmap, NR_brk, NR_mremap, NR_madvise, NR_getpid = 3, 9, 12, 25, 28, 39
NR_ptrace = 101
NR_sigaltstack = 131
NR_userfaultfd = 323
KCMP_VM = 1
UFFD_TARGET_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK   #: flags of the uffd created in a target


class PtraceError(OSError):
    """A ptrace step (or a refusal to attach) failed; carries ``pid`` and the ``request`` name."""

    def __init__(self, err, msg, pid=None, request=None):
        super().__init__(err, msg)
        self.pid, self.request = pid, request

    def __str__(self):
        return self.strerror


PTRACE_TRACEME, PTRACE_PEEKDATA, PTRACE_CONT, PTRACE_KILL = 0, 2, 7, 8
PTRACE_SINGLESTEP, PTRACE_DETACH, PTRACE_SYSCALL = 9, 17, 24
PTRACE_SETOPTIONS, PTRACE_GETEVENTMSG = 0x4200, 0x4201
PTRACE_GETSIGINFO, PTRACE_SETSIGINFO = 0x4202, 0x4203
PTRACE_GETREGSET, PTRACE_SETREGSET = 0x4204, 0x4205
PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_LISTEN = 0x4206, 0x4207, 0x4208
PTRACE_GETSIGMASK, PTRACE_SETSIGMASK = 0x420a, 0x420b
PTRACE_GET_RSEQ_CONFIGURATION = 0x420f
PTRACE_O_TRACESYSGOOD, PTRACE_O_TRACEFORK, PTRACE_O_TRACEVFORK = 0x1, 0x2, 0x4
PTRACE_O_TRACECLONE, PTRACE_O_TRACEEXEC, PTRACE_O_TRACESECCOMP = 0x8, 0x10, 0x80
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE = 1, 2, 3
PTRACE_EVENT_EXEC, PTRACE_EVENT_SECCOMP, PTRACE_EVENT_STOP = 4, 7, 128
NT_PRSTATUS = 1
WALL = 0x40000000                     #: __WALL: also wait for non-leader threads
RESTART_ERRNOS = (-512, -513, -514, -516)   #: -ERESTARTSYS/NOINTR/NOHAND/RESTART_RESTARTBLOCK
_REQ_NAMES = {v: k for k, v in globals().items() if k.startswith("PTRACE_") and "_O_" not in k
              and "_EVENT_" not in k}


_ptrace_fn = None


def ptrace(request, pid, addr=0, data=0):
    """The one checked ptrace(2) call; returns the raw long, raises PtraceError.

    Must be called from the thread that attached ``pid`` (the kernel checks the tracer task)."""
    global _ptrace_fn
    if _ptrace_fn is None:
        f = libc().ptrace
        f.restype = ctypes.c_long
        f.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        _ptrace_fn = f
    ctypes.set_errno(0)
    r = _ptrace_fn(request, pid, addr, data)
    if r == -1:
        e = ctypes.get_errno()
        if e:
            name = _REQ_NAMES.get(request, hex(request))
            raise PtraceError(e, "%s(%d): %s" % (name, pid, os.strerror(e)), pid, name)
    return r


class user_regs_struct(ctypes.Structure):
    """x86_64 `struct user_regs_struct` (sys/user.h); also NT_PRSTATUS of GETREGSET."""
    _fields_ = [(n, ctypes.c_ulonglong) for n in (
        "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
        "rip cs eflags rsp ss fs_base gs_base ds es fs gs").split()]


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def signed(v):
    """Unsigned 64-bit register value → signed (for -errno tests)."""
    return v - (1 << 64) if v >= (1 << 63) else v


def get_regs(tid):
    """PTRACE_GETREGSET(NT_PRSTATUS); raises on a 32-bit tracee (short regset)."""
    regs = user_regs_struct()
    iov = iovec(ctypes.addressof(regs), ctypes.sizeof(regs))
    ptrace(PTRACE_GETREGSET, tid, NT_PRSTATUS, ctypes.addressof(iov))
    if iov.iov_len != ctypes.sizeof(regs):
        raise PtraceError(errno.ENOEXEC, "thread %d is not a 64-bit x86_64 thread" % tid, tid)
    return regs


def set_regs(tid, regs):
    """PTRACE_SETREGSET(NT_PRSTATUS)."""
    iov = iovec(ctypes.addressof(regs), ctypes.sizeof(regs))
    ptrace(PTRACE_SETREGSET, tid, NT_PRSTATUS, ctypes.addressof(iov))


def copy_regs(regs):
    """An independent copy of a regs struct."""
    return user_regs_struct.from_buffer_copy(regs)


def get_sigmask(tid):
    """PTRACE_GETSIGMASK (exact even inside ppoll/sigsuspend, whose temporary mask the kernel
    reports as the thread's own)."""
    m = ctypes.c_uint64()
    ptrace(PTRACE_GETSIGMASK, tid, 8, ctypes.addressof(m))
    return m.value


def set_sigmask(tid, mask):
    """PTRACE_SETSIGMASK."""
    m = ctypes.c_uint64(mask)
    ptrace(PTRACE_SETSIGMASK, tid, 8, ctypes.addressof(m))


def get_eventmsg(tid):
    """PTRACE_GETEVENTMSG (new pid at fork/clone, former tid at exec)."""
    m = ctypes.c_ulong()
    ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(m))
    return m.value


def get_siginfo(tid):
    """PTRACE_GETSIGINFO as raw 128 bytes (kept to re-deliver a parked signal)."""
    buf = ctypes.create_string_buffer(128)
    ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(buf))
    return buf


def wait_tid(tid, options=0):
    """waitpid with __WALL (required for non-leader threads); returns (tid, status)."""
    return os.waitpid(tid, options | WALL)


def stop_event(status):
    """(signal, ptrace event) of a stopped status."""
    return os.WSTOPSIG(status), (status >> 16) & 0xff


# -- /proc: memory maps, status, pagemap of another process ---------------------------------------

#                  start       end          perms             offset      dev          inode  path
_MAPS_RE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][ps]) ([0-9a-f]+) "
                      r"([0-9a-f]+:[0-9a-f]+) (\d+) *(.*)$")


class Mapping(tuple):
    """One /proc/PID/maps line: (start, end, perms, offset, dev, inode, path)."""
    __slots__ = ()
    start = property(lambda s: s[0])
    end = property(lambda s: s[1])
    perms = property(lambda s: s[2])
    path = property(lambda s: s[6])

    def is_private_anon(self):
        """Private anonymous memory that MISSING/WP registration accepts and watching is useful for.

        Included: anonymous private mmaps (also PROT_NONE reservations: thread stacks,
        malloc arenas), `[heap]`, and `[anon:NAME]` (prctl PR_SET_VMA_ANON_NAME).
        Excluded: `[stack]` (the kernel writes exec arguments and signal frames there; it is
        growth-on-demand, not workload data; give it with --range if wanted), `[vdso]`,
        `[vvar]`, `[vsyscall]`, shared mappings (also MAP_SHARED|MAP_ANONYMOUS, which is shmem,
        e.g. Python's default `mmap.mmap(-1, n)`) and every file mapping.
        """
        if self[2][3] != "p" or self[5] != 0:
            return False
        p = self[6]
        return p == "" or p == "[heap]" or p.startswith("[anon:")

    def is_anon_private_or_stack(self):
        """is_private_anon() or the main thread's ``[stack]``: what ``--range`` accepts."""
        return self.is_private_anon() or (self[2][3] == "p" and self[6] == "[stack]")

    def is_shared_anon(self):
        """``mmap(MAP_SHARED|MAP_ANONYMOUS)``: shmem (the kernel names it ``/dev/zero
        (deleted)``), e.g. Python's default ``mmap.mmap(-1, n)`` and multiprocessing's."""
        return self[2][3] == "s" and self[6] == "/dev/zero (deleted)"

    def is_anon(self):
        """What watch registers: private anonymous memory and shared anonymous (shmem)."""
        return self.is_private_anon() or self.is_shared_anon()

    def name(self):
        """The ``mappings`` record name: ``[heap]``, ``[stack]``, ``[anon:NAME]``, ``[shmem]``,
        ``[anon]`` (an anonymous mmap) or the file's path."""
        if self.is_shared_anon():
            return "[shmem]"
        return self[6] or "[anon]"


def parse_maps(text):
    """Parse /proc/PID/maps text into Mapping tuples."""
    out = []
    for line in text.splitlines():
        m = _MAPS_RE.match(line)
        if m:
            out.append(Mapping((int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16), m[5],
                                int(m[6]), m[7])))
    return out


def read_maps(pid):
    """Mappings of a process."""
    with open("/proc/%d/maps" % pid) as f:
        return parse_maps(f.read())


def proc_status(pid):
    """/proc/PID/status as a dict of stripped strings."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def pss_anon_kib(pid="self"):
    """``Pss_Anon`` of /proc/PID/smaps_rollup in KiB: the process's share of anonymous memory
    (pages shared with a forking parent count in part), or None where the kernel lacks it."""
    try:
        with open("/proc/%s/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def elf_is_x86_64(pid):
    """True if /proc/PID/exe is an ELFCLASS64 EM_X86_64 binary (rejects i386 and x32)."""
    with open("/proc/%d/exe" % pid, "rb") as f:
        h = f.read(20)
    return (len(h) == 20 and h[:4] == b"\x7fELF" and h[4] == 2
            and struct.unpack_from("<H", h, 18)[0] == 62)


def same_mm(pid1, pid2):
    """kcmp(KCMP_VM): do two tasks share one mm? (decides whether a clone needs its own uffd)"""
    return syscall("kcmp", pid1, pid2, KCMP_VM, 0, 0) == 0


def pidfd_getfd(pid, fd):
    """Duplicate fd number `fd` of process pid into our table (kernel >= 5.6)."""
    pidfd = syscall("pidfd_open", pid, 0)
    try:
        return syscall("pidfd_getfd", pidfd, fd, 0)
    finally:
        os.close(pidfd)


# -- injection: a syscall run inside a stopped target, safe to abandon ----------------------------


class InjectError(PtraceError):
    """An injected syscall returned -errno inside the target."""


def find_syscall_insn(pid, regs):
    """Address of a `syscall` (0f 05) the tracee may execute (rip-2 after a syscall-stop, or
    one in [vdso])."""
    with open("/proc/%d/mem" % pid, "rb", buffering=0) as mem:
        if signed(regs.orig_rax) >= 0 and signed(regs.rax) in RESTART_ERRNOS:
            try:
                if os.pread(mem.fileno(), 2, regs.rip - 2) == b"\x0f\x05":
                    return regs.rip - 2
            except OSError:
                pass
        for m in read_maps(pid):
            if m.path == "[vdso]":
                i = os.pread(mem.fileno(), m.end - m.start, m.start).find(b"\x0f\x05")
                if i >= 0:
                    return m.start + i
    raise PtraceError(errno.ENOEXEC, "no syscall instruction found in process %d" % pid, pid)


# The self-restoring injection (README "What --pid guarantees").  The tool may be SIGKILLed at
# any instruction, and the kernel then detaches the target with whatever registers, signal mask
# and pending stop it has at that moment.  So every injected syscall runs at a `syscall; ret`
# found in the target's own code, with the stack pointer at an x86_64 rt_sigframe that the
# tool wrote below the red zone; its return address is a `mov $15,%rax; syscall`
# (rt_sigreturn) gadget.  Left alone, the target finishes the injected syscall, returns into
# rt_sigreturn and restores its own registers (an interrupted syscall rewound to run again),
# signal mask and FPU state.  The tool never writes code.  Stops are syscall stops with
# TRACESYSGOOD (a vanished tracer leaves SIGTRAP|0x80, which is not a signal, so nothing is
# delivered), never single-steps (a vanished tracer would leave TF set and SIGTRAP kill).  The
# mask is blocked only after the registers point at the frame and restored before they are put
# back.  In the normal case the tool restores the saved registers itself at the last
# syscall-exit stop (exact restart semantics, restart_block kept) and detaches.
SYSCALL_RET = b"\x0f\x05\xc3"                          # syscall; ret
SIGRETURN_GADGETS = (b"\x48\xc7\xc0\x0f\x00\x00\x00\x0f\x05",   # mov $15,%rax; syscall
                     b"\xb8\x0f\x00\x00\x00\x0f\x05")               # mov $15,%eax; syscall
NT_X86_XSTATE = 0x202
FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2 = 0x46505853, 0x46505845
UC_FP_XSTATE, UC_SIGCONTEXT_SS = 1, 2
RED_ZONE = 128
SIGFRAME_BYTES = 8 + 304 + 128                 #: pretcode + ucontext + siginfo (x86_64)
ALL_SIGNALS = 0xFFFFFFFFFFFFFFFF

#: The named steps of the injection where the test-only ``UFFDTOOL_TEST_PAUSE`` hook
#: (``_test_pause``, CLI section) can stop the tool, so that a test's SIGKILL lands exactly there.
INJECTION_STEPS = ("seized", "frame-written", "regs-injected", "mask-blocked", "syscall-entry",
                   "syscall-exit", "mask-restored", "regs-restored", "armed")


def _test_kill_timer():
    """Test-only hook: UFFDTOOL_TEST_KILL_AFTER_US=N arms a POSIX timer that SIGKILLs the tool N
    microseconds from now (called right after the target is seized): a real asynchronous kill
    at an arbitrary instruction of the injection."""
    us = os.environ.get("UFFDTOOL_TEST_KILL_AFTER_US")
    if not us:
        return
    sev = (ctypes.c_int * 16)()
    sev[2], sev[3] = signal.SIGKILL, 0                  # sigev_signo, sigev_notify = SIGEV_SIGNAL
    tid = ctypes.c_void_p()
    libc().timer_create(1, ctypes.byref(sev), ctypes.byref(tid))    # CLOCK_MONOTONIC
    ns = max(1, int(float(us) * 1000))
    its = (ctypes.c_long * 4)(0, 0, ns // 10 ** 9, ns % 10 ** 9)
    libc().timer_settime(tid, 0, ctypes.byref(its), None)


def find_gadgets(pid):
    """(address of ``syscall; ret``, address of an rt_sigreturn gadget) in pid's file-backed
    executable mappings (ld.so and libc first), or None.  Read before the target is stopped;
    the Injector checks the bytes again once it is."""
    maps = [m for m in read_maps(pid) if m.perms[2] == "x" and m[5] != 0]
    maps.sort(key=lambda m: ("/ld-" not in m.path, "libc" not in m.path))
    sc = sr = None
    with open("/proc/%d/mem" % pid, "rb", buffering=0) as mem:
        for m in maps:
            try:
                data = os.pread(mem.fileno(), m.end - m.start, m.start)
            except OSError:
                continue
            if sc is None and data.find(SYSCALL_RET) >= 0:
                sc = m.start + data.find(SYSCALL_RET)
            for g in SIGRETURN_GADGETS:
                if sr is None and data.find(g) >= 0:
                    sr = m.start + data.find(g)
            if sc is not None and sr is not None:
                return sc, sr
    return None


def get_xstate(tid):
    """PTRACE_GETREGSET(NT_X86_XSTATE): the XSAVE image, whose sw_reserved bytes the kernel
    fills like a signal frame's (so it can go into one as it is), or None."""
    buf = ctypes.create_string_buffer(16384)
    iov = iovec(ctypes.addressof(buf), len(buf))
    try:
        ptrace(PTRACE_GETREGSET, tid, NT_X86_XSTATE, ctypes.addressof(iov))
    except PtraceError:
        return None
    return buf.raw[:iov.iov_len]


def _sigframe(saved, mask, xstate, frame, fpstate, sigreturn):
    """The bytes of an rt_sigframe at ``frame`` (+ FPU state at ``fpstate``) that rt_sigreturn
    turns back into the state ``saved``/``mask``.  An interrupted syscall (-ERESTART*) is
    rewound to run again (for -ERESTART_RESTARTBLOCK the original call, with its full timeout:
    rt_sigreturn voids the restart block).  uc_stack has invalid flags, so rt_sigreturn leaves
    the thread's sigaltstack as it is (restore_altstack ignores all but EFAULT)."""
    r = copy_regs(saved)
    if signed(r.orig_rax) >= 0 and signed(r.rax) in RESTART_ERRNOS:
        r.rip, r.rax = r.rip - 2, r.orig_rax
    sc = struct.pack("<18Q4H5Q64x", r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi,
                     r.rsi, r.rbp, r.rbx, r.rdx, r.rax, r.rcx, r.rsp, r.rip, r.eflags,
                     r.cs & 0xffff, r.gs & 0xffff, r.fs & 0xffff, r.ss & 0xffff,
                     0, 0, 0, 0, fpstate if xstate else 0)
    uc = struct.pack("<QQQi4xQ", UC_FP_XSTATE | UC_SIGCONTEXT_SS, 0, 0, 3, 0) + sc + \
        struct.pack("<Q", mask)
    out = struct.pack("<Q", sigreturn) + uc + bytes(128)
    assert len(out) == SIGFRAME_BYTES
    if xstate:     # ptrace puts XCR0 into sw_reserved; a signal frame wants _fpx_sw_bytes there
        n, xcr0 = len(xstate), struct.unpack_from("<Q", xstate, 464)[0]
        sw = struct.pack("<IIQI28x", FP_XSTATE_MAGIC1, n + 4, xcr0, n)
        fp = xstate[:464] + sw + xstate[512:] + struct.pack("<I", FP_XSTATE_MAGIC2)
        out += bytes(fpstate - frame - len(out)) + fp
    return out


class Injector:
    """Run syscalls inside one stopped tracee thread; restores everything in `restore()`.

    Usage (the thread must be in a ptrace-stop, attached by the calling thread):
        inj = Injector(tid, pid, gadgets); try: inj.syscall(NR_getpid) ... finally: inj.restore()
    With ``gadgets`` (``find_gadgets``) the injection is self-restoring (see above); without
    (no gadget, or no room for the frame) it single-steps a `syscall` at rip-2 or in [vdso]
    and relies on `restore()` alone.  After restore() the tracee has its original registers
    and mask; the caller resumes it with `inj.resume_signal` (DETACH/CONT).
    """

    def __init__(self, tid, pid=None, gadgets=None):
        self.tid, self.pid = tid, pid or tid
        self.saved = get_regs(tid)
        self.saved_mask = get_sigmask(tid)
        self.insn = None
        self.parked = []           # (signo, siginfo) that slipped in; re-delivered on resume
        self.injected = self.blocked = False
        self.frame = None          # (sp, low, high) of the self-restoring frame
        self.scratch = None        # the bytes the frame overwrote
        if gadgets is not None:
            self.frame = self._write_frame(gadgets)
        if self.frame is None:     # single-stepping: block signals for the whole stop
            set_sigmask(tid, ALL_SIGNALS)
            self.blocked = True

    def _write_frame(self, gadgets):
        """Check the gadgets, write the rt_sigframe below the red zone; (sp, low, high) or None."""
        sc, sr = gadgets
        try:
            with open("/proc/%d/mem" % self.pid, "r+b", buffering=0) as mem:
                ret = os.pread(mem.fileno(), 9, sr)
                if (os.pread(mem.fileno(), 3, sc) != SYSCALL_RET or
                        not any(ret.startswith(g) for g in SIGRETURN_GADGETS)):
                    return None
                xstate = get_xstate(self.tid)
                top = self.saved.rsp - RED_ZONE
                fpstate = (top - len(xstate or b"") - 8) & ~63
                frame = (fpstate - SIGFRAME_BYTES) & ~15
                data = _sigframe(self.saved, self.saved_mask, xstate, frame, fpstate, sr)
                self.scratch = os.pread(mem.fileno(), len(data), frame)
                if (len(self.scratch) != len(data)
                        or os.pwrite(mem.fileno(), data, frame) != len(data)):
                    return None
        except OSError:
            return None
        self.insn = sc
        _test_pause("frame-written")
        return frame, frame, frame + len(data)

    def syscall(self, nr, *args):
        """Execute syscall nr(args) in the tracee; return the result, raise InjectError on
        -errno."""
        if self.insn is None:
            self.insn = find_syscall_insn(self.pid, self.saved)
        r = copy_regs(self.saved)
        r.rax, r.orig_rax, r.rip = nr, (1 << 64) - 1, self.insn
        if self.frame is not None:
            r.rsp = self.frame[0]
        for name, a in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(r, name, a & 0xFFFFFFFFFFFFFFFF)
        set_regs(self.tid, r)
        self.injected = True
        _test_pause("regs-injected")
        if not self.blocked:       # only now: the frame would unblock them again
            set_sigmask(self.tid, ALL_SIGNALS)
            self.blocked = True
            _test_pause("mask-blocked")
        res = self._run_stops(r) if self.frame is not None else self._run_steps()
        if -4096 < res < 0:
            raise InjectError(-res, "%s in process %d: %s" % (
                _NR_NAMES.get(nr, nr), self.pid, os.strerror(-res)), self.pid)
        return res

    def _stopped(self):
        """Wait for the tracee's next stop; (signal, event); raises if it died."""
        _, status = wait_tid(self.tid)
        if not os.WIFSTOPPED(status):
            raise PtraceError(errno.ESRCH, "process %d died during injection" % self.pid, self.pid)
        sig, ev = stop_event(status)
        if not ev and sig not in (signal.SIGTRAP, signal.SIGTRAP | 0x80):
            self.parked.append((sig, get_siginfo(self.tid)))    # a signal slipped in: park it
        return sig, ev

    def _run_stops(self, regs):
        """The syscall runs between a syscall-entry and a syscall-exit stop (PTRACE_SYSCALL)."""
        entered = False
        while True:
            ptrace(PTRACE_SYSCALL, self.tid, 0, 0)
            sig, ev = self._stopped()
            if sig != signal.SIGTRAP | 0x80 or ev:
                continue
            if not entered:
                entered = True
                _test_pause("syscall-entry")
                continue
            _test_pause("syscall-exit")
            res = signed(get_regs(self.tid).rax)
            if res not in RESTART_ERRNOS:
                return res
            set_regs(self.tid, regs)               # interrupted: run it again
            entered = False

    def _run_steps(self):
        """Fallback: single-step over the `syscall`, then restore the saved registers."""
        while True:
            ptrace(PTRACE_SINGLESTEP, self.tid, 0, 0)
            sig, ev = self._stopped()
            if sig != signal.SIGTRAP or ev:
                continue
            now = get_regs(self.tid)
            if now.rip != self.insn + 2:
                continue                           # rewound for a restart: step again
            res = signed(now.rax)
            if res not in RESTART_ERRNOS:          # else the kernel re-executes it
                return res

    def userfaultfd(self, flags=UFFD_TARGET_FLAGS):
        """Create a uffd in the tracee, take our copy (pidfd_getfd), close the tracee's.

        With the tracee's copy closed, a tool crash releases the uffd and faults fall back to
        normal handling (no fd of the target keeps the context alive)."""
        try:
            tfd = self.syscall(NR_userfaultfd, flags)
        except InjectError as e:
            if e.errno == errno.EPERM:
                raise PtraceError(errno.EPERM, "userfaultfd() in process %d: EPERM (the target "
                                  "lacks CAP_SYS_PTRACE and vm.unprivileged_userfaultfd=0; "
                                  "sysctl -w vm.unprivileged_userfaultfd=1)" % self.pid,
                                  self.pid) from None
            raise
        try:
            return pidfd_getfd(self.pid, tfd)
        finally:
            self.syscall(NR_close, tfd)

    def sigaltstack(self):
        """The tracee thread's alternate signal stack as (start, length), or None (disabled,
        or no frame to receive it: the scratch is the frame's unused siginfo slot)."""
        if self.frame is None:
            return None
        scratch = self.frame[0] + 8 + 304
        self.syscall(NR_sigaltstack, 0, scratch)
        with open("/proc/%d/mem" % self.pid, "rb", buffering=0) as mem:
            sp, flags, size = struct.unpack("<Qi4xQ", os.pread(mem.fileno(), 24, scratch))
        return None if flags & 2 or not size else (sp, size)         # SS_DISABLE

    def restore(self):
        """Put back the saved mask, then the registers (in this order: until the registers
        are back, the frame would restore the mask if the tool vanished)."""
        if self.blocked:
            set_sigmask(self.tid, self.saved_mask)
            _test_pause("mask-restored")
        if self.injected:
            set_regs(self.tid, self.saved)
            _test_pause("regs-restored")
        if self.frame is not None and self.scratch is not None:
            self._put_back_scratch()

    def _put_back_scratch(self):
        """Put back the bytes the frame overwrote below the red zone: dead stack for C, but a
        runtime may keep data below its stack pointer's red zone (Go's goroutine stacks are
        small and sit among other memory), so the normal path leaves memory as it was."""
        try:
            with open("/proc/%d/mem" % self.pid, "r+b", buffering=0) as mem:
                os.pwrite(mem.fileno(), self.scratch, self.frame[1])
        except OSError:
            pass
        self.scratch = None

    @property
    def resume_signal(self):
        """Signal to pass when resuming (the first parked one; the rest are re-sent with tgkill)."""
        for sig, _ in self.parked[1:]:
            try:
                os.kill(self.pid, sig)
            except OSError:
                pass
        if self.parked:
            ptrace(PTRACE_SETSIGINFO, self.tid, 0, ctypes.addressof(self.parked[0][1]))
            return self.parked[0][0]
        return 0


_NR_NAMES = {NR_userfaultfd: "userfaultfd()", NR_close: "close()", NR_madvise: "madvise()",
             NR_getpid: "getpid()", NR_mmap: "mmap()", NR_sigaltstack: "sigaltstack()"}


def check_pid(pid):
    """/proc/PID/status of a process that can be watched; ProcessLookupError naming what the
    pid really is otherwise: gone, a zombie, or a thread of another process."""
    try:
        st = proc_status(pid)
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(errno.ESRCH, "no such process: %d" % pid) from None
    if st.get("State", "").startswith("Z"):
        raise ProcessLookupError(errno.ESRCH, "PID %d is a zombie (it has exited; its parent "
                                 "has not reaped it)" % pid)
    if st.get("Tgid", str(pid)) != str(pid):
        raise ProcessLookupError(errno.ESRCH, "%d is a thread of PID %s: give the process id"
                                 % (pid, st["Tgid"]))
    return st


def check_attachable(pid):
    """Refuse early (clear OSError) for targets we cannot or must not inject into."""
    st = check_pid(pid)
    if pid == os.getpid():
        raise PtraceError(errno.EINVAL, "cannot attach to the tool itself (use --self)", pid)
    if os.uname().machine != "x86_64":
        raise PtraceError(errno.ENOSYS, "--pid needs x86_64 (this machine is %s)"
                          % os.uname().machine, pid)
    if st.get("Seccomp", "0") != "0":
        raise PtraceError(errno.EPERM, "process %d runs under seccomp (Seccomp: %s); an injected "
                          "userfaultfd() could be denied or kill it, refusing"
                          % (pid, st["Seccomp"]), pid)
    if st.get("TracerPid", "0") != "0":
        raise PtraceError(errno.EPERM, "process %d is already traced by pid %s"
                          % (pid, st["TracerPid"]), pid)
    try:
        ok = elf_is_x86_64(pid)
    except PermissionError:
        raise PtraceError(errno.EPERM, "no permission to inspect process %d" % pid, pid) from None
    except OSError:
        ok = True            # kernel threads etc. fail later with a clear ptrace error
    if not ok:
        raise PtraceError(errno.ENOEXEC, "process %d is not a 64-bit x86_64 program" % pid, pid)


def _seize_stop(tid):
    """PTRACE_SEIZE + INTERRUPT, wait for the PTRACE_EVENT_STOP; pass on signals seen first.
    TRACESYSGOOD: the injection's syscall stops must not be SIGTRAP stops (see Injector)."""
    ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD)
    ptrace(PTRACE_INTERRUPT, tid, 0, 0)
    while True:
        _, status = wait_tid(tid)
        if not os.WIFSTOPPED(status):
            raise ProcessLookupError(errno.ESRCH, "thread %d exited during attach" % tid)
        sig, ev = stop_event(status)
        if ev == PTRACE_EVENT_STOP:
            return
        ptrace(PTRACE_CONT, tid, 0, sig if not ev else 0)   # signal-delivery-stop: pass it on


class Attachment:
    """Stop a running process (all threads by default) for injection; undo in `detach()`.

    `with Attachment(pid) as a: fd = a.inj.syscall(...)`; `a.stopped_seconds` afterwards.
    Everything after the first stop is undone in a finally, also on KeyboardInterrupt.
    """

    def __init__(self, pid, all_threads=True):
        self.pid, self.all_threads = pid, all_threads
        self.tids, self.inj, self.t0, self.stopped_seconds = [], None, None, 0.0

    def __enter__(self):
        check_attachable(self.pid)
        try:
            gadgets = find_gadgets(self.pid)       # before the stop: it reads the libraries
        except OSError:
            gadgets = None
        self.t0 = time.monotonic()
        try:
            try:
                _seize_stop(self.pid)
                _test_kill_timer()
                _test_pause("seized")
            except PtraceError as e:
                if e.errno == errno.ESRCH:
                    raise ProcessLookupError(errno.ESRCH,
                                             "no such process: %d" % self.pid) from None
                if e.errno == errno.EPERM:
                    raise PtraceError(
                        errno.EPERM, "cannot ptrace process %d (already traced, other user "
                        "without CAP_SYS_PTRACE, or not dumpable)" % self.pid, self.pid) from None
                raise
            self.tids.append(self.pid)
            if self.all_threads:
                self._stop_all_threads()
            self.inj = Injector(self.pid, gadgets=gadgets)
            if signed(self.inj.saved.cs) != 0x33:        # __USER_CS: 64-bit code segment
                raise PtraceError(errno.ENOEXEC, "process %d runs 32-bit code" % self.pid, self.pid)
            return self
        except BaseException:
            self.detach()
            raise

    def _stop_all_threads(self):
        """Seize every thread, repeating until /proc/PID/task is stable (threads may spawn)."""
        while True:
            new = [int(t) for t in os.listdir("/proc/%d/task" % self.pid)
                   if int(t) not in self.tids]
            if not new:
                return
            for tid in new:
                try:
                    _seize_stop(tid)
                    self.tids.append(tid)
                except (PtraceError, ProcessLookupError):
                    pass                              # the thread exited meanwhile

    def detach(self):
        """Restore regs/mask of the injected thread and detach every thread (never raises ESRCH)."""
        sig = 0
        if self.inj is not None:
            try:
                self.inj.restore()
                sig = self.inj.resume_signal
            except OSError:
                pass
        for tid in reversed(self.tids):
            try:
                ptrace(PTRACE_DETACH, tid, 0, sig if tid == self.pid else 0)
            except OSError:
                pass
        self.tids = []
        if self.t0 is not None:
            self.stopped_seconds = time.monotonic() - self.t0

    def __exit__(self, *exc):
        self.detach()

    def kernel_pages(self):
        """Pages the kernel itself accesses in kernel mode, where it cannot wait for a userfault
        (or not at that moment): ``--dontneed`` must never drop them.  Per stopped thread: its
        rseq area (written on every return to user space, also between our madvise and
        UFFDIO_REGISTER, which re-populated the dropped page with zeros: the redis crash), its
        robust futex list (walked at thread exit, where userfaults are refused), its TCB page(s)
        at fs_base (clear_child_tid cannot be read from outside; glibc and musl keep it there),
        and for the injected thread its sigaltstack and the injection frame.  A set of page
        addresses; all threads must be stopped."""
        keep = set()

        def span(addr, n):
            if addr:
                keep.update(range(addr & -PAGE_SIZE, addr + max(n, 1), PAGE_SIZE))
        with open("/proc/%d/mem" % self.pid, "rb", buffering=0) as mem:
            for tid in self.tids:
                try:
                    span(get_regs(tid).fs_base, TCB_KEEP)
                    span(*get_rseq(tid))
                    for a, n in robust_list(tid, mem.fileno()):
                        span(a, n)
                except OSError:
                    pass                            # the thread is gone; so is its kernel use
        if self.inj.frame is not None:
            span(self.inj.frame[1], self.inj.frame[2] - self.inj.frame[1])
        try:
            span(*(self.inj.sigaltstack() or (0, 0)))
        except OSError:
            pass
        return keep

    def drop(self, runs, keep=()):
        """MADV_DONTNEED the page runs ``[(start, end)]`` minus the pages in ``keep``, merging
        adjacent runs so that few madvise calls are injected; returns the number of calls."""
        calls = 0
        for a, b in merge_runs(subtract_pages(runs, keep)):
            self.inj.syscall(NR_madvise, a, b - a, MADV_DONTNEED)
            calls += 1
        return calls


TCB_KEEP = 4096        #: bytes kept from fs_base: glibc's struct pthread (tid, robust head, rseq)


def get_rseq(tid):
    """(address, size) of a thread's registered rseq area (PTRACE_GET_RSEQ_CONFIGURATION), or
    (0, 0) if none or the kernel lacks the request."""
    buf = ctypes.create_string_buffer(32)
    try:
        ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, 32, ctypes.addressof(buf))
    except PtraceError:
        return 0, 0
    addr, size = struct.unpack_from("<QI", buf.raw)
    return addr, size


def robust_list(tid, memfd, limit=2048):
    """[(address, length)] the kernel touches at thread exit for tid's robust futex list: the
    head, each entry, each entry's futex word and the pending one (get_robust_list(2))."""
    head, size = ctypes.c_void_p(), ctypes.c_size_t()
    syscall("get_robust_list", tid, ctypes.addressof(head), ctypes.addressof(size))
    if not head.value:
        return []
    h = head.value

    def word(a, fmt="<Q"):
        return struct.unpack(fmt, os.pread(memfd, 8, a))[0]
    out = [(h, 24)]
    offset, pending = word(h + 8, "<q"), word(h + 16)
    entry = word(h)
    while entry and entry != h and len(out) < limit:
        out += [(entry, 8), (entry + offset, 4)]
        entry = word(entry)
    if pending:
        out += [(pending, 8), (pending + offset, 4)]
    return out


def subtract_pages(runs, pages):
    """The runs ``[(start, end)]`` with the given page addresses cut out."""
    out = []
    cuts = sorted(pages)
    for a, b in runs:
        i = bisect.bisect_left(cuts, a)
        while i < len(cuts) and cuts[i] < b:
            if cuts[i] > a:
                out.append((a, cuts[i]))
            a = max(a, cuts[i] + PAGE_SIZE)
            i += 1
        if a < b:
            out.append((a, b))
    return out


def merge_runs(runs):
    """Sorted runs with touching neighbours joined."""
    out = []
    for a, b in sorted(runs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def page_runs(pages):
    """Sorted page addresses -> [(start, end)] runs of contiguous pages."""
    out = []
    start = prev = None
    for p in pages:
        if p != prev:
            if start is not None:
                out.append((start, prev))
            start = p
        prev = p + PAGE_SIZE
    if start is not None:
        out.append((start, prev))
    return out


def inject_userfaultfd(pid, flags=UFFD_TARGET_FLAGS, all_threads=True, while_stopped=None):
    """Create a uffd inside process pid and return (our fd, seconds the target was stopped).

    The target's own copy is closed before detaching, so if the tool dies the uffd context is
    released and faults fall back to normal handling (no fd of the target keeps it alive).
    `while_stopped(attachment, fd)` runs before detaching (register, snapshot, madvise...).
    """
    with Attachment(pid, all_threads) as a:
        if a.inj.syscall(NR_getpid) != pid:
            raise PtraceError(errno.EIO, "injection probe failed in process %d" % pid, pid)
        fd = a.inj.userfaultfd(flags)
        try:
            if while_stopped is not None:
                while_stopped(a, fd)
        except BaseException:
            os.close(fd)
            raise
    return fd, a.stopped_seconds


# -- spawn: -- CMD under ptrace and seccomp, followed through forks and execs ---------------------

AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_ALLOW, SECCOMP_RET_TRACE = 0x7FFF0000, 0x7FF00000
MAP_PRIVATE, MAP_ANONYMOUS, MAP_TYPE = 0x02, 0x20, 0x0F
MAP_SHARED_VALIDATE, MAP_STACK = 0x03, 0x20000


class sock_filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8),
                ("k", ctypes.c_uint32)]


class sock_fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(sock_filter))]


def _bpf_watch_filter():
    """BPF: SECCOMP_RET_TRACE for brk, mremap, anonymous mmap (private or shared: shmem) and
    ptrace (a CMD that traces cannot be watched: SpawnTracer says so); allow the rest.

    seccomp_data: nr@0, arch@4, args[i]@16+8i (low word first). Jumps are relative, forward.
    """
    LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
    prog = [
        (LD, 0, 0, 4),                                    # 0 A = arch
        (JEQ, 0, 10, AUDIT_ARCH_X86_64),                  # 1 other arch -> 12 allow
        (LD, 0, 0, 0),                                    # 2 A = nr
        (JEQ, 9, 0, NR_brk),                              # 3 -> 13 trace
        (JEQ, 8, 0, NR_mremap),                           # 4 -> 13 trace
        (JEQ, 7, 0, NR_ptrace),                           # 5 -> 13 trace
        (JEQ, 0, 5, NR_mmap),                             # 6 not mmap -> 12 allow
        (LD, 0, 0, 16 + 3 * 8),                           # 7 A = low word of flags
        (AND, 0, 0, MAP_TYPE | MAP_ANONYMOUS),            # 8
        (JEQ, 3, 0, MAP_PRIVATE | MAP_ANONYMOUS),         # 9 -> 13 trace
        (JEQ, 2, 0, MAP_SHARED | MAP_ANONYMOUS),          # 10 -> 13 trace
        (JEQ, 1, 0, MAP_SHARED_VALIDATE | MAP_ANONYMOUS),  # 11 -> 13 trace
        (RET, 0, 0, SECCOMP_RET_ALLOW),                   # 12
        (RET, 0, 0, SECCOMP_RET_TRACE),                   # 13
    ]
    arr = (sock_filter * len(prog))(*[sock_filter(*i) for i in prog])
    return sock_fprog(len(prog), arr), arr


def _install_seccomp(fprog):
    """seccomp(SET_MODE_FILTER); without CAP_SYS_ADMIN the kernel wants NO_NEW_PRIVS first."""
    try:
        syscall("seccomp", 1, 0, ctypes.addressof(fprog))     # SECCOMP_SET_MODE_FILTER
    except OSError as e:
        if e.errno != errno.EACCES:
            raise
        syscall("prctl", 38, 1, 0, 0, 0)                      # PR_SET_NO_NEW_PRIVS
        syscall("seccomp", 1, 0, ctypes.addressof(fprog))


SPAWN_OPTIONS = (PTRACE_O_EXITKILL | PTRACE_O_TRACESECCOMP | PTRACE_O_TRACEEXEC |
                 PTRACE_O_TRACEFORK | PTRACE_O_TRACEVFORK | PTRACE_O_TRACECLONE |
                 PTRACE_O_TRACESYSGOOD)


class SpawnError(OSError):
    """CMD could not be started (not found, not executable); carries `cmd`."""


def spawn_traced(argv, stdout_to_stderr=False):
    """Fork CMD, PTRACE_SEIZE it with SPAWN_OPTIONS, then let it install the filter and exec.

    SEIZE (not TRACEME) because PTRACE_LISTEN, needed to keep group-stops (SIGSTOP/SIGTSTP)
    working, exists only for seized tracees, and auto-attached descendants inherit that.
    Order matters: the filter is installed only after the tracer with TRACESECCOMP exists,
    otherwise the child's own mmap/brk would fail with ENOSYS (seccomp(2), RET_TRACE).
    The child only reads a pipe, calls seccomp via ctypes (prepared here) and execs.
    Returns (pid, fd): fd is the read end of the CLOEXEC pipe on which a failed exec reports
    ``Name:hex-errno:message`` (EOF when exec succeeded).  ``stdout_to_stderr``: CMD's stdout
    is the tool's stderr (when the tool's stdout carries the JSON log).
    """
    fprog, keep = _bpf_watch_filter()
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:                                          # child
        try:
            os.close(go_w)
            os.close(err_r)
            os.read(go_r, 1)
            os.close(go_r)
            for s in (signal.SIGPIPE, signal.SIGXFSZ):    # Python ignores these; exec keeps SIG_IGN
                signal.signal(s, signal.SIG_DFL)
            if stdout_to_stderr:
                os.dup2(2, 1)
            _install_seccomp(fprog)
            os.execvp(argv[0], argv)
        except BaseException as e:
            try:
                os.write(err_w, ("%s:%x:%s" % (type(e).__name__, getattr(e, "errno", 0) or 0,
                                               getattr(e, "strerror", "") or e)).encode())
            finally:
                os._exit(127)
    os.close(go_r)
    os.close(err_w)
    try:
        ptrace(PTRACE_SEIZE, pid, 0, SPAWN_OPTIONS)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.close(go_w)
        os.close(err_r)
        os.waitpid(pid, 0)
        raise
    os.write(go_w, b"g")
    os.close(go_w)
    # The exec result arrives through err_r; while waiting, the child may stop on seccomp
    # (Python's exec path mmaps). The caller's loop serves those; we only peek at err_r later.
    return pid, err_r


class SpawnTracer:
    """The tracer loop for `watch -- CMD` (runs in the thread that called spawn_traced).

    Callbacks (all called in this thread, while the reporting tracee is stopped):
      on_exec(pid, fd)              a new program image runs in pid; fd = our copy of its uffd
                                    (None if injection failed) - register its anon mappings now
      on_map(pid, start, end, name) [start, end) became anonymous memory in pid's mm (private
                                    or shared); name: '[heap]' (brk), '[thread-stack]' (mmap
                                    with MAP_STACK), '[shmem]', '[anon]', None (mremap: the
                                    moved mapping's own)
      on_fork(parent, child, same)  a new task; same=True if it shares the parent's mm
      on_exit(pid, status)          a traced task is gone (status from waitpid)
    `run()` returns CMD's exit status (128+signal if killed) once every tracee is gone.

    A tracee that calls ptrace itself (strace, gdb: PTRACE_TRACEME would fail, it is already
    traced) is stopped before the call: every tracee is killed and ``run`` raises UsageError.
    vfork/posix_spawn children (CLONE_VM|CLONE_VFORK) run in the parent's mm, so they have no
    uffd of their own until they exec (no FORK uffd event either); ``tasks`` maps them to their
    own tgid, which their faults on the parent's uffd are attributed to.
    """

    def __init__(self, argv, on_exec, on_map, on_fork=None, on_exit=None,
                 inject_flags=UFFD_TARGET_FLAGS, stdout_to_stderr=False):
        self.argv = argv
        self.stdout_to_stderr = stdout_to_stderr
        self.on_exec, self.on_map = on_exec, on_map
        self.on_fork, self.on_exit = on_fork or (lambda *a: None), on_exit or (lambda *a: None)
        self.inject_flags = inject_flags
        self.root = None
        self.tasks = {}                 # tid -> tgid of every live tracee
        self.pending = {}               # tid -> ("seccomp", nr, args) | ("exec",): at exit-stop
        self.brk = {}                   # tgid -> current brk
        self.status = None
        self.exec_error = None
        self.inject_error = None
        self.stopped_seconds = 0.0
        self.held = set()               # new tasks stopped until their parent's event names them
        self.refused = None             # UsageError: a tracee called ptrace
        self._err_r = None

    def start(self):
        """Fork and seize CMD; raises SpawnError/PtraceError."""
        self.root, self._err_r = spawn_traced(self.argv, self.stdout_to_stderr)
        self.tasks[self.root] = self.root
        return self.root

    def _check_exec_error(self):
        """Read the child's CLOEXEC pipe: empty = exec succeeded."""
        data = os.read(self._err_r, 4096)
        os.close(self._err_r)
        self._err_r = None
        if data:
            name, _, rest = data.decode(errors="replace").partition(":")
            code, _, msg = rest.partition(":")
            self.exec_error = SpawnError(int(code, 16) or errno.ENOENT,
                                         "%s: %s" % (self.argv[0], msg))

    def run(self):
        """Serve ptrace stops until no tracee is left; return CMD's exit status."""
        while True:
            try:
                tid, status = os.waitpid(-1, WALL)
            except ChildProcessError:
                break
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._gone(tid, status)
                continue
            if not os.WIFSTOPPED(status):
                continue
            try:
                self._stop(tid, status)
            except ProcessLookupError:
                pass
            except PtraceError as e:
                if e.errno != errno.ESRCH:          # tracee vanished (SIGKILL): its exit follows
                    raise
        if self._err_r is not None:
            self._check_exec_error()
        if self.exec_error is not None:
            raise self.exec_error
        if self.refused is not None:
            raise self.refused
        return self.status

    def _gone(self, tid, status):
        tgid = self.tasks.pop(tid, tid)
        self.pending.pop(tid, None)
        if tid == self.root:
            self.status = (os.WEXITSTATUS(status) if os.WIFEXITED(status)
                           else 128 + os.WTERMSIG(status))
        if tid == tgid:
            self.brk.pop(tgid, None)
        self.on_exit(tid, status)
        for h in list(self.held):               # its parent died before reporting the fork
            try:
                parent = int(proc_status(h).get("PPid", 0))
            except (OSError, ValueError):
                parent = 0
            if parent not in self.tasks:
                self.held.discard(h)
                self.tasks[h] = _tgid_of(h)
                try:
                    ptrace(PTRACE_CONT, h, 0, 0)
                except OSError:
                    pass

    def _stop(self, tid, status):
        sig, ev = stop_event(status)
        if tid not in self.tasks:
            # A new task can report its first stop before its parent's FORK/CLONE event: keep it
            # stopped until that event tells us which mm (and uffd) it belongs to.
            if ev == PTRACE_EVENT_STOP:
                self.held.add(tid)
                return
            self.tasks[tid] = _tgid_of(tid)
        if sig == (signal.SIGTRAP | 0x80):     # syscall-exit-stop we asked for
            self._syscall_exit(tid)
            return
        if ev == PTRACE_EVENT_SECCOMP:
            r = get_regs(tid)
            if r.orig_rax == NR_ptrace:
                return self._refuse_ptrace(tid)
            self.pending[tid] = ("seccomp", r.orig_rax, (r.rdi, r.rsi, r.rdx, r.r10, r.r8))
            ptrace(PTRACE_SYSCALL, tid, 0, 0)
        elif ev == PTRACE_EVENT_EXEC:
            old = get_eventmsg(tid)
            if old != tid:                      # a non-leader thread exec'd: it took the tgid
                self.tasks.pop(old, None)
            self.tasks[tid] = tid
            self.pending[tid] = ("exec",)
            ptrace(PTRACE_SYSCALL, tid, 0, 0)   # inject at execve's exit-stop, not here
        elif ev in (PTRACE_EVENT_FORK, PTRACE_EVENT_VFORK, PTRACE_EVENT_CLONE):
            child = get_eventmsg(tid)
            parent_tgid = self.tasks.get(tid, tid)
            try:
                same = same_mm(tid, child)
            except OSError:
                same = ev != PTRACE_EVENT_FORK
            shares_tgid = ev == PTRACE_EVENT_CLONE and os.path.exists(
                "/proc/%d/task/%d" % (parent_tgid, child))
            self.tasks[child] = parent_tgid if shares_tgid else child
            if not shares_tgid and parent_tgid in self.brk:
                self.brk[child] = self.brk[parent_tgid]
            self.on_fork(parent_tgid, child, same)
            if child in self.held:
                self.held.discard(child)
                ptrace(PTRACE_CONT, child, 0, 0)
            ptrace(PTRACE_CONT, tid, 0, 0)
        elif ev == PTRACE_EVENT_STOP:
            if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
                ptrace(PTRACE_LISTEN, tid, 0, 0)   # group-stop: stay stopped, report SIGCONT
            else:
                ptrace(PTRACE_CONT, tid, 0, 0)     # new-child or post-LISTEN stop
        elif ev:
            ptrace(PTRACE_CONT, tid, 0, 0)
        else:                                       # signal-delivery-stop: deliver it
            ptrace(PTRACE_CONT, tid, 0, sig)

    def _refuse_ptrace(self, tid):
        """CMD (or a descendant) is about to call ptrace: it cannot, since we trace it."""
        if self.refused is None:
            self.refused = UsageError(
                "CMD calls ptrace (process %d, %s): a program that traces others (strace, gdb) "
                "cannot run under 'watch -- CMD', which traces it already; start it alone and "
                "watch the traced program with --pid PID" % (tid, _comm_of(tid) or "?"))
        self.kill_all()

    def _syscall_exit(self, tid):
        p = self.pending.pop(tid, None)
        tgid = self.tasks.get(tid, tid)
        if p is None:
            ptrace(PTRACE_CONT, tid, 0, 0)
            return
        if p[0] == "exec":
            if tid == self.root and self._err_r is not None:
                os.close(self._err_r)           # exec worked (the pipe was CLOEXEC)
                self._err_r = None
            self._inject_at_exec(tid)
            return
        _, nr, args = p
        r = get_regs(tid)
        res = signed(r.rax)
        page = PAGE_SIZE
        if nr == NR_brk:
            old = self.brk.get(tgid)
            if old is None:
                old = _start_brk(tgid)
            if res > old:
                self.on_map(tgid, (old + page - 1) & -page, (res + page - 1) & -page, "[heap]")
            self.brk[tgid] = res
        elif not -4096 < res < 0 and nr in (NR_mmap, NR_mremap):
            length = args[1] if nr == NR_mmap else args[2]
            name = None
            if nr == NR_mmap:
                flags = args[3]
                name = ("[thread-stack]" if flags & MAP_STACK else "[shmem]" if flags & MAP_TYPE
                        in (MAP_SHARED, MAP_SHARED_VALIDATE) else "[anon]")
            self.on_map(tgid, res, res + ((length + page - 1) & -page), name)
        ptrace(PTRACE_CONT, tid, 0, 0)

    def _inject_at_exec(self, tid):
        """At execve's syscall-exit-stop: create the uffd of the new image (PTRACE_EVENT_EXEC)."""
        fd = None
        t0 = time.monotonic()
        inj = None
        try:
            inj = Injector(tid)
            fd = inj.userfaultfd(self.inject_flags)
        except OSError as e:
            self.inject_error = e
        finally:
            sig = 0
            if inj is not None:
                inj.restore()
                sig = inj.resume_signal
            self.stopped_seconds += time.monotonic() - t0
        self.brk[tid] = _start_brk(tid)
        try:
            self.on_exec(tid, fd)
        finally:
            ptrace(PTRACE_CONT, tid, 0, sig)

    def kill_all(self, sig=signal.SIGKILL):
        """Send sig to every live tracee (shutdown)."""
        for tid in list(self.tasks):
            try:
                os.kill(tid, sig)
            except OSError:
                pass


def _log_on_stdout(log):
    """Whether the JSON log goes to the tool's stdout (``--json`` / ``--log -``): then nothing
    else may write there (CMD's stdout goes to stderr)."""
    return (getattr(log, "out", None) is sys.stdout or getattr(log, "name", None) == "stdout"
            or getattr(log, "fd", -1) == 1)


def _tgid_of(tid):
    """The thread-group id of a task (/proc/TID/status), or tid itself if it is gone."""
    try:
        return int(proc_status(tid).get("Tgid", tid))
    except (OSError, ValueError):
        return tid


def _comm_of(pid):
    """The command name of a process (/proc/PID/comm), or None if it is gone."""
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


def _start_brk(pid):
    """Current program break of pid: end of [heap], else start_brk from /proc/PID/stat."""
    for m in read_maps(pid):
        if m.path == "[heap]":
            return m.end
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[47 - 3])      # field 47 (1-based) is start_brk; fields[0] is field 3


#: pagemap entry's top byte -> b"\x01" if present or swapped (bits 63/62), else b"\x00"
_PRESENT_BYTE = bytes(1 if b & 0xC0 else 0 for b in range(256))


#: ... -> b"\x01" if present and still write-protected by a uffd (bit 57, PM_UFFD_WP)
_CLEAN_BYTE = bytes(1 if b & 0x80 and b & 0x02 else 0 for b in range(256))


def present_pages(pid, start, end, table=_PRESENT_BYTE):
    """Page addresses in [start, end) that are present or swapped (/proc/PID/pagemap bits 63/62).

    Never-touched pages are skipped: reading them would only copy zeros.  (The top byte of
    each entry is mapped to 0/1 and the runs of 1 found with a regex: big reservations such as
    thread stacks and malloc arenas cost no Python loop per page.)  ``table=_CLEAN_BYTE``:
    the present pages not written since a (WP_ASYNC) write-protect instead.
    """
    page = PAGE_SIZE
    out = []
    with open("/proc/%d/pagemap" % pid, "rb", buffering=0) as f:
        step = 65536 * page                              # 64 Ki entries (512 KiB) per read
        for s in range(start, end, step):
            n = (min(end, s + step) - s) // page
            flags = os.pread(f.fileno(), 8 * n, (s // page) * 8)[7::8].translate(table)
            for m in re.finditer(b"\x01+", flags):
                out.extend(range(s + m.start() * page, s + m.end() * page, page))
    return out


def missing_runs(pid, start, end):
    """The runs ``[(a, b)]`` of [start, end) that are neither present nor swapped in pid
    (complement of ``present_pages``); safe on registered memory (pagemap never faults).  On
    error the whole range (the caller copes with EEXIST)."""
    try:
        present = present_pages(pid, start, end)
    except OSError:
        return [(start, end)]
    out, a = [], start
    for p in present + [end]:
        if p > a:
            out.append((a, p))
        a = p + PAGE_SIZE
    return out


def read_target_pages(pid, pages):
    """process_vm_readv the given pages (batched into contiguous runs); returns {addr: bytes}.

    Only call this on memory that is NOT registered yet (the tracer must never read a
    registered range of the target: it would block on its own fault).
    """
    page = PAGE_SIZE
    lib = libc()
    lib.process_vm_readv.restype = ctypes.c_ssize_t
    out = {}
    i = 0
    while i < len(pages):
        j = i + 1
        while j < len(pages) and pages[j] == pages[j - 1] + page and j - i < 256:
            j += 1
        n = (j - i) * page
        buf = ctypes.create_string_buffer(n)
        local = iovec(ctypes.addressof(buf), n)
        remote = iovec(pages[i], n)
        got = lib.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got < 0:
            e = ctypes.get_errno()
            raise OSError(e, "process_vm_readv(%d): %s" % (pid, os.strerror(e)))
        raw = buf.raw
        for k in range(got // page):
            out[pages[i + k]] = raw[k * page:(k + 1) * page]
        i = j if got == n else i + max(1, got // page)
    return out


def snapshot_buffer(pid, regions, margin=1.25):
    """A populated buffer for a later ``snapshot_target_pages`` of ``regions``, made *before* the
    target is stopped (faulting in our own pages would otherwise count as stop time): room for
    the pages present now, plus a margin."""
    n = sum(len(present_pages(pid, s, s + length)) for s, length in regions)
    size = (int(n * margin) + 256) * PAGE_SIZE
    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE)
    return (ctypes.c_char * size).from_buffer(m)


def snapshot_target_pages(pid, pages, buf=None):
    """The given pages of pid in one buffer: (ctypes buffer, {address: offset in it}), read with
    process_vm_readv, up to 1024 contiguous runs a call; ``buf`` (``snapshot_buffer``) is used
    if it is big enough.  Like read_target_pages: only on memory that is not registered yet."""
    pages = sorted(pages)
    if buf is None or len(buf) < len(pages) * PAGE_SIZE:
        buf = ctypes.create_string_buffer(max(1, len(pages) * PAGE_SIZE))
    lib = libc()
    lib.process_vm_readv.restype = ctypes.c_ssize_t
    runs, off = page_runs(pages), 0
    for i in range(0, len(runs), 1024):
        chunk = runs[i:i + 1024]
        n = sum(b - a for a, b in chunk)
        remote = (iovec * len(chunk))(*[iovec(a, b - a) for a, b in chunk])
        local = iovec(ctypes.addressof(buf) + off, n)
        got = lib.process_vm_readv(pid, ctypes.byref(local), 1, remote, len(chunk), 0)
        if got != n:
            e = ctypes.get_errno() if got < 0 else errno.EFAULT
            raise OSError(e, "process_vm_readv(%d): %s" % (pid, os.strerror(e)))
        off += n
    return buf, {a: i * PAGE_SIZE for i, a in enumerate(pages)}


def read_pages_into(pid, buf, pairs):
    """process_vm_readv each page of ``pairs`` ``[(address, offset in buf)]`` (sorted by
    address) into ``buf``; contiguous pages with contiguous offsets go in one iovec, up to 1024
    a call.  Returns the pages that could not be read (unmapped meanwhile)."""
    lib = libc()
    lib.process_vm_readv.restype = ctypes.c_ssize_t
    runs = []                                   # [remote, local, length]
    for a, off in pairs:
        if runs and runs[-1][0] + runs[-1][2] == a and runs[-1][1] + runs[-1][2] == off:
            runs[-1][2] += PAGE_SIZE
        else:
            runs.append([a, off, PAGE_SIZE])
    base, failed = ctypes.addressof(buf), []
    for i in range(0, len(runs), 1024):
        chunk = runs[i:i + 1024]
        n = sum(r[2] for r in chunk)
        remote = (iovec * len(chunk))(*[iovec(r[0], r[2]) for r in chunk])
        local = (iovec * len(chunk))(*[iovec(base + r[1], r[2]) for r in chunk])
        if lib.process_vm_readv(pid, local, len(chunk), remote, len(chunk), 0) == n:
            continue
        for r in chunk:                         # short: find the pages that are gone
            for k in range(0, r[2], PAGE_SIZE):
                one_l, one_r = iovec(base + r[1] + k, PAGE_SIZE), iovec(r[0] + k, PAGE_SIZE)
                if lib.process_vm_readv(pid, ctypes.byref(one_l), 1, ctypes.byref(one_r), 1,
                                        0) != PAGE_SIZE:
                    failed.append(r[0] + k)
    return failed


class Precopy:
    """The first of two stops of ``--dontneed`` (README "What --pid guarantees"): copying
    4,000 pages takes 5-15 ms here, so the copy is made while the target runs.  Stop 1 injects
    a uffd with only UFFD_FEATURE_WP_ASYNC (no events: nothing in the target ever waits for
    it), registers the regions MODE_WP and write-protects their present pages; after the
    detach they are copied.  At stop 2 (``refresh``) pagemap tells which present pages lost
    the uffd-wp bit (written since) or were not copied: only those are copied then; the WP uffd
    is closed (unregistering clears the bits).  If the tool dies in between, closing that uffd
    is all that happens: nothing was dropped yet."""
    FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_PAGEFAULT_FLAG_WP

    def __init__(self, pid, regions):
        self.pid, self.regions = pid, regions
        self.uffd, self.buf, self.index, self.free = None, None, {}, 0
        self.stopped_seconds = 0.0
        self.recopied = 0

    @classmethod
    def available(cls):
        """Whether this kernel offers WP_ASYNC (6.7+)."""
        probe = Userfaultfd()
        try:
            return int(probe.api(0)[0]) & cls.FEATURES == cls.FEATURES
        finally:
            probe.close()

    def run(self):
        """Stop 1, then the copy with the target running."""
        pid, present = self.pid, []

        def while_stopped(att, fd):
            self.uffd = Userfaultfd.adopt(os.dup(fd))
            self.uffd.api(self.FEATURES)
            for start, length in self.regions:
                pp = present_pages(pid, start, start + length)
                present.extend(pp)
                self.uffd.register(start, length, UFFDIO_REGISTER_MODE_WP)
                for a, b in page_runs(pp):
                    self.uffd.writeprotect(a, b - a, True)
        try:
            fd, self.stopped_seconds = inject_userfaultfd(pid, while_stopped=while_stopped)
            os.close(fd)
            present.sort()
            size = (int(len(present) * 1.25) + 256) * PAGE_SIZE
            m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_POPULATE)
            self.buf = (ctypes.c_char * size).from_buffer(m)
            pairs = [(p, i * PAGE_SIZE) for i, p in enumerate(present)]
            gone = set(read_pages_into(pid, self.buf, pairs))
            self.index = {p: off for p, off in pairs if p not in gone}
            self.free = len(present) * PAGE_SIZE
        except BaseException:
            self.close()
            raise

    def refresh(self, present):
        """At stop 2: (buffer, {address: offset}) for ``present`` (sorted page addresses, the
        kernel's pages already left out): pages written since stop 1 are copied again now."""
        clean = set()
        for start, length in self.regions:
            clean.update(present_pages(self.pid, start, start + length, _CLEAN_BYTE))
        index, todo = {}, []
        for p in present:
            off = self.index.get(p)
            if off is not None and p in clean:
                index[p] = off
                continue
            if off is None:
                if self.free + PAGE_SIZE > len(self.buf):
                    raise OSError(errno.ENOMEM, "precopy buffer full")
                off, self.free = self.free, self.free + PAGE_SIZE
            todo.append((p, off))
            index[p] = off
        if read_pages_into(self.pid, self.buf, todo):
            raise OSError(errno.EFAULT, "process_vm_readv(%d): a present page vanished" % self.pid)
        self.recopied = len(todo)
        self.close()
        return self.buf, index

    def close(self):
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None


def drop_present(att, regions, snapshot=True, buf=None, pre=None):
    """``--dontneed`` while every thread is stopped: snapshot (if ``snapshot``) the present
    pages of ``regions`` that the kernel does not need (``Attachment.kernel_pages``), then drop
    them with as few injected madvise calls as possible: one per region's span from its first
    to its last present page, split only around kept pages.  Only private anonymous memory may
    be passed (MADV_DONTNEED on shared memory would not drop it, on a private file mapping it
    would revert to the file).  ``buf``: see ``snapshot_buffer``; ``pre``: a ``Precopy``
    that ran (then only pages written since are copied now).  Returns (buffer,
    {address: offset}, dropped runs)."""
    keep = att.kernel_pages()
    present, spans = [], []
    for start, length in sorted(regions):
        pp = present_pages(att.pid, start, start + length)
        if pp:
            present += [p for p in pp if p not in keep]
            spans.append((pp[0], pp[-1] + PAGE_SIZE))
    if snapshot and pre is not None:
        present.sort()
        buf, index = pre.refresh(present)
    else:
        buf, index = snapshot_target_pages(att.pid, present, buf) if snapshot else (None, {})
    runs = merge_runs(subtract_pages(spans, keep))
    att.drop(runs)
    return buf, index, runs


def repopulated(pid, runs, buf, index):
    """After registering: pages of the dropped ``runs`` that are present again (something in
    the kernel wrote them between madvise and UFFDIO_REGISTER, so they hold zeros and will
    never fault).  Puts the snapshot back into those through /proc/PID/mem (a present page does
    not fault) and returns their addresses."""
    back = [p for a, b in runs for p in present_pages(pid, a, b)]
    if back and buf is not None:
        base = ctypes.addressof(buf)
        with open("/proc/%d/mem" % pid, "r+b", buffering=0) as mem:
            for p in back:
                if p in index:
                    os.pwrite(mem.fileno(), ctypes.string_at(base + index[p], PAGE_SIZE), p)
    return back


###################################################################################################
#  11. Targets
###################################################################################################

# -- watch's events, features and arming ----------------------------------------------------------

#: --events names -> the feature bit that makes the kernel send that non-cooperative event.
WATCH_EVENTS = {"fork": UFFD_FEATURE_EVENT_FORK, "remap": UFFD_FEATURE_EVENT_REMAP,
                "remove": UFFD_FEATURE_EVENT_REMOVE, "unmap": UFFD_FEATURE_EVENT_UNMAP}


def parse_events(text):
    """The --events set from ``'fork,remap'``, ``'all'`` or ``'none'``; ValueError if unknown."""
    words = [w.strip().lower() for w in (text or "all").replace("|", ",").split(",") if w.strip()]
    if words == ["all"]:
        return set(WATCH_EVENTS)
    if words == ["none"]:
        return set()
    bad = [w for w in words if w not in WATCH_EVENTS]
    if bad:
        raise ValueError("unknown event %r (known: %s, all, none)"
                         % (bad[0], ",".join(WATCH_EVENTS)))
    return set(words)


def watch_features(events, mode, warn):
    """Features a watch uffd asks for: THREAD_ID, the chosen events, PAGEFAULT_FLAG_WP for
    ``mode == 'wp'``; limited to what the kernel offers.  EVENT_FORK is dropped, with a
    warning, without CAP_SYS_PTRACE (UFFDIO_API would fail with EPERM)."""
    probe = Userfaultfd()
    try:
        avail, _ = probe.api(0)
    finally:
        probe.close()
    want = UFFD_FEATURE_THREAD_ID
    for name in events:
        want |= WATCH_EVENTS[name]
    if mode == "wp":
        if not int(avail) & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            raise NotPermitted("--mode wp: this kernel lacks UFFD_FEATURE_PAGEFAULT_FLAG_WP")
        want |= UFFD_FEATURE_PAGEFAULT_FLAG_WP
        # write-protecting shmem (shared anonymous memory) needs this one too
        want |= int(avail) & UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    if want & UFFD_FEATURE_EVENT_FORK and not has_cap(CAP_SYS_PTRACE):
        warn("fork events need CAP_SYS_PTRACE: watching without them (forked children run "
             "unwatched)")
        want &= ~UFFD_FEATURE_EVENT_FORK
    if want & ~int(avail):
        warn("this kernel does not offer %s" % Features(want & ~int(avail)))
        want &= int(avail)
    return Features(want)


def register_mode(mode):
    """UFFDIO_REGISTER mode of a watch: MISSING, plus WP for ``--mode wp``."""
    return UFFDIO_REGISTER_MODE_MISSING | (UFFDIO_REGISTER_MODE_WP if mode == "wp" else 0)


def arm(uffd, start, length, mode):
    """Register ``[start, start+length)``; in wp mode also write-protect its present pages, so
    the first write to each is reported (none ptes are caught by MISSING instead)."""
    uffd.register(start, length, register_mode(mode))
    if mode == "wp":
        uffd.writeprotect(start, length, True)


# -- the target protocol --------------------------------------------------------------------------

class Target:
    """Whose memory a session registers and serves: the one interface of every target (the
    tool itself, ``-- CMD``, ``--pid``, a Firecracker peer), for watch and serve-file alike.

    The session runner (CLI section) calls, in this order:

      ``open(log, source, wake_fd)``  before the Handler exists (Firecracker: listen, write
                                 ``ready``, accept the peer, read its handshake: this sets
                                 ``page_size`` and ``hugetlb``); a readable ``wake_fd`` means
                                 a signal came: give up waiting (KeyboardInterrupt)
      ``attach(handler)``        register the memory and hand its uffds to the Handler;
                                 returns the fds whose readiness means "the target may be done"
      ``ready_fields()``         the fields of the ``ready`` record (None: ``open`` wrote it)
      ``start()``                begin a built-in workload, once everything is set up
      ``fired(fd)``              an fd from ``attach`` fired: a reason to stop, or None
      ``detach(handler, reason)``  always once ``attach`` succeeded: leave the target whole
                                 (unregister; pages that must not read as zeros installed
                                 first); returns the exit status the target decides (CMD's, a
                                 failed workload's) or None
      ``abort()``                ``attach`` failed or never ran
      ``extra()``                extra fields of the ``stats`` record
      ``close()``                release everything (idempotent)

    ``fast``: the Handler may use its single-uffd loop.  ``peer_pid``: whom
    ``--kill-peer-on-error`` kills.  ``stopped_seconds``: how long the target was stopped.
    ``attach`` raises UsageError (bad range, no such pid, CMD not found), NotPermitted (ptrace
    or the kernel refuses) or TargetError."""
    name = "?"
    page_size = PAGE_SIZE
    hugetlb = False
    fast = True
    peer_pid = None
    stopped_seconds = None

    def open(self, log, source, wake_fd=None):
        pass

    def attach(self, handler):
        raise NotImplementedError

    def ready_fields(self):
        return {"target": self.name}

    def start(self):
        pass

    def fired(self, fd):
        return "done"

    def detach(self, handler, reason):
        self.unregister_all(handler, "detached")
        return None

    @staticmethod
    def unregister_all(handler, why):
        """Unregister every region the Handler serves and close their uffds."""
        for s in list(handler.served.values()):
            for r in list(s.regions):
                try:
                    s.uffd.unregister(r.start, r.end - r.start)
                except UffdError:
                    pass              # already gone (process exited, range unmapped)
            handler.drop(s, why)

    def abort(self):
        pass

    def extra(self):
        out = {}
        if self.stopped_seconds is not None:
            out["target_stopped_s"] = round(self.stopped_seconds, 6)
        return out

    def close(self):
        pass


# -- watch --self: the built-in workload ----------------------------------------------------------

# The --self workload's forked child is this x86_64 code, called through ctypes (which releases
# the GIL): fork() with a raw syscall; the child writes byte dl to every page of [rdi, rdi+rsi)
# and exit_group(0)s without ever returning to Python; the parent returns the child's pid.
# (os.fork would hold the GIL while the kernel waits for the handler to read the FORK event:
# deadlock.)
_FORK_WRITER_X86_64 = bytes.fromhex(
    "b839000000"        # mov eax, 57 (fork)
    "0f05"              # syscall
    "4885c0"            # test rax, rax
    "751b"              # jnz parent
    "8817"              # loop: mov [rdi], dl
    "4881c700100000"    # add rdi, 4096
    "4881ee00100000"    # sub rsi, 4096
    "7fee"              # jg loop
    "b8e7000000"        # mov eax, 231 (exit_group)
    "31ff"              # xor edi, edi
    "0f05"              # syscall
    "c3")               # parent: ret


def self_workload(area, size):
    """The --self workload (runs in a thread; touches memory only via ctypes, which releases
    the GIL while a fault blocks).  With n = size/page and q = n/4:

      1. reads pages [0, q)                          -> missing read faults
      2. writes a pattern to pages [q, 2q)           -> missing write faults
      3. forks a child that writes pages [2q, 3q)    -> fork event, faults on the child's uffd
      4. mremap grows the area to 2*size (a guard page forces a move) -> remap (+ unmap)
      5. writes pages [n, n+q) of the grown part     -> faults at the new address
      6. mremap MREMAP_FIXED onto another range      -> remap (+ unmap)
      7. madvise(MADV_DONTNEED) pages [q, 2q)        -> remove; the next read sees zeros
      8. munmap                                      -> unmap
    Returns a dict of checks (pattern kept across both moves, zeros after DONTNEED).
    """
    ps = PAGE_SIZE
    n = size // ps
    q = max(1, n // 4)
    one = ctypes.create_string_buffer(8)
    checks = {}

    def rd(addr):
        ctypes.memmove(one, addr, 8)
        return one.raw

    def pattern(i):
        return struct.pack("<Q", 0x5A5A000000000000 | i)

    for i in range(q):
        rd(area + i * ps)
    for i in range(q, 2 * q):
        ctypes.memmove(area + i * ps, pattern(i), 8)
    if ARCH == "x86_64":
        code = mmap_anon(ps, PROT_READ | PROT_WRITE | 4)      # PROT_EXEC
        try:
            ctypes.memmove(code, _FORK_WRITER_X86_64, len(_FORK_WRITER_X86_64))
            proto = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_long)
            fn = proto(code)
            pid = fn(area + 2 * q * ps, q * ps, 0x77)
            if pid > 0:
                _, st = os.waitpid(pid, 0)
                checks["child_exit"] = os.waitstatus_to_exitcode(st)
        finally:
            munmap(code, ps)
    new = mremap(area, size, 2 * size, MREMAP_MAYMOVE)
    checks["grow_moved"] = new != area
    for i in range(n, n + q):
        ctypes.memmove(new + i * ps, pattern(i), 8)
    fixed = mmap_anon(2 * size)
    moved = mremap(new, 2 * size, 2 * size, MREMAP_MAYMOVE | MREMAP_FIXED, fixed)
    checks["pattern_kept"] = all(rd(moved + i * ps) == pattern(i) for i in range(q, 2 * q))
    checks["parent_untouched_by_child"] = rd(moved + 2 * q * ps) == bytes(8)
    madvise(moved + q * ps, q * ps, MADV_DONTNEED)
    checks["zero_after_dontneed"] = rd(moved + q * ps) == bytes(8)
    munmap(moved, 2 * size)
    checks["addresses"] = {"area": area, "grown": new, "fixed": moved}
    return checks


def _size_error(size):
    return UsageError("--size %s: cannot map that much memory here (out of memory: more than "
                      "RAM and vm.overcommit allow); use a smaller --size" % _human_bytes(size))


def _human_bytes(n):
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and not n % (1 << shift):
            return "%d%s" % (n >> shift, unit)
    return str(n)


def self_memory(size):
    """The --self area: ``size`` bytes of fresh anonymous memory; a size this machine cannot map
    is a usage error (one line, exit 2), not a traceback."""
    try:
        return mmap_anon(size)
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise _size_error(size) from None
        raise


class WorkloadTarget(Target):
    """Base of the two ``--self`` targets: memory of the tool itself, touched by a workload
    thread (``workload()``, which touches registered memory only through ctypes, so the
    handler thread keeps the GIL it needs).  The thread starts in ``start`` and writes to a
    pipe when done; the pipe's read end is the fd that ends the session.  An exception of the
    workload is kept in ``error``."""
    name = "self"
    thread = None
    error = None
    _done = (-1, -1)

    def workload(self):
        raise NotImplementedError

    def done_fds(self):
        """Make the done-pipe; returns the fds ``attach`` returns."""
        self._done = os.pipe2(os.O_CLOEXEC)
        return [self._done[0]]

    def ready_fields(self):
        return {"target": "self", "size": self.size}

    def start(self):
        self.thread = threading.Thread(target=self._run, name="uffdtool-self", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.workload()
        except BaseException as e:           # reported by detach()
            self.error = e
        finally:
            os.write(self._done[1], b"x")

    def end_workload(self):
        """Join the thread (its memory is unregistered first, which wakes it if it is blocked)
        and close the pipe; idempotent."""
        if self.thread is not None:
            self.thread.join(5)
            self.thread = None
        for fd in self._done:
            if fd >= 0:
                os.close(fd)
        self._done = (-1, -1)


class SelfTarget(WorkloadTarget):
    """watch ``--self``: a range of the tool's own memory and the built-in workload (a thread).
    Ends when the workload is done; a failed check of the workload is exit status 1, SIGINT
    130 (``stop_signal``, set by the runner)."""
    fast = False
    stop_signal = None

    def __init__(self, size, mode, features):
        self.size = max(8 * PAGE_SIZE, (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1))
        self.mode, self.features = mode, features
        self.result = None
        self.guard = None

    def attach(self, handler):
        self.area = self_memory(self.size)
        uffd = Userfaultfd()
        uffd.api(self.features)
        try:   # a PROT_NONE page right after the area makes the workload's mremap grow move it
            self.guard = mmap_anon(PAGE_SIZE, PROT_NONE, MAP_PRIVATE | MAP_FIXED_NOREPLACE,
                                   addr=self.area + self.size)
        except OSError:
            self.guard = None
        arm(uffd, self.area, self.size, self.mode)
        handler.add(uffd, [(self.area, self.size)], pid=os.getpid(), label="self")
        return self.done_fds()

    def workload(self):
        self.result = self_workload(self.area, self.size)

    def detach(self, handler, reason):
        self.unregister_all(handler, "detached")      # closing the uffd wakes a blocked workload
        self.end_workload()
        if self.guard is not None:
            munmap(self.guard, PAGE_SIZE)
            self.guard = None
        if reason == "done" and (self.error is not None or not self.result or not all(
                v for k, v in self.result.items() if k not in ("addresses", "child_exit")) or
                self.result.get("child_exit", 0) != 0):
            handler.log.emit("error", message="workload failed: %s" % (self.error or self.result))
            return 1
        return 130 if self.stop_signal == signal.SIGINT else None

    def extra(self):
        return {"workload": self.result} if self.result else {}


# -- --pid: a running process ---------------------------------------------------------------------

#: --pid --all-anon: how often (seconds) the target's maps are read for new anonymous mappings;
#: also after a REMAP/UNMAP event, at most every PID_RESCAN_MIN
PID_RESCAN, PID_RESCAN_MIN = 0.1, 0.01


def _mapping_names(pid, maps):
    """{mapping start: name} for the anonymous mappings of pid: ``Mapping.name``, and
    ``[thread-stack]`` for a mapping holding the stack pointer of a thread other than the main
    one (/proc/PID/task/TID/syscall; a running thread is not seen)."""
    names = {m.start: m.name() for m in maps if m.is_anon() or m.path == "[stack]"}
    sps = []
    try:
        for tid in os.listdir("/proc/%d/task" % pid):
            if int(tid) != pid:
                with open("/proc/%d/task/%s/syscall" % (pid, tid)) as f:
                    words = f.read().split()
                if len(words) >= 3:
                    sps.append(int(words[-2], 16))
    except (OSError, ValueError):
        pass
    for sp in sps:
        m = next((m for m in maps if m.start <= sp < m.end), None)
        if m is not None and names.get(m.start) == "[anon]":
            names[m.start] = "[thread-stack]"
    return names


def mapping_regions_at(pid, addr, file_ranges=()):
    """The Regions of pid's anonymous mapping that holds ``addr`` (``Handler.on_unknown``),
    or [] if there is none."""
    try:
        maps = read_maps(pid)
    except (OSError, TypeError):
        return []
    m = next((m for m in maps if m.start <= addr < m.end), None)
    if m is None or not m.is_anon():
        return []
    return file_regions(m.start, m.end, file_ranges, m.name())


def _name_at(names, addr):
    """The name of the mapping that starts at or before ``addr`` (``_mapping_names``)."""
    best = None
    for start in names:
        if start <= addr and (best is None or start > best):
            best = start
    return names.get(best, "[anon]")


def _in_starts(maps, starts, addr):
    """Whether ``addr`` lies in a mapping whose start is in ``starts``."""
    return any(m.start in starts and m.start <= addr < m.end for m in maps)


def _check_ranges(pid, ranges, maps):
    """Validate --range pairs against the target's maps: page-aligned start, inside private
    anonymous mappings.  Returns [(start, length)] (length rounded up to pages)."""
    out = []
    for start, length in ranges:
        if start % PAGE_SIZE or length <= 0:
            raise UsageError("range 0x%x:%d: START must be page-aligned and LEN > 0"
                             % (start, length))
        length = (length + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        a = start
        while a < start + length:
            m = next((m for m in maps if m.start <= a < m.end), None)
            if m is None:
                raise UsageError("range 0x%x:%d: 0x%x is not mapped in process %d"
                                 % (start, length, a, pid))
            if not (m.is_anon_private_or_stack() or m.is_shared_anon()):
                raise UsageError("range 0x%x:%d: 0x%x is not private anonymous memory nor "
                                 "shared anonymous (%s %s)" % (start, length, a, m.perms, m.path))
            a = m.end
        out.append((start, length))
    return out


#: PIDFD_GET_INFO (linux/pidfd.h, Linux 6.15+): _IOWR(0xFF, 11, struct pidfd_info), 64 bytes in
#: its first version; with PIDFD_INFO_EXIT in ``mask`` it returns the wait status of a process
#: that has been reaped, in ``exit_code`` (offset 60).
PIDFD_GET_INFO = _IOWR(0xFF, 11, 64)
PIDFD_INFO_EXIT = 1 << 3


def pidfd_wait_status(pidfd, pid, wait=1.0):
    """The wait status of the exited process behind ``pidfd`` (not our child, so no waitpid):
    while it is a zombie from /proc/PID/stat (field 52, exit_code), once its parent reaped it
    from PIDFD_INFO_EXIT.  None if neither tells within ``wait`` seconds (an older kernel, or a
    parent that does not reap)."""
    deadline = time.monotonic() + wait
    while True:
        info = bytearray(64)
        struct.pack_into("=Q", info, 0, PIDFD_INFO_EXIT)
        try:
            fcntl.ioctl(pidfd, PIDFD_GET_INFO, info, True)
            if struct.unpack_from("=Q", info, 0)[0] & PIDFD_INFO_EXIT:
                return struct.unpack_from("=i", info, 60)[0]
        except OSError:
            pass                              # ESRCH: exited, not reaped yet; ENOTTY: old kernel
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] in ("Z", "X") and len(fields) >= 50:
                return int(fields[49])        # field 52 of stat, counted after the comm field
        except (OSError, IndexError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def describe_wait_status(st):
    """Record fields for a wait status: ``status`` (the exit code, 128+N when killed by signal
    N, as a shell reports it; "unknown" when None) and ``signal`` (its name) when killed."""
    if st is None:
        return {"status": "unknown"}
    if os.WIFSIGNALED(st):
        sig = os.WTERMSIG(st)
        return {"status": 128 + sig, "signal": _signal_name(sig)}
    return {"status": os.waitstatus_to_exitcode(st)}


def _signal_name(sig):
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "signal %d" % sig


class PidTarget(Target):
    """``--pid PID``: inject ``userfaultfd()`` with ptrace (x86_64), register ranges or every
    private anonymous mapping, detach, serve.  Non-destructive unless ``dontneed``: then the
    present pages are snapshotted, dropped with an injected MADV_DONTNEED (all threads stopped)
    and served back from the snapshot; ``detach`` installs every page not faulted yet.

    ``snapshot=False`` (serve-file): the handler's source is a file (or zeros), not a snapshot;
    ``offsets`` gives each range's source offset, ``dontneed`` drops the present pages without
    a snapshot, and ``detach`` installs every source page not faulted yet
    (``Handler.install_missing``) before unregistering.

    When the process ends while watched, its pidfd fires: ``exit_fields`` then says how it
    ended (``describe_wait_status``), and ``detach`` returns 1 if a signal killed it."""
    name = "pid"

    def __init__(self, pid, ranges, all_anon, mode, features, dontneed=False, offsets=None,
                 snapshot=True, done_reason="done"):
        self.pid, self.ranges, self.all_anon = pid, ranges, all_anon
        self.mode, self.features, self.dontneed = mode, features, dontneed
        self.offsets = offsets
        self.snapshot = dontneed and snapshot
        self.fast = not self.snapshot         # SnapshotSource fills page by page
        self.done_reason = done_reason
        self.pidfd = -1
        self.snapshot_pages = 0
        self.drained = 0
        self.recopied = self.precopy_stop_s = None
        self.exit_fields = None               # set once the process has ended

    def ready_fields(self):
        return {"target": "pid", "pid": self.pid, "comm": _comm_of(self.pid)}

    def fired(self, fd):
        self.exit_fields = describe_wait_status(pidfd_wait_status(self.pidfd, self.pid))
        return self.done_reason

    def attach(self, handler):
        pid = self.pid
        self.handler, self.handler_source = handler, handler.source
        try:
            check_pid(pid)
            self.pidfd = syscall("pidfd_open", pid, 0)
            maps = read_maps(pid)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                raise NotPermitted("process %d: cannot read its memory map (%s): needs "
                                   "CAP_SYS_PTRACE over it" % (pid, os.strerror(e.errno)))
            raise UsageError(e.strerror if isinstance(e, ProcessLookupError) else
                             "no such process: %d" % pid)
        if self.all_anon:
            regions = [(m.start, m.end - m.start) for m in maps if m.is_anon()]
            if not regions:
                raise UsageError("process %d has no anonymous memory" % pid)
        else:
            regions = _check_ranges(pid, self.ranges, maps)
        names = _mapping_names(pid, maps)
        shared = {m.start for m in maps if m.is_shared_anon()}
        # --dontneed never drops the pages of a shared mapping (other processes map them)
        private = [(a, n) for a, n in regions if not _in_starts(maps, shared, a)]
        box = {}
        spare = pre = None
        if self.snapshot and self.mode == "missing" and Precopy.available():
            pre = Precopy(pid, private)
            try:
                pre.run()
            except ProcessLookupError as e:
                raise UsageError(str(e.strerror or e))
            except PtraceError as e:
                raise (NotPermitted if e.errno in (errno.EPERM, errno.EACCES, errno.ENOEXEC,
                                                   errno.ENOSYS) else TargetError)(str(e))
            except OSError as e:
                if isinstance(e, UffdError) and e.errno == errno.EBUSY:
                    raise TargetError("process %d: another userfaultfd already watches this "
                                      "range (%s)" % (pid, e))
                raise TargetError("process %d: precopy: %s" % (pid, e))
            self.precopy_stop_s = pre.stopped_seconds
        elif self.snapshot:
            spare = snapshot_buffer(pid, private)

        def while_stopped(att, fd):
            uffd = Userfaultfd.adopt(os.dup(fd))     # ours; inject_userfaultfd closes fd
            box["uffd"] = uffd
            uffd.api(self.features)
            runs = ()
            if self.dontneed:
                buf, index, runs = drop_present(att, private, self.snapshot, spare, pre)
                self.recopied = pre.recopied if pre is not None else None
                if self.snapshot:
                    handler.source.adopt(buf, index)
                    self.snapshot_pages = len(index)
            for start, length in regions:
                arm(uffd, start, length, self.mode)
            _test_pause("armed")
            if runs:
                back = repopulated(pid, runs, handler.source.buf if self.snapshot else None,
                                   handler.source.index if self.snapshot else {})
                if back:
                    handler.log.emit("warning", message="process %d: %d dropped page(s) were "
                                     "written by the kernel before registration; their snapshot "
                                     "was put back" % (pid, len(back)), pages=back[:16])

        try:
            fd, self.stopped_seconds = inject_userfaultfd(pid, while_stopped=while_stopped)
        except ProcessLookupError as e:
            raise UsageError(str(e.strerror or e))
        except PtraceError as e:
            if pre is not None:
                pre.close()
            if "uffd" in box:
                box["uffd"].close()
            if e.errno == errno.EINVAL:
                raise UsageError(str(e))
            raise (NotPermitted if e.errno in (errno.EPERM, errno.EACCES, errno.ENOEXEC,
                                               errno.ENOSYS) else TargetError)(str(e))
        except OSError as e:                     # UffdError, process_vm_readv, /proc
            if pre is not None:
                pre.close()
            if "uffd" in box:
                box["uffd"].close()
            if isinstance(e, UffdError) and e.errno == errno.EBUSY:
                raise TargetError("process %d: another userfaultfd already watches this range "
                                  "(%s)" % (pid, e))
            raise TargetError("process %d: %s" % (pid, e))
        os.close(fd)
        if self.offsets is not None:
            offs = self.offsets
        else:
            offs = [s if self.snapshot and (s, n) in private else None for s, n in regions]
        self.served = handler.add(box["uffd"], [Region(s, s + n, o, _name_at(names, s))
                                                for (s, n), o in zip(regions, offs)],
                                  pid=pid, label="pid")
        handler.on_fork, handler.on_lost = self._fork, self._install_all
        if self.all_anon:                       # follow the mappings created from now on
            self.handler = handler
            self._scanned = 0.0
            self._refused = set()
            handler.timers.append((PID_RESCAN, self.follow))
            if self.offsets is None and not self.snapshot:     # regions without source data
                handler.on_unknown = lambda s, addr: mapping_regions_at(s.pid, addr)
            handler.on_event = lambda s, ev: type(ev) in (Remap, Unmap) and self.follow(
                PID_RESCAN_MIN)
        return [self.pidfd]

    def _install_all(self, s, pid=None):
        """Install every page ``s`` still lacks (snapshot or source pages); returns the count.
        ``pid``: whose pagemap narrows the holes (None: unknown, try every page)."""
        if self.snapshot:
            return self.handler_source.install_missing(s, self.handler.read_pending)
        if self.offsets is None:
            return 0
        holes = (lambda a, b: missing_runs(pid, a, b)) if pid else None
        return self.handler.install_missing(s, holes)

    def _fork(self, parent, child):
        """A fork of the target: its children are not followed, so the child gets every page
        it still lacks now, and its uffd is closed at once (fds never pile up; a child that
        has exited already ends the install at its first ESRCH)."""
        try:
            self.drained += self._install_all(child)
        except OSError:
            pass
        self.handler.drop(child, "not-followed")

    def follow(self, min_age=0.0):
        """Register the anonymous mappings of the target that are not registered yet (new ones
        since attach: mmap, brk growth, thread stacks...).  Runs in the handler thread, every
        PID_RESCAN seconds and after REMAP/UNMAP events (at most every ``min_age``).  The uffd
        registers in the target's mm from here: no stop needed."""
        now = time.monotonic()
        s = self.served
        if now - self._scanned < min_age or s.uffd.closed or \
                self.handler.served.get(s.uffd.fileno()) is not s:
            return
        self._scanned = now
        try:
            maps = read_maps(self.pid)
        except OSError:
            return
        covered = sorted([(r.start, r.end) for r in s.regions] + s.left)
        names = None
        added = 0
        for m in maps:
            if not m.is_anon():
                continue
            for a, b in _gaps(m.start, m.end, covered):
                if (a, b) in self._refused:
                    continue
                try:
                    arm(s.uffd, a, b - a, self.mode)
                except UffdError:
                    self._refused.add((a, b))   # gone meanwhile, or not registrable: once
                    continue
                if names is None:
                    names = _mapping_names(self.pid, maps)
                s.regions.append(Region(a, b, None, _name_at(names, m.start)))
                added += 1
        if added:
            s.reindex()
            self.handler.stats.add("followed_mappings", added)
            self.handler.announce(s)

    def detach(self, handler, reason):
        if self.exit_fields is not None:      # nothing to leave whole: say how it ended
            for s in list(handler.served.values()):
                handler.drop(s, "exited", **self.exit_fields)
            self.abort()
            return 1 if "signal" in self.exit_fields else None
        if self.snapshot or self.offsets is not None:
            for s in list(handler.served.values()):     # no zero page where data belongs
                self.drained += self._install_all(s, self.pid)
        self.unregister_all(handler, "detached")
        self.abort()
        return None

    def abort(self):
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def extra(self):
        out = super().extra()
        if self.snapshot:
            out.update(snapshot_pages=self.snapshot_pages, drained_pages=self.drained)
            if self.recopied is not None:         # two stops: the first one, and the pages
                out.update(precopy_stopped_s=round(self.precopy_stop_s, 6),   # copied in stop 2
                           recopied_pages=self.recopied)
        elif self.offsets is not None:
            out.update(drained_pages=self.drained)
        return out


# -- -- CMD: a child under ptrace -----------------------------------------------------------------

class SpawnTarget(Target):
    """``-- CMD``: start CMD under ptrace, inject a uffd at every exec, register its private
    anonymous memory and every new mmap/brk/mremap result, follow forks.

    Threads: the tracer (SpawnTracer) runs in its own thread, because ptrace requests must come
    from the attaching thread and ``waitpid`` blocks; the handler runs in the main thread.  They
    never wait on each other: a tracee blocked on a fault is not in a ptrace-stop, so only the
    handler serves it; a tracee in a ptrace-stop faults on nothing, and the tracer only does
    ptrace, /proc reads and UFFDIO_REGISTER (which act on the target mm, not on faulting
    memory).  The tracer's one wait on the handler (for the FORK event's uffd, which the kernel
    delivers before the parent's PTRACE_EVENT_FORK stop) is bounded.  Handler-side bookkeeping
    (regions, drops) is passed through ``Handler.call_soon`` so only one thread changes it.

    ``file_ranges`` (serve-file): sorted ``(start, end, source offset)`` address ranges whose
    pages come from the source; every other page is zero-filled."""
    name = "cmd"
    fast = True       # the fast loop leaves for the tracer's call_soon work (regions, uffds)

    def __init__(self, argv, mode, features, warn=None, file_ranges=(), done_reason="done"):
        self.argv, self.mode, self.features = argv, mode, features
        self.done_reason = done_reason
        self.file_ranges = sorted(file_ranges)
        self._warn = warn or (lambda msg: None)
        self.uffd_of = {}       # tgid -> Userfaultfd of its mm (shared by vfork children/threads)
        self.owner = {}         # uffd fd -> tgid that owns the uffd
        self.forks = {}         # parent uffd fd -> [child Served] from FORK events, FIFO
        self.status, self.error = None, None
        self.tracer = None

    def warn(self, msg):
        """Warn from the tracer thread (the message is written by the handler thread)."""
        self.handler.call_soon(self._warn, msg)

    def ready_fields(self):
        # comm: what the kernel will name it after exec (the first 15 bytes of the file name)
        return {"target": "cmd", "cmd": self.argv, "pid": self.tracer.root,
                "comm": os.path.basename(self.argv[0])[:15]}

    def fired(self, fd):
        return self.done_reason

    def attach(self, handler):
        exe = self.argv[0]
        found = shutil.which(exe) if "/" not in exe else (
            exe if os.path.isfile(exe) and os.access(exe, os.X_OK) else None)
        if found is None:           # the child's exec would fail the same way: say so early
            raise UsageError("cannot run %s: %s" % (exe, "not found or not executable"))
        self.handler = handler
        self.cv = threading.Condition()
        handler.on_fork = self._uffd_fork
        handler.on_unknown = lambda s, addr: mapping_regions_at(s.pid, addr, self.file_ranges)
        self.stdout_to_stderr = _log_on_stdout(handler.log)
        if self.stdout_to_stderr:
            handler.log.emit("warning", message="CMD's standard output goes to stderr: stdout "
                                                "carries only the JSON log")
        self.done_r, self.done_w = os.pipe2(os.O_CLOEXEC)
        started = threading.Event()
        self.thread = threading.Thread(target=self._trace, args=(started,), name="uffdtool-tracer",
                                       daemon=True)
        self.thread.start()
        started.wait()
        if self.error is not None and self.tracer.root is None:
            self.thread.join()
            for fd in (self.done_r, self.done_w):
                os.close(fd)
            raise self.error
        return [self.done_r]

    def _trace(self, started):
        self.tracer = SpawnTracer(self.argv, self._exec, self._map, self._fork, self._exit,
                                  stdout_to_stderr=self.stdout_to_stderr)
        try:
            try:
                self.tracer.start()
            except BaseException as e:
                self.error = self._error(e)
                return
            finally:
                started.set()                 # after self.error is set: attach() checks it
            self.status = self.tracer.run()
        except BaseException as e:            # reported by the main thread (finish)
            self.error = self._error(e)
            self.tracer.kill_all()
        finally:
            self.stopped_seconds = self.tracer.stopped_seconds
            os.write(self.done_w, b"x")

    @staticmethod
    def _error(e):
        """The CLI error for an exception in the tracer thread."""
        if isinstance(e, SpawnError):
            return UsageError("cannot run %s" % e.strerror)
        if isinstance(e, PtraceError):
            return NotPermitted(str(e))
        if isinstance(e, UffdToolError):
            return e
        return TargetError("tracer: %r" % (e,))

    # -- tracer-thread callbacks ------------------------------------------------------------
    def _exec(self, pid, fd):
        old = self.uffd_of.pop(pid, None)
        if old is not None and self.owner.get(old.fileno()) == pid:
            self._drop(old, "exec")
        if fd is None:
            self.warn("process %d: could not inject userfaultfd (%s): not watched"
                      % (pid, self.tracer.inject_error))
            return
        uffd = Userfaultfd.adopt(fd)
        try:
            uffd.api(self.features)
            regions = []
            for m in read_maps(pid):
                if m.is_anon():
                    try:
                        arm(uffd, m.start, m.end - m.start, self.mode)
                        regions.extend(file_regions(m.start, m.end, self.file_ranges, m.name()))
                    except UffdError:
                        pass
        except (UffdError, OSError) as e:
            uffd.close()
            self.warn("process %d: %s: not watched" % (pid, e))
            return
        self.uffd_of[pid] = uffd
        self.owner[uffd.fileno()] = pid
        self.handler.call_soon(self.handler.log.emit, "exec", pid=pid, comm=_comm_of(pid),
                               ufd=uffd.fileno(), regions=len(regions))
        self.handler.call_soon(self.handler.add, uffd, regions, pid, "cmd")

    def _map(self, tgid, start, end, name=None):
        uffd = self.uffd_of.get(tgid)
        if uffd is None or uffd.closed or end <= start:
            return
        try:
            arm(uffd, start, end - start, self.mode)
        except UffdError:
            return          # not registrable (e.g. an mremap of file memory): not ours
        self.handler.call_soon(self._add_region, uffd.fileno(), start, end, name)

    def _add_region(self, fd, start, end, name=None):
        s = self.handler.served.get(fd)
        if s is not None:
            if name is None:            # mremap: the moved mapping keeps its name
                name = next((r.name for r in s.regions if r.start < end and start < r.end
                             and r.name), "[anon]")
            s.cut(start, end)
            s.regions.extend(file_regions(start, end, self.file_ranges, name))
            s.reindex()

    def _fork(self, parent, child, same):
        puffd = self.uffd_of.get(parent)
        if same or puffd is None:
            if puffd is not None:
                self.uffd_of[child] = puffd
            return
        if not self.features & UFFD_FEATURE_EVENT_FORK:
            return
        ps = self.handler.served.get(puffd.fileno())
        if ps is None or not ps.regions:
            return                  # nothing registered: the kernel sends no FORK event
        with self.cv:
            self.cv.wait_for(lambda: self.forks.get(puffd.fileno()), timeout=2.0)
            q = self.forks.get(puffd.fileno())
            cs = q.pop(0) if q else None
        if cs is None:
            self.warn("fork of %d: no FORK event arrived; child %d is not watched"
                      % (parent, child))
            return
        self.uffd_of[child] = cs.uffd
        self.owner[cs.uffd.fileno()] = child
        self.handler.call_soon(setattr, cs, "pid", child)

    def _exit(self, tid, status):
        self.handler.call_soon(self.handler.forget_tid, tid)     # tids are reused
        uffd = self.uffd_of.pop(tid, None)
        if uffd is not None and self.owner.get(uffd.fileno()) == tid:
            self._drop(uffd, "exited", **describe_wait_status(status))

    def _drop(self, uffd, reason, **fields):
        self.owner.pop(uffd.fileno(), None)

        def drop():
            s = self.handler.served.get(uffd.fileno())
            if s is not None and s.uffd is uffd:
                with self.cv:                 # its fd number may be reused: no stale FIFO
                    self.forks.pop(uffd.fileno(), None)
                self.handler.drop(s, reason, **fields)
        self.handler.call_soon(drop)

    # -- handler-thread hook ----------------------------------------------------------------
    def _uffd_fork(self, parent, child):
        with self.cv:
            self.forks.setdefault(parent.uffd.fileno(), []).append(child)
            self.cv.notify_all()

    def detach(self, handler, reason):
        """Wait for CMD and its descendants; on interrupt/duration give them a moment, then
        SIGTERM, then SIGKILL.  Returns CMD's exit status (128+signal if killed)."""
        if self.thread.is_alive():
            steps = ([(1.0, None)] if reason == "interrupted" else []) + [
                (2.0, signal.SIGTERM), (5.0, signal.SIGKILL)]
            for wait, sig in steps:
                if sig is not None and self.tracer is not None:
                    if sig == signal.SIGTERM:
                        try:
                            os.kill(self.tracer.root, sig)
                        except OSError:
                            pass
                    else:
                        self.tracer.kill_all(sig)
                if handler.run(watch_fds=[self.done_r], timeout=wait) == self.done_r:
                    break
            self.thread.join(5)
        self.unregister_all(handler, "detached")
        for u in list(self.uffd_of.values()):
            u.close()
        for fd in (self.done_r, self.done_w):
            os.close(fd)
        if self.error is not None:
            raise self.error
        return self.status if self.status is not None else 1

    def extra(self):
        out = super().extra()
        if self.status is not None:
            out["exit_status"] = self.status
        return out


# -- Firecracker's UFFD handshake (README, "Firecracker") -----------------------------------------

#: handshake receive buffer and fd limit (Firecracker sends ~110 bytes per region and 1 fd)
FC_HANDSHAKE_MAX = 64 << 10
FC_MAX_FDS = 4
FC_EMPTY_RETRIES, FC_EMPTY_WAIT = 5, 0.1      # the pre-v1.12 empty-message race: retry briefly


class HandshakeError(TargetError):
    """The peer's UFFD handshake is malformed (exit 1)."""


class ProtocolUnsupported(HandshakeError):
    """The peer speaks a handshake uffdtool does not implement (exit 2): Firecracker's
    unreleased secret-hiding protocol (extra region fields, 3 fds, a second message, then a
    two-way binary protocol)."""
    exit_code = 2


#: region fields only Firecracker's secret-hiding protocol sends
FC_SECRET_HIDING_FIELDS = ("gpa_start", "is_guest_memfd")
#: largest page size a handshake may name (x86_64 has 4 KiB, 2 MiB and 1 GiB pages)
FC_MAX_PAGE_SIZE = 1 << 30
_U64 = 1 << 64


def _unsupported_protocol(why):
    return ProtocolUnsupported(
        "this Firecracker build uses a protocol uffdtool does not speak (%s: the unreleased "
        "secret-hiding handshake with guest_memfd and a two-way fault protocol); use a "
        "released Firecracker (v1.12-v1.14 handshake)" % why)


def _json_value(data):
    """The first JSON value in ``data`` and what follows it: (value, rest bytes).  ValueError
    if it is not JSON; HandshakeError if it nests too deep for the parser (RecursionError)."""
    text = data.decode("utf-8")
    try:
        value, end = json.JSONDecoder().raw_decode(text.lstrip())
    except RecursionError:
        raise HandshakeError("handshake JSON is nested too deeply (%d bytes)" % len(data))
    return value, text.lstrip()[end:].strip().encode()


def listen_unix(path, log=None, peer_uid=None):
    """Bind and listen on a Unix stream socket at ``path``: a stale socket file is replaced;
    anything else that exists there, a live listener's socket, or a missing directory, is a
    UsageError.  The socket file is mode 0600 whatever the umask, before ``listen`` (no
    other user can connect), and owned by ``peer_uid`` if given (Firecracker under the
    jailer runs as another uid)."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise UsageError("cannot listen on %s: directory %s does not exist" % (path, d))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if (st.st_mode & 0o170000) != 0o140000:
            raise UsageError("cannot listen on %s: it exists and is not a socket" % path)
        if _someone_listens(path):
            raise UsageError("cannot listen on %s: another process is listening there" % path)
        os.unlink(path)                       # stale socket of an earlier handler
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o177)                 # born 0600: no window with a wider mode
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        if peer_uid is not None and peer_uid != os.geteuid():
            try:
                os.chown(path, peer_uid, -1)
            except OSError as e:
                _unlink_socket(path, _file_id(path))
                raise NotPermitted("--peer-uid %d: cannot give the socket %s to that uid: %s "
                                   "(needs root or CAP_CHOWN)" % (peer_uid, path, e.strerror))
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise UsageError("cannot listen on %s: %s" % (path, e.strerror))
    except BaseException:
        sock.close()
        raise
    return sock


#: sock_diag(7) for AF_UNIX: which listening sockets are bound to which file (dev, inode)
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP, NLMSG_ERROR, NLMSG_DONE = 1, 0x300, 2, 3
UDIAG_SHOW_VFS, UNIX_DIAG_VFS, TCP_LISTEN = 0x2, 1, 10
_NLMSGHDR = struct.Struct("=IHHII")               # len, type, flags, seq, pid
_UNIX_DIAG_REQ = struct.Struct("=BBHIIIII")       # family, protocol, pad, states, ino, show, cookie
_UNIX_DIAG_MSG = struct.Struct("=BBBBIII")        # family, type, state, pad, ino, cookie


def unix_listeners():
    """(major, minor, inode) of the file of every listening AF_UNIX socket in this network
    namespace, from sock_diag (UNIX_DIAG_VFS: the bound file's device and inode, however the
    path was spelled at bind time); None when sock_diag is not available."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                           NETLINK_SOCK_DIAG)
    except OSError:
        return None
    out = set()
    try:
        nl.settimeout(2.0)
        req = _UNIX_DIAG_REQ.pack(socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN, 0, UDIAG_SHOW_VFS,
                                  0xFFFFFFFF, 0xFFFFFFFF)
        nl.sendto(_NLMSGHDR.pack(_NLMSGHDR.size + len(req), SOCK_DIAG_BY_FAMILY,
                                 NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + _NLMSGHDR.size <= len(data):
                length, typ = _NLMSGHDR.unpack_from(data, off)[:2]
                if typ == NLMSG_DONE:
                    return out
                if typ == NLMSG_ERROR or length < _NLMSGHDR.size:
                    return None
                a = off + _NLMSGHDR.size + _UNIX_DIAG_MSG.size
                while a + 4 <= off + length:                 # rtattrs: len, type, payload
                    alen, atyp = struct.unpack_from("=HH", data, a)
                    if alen < 4:
                        break
                    if atyp == UNIX_DIAG_VFS and alen >= 12:
                        ino, dev = struct.unpack_from("=II", data, a + 4)
                        out.add((dev >> 20, dev & 0xFFFFF, ino))   # kernel dev_t: 12:20 bits
                    a += (alen + 3) & ~3
                off += (length + 3) & ~3
    except OSError:
        return None
    finally:
        nl.close()


def _file_id(path):
    """(st_dev, st_ino) of ``path`` itself (not following a symlink), or None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _someone_listens(path):
    """Whether a live socket listens on the file at ``path`` (else the file is stale): its
    device and inode against the kernel's listeners (sock_diag), never by connecting (a probe
    would be taken for a peer), nor by the path (the kernel keeps it as it was spelled at
    bind time, maybe relative).  Without sock_diag: /proc/net/unix paths."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    live = unix_listeners()
    if live is not None:
        return (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino & 0xFFFFFFFF) in live
    want = os.path.abspath(path)
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        f = line.split(None, 7)
        if len(f) == 8 and f[7] == want and int(f[3], 16) & 0x10000:
            return True
    return False


def peer_cred(conn):
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED), or
    (None, None, None)."""
    try:
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", cred)
        return pid or None, uid, gid
    except OSError:
        return None, None, None


def accept_peer(sock, path, timeout, uids, warn, wake_fd=None):
    """Accept the first peer on ``sock`` whose SO_PEERCRED uid is in ``uids``; every other
    one is closed at once with a ``warn(message, pid, uid)`` and listening goes on.  Returns
    the connection; TargetError when none came within ``timeout`` s (None: wait);
    KeyboardInterrupt when ``wake_fd`` becomes readable first (a signal)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    waits = [sock] + ([wake_fd] if wake_fd is not None else [])
    while True:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        r, _, _ = select.select(waits, [], [], left)
        if not r:
            raise TargetError("no connection on %s within %g s" % (path, timeout))
        if sock not in r:
            raise KeyboardInterrupt
        conn, _ = sock.accept()
        pid, uid, _ = peer_cred(conn)
        if uid in uids:
            return conn
        conn.close()
        warn(refused_message(path, pid, uid, uids), pid, uid)


def refused_message(path, pid, uid, uids):
    """The warning for a peer whose uid is not in ``uids`` (closed; listening goes on)."""
    return "refused a peer on %s: pid %s runs as uid %s, not %s (see --peer-uid)" % (
        path, pid, uid, " or ".join(str(u) for u in sorted(uids)))


def peer_pid_of(conn):
    """The pid of the process at the other end of a Unix socket (SO_PEERCRED), or None."""
    try:
        cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid = struct.unpack("3i", cred)[0]
        return pid or None
    except OSError:
        return None


def receive_handshake(conn, timeout=FC_EMPTY_RETRIES * FC_EMPTY_WAIT, first_timeout=None):
    """Receive the JSON bytes and fds of a Firecracker handshake: returns (data, [fds]).

    One ``recvmsg`` of up to 64 KiB with up to 4 fds usually has it all; if no fd came yet or
    the JSON is incomplete it keeps reading for up to ``timeout`` seconds (Firecracker's own
    handlers retry 5 x 100 ms).  Raises HandshakeError (closing any fds) when the peer closes
    first, sends nothing within ``first_timeout`` seconds (None: wait), or the message is too
    large."""
    data, fds = b"", []
    deadline = time.monotonic() + timeout
    cmsg_len = socket.CMSG_SPACE(FC_MAX_FDS * 4)
    try:
        while True:
            left = deadline - time.monotonic()
            r, _, _ = select.select([conn], [], [], max(0.0, left)) if (data or fds) else \
                select.select([conn], [], [], first_timeout)
            if not r:
                if not data and not fds:
                    raise HandshakeError("the peer sent no handshake within %g s" % first_timeout)
                break
            msg, anc, flags, _ = conn.recvmsg(FC_HANDSHAKE_MAX + 1 - len(data), cmsg_len)
            for level, typ, payload in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    n = len(payload) - len(payload) % 4
                    fds.extend(array.array("i", payload[:n]))
            if flags & socket.MSG_CTRUNC:
                raise HandshakeError("handshake carried more than %d fds (expected 1)"
                                     % FC_MAX_FDS)
            if not msg and not anc:
                if not data and not fds:
                    raise HandshakeError("the peer closed the connection without sending the "
                                         "handshake")
                break
            data += msg
            if len(data) > FC_HANDSHAKE_MAX:
                raise HandshakeError("handshake message larger than %d bytes"
                                     % FC_HANDSHAKE_MAX)
            if fds and _json_complete(data):
                break
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return data, fds


def _json_complete(data):
    """Whether ``data`` starts with a whole JSON value (too deep or undecodable counts as
    whole: parse_handshake then says what is wrong with it)."""
    try:
        _json_value(data)
        return True
    except UnicodeDecodeError:
        return True
    except ValueError:
        return False
    except HandshakeError:
        return True


def parse_handshake(data, nfds=1):
    """Validate the JSON of a Firecracker handshake: returns (page_size, [region dicts]).

    Each region has int ``base_host_virt_addr``, ``size``, ``offset``; the page size is
    ``page_size``, else ``page_size_kib`` (which holds bytes, despite its name), else 4096.
    Every number must fit the u64 it is in Firecracker, a region must not wrap past 2^64 (base
    + size, offset + size), base, size and offset are page-aligned, the page size is a power of
    two from 4096 to 1 GiB, regions do not overlap.  Raises HandshakeError naming the field;
    ProtocolUnsupported for the secret-hiding protocol (its region fields, ``nfds`` == 3, or
    bytes after the JSON array: its second message)."""
    if not data:
        raise HandshakeError("empty handshake message")
    try:
        regions, rest = _json_value(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise HandshakeError("handshake is not JSON (%s): %r" % (e, data[:60]))
    if isinstance(regions, list) and any(isinstance(r, dict) and any(
            k in r for k in FC_SECRET_HIDING_FIELDS) for r in regions):
        raise _unsupported_protocol("regions carry %s" % "/".join(FC_SECRET_HIDING_FIELDS))
    if nfds == 3:
        raise _unsupported_protocol("3 fds: uffd, guest_memfd, userfault bitmap")
    if rest:
        if isinstance(regions, list):
            raise _unsupported_protocol("a second message after the regions: %r" % rest[:40])
        raise HandshakeError("handshake is not JSON (extra data after the value): %r"
                             % data[:60])
    if not isinstance(regions, list) or not regions:
        raise HandshakeError("handshake must be a non-empty JSON array of regions, got %s"
                             % type(regions).__name__)
    page_sizes = set()
    out = []
    for i, r in enumerate(regions):
        if not isinstance(r, dict):
            raise HandshakeError("handshake region %d is not an object" % i)
        reg = {}
        for k in ("base_host_virt_addr", "size", "offset"):
            v = r.get(k)
            if type(v) is not int or v < 0:
                raise HandshakeError("handshake region %d: %s must be a non-negative integer, "
                                     "got %.40r" % (i, k, v))
            if v >= _U64:
                raise HandshakeError("handshake region %d: %s does not fit in 64 bits: %.40r"
                                     % (i, k, v))
            reg[k] = v
        for k in ("page_size", "page_size_kib"):
            v = r.get(k)
            if v is not None and (type(v) is not int or v < 4096 or v & (v - 1) or
                                  v > FC_MAX_PAGE_SIZE):
                raise HandshakeError("handshake region %d: %s %.40r is not a power of two "
                                     "from 4096 to %d" % (i, k, v, FC_MAX_PAGE_SIZE))
        ps = r.get("page_size", r.get("page_size_kib", 4096))
        page_sizes.add(ps)
        out.append(reg)
    if len(page_sizes) != 1:
        raise HandshakeError("handshake regions have different page sizes: %s"
                             % sorted(page_sizes))
    ps = page_sizes.pop()
    for i, r in enumerate(out):
        for k in ("base_host_virt_addr", "size", "offset"):
            if r[k] % ps or (k == "size" and not r[k]):
                raise HandshakeError("handshake region %d: %s 0x%x is not aligned to the page "
                                     "size %d%s" % (i, k, r[k], ps, " (or is 0)" * (k == "size")))
        for k in ("base_host_virt_addr", "offset"):
            if r[k] + r["size"] > _U64:
                raise HandshakeError("handshake region %d: %s 0x%x + size 0x%x wraps past 2^64"
                                     % (i, k, r[k], r["size"]))
    spans = sorted((r["base_host_virt_addr"], r["base_host_virt_addr"] + r["size"], i)
                   for i, r in enumerate(out))
    for (a, b, i), (c, d, j) in zip(spans, spans[1:]):
        if c < b:
            raise HandshakeError("handshake regions %d and %d overlap at 0x%x: region %d's "
                                 "base_host_virt_addr + size reaches past region %d's"
                                 % (i, j, c, i, j))
    return ps, out


def _is_userfaultfd(fd):
    try:
        return os.readlink("/proc/self/fd/%d" % fd) == "anon_inode:[userfaultfd]"
    except OSError:
        return True                           # no /proc: trust the peer


def check_peer_uffd(fd):
    """HandshakeError unless ``fd`` is a userfaultfd on which the peer did UFFDIO_API: before
    it, every read and ioctl but UFFDIO_API fails with EINVAL (fs/userfaultfd.c), so serving
    would end at the first read with nothing served.  The probe is a UFFDIO_WAKE of an empty
    wait queue (one page at vm.mmap_min_addr, the lowest address a range may have: no thread
    waits there, nothing changes)."""
    if not _is_userfaultfd(fd):
        raise HandshakeError("the fd sent with the handshake is not a userfaultfd")
    low = read_sysfs("/proc/sys/vm/mmap_min_addr", "")
    low = int(low) if low.isdigit() else 0
    arg = uffdio_range(max(1 << 16, -(-low // PAGE_SIZE) * PAGE_SIZE), PAGE_SIZE)
    try:
        fcntl.ioctl(fd, UFFDIO_WAKE, arg, True)
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise HandshakeError("the peer's userfaultfd is not initialised (UFFDIO_API was "
                                 "never called on it: every read/ioctl fails with EINVAL)")
        raise HandshakeError("the peer's userfaultfd fails UFFDIO_WAKE: %s"
                             % os.strerror(e.errno))


class FirecrackerTarget(Target):
    """serve-file ``--firecracker-socket PATH``: listen on a Unix socket, accept Firecracker (or
    anything speaking its UFFD handshake), receive the regions and the uffd.  ``open`` does it
    all (``ready`` is written once listening); the peer's socket and pidfd are the fds whose
    readiness ends the session.  ``conn``: a connection already accepted on ``path`` (a
    ``--peers`` worker: its parent listens); ``open`` then only reads the handshake."""
    name = "firecracker"

    def __init__(self, path, accept_timeout=None, peer_uid=None, conn=None):
        self.path = path
        self.accept_timeout = accept_timeout
        self.peer_uid = peer_uid              # also accept peers of this uid (--peer-uid)
        self.sock_id = None                   # (dev, ino) of the socket file we bound
        self.log = None
        self.sock = None
        self.conn = conn
        self.pidfd = -1
        self.uffd = None
        self.regions = []
        self.drained = None

    def open(self, log, source, wake_fd=None):
        self.log = log
        if self.conn is None:
            self.sock = listen_unix(self.path, peer_uid=self.peer_uid)
            self.sock_id = _file_id(self.path)
            log.emit("ready", socket=self.path)
        regions = self.accept(self.accept_timeout, source.size, wake_fd)
        log.emit("handshake", pid=self.peer_pid, page_size=self.page_size,
                 regions=len(regions), bytes=sum(r["size"] for r in regions),
                 layout=[{"base": r["base_host_virt_addr"], "size": r["size"],
                          "offset": r["offset"]} for r in regions])

    def accept(self, timeout=None, source_size=None, wake_fd=None):
        """Wait for the peer (TargetError after ``timeout`` s; KeyboardInterrupt when
        ``wake_fd`` becomes readable first), receive and validate its handshake;
        ``source_size``: bytes the source has (a shorter one is a UsageError).  Returns the
        regions (dicts, as in the handshake)."""
        if self.conn is None:
            uids = {os.geteuid()} | ({self.peer_uid} if self.peer_uid is not None else set())
            self.conn = accept_peer(self.sock, self.path, timeout, uids, self._refused, wake_fd)
            self._stop_listening()  # one peer: a second one must fail at connect, not hang
        elif wake_fd is not None:
            # accepted by a --peers parent: a stop before the peer has sent anything drops it
            # (it handed over no memory yet); one that has sent is served, then drained
            r, _, _ = select.select([self.conn, wake_fd], [], [], timeout)
            if r == [wake_fd]:
                raise KeyboardInterrupt
            if not r:
                raise HandshakeError("the peer sent no handshake within %g s" % timeout)
        self.conn.setblocking(True)
        self.peer_pid = peer_pid_of(self.conn)
        data, fds = receive_handshake(self.conn, first_timeout=timeout)
        try:
            if len(fds) != 1 and len(fds) != 3:
                raise HandshakeError("handshake carried %d fds, expected exactly 1 (the uffd)"
                                     % len(fds))
            ps, regions = parse_handshake(data, len(fds))
            check_peer_uffd(fds[0])
            if source_size is not None:
                need = max(r["offset"] + r["size"] for r in regions)
                if need > source_size:
                    raise UsageError(
                        "source too short: the regions need %d bytes (offset+size up to 0x%x), "
                        "the file has %d from --offset" % (need, need, source_size))
        except UffdToolError as e:
            for fd in fds:
                os.close(fd)
            e.fields = {"handshake": data[:2048].decode("utf-8", "replace")}  # what was refused
            raise
        self.page_size = ps
        self.hugetlb = ps != PAGE_SIZE
        self.regions = regions
        self.uffd = Userfaultfd.adopt(fds[0])
        return regions

    def attach(self, handler):
        regs = [Region(r["base_host_virt_addr"], r["base_host_virt_addr"] + r["size"],
                       r["offset"]) for r in self.regions]
        handler.exact_regions = True          # the handshake lists all registered memory
        handler.add(self.uffd, regs, self.peer_pid, "firecracker")
        fds = [self.conn.fileno()]
        if self.peer_pid:
            try:
                self.pidfd = os.pidfd_open(self.peer_pid)
                fds.append(self.pidfd)
            except (AttributeError, OSError):
                self.pidfd = -1
        return fds

    def ready_fields(self):
        return None                           # written by open(), before the peer connects

    def _refused(self, message, pid, uid):
        if self.log is not None:
            self.log.emit("warning", message=message, pid=pid, uid=uid)

    def _stop_listening(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            _unlink_socket(self.path, self.sock_id)

    def detach(self, handler, reason):
        """Stopped while the peer still runs (SIGINT/SIGTERM, --duration): install every page of
        the regions not served yet and unregister them, so that the VM goes on without a
        handler, with all its memory (else its next fault would wait forever).  Exit 0."""
        if reason == "done":
            warn_if_never_faulted(handler, self.peer_pid)
        if reason not in ("interrupted", "duration", "error"):
            warn_if_never_faulted(handler, self.peer_pid)
        if reason not in ("interrupted", "duration"):
            return None                       # the peer is gone (or the run failed)
        pid = self.peer_pid
        installed = 0
        for s in list(handler.served.values()):
            # pagemap says which pages are missing (per 4 KiB page: not for hugetlb)
            holes = (lambda a, b: missing_runs(pid, a, b)) if pid and not handler.hugetlb \
                else None
            installed += handler.install_missing(s, holes)
            if s.uffd.closed:                 # the peer went away meanwhile: dropped
                continue
            for r in s.regions:
                try:
                    s.uffd.unregister(r.start, r.end - r.start)
                except UffdError as e:
                    if e.errno not in PEER_GONE | {errno.EINVAL}:
                        raise
        self.drained = installed
        return None

    def extra(self):
        return {} if self.drained is None else {"drained_pages": self.drained}

    def fired(self, fd):
        if fd == self.pidfd:
            return "peer exited"
        try:
            data = self.conn.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            return "peer socket: %s" % e.strerror
        return None if data else "peer closed the socket"

    def close(self):
        if self.uffd is not None:
            self.uffd.close()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.sock is not None:
            self._stop_listening()


def warn_if_never_faulted(handler, pid):
    """A peer that hangs up without a single fault was probably not served at all (its memory
    not registered with the uffd it sent, or registered write-protect only): say so."""
    st = handler.stats.count
    if not any(v for k, v in st.items() if k.startswith("faults_")) and \
            not st.get("prefetch_pages"):
        handler.log.emit("warning", pid=pid, message="the peer hung up without a single page "
                         "fault: was its memory registered (MISSING mode) with the uffd it "
                         "sent, and did it touch it?")


def _unlink_socket(path, ident):
    """Remove the socket file at ``path`` if it is still the one this process bound (same
    device and inode ``ident``: another handler may have bound a new one there since)."""
    try:
        if path and ident is not None and _file_id(path) == ident and \
                (os.lstat(path).st_mode & 0o170000) == 0o140000:
            os.unlink(path)
    except OSError:
        pass


# -- serve-file --self: the tool's own fresh memory, touched via ctypes.memmove -------------------

class SelfServeTarget(WorkloadTarget):
    """serve-file ``--self``: a fresh anonymous mapping of this process, registered MISSING on
    a new uffd.  The workload thread reads it with ``ctypes.memmove`` (which runs without the
    GIL, so the handler in the main thread can serve it; ``string_at`` would hold the GIL and
    deadlock), then its bytes are compared with the source (``verify``)."""

    def __init__(self, size, chunk=256 << 10):
        self.size = -(-size // PAGE_SIZE) * PAGE_SIZE
        self.chunk = chunk
        self.uffd = None
        self.addr = 0
        self.elapsed = None

    def attach(self, handler):
        self.addr = self_memory(self.size)
        try:
            self.copy = bytearray(self.size)
        except MemoryError:
            munmap(self.addr, self.size)
            self.addr = 0
            raise _size_error(self.size) from None
        self.uffd = Userfaultfd()
        self.uffd.api(UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_THREAD_ID)
        try:
            madvise(self.addr, self.size, MADV_NOHUGEPAGE)
        except OSError:
            pass
        self.uffd.register(self.addr, self.size)
        handler.add(self.uffd, [Region(self.addr, self.addr + self.size, 0)], os.getpid(), "self")
        return self.done_fds()

    def workload(self):
        dst = (ctypes.c_char * self.size).from_buffer(self.copy)
        try:
            base = ctypes.addressof(dst)
            t = time.perf_counter()
            for off in range(0, self.size, self.chunk):
                ctypes.memmove(base + off, self.addr + off, min(self.chunk, self.size - off))
            self.elapsed = time.perf_counter() - t
        finally:
            del dst

    def fired(self, fd):
        return "workload done"

    def verify(self, source):
        """Compare every byte with what the source should have put there: (ok, first bad)."""
        have = 0 if source.kind == "zero" else min(self.size, source.size)
        view = memoryview(self.copy)
        step = 1 << 20
        for off in range(0, self.size, step):        # a step at a time: never a whole copy
            end = min(self.size, off + step)
            got = view[off:end]
            exp = source_bytes(source, off, max(0, min(end, have) - off))
            exp += bytes(end - off - len(exp))
            if got != exp:
                bad = next(i for i in range(end - off) if got[i] != exp[i])
                return False, off + bad
        return True, None

    def close(self):
        self.end_workload()
        if self.uffd is not None:
            self.uffd.close()
        if self.addr:
            munmap(self.addr, self.size)
            self.addr = 0


###################################################################################################
#  12. info
###################################################################################################

def _try_open(**kw):
    """Try opening a uffd one way; returns (ok, error text)."""
    try:
        Userfaultfd(**kw).close()
        return True, None
    except UffdError as e:
        return False, str(e)


def hugepage_sizes():
    """[{'size': bytes, 'nr': reserved, 'free': free}] from /sys/kernel/mm/hugepages."""
    out = []
    base = "/sys/kernel/mm/hugepages"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return out
    for name in names:
        if name.startswith("hugepages-") and name.endswith("kB"):
            d = os.path.join(base, name)
            out.append({"size": int(name[10:-2]) * 1024,
                        "nr": int(read_sysfs(d + "/nr_hugepages", "0")),
                        "free": int(read_sysfs(d + "/free_hugepages", "0"))})
    out.sort(key=lambda h: h["size"])
    return out


def gather_info():
    """Everything ``uffdtool info`` reports, as a dict.  Never raises for a missing feature."""
    u = os.uname()
    thp = read_sysfs("/sys/kernel/mm/transparent_hugepage/enabled")
    info = {
        "version": __version__,
        "kernel": u.release, "arch": ARCH, "python": platform.python_version(),
        "page_size": PAGE_SIZE, "hugepages": hugepage_sizes(),
        "thp": thp.split("[")[1].split("]")[0] if thp and "[" in thp else thp,
        "uid": os.geteuid(), "cap_sys_ptrace": has_cap(CAP_SYS_PTRACE),
        "unprivileged_userfaultfd": _int_or_none(
            read_sysfs("/proc/sys/vm/unprivileged_userfaultfd")),
        "syscalls": SYSCALLS.get(ARCH, {}),
    }
    dev_exists = os.path.exists(USERFAULTFD_DEV)
    routes = {}
    routes["syscall"] = dict(zip(("ok", "error"), _try_open(route="syscall")))
    routes["syscall_user_mode_only"] = dict(zip(("ok", "error"), _try_open(
        route="syscall", user_mode_only=True)))
    routes["dev"] = dict(zip(("ok", "error"), _try_open(route="dev")) if dev_exists else
                         {"ok": False, "error": "%s does not exist" % USERFAULTFD_DEV})
    routes["dev"]["path"] = USERFAULTFD_DEV
    routes["dev"]["exists"] = dev_exists
    info["open"] = routes
    api = {"ok": False}
    for kw in ({}, {"user_mode_only": True}):
        try:
            with Userfaultfd(**kw) as uffd:
                feats, ioctls = uffd.api(0)
                api = {"ok": True, "route": uffd.route + (" (user mode only)" if kw else ""),
                       "features": feats.names(), "features_mask": int(feats),
                       "unknown_features": feats.unknown,
                       "missing_features": Features(UFFD_API_FEATURES & ~int(feats)).names(),
                       "ioctls": ioctls.names(), "ioctls_mask": int(ioctls)}
            api["register_ioctls"] = _register_probe(feats, **kw)
            if not info["cap_sys_ptrace"]:
                api["notes"] = ["EVENT_FORK is offered but needs CAP_SYS_PTRACE to be enabled"]
            break
        except UffdError as e:
            api = {"ok": False, "error": str(e)}
    info["api"] = api
    return info


def _int_or_none(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def _register_probe(available, **open_kw):
    """Which ioctls a registration allows per memory type, in the widest mode that works here
    (anon: MISSING|WP, shmem: MISSING|WP|MINOR): {kind: {'mode': [...], 'ioctls': [...]}}."""
    out = {}
    want = int(available) & (UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM |
                             UFFD_FEATURE_MINOR_SHMEM)
    M, W, m = (UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP,
               UFFDIO_REGISTER_MODE_MINOR)
    modes = {"anon": (M | W, M), "shmem": (M | W | m, M | W, M)}
    for kind, tries in modes.items():
        fd = -1
        try:
            with Userfaultfd(**open_kw) as uffd:
                uffd.api(want)
                if kind == "shmem":
                    fd = os.memfd_create("uffdtool-info", os.MFD_CLOEXEC)
                    os.ftruncate(fd, PAGE_SIZE)
                    addr = mmap_anon(PAGE_SIZE, flags=MAP_SHARED, fd=fd)
                else:
                    addr = mmap_anon(PAGE_SIZE)
                try:
                    for mode in tries:
                        try:
                            ioctls = uffd.register(addr, PAGE_SIZE, mode)
                        except UffdError as e:
                            out[kind] = "error: %s" % e
                            continue
                        out[kind] = {"mode": [n.lower() for n in RegisterMode(mode).names()],
                                     "ioctls": ioctls.names()}
                        break
                finally:
                    munmap(addr, PAGE_SIZE)
        except OSError as e:
            out[kind] = "error: %s" % e
        finally:
            if fd >= 0:
                os.close(fd)
    return out


def format_info(info):
    """The human-readable form of ``gather_info()``."""
    L = []
    L.append("uffdtool %s on Linux %s (%s), Python %s" % (
        info["version"], info["kernel"], info["arch"], info["python"]))
    hp = ", ".join("%d KiB: %d reserved, %d free" % (h["size"] // 1024, h["nr"], h["free"])
                   for h in info["hugepages"]) or "none"
    L.append("page size       %d bytes; hugepages: %s; THP: %s" % (
        info["page_size"], hp, info["thp"]))
    L.append("privileges      uid %d, CAP_SYS_PTRACE %s, vm.unprivileged_userfaultfd=%s" % (
        info["uid"], "yes" if info["cap_sys_ptrace"] else "no", info["unprivileged_userfaultfd"]))
    for name, r in info["open"].items():
        L.append("open %-22s %s" % (name, "ok" if r["ok"] else "no: %s" % r["error"]))
    api = info["api"]
    if not api["ok"]:
        L.append("UFFDIO_API      not possible: %s" % api.get("error"))
        return "\n".join(L)
    L.append("UFFDIO_API      via %s: features 0x%x, ioctls 0x%x" % (
        api["route"], api["features_mask"], api["ioctls_mask"]))
    L.append("features (%d)   %s" % (len(api["features"]), " ".join(api["features"])))
    if api["missing_features"]:
        L.append("missing         %s" % " ".join(api["missing_features"]))
    L.append("ioctls          %s" % " ".join(api["ioctls"]))
    for note in api.get("notes", []):
        L.append("note            %s" % note)
    for kind, r in api.get("register_ioctls", {}).items():
        L.append("register %-6s %s" % (kind, r if isinstance(r, str) else "%s -> %s" % (
            "|".join(r["mode"]), " ".join(r["ioctls"]))))
    return "\n".join(L)


###################################################################################################
#  13. selftest
###################################################################################################

# A registry of checks (name -> Check), modelled on the kernel's uffd-unit-tests and CRIU's
# uffd-events test.  A check is a function of no arguments: it returns a detail
# string (or None) on success, raises CheckSkip when this machine cannot run it, and anything
# else is a failure.  The GIL trap (a thread of this process that faults while holding the GIL
# blocks the handler thread that would resolve it): memory is always faulted by a
# *forked child* (``_Peer``) or, inside such a child, by a thread that touches it only through
# ``ctypes.memmove`` (which releases the GIL); whoever forks/mremaps/madvises/munmaps a
# registered range is never the process that reads that uffd.  Every wait has a deadline, and
# ``run_check`` runs each check in its own process group, killed when it overruns.

HPAGE_SIZE = 2 << 20                    #: the huge page size the hugetlb checks use
SELFTEST_HUGEPAGES = 8                  #: huge pages the hugetlb checks need, in total
CHECK_TIMEOUT = 6.0                     #: seconds a check may take before it is a FAIL
_PEER_TIMEOUT = 4.0                     #: seconds a peer child may take (< CHECK_TIMEOUT)
_NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
_FREE_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"
PM_UFFD_WP = 1 << 57                    #: /proc/PID/pagemap: the pte is uffd-write-protected


class CheckSkip(UffdToolError):
    """A check cannot run here (not root, old kernel, no huge pages); the message says why."""


class CheckFail(UffdToolError):
    """A check saw the kernel do something else than expected."""


class Check:
    """One registered selftest check: ``name``, ``func`` (no arguments), ``doc`` (one line),
    ``hugepages`` (how many free 2 MiB pages it needs)."""
    __slots__ = ("name", "func", "doc", "hugepages")

    def __init__(self, name, func, doc, hugepages=0):
        self.name, self.func, self.doc, self.hugepages = name, func, doc, hugepages

    def __repr__(self):
        return "<Check %s>" % self.name


#: every check, in the order they run (name -> Check)
SELFTEST_CHECKS = {}


def selftest_check(name, doc=None, hugepages=0):
    """Decorator: register ``func`` as check ``name`` (doc: the docstring's first paragraph)."""
    def deco(func):
        d = doc or " ".join((func.__doc__ or "").strip().split("\n\n")[0].split())
        SELFTEST_CHECKS[name] = Check(name, func, d, hugepages)
        return func
    return deco


def _expect(cond, what, *args):
    if not cond:
        raise CheckFail(what % args if args else what)


def _raises(err, func, *args, **kw):
    """Call ``func``; it must fail with errno ``err``.  Returns the exception."""
    try:
        r = func(*args, **kw)
    except OSError as e:
        if e.errno != err:
            raise CheckFail("%s: expected %s, got %s" % (
                getattr(func, "__name__", func), errno.errorcode[err],
                errno.errorcode.get(e.errno, e.errno)))
        return e
    raise CheckFail("%s: expected %s, it returned %r" % (
        getattr(func, "__name__", func), errno.errorcode[err], r))


def _pattern(seed, n):
    """``n`` bytes that differ for each seed (data verification)."""
    unit = b"<uffdtool %06d>" % seed
    return (unit * (n // len(unit) + 1))[:n]


def _src(data):
    """A ctypes buffer holding ``data`` (keep it alive while its address is used)."""
    return ctypes.create_string_buffer(bytes(data), len(data))


def _peek(addr, n):
    """Read ``n`` bytes at ``addr`` (holds the GIL: only where no handler thread is ours)."""
    return ctypes.string_at(addr, n)


def _poke(addr, data):
    """Write ``data`` at ``addr`` (ctypes.memmove: releases the GIL while it faults)."""
    ctypes.memmove(addr, bytes(data), len(data))


def _view(addr, n):
    """A writable buffer over memory at ``addr`` (for syscalls that read or write it)."""
    return (ctypes.c_char * n).from_address(addr)


def _pagemap(addr, pid="self"):
    """The /proc/PID/pagemap entry (u64) of the page holding ``addr``."""
    with open("/proc/%s/pagemap" % pid, "rb") as f:
        f.seek(addr // PAGE_SIZE * 8)
        return struct.unpack("<Q", f.read(8))[0]


_NOT_PERMITTED = ("not permitted to open a userfaultfd (needs root/CAP_SYS_PTRACE, "
                  "vm.unprivileged_userfaultfd=1 or access to %s)" % USERFAULTFD_DEV)


def _open_uffd(user_mode_only=None):
    """A new Userfaultfd.  ``user_mode_only=None``: a full one if allowed, else (unprivileged)
    one with UFFD_USER_MODE_ONLY, which behaves the same for user-mode accesses.  CheckSkip
    when neither can be opened."""
    try:
        return Userfaultfd(user_mode_only=bool(user_mode_only))
    except UffdError as e:
        if e.errno not in (errno.EPERM, errno.EACCES):
            raise
        if user_mode_only is None:
            return _open_uffd(True)
        raise CheckSkip(_NOT_PERMITTED + (" with UFFD_USER_MODE_ONLY" if user_mode_only
                                          else " without UFFD_USER_MODE_ONLY"))


def _available():
    """The features UFFDIO_API offers here (a throw-away fd)."""
    with _open_uffd() as u:
        return u.api(0)[0]


def _uffd(features=0, user_mode_only=None):
    """An API'd Userfaultfd with ``features``; CheckSkip when the kernel lacks one or it is
    not permitted here."""
    missing = Features(int(features) & ~int(_available()))
    if missing:
        raise CheckSkip("kernel lacks %s" % missing)
    u = _open_uffd(user_mode_only)
    try:
        u.api(features)
    except UffdError as e:
        u.close()
        if e.errno == errno.EPERM:
            raise CheckSkip("%s (needs CAP_SYS_PTRACE)" % e)
        raise
    return u


def _mem(kind, npages):
    """Map ``npages`` of memory ``kind`` ('anon', 'shmem' = memfd, 'hugetlb' = 2 MiB memfd).

    Returns (addr, length, page size, memfd or -1); the memfd is the caller's to close."""
    if kind == "anon":
        return mmap_anon(npages * PAGE_SIZE), npages * PAGE_SIZE, PAGE_SIZE, -1
    ps = HPAGE_SIZE if kind == "hugetlb" else PAGE_SIZE
    flags = os.MFD_CLOEXEC | (os.MFD_HUGETLB | os.MFD_HUGE_2MB if kind == "hugetlb" else 0)
    fd = os.memfd_create("uffdtool-selftest", flags)
    try:
        os.ftruncate(fd, npages * ps)
        return mmap_anon(npages * ps, flags=MAP_SHARED, fd=fd), npages * ps, ps, fd
    except BaseException:
        os.close(fd)
        raise


#: the features a memory kind needs for each register mode (UFFDIO_API feature bits)
_MEM_FEATURES = {
    ("anon", "missing"): 0, ("anon", "wp"): UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    ("shmem", "missing"): UFFD_FEATURE_MISSING_SHMEM,
    ("shmem", "wp"): UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    ("shmem", "minor"): UFFD_FEATURE_MINOR_SHMEM,
    ("hugetlb", "missing"): UFFD_FEATURE_MISSING_HUGETLBFS,
    ("hugetlb", "wp"): UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    ("hugetlb", "minor"): UFFD_FEATURE_MINOR_HUGETLBFS,
}


def free_hugepages():
    """Free 2 MiB huge pages right now (0 when the pool does not exist)."""
    return _int_or_none(read_sysfs(_FREE_HUGEPAGES, "0")) or 0


class hugepages_reserved:
    """Context manager: make sure ``n`` free 2 MiB huge pages exist, by raising
    vm.nr_hugepages (root only), and put the previous value back on exit, also on failure.

    ``ok`` tells whether they are there; ``reason`` says why not.  While it changes the pool it
    holds an flock on the sysctl file, so that concurrent selftests do not restore each
    other's values."""

    def __init__(self, n=SELFTEST_HUGEPAGES):
        self.n, self.ok, self.reason, self._old, self._lock = n, False, None, None, -1

    def __enter__(self):
        free = free_hugepages()
        if free >= self.n:
            self.ok = True
            return self
        if os.geteuid() != 0:
            self.reason = "%d free 2 MiB huge pages, need %d (run as root to reserve them)" % (
                free, self.n)
            return self
        try:
            self._lock = os.open(_NR_HUGEPAGES, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.reason = "no hugetlb pool (%s: %s)" % (_NR_HUGEPAGES, e.strerror)
            return self
        deadline = time.monotonic() + 10
        while True:                             # bounded: never hang on another holder
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._lock)
                    self._lock = -1
                    self.reason = "another process is changing vm.nr_hugepages"
                    return self
                time.sleep(0.01)
        free = free_hugepages()                 # again, under the lock
        old = _int_or_none(read_sysfs(_NR_HUGEPAGES))
        if free >= self.n or old is None:
            self.ok = free >= self.n
            self.reason = None if self.ok else "%s unreadable" % _NR_HUGEPAGES
            return self
        try:
            with open(_NR_HUGEPAGES, "w") as f:
                f.write(str(old + self.n - free))
            self._old = old
        except OSError as e:
            self.reason = "cannot raise vm.nr_hugepages: %s" % e.strerror
            return self
        free = free_hugepages()
        self.ok = free >= self.n
        if not self.ok:
            self.reason = "could reserve only %d of %d 2 MiB huge pages" % (free, self.n)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            try:
                with open(_NR_HUGEPAGES, "w") as f:
                    f.write(str(self._old))
            except OSError:
                pass
            self._old = None
        if self._lock >= 0:
            os.close(self._lock)                # releases the flock
            self._lock = -1


def _need_hugepages(n):
    free = free_hugepages()
    if free < n:
        raise CheckSkip("%d free 2 MiB huge pages, need %d (as root the selftest reserves them "
                        "through vm.nr_hugepages)" % (free, n))


class _Peer:
    """A forked child running ``body(peer)``, talking to us over a SOCK_SEQPACKET socketpair.

    Messages are JSON objects, optionally with fds (SCM_RIGHTS).  In the child, an exception is
    sent back as ``{"error": ...}`` and the child ``_exit``s; in the parent every wait has the
    deadline ``timeout`` seconds from the start, and ``close()`` kills and reaps the child."""

    def __init__(self, body, timeout=_PEER_TIMEOUT):
        self.deadline = time.monotonic() + timeout
        self.status = None
        self.sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:                                    # the child
            code = 0
            try:
                self.sock.close()
                self.sock, self.pid = child_sock, os.getpid()
                _quiet_child()
                body(self)
            except BaseException as e:
                code = 1
                try:
                    result, reason = _classify(e)
                    self.send(error=reason, skip=result == "SKIP")
                except BaseException:
                    pass
            os._exit(code)
        child_sock.close()
        self.pid = pid

    # -- both sides -----------------------------------------------------------------------------
    def send(self, fds=(), **msg):
        data = json.dumps(msg).encode()
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.send(data)

    def recv(self, timeout=None):
        """The next message and its fds: (dict, [fd, ...]).  CheckFail on timeout, on a child
        that exited without a word, or on an error the child reported."""
        if not self._wait_readable(self.sock, timeout):
            raise CheckFail("timed out waiting for the child")
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 8, socket.MSG_CMSG_CLOEXEC)
        if not data:
            raise CheckFail("child exited without reporting (%s)" % self.wait())
        msg = json.loads(data)
        if "error" in msg:
            for fd in fds:
                os.close(fd)
            if msg.get("skip"):
                raise CheckSkip(msg["error"])
            raise CheckFail("child: %s" % msg["error"])
        return msg, fds

    def _remaining_ms(self):
        return max(0, int((self.deadline - time.monotonic()) * 1000))

    def _wait_readable(self, fd, timeout=None):
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLHUP)
        ms = self._remaining_ms() if timeout is None else int(timeout * 1000)
        return bool(p.poll(ms))

    # -- parent side ----------------------------------------------------------------------------
    def serve(self, served):
        """Read and handle uffd messages (``served``, a _Served) until the child sends a
        message; returns it (dict, fds)."""
        while True:
            p = select.poll()
            for u in served.uffds:
                if not u.closed:
                    p.register(u.fileno(), select.POLLIN)
            p.register(self.sock, select.POLLIN | select.POLLHUP)
            ready = p.poll(self._remaining_ms())
            if not ready:
                raise CheckFail("timed out (%d uffd messages so far: %s)" % (
                    len(served.events), ", ".join(type(e).__name__ for _, e in served.events)))
            served.read_pending()
            if any(fd == self.sock.fileno() for fd, _ in ready):
                return self.recv()

    def wait(self):
        """Reap the child (kill it at the deadline); returns 'exit N' or 'signal NAME'."""
        if self.status is None:
            while True:
                pid, st = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.status = st
                    break
                if time.monotonic() > self.deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    raise CheckFail("child did not finish in time (killed)")
                time.sleep(0.002)
        return _status_text(self.status)

    def close(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                self.status = os.waitpid(self.pid, 0)[1]
            except ChildProcessError:
                self.status = -1
            except ProcessLookupError:
                pass
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _status_text(st):
    if st is None:
        return "running"
    if os.WIFSIGNALED(st):
        return "signal " + signal.Signals(os.WTERMSIG(st)).name
    return "exit %d" % os.waitstatus_to_exitcode(st)


def _quiet_child():
    """In a forked child: default SIGBUS/SIGSEGV (no faulthandler dump), no core files."""
    import resource                   # only here: forked checks that expect SIGBUS
    for sig in (signal.SIGBUS, signal.SIGSEGV):
        signal.signal(sig, signal.SIG_DFL)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass


class _Served:
    """Parent side of a check: the uffds, every message read (uffd, event), and a fault policy.

    ``how``: 'copy' (the n-th fault gets ``_pattern(n)``), 'zero', 'wp' (unprotect), 'none'
    (leave the fault pending).  FORK events adopt the child's uffd into ``uffds``."""

    def __init__(self, uffds, how="copy", ps=PAGE_SIZE):
        self.uffds = list(uffds)
        self.how, self.ps = how, ps
        self.events = []
        self.faults = []               # (uffd, PageFault)
        self._bufs = []

    def read_pending(self):
        for u in list(self.uffds):
            if not u.closed:
                for ev in u.read_events():
                    self.handle(u, ev)

    def handle(self, u, ev):
        self.events.append((u, ev))
        if type(ev) is Fork:
            self.uffds.append(ev.ufd)
        elif type(ev) is PageFault:
            self.faults.append((u, ev))
            self.resolve(u, ev)

    def resolve(self, u, ev):
        page = ev.address & ~(self.ps - 1)
        for _ in range(FILL_RETRIES):
            try:
                if self.how == "copy":
                    buf = _src(_pattern(len(self.faults), self.ps))
                    self._bufs.append(buf)
                    u.copy(page, ctypes.addressof(buf), self.ps)
                elif self.how == "zero":
                    u.zeropage(page, self.ps)
                elif self.how == "wp":
                    u.writeprotect(page, self.ps, False)
                return
            except UffdError as e:
                if e.errno == errno.EEXIST:
                    return u.wake(page, self.ps)
                if e.errno != errno.EAGAIN:
                    raise
                for ev2 in u.read_events():            # an event is pending: read it first
                    self.handle(u, ev2)
        raise CheckFail("fill kept failing with EAGAIN")

    def of(self, cls):
        return [e for _, e in self.events if type(e) is cls]

    def close(self):
        for u in self.uffds:
            u.close()


# -- opening and the API handshake ---------------------------------------------------------------

def _check_open(route):
    if route == "dev" and not os.path.exists(USERFAULTFD_DEV):
        raise CheckSkip("%s does not exist (kernel < 6.1)" % USERFAULTFD_DEV)
    try:
        u = Userfaultfd(route=route)
    except UffdError as e:
        if e.errno not in (errno.EPERM, errno.EACCES):
            raise
        if route == "dev":
            raise CheckSkip("no read+write access to %s" % USERFAULTFD_DEV)
        u = Userfaultfd(route=route, user_mode_only=True)     # allowed to everyone
    with u:
        _expect(u.route == route, "opened via %s, not %s", u.route, route)
        _expect(fcntl.fcntl(u.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK, "fd is not O_NONBLOCK")
        _expect(fcntl.fcntl(u.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC, "fd is not CLOEXEC")
        feats, ioctls = u.api(0)
        _expect(Ioctls.API in ioctls and Ioctls.REGISTER in ioctls, "API ioctls %s", ioctls)
        fdinfo = read_sysfs("/proc/self/fdinfo/%d" % u.fileno(), "")
        _expect("API:" in fdinfo, "/proc/self/fdinfo shows no API line")
        return "fd %d%s, features %s" % (
            u.fileno(), " (UFFD_USER_MODE_ONLY: not privileged)" if u.route != route or
            not has_cap(CAP_SYS_PTRACE) and route == "syscall" else "", feats)


@selftest_check("open-syscall")
def check_open_syscall():
    """userfaultfd(2) opens a uffd (O_CLOEXEC|O_NONBLOCK) and UFFDIO_API works on it."""
    return _check_open("syscall")


@selftest_check("open-dev")
def check_open_dev():
    """/dev/userfaultfd + USERFAULTFD_IOC_NEW opens a uffd and UFFDIO_API works on it."""
    return _check_open("dev")


@selftest_check("api-negotiation")
def check_api():
    """UFFDIO_API: granted features within the available ones, a second API call EINVAL,
    an unknown feature bit or API version EINVAL, ioctls before API EINVAL, unknown bits kept."""
    area = mmap_anon(PAGE_SIZE)
    try:
        with _open_uffd() as u:
            e = _raises(errno.EINVAL, u.register, area, PAGE_SIZE)      # before UFFDIO_API
            _expect(e.op == "UFFDIO_REGISTER", "error names %s", e.op)
            _raises(errno.EINVAL, u.read_events)
            want = Features.THREAD_ID | Features.EVENT_REMAP | Features.MISSING_SHMEM
            avail, ioctls = u.api(want)
            _expect(int(u.features) & ~int(avail) == 0, "granted %s not within available %s",
                    u.features, avail)
            _expect(u.features == want, "granted %s, asked %s", u.features, want)
            _expect(int(ioctls) == int(UFFD_API_IOCTLS), "API ioctls %s", ioctls)
            _raises(errno.EINVAL, u.api, 0)                              # only once per fd
            _expect(u.features == want, "a failed second API changed the features")
        with _open_uffd() as u:
            _raises(errno.EINVAL, u.api, 1 << 63)                        # unknown feature bit
        with _open_uffd() as u:                                          # api != 0xAA
            arg = uffdio_api(UFFD_API + 1, 0, 0)
            _raises(errno.EINVAL, u._ioctl, UFFDIO_API, arg, "UFFDIO_API")
            _expect(arg.api == 0 and arg.features == 0, "failed API did not zero the struct")
            u.api(0)                                                     # still usable
        newer = Features(int(avail) | 1 << 17 | 1 << 40)                # a newer kernel's mask
        _expect(newer.unknown == (1 << 17 | 1 << 40), "unknown bits lost: %s", newer)
        _expect(newer.names()[-1] == hex(1 << 17 | 1 << 40), "unknown bits not a number: %s",
                newer)
        _expect(Ioctls(int(ioctls) | 1 << 20).unknown == 1 << 20, "unknown ioctl bit lost")
        return "available %s (%d named)" % (avail, len(avail.names()))
    finally:
        munmap(area, PAGE_SIZE)


# -- MISSING faults, COPY, ZEROPAGE on each memory type --------------------------------------------
def _mem_features(kind, *modes, hugepages=1):
    """The features ``kind`` memory needs for register ``modes``; SKIP when the kernel lacks
    them or (hugetlb) ``hugepages`` huge pages cannot be had."""
    feats = 0
    for mode in modes:
        feats |= _MEM_FEATURES[(kind, mode)]
    if kind == "hugetlb":
        _need_hugepages(hugepages)
    _available_or_skip(feats)
    return feats


def _fault_read_write(kind, how):
    """Child faults a read on page 0 and a write on page 1 of ``kind`` memory; the parent
    serves both with ``how`` ('copy' or 'zero') and checks flags, addresses and data."""
    feats = _mem_features(kind, "missing", hugepages=2)
    stamp = b"written by the child"

    def body(peer):
        u = _uffd(feats)
        addr, length, ps, fd = _mem(kind, 2)
        ioctls = u.register(addr, length)
        peer.send(fds=[u.fileno()], addr=addr, ps=ps, ioctls=int(ioctls))
        d0 = _peek(addr, ps)                      # read fault
        _poke(addr + ps, stamp)                   # write fault
        d1 = _peek(addr + ps, ps)
        peer.send(d0=_digest(d0), d1=_digest(d1))

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        addr, ps, ioctls = msg["addr"], msg["ps"], Ioctls(msg["ioctls"])
        want = Ioctls.WAKE | Ioctls.COPY | (Ioctls.ZEROPAGE if kind != "hugetlb" else 0)
        _expect(want in ioctls, "register returned %s, lacks %s", ioctls, want)
        if kind == "hugetlb":
            _expect(Ioctls.ZEROPAGE not in ioctls, "hugetlb range offers ZEROPAGE")
        served = _Served([Userfaultfd.adopt(fds[0], feats)], how, ps)
        try:
            msg, _ = peer.serve(served)
            _expect(peer.wait() == "exit 0", "child %s", peer.wait())
        finally:
            served.close()
    f = [ev for _, ev in served.faults]
    _expect(len(f) == 2, "expected 2 faults, got %r", f)
    _expect(f[0].address == addr and not f[0].write and f[0].kind == "missing",
            "first fault %r is not a read of page 0", f[0])
    _expect(f[1].address == addr + ps and f[1].write and f[1].kind == "missing",
            "second fault %r is not a write of page 1", f[1])
    if how == "copy":
        want0, want1 = _pattern(1, ps), stamp + _pattern(2, ps)[len(stamp):]
    else:
        want0, want1 = bytes(ps), stamp + bytes(ps - len(stamp))
    _expect(msg["d0"] == _digest(want0), "page 0 (read fault) holds other data")
    _expect(msg["d1"] == _digest(want1), "page 1 (write fault) holds other data")
    return "faults %s, ioctls %s" % (" ".join("0x%x:%s" % (e.address, e.flags) for e in f),
                                     ioctls)


def _digest(data):
    """A short fingerprint of ``data``: CRC-32 and length (children report these)."""
    import binascii                   # only here: fingerprints for data verification
    return "%08x:%d" % (binascii.crc32(data), len(data))


def _available_or_skip(features):
    missing = Features(int(features) & ~int(_available()))
    if missing:
        raise CheckSkip("kernel lacks %s" % missing)


def _register_memory_checks():
    for kind in ("anon", "shmem", "hugetlb"):
        hp = 2 if kind == "hugetlb" else 0
        what = {"anon": "anonymous", "shmem": "shmem (memfd)", "hugetlb": "hugetlb 2 MiB"}[kind]
        selftest_check("%s-missing-copy" % kind,
                       "MISSING read and write faults on %s memory served by UFFDIO_COPY, "
                       "data verified" % what, hp)(
            lambda kind=kind: _fault_read_write(kind, "copy"))
        if kind != "hugetlb":
            selftest_check("%s-missing-zeropage" % kind,
                           "MISSING read and write faults on %s memory served by "
                           "UFFDIO_ZEROPAGE, data verified" % what)(
                lambda kind=kind: _fault_read_write(kind, "zero"))
        else:
            selftest_check("hugetlb-zeropage-einval",
                           "hugetlb ranges do not offer ZEROPAGE; UFFDIO_ZEROPAGE is EINVAL",
                           1)(check_hugetlb_zeropage)
        selftest_check("%s-wp" % kind,
                       "WP faults on %s memory (flags wp|write), UFFDIO_WRITEPROTECT protect "
                       "and unprotect" % what, 1 if hp else 0)(lambda kind=kind: _wp_faults(kind))
        if kind != "anon":
            selftest_check("%s-minor-continue" % kind,
                           "MINOR faults on %s mapped twice, served by UFFDIO_CONTINUE after "
                           "editing the page through the other mapping" % what,
                           1 if hp else 0)(lambda kind=kind: _minor_continue(kind))


def check_hugetlb_zeropage():
    """hugetlb ranges do not offer ZEROPAGE; UFFDIO_ZEROPAGE is EINVAL."""
    _need_hugepages(1)
    addr, length, ps, fd = _mem("hugetlb", 1)
    try:
        with _uffd(UFFD_FEATURE_MISSING_HUGETLBFS) as u:
            ioctls = u.register(addr, length)
            _expect(Ioctls.ZEROPAGE not in ioctls and Ioctls.COPY in ioctls,
                    "hugetlb register returned %s", ioctls)
            _raises(errno.EINVAL, u.zeropage, addr, length)
            _raises(errno.EINVAL, u.copy, addr, addr, PAGE_SIZE)    # not huge-page sized
            u.unregister(addr, length)
        return "ioctls %s" % ioctls
    finally:
        munmap(addr, length)
        os.close(fd)


def _wp_faults(kind):
    """WP faults (flags wp|write) on ``kind`` memory, protect/unprotect by the parent."""
    feats = _mem_features(kind, "wp", "missing")

    def body(peer):
        u = _uffd(feats)
        addr, length, ps, fd = _mem(kind, 1)
        _poke(addr, _pattern(1, ps))            # present before registering
        ioctls = u.register(addr, length, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP)
        peer.send(fds=[u.fileno()], addr=addr, ps=ps, ioctls=int(ioctls))
        peer.recv()                             # parent protected the page
        peer.send(read=_digest(_peek(addr, ps)))    # a read does not fault
        peer.recv()
        _poke(addr + 8, b"WP")                  # a write faults (wp|write)
        peer.send(wrote=1)
        peer.recv()                             # protected and unprotected again
        _poke(addr + 16, b"again")              # no fault now
        peer.send(d=_digest(_peek(addr, ps)))

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        addr, ps, ioctls = msg["addr"], msg["ps"], Ioctls(msg["ioctls"])
        _expect(Ioctls.WRITEPROTECT in ioctls, "register returned %s", ioctls)
        served = _Served([Userfaultfd.adopt(fds[0], feats)], "wp", ps)
        u = served.uffds[0]
        try:
            u.writeprotect(addr, ps, True)
            peer.send(go=1)
            msg, _ = peer.serve(served)
            _expect(not served.faults, "a read of a write-protected page faulted: %r",
                    served.faults)
            _expect(msg["read"] == _digest(_pattern(1, ps)),
                    "a read of a write-protected page saw other data")
            peer.send(go=2)
            msg, _ = peer.serve(served)
            _expect(len(served.faults) == 1, "faults after the write: %r", served.faults)
            u.writeprotect(addr, ps, True)
            u.writeprotect(addr, ps, False)
            _raises(errno.EINVAL, u.writeprotect, addr, ps, True, True)   # WP|DONTWAKE
            peer.send(go=3)
            msg, _ = peer.serve(served)
            peer.wait()
        finally:
            served.close()
    f = [ev for _, ev in served.faults]
    _expect(len(f) == 1, "expected one WP fault, got %r", f)
    _expect(f[0].kind == "wp" and f[0].write and f[0].address == addr, "fault %r", f[0])
    p = bytearray(_pattern(1, ps))
    p[8:10], p[16:21] = b"WP", b"again"
    _expect(msg["d"] == _digest(bytes(p)), "page holds other data after the WP faults")
    return "fault 0x%x flags %s" % (f[0].address, FaultFlags(f[0].flags))


def _minor_continue(kind):
    """MINOR fault on the registered alias of a memfd; the parent edits the page through its
    own mapping of the memfd, then UFFDIO_CONTINUE maps it; CONTINUE again: EEXIST."""
    feats = _mem_features(kind, "minor")

    def body(peer):
        u = _uffd(feats)
        alias, length, ps, fd = _mem(kind, 1)
        _poke(alias, _pattern(1, ps))           # in the page cache now
        addr = mmap_anon(length, flags=MAP_SHARED, fd=fd)
        ioctls = u.register(addr, length, UFFDIO_REGISTER_MODE_MINOR)
        peer.send(fds=[u.fileno(), fd], addr=addr, ps=ps, ioctls=int(ioctls))
        peer.send(d=_digest(_peek(addr, ps)))   # minor fault
        peer.recv()                             # stay alive for the EEXIST probe

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        addr, ps, ioctls = msg["addr"], msg["ps"], Ioctls(msg["ioctls"])
        served = _Served([Userfaultfd.adopt(fds[0], feats)], "none", ps)
        mine = 0
        try:
            _expect(Ioctls.CONTINUE in ioctls, "register returned %s", ioctls)
            u = served.uffds[0]
            _expect(peer._wait_readable(u.fileno()), "no minor fault arrived")
            served.read_pending()
            f = [ev for _, ev in served.faults]
            _expect(len(f) == 1 and f[0].kind == "minor" and f[0].address == addr and
                    not f[0].write, "faults %r", f)
            mine = mmap_anon(ps, flags=MAP_SHARED, fd=fds[1])
            _expect(_peek(mine, 16) == _pattern(1, 16), "page cache holds other data")
            _poke(mine, _pattern(2, ps))            # edit, then map it for the child
            _expect(u.continue_(addr, ps) == ps, "CONTINUE incomplete")
            msg, _ = peer.recv()
            _raises(errno.EEXIST, u.continue_, addr, ps)
            peer.send(bye=1)
            peer.wait()
        finally:
            if mine:
                munmap(mine, ps)
            os.close(fds[1])
            served.close()
    _expect(msg["d"] == _digest(_pattern(2, ps)), "child read other data after CONTINUE")
    return "minor fault 0x%x, ioctls %s" % (addr, ioctls)


_register_memory_checks()


@selftest_check("copy-eexist")
def check_copy_eexist():
    """UFFDIO_COPY/ZEROPAGE/POISON onto a present page: EEXIST (nothing done); WAKE after it;
    COPY outside a registered range: ENOENT."""
    ps = PAGE_SIZE
    area = mmap_anon(3 * ps)
    src = _src(_pattern(7, ps))
    try:
        with _uffd(UFFD_FEATURE_POISON) as u:
            u.register(area, 2 * ps)
            _expect(u.copy(area, ctypes.addressof(src), ps) == ps, "first COPY incomplete")
            e = _raises(errno.EEXIST, u.copy, area, ctypes.addressof(src), ps)
            _expect(e.done == 0, "EEXIST with progress %d", e.done)
            _raises(errno.EEXIST, u.zeropage, area, ps)
            _raises(errno.EEXIST, u.poison, area, ps)
            u.wake(area, ps)                          # nothing waits: still 0
            _raises(errno.ENOENT, u.copy, area + 2 * ps, ctypes.addressof(src), ps)
            _raises(errno.EINVAL, u.copy, area + 1, ctypes.addressof(src), ps)   # unaligned
            u.unregister(area, 2 * ps)
            _expect(_peek(area, ps) == src.raw, "copied page holds other data")
        return None
    finally:
        munmap(area, 3 * ps)


@selftest_check("copy-partial")
def check_copy_partial():
    """A COPY/ZEROPAGE that meets a present page stops there: -1/EAGAIN with the bytes done in
    the result field; the binding returns that progress; the retry reports the real error."""
    ps = PAGE_SIZE
    area = mmap_anon(8 * ps)
    src = _src(_pattern(3, 4 * ps))
    try:
        _poke(area + 2 * ps, b"present")              # populate pages 2 and 6 before registering
        _poke(area + 6 * ps, b"present")
        with _uffd() as u:
            u.register(area, 8 * ps)
            arg = uffdio_copy(area, ctypes.addressof(src), 4 * ps, 0, 0)
            _raises(errno.EAGAIN, u._ioctl, UFFDIO_COPY, arg, "UFFDIO_COPY")
            _expect(arg.copy == 2 * ps, "raw COPY progress %d, want %d", arg.copy, 2 * ps)
        # the same through the binding on a fresh registration
        munmap(area, 8 * ps)
        area = mmap_anon(8 * ps)
        _poke(area + 2 * ps, b"present")
        _poke(area + 6 * ps, b"present")
        with _uffd() as u:
            u.register(area, 8 * ps)
            done = u.copy(area, ctypes.addressof(src), 4 * ps)
            _expect(done == 2 * ps, "COPY progress %d, want %d", done, 2 * ps)
            e = _raises(errno.EEXIST, u.copy, area + done, ctypes.addressof(src) + done, 2 * ps)
            _expect(e.done == 0, "retry reports progress %d", e.done)
            _expect(u.copy(area + 3 * ps, ctypes.addressof(src) + 3 * ps, ps) == ps, "page 3")
            zdone = u.zeropage(area + 4 * ps, 4 * ps)
            _expect(zdone == 2 * ps, "ZEROPAGE progress %d, want %d", zdone, 2 * ps)
            u.unregister(area, 8 * ps)
        want = src.raw[:2 * ps] + b"present" + bytes(ps - 7) + src.raw[3 * ps:]
        _expect(_peek(area, 4 * ps) == want, "pages 0-3 hold other data")
        _expect(_peek(area + 4 * ps, 2 * ps) == bytes(2 * ps), "pages 4-5 not zero")
        return "COPY 4 pages -> %d bytes, ZEROPAGE 4 pages -> %d bytes" % (done, zdone)
    finally:
        munmap(area, 8 * ps)


@selftest_check("wake")
def check_wake():
    """A fault served with COPY_MODE_DONTWAKE stays blocked until UFFDIO_WAKE."""
    def body(peer):
        u = _uffd()
        addr = mmap_anon(PAGE_SIZE)
        u.register(addr, PAGE_SIZE)
        peer.send(fds=[u.fileno()], addr=addr)
        peer.send(d=_digest(_peek(addr, PAGE_SIZE)))

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        served = _Served([Userfaultfd.adopt(fds[0])], "none")
        try:
            u = served.uffds[0]
            _expect(peer._wait_readable(u.fileno()), "no fault arrived")
            served.read_pending()
            _expect(len(served.faults) == 1, "faults: %r", served.faults)
            src = _src(_pattern(5, PAGE_SIZE))
            n = u.copy(msg["addr"], ctypes.addressof(src), PAGE_SIZE, UFFDIO_COPY_MODE_DONTWAKE)
            _expect(n == PAGE_SIZE, "COPY did %d", n)
            _expect(not peer._wait_readable(peer.sock, 0.2),
                    "the child went on without UFFDIO_WAKE")
            u.wake(msg["addr"], PAGE_SIZE)
            msg, _ = peer.recv()
            _expect(msg["d"] == _digest(src.raw), "woken child read other data")
            peer.wait()
        finally:
            served.close()
    return "blocked 200 ms after COPY(DONTWAKE), released by WAKE"


@selftest_check("poison")
def check_poison():
    """UFFDIO_POISON: a syscall reading the page gets EFAULT, an access gets SIGBUS."""
    def body(peer):
        u = _uffd(UFFD_FEATURE_POISON)
        addr = mmap_anon(2 * PAGE_SIZE)
        ioctls = u.register(addr, 2 * PAGE_SIZE)
        peer.send(fds=[u.fileno()], addr=addr, ioctls=int(ioctls))
        peer.recv()
        r, w = os.pipe()
        try:
            os.write(w, _view(addr, PAGE_SIZE))
            peer.send(write="no error")
        except OSError as e:
            peer.send(write=errno.errorcode.get(e.errno, str(e.errno)))
        peer.send(d1=_digest(_peek(addr + PAGE_SIZE, PAGE_SIZE)))
        _peek(addr, 1)                          # SIGBUS
        peer.send(error="no SIGBUS on the poisoned page")

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        addr = msg["addr"]
        served = _Served([Userfaultfd.adopt(fds[0], UFFD_FEATURE_POISON)], "copy")
        try:
            _expect(Ioctls.POISON in Ioctls(msg["ioctls"]), "register returned %s",
                    Ioctls(msg["ioctls"]))
            u = served.uffds[0]
            _expect(u.poison(addr, PAGE_SIZE) == PAGE_SIZE, "POISON incomplete")
            _raises(errno.EEXIST, u.poison, addr, PAGE_SIZE)
            src = _src(_pattern(9, PAGE_SIZE))
            u.copy(addr + PAGE_SIZE, ctypes.addressof(src), PAGE_SIZE)
            peer.send(go=1)
            m1, _ = peer.serve(served)
            m2, _ = peer.serve(served)
            status = peer.wait()
        finally:
            served.close()
    _expect(m1["write"] == "EFAULT", "write() from the poisoned page: %s", m1["write"])
    _expect(m2["d1"] == _digest(src.raw), "the copied page holds other data")
    _expect(status == "signal SIGBUS", "child touching the poisoned page: %s", status)
    _expect(not served.faults, "poisoned page raised uffd messages")
    return "write() -> EFAULT, access -> SIGBUS"


@selftest_check("move")
def check_move():
    """UFFDIO_MOVE resolves a MISSING fault (thread faulting via memmove, same process):
    data moved, source emptied; EEXIST onto a present page; ENOENT/ALLOW_SRC_HOLES on holes."""
    _available_or_skip(UFFD_FEATURE_MOVE)

    def body(peer):
        import threading                # only here: the faulting thread of the MOVE check
        ps = PAGE_SIZE
        u = _uffd(UFFD_FEATURE_MOVE)
        src = mmap_anon(4 * ps)
        dst = mmap_anon(4 * ps)
        _poke(src, _pattern(4, ps))
        _poke(src + ps, _pattern(5, ps))
        u.register(dst, 4 * ps)
        buf = ctypes.create_string_buffer(ps)
        t = threading.Thread(target=ctypes.memmove, args=(buf, dst, ps), daemon=True)
        t.start()                       # faults on dst; memmove releases the GIL
        p = select.poll()
        p.register(u.fileno(), select.POLLIN)
        _expect(p.poll(2000), "no fault from the thread")
        evs = u.read_events()
        _expect(len(evs) == 1 and evs[0].address == dst, "events %r", evs)
        _expect(u.move(dst, src, ps) == ps, "MOVE incomplete")
        t.join(2)
        _expect(not t.is_alive(), "the faulting thread is still blocked")
        out = {"moved": buf.raw == _pattern(4, ps), "src_empty": _peek(src, ps) == bytes(ps)}
        try:
            u.move(dst, src + ps, ps)
            out["eexist"] = "no error"
        except UffdError as e:
            out["eexist"] = errno.errorcode[e.errno]
        try:
            u.move(dst + ps, src + 2 * ps, ps)      # src page 2 was never touched: a hole
            out["hole"] = "no error"
        except UffdError as e:
            out["hole"] = errno.errorcode[e.errno]
        out["holes_ok"] = u.move(dst + ps, src + ps, 3 * ps,
                                 UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES) == 3 * ps
        u.unregister(dst, 4 * ps)
        out["moved2"] = _peek(dst + ps, ps) == _pattern(5, ps)
        peer.send(**out)

    with _Peer(body) as peer:
        msg, _ = peer.recv()
        peer.wait()
    _expect(msg["moved"], "the faulting thread read other data after MOVE")
    _expect(msg["src_empty"], "the source page still has data after MOVE")
    _expect(msg["eexist"] == "EEXIST", "MOVE onto a present page: %s", msg["eexist"])
    _expect(msg["hole"] == "ENOENT", "MOVE from a hole: %s", msg["hole"])
    _expect(msg["holes_ok"] and msg["moved2"], "MOVE with ALLOW_SRC_HOLES failed")
    return None


# -- non-cooperative events ---------------------------------------------------------------------

def _event_peer(features, script, kind="anon", npages=4, how="copy", reg_pages=None):
    """Run ``script(peer, addr, ps)`` in a child that owns a uffd with ``features`` and
    ``npages`` registered pages of ``kind``, while we read its messages and serve its faults
    (how=...).  Returns (served, [messages]) once the child has exited."""
    _available_or_skip(features)
    feats_mem = _MEM_FEATURES[(kind, "missing")]

    def body(peer):
        u = _uffd(features | feats_mem)
        addr, length, ps, fd = _mem(kind, npages)
        u.register(addr, length if reg_pages is None else reg_pages * ps)
        peer.send(fds=[u.fileno()], addr=addr, ps=ps)
        script(peer, addr, ps)
        peer.send(done=1)

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        served = _Served([Userfaultfd.adopt(fds[0], features | feats_mem)], how, msg["ps"])
        msgs = [msg]
        try:
            while True:
                m, _ = peer.serve(served)
                msgs.append(m)
                if m.get("done"):
                    break
            status = peer.wait()
            _expect(status == "exit 0", "child: %s", status)
        finally:
            served.close()
    return served, msgs


@selftest_check("event-fork")
def check_event_fork():
    """EVENT_FORK: the fork blocks until read; the child's faults arrive on the new uffd and
    are served through it (data verified)."""
    def script(peer, addr, ps):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                peer.send(grandchild=_digest(_peek(addr, ps)))
                code = 0
            finally:
                os._exit(code)
        _, st = os.waitpid(pid, 0)
        peer.send(fork_status=st)

    served, msgs = _event_peer(UFFD_FEATURE_EVENT_FORK, script)
    addr = msgs[0]["addr"]
    forks = served.of(Fork)
    _expect(len(forks) == 1, "FORK events: %r", forks)
    _expect(len(served.uffds) == 2, "the FORK uffd was not adopted")
    _expect([u for u, _ in served.faults] == [served.uffds[1]],
            "the child's fault did not arrive (only) on the FORK uffd")
    _expect(served.faults[0][1].address == addr, "fault at 0x%x", served.faults[0][1].address)
    m = {k: v for d in msgs for k, v in d.items()}
    _expect(m.get("grandchild") == _digest(_pattern(1, PAGE_SIZE)),
            "the forked child read other data")
    _expect(m.get("fork_status") == 0, "the forked child failed")
    return "ufd %d" % forks[0].ufd.fileno()


def _check_remap(fixed):
    def script(peer, addr, ps):
        # page 2 is mapped but not registered: a separate VMA, so the grow has to move
        d0 = _digest(_peek(addr, ps))                         # fault 1, served pattern 1
        if fixed:
            target = mmap_anon(2 * ps)                        # not registered: no UNMAP for it
            new = mremap(addr, 2 * ps, 2 * ps, MREMAP_MAYMOVE | MREMAP_FIXED, target)
            _expect(new == target, "MREMAP_FIXED went to 0x%x" % new)
        else:
            new = mremap(addr, 2 * ps, 4 * ps, MREMAP_MAYMOVE)
        d0b = _digest(_peek(new, ps))                         # moved with the mapping
        d1 = _digest(_peek(new + ps, ps))                     # fault 2 at the new address
        peer.send(new=new, d0=d0, d0b=d0b, d1=d1)

    served, msgs = _event_peer(UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_UNMAP, script,
                               npages=3, reg_pages=2)
    addr, ps = msgs[0]["addr"], PAGE_SIZE
    m = msgs[1]
    new = m["new"]
    _expect(new != addr, "mremap did not move")
    names = [type(e).__name__ for _, e in served.events]
    remaps, unmaps = served.of(Remap), served.of(Unmap)
    _expect(remaps == [Remap(addr, new, 2 * ps)], "REMAP events %r (events %s)", remaps, names)
    _expect(unmaps == [Unmap(addr, addr + 2 * ps)], "expected the UNMAP of the old range after "
            "REMAP, got %r (events %s)", unmaps, names)
    _expect(names == ["PageFault", "Remap", "Unmap", "PageFault"], "event order %s", names)
    f = [e for _, e in served.faults]
    _expect(f[0].address == addr and f[1].address == new + ps, "faults %r", f)
    _expect(m["d0"] == m["d0b"] == _digest(_pattern(1, ps)), "page 0 did not move with data")
    _expect(m["d1"] == _digest(_pattern(2, ps)), "fault at the new address served other data")
    return "0x%x -> 0x%x, then %r" % (addr, new, unmaps[0])


@selftest_check("event-remap-grow")
def check_event_remap_grow():
    """EVENT_REMAP on an mremap that grows and moves; the old range's UNMAP follows; the
    registration and the data moved (faults at the new address)."""
    return _check_remap(False)


@selftest_check("event-remap-fixed")
def check_event_remap_fixed():
    """EVENT_REMAP on mremap(MREMAP_FIXED) onto another mapping; UNMAP of the old range."""
    return _check_remap(True)


def _check_remove(kind, advice):
    def script(peer, addr, ps):
        d0 = _digest(_peek(addr, ps))             # fault 1: pattern 1
        madvise(addr, 2 * ps, advice)             # blocks until the REMOVE is read
        d0b = _digest(_peek(addr, ps))            # gone: fault 2, pattern 2
        peer.send(d0=d0, d0b=d0b)

    served, msgs = _event_peer(UFFD_FEATURE_EVENT_REMOVE, script, kind)
    addr, ps = msgs[0]["addr"], PAGE_SIZE
    removes = served.of(Remove)
    _expect(removes == [Remove(addr, addr + 2 * ps)], "REMOVE events %r", removes)
    f = [e for _, e in served.faults]
    _expect(len(f) == 2 and f[0].address == f[1].address == addr,
            "expected a fault before and after the REMOVE, got %r", f)
    _expect(msgs[1]["d0"] == _digest(_pattern(1, ps)), "first fault served other data")
    _expect(msgs[1]["d0b"] == _digest(_pattern(2, ps)), "page was not removed")
    return repr(removes[0])


@selftest_check("event-remove-dontneed")
def check_event_remove_dontneed():
    """EVENT_REMOVE on MADV_DONTNEED of anonymous memory; the range stays registered."""
    return _check_remove("anon", MADV_DONTNEED)


@selftest_check("event-remove-shmem")
def check_event_remove_shmem():
    """EVENT_REMOVE on MADV_REMOVE of shmem (memfd); the range stays registered."""
    return _check_remove("shmem", MADV_REMOVE)


@selftest_check("event-unmap")
def check_event_unmap():
    """EVENT_UNMAP on munmap of part of a registered range; the rest still faults."""
    def script(peer, addr, ps):
        munmap(addr + ps, 2 * ps)
        peer.send(d=_digest(_peek(addr + 3 * ps, ps)))

    served, msgs = _event_peer(UFFD_FEATURE_EVENT_UNMAP, script)
    addr, ps = msgs[0]["addr"], PAGE_SIZE
    unmaps = served.of(Unmap)
    _expect(unmaps == [Unmap(addr + ps, addr + 3 * ps)], "UNMAP events %r", unmaps)
    _expect(msgs[1]["d"] == _digest(_pattern(1, ps)), "remaining page served other data")
    return repr(unmaps[0])


@selftest_check("eagain-remove-unread")
def check_eagain():
    """While a REMOVE event is unread (its madvise blocked), COPY/ZEROPAGE/POISON fail with
    EAGAIN and -EAGAIN in the result field, WRITEPROTECT with EAGAIN; after reading it they work."""
    feats = UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_POISON | UFFD_FEATURE_PAGEFAULT_FLAG_WP
    _available_or_skip(feats)

    def body(peer):
        u = _uffd(feats)
        ps = PAGE_SIZE
        addr = mmap_anon(4 * ps)
        u.register(addr, 4 * ps, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP)
        peer.send(fds=[u.fileno()], addr=addr)
        peer.recv()
        madvise(addr + 3 * ps, ps, MADV_DONTNEED)
        peer.send(d=_digest(_peek(addr, ps)))

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        addr, ps = msg["addr"], PAGE_SIZE
        u = Userfaultfd.adopt(fds[0], feats)
        try:
            peer.send(go=1)
            _expect(peer._wait_readable(u.fileno()), "no REMOVE event arrived")
            src = _src(_pattern(6, ps))
            got = {}
            for op, req, arg, field in (
                    ("COPY", UFFDIO_COPY, uffdio_copy(addr, ctypes.addressof(src), ps, 0, 0),
                     "copy"),
                    ("ZEROPAGE", UFFDIO_ZEROPAGE, uffdio_zeropage(uffdio_range(addr, ps), 0, 0),
                     "zeropage"),
                    ("POISON", UFFDIO_POISON, uffdio_poison(uffdio_range(addr, ps), 0, 0),
                     "updated")):
                _raises(errno.EAGAIN, u._ioctl, req, arg, "UFFDIO_" + op)
                got[op] = getattr(arg, field)
                _expect(got[op] == -errno.EAGAIN, "%s result field %d, want -EAGAIN",
                        op, got[op])
            _raises(errno.EAGAIN, u.writeprotect, addr, ps, True)
            e = _raises(errno.EAGAIN, u.copy, addr, ctypes.addressof(src), ps)   # the binding
            _expect(e.done == 0, "binding reports progress %d", e.done)
            evs = u.read_events()
            _expect(evs == [Remove(addr + 3 * ps, addr + 4 * ps)], "events %r", evs)
            # the madvise caller clears mmap_changing once it is woken: retry until then
            for _ in range(2000):
                try:
                    done = u.copy(addr, ctypes.addressof(src), ps)
                    break
                except UffdError as e:
                    if e.errno != errno.EAGAIN:
                        raise
                    time.sleep(0.001)
            else:
                raise CheckFail("COPY still EAGAIN 2 s after the REMOVE was read")
            _expect(done == ps, "COPY after the read did %d", done)
            msg, _ = peer.recv()
            peer.wait()
        finally:
            u.close()
    _expect(msg["d"] == _digest(src.raw), "page holds other data")
    return "result fields %s" % ", ".join("%s=%d" % kv for kv in got.items())


# -- feature bits -----------------------------------------------------------------------------

def _send_pair(peer, feature):
    """In a check's child: a page registered on a uffd with ``feature`` (a1) and one on a uffd
    without (a2), both uffds sent to the parent (``_serve_pair``).  Returns (uffds, a1, a2)."""
    us = (_uffd(feature), _uffd())
    a1, a2 = mmap_anon(PAGE_SIZE), mmap_anon(PAGE_SIZE)
    us[0].register(a1, PAGE_SIZE)
    us[1].register(a2, PAGE_SIZE)
    peer.send(fds=[u.fileno() for u in us], a1=a1, a2=a2)
    return us, a1, a2


def _serve_pair(peer, feature):
    """The parent's side of ``_send_pair``: serve both uffds until the child ends.  Returns
    (the child's first message, the _Served with its faults, the child's last message)."""
    msg, fds = peer.recv()
    served = _Served([Userfaultfd.adopt(fds[0], feature), Userfaultfd.adopt(fds[1])], "copy")
    try:
        last, _ = peer.serve(served)
        peer.wait()
    finally:
        served.close()
    return msg, served, last


@selftest_check("thread-id")
def check_thread_id():
    """THREAD_ID: pagefault.feat.ptid is the faulting thread's TID (a second thread's, not the
    process's); without the feature it is 0."""
    def body(peer):
        import threading                # only here: the faulting threads of this check
        ps = PAGE_SIZE
        _, a1, a2 = _send_pair(peer, UFFD_FEATURE_THREAD_ID)
        tids = []
        buf = ctypes.create_string_buffer(ps)

        def touch(addr):
            tids.append(threading.get_native_id())
            ctypes.memmove(buf, addr, ps)           # faults without holding the GIL
        for addr in (a1, a2):
            t = threading.Thread(target=touch, args=(addr,), daemon=True)
            t.start()
            t.join(3)
            _expect(not t.is_alive(), "a faulting thread is still blocked")
        peer.send(tids=tids, pid=os.getpid())

    with _Peer(body) as peer:
        _, served, m = _serve_pair(peer, UFFD_FEATURE_THREAD_ID)
    _expect(len(served.faults) == 2, "faults %r", served.faults)
    f1, f2 = served.faults[0][1], served.faults[1][1]
    _expect(f1.ptid == m["tids"][0] and f1.ptid != m["pid"],
            "ptid %d, faulting thread %d (process %d)", f1.ptid, m["tids"][0], m["pid"])
    _expect(f2.ptid == 0, "ptid %d without THREAD_ID", f2.ptid)
    return "ptid %d == thread id (process %d)" % (f1.ptid, m["pid"])


@selftest_check("sigbus-mode")
def check_sigbus():
    """SIGBUS feature: a missing fault sends SIGBUS to the faulting thread and no message."""
    def body(peer):
        u = _uffd(UFFD_FEATURE_SIGBUS)
        addr = mmap_anon(PAGE_SIZE)
        u.register(addr, PAGE_SIZE)
        peer.send(fds=[u.fileno()], addr=addr)
        peer.recv()
        _peek(addr, 1)
        peer.send(error="no SIGBUS")

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        with Userfaultfd.adopt(fds[0], UFFD_FEATURE_SIGBUS) as u:
            peer.send(go=1)
            status = peer.wait()
            evs = u.read_events()
    _expect(status == "signal SIGBUS", "child: %s", status)
    _expect(evs == [], "messages with SIGBUS mode: %r", evs)
    return "child got SIGBUS, no message"


@selftest_check("exact-address")
def check_exact_address():
    """EXACT_ADDRESS: pagefault.address is the exact faulting address; without it, page-aligned."""
    off = 0x123

    def body(peer):
        _, a1, a2 = _send_pair(peer, UFFD_FEATURE_EXACT_ADDRESS)
        _peek(a1 + off, 1)
        _peek(a2 + off, 1)
        peer.send(done=1)

    with _Peer(body) as peer:
        msg, served, _ = _serve_pair(peer, UFFD_FEATURE_EXACT_ADDRESS)
    f = [ev.address for _, ev in served.faults]
    _expect(f == [msg["a1"] + off, msg["a2"]], "fault addresses %s, want %s",
            [hex(a) for a in f], [hex(msg["a1"] + off), hex(msg["a2"])])
    return "0x%x with, 0x%x without" % tuple(f)


@selftest_check("wp-unpopulated")
def check_wp_unpopulated():
    """WP_UNPOPULATED: write-protecting never-touched anonymous pages (markers) makes the first
    write a WP fault; without the feature that write does not fault."""
    feats = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED
    _available_or_skip(feats)

    def body(peer):
        ps = PAGE_SIZE
        u1 = _uffd(feats)
        u2 = _uffd(UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        a1, a2 = mmap_anon(2 * ps), mmap_anon(ps)
        u1.register(a1, 2 * ps, UFFDIO_REGISTER_MODE_WP)
        u2.register(a2, ps, UFFDIO_REGISTER_MODE_WP)
        u1.writeprotect(a1, 2 * ps, True)
        u2.writeprotect(a2, ps, True)
        wp = bool(_pagemap(a1) & PM_UFFD_WP)
        peer.send(fds=[u1.fileno(), u2.fileno()], a1=a1, a2=a2, marker=wp)
        _poke(a2, b"no fault")                      # old behaviour: none pte not protected
        _poke(a1, b"WP fault")                      # marker: WP fault, parent unprotects
        zero = _peek(a1 + ps, ps) == bytes(ps)      # a read over a marker: zero page, no fault
        peer.send(zero=zero, d=_digest(_peek(a1, 8)))

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        served = _Served([Userfaultfd.adopt(fds[0], feats),
                          Userfaultfd.adopt(fds[1], UFFD_FEATURE_PAGEFAULT_FLAG_WP)], "wp")
        try:
            m, _ = peer.serve(served)
            peer.wait()
        finally:
            served.close()
    _expect(msg["marker"], "pagemap shows no uffd-wp bit on the protected none pte")
    f = [(u is served.uffds[0], ev) for u, ev in served.faults]
    _expect(len(f) == 1 and f[0][0], "faults %r: want one, on the WP_UNPOPULATED uffd", f)
    ev = f[0][1]
    _expect(ev.kind == "wp" and ev.write and ev.address == msg["a1"], "fault %r", ev)
    _expect(m["zero"] and m["d"] == _digest(b"WP fault"), "data after the WP fault")
    return "fault 0x%x flags %s" % (ev.address, FaultFlags(ev.flags))


@selftest_check("wp-async")
def check_wp_async():
    """WP_ASYNC: the kernel resolves WP faults itself (no message, the write goes on) and
    clears the uffd-wp bit (pagemap bit 57) of the written page only."""
    feats = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_ASYNC
    _available_or_skip(feats)

    def body(peer):
        ps = PAGE_SIZE
        u = _uffd(feats)
        addr = mmap_anon(3 * ps)
        _poke(addr, b"populated")
        u.register(addr, 3 * ps, UFFDIO_REGISTER_MODE_WP)
        u.writeprotect(addr, 3 * ps, True)
        before = [bool(_pagemap(addr + i * ps) & PM_UFFD_WP) for i in range(3)]
        _poke(addr, b"written")                     # present page: async WP fault
        _poke(addr + ps, b"written")                # none pte with marker
        after = [bool(_pagemap(addr + i * ps) & PM_UFFD_WP) for i in range(3)]
        data = _peek(addr, 9)
        peer.send(before=before, after=after, msgs=len(u.read_events()), data=data.hex())

    with _Peer(body) as peer:
        m, _ = peer.recv()
        peer.wait()
    _expect(m["before"] == [True] * 3, "uffd-wp bits after protecting: %s", m["before"])
    _expect(m["after"] == [False, False, True], "uffd-wp bits after writing pages 0-1: %s",
            m["after"])
    _expect(m["msgs"] == 0, "%d messages in async mode", m["msgs"])
    _expect(bytes.fromhex(m["data"]) == b"writtened", "data %r", m["data"])
    return "pagemap bit 57: %s -> %s" % (m["before"], m["after"])


@selftest_check("user-mode-only")
def check_user_mode_only():
    """UFFD_USER_MODE_ONLY: a kernel access (write() from a registered missing page) fails with
    EFAULT; without the flag the same access is a fault the handler serves."""
    def body(peer):
        u1 = _uffd(user_mode_only=True)
        u2 = _uffd(user_mode_only=False)
        a1, a2 = mmap_anon(PAGE_SIZE), mmap_anon(PAGE_SIZE)
        u1.register(a1, PAGE_SIZE)
        u2.register(a2, PAGE_SIZE)
        peer.send(fds=[u2.fileno()], a2=a2)
        r, w = os.pipe()
        try:
            os.write(w, _view(a1, PAGE_SIZE))
            res = "no error"
        except OSError as e:
            res = errno.errorcode.get(e.errno, str(e.errno))
        n = os.write(w, _view(a2, PAGE_SIZE))          # a kernel-mode fault we serve
        peer.send(user_mode_only=res, n=n, d=_digest(os.read(r, PAGE_SIZE)))

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        served = _Served([Userfaultfd.adopt(fds[0])], "copy")
        try:
            m, _ = peer.serve(served)
            peer.wait()
        finally:
            served.close()
    _expect(m["user_mode_only"] == "EFAULT", "write() from a USER_MODE_ONLY range: %s",
            m["user_mode_only"])
    f = [ev for _, ev in served.faults]
    _expect(len(f) == 1 and f[0].address == msg["a2"], "kernel-mode faults %r", f)
    _expect(m["n"] == PAGE_SIZE and m["d"] == _digest(_pattern(1, PAGE_SIZE)),
            "write() after the served kernel fault")
    return "EFAULT with the flag; a served fault without it"


@selftest_check("handler-events")
def check_handler_events():
    """The Handler loop (what watch and serve-file run) serves a child's MISSING faults with
    zero pages and its FORK (adopting the new uffd), REMAP, REMOVE and UNMAP events."""
    feats = (UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE |
             UFFD_FEATURE_EVENT_UNMAP)
    _available_or_skip(feats)

    def body(peer):
        ps = PAGE_SIZE
        u = _uffd(feats)
        addr = mmap_anon(5 * ps)
        u.register(addr, 4 * ps)                    # page 4 is not: the grow has to move
        peer.send(fds=[u.fileno()], addr=addr)
        ok = [_peek(addr, ps) == bytes(ps)]         # fault, zero page
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if _peek(addr + ps, ps) == bytes(ps) else 2   # on the FORK uffd
            finally:
                os._exit(code)
        ok.append(os.waitpid(pid, 0)[1] == 0)
        new = mremap(addr, 4 * ps, 8 * ps, MREMAP_MAYMOVE)
        ok.append(_peek(new + 2 * ps, ps) == bytes(ps))     # fault at the new address
        madvise(new, ps, MADV_DONTNEED)                      # REMOVE: Handler unregisters it
        ok.append(_peek(new, ps) == bytes(ps))               # a normal fault now
        munmap(new + 3 * ps, ps)                             # UNMAP
        peer.send(ok=ok, new=new)

    with _Peer(body) as peer:
        msg, fds = peer.recv()
        addr, ps = msg["addr"], PAGE_SIZE
        h = Handler(ZeroSource(), on_remove="unregister")
        try:
            s = h.add(Userfaultfd.adopt(fds[0], feats), [(addr, 4 * ps)], pid=peer.pid)
            r = h.run(watch_fds=[peer.sock], timeout=max(0.1, peer.deadline - time.monotonic()))
            _expect(r == peer.sock.fileno(), "Handler.run returned %r", r)
            m, _ = peer.recv()
            peer.wait()
            count = dict(h.stats.count)
            regions = [(g.start - m["new"], g.end - m["new"]) for g in s.regions]
        finally:
            h.close()
    _expect(m["ok"] == [True] * 4, "child saw %s (zero page, forked child, after remap, "
            "after remove)", m["ok"])
    want = {"faults_missing": 3, "events_fork": 1, "events_remap": 1, "events_remove": 1,
            "events_unmap": 2}
    got = {k: count.get(k, 0) for k in want}
    _expect(got == want, "Handler counted %s, want %s", got, want)
    _expect(regions == [(ps, 3 * ps), (4 * ps, 8 * ps)] or regions == [(ps, 3 * ps)],
            "Handler's regions after remap/remove/unmap: %s", regions)
    return " ".join("%s=%d" % kv for kv in sorted(got.items()))


# -- running checks -----------------------------------------------------------------------------

def select_checks(patterns=None):
    """The Checks whose name contains any of ``patterns`` (all when none), registry order."""
    return [c for c in SELFTEST_CHECKS.values()
            if not patterns or any(p in c.name for p in patterns)]


def call_check(check):
    """Run one check in this process: ('PASS'|'FAIL'|'SKIP', reason or detail)."""
    try:
        return "PASS", check.func()
    except Exception as e:
        return _classify(e)


def _classify(e):
    """('SKIP'|'FAIL', reason) for an exception a check raised."""
    if isinstance(e, CheckSkip):
        return "SKIP", str(e)
    if isinstance(e, CheckFail):
        return "FAIL", str(e)
    if isinstance(e, UffdError):
        if e.errno in (errno.EPERM, errno.EACCES) and e.op == "cannot open a userfaultfd":
            return "SKIP", _NOT_PERMITTED
        return "FAIL", str(e)
    return "FAIL", "%s: %s" % (type(e).__name__, e)


def run_check(check, timeout=CHECK_TIMEOUT):
    """Run one check in a forked child (its own process group) with a deadline.

    A check that overruns is killed with all its children and reported as a FAIL.
    Returns (result, reason or detail, milliseconds)."""
    t0 = time.monotonic()
    r, w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setpgid(0, 0)
            res = call_check(check)
            os.write(w, json.dumps(res).encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass                          # the child did it first, or already exited
        p = select.poll()
        p.register(r, select.POLLIN | select.POLLHUP)
        data = b""
        while True:
            left = t0 + timeout - time.monotonic()
            if left <= 0 or not p.poll(int(left * 1000) + 1):
                res = ("FAIL", "timed out after %.1f s (killed)" % timeout)
                break
            chunk = os.read(r, 1 << 16)
            if not chunk:
                try:
                    res = tuple(json.loads(data))
                except ValueError:
                    res = None
                break
            data += chunk
    finally:
        os.close(r)
        try:
            os.killpg(pid, signal.SIGKILL)  # whatever the check left behind
        except OSError:
            pass
        _, st = os.waitpid(pid, 0)
    if res is None:
        res = ("FAIL", "the check process died (%s)" % _status_text(st))
    return res[0], res[1], (time.monotonic() - t0) * 1000


def run_selftest(checks, timeout=CHECK_TIMEOUT):
    """Run ``checks`` (Check objects) one by one, each forked with a deadline; yields
    (check, result, reason/detail, ms).  Reserves the huge pages the hugetlb checks need (as
    root) and gives them back afterwards, also on failure or interruption."""
    need = max([c.hugepages for c in checks] + [0])
    reserve = hugepages_reserved(SELFTEST_HUGEPAGES) if need else None
    if reserve is not None:
        reserve.__enter__()
    try:
        for c in checks:
            if c.hugepages and not reserve.ok:
                yield c, "SKIP", reserve.reason, 0.0
                continue
            result, reason, ms = run_check(c, timeout)
            yield c, result, reason, ms
    finally:
        if reserve is not None:
            reserve.__exit__(None, None, None)


###################################################################################################
#  14. report
###################################################################################################

# ``uffdtool report`` reads a log (or a working-set file) once, as a stream, and keeps per process
# only the first-touch time of each page touched (arrays of REPORT_CHUNK pages), the faults that
# hit a page again (per coarse time bin), the mappings, the last stats record and the first
# REPORT_EVENTS other records: memory follows the distinct pages and bins, never the records.
# The views (terminal text, SVG heat maps, one HTML page) are drawn from that at the end.

REPORT_CHUNK = 32                              #: pages per first-touch array
_UNTOUCHED = array.array("d", [-1.0]) * REPORT_CHUNK
REPORT_EVENTS = 2000                           #: non-fault records kept for the timeline
REPORT_CLUSTER_GAP = 64 << 20                  #: without mappings: a new address cluster after
#                                                 this many untouched bytes
#: records that draw nothing on the timeline (they are counted)
_REPORT_QUIET = ("pagefault", "stats", "start", "ready", "mappings", "verify")
#: heat-map colours from 1 fault per cell to the maximum (yellow to dark red, visible on white)
HEAT_COLOURS = ("#fde68a", "#fcd34d", "#fbbf24", "#f59e0b", "#f97316", "#ea580c", "#dc2626",
                "#b91c1c", "#7f1d1d")


class _Proc:
    """One process of a log (or one uffd whose process the log does not name)."""

    def __init__(self, key, shift):
        self.key = key                     # ("pid", N) or ("ufd", N, generation)
        self.pid = key[1] if key[0] == "pid" else None
        self.shift = shift                 # log2 of its page size
        self.chunks = {}                   # page // REPORT_CHUNK -> first-touch times (-1: none)
        self.refaults = {}                 # (page, time bin) -> faults after the first touch
        self.pages = self.faults = 0
        self.maps = []                     # [start, end, name, source offset or None]
        self.note = ""                     # e.g. "fork child", "Firecracker peer"
        self.comm = ""                     # its command name, from the last mappings record
        self.first = math.inf


class Area:
    """A mapping (or region, or address cluster) of one process, with the pages touched in it.

    ``start``/``end``: bytes; ``pg``/``tt``: page numbers (ascending) and first-touch times;
    ``offset``: the source offset of ``start`` (serve-file regions) or None."""

    def __init__(self, proc, start, end, name, offset=None, cluster=False):
        self.proc, self.start, self.end, self.name = proc, start, end, name
        self.offset, self.cluster = offset, cluster
        self.pg = array.array("q")
        self.tt = array.array("d")
        self.refaults = []                 # [(page, time bin, faults)]
        self.faults = 0
        self.ckey = None                   # comparison key (see LogReport.page_keys)

    @property
    def p0(self):
        return self.start >> self.proc.shift

    @property
    def npages(self):
        return max(1, -(-(self.end - self.start) >> self.proc.shift))

    @property
    def pages(self):
        return len(self.pg)

    @property
    def label(self):
        return self.name or "anon"


class LogReport:
    """A uffdtool log (or working-set file) reduced to what ``uffdtool report`` shows.

    Feed it records (``feed``), then call ``finish()``; ``areas`` then lists every mapping
    with touched pages.  ``warnings`` collects what the CLI should say about the input."""

    def __init__(self, path):
        self.path = path
        self.kind = "log"                  # or "working-set" (then times are touch order)
        self.start = self.exit = None
        self.handshakes = []
        self.stats = {}                    # peer (None: the tool) -> its last stats record
        self.counts = {}                   # event name -> records
        self.events = []                   # (t, event, detail) for the timeline
        self.events_left_out = 0           # records beyond REPORT_EVENTS
        self.phases = []                   # (lane, start, end, label): prefetch, fill, peers
        self._began = {}                   # peer (None: the tool) -> when it began serving
        self.hist = [0] * LAT_BUCKETS      # from the pagefault records' "us"
        self.timed = 0
        self.procs = {}
        self.warnings = []
        self.t_end = 0.0
        self.t_first = math.inf            # first and last fault
        self.t_last = -math.inf
        self.runs = 0
        self.source_keyed = False          # pages compare by source offset (serve-file)
        self._shift = PAGE_SIZE.bit_length() - 1
        self._offset = 0.0                 # added to t (a log holding several runs)
        self._ufd = {}                     # live ufd -> process key
        self._gen = {}                     # ufd -> times it was closed (the number is reused)
        self._default = None               # process of faults that name none (one FC peer)
        self._rq = 1e-4                    # time bin of refaults (doubles as the log grows)
        self._last = (None, None)          # (pid, its _Proc) of the last fault
        self.areas = []

    # -- reading ----------------------------------------------------------------------------
    def _proc(self, key):
        p = self.procs.get(key)
        if p is None:
            p = self.procs[key] = _Proc(key, self._shift)
        return p

    def _proc_of(self, rec):
        pid = rec.get("pid")
        if pid is None:
            pid = rec.get("peer")
        if pid is not None:
            return self._proc(("pid", pid))
        ufd = rec.get("ufd")
        key = self._ufd.get(ufd)
        if key is None:
            key = self._default
            if key is None:
                key = self._ufd[ufd] = ("ufd", ufd, self._gen.get(ufd, 0))
        return self._proc(key)

    def fault(self, rec):
        """One pagefault record (the hot path: a million of them must take seconds)."""
        t = rec["t"] + self._offset
        if not 0 <= t < 1e12:                 # NaN, Infinity (json takes them), negative
            raise ValueError("bad t")
        addr = rec.get("address")
        if addr.__class__ is not int:
            self.counts["bad pagefault"] = self.counts.get("bad pagefault", 0) + 1
            return
        pid = rec.get("pid")
        if pid is not None and pid == self._last[0]:
            proc = self._last[1]
        else:
            proc = self._proc_of(rec)
            if pid is not None:
                self._last = (pid, proc)
        page = addr >> proc.shift
        ch = proc.chunks.get(page // REPORT_CHUNK)
        if ch is None:
            ch = proc.chunks[page // REPORT_CHUNK] = array.array("d", _UNTOUCHED)
        i = page % REPORT_CHUNK
        if ch[i] < 0:
            ch[i] = t
            proc.pages += 1
            if t < proc.first:
                proc.first = t
        else:
            b = int(t / self._rq)
            while b > 8192:
                self._coarsen()
                b = int(t / self._rq)
            k = (page, b)
            proc.refaults[k] = proc.refaults.get(k, 0) + 1
        proc.faults += 1
        if t < self.t_first:
            self.t_first = t
        if t > self.t_last:
            self.t_last = t
        us = rec.get("us")
        if us.__class__ is float or us.__class__ is int:
            self.hist[latency_bucket(us)] += 1
            self.timed += 1

    def _coarsen(self):
        self._rq *= 2
        for p in self.procs.values():
            new = {}
            for (page, b), n in p.refaults.items():
                k = (page, b // 2)
                new[k] = new.get(k, 0) + n
            p.refaults = new

    def feed(self, rec):
        """One record other than a pagefault."""
        ev, t = rec["event"], rec["t"]
        if ev.__class__ is not str or not 0 <= t < 1e12:
            raise ValueError("not a uffdtool record")
        if ev == "start":
            self.runs += 1
            if self.start is None:
                self.start = rec
            else:        # a second run appended to the same file: keep the time axis monotonic
                self._offset = self.t_end
                self._ufd.clear()
                self._default = None
        t += self._offset
        self.t_end = max(self.t_end, t)
        self.counts[ev] = self.counts.get(ev, 0) + 1
        getattr(self, "_on_" + ev.replace("-", "_"), self._on_other)(rec, t)
        if ev not in _REPORT_QUIET:
            if len(self.events) < REPORT_EVENTS:
                self.events.append((t, ev, _event_detail(rec)))
            else:
                self.events_left_out += 1

    def _on_other(self, rec, t):
        pass

    def _phase(self, lane, rec, t, label):
        if len(self.phases) < REPORT_EVENTS:
            peer = rec.get("peer")
            start = self._began.get(peer, self._began.get(None, 0.0))
            self.phases.append((lane, start, t, label))

    def _on_prefetch_done(self, rec, t):
        self._phase("prefetch", rec, t, "prefetch%s: done" % (
            "" if rec.get("peer") is None else " of peer %s" % rec["peer"]))

    def _on_fill_done(self, rec, t):
        self._phase("fill", rec, t, "fill%s: done" % (
            "" if rec.get("peer") is None else " of peer %s" % rec["peer"]))

    def _on_peer_done(self, rec, t):
        self._phase("peers", rec, t, "peer %s: done" % rec.get("peer"))

    def _on_peer_failed(self, rec, t):
        self._phase("peers", rec, t, "peer %s: FAILED" % rec.get("peer"))

    def _on_ready(self, rec, t):
        self._began.setdefault(None, t)
        if isinstance(rec.get("pid"), int):
            for ufd in rec.get("ufds") or ():
                self._ufd[ufd] = ("pid", rec["pid"])

    def _on_exec(self, rec, t):
        if isinstance(rec.get("pid"), int):
            self._ufd[rec.get("ufd")] = ("pid", rec["pid"])

    def _on_fork(self, rec, t):
        ufd = rec.get("ufd")
        key = self._ufd[ufd] = ("ufd", ufd, self._gen.get(ufd, 0))
        self._proc(key).note = "fork child"

    def _on_gone(self, rec, t):
        ufd = rec.get("ufd")
        key = self._ufd.pop(ufd, None)
        self._gen[ufd] = self._gen.get(ufd, 0) + 1
        if key is not None and key[0] == "ufd" and isinstance(rec.get("pid"), int):
            self._proc(key).pid = rec["pid"]          # merged into that pid by finish()

    def _on_handshake(self, rec, t):
        pid = rec.get("peer", rec.get("pid"))
        if not isinstance(pid, int):
            return
        self.handshakes.append(rec)
        self._began[rec.get("peer")] = t
        ps = rec.get("page_size")
        key = self._default = ("pid", pid)
        p = self._proc(key)
        if isinstance(ps, int) and ps > 0:
            p.shift = ps.bit_length() - 1
        p.note = "Firecracker peer"
        for i, r in enumerate(rec.get("layout") or ()):
            if isinstance(r, dict) and all(isinstance(r.get(k), int)
                                           for k in ("base", "size", "offset")):
                p.maps.append([r["base"], r["base"] + r["size"], "region %d" % i, r["offset"]])
        self.source_keyed = True

    def _on_mappings(self, rec, t):
        if not isinstance(rec.get("pid"), int):
            return
        p = self._proc(("pid", rec["pid"]))
        if isinstance(rec.get("comm"), str):
            p.comm = rec["comm"]
        for m in rec.get("mappings") or ():
            if isinstance(m, dict) and isinstance(m.get("start"), int) and \
                    isinstance(m.get("len"), int):
                off = m.get("offset") if isinstance(m.get("offset"), int) else None
                p.maps.append([m["start"], m["start"] + m["len"], str(m.get("name") or ""), off])

    def _on_stats(self, rec, t):
        self.stats[rec.get("peer")] = rec

    def _on_exit(self, rec, t):
        self.exit = rec

    # -- after the last record --------------------------------------------------------------
    def finish(self):
        """Merge the processes learned late, cut every process's pages into areas."""
        if self.runs > 1:
            self.warnings.append("%s holds %d runs (start records); the later runs are drawn "
                                 "after the first" % (self.path, self.runs))
        for key, p in list(self.procs.items()):
            if key[0] == "ufd" and p.pid is not None:
                self._merge(p, self._proc(("pid", p.pid)))
                del self.procs[key]
        self.areas = []
        procs = sorted((p for p in self.procs.values() if p.pages or p.maps),
                       key=lambda p: (p.first, str(p.key)))
        for n, p in enumerate(procs):
            self.areas.extend(_areas_of(p, n, self._rq))
        self.procs_sorted = [p for p in procs if p.pages]
        return self

    @staticmethod
    def _merge(src, dst):
        for c, arr in src.chunks.items():
            mine = dst.chunks.get(c)
            if mine is None:
                dst.chunks[c] = arr
                dst.pages += sum(1 for t in arr if t >= 0)
                continue
            for i, t in enumerate(arr):
                if t >= 0 and (mine[i] < 0 or t < mine[i]):
                    if mine[i] < 0:
                        dst.pages += 1
                    mine[i] = t
        for k, n in src.refaults.items():
            dst.refaults[k] = dst.refaults.get(k, 0) + n
        dst.faults += src.faults
        dst.maps.extend(src.maps)
        dst.first = min(dst.first, src.first)
        dst.note = dst.note or src.note

    # -- derived numbers --------------------------------------------------------------------
    @property
    def pages(self):
        return sum(a.pages for a in self.areas)

    @property
    def faults(self):
        return sum(p.faults for p in self.procs.values())

    def stats_faults(self):
        """Faults counted by the last stats record(s) (also without pagefault records)."""
        return sum(sum(v for k, v in s.items() if k.startswith("faults_") and
                       isinstance(v, int)) for s in self.stats.values())

    def latency_hist(self):
        """(counts per bucket, where from): the stats records' ``latency_hist`` (summed over
        peers) when the log has them, else the pagefault records' ``us``."""
        if any("latency_hist" in s for s in self.stats.values()):
            h = [0] * LAT_BUCKETS
            for s in self.stats.values():
                for k, n in (s.get("latency_hist") or {}).items():
                    try:
                        h[latency_bucket(float(k))] += int(n)
                    except (TypeError, ValueError):
                        pass
            return h, "stats"
        return list(self.hist), "pagefault"

    def percentiles(self):
        """The last stats record's latency_us (one tool), else estimates from the histogram."""
        if len(self.stats) == 1:
            lat = next(iter(self.stats.values())).get("latency_us")
            if isinstance(lat, dict) and lat:
                return lat, True
        h, _ = self.latency_hist()
        n = sum(h)
        if not n:
            return {}, False
        out = {"samples": n}
        for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
            acc = 0
            for k, c in enumerate(h):
                acc += c
                if acc >= q * n:
                    out[name] = float(1 << k)
                    break
        return out, False

    def curve(self, tmax, bins=640, t0=0.0):
        """The working-set curve: distinct pages first touched up to the end of each of
        ``bins`` equal bins of [t0, t0 + tmax] (the last value is the number of distinct
        pages)."""
        counts = [0] * bins
        last = bins - 1
        for a in self.areas:
            for t in a.tt:
                k = int((t - t0) * bins / tmax)
                counts[k if k < last else last if k > 0 else 0] += 1
        acc, out = 0, []
        for n in counts:
            acc += n
            out.append(acc)
        return out

    def page_keys(self, ids):
        """The set of pages as position keys that survive ASLR and restores: source offset
        (serve-file regions, --record key=offset files), else (process number, mapping name,
        how many same-named mappings come before it, page inside it).  ``ids`` numbers the
        mapping keys (shared by the two logs compared); a key is ``id << 64 | page``."""
        keys = set()
        for a in self.areas:
            kid = ids.setdefault(a.ckey, len(ids))
            base = (a.offset >> a.proc.shift) if a.offset is not None else 0
            p0 = a.p0
            keys.update((kid << 64) | (base + p - p0) for p in a.pg)
        return keys

    @property
    def compare_by(self):
        if self.source_keyed and all(a.offset is not None for a in self.areas):
            return "source offset"
        if all(not a.cluster for a in self.areas):
            return "offset inside each mapping"
        return "offset inside address clusters (approximate: no mappings records)"

    @property
    def title(self):
        """The command line that made the log (``argv`` of the start record, if written)."""
        s = self.start or {}
        if isinstance(s.get("argv"), list):
            return " ".join(str(a) for a in s["argv"])
        if self.kind == "working-set":
            return "working set %s" % self.path
        bits = ["uffdtool", s.get("command") or "watch"]
        if s.get("target"):
            bits.append("--" + s["target"] if s["target"] == "self" else "")
        if s.get("source"):
            bits.append(str(s["source"]))
        if s.get("cmd"):
            bits.extend(str(c) for c in s["cmd"])
        return " ".join(b for b in bits if b)

    @property
    def date(self):
        s = self.start or {}
        if isinstance(s.get("time"), (int, float)):
            return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(s["time"]))
        try:
            return time.strftime("%Y-%m-%d %H:%M:%S UTC (log file modified)",
                                 time.gmtime(os.stat(self.path).st_mtime))
        except OSError:
            return "unknown date"

    @property
    def exit_status(self):
        return (self.exit or {}).get("status")


def _event_detail(rec):
    """A short text of a record's fields for the timeline (hover)."""
    return format_human(rec).split(None, 2)[2][:160] if len(rec) > 2 else ""


def _areas_of(proc, n, rq):
    """Cut a process's touched pages into Areas: its mappings when the log lists them (a later
    mapping over the same addresses wins), address clusters for the rest."""
    shift = proc.shift
    maps = _paint(proc.maps)
    starts = [m[0] for m in maps]
    areas = [Area(proc, a, b, name, off) for a, b, name, off in maps]
    loose = []                                        # pages outside every listed mapping
    for c in sorted(proc.chunks):
        arr = proc.chunks[c]
        base = c * REPORT_CHUNK
        k = bisect.bisect_right(starts, base << shift) - 1
        if k >= 0 and (base + REPORT_CHUNK) << shift <= maps[k][1]:   # all in one mapping
            a = areas[k]
            for i in range(REPORT_CHUNK):
                if arr[i] >= 0:
                    a.pg.append(base + i)
                    a.tt.append(arr[i])
            continue
        for i in range(REPORT_CHUNK):
            t = arr[i]
            if t < 0:
                continue
            page = base + i
            addr = page << shift
            k = bisect.bisect_right(starts, addr) - 1
            if k >= 0 and addr < maps[k][1]:
                areas[k].pg.append(page)
                areas[k].tt.append(t)
            else:
                loose.append((page, t))
    if loose:
        areas.extend(_clusters(proc, loose))
    index = [(a.p0, a.p0 + a.npages, a) for a in areas]
    index.sort(key=lambda x: x[0])
    firsts = [x[0] for x in index]
    for (page, b), cnt in proc.refaults.items():
        k = bisect.bisect_right(firsts, page) - 1
        if k >= 0 and page < index[k][1]:
            index[k][2].refaults.append((page, (b + 0.5) * rq, cnt))
    seen = {}
    for a in sorted(areas, key=lambda a: a.start):
        a.faults = a.pages + sum(x[2] for x in a.refaults)
        if a.offset is not None:
            a.ckey = ("source",)
        else:
            same = seen[(a.cluster, a.name)] = seen.get((a.cluster, a.name), -1) + 1
            a.ckey = (n, "cluster" if a.cluster else a.name, same)
    return [a for a in areas if a.pages]


def _paint(maps):
    """Listed mappings as sorted disjoint [start, end, name, offset]: later ones cover earlier."""
    out = []
    for a, b, name, off in maps:
        if b <= a:
            continue
        keep = []
        for m in out:
            if m[1] <= a or m[0] >= b:
                keep.append(m)
                continue
            if m[0] < a:
                keep.append([m[0], a, m[2], m[3]])
            if m[1] > b:
                keep.append([b, m[1], m[2], None if m[3] is None else m[3] + (b - m[0])])
        keep.append([a, b, name, off])
        out = sorted(keep)
    return out


def _clusters(proc, loose):
    """Areas for pages no listed mapping holds: split where REPORT_CLUSTER_GAP bytes lie
    untouched."""
    gap = REPORT_CLUSTER_GAP >> proc.shift
    out = []
    for page, t in loose:
        if not out or page - out[-1].pg[-1] > gap:
            out.append(Area(proc, page << proc.shift, 0, "", cluster=True))
        out[-1].pg.append(page)
        out[-1].tt.append(t)
    for a in out:
        a.end = (a.pg[-1] + 1) << proc.shift
        a.name = "addresses"
    return out


# -- reading files ----------------------------------------------------------------------------

def read_report(path):
    """Read a uffdtool log (JSON lines) or working-set file into a finished LogReport.

    One pass, line by line.  UsageError (exit 2) for what cannot be a report: a missing file,
    no records, a first line that is not a uffdtool record.  A last line cut short is left out
    with a warning; other lines that are not records are counted in a warning."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError("cannot read %s: %s" % (path, e.strerror))
    rep = LogReport(path)
    with f:
        if f.read(len(WORKING_SET_MAGIC) - 3) == WORKING_SET_MAGIC[:-3].encode():
            return _read_ws_report(path, rep)
        f.seek(0)
        _read_records(f, rep)
    return rep.finish()


def _read_records(f, rep):
    # The decoder's scanner on the decoded line: a third of json.loads's time per record
    # (no encoding detection, no wrapper); anything it does not take goes to json.loads.
    scan, loads, fault, feed = json.JSONDecoder().scan_once, json.loads, rep.fault, rep.feed
    no = bad = 0
    for line in f:
        no += 1
        try:
            try:
                s = line.decode()
                rec, end = scan(s, 0)
                if end != len(s) and s[end:].strip():
                    raise ValueError("trailing data")
            except StopIteration:
                rec = loads(line)
            if rec["event"] == "pagefault":
                fault(rec)
            else:
                feed(rec)
            continue
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        if not line.strip():
            continue
        if no == 1 and not line.startswith(b'{"t":'):
            raise UsageError("%s is not a uffdtool log (line 1 is not a JSON record with 't' "
                             "and 'event')" % rep.path)
        if not line.endswith(b"\n"):
            rep.warnings.append("%s:%d: the last line is cut short (the log was still being "
                                "written, or truncated): left out" % (rep.path, no))
            break
        bad += 1
    if bad:
        rep.warnings.append("%s: %d line(s) that are not uffdtool records left out"
                            % (rep.path, bad))
    if not rep.counts and not rep.procs:
        raise UsageError("%s is empty: no uffdtool records" % rep.path)


def _read_ws_report(path, rep):
    """A working-set file (--record, v1 or v2): the pages in first-touch order, t = the
    touch's rank.  Unlike --prefetch, a v2 file without (or with a wrong) ``# end pages=N``
    line is still drawn, with the problem as a warning."""
    meta, pages, problem = parse_working_set(path)
    if problem:
        rep.warnings.append(problem)
    page_size, key = meta["page_size"], meta["key"]
    if not pages:
        raise UsageError("%s lists no pages" % path)
    rep.kind = "working-set"
    rep._shift = max(page_size, 1).bit_length() - 1
    try:
        pid = int(meta.get("pid", ""))
    except ValueError:
        pid = None
    proc = rep._proc(("pid", pid) if pid is not None else ("file", path))
    rep._default = proc.key
    if key == "offset":
        rep.source_keyed = True
        span = max(pages) + page_size
        proc.maps.append([0, span - span % page_size, "source", 0])
    for i, p in enumerate(pages):
        rep.fault({"t": float(i), "address": p})
    rep.t_end = float(len(pages))
    return rep.finish()


# -- binning ----------------------------------------------------------------------------------

def nice_step(x):
    """The least of 1, 2, 5 x 10**k that is >= x (x > 0): the width of a time bin."""
    if x <= 0:
        return 1e-3
    k = math.floor(math.log10(x))
    for m in (1, 2, 5, 10):
        step = m * 10.0 ** k
        if step >= x * (1 - 1e-9):
            return float("%.12g" % step)
    return 10.0 ** (k + 1)


def time_axis(rep, rows):
    """(t0, dt, nrows) of the heat maps: the faults' span cut in at most ``rows`` bins of a
    round width (at most one more bin for the rounding), t0 a multiple of it: the view zooms to
    where the faults are."""
    if rep.t_last < rep.t_first:
        return 0.0, 1e-3, 1
    dt = nice_step((rep.t_last - rep.t_first) / rows)
    if rep.kind == "working-set":               # times are ranks: whole touches per bin
        dt = max(1.0, dt)
    t0 = math.floor(rep.t_first / dt) * dt
    return t0, dt, int((rep.t_last - t0) / dt) + 1


def pages_per_column(npages, cols):
    """Pages per heat-map column: a whole number, so that every column is the same size."""
    return max(1, -(-npages // cols))


def heat_cells(area, t0, dt, nrows, lo, ppc):
    """{(row, column): faults} for the area's pages from page ``lo`` on, ``ppc`` per column."""
    cells = {}
    last = nrows - 1
    get = cells.get
    for p, t, n in itertools.chain(zip(area.pg, area.tt, itertools.repeat(1)), area.refaults):
        r = int((t - t0) / dt)
        if r < 0 or r > last:                 # rounding at the ends of the axis
            r = 0 if r < 0 else last
        k = (r, (p - lo) // ppc)
        cells[k] = get(k, 0) + n
    return cells


def heat_level(n, top):
    """0..8: the colour (HEAT_COLOURS) or digit (1-9) of a cell with n faults, log scale."""
    if top <= 1:
        return 0
    return min(8, int(round(8 * math.log(n) / math.log(top))))


# -- the terminal view ------------------------------------------------------------------------

def _fmt_bytes(n):
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return "%.1f %s" % (n / size, unit)
    return "%d B" % n


def _fmt_us(us):
    if us < 1000:
        return "%g µs" % us
    if us < 1e6:
        return "%g ms" % round(us / 1000, 3)
    return "%g s" % round(us / 1e6, 3)


def _proc_label(p):
    who = "pid %s" % p.pid if p.pid is not None else "ufd %s" % p.key[1] \
        if p.key[0] == "ufd" else "working set"
    if p.comm:
        who += " " + p.comm
    return who + (" (%s)" % p.note if p.note else "")


def _time_fmt(dt):
    """printf format of a time bin's start: as many decimals as the bin width needs."""
    return "%%.%df" % max(0, min(6, -math.floor(math.log10(dt) + 1e-9)))


def format_report(rep, width=80):
    """The terminal summary of one log: every line at most ``width`` columns."""
    out = []
    what = "touches" if rep.kind == "working-set" else "s"
    out.append("uffdtool report  %s" % rep.path)
    out.extend(_wrap("run: %s" % rep.title, width))
    st = rep.exit_status
    out.append("date: %s   span %s %s%s" % (
        rep.date, ("%d" if rep.kind == "working-set" else "%.3f") % rep.t_end, what,
        "" if st is None else "   exit status %s" % st))
    out.append("faults %d · distinct pages %d · processes %d · mappings touched %d" % (
        rep.faults, rep.pages, len(rep.procs_sorted), len(rep.areas)))
    ev = sorted((k, v) for k, v in rep.counts.items() if k != "pagefault")
    if ev:
        out.extend(_wrap("events: " + " · ".join("%s %d" % kv for kv in ev), width))
    out.append("")
    out.extend(_text_table(rep, width))
    out.append("")
    out.extend(_text_latency(rep, width))
    out.append("")
    if rep.areas:
        out.extend(_text_heat(rep, width))
    else:
        out.extend(_wrap("no pagefault records in this log (written with --no-fault-log?): "
                         "%s faults by the stats records" % rep.stats_faults(), width))
    return "\n".join(line[:width] for line in out)


def _wrap(text, width):
    lines, cur = [], ""
    for word in text.split(" "):
        if cur and len(cur) + 1 + len(word) > width:
            lines.append(cur)
            cur = "  " + word
        else:
            cur = (cur + " " + word) if cur else word
    return lines + [cur]


def _text_table(rep, width):
    nw = max(12, width - 44)
    ts = "%8d" if rep.kind == "working-set" else "%8.3f"
    out = ["%-*s %7s %6s %8s %9s %9s" % (nw, "process / mapping", "pages", "%", "faults",
                                          "first", "last")]
    for p in rep.procs_sorted:
        out.append(_proc_label(p)[:width])
        for a in (a for a in rep.areas if a.proc is p):
            name = "  %s 0x%x" % (a.label, a.start)
            out.append("%-*s %7d %5.1f%% %8d %s %s" % (
                nw, name[:nw], a.pages, 100.0 * a.pages / a.npages, a.faults,
                ts % min(a.tt), ts % max(a.tt)))
    return out


def _text_latency(rep, width):
    pct, exact = rep.percentiles()
    h, src = rep.latency_hist()
    if not pct:
        return ["latency: no timed faults in this log"]
    pre = "" if exact else "<= "
    line = "latency: p50 %s%s · p99 %s%s · max %s%s · %d timed" % (
        pre, _fmt_us(pct.get("p50", 0)), pre, _fmt_us(pct.get("p99", 0)), pre,
        _fmt_us(pct.get("max", 0)), sum(h) if sum(h) else pct.get("samples", 0))
    bars = " ".join("<=%s:%d" % (_fmt_us(1 << k).replace(" ", ""), n)
                    for k, n in enumerate(h) if n)
    if not bars:
        return [line, "  (no latency histogram in this log)"]
    return [line] + _wrap("  histogram (%s records): %s" % (src, bars), width)


def _text_heat(rep, width, max_rows=20):
    t0, dt, nrows = time_axis(rep, max_rows)
    tf = _time_fmt(dt) if rep.kind != "working-set" else "%d"
    lw = max(len(tf % (t0 + nrows * dt)), 4) + 1
    avail = width - lw - 1
    segs = sorted(rep.areas, key=lambda a: -a.pages)[:max(1, avail // 4)]
    hidden = len(rep.areas) - len(segs)
    segs.sort(key=lambda a: (rep.procs_sorted.index(a.proc), a.start))
    cols = _share_columns(segs, avail - (len(segs) - 1))
    grid = [[" "] * (avail) for _ in range(nrows)]
    header = [" "] * avail
    x, top, placed = 0, 1, []
    cellmaps = []
    for a, w in zip(segs, cols):
        lo, hi = a.pg[0], a.pg[-1] + 1
        ppc = pages_per_column(hi - lo, w)
        w = -(-(hi - lo) // ppc)
        cells = heat_cells(a, t0, dt, nrows, lo, ppc)
        top = max([top] + list(cells.values()))
        cellmaps.append((x, cells))
        placed.append((a, x, w, lo, hi, ppc))
        x += w + 1
    for x0, cells in cellmaps:
        for (r, c), n in cells.items():
            grid[r][x0 + c] = "123456789"[heat_level(n, top)]
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    for i, (a, x0, w, lo, hi, ppc) in enumerate(placed):
        header[x0] = letters[i % len(letters)]
        if x0 + w < avail:
            for row in grid:
                row[x0 + w] = "|"
            header[x0 + w] = "|"
    unit = "touches" if rep.kind == "working-set" else "s"
    out = ["heat map: rows = %s %s each; columns = address ranges A, B, ... (| = gap "
           "collapsed); 1-9 = faults per cell, log scale, 9 = %d" % (
               (tf % dt) if rep.kind != "working-set" else "%d" % dt, unit, top)]
    out = _wrap(out[0], width)
    out.append("%-*s %s" % (lw, "t" if rep.kind != "working-set" else "#", "".join(header)))
    for r, row in enumerate(grid):
        out.append("%*s %s" % (lw, tf % (t0 + r * dt), "".join(row).rstrip()))
    prev = None
    for i, (a, x0, w, lo, hi, ppc) in enumerate(placed):
        if prev is not None and prev.proc is a.proc and a.start >= prev.end:
            out.append("   gap %s" % _fmt_bytes(a.start - prev.end))
        out.extend(_wrap(" %s %s %s 0x%x-0x%x: %d pages, %d per column" % (
            letters[i % len(letters)], _proc_label(a.proc), a.label, lo << a.proc.shift,
            hi << a.proc.shift, a.pages, ppc), width))
        prev = a
    if hidden:
        out.append(" (%d smaller mappings not drawn; see the table)" % hidden)
    return out


def _share_columns(segs, avail):
    """Columns per segment: proportional to its touched pages, at least 2 (or its page span),
    never more than its page span."""
    spans = [a.pg[-1] + 1 - a.pg[0] for a in segs]
    want = [min(s, 2) for s in spans]
    left = avail - sum(want)
    total = sum(a.pages for a in segs) or 1
    for i, a in enumerate(segs):
        extra = min(spans[i] - want[i], int(left * a.pages / total))
        want[i] += max(0, extra)
    left = avail - sum(want)
    for i in sorted(range(len(segs)), key=lambda i: -segs[i].pages):
        if left <= 0:
            break
        more = min(left, spans[i] - want[i])
        want[i] += more
        left -= more
    return want


def format_compare(a, b, width=80):
    """Terminal lines comparing two logs' working sets."""
    c = compare_reports(a, b)
    lines = _wrap("working sets compared by %s:" % c["by"], width) + [
        "  A %s" % a.path, "  B %s" % b.path,
        "  pages in both %d · only in A %d · only in B %d · Jaccard %.3f" % (
            c["both"], c["only_a"], c["only_b"], c["jaccard"])]
    return "\n".join(line[:width] for line in lines)


def compare_reports(a, b):
    """Overlap of two working sets: {'both','only_a','only_b','jaccard','by'}."""
    ids = {}
    ka, kb = a.page_keys(ids), b.page_keys(ids)
    both = len(ka & kb)
    union = len(ka) + len(kb) - both
    by = a.compare_by if a.compare_by == b.compare_by else "%s (A) / %s (B)" % (
        a.compare_by, b.compare_by)
    return {"both": both, "only_a": len(ka) - both, "only_b": len(kb) - both,
            "jaccard": both / union if union else 1.0, "by": by}


# -- SVG and HTML -----------------------------------------------------------------------------

def _esc(text):
    return (str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;"))


_FONT = 'font-family="sans-serif" font-size="11"'
HEAT_W, HEAT_COLS, HEAT_ROWS = 460, 128, 64


def heat_maps(rep, axis, limit=12):
    """([(area, cells, pages per column, columns)], most faults in a cell) of the ``limit``
    areas with most pages: one colour scale for all the heat maps of a log."""
    out, top = [], 1
    for a in sorted(rep.areas, key=lambda a: -a.pages)[:limit]:
        ppc = pages_per_column(a.npages, HEAT_COLS)
        cells = heat_cells(a, axis[0], axis[1], axis[2], a.p0, ppc)
        top = max([top] + list(cells.values()))
        out.append((a, cells, ppc, -(-a.npages // ppc)))
    return out, top


def svg_heatmap(rep, axis, area, cells, ppc, ncols, top):
    """(svg body, width, height) of one area's address x time heat map.  Every non-empty cell
    is a ``rect class="cell"`` with ``data-r``/``data-c``/``data-n`` (row, column, faults);
    the group carries the binning (t0, dt, first address, bytes per column)."""
    t0, dt, nrows = axis
    ch = max(3, min(8, 320 // nrows))
    cw = HEAT_W / ncols
    L, T = 60, 6
    H = nrows * ch
    bpc = ppc << area.proc.shift
    ws = rep.kind == "working-set"
    o = ['<g class="heatmap" data-area="%s" data-t0="%r" data-dt="%r" data-rows="%d" '
         'data-cols="%d" data-a0="%d" data-bpc="%d" data-top="%d">' % (
             _esc(area.label), t0, dt, nrows, ncols, area.start, bpc, top),
         '<rect x="%d" y="%d" width="%d" height="%d" fill="#ffffff" stroke="#9ca3af"/>'
         % (L, T, HEAT_W, H)]
    for (r, c), n in sorted(cells.items()):
        o.append('<rect class="cell" x="%.2f" y="%d" width="%.2f" height="%d" fill="%s" '
                 'data-r="%d" data-c="%d" data-n="%d"/>' % (
                     L + c * cw, T + r * ch, max(cw, 0.6), ch, HEAT_COLOURS[heat_level(n, top)],
                     r, c, n))
    tf = "%d" if ws else _time_fmt(dt)
    step = max(1, -(-nrows // 8))
    for r in range(0, nrows, step):
        o.append('<text class="ylabel" x="%d" y="%d" text-anchor="end" %s>%s</text>' % (
            L - 4, T + r * ch + 9, _FONT, tf % (t0 + r * dt)))
    xstep = max(1, -(-ncols // 3))
    for c in list(range(0, ncols, xstep)) + [ncols]:
        if 0 < ncols - c < xstep * 0.9:
            continue
        anchor = "start" if c == 0 else "end" if c == ncols else "middle"
        o.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#6b7280"/>' % (
            L + c * cw, T + H, L + c * cw, T + H + 4))
        o.append('<text class="xlabel" x="%.1f" y="%d" text-anchor="%s" %s>0x%x</text>' % (
            L + c * cw, T + H + 16, anchor, _FONT, area.start + c * bpc))
    o.append('<text x="%d" y="%d" text-anchor="middle" %s transform="rotate(-90 %d %d)">'
             '%s</text>' % (12, T + H // 2, _FONT, 12, T + H // 2,
                            "touch #" if ws else "seconds"))
    o.append('<text x="%d" y="%d" %s>address (%s per column)</text>' % (
        L, T + H + 30, _FONT, _fmt_bytes(bpc)))
    o.append("</g>")
    return "\n".join(o), L + HEAT_W + 10, T + H + 36


def _area_caption(area):
    off = "" if area.offset is None else ", source offset 0x%x" % area.offset
    return "%s · %s 0x%x-0x%x (%s%s): %d of %d pages touched (%.1f%%), %d faults" % (
        _proc_label(area.proc), area.label, area.start, area.end,
        _fmt_bytes(area.end - area.start), off, area.pages, area.npages,
        100.0 * area.pages / area.npages, area.faults)


def render_svg(reps):
    """One standalone SVG document: the heat maps of every log, one below the other."""
    parts, y, w = [], 0, 400
    for rep in reps:
        axis = time_axis(rep, HEAT_ROWS)
        parts.append('<text x="4" y="%d" font-family="sans-serif" font-size="13" '
                     'font-weight="bold">%s</text>' % (y + 16, _esc(rep.title)))
        y += 24
        maps, top = heat_maps(rep, axis)
        for m in maps:
            parts.append('<text x="4" y="%d" %s>%s</text>' % (y + 12, _FONT,
                                                             _esc(_area_caption(m[0]))))
            body, bw, bh = svg_heatmap(rep, axis, *m, top)
            parts.append('<g transform="translate(0,%d)">%s</g>' % (y + 16, body))
            y += bh + 24
            w = max(w, bw)
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" '
            'width="%d" height="%d" viewBox="0 0 %d %d">\n<rect width="100%%" height="100%%" '
            'fill="white"/>\n%s\n</svg>\n' % (w, y, w, y, "\n".join(parts)))


def _svg(body, w, h, cls=""):
    return '<svg xmlns="http://www.w3.org/2000/svg" class="%s" width="%d" height="%d" ' \
           'viewBox="0 0 %d %d">%s</svg>' % (cls, w, h, w, h, body)


def svg_curve(reps):
    """The cumulative working set (distinct pages vs time) of one log, or of two logs from
    each one's first fault (their runs start at different times after the tool's start)."""
    W, H, L, T = 640, 220, 64, 10
    two = len(reps) == 2
    t0s = [rep.t_first if two and rep.t_last >= rep.t_first else 0.0 for rep in reps]
    tmax = max([rep.t_last - t0 for rep, t0 in zip(reps, t0s)] + [1e-6] +
               ([] if two else [rep.t_end for rep in reps]))
    series = [(rep, rep.curve(tmax, t0=t0)) for rep, t0 in zip(reps, t0s)]
    pmax = max([s[-1] for _, s in series] + [1])
    o = ['<rect x="%d" y="%d" width="%d" height="%d" fill="#fafafa" stroke="#9ca3af"/>'
         % (L, T, W, H)]
    for i in range(5):
        v = pmax * i / 4
        y = T + H - H * i / 4
        o.append('<text x="%d" y="%.1f" text-anchor="end" %s>%d</text>' % (L - 4, y + 4,
                                                                          _FONT, v))
        x = L + W * i / 4
        o.append('<text x="%.1f" y="%d" text-anchor="middle" %s>%s</text>' % (
            x, T + H + 16, _FONT, ("%d" if reps[0].kind == "working-set" else "%.3g s")
            % (tmax * i / 4)))
    if two:
        o.append('<text x="%d" y="%d" %s>time since each log\'s first fault</text>' % (
            L, T + H + 30, _FONT))
    colours = ("#2563eb", "#ea580c")
    for k, (rep, cum) in enumerate(series):
        n = cum[-1]
        pts = ["%.1f,%.1f" % (L, T + H)] + ["%.1f,%.1f" % (
            L + W * (i + 1) / len(cum), T + H - H * v / pmax) for i, v in enumerate(cum)]
        o.append('<polyline class="curve" data-log="%s" data-last-pages="%d" fill="none" '
                 'stroke="%s" stroke-width="2" points="%s"/>' % (
                     "AB"[k], n, colours[k], " ".join(pts)))
        o.append('<text x="%d" y="%d" fill="%s" %s>%s%s: %d pages</text>' % (
            L + 8, T + 16 + 14 * k, colours[k], _FONT, ("AB"[k] + " ") if len(reps) > 1
            else "", _esc(os.path.basename(rep.path)), n))
    return _svg("\n".join(o), L + W + 30, T + H + 36, "curve")


def svg_latency(rep):
    """Bars of the fault-service latency histogram, 1 µs .. 16 s in powers of two."""
    h, src = rep.latency_hist()
    W, H, L, T = 640, 160, 64, 16
    bw = W / LAT_BUCKETS
    top = max(h + [1])
    o = ['<rect x="%d" y="%d" width="%d" height="%d" fill="#fafafa" stroke="#9ca3af"/>'
         % (L, T, W, H)]
    for k, n in enumerate(h):
        bh = H * n / top
        o.append('<rect class="bar" x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="#2563eb" '
                 'data-us="%d" data-n="%d"/>' % (L + k * bw + 1, T + H - bh, bw - 2, bh,
                                                  1 << k, n))
        if n:
            o.append('<text x="%.1f" y="%.1f" text-anchor="middle" font-family="sans-serif" '
                     'font-size="9">%d</text>' % (L + k * bw + bw / 2, T + H - bh - 2, n))
        if k % 4 == 0 or k == LAT_BUCKETS - 1:
            o.append('<text class="xlabel" x="%.1f" y="%d" text-anchor="middle" %s>%s</text>'
                     % (L + k * bw + bw / 2, T + H + 14, _FONT,
                        "16 s" if k == LAT_BUCKETS - 1 else _fmt_us(1 << k)))
    o.append('<text x="%d" y="%d" %s>faults per bucket (upper bound; from the %s records, '
             '%d timed)</text>' % (L, T + H + 30, _FONT, src, sum(h)))
    return _svg("\n".join(o), L + W + 30, T + H + 36, "latency")


def svg_timeline(rep):
    """A lane per kind of event (fork, exec, remap, remove, unmap, peers, fill, ...), a tick per
    record; the faults' span as a bar."""
    kinds = []
    for _, ev, _d in rep.events:
        if ev not in kinds:
            kinds.append(ev)
    W, L, T, lane = 640, 110, 6, 16
    phases = []
    for p in rep.phases:
        if p[0] not in phases:
            phases.append(p[0])
    lanes = ["faults"] + phases + kinds
    H = lane * len(lanes)
    tmax = max(rep.t_end, rep.t_last if rep.t_last > -math.inf else 0, 1e-6)
    ws = rep.kind == "working-set"
    o = ['<rect x="%d" y="%d" width="%d" height="%d" fill="#fafafa" stroke="#9ca3af"/>'
         % (L, T, W, H)]
    for i, name in enumerate(lanes):
        o.append('<text x="%d" y="%d" text-anchor="end" %s>%s</text>' % (
            L - 4, T + i * lane + 12, _FONT, _esc(name)))
    if rep.t_last >= rep.t_first:
        o.append('<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#fb923c">'
                 '<title>faults from %.6g to %.6g</title></rect>' % (
                     L + W * rep.t_first / tmax, T + 3, max(1, W * (rep.t_last - rep.t_first)
                                                            / tmax), lane - 6,
                     rep.t_first, rep.t_last))
    for name, a, b, label in rep.phases:
        o.append('<rect class="phase" x="%.1f" y="%d" width="%.1f" height="%d" fill="%s" '
                 'data-tip="%s"><title>%s</title></rect>' % (
                     L + W * a / tmax, T + lanes.index(name) * lane + 3,
                     max(1.0, W * (b - a) / tmax), lane - 6,
                     "#dc2626" if "FAILED" in label else "#16a34a" if name == "fill"
                     else "#2563eb", _esc("%.6f-%.6f %s" % (a, b, label)),
                     _esc("%.6f-%.6f %s" % (a, b, label))))
    for t, ev, detail in rep.events:
        i = lanes.index(ev)
        x = L + W * t / tmax
        o.append('<line class="ev" x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#111827" '
                 'stroke-width="1.5" data-tip="%s"><title>%s</title></line>' % (
                     x, T + i * lane + 2, x, T + (i + 1) * lane - 2,
                     _esc("%.6f %s %s" % (t, ev, detail)), _esc("%.6f %s %s" % (t, ev, detail))))
    for i in range(5):
        o.append('<text x="%.1f" y="%d" text-anchor="middle" %s>%s</text>' % (
            L + W * i / 4, T + H + 14, _FONT, ("%d" if ws else "%.3g s") % (tmax * i / 4)))
    return _svg("\n".join(o), L + W + 30, T + H + 22, "timeline")


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#111827;max-width:1120px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb}
.cmd{font-family:ui-monospace,monospace;background:#f3f4f6;padding:6px 10px;border-radius:4px}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 8px;text-align:right}
th{background:#f3f4f6} td.l,th.l{text-align:left} tr.proc td{font-weight:bold;background:#f9fafb}
figure{margin:10px 0 18px} figcaption{font-size:13px;margin-bottom:4px}
.heats{display:flex;flex-wrap:wrap;gap:0 16px} .heats figure{flex:0 0 auto;margin:6px 0 14px}
.heats figcaption{max-width:530px}
.warn{color:#b45309} .legend .sw{display:inline-block;width:18px;height:10px}
.hint{display:none;color:#6b7280;font-size:12px} .js .hint{display:inline}
#tip{position:fixed;pointer-events:none;background:#111827;color:#fff;font-size:12px;
padding:3px 6px;border-radius:3px;white-space:pre}
"""

# Hover only (the page reads the same without it): the heat-map cell or event under the
# pointer, in words.
_JS = """
(function(){
var tip=document.getElementById('tip');
function hex(n){return '0x'+n.toString(16);}
document.addEventListener('mousemove',function(e){
  var el=e.target, s='';
  if(el.classList&&el.classList.contains('cell')){
    var g=el.parentNode, d=g.dataset, r=+el.dataset.r, c=+el.dataset.c;
    var t0=+d.t0, dt=+d.dt, a0=+d.a0, b=+d.bpc;
    s=el.dataset.n+' fault(s)\\n'+hex(a0+c*b)+' - '+hex(a0+(c+1)*b)+'\\n'+
      (t0+r*dt).toPrecision(6)+' - '+(t0+(r+1)*dt).toPrecision(6);
  } else if(el.dataset&&el.dataset.tip){ s=el.dataset.tip; }
  else if(el.classList&&el.classList.contains('bar')){
    s=el.dataset.n+' fault(s) <= '+el.dataset.us+' us'; }
  if(s){tip.textContent=s;tip.hidden=false;tip.style.left=(e.clientX+12)+'px';
        tip.style.top=(e.clientY+12)+'px';} else {tip.hidden=true;}
});
document.documentElement.className='js';
})();
"""


def render_html(reps):
    """The self-contained HTML report (inline SVG and CSS; a little JavaScript for hover)."""
    o = ['<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width">',
         '<title>uffdtool report: %s</title><style>%s</style></head><body>' % (
             _esc(reps[0].title), _CSS),
         '<h1>uffdtool report</h1>']
    if len(reps) == 2:
        c = compare_reports(*reps)
        o.append('<h2 id="compare">Two working sets</h2>')
        o.append('<p>A: <code>%s</code><br>B: <code>%s</code></p>' % (
            _esc(reps[0].path), _esc(reps[1].path)))
        o.append('<table><tr><th>pages in both</th><th>only in A</th><th>only in B</th>'
                 '<th>Jaccard</th><th class="l">compared by</th></tr><tr class="overlap">'
                 '<td>%d</td><td>%d</td><td>%d</td><td>%.3f</td><td class="l">%s</td></tr>'
                 '</table>' % (c["both"], c["only_a"], c["only_b"], c["jaccard"],
                               _esc(c["by"])))
        o.append('<figure><figcaption>Working sets, distinct pages over time</figcaption>%s'
                 '</figure>' % svg_curve(reps))
    for k, rep in enumerate(reps):
        o.extend(_html_one(rep, ("%s: " % "AB"[k]) if len(reps) == 2 else ""))
    o.append('<p style="font-size:12px;color:#6b7280">made by uffdtool %s report</p>'
             % __version__)
    o.append('<div id="tip" hidden></div><script>%s</script></body></html>\n' % _JS)
    return "\n".join(o)


def _html_one(rep, tag):
    o = ['<h2>%s%s</h2>' % (_esc(tag), _esc(rep.path)),
         '<p class="cmd">$ %s</p>' % _esc(rep.title),
         '<p>%s · span %s · %d faults · %d distinct pages (%s) · %d process(es)%s</p>' % (
             _esc(rep.date), ("%d touches" if rep.kind == "working-set" else "%.3f s")
             % rep.t_end, rep.faults, rep.pages,
             _fmt_bytes(sum(a.pages << a.proc.shift for a in rep.areas)),
             len(rep.procs_sorted), "" if rep.exit_status is None
             else " · exit status %s" % _esc(rep.exit_status))]
    for w in rep.warnings:
        o.append('<p class="warn">warning: %s</p>' % _esc(w))
    ev = sorted((k, v) for k, v in rep.counts.items())
    if ev:
        o.append('<p>records: %s</p>' % _esc(", ".join("%s %d" % kv for kv in ev)))
    o.append('<h3>Processes and mappings</h3>')
    o.append(_html_table(rep))
    o.append('<h3>Heat map: address &#215; time</h3>')
    if not rep.areas:
        o.append('<p>No pagefault records in this log.</p>')
    axis = time_axis(rep, HEAT_ROWS)
    maps, top = heat_maps(rep, axis)
    if maps:
        o.append('<p class="legend">faults per cell, log scale: 1 %s %d <span class="hint">'
                 '(point at a cell for its addresses and times)</span></p>' % (
                     "".join('<span class="sw" style="background:%s"></span>' % c
                             for c in HEAT_COLOURS),
                     top))
    o.append('<div class="heats">')
    for m in maps:
        body, w, h = svg_heatmap(rep, axis, *m, top)
        o.append('<figure><figcaption>%s</figcaption>%s</figure>' % (
            _esc(_area_caption(m[0])), _svg(body, w, h, "heat")))
    o.append('</div>')
    if len(rep.areas) > len(maps):
        o.append('<p>%d smaller mappings not drawn (see the table).</p>'
                 % (len(rep.areas) - len(maps)))
    o.append('<h3>Working set</h3><figure>%s</figure>' % svg_curve([rep]))
    pct, exact = rep.percentiles()
    o.append('<h3>Fault-service latency</h3>')
    if pct:
        o.append('<p>p50 %s%s · p99 %s%s · max %s%s</p>' % tuple(
            x for k in ("p50", "p99", "max") for x in ("" if exact else "&#8804; ",
                                                        _esc(_fmt_us(pct.get(k, 0))))))
    o.append('<figure>%s</figure>' % svg_latency(rep))
    o.append('<h3>Events</h3><figure>%s</figure>' % svg_timeline(rep))
    if rep.events_left_out:
        o.append('<p>The timeline shows the first %d records; %d later ones are only '
                 'counted above.</p>' % (REPORT_EVENTS, rep.events_left_out))
    return o


def _html_table(rep):
    ws = rep.kind == "working-set"
    tf = "%d" if ws else "%.6f"
    o = ['<table class="areas"><tr><th class="l">process / mapping</th><th>start</th>'
         '<th>size</th><th>pages touched</th><th>% of mapping</th><th>faults</th>'
         '<th>first touch</th><th>last touch</th></tr>']
    for p in rep.procs_sorted:
        areas = [a for a in rep.areas if a.proc is p]
        o.append('<tr class="proc"><td class="l">%s</td><td></td><td></td><td>%d</td><td></td>'
                 '<td>%d</td><td>%s</td><td>%s</td></tr>' % (
                     _esc(_proc_label(p)), sum(a.pages for a in areas), p.faults,
                     tf % min(min(a.tt) for a in areas), tf % max(max(a.tt) for a in areas)))
        for a in areas:
            o.append('<tr><td class="l">%s</td><td>0x%x</td><td>%s</td><td>%d</td>'
                     '<td>%.1f%%</td><td>%d</td><td>%s</td><td>%s</td></tr>' % (
                         _esc(a.label), a.start, _fmt_bytes(a.end - a.start), a.pages,
                         100.0 * a.pages / a.npages, a.faults, tf % min(a.tt),
                         tf % max(a.tt)))
    o.append("</table>")
    return "\n".join(o)


###################################################################################################
#  15. CLI
###################################################################################################

# -- sizes, ranges and argument types -------------------------------------------------------------

_SUFFIX = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
           "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
           "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text):
    """Bytes from ``'4096'``, ``'64K'``, ``'2M'``, ``'1G'``, ``'0x1000'``; ValueError if bad."""
    t = str(text).strip().lower()
    if t.startswith("0x"):
        return int(t, 16)
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in _SUFFIX or not num:
        raise ValueError("bad size %r (use bytes or a K/M/G suffix)" % text)
    try:
        value = float(num) * _SUFFIX[unit] if "." in num else int(num) * _SUFFIX[unit]
    except ValueError:
        raise ValueError("bad size %r (use bytes or a K/M/G suffix)" % text)
    if value < 0 or value != int(value):
        raise ValueError("bad size %r" % text)
    return int(value)


def parse_range(text):
    """(start, length) from ``'START:LEN'`` (START may be 0x-hex, LEN takes K/M/G)."""
    start, sep, length = str(text).partition(":")
    if not sep:
        raise ValueError("bad range %r (use START:LEN, e.g. 0x7f0000000000:64K)" % text)
    try:
        return int(start, 0), parse_size(length)
    except ValueError:
        raise ValueError("bad range %r (use START:LEN, e.g. 0x7f0000000000:64K)" % text)


def _size_arg(text):
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _positive_size(text):
    size = _size_arg(text)
    if size < 1:
        raise argparse.ArgumentTypeError("must be more than 0 bytes: %r" % text)
    return size


def _range_arg(text):
    try:
        return parse_range(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _number_arg(conv, what, ok, need):
    """An argparse type: ``conv(text)`` if ``ok`` accepts it, else one clear message."""
    def parse(text):
        try:
            v = conv(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not %s: %r" % (what, text))
        if not ok(v):
            raise argparse.ArgumentTypeError("must be %s: %r" % (need, text))
        return v
    return parse


_uid_arg = _number_arg(int, "a numeric uid", lambda v: 0 <= v < (1 << 32) - 1,
                       "a uid from 0 to 4294967294")
_positive_int = _number_arg(lambda t: int(t, 0), "a whole number", lambda v: v >= 1,
                            "at least 1")
_peer_count = _number_arg(lambda t: int(t, 0), "a whole number", lambda v: v >= 0,
                          "0 or more")
_seconds = _number_arg(float, "a number of seconds", lambda v: v > 0, "> 0")
_usec = _number_arg(float, "a number of microseconds", lambda v: 0 <= v <= 1e6,
                    "0 to 1000000 microseconds")


# -- the parser -----------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with one line (``uffdtool: error: ...``) on bad usage."""

    def error(self, message):
        self.exit(2, "%s: error: %s\n" % (self.prog, message))


EPILOG_INFO = """examples:
  uffdtool info             what this kernel allows, in words
  uffdtool info --json      the same as one JSON object
"""


def _add_common(p):
    g = p.add_argument_group("output (COMMON)")
    g.add_argument("--log", metavar="FILE", help="JSON lines, one object per event ('-': stdout)")
    g.add_argument("--json", action="store_true", help="same as --log -")
    g.add_argument("--quiet", "-q", action="store_true", help="no human-readable lines on stderr")
    g.add_argument("--stats-interval", metavar="SECS", type=_seconds,
                   help="also emit a stats record every SECS")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="a human line per page fault too (watch always has them)")


def _add_resolve(p):
    g = p.add_argument_group("resolution policy (RESOLVE)")
    g.add_argument("--readahead", metavar="PAGES", type=_positive_int, default=1,
                   help="fill up to PAGES pages per fault from the faulting page (default 1)")
    g.add_argument("--on-remove", choices=("unregister", "zero"), default=None,
                   help="what a page removed by MADV_DONTNEED/REMOVE gets later: unregister "
                        "(the kernel's own zero page, no more faults there) or zero (it stays "
                        "watched and gets a zero page).  Default: zero for watch (it keeps "
                        "watching), unregister for serve-file (what Firecracker's handler does)")
    g.add_argument("--record", metavar="FILE",
                   help="write the working set (pages that faulted, in first-fault order)")
    g.add_argument("--spin", metavar="USEC", type=_usec, default=DEFAULT_SPIN * 1e6,
                   help="keep reading the empty queue this long before sleeping (default "
                        "%d; 0: sleep at once).  Saves the cross-CPU wake-ups of a faulting "
                        "thread on another CPU, at the price of that much CPU time per pause"
                        % (DEFAULT_SPIN * 1e6))


def _add_target(p):
    g = p.add_argument_group("target (TARGET)")
    g.add_argument("--self", dest="self_", action="store_true",
                   help="the tool's own memory, driven by a built-in workload")
    g.add_argument("--size", type=_positive_size, help="with --self: bytes of memory (K/M/G)")
    g.add_argument("--pid", type=int, help="a running process (ptrace attach, x86_64)")
    g.add_argument("--range", dest="ranges", metavar="START:LEN", action="append",
                   type=_range_arg, default=[], help="with --pid: a range to register (repeatable)")
    g.add_argument("--all-anon", action="store_true",
                   help="with --pid: every private anonymous mapping")
    g.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]",
                   help="start CMD and watch its anonymous memory")


def _add_stop_options(g, dontneed_help):
    g.add_argument("--duration", metavar="SECS", type=_seconds,
                   help="stop after SECS (--pid: detach, -- CMD: end CMD, Firecracker: install "
                        "the remaining pages and unregister)")
    g.add_argument("--dontneed", action="store_true",
                   help="DESTRUCTIVE, with --pid: " + dontneed_help)


def _add_url_options(g):
    """serve-file's --url SOURCE and its options (README "Restoring from a URL")."""
    g.add_argument("--url", metavar="URL",
                   help="the page at region offset X is byte X of the object at URL (http:// "
                        "or https://, e.g. a presigned S3/GCS URL), fetched with Range GETs")
    g.add_argument("--cache", metavar="DIR", help="with --url: keep fetched chunks in DIR "
                   "(shared by concurrent serve-file processes; keyed by URL without query, "
                   "size and ETag)")
    g.add_argument("--chunk", type=_positive_size, default=URL_CHUNK, metavar="SIZE",
                   help="with --url: bytes per Range GET, a power of two (default %s)"
                        % ("%dK" % (URL_CHUNK >> 10)))
    g.add_argument("--fetchers", type=_positive_int, default=URL_FETCHERS, metavar="N",
                   help="with --url: parallel connections, one kept for faults (default %d; "
                        "8 for an object store, whose requests take tens of ms)" % URL_FETCHERS)
    g.add_argument("--retries", type=int, default=URL_RETRIES, metavar="N",
                   help="with --url: retries of a failed GET, with backoff (default %d)"
                        % URL_RETRIES)
    g.add_argument("--timeout", type=_seconds, default=URL_TIMEOUT, metavar="SECS",
                   help="with --url: connect/read timeout (default %g)" % URL_TIMEOUT)
    g.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="with --url: send this header (repeatable; values never logged)")
    g.add_argument("--cacert", metavar="FILE",
                   help="with https: trust the CA certificates in FILE (default: system CAs)")


def build_parser():
    """The argparse parser of the CLI (sub-commands info, selftest, watch, serve-file, report)."""
    p = _Parser(prog="uffdtool", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="commands: info, selftest, watch, serve-file, "
                       "report; 'uffdtool COMMAND --help' for each.\n"
                       "exit status: 0 ok, 1 a check or the target failed, 2 usage error, "
                       "3 not permitted by the kernel/permissions.")
    p.add_argument("--version", action="version", version="uffdtool " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    pi = sub.add_parser("info", help="what this machine's userfaultfd allows",
                        epilog=EPILOG_INFO, formatter_class=argparse.RawDescriptionHelpFormatter)
    pi.add_argument("--json", action="store_true", help="one JSON object")
    pi.set_defaults(func=cmd_info)

    ps = sub.add_parser("selftest", help="prove what this kernel's userfaultfd does",
                        epilog=EPILOG_SELFTEST,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ps.add_argument("--json", action="store_true", help="JSON lines, one per check, then summary")
    ps.add_argument("-k", dest="select", metavar="SUBSTRING", action="append",
                    help="run only checks whose name contains SUBSTRING (repeatable)")
    ps.add_argument("-v", "--verbose", action="store_true", help="details of each check")
    ps.add_argument("--list", action="store_true", help="list the checks and exit")
    ps.set_defaults(func=cmd_selftest)

    pw = sub.add_parser("watch", help="log every fault and event of a range of memory",
                        epilog=EPILOG_WATCH, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(pw)
    _add_resolve(pw)
    _add_target(pw)
    g = pw.add_argument_group("watch")
    g.add_argument("--mode", choices=("missing", "wp"), default="missing",
                   help="missing: pages never touched (default); wp: also the first write to "
                        "pages already present (write-protect, non-destructive)")
    g.add_argument("--events", metavar="LIST", default="all",
                   help="non-cooperative events to request: all (default: all the kernel "
                        "grants), none, or a list of fork,remap,remove,unmap; fork needs "
                        "CAP_SYS_PTRACE")
    _add_stop_options(g, "snapshot the present pages, drop them with MADV_DONTNEED (all threads "
                         "stopped) so every page faults again, serve them back from the snapshot "
                         "and put back every page not faulted at detach.  If uffdtool is "
                         "SIGKILLed meanwhile the target reads zeros.")
    pw.set_defaults(func=cmd_watch)

    pf = sub.add_parser("serve-file", help="fill missing pages from a file or with zeros",
                        epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(pf)
    _add_resolve(pf)
    g = pf.add_argument_group("source (SOURCE)")
    g.add_argument("--file", metavar="PATH", help="the page at region offset X comes from "
                                                  "PATH at OFFSET+X")
    g.add_argument("--offset", type=_size_arg, default=0, metavar="BYTES",
                   help="with --file: where region offset 0 is in PATH (default 0)")
    g.add_argument("--zero", action="store_true", help="fill with zero pages (UFFDIO_ZEROPAGE)")
    _add_url_options(g)
    g.add_argument("--prefetch", metavar="FILE",
                   help="install the pages listed in FILE (a --record working set) early "
                        "(with --url, fetched from the start, before the peer connects)")
    _add_target(pf)
    pf.add_argument("--firecracker-socket", metavar="PATH",
                    help="listen on PATH for Firecracker's UFFD handshake")
    pf.add_argument("--peers", metavar="N", type=_peer_count, default=1,
                    help="with --firecracker-socket: serve N peers (VMs), each in its own "
                         "worker process, then exit (default 1: one peer, no worker); 0: "
                         "until SIGTERM/SIGINT")
    pf.add_argument("--no-fault-log", action="store_true",
                    help="with --log/--json: no per-fault pagefault records (the other records "
                         "and stats stay; keeps the fast serving loop)")
    pf.add_argument("--accept-timeout", metavar="SECS", type=_seconds,
                    help="with --firecracker-socket: give up (exit 1) if no peer connects "
                         "within SECS (default: wait forever)")
    _add_stop_options(pf, "drop the present pages of the ranges (MADV_DONTNEED injected, all "
                          "threads stopped) so that they fault and get the file's data: "
                          "restores the ranges from the file")
    pf.add_argument("--fill", choices=("idle",),
                    help="idle: with --file or --url, install the rest of the memory in the "
                         "background when no fault waits (a fill_done record says when)")
    pf.add_argument("--kill-peer-on-error", action="store_true",
                    help="if serving fails, SIGKILL the peer (pid from SO_PEERCRED) so that it "
                         "cannot hang or read zeros where file data belongs")
    pf.add_argument("--peer-uid", metavar="UID", type=_uid_arg,
                    help="with --firecracker-socket: also accept a peer of this uid (its "
                         "SO_PEERCRED; default: only the tool's own uid) and give it the "
                         "socket (mode 0600), e.g. the jailer's --uid")
    pf.set_defaults(func=cmd_serve_file)

    pr = sub.add_parser("report", help="draw a log: tables, heat maps, curves (terminal, HTML, "
                                       "SVG)", epilog=EPILOG_REPORT,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pr.add_argument("logs", nargs="+", metavar="LOG", help="a --log file or a --record "
                                                          "working-set file; a second one: compare")
    pr.add_argument("-o", dest="output", metavar="FILE.html|FILE.svg",
                    help="write an HTML page or the heat maps as SVG instead of the summary")
    pr.add_argument("--width", type=_number_arg(int, "a whole number", lambda v: v >= 60,
                                                "at least 60"),
                    help="columns of the summary (default: the terminal's; 80 if not a terminal)")
    pr.set_defaults(func=cmd_report)
    return p


EPILOG_SELFTEST = """examples (as root):
  uffdtool selftest            every check, one line each, then 'N passed, N failed, N skipped'
  uffdtool selftest -k fork    only the checks whose name contains 'fork'
  uffdtool selftest --json     JSON lines
"""

EPILOG_WATCH = """targets:
  --self      registers SIZE (default 1M) of the tool's own memory and runs a built-in workload
              in a thread (memory touched through ctypes only): reads the first quarter, writes
              the second, forks a child that writes the third (its faults arrive on the FORK
              event's uffd), grows the area with mremap (a guard page forces a move), writes the
              grown part, moves it with MREMAP_FIXED, MADV_DONTNEEDs the second quarter and
              munmaps it all: every event type in one run.  'stats' reports its checks.
  -- CMD      runs CMD under ptrace (x86_64) and registers its anonymous memory (private and
              shared) at each exec and at each mmap/brk/mremap; follows forks; exits with CMD's
              status.  With --json CMD's stdout goes to stderr (stdout carries only JSON).  A
              CMD that calls ptrace itself (strace, gdb) is refused: one line, exit 2.
              On SIGINT/SIGTERM CMD gets 1 s to end, then SIGTERM, then SIGKILL.  If uffdtool
              itself is SIGKILLed the kernel kills CMD too (PTRACE_O_EXITKILL).
  --pid PID   injects userfaultfd() into a running x86_64 process (stopped ~1 ms), registers
              --range START:LEN or --all-anon ([heap], anonymous mmaps private or shared; not
              [stack]; with --all-anon also the mappings it creates later, within 0.1 s),
              detaches and serves.  Non-destructive: MISSING sees untouched pages, --mode wp
              also the first write to present pages.  SIGINT/SIGTERM/--duration/target exit: ranges
              unregistered, uffd closed, target running with its data.  --dontneed is the one
              destructive option (see above).

examples (as root):
  uffdtool watch --self --size 1M
  uffdtool watch --json -- python3 -c 'bytearray(10**7)'
  uffdtool watch --pid 1234 --all-anon --duration 10
  uffdtool watch --pid 1234 --range 0x7f0000000000:64K --mode wp --record ws.txt
  uffdtool watch --json --record ws.txt -- make -j2 | jq -c 'select(.event=="mappings")'

records: every pagefault carries pid (the faulting process) and, for a vfork child in its
parent's memory, mm_pid; 'mappings' records name each process's registered mappings when first
seen and when they change.  --record with several processes: FILE, then FILE.PID for the others.
"""

EPILOG_SERVE = """targets:
  --pid PID --range START:LEN [...]
              injects userfaultfd() into a running x86_64 process (as watch does) and serves
              the ranges from the file: range 1 from OFFSET, range 2 right after it (LEN rounded
              up to pages), and so on; the file must be that long.  MISSING only sees pages the
              target never touched: --dontneed (DESTRUCTIVE) drops the present ones first, so
              the whole ranges are restored from the file.  On SIGINT/SIGTERM/--duration/target
              exit every page not faulted yet is installed from the file, then the ranges are
              unregistered (never zeros where file data belongs); exit 0.  --all-anon only
              with --zero (mappings have no file offsets).
  --range START:LEN [...] -- CMD
              runs CMD under ptrace (x86_64) as watch does; pages of its private anonymous
              memory inside the ranges come from the file (cumulative offsets from OFFSET, as
              for --pid), every other page is a zero page, as the kernel would give.  --range
              is required with --file.  Exits with CMD's status.
  --firecracker-socket PATH --peers N
              one handler for many VMs: each accepted peer is served by its own worker process
              (the same serving as for one peer); N peers, then exit (0: until SIGTERM/SIGINT,
              which stop accepting and drain every running VM, exit 0).  Every record of a
              worker carries "peer" (the VMM's pid); one peer-done or peer-failed per peer; exit
              1 if any failed.  --record FILE writes FILE.PID per peer.

examples (as root):
  uffdtool serve-file --file vm.mem --firecracker-socket /tmp/uffd.sock
  uffdtool serve-file --file vm.mem --firecracker-socket /tmp/uffd.sock --peers 0 --log fc.jsonl
  uffdtool serve-file --zero --firecracker-socket /tmp/uffd.sock --readahead 16
  uffdtool serve-file --file dump.bin --self
  uffdtool serve-file --file dump.bin --pid 1234 --range 0x7f0000000000:64K --dontneed
  uffdtool serve-file --file img.bin --range 0x600000000000:1M -- ./app
  uffdtool serve-file --url "$(aws s3 presign s3://b/vm.mem)" --cache /var/cache/uffdtool \\
      --firecracker-socket /tmp/uffd.sock --fill idle
"""


# -- info and selftest ----------------------------------------------------------------------------

def cmd_info(args):
    info = gather_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_info(info))
    return 0


def cmd_selftest(args):
    checks = select_checks(args.select)
    if args.select and not checks:
        raise UsageError("no check matches -k %s (see 'uffdtool selftest --list')"
                         % " -k ".join(args.select))
    if args.list:
        for c in checks:
            print("%-24s %s%s" % (c.name, c.doc, " [hugetlb]" if c.hugepages else ""))
        return 0
    t0 = time.monotonic()
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    for c, result, reason, ms in run_selftest(checks):
        counts[result] += 1
        if args.json:
            rec = {"t": round(time.monotonic() - t0, 6), "event": "check", "name": c.name,
                   "result": result, "reason": None if result == "PASS" else reason,
                   "ms": round(ms, 1)}
            if args.verbose and result == "PASS" and reason:
                rec["detail"] = reason
            print(json.dumps(rec), flush=True)
        elif result == "PASS":
            print("PASS %s" % c.name + ("  (%s, %.0f ms)" % (reason, ms) if args.verbose and
                                        reason else ""), flush=True)
        else:
            print("%s %s: %s" % (result, c.name, reason), flush=True)
    if args.json:
        print(json.dumps({"t": round(time.monotonic() - t0, 6), "event": "summary",
                          "passed": counts["PASS"], "failed": counts["FAIL"],
                          "skipped": counts["SKIP"]}), flush=True)
    else:
        print("%d passed, %d failed, %d skipped" % (counts["PASS"], counts["FAIL"],
                                                    counts["SKIP"]), flush=True)
    return 1 if counts["FAIL"] else 0


# -- choosing the target: one set of checks for watch and serve-file ----------------------------

def _check_target_args(args, command):
    """The one check of the TARGET flags (watch and serve-file): exactly one target, and each
    flag only with the target it goes with.  UsageError (NotPermitted off x86_64)."""
    choices = [("--self", args.self_), ("--pid PID", args.pid is not None),
               ("-- CMD", bool(args.cmd))]
    if command == "serve-file":
        choices.insert(0, ("--firecracker-socket PATH", bool(args.firecracker_socket)))
    chosen = [name for name, on in choices if on]
    if len(chosen) != 1:
        names = [name for name, _ in choices]
        raise UsageError("%s needs exactly one TARGET: %s or %s%s" % (
            command, ", ".join(names[:-1]), names[-1],
            " (got %s)" % " and ".join(chosen) if chosen else ""))
    if args.size is not None and not args.self_:
        raise UsageError("--size goes with --self")
    if args.all_anon and args.pid is None:
        raise UsageError("--all-anon goes with --pid")
    if args.dontneed and args.pid is None:
        raise UsageError("--dontneed goes with --pid")
    if args.ranges and args.pid is None and not (command == "serve-file" and args.cmd):
        raise UsageError("--range goes with --pid" + (" or -- CMD" if command == "serve-file"
                                                       else ""))
    if (args.pid is not None or args.cmd) and ARCH != "x86_64":
        raise NotPermitted("--pid and -- CMD need x86_64 (this machine is %s)" % ARCH)
    if args.pid is not None:
        if bool(args.ranges) == bool(args.all_anon):
            raise UsageError("--pid needs either --range START:LEN (repeatable) or --all-anon")
        if args.pid <= 0:
            raise UsageError("no such process: %d" % args.pid)


def _watch_target(args, features, warn):
    """The Target of watch's TARGET flags (already checked)."""
    if args.self_:
        return SelfTarget(args.size or (1 << 20), args.mode, features)
    if args.pid is not None:
        return PidTarget(args.pid, args.ranges, args.all_anon, args.mode, features,
                         args.dontneed)
    return SpawnTarget(args.cmd, args.mode, features, warn)


def _range_offsets(args, source):
    """Source offsets of ``--range`` arguments: cumulative in the order given, each LEN rounded
    up to whole pages (like Firecracker's regions).  UsageError if the file is too short."""
    offsets, off = [], 0
    for _, length in args.ranges:
        offsets.append(off)
        off += -(-length // PAGE_SIZE) * PAGE_SIZE
    need = offsets[-1] + args.ranges[-1][1]
    if source.size is not None and need > source.size:
        raise UsageError("%s is too short for the ranges: they need %d bytes from --offset %d, "
                         "the file has %d" % (getattr(source, "display", args.file), need,
                                              args.offset, source.size))
    return offsets


def _serve_target(args, source, warn):
    """The Target of serve-file's TARGET flags (already checked): the Firecracker socket,
    --self, or --pid / -- CMD through watch's attach and spawn machinery, served from the
    source."""
    if args.firecracker_socket:
        return FirecrackerTarget(args.firecracker_socket, args.accept_timeout, args.peer_uid)
    if args.self_:
        return SelfServeTarget(args.size or (64 << 20))
    offsets = _range_offsets(args, source) if args.ranges else None
    if args.pid is not None and args.all_anon and source.kind != "zero":
        raise UsageError("--all-anon with --file: the mappings have no file offsets; give "
                         "--range START:LEN (cumulative offsets) or use --zero")
    if args.pid is None and args.prefetch:
        raise UsageError("--prefetch needs fixed regions: not with -- CMD")
    if args.pid is None and source.kind != "zero" and not args.ranges:
        raise UsageError("-- CMD with --file needs --range START:LEN (repeatable): the "
                         "addresses whose pages come from the file (CMD's other memory "
                         "gets zero pages, as the kernel would give)")
    features = watch_features(set(WATCH_EVENTS), "missing", warn)
    if args.pid is not None:
        return PidTarget(args.pid, args.ranges, args.all_anon, "missing", features,
                         args.dontneed, offsets, snapshot=False, done_reason="target exited")
    file_ranges = [(a, a + n, off) for (a, n), off in zip(args.ranges, offsets or [])]
    return SpawnTarget(args.cmd, "missing", features, warn, file_ranges,
                       done_reason="command exited")


# -- exit status: the one mapping (README, "CLI contract") ---------------------------------------

#: errno -> exit status of an OSError that ends a run: 3 where the kernel or the permissions
#: refuse (the message names the fix); every other errno is 1
_ERRNO_EXIT = {errno.EPERM: 3, errno.EACCES: 3, errno.ENOSYS: 3, errno.ENOEXEC: 3}


def exit_status(error=None, status=None):
    """The exit status of a run that ended with ``error`` (an exception, or None) or, without
    one, with the ``status`` its target decided (CMD's; None: success)."""
    if error is None:
        return status or 0
    if isinstance(error, KeyboardInterrupt):
        return 130
    if isinstance(error, UffdToolError):
        return error.exit_code
    if isinstance(error, OSError):
        return _ERRNO_EXIT.get(error.errno, 1)
    return 1


def tool_error(e, context=None, usage=()):
    """The UffdToolError for an OSError ``e`` (message prefixed with ``context``): NotPermitted
    for the errnos that ``exit_status`` maps to 3, UsageError for those in ``usage``, else
    TargetError."""
    msg = "%s: %s" % (context, e) if context else str(e)
    if e.errno in _ERRNO_EXIT:
        return NotPermitted(msg)
    return (UsageError if e.errno in usage else TargetError)(msg)


# -- the session runner: watch and serve-file --------------------------------------------------

class _Signals(list):
    """SIGINT/SIGTERM during a session: a signal never cuts a step short (an ioctl sequence, an
    injection, a detach).  It is recorded (the list holds the signals received), asks the
    Handler, once there is one, to stop after the current batch, and makes ``wake_r``
    readable, which ends a wait for a peer.  However many arrive, the session then detaches
    or drains once, to the end.  A signal that was ignored when the tool started (SIGINT of a
    background job) stays ignored."""
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        super().__init__()
        self.handler = None
        self.wake_r, self.wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def _on_signal(self, signum, frame):
        self.append(signum)
        if self.handler is not None:
            self.handler.stop()
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def __enter__(self):
        self.old = [signal.getsignal(s) for s in self.SIGNALS]
        for sig, h in zip(self.SIGNALS, self.old):
            if h is not signal.SIG_IGN:
                signal.signal(sig, self._on_signal)
        # a --peers worker starts with them blocked (forked so), and gets any that came since
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return self

    def __exit__(self, *exc):
        for sig, h in zip(self.SIGNALS, self.old):
            signal.signal(sig, h)
        os.close(self.wake_r)
        os.close(self.wake_w)


def _test_pause(step):
    """Test-only: with ``UFFDTOOL_TEST_PAUSE=STEP[@N]:SECS`` in the environment, wait SECS seconds
    the Nth time (default: the first) the tool reaches STEP (``start``: set up and attached,
    before serving; the injection steps in ``INJECTION_STEPS``), so that a test can land a
    signal exactly there; stderr gets ``uffdtool: paused at STEP[@N]`` first.  Signals that
    arrive are handled as usual (recorded)."""
    want, _, secs = os.environ.get("UFFDTOOL_TEST_PAUSE", "").partition(":")
    name, _, nth = want.partition("@")
    if name != step:
        return
    _PAUSES[step] = _PAUSES.get(step, 0) + 1
    if _PAUSES[step] == int(nth or 1):
        os.write(2, ("uffdtool: paused at %s\n" % want).encode())
        end = time.monotonic() + float(secs or 1)
        while time.monotonic() < end:
            time.sleep(end - time.monotonic())


_PAUSES = {}


def _json_only(log, event, **fields):
    """A record for the JSON log only (the human line is the CLI's own message)."""
    human, log.human = log.human, None
    try:
        return log.emit(event, **fields)
    finally:
        log.human = human


class Session:
    """One run of watch or serve-file against one Target, from start to the final records:

      start record -> ``target.open`` -> Handler -> ``target.attach`` -> ready record ->
      ``prepare`` (prefetch) -> ``target.start`` -> serve until the target's fds fire, the
      duration passes, a signal comes or serving fails -> ``target.detach`` (or, after a
      failure, kill the peer when asked) -> ``finish`` -> working set, stats and exit records.

    ``run()`` returns the exit status; an error is one line on stderr (``_complain``) and an
    ``error`` record.  The commands configure it: ``counters`` (stats fields that are always
    there), ``record_key``, ``prepare(handler)`` and ``finish(reason)`` (a status or None)."""
    counters = ()
    idle = None                               # Handler idle work (serve-file --fill idle)
    record_key = "address"
    per_process = True                        # one working set per address space (watch)
    fast_log = True                           # the fast loop may write pagefault records
    log_mappings = True                       # ``mappings`` records (a report places faults)
    failure = None                            # the exception that ended the run, if any
    final_stats = None                        # the final stats record, once written

    def __init__(self, command, args, log, target, source, start_fields):
        self.command, self.args, self.log = command, args, log
        self.target, self.source = target, source
        self.start_fields = start_fields
        self.stats = Stats()
        self.record = _record_list(args, self.per_process)
        self.handler = None
        self.cpu0 = None
        self.attached = self.serving = False

    def prepare(self, handler):
        """After attach, before the target starts (serve-file: the prefetch list)."""

    def finish(self, reason):
        """After detach: a status that overrides the target's, or None."""
        return None

    # -- the run ------------------------------------------------------------------------------
    def run(self):
        _json_only(self.log, "start", command=self.command, version=__version__,
                   argv=["uffdtool"] + list(self.args.argv), time=round(time.time(), 6),
                   **self.start_fields)
        with _Signals() as sig:
            reason, error = self._serve(sig)
            target_status = self._stop(sig, reason, error)
        status = exit_status(error, target_status)
        return self._final_records(reason, status, error)

    def _serve(self, sig):
        """Set up and serve; returns (reason the serving ended, the exception or None)."""
        t, args = self.target, self.args
        try:
            t.open(self.log, self.source, sig.wake_r)
            h = self.handler = Handler(self.source, self.log, self.stats,
                                       readahead=args.readahead, on_remove=args.on_remove,
                                       page_size=t.page_size, record=self.record,
                                       hugetlb=t.hugetlb, spin=args.spin / 1e6)
            h.fast, h.fast_log, h.log_mappings = t.fast, self.fast_log, self.log_mappings
            sig.handler = h
            fds = t.attach(h)
            self.attached = True
            ready = t.ready_fields()
            if ready is not None:
                regs = [r for s in h.served.values() for r in s.regions]
                self.log.emit("ready", regions=len(regs),
                              bytes=sum(r.end - r.start for r in regs), **ready)
            self.prepare(h)
            _test_pause("start")
            t.start()
            self.cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            self.serving = True
            return ("interrupted" if sig else self._loop(h, fds, sig)), None
        except KeyboardInterrupt:             # only a wait for a peer: nothing is attached
            return "interrupted", None
        except BaseException as e:
            return self._failed(e)

    def _loop(self, h, fds, sig):
        tick = (lambda: self.log.emit("stats", **self._stats_record())) \
            if self.args.stats_interval else None
        deadline = None if self.args.duration is None else time.monotonic() + self.args.duration
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            res = h.run(fds, timeout=left, tick=tick, tick_interval=self.args.stats_interval,
                        idle=self.idle)
            if sig:
                return "interrupted"
            if res == "timeout":
                return "duration"
            if not isinstance(res, int):
                return "done" if self.command == "watch" else "target gone"
            reason = self.target.fired(res)
            if reason:
                return reason

    def _failed(self, e):
        """A run that failed: the error record, and the peer killed (--kill-peer-on-error) or
        told about.  Returns ("error", the exception to report)."""
        said = _abandon_peer(self.log, self.target.peer_pid,       # first: before anything
                             getattr(self.args, "kill_peer_on_error", False))   # else can fail
        if isinstance(e, OSError) and self.serving:
            e = TargetError("serving failed: %s" % (e.strerror or e))
        elif isinstance(e, OSError) and not isinstance(e, UffdError):
            e = tool_error(e)
        if said:
            msg = "%s%s" % (e, said)
            fields = getattr(e, "fields", {})
            e = (type(e)(msg) if isinstance(e, UffdToolError) else TargetError(msg))
            e.fields = fields
        self.failure = e
        _json_only(self.log, "error", message=str(e), **getattr(e, "fields", {}))
        return "error", e

    def _stop(self, sig, reason, error):
        """Detach (signals stay deferred: a half-done detach could leave the target stopped or
        short of its data); returns the status the target or ``finish`` decided, or None."""
        t = self.target
        t.stop_signal = sig[0] if sig else None
        sig.handler = None                    # from here on a signal only waits its turn
        if self.handler is not None:
            self.handler.stopping = False     # detach may serve a while longer
        status = None
        try:
            if self.attached:
                status = t.detach(self.handler, "interrupted" if sig and error is None
                                  else reason)
                if self.handler is not None and self.handler.lost and not status:
                    status = 1                # a served uffd was lost: exit 1
            else:
                t.abort()
            if error is None:
                done = self.finish(reason)
                status = done if done is not None else status
        except BaseException as e:
            late = e if isinstance(e, UffdToolError) else TargetError("detach failed: %s" % e)
            _json_only(self.log, "error", message=str(late))
            if error is None:
                self.failure = late
                status = late.exit_code
        return None if error is not None else status

    def _stats_record(self, **extra):
        rec = self.stats.record(**extra)
        for k in self.counters:
            rec.setdefault(k, 0)
        if self.counters:
            rec["faults"] = sum(v for k, v in rec.items() if k.startswith("faults_"))
        return rec

    def _final_records(self, reason, status, error):
        """The working set, the final stats and the exit record (always, whatever happened);
        then the error line.  Human lines only once something was attached: a run refused at
        the start says one line, its error."""
        extra = {"reason": reason}
        if self.cpu0 is not None:             # CPU time of the serving phase (this process)
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            extra["cpu_user_s"] = round(cpu1.ru_utime - self.cpu0.ru_utime, 6)
            extra["cpu_sys_s"] = round(cpu1.ru_stime - self.cpu0.ru_stime, 6)
        if self.record is not None and self.handler is not None:
            try:
                write_working_sets(self.args.record, self.record, self.handler.page_size,
                                   key=self.record_key)
                extra["recorded_pages"] = sum(map(len, self.record.values())) if \
                    isinstance(self.record, dict) else len(self.record)
            except UffdToolError as e:        # the final records still go out
                _json_only(self.log, "error", message=str(e))
                self.failure = self.failure or e
                status = status or e.exit_code
        extra.update(self.target.extra())
        emit = self.log.emit if self.attached else functools.partial(_json_only, self.log)
        self.final_stats = emit("stats", **self._stats_record(**extra))
        ended = getattr(self.target, "exit_fields", None)
        fields = {"target_" + k: v for k, v in (ended or {}).items()}
        if self.failure is not None:
            _json_only(self.log, "exit", reason=reason, status=status, **fields)
            _complain(self.failure)
        else:
            emit("exit", reason=reason, status=status, **fields)
        if self.handler is not None:
            self.handler.close()
        self.target.close()
        self.source.close()
        self.log.close()
        return status


def _record_list(args, per_process=False):
    """[] (``per_process``: {} for one list per process) to collect the working set when
    --record FILE was given (FILE checked writable now, not after the work is done), else
    None."""
    if not args.record:
        return None
    try:
        open(args.record, "a").close()
    except OSError as e:
        raise UsageError("cannot write %s: %s" % (args.record, e.strerror))
    return {} if per_process else []


def _make_log(args, human_faults):
    dest = "-" if args.json else args.log
    return EventLog(dest, human=None if args.quiet else sys.stderr, human_faults=human_faults)


def _abandon_peer(log, pid, kill, **fields):
    """A peer (``pid``) whose registered memory nobody serves any more would hang on its next
    missing page.  With ``kill`` (--kill-peer-on-error) SIGKILL it, then write ``killed_peer``
    (a failing handler calls this first, before anything that could fail in turn); else, if it
    still runs, return the words that say so for the error line ("" otherwise)."""
    if not pid:
        return ""
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            return ""
        log.emit("killed_peer", pid=pid, **fields)
        return ""
    if _alive(pid):
        return ("; the peer (pid %d) now waits forever for its memory: stop it, or use "
                "--kill-peer-on-error" % pid)
    return ""


def _alive(pid):
    """Whether process ``pid`` exists (and is not a zombie)."""
    try:
        return proc_status(pid).get("State", "Z")[:1] not in ("Z", "X")
    except OSError:
        return False


# -- watch and serve-file ------------------------------------------------------------------------

def cmd_watch(args):
    """``uffdtool watch``: register a target's memory, resolve and log every fault and event.

    Ends when the target is done (workload finished, CMD and descendants exited, --pid target
    exited), after --duration, or on SIGINT/SIGTERM; then detaches (ranges unregistered, uffds
    closed) and writes the final ``stats`` record.  The exit status is CMD's for ``-- CMD``."""
    try:
        events = parse_events(args.events)
    except ValueError as e:
        raise UsageError("--events: %s" % e)
    args.on_remove = args.on_remove or "zero"        # keep watching after MADV_DONTNEED
    _check_target_args(args, "watch")
    log = _make_log(args, human_faults=True)
    try:
        def warn(msg):
            log.emit("warning", message=msg)
        features = watch_features(events, args.mode, warn)
        target = _watch_target(args, features, warn)
        source = SnapshotSource() if args.dontneed else ZeroSource()
        fields = {"target": target.name, "mode": args.mode, "features": features.names(),
                  "readahead": args.readahead}
        fields.update({k: v for k, v in (("pid", args.pid), ("cmd", args.cmd)) if v})
        session = Session("watch", args, log, target, source, fields)
    except BaseException:
        log.close()
        raise
    return session.run()


#: counters every serve-file stats record has, even when zero
SERVE_COUNTERS = ("faults_missing", "pages_copy", "bytes_copy", "pages_zero", "bytes_zero",
                  "eexist", "eagain", "retries", "partial", "prefetch_pages", "pages_hole",
                  "outside_regions")


class ServeSession(Session):
    """serve-file's configuration of the session: the prefetch list, the source-offset working
    set, the --self verification."""
    counters = SERVE_COUNTERS
    record_key = "offset"
    per_process = fast_log = log_mappings = False

    def __init__(self, args, log, target, source, working_set):
        super().__init__("serve-file", args, log, target, source, dict(
            source=getattr(source, "display", None) or args.file or "zero", offset=args.offset,
            readahead=args.readahead,
            on_remove=args.on_remove))
        self.working_set = working_set
        if working_set is not None and hasattr(source, "plan"):
            # a UrlSource fetches the list ahead, in first-fault order, from now on: before
            # the target is there (Firecracker connects once it has loaded the snapshot)
            source.plan((o, o + working_set[1]) for o in working_set[2])

    def prepare(self, handler):
        if self.args.fill:
            self.idle = IdleFill(handler, self.log)
        if self.working_set is None:
            return
        _, rec_ps, pages = self.working_set
        regs = [r for s in handler.served.values() for r in s.regions if r.offset is not None]
        bounds = [r.offset for r in regs] + [r.offset + r.end - r.start for r in regs]
        runs = split_runs(coalesce_pages(pages, rec_ps, handler.page_size), bounds)
        handler.prefetch = Prefetcher(runs)
        self.stats.add("prefetch_listed", sum(b - a for a, b in runs) // handler.page_size)

    def finish(self, reason):
        if isinstance(self.target, SelfServeTarget) and reason == "workload done":
            return _finish_self(self.args, self.target, self.source, self.stats, self.log)
        return None


def cmd_serve_file(args):
    """serve-file: fill missing pages of the TARGET from --file (or with --zero)."""
    if sum(1 for x in (args.file, args.zero, args.url) if x) != 1:
        raise UsageError("serve-file needs exactly one source: --file PATH, --url URL or --zero")
    if args.offset and not args.file:
        raise UsageError("--offset needs --file")
    _check_url_args(args)
    _check_target_args(args, "serve-file")
    if args.peers != 1 and not args.firecracker_socket:
        raise UsageError("--peers goes with --firecracker-socket")
    ws = None
    if args.prefetch:
        ws = read_working_set(args.prefetch)
        if ws[0] != "offset":
            raise UsageError("%s records addresses (key=%s); serve-file needs a working set of "
                             "source offsets (record it with serve-file --record)"
                             % (args.prefetch, ws[0]))
    args.on_remove = args.on_remove or "unregister"  # what Firecracker's handler does
    log = _make_log(args, human_faults=args.verbose)
    log.json_faults = not args.no_fault_log
    source = None
    try:
        source = open_serve_source(args, log)
        if args.peers != 1:
            session = PeerDaemon(args, log, source, ws)
        else:
            target = _serve_target(args, source, lambda msg: log.emit("warning", message=msg))
            session = ServeSession(args, log, target, source, ws)
    except BaseException:
        if source is not None:
            source.close()
        log.close()
        raise
    return session.run()


def _check_url_args(args):
    """--url's options only with --url; --fill idle only with a file or URL source."""
    if not args.url:
        given = [f for f, v in (("--cache", args.cache), ("--header", args.header),
                                ("--cacert", args.cacert),
                                ("--chunk", args.chunk != URL_CHUNK),
                                ("--fetchers", args.fetchers != URL_FETCHERS),
                                ("--retries", args.retries != URL_RETRIES),
                                ("--timeout", args.timeout != URL_TIMEOUT)) if v]
        if given:
            raise UsageError("%s goes with --url" % given[0])
    if args.retries < 0:
        raise UsageError("--retries must be 0 or more")
    if args.fill and args.zero:
        raise UsageError("--fill idle needs --file or --url: with --zero it would fill the "
                         "target's reserved memory with zero pages")


def open_serve_source(args, log):
    """The page source of serve-file's SOURCE flags."""
    if args.url:
        args.argv = redact_argv(getattr(args, "argv", []))     # the start record's argv
        return UrlSource(args.url, cache=args.cache, chunk=args.chunk, fetchers=args.fetchers,
                         retries=args.retries, timeout=args.timeout, headers=args.header,
                         cacert=args.cacert, log=log)
    return FileSource(args.file, args.offset) if args.file else ZeroSource()


def _finish_self(args, target, source, stats, log):
    """--self: verify every byte the worker read and print the throughput."""
    if target.error is not None:
        log.emit("verify", ok=False, error=str(target.error))
        return 1
    ok, bad = target.verify(source)
    mib = target.size / (1 << 20)
    rate = mib / target.elapsed if target.elapsed else 0.0
    log.emit("verify", ok=ok, bytes=target.size, first_bad=bad,
             seconds=round(target.elapsed, 6), mib_s=round(rate, 1))
    if not args.quiet:
        sys.stderr.write("self: %.1f MiB served from %s in %.3f s: %.0f MiB/s, %d faults, "
                         "readahead %d: %s\n" % (
                             mib, getattr(source, "display", None) or args.file or "zero pages",
                             target.elapsed, rate,
                             sum(v for k, v in stats.count.items() if k.startswith("faults_")),
                             args.readahead,
                             "every byte verified" if ok else "MISMATCH at offset %d" % bad))
    return 0 if ok else 1


# -- serve-file --peers: one worker process per Firecracker peer (README, "Many VMs") ------------

#: listen() backlog of a --peers socket: many VMs may restore at the same moment
PEER_BACKLOG = 128
#: stats fields of a worker's final record that the daemon's stats do not sum up
_PEER_NOT_SUMMED = ("t", "event", "peer", "wall_s", "target_stopped_s", "latency_us", "reason")


def _poll_in(fds, timeout):
    """Those of ``fds`` that are readable or hung up within ``timeout`` s (None: wait).  poll,
    not select: a daemon serving many peers may hold fds past select's limit of 1024."""
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return [fd for fd, _ in p.poll(None if timeout is None else timeout * 1000)]


def _ignore_signal(signum, frame):
    """A worker's SIGINT/SIGTERM outside its session: it stops when its session says so."""


class PeerWorker:
    """What the daemon knows of one worker: its pid, its peer's pid (SO_PEERCRED) and the pipe
    its report arrives on (EOF: the worker is gone)."""

    def __init__(self, pid, peer, report_fd):
        self.pid, self.peer, self.report_fd = pid, peer, report_fd
        self.data = b""


class PeerDaemon:
    """``serve-file --firecracker-socket PATH --peers N`` (N != 1; 0: until SIGTERM/SIGINT).

    The parent listens once and accepts; each accepted peer gets a worker process, forked after
    the accept from a parent that has done its imports and ``gc.freeze()`` (so the
    interpreter's pages stay shared), which runs the ordinary serve-file session on that one
    connection: a FirecrackerTarget given the connection.  Its log is the parent's
    destination with ``peer`` in every record; it reports its final stats and ``Pss_Anon`` on
    a pipe when done.  The parent writes ``peer-done``/``peer-failed`` per peer (a worker that
    died without reporting failed; ``--kill-peer-on-error`` then SIGKILLs its peer), stops
    accepting after N peers, on SIGINT/SIGTERM or ``--duration`` (then each worker drains:
    installs the rest of its VM's memory and unregisters), and when every worker is done
    writes the aggregated ``stats`` and ``exit``.  Exit 1 if any peer failed."""

    def __init__(self, args, log, source, working_set):
        self.args, self.log, self.source, self.working_set = args, log, source, working_set
        self.limit = args.peers
        self.sock = None
        self.sock_id = None                   # (dev, ino) of the socket file we bound
        self.uids = {os.geteuid()} | ({args.peer_uid} if args.peer_uid is not None else set())
        self.sig = None
        self.workers = {}                     # report fd -> PeerWorker
        self.accepted = 0
        self.served, self.failed = [], []
        self.stats = Stats()
        self.stopping = None                  # why the daemon stopped serving, once it has
        self.error = None
        _record_list(args)                    # --record FILE checked writable now
        if isinstance(source, UrlSource):
            # its fetcher threads would not survive a fork (and their locks might be copied
            # held): the parent has checked the URL by opening it, each worker opens its own
            # (a --cache directory is shared by all of them)
            source.close()
            self.source = None

    def run(self):
        args = self.args
        _json_only(self.log, "start", command="serve-file", version=__version__,
                   argv=["uffdtool"] + list(args.argv), time=round(time.time(), 6),
                   source=args.file or "zero", offset=args.offset, readahead=args.readahead,
                   on_remove=args.on_remove, peers=self.limit)
        reason = "error"
        with _Signals() as sig:
            self.sig = sig
            try:
                self.sock = listen_unix(args.firecracker_socket, peer_uid=args.peer_uid)
                self.sock_id = _file_id(args.firecracker_socket)
                self.sock.listen(PEER_BACKLOG)
                self.log.emit("ready", socket=args.firecracker_socket, peers=self.limit)
                getattr(self.source, "before_fork", lambda: None)()
                gc.collect()                  # what the workers share: no garbage, no holes
                gc.freeze()
                trim_heap()
                reason = self._serve(sig)
            except UffdToolError as e:
                self.error = e
                _json_only(self.log, "error", message=str(e))
                self._stop("error")
                self._wait_all()
            finally:
                self._close_listener()
        status = 1 if self.failed else 0
        if self.error is not None:
            status = max(status, self.error.exit_code)
        self.log.emit("stats", **self._stats_record(reason=reason))
        self.log.emit("exit", reason=reason, status=status)
        if self.error is not None:
            _complain(self.error)
        if self.source is not None:
            self.source.close()
        self.log.close()
        return status

    # -- the parent: accept, supervise, stop ---------------------------------------------------
    def _serve(self, sig):
        args = self.args
        now = time.monotonic()
        deadline = None if args.duration is None else now + args.duration
        next_tick = now + args.stats_interval if args.stats_interval else None
        accept_by = now + args.accept_timeout if args.accept_timeout else None
        while self.sock is not None or self.workers:
            now = time.monotonic()
            if sig and self.stopping is None:
                self._stop("interrupted")
            if deadline is not None and now >= deadline and self.stopping is None:
                self._stop("duration")
            if self.sock is not None and accept_by is not None and now >= accept_by:
                self._accept_timed_out()
            if next_tick is not None and now >= next_tick:
                self.log.emit("stats", **self._stats_record())
                next_tick = now + args.stats_interval
            if self.sock is None and not self.workers:
                break
            listening = [self.sock.fileno()] if self.sock else []
            times = [t for t in (deadline if self.stopping is None else None, next_tick,
                                 accept_by if self.sock else None) if t is not None]
            timeout = max(0.0, min(times) - now) if times else None
            r = _poll_in([sig.wake_r] + list(self.workers) + listening, timeout)
            if sig.wake_r in r:
                os.read(sig.wake_r, 64)       # the signal itself is in ``sig``
            for fd in [fd for fd in r if fd in self.workers]:     # before an accept reuses
                self._read_report(fd)                              # a closed fd's number
            if listening and listening[0] in r:
                self._accept()
                accept_by = time.monotonic() + args.accept_timeout if args.accept_timeout \
                    else None
        return self.stopping or "peers done"

    def _accept_timed_out(self):
        self._close_listener()
        self.stopping = self.stopping or "accept timeout"
        if self.limit and self.accepted < self.limit:
            self.error = TargetError("no connection on %s within %g s (%d of %d peers came)"
                                     % (self.args.firecracker_socket, self.args.accept_timeout,
                                        self.accepted, self.limit))
            _json_only(self.log, "error", message=str(self.error))

    def _close_listener(self):
        """Stop accepting: a VM pointed at the socket now fails at connect instead of hanging."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            _unlink_socket(self.args.firecracker_socket, self.sock_id)

    def _stop(self, reason):
        """Stop accepting and ask every worker to stop (each drains its VM, then reports)."""
        self.stopping = reason
        self._close_listener()
        for w in self.workers.values():
            try:
                os.kill(w.pid, signal.SIGTERM)
            except OSError:
                pass

    def _wait_all(self):
        while self.workers:
            for fd in _poll_in(list(self.workers), None):
                self._read_report(fd)

    def _accept(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return                            # the peer gave up meanwhile
        peer, uid, _ = peer_cred(conn)
        if uid not in self.uids:              # as accept_peer: refused, listening goes on
            conn.close()
            self.log.emit("warning", pid=peer, uid=uid, message=refused_message(
                self.args.firecracker_socket, peer, uid, self.uids))
            return
        self.accepted += 1
        if self.limit and self.accepted >= self.limit:
            self._close_listener()            # N peers: the next one fails at connect
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        self.log.flush()                      # the worker's log starts with an empty buffer
        gc.freeze()                           # the parent's objects: never touched by a GC
        signal.pthread_sigmask(signal.SIG_BLOCK, _Signals.SIGNALS)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _Signals.SIGNALS)
            for fd in (report_r, report_w):
                os.close(fd)
            conn.close()
            self.failed.append(peer)
            self.log.emit("peer-failed", peer=peer, reason="cannot fork a worker: %s"
                          % e.strerror)
            return
        if pid == 0:
            os.close(report_r)
            self._worker(conn, peer, self.accepted == 1, report_w)      # never returns
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _Signals.SIGNALS)
        os.close(report_w)
        conn.close()
        self.workers[report_r] = PeerWorker(pid, peer, report_r)
        self.log.emit("peer-accepted", peer=peer, worker=pid)
        if self.stopping is not None:         # a stop came while it was being forked
            os.kill(pid, signal.SIGTERM)

    def _read_report(self, fd):
        w = self.workers[fd]
        data = os.read(fd, 1 << 16)
        if data:
            w.data += data
            return
        del self.workers[fd]
        os.close(fd)
        _, st = os.waitpid(w.pid, 0)
        self._peer_ended(w, os.waitstatus_to_exitcode(st))

    def _peer_ended(self, w, code):
        """peer-done or peer-failed for a worker that is gone; its counters into the total."""
        try:
            report = json.loads(w.data) if w.data else None
        except ValueError:
            report = None
        stats = (report or {}).get("stats") or {}
        for k, v in stats.items():
            if k not in _PEER_NOT_SUMMED and isinstance(v, (int, float)) \
                    and not isinstance(v, bool):
                self.stats.add(k, v)
        fields = {k: v for k, v in stats.items() if k not in ("t", "event", "peer")}
        fields.update(worker=w.pid, status=code,
                      pss_anon_kib=(report or {}).get("pss_anon_kib"))
        if report is not None and code == 0:
            self.served.append(w.peer)
            self.log.emit("peer-done", peer=w.peer, **fields)
            return
        self.failed.append(w.peer)
        if code < 0:
            why = "worker %d killed by signal %s" % (w.pid, signal.Signals(-code).name)
        elif report is None:
            why = "worker %d exited with status %d before reporting" % (w.pid, code)
        else:
            why = report.get("error") or "worker exited with status %d (%s)" % (
                code, stats.get("reason"))
        if report is None:
            why += _abandon_peer(self.log, w.peer, self.args.kill_peer_on_error, peer=w.peer)
        fields["reason"] = why
        self.log.emit("peer-failed", peer=w.peer, **fields)

    def _stats_record(self, **extra):
        rec = self.stats.record(**extra)
        for k in SERVE_COUNTERS:
            rec.setdefault(k, 0)
        rec.setdefault("faults", 0)
        rec.update(peers_served=list(self.served), peers_failed=list(self.failed),
                   peers_running=[w.peer for w in self.workers.values()],
                   pss_anon_kib=pss_anon_kib())
        return rec

    # -- a worker: the ordinary session for one peer -------------------------------------------
    def _worker(self, conn, peer, first, report_w):
        """In the forked worker (signals blocked until its session takes them): serve ``conn``
        with a ServeSession, report on ``report_w``, exit with the session's status."""
        status, report = 1, {}
        try:
            for s in _Signals.SIGNALS:
                signal.signal(s, _ignore_signal)
            for fd in [self.sig.wake_r, self.sig.wake_w] + list(self.workers):
                os.close(fd)
            if self.sock is not None:
                self.sock.close()             # only the parent accepts (and unlinks the path)
            getattr(self.source, "after_fork", lambda: None)()
            args = argparse.Namespace(**vars(self.args))
            args.duration = None              # the parent stops the workers
            if args.record:
                args.record = "%s.%d" % (self.args.record, peer)
            log = self.log.fork_copy(peer=peer)
            source = self.source or open_serve_source(args, log)
            target = FirecrackerTarget(args.firecracker_socket, args.accept_timeout,
                                       args.peer_uid, conn=conn)
            session = ServeSession(args, log, target, source, self.working_set)
            status = session.run()
            report = {"stats": session.final_stats, "pss_anon_kib": pss_anon_kib(),
                      "error": None if session.failure is None else str(session.failure)}
            if first and args.record and os.path.exists(args.record):
                tmp = "%s.tmp%d" % (self.args.record, os.getpid())
                shutil.copyfile(args.record, tmp)    # FILE holds the first peer's set
                os.replace(tmp, self.args.record)
        except BaseException as e:            # reported; never back into the parent's code
            status = exit_status(e)
            report["error"] = str(e) or type(e).__name__
        finally:
            try:
                data = json.dumps(report).encode()
                while data:
                    data = data[os.write(report_w, data):]
            finally:
                os._exit(status)


# -- report --------------------------------------------------------------------------------------

EPILOG_REPORT = """views:
  (no -o)     a summary within the terminal's width (80 columns when not a terminal): per
              process and mapping the pages touched, % of the mapping, first and last touch;
              record counts; latency percentiles and histogram; a text heat map (rows = time,
              columns = address ranges, gaps collapsed, digits 1-9 = faults, log scale)
  -o x.html   one self-contained page (works offline): heat map per mapping, working-set curve,
              latency histogram (1 us .. 16 s), event timeline, the table, command line and date
  -o x.svg    the heat maps alone
  LOG LOG2    also the overlap of the two working sets (pages in both, only in one, Jaccard),
              by offset inside each mapping or by source offset (ASLR and restores move them)

examples:
  uffdtool watch --log gcc.jsonl -- gcc -c t.c && uffdtool report gcc.jsonl
  uffdtool report vm.jsonl -o vm.html
  uffdtool report restore1.jsonl restore2.jsonl -o compare.html
  uffdtool report ws.txt                   a --record file: pages in first-touch order
"""


def cmd_report(args):
    """``uffdtool report``: read one or two logs, print the summary or write -o FILE."""
    if len(args.logs) > 2:
        raise UsageError("report takes one or two logs (%d given)" % len(args.logs))
    kind = None
    if args.output:
        kind = os.path.splitext(args.output)[1].lower().lstrip(".")
        if kind not in ("html", "htm", "svg"):
            raise UsageError("-o %s: the name must end in .html or .svg" % args.output)
    reps = [read_report(path) for path in args.logs]
    for rep in reps:
        for w in rep.warnings:
            _complain("warning: %s" % w)
    if kind is None:
        width = args.width or (shutil.get_terminal_size().columns if sys.stdout.isatty()
                               else 80)
        width = max(60, width)
        texts = [format_report(rep, width) for rep in reps]
        if len(reps) == 2:
            texts.append(format_compare(reps[0], reps[1], width))
        sys.stdout.write("\n\n".join(texts) + "\n")
        return 0
    text = render_svg(reps) if kind == "svg" else render_html(reps)
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise UsageError("cannot write %s: %s" % (args.output, e.strerror))
    return 0


# -- main ----------------------------------------------------------------------------------------

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    """Run the CLI; returns the exit status (``exit_status``): never lets a traceback reach the
    user for an expected failure."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if getattr(args, "cmd", None) and args.cmd[0] == "--":      # argparse.REMAINDER keeps it
        args.cmd = args.cmd[1:]
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return args.func(args)
    except (UffdToolError, OSError) as e:
        _complain(e)
        return exit_status(e)
    except KeyboardInterrupt:
        return exit_status(KeyboardInterrupt())
    finally:
        signal.signal(signal.SIGTERM, old)


def _complain(e):
    try:
        sys.stderr.write("uffdtool: %s\n" % e)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
