"""Run untrusted Python (the policy's code) against unit tests, isolated by the kernel, not by Python.

    run_tests(code, calls) -> SandboxResult(status, outputs)      # outputs: the values of the call expressions
    isolation() -> Isolation(layers, ok, line)                    # what this machine offers, probed once

The snippet runs in a fresh `python -I -S` in its own session that imports jail.py (the mechanism) and
confines itself before the snippet's first line:

  layer         what it stops                                            needs
  namespaces    new mount, PID, network, IPC and UTS namespaces. The     root with CAP_SYS_ADMIN (these
                root is a read-only tmpfs holding read-only binds of     machines, CI); any kernel >= 3.8
                the Python install and /lib*, /usr/lib* only, plus a
                small tmpfs /work (the scratch directory, 8 MB): no
                /etc, /proc, /dev, /home, /tmp, no artifacts root. No
                network interface but a down loopback. The snippet is
                PID 1's subtree of a PID namespace: when its time is up
                the outer process kills PID 1 and the kernel kills every
                process in the namespace (setsid does not escape it).
  uid           setgroups([]), setresgid/setresuid to a dedicated      root (with namespaces)
                uid/gid (0x70000000 + the jail's pid, no passwd entry):
                no capabilities, no root-owned files, RLIMIT_NPROC
                binds, signals to any other process refused.
  landlock      the kernel refuses any file access outside reads of      Linux >= 5.13 with landlock in
                the Python install and libraries and full access to     the LSM list (ABI 4: no TCP;
                the scratch directory, whatever the uid; ABI >= 4: no    ABI 6: scoped signals)
                TCP bind/connect; ABI >= 6: no signals to, and no
                abstract sockets of, processes outside the sandbox.
  seccomp       a BPF deny list (EPERM): socket, connect, bind, listen,  x86_64, Linux >= 3.17
                execve/execveat (the interpreter is already running),
                ptrace, process_vm_*, pidfd_getfd, mount and namespace
                calls, bpf, io_uring, keyrings, kernel modules, TIOCSTI,
                clearing the parent-death signal; x32 and foreign-arch
                syscalls kill. Without a PID namespace also fork and
                signals to other processes.
  nocaps        root without namespaces (a container): keep uid 0 but    root without CAP_SYS_ADMIN
                drop every capability (Landlock then holds the files)
  rlimits       CPU seconds, 256 MB address space, 1 MB per written      always
                file, 64 open files, 8 processes, no core dumps
  tripwire      a Python audit hook: an *attempt* (open outside the      always (not a boundary: it can be
                scratch dir, os.system, subprocess, fork, socket,        disarmed; the layers above hold
                ctypes, kill, listdir('/') ...) ends the run as          without it)
                "blocked", so a caught PermissionError cannot score

`isolation()` runs an honest probe with every layer the host may offer and drops the ones that fail to
set up. The host is isolated when the file system (namespaces or landlock), the network (namespaces or
seccomp) and processes (namespaces, or seccomp without fork) are held and the snippet has no root
capabilities (uid or nocaps). Where that is not the case, code environments refuse to run unless the
user opts in (`k2 rl/eval --unsafe-sandbox`, or the recipe key `envs.unsafe_sandbox = true`).
On this project's machines (Linux 6.x, root) all layers are on; on a non-root Linux >= 5.13 with
Landlock, landlock + seccomp + rlimits hold; elsewhere (macOS, Linux < 5.13 without root) nothing does.

The verdict. The child never reports a status or a pass: it only writes the JSON list of the calls'
values to a pipe. The parent decides everything else from what the child cannot forge: its own clock
and the outer process's (timeout), the wait status (killed by a limit or the kernel; the tripwire's or a
failed definition's exit code, which a snippet could fake only to lose), the shape of the message
(exactly one JSON list of the right length, at most 1 MB, or the run is an error), and the expected
values, which never enter the sandbox (code_env.py compares). Printing a fake result goes to /dev/null; writing one to an inherited fd either
garbles the message or *is* the message, i.e. the snippet supplying the calls' values itself -- which
needs the answers, exactly what the test asks for, and it cannot read them: the tests' expected values,
the artifacts root, the parent's memory (/proc, ptrace) are out of its reach.
"""

from __future__ import annotations

import ctypes
import functools
import json
import marshal
import math
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from k2cli.errors import K2Error

