"""uffdtool report: synthetic logs with known faults, real watch/serve-file logs, bad input,
and the HTML in a real browser (headless Chromium)."""
import json
import os
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib

import pytest

from conftest import need_program, needs_uffd, run_tool, start_tool, uffdtool

PS = 4096
HEAP = 0x555500000000                  # 64 pages: one column per page
ANON = 0x7f0000000000                  # 1000 pages: 8 pages per column, 125 columns
SVG = "{http://www.w3.org/2000/svg}"


def write_log(path, records, cut=None):
    with open(str(path), "w") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
        if cut:
            f.write(cut)
    return str(path)


def synthetic(heap=HEAP, anon=ANON, pid=100, stats=True):
    """A log of one process with two mappings; faults at bin centres (dt 0.02 s from 0.1 s).
    Returns (records, faults as (t, address, us or None))."""
    faults = []
    for i in range(40):                                  # heap: page i % 64 at row i
        faults.append((0.11 + 0.02 * i, heap + (i * 7 % 64) * PS, 3.0 + i))
    for i in range(150):                                 # anon: spread over its 1000 pages
        faults.append((0.105 + 0.79 * i / 149, anon + (i * 37 % 1000) * PS + 123,
                       None if i % 5 == 0 else 0.5 + i * 11.0))
    faults.append((0.5, heap + 3 * PS, 2.0))             # a refault (the page faulted again)
    faults.sort()
    recs = [{"t": 0.001, "event": "start", "command": "watch", "target": "cmd",
             "argv": ["uffdtool", "watch", "--", "./app", "-x"], "time": 1764586800.0},
            {"t": 0.002, "event": "ready", "ufds": [], "pid": None, "regions": 0},
            {"t": 0.003, "event": "mappings", "pid": pid, "mappings": [
                {"start": heap, "len": 64 * PS, "name": "[heap]"},
                {"start": anon, "len": 1000 * PS, "name": ""}]}]
    for t, a, us in faults:
        r = {"t": t, "event": "pagefault", "address": a, "flags": ["write"], "ptid": pid,
             "resolved": "zero", "pages": 1, "pid": pid, "ufd": 5}
        if us is not None:
            r["us"] = us
        recs.append(r)
    recs.append({"t": 0.6, "event": "remove", "start": anon, "end": anon + 2 * PS, "ufd": 5})
    timed = [us for _, _, us in faults if us is not None]
    if stats:
        st = uffdtool.Stats()
        st.latencies(timed)
        recs.append({"t": 0.95, "event": "stats", **st.record()})
    recs.append({"t": 0.96, "event": "exit", "status": 0, "reason": "done"})
    return recs, faults


