"""serve-file --firecracker-socket PATH --peers N: one handler daemon, one worker process per
peer, against the real kernel: 32 concurrent C touchers through one socket, Python peers
(tests/fc_client.py) that pause mid-restore so that the test can kill them, their workers or
the daemon at a point they control, and the records every peer gets."""
import ctypes
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import uffdtool as u
from conftest import Tool, needs_root, needs_uffd, run_tool
from test_fc_hostile import (NOBODY, _assert_one_refusal, _intruder_is_refused,  # noqa: F401
                             _peer, _records_of, _shared_files, _tool, _verified, shared_dir)
from test_serve import uffd_bench  # noqa: F401  (the C toucher fixture)
from test_url import SIZE as URL_SIZE, chunk_gets, ngx  # noqa: F401  (nginx on 127.0.0.1)

pytestmark = needs_uffd
PS = u.PAGE_SIZE
HERE = os.path.dirname(os.path.abspath(__file__))
SIZES = (48 * PS, 16 * PS)                    # a Python peer's two regions (64 pages)
LONG = 600                                    # 2 shared cores: generous, never asserted


@pytest.fixture
def daemons():
    started = []
    yield started
    for t in started:
        t.kill()


@pytest.fixture
def peers():
    started = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait(10)


@pytest.fixture
def src(tmp_path):
    data = random.Random(13).randbytes(sum(SIZES))
    path = tmp_path / "mem.bin"
    path.write_bytes(data)
    return str(path)


def daemon(daemons, tmp_path, *args):
    """serve-file --firecracker-socket TMP/uffd.sock (``.sock``) ARGS as a conftest Tool, its
    log in TMP/log.jsonl, per-fault records off (the fast loop), no human lines (an unread
    stderr pipe would stall 32 workers)."""
    sock = str(tmp_path / "uffd.sock")
    t = Tool("serve-file", *args, "--no-fault-log", "--firecracker-socket", sock,
             log=tmp_path / "log.jsonl", wait=False)
    t.sock = sock
    daemons.append(t)
    t.wait_ready(timeout=60)
    return t


def python_peer(peers, sock, src, pause_after=0):
    """A Firecracker-like peer in its own process (tests/fc_client.py); returns once its
    handshake is sent (and, with ``pause_after``, once it has read that many pages and
    paused)."""
    argv = [sys.executable, os.path.join(HERE, "fc_client.py"), "--socket", sock, "--src", src,
            "--sizes", ",".join(map(str, SIZES))]
    if pause_after:
        argv += ["--touch-first", str(pause_after)]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    peers.append(p)
    assert p.stdout.readline().startswith("sent")
    if pause_after:
        assert p.stdout.readline().strip() == "touched"
    return p


def go(p):
    """Let a paused peer read and verify all its memory: its answer ('ok' or 'bad N')."""
    p.stdin.write("go\n")
    p.stdin.flush()
    line = p.stdout.readline().strip()
    p.wait(LONG)
    return line


def wait_for(t, event, n=1, timeout=LONG):
    deadline = time.monotonic() + timeout
    while len(t.events(event)) < n:
        assert time.monotonic() < deadline, "fewer than %d %s records" % (n, event)
        assert t.p.poll() is None or len(t.events(event)) >= n, t.communicate()
        time.sleep(0.02)
    return t.events(event)


def pending(pid):
    """The signals pending for process ``pid`` (a mask, bit N-1 = signal N)."""
    st = dict(line.split(":", 1) for line in open("/proc/%d/status" % pid))
    return int(st["ShdPnd"], 16) | int(st["SigPnd"], 16)


def by_peer(t, event):
    return {r["peer"]: r for r in t.events(event)}