STATUSES = ("ok", "error", "timeout", "blocked", "killed")
JAIL = str(Path(__file__).with_name("jail.py"))
# the child: imports jail.py from its directory (cached bytecode) and runs it on the run's directory
BOOT = "import sys; sys.path.insert(0, sys.argv[1]); import jail; jail.main(sys.argv[2])"
MAX_OUTPUT = 1 << 20  # bytes of result a child may send
UID_BASE = 0x70000000  # dedicated sandbox uids: UID_BASE + the jail's pid (unique while it runs)


@dataclass
class SandboxResult:
    status: str  # ok | error (raised while defining, or a garbled result) | timeout | blocked (tripwire) | killed (a limit)
    outputs: list = field(default_factory=list)  # JSON values of the test calls (None where a call raised)
    detail: str = ""


@dataclass
class Isolation:
    layers: tuple[str, ...]  # the layers every run applies (module docstring)
    ok: bool  # file system, network and processes held, no root capabilities
    line: str  # one line for the user


@functools.lru_cache(maxsize=1)
def _landlock_abi() -> int:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return max(0, libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))  # LANDLOCK_CREATE_RULESET_VERSION
    except (OSError, AttributeError):
        return 0


@functools.lru_cache(maxsize=1)
def _ro_paths() -> tuple[str, ...]:
    """What the interpreter needs to read: its install and the shared libraries (symlinks kept as links,
    with their targets added), without paths nested in another."""
    paths = []
    for p in (sys.base_prefix, sys.base_exec_prefix, "/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32"):
        if os.path.exists(p):
            paths.append(p)
            if os.path.islink(p):
                paths.append(os.path.realpath(p))
    paths = sorted(set(paths), key=len)
    return tuple(p for p in paths if os.path.islink(p) or not any(p.startswith(q.rstrip("/") + "/") and not os.path.islink(q)
                                                                      for q in paths if q != p))


def _candidates() -> list[str]:
    if sys.platform != "linux":
        return []
    layers = ["namespaces", "uid"] if os.geteuid() == 0 else []
    if _landlock_abi() > 0:
        layers.append("landlock")
    if platform.machine() == "x86_64":
        layers.append("seccomp")
    return layers


def _enough(layers) -> bool:
    ns = "namespaces" in layers
    return ((ns or "landlock" in layers) and (ns or "seccomp" in layers)
            and ("uid" in layers or "nocaps" in layers or os.geteuid() != 0))


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """Probe once per process: run an honest snippet with every candidate layer, drop the layer whose
    setup fails, repeat. ~0.1-0.3 s."""
    layers = _candidates()
    for _ in range(6):
        res = _run("def f():\n    return 1\n", ["f()"], layers, 5.0, 256, 1, True)
        if res.status == "ok" and res.outputs == [1]:
            break
        if res.status == "timeout":  # a loaded machine: try again
            continue
        failed = res.detail
        drop = ("namespaces" if any(w in failed for w in ("unshare", "mount", "pivot_root", "umount")) else
                "landlock" if "landlock" in failed else "seccomp" if "seccomp" in failed or "no_new_privs" in failed else
                "nocaps" if "capset" in failed else None)
        if drop is None or drop not in layers:
            return Isolation((), False, f"the code sandbox does not start here ({res.status}: {res.detail})")
        layers = [x for x in layers if x != drop and not (drop == "namespaces" and x == "uid")]
        if drop == "namespaces" and os.geteuid() == 0:
            layers.append("nocaps")
    layers = tuple(layers)
    if _enough(layers):
        return Isolation(layers, True, f"code sandbox: {', '.join(layers)}, rlimits")
    return Isolation(layers, False, "this machine offers no isolation for model-written code "
                     f"(layers that work: {', '.join(layers) or 'none'}; needs root for namespaces, or Linux >= 5.13 "
                     "with Landlock)")


def require_isolation(unsafe: bool = False) -> Isolation:
    """Refuse (K2Error) where the OS offers no isolation, unless the user opted in; say so in one line."""
    iso = isolation()
    if iso.ok:
        return iso
    if not unsafe:
        raise K2Error(f"refusing to run model-written code: {iso.line}",
                      "run as root or on Linux >= 5.13 with Landlock, or pass --unsafe-sandbox "
                      "(recipe key envs.unsafe_sandbox = true) to run it without isolation")
    _warn_unsafe(iso.line)
    return iso


@functools.lru_cache(maxsize=1)
def _warn_unsafe(line: str) -> None:
    """Once per process, even with K2_QUIET: the user chose to run untrusted code unconfined."""
    from k2cli.console import err

    err.print(f"[yellow]warning:[/] --unsafe-sandbox: model-written code runs WITHOUT isolation ({line})")


