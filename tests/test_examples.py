"""The README's examples, run as the README shows them: each ```console block's `$ ` lines run
verbatim (one bash script per block, as root, in a scratch directory that holds the checkout's
uffdtool.py and examples/), and their output is checked for what the README says it shows."""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, need_file, need_program, needs_root, needs_uffd, uffdtool
from nginx_server import ECHO_MODULE

README = os.path.join(ROOT, "README.md")
x86_64 = pytest.mark.skipif(uffdtool.ARCH != "x86_64", reason="ptrace is x86_64 only")


def readme():
    with open(README) as f:
        return f.read()


def blocks(lang):
    """The README's ```LANG blocks, each as its text."""
    return re.findall(r"^```%s\n(.*?)^```$" % lang, readme(), re.S | re.M)


def console_block(containing):
    """The one ```console block whose text contains CONTAINING: its `$ ` command lines."""
    found = [b for b in blocks("console") if containing in b]
    assert len(found) == 1, (containing, len(found))
    return [line[2:] for line in found[0].splitlines() if line.startswith("$ ")]


def run_commands(commands, tmp_path, timeout=120):
    """Run COMMANDS (shell lines) as one bash script in TMP_PATH, where uffdtool.py and
    examples/ are the checkout's; returns (stdout, stderr, exit status): the commands' output
    and the tool's human lines apart (one pipe for both could interleave them mid-line)."""
    for name in ("uffdtool.py", "examples"):
        os.symlink(os.path.join(ROOT, name), str(tmp_path / name))
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + ":" + os.environ["PATH"])
    r = subprocess.run(["bash", "-c", "\n".join(commands)], cwd=str(tmp_path), env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    return r.stdout, r.stderr, r.returncode


def md5_of(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


# -- the first two commands, and the scripts the README names ---------------------------------

def test_first_two_commands_need_no_sudo_and_the_second_is_what_ci_runs(tmp_path):
    first = blocks("sh")[0].splitlines()
    assert len(first) == 2
    selftest, tests = (line.split("  #")[0].strip() for line in first)
    assert selftest == "python3 uffdtool.py selftest"
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert f.read().rstrip("\n").splitlines()[-1] == tests    # CI's last line, verbatim
    assert "-r tests/requirements.txt" in tests and tests.endswith("python3 -m pytest -q tests")
    assert "sudo " not in "\n".join(blocks("sh") + blocks("console"))


@needs_uffd
def test_first_command_runs_verbatim(tmp_path):
    out, err, rc = run_commands(["python3 uffdtool.py selftest"], tmp_path)
    assert rc == 0, out + err
    assert re.search(r"^\d+ passed, 0 failed, \d+ skipped$", out, re.M), out


def test_every_script_the_readme_names_exists_and_is_run_here():
    named = set(re.findall(r"\b((?:examples|bench)/[\w.-]+\.py)\b", readme()))
    assert named, "the README names no example script"
    for path in named:
        assert os.path.isfile(os.path.join(ROOT, path)), path
    with open(__file__) as f:
        this = f.read()
    shipped = {"examples/" + n for n in os.listdir(os.path.join(ROOT, "examples"))
               if n.endswith(".py")}
    for path in named | shipped:
        assert path in named, "%s is not in the README" % path
        assert this.count(os.path.basename(path)) >= 2, "%s is run by no test here" % path


# -- info and selftest ------------------------------------------------------------------------

@needs_uffd
def test_info(tmp_path):
    out, err, rc = run_commands(console_block("uffdtool.py info"), tmp_path)
    assert rc == 0, out + err
    assert out.startswith("uffdtool %s on Linux " % uffdtool.__version__), out
    assert re.search(r"^features \(\d+\) ", out, re.M) and "register anon" in out, out


@needs_uffd
def test_selftest_json_and_verbose(tmp_path):
    out, err, rc = run_commands(console_block("selftest --json -k thread-id"), tmp_path)
    assert rc == 0, out + err
    lines = out.splitlines()
    check = json.loads(lines[0])
    assert check["event"] == "check" and check["name"] == "thread-id"
    assert check["result"] == "PASS", check
    assert json.loads(lines[1])["event"] == "summary"
    assert [line.split()[:2] for line in lines[2:4]] == [["PASS", "event-remap-grow"],
                                                         ["PASS", "event-remap-fixed"]]
    assert lines[4] == "2 passed, 0 failed, 0 skipped"


# -- watch ------------------------------------------------------------------------------------

@needs_root
@x86_64
def test_watch_pid_wp_demo_target(tmp_path):
    """examples/demo_target.py: its first write to each of pages 0-3 is a WP fault; the target
    goes on after the detach and exits 0."""
    out, err, rc = run_commands(console_block("examples/demo_target.py"), tmp_path)
    addr = int((tmp_path / "target.addr").read_text(), 16)
    faults = re.findall(r"pagefault address=(0x[0-9a-f]+) flags=write,wp .*resolved=wp", err)
    assert sorted(int(a, 16) for a in faults) == [addr + i * 4096 for i in range(4)], err
    exit_line = err.rstrip().splitlines()[-1].split()
    assert exit_line[1] == "exit" and {"status=0", "reason=duration"} <= set(exit_line), err
    assert out == "target exit 0\n" and rc == 0, out + err


@needs_root
@x86_64
def test_watch_cmd_json_exit_status(tmp_path):
    out, err, rc = run_commands(console_block("watch --json --quiet --events fork,unmap"),
                                tmp_path)
    lines = out.splitlines()
    assert lines[-1] == "3", out                                 # `echo $?`: CMD's status
    recs = [json.loads(line) for line in lines[:-1]]
    kinds = {r["event"] for r in recs}
    assert {"start", "ready", "exec", "pagefault", "unmap", "gone", "stats", "exit"} <= kinds
    assert recs[-2]["event"] == "stats" and recs[-2]["exit_status"] == 3
    assert recs[-1]["event"] == "exit" and recs[-1]["status"] == 3


# -- serve-file -------------------------------------------------------------------------------

@needs_root
@x86_64
def test_serve_pid_dontneed_demo_restore(tmp_path):
    """examples/demo_restore.py: after --dontneed and the detach, its whole buffer holds the
    dump's bytes (pages 0-31 held 0x55 before, pages 32-63 nothing)."""
    out, err, rc = run_commands(console_block("examples/demo_restore.py"), tmp_path)
    assert rc == 0, out + err
    want = md5_of(str(tmp_path / "dump.bin"))
    addr = (tmp_path / "restore.addr").read_text().splitlines()[0]
    assert out.splitlines() == ["%s  dump.bin" % want, addr,    # md5sum, cat restore.addr
                                "md5 of the 256 KiB: %s" % want], out
    assert re.search(r" stats .*drained_pages=64", err), err
    exit_line = err.rstrip().splitlines()[-1].split()
    assert exit_line[1] == "exit" and "status=0" in exit_line, err


@needs_root
@x86_64
def test_serve_cmd_range_readmap(tmp_path):
    """examples/readmap.py under serve-file -- CMD: its first MiB is img.bin, the second zeros."""
    out, err, rc = run_commands(console_block("examples/readmap.py"), tmp_path)
    assert rc == 0, out + err
    img = (tmp_path / "img.bin").read_bytes()
    want = hashlib.md5(img + bytes(1 << 20)).hexdigest()
    assert len(img) == 1 << 20 and md5_of(str(tmp_path / "expect.bin")) == want
    assert out.splitlines() == ["%s  expect.bin" % want,         # md5sum expect.bin
                                want,                           # readmap.py's md5
                                "exit 0"], out + err


@needs_uffd
def test_serve_self(tmp_path):
    out, err, rc = run_commands(console_block("--self --size 64M"), tmp_path)
    assert rc == 0, out + err
    assert re.search(r"^self: 64\.0 MiB served from src64\.bin in [\d.]+ s: \d+ MiB/s, 16384 "
                     r"faults, readahead 1: every byte verified$", err, re.M), err


# -- the module and the benchmark -------------------------------------------------------------

@needs_uffd
def test_module_example(tmp_path):
    """examples/module_demo.py is the README's Python block, and runs: 4 zero pages served."""
    with open(os.path.join(ROOT, "examples", "module_demo.py")) as f:
        code = f.read()
    shown = blocks("python")
    assert len(shown) == 1 and shown[0].strip() in code.replace("  # noqa: E401", "")
    command = "PYTHONPATH=. python3 examples/module_demo.py"
    assert "`%s`" % command in readme()
    r = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    registered, zeros, stats = r.stdout.splitlines()
    assert "COPY" in registered and "ZEROPAGE" in registered
    assert zeros == "True"
    assert "'pages_zero': 4" in stats and "'faults_missing': 1" in stats


@needs_root
def test_watch_overhead_benchmark_runs(tmp_path):
    """bench/watch_overhead.py (docs/benchmarks.md), at a small size: one line per row, each
    with its median and ratio (no timing is asserted)."""
    assert "python3 bench/watch_overhead.py" in readme()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "watch_overhead.py"),
                        "--mib", "8", "--reps", "1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert len(rows) == 5 and rows[0].startswith("without watch ")
    assert all(re.search(r" median +[\d.]+ s  \(x[\d.]+\)  runs: [\d.]+$", row) for row in rows)


@needs_root
def test_watch_bench_runs(tmp_path):
    """bench/watch_bench.py (docs/benchmarks.md), at a small size: the table has the plain row,
    every mode and the fast loop (no timing is asserted)."""
    need_program("gcc", "gcc")
    assert "python3 bench/watch_bench.py" in readme()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "watch_bench.py"),
                        "--size", "8", "--reps", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 1 + 5 + 1, r.stdout        # header, plain, 5 modes, the fast loop
    assert all(re.search(r"\d\.\d\d×", row) for row in rows[3:]), r.stdout


