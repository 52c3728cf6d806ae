"""serve-file --firecracker-socket under hostile input, failing I/O, foreign peers and the
behaviours of today's Firecracker (v1.14: virtio-mem holes, balloon free-page reporting), against
the real kernel (tests/fc_client.py plays Firecracker)."""
import json
import os
import random
import select
import subprocess
import sys
import time

import pytest

import uffdtool as u
from conftest import Tool, needs_root, needs_uffd
from fc_client import FcClient
from test_serve import HERE, start

pytestmark = needs_uffd
PS = u.PAGE_SIZE


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("uffdtool")]


def _region(base=1 << 30, size=PS, offset=0, **kw):
    r = {"base_host_virt_addr": base, "size": size, "offset": offset}
    r.update(kw)
    return r


def _hostile(tmp_path, tools, data, nfds=1, then=None, api=True, args=("--zero",)):
    """Start the tool, connect, send ``data`` with ``nfds`` fds (the uffd first; the uffd has
    done UFFDIO_API unless ``api`` is False) and then ``then`` bytes; returns (exit status, the
    one error line, the Tool)."""
    t = start(tools, tmp_path, *args)
    c = FcClient([4 * PS])
    raw = None if api else u.Userfaultfd()
    try:
        c.connect(t.sock)
        first = c.uffd.fileno() if api else raw.fileno()
        extra = [os.dup(first) for _ in range(nfds - 1)]
        c.send(data, fds=[first] + extra)
        for fd in extra:
            os.close(fd)
        if then is not None:
            c.sock.sendall(then)
        rc = t.finish()
    finally:
        c.close()
        if raw is not None:
            raw.close()
    lines = _error_lines(t.stderr)
    assert "Traceback" not in t.stderr, t.stderr
    assert len(lines) == 1, t.stderr
    assert t.events("stats")
    return rc, lines[0], t


def _enc(regions):
    return json.dumps(regions, separators=(",", ":")).encode()


@pytest.mark.parametrize("data,words", [
    (b"[" * 1000 + b"]" * 1000, "nested too deeply"),
    (b'[{"a":' * 600 + b"1" + b"}" * 600 + b"]", "nested too deeply"),
    (_enc([_region(base=(1 << 64) - PS, size=2 * PS)]),
     "base_host_virt_addr 0xfffffffffffff000 + size"),
    (_enc([_region(base=10 ** 400)]), "base_host_virt_addr does not fit in 64 bits"),
    (_enc([_region(offset=1 << 70)]), "offset does not fit in 64 bits"),
    (_enc([_region(size=1 << 64)]), "size does not fit in 64 bits"),
    (_enc([_region(offset=(1 << 64) - PS, size=2 * PS)]), "offset 0xfffffffffffff000 + size"),
    (_enc([_region(page_size=1 << 100)]), "page_size"),
    (_enc([_region(page_size_kib=3 << 20)]), "page_size_kib"),
    (_enc([_region(offset=100)]), "offset 0x64 is not aligned"),
    (_enc([_region(base=(1 << 30) + 8)]), "base_host_virt_addr 0x40000008 is not aligned"),
    (_enc([_region(size=2 * PS), _region(base=(1 << 30) + PS, offset=2 * PS)]),
     "regions 0 and 1 overlap at 0x40001000"),
    (_enc([_region(), _region()]), "overlap"),
], ids=["deep-array", "deep-object", "wraps-2^64", "base-10^400", "offset-2^70", "size-2^64",
        "offset-wraps", "page-size-2^100", "page-size-kib-3M", "unaligned-offset",
        "unaligned-base", "overlap", "same-region-twice"])
def test_hostile_handshake_refused_naming_the_field(tmp_path, tools, data, words):
    rc, line, t = _hostile(tmp_path, tools, data)
    assert rc == 1 and words in line, line
    assert "RecursionError" not in t.stderr


