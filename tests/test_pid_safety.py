"""`watch --pid` never hurts its target (README "What --pid guarantees"): --dontneed keeps the
pages the kernel itself writes (a real redis-server, a C target with rseq, robust mutexes and a
sigaltstack), a SIGKILLed tool at every injection step and at random moments leaves the target
running with its registers, mask, FPU state and data, and odd pids get clear errors."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import TOOL, need_program, needs_root, needs_uffd, run_tool, start_tool, stop_tool
from conftest import uffdtool as U

pytestmark = [needs_root, needs_uffd,
              pytest.mark.skipif(U.ARCH != "x86_64", reason="--pid is x86_64 only")]

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def victim(tmp_path_factory):
    """tests/victim.c built with gcc (a target that checks its own data, mask, FPU, rseq)."""
    gcc = need_program("gcc", "gcc")
    out = str(tmp_path_factory.mktemp("victim") / "victim")
    subprocess.run([gcc, "-O2", "-pthread", "-o", out, os.path.join(HERE, "victim.c"), "-lm"],
                   check=True)
    return out


def start_victim(path, *args):
    p = subprocess.Popen([path] + [str(a) for a in args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    return p


def sigblk(pid):
    return int(U.proc_status(pid)["SigBlk"], 16)


def field(recs, name):
    """The value of ``name`` in the first record that has it (ready or stats)."""
    return next(r[name] for r in recs if name in r)


# -- item 1: --dontneed keeps what the kernel writes -----------------------------------------------

def test_kernel_pages_cover_rseq_robust_tcb_altstack(victim):
    """kernel_pages() names every thread's rseq area and TCB, the robust list heads and the
    main thread's sigaltstack: none of them may be dropped."""
    p = start_victim(victim, "serve")
    try:
        with U.Attachment(p.pid) as a:
            keep = a.kernel_pages()
            assert len(a.tids) == 4
            for tid in a.tids:
                addr, size = U.get_rseq(tid)
                assert size >= 32 and addr & -U.PAGE_SIZE in keep
                assert U.get_regs(tid).fs_base & -U.PAGE_SIZE in keep
            alt = a.inj.sigaltstack()
            assert alt is not None and alt[1] == 65536
            assert all(pg in keep for pg in range(alt[0], alt[0] + alt[1], U.PAGE_SIZE))
            with open("/proc/%d/mem" % p.pid, "rb", buffering=0) as mem:
                for tid in a.tids[1:]:
                    heads = U.robust_list(tid, mem.fileno())
                    assert len(heads) >= 3                 # head + the held mutex + its word
                    assert all(x & -U.PAGE_SIZE in keep for x, _ in heads)
        out, _ = p.communicate("check\n", timeout=10)
        assert out.strip() == "ok" and p.returncode == 0
    finally:
        p.kill()
        p.wait()


def test_dontneed_c_target_rseq_robust_altstack(victim):
    """--all-anon --dontneed on a C target with 3 rseq threads holding robust mutexes and a
    sigaltstack: while watched the threads exit (robust list walk, clear_child_tid: join
    returns, EOWNERDEAD) and a signal runs on the alternate stack; afterwards data, mask and
    rseq are intact.  (Before the fix the main thread's TCB page came back as zeros.)"""
    p = start_victim(victim, "serve")
    try:
        for _ in range(3):
            t = start_tool("watch", "--pid", p.pid, "--all-anon", "--dontneed")
            recs, err = stop_tool(t)
            assert t.returncode == 0, err
            assert field(recs, "snapshot_pages") >= 300
            assert p.poll() is None
        t = start_tool("watch", "--pid", p.pid, "--all-anon", "--dontneed")
        p.stdin.write("exit-threads\nsignal\n")
        p.stdin.flush()
        assert p.stdout.readline() == "joined\n"
        assert p.stdout.readline() == "signalled\n"
        recs, err = stop_tool(t)
        assert t.returncode == 0, err
        assert any(r["event"] == "pagefault" for r in recs)      # pages really were dropped
        out, _ = p.communicate("check\n", timeout=10)
        assert out.strip() == "ok" and p.returncode == 0
    finally:
        p.kill()
        p.wait()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _redis(port, *cmds):
    """Run redis commands through redis-cli; returns its output lines."""
    r = subprocess.run(["redis-cli", "-p", str(port)], input="".join(c + "\n" for c in cmds),
                       capture_output=True, text=True, timeout=60)
    return r.stdout.splitlines()


