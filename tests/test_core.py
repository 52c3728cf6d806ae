"""The binding itself: constants, structs, decoding, flag sets, and each ioctl on real memory."""
import ctypes
import errno
import json
import os
import struct
import subprocess
import sys
import threading
import time

import pytest

import uffdtool as u
from conftest import needs_uffd, run_tool

PS = u.PAGE_SIZE


# -- constants pinned against the header values (kernel.md §1.3) ----------------------------------

@pytest.mark.parametrize("name,value", [
    ("UFFDIO_API", 0xC018AA3F), ("UFFDIO_REGISTER", 0xC020AA00), ("UFFDIO_UNREGISTER", 0x8010AA01),
    ("UFFDIO_WAKE", 0x8010AA02), ("UFFDIO_COPY", 0xC028AA03), ("UFFDIO_ZEROPAGE", 0xC020AA04),
    ("UFFDIO_MOVE", 0xC028AA05), ("UFFDIO_WRITEPROTECT", 0xC018AA06),
    ("UFFDIO_CONTINUE", 0xC020AA07), ("UFFDIO_POISON", 0xC020AA08),
    ("USERFAULTFD_IOC_NEW", 0xAA00), ("UFFD_API", 0xAA)])
def test_ioctl_numbers(name, value):
    assert getattr(u, name) == value


@pytest.mark.parametrize("cls,size", [
    (u.uffdio_range, 16), (u.uffdio_api, 24), (u.uffdio_register, 32), (u.uffdio_copy, 40),
    (u.uffdio_zeropage, 32), (u.uffdio_move, 40), (u.uffdio_writeprotect, 24),
    (u.uffdio_continue, 32), (u.uffdio_poison, 32)])
def test_struct_sizes(cls, size):
    assert ctypes.sizeof(cls) == size


def test_all_17_features_named():
    assert len(u.Features.NAMES) == 17
    assert u.UFFD_API_FEATURES == 0x1FFFF
    assert u.Features.MOVE == 1 << 16 and u.Features.EVENT_FORK == 2
    assert set(u.Ioctls.NAMES.values()) == {"REGISTER", "UNREGISTER", "WAKE", "COPY", "ZEROPAGE",
                                           "MOVE", "WRITEPROTECT", "CONTINUE", "POISON", "API"}
    assert u.SYSCALLS["x86_64"]["userfaultfd"] == 323
    assert u.SYSCALLS["aarch64"]["userfaultfd"] == 282


def test_unknown_bits_are_kept_not_errors():
    f = u.Features(0x1FFFF | 1 << 17 | 1 << 40)
    assert f.unknown == (1 << 17 | 1 << 40)
    assert f.names()[-1] == hex(1 << 17 | 1 << 40)
    assert "MOVE" in f.names()
    io = u.Ioctls(0x8000000000000003 | 1 << 9)
    assert str(io) == "REGISTER|UNREGISTER|API|0x200"
    assert u.Features.THREAD_ID in f and u.Features(0) .names() == []
    assert str(u.Features(0)) == "0"
    assert isinstance(u.Features.THREAD_ID | u.Features.SIGBUS, u.Features)


def test_flags_parse():
    assert u.Features.parse("thread_id,SIGBUS") == u.UFFD_FEATURE_THREAD_ID | u.UFFD_FEATURE_SIGBUS
    assert u.Features.parse("0x100|move") == 0x100 | 0x10000
    with pytest.raises(ValueError):
        u.Features.parse("nope")


def _msg(event, a=0, b=0, c=0):
    return struct.pack("<B7xQQQ", event, a, b, c)


