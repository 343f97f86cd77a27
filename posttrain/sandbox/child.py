"""The process that ``posttrain.sandbox`` starts: it locks itself down, then runs the program.

Run as ``python -I -S posttrain/sandbox/child.py CONFIG_JSON`` (by file path; stdlib only, it never
imports posttrain, so it does not depend on where the package lives or on its imports).
The host reads one line per event from the report pipe: ``ready`` once isolation is in place,
then ``exit N`` or ``signal N`` for the program. Anything else (or nothing) means setup failed,
and the reason is on stderr.

Two isolation modes:

``namespaces`` (root on Linux)
    unshare network, mount and PID namespaces; remount every mount read-only; cover the
    scratch directories (/tmp, ...) and directories the sandbox user cannot traverse with empty
    tmpfs mounts; bind back the working directory (read-write) and the interpreter's directories
    (read-only); fork a PID-1 reaper that mounts a fresh /proc; fork the program, which drops to
    an unprivileged uid with no capabilities (``PR_SET_NO_NEW_PRIVS``) and rlimits. When PID 1
    exits the kernel kills everything left in the namespace.

``audit`` (anyone)
    rlimits, a seccomp filter and a Python audit hook. The seccomp filter (kernel-enforced, installed
    with ``PR_SET_NO_NEW_PRIVS``, so any user may) refuses new processes and threads (clone, fork,
    vfork, exec), sockets, signals to any other process, ptrace, cross-process memory access and
    descriptor copying (``pidfd_getfd``), mounts, namespaces, module loading, io_uring, bpf and the
    like — whatever route the program takes to the syscall (``_posixsubprocess``, a loaded
    ``ctypes`` library, ...). Landlock, where the kernel has it (``install_landlock``), enforces
    the file rule in the kernel: read the interpreter's directories and the system's libraries,
    read and write the working directory. The audit hook adds what a syscall filter cannot judge
    by its arguments: file access outside the working directory (reads of the interpreter's own
    files allowed), ctypes, reaching the hook's own state through ``gc``, and hand-made code
    objects. The program shares the hook's interpreter, so the hook is built not to be talked out
    of its rule from Python (see ``audit_hook``); but code that corrupts interpreter memory gets
    past it, and where the kernel has no Landlock nothing else guards the files: this mode is
    weaker than ``namespaces``.

The program gets the descriptors the host passed (``run_python(pass_fds=...)``) and nothing else
of the bootstrap's: the report pipe is closed before the program starts.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import traceback
import types

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
_OPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = [None if s is None else s.encode() for s in (source, target, fstype, data)]
    _check(_libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]), f"mount {target}")


def _mounts() -> list[tuple[str, int]]:
    """(mount point, flags to keep) for every mount, parents before children."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")
            keep = 0
            for opt in fields[5].split(","):
                keep |= _OPT_FLAGS.get(opt, 0)
            out.append((point, keep))
    return out


def _send(fd: int, msg: str) -> None:
    os.write(fd, (msg + "\n").encode())


# --------------------------------------------------------------------------------------------------
# namespaces mode


def _read_inputs(workdir: str) -> dict[str, bytes]:
    inputs = {}
    for dirpath, _dirs, names in os.walk(workdir):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                inputs[os.path.relpath(path, workdir)] = f.read()
    return inputs