def test_dontneed_real_redis_under_load(tmp_path):
    """A real redis-server (127.0.0.1, free port, own dir, no persistence) with 3,000 keys and
    redis-benchmark running: `watch --pid --all-anon --dontneed` five times; redis stays up and
    every key is identical afterwards.  Without the fix it died ~3 ms after `ready` (9 of 9)."""
    server = need_program("redis-server", "redis-server")
    need_program("redis-cli", "redis-tools")
    bench = need_program("redis-benchmark", "redis-tools")
    port = _free_port()
    r = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(tmp_path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    load = None
    try:
        for _ in range(100):
            if _redis(port, "PING") == ["PONG"]:
                break
            time.sleep(0.05)
        keys = ["data:%d" % i for i in range(3000)]
        values = ["%d-%s" % (i, "x" * (i % 300)) for i in range(3000)]
        _redis(port, *["SET %s %s" % kv for kv in zip(keys, values)])
        load = subprocess.Popen([bench, "-p", str(port), "-c", "4", "-n", "2000000", "-q",
                                 "-t", "set,get,incr,lpush", "-r", "5000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        for _ in range(5):
            t = start_tool("watch", "--pid", r.pid, "--all-anon", "--dontneed")
            time.sleep(0.3)
            recs, err = stop_tool(t)
            assert t.returncode == 0, err
            assert field(recs, "snapshot_pages") > 100
            assert r.poll() is None, "redis-server died"
        assert load.poll() is None, "the load generator stopped early"
        assert _redis(port, *["GET " + k for k in keys]) == values
        assert _redis(port, "PING") == ["PONG"]
    finally:
        if load is not None:
            load.kill()
            load.wait()
        r.kill()
        r.wait()


def test_dontneed_merges_runs_and_keeps_shared_pages():
    """Few madvise calls: runs are merged and split only around kept pages; shared memory is
    never in the runs (drop_present only gets private anonymous regions)."""
    runs = U.merge_runs(U.subtract_pages([(0x10000, 0x20000), (0x20000, 0x30000)], {0x18000}))
    assert runs == [(0x10000, 0x18000), (0x19000, 0x30000)]
    maps = U.parse_maps("7f0000-7f1000 rw-s 00000000 00:01 5 /dev/zero (deleted)\n")
    assert not maps[0].is_private_anon()


# -- item 4: a SIGKILLed tool never hurts the target -----------------------------------------------

STEPS = [s for s in U.INJECTION_STEPS] + ["syscall-entry@2", "syscall-exit@3", "regs-injected@3"]


@pytest.mark.parametrize("mode", ["sleep", "spin"])
@pytest.mark.parametrize("step", STEPS)
def test_sigkill_at_each_injection_step(victim, step, mode):
    """UFFDTOOL_TEST_PAUSE stops the tool at that step; SIGKILL it there.  The target (in a
    syscall, or spinning in user space with live %xmm7 and MXCSR) runs on, exits 0 with its
    data, and has no signal blocked."""
    p = start_victim(victim, mode, 60)
    try:
        env = dict(os.environ, UFFDTOOL_TEST_PAUSE=step + ":600")
        t = subprocess.Popen([sys.executable, TOOL, "watch", "--pid", str(p.pid), "--all-anon",
                              "--quiet", "--log", os.devnull], stderr=subprocess.PIPE,
                             text=True, env=env)
        line = t.stderr.readline()
        assert line == "uffdtool: paused at %s\n" % step, line
        t.kill()
        t.wait()
        time.sleep(0.05)
        assert sigblk(p.pid) == 0
        assert U.proc_status(p.pid)["TracerPid"] == "0"
        time.sleep(0.1)                                # it runs on (sleeping or spinning)
        p.send_signal(signal.SIGUSR2)                  # then checks itself and exits
        out, _ = p.communicate(timeout=10)
        assert out.strip() == "ok" and p.returncode == 0, (out, p.returncode)
    finally:
        p.kill()
        p.wait()


def test_sigkill_at_random_moments(victim):
    """32 real asynchronous SIGKILLs (a POSIX timer armed when the target is seized,
    UFFDTOOL_TEST_KILL_AFTER_US) at random offsets in the first 3 ms: every target survives,
    exits 0 with its data and no blocked signal."""
    rnd = random.Random(1234)
    failures = []
    for batch in range(8):
        trials = []
        for k in range(4):
            mode = ("sleep", "spin")[k % 2]
            us = rnd.uniform(0, 3000)
            p = start_victim(victim, mode, 60)
            env = dict(os.environ, UFFDTOOL_TEST_KILL_AFTER_US="%.0f" % us)
            t = subprocess.Popen([sys.executable, TOOL, "watch", "--pid", str(p.pid),
                                  "--all-anon", "--quiet", "--log", os.devnull,
                                  "--duration", "5"], stderr=subprocess.DEVNULL, env=env)
            trials.append((p, t, mode, us))
        for p, t, mode, us in trials:
            t.wait(30)
            time.sleep(0.05)
            blocked = sigblk(p.pid)
            p.send_signal(signal.SIGUSR2)
            out, _ = p.communicate(timeout=30)
            if blocked:
                failures.append((mode, round(us), "SigBlk %x" % blocked))
            if t.returncode != -signal.SIGKILL or out.strip() != "ok" or p.returncode != 0:
                failures.append((mode, round(us), t.returncode, p.returncode, out))
    assert not failures


# -- item 7: clear errors on odd pids ----------------------------------------------------------

def test_zombie_pid_is_named():
    p = subprocess.Popen(["true"])
    for _ in range(100):
        if U.proc_status(p.pid)["State"].startswith("Z"):
            break
        time.sleep(0.02)
    try:
        r = run_tool("watch", "--pid", p.pid, "--all-anon", "--quiet")
        assert r.returncode == 2
        assert "PID %d is a zombie" % p.pid in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        p.wait()


def test_thread_id_is_named(victim):
    p = start_victim(victim, "serve")
    try:
        tid = max(int(t) for t in os.listdir("/proc/%d/task" % p.pid))
        r = run_tool("watch", "--pid", tid, "--all-anon", "--quiet")
        assert r.returncode == 2
        assert "%d is a thread of PID %d" % (tid, p.pid) in r.stderr
        assert p.poll() is None and sigblk(p.pid) == 0
    finally:
        p.kill()
        p.wait()


def test_second_concurrent_attach_is_named(victim):
    """Another userfaultfd (ours, from a first watch) already holds the range: EBUSY, said
    plainly, exit 1, the target untouched and still served by the first watch."""
    p = start_victim(victim, "serve")
    try:
        t = start_tool("watch", "--pid", p.pid, "--all-anon")
        for extra in ([], ["--dontneed"]):
            r = run_tool("watch", "--pid", p.pid, "--all-anon", "--quiet", *extra)
            assert r.returncode == 1, r.stderr
            assert "another userfaultfd already watches this range" in r.stderr
            assert "Traceback" not in r.stderr
            assert sigblk(p.pid) == 0 and U.proc_status(p.pid)["TracerPid"] == "0"
        recs, err = stop_tool(t)
        assert t.returncode == 0, err
        out, _ = p.communicate("check\n", timeout=10)
        assert out.strip() == "ok" and p.returncode == 0
    finally:
        p.kill()
        p.wait()


# -- item 3: forks never pile up uffds, a lost uffd is never silent ------------------------------

def _pattern(n):
    """Region 0 of the victim: byte i = (7 i + i // 4096) mod 256 (victim.c ``fill``)."""
    return bytes((i * 7 + i // 4096) & 0xFF for i in range(n))


def _low_fd_limit():
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))


@pytest.mark.parametrize("command", ["serve-file", "watch"])
def test_forking_target_under_low_fd_limit(victim, tmp_path, command):
    """`ulimit -n 40` for the tool, a target forking every 200 us, watched 1.5 s, --dontneed: each
    child is checked by itself against the data (the victim counts bad children), so is the
    parent; the tool never holds more than a few fds, installs every page of each child first,
    closes its uffd at once and exits 0.  (Before: one fd per child until EMFILE, then zeros.)"""
    p = subprocess.Popen([victim, "fork", "60"], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    addr = int(p.stdout.readline(), 16)
    try:
        if command == "serve-file":
            src = tmp_path / "data.bin"
            src.write_bytes(_pattern(200 * 4096))
            args = ["serve-file", "--file", src, "--pid", p.pid,
                    "--range", "0x%x:%d" % (addr, 200 * 4096), "--dontneed"]
        else:
            args = ["watch", "--pid", p.pid, "--all-anon", "--dontneed"]
        log = tmp_path / "log.json"
        t = subprocess.run([sys.executable, TOOL] + [str(a) for a in args] +
                           ["--quiet", "--log", str(log), "--duration", "1.5"],
                           capture_output=True, text=True, timeout=60, preexec_fn=_low_fd_limit)
        recs = [json.loads(line) for line in open(log) if line.startswith("{")]
        assert t.returncode == 0, t.stderr
        forks = sum(1 for r in recs if r["event"] == "fork")
        assert forks > 50
        assert sum(1 for r in recs if r.get("reason") == "not-followed") == forks
        assert not [r for r in recs if r["event"] == "error"]
        p.send_signal(signal.SIGUSR2)
        out, _ = p.communicate(timeout=30)
        assert out.strip() == "ok" and p.returncode == 0, out
    finally:
        p.kill()
        p.wait()


# -- item 6: the copy happens before the stop ----------------------------------------------------

@pytest.mark.skipif(not U.Precopy.available(), reason="needs UFFD_FEATURE_WP_ASYNC (6.7+)")
def test_precopy_recopies_exactly_the_pages_written_between_the_stops(victim):
    """Precopy: stop 1 write-protects (async) and copies with the target running; a page the
    target writes afterwards (here through /proc/PID/mem, which faults like the target would)
    loses its uffd-wp bit and is copied again at stop 2 with its new content; the others are
    taken from the first copy."""
    p = start_victim(victim, "sleep", 60)
    try:
        regions = [(m.start, m.end - m.start) for m in U.read_maps(p.pid) if m.is_private_anon()]
        pre = U.Precopy(p.pid, regions)
        pre.run()
        assert len(pre.index) >= 300
        victim_page = sorted(pre.index)[len(pre.index) // 2]     # one of the 300 data pages
        with open("/proc/%d/mem" % p.pid, "r+b", buffering=0) as mem:
            os.pwrite(mem.fileno(), b"written after stop 1", victim_page)
        with U.Attachment(p.pid) as a:
            buf, index, runs = U.drop_present(a, regions, True, None, pre)
        assert 1 <= pre.recopied < 20
        got = bytes(buf[index[victim_page]:index[victim_page] + 20])
        assert got == b"written after stop 1"
        assert runs and pre.uffd is None
    finally:
        p.kill()
        p.wait()


def test_injection_leaves_the_stack_below_the_red_zone_as_it_was(victim):
    """The frame is written below the red zone and put back at restore: memory that a runtime
    might keep there (Go's small goroutine stacks) is unchanged once the injection is over."""
    p = start_victim(victim, "sleep", 60)
    try:
        gadgets = U.find_gadgets(p.pid)
        assert gadgets is not None                     # glibc has both
        U._seize_stop(p.pid)
        try:
            rsp = U.get_regs(p.pid).rsp
            with open("/proc/%d/mem" % p.pid, "rb", buffering=0) as mem:
                before = os.pread(mem.fileno(), 8192, rsp - 128 - 8192)
            inj = U.Injector(p.pid, gadgets=gadgets)
            assert inj.frame is not None and inj.frame[2] <= rsp - 128
            assert inj.syscall(U.NR_getpid) == p.pid
            inj.restore()
            with open("/proc/%d/mem" % p.pid, "rb", buffering=0) as mem:
                assert os.pread(mem.fileno(), 8192, rsp - 128 - 8192) == before
        finally:
            U.ptrace(U.PTRACE_DETACH, p.pid, 0, 0)
        p.send_signal(signal.SIGUSR2)
        out, _ = p.communicate(timeout=10)
        assert out.strip() == "ok" and p.returncode == 0
    finally:
        p.kill()
        p.wait()
