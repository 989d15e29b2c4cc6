"""The sandbox's child: `jail.main(DIR)` in a fresh `python -I -S` puts itself in a jail, then runs the snippet.

Not imported by k2: a fresh interpreter imports it (stdlib only; `-I` keeps k2, the venv and the
environment out; imported rather than run as a script so its bytecode is cached), so the trainer's
threads never meet fork(). sandbox.py is the parent and explains the design; this file is the
mechanism, in the order it is applied. DIR holds `params.bin` (marshal, written by the parent, readable
only by root/the parent's user), `work/` (the scratch directory without namespaces) and `root/` (an
empty mount point). The verdict is never written here: the snippet's outputs go to the parent, which
compares them with expected values this process never sees. Start-up cost matters (one run per sample):
no `json` (it imports `re`, ~10 ms), no `signal` (enum).

Exit codes the parent reads (anything the snippet can fake only hurts itself):
    0 outputs written   1 the snippet raised while defining   3 a tripwire fired
    120 setup failed (the snippet never ran)   124 over the wall clock (set by the outer process)
    128+N killed by signal N (a resource limit, the kernel)
"""

import ctypes
import marshal
import os
import resource
import select
import sys
from _json import encode_basestring_ascii  # C: a JSON string literal

P: dict = {}  # the parameters (main)
SIGKILL = 9
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

# ----------------------------------------------------------------------------- constants (linux uapi)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x20000000, 0x40000000
CLONE_NEW_ANY = 0x7E020080  # every CLONE_NEW* flag (ns, cgroup, uts, ipc, user, pid, net, time)
CLONE_THREAD = 0x10000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER, PR_SET_CHILD_SUBREAPER = 1, 38, 22, 2, 36

# x86_64 syscall numbers. Landlock's (444-446) are the same on every architecture; seccomp is applied on
# x86_64 only (other machines get the remaining layers, and sandbox.isolation() says so).
NR = dict(socket=41, connect=42, accept=43, bind=49, listen=50, socketpair=53, clone=56, fork=57, vfork=58, execve=59,
          kill=62, ptrace=101, syslog=103, rt_sigqueueinfo=129, mknod=133, personality=135, prctl=157, pivot_root=155,
          chroot=161, acct=163, mount=165, umount2=166, swapon=167, swapoff=168, reboot=169, iopl=172, ioperm=173,
          init_module=175, delete_module=176, quotactl=179, tkill=200, tgkill=234, kexec_load=246, add_key=248,
          request_key=249, keyctl=250, mknodat=259, unshare=272, accept4=288, rt_tgsigqueueinfo=297, perf_event_open=298,
          name_to_handle_at=303, open_by_handle_at=304, setns=308, process_vm_readv=310, process_vm_writev=311, kcmp=312,
          finit_module=313, kexec_file_load=320, bpf=321, execveat=322, userfaultfd=323, pidfd_send_signal=424,
          io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428, move_mount=429, fsopen=430,
          fsconfig=431, fsmount=432, fspick=433, clone3=435, pidfd_getfd=438, mount_setattr=442, ioctl=16)
AUDIT_ARCH_X86_64 = 0xC000003E


def fail(step):
    """Setup failed: say where (the snippet has not run, so this message is ours) and stop."""
    err = ctypes.get_errno()
    os.write(1, f"sandbox setup: {step}: {os.strerror(err) if err else 'failed'}".encode())
    os._exit(120)


def check(ret, step):
    if ret < 0:
        fail(step)
    return ret


