"""The code sandbox: programs run and report; hostile programs are contained and the host is unharmed.

Both isolation modes run here: ``namespaces`` (kernel isolation; needs root, which these machines
have) and ``audit`` (the in-interpreter fallback for hosts without it). Each hostile snippet prints
``ESCAPED`` only if its attack worked; the host is checked after the whole battery.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from posttrain.sandbox import CheckResult, MemoryCgroup, SandboxLimits, SandboxResult, run_check, run_python

MODES = [
    pytest.param(
        "namespaces",
        marks=pytest.mark.skipif(
            os.geteuid() != 0, reason="namespaces isolation needs root; audit mode is tested"
        ),
    ),
    "audit",
]
SANDBOX_UID_MIN = 1_000_000  # posttrain.sandbox draws each run's uid from [1e6, 1e9 + 1e6)


@pytest.mark.parametrize("mode", MODES)
def test_runs_a_program_and_reports_its_status(mode: str) -> None:
    ok = run_python("print(sum(range(10)))", isolation=mode)
    assert (ok.status, ok.returncode, ok.stdout, ok.isolation) == ("ok", 0, "45\n", mode)

    exit3 = run_python("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(3)", isolation=mode)
    assert (exit3.status, exit3.returncode, exit3.stdout, exit3.stderr) == ("error", 3, "out\n", "err\n")

    raised = run_python("raise ValueError('boom')", isolation=mode)
    assert raised.status == "error" and raised.returncode == 1 and "ValueError: boom" in raised.stderr

    files = run_python(
        "print(open('data/in.txt').read())\nopen('out.txt', 'w').write('x')\nprint(open('out.txt').read())",
        files={"data/in.txt": "hello"},
        isolation=mode,
    )
    assert (files.status, files.stdout) == ("ok", "hello\nx\n")


def test_input_files_must_stay_in_the_working_directory() -> None:
    with pytest.raises(ValueError, match="inside the working directory"):
        run_python("pass", files={"../escape.txt": "x"})


@pytest.mark.parametrize("mode", MODES)
def test_cpu_and_wall_clock_limits(mode: str) -> None:
    spin = run_python("while True: pass", SandboxLimits(timeout_s=20, cpu_s=1), isolation=mode)
    assert spin.status == "timeout" and spin.returncode == -signal.SIGXCPU
    assert spin.wall_s < 10  # the CPU limit ended it, not the 20 s wall clock

    sleep = run_python("import time\ntime.sleep(60)", SandboxLimits(timeout_s=1), isolation=mode)
    assert sleep.status == "timeout" and sleep.returncode is None and sleep.wall_s < 10


# --------------------------------------------------------------------------------------------------
# Hostile snippets


@dataclass
class Host:
    """What the snippets attack, and what the test checks afterwards."""

    mark: str
    venv: Path  # outside every scratch directory, so namespaces mode shows it (read-only)
    tmp: Path  # under /tmp: hidden in namespaces mode, outside the working directory in audit mode
    port: int
    accepted: list[bytes]

    @property
    def files(self) -> dict[Path, str]:
        return {
            self.venv / f".sandbox-secret-{self.mark}": "TOPSECRET-VENV",
            self.tmp / "secret.txt": "TOPSECRET-TMP",
            self.venv / f".sandbox-sentinel-{self.mark}": "keep me",
            self.tmp / "sentinel.txt": "keep me too",
            self.venv / f".sandbox-tree-{self.mark}" / "a" / "b.txt": "tree",
        }

    @property
    def forbidden(self) -> list[Path]:
        """Files a snippet creates only if it escaped."""
        return [
            self.venv / f"pwned-{self.mark}",
            self.venv / f"pwned-sh-{self.mark}",
            self.venv / f"pwned-fork-exec-{self.mark}",
            self.venv / f"pwned-dirfd-{self.mark}",
            Path("/tmp") / f"pwned-{self.mark}",
            Path("/dev/shm") / f"pwned-{self.mark}",
            Path("/var/tmp") / f"pwned-{self.mark}",
        ]


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn.recv(100) or b"(connected)")
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    h = Host(uuid.uuid4().hex[:10], Path(sys.prefix).resolve(), tmp_path, server.getsockname()[1], accepted)
    for path, text in h.files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if "secret" in path.name:
            path.chmod(0o600)
    try:
        yield h
    finally:
        server.close()
        for path in [*h.files, *h.forbidden]:
            path.unlink(missing_ok=True)
        tree = h.venv / f".sandbox-tree-{h.mark}"
        for sub in (tree / "a", tree):
            if sub.is_dir():
                sub.rmdir()


def hostile_snippets(h: Host, mode: str) -> dict[str, str]:
    venv, tmp, mark = h.venv, h.tmp, h.mark
    connect = "import socket\ns = socket.create_connection(({host!r}, {port}), timeout=2)\ns.sendall(b'pwned')\nprint('ESCAPED')"
    snippets = {
        "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass",
        "infinite loop": "while True: pass",
        "sleep forever": "import time\ntime.sleep(10**6)",
        "memory bomb": "x = []\nwhile True:\n    x.append(bytearray(10**7))",
        "memory bomb in many processes": (
            "import os, time\nfor _ in range(8):\n    if os.fork() == 0:\n        x = bytearray(200 * 2**20)\n"
            "        for i in range(0, len(x), 4096):\n            x[i] = 1\n        time.sleep(100)\n"
            "time.sleep(100)"
        ),
        "thread bomb": "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(100,)).start()",
        "write outside (venv)": f"open('{venv}/pwned-{mark}', 'w').write('x')\nprint('ESCAPED')",
        "write host /tmp": f"open('/tmp/pwned-{mark}', 'w').write('x')",
        "write /dev/shm": f"open('/dev/shm/pwned-{mark}', 'w').write('x')",
        "write /var/tmp": f"open('/var/tmp/pwned-{mark}', 'w').write('x')",
        "write /proc/sys": "open('/proc/sys/kernel/hostname', 'w').write('pwned')\nprint('ESCAPED')",
        "read secret (tmp)": f"print(open('{tmp}/secret.txt').read())",
        "read /etc/shadow": "print(open('/etc/shadow').read())",
        "socket to host": connect.format(host="127.0.0.1", port=h.port),
        "socket to internet": connect.format(host="1.1.1.1", port=80),
        "raw socket via ctypes": (
            "import ctypes, socket, struct\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)\n"
            f"addr = struct.pack('=H', socket.AF_INET) + struct.pack('!H', {h.port}) + socket.inet_aton('127.0.0.1') + bytes(8)\n"
            "if fd >= 0 and libc.connect(fd, addr, len(addr)) == 0:\n"
            "    print('ESCAPED')"
        ),
        "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('ESCAPED')",
        "kill the host": f"import os, signal\nos.kill({os.getpid()}, signal.SIGKILL)\nprint('ESCAPED')",
        "subprocess writes outside": (
            f"import subprocess\nsubprocess.run(['sh', '-c', 'echo x > {venv}/pwned-sh-{mark}'], check=True)\nprint('ESCAPED')"
        ),
        "daemon outlives the program": (
            "import subprocess\nsubprocess.Popen(['sleep', '1000'], start_new_session=True)\nprint('spawned')"
        ),
        "double-fork daemon": (
            "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(1000)\n    os._exit(0)\n"
            "os.wait()\nprint('spawned')"
        ),
        # below subprocess.Popen (and its audit event): the C helper that forks and execs
        "fork_exec below subprocess": (
            "import _posixsubprocess, os\nr, w = os.pipe()\n"
            f"argv = [b'/bin/sh', b'-c', b'echo x > {venv}/pwned-fork-exec-{mark}']\n"
            "head = (argv, [b'/bin/sh'], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w)\n"
            "for tail in ((True, False, -1, None, None, None, -1, None, False), (True, False, -1, None, None, None, -1, None),\n"
            "             (True, False, None, None, None, -1, None)):\n"
            "    try:\n        pid = _posixsubprocess.fork_exec(*head, *tail)\n    except TypeError:\n        continue\n"
            f"    os.waitpid(pid, 0)\n    if os.path.exists('{venv}/pwned-fork-exec-{mark}'):\n        print('ESCAPED')\n    break"
        ),
        # the sandbox's own bootstrap holds a loaded libc: reach it through the garbage collector
        "kill the host via a loaded libc": (
            "import gc, signal\nfor o in gc.get_objects():\n    if type(o).__name__ == 'CDLL':\n"
            f"        if o.kill({os.getpid()}, signal.SIGKILL) == 0:\n            print('ESCAPED')\n        break"
        ),
        "delete files": f"import os\nos.remove('{venv}/.sandbox-sentinel-{mark}')\nos.remove('{tmp}/sentinel.txt')\nprint('ESCAPED')",
        "delete a tree": f"import shutil\nshutil.rmtree('{venv}/.sandbox-tree-{mark}')\nprint('ESCAPED')",
        "huge output": "while True:\n    print('x' * 10**6)",
        "mount via ctypes": (
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "if libc.mount(b'none', b'/mnt', b'tmpfs', 0, None) == 0:\n    print('ESCAPED')"
        ),
    }
    # the audit hook is in the same interpreter as the program: attacks on the hook itself
    snippets |= {
        "a directory fd from a readable directory": (
            f"import os\nd = os.open({str(venv)!r}, os.O_RDONLY)\n"
            f"os.open('pwned-dirfd-{mark}', os.O_WRONLY | os.O_CREAT, dir_fd=d)\nprint('ESCAPED')"
        ),
        # the hook resolves a relative path from the current directory, the kernel from dir_fd;
        # no ESCAPED: namespaces mode lets the program write its own /tmp
        "chdir below the working directory, then dir_fd": (
            "import os\ndepth = os.getcwd().count('/')\nos.makedirs('/'.join(['d'] * depth))\n"
            "work = os.open('.', os.O_RDONLY)\nos.chdir('/'.join(['d'] * depth))\n"
            f"os.open('../' * depth + 'tmp/pwned-{mark}', os.O_WRONLY | os.O_CREAT, dir_fd=work)"
        ),
        "rebind os.path.realpath": (
            "import os, posixpath\nhere = os.getcwd()\nposixpath.realpath = lambda p, **k: here\n"
            f"open('{venv}/pwned-{mark}', 'w').write('x')\nprint('ESCAPED')"
        ),
        "a str subclass that lies": (
            "class S(str):\n    def __str__(self):\n        return 'inside.txt'\n"
            f"open(S('{venv}/pwned-{mark}'), 'w').write('x')\nprint('ESCAPED')"
        ),
        "rewrite the hook's globals": (
            "import sys\ng = sys._getframe(1).f_globals\n"
            "g['_DENIED_EVENTS'], g['_PATH_EVENTS'] = ('nothing',), {}\n"
            "import ctypes\nlibc = ctypes.CDLL(None)\n"
            f"if libc.open(b'{venv}/pwned-{mark}', 0o101, 0o644) >= 0:\n    print('ESCAPED')"
        ),
        "rewrite the hook's closure through gc": (
            "import gc, os\nfor o in gc.get_objects():\n    if type(o).__name__ == 'function' and o.__closure__:\n"
            "        for c in o.__closure__:\n            if c.cell_contents == os.getcwd():\n"
            f"                c.cell_contents = '/'\nopen('{venv}/pwned-{mark}', 'w').write('x')\nprint('ESCAPED')"
        ),
    }
    if mode == "namespaces" or _landlock_abi() > 0:
        # below the audit hook: no "open" event, and the module-name rule is sidestepped; only the
        # kernel (Landlock, in audit mode) stops it. Without Landlock audit mode would let it through.
        snippets["shm_open below the audit hook"] = (
            "import importlib.util, os, sys\n"
            "lib = [p for p in sys.path if p.endswith('lib-dynload')][0]\n"
            "so = [os.path.join(lib, n) for n in os.listdir(lib) if n.startswith('_posixshmem')][0]\n"
            "m = importlib.util.module_from_spec(importlib.util.spec_from_file_location('x._posixshmem', so))\n"
            f"m.shm_open('/pwned-{mark}', os.O_CREAT | os.O_RDWR, 0o600)"
        )
    if mode == "audit":
        # audit mode allows one thread (namespaces mode: max_procs, in its own PID namespace)
        snippets["thread below threading"] = (
            "import _thread, time\n_thread.start_new_thread(time.sleep, (100,))\nprint('ESCAPED')"
        )
    if mode == "namespaces":
        snippets |= {
            # audit mode runs as the host user and lets the interpreter's own directories be read
            "read secret (venv)": f"print(open('{venv}/.sandbox-secret-{mark}').read())",
            "become root": "import os\nos.setuid(0)\nprint('ESCAPED')",
            # audit mode's working directory is on the host disk, capped by file count x file size only
            "fill the disk": "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'0' * 10**7)\n    i += 1",
            # only where a PID namespace bounds it: as root without one, a failure would signal every
            # process on the machine
            "kill everything": "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('ESCAPED')",
        }
    return snippets


def _landlock_abi() -> int:
    from posttrain.sandbox import child

    return child.landlock_abi()


def _sandbox_processes() -> list[str]:
    """Processes left behind by any sandbox: a sandbox uid, or the bootstrap's command line."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            uid = entry.stat().st_uid
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if uid >= SANDBOX_UID_MIN or b"sandbox/child.py" in cmdline:
            found.append(f"{entry.name}: {cmdline[:80]!r}")
    return found


