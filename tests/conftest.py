"""Shared test fixtures: the module from the checkout, and the real-kernel requirements."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import uffdtool  # noqa: E402

TOOL = os.path.join(ROOT, "uffdtool.py")


def _uffd_usable():
    try:
        uffdtool.Userfaultfd().close()
        return None
    except OSError as e:
        return "cannot open a userfaultfd here: %s" % e


needs_uffd = pytest.mark.skipif(_uffd_usable() is not None, reason=str(_uffd_usable()))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def need_program(name):
    """The path of program ``name``; if it is absent: skip (with the reason), but FAIL when the
    environment variable CI is set (CI installs every program the tests need)."""
    import shutil
    path = shutil.which(name)
    if path is None:
        msg = "needs the program %r (not installed here)" % name
        if os.environ.get("CI"):
            pytest.fail(msg + "; CI must install it (.ci/run)")
        pytest.skip(msg)
    return path


def run_tool(*args, timeout=60, **kw):
    """Run ``python3 uffdtool.py ARGS``; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, TOOL] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture
def uffd():
    u = uffdtool.Userfaultfd()
    yield u
    u.close()


# -- a uffdtool command running in the background, logging to a file ----------------------------

_running = []


@pytest.fixture(autouse=True)
def _kill_running_tools():
    """Whatever a test asserts, no uffdtool started by start_tool outlives it."""
    yield
    while _running:
        p = _running.pop()
        if p.poll() is None:
            p.kill()
            p.wait(5)


def start_tool(command, *args):
    """Start ``uffdtool COMMAND --log TMPFILE --quiet ARGS`` and wait for its ``ready`` record
    (a file, not a pipe: an unread pipe would block the log writer and with it the faults).
    The Popen gets ``.log`` (the temporary file)."""
    log = tempfile.NamedTemporaryFile("r", prefix="uffdtool-%s-" % command, suffix=".json")
    p = subprocess.Popen([sys.executable, TOOL, command, "--log", log.name, "--quiet"] +
                         [str(a) for a in args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.log = log
    _running.append(p)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and p.poll() is None:
        with open(log.name) as f:
            if '"event":"ready"' in f.read():
                return p
        time.sleep(0.02)
    p.kill()
    raise AssertionError("no ready record: %s" % (p.communicate(timeout=5),))


def stop_tool(p, sig=signal.SIGINT):
    """Signal a start_tool process (None: just wait for it); returns (JSON records, stderr).
    Its stdout is kept as ``p.stdout_text``."""
    if sig is not None:
        p.send_signal(sig)
    p.stdout_text, err = p.communicate(timeout=15)
    with open(p.log.name) as f:
        return [json.loads(line) for line in f if line.startswith("{")], err


class ScriptTarget:
    """A Python script run as a target process and driven over stdin/stdout: its first output
    line is the hex address of its memory (``.addr``); ``ask(line)`` sends a command line and
    returns the stripped answer line."""

    def __init__(self, script, *args):
        self.p = subprocess.Popen([sys.executable, "-c", script] + [str(a) for a in args],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.addr = int(self.p.stdout.readline(), 16)
        self.pid = self.p.pid

    def ask(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().strip()

    def assert_running_untraced(self):
        st = dict(line.split(":", 1) for line in open("/proc/%d/status" % self.pid))
        assert st["State"].split()[0] in ("S", "R") and st["TracerPid"].strip() == "0"

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(5)