def test_32_c_touchers_through_one_socket(tmp_path, daemons, uffd_bench):  # noqa: F811
    """32 concurrent peers (the shared C toucher: 32 MiB each, 2 regions, random order): each
    verifies every page of its memory against the file; one peer-done each, all records of
    a peer carry its pid, every log line is one whole record, the totals add up."""
    n, mib = 32, 32
    src = tmp_path / "src.bin"
    src.write_bytes(random.Random(32).randbytes(mib << 20))
    t = daemon(daemons, tmp_path, "--file", src, "--peers", n)
    touchers = [subprocess.Popen([uffd_bench, "--fc-socket", t.sock, "--src", str(src),
                                  "-s", str(mib), "-o", "rand", "--regions", "2",
                                  "--seed", str(i), "--timeout", str(LONG)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(n)]
    try:
        results = [p.communicate(timeout=LONG) + (p.returncode, p.pid) for p in touchers]
    finally:
        for p in touchers:
            p.kill()
    for out, err, code, _ in results:
        assert code == 0, out + err
        assert json.loads(out)["verify"] == "ok"
    assert t.finish(timeout=LONG) == 0, t.stderr
    with open(t.log) as f:
        lines = f.read().split("\n")
    assert lines[-1] == "" and all(json.loads(line) for line in lines[:-1])
    pids = {pid for *_, pid in results}
    done = by_peer(t, "peer-done")
    assert set(done) == pids and not t.events("peer-failed")
    pages = (mib << 20) // PS
    for r in done.values():
        assert r["pages_copy"] == pages and r["status"] == 0
        assert r["pss_anon_kib"] > 0 and r["worker"] not in pids
    parent = {"start", "ready", "peer-accepted", "stats", "exit"}
    for r in t.records():
        if "peer" not in r:
            assert r["event"] in parent, r
        else:
            assert r["peer"] in pids
    assert {r["peer"] for r in t.records() if r["event"] == "handshake"} == pids
    final = t.stats()
    assert "peer" not in final and final["pages_copy"] == n * pages
    assert sorted(final["peers_served"]) == sorted(pids)
    assert final["peers_failed"] == [] and final["peers_running"] == []
    assert t.events("exit")[-1] == dict(t.events("exit")[-1], reason="peers done", status=0)
    assert not os.path.exists(t.sock)


def test_peer_killed_mid_restore_leaves_the_others(tmp_path, daemons, peers, src):
    """Three peers each read 8 pages and pause; one is SIGKILLed there.  Its worker ends
    (peer-done: the peer is gone, nothing more to serve), the two others go on and get every
    page right; exit 0."""
    t = daemon(daemons, tmp_path, "--file", src, "--peers", 3)
    a, b, c = (python_peer(peers, t.sock, src, pause_after=8) for _ in range(3))
    a.kill()
    a.wait(LONG)
    done = wait_for(t, "peer-done")
    assert done[0]["peer"] == a.pid and done[0]["reason"] in ("peer exited",
                                                              "peer closed the socket")
    assert go(b) == "ok" and go(c) == "ok"
    assert t.finish(timeout=LONG) == 0, t.stderr
    done = by_peer(t, "peer-done")
    assert set(done) == {a.pid, b.pid, c.pid} and not t.events("peer-failed")
    assert done[b.pid]["pages_copy"] == done[c.pid]["pages_copy"] == 64
    assert sorted(t.stats()["peers_served"]) == sorted([a.pid, b.pid, c.pid])


def test_sigterm_drains_every_running_peer(tmp_path, daemons, peers, src):
    """--peers 0 with three peers paused mid-restore: SIGTERM stops accepting, every worker
    installs the rest of its peer's memory and unregisters, the daemon exits 0; afterwards
    each peer reads all its memory with no handler left (a missing page would hang it)."""
    t = daemon(daemons, tmp_path, "--file", src, "--peers", 0)
    ps = [python_peer(peers, t.sock, src, pause_after=8) for _ in range(3)]
    t.p.send_signal(signal.SIGTERM)
    assert t.finish(timeout=LONG) == 0, t.stderr
    assert not os.path.exists(t.sock)
    done = by_peer(t, "peer-done")
    assert set(done) == {p.pid for p in ps}
    for r in done.values():
        assert r["reason"] == "interrupted" and r["drained_pages"] == 64 - 8
    assert [go(p) for p in ps] == ["ok"] * 3
    final = t.stats()
    assert final["reason"] == "interrupted" and final["peers_running"] == []
    assert final["drained_pages"] == 3 * 56 and len(final["peers_served"]) == 3
    assert "Traceback" not in t.stderr


def test_stop_after_the_peer_died_unnoticed(tmp_path, daemons, peers, src):
    """SIGTERM reaches a worker whose peer died a moment before (the worker is stopped, so it
    cannot notice first): the drain finds the peer's memory gone and ends cleanly (it used to
    unregister on the dropped uffd: 'detach failed', exit 1)."""
    t = daemon(daemons, tmp_path, "--file", src, "--peers", 0)
    a = python_peer(peers, t.sock, src, pause_after=8)
    worker = by_peer(t, "peer-accepted")[a.pid]["worker"]
    os.kill(worker, signal.SIGSTOP)
    try:
        a.kill()
        a.wait(LONG)
        t.p.send_signal(signal.SIGTERM)        # forwarded to the stopped worker: pending
        deadline = time.monotonic() + LONG
        while not pending(worker) & (1 << (signal.SIGTERM - 1)):
            assert time.monotonic() < deadline, "SIGTERM never forwarded"
            time.sleep(0.01)
    finally:
        os.kill(worker, signal.SIGCONT)
    assert t.finish(timeout=LONG) == 0, t.stderr
    (done,) = t.events("peer-done")
    assert done["peer"] == a.pid and done["reason"] == "interrupted"
    assert not t.events("error") and not t.events("peer-failed")


def test_peers_0_keeps_accepting_until_sigint(tmp_path, daemons, peers, src):
    """--peers 0: peer after peer, each served to the end while the socket stays; SIGINT
    with nobody connected ends it: exit 0, peers_served lists them all."""
    t = daemon(daemons, tmp_path, "--file", src, "--peers", 0, "--stats-interval", "0.2")
    served = []
    for i in range(4):
        p = python_peer(peers, t.sock, src)
        assert go(p) == "ok"
        served.append(p.pid)
        wait_for(t, "peer-done", i + 1)
        assert os.path.exists(t.sock)
    t.p.send_signal(signal.SIGINT)
    assert t.finish(timeout=LONG) == 0, t.stderr
    assert sorted(t.stats()["peers_served"]) == sorted(served)
    assert t.stats()["pages_copy"] == 4 * 64
    periodic = [r for r in t.events("stats")[:-1] if "peer" not in r]      # the daemon's
    assert periodic and any(r["peers_served"] for r in periodic)


def test_worker_crash_is_peer_failed_and_others_are_served(tmp_path, daemons, peers, src):
    """A worker dies (SIGKILL) while its peer is paused mid-restore: peer-failed with the
    reason, --kill-peer-on-error SIGKILLs that peer (nobody serves its memory any more), the
    other peers are served to the end; exit 1 because a peer failed."""
    t = daemon(daemons, tmp_path, "--file", src, "--peers", 3, "--kill-peer-on-error")
    a, b, c = (python_peer(peers, t.sock, src, pause_after=8) for _ in range(3))
    worker = by_peer(t, "peer-accepted")[a.pid]["worker"]
    os.kill(worker, signal.SIGKILL)
    assert a.wait(LONG) == -signal.SIGKILL
    failed = wait_for(t, "peer-failed")
    assert failed[0]["peer"] == a.pid and failed[0]["worker"] == worker
    assert "killed by signal SIGKILL" in failed[0]["reason"]
    assert t.events("killed_peer")[0]["peer"] == a.pid
    assert go(b) == "ok" and go(c) == "ok"
    assert t.finish(timeout=LONG) == 1
    final = t.stats()
    assert final["peers_failed"] == [a.pid]
    assert sorted(final["peers_served"]) == sorted([b.pid, c.pid])
    assert t.events("exit")[-1]["status"] == 1 and "Traceback" not in t.stderr


def test_source_change_fails_every_peer(tmp_path, daemons, peers, src):
    """The source file is written to while two peers are paused mid-restore: each worker sees
    it (each watches the file itself: an inotify fd shared with the parent would wake only
    one), fails and, with --kill-peer-on-error, kills its peer before it reads another page;
    exit 1."""
    t = daemon(daemons, tmp_path, "--file", src, "--peers", 2, "--kill-peer-on-error")
    a, b = (python_peer(peers, t.sock, src, pause_after=8) for _ in range(2))
    with open(src, "r+b") as f:
        f.seek(40 * PS)
        f.write(b"changed")
    for p in (a, b):                        # each worker sees it without another fault
        assert p.wait(LONG) == -signal.SIGKILL
    assert t.finish(timeout=LONG) == 1
    failed = by_peer(t, "peer-failed")
    assert set(failed) == {a.pid, b.pid} and not t.events("peer-done")
    assert all("changed while serving" in r["reason"] for r in failed.values())


def test_failed_handshake_is_peer_failed(tmp_path, daemons, peers, src):
    """A peer whose handshake is refused (no fd) fails alone: peer-failed with the message,
    the next peer is served, exit 1."""
    t = daemon(daemons, tmp_path, "--file", src, "--peers", 2)
    sys.path.insert(0, HERE)
    from fc_client import FcClient
    bad = FcClient([64 * PS])
    try:
        bad.connect(t.sock)
        bad.send(fds=[])
        failed = wait_for(t, "peer-failed")
        assert failed[0]["peer"] == os.getpid() and "fds" in failed[0]["reason"]
    finally:
        bad.close()
    assert go(python_peer(peers, t.sock, src)) == "ok"
    assert t.finish(timeout=LONG) == 1
    assert len(t.events("peer-done")) == 1 and t.stats()["peers_failed"] == [os.getpid()]


def test_sigterm_does_not_wait_for_a_silent_peer(tmp_path, daemons, peers, src):
    """A peer that connected but sent nothing (no memory handed over) does not hold up a stop:
    SIGTERM, and the daemon exits 0 while a served peer is drained as usual."""
    t = daemon(daemons, tmp_path, "--file", src, "--peers", 0)
    served = python_peer(peers, t.sock, src, pause_after=8)
    sys.path.insert(0, HERE)
    from fc_client import FcClient
    silent = FcClient([64 * PS])
    try:
        silent.connect(t.sock)
        wait_for(t, "peer-accepted", 2)
        t.p.send_signal(signal.SIGTERM)
        assert t.finish(timeout=LONG) == 0, t.stderr
    finally:
        silent.close()
    done = by_peer(t, "peer-done")
    assert done[served.pid]["drained_pages"] == 56 and done[os.getpid()]["faults"] == 0
    assert go(served) == "ok"


def test_record_one_file_per_peer_and_no_third_peer(tmp_path, daemons, peers, src):
    """--peers 2 --record FILE: FILE.PID per peer (FILE: the first peer's set); after two
    peers the socket is gone, so a third VM fails at connect instead of hanging."""
    rec = tmp_path / "ws.txt"
    t = daemon(daemons, tmp_path, "--file", src, "--peers", 2, "--record", rec)
    p1 = python_peer(peers, t.sock, src, pause_after=4)
    p2 = python_peer(peers, t.sock, src, pause_after=2)
    assert not os.path.exists(t.sock)
    assert go(p1) == "ok" and go(p2) == "ok"
    assert t.finish(timeout=LONG) == 0, t.stderr
    sets = {}
    for p in (p1, p2):
        _, ps, pages = u.read_working_set(str(rec) + ".%d" % p.pid)
        assert ps == PS and sorted(pages) == list(range(0, 64 * PS, PS))
        sets[p.pid] = pages
    first = t.events("peer-accepted")[0]["peer"]
    assert u.read_working_set(str(rec))[2] == sets[first]
    assert {r["peer"]: r["recorded_pages"] for r in t.events("peer-done")} == {
        p1.pid: 64, p2.pid: 64}


@pytest.mark.parametrize("argv,words", [
    (["--zero", "--self", "--peers", "2"], "--peers goes with --firecracker-socket"),
    (["--zero", "--firecracker-socket", "/tmp/x.sock", "--peers", "-1"], "0 or more"),
    (["--zero", "--firecracker-socket", "/tmp/x.sock", "--peers", "two"], "whole number"),
])
def test_peers_usage_errors(argv, words):
    r = run_tool("serve-file", *argv)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr


@needs_root
def test_refused_uid_is_not_a_peer(shared_dir):  # noqa: F811
    """The daemon (as uid 65534) refuses a peer of another uid (root, this test) with one
    warning, counts it nowhere, and serves the two right peers (user-mode-only uffds)."""
    log, sock, src_path = _shared_files(shared_dir, random.Random(4).randbytes(16 * PS))
    t = _tool(log, "--file", src_path, "--firecracker-socket", sock, "--peers", 2,
              "--accept-timeout", 60, uid=NOBODY)
    try:
        _intruder_is_refused(sock)
        good = [_peer(sock, src_path, 16 * PS, uid=NOBODY) for _ in range(2)]
        assert [_verified(p) for p in good] == ["ok", "ok"]
        out, err = t.communicate(timeout=60)
    finally:
        t.kill()
    assert t.returncode == 0, err
    recs = _records_of(log)
    _assert_one_refusal(recs)
    assert sorted(r["peer"] for r in recs if r["event"] == "peer-accepted") == sorted(
        p.pid for p in good)
    assert sorted(recs[-2]["peers_served"]) == sorted(p.pid for p in good)


def test_url_source_shared_through_the_cache(ngx, tmp_path, daemons):  # noqa: F811
    """--url --cache with --peers 2: the parent checks the URL, each worker opens its own
    source (fetcher threads do not survive a fork) on the one cache: both peers get every
    page of the object, and every chunk is fetched from the server once."""
    cache = str(tmp_path / "cache")
    t = daemon(daemons, tmp_path, "--url", ngx.url("mem.bin"), "--cache", cache, "--chunk",
               "256K", "--peers", 2)
    sys.path.insert(0, HERE)
    from fc_client import FcClient
    clients = [FcClient([URL_SIZE]) for _ in range(2)]
    bad = []
    try:
        for c in clients:
            c.handshake(t.sock)
        ts = [threading.Thread(target=lambda c=c: bad.append(c.mismatches(0, ngx.data)))
              for c in clients]
        for th in ts:
            th.start()
        for th in ts:
            th.join(LONG)
    finally:
        for c in clients:
            c.close()
    assert bad == [[], []]
    assert t.finish(timeout=LONG) == 0, t.stderr
    assert len(t.events("peer-done")) == 2
    ranges = [r[1] for r in chunk_gets(ngx)]
    assert sorted(ranges) == sorted(set(ranges)) and len(ranges) == URL_SIZE // (256 << 10)


def _rss_after_fork(addr):
    """The Rss (bytes) of the mapping at ``addr`` in a child forked now, before it touches it:
    the page table entries fork copied."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        rss, inside = -1, False
        with open("/proc/self/smaps") as f:
            for line in f:
                if "-" in line.split()[0] and not line.split()[0].endswith(":"):
                    inside = int(line.split("-")[0], 16) == addr
                elif inside and line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                    break
        os.write(w, b"%d" % rss)
        os._exit(0)
    os.close(w)
    got = int(os.read(r, 64))
    os.close(r)
    os.waitpid(pid, 0)
    return got


@pytest.mark.parametrize("hole", [0, 16 * PS], ids=["dense", "hole-first"])
def test_fork_copies_the_source_page_tables(tmp_path, hole):
    """A worker forked after FileSource.before_fork has the source's page table entries (the
    kernel copies them only for a mapping with an anonymous page), so it need not map 256
    pages again before its first fault; the data is unchanged, page by page, and the file
    keeps its hole."""
    data = random.Random(5).randbytes(256 * PS)
    path = tmp_path / "src.bin"
    with open(path, "wb") as f:
        f.truncate(hole + len(data))
        f.seek(hole)
        f.write(data)
    s = u.FileSource(str(path))
    try:
        assert _rss_after_fork(s._map) == 0           # the kernel's default: not copied
        s.before_fork()
        assert _rss_after_fork(s._map) >= len(data)
        for p in range(0, hole + len(data), PS):
            want = data[p - hole:p - hole + PS] if p >= hole else bytes(PS)
            assert ctypes.string_at(s.base + p, PS) == want, "page %d" % (p // PS)
        if hole:
            assert u.file_holes(s._fd, 0, hole + len(data)) == [(0, hole)]
    finally:
        s.close()