@pytest.mark.parametrize("mode", MODES)
def test_hostile_snippets_are_contained_and_the_host_is_unharmed(mode: str, host: Host) -> None:
    # A harmless probe first: the battery below must not run if process creation is not contained.
    probe = run_python(
        "import os\nif os.fork() == 0:\n    os._exit(0)\nprint('FORKED', os.getuid())", isolation=mode
    )
    if mode == "audit":
        assert probe.status == "error" and "PermissionError" in probe.stderr, probe
    else:
        assert probe.status == "ok" and int(probe.stdout.split()[1]) >= SANDBOX_UID_MIN, probe
    snippets = hostile_snippets(host, mode)
    assert len(snippets) >= 15
    limits = SandboxLimits(timeout_s=3, cpu_s=2, memory_mb=256, total_memory_mb=512, max_file_mb=4)
    fds_before = len(os.listdir("/proc/self/fd"))
    workdirs_before = set(Path("/tmp").glob("posttrain-sandbox-*"))

    def run(code: str) -> SandboxResult:
        return run_python(code, limits, isolation=mode)

    with ThreadPoolExecutor(2) as ex:
        results = dict(zip(snippets, ex.map(run, snippets.values()), strict=True))

    for name, r in results.items():
        assert "ESCAPED" not in r.stdout, f"{name}: the attack worked ({mode})"
        assert "TOPSECRET" not in r.stdout, f"{name}: read a secret ({mode})"
        assert "root:" not in r.stdout, f"{name}: read /etc/shadow ({mode})"
        assert len(r.stdout) <= limits.max_output_bytes and len(r.stderr) <= limits.max_output_bytes
        assert r.wall_s < limits.timeout_s + 10, f"{name}: ran {r.wall_s:.1f} s"
        assert r.isolation == mode
        if r.peak_memory_mb is not None:  # a memory cgroup held the whole process tree
            assert r.peak_memory_mb <= limits.total_memory_mb, f"{name}: {r.peak_memory_mb} MiB"
    for name in ("fork bomb", "infinite loop", "sleep forever"):
        assert results[name].status == "timeout", (name, results[name])
    assert results["memory bomb"].status in ("error", "timeout")
    assert "MemoryError" in results["memory bomb"].stderr or results["memory bomb"].status == "timeout"
    assert results["huge output"].status in ("error", "timeout")

    # the host afterwards
    for path, text in host.files.items():
        assert path.read_text() == text, f"{path} was changed"
    for path in host.forbidden:
        assert not path.exists(), f"{path} was written from the sandbox"
    assert host.accepted == [], "a sandboxed program reached a socket on the host"
    assert _sandbox_processes() == [], "sandbox processes outlived their run"
    assert len(os.listdir("/proc/self/fd")) == fds_before, "file descriptors leaked"
    assert set(Path("/tmp").glob("posttrain-sandbox-*")) <= workdirs_before, (
        "working directories were left behind"
    )
    assert (Path(sys.prefix) / "bin" / "python").exists()
    assert (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 2**20
    )  # KiB: huge output never reached memory


