"""The python tool's sandbox: escapes that worked against the old best-effort guards must fail, normal code must
still run, limits must end a run with a clear result, and without isolation the tool refuses to run.

Every escape runs under each backend that works on this machine (bwrap, unshare); a backend that does not
work skips with the probe's reason. The `unsafe_python=True` controls run the same escapes without the sandbox
and check that they do succeed there, so each escape test is shown able to fail.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from envs import python_executor as pe
from envs.python_executor import (BACKENDS, PythonExecutorConfig, SandboxUnavailableError, python_tool, run_python,
                                  sandbox_isolation, seccomp_program)

FAST = dict(timeout_s=10.0, memory_mb=512)


def _available(backend):
    try:
        return sandbox_isolation(backend)
    except SandboxUnavailableError as e:
        pytest.skip(str(e))


@pytest.fixture(params=BACKENDS)
def backend(request):
    _available(request.param)
    return request.param


def _run(code, backend, **kw):
    return run_python(code, PythonExecutorConfig(**{**FAST, "isolation": backend, **kw}))


def _unsafe(code, **kw):
    return run_python(code, PythonExecutorConfig(**{**FAST, "unsafe_python": True, **kw}))


REIMPORT_POSIX = "import sys\nsys.modules.pop('posix', None)\nimport posix\n"

# ---------------------------------------------------------------- escapes


def test_posix_system_runs_only_inside(backend, tmp_path):
    marker = tmp_path / "pwned"
    code = REIMPORT_POSIX + f"print('rc', posix.system('echo pwned > {marker}; echo shell-ran; id -u'))"
    r = _run(code, backend)
    assert r.ok and "shell-ran" in r.stdout, r.render()  # the guard bypass works: the shell ran...
    assert not marker.exists()                           # ...but could not write to the host's /tmp
    assert r.stdout.split()[1] != "0"                    # and is not root
    assert _unsafe(code).ok and marker.read_text() == "pwned\n"  # control: without the sandbox it does


def _processes_with(marker):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def _orphan_code(marker, then):
    return REIMPORT_POSIX + f"""
import time
if posix.fork() == 0:
    posix.setsid()
    if posix.fork() == 0:
        posix.execv(sys.executable, [sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.05)', '{marker}'])
    posix._exit(0)
print('spawned', flush=True)
{then}
"""


def _run_watching(code, config, marker):
    """Run code in a thread; returns (result, whether the marked process was seen alive during the run)."""
    box = {}
    worker = threading.Thread(target=lambda: box.update(r=run_python(code, config)))
    worker.start()
    seen = False
    while worker.is_alive():
        seen = seen or bool(_processes_with(marker))
        time.sleep(0.05)
    worker.join()
    return box["r"], seen


@pytest.mark.parametrize("ending", ["timeout", "exit"])
def test_setsid_grandchild_does_not_outlive_the_run(backend, ending):
    marker = f"kiln-orphan-{uuid.uuid4().hex}"
    then = "time.sleep(60)" if ending == "timeout" else "time.sleep(1.0)"
    config = PythonExecutorConfig(**{**FAST, "timeout_s": 3.0, "isolation": backend})
    r, seen = _run_watching(_orphan_code(marker, then), config, marker)
    assert seen, "the grandchild never ran: the test would prove nothing"
    assert r.stdout == "spawned\n" and r.timed_out == (ending == "timeout"), r.render()
    assert _processes_with(marker) == []  # gone when run_python returns, no grace period


def _namespace_zombies():
    """Zombie processes that were the init of a nested PID namespace (an orphaned sandbox init)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines())
        except (OSError, ValueError):
            continue
        if status.get("State", "").strip().startswith("Z") and status.get("NSpid", "").split()[1:] == ["1"]:
            found.add(int(pid))
    return found


def test_no_orphaned_namespace_init_left(backend):
    before = _namespace_zombies()
    for code, timeout_s in (("print(1)", 5.0), ("import time\ntime.sleep(60)", 0.5)):
        _run(code, backend, timeout_s=timeout_s)
    assert _namespace_zombies() - before == set()