def _lock_down_filesystem(cfg: dict) -> None:
    """Everything read-only; scratch dirs empty tmpfs; the working directory a fresh, sized tmpfs."""
    workdir, uid = cfg["workdir"], cfg["uid"]
    inputs = _read_inputs(workdir)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    fds = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in cfg["reveal"]}
    for point, keep in _mounts():
        if os.path.isdir(point) or os.path.isfile(point):
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep)
    for path, mode in cfg["cover"]:
        os.makedirs(path, exist_ok=True)
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, f"size={cfg['tmpfs_mb']}m,mode={mode}")
    for path in cfg["reveal"]:  # the interpreter's directories, read-only
        os.makedirs(path, exist_ok=True)
        _mount(f"/proc/self/fd/{fds[path]}", path, None, MS_BIND)
        _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.close(fds[path])
    os.makedirs(workdir, exist_ok=True)
    size = cfg["limits"]["disk_mb"]
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode=700,uid={uid},gid={uid}")
    for rel, data in inputs.items():
        path = os.path.join(workdir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    for dirpath, dirs, names in os.walk(workdir):
        for name in dirs + names:
            os.chown(os.path.join(dirpath, name), uid, uid)


def _status_of(wait_status: int) -> str:
    if os.WIFSIGNALED(wait_status):
        return f"signal {os.WTERMSIG(wait_status)}"
    return f"exit {os.WEXITSTATUS(wait_status)}"


def _namespaces(cfg: dict, report: int) -> int:
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
    _lock_down_filesystem(cfg)
    init = os.fork()  # PID 1 of the new PID namespace
    if init == 0:
        os._exit(_init(cfg, report))
    _, wait_status = os.waitpid(init, 0)
    return 0 if os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0 else 125


def _init(cfg: dict, report: int) -> int:
    """PID 1: mount /proc, start the program, reap orphans until the program is done."""
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        child = os.fork()
        if child == 0:
            try:
                _set_oom_score(1000)  # out of memory: the kernel kills the program first, not its reaper
                _drop_privileges(cfg["uid"])
                _set_limits(cfg["limits"], nproc=True)
                _send(report, "ready")
                os.close(report)
            except BaseException as e:
                print(f"posttrain sandbox: setup failed: {e!r}\n{traceback.format_exc()}", file=sys.stderr)
                os._exit(125)
            _run_program(cfg)
        while True:
            pid, wait_status = os.wait()
            if pid == child:
                _send(report, _status_of(wait_status))
                return 0
    except BaseException as e:
        print(f"posttrain sandbox: setup failed: {e!r}\n{traceback.format_exc()}", file=sys.stderr)
        return 125


def _set_oom_score(score: int) -> None:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(score))


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl")


# --------------------------------------------------------------------------------------------------
# shared


