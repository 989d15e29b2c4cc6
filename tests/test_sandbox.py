"""The code sandbox under attack: every probe must be stopped by the kernel's layers alone (tripwire off),
and end as "blocked"/"error" with the tripwire on (a caught refusal must not score).

Each probe defines f(); the sandbox evaluates "f()" and returns its value, so an escape shows as a leaked
secret, a file that appears on the host, a connection the test's listener sees, a process that survives,
or a forged verdict. Three configurations: the layers this machine offers (namespaces, uid, landlock,
seccomp here) without and with the tripwire, and the no-namespace fallback (landlock + seccomp, + nocaps
as root) without the tripwire. Bounded: 256 MB, 1-2 s, 8 processes per run.
"""

import json
import os
import re
import socket
import subprocess
import time

import pytest

from k2cli.errors import K2Error
from k2cli.rl import sandbox
from k2cli.rl.sandbox import BOOT, UID_BASE, _run, isolation, run_tests

ISO = isolation()
FALLBACK = ["landlock", "seccomp"] + (["nocaps"] if os.geteuid() == 0 else [])
CONFIGS = {"kernel": (list(ISO.layers), False), "shipped": (list(ISO.layers), True)}
if sandbox._landlock_abi() > 0 and "seccomp" in ISO.layers and "namespaces" in ISO.layers:
    CONFIGS["fallback"] = (FALLBACK, False)
pytestmark = pytest.mark.skipif(not ISO.ok, reason=f"no isolation on this machine: {ISO.line}")

ATTEMPT = '''
def attempt(fn):
    try:
        return "got: " + repr(fn())[:4000]
    except BaseException as e:
        return "refused: " + repr(e)[:300]
'''


def probe(body: str, config: str, timeout_s: float = 2.0):
    """`body` defines attack(); f() returns what attack() got (or its refusal)."""
    layers, tripwire = CONFIGS[config]
    code = ATTEMPT + body + "\ndef f():\n    return attempt(attack)\n"
    start = time.monotonic()
    res = _run(code, ["f()"], layers, timeout_s, 256, 1, tripwire)
    assert time.monotonic() - start < timeout_s + 3, "the sandbox must end on time"
    return res


