"""serve-file --pid PID --range START:LEN and serve-file -- CMD against real processes and the
real kernel (root, x86_64): the target's memory must end up holding the file's bytes."""
import hashlib
import os
import signal
import sys

import pytest

from conftest import (LIBC_MMAP, ScriptTarget, expect_error, needs_root, needs_uffd, run_tool,
                      start_tool, stop_tool, uffdtool)

PS = uffdtool.PAGE_SIZE
pytestmark = [needs_uffd, needs_root,
              pytest.mark.skipif(uffdtool.ARCH != "x86_64", reason="ptrace is x86_64 only")]

# A --pid target: maps N pages (argv[1]) of private anonymous memory, prints the address, then
# obeys stdin: 'fill I K B' memsets pages [I, I+K) to byte B; 'pages I K' prints the md5 of
# each page of [I, I+K) (reading them: that is what faults).
TARGET = LIBC_MMAP + r"""
PS = 4096
n = int(sys.argv[1])
a = libc.mmap(None, n * PS, 3, 0x22, -1, 0)
print("0x%x" % a, flush=True)
for line in sys.stdin:
    w = line.split()
    if w[0] == "fill":
        i, k, b = int(w[1]), int(w[2]), int(w[3])
        ctypes.memset(a + i * PS, b, k * PS)
        print("ok", flush=True)
    elif w[0] == "pages":
        i, k = int(w[1]), int(w[2])
        print(" ".join(hashlib.md5(ctypes.string_at(a + j * PS, PS)).hexdigest()
                       for j in range(i, i + k)), flush=True)
"""

# A -- CMD program: maps N pages, reads them all, prints the md5.
PROG = LIBC_MMAP + r"""
n = int(sys.argv[1])
at = int(sys.argv[2], 0) if len(sys.argv) > 2 else 0      # MAP_FIXED_NOREPLACE there
a = libc.mmap(at or None, n * 4096, 3, 0x22 | (0x100000 if at else 0), -1, 0)
assert not at or a == at, "mmap at 0x%x gave %r" % (at, a)
print(hashlib.md5(ctypes.string_at(a, n * 4096)).hexdigest(), flush=True)
"""
CMD_AT = 0x5a5a00000000          # where PROG maps its pages in the --range test


def md5(b):
    return hashlib.md5(b).hexdigest()


def page_sums(data):
    return [md5(data[i:i + PS]) for i in range(0, len(data), PS)]


ZERO = md5(bytes(PS))


class Target(ScriptTarget):
    def __init__(self, npages=32):
        super().__init__(TARGET, npages)

    def cmd(self, c):
        return self.ask(c).split()

    def pages(self, i, k):
        return self.cmd("pages %d %d" % (i, k))

    def rng(self, page, npages):
        return "0x%x:%d" % (self.addr + page * PS, npages * PS)


@pytest.fixture
def target():
    t = Target()
    yield t
    t.close()


def start(*args):
    """serve-file --log TMP --quiet ARGS, once its 'ready' record is written."""
    return start_tool("serve-file", *args)


def stop(p, sig=signal.SIGINT):
    return stop_tool(p, sig)


def final_stats(recs):
    return [r for r in recs if r["event"] == "stats"][-1]


# ------------------------------------------------------------------------------------- --pid

def test_pid_ranges_serve_the_file_with_cumulative_offsets(target, src):
    path, data = src
    off = 2 * PS
    ws = path + ".ws"
    assert target.cmd("fill 17 1 7") == ["ok"]          # present: MISSING never sees it
    # pages [8, 10) <- file offset OFF+0, pages [16, 20) <- OFF+2 pages, [24, 28) <- OFF+6 pages
    p = start("--file", path, "--offset", off, "--pid", target.pid,
              "--range", target.rng(8, 2), "--range", target.rng(16, 4),
              "--range", target.rng(24, 4), "--record", ws)
    want = page_sums(data[off:off + 10 * PS])
    assert target.pages(8, 2) == want[0:2]
    assert target.pages(16, 4) == want[2:3] + [md5(b"\x07" * PS)] + want[4:6]
    assert target.pages(24, 2) == want[6:8]
    assert target.pages(10, 6) == [ZERO] * 6            # not registered: untouched zeros
    recs, err = stop(p)
    assert p.returncode == 0, err
    st = final_stats(recs)
    assert st["faults"] == 7 and st["pages_copy"] == 7
    assert st["drained_pages"] == 2                     # pages 26, 27: never read
    assert target.pages(26, 2) == want[8:10]
    with open(ws) as f:                              # source offsets, first-fault order
        assert "key=offset" in f.readline()
        assert [int(x, 16) // PS for x in f.read().split("\n")
                if x and not x.startswith("#")] == [0, 1, 2, 4, 5, 6, 7]
    assert recs[-1]["event"] == "exit" and recs[-1]["reason"] == "interrupted"
    target.assert_running_untraced()


def test_pid_dontneed_restores_a_filled_range(target, src):
    path, data = src
    assert target.cmd("fill 0 16 7") == ["ok"]          # present, other data
    p = start("--file", path, "--pid", target.pid, "--range", target.rng(0, 16),
              "--dontneed", "--readahead", "4", "--no-fault-log")    # the fast loop
    want = page_sums(data[:16 * PS])
    assert target.pages(0, 5) == want[:5]
    recs, err = stop(p, signal.SIGTERM)
    assert p.returncode == 0, err
    assert target.pages(0, 16) == want                  # page by page, after detach
    assert final_stats(recs)["drained_pages"] >= 8
    target.assert_running_untraced()


