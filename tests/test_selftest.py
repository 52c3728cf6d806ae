"""``uffdtool selftest``: every registered check as a pytest case on the real kernel, and the
command end to end (output format, --json, -k, exit codes, timeouts, huge page bookkeeping)."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

import uffdtool as u
from conftest import ROOT, TOOL, needs_root, needs_uffd, run_tool

SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed, (\d+) skipped$")
ROOT_USER = os.geteuid() == 0


def _nr_hugepages():
    return int(open("/proc/sys/vm/nr_hugepages").read())


@pytest.fixture(scope="class")
def hugepages():
    """The huge pages the hugetlb checks need (reserved as root, given back afterwards)."""
    with u.hugepages_reserved(u.SELFTEST_HUGEPAGES) as r:
        yield r


# -- each check, called directly (the binding on real memory) --------------------------------------

@needs_uffd
class TestChecks:
    """Each registered check, called in this process (its faulting side is a forked child)."""

    @pytest.mark.parametrize("name", list(u.SELFTEST_CHECKS))
    def test_check(self, name, hugepages):
        check = u.SELFTEST_CHECKS[name]
        try:
            check.func()
        except u.CheckSkip as e:
            if ROOT_USER:
                pytest.fail("SKIP as root on this machine: %s" % e)
            pytest.skip(str(e))


def test_registry_covers_the_issue():
    names = set(u.SELFTEST_CHECKS)
    for want in ("open-syscall", "open-dev", "api-negotiation", "anon-missing-copy",
                 "anon-missing-zeropage", "shmem-missing-copy", "hugetlb-missing-copy",
                 "copy-eexist", "copy-partial", "wake", "anon-wp", "shmem-minor-continue",
                 "hugetlb-minor-continue", "poison", "move", "event-fork", "event-remap-grow",
                 "event-remap-fixed", "event-remove-dontneed", "event-remove-shmem",
                 "event-unmap", "eagain-remove-unread", "thread-id", "sigbus-mode",
                 "exact-address", "wp-unpopulated", "wp-async", "user-mode-only"):
        assert want in names
    for c in u.SELFTEST_CHECKS.values():
        assert c.doc and c.name == c.name.lower() and " " not in c.name
        assert (c.hugepages > 0) == c.name.startswith("hugetlb")


def test_select_checks():
    assert [c.name for c in u.select_checks(["open-"])] == ["open-syscall", "open-dev"]
    assert len(u.select_checks(None)) == len(u.SELFTEST_CHECKS)
    assert u.select_checks(["no-such-check"]) == []


# -- the runner: deadlines, crashes, cleanup -----------------------------------------------------

def _hangs():
    """A check whose faulting child is never served (and a sleeping parent)."""
    def body(peer):
        a = u.mmap_anon(u.PAGE_SIZE)
        uf = u._uffd()
        uf.register(a, u.PAGE_SIZE)
        u._peek(a, 1)
    u._Peer(body, timeout=60)
    time.sleep(60)


@needs_uffd
def test_run_check_kills_a_hanging_check():
    t = time.monotonic()
    result, reason, ms = u.run_check(u.Check("hang", _hangs, "hangs"), timeout=1.0)
    assert (result, reason) == ("FAIL", "timed out after 1.0 s (killed)")
    assert time.monotonic() - t < 5 and 900 < ms < 5000


def test_run_check_reports_crash_skip_and_fail():
    def crash():
        os.kill(os.getpid(), 9)

    def skip():
        raise u.CheckSkip("not here")

    def fail():
        raise ValueError("boom")
    assert u.run_check(u.Check("c", crash, ""))[:2] == (
        "FAIL", "the check process died (signal SIGKILL)")
    assert u.run_check(u.Check("s", skip, ""))[:2] == ("SKIP", "not here")
    assert u.run_check(u.Check("f", fail, ""))[:2] == ("FAIL", "ValueError: boom")
    assert u.run_check(u.Check("p", lambda: "fine", ""))[:2] == ("PASS", "fine")


@needs_root
def test_hugepages_given_back_even_on_failure():
    before = _nr_hugepages()
    with pytest.raises(RuntimeError):
        with u.hugepages_reserved(u.free_hugepages() + 2) as r:
            assert r.ok and u.free_hugepages() >= r.n
            raise RuntimeError("a check blew up")
    assert _nr_hugepages() == before


# -- the command end to end ----------------------------------------------------------------------

@needs_uffd
def test_cli_selftest_all_pass():
    before = _nr_hugepages() if ROOT_USER else None
    t = time.monotonic()
    r = run_tool("selftest", timeout=60)
    took = time.monotonic() - t
    lines = r.stdout.splitlines()
    assert lines, r.stderr
    m = SUMMARY.match(lines[-1])
    assert m, lines[-1]
    passed, failed, skipped = map(int, m.groups())
    assert passed + failed + skipped == len(u.SELFTEST_CHECKS) == len(lines) - 1
    for line, name in zip(lines, u.SELFTEST_CHECKS):
        assert re.match(r"^(PASS %s|FAIL %s: .+|SKIP %s: .+)$" % ((re.escape(name),) * 3), line)
    assert failed == 0 and r.returncode == 0, r.stdout
    if ROOT_USER:
        assert skipped == 0, r.stdout                     # nothing may be skipped here
        assert _nr_hugepages() == before                  # huge pages given back
    assert took < 30


@needs_uffd
def test_cli_selftest_json():
    r = run_tool("selftest", "--json", "-k", "event-", "-k", "open-dev", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    checks, summary = recs[:-1], recs[-1]
    names = [c["name"] for c in checks]
    assert names == [n for n in u.SELFTEST_CHECKS if "event-" in n or "open-dev" in n]
    for c in checks:
        assert set(c) == {"t", "event", "name", "result", "reason", "ms"}
        assert c["event"] == "check" and c["result"] in ("PASS", "FAIL", "SKIP")
        assert isinstance(c["t"], float) and isinstance(c["ms"], float)
        assert c["reason"] is None if c["result"] == "PASS" else c["reason"]
    assert summary["event"] == "summary"
    assert summary["passed"] + summary["failed"] + summary["skipped"] == len(checks)
    assert summary["failed"] == 0


def test_cli_selftest_k_and_list():
    r = run_tool("selftest", "-k", "nomatch")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "nomatch" in r.stderr and "Traceback" not in r.stderr
    r = run_tool("selftest", "--list")
    assert r.returncode == 0
    assert [line.split()[0] for line in r.stdout.splitlines()] == list(u.SELFTEST_CHECKS)
    r = run_tool("selftest", "--list", "-k", "remap")
    assert [line.split()[0] for line in r.stdout.splitlines()] == [
        "event-remap-grow", "event-remap-fixed"]
    r = run_tool("selftest", "--bogus")
    assert r.returncode == 2 and "Traceback" not in r.stderr


@needs_uffd
def test_cli_selftest_verbose_and_k():
    r = run_tool("selftest", "-v", "-k", "thread-id", "-k", "copy-partial")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    assert lines[0].startswith("PASS copy-partial  (") and lines[1].startswith("PASS thread-id  (")
    assert lines[-1] == "2 passed, 0 failed, 0 skipped"


_FAILING = """
import sys
sys.path.insert(0, %r)
import uffdtool as u
def bad():
    raise u.CheckFail("the kernel said no")
