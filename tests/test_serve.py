"""serve-file against the real kernel: the Firecracker handshake (tests/fc_client.py plays
Firecracker), sources, policies, record/prefetch, --self, the C toucher, and every bad input."""
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import uffdtool as u
from conftest import ROOT, Tool, check_error, needs_root, needs_uffd, run_tool
from fc_client import FcClient

pytestmark = needs_uffd
PS = u.PAGE_SIZE
HERE = os.path.dirname(os.path.abspath(__file__))


def start(tools, tmp_path, *args, wait=True, fault_log=False):
    """serve-file as a conftest Tool, its JSON log in TMP_PATH/log.jsonl, listening on
    TMP_PATH/uffd.sock (``.sock``) unless ARGS name another target."""
    sock = str(tmp_path / "uffd.sock")
    args = [str(a) for a in args]
    if not fault_log:             # per-fault records off: the fast serving loop runs
        args.append("--no-fault-log")
    if "--firecracker-socket" not in args and "--self" not in args:
        args += ["--firecracker-socket", sock]
    t = Tool("serve-file", *args, log=tmp_path / "log.jsonl", quiet=False, wait=wait)
    t.sock = sock
    tools.append(t)
    return t


def serve_one_region(tools, tmp_path, data, *args):
    """Start the tool with ARGS, play Firecracker with one region of len(data) bytes, check
    every page against ``data``, hang up; returns the finished Tool (exit status checked)."""
    t = start(tools, tmp_path, *args)
    c = FcClient([len(data)])
    try:
        c.handshake(t.sock)
        assert c.mismatches(0, data) == []
    finally:
        c.close()
    assert t.finish() == 0
    return t


# -- the Firecracker protocol ------------------------------------------------------------------

@pytest.mark.parametrize("fault_log", [False, True], ids=["fast-loop", "general-loop"])
def test_two_unsorted_regions_served_from_file(tmp_path, src, tools, fault_log):
    path, data = src
    t = start(tools, tmp_path, "--file", path, fault_log=fault_log)
    c = FcClient([48 * PS, 16 * PS])                       # region 1 lies below region 0
    try:
        assert c.bases[1] < c.bases[0]
        c.handshake(t.sock)
        assert c.mismatches(0, data[:48 * PS]) == []
        assert c.mismatches(1, data[48 * PS:]) == []
    finally:
        c.close()
    assert t.finish() == 0
    hs = t.events("handshake")[0]
    assert hs["pid"] == os.getpid() and hs["regions"] == 2 and hs["page_size"] == PS
    st = t.stats()
    assert st["faults"] == 64 and st["pages_copy"] == 64 and st["bytes_copy"] == 64 * PS
    assert st["latency_us"]["p50"] > 0 and "wall_s" in st
    assert t.events("exit")[0]["reason"] == "peer closed the socket"
    faults = t.events("pagefault")
    if fault_log:
        assert len(faults) == 64 and {f["resolved"] for f in faults} == {"copy"}
        assert all(f["pages"] == 1 and f["us"] > 0 for f in faults)
        assert st["latency_us"]["samples"] == 64
    else:
        assert faults == [] and st["latency_us"]["samples"] == 8      # 1 in 8 timed


def test_zero_source_and_readahead(tmp_path, tools):
    t = start(tools, tmp_path, "--zero", "--readahead", "8")
    c = FcClient([32 * PS])
    try:
        c.handshake(t.sock)
        c.touch_pages(0, range(0, 32 * PS, PS))
        assert c.touch(0, 0, 32 * PS) == bytes(32 * PS)
    finally:
        c.close()
    assert t.finish() == 0
    st = t.stats()
    assert st["faults"] == 4 and st["pages_zero"] == 32 and st["pages_copy"] == 0


