"""Run an untrusted Python snippet against unit tests: a subprocess with limits, in a temporary directory.

    run_tests(code, calls) -> SandboxResult(outputs, status)

Layers, from the outside in:
  * a fresh temporary directory as the working directory, removed afterwards;
  * `python -I -S` (isolated: no environment variables, no user or site packages);
  * resource limits set in the child before it starts (resource.setrlimit): CPU seconds, address
    space, size of any file it writes, open files, no core dumps;
  * a wall-clock timeout: the child runs in its own session and the whole process group is killed;
  * inside the child, before the snippet runs, guards on the functions that reach the file system
    and other processes: `open`/`io.open`/`os.open` refuse paths outside the temporary directory,
    and os.system/popen/fork/exec*/spawn*/kill/remove/rename/chdir/..., subprocess, socket and
    ctypes are unavailable. A guard that fires ends the child at once (os._exit), so a snippet
    cannot catch the refusal and go on: the result is "blocked".

The child prints nothing the snippet can forge: its stdout/stderr are sent to /dev/null at the file
descriptor level before the snippet runs, and the outputs of the test calls go to a private copy of
the original stdout. The PARENT compares those outputs with the expected values, so a snippet that
prints a fake verdict gains nothing. This is a best-effort sandbox for model-written code of a small
model, not a security boundary against a determined attacker (use a container for that).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

STATUSES = ("ok", "error", "timeout", "blocked", "killed")


@dataclass
class SandboxResult:
    status: str  # ok | error (the snippet raised while defining) | timeout | blocked | killed (a limit)
    outputs: list = field(default_factory=list)  # repr-able results of the test calls (None where a call raised)
    detail: str = ""


# The child: guards first, then the snippet, then the calls. Parameters come in as JSON on stdin.
RUNNER = r'''
import builtins, io, json, os, sys
params = json.loads(sys.stdin.read())
ROOT = os.path.realpath(os.getcwd())
result_fd = os.dup(1)
devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(devnull, 1)
os.dup2(devnull, 2)
_exit, _write, _real = os._exit, os.write, os.path.realpath
_open, _io_open, _os_open = builtins.open, io.open, os.open

def _deny(what):
    try:
        _write(result_fd, (json.dumps({"status": "blocked", "detail": str(what)[:200]}) + "\n").encode())
    finally:
        _exit(3)

def _inside(path):
    if isinstance(path, int):
        return path > 2 and path != result_fd
    p = _real(os.fspath(path))
    return p == ROOT or p.startswith(ROOT + os.sep)

def guarded_open(file, *a, **k):
    if not _inside(file):
        _deny(f"open {file!r}")
    return _open(file, *a, **k)

def guarded_os_open(path, *a, **k):
    if not _inside(path):
        _deny(f"os.open {path!r}")
    return _os_open(path, *a, **k)

def refuse(name):
    def f(*a, **k):
        _deny(name)
    return f

builtins.open = guarded_open
io.open = guarded_open
os.open = guarded_os_open
for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "remove", "unlink", "rmdir", "removedirs", "rename",
             "renames", "replace", "chdir", "fchdir", "chroot", "chmod", "chown", "lchown", "link", "symlink", "truncate",
             "mkfifo", "mknod", "setuid", "setgid", "execv", "execve", "execl", "execle", "execlp", "execvp", "execvpe",
             "spawnv", "spawnve", "spawnl", "spawnle", "posix_spawn", "posix_spawnp", "putenv", "unsetenv", "dup2", "write"):
    if hasattr(os, name):
        setattr(os, name, refuse("os." + name))
for name in ("subprocess", "socket", "_socket", "ctypes", "_ctypes", "multiprocessing", "shutil", "pty", "signal", "_posixsubprocess"):
    sys.modules[name] = None  # `import x` now raises ImportError

namespace = {"__name__": "solution"}
try:
    exec(compile(params["code"], "solution.py", "exec"), namespace)
except BaseException as e:
    _write(result_fd, (json.dumps({"status": "error", "detail": type(e).__name__ + ": " + str(e)[:200]}) + "\n").encode())
    _exit(0)
outputs = []
for call in params["calls"]:
    try:
        value = eval(call, namespace)
        json.dumps(value)
    except BaseException:
        value = None
    outputs.append(value)
_write(result_fd, (json.dumps({"status": "ok", "outputs": outputs}) + "\n").encode())
_exit(0)
'''


def _limits(cpu_s: int, memory_mb: int, file_mb: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_tests(code: str, calls: list[str], timeout_s: float = 2.0, memory_mb: int = 256, file_mb: int = 1) -> SandboxResult:
    """Define `code`, evaluate each call expression (e.g. "add(2)"), return their outputs."""
    tmp = tempfile.mkdtemp(prefix="k2-sandbox-")
    try:
        with open(os.path.join(tmp, "runner.py"), "w") as f:
            f.write(RUNNER)
        proc = subprocess.Popen([sys.executable, "-I", "-S", "runner.py"], cwd=tmp, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_limits(max(1, int(timeout_s + 0.999)), memory_mb, file_mb), env={})
        try:
            out, _ = proc.communicate(json.dumps({"code": code, "calls": calls}).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return SandboxResult("timeout", detail=f"over {timeout_s:g} s")
        finally:
            _kill_group(proc)  # anything the snippet left running in its session
        lines = out.decode(errors="replace").strip().splitlines()
        if not lines:
            return SandboxResult("killed", detail=f"exit status {proc.returncode} (a resource limit or a signal)")
        try:
            msg = json.loads(lines[-1])
        except json.JSONDecodeError:
            return SandboxResult("killed", detail="no result")
        return SandboxResult(msg.get("status", "killed"), msg.get("outputs", []), msg.get("detail", ""))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
