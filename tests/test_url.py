"""serve-file --url against a real nginx on 127.0.0.1 (tests/nginx_server.py): Range GETs,
pinning, the status mapping, retries, HTTPS with --cacert, the cache, --prefetch, --fill idle.
Every restored page is compared with the object's bytes; faults are made with nginx itself
(max_ranges 0, return 4xx/5xx, stopping it, replacing the file).  Peers: tests/fc_client.py."""
import http.server
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, TOOL, need_program, needs_uffd, run_tool, start_tool
from fc_client import FcClient
from nginx_server import TOKEN, Nginx

PS = 4096
SIZE = 4 << 20
CHUNK = 256 << 10
NCHUNKS = SIZE // CHUNK
SECRET = "Sig-d0-n0t-l0g"

pytestmark = needs_uffd


@pytest.fixture
def ngx(tmp_path):
    need_program("nginx", "nginx")
    n = Nginx(tmp_path / "nginx")
    n.data = random.Random(7).randbytes(SIZE)
    n.put("mem.bin", n.data, mtime=1_700_000_000)
    yield n
    n.stop()


def records(p):
    return p.records()


def wait_record(p, event, timeout=30):
    p.wait_for(event, timeout)
    return p.events(event)[0]


def serve(url, sock, *extra):
    return start_tool("serve-file", "--url", url, "--firecracker-socket", sock,
                      "--chunk", "256K", *extra)


def finish(p, timeout=30):
    return p.finish(timeout), p.stderr


def finished_ok(p):
    """Wait for a serve-file that must end with exit 0; returns its final stats record."""
    rc, err = finish(p)
    assert rc == 0, err
    return [r for r in records(p) if r["event"] == "stats"][-1]


def restore(ngx, url, sock, *extra, client=None):
    """Serve ``url`` to a Firecracker-like peer, compare every page with the object, close the
    peer; returns (exit status, stderr, records)."""
    p = serve(url, sock, *extra)
    c = client or FcClient([SIZE])
    try:
        c.handshake(sock)
        assert c.mismatches(0, ngx.data) == []
    finally:
        c.close()
    rc, err = finish(p)
    return rc, err, records(p)


def chunk_gets(ngx):
    return [r for r in ngx.requests() if r[2] == 206 and r[1] != "bytes=0-0"]


def bounds(rec):
    """(first, last) byte of a logged request's Range (None: not a single range)."""
    m = re.match(r"^bytes=(\d+)-(\d+)$", rec[1])
    return (int(m.group(1)), int(m.group(2))) if m else None