def _set_limits(limits: dict, nproc: bool) -> None:
    def cap(which: int, value: int) -> None:
        resource.setrlimit(which, (value, value))

    cpu = limits["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
    cap(resource.RLIMIT_AS, limits["memory_mb"] << 20)
    cap(resource.RLIMIT_FSIZE, limits["max_file_mb"] << 20)
    cap(resource.RLIMIT_NOFILE, 256)
    cap(resource.RLIMIT_CORE, 0)
    if nproc:
        cap(resource.RLIMIT_NPROC, limits["max_procs"])


def _run_program(cfg: dict) -> None:
    """Run the program as ``__main__``; never returns."""
    os.chdir(cfg["workdir"])
    os.environ.clear()
    os.environ.update(cfg["env"])
    sys.argv = [cfg["program"]]
    sys.path[:] = [cfg["workdir"], *sys.path, *cfg["site_packages"]]
    main = types.ModuleType("__main__")
    main.__file__ = os.path.join(cfg["workdir"], cfg["program"])
    sys.modules["__main__"] = main
    code = 0
    try:
        with open(cfg["program"], encoding="utf-8") as f:
            source = f.read()
        if cfg["mode"] == "audit":
            _install_audit_hook(cfg)
        exec(compile(source, main.__file__, "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


# --------------------------------------------------------------------------------------------------
# audit mode

_DENIED_EVENTS = (
    "socket.",
    "os.fork",
    "os.forkpty",
    "os.posix_spawn",
    "os.exec",
    "os.spawn",
    "os.system",
    "subprocess.Popen",
    "os.kill",
    "os.killpg",
    "signal.pthread_kill",
    "ctypes.",
    "os.setuid",
    "pty.",
    "gc.get_",  # get_objects / get_referrers / get_referents reach the hook's closure cells
    "code.__new__",  # hand-made bytecode reads and writes arbitrary memory
)
_PATH_EVENTS = {  # event -> argument positions that are paths
    "os.remove": (0,),
    "os.rename": (0, 1),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.truncate": (0,),
    "os.link": (0, 1),
    "os.symlink": (0, 1),
    "os.utime": (0,),
    "os.chflags": (0,),
    "os.mkfifo": (0,),
    "os.mknod": (0,),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
    "shutil.rmtree": (0,),
}
_LISTING_EVENTS = ("os.listdir", "os.scandir", "glob.glob")
# ctypes, and the C modules that create and delete named objects in /dev/shm without an "open" event
_DENIED_MODULES = ("ctypes", "_ctypes", "_posixshmem", "_multiprocessing")


def _install_audit_hook(cfg: dict) -> None:
    sys.addaudithook(audit_hook(cfg["workdir"], cfg["reveal"], cfg["limits"]["max_files"]))


def audit_hook(workdir: str, reveal: list[str], max_files: int) -> types.FunctionType:
    """The audit hook of audit mode: file access outside ``workdir`` (reads of ``reveal`` and a few
    devices allowed), ctypes, and what ``_DENIED_EVENTS`` lists are refused.

    The program shares this interpreter and can rebind any module attribute (``os.path.realpath``)
    or global (this module's own, reached through a frame's ``f_globals``). So everything the hook
    uses is bound here, once, as closure variables: it reads no global, calls only C functions and
    methods of exact builtin types, and takes the value of a ``str``/``bytes`` subclass through the
    base type (what the C function used), never through the subclass's methods. Any exception it
    raises, expected or not, refuses the operation. The working directory stays the current one
    and no directory outside it can be opened, so a relative path means the same thing to the hook
    and to the kernel, with or without ``dir_fd``.
    """
    readlink, getcwd, stat = os.readlink, os.getcwd, os.stat
    item = tuple.__getitem__  # os.stat_result is a mutable type: read st_mode by index, through tuple
    str_value, bytes_decode = str.__str__, bytes.decode
    is_a, kind_of, error, os_error = issubclass, type, PermissionError, OSError  # type(x): never x.__class__
    str_type, bytes_type, int_type, size = str, bytes, int, len
    fs_encoding = sys.getfilesystemencoding()
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    creating, dir_type, type_mask = os.O_CREAT, 0o040000, 0o170000
    denied, path_events, listing, modules = (
        _DENIED_EVENTS,
        dict(_PATH_EVENTS),
        _LISTING_EVENTS,
        _DENIED_MODULES,
    )
    created = [0]

    def plain(path: object) -> str:
        if is_a(kind_of(path), str_type):
            return str_value(path)  # type: ignore[arg-type]
        if is_a(kind_of(path), bytes_type):
            return bytes_decode(path, fs_encoding, "surrogateescape")  # type: ignore[arg-type]
        raise error("sandbox: paths must be str or bytes here")

    def resolve(path: str) -> str:
        """Like os.path.realpath: absolute, '.' and '..' folded, symlinks followed (max 40)."""
        if not path.startswith("/"):
            path = getcwd() + "/" + path
        todo, done, links = path.split("/")[::-1], [], 0
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            here = "/" + "/".join(done) + ("/" if done else "") + part
            try:
                target = readlink(here)
            except os_error:  # not a symlink (or not there): a plain component
                done.append(part)
                continue
            links += 1
            if links > 40:
                raise error(f"sandbox: too many symbolic links in {path!r}")
            if target.startswith("/"):
                done = []
            todo.extend(target.split("/")[::-1])
        return "/" + "/".join(done)

    def within(real: str, roots: tuple[str, ...]) -> bool:
        for root in roots:  # noqa: SIM110 - any() would be a global lookup
            if real == root or real.startswith(root + "/" if root != "/" else "/"):
                return True
        return False

    home = resolve(workdir)
    readable = (home, *(resolve(p) for p in reveal), "/dev/urandom", "/dev/null")

    def inside(path: object, roots: tuple[str, ...]) -> bool:
        if is_a(kind_of(path), int_type):
            return True  # an already-open descriptor
        return within(resolve(plain(path)), roots)

    def hook(event: str, args: tuple[object, ...]) -> None:
        if event.startswith(denied) or (event == "import" and args[0] in modules):
            raise error(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            if path is None or is_a(kind_of(path), int_type):
                return  # an already-open descriptor
            real = resolve(plain(path))
            writes = flags & writing != 0  # type: ignore[operator]
            if is_a(kind_of(mode), str_type):
                for c in "wax+":
                    writes = writes or c in str_value(mode)  # type: ignore[arg-type]
            if not within(real, (home,) if writes else readable):
                raise error(f"sandbox: access to {real!r} outside the working directory")
            if not within(real, (home,)):
                try:
                    is_dir = item(stat(real), 0) & type_mask == dir_type
                except os_error:
                    is_dir = False
                if is_dir:  # a directory descriptor would make a dir_fd the hook cannot see
                    raise error(f"sandbox: opening the directory {real!r} outside the working directory")
            if flags & creating:  # type: ignore[operator]
                created[0] += 1
                if created[0] > max_files:
                    raise error("sandbox: too many files created")
        elif event == "os.chdir":
            if is_a(kind_of(args[0]), int_type) or resolve(plain(args[0])) != home:
                raise error("sandbox: the working directory cannot change")
        elif event in listing:
            if args and args[0] is not None and not inside(args[0], readable):
                raise error("sandbox: listing outside the working directory")
        elif event in path_events:
            for i in path_events[event]:
                if i < size(args) and not inside(args[i], (home,)):
                    raise error(f"sandbox: {event} outside the working directory")

    return hook  # type: ignore[return-value]


# seccomp: x86_64 and aarch64 syscall numbers (asm/unistd_64.h, asm-generic/unistd.h)
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_NR = {
    "x86_64": {
        "clone": 56,
        "fork": 57,
        "vfork": 58,
        "execve": 59,
        "execveat": 322,
        "clone3": 435,
        "socket": 41,
        "kill": 62,
        "tkill": 200,
        "tgkill": 234,
        "rt_sigqueueinfo": 129,
        "rt_tgsigqueueinfo": 297,
        "pidfd_send_signal": 424,
        "pidfd_getfd": 438,  # copying another process's descriptors (run_check's verdict pipe)
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "chroot": 161,
        "unshare": 272,
        "setns": 308,
        "fsopen": 430,
        "fsmount": 432,
        "move_mount": 429,
        "open_tree": 428,
        "reboot": 169,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "io_uring_setup": 425,
        "bpf": 321,
        "perf_event_open": 298,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "swapon": 167,
        "swapoff": 168,
        "sethostname": 170,
        "setdomainname": 171,
        "settimeofday": 164,
        "clock_settime": 227,
        "adjtimex": 159,
        "iopl": 172,
        "ioperm": 173,
    },
    "aarch64": {
        "clone": 220,
        "execve": 221,
        "execveat": 281,
        "clone3": 435,
        "socket": 198,
        "kill": 129,
        "tkill": 130,
        "tgkill": 131,
        "rt_sigqueueinfo": 138,
        "rt_tgsigqueueinfo": 240,
        "pidfd_send_signal": 424,
        "pidfd_getfd": 438,  # copying another process's descriptors (run_check's verdict pipe)
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "chroot": 51,
        "unshare": 97,
        "setns": 268,
        "fsopen": 430,
        "fsmount": 432,
        "move_mount": 429,
        "open_tree": 428,
        "reboot": 142,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "io_uring_setup": 425,
        "bpf": 280,
        "perf_event_open": 241,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "swapon": 224,
        "swapoff": 225,
        "sethostname": 161,
        "setdomainname": 162,
        "settimeofday": 170,
        "clock_settime": 112,
        "adjtimex": 171,
    },
}
_SIGNAL_SELF_ONLY = ("kill", "tkill", "tgkill")  # allowed when the first argument is this process
_X32_SYSCALL_BIT = 0x40000000  # x86_64's x32 ABI: another number for every syscall, refused whole
_SECCOMP_RET_KILL_PROCESS = 0x80000000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_RET_ALLOW = 0x7FFF0000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_JGE_K, _BPF_RET_K = 0x20, 0x15, 0x35, 0x06
PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
EPERM, ENOSYS = 1, 38


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program(arch: str, pid: int) -> list[tuple[int, int, int, int]]:
    """The classic-BPF filter as (code, jt, jf, k); seccomp_data: nr at offset 0, arch at 4, args from 16."""
    nr = _NR[arch]
    refuse = _SECCOMP_RET_ERRNO | EPERM
    prog = [
        (_BPF_LD_W_ABS, 0, 0, 4),
        (_BPF_JEQ_K, 1, 0, _AUDIT_ARCH[arch]),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_KILL_PROCESS),
    ]
    prog.append((_BPF_LD_W_ABS, 0, 0, 0))
    if arch == "x86_64":
        prog += [(_BPF_JGE_K, 0, 1, _X32_SYSCALL_BIT), (_BPF_RET_K, 0, 0, refuse)]
    # clone3 answers ENOSYS, so glibc falls back to clone, which is refused (threads included)
    prog += [(_BPF_JEQ_K, 0, 1, nr["clone3"]), (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | ENOSYS)]
    for name, number in nr.items():
        if name not in ("clone3", *_SIGNAL_SELF_ONLY):
            prog += [(_BPF_JEQ_K, 0, 1, number), (_BPF_RET_K, 0, 0, refuse)]
    for name in _SIGNAL_SELF_ONLY:  # signal targets: the low 32 bits of the first argument
        prog += [
            (_BPF_JEQ_K, 0, 4, nr[name]),
            (_BPF_LD_W_ABS, 0, 0, 16),
            (_BPF_JEQ_K, 0, 1, pid),
            (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
            (_BPF_RET_K, 0, 0, refuse),
        ]
    prog.append((_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW))
    return prog


def _install_seccomp() -> None:
    arch = os.uname().machine
    if arch not in _NR:
        raise OSError(
            f"audit isolation needs a seccomp filter, which posttrain has for {', '.join(_NR)}, not {arch}"
        )
    program = seccomp_program(arch, os.getpid())
    filters = (_SockFilter * len(program))(*(_SockFilter(*ins) for ins in program))
    fprog = _SockFprog(len(program), filters)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "prctl(SET_SECCOMP)")


# Landlock (Linux >= 5.13 with the LSM enabled): the file rule of audit mode, enforced by the kernel.
# Same syscall numbers on x86_64 and aarch64.
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION, _LANDLOCK_RULE_PATH_BENEATH = 1, 1
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_REFER, _LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_LL_READ = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR
_LL_FILE_ONLY = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV
# What the interpreter reads below Python (the dynamic loader for a C extension's libraries, the
# time zone); the audit hook still limits what Python code opens to the interpreter's directories.
_SYSTEM_READABLE = (
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/dev/null",
    "/dev/urandom",
)


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _LandlockPathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _syscall(*args: object) -> int:
    return int(_libc.syscall(*args))


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where it has none (not built in, or the LSM is off)."""
    version = _syscall(
        _LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)
    )
    return max(version, 0)


def install_landlock(workdir: str, readable: list[str]) -> int:
    """Restrict this process (and what it starts) to reading ``readable`` and the system's libraries,
    and to reading and writing ``workdir``. Returns the Landlock ABI used, 0 where the kernel has
    none (then only the audit hook enforces the rule). Needs ``PR_SET_NO_NEW_PRIVS`` (or root)."""
    abi = landlock_abi()
    if abi < 1:
        return 0
    handled = (1 << 13) - 1  # ABI 1: execute .. make_sym
    handled |= (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)
    handled |= _LL_IOCTL_DEV if abi >= 5 else 0
    attr = _LandlockRulesetAttr(handled)
    ruleset = _syscall(
        _LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock_create_ruleset: {os.strerror(err)}")
    try:
        rules = [(workdir, handled)] + [(p, _LL_READ) for p in (*readable, *_SYSTEM_READABLE)]
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if os.fstat(fd).st_mode & 0o170000 != 0o040000:  # not a directory
                    rights &= _LL_FILE_ONLY
                rule = _LandlockPathBeneathAttr(rights & handled, fd)
                _check(
                    _syscall(_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0),
                    f"landlock_add_rule {path}",
                )
            finally:
                os.close(fd)
        _check(_syscall(_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)
    return abi


def _audit(cfg: dict, report: int) -> int:
    """The program runs in this process; the host reads its status from the exit code."""
    _set_limits(cfg["limits"], nproc=False)
    _check(
        _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(DUMPABLE)"
    )  # others of this uid: no ptrace, no /proc/PID/mem
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
    install_landlock(cfg["workdir"], cfg["reveal"])
    _install_seccomp()
    _send(report, "ready")
    os.close(report)
    _run_program(cfg)
    return 0  # not reached: _run_program exits


def main() -> int:
    cfg = json.loads(sys.argv[1])
    report = cfg["report_fd"]
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")  # host gone -> die
        if cfg["cgroup"]:  # join before starting anything: every process of the run is inside
            with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if cfg["mode"] == "namespaces":
            return _namespaces(cfg, report)
        return _audit(cfg, report)
    except Exception as e:
        print(f"posttrain sandbox: setup failed: {e!r}\n{traceback.format_exc()}", file=sys.stderr)
        return 125


if __name__ == "__main__":
    sys.exit(main())
