"""The linter the README's test command runs: ruff (pinned in tests/requirements.txt, rules in
pyproject.toml) must find nothing in the code, the tests, the examples and the benchmarks."""
import os
import subprocess
import sys

from conftest import ROOT, need_module

PATHS = ["uffdtool.py", "tests", "examples", "bench"]


def test_ruff_finds_nothing():
    need_module("ruff", "ruff")
    for path in PATHS:                     # a missing path would make ruff lint nothing there
        assert os.path.exists(os.path.join(ROOT, path)), path
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache"] + PATHS, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