# ----------------------------------------------------------------------------- layers
def mount_root(new_root: str, ro_paths: list[str]) -> None:
    """A private, read-only root: a tmpfs holding read-only binds of `ro_paths` (the Python install and
    the shared libraries) at their own paths, and the scratch directory at /work; the old root is
    detached. Nothing else exists: no /etc, /proc, /dev, /home, artifacts root, /tmp."""
    def mount(src, dst, fstype, flags, data=None):
        check(libc.mount(src and src.encode(), dst.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                         data and data.encode()), f"mount {dst}")

    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    mount("tmpfs", new_root, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
    for path in ro_paths:
        dst = new_root + path
        if os.path.islink(path):  # /lib -> usr/lib on merged-/usr systems: same link, target bound on its own
            os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
            os.symlink(os.readlink(path), dst)
            continue
        os.makedirs(dst, 0o755, exist_ok=True)
        mount(path, dst, None, MS_BIND | MS_REC)
        mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.mkdir(new_root + "/work", 0o700)  # the scratch directory: a small tmpfs owned by the sandbox's uid
    mount("tmpfs", new_root + "/work", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={P['scratch_mb']}m,nr_inodes=1024,mode=700,uid={P['uid']},gid={P['uid']}")
    os.chdir(new_root)
    check(libc.syscall(NR["pivot_root"], b".", b"."), "pivot_root")  # the old root now sits under the new one ...
    check(libc.umount2(b".", MNT_DETACH), "umount old root")  # ... and is gone
    os.chdir("/")
    mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


class RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock(abi: int, read_paths: list[str], write_path: str) -> None:
    """Landlock: the kernel refuses any file access outside the rules, whatever the uid. Reads (no
    execute) beneath `read_paths`, everything beneath `write_path`; with ABI >= 4 no TCP bind/connect,
    with ABI >= 6 no signals to processes outside this sandbox and no abstract unix sockets."""
    fs_all = (1 << 13) - 1  # execute .. make_sym (ABI 1)
    fs_all |= (1 << 13) if abi >= 2 else 0  # refer
    fs_all |= (1 << 14) if abi >= 3 else 0  # truncate
    fs_all |= (1 << 15) if abi >= 5 else 0  # ioctl_dev
    read = (1 << 2) | (1 << 3)  # read_file, read_dir
    attr = RulesetAttr(fs_all, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = check(libc.syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)), "landlock_create_ruleset")
    for path, access in [(p, read) for p in read_paths] + [(write_path, fs_all & ~1)]:  # never execute
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = PathBeneath(access, pfd)
        check(libc.syscall(445, fd, 1, ctypes.byref(rule), ctypes.c_uint32(0)), f"landlock_add_rule {path}")
        os.close(pfd)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    check(libc.syscall(446, fd, ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(fd)


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def seccomp(allow_fork: bool, own_pid: int) -> None:
    """seccomp-bpf, a deny list checked by the kernel on every syscall (EPERM): no network sockets,
    no exec (the interpreter is already running), no ptrace / process_vm / pidfd_getfd, no mounts or
    namespaces, no kernel keyrings, modules, bpf, io_uring (which would bypass this filter), no TIOCSTI,
    no re-arming of the parent-death signal. Processes: with a PID namespace a fork is allowed (bounded
    by RLIMIT_NPROC, killed with the namespace); without one, none is (threads only), and signals may
    only go to this process."""
    LD, JEQ, JSET, JGE, RET = 0x20, 0x15, 0x45, 0x35, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, JMP|JGE|K, RET|K
    ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 1, 0x00050000 | 38
    arg0, arg1 = 16, 24  # offsets of the low 32 bits of args[0], args[1] in struct seccomp_data
    prog = [(LD, 0, 0, 4), (JEQ, 1, 0, AUDIT_ARCH_X86_64), (RET, 0, 0, KILL), (LD, 0, 0, 0),
            (JGE, 0, 1, 0x40000000), (RET, 0, 0, KILL)]  # wrong ABI or an x32 syscall: kill

    def deny(name, action=EPERM):
        prog.extend([(JEQ, 0, 1, NR[name]), (RET, 0, 0, action)])

    def deny_if_arg(name, offset, value, mask=False):  # nr == name and (arg & value if mask else arg == value) -> EPERM
        prog.extend([(JEQ, 0, 4, NR[name]), (LD, 0, 0, offset), ((JSET if mask else JEQ), 0, 1, value), (RET, 0, 0, EPERM),
                     (LD, 0, 0, 0)])

    for name in ("socket", "socketpair", "connect", "accept", "accept4", "bind", "listen", "execve", "execveat", "ptrace",
                 "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp", "mount", "umount2", "pivot_root", "chroot",
                 "unshare", "setns", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
                 "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "bpf", "perf_event_open",
                 "userfaultfd", "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
                 "open_by_handle_at", "name_to_handle_at", "personality", "syslog", "acct", "swapon", "swapoff", "reboot",
                 "iopl", "ioperm", "quotactl", "mknod", "mknodat"):
        deny(name)
    deny("clone3", ENOSYS)  # its flags sit in memory the filter cannot read; libc falls back to clone
    deny_if_arg("ioctl", arg1, 0x5412)  # TIOCSTI: type into a terminal
    deny_if_arg("prctl", arg0, PR_SET_PDEATHSIG)
    deny_if_arg("clone", arg0, CLONE_NEW_ANY, mask=True)  # no new namespaces (a user namespace would regain caps)
    if not allow_fork:
        prog.extend([(JEQ, 0, 4, NR["clone"]), (LD, 0, 0, arg0), (JSET, 1, 0, CLONE_THREAD), (RET, 0, 0, EPERM),
                     (LD, 0, 0, 0)])
        deny("fork")
        deny("vfork")
        for name in ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):  # only to ourselves
            prog.extend([(JEQ, 0, 4, NR[name]), (LD, 0, 0, arg0), (JEQ, 1, 0, own_pid), (RET, 0, 0, EPERM), (LD, 0, 0, 0)])
        deny("pidfd_send_signal")
    prog.append((RET, 0, 0, ALLOW))
    filt = (SockFilter * len(prog))(*[SockFilter(*ins) for ins in prog])
    fprog = SockFprog(len(prog), filt)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    check(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


def limits() -> None:
    """rlimits: CPU seconds (SIGXCPU, then SIGKILL), address space, size of a written file, open files,
    processes of this uid (binding only for a non-root uid: the dedicated one), no core dumps, no locked
    memory, no message queues."""
    mb = 1 << 20
    for lim, value in ((resource.RLIMIT_CPU, P["cpu_s"]), (resource.RLIMIT_AS, P["memory_mb"] * mb),
                       (resource.RLIMIT_FSIZE, P["file_mb"] * mb), (resource.RLIMIT_NOFILE, 64),
                       (resource.RLIMIT_NPROC, P["nproc"]), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_MEMLOCK, 0),
                       (resource.RLIMIT_MSGQUEUE, 0)):
        resource.setrlimit(lim, (value, value))


def drop_privileges(uid: int) -> None:
    """From root to a dedicated uid/gid with no supplementary groups: every capability goes with it."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def drop_capabilities() -> None:
    """Root without namespaces (no CAP_SYS_ADMIN): keep uid 0 (the Python install may sit under a 0700
    /root) but give up every capability; Landlock and seccomp hold the file system and processes."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    for cap in range(64):  # the bounding set first, so no later exec could regain them (exec is denied anyway)
        libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
    check(libc.syscall(126, ctypes.byref(Header(0x20080522, 0)), ctypes.byref((Data * 2)())), "capset")


def tripwire(work: str, read_roots: list[str]) -> None:
    """A Python audit hook that ends the run (exit 3, "blocked") when the snippet *tries* something the
    OS layers refuse: a caught PermissionError must not let it carry on and score. A tripwire, not the
    boundary: code can disarm it (gc, ctypes); the kernel layers above hold whether it fires or not."""
    _exit, fsdecode, realpath, sep = os._exit, os.fsdecode, os.path.realpath, os.sep

    def under(path, roots):
        try:
            p = realpath(fsdecode(path))  # bytes paths too
        except Exception:
            return False
        return any(p == r or p.startswith(r.rstrip(sep) + sep) for r in roots)

    refused = ("os.system", "os.exec", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
               "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn", "os.chroot", "os.setuid")
    read_events = ("os.listdir", "os.scandir", "os.chdir")  # the import system lists package directories
    path_events = ("os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.chmod",
                   "os.chown", "os.link", "os.symlink", "os.truncate", "os.utime", "os.chflags", "shutil.rmtree")
    readable = [work] + read_roots

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):  # an fd: opening it creates nothing new
                return
            writes = (mode and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & 0o1103)
            if not under(path, [work] if writes else readable):
                _exit(3)
        elif event in refused or event.startswith(("socket.", "ctypes.", "os.posix_spawn")):
            _exit(3)
        elif event in read_events:
            if args and isinstance(args[0], (str, bytes, os.PathLike)) and not under(args[0], readable):
                _exit(3)
        elif event in path_events:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)) and not under(a, [work]):
                    _exit(3)

    sys.addaudithook(hook)
    for name in ("subprocess", "_posixsubprocess", "socket", "_socket", "ctypes", "_ctypes", "multiprocessing", "pty"):
        sys.modules[name] = None  # `import subprocess` raises ImportError (sys.modules.pop undoes it: the hook remains)


