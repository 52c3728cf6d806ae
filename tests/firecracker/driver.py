#!/usr/bin/env python3
"""Snapshot and restore a real Firecracker through ``uffdtool serve-file`` (standard library only).

The pieces, as functions so that tests can combine them (README "Tested with a real Firecracker"):

* ``build_guest(out_dir)``: compile guest.c (beside this file) into a bare-metal ELF vmlinux.
* ``Firecracker(workdir, binary)``: one Firecracker process, its API socket (HTTP over a Unix
  socket, ``api()``), its serial console (the guest's output is Firecracker's stdout, kept in a
  file: ``wait_for()``, ``lines()``; its stdin feeds the guest's serial input: ``send()``).
* ``make_snapshot(workdir, binary, kernel)``: boot the guest, wait until it has written its
  pattern (``guest: ready``), pause, take a full snapshot (memory file + vmstate), kill it.
* ``serve_file(mem, sock, *args)``: start ``uffdtool.py serve-file --file MEM
  --firecracker-socket SOCK`` (a JSON log in a file) and wait for its ``ready`` record;
  ``finish_handler(p)`` waits for it to exit and returns (exit status, records, stderr).
* ``restore(workdir, binary, snap, sock)``: a new Firecracker loading the snapshot with
  ``mem_backend: {backend_type: Uffd, backend_path: SOCK}`` and resuming it.
  ``restore_many(workdir, binary, snap, socks)`` does that for len(socks) VMs at once from one
  snapshot (SOCKS may name one handler's socket several times, or one socket per handler).
* ``run_guest(fc, commands)``: send the guest its commands ('v' verify, 'b' balloon, 'q' quit),
  wait for Firecracker to exit and return the guest's lines.
* ``cleanup()``: kill whatever this module started that still runs.

Run as a script it does one whole round trip and prints what happened::

    python3 tests/firecracker/driver.py [--keep DIR] [--mem-mib 128] [--commands vq]
                                        [--balloon-mib N] [-- SERVE-FILE-OPTIONS...]
                                        # e.g. -- --readahead 16
"""
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOOL = os.path.join(ROOT, "uffdtool.py")
sys.path.insert(0, HERE)
import get_firecracker  # noqa: E402

MEM_MIB = 128
PATTERN_BASE = 0x1000000          # what guest.c fills (and build_guest passes to it)
PATTERN_PAGES = 16384
ROUNDS = 2
TIMEOUT = 60                      # generous: two cores shared with other work


class DriverError(Exception):
    pass


_started = []                     # every process started here; cleanup() ends what still runs


def _start(argv, **kw):
    p = subprocess.Popen(argv, **kw)
    _started.append(p)
    return p


def cleanup():
    """Kill every Firecracker and serve-file this module started that still runs (a test calls
    this after each test, whatever it asserted)."""
    while _started:
        p = _started.pop()
        if p.poll() is None:
            p.kill()
        p.wait(10)


# -- the guest ----------------------------------------------------------------------------------

def build_guest(out_dir, cc="gcc"):
    """Compile guest.c + guest.ld into OUT_DIR/vmlinux; returns its path.  Raises DriverError
    (with the compiler's message) if the compiler is missing or fails."""
    if shutil.which(cc) is None:
        raise DriverError("%s not found (needed to build the guest)" % cc)
    out = os.path.join(out_dir, "vmlinux")
    cmd = [cc, "-O2", "-ffreestanding", "-nostdlib", "-static", "-fno-pie", "-no-pie",
           "-fno-stack-protector", "-mno-red-zone", "-mgeneral-regs-only",
           "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
           "-DPATTERN_BASE=%#xUL" % PATTERN_BASE, "-DPATTERN_PAGES=%dUL" % PATTERN_PAGES,
           "-DROUNDS=%d" % ROUNDS, "-Wl,-T," + os.path.join(HERE, "guest.ld"),
           "-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments",
           "-o", out, os.path.join(HERE, "guest.c")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise DriverError("building the guest failed: %s" % r.stderr.strip()[-500:])
    return out


# -- one Firecracker ----------------------------------------------------------------------------

class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        # Firecracker creates its API socket file (bind) a moment before it listens
        deadline = time.monotonic() + self.timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout)
            try:
                self.sock.connect(self.unix_path)
                return
            except (ConnectionRefusedError, FileNotFoundError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)