def chunks_fetched(ngx):
    """The chunk indexes the range GETs asked for, one per chunk per request (a background
    request asks for several consecutive chunks)."""
    out = []
    for r in chunk_gets(ngx):
        a, b = bounds(r)
        assert a % CHUNK == 0 and (b + 1) % CHUNK == 0, r
        out.extend(range(a // CHUNK, (b + 1) // CHUNK))
    return out


# -- serving ------------------------------------------------------------------------------------

def test_url_restores_every_page_pinned_and_never_logs_secrets(ngx, tmp_path):
    url = ngx.url("mem.bin") + "?X-Amz-Signature=" + SECRET
    rc, err, recs = restore(ngx, url, str(tmp_path / "s"), "--header", "X-Trace: " + SECRET + "h",
                            "--readahead", "16")
    assert rc == 0, err
    text = open(tmp_path / "nginx" / "access.log").read()
    reqs = ngx.requests()
    # the size comes from a first ranged GET (no HEAD); every later request is pinned
    assert reqs[0][:3] == ("GET", "bytes=0-%d" % (CHUNK - 1), 206)
    assert all(r[0] == "GET" for r in reqs), text
    etag = '"%x-%x"' % (1_700_000_000, SIZE)
    assert {r[4] for r in reqs[1:]} == {etag}, text
    assert sorted(r[1] for r in reqs) == sorted(
        "bytes=%d-%d" % (c * CHUNK, (c + 1) * CHUNK - 1) for c in range(NCHUNKS))   # once each
    start = [r for r in recs if r["event"] == "start"][0]
    assert start["source"] == ngx.url("mem.bin")
    assert SECRET not in json.dumps(recs) + err
    st = [r for r in recs if r["event"] == "stats"][-1]
    assert st["fetches"] == NCHUNKS - 1 and st["cache_misses"] == NCHUNKS - 1
    assert st["fetched_bytes"] == SIZE - CHUNK and st["fetch_retries"] == 0


def test_regions_longer_than_the_object_are_refused(ngx, tmp_path):
    sock = str(tmp_path / "s")
    p = serve(ngx.url("mem.bin"), sock)
    c = FcClient([SIZE + CHUNK])
    try:
        c.handshake(sock)
        rc, err = finish(p)
    finally:
        c.close()
    assert rc == 2 and "source too short" in err, err


def test_stats_records_show_fetch_progress(ngx, tmp_path):
    rc, err, recs = restore(ngx, ngx.url("mem.bin"), str(tmp_path / "s"), "--stats-interval",
                            "0.01", "--cache", str(tmp_path / "cache"))
    assert rc == 0, err
    st = [r for r in recs if r["event"] == "stats"]
    assert len(st) >= 2
    for key in ("fetched_bytes", "cache_hits", "cache_misses", "in_flight", "fetches"):
        assert all(key in r for r in st), key
    assert set(st[-1]["fetch_latency_us"]) == {"p50", "p99"}
    assert st[-1]["cache_misses"] == NCHUNKS and st[-1]["fetched_bytes"] == SIZE


# -- bad input and HTTP status at start (CLI.md exit table) -------------------------------------

def test_server_ignoring_range_is_exit_2(ngx):
    r = run_tool("serve-file", "--url", ngx.url("norange/mem.bin"), "--self", "--size", "1M")
    assert r.returncode == 2, r.stderr
    assert "does not support Range requests" in r.stderr


@pytest.mark.parametrize("path,status,text", [
    ("missing.bin", 2, "HTTP 404 Not Found"),
    ("forbidden", 3, "HTTP 403 Forbidden"),
    ("unauthorized", 3, "HTTP 401 Unauthorized"),
    ("broken", 1, "HTTP 500 Internal Server Error"),
])
def test_http_status_at_start(ngx, path, status, text):
    r = run_tool("serve-file", "--url", ngx.url(path) + "?sig=" + SECRET, "--self", "--size",
                 "1M", "--retries", "2")
    assert r.returncode == status, r.stderr
    assert text in r.stderr and SECRET not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    if status == 1:                          # 5xx: retried, then given up
        assert "after 2 retries" in r.stderr
        assert len(ngx.requests()) == 3


def test_bearer_header(ngx, tmp_path):
    url = ngx.url("auth/mem.bin")
    r = run_tool("serve-file", "--url", url, "--self", "--size", "1M")
    assert r.returncode == 3 and "401" in r.stderr, r.stderr
    rc, err, recs = restore(ngx, url, str(tmp_path / "s"), "--header",
                            "Authorization: Bearer " + TOKEN)
    assert rc == 0, err
    assert TOKEN not in json.dumps(recs) + err


def test_bad_url_options_are_exit_2(ngx, tmp_path):
    for args, text in [(["--file", "/dev/null", "--cache", "/tmp"], "--cache goes with --url"),
                       (["--url", ngx.url("mem.bin"), "--chunk", "3000"], "power of two"),
                       (["--url", ngx.url("mem.bin"), "--header", "no colon " + SECRET],
                        "NAME: VALUE"),
                       (["--url", "ftp://127.0.0.1/x"], "http:// or https://"),
                       (["--url", ngx.url("mem.bin"), "--zero"], "exactly one source"),
                       (["--zero", "--fill", "idle"], "--fill idle needs --file or --url")]:
        r = run_tool("serve-file", *args, "--self", "--size", "1M")
        assert r.returncode == 2 and text in r.stderr, (args, r.stderr)
        assert SECRET not in r.stderr
    r = run_tool("watch", "--self", "--fill", "idle")
    assert r.returncode == 2 and "--fill" in r.stderr


def test_timeout_at_start_is_retried_then_exit_1():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)                     # the kernel accepts the connection; nobody ever answers
    try:
        r = run_tool("serve-file", "--url", "http://127.0.0.1:%d/x" % s.getsockname()[1],
                     "--self", "--size", "1M", "--timeout", "0.3", "--retries", "1")
    finally:
        s.close()
    assert r.returncode == 1 and "timed out (after 1 retries)" in r.stderr, r.stderr


# -- faults mid-restore -------------------------------------------------------------------------

class _LyingHandler(http.server.BaseHTTPRequestHandler):
    """Serves DATA with correct Range answers for the first request, then answers every
    request with the bytes of the range asked for but a Content-Range one page off."""
    protocol_version = "HTTP/1.1"
    data = b""
    count = 0

    def do_GET(self):
        a, b = (int(x) for x in self.headers["Range"].split("=")[1].split("-"))
        type(self).count += 1
        shift = 0 if self.count == 1 else PS
        body = self.data[a:b + 1]
        self.send_response(206)
        self.send_header("Content-Range", "bytes %d-%d/%d" % (a + shift, b + shift,
                                                              len(self.data)))
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_wrong_content_range_is_a_serving_failure(tmp_path):
    data = random.Random(3).randbytes(SIZE)
    _LyingHandler.data, _LyingHandler.count = data, 0
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LyingHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    sock = str(tmp_path / "s")
    try:
        p = serve("http://127.0.0.1:%d/m" % srv.server_address[1], sock)
        c = FcClient([SIZE])
        try:
            c.handshake(sock)
            assert c.touch(0, 0, CHUNK) == data[:CHUNK]           # from the first answer
            with pytest.raises(TimeoutError):                     # never a wrong page
                c.touch(0, 5 * CHUNK, PS, timeout=3)
            rc, err = finish(p)
        finally:
            c.close()
    finally:
        srv.shutdown()
        srv.server_close()
    assert rc == 1 and "wrong Content-Range" in err, err


PAUSING_PEER = r"""
import sys
sys.path.insert(0, %r)
from fc_client import FcClient
size, n = int(sys.argv[2]), int(sys.argv[3])
data = open(sys.argv[4], "rb").read()
c = FcClient([size])
c.handshake(sys.argv[1])
first = c.touch(0, 0, n * 4096)
print("paused", "ok" if first == data[:n * 4096] else "bad", flush=True)
sys.stdin.readline()
print("ok" if not c.mismatches(0, data) else "bad", flush=True)
"""


def test_server_death_mid_restore_retries_then_kills_the_peer(ngx, tmp_path):
    """The peer pauses after N pages (all in the first chunk); nginx is stopped; the peer goes
    on: the tool retries (counted), fails, SIGKILLs the peer, exit 1."""
    sock = str(tmp_path / "s")
    src = ngx.put("copy.bin", ngx.data)
    p = serve(ngx.url("mem.bin"), sock, "--retries", "2", "--timeout", "2",
              "--kill-peer-on-error")
    peer = subprocess.Popen([sys.executable, "-c", PAUSING_PEER % os.path.join(ROOT, "tests"),
                             sock, str(SIZE), "16", src], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert peer.stdout.readline().split() == ["paused", "ok"]
        ngx.stop()
        peer.stdin.write("go\n")
        peer.stdin.flush()
        rc, err = finish(p)
        peer.wait(20)
    finally:
        if peer.poll() is None:
            peer.kill()
    assert rc == 1 and "after 2 retries" in err, err
    assert peer.returncode == -9 and peer.stdout.read() == ""     # killed, never read a zero
    recs = records(p)
    assert any(r["event"] == "killed_peer" for r in recs)
    assert [r for r in recs if r["event"] == "stats"][-1]["fetch_retries"] == 2


def test_object_replaced_mid_restore_is_a_serving_failure(ngx, tmp_path):
    sock = str(tmp_path / "s")
    p = serve(ngx.url("mem.bin"), sock, "--fetchers", "1")
    c = FcClient([SIZE])
    try:
        c.handshake(sock)
        assert c.touch(0, 0, CHUNK) == ngx.data[:CHUNK]
        ngx.put("mem.bin", random.Random(8).randbytes(SIZE), mtime=1_700_000_100)
        with pytest.raises(TimeoutError):                     # never a page of the new object
            c.touch(0, 9 * CHUNK, PS, timeout=3)
        rc, err = finish(p)
    finally:
        c.close()
    assert rc == 1 and "changed during the restore" in err, err
    assert 412 in [r[2] for r in ngx.requests()]


def test_https_with_cacert(ngx, tmp_path):
    openssl = need_program("openssl", "openssl")
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    ngs = Nginx(tmp_path / "nginx-tls", cert=cert, key=key)
    try:
        ngs.data = ngx.data
        ngs.put("mem.bin", ngx.data)
        url = ngs.url("mem.bin")
        r = run_tool("serve-file", "--url", url, "--self", "--size", "1M")
        assert r.returncode == 1 and "--cacert" in r.stderr, r.stderr
        rc, err, _ = restore(ngs, url, str(tmp_path / "s"), "--cacert", cert)
        assert rc == 0, err
    finally:
        ngs.stop()


# -- fetch scheduling (nginx /slow/: chunk 1 takes 3 s, chunk 10 is instant, others 15 s) ------

def test_a_fetcher_stays_free_for_faults(ngx, tmp_path):
    """--fill idle keeps the other fetcher busy with 15-second chunks; a fault in chunk 10 is
    served at once by the fetcher kept for faults (without it: after 15 s)."""
    sock = str(tmp_path / "s")
    p = serve(ngx.url("slow/mem.bin"), sock, "--fetchers", "2", "--fill", "idle")
    c = FcClient([SIZE])
    try:
        c.handshake(sock)
        time.sleep(0.3)                             # the fill has taken chunks 1, then 2...
        assert c.touch(0, 10 * CHUNK, PS, timeout=8) == ngx.data[10 * CHUNK:10 * CHUNK + PS]
    finally:
        c.close()
    assert finish(p)[0] == 0


def covering(ngx, off):
    """The logged range GETs (not the probe) whose range holds byte ``off``."""
    out = []
    for r in ngx.requests():
        g = bounds(r)
        if g and g[0] <= off <= g[1] and r[1] != "bytes=0-0":
            out.append(r[1])
    return out


def _touch_while_filling(ngx, sock, location, page, *extra):
    """serve-file --fill idle from ``location`` (a slow one, where chunk 1 takes 3 s), the
    peer's handshake, and a touch of ``page`` (its bytes checked) once the fill's GET from
    chunk 1 is out; returns the tool and the peer (for the caller to close)."""
    p = serve(ngx.url(location), sock, "--fetchers", "2", "--fill", "idle", *extra)
    c = FcClient([SIZE])
    try:
        c.handshake(sock)
        time.sleep(0.3)                             # the fill is fetching chunk 1
        assert c.touch(0, page, PS, timeout=15) == ngx.data[page:page + PS]
    except BaseException:
        c.close()
        raise
    return p, c


def test_a_fault_in_a_chunk_in_flight_waits_for_that_fetch(ngx, tmp_path):
    p, c = _touch_while_filling(ngx, str(tmp_path / "s"), "slow/mem.bin", CHUNK + 7 * PS,
                                "--stats-interval", "0.1")
    c.close()
    assert finish(p)[0] == 0
    # the fill's request (chunk 1 and those after it, one background request) was the only one
    # for that page: no second GET (nginx logs the request the handler broke off at its end)
    st = [r for r in records(p) if r["event"] == "stats"]
    assert max(r["in_flight"] for r in st) == 1 and st[-1]["fetch_waits"] >= 1
    ngx.stop()
    assert len(covering(ngx, CHUNK + 7 * PS)) == 1, ngx.requests()


# -- the cache ----------------------------------------------------------------------------------

def test_cache_second_restore_with_new_signature_fetches_nothing(ngx, tmp_path):
    cache = str(tmp_path / "cache")
    rc, err, _ = restore(ngx, ngx.url("mem.bin") + "?sig=one", str(tmp_path / "s1"),
                         "--cache", cache)
    assert rc == 0, err
    assert len(chunk_gets(ngx)) == NCHUNKS
    ngx.clear_log()
    rc, err, recs = restore(ngx, ngx.url("mem.bin") + "?sig=two", str(tmp_path / "s2"),
                            "--cache", cache)
    assert rc == 0, err
    assert [r[1] for r in ngx.requests()] == ["bytes=0-0"]      # the pinning probe only
    st = [r for r in recs if r["event"] == "stats"][-1]
    assert st["cache_hits"] == NCHUNKS and st["cache_misses"] == 0 and st["fetched_bytes"] == 0
    assert SECRET not in "".join(open(os.path.join(cache, d, "meta.json")).read()
                                 for d in os.listdir(cache))


@pytest.mark.parametrize("fill", [False, True], ids=["faults", "fill-idle"])
def test_cache_shared_by_two_processes(ngx, tmp_path, fill):
    # with --fill idle, requests of several chunks meet the other process's chunk locks
    cache = str(tmp_path / "cache")
    socks = [str(tmp_path / "a"), str(tmp_path / "b")]
    procs = [serve(ngx.url("mem.bin"), s, "--cache", cache, *(["--fill", "idle"] if fill
                                                                  else [])) for s in socks]
    clients = [FcClient([SIZE]) for _ in socks]
    bad = []
    try:
        for c, s in zip(clients, socks):
            c.handshake(s)
        ts = [threading.Thread(target=lambda c=c: bad.append(c.mismatches(0, ngx.data)))
              for c in clients]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    finally:
        for c in clients:
            c.close()
    assert bad == [[], []]
    for p in procs:
        assert finish(p)[0] == 0
    got = chunks_fetched(ngx)
    if not fill:
        assert sorted(got) == list(range(NCHUNKS)), [r[1] for r in ngx.requests()]  # once each
    else:       # a fault ahead of a request for many chunks may get one on its own (see below)
        assert set(got) == set(range(NCHUNKS)) and len(got) < 2 * NCHUNKS, got


def test_unwritable_cache_serves_without_it_and_says_so_once(ngx, tmp_path):
    (tmp_path / "file").write_text("")
    rc, err, recs = restore(ngx, ngx.url("mem.bin"), str(tmp_path / "s"), "--cache",
                            str(tmp_path / "file" / "cache"))
    assert rc == 0, err
    warn = [r for r in recs if r["event"] == "warning" and "without a cache" in r["message"]]
    assert len(warn) == 1


def test_full_cache_serves_without_it_and_says_so_once(ngx, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        rc, err, recs = restore(ngx, ngx.url("mem.bin"), str(tmp_path / "s"), "--cache",
                                str(mnt))
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
    assert rc == 0, err
    warn = [r for r in recs if r["event"] == "warning" and "without a cache" in r["message"]]
    assert len(warn) == 1 and "No space" in warn[0]["message"]


# -- --prefetch, --record, --fill idle ----------------------------------------------------------

def _record(ngx, tmp_path, pages):
    """A working set recorded by a restore whose peer touches ``pages`` in that order; the
    access log is cleared after it.  Returns the file's path."""
    ws = str(tmp_path / "ws")
    p = serve(ngx.url("mem.bin"), str(tmp_path / "s1"), "--record", ws)
    c = FcClient([SIZE])
    try:
        c.handshake(str(tmp_path / "s1"))
        c.touch_pages(0, pages)
    finally:
        c.close()
    assert finish(p)[0] == 0
    ngx.clear_log()
    return ws


def test_prefetch_of_a_recorded_working_set_fetches_it_before_the_peer_comes(ngx, tmp_path):
    pages = [c * CHUNK + k * PS for c in (3, 7, 11) for k in (0, 5, 9)]
    ws = _record(ngx, tmp_path, pages)
    sock = str(tmp_path / "s2")
    p = serve(ngx.url("mem.bin"), sock, "--prefetch", ws)
    c = FcClient([SIZE])
    try:
        want = {"bytes=%d-%d" % (k * CHUNK, (k + 1) * CHUNK - 1) for k in (3, 7, 11)}
        deadline = time.monotonic() + 20
        while not want <= {r[1] for r in chunk_gets(ngx)} and time.monotonic() < deadline:
            time.sleep(0.02)                # fetched before the peer (Firecracker) connects
        assert want <= {r[1] for r in chunk_gets(ngx)}
        c.handshake(sock)
        wait_record(p, "prefetch_done")     # installed with no fault (the peer waits for it)
        assert c.mismatches(0, ngx.data) == []
    finally:
        c.close()
    st = finished_ok(p)
    assert st["prefetch_pages"] >= len(pages)
    ranges = [r[1] for r in chunk_gets(ngx)]
    assert len(ranges) == len(set(ranges))                # a fault never fetched a chunk again


def test_a_prefetch_list_in_any_order_is_fetched_in_few_long_requests(ngx, tmp_path):
    # recorded from the last chunk down to chunk 1 (chunk 0 comes with the probe): one GET
    # takes the chunk at the head of the list and the queued ones before it
    ws = _record(ngx, tmp_path, [k * CHUNK + 3 * PS for k in range(NCHUNKS - 1, 0, -1)])
    sock = str(tmp_path / "s2")
    p = serve(ngx.url("mem.bin"), sock, "--prefetch", ws)
    c = FcClient([SIZE])
    try:
        c.handshake(sock)
        wait_record(p, "prefetch_done")
        assert c.mismatches(0, ngx.data) == []
    finally:
        c.close()
    finished_ok(p)
    assert [r[1] for r in chunk_gets(ngx)] == ["bytes=0-%d" % (CHUNK - 1),
                                               "bytes=%d-%d" % (CHUNK, SIZE - 1)]


def test_a_fault_ahead_of_a_slow_background_request_is_fetched_on_its_own(ngx, tmp_path):
    # --fill's one request for chunks 1-15 comes at 64 KiB/s (/slow/: chunk 1 alone takes 3 s,
    # chunk 10 would come after 36 s); a fault in chunk 10 gets its own GET (/slow/ serves
    # ranges from 2621440 at full speed), and the long request skips those bytes
    sock = str(tmp_path / "s")
    p = serve(ngx.url("slow/mem.bin"), sock, "--fetchers", "2", "--fill", "idle")
    c = FcClient([SIZE])
    try:
        c.handshake(sock)
        deadline = time.monotonic() + 5
        while "bytes=0-%d" % (CHUNK - 1) not in [r[1] for r in ngx.requests()] and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)                             # the fill's request for chunks 1-15 is out
        assert c.touch(0, 10 * CHUNK + 3 * PS, PS, timeout=10) == \
            ngx.data[10 * CHUNK + 3 * PS:10 * CHUNK + 4 * PS]      # not behind chunks 1-9
        assert "bytes=%d-%d" % (10 * CHUNK, 11 * CHUNK - 1) in [r[1] for r in ngx.requests()]
    finally:
        c.close()
    assert finish(p)[0] == 0


def test_a_background_request_broken_off_resumes_after_its_last_whole_chunk(ngx, tmp_path):
    # --fill's GET for chunks 1-N comes at 64 KiB/s (/cut/: chunk 1 takes 3 s, chunk 2 4 s
    # more); once chunk 1 is in (the peer has a page of it), nginx is stopped mid-chunk 2 and
    # started again: the retry asks for chunks 2-N only (at full speed), every page is right
    p, c = _touch_while_filling(ngx, str(tmp_path / "s"), "cut/mem.bin", CHUNK + 5 * PS,
                                "--retries", "5")
    try:
        ngx.stop()
        ngx.start()
        wait_record(p, "fill_done")
        assert c.mismatches(0, ngx.data) == []
    finally:
        c.close()
    st = finished_ok(p)
    assert st["fetch_retries"] >= 1
    # nginx logs no request it broke off itself: the log has the probe (chunk 0) and the
    # retry, which starts at chunk 2 and asks for more; no GET had chunk 1 again
    gets = [bounds(r) for r in ngx.requests() if r[1] != "bytes=0-0"]
    retry = [g for g in gets if g[0] == 2 * CHUNK]
    assert len(retry) == 1 and retry[0][1] >= 3 * CHUNK - 1, gets
    assert not [g for g in gets if g[0] <= CHUNK <= g[1]], gets


def _fill_then_verify_without_source(srv, sock, src_args, ngx, stop_source):
    p = start_tool("serve-file", *src_args, "--firecracker-socket", sock, "--fill", "idle")
    c = FcClient([SIZE])
    try:
        c.handshake(sock)
        assert c.touch(0, 3 * CHUNK, PS) == ngx.data[3 * CHUNK:3 * CHUNK + PS]
        done = wait_record(p, "fill_done")
        stop_source()
        assert c.mismatches(0, ngx.data) == []
    finally:
        c.close()
    st = finished_ok(p)
    late = [r for r in records(p) if r["event"] == "pagefault" and r["t"] > done["t"]]
    assert st["faults"] <= 2 and not late             # after fill_done nothing faults
    assert done["pages"] + st["pages_copy"] == SIZE // PS    # each page installed once
    return st


def test_fill_idle_from_url_completes_the_restore(ngx, tmp_path):
    st = _fill_then_verify_without_source(ngx, str(tmp_path / "s"),
                                          ["--url", ngx.url("mem.bin"), "--chunk", "256K"],
                                          ngx, ngx.stop)
    assert st["fill_pages"] > 0
    assert sorted(chunks_fetched(ngx)) == list(range(NCHUNKS))   # each once (chunk 0: the probe)
    assert len(chunk_gets(ngx)) < NCHUNKS                    # in runs of several chunks


def test_fill_idle_from_file(ngx, tmp_path):
    path = str(tmp_path / "mem.bin")
    with open(path, "wb") as f:
        f.write(ngx.data)
    st = _fill_then_verify_without_source(ngx, str(tmp_path / "s"), ["--file", path], ngx,
                                          lambda: os.unlink(path))
    assert st["fill_pages"] > 0


def test_fill_idle_prints_progress(ngx, tmp_path):
    err = tmp_path / "err"
    with open(err, "w") as ef:
        p = subprocess.Popen([sys.executable, TOOL, "serve-file", "--url", ngx.url("mem.bin"),
                              "--firecracker-socket", str(tmp_path / "s"), "--fill", "idle"],
                             stderr=ef, stdout=subprocess.DEVNULL)
        c = FcClient([SIZE])
        try:
            c.handshake(str(tmp_path / "s"))
            deadline = time.monotonic() + 30
            while "fill_done" not in err.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            c.close()
            p.wait(20)
    text = err.read_text()
    assert "fill: " in text and "MiB" in text and "fill_done" in text, text


# -- the other targets: --pid (detach installs the rest from the URL) and -- CMD ----------------

ptrace_ok = pytest.mark.skipif(os.geteuid() != 0 or os.uname().machine != "x86_64",
                               reason="--pid and -- CMD need root and x86_64")


@ptrace_ok
def test_url_pid_target_detach_installs_every_page_from_the_url(ngx):
    from conftest import stop_tool
    from test_serve_targets import Target, page_sums
    t = Target(96)                          # 384 KiB: chunk 0 (the probe's) and chunk 1
    try:
        p = start_tool("serve-file", "--url", ngx.url("mem.bin"), "--chunk", "256K", "--pid",
                       t.pid, "--range", t.rng(0, 96), "--dontneed", "--duration", "0.3")
        recs, err = stop_tool(p, None)
        assert p.returncode == 0, err
        st = [r for r in recs if r["event"] == "stats"][-1]
        # chunk 1 only: readahead stops at the end of the regions' data
        assert st["drained_pages"] == 96 and st["fetched_bytes"] == CHUNK
        time.sleep(0.5)
        assert sorted(r[1] for r in ngx.requests()) == ["bytes=0-262143", "bytes=262144-524287"]
        assert t.pages(0, 96) == page_sums(ngx.data[:96 * PS])
    finally:
        t.close()


@ptrace_ok
def test_url_cmd_ranges_come_from_the_url(ngx):
    from test_serve_targets import CMD_AT, PROG, md5
    r = run_tool("serve-file", "--url", ngx.url("mem.bin"), "--chunk", "256K", "--no-fault-log",
                 "--range", "0x%x:%d" % (CMD_AT + PS, 16 * PS), "--", sys.executable, "-c", PROG,
                 40, hex(CMD_AT), timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [md5(bytes(PS) + ngx.data[:16 * PS] + bytes(23 * PS))]


def test_url_self_target(ngx):
    r = run_tool("serve-file", "--url", ngx.url("mem.bin") + "?sig=" + SECRET, "--self",
                 "--size", "4M", "--chunk", "256K")
    assert r.returncode == 0, r.stderr
    assert "every byte verified" in r.stderr and SECRET not in r.stderr


# -- memory: a cold restore keeps a few chunks, not a second copy of the object -----------------

def _rss_anon(pid):
    for line in open("/proc/%d/status" % pid):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no RssAnon")


def _resident(path):
    """Bytes of ``path`` in the page cache (mincore of a fresh mapping)."""
    import ctypes
    import uffdtool as u
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = u.mmap_anon(size, u.PROT_READ, u.MAP_SHARED, fd=fd)
    finally:
        os.close(fd)
    libc = ctypes.CDLL(None, use_errno=True)
    vec = (ctypes.c_ubyte * (-(-size // PS)))()
    try:
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0, \
            os.strerror(ctypes.get_errno())
    finally:
        u.munmap(addr, size)
    return sum(v & 1 for v in vec) * PS


@pytest.mark.parametrize("cache", [False, True], ids=["no-cache", "cache"])
def test_cold_restore_gives_back_chunks_all_installed(ngx, tmp_path, cache):
    """A sequential cold restore of 64 MiB (in 1 MiB chunks): each chunk's memory is given
    back once all its pages are installed (the handler grows by a pool of chunks, not by the
    object), every page is the object's; with --cache the chunks go to the data file through
    the page cache (so the object is in memory once, and the next restore reads it there),
    and a second restore fetches nothing and is verified again."""
    size = 64 << 20
    data = random.Random(11).randbytes(size)
    ngx.put("big.bin", data)
    extra = ["--cache", str(tmp_path / "cache")] if cache else []
    sock = str(tmp_path / "s")
    p = start_tool("serve-file", "--url", ngx.url("big.bin"), "--firecracker-socket", sock,
                   "--chunk", "1M", "--readahead", "64", "--no-fault-log", *extra)
    before = _rss_anon(p.p.pid)
    c = FcClient([size])
    try:
        c.handshake(sock)
        assert c.mismatches(0, data) == []
        grown = _rss_anon(p.p.pid) - before
    finally:
        c.close()
    st = finished_ok(p)
    # each chunk fetched once (the first comes with the size probe unless --cache), though
    # the peer's memmove reads backwards: readahead follows it and skips chunks given back
    assert st["fetched_bytes"] == size - (0 if cache else 1 << 20)
    gets = [r[1] for r in chunk_gets(ngx)]
    assert len(gets) == len(set(gets)) and st["released_chunks"] >= 60
    assert grown < size // 2, "the handler kept %d MiB" % (grown >> 20)
    if cache:
        entry = [d for d in os.listdir(tmp_path / "cache")][0]
        path = tmp_path / "cache" / entry / "data"
        assert _resident(str(path)) > size * 3 // 4      # the next restore reads memory
        with open(path, "rb") as f:
            assert f.read() == data                      # written whole, byte for byte
        n = len(chunk_gets(ngx))
        p = start_tool("serve-file", "--url", ngx.url("big.bin"), "--firecracker-socket", sock,
                       "--chunk", "1M", "--readahead", "64", "--no-fault-log", *extra)
        c = FcClient([size])
        try:
            c.handshake(sock)
            assert c.mismatches(0, data) == []
        finally:
            c.close()
        assert finished_ok(p)["cache_hits"] == size >> 20
        assert len(chunk_gets(ngx)) == n                 # all from the cache


def test_a_chunk_given_back_is_fetched_again_when_needed(ngx):
    """After its memory is given back, a chunk is absent again: the next need (here reading the
    source, as --self's verification does; a forked process's fault alike) fetches it again
    and gets the object's bytes."""
    import uffdtool as u
    src = u.UrlSource(ngx.url("mem.bin"), chunk=CHUNK)
    try:
        h = u.Handler(src)
        h._present = bytearray(b"\x01" * (SIZE // PS))   # as if every page were installed
        src.ensure(0, PS)
        src.ensure(CHUNK, PS)                             # on to chunk 1: chunk 0 given back
        assert src.have[0] == 0 and src.stats_fields()["released_chunks"] == 1
        assert u.source_bytes(src, 0, 2 * CHUNK) == ngx.data[:2 * CHUNK]
        assert [r[1] for r in chunk_gets(ngx)].count("bytes=0-%d" % (CHUNK - 1)) >= 1
    finally:
        src.close()