def test_memory_of_the_whole_process_tree_is_capped() -> None:
    """Four children of 200 MiB each fit the per-process limit (256 MiB) but not the tree's (512 MiB)."""
    probe = MemoryCgroup.create(f"posttrain-sandbox-probe-{os.getpid()}", 64)
    if probe is None:
        pytest.skip(
            "no memory cgroup can be made here (needs root and a writable hierarchy): per-process limits only"
        )
    probe.remove()
    code = (
        "import os, time\nkids = []\nfor _ in range(4):\n    pid = os.fork()\n    if pid == 0:\n"
        "        x = bytearray(200 * 2**20)\n        for i in range(0, len(x), 4096):\n            x[i] = 1\n"
        "        time.sleep(1)\n        os._exit(0)\n    kids.append(pid)\n"
        "print(sum(os.WIFSIGNALED(os.waitpid(pid, 0)[1]) for pid in kids), 'killed')"
    )
    r = run_python(
        code, SandboxLimits(timeout_s=30, memory_mb=256, total_memory_mb=512), isolation="namespaces"
    )
    assert r.status == "ok", r.stderr
    killed = int(r.stdout.split()[0])
    assert 1 <= killed <= 3, r  # the kernel killed children to stay under the cap, not the program
    assert r.peak_memory_mb is not None and r.peak_memory_mb <= 512


