"""uffdtool watch against real processes and the real kernel (root, x86_64 for --pid/-- CMD)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import (LIBC_MMAP, TOOL, ScriptTarget, expect_error, needs_root, needs_uffd, run_tool,
                      start_tool, stop_tool, uffdtool)

PS = os.sysconf("SC_PAGE_SIZE")
x86_64 = pytest.mark.skipif(uffdtool.ARCH != "x86_64", reason="ptrace injection is x86_64 only")
pytestmark = [needs_uffd, needs_root]

# A child that allocates, writes a pattern, forks (the child maps and writes its own pages),
# mremaps (grow, moved), madvises (DONTNEED), munmaps and prints a checksum; the addresses go
# to stderr as one JSON line.
CHILD = LIBC_MMAP + r"""
import json, os
PS = 4096
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int,
                        ctypes.c_void_p]
n = 32
a = libc.mmap(None, n * PS, 3, 0x22, -1, 0)
guard = libc.mmap(ctypes.c_void_p(a + n * PS), PS, 0, 0x100022, -1, 0)   # forces a moving grow
for i in range(n):
    ctypes.memmove(a + i * PS, (b"%04d" % i) * 8, 32)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    b = libc.mmap(None, 4 * PS, 3, 0x22, -1, 0)
    for i in range(4):
        ctypes.memmove(b + i * PS, b"child", 5)
    os.write(w, b"%d" % b)
    os._exit(0 if ctypes.string_at(b + 3 * PS, 5) == b"child" else 1)
