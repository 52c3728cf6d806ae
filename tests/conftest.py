"""Shared test fixtures: the module from the checkout, and the real-kernel requirements."""
import json
import os
import random
import shutil
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


def need_program(name, package):
    """The path of program NAME; when it is absent, skip with the reason, but FAIL when the
    environment variable CI is set (CI installs PACKAGE, see .ci/run)."""
    path = shutil.which(name)
    if path is None:
        _missing("needs %s (apt package %s)" % (name, package))
    return path


def need_file(path, package):
    """The same for a file PATH that apt package PACKAGE installs (an nginx module)."""
    if not os.path.exists(path):
        _missing("needs %s (apt package %s)" % (path, package))
    return path


def need_module(name, package):
    """The same for a Python module NAME (pip package PACKAGE, from tests/requirements.txt)."""
    try:
        return __import__(name)
    except ImportError:
        _missing("needs the Python module %s (pip install %s)" % (name, package))


def _missing(why):
    if os.environ.get("CI"):
        pytest.fail(why + ": CI must install it")
    pytest.skip(why)


def _uffd_usable():
    try:
        uffdtool.Userfaultfd().close()
        return None
    except OSError as e:
        return "cannot open a userfaultfd here: %s" % e


needs_uffd = pytest.mark.skipif(_uffd_usable() is not None, reason=str(_uffd_usable()))
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def run_tool(*args, timeout=60, **kw):
    """Run ``python3 uffdtool.py ARGS``; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, TOOL] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture
def uffd():
    u = uffdtool.Userfaultfd()
    yield u
    u.close()


# -- a uffdtool command that fails: one clear line, the documented exit code ---------------------

def check_error(returncode, stderr, code, match):
    """A failed uffdtool run: exit status CODE, no traceback, exactly one error line (the lines
    that start with "uffdtool"; a run without --quiet also has its human lines), and MATCH in
    it. Returns that line."""
    assert "Traceback" not in stderr, stderr
    assert returncode == code, (returncode, stderr)
    lines = [line for line in stderr.splitlines() if line.startswith("uffdtool")]
    assert len(lines) == 1, stderr
    assert match in lines[0], stderr
    return lines[0]


def expect_error(command, *args, code, match, timeout=20):
    """Run ``uffdtool COMMAND -q ARGS``, which must fail: check_error, and nothing else on
    stderr. Returns the CompletedProcess."""
    r = run_tool(command, "-q", *args, timeout=timeout)
    check_error(r.returncode, r.stderr, code, match)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    return r


# -- a uffdtool command running in the background, logging to a file ----------------------------

_running = []


@pytest.fixture(autouse=True)
def _kill_running_tools():
    """Whatever a test asserts, no uffdtool started as a Tool outlives it."""
    yield
    while _running:
        _running.pop().kill()


class Tool:
    """``uffdtool COMMAND --log LOG [--quiet] ARGS`` running in the background, by default once
    its ``ready`` record is written. The log is a file, not a pipe: an unread pipe would block
    the log writer and with it the faults (LOG: a temporary file unless given). After
    ``finish``/``stop``: ``returncode``, ``stdout_text`` and ``stderr`` (text). ENV: variables
    added to the environment."""

    def __init__(self, command, *args, log=None, quiet=True, wait=True, env=None):
        if log is None:
            self._tmp = tempfile.NamedTemporaryFile("r", prefix="uffdtool-%s-" % command,
                                                    suffix=".json")
            log = self._tmp.name
        self.log = str(log)
        argv = [sys.executable, TOOL, command, "--log", self.log] + (["--quiet"] if quiet else [])
        self.p = subprocess.Popen(argv + [str(a) for a in args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True,
                                  env=dict(os.environ, **env) if env else None)
        self.pid = self.p.pid
        _running.append(self)
        if wait:
            self.wait_ready()

    def wait_for(self, event, timeout=15):
        """Wait until the log has an EVENT record; the tool must not exit before."""
        deadline = time.monotonic() + timeout
        while not self.events(event):
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.p.kill()
                raise AssertionError("no %s record: %s" % (event, self.communicate(timeout=5)))
            time.sleep(0.01)

    def wait_ready(self, timeout=15):
        self.wait_for("ready", timeout)

    def records(self):
        """The JSON records written so far (complete lines only)."""
        try:
            with open(self.log) as f:
                return [json.loads(line) for line in f
                        if line.startswith("{") and line.endswith("\n")]
        except FileNotFoundError:
            return []

    def events(self, name):
        return [r for r in self.records() if r["event"] == name]

    def stats(self):
        return self.events("stats")[-1]

    @property
    def returncode(self):
        return self.p.returncode

    def poll(self):
        return self.p.poll()

    def send_signal(self, sig):
        self.p.send_signal(sig)

    def communicate(self, timeout=15):
        """Wait for the end; returns (stdout, stderr), the same on every later call."""
        if not hasattr(self, "stderr"):
            self.stdout_text, self.stderr = self.p.communicate(timeout=timeout)
        return self.stdout_text, self.stderr

    def finish(self, timeout=15):
        """Wait for the tool to end by itself; returns its exit status."""
        self.communicate(timeout)
        return self.p.returncode

    def stop(self, sig=signal.SIGINT):
        """Signal the tool (None: just wait for it); returns (JSON records, stderr)."""
        if sig is not None:
            self.p.send_signal(sig)
        self.communicate()
        return self.records(), self.stderr

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.communicate(timeout=5)

    wait = finish


def start_tool(command, *args):
    """A Tool: ``uffdtool COMMAND --log TMPFILE --quiet ARGS``, once ``ready``."""
    return Tool(command, *args)


def stop_tool(p, sig=signal.SIGINT):
    """``p.stop(sig)``: signal a Tool (None: just wait for it); returns (records, stderr)."""
    return p.stop(sig)


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


# -- shared by the serve-file tests and the scripts of target processes -------------------------

#: the start of a target script that maps its memory through libc (ctypes releases the GIL, and a
#: plain mmap.mmap would be shared anonymous memory): ``libc.mmap`` ready to call
LIBC_MMAP = r"""
import ctypes, hashlib, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
"""


@pytest.fixture
def src(tmp_path):
    """A 64-page source file of pseudo-random bytes: (path, bytes)."""
    data = random.Random(5).randbytes(64 * uffdtool.PAGE_SIZE)
    path = tmp_path / "mem.bin"
    path.write_bytes(data)
    return str(path), data


@pytest.fixture
def tools():
    """The Tools a test started (conftest kills every Tool when the test ends)."""
    return []