def test_namespaces_mode_sees_no_host_processes_and_an_empty_tmp(tmp_path: Path) -> None:
    """/tmp inside holds the run's own dir, plus — only when the interpreter lives under /tmp (a
    checkout there) — its read-only directories; the host's temporary files are invisible."""
    if os.geteuid() != 0:
        pytest.skip("namespaces isolation needs root")
    from posttrain.sandbox import _filesystem_plan

    marker = Path("/tmp") / f"host-only-{uuid.uuid4().hex[:8]}"
    marker.write_text("host")
    interpreter = sorted(
        {Path(d).parts[2] for d in _filesystem_plan()["reveal"] if Path(d).parts[1:2] == ("tmp",)}
    )
    try:
        r = run_python(
            "import os\nprint(os.getpid(), os.getppid())\n"
            f"print(sorted(os.listdir('/tmp')) == sorted([os.getcwd().split('/')[2], *{interpreter!r}]))\n"
            "print(os.getuid() >= 1_000_000, os.getcwd().startswith('/tmp/posttrain-sandbox-'))",
            isolation="namespaces",
        )
    finally:
        marker.unlink()
    assert r.status == "ok", r.stderr
    pid, ppid = map(int, r.stdout.splitlines()[0].split())
    assert (pid, ppid) == (2, 1)  # PID 1 is the sandbox's reaper; the host's processes are not visible
    assert r.stdout.splitlines()[1:] == ["True", "True True"]