# ----------------------------------------------------------------------------- the run
def outer_wait(pid: int, devnull: int) -> None:
    """The trusted outer process (still root, outside the PID namespace) keeps the clock: past the
    deadline it kills the namespace's init, and the kernel kills everything else in it (even a
    setsid'ed grandchild) before that init is reaped. It exits with the inner's status. It shares the
    inner's mount namespace, so the inner's pivot_root moves its root too: it opens no file."""
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # the result pipe reaches EOF when the inner side is gone, not later
    try:
        done = bool(select.select([os.pidfd_open(pid)], [], [], P["timeout_s"])[0])
    except OSError:  # no pidfd (Linux < 5.3): poll every 5 ms
        import time
        end = time.monotonic() + P["timeout_s"]
        while not (done := os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None):
            if time.monotonic() > end:
                break
            time.sleep(0.005)
    if not done:
        os.kill(pid, SIGKILL)
        os.waitpid(pid, 0)
        status = 124 << 8  # exit status 124: over time
    else:
        _, status = os.waitpid(pid, 0)
    while True:  # the namespace's other processes, killed with its init, are ours to reap (a subreaper): no zombie
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def confine() -> int:
    """Every layer, in order; returns the fd that carries the outputs."""
    layers, work = P["layers"], os.path.join(P["dir"], "work")
    ro_paths = P["ro_paths"]
    P["uid"] += os.getpid()  # a uid of its own: RLIMIT_NPROC counts only this sandbox, no other process shares it
    devnull = os.open(os.devnull, os.O_RDWR)
    if "namespaces" in layers:
        check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS), "unshare")
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the namespace come back to the outer, not init
        pid = os.fork()  # the child is PID 1 of the new PID namespace
        if pid:
            outer_wait(pid, devnull)
        libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # the outer killed by the parent: we die too
        mount_root(os.path.join(P["dir"], "root"), ro_paths)
        work, ro_paths = "/work", [p for p in ro_paths if not os.path.islink(p)]
    os.chdir(work)
    if "landlock" in layers:
        landlock(P["landlock_abi"], ro_paths, work)
    if "uid" in layers:
        drop_privileges(P["uid"])
        libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # a uid change clears it: set it again
    elif "nocaps" in layers:
        drop_capabilities()
    limits()
    result_fd = os.dup(1)  # the snippet's prints go nowhere; this copy carries its outputs (data, not a verdict)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    if "seccomp" in layers:
        seccomp("namespaces" in layers, os.getpid())
    if P["tripwire"]:  # last: our own setup above (ctypes) would trip it
        tripwire(work, ro_paths)
    return result_fd


