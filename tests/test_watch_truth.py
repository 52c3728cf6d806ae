"""issue 10: watch tells the whole truth -- real multi-process workloads whose logs are checked
record by record (root, x86_64, the real kernel; gcc builds the C workload)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import (ScriptTarget, need_program, needs_root, needs_uffd, run_tool, start_tool,
                      stop_tool, uffdtool)

PS = os.sysconf("SC_PAGE_SIZE")
pytestmark = [needs_uffd, needs_root,
              pytest.mark.skipif(uffdtool.ARCH != "x86_64", reason="ptrace is x86_64 only")]

# The workload: every count below is what the program did, page by page.
#   A: N private pages written                                   -> N faults, pid = parent
#   fork: the child maps B (M pages), writes them, exits         -> M faults, pid = child
#   A grown by mremap (a guard page forces a move), tail written -> G faults at the new address
#   A2[0..D) MADV_DONTNEED, then written again                   -> D more faults (keeps watching)
#   S: MAP_SHARED|MAP_ANONYMOUS (shmem), S pages written          -> S faults, name [shmem]
#   vfork: the child writes V pages of the parent's V-buffer      -> V faults, pid = the vfork
#                                                                   child, mm_pid = parent
# It prints one JSON line with its addresses and pids.
WORKLOAD = r"""
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
enum { N = 64, M = 16, G = 8, D = 8, S = 32, V = 4 };
int main(void) {
    long ps = sysconf(_SC_PAGESIZE);
    char *a = mmap(NULL, N * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mmap(a + N * ps, ps, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
    char *v = mmap(NULL, V * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < N; i++) a[i * ps] = 1;
    int p[2];
    if (pipe(p)) return 2;
    pid_t child = fork();
    if (child == 0) {
        char *b = mmap(NULL, M * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        for (int i = 0; i < M; i++) b[i * ps] = 2;
        if (write(p[1], &b, sizeof b) != sizeof b) _exit(3);
        _exit(0);
    }
    char *b;
    if (read(p[0], &b, sizeof b) != sizeof b) return 2;
    int st;
    waitpid(child, &st, 0);
    char *a2 = mremap(a, N * ps, (N + G) * ps, MREMAP_MAYMOVE);
    for (int i = N; i < N + G; i++) a2[i * ps] = 3;
    madvise(a2, D * ps, MADV_DONTNEED);
    for (int i = 0; i < D; i++) a2[i * ps] = 4;
    char *s = mmap(NULL, S * ps, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < S; i++) s[i * ps] = 5;
    pid_t vk = vfork();
    if (vk == 0) {
        for (int i = 0; i < V; i++) v[i * ps] = 6;
        _exit(0);
    }
    int vst;
    waitpid(vk, &vst, 0);
    int ok = v[0] == 6 && a2[0] == 4 && a2[(N + G - 1) * ps] == 3 && s[0] == 5 && a2[D * ps] == 1;
    printf("{\"pid\":%d,\"child\":%d,\"vchild\":%d,\"a\":%lu,\"a2\":%lu,\"b\":%lu,\"s\":%lu,"
           "\"v\":%lu,\"N\":%d,\"M\":%d,\"G\":%d,\"D\":%d,\"S\":%d,\"V\":%d,\"ok\":%d,\"st\":%d}\n",
           getpid(), child, vk, (unsigned long)a, (unsigned long)a2, (unsigned long)b,
           (unsigned long)s, (unsigned long)v, N, M, G, D, S, V, ok, st);
    return ok && st == 0 && vst == 0 ? 0 : 1;
}
"""


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    gcc = need_program("gcc", "gcc")
    d = tmp_path_factory.mktemp("workload")
    src, exe = d / "workload.c", d / "workload"
    src.write_text(WORKLOAD)
    subprocess.run([gcc, "-O1", "-o", str(exe), str(src)], check=True)
    return str(exe)


def records(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def by_event(recs, name):
    return [r for r in recs if r["event"] == name]


def pages(start, n):
    return {start + i * PS for i in range(n)}


def faults_in(faults, lo, n):
    return [f for f in faults if lo <= f["address"] < lo + n * PS]


def placed(recs):
    """Check that every pagefault lies in a mapping that the last ``mappings`` record of its
    address space (``mm_pid`` for a vfork child, else ``pid``) listed before it; returns
    {pid: names seen}."""
    current, names = {}, {}
    for r in recs:
        if r["event"] == "mappings":
            current[r["pid"]] = r["mappings"]
            assert r["comm"]
        elif r["event"] == "pagefault":
            mm = r.get("mm_pid", r["pid"])
            m = next((m for m in current.get(mm, []) if m["start"] <= r["address"] <
                      m["start"] + m["len"]), None)
            assert m is not None, ("fault not placed by a mappings record", r)
            names.setdefault(r["pid"], set()).add(m["name"])
    return names


def test_multiprocess_workload_record_by_record(workload, tmp_path):
    ws = tmp_path / "ws.txt"
    r = run_tool("watch", "--json", "--quiet", "--record", ws, "--", workload, timeout=60)
    assert r.returncode == 0, r.stderr
    recs = records(r.stdout)                        # every stdout line is a JSON record
    info = json.loads(r.stderr.strip().splitlines()[-1])   # CMD's stdout went to stderr
    assert info["ok"] == 1
    parent, child, vchild = info["pid"], info["child"], info["vchild"]
    faults = by_event(recs, "pagefault")
    assert all(isinstance(f["pid"], int) and f["pid"] > 0 for f in faults)
    assert {f["pid"] for f in faults} == {parent, child, vchild}
    about_processes = [x for x in recs if x["event"] in (
        "pagefault", "fork", "remap", "remove", "unmap", "exec", "mappings", "gone")]
    assert all(isinstance(x.get("pid"), int) for x in about_processes)   # a pid on every one
    N, M, G, D, S, V = (info[k] for k in "NMGDSV")
    # A: N writes before the move; after it the tail (G) and the re-written DONTNEED pages (D)
    # (later mappings may reuse A's old addresses: split the log at the remap record)
    at = next(i for i, x in enumerate(recs) if x["event"] == "remap" and x["from"] == info["a"])
    before = by_event(recs[:at], "pagefault")
    faults_after = by_event(recs[at:], "pagefault")
    fa = faults_in(before, info["a"], N)
    assert sorted(f["address"] for f in fa) == sorted(pages(info["a"], N))
    assert all(f["pid"] == parent and f["flags"] == ["write"] for f in fa)
    fa2 = faults_in(faults_after, info["a2"], N + G)
    assert sorted(f["address"] for f in fa2) == sorted(pages(info["a2"], D) |
                                                       pages(info["a2"] + N * PS, G))
    assert all(f["pid"] == parent for f in fa2)
    # the fork child's own mapping: on the FORK event's uffd, with the child's pid
    fb = [f for f in faults_in(faults, info["b"], M) if f["pid"] == child]
    assert sorted(f["address"] for f in fb) == sorted(pages(info["b"], M))
    fork = by_event(recs, "fork")
    assert len(fork) == 1 and {f["ufd"] for f in fb} == {fork[0]["ufd"]}
    # shmem: registered, named, each page once
    fs = faults_in(faults_after, info["s"], S)
    assert sorted(f["address"] for f in fs) == sorted(pages(info["s"], S))
    # vfork child: its own pid, in the parent's address space
    fv = [f for f in faults_in(faults, info["v"], V) if f["pid"] != parent]
    assert sorted(f["address"] for f in fv) == sorted(pages(info["v"], V))
    assert all(f["pid"] == vchild and f["mm_pid"] == parent for f in fv)
    assert not [f for f in faults if f.get("mm_pid") not in (None, parent)]
    # events: the remap, the remove (default on-remove keeps watching), no FORK for vfork
    assert any(x["from"] == info["a"] and x["to"] == info["a2"] for x in by_event(recs, "remap"))
    rm = [x for x in by_event(recs, "remove") if x["start"] == info["a2"]]
    assert rm and rm[0]["end"] == info["a2"] + D * PS and rm[0]["policy"] == "zero"
    # every fault is placed by a mappings record, with names
    names = placed(recs)
    assert "[shmem]" in names[parent] and "[anon]" in names[parent]
    first = next(x for x in recs if x.get("pid") == parent)       # ready, then exec
    assert first["comm"] == "workload"
    assert next(x for x in by_event(recs, "exec") if x["pid"] == parent)["comm"] == "workload"
    stats = by_event(recs, "stats")[-1]
    assert stats["faults_missing"] == len(faults)
    # one working set per address space: FILE = the first (parent), FILE.PID for the child
    key, _, parent_pages = uffdtool.read_working_set(str(ws))
    assert "pid=%d" % parent in ws.read_text().split("\n")[0]
    assert set(parent_pages) == {f["address"] for f in faults if f.get("mm_pid", f["pid"]) ==
                                 parent}
    _, _, child_pages = uffdtool.read_working_set("%s.%d" % (ws, child))
    assert set(child_pages) == {f["address"] for f in faults if f["pid"] == child}
    assert not os.path.exists("%s.%d" % (ws, vchild))        # no address space of its own


def test_shell_pipeline_every_record_attributed(tmp_path):
    log = tmp_path / "log.jsonl"
    r = run_tool("watch", "--quiet", "--log", log, "--", "sh", "-c",
                 "seq 1 3000 | sort -rn | head -1", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3000"           # not --json: CMD keeps the tool's stdout
    recs = records(log.read_text())
    execs = by_event(recs, "exec")
    comms = {x["comm"] for x in execs}
    assert {"sh", "seq", "sort", "head"} <= comms, comms
    faults = by_event(recs, "pagefault")
    exec_pids = {x["pid"] for x in execs}
    assert faults and {f["pid"] for f in faults} <= exec_pids | {f["pid"] for f in faults
                                                                 if "mm_pid" in f}
    assert {f["pid"] for f in faults} >= {x["pid"] for x in execs if x["comm"] == "sort"}
    placed(recs)


def test_json_stdout_carries_only_records():
    r = run_tool("watch", "--json", "--", "sh", "-c", "echo hello; echo world >&2", timeout=30)
    assert r.returncode == 0, r.stderr
    recs = records(r.stdout)                    # json.loads of every line: no "hello" there
    assert by_event(recs, "exit")
    assert "hello" in r.stderr and "world" in r.stderr
    warn = [x for x in by_event(recs, "warning") if "standard output" in x["message"]]
    assert len(warn) == 1                       # said once


def test_default_keeps_watching_after_dontneed(tmp_path):
    code = r"""
#include <sys/mman.h>
#include <stdio.h>
int main(void) {
    char *a = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int k = 0; k < 3; k++) {
        for (int i = 0; i < (1 << 20); i += 4096) a[i] = 1;
        madvise(a, 1 << 20, MADV_DONTNEED);
    }
    printf("%lu\n", (unsigned long)a);
    return 0;
}
"""
    src, exe = tmp_path / "dn.c", tmp_path / "dn"
    src.write_text(code)
    subprocess.run([need_program("gcc", "gcc"), "-O1", "-o", str(exe), str(src)], check=True)
    counts = {}
    for policy in (None, "unregister"):
        log = tmp_path / ("log-%s.jsonl" % policy)
        extra = ["--on-remove", policy] if policy else []
        r = run_tool("watch", "--quiet", "--log", log, *extra, "--", str(exe), timeout=30)
        assert r.returncode == 0, r.stderr
        a = int(r.stdout)
        counts[policy] = len(faults_in(by_event(records(log.read_text()), "pagefault"), a, 256))
    assert counts == {None: 3 * 256, "unregister": 256}


SHM = r"""
import mmap, os
n = %d
m = mmap.mmap(-1, n * 4096)                  # MAP_SHARED|MAP_ANONYMOUS: shmem
pid = os.fork()
if pid == 0:
    for i in range(n):
        m[i * 4096] = (i %% 250) + 1
    os._exit(0)
os.waitpid(pid, 0)
ok = all(m[i * 4096] == (i %% 250) + 1 for i in range(n))
print("ok" if ok else "BAD")
"""


def test_shared_anonymous_memory_is_watched_and_shared():
    n = 1024
    r = run_tool("watch", "--json", "--quiet", "--", sys.executable, "-c", SHM % n, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "ok"             # the child's writes reached the parent
    recs = records(r.stdout)
    shm = [m for x in by_event(recs, "mappings") for m in x["mappings"]
           if m["name"] == "[shmem]" and m["len"] == n * PS]
    assert shm, "no [shmem] mapping of %d pages logged" % n
    faults = faults_in(by_event(recs, "pagefault"), shm[0]["start"], n)
    assert len({f["address"] for f in faults}) == n     # every page, once per page
    child = {f["pid"] for f in faults}
    assert len(child) == 1 and child != {by_event(recs, "exec")[0]["pid"]}   # the child wrote


def test_cmd_that_calls_ptrace_is_one_clear_line():
    strace = need_program("strace", "strace")
    r = run_tool("watch", "--quiet", "--", strace, "-o", os.devnull, "true", timeout=30)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "calls ptrace" in lines[0] and "Traceback" not in r.stderr


def test_human_lines_have_no_python_syntax():
    r = run_tool("watch", "--", "sh", "-c", "true", timeout=30)
    assert r.returncode == 0
    assert "None" not in r.stderr and "['" not in r.stderr and "pagefault" in r.stderr
    line = next(x for x in r.stderr.splitlines() if " pagefault " in x)
    assert "/sh" in line.split("pid=")[1].split()[0]          # pid=N/sh: the command name
    rec = {"t": 1.0, "event": "start", "pid": None, "cmd": ["sh", "-c", "echo hi"], "ok": True,
           "lat": {}, "x": [1, 2]}
    assert uffdtool.format_human(rec).split(None, 2)[2] == \
        "cmd=\"sh -c 'echo hi'\" ok=yes lat={} x=1,2"


@pytest.mark.parametrize("command", [["watch"], ["serve-file", "--zero"]])
def test_size_too_large_is_one_line(command):
    r = run_tool(*command, "--quiet", "--self", "--size", "100T", timeout=30)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "Errno" not in r.stderr
    assert "--size 100T: cannot map" in r.stderr


PID_TARGET = r"""
import mmap, sys
a = mmap.mmap(-1, 16 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
a[0] = 1
import ctypes
print("0x%x" % ctypes.addressof(ctypes.c_char.from_buffer(a)), flush=True)
maps = []
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "map":                        # a private and a shared mapping, untouched
        p = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        s = mmap.mmap(-1, 32 * 4096)
        maps += [p, s]
        print("0x%x 0x%x" % tuple(ctypes.addressof(ctypes.c_char.from_buffer(m))
                                  for m in (p, s)), flush=True)
    elif cmd[0] == "touch":
        for m in maps:
            for i in range(0, len(m), 4096):
                m[i] = 7
        print("ok", flush=True)
    elif cmd[0] == "write":                    # the first write to present pages: WP faults
        for i in range(16):
            a[i * 4096 + 1] = 9
        print("ok", flush=True)
"""


def _wait_log(p, pred, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = p.records()
        if pred(recs):
            return recs
        time.sleep(0.02)
    raise AssertionError("the log never showed it")


def test_pid_all_anon_follows_new_mappings():
    t = ScriptTarget(PID_TARGET)
    try:
        w = start_tool("watch", "--pid", t.pid, "--all-anon")
        priv, shared = (int(x, 16) for x in t.ask("map").split())

        def covered(recs):
            maps = [m for x in by_event(recs, "mappings") for m in x["mappings"]]
            return all(any(m["start"] <= a < m["start"] + m["len"] for m in maps)
                       for a in (priv, shared))
        recs = _wait_log(w, covered)           # registered without stopping the target
        names = {m["name"] for x in by_event(recs, "mappings") for m in x["mappings"]
                 if m["start"] <= shared < m["start"] + m["len"]}
        assert names == {"[shmem]"}
        assert t.ask("touch") == "ok"
        recs, err = stop_tool(w)
        assert w.returncode == 0, err
        faults = by_event(recs, "pagefault")
        assert len(faults_in(faults, priv, 64)) == 64 and len(faults_in(faults, shared, 32)) == 32
        assert all(f["pid"] == t.pid for f in faults)
        assert by_event(recs, "stats")[-1]["followed_mappings"] >= 2
        t.assert_running_untraced()
        assert t.ask("touch") == "ok"           # after detach: runs on with its memory
    finally:
        t.close()


def test_wp_faults_are_in_the_working_set(tmp_path):
    t = ScriptTarget(PID_TARGET)
    ws = tmp_path / "ws.txt"
    try:
        w = start_tool("watch", "--pid", t.pid, "--range", "0x%x:64K" % t.addr, "--mode", "wp",
                       "--record", ws)
        assert t.ask("write") == "ok"
        recs, err = stop_tool(w, signal.SIGTERM)
        assert w.returncode == 0, err
        wp = {f["address"] for f in by_event(recs, "pagefault") if "wp" in f["flags"]}
        missing = {f["address"] for f in by_event(recs, "pagefault") if "wp" not in f["flags"]}
        assert t.addr in wp                     # page 0 was present: a WP fault
        _, _, listed = uffdtool.read_working_set(str(ws))
        assert set(listed) == wp | missing == pages(t.addr, 16)
    finally:
        t.close()


def test_idle_cmd_costs_no_cpu(tmp_path):
    """While CMD sleeps after an mmap (the tracer's call_soon woke the handler), the fast loop
    sleeps too: a stale wake-up used to make every poll return at once (200,000 polls and the
    whole sleep's worth of CPU time)."""
    log = tmp_path / "log.jsonl"
    code = ("import mmap, time\n"
            "m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
            "m[0] = 1\n"
            "time.sleep(0.5)\n")
    r = run_tool("watch", "--quiet", "--log", log, "--", sys.executable, "-c", code, timeout=30)
    assert r.returncode == 0, r.stderr
    stats = by_event(records(log.read_text()), "stats")[-1]
    assert stats.get("waits", 0) < 1000, stats


def test_threads_faults_carry_their_process():
    code = ("import threading, mmap\n"
            "def w():\n"
            "    m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
            "    for i in range(0, 1 << 20, 4096): m[i] = 1\n"
            "ts = [threading.Thread(target=w) for _ in range(4)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n")
    r = run_tool("watch", "--json", "--quiet", "--", sys.executable, "-c", code, timeout=60)
    assert r.returncode == 0, r.stderr
    recs = records(r.stdout)
    faults = by_event(recs, "pagefault")
    python = by_event(recs, "exec")[0]["pid"]
    assert len({f["ptid"] for f in faults}) >= 5            # main thread + 4 workers
    assert {f["pid"] for f in faults} == {python}            # ptid -> tgid, not the tid
    assert not [f for f in faults if "mm_pid" in f]
    names = placed(recs)
    assert "[thread-stack]" in names[python]                # their stacks: mmap(MAP_STACK)


def test_fast_loop_records_match_the_general_path(tmp_path):
    """watch --quiet --log writes pagefault records from the fast loop's own formatter
    (``PF_LINE``); without --quiet (human lines too) they come from the general path.  The
    same program gives records with the same fields, of the same types, in both."""
    prog = ("import mmap\n"
            "m = mmap.mmap(-1, 64 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)\n"
            "for i in range(0, 64 * 4096, 4096): m[i] = 1\n")
    shapes = {}
    for how in ("fast", "general"):
        log = tmp_path / ("%s.jsonl" % how)
        quiet = ["--quiet"] if how == "fast" else []
        r = run_tool("watch", *quiet, "--log", log, "--", sys.executable, "-c", prog,
                     timeout=60)
        assert r.returncode == 0, r.stderr
        faults = [json.loads(x) for x in open(log) if '"event":"pagefault"' in x]
        assert len(faults) >= 64
        shapes[how] = {tuple(sorted((k, type(v).__name__) for k, v in f.items()))
                       for f in faults if "mm_pid" not in f}
    assert shapes["fast"] == shapes["general"], shapes