# --------------------------------------------------------------------------------------------------
# Forged passes: run_check counts a pass only on the test process's own confirmation
#
# Each forgery is a wrong ``inc`` that tries to be scored as passing. It first writes FORGERY-RAN
# to its stderr (at the moment it acts: forgeries inside the candidate write it when called), so
# the test sees that it ran. ``naive`` marks those that do fool the obvious harness (program and
# tests in one interpreter, a pass = exit status 0); that is checked too, so none of them is a
# forgery in name only.

PROMPT = 'def inc(x):\n    """x + 1"""\n'
TEST = (
    "import math\n\n\ndef check(candidate):\n    assert candidate(1) == 2\n    assert candidate(41) == 42\n"
    "    assert math.isclose(candidate(2.5), 3.5)\n    assert abs(candidate(-1)) < 1e-9\n    assert True\n"
)
TEST_EQ = "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(41) == 42\n"
TRACE = "import os as _os\n_os.write(2, b'FORGERY-RAN\\n')\n"
WRONG = "def inc(x):\n    return 0\n"


@dataclass(frozen=True)
class Forgery:
    code: str  # the whole solution (it runs after PROMPT)
    naive: bool  # fools the one-interpreter, exit-status harness
    test: str = TEST


FORGERIES = {
    "sys.exit(0) before the tests": Forgery(TRACE + WRONG + "import sys\nsys.exit(0)\n", True),
    "raise SystemExit(0)": Forgery(TRACE + WRONG + "raise SystemExit(0)\n", True),
    "os._exit(0)": Forgery(TRACE + WRONG + "import os\nos._exit(0)\n", True),
    # `python -I -S` (the sandbox) has no site module, so no exit()/quit(): the NameError path is real
    "exit()": Forgery(
        TRACE + WRONG + "import sys\ntry:\n    exit()\nexcept NameError:\n    sys.exit()\n", True
    ),
    "quit()": Forgery(
        TRACE + WRONG + "import sys\ntry:\n    quit(0)\nexcept NameError:\n    sys.exit(0)\n", True
    ),
    "sys.exit(0) inside the candidate": Forgery(
        "def inc(x):\n    import os, sys\n    os.write(2, b'FORGERY-RAN\\n')\n    sys.exit(0)\n", True
    ),
    "os._exit(0) inside the candidate": Forgery(
        "def inc(x):\n    import os\n    os.write(2, b'FORGERY-RAN\\n')\n    os._exit(0)\n", True
    ),
    "SystemExit from a __del__ at call time": Forgery(
        "import os, sys\nclass D:\n    def __del__(self):\n        os.write(2, b'FORGERY-RAN\\n')\n        os._exit(0)\n"
        "def inc(x):\n    D()\n    return 0\n",
        True,
    ),
    "patch builtins (abs, AssertionError) and math.isclose": Forgery(
        TRACE + "import builtins, math\nbuiltins.abs = lambda v: 0\nclass _Never(Exception):\n    pass\n"
        "builtins.AssertionError = _Never\nmath.isclose = lambda *a, **k: True\ndef inc(x):\n    return 0\n",
        True,
        "import math\n\n\ndef check(candidate):\n    assert math.isclose(candidate(1), 2)\n"
        "    assert abs(candidate(41) - 42) < 1e-9\n",
    ),
    "a check that always passes, rebound over the test's": Forgery(
        TRACE + "import sys\ndef check(candidate):\n    pass\n_mine = check\n"
        "def _tracer(frame, event, arg):\n    if frame.f_globals.get('check') is not _mine:\n"
        "        frame.f_globals['check'] = _mine\n    return _tracer\n"
        "sys._getframe().f_trace = _tracer\nsys.settrace(lambda *a: None)\n" + WRONG,
        True,
    ),
    "sys.settrace jumps over the asserts": Forgery(
        TRACE + WRONG + "import sys\ndef _t(frame, event, arg):\n    if frame.f_code.co_name != 'check':\n"
        "        return None\n    last = max(line for _, _, line in frame.f_code.co_lines() if line)\n"
        "    def local(f, e, a):\n        if e == 'line' and f.f_lineno < last:\n            f.f_lineno = last\n"
        "        return local\n    return local\nsys.settrace(_t)\n",
        True,
    ),
    "sys.setprofile ends the run when check starts": Forgery(
        TRACE + WRONG + "import os, sys\n"
        "sys.setprofile(lambda f, e, a: os._exit(0) if e == 'call' and f.f_code.co_name == 'check' else None)\n",
        True,
    ),
    "a signal handler ends the run mid-test": Forgery(
        TRACE + "import os, signal, time\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.3)\ndef inc(x):\n    time.sleep(5)\n    return 0\n",
        True,
    ),
    "kill the parent, then exit 0": Forgery(
        TRACE + WRONG + "import os, signal, sys\ntry:\n    os.kill(os.getppid(), signal.SIGKILL)\n"
        "except OSError:\n    pass\nsys.exit(0)\n",
        True,
    ),
    "a value equal to everything": Forgery(
        TRACE
        + "class E:\n    def __eq__(self, other):\n        return True\n    def __hash__(self):\n        return 0\n"
        "def inc(x):\n    return E()\n",
        True,
        TEST_EQ,
    ),
    "an int subclass equal to everything": Forgery(
        TRACE
        + "class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def inc(x):\n    return I(0)\n",
        True,
        TEST_EQ,
    ),
    "atexit handler exits 0": Forgery(
        TRACE + WRONG + "import atexit, os\natexit.register(os._exit, 0)\n", False
    ),
    "forged success on stdout and stderr": Forgery(
        TRACE + WRONG + "import sys\nfor out in (sys.stdout, sys.stderr):\n"
        "    print('passed 4', file=out)\n    print('ALL TESTS PASSED', file=out)\n",
        False,
    ),
    "print and sys.stdout patched to forge a marker": Forgery(
        TRACE
        + "import builtins, sys\nclass Out:\n    def write(self, s):\n        sys.__stdout__.write('passed 4\\n')\n"
        "    def flush(self):\n        pass\nsys.stdout = sys.stderr = Out()\n"
        "builtins.print = lambda *a, **k: sys.__stdout__.write('passed 4\\n')\n" + WRONG,
        False,
    ),
    "forged verdicts into every descriptor": Forgery(
        TRACE
        + WRONG
        + "import os\nfor fd in range(3, 1024):\n    for line in (b'passed 4\\n', b'[\"return\", 2]\\n'):\n"
        "        try:\n            os.write(fd, line)\n        except OSError:\n            pass\n",
        False,
    ),
    "forged verdicts through /proc/*/fd": Forgery(
        TRACE + WRONG + "import os\ntry:\n    pids = os.listdir('/proc')\nexcept OSError:\n    pids = []\n"
        "for pid in pids:\n    try:\n        fds = os.listdir(f'/proc/{pid}/fd')\n    except OSError:\n        continue\n"
        "    for fd in fds:\n        try:\n            with open(f'/proc/{pid}/fd/{fd}', 'wb') as f:\n"
        "                f.write(b'passed 4\\n')\n        except OSError:\n            pass\n",
        False,
    ),
    "rewrite the harness's replies": Forgery(
        TRACE + "import _posttrain_harness as h\nh._line = lambda message: b'passed 4\\n'\n"
        "h.encode = lambda value: ['return', 2]\n" + WRONG,
        False,
    ),
    "KeyboardInterrupt inside the candidate": Forgery(
        "def inc(x):\n    import os\n    os.write(2, b'FORGERY-RAN\\n')\n    raise KeyboardInterrupt\n", False
    ),
    "read the test to learn the answers": Forgery(
        TRACE
        + "import glob\nfound = []\nfor pattern in ('/tmp/posttrain-sandbox-*/work/test.py', '/tmp/*/*/test.py'):\n"
        "    try:\n        found += glob.glob(pattern)\n    except OSError:\n        pass\n"
        "for path in found:\n    try:\n        print('LEAKED', open(path).read())\n    except OSError:\n        pass\n"
        + WRONG,
        False,
    ),
}