@pytest.mark.parametrize("fault_log", [False, True], ids=["fast-loop", "general-loop"])
def test_readahead_clamped_to_region_and_partial(tmp_path, src, tools, fault_log):
    path, data = src
    t = start(tools, tmp_path, "--file", path, "--readahead", "16", fault_log=fault_log)
    c = FcClient([40 * PS, 24 * PS])
    try:
        c.handshake(t.sock)
        # page 20 first, then 10: that fill stops at the present page 20 (a partial fill)
        c.touch_pages(0, [20 * PS, 10 * PS, 36 * PS])
        assert c.mismatches(0, data[:40 * PS]) == []
        assert c.mismatches(1, data[40 * PS:]) == []
    finally:
        c.close()
    assert t.finish() == 0
    st = t.stats()
    assert st["pages_copy"] == 64
    # the general loop lets the kernel stop at page 20 (EAGAIN + progress: a partial fill);
    # the fast loop knows page 20 is there and asks for pages 10-19 only
    assert (st["partial"] >= 1) if fault_log else (st["partial"] == 0)


@pytest.mark.parametrize("fault_log", [False, True], ids=["fast-loop", "general-loop"])
@pytest.mark.parametrize("policy", ["unregister", "zero"])
def test_remove_policies(tmp_path, src, tools, policy, fault_log):
    path, data = src
    t = start(tools, tmp_path, "--file", path, "--on-remove", policy, "--readahead", "4",
              fault_log=fault_log)
    c = FcClient([64 * PS])
    try:
        c.handshake(t.sock)
        assert c.mismatches(0, data) == []
        c.remove(0, 8 * PS, 4 * PS)                     # balloon: MADV_DONTNEED -> REMOVE
        got = c.touch(0, 0, 64 * PS)
        assert got[8 * PS:12 * PS] == bytes(4 * PS)     # removed pages read back as zeros
        assert got[:8 * PS] == data[:8 * PS] and got[12 * PS:] == data[12 * PS:]
    finally:
        c.close()
    assert t.finish() == 0
    rm = t.events("remove")[0]
    assert rm["start"] == c.bases[0] + 8 * PS and rm["policy"] == policy
    st = t.stats()
    assert st["events_remove"] == 1
    if policy == "zero":
        assert st["pages_zero"] >= 4
    else:
        assert st["pages_zero"] == 0


def test_eagain_while_remove_pending_is_retried(tmp_path, src, tools):
    """A fault and a REMOVE race: every COPY issued while the REMOVE is unread gets EAGAIN;
    the handler reads the event and retries, and no page is ever wrong or dropped."""
    import threading
    path, data = src
    t = start(tools, tmp_path, "--file", path, "--on-remove", "zero")
    c = FcClient([64 * PS])
    try:
        c.handshake(t.sock)
        for i in range(20):
            th = threading.Thread(target=c.remove, args=(0, 0, 32 * PS))
            th.start()
            off = (32 + i) * PS
            got = c.touch(0, off, PS)
            th.join(10)
            assert got == data[off:off + PS]
    finally:
        c.close()
    assert t.finish() == 0
    st = t.stats()
    assert st["events_remove"] == 20 and st["faults"] == 20
    assert st["retries"] <= st["eagain"]


def test_record_then_prefetch(tmp_path, src, tools):
    path, data = src
    ws = str(tmp_path / "ws.txt")
    order = [5, 6, 7, 40, 41, 2, 63]
    t = start(tools, tmp_path, "--file", path, "--record", ws)
    c = FcClient([48 * PS, 16 * PS])
    try:
        c.handshake(t.sock)
        for p in order:
            r, off = (0, p * PS) if p < 48 else (1, (p - 48) * PS)
            assert c.touch(r, off, 1) == data[p * PS:p * PS + 1]
    finally:
        c.close()
    assert t.finish() == 0
    key, ps, pages = u.read_working_set(ws)
    assert (key, ps, pages) == ("offset", PS, [p * PS for p in order])
    with open(ws) as f:
        assert f.readline().startswith("# uffdtool working-set v2 page_size=%d key=offset" % PS)
    assert t.stats()["recorded_pages"] == len(order)

    (tmp_path / "log.jsonl").unlink()
    t2 = start(tools, tmp_path, "--file", path, "--prefetch", ws)
    c = FcClient([48 * PS, 16 * PS])
    try:
        c.handshake(t2.sock)
        deadline = time.monotonic() + 5
        time.sleep(0.2)                                    # the handler installs the set
        for p in order:
            r, off = (0, p * PS) if p < 48 else (1, (p - 48) * PS)
            assert c.touch(r, off, PS) == data[p * PS:(p + 1) * PS]
        assert time.monotonic() < deadline
        assert c.mismatches(0, data[:48 * PS]) == []
        assert c.mismatches(1, data[48 * PS:]) == []
    finally:
        c.close()
    assert t2.finish() == 0
    st = t2.stats()
    assert st["prefetch_pages"] == len(order)
    assert st["prefetch_ioctls"] == 4                      # 5-7 | 2 | 40-41 | 63 (2nd region)
    assert st["faults"] == 64 - len(order)                 # recorded pages never faulted


