"""The pure helpers, tested directly: no root, no userfaultfd, no other process (this file must
pass as an unprivileged user). Each test feeds values and compares with what the README and the
docstrings promise: page runs for prefetch, region cuts, the Firecracker handshake, argument
parsing, the uffd_msg decoder and working-set files."""
import json

import pytest

import uffdtool as u

PS = 4096
MiB = 1 << 20


def regions(served):
    return [(r.start, r.end, r.offset) for r in served.regions]


# -- coalesce_pages: recorded pages -> sorted, merged, bounded runs ----------------------------

@pytest.mark.parametrize("offsets,rec_ps,ps,max_run,runs", [
    ([], PS, PS, 2 * MiB, []),
    ([0x3000, 0, 0x1000, 0x1000], PS, PS, 2 * MiB, [(0, 0x2000), (0x3000, 0x4000)]),
    ([5 * PS, 4 * PS, 3 * PS], PS, PS, 2 * MiB, [(3 * PS, 6 * PS)]),      # unsorted, adjacent
    ([i * PS for i in range(10)], PS, PS, 4 * PS,                          # cut at max_run
     [(0, 4 * PS), (4 * PS, 8 * PS), (8 * PS, 10 * PS)]),
    ([0, PS], PS, PS, 100, [(0, PS), (PS, 2 * PS)]),                    # max_run >= one page
    ([0, PS], PS, PS, 6 * 1024, [(0, PS), (PS, 2 * PS)]),               # max_run: whole pages
    ([0x1234], PS, PS, 2 * MiB, [(0x1000, 0x3000)]),                    # covers 0x1234+4K
    ([-PS, 0], PS, PS, 2 * MiB, [(0, PS)]),                             # negative: dropped
    ([PS, 3 * PS], PS, 2 * MiB, 2 * MiB, [(0, 2 * MiB)]),               # 4K records, 2M pages
    ([0, 2 * MiB], 2 * MiB, 2 * MiB, 2 * MiB, [(0, 2 * MiB), (2 * MiB, 4 * MiB)]),
], ids=["empty", "merge-and-sort", "adjacent", "max-run", "max-run-below-page",
        "max-run-rounded", "unaligned", "negative", "huge-pages", "huge-records"])
def test_coalesce_pages(offsets, rec_ps, ps, max_run, runs):
    assert u.coalesce_pages(offsets, rec_ps, ps, max_run) == runs