@pytest.mark.parametrize("nfds,fields,then,why", [
    (3, {"gpa_start": 0, "is_guest_memfd": True}, b"exitless_apf:1", "gpa_start"),
    (1, {"gpa_start": 0}, None, "gpa_start"),
    (3, {}, None, "3 fds"),
    (1, {}, b"no_exitless_apf", "second message"),
], ids=["full", "fields-only", "three-fds", "second-message"])
def test_secret_hiding_protocol_is_recognised(tmp_path, tools, nfds, fields, then, why):
    """Firecracker's unreleased secret-hiding handshake: exit 2, one line that says so."""
    data = _enc([_region(**fields)])
    if then is not None:          # its second message, in the same write as the JSON
        data, then = data + then, None
    rc, line, _ = _hostile(tmp_path, tools, data, nfds=nfds, then=then)
    assert rc == 2, line
    assert "this Firecracker build uses a protocol uffdtool does not speak" in line
    assert why in line


def test_uffd_without_uffdio_api_is_an_error(tmp_path, tools):
    """A uffd on which the peer never called UFFDIO_API: refused at the handshake (exit 1),
    not served to an immediate `gone reason=read: Invalid argument` and exit 0."""
    c = FcClient([4 * PS])
    data = c.regions_json()
    c.close()
    rc, line, t = _hostile(tmp_path, tools, data, api=False)
    assert rc == 1 and "UFFDIO_API" in line, line
    assert not t.events("gone")


@pytest.mark.parametrize("fault_log", [False, True], ids=["fast-loop", "general-loop"])
def test_huge_offset_with_zero_source_and_readahead(tmp_path, tools, fault_log):
    """--zero --readahead 16 and a region offset of 2^50 (valid: aligned, fits u64): served,
    no MemoryError from the fast loop's readahead hint, the peer's thread does not hang."""
    t = start(tools, tmp_path, "--zero", "--readahead", "16", fault_log=fault_log)
    c = FcClient([64 * PS])
    try:
        c.connect(t.sock)
        c.send(c.regions_json(offset=1 << 50))
        assert c.touch(0, 0, 64 * PS, timeout=20) == bytes(64 * PS)
    finally:
        c.close()
    assert t.finish() == 0, t.stderr
    assert "Traceback" not in t.stderr and t.stats()["pages_zero"] == 64


def test_peer_hangs_up_without_a_fault_warns(tmp_path, tools):
    t = start(tools, tmp_path, "--zero")
    c = FcClient([4 * PS])
    try:
        c.handshake(t.sock)
        deadline = time.monotonic() + 10
        while not t.events("handshake"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        c.close()
    assert t.finish() == 0
    w = t.events("warning")
    assert len(w) == 1 and "without a single page fault" in w[0]["message"]
    assert "without a single page fault" in t.stderr              # the human line


@pytest.mark.parametrize("fault_log", [False, True], ids=["fast-loop", "general-loop"])
def test_fault_outside_handshake_regions_is_an_error_record(tmp_path, src, tools, fault_log):
    """The peer registered 8 pages but announced 4: a fault in the other 4 gets a zero page
    (its thread must not hang), an `error` record with the address, and a stats counter."""
    path, data = src
    t = start(tools, tmp_path, "--file", path, fault_log=fault_log)
    c = FcClient([8 * PS])
    try:
        c.connect(t.sock)
        c.send(_enc([_region(base=c.bases[0], size=4 * PS)]))
        assert c.touch(0, 0, 4 * PS) == data[:4 * PS]
        assert c.touch(0, 5 * PS, PS) == bytes(PS)
    finally:
        c.close()
    assert t.finish() == 0
    err = [r for r in t.events("error") if "address" in r]
    assert len(err) == 1 and err[0]["address"] == c.bases[0] + 5 * PS
    assert t.stats()["outside_regions"] == 1


def test_decode_msgs_n_past_the_buffer():
    one = u.UFFD_MSG.pack(u.UFFD_EVENT_REMOVE, 0x1000, 0x3000, 0)
    assert u.decode_msgs(one, 10 * u.UFFD_MSG_SIZE) == [u.Remove(0x1000, 0x3000)]
    assert u.decode_msgs(one + one[:7], 1 << 20) == [u.Remove(0x1000, 0x3000)]
    assert u.decode_msgs(one, -5) == []


# -- failing I/O: the log, the working set -------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs of our own (root only), to fill up: its path."""
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip("cannot mount a tmpfs here: %s" % r.stderr.strip())
    yield d
    subprocess.run(["umount", "-l", str(d)])


def _fill(d):
    """Fill the filesystem at ``d`` up (ENOSPC); returns the filler's path."""
    path = d / "filler"
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * PS)
        except OSError:
            pass
    return path


