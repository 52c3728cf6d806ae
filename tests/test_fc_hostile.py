"""serve-file --firecracker-socket under hostile input, failing I/O, foreign peers and the
behaviours of today's Firecracker (v1.14: virtio-mem holes, balloon free-page reporting), against
the real kernel (tests/fc_client.py plays Firecracker)."""
import json
import os
import random
import subprocess
import sys
import time

import pytest

import uffdtool as u
from conftest import needs_root, needs_uffd
from fc_client import FcClient
from test_serve import HERE, _error_lines, src, start, tools  # noqa: F401 (fixtures)

pytestmark = needs_uffd
PS = u.PAGE_SIZE


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
    (_enc([_region(base=(1 << 64) - PS, size=2 * PS)]), "base_host_virt_addr 0xfffffffffffff000 + size"),
    (_enc([_region(base=10 ** 400)]), "base_host_virt_addr does not fit in 64 bits"),
    (_enc([_region(offset=1 << 70)]), "offset does not fit in 64 bits"),
    (_enc([_region(size=1 << 64)]), "size does not fit in 64 bits"),
    (_enc([_region(offset=(1 << 64) - PS, size=2 * PS)]), "offset 0xfffffffffffff000 + size"),
    (_enc([_region(page_size=1 << 100)]), "page_size"),
    (_enc([_region(page_size_kib=3 << 20)]), "page_size_kib"),
    (_enc([_region(offset=100)]), "offset 0x64 is not aligned"),
    (_enc([_region(base=(1 << 30) + 8)]), "base_host_virt_addr 0x40000008 is not aligned"),
    (_enc([_region(size=2 * PS), _region(base=(1 << 30) + PS, offset=2 * PS)]),
     "regions 1 and 0 overlap: base_host_virt_addr"),
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