def test_coalesce_pages_covers_exactly_the_pages():
    offsets = [7, 3, 4, 5, 100, 99, 64, 0, 1] * 2
    runs = u.coalesce_pages([o * PS for o in offsets], PS, PS, 8 * PS)
    covered = [p for a, b in runs for p in range(a // PS, b // PS)]
    assert covered == sorted(set(offsets))                   # every page once, in order
    assert all(b - a <= 8 * PS and a < b for a, b in runs)


# -- split_runs: runs cut at region boundaries -------------------------------------------------

@pytest.mark.parametrize("runs,bounds,out", [
    ([(0, 10)], [], [(0, 10)]),
    ([(0, 10)], [0, 10], [(0, 10)]),                                    # bounds at the ends
    ([(0, 10)], [4], [(0, 4), (4, 10)]),
    ([(0, 10)], [7, 3, 3], [(0, 3), (3, 7), (7, 10)]),                  # unsorted, duplicates
    ([(0, 4), (6, 12)], [5, 8], [(0, 4), (6, 8), (8, 12)]),             # a bound in a gap
    ([(2, 4)], [1, 9], [(2, 4)]),                                       # bounds outside
])
def test_split_runs(runs, bounds, out):
    assert u.split_runs(runs, bounds) == out


# -- file_regions: which parts of a mapping take file data (serve-file --range -- CMD) --------

@pytest.mark.parametrize("start,end,file_ranges,out", [
    (0x1000, 0x5000, [], [(0x1000, 0x5000, None)]),
    (0x1000, 0x5000, [(0x1000, 0x5000, 0)], [(0x1000, 0x5000, 0)]),
    (0x1000, 0x5000, [(0x2000, 0x3000, 0x10000)],                       # hole, file, hole
     [(0x1000, 0x2000, None), (0x2000, 0x3000, 0x10000), (0x3000, 0x5000, None)]),
    (0x2000, 0x4000, [(0x1000, 0x3000, 0x100000)],                      # starts inside a range
     [(0x2000, 0x3000, 0x101000), (0x3000, 0x4000, None)]),
    (0x1000, 0x3000, [(0x0, 0x8000, 0x0)], [(0x1000, 0x3000, 0x1000)]),   # inside one range
    (0x1000, 0x2000, [(0x3000, 0x4000, 0)], [(0x1000, 0x2000, None)]),   # range elsewhere
    (0x0, 0x6000, [(0x1000, 0x2000, 0), (0x2000, 0x3000, 0x1000), (0x4000, 0x5000, 0x2000)],
     [(0x0, 0x1000, None), (0x1000, 0x2000, 0), (0x2000, 0x3000, 0x1000),
      (0x3000, 0x4000, None), (0x4000, 0x5000, 0x2000), (0x5000, 0x6000, None)]),
], ids=["no-file", "all-file", "middle", "start-inside", "inside-one", "elsewhere", "several"])
def test_file_regions(start, end, file_ranges, out):
    got = u.file_regions(start, end, file_ranges)
    assert [(r.start, r.end, r.offset) for r in got] == out
    assert got[0].start == start and got[-1].end == end                 # no gap, no overlap
    assert all(a.end == b.start for a, b in zip(got, got[1:]))


# -- Served: the regions of one uffd, cut by UNMAP / REMAP -------------------------------------

def _served():
    return u.Served(None, [u.Region(0x5000, 0x8000, None), u.Region(0x1000, 0x4000, 0x10000)])


def test_served_sorts_and_finds():
    s = _served()
    assert regions(s) == [(0x1000, 0x4000, 0x10000), (0x5000, 0x8000, None)]
    assert s.find(0x1000).offset == 0x10000 and s.find(0x3fff).start == 0x1000
    assert s.find(0x4000) is None and s.find(0xfff) is None and s.find(0x8000) is None
    assert s.find(0x7000).start == 0x5000


@pytest.mark.parametrize("start,end,out", [
    (0x0, 0x1000, [(0x1000, 0x4000, 0x10000), (0x5000, 0x8000, None)]),     # nothing there
    (0x2000, 0x3000, [(0x1000, 0x2000, 0x10000), (0x3000, 0x4000, 0x12000),  # split, offsets
                      (0x5000, 0x8000, None)]),
    (0x0, 0x2000, [(0x2000, 0x4000, 0x11000), (0x5000, 0x8000, None)]),      # head trimmed
    (0x3000, 0x6000, [(0x1000, 0x3000, 0x10000), (0x6000, 0x8000, None)]),   # across two
    (0x1000, 0x4000, [(0x5000, 0x8000, None)]),                               # a whole region
    (0x0, 0x10000, []),                                                       # everything
], ids=["outside", "split", "head", "across", "whole", "all"])
def test_served_cut(start, end, out):
    s = _served()
    s.cut(start, end)
    assert regions(s) == out
    assert s.starts == [r[0] for r in out]                  # the index follows
    for addr in range(start, end, 0x1000):
        assert s.find(addr) is None


# -- data_end: how much of a region a source of SIZE bytes can fill ----------------------------

@pytest.mark.parametrize("region,size,end", [
    ((0x1000, 0x5000, None), 1 << 30, 0x1000),           # no source offset: no data
    ((0x1000, 0x5000, 0), None, 0x5000),                 # no size limit
    ((0x1000, 0x5000, 0), 0x10000, 0x5000),              # the source is longer
    ((0x1000, 0x5000, 0), 0x2000, 0x3000),               # clamped at the source's end
    ((0x1000, 0x5000, 0), 0x1800, 0x3000),               # a partial last page rounds up
    ((0x1000, 0x5000, 0x3000), 0x2000, 0x1000),          # offset past the end: nothing
])
def test_data_end(region, size, end):
    assert u.data_end(u.Region(*region), size, PS) == end


# -- Prefetcher: pending runs, claimed by demand faults ----------------------------------------

def test_prefetcher_pop_push_front():
    p = u.Prefetcher([(0, 4 * PS), (8 * PS, 12 * PS)])
    assert p
    assert p.pop() == (0, 4 * PS)
    p.push_front((2 * PS, 4 * PS))                       # the rest of a run put back
    assert p.pop() == (2 * PS, 4 * PS) and p.pop() == (8 * PS, 12 * PS)
    assert not p and p.pop() is None


def test_prefetcher_claim():
    p = u.Prefetcher([(4 * PS, 12 * PS), (16 * PS, 20 * PS)])
    assert p.claim(0, 64 * PS) is None                   # before every run
    assert p.claim(12 * PS, 64 * PS) is None             # in the gap
    assert p.claim(20 * PS, 64 * PS) is None             # past the end
    # a fault at page 6 with a limit of 3 pages takes [6, 9); pages 4-5 and 9-11 stay pending
    assert p.claim(6 * PS, 3 * PS) == 9 * PS
    assert p.runs == [(4 * PS, 6 * PS), (9 * PS, 12 * PS), (16 * PS, 20 * PS)]
    assert p.starts == [a for a, b in p.runs]
    assert p.claim(9 * PS, 64 * PS) == 12 * PS           # the rest of that run, no further
    assert p.claim(16 * PS, 64 * PS) == 20 * PS
    assert p.runs == [(4 * PS, 6 * PS)] and p.starts == [4 * PS]
    assert p.claim(10 * PS, PS) is None                  # claimed pages are not pending


# -- parse_handshake: the Firecracker handshake JSON -------------------------------------------

def _hs(*regions):
    return json.dumps(list(regions)).encode()


def _region(base, size, offset, **kw):
    return dict(base_host_virt_addr=base, size=size, offset=offset, **kw)


def test_parse_handshake_page_size_fields():
    assert u.parse_handshake(_hs(_region(1 << 30, PS, 0))) == (
        PS, [{"base_host_virt_addr": 1 << 30, "size": PS, "offset": 0}])
    ps, _ = u.parse_handshake(_hs(_region(1 << 30, 2 * MiB, 0, page_size=2 * MiB)))
    assert ps == 2 * MiB
    ps, _ = u.parse_handshake(_hs(_region(1 << 30, 2 * MiB, 0, page_size_kib=2 * MiB)))
    assert ps == 2 * MiB                                 # page_size_kib holds bytes
    ps, _ = u.parse_handshake(_hs(_region(1 << 30, 2 * MiB, 0, page_size=2 * MiB,
                                          page_size_kib=PS)))
    assert ps == 2 * MiB                                 # page_size wins


def test_parse_handshake_unsorted_regions_kept_in_order():
    hs = _hs(_region(2 << 30, 8 * PS, 0), _region(1 << 30, 4 * PS, 8 * PS))
    ps, out = u.parse_handshake(hs)
    assert ps == PS and [r["base_host_virt_addr"] for r in out] == [2 << 30, 1 << 30]
    assert [r["offset"] for r in out] == [0, 8 * PS]


@pytest.mark.parametrize("data,words", [
    (b"", "empty"),
    (b"\xff\xfe", "not JSON"),
    (b"[{", "not JSON"),
    (b"[]", "non-empty JSON array"),
    (b'{"size": 4096}', "non-empty JSON array"),
    (b"[1]", "not an object"),
    (_hs({"size": PS, "offset": 0}), "base_host_virt_addr must be a non-negative integer"),
    (_hs(_region(PS, PS, -1)), "offset must be a non-negative integer"),
    (_hs(_region(PS, True, 0)), "size must be a non-negative integer"),
    (_hs(_region(PS, PS, 0, page_size=3000)), "not a power of two"),
    (_hs(_region(PS, PS, 0, page_size=2048)), "not a power of two"),
    (_hs(_region(PS, PS, 0), _region(2 * MiB, 2 * MiB, PS, page_size=2 * MiB)),
     "different page sizes"),
    (_hs(_region(PS, 0, 0)), "not aligned"),
    (_hs(_region(PS + 1, PS, 0)), "not aligned"),
    (_hs(_region(PS, PS + 1, 0)), "not aligned"),
    (_hs(_region(PS, 4 * PS, 0), _region(4 * PS, PS, 4 * PS)), "overlap at 0x4000"),
], ids=["empty", "not-utf8", "not-json", "empty-array", "object", "not-object", "missing-key",
        "negative", "bool", "page-size-3000", "page-size-small", "mixed-page-sizes", "size-0",
        "base-unaligned", "size-unaligned", "overlap"])
def test_parse_handshake_rejects(data, words):
    with pytest.raises(u.HandshakeError) as e:
        u.parse_handshake(data)
    assert words in str(e.value)


# -- parse_size / parse_range ------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("0", 0), ("1", 1), ("4K", 4096), ("4k", 4096), ("4KiB", 4096), ("4kb", 4096),
    ("2M", 2 * MiB), ("3G", 3 << 30), ("1T", 1 << 40), ("0X10", 16), (" 8K ", 8192),
    ("0.5M", MiB // 2), ("1b", 1), (4096, 4096),
])
def test_parse_size(text, value):
    assert u.parse_size(text) == value


@pytest.mark.parametrize("text", ["", " ", "M", "1.5", "0.3K", "4Q", "-4K", "1e3", "0xg",
                                  "K4", "4KK"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        u.parse_size(text)


@pytest.mark.parametrize("text,value", [
    ("0x7f0000000000:64K", (0x7f0000000000, 64 << 10)),
    ("4096:4096", (4096, 4096)),
    ("0x1000:0x2000", (0x1000, 0x2000)),
])
def test_parse_range(text, value):
    assert u.parse_range(text) == value


@pytest.mark.parametrize("text", ["0x1000", ":4K", "0x1000:", "zz:4K", "0x1000:4Q", "1:2:3"])
def test_parse_range_rejects(text):
    with pytest.raises(ValueError) as e:
        u.parse_range(text)
    assert "START:LEN" in str(e.value)


# -- decode_msgs: packed struct uffd_msg records -> events -------------------------------------

def _msg(event, a=0, b=0, c=0):
    return u.UFFD_MSG.pack(event, a, b, c)


def test_uffd_msg_layout():
    assert u.UFFD_MSG.size == u.UFFD_MSG_SIZE == 32      # sizeof(struct uffd_msg)


def test_decode_msgs_pure():
    buf = bytearray(_msg(u.UFFD_EVENT_PAGEFAULT, u.UFFD_PAGEFAULT_FLAG_WRITE, 0x5000, 7) +
                    _msg(u.UFFD_EVENT_UNMAP, 0x1000, 0x3000))
    before = bytes(buf)
    assert u.decode_msgs(buf) == u.decode_msgs(before)   # bytes or bytearray, same events
    assert bytes(buf) == before                          # the buffer is not touched
    evs = u.decode_msgs(buf, u.UFFD_MSG_SIZE)            # only the first N bytes
    assert len(evs) == 1 and evs[0].address == 0x5000 and evs[0].write


def test_decode_msgs_edges():
    assert u.decode_msgs(b"") == [] and u.decode_msgs(b"\0" * 31) == []
    # the thread id is the low 32 bits of the third word; FORK's ufd the low 32 bits of the first
    pf, fork = u.decode_msgs(_msg(u.UFFD_EVENT_PAGEFAULT, 0, 0x1000, (5 << 32) | 99) +
                             _msg(u.UFFD_EVENT_FORK, (1 << 32) | 12))
    assert pf.ptid == 99 and fork.ufd == 12
    unk, = u.decode_msgs(_msg(0x99, 1, 2, 3))
    assert unk.code == 0x99 and unk.raw == _msg(0x99, 1, 2, 3)


# -- working-set files: write then read back ---------------------------------------------------

@pytest.mark.parametrize("key,page_size,pages", [
    ("offset", PS, [0x3000, 0, 0x1000]),
    ("address", PS, [0x7f0000001000, 0x7f0000000000]),
    ("offset", 2 * MiB, [0, 4 * MiB, 2 * MiB]),
    ("offset", PS, []),
], ids=["offsets", "addresses", "huge-pages", "empty"])
def test_working_set_write_read_round_trip(tmp_path, key, page_size, pages):
    path = str(tmp_path / "ws.txt")
    u.write_working_set(path, pages, page_size, key=key)
    with open(path) as f:
        text = f.read()
    assert text.startswith("# uffdtool working-set ") and "key=%s" % key in text.split("\n")[0]
    assert u.read_working_set(path) == (key, page_size, pages)   # order kept: first-fault order


@pytest.mark.parametrize("content,words", [
    (b"0x1000\n", "no '# uffdtool working-set"),
    (b"\xff\xfe\x00binary", "binary data"),
    (b"# uffdtool working-set v1 page_size=4096 key=offset\n0x1000\nzz\n", ":3: not a number"),
    (b"# uffdtool working-set v1 page_size=big key=offset\n", "bad page_size"),
], ids=["no-header", "binary", "not-a-number", "bad-page-size"])
def test_working_set_read_rejects(tmp_path, content, words):
    path = tmp_path / "ws.txt"
    path.write_bytes(content)
    with pytest.raises(u.UsageError) as e:
        u.read_working_set(str(path))
    assert words in str(e.value)


def test_working_set_read_missing_file(tmp_path):
    with pytest.raises(u.UsageError) as e:
        u.read_working_set(str(tmp_path / "nope"))
    assert "cannot read working set" in str(e.value)
