"""The ptrace (x86_64) section on its own: /proc parsing, injection, restart semantics."""
import contextlib
import os
import subprocess
import sys
import time

import pytest

from conftest import needs_root, uffdtool as U

pytestmark = [needs_root, pytest.mark.skipif(U.ARCH != "x86_64", reason="x86_64 only")]

MAPS = ("55d0c000-55d0d000 rw-p 00000000 00:00 0                          [heap]\n"
        "7f00-8000 rw-p 00000000 00:00 0 \n"
        "7f0000-7f1000 rw-s 00000000 00:01 5                          /dev/zero (deleted)\n"
        "7ffd0000-7ffd1000 rw-p 00000000 00:00 0                          [stack]\n"
        "7f2000-7f3000 r--p 00001000 08:01 1234                       /usr/lib/libc.so.6\n"
        "7f4000-7f5000 ---p 00000000 00:00 0\n"
        "7f6000-7f7000 rw-p 00000000 00:00 0                          [anon:python]\n")


def test_maps_parser_and_private_anon():
    maps = U.parse_maps(MAPS)
    assert [m.is_private_anon() for m in maps] == [True, True, False, False, False, True, True]
    assert maps[0].start == 0x55d0c000 and maps[0].end == 0x55d0d000 and maps[0].path == "[heap]"
    assert maps[4].perms == "r--p" and maps[4].path == "/usr/lib/libc.so.6"
    assert any(m.is_private_anon() for m in U.read_maps(os.getpid()))


def test_bpf_filter_shape():
    prog, arr = U._bpf_watch_filter()
    assert prog.len == len(arr) == 14
    for pc, ins in enumerate(arr):           # every jump lands inside the program
        if ins.code == 0x15:
            assert pc + 1 + max(ins.jt, ins.jf) < len(arr)


@contextlib.contextmanager
def child(code):
    """A Python child with pipes on stdin/stdout; killed and reaped whatever happens."""
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


SLEEPER = ("import sys, time\n"
           "print('go', flush=True); sys.stdin.readline()\n"
           "t = time.monotonic(); time.sleep(0.6)\n"
           "print(round(time.monotonic() - t, 1), flush=True)\n"
           "print(sys.stdin.readline().strip())\n")


def test_injection_keeps_syscalls_restartable():
    """Injected while in read() and then in nanosleep(): read restarts, the sleep keeps its
    remaining time (restart_block), nothing leaks -ERESTART* to the program."""
    with child(SLEEPER) as p:
        assert p.stdout.readline() == "go\n"
        time.sleep(0.1)                                   # now blocked in read(stdin)
        fd, secs = U.inject_userfaultfd(p.pid)
        assert os.readlink("/proc/self/fd/%d" % fd) == "anon_inode:[userfaultfd]"
        os.close(fd)
        assert secs < 0.5
        p.stdin.write("\n")
        p.stdin.flush()
        time.sleep(0.2)                                   # now in clock_nanosleep
        fd, _ = U.inject_userfaultfd(p.pid)
        os.close(fd)
        assert p.stdout.readline().strip() == "0.6"
        out, _ = p.communicate("bye\n", timeout=10)
        assert out.strip() == "bye"


def test_all_threads_stopped_and_released():
    code = ("import threading, time, sys\n"
            "n = [0]\n"
            "def spin():\n"
            "    while True: n[0] += 1\n"
            "for _ in range(3): threading.Thread(target=spin, daemon=True).start()\n"
            "print('go', flush=True); sys.stdin.readline(); print(n[0] > 0, flush=True)\n")
    with child(code) as p:
        p.stdout.readline()
        with U.Attachment(p.pid) as a:
            assert len(a.tids) == 4
            assert a.inj.syscall(U.NR_getpid) == p.pid
            for tid in a.tids:
                assert U.proc_status(tid)["State"].startswith("t")
        assert all(U.proc_status(t)["TracerPid"] == "0" for t in a.tids)
        out, _ = p.communicate("\n", timeout=10)
        assert out.strip() == "True"


def test_refusals():
    with pytest.raises(ProcessLookupError):
        U.inject_userfaultfd(4000000)
    with pytest.raises(U.PtraceError, match="itself"):
        U.check_attachable(os.getpid())
