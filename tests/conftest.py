"""Shared test fixtures: the module from the checkout, and the real-kernel requirements."""
import os
import subprocess
import sys

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


def run_tool(*args, timeout=60, **kw):
    """Run ``python3 uffdtool.py ARGS``; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, TOOL] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture
def uffd():
    u = uffdtool.Userfaultfd()
    yield u
    u.close()