def test_decode_every_event_type():
    buf = (_msg(0x12, 1, 0x7f0000001000, 4242) + _msg(0x13, 9) + _msg(0x14, 0x1000, 0x2000, 0x3000)
           + _msg(0x15, 0x4000, 0x6000) + _msg(0x16, 0x8000, 0x9000) + _msg(0x7e, 1, 2, 3)
           + b"\x12" * 5)   # trailing partial record is ignored
    evs = u.decode_msgs(buf)
    assert [type(e) for e in evs] == [u.PageFault, u.Fork, u.Remap, u.Remove, u.Unmap,
                                      u.UnknownEvent]
    pf, fork, remap, rm, um, unk = evs
    assert (pf.address, pf.write, pf.wp, pf.minor, pf.ptid, pf.kind) == (
        0x7f0000001000, True, False, False, 4242, "missing")
    assert pf.record() == {"event": "pagefault", "address": 0x7f0000001000, "flags": ["write"],
                           "ptid": 4242}
    assert fork.ufd == 9 and fork.record() == {"event": "fork", "ufd": 9}
    assert remap.record() == {"event": "remap", "from": 0x1000, "to": 0x2000, "len": 0x3000}
    assert rm.record() == {"event": "remove", "start": 0x4000, "end": 0x6000}
    assert um.record() == {"event": "unmap", "start": 0x8000, "end": 0x9000}
    assert unk.code == 0x7e and unk.record()["event"] == "unknown"
    assert u.decode_msgs(_msg(0x12, 2 | 4, 0x1000))[0].kind == "wp"
    assert u.decode_msgs(_msg(0x12, 4, 0x1000))[0].kind == "minor"


def test_parse_size_and_range():
    assert u.parse_size("4096") == 4096
    assert u.parse_size("64K") == 65536 and u.parse_size("2m") == 2 << 20
    assert u.parse_size("1G") == 1 << 30 and u.parse_size("0x1000") == 4096
    assert u.parse_size("1.5K") == 1536
    for bad in ("", "-1", "12Q", "K", "abc", "1.1"):
        with pytest.raises(ValueError):
            u.parse_size(bad)
    assert u.parse_range("0x7f0000000000:64K") == (0x7f0000000000, 65536)
    with pytest.raises(ValueError):
        u.parse_range("0x1000")


def test_working_set_roundtrip(tmp_path):
    p = tmp_path / "ws"
    u.write_working_set(str(p), [0x3000, 0, 0x1000], 4096)
    assert u.read_working_set(str(p)) == ("offset", 4096, [0x3000, 0, 0x1000])
    (tmp_path / "bad").write_text("hello\n")
    with pytest.raises(u.UsageError):
        u.read_working_set(str(tmp_path / "bad"))


# -- real kernel ---------------------------------------------------------------------------------

@needs_uffd
@pytest.mark.parametrize("route", ["syscall", "dev"])
def test_open_both_ways_and_api(route):
    with u.Userfaultfd(route=route) as uffd:
        assert uffd.route == route
        feats, ioctls = uffd.api(u.Features.THREAD_ID)
        assert u.Features.THREAD_ID in feats and u.Features.MISSING_SHMEM in feats
        assert u.Ioctls.REGISTER in ioctls and u.Ioctls.API in ioctls
        assert uffd.features == u.Features.THREAD_ID
        with pytest.raises(u.UffdError) as ei:       # a second UFFDIO_API is refused
            uffd.api(0)
        assert ei.value.errno == errno.EINVAL


@needs_uffd
def test_api_rejects_unknown_feature():
    with u.Userfaultfd() as uffd:
        with pytest.raises(u.UffdError) as ei:
            uffd.api(1 << 63)
        assert ei.value.errno == errno.EINVAL


@needs_uffd
def test_ioctls_before_api_fail(uffd):
    area = u.mmap_anon(PS)
    try:
        with pytest.raises(u.UffdError) as ei:
            uffd.register(area, PS)
        assert ei.value.errno == errno.EINVAL
    finally:
        u.munmap(area, PS)


@pytest.fixture
def armed(uffd):
    """An API'd uffd and 8 registered anonymous pages (MISSING|WP)."""
    uffd.api(u.Features.THREAD_ID | u.Features.PAGEFAULT_FLAG_WP)
    area = u.mmap_anon(8 * PS)
    ioctls = uffd.register(area, 8 * PS, u.UFFDIO_REGISTER_MODE_MISSING | u.UFFDIO_REGISTER_MODE_WP)
    yield uffd, area, ioctls
    u.munmap(area, 8 * PS)