def test_setsid_grandchild_survives_without_sandbox():  # control for the test above
    marker = f"kiln-orphan-{uuid.uuid4().hex}"
    r, seen = _run_watching(_orphan_code(marker, "time.sleep(60)"),
                            PythonExecutorConfig(timeout_s=2.0, unsafe_python=True), marker)
    survivors = _processes_with(marker)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert seen and r.timed_out and survivors


@pytest.fixture
def listener():
    """A TCP listener on the host's 127.0.0.1; yields (port, list of accepted peer addresses)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.1)
    accepted, stop = [], threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, addr = server.accept()
            except (TimeoutError, socket.timeout):
                continue
            accepted.append(addr)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], accepted
    stop.set()
    thread.join()
    server.close()


def _connect_code(port):
    """Three routes to the host's 127.0.0.1:port: the re-imported _socket, libc through a re-imported ctypes, and
    bash's /dev/tcp through a re-imported posix.system."""
    return f"""
import sys
for name in ("socket", "_socket", "ctypes", "_ctypes", "posix"):
    sys.modules.pop(name, None)
import _socket, ctypes, errno, posix, struct
s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)  # the Python-level block is undone
s.settimeout(2)
try:
    s.connect(("127.0.0.1", {port}))
    print("socket connected", flush=True)
except OSError as e:
    print("socket", errno.errorcode.get(e.errno, e.errno), flush=True)
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
addr = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
if libc.connect(fd, addr, len(addr)) == 0:
    print("ctypes connected", flush=True)
else:
    print("ctypes", errno.errorcode.get(ctypes.get_errno()), flush=True)
rc = posix.system("bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port} && echo bash connected' 2>/dev/null")
print("bash-rc", rc >> 8)
"""


def test_host_loopback_unreachable(backend, listener):
    port, accepted = listener
    r = _run(_connect_code(port), backend)
    assert r.ok, r.render()
    refused = ("ECONNREFUSED", "ENETUNREACH")  # a real connect() that the kernel refused, not the Python guard
    assert any(f"socket {e}" in r.stdout for e in refused), r.stdout
    assert any(f"ctypes {e}" in r.stdout for e in refused), r.stdout
    assert "bash-rc 1" in r.stdout and "connected" not in r.stdout, r.stdout
    time.sleep(0.3)
    assert accepted == []


def test_host_loopback_reachable_without_sandbox(listener):  # control
    port, accepted = listener
    r = _unsafe(_connect_code(port))
    assert all(f"{route} connected" in r.stdout for route in ("socket", "ctypes", "bash")), r.render()
    time.sleep(0.3)
    assert len(accepted) >= 3


SECRET = "kiln-secret-" + uuid.uuid4().hex
_READ_ENVIRON = """
import os, sys
hits = []
for pid in [p for p in os.listdir("/proc") if p.isdigit()] + [str(os.getppid()), sys.argv_host_pid]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            hits.append(f.read().decode(errors="replace"))
    except OSError as e:
        print("unreadable", pid, type(e).__name__)
print("\\n".join(hits))
print(dict(os.environ))
"""