def expected_cells(faults, start, npages, t0=0.1, dt=0.02):
    ppc = -(-npages // 128)
    cells = {}
    for t, a, _ in faults:
        p = (a - start) // PS
        if 0 <= p < npages:
            k = (int((t - t0) / dt), p // ppc)
            cells[k] = cells.get(k, 0) + 1
    return cells, ppc


def heat_groups(svg_path):
    root = ET.parse(svg_path).getroot()
    return {g.get("data-area"): g for g in root.iter(SVG + "g") if g.get("class") == "heatmap"}


def inline_svgs(html):
    """Every inline <svg> of the HTML page, parsed (so each must be well-formed XML)."""
    return [ET.fromstring(m) for m in re.findall(r"<svg .*?</svg>", html, re.S)]


# -- latency_hist (Stats) ---------------------------------------------------------------------

def test_latency_bucket_bounds():
    b = uffdtool.latency_bucket
    assert [b(x) for x in (0, 0.5, 1, 1.01, 2, 3, 4, 4.1, 1000, 1024, 1025)] == \
        [0, 0, 0, 1, 1, 2, 2, 3, 10, 10, 11]
    assert b(16 * 1e6) == 24 and b(1e9) == 24                  # 16 s and beyond: last bucket


def test_stats_latency_hist_counts_every_sample():
    st = uffdtool.Stats(max_samples=8)                          # the array drops samples
    st.latencies([0.5, 1.5, 3.0])
    for us in [4.0, 4.1, 20e6] + [100.0] * 20:
        st.latency(us)
    rec = st.record()
    assert rec["latency_hist"] == {"1": 1, "2": 1, "4": 2, "8": 1, "128": 20, "16777216": 1}
    assert sum(rec["latency_hist"].values()) == 26 > rec["latency_us"]["samples"]


@needs_uffd
def test_serve_fast_loop_hist_sums_to_samples(tmp_path):
    (tmp_path / "m.bin").write_bytes(os.urandom(1 << 20))
    r = run_tool("serve-file", "--file", tmp_path / "m.bin", "--self", "--size", "1M", "--json",
                 "--no-fault-log", "--quiet")
    assert r.returncode == 0, r.stderr
    st = [json.loads(x) for x in r.stdout.splitlines() if '"stats"' in x][-1]
    assert st["faults"] == 256 and st["latency_us"]["samples"] == 32          # 1 in 8 timed
    assert sum(st["latency_hist"].values()) == 32


# -- a synthetic log: the test bins it itself -------------------------------------------------

def test_svg_heat_cells_axes_curve_histogram(tmp_path):
    recs, faults = synthetic()
    log = write_log(tmp_path / "s.jsonl", recs)
    r = run_tool("report", log, "-o", tmp_path / "s.svg")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    groups = heat_groups(str(tmp_path / "s.svg"))
    assert set(groups) == {"[heap]", "anon"}
    for name, start, npages in (("[heap]", HEAP, 64), ("anon", ANON, 1000)):
        g = groups[name]
        want, ppc = expected_cells(faults, start, npages)
        assert (float(g.get("data-t0")), float(g.get("data-dt"))) == (0.1, 0.02)
        assert int(g.get("data-rows")) == 40 and int(g.get("data-bpc")) == ppc * PS
        got = {(int(c.get("data-r")), int(c.get("data-c"))): int(c.get("data-n"))
               for c in g.iter(SVG + "rect") if c.get("class") == "cell"}
        assert got == want
        assert len([c for c in g.iter(SVG + "rect") if c.get("class") == "cell"]) == len(want)
        labels = [t.text for t in g.iter(SVG + "text") if t.get("class") == "ylabel"]
        assert labels == ["%.2f" % (0.1 + 0.02 * r) for r in range(0, 40, 5)]
        xl = [int(t.text, 16) for t in g.iter(SVG + "text") if t.get("class") == "xlabel"]
        assert xl[0] == start and xl[-1] == start + -(-npages // ppc) * ppc * PS
        assert all((x - start) % (ppc * PS) == 0 for x in xl)
        assert sum(got.values()) == sum(1 for f in faults if start <= f[1] < start +
                                        npages * PS)          # the heap's refault included

    r = run_tool("report", log, "-o", tmp_path / "s.html")
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "s.html").read_text()
    svgs = inline_svgs(html)
    curve = [p for s in svgs for p in s.iter(SVG + "polyline") if p.get("class") == "curve"]
    distinct = len({a // PS for _, a, _ in faults})
    assert [int(c.get("data-last-pages")) for c in curve] == [distinct]
    bars = [b for s in svgs for b in s.iter(SVG + "rect") if b.get("class") == "bar"]
    timed = [us for _, _, us in faults if us is not None]
    assert len(bars) == 25 and sum(int(b.get("data-n")) for b in bars) == len(timed)
    for b in bars:                                   # each bar holds its bucket's faults
        us = int(b.get("data-us"))
        assert int(b.get("data-n")) == sum(1 for x in timed if us / 2 < x <= us or
                                           (us == 1 and x <= 1))
    assert "uffdtool watch -- ./app -x" in html and "2025-12-01 11:00:00 UTC" in html
    assert "remove" in html and "[heap]" in html


def test_histogram_from_pagefault_us_without_stats(tmp_path):
    recs, faults = synthetic(stats=False)
    log = write_log(tmp_path / "s.jsonl", recs)
    r = run_tool("report", log, "-o", tmp_path / "s.html")
    assert r.returncode == 0, r.stderr
    bars = [b for s in inline_svgs((tmp_path / "s.html").read_text())
            for b in s.iter(SVG + "rect") if b.get("class") == "bar"]
    assert sum(int(b.get("data-n")) for b in bars) == sum(1 for f in faults if f[2] is not None)


def test_terminal_summary_fits_and_counts(tmp_path):
    recs, faults = synthetic()
    log = write_log(tmp_path / "s.jsonl", recs)
    r = run_tool("report", log)                      # stdout is a pipe: 80 columns
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(len(x) for x in lines) <= 80
    heap = [x for x in lines if x.strip().startswith("[heap] 0x%x" % HEAP)][0].split()
    pages = len({a // PS for _, a, _ in faults if HEAP <= a < HEAP + 64 * PS})
    assert heap[2:5] == [str(pages), "%.1f%%" % (100.0 * pages / 64), str(pages + 1)]
    assert "pid 100" in r.stdout and "remove 1" in r.stdout and "p50" in r.stdout
    grid = [x for x in lines if re.match(r"\s*0\.\d\d [ 1-9|]*$", x)]   # at most 20 rows:
    assert [g.split()[0] for g in grid] == ["%.2f" % (0.1 + 0.05 * r) for r in range(16)]
    assert all(re.search("[1-9]", g) for g in grid)         # faults in every row
    wide = run_tool("report", log, "--width", "120").stdout.splitlines()
    assert max(len(x) for x in wide) <= 120 and max(len(x) for x in wide) > 80


def test_two_logs_overlap_by_mapping_offset(tmp_path):
    a_recs, a_faults = synthetic()
    b_recs, b_faults = synthetic(heap=HEAP + 0x13000000, anon=ANON - 0x2000000000, pid=222)
    # B touches 30 of A's heap pages less and 20 anon pages A never touched
    b_recs = [r for r in b_recs if not (r["event"] == "pagefault" and
                                        HEAP + 0x13000000 <= r["address"] < HEAP + 0x13000000 +
                                        30 * PS)]
    extra = [{"t": 0.9, "event": "pagefault", "address": ANON - 0x2000000000 + (980 + i) * PS,
              "pid": 222, "ufd": 5} for i in range(20)]
    b_recs = b_recs[:-2] + extra + b_recs[-2:]

    def keys(recs, heap, anon):
        out = set()
        for r in recs:
            if r["event"] == "pagefault":
                a = r["address"]
                out.add(("h", (a - heap) // PS) if heap <= a < heap + 64 * PS
                        else ("a", (a - anon) // PS))
        return out
    ka, kb = keys(a_recs, HEAP, ANON), keys(b_recs, HEAP + 0x13000000, ANON - 0x2000000000)
    both = len(ka & kb)
    la, lb = write_log(tmp_path / "a.jsonl", a_recs), write_log(tmp_path / "b.jsonl", b_recs)
    r = run_tool("report", la, lb)
    assert r.returncode == 0, r.stderr
    assert "pages in both %d · only in A %d · only in B %d · Jaccard %.3f" % (
        both, len(ka - kb), len(kb - ka), both / len(ka | kb)) in r.stdout
    assert "offset inside each mapping" in r.stdout
    r = run_tool("report", la, lb, "-o", tmp_path / "ab.html")
    html = (tmp_path / "ab.html").read_text()
    curves = [p for s in inline_svgs(html) for p in s.iter(SVG + "polyline")
              if p.get("class") == "curve"]
    assert sorted(int(c.get("data-last-pages")) for c in curves[:2]) == sorted(
        [len(ka), len(kb)])
    assert {c.get("data-log") for c in curves[:2]} == {"A", "B"}
    assert len(heat_groups_html(html)) == 4                # both logs' heat maps


def heat_groups_html(html):
    return [g for s in inline_svgs(html) for g in s.iter(SVG + "g")
            if g.get("class") == "heatmap"]


def test_mixed_processes_and_appended_runs(tmp_path):
    recs = [{"t": 0.0, "event": "start", "command": "watch"}]
    for i in range(30):                                   # two pids, interleaved
        recs.append({"t": 0.01 * i, "event": "pagefault", "address": 0x10000000 + i * PS,
                     "pid": 10 + i % 2, "ufd": 3})
    recs.append({"t": 0.0, "event": "start", "command": "watch"})           # a second run
    recs += [{"t": 0.01 * i, "event": "pagefault", "address": 0x20000000 + i * PS, "pid": 12,
              "ufd": 3} for i in range(5)]
    r = run_tool("report", write_log(tmp_path / "m.jsonl", recs))
    assert r.returncode == 0, r.stderr
    assert "2 runs" in r.stderr and "Traceback" not in r.stderr
    rows = {x.split()[1]: x for x in r.stdout.splitlines() if re.match(r"pid \d+$", x)}
    assert sorted(rows) == ["10", "11", "12"]
    assert "faults 35 · distinct pages 35 · processes 3" in r.stdout


def test_ufd_numbers_reused_by_later_processes(tmp_path):
    """Old logs without "pid" on faults: ufd -> process from exec/gone records (a closed ufd's
    number is reused by the next process)."""
    recs = [{"t": 0.0, "event": "start", "command": "watch"},
            {"t": 0.1, "event": "exec", "pid": 7, "ufd": 9},
            {"t": 0.2, "event": "pagefault", "address": 0x1000, "ufd": 9},
            {"t": 0.3, "event": "gone", "pid": 7, "ufd": 9, "reason": "exited"},
            {"t": 0.4, "event": "exec", "pid": 8, "ufd": 9},
            {"t": 0.5, "event": "pagefault", "address": 0x1000, "ufd": 9},
            {"t": 0.5, "event": "pagefault", "address": 0x2000, "ufd": 9},
            {"t": 0.6, "event": "fork", "ufd": 11, "parent_ufd": 9},
            {"t": 0.7, "event": "pagefault", "address": 0x3000, "ufd": 11}]
    rep = uffdtool.read_report(write_log(tmp_path / "u.jsonl", recs))
    got = {uffdtool._proc_label(a.proc): a.pages for a in rep.areas}
    assert got == {"pid 7": 1, "pid 8": 2, "ufd 11 (fork child)": 1}


# -- working-set files ------------------------------------------------------------------------

def test_working_set_files_v1_v2(tmp_path):
    pages = [0x5000, 0x0, 0x3000, 0x9000, 0x1000]
    v1 = tmp_path / "v1.txt"
    uffdtool.write_working_set(str(v1), pages, PS)
    r = run_tool("report", v1, "-o", tmp_path / "v1.svg")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    g = list(heat_groups(str(tmp_path / "v1.svg")).values())
    assert len(g) == 1 and float(g[0].get("data-dt")) == 1.0      # rows = touch order
    cells = {(int(c.get("data-r")), int(c.get("data-c")))
             for c in g[0].iter(SVG + "rect") if c.get("class") == "cell"}
    assert cells == {(i, p // PS) for i, p in enumerate(pages)}
    body = "".join("0x%x\n" % p for p in pages)
    head = "# uffdtool working-set v2 page_size=4096 key=offset pid=42\n"
    for name, tail, warn in (("ok", "# end pages=5\n", None), ("cut", "", "cut short"),
                             ("count", "# end pages=7\n", "pages=7 but holds 5")):
        (tmp_path / name).write_text(head + body + tail)
        r = run_tool("report", tmp_path / name)
        assert r.returncode == 0, r.stderr
        assert "distinct pages 5" in r.stdout and "pid 42" in r.stdout
        assert (warn is None and r.stderr == "") or (warn and warn in r.stderr), r.stderr


# -- bad input: one clear line, exit 2, never a traceback --------------------------------------

@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (b"\n\n", "is empty"),
    (b"hello world\n", "not a uffdtool log"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a uffdtool log"),
    (b'[{"t": 1, "event": "start"}]\n', "not a uffdtool log"),
    (b'{"a": 1}\n{"b": 2}\n', "not a uffdtool log"),
    (b'{"t":0.1,"event":"pagefault","addr', "is empty"),
])
def test_bad_logs(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_bytes(content)
    r = run_tool("report", tmp_path / "x.jsonl")
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if "warning" not in x]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_bad_usage(tmp_path):
    log = write_log(tmp_path / "s.jsonl", synthetic()[0])
    for args, msg in (([tmp_path / "nope.jsonl"], "cannot read"),
                      ([log, log, log], "one or two logs"),
                      ([log, "-o", tmp_path / "x.txt"], ".html or .svg"),
                      ([log, "--width", "20"], "at least 60"),
                      ([log, "-o", tmp_path / "no" / "dir.html"], "cannot write")):
        r = run_tool("report", *args)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, args


def test_log_cut_mid_line(tmp_path):
    recs, faults = synthetic()
    log = write_log(tmp_path / "c.jsonl", recs[:-2], cut='{"t":0.97,"event":"pagefault","ad')
    r = run_tool("report", log)
    assert r.returncode == 0
    assert "last line is cut short" in r.stderr and "Traceback" not in r.stderr
    assert "faults %d " % len(faults) in r.stdout
    # a bad line in the middle is left out with a count, the rest reported
    with open(log, "a") as f:
        f.write('x"}\nnot json\n' + json.dumps(recs[-1]) + "\n")
    r = run_tool("report", log)
    assert r.returncode == 0 and "2 line(s) that are not uffdtool records" in r.stderr


# -- real logs --------------------------------------------------------------------------------

@needs_uffd
@pytest.mark.skipif(uffdtool.ARCH != "x86_64", reason="-- CMD is x86_64 only")
def test_real_watch_cmd_log(tmp_path):
    log = tmp_path / "w.jsonl"
    r = run_tool("watch", "--log", log, "--quiet", "--", sys.executable, "-c",
                 "import os; b = bytearray(3 << 20); os.system('true')")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    faults = [x for x in recs if x["event"] == "pagefault"]
    st = [x for x in recs if x["event"] == "stats"][-1]
    r = run_tool("report", log)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "faults %d " % len(faults) in r.stdout
    assert max(len(x) for x in r.stdout.splitlines()) <= 80
    rep = uffdtool.read_report(str(log))
    assert rep.pages == len({(f.get("pid"), f["address"] // PS) for f in faults}) or \
        rep.pages == sum(p.pages for p in rep.procs.values())
    assert len(rep.procs_sorted) == len([x for x in recs if x["event"] == "exec"])
    h, _ = rep.latency_hist()
    assert sum(h) == st["latency_us"]["samples"]
    r = run_tool("report", log, "-o", tmp_path / "w.html")
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "w.html").read_text()
    assert len(heat_groups_html(html)) >= 1 and sys.executable in html


def _bench_exe(tmp_path):
    from test_serve import BENCH_C
    gcc = need_program("gcc", "gcc")
    if not os.path.exists(BENCH_C):
        pytest.skip("needs %s" % BENCH_C)
    exe = str(tmp_path / "uffd_bench")
    subprocess.run([gcc, "-O2", "-pthread", "-o", exe, BENCH_C], check=True)
    return exe


def _serve_c_toucher(tmp_path, exe, src, name, *args):
    sock = str(tmp_path / ("%s.sock" % name))
    p = start_tool("serve-file", "--file", src, "--firecracker-socket", sock, *args)
    r = subprocess.run([exe, "--fc-socket", sock, "--src", str(src), "-s", "4", "-o", "rand",
                        "--regions", "2", "-m", "file", "--timeout", "30"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["verify"] == "ok", r.stdout + r.stderr
    assert p.finish(30) == 0
    return p.log


@needs_uffd
def test_real_serve_file_logs_compare_by_source_offset(tmp_path):
    exe = _bench_exe(tmp_path)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4 << 20))
    ws = tmp_path / "ws.txt"
    a = _serve_c_toucher(tmp_path, exe, src, "a", "--record", ws)
    b = _serve_c_toucher(tmp_path, exe, src, "b", "--readahead", "4")
    recs = [json.loads(x) for x in open(a)]
    faults = [x for x in recs if x["event"] == "pagefault"]
    r = run_tool("report", a)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "region 0" in r.stdout and "region 1" in r.stdout and "Firecracker peer" in r.stdout
    assert "distinct pages %d " % len({f["address"] // PS for f in faults}) in r.stdout
    st = [x for x in recs if x["event"] == "stats"][-1]
    assert len(faults) == st["faults"] == 1024       # readahead 1: every page faults once
    r = run_tool("report", a, b)
    assert r.returncode == 0, r.stderr
    # B (readahead 4) faulted on a subset of the pages at new addresses; by source offset
    # every one of them is in A's working set
    rb = uffdtool.read_report(b)
    assert "compared by source offset" in r.stdout
    assert "only in B 0 " in r.stdout and "pages in both %d " % rb.pages in r.stdout
    # the run's own --record file: the same working set, by source offset
    r = run_tool("report", a, ws)
    assert r.returncode == 0, r.stderr
    assert "pages in both 1024 · only in A 0 · only in B 0 · Jaccard 1.000" in r.stdout
    r = run_tool("report", a, "-o", tmp_path / "a.svg")
    assert r.returncode == 0 and len(heat_groups(str(tmp_path / "a.svg"))) == 2


# -- the HTML in a real browser ---------------------------------------------------------------

def png_pixels(path):
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB/RGBA PNG (stdlib: zlib)."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif f == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + (left + prev[i]) // 2) & 255
        elif f == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) \
                    & 255
        rows.append(bytes(line))
        prev = line
    return w, h, rows, bpp


def chromium(*args, timeout=90):
    exe = need_program("chromium", "chromium")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                           "--hide-scrollbars", "--enable-logging=stderr", "--v=0",
                           "--user-data-dir=" + args[0]] + list(args[1:]),
                          capture_output=True, text=True, timeout=timeout)


def console_lines(stderr):
    return [x for x in stderr.splitlines() if ":CONSOLE" in x]


def test_html_in_headless_chromium(tmp_path):
    exe = need_program("chromium", "chromium")
    assert exe
    recs, faults = synthetic()
    log = write_log(tmp_path / "s.jsonl", recs)
    page = tmp_path / "s.html"
    assert run_tool("report", log, "-o", page).returncode == 0
    prof = str(tmp_path / "profile")
    # the console check can fail: a page with a script error shows up in the log
    bad = tmp_path / "bad.html"
    bad.write_text(page.read_text().replace("<script>", "<script>nosuchfunction();", 1))
    r = chromium(prof, "--dump-dom", bad.as_uri())
    assert console_lines(r.stderr) and 'class="js"' not in r.stdout
    # the report: no console message at all, and its script ran to the end
    r = chromium(prof, "--dump-dom", page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    assert console_lines(r.stderr) == []
    assert '<html lang="en" class="js">' in r.stdout
    shot = tmp_path / "shot.png"
    r = chromium(prof, "--screenshot=%s" % shot, "--window-size=900,700", page.as_uri())
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    assert console_lines(r.stderr) == []
    w, h, rows, bpp = png_pixels(str(shot))
    assert (w, h) == (900, 700)
    colours, ink = set(), 0
    for row in rows[::2]:
        for x in range(0, w * bpp, bpp * 2):
            px = row[x:x + 3]
            colours.add(px)
            ink += px != b"\xff\xff\xff"
    assert len(colours) > 20 and ink > 0.03 * (w // 2) * (h // 2)
    heat = {bytes.fromhex(c[1:]) for c in uffdtool.HEAT_COLOURS}
    assert colours & heat, "no heat-map colour on the screenshot"


def test_peers_fill_and_timeline(tmp_path):
    """Two Firecracker peers (``peer`` on records): each its own process with its regions,
    compared by source offset; peer-done / fill_done on the timeline."""
    recs = [{"t": 0.0, "event": "start", "command": "serve-file", "argv": ["uffdtool"],
             "time": 1.0}]
    for k, (peer, base) in enumerate(((501, 0x7f0000000000), (502, 0x7e0000000000))):
        recs.append({"t": 0.1 + k, "event": "handshake", "peer": peer, "page_size": PS,
                     "layout": [{"base": base, "size": 16 * PS, "offset": 0},
                                {"base": base + 0x100000, "size": 16 * PS,
                                 "offset": 16 * PS}]})
        for i in range(10 + k * 5):
            recs.append({"t": 0.2 + k + i * 0.01, "event": "pagefault", "peer": peer,
                         "address": base + 0x100000 + i * PS, "ufd": 4, "us": 9.0})
        recs.append({"t": 0.5 + k, "event": "fill_done", "peer": peer, "pages": 32})
        recs.append({"t": 0.6 + k, "event": "peer-done", "peer": peer})
    rep = uffdtool.read_report(write_log(tmp_path / "p.jsonl", recs))
    assert {(uffdtool._proc_label(a.proc), a.label, a.pages) for a in rep.areas} == {
        ("pid 501 (Firecracker peer)", "region 1", 10),
        ("pid 502 (Firecracker peer)", "region 1", 15)}
    assert rep.compare_by == "source offset"
    assert len(rep.page_keys({})) == 15               # the same offsets in both peers
    r = run_tool("report", tmp_path / "p.jsonl", "-o", tmp_path / "p.html")
    assert r.returncode == 0, r.stderr
    tl = [s for s in inline_svgs((tmp_path / "p.html").read_text())
          if s.get("class") == "timeline"][0]
    assert {"faults", "fill", "peers", "handshake", "fill_done", "peer-done"} <= {
        t.text for t in tl.iter(SVG + "text")}
    phases = sorted(r.get("data-tip") for r in tl.iter(SVG + "rect")
                    if r.get("class") == "phase")
    assert phases == ["0.100000-0.500000 fill of peer 501: done",
                      "0.100000-0.600000 peer 501: done",
                      "1.100000-1.500000 fill of peer 502: done",
                      "1.100000-1.600000 peer 502: done"]


def test_odd_values_are_left_out_not_a_traceback(tmp_path):
    recs, faults = synthetic()
    odd = ['{"t":NaN,"event":"pagefault","address":4096}', '{"t":-1,"event":"exit"}',
           '{"t":Infinity,"event":"remove"}', '{"t":0.5,"event":7}',
           '{"t":"x","event":"pagefault","address":1}',
           '{"t":0.5,"event":"pagefault","address":"0x1000"}',
           '{"t":0.5,"event":"pagefault","address":8192,"pid":"abc"}',
           '{"t":0.5,"event":"handshake","pid":9,"layout":[{"base":"x"}, 3]}',
           '{"t":0.5,"event":"mappings","pid":9,"mappings":[{"start":1}, "y"]}',
           '{"t":0.5,"event":"stats","latency_hist":{"x":1,"8":"y"}}']
    log = write_log(tmp_path / "o.jsonl", recs[:5])
    with open(log, "a") as f:
        f.write("\n".join(odd) + "\n")
        f.write("".join(json.dumps(r) + "\n" for r in recs[5:]))
    for args in ([], ["-o", tmp_path / "o.html"], ["-o", tmp_path / "o.svg"]):
        r = run_tool("report", log, *args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "5 line(s) that are not uffdtool records" in r.stderr     # t or event bad


def test_terminal_width_is_the_terminals(tmp_path):
    """On a terminal (a pty of 132 columns) the summary uses its width; through a pipe 80."""
    import fcntl
    import pty
    import termios
    log = write_log(tmp_path / "s.jsonl", synthetic()[0])
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        p = subprocess.Popen([sys.executable, uffdtool.__file__, "report", log], stdout=slave,
                             stderr=subprocess.PIPE, env=env)
        os.close(slave)
        slave = None
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:                         # EIO: the child closed the pty
                break
            if not chunk:
                break
            out += chunk
        assert p.wait(30) == 0
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)
    widths = [len(x) for x in out.decode().replace("\r", "").splitlines()]
    assert 80 < max(widths) <= 132


@needs_uffd
def test_prefetch_phase_of_a_real_restore_on_the_timeline(tmp_path):
    """A real serve-file restore with --prefetch writes one prefetch_done record (the end of
    the prefetch phase), and the report draws that phase on its timeline."""
    exe = _bench_exe(tmp_path)
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4 << 20))
    ws = tmp_path / "ws.txt"
    _serve_c_toucher(tmp_path, exe, src, "rec", "--record", ws)
    log = _serve_c_toucher(tmp_path, exe, src, "pre", "--prefetch", ws)
    recs = [json.loads(x) for x in open(log)]
    done = [x for x in recs if x["event"] == "prefetch_done"]
    st = [x for x in recs if x["event"] == "stats"][-1]
    assert len(done) == 1 and done[0]["pages"] == st["prefetch_pages"] > 0
    r = run_tool("report", log, "-o", tmp_path / "pre.html")
    assert r.returncode == 0, r.stderr
    tl = [s for s in inline_svgs((tmp_path / "pre.html").read_text())
          if s.get("class") == "timeline"][0]
    assert "prefetch" in {t.text for t in tl.iter(SVG + "text")}
    tips = [x.get("data-tip") for x in tl.iter(SVG + "rect") if x.get("class") == "phase"]
    assert len(tips) == 1 and tips[0].endswith("prefetch: done")
