"""Run untrusted Python (model-written code) in a throwaway, locked-down process.

    >>> run_python("print(6 * 7)").stdout
    '42\\n'
    >>> run_python("while True: pass", SandboxLimits(timeout_s=0.5)).status
    'timeout'

Every call gets a fresh temporary working directory (deleted afterwards) and a new process
session with wall-clock, CPU, memory, file-size and process-count limits; as root, a memory cgroup
also caps the whole process tree. On timeout the whole process tree is killed.

The trust boundary is ``posttrain/sandbox/child.py``: the process this module starts, which locks
itself down and then runs the untrusted program in its own interpreter. It imports only the
standard library (never posttrain), is started by file path with ``python -I -S``, and everything
it runs after lockdown is treated as hostile. This module (the host side) never executes the
program's code; it reads back only exit statuses and the capped output.

``run_check`` tests a function the program defines without letting the program near the test:
the program and the test run in two sandboxes joined by pipes, and only the test's process can
report a pass (``harness.py``, stdlib only, copied into both, holds the two halves).

Two isolation modes (see ``child.py`` for the details):

- ``namespaces`` (root on Linux; what ``auto`` picks when it works): no network (an empty network
  namespace), a read-only view of the filesystem with /tmp and friends replaced by empty tmpfs
  mounts, only the working directory writable, a private PID namespace (killing its PID 1 kills
  every process the program started, daemons included), and an unprivileged uid without
  capabilities, so files readable only by their owner stay unreadable.
- ``audit`` (the fallback elsewhere): rlimits, a kernel-enforced seccomp filter that refuses new
  processes and threads, exec, sockets, signals to other processes, ptrace, mounts, namespaces and
  the like; Landlock, where the kernel has it, for the file rule (read the interpreter's files,
  write only the working directory); and a Python audit hook that refuses ctypes and file access
  outside the working directory. Without Landlock the file rule is enforced by the interpreter
  alone, and the program always runs as the host user: weaker than ``namespaces``.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import secrets
import shutil
import signal
import site
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

log = logging.getLogger(__name__)

Isolation = Literal["auto", "namespaces", "audit"]
_CHILD = str(Path(__file__).with_name("child.py"))  # run by path, never imported by the host
_HARNESS = Path(__file__).with_name("harness.py")  # copied into run_check's two sandboxes
_SETUP_FAILED = 125
_SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (never raised for what the program does)."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock for the whole process tree
    cpu_s: int = 10  # CPU seconds per process (RLIMIT_CPU)
    memory_mb: int = 512  # address space per process (RLIMIT_AS)
    total_memory_mb: int = 1024  # memory of the whole process tree (a memory cgroup, where one can be made)
    max_procs: int = 16  # processes + threads of the sandbox user (namespaces mode; audit mode allows 1)
    max_file_mb: int = 16  # largest file the program may write, stdout and stderr included
    max_files: int = 64  # files the program may create (audit mode; namespaces mode caps disk_mb)
    disk_mb: int = 64  # the working directory's size (a tmpfs in namespaces mode)
    tmpfs_mb: int = 8  # size of each scratch tmpfs (/tmp, /var/tmp, ...) in namespaces mode
    max_output_bytes: int = 64 * 1024  # how much of stdout / stderr comes back


@dataclass(frozen=True)
class SandboxResult:
    status: Literal["ok", "error", "timeout"]  # ok: exit 0; timeout: wall clock or CPU limit; else error
    returncode: int | None  # exit code, -N if killed by signal N, None if the host killed it
    stdout: str  # first max_output_bytes, decoded with replacement
    stderr: str
    wall_s: float
    isolation: Literal["namespaces", "audit"]
    peak_memory_mb: float | None = None  # of the whole process tree; None without a memory cgroup


def run_python(
    code: str,
    limits: SandboxLimits = SandboxLimits(),
    files: Mapping[str, str] | None = None,
    isolation: Isolation = "auto",
    pass_fds: Sequence[int] = (),
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a fresh sandbox; ``files`` are written next to it first.

    ``pass_fds`` (pipe ends, say) are inherited by the program under the same numbers. They belong
    to the run: this process closes its copies as soon as the program has started (or the run
    failed to start), so the far end of a pipe sees end-of-file once the program is gone.
    """
    owned = list(pass_fds)
    try:
        mode = resolve_isolation(isolation)
        root = tempfile.mkdtemp(prefix="posttrain-sandbox-")
        try:
            return _run_in(Path(root), code, limits, files or {}, mode, owned)
        finally:
            _remove_tree(root)
    finally:
        _close_owned(owned)