def test_prefetch_demand_fault_takes_its_run(tmp_path, src, tools):
    """A fault inside a pending prefetch run is served first, with the rest of the run."""
    path, data = src
    ws = str(tmp_path / "ws.txt")
    u.write_working_set(ws, [i * PS for i in range(64)], PS)
    t = serve_one_region(tools, tmp_path, data, "--file", path, "--prefetch", ws)
    st = t.stats()
    assert st["faults"] <= 1 and st["pages_copy"] + st["prefetch_pages"] == 64
    assert st["faults"] == st.get("prefetch_claimed", 0)


@pytest.mark.parametrize("how", ["sigterm", "duration"])
def test_stop_while_peer_runs_installs_everything(tmp_path, src, tools, how):
    """SIGTERM / --duration while the peer still runs: every page not served yet is installed
    from the file and the regions unregistered, so the peer goes on with all its memory (a
    peer whose handler just left would wait forever on its next fault); exit 0."""
    path, data = src
    args = ["--file", path, "--stats-interval", "0.05"] + (
        ["--duration", "0.5"] if how == "duration" else [])
    t = start(tools, tmp_path, *args)
    c = FcClient([48 * PS, 16 * PS])
    try:
        c.handshake(t.sock)
        assert c.touch(0, 0, 4 * PS) == data[:4 * PS]          # 4 pages served on demand
        time.sleep(0.3)
        if how == "sigterm":
            t.send_signal(signal.SIGTERM)
        assert t.finish() == 0
        # the handler is gone: every page must now be there (a missing one would hang)
        assert c.mismatches(0, data[:48 * PS]) == []
        assert c.mismatches(1, data[48 * PS:]) == []
    finally:
        c.close()
    stats = t.events("stats")
    assert len(stats) >= 3 and stats[-1]["faults"] == 4
    assert stats[-1]["drained_pages"] == 60
    assert t.events("exit")[0]["reason"] == ("interrupted" if how == "sigterm" else "duration")
    assert "Traceback" not in t.stderr


def test_one_peer_only_and_no_second_listener(tmp_path, src, tools):
    """After the handshake the socket path is gone (a second VM fails at connect instead of
    hanging); a second handler on a live socket is refused (exit 2)."""
    path, data = src
    t = start(tools, tmp_path, "--file", path)
    r = run_tool("serve-file", "--file", path, "--firecracker-socket", t.sock, timeout=20)
    assert r.returncode == 2 and "another process is listening" in r.stderr, r.stderr
    c = FcClient([64 * PS])
    try:
        c.handshake(t.sock)
        deadline = time.monotonic() + 10
        while not t.events("handshake") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.events("handshake") and not os.path.exists(t.sock)
        late = socket.socket(socket.AF_UNIX)
        with pytest.raises(FileNotFoundError):
            late.connect(t.sock)
        late.close()
        assert c.mismatches(0, data) == []
    finally:
        c.close()
    assert t.finish() == 0