def _read(addr, n=PS):
    buf = ctypes.create_string_buffer(n)
    ctypes.memmove(buf, addr, n)          # no GIL held while it faults
    return buf.raw


@needs_uffd
def test_register_copy_zeropage_partial_eexist(armed):
    uffd, area, ioctls = armed
    assert {u.Ioctls.COPY, u.Ioctls.ZEROPAGE, u.Ioctls.WAKE, u.Ioctls.WRITEPROTECT} <= set(
        u.Ioctls(b) for b in u.Ioctls.NAMES if b & ioctls)
    src = ctypes.create_string_buffer(os.urandom(4 * PS), 4 * PS)
    assert uffd.copy(area, ctypes.addressof(src), PS) == PS
    assert _read(area) == src.raw[:PS]
    assert uffd.zeropage(area + 3 * PS, PS) == PS
    # partial: page 3 present, so a 4-page copy at page 1 stops after 2 pages (EAGAIN + progress)
    assert uffd.copy(area + PS, ctypes.addressof(src) + PS, 4 * PS) == 2 * PS
    assert _read(area + PS, 2 * PS) == src.raw[PS:3 * PS]
    with pytest.raises(u.UffdError) as ei:
        uffd.copy(area, ctypes.addressof(src), PS)
    assert ei.value.errno == errno.EEXIST and ei.value.done == 0
    uffd.wake(area, 8 * PS)
    assert _read(area + 3 * PS) == b"\0" * PS


@needs_uffd
def test_fault_served_by_handler_thread(armed):
    uffd, area, _ = armed
    h = u.Handler(u.ZeroSource(), readahead=2)
    h.add(uffd, [(area, 8 * PS)])
    got = {}

    def touch():
        got["data"] = _read(area, 8 * PS)
        h.stop()
    t = threading.Thread(target=touch)
    t.start()
    assert h.run(timeout=10) == "stopped"
    t.join(5)
    assert got["data"] == b"\0" * 8 * PS
    c = h.stats.count
    assert c["faults_missing"] == 4 and c["pages_zero"] == 8


@needs_uffd
def test_unregister_makes_faults_normal(armed):
    uffd, area, _ = armed
    uffd.unregister(area, 8 * PS)
    assert _read(area) == b"\0" * PS                 # no handler needed any more
    with pytest.raises(u.UffdError) as ei:
        uffd.copy(area + PS, area, PS)
    assert ei.value.errno == errno.ENOENT


def test_cli_bad_flag_exit_2():
    r = run_tool("info", "--nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") <= 2 and "--nope" in r.stderr
    r = run_tool("bogus")
    assert r.returncode == 2