def _close_owned(fds: list[int]) -> None:
    """Close each descriptor once (a second close could hit a reused number of another thread)."""
    while fds:
        os.close(fds.pop())


@dataclass(frozen=True)
class CheckResult:
    passed: bool  # the test's process confirmed that check(candidate) returned; nothing else counts
    calls: int  # calls check made to the candidate (0 without a confirmation)
    program: SandboxResult  # the untrusted side; its status and output never decide ``passed``
    checker: SandboxResult  # the test's side (its stdout says why there was no verdict)


def run_check(
    solution: str,
    entry_point: str,
    test: str,
    setup: str = "",
    limits: SandboxLimits = SandboxLimits(),
    isolation: Isolation = "auto",
) -> CheckResult:
    """Run the test's ``check(candidate)`` against ``entry_point`` as defined by untrusted ``solution``.

    Two sandboxes: the program's runs ``solution`` and then only answers calls to its entry point;
    the test's runs ``setup`` (trusted: the prompt's imports and helpers) and ``test`` (which
    defines ``check``), and calls ``check`` with a stand-in that forwards each call over a pipe and
    takes back plain data (see ``harness.py``). ``passed`` needs the verdict line that the test's
    process writes to a pipe of its own after ``check`` returned with every call answered; the
    program never holds that pipe, shares no interpreter with the test, and how it ends, what it
    prints and what its code patches do not count.

    >>> run_check("def inc(x):\\n    return x + 1\\n", "inc", "def check(f):\\n    assert f(1) == 2\\n").passed
    True
    >>> run_check("import sys\\nsys.exit(0)\\n", "inc", "def check(f):\\n    assert f(1) == 2\\n").passed
    False
    """
    mode = resolve_isolation(isolation)
    harness = {"_posttrain_harness.py": _HARNESS.read_text(encoding="utf-8")}
    pipes: list[int] = []
    try:
        for _ in range(3):
            pipes.extend(os.pipe())
    except OSError:
        _close_owned(pipes)
        raise
    requests_r, requests_w, replies_r, replies_w, verdict_r, verdict_w = pipes
    program_code = (
        "import _posttrain_harness\n"
        f"_posttrain_harness.serve('solution.py', {entry_point!r}, {requests_r}, {replies_w})\n"
    )
    checker_code = (
        "import _posttrain_harness\n_posttrain_harness.check("
        f"'setup.py', 'test.py', {entry_point!r}, {replies_r}, {requests_w}, {verdict_w})\n"
    )
    program_fds, checker_fds = [requests_r, replies_w], [replies_r, requests_w, verdict_w]
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="sandbox-program") as ex:
            try:
                program_run = ex.submit(
                    run_python,
                    program_code,
                    limits,
                    {**harness, "solution.py": solution},
                    mode,
                    program_fds,  # the run owns these from here on
                )
            except BaseException:
                _close_owned(program_fds)
                _close_owned(checker_fds)
                raise
            try:
                checker = run_python(
                    checker_code, limits, {**harness, "setup.py": setup, "test.py": test}, mode, checker_fds
                )
            finally:
                program = program_run.result()
    finally:
        verdict = _read_all(verdict_r)  # every writer is gone: both runs are over
    confirmed = re.fullmatch(r"passed ([1-9][0-9]{0,8})\n", verdict)
    passed = confirmed is not None and checker.status == "ok"
    calls = int(confirmed.group(1)) if confirmed is not None and passed else 0
    return CheckResult(passed, calls, program, checker)


def resolve_isolation(isolation: Isolation) -> Literal["namespaces", "audit"]:
    if isolation != "auto":
        return isolation
    if sys.platform.startswith("linux") and os.geteuid() == 0 and _namespaces_work():
        return "namespaces"
    if os.geteuid() != 0:
        _warn_once(
            "sandbox: namespaces isolation needs root; running untrusted code in the weaker 'audit' mode"
        )
    return "audit"


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.cache
def _namespaces_work() -> bool:
    """Probe once per process whether namespaces mode can be set up here (containers often forbid it)."""
    try:
        result = run_python("pass", SandboxLimits(timeout_s=20), isolation="namespaces")
    except SandboxError as e:
        log.warning("sandbox: namespaces isolation unavailable (%s); falling back to 'audit' mode", e)
        return False
    return result.status == "ok"