def _naive_status(f: Forgery, mode: str) -> str:
    """What the obvious harness would say: program, test and call in one interpreter, exit 0 = pass."""
    program = f"{PROMPT}{f.code}\n\n{f.test}\n\ncheck(inc)\n"
    return run_python(program, SandboxLimits(timeout_s=5), isolation=mode).status


@pytest.mark.parametrize("mode", MODES)
def test_forged_passes_score_zero_and_the_host_is_unharmed(mode: str) -> None:
    limits = SandboxLimits(timeout_s=5, cpu_s=5)
    fds_before = len(os.listdir("/proc/self/fd"))
    workdirs_before = set(Path("/tmp").glob("posttrain-sandbox-*"))

    def check(solution: str, test: str = TEST) -> CheckResult:
        return run_check(solution, "inc", test, setup=PROMPT, limits=limits, isolation=mode)

    # the yardsticks: right scores, wrong does not (with the test's own failure as the reason)
    right = check(PROMPT + "    return x + 1\n")
    assert (right.passed, right.calls) == (True, 4), right
    wrong = check(PROMPT + "    return x\n")
    assert (wrong.passed, wrong.calls) == (False, 0) and "AssertionError" in wrong.checker.stderr, wrong

    with ThreadPoolExecutor(2) as ex:
        results = dict(
            zip(FORGERIES, ex.map(lambda f: check(PROMPT + f.code, f.test), FORGERIES.values()), strict=True)
        )
        naive = dict(
            zip(FORGERIES, ex.map(lambda f: _naive_status(f, mode), FORGERIES.values()), strict=True)
        )

    for name, r in results.items():
        assert "FORGERY-RAN" in r.program.stderr, f"{name}: the forgery never ran ({mode}): {r}"
        assert (r.passed, r.calls) == (False, 0), f"{name}: scored as a pass ({mode}): {r}"
        assert "LEAKED" not in r.program.stdout, f"{name}: read the test ({mode})"
        if FORGERIES[name].naive:
            assert naive[name] == "ok", f"{name}: not a forgery of the naive harness either ({mode})"
    assert sum(f.naive for f in FORGERIES.values()) >= 15

    # the host afterwards
    assert _sandbox_processes() == [], "sandbox processes outlived their run"
    assert len(os.listdir("/proc/self/fd")) == fds_before, "file descriptors leaked"
    assert set(Path("/tmp").glob("posttrain-sandbox-*")) <= workdirs_before