@needs_uffd
def test_cli_info_json_lists_all_features():
    r = run_tool("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert len(info["api"]["features"]) == 17
    assert info["api"]["features"][0] == "PAGEFAULT_FLAG_WP"
    assert "COPY" in info["api"]["register_ioctls"]["anon"]["ioctls"]
    assert "CONTINUE" in info["api"]["register_ioctls"]["shmem"]["ioctls"]
    assert info["open"]["dev"]["ok"] and info["open"]["syscall"]["ok"]
    r = run_tool("info")
    assert r.returncode == 0 and "features (17)" in r.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unprivileged_open_error_and_info():
    """As 'nobody' with vm.unprivileged_userfaultfd=0: a clear EPERM hint, info still works."""
    if open("/proc/sys/vm/unprivileged_userfaultfd").read().strip() != "0":
        pytest.skip("vm.unprivileged_userfaultfd is not 0 here")
    code = ("import uffdtool as u\n"
            "try:\n    u.Userfaultfd(route='syscall')\n"
            "except u.UffdError as e:\n    print(e.errno, e)\n"
            "u.Userfaultfd(user_mode_only=True).close(); print('umo ok')\n")
    import shutil
    from conftest import ROOT, TOOL
    py = shutil.which("python3", path="/usr/bin:/bin")     # root's pyenv is not readable by nobody
    if not py:
        pytest.skip("no system python3 that an unprivileged user can run")
    r = subprocess.run([py, "-c", code], cwd=ROOT, user=65534, capture_output=True,
                       text=True, timeout=30, env={"PYTHONPATH": ROOT, "PATH": os.environ["PATH"]})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("%d " % errno.EPERM)
    assert "vm.unprivileged_userfaultfd" in r.stdout and "CAP_SYS_PTRACE" in r.stdout
    assert "umo ok" in r.stdout
    r = subprocess.run([py, TOOL, "info", "--json"], user=65534, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert not info["open"]["syscall"]["ok"] and info["open"]["syscall_user_mode_only"]["ok"]
    assert "user mode only" in info["api"]["route"] and len(info["api"]["features"]) == 17


@needs_uffd
@pytest.mark.parametrize("spin", [0.0, 50e-6])
def test_handler_spin_serves_and_sleeps(armed, spin):
    """With and without the busy-poll window, faults are served; an idle handler still sleeps
    (a stop() from another thread ends run() promptly in both cases)."""
    uffd, area, _ = armed
    h = u.Handler(u.ZeroSource(), spin=spin)
    h.add(uffd, [(area, 8 * PS)])
    got = {}

    def touch():
        got["data"] = _read(area, 8 * PS)
        threading.Timer(0.2, h.stop).start()
    t = threading.Thread(target=touch)
    t.start()
    import resource
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    assert h.run(timeout=10) == "stopped"
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    t.join(5)
    assert got["data"] == b"\0" * 8 * PS and h.stats.count["faults_missing"] == 8
    # idle for ~0.2 s: a bounded spin, not a busy loop for the whole time
    assert (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime) < 0.15


@pytest.mark.parametrize("argv,words", [
    (["serve-file", "--zero", "--self", "--size", "1M", "--record", "/nonexistent/ws"],
     "cannot write /nonexistent/ws"),
    (["watch", "--self", "--size", "1M", "--record", "/nonexistent/ws"],
     "cannot write /nonexistent/ws"),
    (["serve-file", "--zero", "--self", "--size", "0"], "--size: must be more than 0"),
    (["watch", "--self", "--size", "0"], "--size: must be more than 0"),
    (["serve-file", "--zero", "--self", "--spin", "-5"], "--spin: must be 0 to"),
    (["watch", "--self", "--readahead", "0"], "--readahead: must be at least 1"),
    (["watch", "--self", "--stats-interval", "x"], "--stats-interval"),
])
def test_cli_bad_values_exit_2_before_any_work(argv, words, tmp_path):
    r = run_tool(*argv, cwd=str(tmp_path), timeout=30)
    assert r.returncode == 2, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr


def _cpu_hogs(n):
    """``n`` processes that never sleep; returns them once the machine's run queues hold more
    runnable threads than it has CPUs (what /proc/loadavg counts)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    deadline = time.monotonic() + 10
    while u.SpinGate()._runnable() <= (os.cpu_count() or 1):
        assert time.monotonic() < deadline, "the CPU hogs never all ran at once"
        time.sleep(0.01)
    return hogs


@needs_uffd
def test_handler_does_not_spin_on_a_full_machine(armed):
    """The busy-poll window is taken only while a CPU is free (SpinGate): with more runnable
    threads than CPUs, an idle handler with a 5 s ``spin`` sleeps in poll at once (it would
    otherwise take a share of a CPU for the whole second); on the idle machine the same
    handler does spin (so that this test can tell the two apart)."""
    uffd, area, _ = armed

    def idle_cpu(spin):
        h = u.Handler(u.ZeroSource(), spin=spin)
        h.add(uffd, [(area, 8 * PS)])
        threading.Timer(1.0, h.stop).start()
        c0 = time.thread_time()
        assert h.run(timeout=10) == "stopped"
        return time.thread_time() - c0
    assert idle_cpu(5.0) > 0.1                        # nothing else runs: it spins
    hogs = _cpu_hogs(os.cpu_count() or 1)
    try:
        assert idle_cpu(5.0) < 0.01
    finally:
        for p in hogs:
            p.kill()
            p.wait()
