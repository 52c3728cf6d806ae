"""A real Firecracker (v1.12.1) restoring snapshots through ``serve-file --firecracker-socket``
(README "Tested with a real Firecracker").

The guest (tests/firecracker/guest.c, built here with gcc) writes its pattern, is snapshotted
once per module, and after every restore checks the pattern itself and says so on its serial
console; the driver (tests/firecracker/driver.py) does the Firecracker API calls.

Only a missing /dev/kvm skips (also in CI).  Every other missing piece (the Firecracker download,
its checksum, gcc) skips locally with the reason but FAILS when the environment variable CI is
set: CI fetches Firecracker in .ci/run.
"""
import os
import shutil
import signal
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "firecracker"))
import driver  # noqa: E402
import get_firecracker  # noqa: E402
from conftest import need_program  # noqa: E402

PAGE = 4096
MIB = 1 << 20
GUEST_OK = ["guest: round %d/%d verify ok pages=%d zero_pages=0" % (r, driver.ROUNDS,
                                                                     driver.PATTERN_PAGES)
            for r in range(1, driver.ROUNDS + 1)]


def _missing(reason):
    """A requirement other than /dev/kvm is missing: skip with REASON, but fail in CI."""
    if os.environ.get("CI"):
        pytest.fail(reason + " (CI is set: .ci/run must provide it)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _no_leftovers():
    """Whatever a test asserts, no Firecracker or serve-file it started outlives it."""
    yield
    driver.cleanup()


@pytest.fixture(scope="module")
def firecracker():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm: a real Firecracker cannot run here")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        _missing("/dev/kvm is not readable and writable by uid %d" % os.geteuid())
    try:
        return get_firecracker.get_firecracker()
    except (get_firecracker.FetchError, OSError) as e:
        _missing("no Firecracker binary: %s" % e)


@pytest.fixture(scope="module")
def snap(firecracker, tmp_path_factory):
    """One snapshot of the guest after it wrote its pattern, shared by the module's tests."""
    need_program("gcc", "gcc")                  # builds the guest
    d = str(tmp_path_factory.mktemp("fcsnap"))
    kernel = driver.build_guest(d)
    return driver.make_snapshot(d, firecracker, kernel)


def restore_run(firecracker, snap, tmp_path, *handler_args, commands=b"vq", mem=None,
                balloon_mib=None):
    """Serve SNAP (or its memory file replaced by MEM) with serve-file HANDLER_ARGS, restore a
    Firecracker from it, run COMMANDS in the guest (after ``PATCH /balloon`` to BALLOON_MIB);
    returns (guest lines, serve-file exit status, its JSON records, its stderr)."""
    sock = str(tmp_path / "uffd.sock")
    # --kill-peer-on-error: a handler that fails ends the VM, so the test fails at once instead
    # of waiting for a guest that waits forever
    h = driver.serve_file(mem or snap.mem, sock, "--kill-peer-on-error", *handler_args,
                          log=str(tmp_path / "log.json"))
    fc = driver.restore(str(tmp_path), firecracker, snap, sock)
    if balloon_mib is not None:
        fc.api("PATCH", "/balloon", {"amount_mib": balloon_mib})
    lines = driver.run_guest(fc, commands)
    status, records, err = driver.finish_handler(h)
    return lines, status, records, err


def events(records, name):
    return [r for r in records if r.get("event") == name]


def test_default(firecracker, snap, tmp_path):
    lines, status, records, err = restore_run(firecracker, snap, tmp_path)
    assert driver.verify_lines(lines) == GUEST_OK, lines
    assert status == 0, err
    (hs,) = events(records, "handshake")
    assert hs["page_size"] == PAGE and hs["regions"] == 1 and hs["bytes"] == driver.MEM_MIB * MIB
    # Firecracker exited (the guest's reset): its socket closes and its pidfd fires
    assert events(records, "exit")[-1]["reason"] in ("peer closed the socket", "peer exited")
    st = driver.stats(records)
    # every pattern page faulted once, plus the few pages of code, stack, page tables, VMGenID
    assert driver.PATTERN_PAGES <= st["faults"] < driver.PATTERN_PAGES + 100
    # (a page two threads fault at once is one copy and an EEXIST)
    assert driver.PATTERN_PAGES <= st["pages_copy"] <= st["faults"]


def test_readahead_16(firecracker, snap, tmp_path):
    lines, status, records, err = restore_run(firecracker, snap, tmp_path, "--readahead", 16)
    assert driver.verify_lines(lines) == GUEST_OK, lines
    assert status == 0, err
    st = driver.stats(records)
    # the guest walks its pattern upwards: one fault per 16 pages
    assert st["faults"] < driver.PATTERN_PAGES // 16 + 100
    assert st["pages_copy"] >= driver.PATTERN_PAGES


def test_record_then_prefetch(firecracker, snap, tmp_path):
    ws = str(tmp_path / "ws.txt")
    rec_dir, pre_dir = tmp_path / "record", tmp_path / "prefetch"
    rec_dir.mkdir()
    pre_dir.mkdir()
    lines, status, records, err = restore_run(firecracker, snap, rec_dir, "--record", ws)
    assert driver.verify_lines(lines) == GUEST_OK, lines
    assert status == 0, err
    recorded = driver.stats(records)["faults"]
    with open(ws) as f:
        pages = [line for line in f if not line.startswith("#")]
    # a page two threads faulted at once is one page but two faults
    assert driver.PATTERN_PAGES <= len(pages) <= recorded

    lines, status, records, err = restore_run(firecracker, snap, pre_dir, "--prefetch", ws)
    assert driver.verify_lines(lines) == GUEST_OK, lines
    assert status == 0, err
    st = driver.stats(records)
    # installed in the background, or as the rest of a prefetch run that a fault claimed
    assert st["prefetch_pages"] > 0
    assert st["prefetch_pages"] + st["pages_copy"] >= driver.PATTERN_PAGES
    assert st["faults"] * 10 < recorded          # the prefetch ran ahead of the guest


@pytest.mark.parametrize("policy", ["unregister", "zero"])
def test_balloon_remove(firecracker, snap, tmp_path, policy):
    """The guest first reads its whole pattern (all pages served), then inflates the balloon by
    4 MiB (the top 1,024 pattern pages; Firecracker MADV_DONTNEEDs them: UFFD_EVENT_REMOVE), then
    checks again: those pages must read zeros, never file data, and the rest the pattern."""
    lines, status, records, err = restore_run(firecracker, snap, tmp_path, "--on-remove", policy,
                                              commands=b"vbvq", balloon_mib=4)
    n = 4 * MIB // PAGE
    first = driver.PATTERN_BASE + (driver.PATTERN_PAGES - n) * PAGE
    after = ["guest: round %d/%d verify ok pages=%d zero_pages=%d" % (
        r, driver.ROUNDS, driver.PATTERN_PAGES, n) for r in range(1, driver.ROUNDS + 1)]
    assert driver.verify_lines(lines) == GUEST_OK + after, lines
    assert "guest: balloon inflated pages=%d first=%#x" % (n, first) in lines
    assert status == 0, err
    (hs,) = events(records, "handshake")
    base = hs["layout"][0]["base"]
    removes = events(records, "remove")
    assert [(r["start"] - base, r["end"] - base, r["policy"]) for r in removes] == [
        (first, first + 4 * MIB, policy)]
    st = driver.stats(records)
    assert st["events_remove"] == 1
    if policy == "zero":
        assert st["pages_zero"] >= n             # the second pass faulted them: zero pages


def test_negative_control(firecracker, snap, tmp_path):
    """One byte of the memory file changed: the guest must see it (else the tests above prove
    nothing)."""
    mem = str(tmp_path / "changed.mem")
    shutil.copyfile(snap.mem, mem)
    addr = driver.PATTERN_BASE + 1000 * PAGE + 3           # a byte of a checked word
    with open(mem, "r+b") as f:
        f.seek(addr)
        b = f.read(1)
        f.seek(addr)
        f.write(bytes([b[0] ^ 0x40]))
    lines, status, records, err = restore_run(firecracker, snap, tmp_path, mem=mem)
    rounds = driver.verify_lines(lines)
    assert len(rounds) == driver.ROUNDS, lines
    for line in rounds:
        assert " MISMATCH addr=%#x " % (addr - 3) in line and line.endswith(" bad_pages=1"), line
    assert status == 0, err


def test_two_vms_from_one_snapshot(firecracker, snap, tmp_path):
    """driver.restore_many: two Firecrackers restored at once from one snapshot, one handler
    each; both guests verify their memory."""
    socks = [str(tmp_path / ("uffd%d.sock" % i)) for i in range(2)]
    handlers = [driver.serve_file(snap.mem, s, log=str(tmp_path / ("log%d.json" % i)))
                for i, s in enumerate(socks)]
    vms = driver.restore_many(str(tmp_path), firecracker, snap, socks)
    for fc in vms:
        fc.send(b"vq")                           # both guests verify at the same time
    outs = [driver.run_guest(fc, b"") for fc in vms]
    for lines in outs:
        assert driver.verify_lines(lines) == GUEST_OK, lines
    for h in handlers:
        status, records, err = driver.finish_handler(h)
        assert status == 0, err
        assert driver.stats(records)["faults"] >= driver.PATTERN_PAGES


def test_handler_stopped_while_the_vm_runs(firecracker, snap, tmp_path):
    """SIGTERM to serve-file after the restore, before the guest reads its memory: the handler
    installs every page not served yet and unregisters, exits 0, and the guest then reads all of
    its pattern with no handler left."""
    sock = str(tmp_path / "uffd.sock")
    h = driver.serve_file(snap.mem, sock, log=str(tmp_path / "log.json"))
    fc = driver.restore(str(tmp_path), firecracker, snap, sock)
    h.send_signal(signal.SIGTERM)
    status, records, err = driver.finish_handler(h)
    assert status == 0, err
    st = driver.stats(records)
    total = driver.MEM_MIB * MIB // PAGE
    assert st["faults"] < 100                                   # the VMM's own few touches
    assert driver.PATTERN_PAGES < st["drained_pages"] <= total - st["pages_copy"]
    lines = driver.run_guest(fc, b"vq")
    assert driver.verify_lines(lines) == GUEST_OK, lines


def test_second_firecracker_on_the_same_socket(firecracker, snap, tmp_path):
    """One peer per socket: a second VM pointed at the handler's path fails at once instead of
    hanging, and the first one is served as usual."""
    sock = str(tmp_path / "uffd.sock")
    h = driver.serve_file(snap.mem, sock, log=str(tmp_path / "log.json"))
    fc = driver.restore(str(tmp_path), firecracker, snap, sock)
    with pytest.raises(driver.DriverError, match="Failed to connect to UDS Unix stream: No such "
                                                "file or directory"):
        driver.restore(str(tmp_path), firecracker, snap, sock, name="second")
    lines = driver.run_guest(fc, b"vq")
    assert driver.verify_lines(lines) == GUEST_OK, lines
    status, records, err = driver.finish_handler(h)
    assert status == 0 and len(events(records, "handshake")) == 1, err