def test_a_pass_needs_calls_and_clean_answers() -> None:
    """No verdict when check never calls the candidate, or when a test swallows a broken call."""
    solution = PROMPT + "    return x + 1\n"
    never = run_check(solution, "inc", "def check(candidate):\n    pass\n", setup=PROMPT)
    assert (never.passed, never.checker.stdout) == (
        False,
        "posttrain check: no verdict: check never called the candidate\n",
    )
    swallow = (
        "def check(candidate):\n    try:\n        candidate(1)\n    except BaseException:\n        pass\n"
    )
    dies = run_check(PROMPT + "    import os\n    os._exit(0)\n", "inc", swallow, setup=PROMPT)
    assert not dies.passed and "the program ended without answering" in dies.checker.stdout, dies
    assert run_check(solution, "inc", swallow, setup=PROMPT).passed  # the same test, answered


def test_plain_data_crosses_and_exceptions_map_back() -> None:
    value = [1, -2.5, "s", b"b", bytearray(b"a"), (1, (2,)), {3}, frozenset({4}), {"k": [None, True]}, 1 + 2j]
    # f returns what it got and whether it got it intact (the program's side compares, too)
    solution = f"def f(x, *, k):\n    return [x, x == {value!r}, k]\n\ndef g(x):\n    raise KeyError(x)\n"
    test = (
        f"def check(candidate):\n    assert candidate({value!r}, k='kw') == [{value!r}, True, 'kw']\n"
        "    import math\n    assert math.isnan(candidate(float('nan'), k=None)[0])\n"
    )
    r = run_check(solution, "f", test)
    assert (r.passed, r.calls) == (True, 2), r
    raises = "def check(candidate):\n    try:\n        candidate(1)\n    except KeyError:\n        return\n    assert False\n"
    assert run_check(solution, "g", raises).passed