_, st = os.waitpid(pid, 0)
b = int(os.read(r, 64))
a2 = libc.mremap(ctypes.c_void_p(a), n * PS, 2 * n * PS, 1, None)
ctypes.memmove(a2 + (2 * n - 1) * PS, b"tail", 4)
libc.madvise(ctypes.c_void_p(a2 + 8 * PS), 8 * PS, 4)
h = hashlib.md5(ctypes.string_at(a2, 2 * n * PS)).hexdigest()
libc.munmap(ctypes.c_void_p(a2), 2 * n * PS)
print(json.dumps({"a": a, "a2": a2, "b": b, "n": n, "child": st}), file=sys.stderr)
print(h)
"""

# A long-running target for --pid: 'touch' writes the upper half (missing pages) and every
# other page of the lower half (present pages), 'sum' prints an md5, 'quit' exits.
TARGET = LIBC_MMAP + r"""
import threading
PS = 4096
n = 64
a = libc.mmap(None, n * PS, 3, 0x22, -1, 0)
for i in range(n // 2):
    ctypes.memmove(a + i * PS, (b"%04d" % i) * 8, 32)
nthreads = int(sys.argv[1]) if len(sys.argv) > 1 else 0
def worker(k):
    for i in range(k, n, nthreads):
        ctypes.memmove(a + i * PS + 200, b"w%03d" % k, 4)
print("0x%x" % a, flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "touch":
        if nthreads:
            ts = [threading.Thread(target=worker, args=(k,)) for k in range(nthreads)]
            [t.start() for t in ts]
            [t.join() for t in ts]
        else:
            for i in range(n // 2, n):
                ctypes.memmove(a + i * PS, b"new", 3)
            for i in range(0, n // 2, 2):
                ctypes.memmove(a + i * PS + 100, b"upd", 3)
        print("ok", flush=True)
    elif cmd == "sum":
        print(hashlib.md5(ctypes.string_at(a, n * PS)).hexdigest(), flush=True)
    elif cmd == "quit":
        break
"""


def records(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def by_event(recs, name):
    return [r for r in recs if r["event"] == name]


class Target(ScriptTarget):
    """A running TARGET process driven over stdin/stdout."""

    def __init__(self, *args):
        super().__init__(TARGET, *args)

    cmd = ScriptTarget.ask


@pytest.fixture
def target():
    t = Target()
    yield t
    t.close()


def expected_sum(*touches):
    t = Target()
    try:
        for _ in range(touches[0] if touches else 0):
            t.cmd("touch")
        return t.cmd("sum")
    finally:
        t.close()


def start_watch(*args):
    """'uffdtool watch --log TMPFILE --quiet ARGS', once its 'ready' record is written."""
    w = start_tool("watch", *args)
    return w, w.log


def stop_watch(w, log, sig=signal.SIGINT):
    """Signal the watch (None: just wait), return (records, stderr)."""
    return stop_tool(w, sig)


# ------------------------------------------------------------------------------------ --self

def test_self_every_event_type_in_one_run():
    r = run_tool("watch", "--self", "--size", "64K", "--json", "--quiet", timeout=30)
    assert r.returncode == 0, r.stderr
    recs = records(r.stdout)
    names = {x["event"] for x in recs}
    assert {"start", "ready", "pagefault", "fork", "remap", "remove", "unmap", "stats",
            "exit"} <= names
    stats = by_event(recs, "stats")[-1]
    work = stats["workload"]
    assert work["pattern_kept"] and work["zero_after_dontneed"] and work["grow_moved"]
    assert work["child_exit"] == 0 and work["parent_untouched_by_child"]
    faults = by_event(recs, "pagefault")
    assert all(f["ptid"] > 0 for f in faults)          # THREAD_ID granted
    fork = by_event(recs, "fork")[0]
    assert any(f["ufd"] == fork["ufd"] for f in faults)  # the child's writes, on its own uffd
    area = work["addresses"]["area"]
    assert by_event(recs, "remap")[0]["from"] == area
    assert stats["faults_missing"] == len(faults)
    assert {"p50", "p99", "max"} <= set(stats["latency_us"])


def test_self_human_lines_and_record(tmp_path):
    ws = tmp_path / "ws.txt"
    r = run_tool("watch", "--self", "--size", "32K", "--record", ws, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "pagefault" in r.stderr and "remap" in r.stderr and "stats" in r.stderr
    key, page_size, pages = uffdtool.read_working_set(str(ws))
    assert key == "address" and page_size == PS and len(pages) == len(set(pages)) >= 4
    assert pages[1] - pages[0] == PS                   # first-fault order: the read sweep


def test_self_events_choice():
    r = run_tool("watch", "--self", "--size", "64K", "--json", "--quiet", "--events",
                 "remap,unmap", timeout=30)
    assert r.returncode == 0, r.stderr
    recs = records(r.stdout)
    assert by_event(recs, "start")[0]["features"] == ["EVENT_REMAP", "EVENT_UNMAP", "THREAD_ID"]
    names = {x["event"] for x in recs}
    assert "remap" in names and "unmap" in names and not names & {"fork", "remove"}
    r = run_tool("watch", "--self", "--json", "--quiet", "--events", "none", timeout=30)
    assert r.returncode == 0
    assert not {x["event"] for x in records(r.stdout)} & {"fork", "remap", "remove", "unmap"}


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
def test_fork_events_need_cap_sys_ptrace_and_say_so():
    r = subprocess.run(["setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace",
                        sys.executable, TOOL, "watch", "--self", "--size", "64K", "--json",
                        "--quiet"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    recs = records(r.stdout)
    assert "CAP_SYS_PTRACE" in by_event(recs, "warning")[0]["message"]
    assert "EVENT_FORK" not in by_event(recs, "start")[0]["features"]
    assert not by_event(recs, "fork") and by_event(recs, "remap")


def test_self_readahead_fills_several_pages():
    r = run_tool("watch", "--self", "--size", "256K", "--readahead", "4", "--json", "--quiet",
                 timeout=30)
    assert r.returncode == 0, r.stderr
    assert max(f["pages"] for f in by_event(records(r.stdout), "pagefault")) == 4


# ----------------------------------------------------------------------------------- -- CMD

@x86_64
def test_cmd_checksum_unchanged_and_every_record(tmp_path):
    plain = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                           timeout=20)
    log = tmp_path / "log.json"
    r = run_tool("watch", "--quiet", "--log", log, "--", sys.executable, "-c", CHILD, timeout=40)
    assert r.returncode == 0, r.stderr
    assert r.stdout == plain.stdout                     # same checksum with and without watch
    info = json.loads(r.stderr.strip().splitlines()[-1])
    a, a2, b, n = info["a"], info["a2"], info["b"], info["n"]
    recs = records(log.read_text())
    faults = by_event(recs, "pagefault")
    addrs = {f["address"] for f in faults}
    assert {a + i * PS for i in range(n)} <= addrs      # the pattern writes
    fork = by_event(recs, "fork")[0]
    assert {f["address"] for f in faults if f["ufd"] == fork["ufd"]} >= {
        b + i * PS for i in range(4)}                    # the child's own new mapping
    assert {"from": a, "to": a2, "len": n * PS}.items() <= next(
        x for x in by_event(recs, "remap") if x["from"] == a).items()
    assert any(x["start"] == a2 + 8 * PS and x["end"] == a2 + 16 * PS
               for x in by_event(recs, "remove"))
    assert any(x["start"] == a2 and x["end"] == a2 + 2 * n * PS for x in by_event(recs, "unmap"))
    assert any(f["address"] == a2 + (2 * n - 1) * PS for f in faults)   # grown part
    assert by_event(recs, "exit")[0]["status"] == 0 and by_event(recs, "stats")


@x86_64
def test_cmd_exit_status_fork_and_signal():
    assert run_tool("watch", "-q", "--", "sh", "-c", "true; (exit 3); exit 7",
                    timeout=30).returncode == 7
    assert run_tool("watch", "-q", "--", "sh", "-c", "kill -9 $$", timeout=30).returncode == 137
    # waits for descendants too: the grandchild writes after its parent exited
    r = run_tool("watch", "-q", "--json", "--", "sh", "-c",
                 "(sleep 0.3; python3 -c 'bytearray(1<<20)'; echo late) & exit 0", timeout=30)
    assert r.returncode == 0 and "late" in r.stdout
    assert len(by_event(records(r.stdout), "exec")) >= 3


@x86_64
def test_cmd_multithreaded_and_readahead():
    code = ("import threading, mmap\n"
            "def w():\n"
            "    m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
            "    for i in range(0, 1 << 20, 4096): m[i] = 1\n"
            "ts = [threading.Thread(target=w) for _ in range(4)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]; print('done')")
    r = run_tool("watch", "--json", "--quiet", "--readahead", "16", "--", sys.executable, "-c",
                 code, timeout=40)
    assert r.returncode == 0 and "done" in r.stdout
    faults = by_event(records(r.stdout), "pagefault")
    assert len({f["ptid"] for f in faults}) >= 5        # main thread + 4 workers
    assert max(f["pages"] for f in faults) == 16


@x86_64
def test_cmd_sigint_ends_cmd_and_reports():
    w, log = start_watch("--", sys.executable, "-c", "import time; time.sleep(30)")
    time.sleep(0.5)
    t = time.monotonic()
    recs, err = stop_watch(w, log, signal.SIGINT)
    assert time.monotonic() - t < 8
    assert w.returncode == 128 + signal.SIGTERM         # CMD's status: ended with SIGTERM
    assert by_event(recs, "exit")[0]["reason"] == "interrupted" and by_event(recs, "stats")


@x86_64
def test_cmd_duration_and_group_stop():
    code = "import os, signal, time; os.kill(os.getpid(), signal.SIGSTOP); print('resumed')"
    w, log = start_watch("--", sys.executable, "-c", code)
    try:
        kid, state = None, None
        for _ in range(100):                            # until CMD has stopped itself
            time.sleep(0.05)
            kids = [int(p) for p in os.listdir("/proc") if p.isdigit() and
                    "PPid:\t%d\n" % w.pid in _status(p)]
            state = kids and _status(kids[0]).split("State:\t")[1][0]
            if state in ("t", "T"):
                kid = kids[0]
                break
        assert kid, state
        time.sleep(0.3)
        assert _status(kid).split("State:\t")[1][0] in "tT"    # stays stopped (LISTEN)
        os.kill(kid, signal.SIGCONT)
        out, _ = w.communicate(timeout=15)
        assert w.returncode == 0 and "resumed" in out
    finally:
        w.kill()
        w.wait()
    r = run_tool("watch", "-q", "--duration", "0.5", "--", "sleep", "20", timeout=20)
    assert r.returncode == 128 + signal.SIGTERM


def _status(pid):
    try:
        with open("/proc/%s/status" % pid) as f:
            return f.read()
    except OSError:
        return ""


# -------------------------------------------------------------------------------------- --pid

@x86_64
@pytest.mark.parametrize("mode", ["missing", "wp"])
def test_pid_attach_detach_checksums(target, mode):
    want = expected_sum(2)
    w, log = start_watch("--pid", target.pid, "--range", "0x%x:256K" % target.addr,
                           "--mode", mode)
    target.assert_running_untraced()
    assert target.cmd("touch") == "ok"
    recs, err = stop_watch(w, log)
    assert w.returncode == 0, err
    faults = by_event(recs, "pagefault")
    if mode == "missing":                               # the 32 pages never touched before
        assert {f["address"] for f in faults} == {target.addr + i * PS for i in range(32, 64)}
    else:                                               # + first writes to the 16 present ones
        seen = [((f["address"] - target.addr) // PS, f["flags"], f["resolved"]) for f in faults]
        assert sum("wp" in f["flags"] for f in faults) == 16, (seen, by_event(recs, "stats"))
        assert len(faults) == 48, seen
    stats = by_event(recs, "stats")[-1]
    assert 0 < stats["target_stopped_s"] < 1
    target.assert_running_untraced()
    assert target.cmd("touch") == "ok"                  # keeps running after detach
    assert target.cmd("sum") == want


@x86_64
def test_pid_dontneed_restores_every_page(target):
    want = expected_sum(0)
    w, log = start_watch("--pid", target.pid, "--all-anon", "--dontneed")
    recs, err = stop_watch(w, log, signal.SIGTERM)    # detach before anything faulted
    assert w.returncode == 0, err
    stats = by_event(recs, "stats")[-1]
    assert stats["snapshot_pages"] >= 32 and stats["drained_pages"] >= 32
    assert stats["reason"] == "interrupted"
    assert target.cmd("sum") == want
    want = expected_sum(1)
    w, log = start_watch("--pid", target.pid, "--range", "0x%x:256K" % target.addr,
                           "--dontneed")
    assert target.cmd("sum") == expected_sum(0)          # served from the snapshot
    target.cmd("touch")
    recs, err = stop_watch(w, log)
    assert len(by_event(recs, "pagefault")) == 64
    assert target.cmd("sum") == want


@x86_64
def test_pid_multithreaded_all_anon():
    t = Target("4")
    try:
        w, log = start_watch("--pid", t.pid, "--all-anon")
        assert t.cmd("touch") == "ok"
        recs, err = stop_watch(w, log)
        assert w.returncode == 0, err
        ptids = {f["ptid"] for f in by_event(recs, "pagefault")
                 if t.addr <= f["address"] < t.addr + 64 * PS}
        assert len(ptids) >= 2
        t.assert_running_untraced()
        assert len(t.cmd("sum")) == 32
    finally:
        t.close()


@x86_64
def test_pid_target_exits_mid_watch_and_duration(target):
    w, log = start_watch("--pid", target.pid, "--range", "0x%x:256K" % target.addr)
    target.cmd("touch")
    target.p.stdin.write("quit\n")
    target.p.stdin.flush()
    target.p.wait(5)
    recs, err = stop_watch(w, log, None)
    assert w.returncode == 0 and by_event(recs, "exit")[0]["reason"] == "done"
    t = Target()
    try:
        r = run_tool("watch", "--json", "-q", "--pid", t.pid, "--all-anon", "--duration", "0.3",
                     timeout=20)
        assert r.returncode == 0 and by_event(records(r.stdout), "exit")[0]["reason"] == "duration"
        t.assert_running_untraced()
    finally:
        t.close()


@x86_64
def test_pid_tool_sigkilled_target_keeps_data(target):
    want = expected_sum(1)
    w, log = start_watch("--pid", target.pid, "--all-anon", "--mode", "wp")
    w.kill()
    w.communicate(timeout=5)
    assert target.cmd("touch") == "ok"
    assert target.cmd("sum") == want
    target.assert_running_untraced()


# --------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,match", [
    ((), "exactly one TARGET"),
    (("--self", "--pid", "1"), "exactly one TARGET"),
    (("--size", "1M", "--", "true"), "--size goes with --self"),
    (("--self", "--events", "fork,bogus"), "unknown event"),
    (("--self", "--size", "12Q"), "bad size"),
    (("--", "/nonexistent/cmd"), "cannot run"),
], ids=["no-target", "two-targets", "size-without-self", "unknown-event", "bad-size",
        "cmd-not-found"])
def test_bad_usage_exit_2(args, match):
    expect_error("watch", *args, code=2, match=match)


def _python_mapping(pid):
    """A file mapping of the python binary in PID: mapped, but not private anonymous."""
    return next(m for m in uffdtool.read_maps(pid) if m.path.endswith(
        os.path.basename(os.path.realpath(sys.executable))) or "python" in m.path)


@x86_64
@pytest.mark.parametrize("args,match", [
    (lambda t: ("--pid", t.pid), "--range"),
    (lambda t: ("--pid", "4000000", "--all-anon"), "no such process"),
    (lambda t: ("--pid", t.pid, "--range", "0x1000:4K"), "not mapped"),
    (lambda t: ("--pid", t.pid, "--range", "0x%x:4K" % _python_mapping(t.pid).start),
     "not private anonymous"),
    (lambda t: ("--pid", t.pid, "--range", "0x%x:4K" % (t.addr + 1)), "page-aligned"),
], ids=["pid-without-range", "no-such-pid", "range-not-mapped", "range-not-anonymous",
        "range-not-aligned"])
def test_bad_pid_target_exit_2_target_untouched(target, args, match):
    expect_error("watch", *args(target), code=2, match=match)
    target.assert_running_untraced()


@x86_64
def test_refuses_traced_and_seccomp_targets(target):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        uffdtool.ptrace(uffdtool.PTRACE_SEIZE, sleeper.pid)
        expect_error("watch", "--pid", sleeper.pid, "--all-anon", code=3, match="already traced")
    finally:
        sleeper.kill()
        sleeper.wait()
    sec = subprocess.Popen([sys.executable, "-c",
                            "import sys; sys.path.insert(0, %r); import uffdtool, time\n"
                            "f, keep = uffdtool._bpf_watch_filter()\n"
                            "uffdtool.syscall('prctl', 38, 1, 0, 0, 0)\n"
                            "uffdtool._install_seccomp(f)\n"
                            "print('x', flush=True); time.sleep(30)" % os.path.dirname(TOOL)],
                           stdout=subprocess.PIPE, text=True)
    try:
        # its filter traps mmap with no tracer: the process is alive but must not be touched
        assert sec.stdout.readline().strip() == "x"
        expect_error("watch", "--pid", sec.pid, "--all-anon", code=3, match="seccomp")
    finally:
        sec.kill()
        sec.wait()