def test_peer_death_ends_serving(tmp_path, src, tools):
    path, data = src
    t = start(tools, tmp_path, "--file", path)
    peer = subprocess.Popen([sys.executable, os.path.join(HERE, "fc_client.py"), "--socket",
                             t.sock, "--src", path, "--sizes", str(64 * PS)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().startswith("sent")
        peer.kill()
        peer.wait(10)
        assert t.finish() == 0
    finally:
        peer.kill()
    assert t.events("exit")[0]["reason"] in ("peer exited", "peer closed the socket")
    assert t.events("stats")


def test_serving_failure_kills_peer(tmp_path, src, tools):
    """The source shrinks under the handler: UFFDIO_COPY fails (EFAULT).  The handler says why,
    writes the final stats, exits 1 and (--kill-peer-on-error) SIGKILLs the peer, which would
    otherwise hang or read zeros."""
    path, data = src
    t = start(tools, tmp_path, "--file", path, "--kill-peer-on-error")
    peer = subprocess.Popen([sys.executable, os.path.join(HERE, "fc_client.py"), "--socket",
                             t.sock, "--src", path, "--sizes", str(64 * PS)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().startswith("sent")
        time.sleep(0.2)
        os.truncate(path, 0)
        peer.stdin.write("go\n")
        peer.stdin.flush()
        assert peer.wait(20) == -signal.SIGKILL
        assert t.finish() == 1
    finally:
        peer.kill()
    check_error(t.returncode, t.stderr, 1, "serving failed")
    assert t.events("killed_peer")[0]["pid"] == peer.pid
    assert t.events("stats") and t.events("error")


def test_stale_socket_is_replaced(tmp_path, src, tools):
    path, data = src
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp_path / "uffd.sock"))
    s.close()                                              # a stale socket file stays behind
    t = serve_one_region(tools, tmp_path, data, "--file", path)
    assert not os.path.exists(t.sock)


def _hugetlb_ok(n):
    try:
        a = u.mmap_anon(n * (2 << 20), flags=u.MAP_PRIVATE | u.MAP_HUGETLB)
        u.munmap(a, n * (2 << 20))
        return True
    except OSError:
        return False


@pytest.fixture
def hugepages():
    """Make sure 4 free 2 MiB huge pages exist (raising vm.nr_hugepages, restored after)."""
    knob = "/proc/sys/vm/nr_hugepages"
    old = None
    if not _hugetlb_ok(4):
        try:
            with open(knob) as f:
                old = int(f.read())
            with open(knob, "w") as f:
                f.write(str(old + 4))
        except OSError:
            pytest.skip("no 2 MiB huge pages available")
        if not _hugetlb_ok(4):
            pytest.skip("could not reserve 2 MiB huge pages")
    yield
    if old is not None:
        with open(knob, "w") as f:
            f.write(str(old))


@needs_root
@pytest.mark.parametrize("source", ["file", "zero"])
def test_hugetlb_2m_pages(tmp_path, tools, hugepages, source):
    hp = 2 << 20
    data = random.Random(7).randbytes(2 * hp)
    (tmp_path / "huge.bin").write_bytes(data)
    args = ["--file", str(tmp_path / "huge.bin")] if source == "file" else ["--zero"]
    t = start(tools, tmp_path, *args)
    c = FcClient([hp, hp], page_size=hp, hugetlb=True)
    try:
        c.handshake(t.sock)
        want = data if source == "file" else bytes(2 * hp)
        assert c.touch(0, 4096, 1) == want[4096:4097]
        assert c.touch(0, 0, hp) == want[:hp]
        assert c.touch(1, 0, hp) == want[hp:]
    finally:
        c.close()
    assert t.finish() == 0
    st = t.stats()
    how = "copy" if source == "file" else "zero"      # zero: COPY from a zero buffer
    assert st["faults"] == 2 and st["pages_" + how] == 2 and st["bytes_" + how] == 2 * hp


# -- --self ------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["file", "zero"])
def test_self_serves_and_verifies_every_byte(tmp_path, source):
    data = random.Random(3).randbytes(1 << 20)
    (tmp_path / "m.bin").write_bytes(data)
    args = ["--file", tmp_path / "m.bin"] if source == "file" else ["--zero"]
    r = run_tool("serve-file", *args, "--self", "--size", "1M", "--readahead", "4", "--json",
                 "--no-fault-log")
    assert r.returncode == 0, r.stderr
    assert "every byte verified" in r.stderr and "MiB/s" in r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    v = [x for x in recs if x["event"] == "verify"][0]
    assert v["ok"] and v["bytes"] == 1 << 20
    st = recs[-2]
    assert st["event"] == "stats" and st["faults"] <= 256
    assert st["pages_copy" if source == "file" else "pages_zero"] == 256


# -- the C toucher (Firecracker's handshake as uffd_bench sends it) ---------------------------

# the shared benchmark's C toucher: beside the checkout (as in CI), or where developers have it
BENCH_C = next((p for p in (os.path.join(ROOT, "..", "shared", "bench", "uffd_bench.c"),
                            "/work/shared/bench/uffd_bench.c") if os.path.exists(p)),
               "../shared/bench/uffd_bench.c")


@pytest.fixture(scope="module")
def uffd_bench(tmp_path_factory):
    if not shutil.which("gcc") or not os.path.exists(BENCH_C):
        pytest.skip("needs gcc and %s" % BENCH_C)
    exe = str(tmp_path_factory.mktemp("bench") / "uffd_bench")
    subprocess.run(["gcc", "-O2", "-pthread", "-o", exe, BENCH_C], check=True)
    return exe


@pytest.mark.parametrize("mode,k,fault_log", [("file", 1, False), ("file", 64, False),
                                              ("zero", 16, False), ("file", 8, True)])
def test_c_toucher_two_regions_random(tmp_path, tools, uffd_bench, mode, k, fault_log):
    src = tmp_path / "src.bin"
    src.write_bytes(random.Random(1).randbytes(8 << 20))
    args = ["--file", src] if mode == "file" else ["--zero"]
    t = start(tools, tmp_path, *args, "--readahead", k, fault_log=fault_log)
    r = subprocess.run([uffd_bench, "--fc-socket", t.sock, "--src", str(src), "-s", "8",
                        "-o", "rand", "--regions", "2", "-m", mode, "--timeout", "30"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["verify"] == "ok"
    assert t.finish() == 0
    st = t.stats()
    assert st["pages_" + ("copy" if mode == "file" else "zero")] == 2048


# -- bad input: one clear line, the CLI.md exit code, no traceback -----------------------------

def _records(tmp_path):
    with open(str(tmp_path / "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _bad_peer(tmp_path, tools, data=None, fds="one", src_args=None, size=64 * PS, *, code,
              match):
    """Play a peer that sends DATA with FDS (or hangs up): the tool must fail with CODE and one
    error line containing MATCH (conftest.check_error), and still write its final stats.
    Returns the error line."""
    t = start(tools, tmp_path, *(src_args or ["--zero"]))
    c = FcClient([size])
    try:
        c.connect(t.sock)
        if fds == "one":
            c.send(data)
        elif fds == "none":
            c.send(data, fds=[])
        elif fds == "two":
            extra = os.dup(c.uffd.fileno())
            c.send(data, fds=[c.uffd.fileno(), extra])
            os.close(extra)
        elif fds == "close":
            c.sock.close()
            c.sock = None
        rc = t.finish()
    finally:
        c.close()
    line = check_error(rc, t.stderr, code, match)
    assert t.events("stats")                               # final stats even then
    return line


@pytest.mark.parametrize("data,fds,words", [
    (b"this is not json", "one", "not JSON"),
    (b'{"base_host_virt_addr":1}', "one", "JSON array"),
    (b'[{"base_host_virt_addr":"0x1000","size":4096,"offset":0}]', "one", "non-negative"),
    (b'[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":3000}]', "one",
     "power of two"),
    (None, "none", "0 fds"),
    (None, "two", "2 fds"),
    (b"[" + b" " * (70 << 10) + b"]", "one", "larger than"),
    (None, "close", "without sending"),
], ids=["not-json", "not-array", "wrong-type", "page-size", "no-fd", "two-fds", "oversized",
        "connect-close"])
def test_malformed_handshake(tmp_path, tools, data, fds, words):
    _bad_peer(tmp_path, tools, data, fds, code=1, match=words)


def test_mixed_page_sizes(tmp_path, tools):
    c_json = json.dumps([
        {"base_host_virt_addr": 1 << 30, "size": 4096, "offset": 0, "page_size": 4096},
        {"base_host_virt_addr": 2 << 30, "size": 2 << 20, "offset": 4096, "page_size": 2 << 20}])
    _bad_peer(tmp_path, tools, c_json.encode(), code=1, match="different page sizes")


def test_file_too_short_names_the_sizes(tmp_path, tools, src):
    path, data = src
    line = _bad_peer(tmp_path, tools, src_args=["--file", path, "--offset", str(PS)], code=2,
                     match="too short")
    assert str(64 * PS) in line and str(63 * PS) in line
    # the peer (this test process) registered its memory and nobody will serve it: said so
    assert "pid %d) now waits forever" % os.getpid() in line and "--kill-peer-on-error" in line
    err = [r for r in _records(tmp_path) if r["event"] == "error"][0]
    assert '"base_host_virt_addr"' in err["handshake"]           # what was rejected


def test_offset_beyond_file(tmp_path, src):
    r = run_tool("serve-file", "--file", src[0], "--offset", "1G", "--firecracker-socket",
                 tmp_path / "s")
    assert r.returncode == 2 and "beyond the end" in r.stderr and "Traceback" not in r.stderr


def test_unreadable_file(tmp_path, src):
    os.chmod(src[0], 0)
    os.chmod(tmp_path, 0o755)

    def drop():                  # root without CAP_DAC_OVERRIDE/READ_SEARCH honours mode 000
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):
            libc.prctl(24, cap, 0, 0, 0)                   # PR_CAPBSET_DROP
    if os.geteuid() == 0:
        r = run_tool("serve-file", "--file", src[0], "--firecracker-socket", "/tmp/x.sock",
                     preexec_fn=drop)
    else:
        r = run_tool("serve-file", "--file", src[0], "--firecracker-socket", "/tmp/x.sock")
    assert r.returncode == 2 and "cannot open" in r.stderr and "Permission denied" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_tool("serve-file", "--file", tmp_path, "--firecracker-socket", tmp_path / "s")
    assert r.returncode == 2 and "not a regular file" in r.stderr


@pytest.mark.parametrize("argv,words", [
    (["--zero", "--firecracker-socket", "/nonexistent-dir/x/uffd.sock"], "does not exist"),
    (["--zero", "--firecracker-socket", "{file}"], "not a socket"),
    (["--firecracker-socket", "{sock}"], "exactly one source"),
    (["--zero", "--file", "{file}", "--firecracker-socket", "{sock}"], "exactly one source"),
    (["--zero"], "needs exactly one TARGET"),
    (["--zero", "--pid", "4000000", "--range", "0x1000:4K"], "no such process"),
    (["--file", "{file}", "--pid", "1", "--all-anon"], "--all-anon with --file"),
    (["--zero", "--self", "--firecracker-socket", "{sock}"], "one TARGET"),
    (["--zero", "--firecracker-socket", "{sock}", "--prefetch", "{file}"], "working-set"),
])
def test_usage_errors_exit_2(tmp_path, src, argv, words):
    argv = [a.format(file=src[0], sock=tmp_path / "s") for a in argv]
    r = run_tool("serve-file", *argv)
    check_error(r.returncode, r.stderr, 2, words)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_accept_timeout(tmp_path):
    r = run_tool("serve-file", "--zero", "--firecracker-socket", tmp_path / "s",
                 "--accept-timeout", "0.2", "--quiet")
    assert r.returncode == 1 and "no connection" in r.stderr


def test_silent_peer_times_out(tmp_path, tools):
    t = start(tools, tmp_path, "--zero", "--accept-timeout", "0.3")
    c = FcClient([PS])
    try:
        c.connect(t.sock)
        assert t.finish() == 1
    finally:
        c.close()
    assert "no handshake within" in t.stderr and "Traceback" not in t.stderr