def _run_in(
    root: Path,
    code: str,
    limits: SandboxLimits,
    files: Mapping[str, str],
    mode: Literal["namespaces", "audit"],
    pass_fds: list[int],
) -> SandboxResult:
    os.chmod(root, 0o711)  # the sandbox user may pass through, not list
    work = root / "work"
    work.mkdir(mode=0o700)
    for name, text in {**files, "main.py": code}.items():
        target = (work / name).resolve()
        if work.resolve() not in target.parents:
            raise ValueError(f"sandbox file name {name!r} must stay inside the working directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    uid = secrets.randbelow(1_000_000_000) + 1_000_000  # one fresh uid per run: its own process count
    cgroup = MemoryCgroup.create(f"posttrain-sandbox-{uid}", limits.total_memory_mb)
    report_r, report_w = os.pipe()
    cfg = {
        "mode": mode,
        "workdir": str(work),
        "program": "main.py",
        "uid": uid,
        "cgroup": str(cgroup.path) if cgroup else None,
        "limits": {
            "cpu_s": limits.cpu_s,
            "memory_mb": limits.memory_mb,
            "max_procs": limits.max_procs,
            "max_file_mb": limits.max_file_mb,
            "max_files": limits.max_files,
            "disk_mb": limits.disk_mb,
        },
        "tmpfs_mb": limits.tmpfs_mb,
        "env": _program_env(work, mode),
        "site_packages": _site_packages(),
        "report_fd": report_w,
        **_filesystem_plan(),
    }
    try:
        with open(root / "stdout", "w+b") as out, open(root / "stderr", "w+b") as err:
            start = time.perf_counter()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", _CHILD, json.dumps(cfg)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    pass_fds=(report_w, *pass_fds),
                    start_new_session=True,
                    cwd=work,
                    env=_program_env(work, mode),
                )
            finally:
                os.close(report_w)
                _close_owned(pass_fds)
            timed_out = False
            try:
                proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)  # safe: the leader is not reaped yet, so its pgid is still ours
                proc.wait()
            wall = time.perf_counter() - start
            if timed_out and mode == "namespaces":
                _wait_until_gone(uid)
            report = _read_all(report_r)
            stdout, stderr = _head(out, limits.max_output_bytes), _head(err, limits.max_output_bytes)
        peak = cgroup.peak_mb() if cgroup else None
    finally:
        if cgroup:
            cgroup.remove()
    return _result(report, proc.returncode, timed_out, stdout, stderr, wall, mode, peak)


def _result(
    report: str,
    returncode: int,
    timed_out: bool,
    stdout: str,
    stderr: str,
    wall: float,
    mode: Literal["namespaces", "audit"],
    peak_mb: float | None,
) -> SandboxResult:
    lines = report.split()
    if "ready" not in lines and not timed_out:
        raise SandboxError(f"sandbox setup failed ({mode} mode, exit {returncode}): {stderr.strip()[-2000:]}")
    status: Literal["ok", "error", "timeout"]
    code: int | None
    if timed_out:
        status, code = "timeout", None
    else:
        if mode == "namespaces":  # the program's status comes from PID 1 through the report pipe
            if len(lines) < 3:
                raise SandboxError(
                    f"sandbox lost the program's status (exit {returncode}): {stderr.strip()[-2000:]}"
                )
            kind, value = lines[-2], int(lines[-1])
            code = -value if kind == "signal" else value
        else:
            code = returncode
        status = "ok" if code == 0 else "timeout" if code == -signal.SIGXCPU else "error"
    return SandboxResult(status, code, stdout, stderr, wall, mode, peak_mb)


# --------------------------------------------------------------------------------------------------
# helpers