def _lines_whole(path):
    with open(path) as f:
        text = f.read()
    assert not text or text.endswith("\n"), "a half record: %r" % text[-80:]
    return [json.loads(line) for line in text.splitlines()]


@needs_root
def test_full_log_never_stops_serving(small_fs, src, tools):
    """--log on a full filesystem: every page is still served, one error line, whole records
    only in the file, and the records that could not be written counted (log_dropped)."""
    path, data = src
    t = start(tools, small_fs, "--file", path, fault_log=True)
    filler = _fill(small_fs)
    c = FcClient([64 * PS])
    try:
        c.handshake(t.sock)
        for p in range(64):
            assert c.touch(0, p * PS, 1) == data[p * PS:p * PS + 1]
        assert c.mismatches(0, data) == []
        os.unlink(filler)                  # room again: the final records must get out
    finally:
        c.close()
    assert t.finish() == 0, t.stderr
    assert "Traceback" not in t.stderr
    errs = _error_lines(t.stderr)
    assert len(errs) == 1 and "cannot write log" in errs[0] and "No space left" in errs[0]
    recs = _lines_whole(t.log)
    st = [r for r in recs if r["event"] == "stats"][-1]
    assert st["log_dropped"] > 0 and st["faults"] == 64
    assert recs[-1]["event"] == "exit" and recs[-1]["status"] == 0