u.SELFTEST_CHECKS["zz-bad"] = u.Check("zz-bad", bad, "always fails")
sys.exit(u.main(["selftest", "-k", "zz-bad", "-k", "open-syscall"] + sys.argv[1:]))
""" % ROOT


@needs_uffd
def test_cli_selftest_exit_1_on_failure():
    r = subprocess.run([sys.executable, "-c", _FAILING], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["PASS open-syscall", "FAIL zz-bad: the kernel said no",
                                     "1 passed, 1 failed, 0 skipped"]
    r = subprocess.run([sys.executable, "-c", _FAILING, "--json"], capture_output=True,
                       text=True, timeout=60)
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 1 and recs[1]["result"] == "FAIL"
    assert recs[1]["reason"] == "the kernel said no" and recs[-1]["failed"] == 1


@needs_root
def test_cli_selftest_unprivileged_skips_with_reasons():
    """As nobody: what cannot run is a SKIP with a reason, never a FAIL."""
    if not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("no setpriv")
    py = sys.executable
    if not os.access(py, os.X_OK) or py.startswith("/root/"):
        py = "/usr/bin/python3"                # a pyenv python under /root is not reachable
    r = subprocess.run(["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        py, TOOL, "selftest"],
                       capture_output=True, text=True, timeout=60, cwd="/")
    if not r.stdout:
        pytest.skip("nobody cannot run this python: %s" % r.stderr.strip())
    lines = r.stdout.splitlines()
    assert SUMMARY.match(lines[-1]), r.stdout + r.stderr
    assert r.returncode == 0 and not [line for line in lines if line.startswith("FAIL")], r.stdout
    skips = [line for line in lines if line.startswith("SKIP")]
    assert all(": " in line for line in skips)
    if not u.read_sysfs("/proc/sys/vm/unprivileged_userfaultfd") == "1":
        assert any(line.startswith("SKIP event-fork: ") for line in skips)