@needs_root
def test_url_benchmark_runs():
    """bench/url_bench.py (README "Restoring from a URL"), at a small size: a real nginx, the
    shared C toucher, every configuration once; each run verified (no timing is asserted)."""
    need_program("nginx", "nginx")
    need_program("gcc", "gcc")
    need_file(ECHO_MODULE, "libnginx-mod-http-echo")          # --latency-ms
    assert "python3 bench/url_bench.py" in readme()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "url_bench.py"),
                        "--size-mib", "8", "--reps", "1", "--chunks", "256K", "--chunk", "256K",
                        "--latency-ms", "0,20"], capture_output=True, text=True, timeout=300)
    if r.returncode and "no ../shared/bench/uffd_bench.c" in r.stderr:
        pytest.skip("the shared C toucher is not beside this checkout")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 8 and "verified: True" in r.stdout     # header + configurations
    assert "20 ms per request" in r.stdout


# -- report -----------------------------------------------------------------------------------

@needs_root
@x86_64
def test_report_of_gcc(tmp_path):
    """The report block: watch gcc twice, the terminal summary (80 columns), the HTML and SVG
    files, the comparison of the two runs, the --record file."""
    need_program("gcc", "gcc")
    out, err, rc = run_commands(console_block("uffdtool.py report gcc.jsonl"), tmp_path)
    assert rc == 0 and err == "", out + err
    lines = out.splitlines()
    assert lines[0] == "uffdtool report  gcc.jsonl" and max(len(x) for x in lines) <= 80
    assert lines[1].startswith("run: uffdtool watch --quiet --log gcc.jsonl --record ws.txt --")
    assert re.search(r"^faults (\d+) · distinct pages \d+ · processes 3 ", out, re.M), out
    assert re.search(r"^  pages in both \d+ · only in A \d+ · only in B \d+ · Jaccard "
                     r"[01]\.\d{3}$", out, re.M), out
    assert re.search(r"^faults \d+ · distinct pages \d+ · processes 1 ", lines[-1]), out
    html = (tmp_path / "gcc.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and 'class="heatmap"' in html
    assert 'class="heatmap"' in (tmp_path / "gcc.svg").read_text()


def test_report_scale_benchmark_runs():
    """bench/report_scale.py at a small size: the import line and one line per view (no timing
    is asserted)."""
    assert "python3 bench/report_scale.py" in readme()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "report_scale.py"),
                        "--faults", "20000"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert rows[0].startswith("log: 20000 faults") and len(rows) == 5, r.stdout
    assert all(re.search(r" [\d.]+ s wall +[\d.]+ s CPU  peak RSS +[\d.]+ MiB$", row)
               for row in rows[1:]), r.stdout