def to_json(v, depth: int = 0) -> str:
    """json.dumps for what a test call returns (None, bool, int, float, str, list/tuple, dict); anything
    else raises, and that call's output is null, as with json.dumps."""
    if depth > 64:
        raise ValueError("too deep")
    if v is None or v is True or v is False:
        return {None: "null", True: "true", False: "false"}[v]
    if isinstance(v, int):
        return int.__repr__(v)
    if isinstance(v, float):
        r = float.__repr__(v)
        return {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}.get(r, r)
    if isinstance(v, str):
        return encode_basestring_ascii(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(to_json(x, depth + 1) for x in v) + "]"
    if isinstance(v, dict):
        items = []
        for k, x in v.items():
            if not (isinstance(k, (str, int, float)) or k is None):
                raise TypeError(f"key {type(k).__name__}")
            key = k if isinstance(k, str) else to_json(k)  # json.dumps' keys: 1 -> "1", True -> "true"
            items.append(encode_basestring_ascii(key) + ":" + to_json(x, depth + 1))
        return "{" + ",".join(items) + "}"
    raise TypeError(type(v).__name__)


def main(dir_: str) -> None:
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # nothing of k2 stays importable
    with open(os.path.join(dir_, "params.bin"), "rb") as f:
        P.update(marshal.load(f), dir=dir_)
    try:
        result_fd = confine()
    except BaseException as e:  # a setup step raised: ours, not the snippet's (it has not run)
        os.write(1, f"sandbox setup: {type(e).__name__}: {e}".encode())
        os._exit(120)
    namespace = {"__name__": "solution"}
    try:
        exec(compile(P["code"], "solution.py", "exec"), namespace)
    except BaseException:
        os._exit(1)
    outputs = []
    for call in P["calls"]:
        try:
            outputs.append(to_json(eval(call, namespace)))
        except BaseException:
            outputs.append("null")
    os.write(result_fd, ("[" + ",".join(outputs) + "]").encode())
    os._exit(0)