def _parent_with_secret(code, **config):
    """Run code from a fresh process whose own environment (what /proc/<pid>/environ shows) holds SECRET."""
    script = ("import json, sys\nfrom envs.python_executor import PythonExecutorConfig, run_python\n"
              f"r = run_python(sys.stdin.read().replace('sys.argv_host_pid', repr(str(__import__('os').getpid()))), "
              f"PythonExecutorConfig(**{config!r}))\nprint(json.dumps([r.stdout, r.stderr, r.returncode]))")
    done = subprocess.run([sys.executable, "-c", script], input=code, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KILN_TEST_SECRET": SECRET}, cwd=os.path.dirname(pe.__file__) + "/..")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_parent_environ_not_readable(backend):
    stdout, stderr, rc = _parent_with_secret(_READ_ENVIRON, **FAST, isolation=backend)
    assert rc == 0, stderr
    assert SECRET not in stdout + stderr and "KILN_TEST_SECRET" not in stdout + stderr


def test_parent_environ_readable_without_sandbox():  # control
    stdout, _, _ = _parent_with_secret(_READ_ENVIRON, **FAST, unsafe_python=True)
    assert SECRET in stdout


def test_no_writes_outside_scratch(backend, tmp_path):
    name = f"kiln-escape-{uuid.uuid4().hex}"
    host_targets = [tmp_path / "escape.txt", f"/etc/{name}", f"/usr/{name}", f"/{name}", f"/var/tmp/{name}"]
    code = f"""
import os
for path in {[str(t) for t in host_targets]!r}:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write("escaped")
        print("wrote", path)
    except OSError as e:
        print("refused", path, type(e).__name__)
with open("/scratch/ok.txt", "w") as f:
    f.write("fine")
if os.path.islink("/tmp"):  # /tmp points at scratch, unless the Python install itself lives under /tmp
    with open("/tmp/also.txt", "w") as f:
        f.write("fine")
print(sorted(os.listdir(".")), os.path.islink("/tmp"))
"""
    r = _run(code, backend)
    assert r.ok, r.render()
    assert all(not os.path.exists(t) for t in host_targets), r.stdout
    assert "ok.txt" in r.stdout  # scratch is writable ...
    tmp_is_scratch = not str(Path(sys.prefix).resolve()).startswith("/tmp/")
    assert r.stdout.rstrip().endswith(str(tmp_is_scratch))
    assert ("also.txt" in r.stdout) == tmp_is_scratch  # ... and so is /tmp, which then points at it
    assert r.stdout.count("refused") >= 4  # /etc, /usr, / and /var are read-only or absent inside
    assert _unsafe(f"open({str(tmp_path / 'escape.txt')!r}, 'w').write('x')").ok  # control
    assert (tmp_path / "escape.txt").exists()


def test_ro_paths_are_visible_read_only(backend, tmp_path):
    (tmp_path / "data.txt").write_text("shared data")
    tmp_path.chmod(0o755)  # the sandbox's uid reads it as "others" (when Kiln is root, an unprivileged uid)
    code = f"""
print(open({str(tmp_path / 'data.txt')!r}).read())
try:
    open({str(tmp_path / 'new.txt')!r}, "w")
except OSError as e:
    print("refused", type(e).__name__)
"""
    r = _run(code, backend, ro_paths=(str(tmp_path),))
    assert r.ok and r.stdout == "shared data\nrefused OSError\n", r.render()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_cannot_kill_the_parent_or_other_host_processes(backend):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        code = REIMPORT_POSIX + f"""
import os
for pid in (os.getppid(), {os.getpid()}, {victim.pid}, 1):
    try:
        posix.kill(pid, 9)
        print("sent", pid)
    except OSError as e:
        print("refused", pid, type(e).__name__)
"""
        r = _run(code, backend)
        time.sleep(0.2)
        assert victim.poll() is None, r.render()  # and this test process is evidently alive
        assert r.returncode == 0, r.render()
        assert _unsafe(f"import os\nos.kill({victim.pid}, 9)").ok  # control: without the sandbox it dies
        assert victim.wait(timeout=5) == -signal.SIGKILL
    finally:
        victim.kill()
        victim.wait()


def test_sysctls_and_namespaces_are_out_of_reach(backend):
    iso = sandbox_isolation(backend)
    code = """
import os, sys
for path in ("/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger", "/proc/sys/vm/drop_caches"):
    try:
        os.close(os.open(path, os.O_WRONLY))  # opened for writing, never written
        print("writable", path)
    except OSError as e:
        print("refused", path, type(e).__name__)
for name in ("ctypes", "_ctypes"):
    sys.modules.pop(name, None)
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
print("unshare", libc.unshare(0x10000000), ctypes.get_errno())  # CLONE_NEWUSER
print("ptrace", libc.ptrace(16, 1, 0, 0), ctypes.get_errno())    # PTRACE_ATTACH to the namespace's init
status = open("/proc/self/status").read()
print([line for line in status.splitlines() if line.startswith(("CapEff", "CapBnd", "NoNewPrivs", "Seccomp:"))])
"""
    r = _run(code, backend)
    assert r.ok and "writable" not in r.stdout and r.stdout.count("refused") == 3, r.render()
    assert "unshare -1 1" in r.stdout and "ptrace -1" in r.stdout  # EPERM
    assert "'CapEff:\\t0000000000000000'" in r.stdout and "'NoNewPrivs:\\t1'" in r.stdout
    assert ("'Seccomp:\\t2'" in r.stdout) == iso.seccomp

# ---------------------------------------------------------------- normal code, limits


def test_normal_code_runs(backend):
    code = """
import collections, fractions, itertools, json, math, os, re, statistics, tempfile, threading
print(os.listdir("."), os.getcwd(), os.environ["HOME"])
print(math.factorial(20), fractions.Fraction(3, 9), statistics.mean([1, 2, 3, 4]))
print(json.dumps({"a": [1, 2]}), re.findall(r"\\d+", "a1b22"), list(itertools.accumulate([1, 2, 3])))
with open("data.txt", "w") as f:
    f.write("x" * 100000)
with tempfile.NamedTemporaryFile("w", delete=False) as f:
    f.write("tmp")
t = threading.Thread(target=lambda: print("thread", flush=True))
t.start(); t.join()
print(os.path.getsize("data.txt"), open(f.name).read())
"""
    r = _run(code, backend)
    assert r.ok and r.stderr == "", r.render()
    lines = r.stdout.splitlines()
    assert lines[0] == "['main.py'] /scratch /scratch"
    assert lines[1] == "2432902008176640000 1/3 2.5"
    assert lines[2] == '{"a": [1, 2]} [\'1\', \'22\'] [1, 3, 6]'
    assert lines[3:] == ["thread", "100000 tmp"]
    assert r.isolation.startswith(backend)


@pytest.mark.parametrize("code, limits, expected", [
    ("while True:\n    pass", dict(cpu_s=1), "CPU time limit of 1 s"),
    ("x = bytearray(1024 ** 3)", dict(memory_mb=256), "memory limit of 256 MB"),
    ("import time\ntime.sleep(60)", dict(timeout_s=1.0), "wall time limit of 1 s"),
    ("open('big', 'wb').write(bytes(4 << 20))", dict(disk_mb=2), "scratch disk limit of 2 MB"),
    ("open('big', 'wb').write(bytes(2 << 20))", dict(max_file_mb=1), "file size limit of 1 MB"),
])
def test_limits_end_the_run_with_a_clear_result(backend, code, limits, expected):
    r = _run(code, backend, **limits)
    assert not r.ok and r.limit == expected, r.render()
    assert f"({expected} exceeded)" in r.render().splitlines()[0]


def test_process_limit(backend):
    code = REIMPORT_POSIX + """
import time
n = 0
try:
    for _ in range(50):
        if posix.fork() == 0:
            time.sleep(5)
            posix._exit(0)
        n += 1
except OSError as e:
    print("stopped", type(e).__name__)
print("forks", n)
"""
    r = _run(code, backend, max_processes=4)
    assert r.ok and "stopped BlockingIOError" in r.stdout and "forks 3" in r.stdout, r.render()

# ---------------------------------------------------------------- choosing the isolation


def test_refuses_to_run_without_isolation(monkeypatch):
    monkeypatch.setattr(pe, "_probe_cache", {})
    monkeypatch.setattr(pe, "_probe_one", lambda name: f"{name}: not found on PATH")
    with pytest.raises(SandboxUnavailableError, match=r"bwrap: not found.*unshare: not found.*bubblewrap.*"
                                                      r"unsafe_python=True"):
        run_python("print(1)")
    with pytest.raises(SandboxUnavailableError, match="bwrap: not found"):
        run_python("print(1)", PythonExecutorConfig(isolation="bwrap"))
    with pytest.raises(SandboxUnavailableError):  # at construction, not as an error observation per call
        python_tool(PythonExecutorConfig())
    assert python_tool(PythonExecutorConfig(unsafe_python=True)).name == "python"


def test_unsafe_python_runs_without_isolation_and_warns(monkeypatch, caplog):
    monkeypatch.setattr(pe, "_probe_cache", {})
    monkeypatch.setattr(pe, "_probe_one", lambda name: f"{name}: not found on PATH")
    monkeypatch.setattr(pe, "_warned_unsafe", False)
    with caplog.at_level(logging.WARNING, logger="envs.python_executor"):
        r = run_python("print(6 * 7)", PythonExecutorConfig(unsafe_python=True))
    assert r.ok and r.stdout == "42\n" and r.isolation == "none (unsafe_python=True)"
    assert "WITHOUT a sandbox" in caplog.text


def test_probe_runs_once_and_prefers_bwrap(monkeypatch):
    calls = []
    real = pe._probe_one
    monkeypatch.setattr(pe, "_probe_cache", {})
    monkeypatch.setattr(pe, "_probe_one", lambda name: calls.append(name) or real(name))
    first = sandbox_isolation()
    assert sandbox_isolation() is first
    if first.backend == "bwrap":
        assert calls == ["bwrap"]
    else:  # bwrap did not work here; unshare did
        assert calls == ["bwrap", "unshare"]
    assert first.describe().startswith(first.backend)


def _bpf(prog, nr, arch, arg0=0):
    """A classic-BPF interpreter for the instructions seccomp_program emits."""
    import struct
    data = struct.pack("=iIQ6Q", nr, arch, 0, arg0, 0, 0, 0, 0, 0)
    ins = [struct.unpack_from("=HBBI", prog, i) for i in range(0, len(prog), 8)]
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = ins[pc]
        if code == 0x20:
            acc = struct.unpack_from("=I", data, k)[0]
        elif code == 0x06:
            return k
        elif code in (0x15, 0x45):
            hit = acc == k if code == 0x15 else bool(acc & k)
            pc += jt if hit else jf
        else:
            raise AssertionError(hex(code))
        pc += 1


@pytest.mark.parametrize("machine, arch, nrs", [
    ("x86_64", 0xC000003E, dict(read=0, ptrace=101, unshare=272, clone=56, clone3=435, bpf=321)),
    ("aarch64", 0xC00000B7, dict(read=63, ptrace=117, unshare=97, clone=220, clone3=435, bpf=280)),
])
def test_seccomp_program_decisions(machine, arch, nrs):
    prog = seccomp_program(machine)
    allow, eperm, enosys, kill = 0x7FFF0000, 0x00050001, 0x00050026, 0x80000000
    assert _bpf(prog, nrs["read"], arch) == allow
    assert _bpf(prog, nrs["ptrace"], arch) == eperm and _bpf(prog, nrs["bpf"], arch) == eperm
    assert _bpf(prog, nrs["unshare"], arch) == eperm
    assert _bpf(prog, nrs["clone"], arch, arg0=signal.SIGCHLD | 0x01200000) == allow  # fork
    assert _bpf(prog, nrs["clone"], arch, arg0=signal.SIGCHLD | 0x10000000) == eperm  # CLONE_NEWUSER
    assert _bpf(prog, nrs["clone3"], arch) == enosys
    assert _bpf(prog, nrs["read"], 0x40000003) == kill  # i386
    if machine == "x86_64":
        assert _bpf(prog, 0x40000000 | 0, arch) == eperm  # x32
    assert seccomp_program("sparc") is None


def test_config_validation():
    for bad, match in [(dict(isolation="docker"), "isolation must be"), (dict(disk_mb=0), "disk_mb"),
                       (dict(max_processes=0), "max_processes"), (dict(cpu_s=0), "cpu_s"),
                       (dict(ro_paths=("relative",)), "ro_paths")]:
        with pytest.raises(ValueError, match=match):
            PythonExecutorConfig(**bad)
    assert PythonExecutorConfig(timeout_s=2.5).cpu_limit_s == 4 and PythonExecutorConfig(cpu_s=1.2).cpu_limit_s == 2
