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

from posttrain.sandbox import MemoryCgroup, SandboxLimits, SandboxResult, run_python

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