def test_the_audit_hook_reads_no_globals() -> None:
    """The program can rebind any global of the child module; the hook and its helpers must not
    look one up (every name is a closure variable bound at install time)."""
    import dis
    import types

    from posttrain.sandbox import child

    def globals_read(fn: types.FunctionType, seen: set[int]) -> set[str]:
        if id(fn) in seen:
            return set()
        seen.add(id(fn))
        names = {i.argval for i in dis.get_instructions(fn) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
        for cell in fn.__closure__ or ():
            if isinstance(cell.cell_contents, types.FunctionType):
                names |= globals_read(cell.cell_contents, seen)
        return names

    hook = child.audit_hook("/tmp", ["/usr"], 8)
    seen: set[int] = set()
    assert globals_read(hook, seen) == set()
    assert len(seen) >= 4  # hook, plain, resolve, within, inside


def test_landlock_alone_confines_files(tmp_path: Path) -> None:
    """Audit mode's file rule in the kernel: with no audit hook at all, a process under the
    Landlock ruleset reads the interpreter's files, writes its working directory, and nothing else."""
    if _landlock_abi() == 0:
        pytest.skip("this kernel has no Landlock: audit mode's file rule is the audit hook alone")
    import subprocess

    from posttrain.sandbox import _python_dirs

    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("host")
    code = (
        "import sys, json\nsys.path.insert(0, sys.argv[1])\nimport child\n"
        "abi = child.install_landlock(sys.argv[2], json.loads(sys.argv[3]))\nresults = [abi]\n"
        "for path, mode in ((sys.argv[4], 'r'), (sys.argv[4], 'a'), ('/etc/hostname', 'r'), (sys.argv[2] + '/x', 'w'),"
        " (sys.executable, 'rb')):\n    try:\n        open(path, mode).close()\n        results.append('ok')\n"
        "    except PermissionError:\n        results.append('denied')\n"
        "print(json.dumps(results))\n"
    )
    import json

    child_dir = str(Path(__file__).resolve().parents[1] / "posttrain" / "sandbox")
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            code,
            child_dir,
            str(work),
            json.dumps(_python_dirs()),
            str(outside),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    abi, *results = json.loads(out.stdout)
    assert abi >= 1
    assert results == ["denied", "denied", "denied", "ok", "ok"], out
    assert outside.read_text() == "host"
