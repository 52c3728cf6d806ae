"""The session runner: the exit status and the `exit` record agree in every way a run ends
(README, "CLI contract"), a run refused at the start says one line, and signals at any moment
of the setup still end in a drain and the final records."""
import json
import random
import signal
import time

import pytest

import uffdtool as u
from conftest import ScriptTarget, Tool, needs_root, needs_uffd, run_tool, start_tool, stop_tool
from fc_client import FcClient

pytestmark = [needs_uffd, needs_root]
PS = u.PAGE_SIZE
x86_64 = pytest.mark.skipif(u.ARCH != "x86_64", reason="--pid needs x86_64")

# A process with 16 private pages that it fills, then waits: "quit" exits 0, "segv" crashes.
PROG = """
import ctypes, mmap, os, resource, signal, sys
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
m = mmap.mmap(-1, 16 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
a = ctypes.addressof(ctypes.c_char.from_buffer(m))
ctypes.memmove(a, b"x" * 4096, 4096)
print(hex(a), flush=True)
for line in sys.stdin:
    if line.strip() == "quit":
        sys.exit(0)
    if line.strip() == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
"""


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def last(recs, event):
    return [r for r in recs if r["event"] == event][-1]


def paused(command, *args, pause):
    """A Tool (conftest) with the test-only pause at the step ``pause`` (STEP:SECS)."""
    return Tool(command, *args, env={"UFFDTOOL_TEST_PAUSE": pause}, wait=False)


# -- the exit record is the real exit status ---------------------------------------------------

def test_cmd_status_is_the_exit_record(tmp_path):
    log = tmp_path / "log.json"
    r = run_tool("watch", "-q", "--log", log, "--", "sh", "-c", "exit 3", timeout=30)
    assert r.returncode == 3
    assert last(records(log), "exit")["status"] == 3


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)],
                         ids=["sigint-130", "sigterm-0"])
def test_watch_self_interrupted(sig, code):
    # the pause holds the run after attach, before the workload: the signal lands there
    p = paused("watch", "--self", pause="start:3")
    p.wait_for("ready")
    p.send_signal(sig)
    p.communicate(timeout=15)
    recs = p.records()
    assert p.returncode == code
    assert last(recs, "exit") == dict(last(recs, "exit"), status=code, reason="interrupted")
    assert last(recs, "gone")["reason"] == "detached"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_file_stopped_while_waiting_for_a_peer_exits_0(tmp_path, sig):
    p = start_tool("serve-file", "--zero", "--firecracker-socket", tmp_path / "s.sock")
    recs, err = stop_tool(p, sig)
    assert p.returncode == 0, err
    assert last(recs, "exit")["status"] == 0 and last(recs, "exit")["reason"] == "interrupted"
    assert last(recs, "stats")["faults"] == 0
    assert not (tmp_path / "s.sock").exists()


def test_refused_at_start_is_one_line_and_complete_records(tmp_path):
    log = tmp_path / "log.json"
    r = run_tool("watch", "--log", log, "--pid", "4000000", "--all-anon", timeout=30)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["uffdtool: no such process: 4000000"]   # nothing else
    recs = records(log)
    assert [x["event"] for x in recs] == ["start", "error", "stats", "exit"]
    assert recs[0]["argv"][:2] == ["uffdtool", "watch"] and recs[0]["time"] > 1.7e9
    assert recs[-1]["status"] == 2


# -- a --pid target that ends while watched -------------------------------------------------------

@x86_64
@pytest.mark.parametrize("how, code, fields", [
    ("quit", 0, {"target_status": 0}),
    ("segv", 1, {"target_status": 128 + 11, "target_signal": "SIGSEGV"}),
    ("kill", 1, {"target_status": 128 + 9, "target_signal": "SIGKILL"}),
])
def test_pid_target_end_is_reported(how, code, fields):
    t = ScriptTarget(PROG)
    try:
        p = start_tool("watch", "--pid", t.pid, "--range", "0x%x:64K" % t.addr)
        if how == "kill":
            t.p.kill()
        else:
            t.p.stdin.write(how + "\n")
            t.p.stdin.flush()
        t.p.wait(10)
        recs, err = stop_tool(p, None)
    finally:
        t.close()
    assert p.returncode == code, err
    ex = last(recs, "exit")
    assert ex["status"] == code and {k: ex.get(k) for k in fields} == fields
    gone = last(recs, "gone")
    assert gone["reason"] == "exited" and gone["status"] == fields["target_status"]


# -- signals during setup ------------------------------------------------------------------------

def test_many_signals_between_handshake_and_serving_still_drain(tmp_path):
    """Three SIGTERMs while the prefetch list is built (the pause holds the run there): the
    tool installs every page, unregisters and writes its final records; the peer reads every
    page of the file and never hangs."""
    data = random.Random(7).randbytes(64 * PS)
    src = tmp_path / "mem.bin"
    src.write_bytes(data)
    ws = tmp_path / "ws.txt"
    ws.write_text("# uffdtool working-set v1 page_size=%d key=offset\n0x0\n0x1000\n" % PS)
    sock = str(tmp_path / "s.sock")
    p = paused("serve-file", "--file", src, "--firecracker-socket", sock, "--prefetch", ws,
               "--no-fault-log", pause="start:2")
    p.wait_for("ready")
    c = FcClient([48 * PS, 16 * PS])
    try:
        c.handshake(sock)
        p.wait_for("handshake")
        for _ in range(3):
            p.send_signal(signal.SIGTERM)
            time.sleep(0.01)
        p.communicate(timeout=20)
        assert p.returncode == 0
        assert c.mismatches(0, data[:48 * PS]) == []        # a missing page would hang here
        assert c.mismatches(1, data[48 * PS:]) == []
    finally:
        c.close()
    recs = p.records()
    assert last(recs, "exit")["reason"] == "interrupted" and last(recs, "exit")["status"] == 0
    assert last(recs, "stats")["drained_pages"] == 64