@pytest.mark.parametrize("how", ["sigint", "duration"])
def test_pid_detach_drains_every_page(target, src, how):
    path, data = src
    assert target.cmd("fill 4 4 9") == ["ok"]
    args = ["--file", path, "--pid", target.pid, "--range", target.rng(0, 32), "--dontneed"]
    if how == "duration":
        p = start(*args, "--duration", "0.3")
        recs, err = stop(p, None)
    else:
        p = start(*args)
        recs, err = stop(p)
    assert p.returncode == 0, err
    st = final_stats(recs)
    assert st["faults"] == 0 and st["drained_pages"] == 32
    assert recs[-1]["reason"] == ("duration" if how == "duration" else "interrupted")
    assert target.pages(0, 32) == page_sums(data[:32 * PS])   # read only after the tool exited
    target.assert_running_untraced()


def test_pid_detach_fills_every_hole(target, src):
    """Without --dontneed the pages the target wrote stay its own; detach installs the file's
    pages in each of the holes around them (two runs here), none is left as zeros."""
    path, data = src
    assert target.cmd("fill 4 4 9") == ["ok"]
    p = start("--file", path, "--pid", target.pid, "--range", target.rng(0, 32),
              "--duration", "0.3")
    recs, err = stop(p, None)
    assert p.returncode == 0, err
    assert final_stats(recs)["drained_pages"] == 28
    want = page_sums(data[:32 * PS])
    assert target.pages(0, 32) == want[:4] + [md5(b"\x09" * PS)] * 4 + want[8:32]
    target.assert_running_untraced()


def test_pid_target_exits(target, src):
    path, _ = src
    p = start("--file", path, "--pid", target.pid, "--range", target.rng(0, 4))
    target.p.kill()
    target.p.wait(5)
    recs, err = stop(p, None)
    # killed by a signal while served: exit 1, and the records say how it ended
    assert p.returncode == 1, err
    assert recs[-1]["reason"] == "target exited" and recs[-1]["status"] == 1
    assert recs[-1]["target_status"] == 128 + 9 and recs[-1]["target_signal"] == "SIGKILL"
    gone = [r for r in recs if r["event"] == "gone"]
    assert gone and gone[0]["reason"] == "exited" and gone[0]["signal"] == "SIGKILL"


# ------------------------------------------------------------------------------------ -- CMD

def test_cmd_ranges_come_from_the_file(tmp_path):
    # Only the --range addresses take file data (at cumulative offsets from --offset); CMD's
    # other memory (the interpreter's heap, arenas, the rest of its mapping) gets zero pages.
    # The file starts with random bytes, so a wrong offset or a zero-fill gap would show, and a
    # CMD whose own heap got file data would crash.
    data = os.urandom(48 * PS)
    head = 8 * PS
    path = tmp_path / "img.bin"
    path.write_bytes(os.urandom(head) + data)
    log = tmp_path / "log.json"
    r = run_tool("serve-file", "--file", path, "--offset", head, "--log", log, "--no-fault-log",
                 "--range", "0x%x:%d" % (CMD_AT + PS, 16 * PS),
                 "--range", "0x%x:%d" % (CMD_AT + 40 * PS, 32 * PS),
                 "--", sys.executable, "-c", PROG, 80, hex(CMD_AT), timeout=30)
    assert r.returncode == 0, r.stderr
    want = md5(bytes(PS) + data[:16 * PS] + bytes(23 * PS) + data[16 * PS:48 * PS]
               + bytes(8 * PS))
    assert r.stdout.split() == [want]
    st = [line for line in log.read_text().splitlines() if '"event":"stats"' in line][-1]
    assert '"exit_status":0' in st and '"pages_copy":' in st and '"pages_zero":' in st
    assert "Traceback" not in r.stderr


def test_cmd_exit_status_and_zero(tmp_path):
    r = run_tool("serve-file", "--zero", "-q", "--", sys.executable, "-c",
                 PROG + "sys.exit(7)\n", 16, timeout=30)
    assert r.returncode == 7, r.stderr
    assert r.stdout.strip() == md5(bytes(16 * PS))


# --------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args,match", [
    (lambda t, f: ("--file", f, "--pid", t.pid, "--range", t.rng(0, 32), "--range", t.rng(0, 33)),
     "too short"),
    (lambda t, f: ("--file", f, "--offset", 60 * PS, "--pid", t.pid, "--range", t.rng(0, 8)),
     "the file has %d" % (4 * PS)),
    (lambda t, f: ("--file", f, "--pid", t.pid, "--all-anon"), "--all-anon with --file"),
    (lambda t, f: ("--file", f, "--pid", "4000000", "--range", "0x1000:4K"), "no such process"),
    (lambda t, f: ("--file", f, "--pid", t.pid), "--range"),
    (lambda t, f: ("--file", f, "--dontneed", "--", "true"), "--dontneed goes with --pid"),
    (lambda t, f: ("--file", f, "--pid", t.pid, "--range", "0x1000:4K"), "not mapped"),
    (lambda t, f: ("--file", f, "--range", "0x%x:4K" % CMD_AT, "--", "/nonexistent/cmd"),
     "cannot run"),
    (lambda t, f: ("--file", f, "--", "true"), "needs --range"),
], ids=["file-too-short", "offset-too-far", "all-anon-with-file", "no-such-pid",
        "pid-without-range", "dontneed-without-pid", "range-not-mapped", "cmd-not-found",
        "cmd-file-without-range"])
def test_bad_inputs_exit_2_target_untouched(target, src, args, match):
    expect_error("serve-file", *args(target, src[0]), code=2, match=match)   # src: 64 pages
    target.assert_running_untraced()


def test_all_anon_with_zero_serves_and_detaches(target):
    """--all-anon is fine with --zero (nothing to offset): serve, detach, exit 0."""
    p = start("--zero", "--pid", target.pid, "--all-anon")
    recs, err = stop(p)
    assert p.returncode == 0, err
    target.assert_running_untraced()