@dataclass(frozen=True)
class MemoryCgroup:
    """A memory cgroup for one run, under this process's own (cgroup v1 or v2).

    It caps the memory of the whole process tree (per-process RLIMIT_AS alone would allow
    ``max_procs`` times ``memory_mb``). The sandbox's bootstrap joins it before it starts anything,
    so every process of the run is inside. Made only as root, where the hierarchy allows it.
    """

    path: Path
    version: Literal[1, 2]

    @staticmethod
    def create(name: str, limit_mb: int) -> MemoryCgroup | None:
        if os.geteuid() != 0:
            return None
        found = _own_memory_cgroup()
        if found is None:
            return None
        base, version = found
        path = base / name
        try:
            path.mkdir()
        except OSError as e:
            log.debug("sandbox: no memory cgroup (%s)", e)
            return None
        cg = MemoryCgroup(path, version)
        limit = str(limit_mb << 20)
        try:
            if version == 1:
                (path / "memory.limit_in_bytes").write_text(limit)
                if (path / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                    (path / "memory.memsw.limit_in_bytes").write_text(limit)
            else:
                (path / "memory.max").write_text(limit)
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
        except OSError:
            cg.remove()
            raise
        return cg

    def peak_mb(self) -> float | None:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        f = self.path / name
        return int(f.read_text()) / 2**20 if f.exists() else None

    def remove(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:  # EBUSY while the last processes exit
                if time.monotonic() > deadline:
                    raise SandboxError(f"cannot remove sandbox cgroup {self.path}: {e}") from None
                time.sleep(0.01)


def _own_memory_cgroup() -> tuple[Path, Literal[1, 2]] | None:
    """Where this process's memory cgroup is, if it can hold a child cgroup with a memory limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _hid, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / rel.lstrip("/")
            if (base / "memory.limit_in_bytes").exists() and os.access(base, os.W_OK):
                return base, 1
    for line in lines:
        _hid, controllers, rel = line.split(":", 2)
        if controllers == "":
            base = Path("/sys/fs/cgroup") / rel.lstrip("/")
            control = base / "cgroup.subtree_control"
            if control.exists() and "memory" in control.read_text().split() and os.access(base, os.W_OK):
                return base, 2
    return None


def _program_env(work: Path, mode: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": "/tmp" if mode == "namespaces" else str(work),
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def _site_packages() -> list[str]:
    return [p for p in site.getsitepackages() if os.path.isdir(p)]


def _python_dirs() -> list[str]:
    dirs = {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix, *_site_packages()}
    return _outermost(os.path.realpath(d) for d in dirs if os.path.isdir(d))


def _outermost(paths: Iterable[str]) -> list[str]:
    """Drop paths inside another path of the list."""
    out: list[str] = []
    for p in sorted(set(paths)):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _filesystem_plan() -> dict[str, Any]:
    """Which directories to cover with an empty tmpfs (namespaces mode), and which to bind back.

    Scratch directories are covered (the host's temporary files stay invisible), and so is the
    outermost ancestor of the interpreter that others cannot traverse (e.g. /root for a pyenv
    Python); the interpreter's directories are then bound back read-only. In audit mode
    ``reveal`` is the list of directories the program may read besides its working directory.
    """
    cover: dict[str, str] = {}
    for d in (*_SCRATCH_DIRS, tempfile.gettempdir()):
        real = os.path.realpath(d)
        if os.path.isdir(real) and real != "/":
            cover[real] = "1777"
    python = _python_dirs()
    for d in python:
        parts = Path(d).parts
        for i in range(2, len(parts) + 1):
            ancestor = str(Path(*parts[:i]))
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                cover.setdefault(ancestor, "755")
                break
    covers = sorted(_outermost(cover), key=len)
    return {"cover": [(c, cover[c]) for c in covers], "reveal": python}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError as e:
        raise SandboxError(f"cannot kill sandbox process group {pgid}: {e}") from None


def _wait_until_gone(uid: int, timeout_s: float = 5.0) -> None:
    """After killing PID 1 of the namespace the kernel reaps the rest; wait until it has."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pids_of_uid(uid):
            return
        time.sleep(0.01)
    raise SandboxError(f"sandbox processes of uid {uid} survived the kill: {_pids_of_uid(uid)}")


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
            except FileNotFoundError:
                continue
    return pids


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _head(f: BinaryIO, n: int) -> str:
    f.seek(0)
    return f.read(n).decode(errors="replace")


def _remove_tree(path: str) -> None:
    def make_writable(func: object, p: str, _exc: object) -> None:
        parent = os.path.dirname(p)
        os.chmod(parent, 0o700)
        if os.path.isdir(p) and not os.path.islink(p):
            os.chmod(p, 0o700)
        shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)

    for _attempt in range(3):
        try:
            shutil.rmtree(path, onerror=make_writable)
            return
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
            time.sleep(0.05)
    shutil.rmtree(path)