@needs_root
def test_full_log_and_serving_failure_kill_the_peer_first(small_fs, tmp_path, src, tools):
    """The log cannot be written and then the source breaks: --kill-peer-on-error still kills
    the peer (the kill comes before any log write)."""
    path, data = src
    t = start(tools, small_fs, "--file", path, "--kill-peer-on-error", fault_log=True)
    _fill(small_fs)
    peer = subprocess.Popen([sys.executable, os.path.join(HERE, "fc_client.py"), "--socket",
                             t.sock, "--src", path, "--sizes", str(64 * PS),
                             "--touch-first", "32"],   # 32 fault records: the log is full
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().startswith("sent")
        assert peer.stdout.readline().startswith("touched")
        os.truncate(path, 0)
        peer.stdin.write("go\n")
        peer.stdin.flush()
        assert peer.wait(20) == -9
        assert t.finish() == 1
    finally:
        peer.kill()
    assert "Traceback" not in t.stderr
    assert any("serving failed" in line for line in _error_lines(t.stderr)), t.stderr
    _lines_whole(t.log)


def _ws_text(pages, end=True, count=None):
    text = "# uffdtool working-set v2 page_size=%d key=offset\n" % PS
    text += "".join("0x%x\n" % p for p in pages)
    if end:
        text += "# end pages=%d\n" % (len(pages) if count is None else count)
    return text


@pytest.mark.parametrize("text,words", [
    (_ws_text([0, PS, 2 * PS], end=False), "truncated"),
    (_ws_text([0, PS, 2 * PS])[:-20], "truncated"),          # cut mid-number
    (_ws_text([0, PS, 2 * PS], count=5), "pages=5 but holds 3"),
    (_ws_text([0, PS]) + "0x3000\n", "data after"),
], ids=["no-end-line", "cut-mid-number", "miscounted", "data-after-end"])
def test_prefetch_refuses_a_broken_v2_working_set(tmp_path, text, words):
    ws = tmp_path / "ws"
    ws.write_text(text)
    r = subprocess.run([sys.executable, u.__file__, "serve-file", "--zero", "--prefetch",
                        str(ws), "--firecracker-socket", str(tmp_path / "s")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and words in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_working_set_v2_written_and_v1_still_read(tmp_path):
    p = str(tmp_path / "ws")
    u.write_working_set(p, [0x3000, 0, 0x1000], PS)
    with open(p) as f:
        text = f.read()
    assert text == ("# uffdtool working-set v2 page_size=%d key=offset\n0x3000\n0x0\n0x1000\n"
                    "# end pages=3\n" % PS)
    assert u.read_working_set(p) == ("offset", PS, [0x3000, 0, 0x1000])
    with open(p, "w") as f:
        f.write("# uffdtool working-set v1 page_size=4096 key=offset\n0x2000\n0x0\n")
    assert u.read_working_set(p) == ("offset", 4096, [0x2000, 0])
    assert os.listdir(tmp_path) == ["ws"]                 # no temporary file left


@needs_root
def test_record_on_full_fs_is_atomic(small_fs, tmp_path, src, tools):
    """--record on a full filesystem: the old working set stays whole (the new one is written
    to a temporary file and renamed), one error line, exit 1, the final records written."""
    path, data = src
    ws = small_fs / "ws"
    ws.write_text(_ws_text([7 * PS]))
    t = start(tools, tmp_path, "--file", path, "--record", str(ws))
    _fill(small_fs)
    c = FcClient([64 * PS])
    try:
        c.handshake(t.sock)
        assert c.mismatches(0, data) == []                # 64 pages: a 1.2 KB set
    finally:
        c.close()
    assert t.finish() == 1
    errs = _error_lines(t.stderr)
    assert len(errs) == 1 and "cannot write working set" in errs[0], t.stderr
    assert u.read_working_set(str(ws)) == ("offset", PS, [7 * PS])      # the old one, whole
    assert sorted(os.listdir(small_fs)) == ["filler", "ws"]
    assert t.events("stats") and t.events("exit")[0]["status"] == 1


# -- the source file changes while it is served ---------------------------------------------------

def _change(path, how):
    if how == "dd-notrunc":
        subprocess.run(["dd", "if=/dev/urandom", "of=%s" % path, "bs=1", "count=1",
                        "seek=%d" % (10 * PS), "conv=notrunc"], check=True,
                        capture_output=True)
    elif how == "write-same-size":
        with open(path, "r+b") as f:
            f.seek(10 * PS)
            f.write(b"\xff")
    elif how == "mtime":
        os.utime(path, ns=(0, 12345))
    elif how == "truncate":
        os.truncate(path, 0)
    elif how == "grow":
        with open(path, "ab") as f:
            f.write(b"x" * PS)


@pytest.mark.parametrize("how", ["dd-notrunc", "write-same-size", "mtime", "truncate", "grow"])
def test_source_changed_while_serving_kills_the_peer(tmp_path, src, tools, how):
    """A snapshot written to (dd conv=notrunc), touched, truncated or grown while it is being
    served: a serving failure (exit 1, one line), and --kill-peer-on-error kills the peer
    before it can read the changed bytes."""
    if how == "dd-notrunc" and not shutil_which("dd"):
        pytest.skip("no dd")
    path, data = src
    t = start(tools, tmp_path, "--file", path, "--kill-peer-on-error")
    peer = subprocess.Popen([sys.executable, os.path.join(HERE, "fc_client.py"), "--socket",
                             t.sock, "--src", path, "--sizes", str(64 * PS),
                             "--touch-first", "4"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().startswith("sent")
        assert peer.stdout.readline().startswith("touched")
        _change(path, how)
        assert peer.wait(20) == -9             # killed while it waits for its line
        assert t.finish() == 1
    finally:
        peer.kill()
    errs = _error_lines(t.stderr)
    assert len(errs) == 1 and "changed while serving" in errs[0], t.stderr
    assert t.events("killed_peer")[0]["pid"] == peer.pid
    assert t.events("stats")


def test_chmod_of_the_source_is_not_a_change(tmp_path, src, tools):
    """IN_ATTRIB without a size or mtime change (chmod): serving goes on."""
    path, data = src
    t = start(tools, tmp_path, "--file", path)
    c = FcClient([64 * PS])
    try:
        c.handshake(t.sock)
        assert c.touch(0, 0, PS) == data[:PS]
        os.chmod(path, 0o600)
        time.sleep(0.2)
        assert c.mismatches(0, data) == []
    finally:
        c.close()
    assert t.finish() == 0, t.stderr


def test_truncated_source_fails_the_copy_with_efault(tmp_path, src):
    """The truncation path under the change detection: a source whose change cannot be seen
    (here: the watch switched off) fails UFFDIO_COPY with EFAULT, and the Handler raises it
    rather than serving zeros."""
    path, data = src
    source = u.FileSource(path)
    if getattr(source, "watch_fd", -1) >= 0:
        os.close(source.watch_fd)
        source.watch_fd, source._stat = -1, None
    c = FcClient([8 * PS])
    h = u.Handler(source)
    h.add(u.Userfaultfd.adopt(os.dup(c.uffd.fileno())), [(c.bases[0], 8 * PS, 0)])
    os.truncate(path, 0)
    import threading
    th = threading.Thread(target=lambda: c.touch(0, 0, 1, timeout=30), daemon=True)
    th.start()
    try:
        with pytest.raises(u.UffdError) as e:
            h.run(timeout=20)
        assert e.value.errno == 14 and e.value.op == "UFFDIO_COPY"
    finally:
        h.close()
        c.uffd.close()                   # wakes the toucher (zeros) before its memory goes
        th.join(30)
        c.close()
        source.close()


def shutil_which(name):
    import shutil
    return shutil.which(name)


# -- v1.14 virtio-mem: holes of a sparse memory file are zero pages, never read ------------------

@pytest.mark.parametrize("fault_log", [False, True], ids=["fast-loop", "general-loop"])
@pytest.mark.parametrize("readahead", [1, 16])
def test_sparse_file_holes_served_as_zero_pages(tmp_path, tools, readahead, fault_log):
    rnd = random.Random(11)
    path = tmp_path / "sparse.mem"
    data = bytearray(64 * PS)
    with open(path, "wb") as f:
        f.truncate(64 * PS)
        for first, n in ((0, 8), (20, 4)):
            chunk = rnd.randbytes(n * PS)
            f.seek(first * PS)
            f.write(chunk)
            data[first * PS:(first + n) * PS] = chunk
        f.seek(40 * PS + 100)
        f.write(b"0123456789")                   # one page with 10 bytes of data
        data[40 * PS + 100:40 * PS + 110] = b"0123456789"
    if not u.file_holes(os.open(path, os.O_RDONLY), 0, 64 * PS):
        pytest.skip("this filesystem reports no holes (SEEK_HOLE)")
    t = start(tools, tmp_path, "--file", path, "--readahead", readahead, fault_log=fault_log)
    c = FcClient([32 * PS, 32 * PS])
    try:
        c.handshake(t.sock)
        order = list(range(64))
        rnd.shuffle(order)
        for p in order:
            r, off = divmod(p, 32)
            assert c.touch(r, off * PS, PS) == bytes(data[p * PS:(p + 1) * PS]), p
    finally:
        c.close()
    assert t.finish() == 0, t.stderr
    st = t.stats()
    assert st["pages_hole"] == 64 - 13 and st["pages_copy"] == 13
    assert st.get("pages_zero", 0) == 0


# -- who may connect -----------------------------------------------------------------------------

NOBODY = 65534
TOOL = os.path.join(os.path.dirname(HERE), "uffdtool.py")


def _python_for(uid):
    """A python3 that ``uid`` can run (the test's own may live in root's home), or None."""
    for py in dict.fromkeys(["/usr/bin/python3", "/usr/local/bin/python3", sys.executable]):
        if os.access(py, os.X_OK) and subprocess.run(
                [py, "-c", "pass"], preexec_fn=_as(uid), capture_output=True).returncode == 0:
            return py
    return None


def _as(uid):
    def drop():
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    return drop


@pytest.fixture
def shared_dir():
    """A directory every uid may use (pytest's tmp_path is root's only), holding copies of
    uffdtool.py and tests/fc_client.py (the checkout may be unreadable to another uid)."""
    import shutil
    import tempfile
    global SYS_PY, SHARED
    d = tempfile.mkdtemp(prefix="uffdtool-shared-")
    os.chmod(d, 0o777)
    os.mkdir(os.path.join(d, "tests"))
    shutil.copy(TOOL, d)
    shutil.copy(os.path.join(HERE, "fc_client.py"), os.path.join(d, "tests"))
    for sub in ("", "tests"):
        for name in os.listdir(os.path.join(d, sub)):
            os.chmod(os.path.join(d, sub, name), 0o755)
    SHARED = d
    SYS_PY = _python_for(NOBODY)
    if SYS_PY is None:
        pytest.skip("no python3 that uid %d can run" % NOBODY)
    yield d
    shutil.rmtree(d, ignore_errors=True)


SYS_PY = SHARED = None          # set by shared_dir


def _tool(log, *args, cwd=None, uid=None):
    """serve-file ARGS in the background (as ``uid``), once its ``ready`` record is out."""
    tool = os.path.join(SHARED, "uffdtool.py") if uid is not None else TOOL
    p = subprocess.Popen([SYS_PY if uid is not None else sys.executable, tool, "serve-file",
                          "--log", log, "--no-fault-log"] + [str(a) for a in args], cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=_as(uid) if uid is not None else None)
    deadline = time.monotonic() + 15
    while not (os.path.exists(log) and '"ready"' in open(log).read()):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no ready record"
        time.sleep(0.01)
    return p


def _records_of(log):
    with open(log) as f:
        return [json.loads(line) for line in f]


def _peer(sock, src_path, size, uid=None):
    """fc_client.py as a separate process (as ``uid``: an unprivileged, user-mode-only uffd)."""
    p = subprocess.Popen([SYS_PY if uid is not None else sys.executable,
                          os.path.join(SHARED if uid is not None else os.path.dirname(HERE),
                                       "tests", "fc_client.py"), "--socket", sock, "--src",
                          src_path, "--sizes", str(size)] +
                         (["--user-mode-only"] if uid is not None else []),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, preexec_fn=_as(uid) if uid is not None else None)
    assert p.stdout.readline().startswith("sent"), p.stderr.read()
    return p


def _shared_files(shared_dir, data):
    """The log and socket paths in ``shared_dir`` and the source file written there with
    ``data`` (all readable by uid 65534): (log, sock, src_path)."""
    src_path = os.path.join(shared_dir, "src")
    with open(src_path, "wb") as f:
        f.write(data)
    return os.path.join(shared_dir, "log.jsonl"), os.path.join(shared_dir, "uffd.sock"), src_path


def _assert_one_refusal(recs):
    """Exactly one peer was refused: this process (uid 0), with one warning record."""
    w = [r for r in recs if r["event"] == "warning" and "refused" in r["message"]]
    assert len(w) == 1 and w[0]["uid"] == 0 and w[0]["pid"] == os.getpid()


def _intruder_is_refused(sock):
    """A peer of this process's uid (root) connects and sends its handshake: the tool closes
    the connection on it."""
    intruder = FcClient([16 * PS])
    try:
        intruder.connect(sock)
        intruder.sock.settimeout(10)
        try:
            intruder.send()
            assert intruder.sock.recv(1) == b""        # closed on it
        except (BrokenPipeError, ConnectionResetError):   # (closed first, or unread)
            pass
    finally:
        intruder.close()


def _verified(peer):
    peer.stdin.write("go\n")
    peer.stdin.flush()
    out = peer.stdout.readline().strip()
    assert peer.wait(20) == 0
    return out


@needs_root
def test_socket_is_0600_whatever_the_umask(tmp_path, tools, shared_dir):
    """Under umask 000 the socket was 0777 and another user could connect, hand over its own
    uffd and read a root-only file through the handler.  Now it is 0600 before listen()."""
    sock = os.path.join(shared_dir, "uffd.sock")
    old = os.umask(0)
    try:
        t = start(tools, tmp_path, "--zero", "--firecracker-socket", sock)
    finally:
        os.umask(old)
    st = os.stat(sock)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == os.geteuid()
    r = subprocess.run([SYS_PY, "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); "
                        "s.connect(sys.argv[1])", sock], preexec_fn=_as(NOBODY),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode and "PermissionError" in r.stderr, r.stderr
    t.kill()


@needs_root
def test_peer_of_another_uid_is_refused_and_listening_goes_on(shared_dir):
    """The tool runs as uid 65534; a peer of uid 0 (it can connect: root) is refused with one
    warning record, then the right peer (uid 65534, a user-mode-only uffd) is served."""
    log, sock, src_path = _shared_files(shared_dir, random.Random(3).randbytes(16 * PS))
    t = _tool(log, "--file", src_path, "--firecracker-socket", sock, "--accept-timeout", 30,
              uid=NOBODY)
    try:
        _intruder_is_refused(sock)
        peer = _peer(sock, src_path, 16 * PS, uid=NOBODY)
        assert _verified(peer) == "ok"
        out, err = t.communicate(timeout=20)
    finally:
        t.kill()
    assert t.returncode == 0, err
    recs = _records_of(log)
    _assert_one_refusal(recs)
    assert [r["pid"] for r in recs if r["event"] == "handshake"] == [peer.pid]


@needs_root
def test_peer_uid_owns_the_socket_and_is_served(shared_dir, src):
    """--peer-uid 65534 (Firecracker under the jailer): the root tool gives that uid the
    0600 socket, and a peer of that uid is accepted and served."""
    log, sock, src_path = _shared_files(shared_dir, src[1])
    t = _tool(log, "--file", src_path, "--firecracker-socket", sock, "--peer-uid", NOBODY)
    try:
        st = os.stat(sock)
        assert st.st_uid == NOBODY and st.st_mode & 0o777 == 0o600
        peer = _peer(sock, src_path, 64 * PS, uid=NOBODY)
        assert _verified(peer) == "ok"
        out, err = t.communicate(timeout=20)
    finally:
        t.kill()
    assert t.returncode == 0, err
    assert not any(r["event"] == "warning" and "refused" in r.get("message", "")
                   for r in _records_of(log))


def test_live_listener_found_by_inode_and_only_our_socket_unlinked(tmp_path):
    """Handler A listens on `rel.sock` (bound by a relative path, as /proc/net/unix then
    shows it); handler B given the absolute path must see A without connecting to it (A
    would take the probe for its peer) and refuse.  When A exits it unlinks only the socket
    it bound, not one that replaced it."""
    log = str(tmp_path / "a.jsonl")
    a = _tool(log, "--zero", "--firecracker-socket", "rel.sock", cwd=str(tmp_path))
    path = str(tmp_path / "rel.sock")
    try:
        r = subprocess.run([sys.executable, TOOL, "serve-file", "--zero",
                            "--firecracker-socket", path, "--accept-timeout", "1"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "another process is listening" in r.stderr, r.stderr
        assert a.poll() is None
        assert [x["event"] for x in _records_of(log)] == ["start", "ready"]   # no peer seen
        os.unlink(path)                              # someone else's socket takes the path
        import socket as socket_mod
        other = socket_mod.socket(socket_mod.AF_UNIX)
        other.bind(path)
        a.send_signal(2)
        a.communicate(timeout=20)
        assert os.path.exists(path), "A unlinked a socket it did not bind"
        other.close()
    finally:
        a.kill()


# -- v1.14 balloon free-page reporting: a continuous REMOVE stream --------------------------------

@pytest.mark.parametrize("readahead", [1, 16])
def test_remove_stream_loses_no_fault_and_never_refills_removed_pages(tmp_path, tools,
                                                                     readahead):
    """A 2 MiB range removed every millisecond while another thread faults elsewhere
    (--on-remove zero): every read is served, a removed page never gets file data again (and
    a kept one never zeros), also with readahead crossing into removed ranges."""
    size = 32 << 20
    data = random.Random(7).randbytes(size)
    path = tmp_path / "mem.bin"
    path.write_bytes(data)
    sock = str(tmp_path / "uffd.sock")
    # --quiet: thousands of remove records would fill the unread stderr pipe
    t = Tool("serve-file", "--file", path, "--on-remove", "zero", "--readahead", readahead,
             "--no-fault-log", "--firecracker-socket", sock, log=tmp_path / "log.jsonl")
    t.sock = sock
    tools.append(t)
    c = FcClient([size])
    try:
        c.handshake(t.sock)
        res = c.balloon(data, seconds=2.0)
        assert res["bad"] == [] and res["reads"] > 1000 and res["removes"] > 50, \
            {k: v for k, v in res.items() if k != "removed"}
        got = c.touch(0, 0, size, timeout=60)               # the whole region, afterwards
        for ch in range(size >> 21):
            want = bytes(2 << 20) if ch in res["removed"] else data[ch << 21:(ch + 1) << 21]
            assert got[ch << 21:(ch + 1) << 21] == want, ch
    finally:
        c.close()
    assert t.finish() == 0, t.stderr
    st = t.stats()
    assert st["events_remove"] == res["removes"]


# -- units: the log's write rule, removed-range borders, holes ----------------------------------

def test_log_file_is_append_only_and_batches_uffd_events(tmp_path):
    import fcntl
    path = str(tmp_path / "log.jsonl")
    log = u.EventLog(path, human=None)
    assert fcntl.fcntl(log.fd, fcntl.F_GETFL) & os.O_APPEND
    log.emit("pagefault", address=1)
    assert open(path).read() == ""                     # batched ...
    log.emit("stats", faults=1)                        # ... until any other record
    recs = [json.loads(line) for line in open(path)]
    assert [r["event"] for r in recs] == ["pagefault", "stats"]
    assert recs[1]["log_dropped"] == 0
    log.emit("remove", start=0, end=PS)
    log.close()                                        # close flushes too
    assert open(path).read().count("\n") == 3


def test_log_on_a_pipe_writes_whole_records_of_at_most_pipe_buf():
    """Two logs batching into one pipe with a slow reader: each write is at most PIPE_BUF
    bytes of whole records, so the lines never interleave (a 64 KiB batch would)."""
    import threading
    r, w = os.pipe()
    files = [os.fdopen(os.dup(w), "w") for _ in range(2)]
    os.close(w)

    def writer(f, tag):
        log = u.EventLog(f, human=None)
        assert log.fd == f.fileno() and log._limit == select.PIPE_BUF
        for i in range(3000):
            log.emit("pagefault", address=i, who=tag, pad="x" * 200)
        log.close()
        f.close()
    threads = [threading.Thread(target=writer, args=(f, n)) for n, f in enumerate(files)]
    for t in threads:
        t.start()
    data = b""
    while True:
        time.sleep(0.0005)
        chunk = os.read(r, 8192)
        if not chunk:
            break
        data += chunk
    for t in threads:
        t.join(10)
    os.close(r)
    lines = data.decode().splitlines()
    assert len(lines) == 6000 and all(json.loads(line)["pad"] == "x" * 200 for line in lines)


@pytest.mark.parametrize("addr,length,want", [
    (0, 16 * PS, 4 * PS),             # kept page: up to the removed range at 4
    (4 * PS, 16 * PS, 4 * PS),        # removed 4..8: to its end
    (6 * PS, PS, PS),
    (9 * PS, 16 * PS, 16 * PS),       # past every removed range
    (3 * PS, PS, PS),
], ids=["before", "inside", "one-page", "after", "adjacent"])
def test_clip_removed(addr, length, want):
    s = u.Served(None, [])
    s.removed = [(4 * PS, 8 * PS)]
    assert s.clip_removed(addr, length, PS) == want


def test_file_holes_and_hole_span(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(16 * PS)
        f.seek(4 * PS)
        f.write(b"x" * (2 * PS))
        f.seek(10 * PS + 5)
        f.write(b"y")
    fd = os.open(path, os.O_RDONLY)
    try:
        holes = u.file_holes(fd, 0, 16 * PS)
    finally:
        os.close(fd)
    if not holes:
        pytest.skip("this filesystem reports no holes")
    assert holes == [(0, 4 * PS), (6 * PS, 10 * PS), (11 * PS, 16 * PS)]
    src = u.FileSource(str(path), offset=PS)          # source offsets are after --offset
    try:
        assert src.holes == [(0, 3 * PS), (5 * PS, 9 * PS), (10 * PS, 15 * PS)]
        assert src.hole_span(PS, 4 * PS) == 2 * PS     # in a hole: bytes of hole left
        assert src.hole_span(3 * PS, 4 * PS) == -2 * PS    # data: bytes to the next hole
        assert src.hole_span(9 * PS, 4 * PS) == -PS
    finally:
        src.close()