def survivors() -> list[str]:
    """Processes of any sandbox: a dedicated uid, or the jail's command line."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{pid}/status").read()
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        if UID_BASE <= uid < UID_BASE + (1 << 23) or BOOT.encode() in cmdline:
            found.append(pid)
    return found


def assert_stopped(res, config: str, *secrets: str):
    """No secret in what came back; with the tripwire, the run itself is refused."""
    seen = json.dumps(res.outputs) + res.detail
    for s in secrets:
        assert s not in seen, (s, res)
    if CONFIGS[config][1]:
        assert res.status in ("blocked", "error"), res


@pytest.fixture
def secret(artifacts_root):
    """A file in the artifacts root the policy must not read (its test answers, say)."""
    path = artifacts_root / "rl" / "v1" / "answers.json"
    path.parent.mkdir(parents=True)
    token = f"SECRET-{os.getpid()}-{time.time_ns()}"
    path.write_text(token)
    return path, token


CONFIG_NAMES = list(CONFIGS)

# ----------------------------------------------------------------------------- reading outside the scratch dir
READS = {
    "open": "def attack():\n    return open({p!r}).read()\n",
    "posix.open": "import posix\ndef attack():\n    return posix.read(posix.open({p!r}, posix.O_RDONLY), 4096)\n",
    "_io.FileIO": "import _io\ndef attack():\n    return _io.FileIO({p!r}).read()\n",
    "io.open_code": "import io\ndef attack():\n    return io.open_code({p!r}).read()\n",
    "pathlib": "import pathlib\ndef attack():\n    return pathlib.Path({p!r}).read_text()\n",
    "symlink": "import os\ndef attack():\n    os.symlink({p!r}, 'link')\n    return open('link').read()\n",
    "relative": "import os\ndef attack():\n    return open('../' * 30 + {p!r}.lstrip('/')).read()\n",
    "bytes path": "def attack():\n    return open({p!r}.encode()).read()\n",
}


@pytest.mark.parametrize("config", CONFIG_NAMES)
@pytest.mark.parametrize("how", list(READS))
def test_no_read_outside_the_scratch_dir(how, config, secret):
    path, token = secret
    for target, leak in ((str(path), token), ("/etc/passwd", "root:")):
        assert_stopped(probe(READS[how].format(p=target), config), config, leak)


@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_no_listing_no_proc_no_environment(config, secret):
    path, token = secret
    listing = probe("import os\ndef attack():\n    return os.listdir('/')\n", config)
    assert_stopped(listing, config, "'etc'", "'home'", "'tmp'", "'proc'")
    assert_stopped(probe(f"import os\ndef attack():\n    return os.listdir({str(path.parent.parent.parent)!r})\n", config),
                   config, "'rl'")
    for p in ("/proc/self/status", "/proc/self/mounts", f"/proc/{os.getpid()}/environ", f"/proc/{os.getpid()}/cmdline",
              f"/proc/{os.getpid()}/mem"):
        assert_stopped(probe(f"def attack():\n    return open({p!r}, 'rb').read()\n", config), config, "Uid", "pytest", "ext4")
    env = run_tests("import os\ndef f():\n    return dict(os.environ)\n", ["f()"], timeout_s=5.0)
    assert env.status == "ok" and set(env.outputs[0]) <= {"LC_CTYPE"}, env  # no K2_ARTIFACTS, no keys: nothing to learn


# ----------------------------------------------------------------------------- writing outside it
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_no_write_outside_the_scratch_dir(config, tmp_path):
    outside = tmp_path / "escaped.txt"
    attacks = [f"import posix\ndef attack():\n    posix.write(posix.open({str(outside)!r}, posix.O_CREAT | posix.O_WRONLY), b'x')\n",
               f"def attack():\n    open({str(outside)!r}, 'w').write('x')\n",
               f"import os\ndef attack():\n    os.rename('x', {str(outside)!r})\nopen('x', 'w').write('x')\n",
               "def attack():\n    open('/tmp/k2-sandbox-escaped.txt', 'w').write('x')\n",
               "def attack():\n    open('../escaped.txt', 'w').write('x')\n"]
    for body in attacks:
        assert_stopped(probe(body, config), config)
    assert not outside.exists() and not os.path.exists("/tmp/k2-sandbox-escaped.txt")


# ----------------------------------------------------------------------------- running other programs
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_no_shell_no_subprocess_no_exec(config, tmp_path):
    marker = tmp_path / "ran"
    cmd = f"touch {marker}"
    attacks = [f"import posix\ndef attack():\n    return posix.system({cmd!r})\n",
               f"import importlib, os\ndef attack():\n    importlib.reload(os)\n    return os.system({cmd!r})\n",
               f"import sys\ndef attack():\n    sys.modules.pop('subprocess', None)\n    sys.modules.pop('_posixsubprocess', None)\n"
               f"    import subprocess\n    return subprocess.run({cmd.split()!r}).returncode\n",
               f"import sys\ndef attack():\n    for m in ('ctypes', '_ctypes'):\n        sys.modules.pop(m, None)\n"
               f"    import ctypes\n    return ctypes.CDLL(None).system({cmd.encode()!r})\n",
               f"import os\ndef attack():\n    os.execv('/bin/sh', ['sh', '-c', {cmd!r}])\n",
               f"import os\ndef attack():\n    return os.posix_spawn('/usr/bin/touch', ['touch', {str(marker)!r}], {{}})\n"]
    for body in attacks:
        assert_stopped(probe(body, config), config)
    assert not marker.exists()


# ----------------------------------------------------------------------------- network
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_no_network(config):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        for body in (f"import socket\ndef attack():\n    return socket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
                     f"import sys\ndef attack():\n    sys.modules.pop('socket', None)\n    sys.modules.pop('_socket', None)\n"
                     f"    import _socket\n    s = _socket.socket()\n    s.connect(('127.0.0.1', {port}))\n    return s\n",
                     "import socket\ndef attack():\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                     "    return s.sendto(b'x', ('8.8.8.8', 53))\n"):
            assert_stopped(probe(body, config), config)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


# ----------------------------------------------------------------------------- processes
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_fork_is_bounded_and_nothing_survives(config):
    bomb = ("import posix\ndef attack():\n    n = 0\n    for _ in range(200):\n        try:\n            if posix.fork() == 0:\n"
            "                import time\n                time.sleep(60)\n                posix._exit(0)\n            n += 1\n"
            "        except OSError:\n            pass\n    return n\n")
    res = probe(bomb, config)
    assert_stopped(res, config)
    if res.status == "ok":
        forks = int(res.outputs[0].removeprefix("got: "))
        assert forks < 8, res  # RLIMIT_NPROC of the dedicated uid (or none at all without a PID namespace)
    spinner = "import posix\ndef attack():\n    while True:\n        try:\n            posix.fork()\n        except OSError:\n            pass\n"
    res = probe(spinner, config, timeout_s=1.0)
    assert res.status in ("timeout", "killed", "blocked"), res
    assert survivors() == []


@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_a_setsid_child_dies_with_the_sandbox(config):
    escape = ("import os, time\ndef attack():\n    pid = os.fork()\n    if pid == 0:\n        os.setsid()\n"
              "        if os.fork() == 0:\n            time.sleep(60)\n        os._exit(0)\n    return pid\n")
    assert_stopped(probe(escape, config), config)
    assert survivors() == []
    outlive = escape.replace("    return pid\n", "    time.sleep(60)\n")
    res = probe(outlive, config, timeout_s=1.0)
    assert res.status in ("timeout", "blocked", "error") or "refused" in res.outputs[0], res  # fallback: no fork at all
    assert survivors() == []


@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_no_signal_to_other_processes(config):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        for body in (f"import os\ndef attack():\n    os.kill({victim.pid}, 9)\n",
                     "import os\ndef attack():\n    os.kill(os.getppid(), 9)\n",
                     f"import sys\ndef attack():\n    sys.modules.pop('ctypes', None)\n    sys.modules.pop('_ctypes', None)\n"
                     f"    import ctypes\n    return ctypes.CDLL(None).kill({victim.pid}, 9)\n",
                     f"import ctypes\ndef attack():\n    return ctypes.CDLL(None).ptrace(16, {os.getpid()}, 0, 0)\n"):
            assert_stopped(probe(body, config), config)
        assert victim.poll() is None  # still alive (and so is this test process)
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_no_way_out_of_the_jail_through_the_kernel(config, secret):
    path, token = secret
    body = (f"import sys\nsys.modules.pop('ctypes', None)\nsys.modules.pop('_ctypes', None)\nimport ctypes\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "def attack():\n    out = []\n"
            "    for call in (lambda: libc.unshare(0x10000000 | 0x20000),\n"  # a user namespace regains capabilities
            "                 lambda: libc.chroot(b'/work'), lambda: libc.sethostname(b'x', 1),\n"
            "                 lambda: libc.mount(b'proc', b'/work', b'proc', 0, None),\n"
            "                 lambda: libc.syscall(425, 8, 0),\n"  # io_uring_setup
            f"                 lambda: open({str(path)!r}).read(), lambda: open('/proc/1/environ').read()):\n"
            "        out.append(attempt(call))\n"
            "    return out\n")
    res = probe(body, config)
    assert_stopped(res, config, token, "PATH=")
    if res.status == "ok":  # every call refused (-1), none succeeded (0)
        assert "got: 0" not in res.outputs[0], res


# ----------------------------------------------------------------------------- resources
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_memory_output_and_disk_are_bounded(config):
    for body in ("def attack():\n    return len(bytearray(2 ** 34))\n",
                 "def attack():\n    keep = []\n    while True:\n        keep.append(bytearray(1 << 20))\n"):
        res = probe(body, config)
        assert "got:" not in json.dumps(res.outputs), res
    res = _run("def f():\n    return 'x' * (20 << 20)\n", ["f()"], *(CONFIGS[config][:1]), 2.0, 256, 1, CONFIGS[config][1])
    assert res.status == "killed" and "bytes" in res.detail, res  # a result over 1 MB never reaches the parent's memory
    res = probe("def attack():\n    for i in range(64):\n        open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n", config)
    if "namespaces" in CONFIGS[config][0]:  # 1 MB per file, 8 MB of tmpfs scratch (the fallback: 1 MB per file only)
        assert "refused" in json.dumps(res.outputs) or res.status != "ok", res
    printer = probe("import sys\ndef attack():\n    for _ in range(200):\n        sys.stdout.write('x' * (1 << 20))\n", config)
    assert printer.status in ("ok", "blocked", "error"), printer  # printing goes to /dev/null


# ----------------------------------------------------------------------------- the verdict
@pytest.mark.parametrize("config", CONFIG_NAMES)
def test_the_verdict_cannot_be_forged(config):
    layers, tripwire = CONFIGS[config]
    run = lambda code, t=2.0: _run(code, ["f()"], layers, t, 256, 1, tripwire)  # noqa: E731
    fake = '[1]\n{"status": "ok", "outputs": [1]}\n'
    printed = run(f"print({fake!r})\nimport sys\nsys.__stdout__.write({fake!r})\ndef f():\n    return 0\n")
    assert printed.status == "ok" and printed.outputs == [0]  # prints go to /dev/null
    to_fds = f"import os\nfor fd in range(64):\n    try:\n        os.write(fd, {fake!r}.encode())\n    except OSError:\n        pass\n"
    garbled = run(to_fds + "def f():\n    return 0\n")
    assert garbled.outputs in ([], [0]) and garbled.status in ("error", "ok"), garbled  # never [1]
    assert run(to_fds + "import time\ntime.sleep(60)\n", 1.0).status == "timeout"  # the clock is the parent's
    assert run(to_fds + "raise SystemExit(0)\n").status == "error"  # the exit code alone decides nothing
    status_shaped = 'import os\nos.write(3, b\'{"status": "ok", "outputs": [1]}\')\nos._exit(0)\n'
    assert run(status_shaped).status == "error"  # the parent wants a list of values, not a status


def test_a_forged_result_still_needs_the_hidden_answer():
    """What the child may send is the calls' values; the expected values stay in the parent, so writing
    'values' of its own scores only if they are right -- i.e. if the snippet knows the answer."""
    from k2cli.data.chat import ParsedTurn
    from k2cli.rl.env import env_class

    code_env = env_class("code")
    want = time.time_ns() % 100_000
    problem = {"prompt": "p", "function": "f", "tests": [["f()", want]]}
    env = code_env([problem])
    forgeries = ["import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'[1]')\n    except OSError:\n        pass\n"
                 "os._exit(0)\ndef f():\n    return 0\n",
                 "print('[1]')\nprint('{\"status\": \"ok\", \"passed\": 1}')\ndef f():\n    return 0\n",
                 "import os\ndef f():\n    os.write(1, b'PASS')\n    return 0\n"]
    for code in forgeries:
        reward, info = env.score(problem, ParsedTurn(content=f"```python\n{code}```"))
        assert reward == 0.0 and not info["correct"], (code, info)
    assert env.score(problem, ParsedTurn(content=f"def f():\n    return {want}\n"))[0] == 1.0


# ----------------------------------------------------------------------------- honest code, refusal
def test_honest_code_runs_with_its_scratch_dir_and_the_stdlib():
    code = ("import math, json, re, collections, itertools, functools, decimal, fractions, datetime, statistics, typing\n"
            "open('notes.txt', 'w').write('kept')\n"
            "def f(x):\n    return [math.isqrt(x), open('notes.txt').read(), sorted(collections.Counter('abca').items())]\n")
    res = run_tests(code, ["f(17)", "f(-1)", "g()"])
    assert res.status == "ok" and res.outputs == [[4, "kept", [["a", 2], ["b", 1], ["c", 1]]], None, None], res


def test_refuses_without_isolation_unless_opted_in(monkeypatch):
    none = sandbox.Isolation((), False, "this machine offers no isolation for model-written code")
    monkeypatch.setattr(sandbox, "isolation", lambda: none)
    with pytest.raises(K2Error, match="--unsafe-sandbox"):
        run_tests("def f():\n    return 1\n", ["f()"])
    assert run_tests("def f():\n    return 1\n", ["f()"], unsafe=True).outputs == [1]  # the user's explicit choice