@needs_root
def test_remove_stream_benchmark_runs():
    """bench/remove_stream.py (README, "Hardening"), briefly: one JSON row per readahead, no
    read lost or wrong (no timing is asserted)."""
    assert "python3 bench/remove_stream.py" in readme()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "remove_stream.py"),
                        "--seconds", "0.5", "--mib", "8", "--readahead", "1", "16"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["readahead"] for row in rows] == [1, 16]
    assert all(row["bad"] == 0 and row["removes"] > 0 and row["faults"] > 0 for row in rows)


def test_log_emit_benchmark_runs():
    """bench/log_emit.py (README, "Hardening"): one line with the median cost of a record."""
    assert "python3 bench/log_emit.py" in readme()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "log_emit.py"),
                        "--records", "2000", "--reps", "2"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"median [\d.]+ us/record", r.stdout), r.stdout


@needs_uffd
def test_pid_stop_benchmark_runs():
    """bench/pid_stop.py (README "--dontneed"), at a small size: a line for the stop without and
    one for the two stops with --dontneed (no timing is asserted)."""
    assert "python3 bench/pid_stop.py" in readme()
    need_program("gcc", "gcc")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "pid_stop.py"), "--pages",
                        "400", "--threads", "1", "--runs", "1"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rows = r.stdout.splitlines()
    assert len(rows) == 2 and "register only" in rows[0] and "--dontneed" in rows[1]
    stop = r" median +[\d.]+ ms  max +[\d.]+ ms  snapshot_pages \d+"
    assert all(re.search(stop, x) for x in rows)


@needs_uffd
def test_peers_benchmark_runs(tmp_path):
    """bench/peers_bench.py (docs/benchmarks.md), at a small size: a table row per (K, peers),
    every toucher verified by the script itself (no timing is asserted)."""
    from test_serve import BENCH_C
    need_program("gcc", "gcc")
    if not os.path.exists(BENCH_C):
        pytest.skip("needs %s (as the uffd_bench fixture of test_serve)" % BENCH_C)
    assert "python3 bench/peers_bench.py" in readme()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "peers_bench.py"),
                        "--peers", "1,2", "--ks", "64", "-s", "4", "--bench-c", BENCH_C],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line for line in r.stdout.splitlines() if re.match(r"\| 64 \| [12] \|", line)]
    assert len(rows) == 2 and all(line.count("|") == 13 for line in rows), r.stdout