def run_tests(code: str, calls: list[str], timeout_s: float = 2.0, memory_mb: int = 256, file_mb: int = 1,
              *, unsafe: bool = False, tripwire: bool = True) -> SandboxResult:
    """Define `code` in the sandbox, evaluate each call expression (e.g. "add(2)"), return their values.
    `tripwire=False` leaves only the kernel's layers (the probe tests use it to show they hold alone)."""
    iso = require_isolation(unsafe)
    return _run(code, calls, list(iso.layers), timeout_s, memory_mb, file_mb, tripwire)


def _run(code, calls, layers, timeout_s, memory_mb, file_mb, tripwire) -> SandboxResult:
    tmp = tempfile.mkdtemp(prefix="k2-sandbox-")  # 0700: params.bin is ours, the snippet never sees this path
    try:
        os.mkdir(os.path.join(tmp, "work"))  # the scratch directory without namespaces (with them: a tmpfs)
        os.mkdir(os.path.join(tmp, "root"))  # the mount point of the private root
        params = {"code": code, "calls": calls, "layers": layers, "timeout_s": timeout_s, "cpu_s": max(1, math.ceil(timeout_s)),
                  "memory_mb": memory_mb, "file_mb": file_mb, "nproc": 8, "scratch_mb": 8, "tripwire": tripwire,
                  "ro_paths": list(_ro_paths()), "landlock_abi": _landlock_abi(), "uid": UID_BASE}
        with open(os.path.join(tmp, "params.bin"), "wb") as f:
            marshal.dump(params, f)
        # the jail's pid is only known after the start: the uid it takes is UID_BASE + its own pid (jail.py)
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", BOOT, os.path.dirname(JAIL), tmp],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True, env={}, cwd=tmp)
        end = time.monotonic() + timeout_s + 1.0  # +1 s: the outer process keeps the real clock
        try:
            out, over = _read_bounded(proc, end)
            if not over and not _exited(proc, end):  # EOF: the snippet's side is gone; the jail exits right after
                over = "timeout"
        finally:
            _kill_group(proc)  # a child past its deadline or over MAX_OUTPUT, and whatever is left in its session
        return _verdict(proc.returncode, out, over, len(calls), timeout_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_bounded(proc: subprocess.Popen, end: float) -> tuple[bytes, str]:
    """Read the child's stdout until EOF, at most MAX_OUTPUT bytes, until time.monotonic() reaches `end`."""
    buf, fd = bytearray(), proc.stdout.fileno()
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return bytes(buf), "timeout"
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return bytes(buf), ""
        buf += chunk
        if len(buf) > MAX_OUTPUT:
            return bytes(buf), "output"


def _verdict(rc: int, out: bytes, over: str, n_calls: int, timeout_s: float) -> SandboxResult:
    """The status from what the parent saw, never from what the child says."""
    if over == "timeout" or rc == 124:
        return SandboxResult("timeout", detail=f"over {timeout_s:g} s")
    if over == "output":
        return SandboxResult("killed", detail=f"result over {MAX_OUTPUT} bytes")
    if rc < 0 or rc >= 128:
        sig = -rc if rc < 0 else rc - 128
        return SandboxResult("killed", detail=f"signal {signal.Signals(sig).name if sig in signal.valid_signals() else sig} "
                                              "(a resource limit or the kernel)")
    if rc == 3:
        return SandboxResult("blocked", detail="an attempt to leave the sandbox")
    if rc == 120:
        return SandboxResult("error", detail=out.decode(errors="replace")[:200])  # setup failed (or a snippet says so)
    if rc != 0:
        return SandboxResult("error", detail=f"exit status {rc} (the code raised while defining)")
    try:
        outputs = json.loads(out)
    except (json.JSONDecodeError, UnicodeDecodeError):
        outputs = None
    if not isinstance(outputs, list) or len(outputs) != n_calls:
        return SandboxResult("error", detail="garbled result (more than the runner's one message)")
    return SandboxResult("ok", outputs)


def _exited(proc: subprocess.Popen, end: float) -> bool:
    """Wait until the child has exited, *without reaping it*: while it is a zombie its pid, the id of its
    process group, cannot be reused, so the killpg that follows can only hit what it left behind."""
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # Linux < 5.3
        fd = None
    try:
        while True:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            left = end - time.monotonic()
            if left <= 0:
                return False
            if fd is None:
                time.sleep(min(left, 0.005))
            else:
                select.select([fd], [], [], left)
    finally:
        if fd is not None:
            os.close(fd)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the leader is unreaped here (running or a zombie): the pgid is still ours
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