class Firecracker:
    """A Firecracker process with its API socket, console file and stdin pipe in WORKDIR."""

    def __init__(self, workdir, binary, name="fc"):
        self.workdir = workdir
        self.api_sock = os.path.join(workdir, name + ".api")
        self.console = os.path.join(workdir, name + ".out")
        self.errfile = os.path.join(workdir, name + ".err")
        if os.path.exists(self.api_sock):
            os.unlink(self.api_sock)
        with open(self.console, "wb") as out, open(self.errfile, "wb") as err:
            self.proc = _start([binary, "--api-sock", self.api_sock, "--level", "Warn"],
                               stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir)
        self.pid = self.proc.pid
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(self.api_sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DriverError("Firecracker did not create its API socket: %s" % self.output())
            time.sleep(0.01)

    def api(self, method, path, body=None, timeout=TIMEOUT):
        """One API request; returns the decoded JSON answer (or None); DriverError if not 2xx."""
        conn = _UnixHTTPConnection(self.api_sock, timeout)
        try:
            data = json.dumps(body) if body is not None else None
            headers = {"Content-Type": "application/json", "Accept": "application/json"}
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            text = r.read().decode(errors="replace")
        except OSError as e:
            raise DriverError("%s %s: %s (Firecracker: %s)" % (method, path, e, self.output()))
        finally:
            conn.close()
        if not 200 <= r.status < 300:
            raise DriverError("%s %s: HTTP %d %s" % (method, path, r.status, text))
        return json.loads(text) if text.strip() else None

    def output(self):
        """Everything Firecracker wrote so far (console, then its stderr), as text."""
        with open(self.console, "rb") as f, open(self.errfile, "rb") as g:
            return (f.read() + g.read()).decode(errors="replace")

    def lines(self):
        """The guest's own lines on the console (they start with ``guest:``)."""
        return [line.strip() for line in self.output().splitlines() if line.startswith("guest:")]

    def wait_for(self, text, timeout=TIMEOUT):
        """Wait until a guest line contains TEXT; DriverError if Firecracker exits first."""
        deadline = time.monotonic() + timeout
        while True:
            if any(text in line for line in self.lines()):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise DriverError("no guest line with %r (Firecracker %s): %s" % (
                    text, "exited %s" % self.proc.returncode if self.proc.poll() is not None
                    else "timed out", self.output()[-2000:]))
            time.sleep(0.02)

    def send(self, data):
        """Bytes to the guest's serial input."""
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait(self, timeout=TIMEOUT):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise DriverError("Firecracker still running after %ss: %s" % (timeout,
                                                                            self.output()[-2000:]))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass


# -- snapshot -----------------------------------------------------------------------------------

class Snapshot:
    def __init__(self, mem, vmstate):
        self.mem, self.vmstate = mem, vmstate


def boot(workdir, binary, kernel, mem_mib=MEM_MIB, balloon=True, name="boot"):
    """Start Firecracker, configure it (1 vCPU, MEM_MIB, the guest, a balloon at 0 MiB) and boot;
    returns the Firecracker once the guest says ``ready``."""
    fc = Firecracker(workdir, binary, name)
    try:
        fc.api("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mem_mib})
        fc.api("PUT", "/boot-source", {"kernel_image_path": kernel, "boot_args": "console=ttyS0"})
        if balloon:
            fc.api("PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False})
        fc.api("PUT", "/actions", {"action_type": "InstanceStart"})
        fc.wait_for("guest: ready")
    except BaseException:
        fc.kill()
        raise
    return fc


def take_snapshot(fc, mem, vmstate):
    """Pause FC and write a full snapshot to MEM and VMSTATE."""
    fc.api("PATCH", "/vm", {"state": "Paused"})
    fc.api("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": vmstate,
                                       "mem_file_path": mem})
    return Snapshot(mem, vmstate)


def make_snapshot(workdir, binary, kernel, mem_mib=MEM_MIB, balloon=True):
    """Boot the guest, let it fill its memory, snapshot it into WORKDIR, kill it."""
    fc = boot(workdir, binary, kernel, mem_mib, balloon)
    try:
        return take_snapshot(fc, os.path.join(workdir, "vm.mem"),
                             os.path.join(workdir, "vm.vmstate"))
    finally:
        fc.kill()


# -- the handler --------------------------------------------------------------------------------

def serve_file(mem, sock, *args, log=None):
    """Start ``uffdtool.py serve-file --file MEM --firecracker-socket SOCK --log LOG --quiet ARGS``
    (LOG: JSON lines) and wait for its ``ready`` record; the Popen gets ``.log_path``."""
    if log is None:
        fd, log = tempfile.mkstemp(prefix="uffdtool-fc-", suffix=".json")
        os.close(fd)
    if os.path.exists(log):
        os.unlink(log)                        # an old ``ready`` record must not count
    p = _start([sys.executable, TOOL, "serve-file", "--file", mem, "--firecracker-socket", sock,
                "--log", log, "--quiet"] + [str(a) for a in args],
               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.log_path = log
    deadline = time.monotonic() + TIMEOUT
    while p.poll() is None and time.monotonic() < deadline:
        if any(r.get("event") == "ready" for r in _records(log)):
            return p
        time.sleep(0.02)
    if p.poll() is None:
        p.kill()
    _, err = p.communicate(timeout=10)
    raise DriverError("serve-file did not get ready (exit %s): %s" % (p.returncode, err.strip()))


def _records(log):
    try:
        with open(log) as f:
            return [json.loads(line) for line in f
                    if line.startswith("{") and line.endswith("\n")]
    except FileNotFoundError:                 # serve-file has not opened its log yet
        return []


def finish_handler(p, timeout=TIMEOUT):
    """Wait for a serve_file handler to exit; returns (status, JSON records, stderr)."""
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate(timeout=10)
        raise DriverError("serve-file still running after %ss: %s" % (timeout, err))
    return p.returncode, _records(p.log_path), err


def stats(records):
    """The last ``stats`` record of a handler's log (or {})."""
    found = [r for r in records if r.get("event") == "stats"]
    return found[-1] if found else {}


# -- restore ------------------------------------------------------------------------------------

def restore(workdir, binary, snap, sock, name="restore", resume=True):
    """A new Firecracker that loads SNAP with its memory from the handler listening on SOCK."""
    fc = Firecracker(workdir, binary, name)
    try:
        fc.api("PUT", "/snapshot/load", {
            "snapshot_path": snap.vmstate,
            "mem_backend": {"backend_type": "Uffd", "backend_path": sock},
            "resume_vm": resume})
    except BaseException:
        fc.kill()
        raise
    return fc


def restore_many(workdir, binary, snap, socks, names=None):
    """Restore len(SOCKS) VMs from SNAP at once (one thread each, so that the loads overlap);
    SOCKS may repeat one path (one handler serving several peers).  Returns the Firecrackers;
    if any load fails, all are killed and the first error is raised."""
    names = names or ["vm%d" % i for i in range(len(socks))]
    result, errors = [None] * len(socks), []

    def one(i):
        try:
            result[i] = restore(workdir, binary, snap, socks[i], names[i])
        except Exception as e:                 # reported below, after every thread is done
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(socks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for fc in result:
            if fc is not None:
                fc.kill()
        raise errors[0]
    return result


def run_guest(fc, commands=b"vq", timeout=TIMEOUT):
    """Send COMMANDS to a restored guest and wait for Firecracker to exit (the guest's 'q' resets
    the VM); returns the guest's lines printed since the snapshot (after ``guest: ready``)."""
    fc.send(commands)
    fc.wait(timeout)
    return fc.lines()


def verify_lines(lines):
    """The guest's ``round N/M ...`` lines."""
    return [line for line in lines if line.startswith("guest: round ")]


# -- one round trip from the command line -------------------------------------------------------

def main(argv):
    import argparse
    ap = argparse.ArgumentParser(
        description="Boot the test guest, snapshot it, restore it through uffdtool serve-file "
                    "and print the guest's verification lines and serve-file's stats.",
        epilog="example: %(prog)s --keep /var/tmp/fcsnap -- --record /var/tmp/ws.txt")
    ap.add_argument("--keep", metavar="DIR", help="keep the guest and snapshot in DIR and reuse "
                    "a snapshot already there (default: a temporary directory)")
    ap.add_argument("--commands", default="vq", help="guest commands: v verify, b balloon, "
                    "q quit (default: %(default)s)")
    ap.add_argument("--balloon-mib", type=int, help="PATCH /balloon to this size first")
    ap.add_argument("--mem-mib", type=int, default=MEM_MIB, help="guest memory for a new "
                    "snapshot (default: %(default)s; above 3328 the guest has two regions)")
    ap.add_argument("serve_args", nargs="*", metavar="-- SERVE-FILE-OPTION",
                    help="extra options for serve-file, after --")
    args = ap.parse_args(argv)
    binary = get_firecracker.get_firecracker()
    with tempfile.TemporaryDirectory(prefix="uffdtool-fc-") as tmp:
        d = args.keep or tmp
        os.makedirs(d, exist_ok=True)
        snap = Snapshot(os.path.join(d, "vm.mem"), os.path.join(d, "vm.vmstate"))
        if not (args.keep and os.path.exists(snap.mem) and os.path.exists(snap.vmstate)):
            t = time.monotonic()
            snap = make_snapshot(d, binary, build_guest(d), args.mem_mib)
            print("snapshot: %s (%d MiB) in %.2f s" % (snap.mem, os.path.getsize(snap.mem) >> 20,
                                                       time.monotonic() - t))
        sock = os.path.join(d, "uffd.sock")
        h = serve_file(snap.mem, sock, *args.serve_args, log=os.path.join(d, "serve.json"))
        t = time.monotonic()
        fc = restore(d, binary, snap, sock)      # on any error, cleanup() ends both processes
        if args.balloon_mib is not None:
            fc.api("PATCH", "/balloon", {"amount_mib": args.balloon_mib})
        lines = run_guest(fc, args.commands.encode())
        status, records, err = finish_handler(h)
        print("restore + guest run: %.2f s" % (time.monotonic() - t))
        for line in lines:
            print(line)
        st = stats(records)
        print("serve-file exit %s: faults=%s pages_copy=%s pages_zero=%s prefetch_pages=%s "
              "events_remove=%s%s" % (status, st.get("faults"), st.get("pages_copy"),
                                      st.get("pages_zero"), st.get("prefetch_pages"),
                                      st.get("events_remove", 0),
                                      (" stderr: " + err.strip()) if err.strip() else ""))
        rounds = verify_lines(lines)
        ok = status == 0 and rounds and all("verify ok" in line for line in rounds)
        return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (DriverError, get_firecracker.FetchError) as e:
        print("driver: %s" % e, file=sys.stderr)
        sys.exit(1)
    finally:
        cleanup()
