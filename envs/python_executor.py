"""Run model-written Python in a sandbox: its own namespaces, a read-only filesystem, no network, rlimits.

On Linux the code runs under `bwrap` (bubblewrap) when it works, else under util-linux `unshare` (see
`sandbox_isolation`, probed once per process and cached):

- own mount, PID, network, IPC, UTS and cgroup namespaces (plus a user namespace when Kiln is not root); the
  network namespace is empty, so 127.0.0.1 is the sandbox's own loopback, never the host's;
- a read-only view of the filesystem with only /usr (and the /bin, /lib* links or directories), the
  interpreter's prefixes, a few /etc files (loader cache, localtime, a synthetic passwd/group/hosts) and
  `config.ro_paths`; a fresh /proc of its own PID namespace; a minimal /dev; the working directory
  /scratch (also HOME and TMPDIR, /tmp points at it) is a fresh tmpfs of `disk_mb`;
- as root, the code runs as a dedicated unprivileged host uid (`setpriv`), never as root, with no
  capabilities and no_new_privs; otherwise as the calling user, with no capabilities;
- a seccomp filter that refuses namespace creation, mount, ptrace, bpf, perf, io_uring, keyrings, module
  and kexec calls, and other syscalls the code has no use for (x86_64 and aarch64);
- rlimits from `PythonExecutorConfig`: address space, CPU seconds, processes, file size, no core dumps;
- the environment holds only PATH, HOME, TMPDIR, LANG and thread-count caps;
- the namespace's pid 1 is a shell that waits for the code; when the code exits, or on timeout (SIGKILL to
  that init), the kernel kills every process of the PID namespace, setsid'd grandchildren included, before
  the call returns.

Without a working sandbox `run_python` raises `SandboxUnavailableError` (naming what is missing and how to
install it) unless the config sets `unsafe_python=True`: then the code runs in a plain child process with
rlimits and Python-level guards only (a warning is logged), which stops honest mistakes, not hostile code.
The same Python-level guards (no sockets, ctypes or process spawning through the usual modules) also run
inside the sandbox; there they only make mistakes fail early, the boundary is the sandbox. What the sandbox
does not contain is listed in docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import math
import os
import platform
import re
import resource
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from envs.tools import Tool

logger = logging.getLogger(__name__)

BACKENDS = ("bwrap", "unshare")
SCRATCH = "/scratch"
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install -y bubblewrap`; scripts/setup.sh does it "
                "when run as root) or make util-linux `unshare` usable (root, or user namespaces enabled)")

# ---------------------------------------------------------------- Python-level guards and the child's entry

_GUARDS = r'''
def _kiln_blocked(what):
    def blocked(*args, **kwargs):
        raise PermissionError(f"{what} is disabled in this sandbox")
    return blocked

import _socket, socket
class _KilnNoSocket:
    def __new__(cls, *args, **kwargs):
        raise PermissionError("network access is disabled in this sandbox")
for _mod in (_socket, socket):
    for _name in ("socket", "SocketType", "socketpair", "fromfd", "create_connection", "create_server",
                  "getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(_mod, _name):
            setattr(_mod, _name,
                    _KilnNoSocket if _name in ("socket", "SocketType") else _kiln_blocked("network access"))
for _name in ("ctypes", "_ctypes"):
    sys.modules[_name] = None
import os, posix, _posixsubprocess
_posixsubprocess.fork_exec = _kiln_blocked("starting processes")
for _mod in (os, posix):
    for _name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp",
                  "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _kiln_blocked("starting processes"))
del _mod, _name, _socket, socket, os, posix, _posixsubprocess, _KilnNoSocket, _kiln_blocked
'''

_RUN_MAIN = r'''
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
'''

# Installs the seccomp program (hex of struct sock_filter[]) with no_new_privs, then forgets ctypes again.
_SECCOMP_INSTALL = r'''
def _kiln_seccomp(prog):
    import ctypes, os
    libc = ctypes.CDLL(None, use_errno=True)
    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
    fprog = _Prog(len(prog) // 8, prog)
    ul = ctypes.c_ulong
    if libc.prctl(38, ul(1), ul(0), ul(0), ul(0)) or libc.prctl(22, ul(2), ctypes.byref(fprog), ul(0), ul(0)):
        raise SystemExit("kiln sandbox: seccomp filter not installed: " + os.strerror(ctypes.get_errno()))
_kiln_seccomp(bytes.fromhex("{prog}"))
del _kiln_seccomp
for _name in [m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]:
    del sys.modules[_name]
'''


def _prelude(*, nproc: int | None, seccomp: bytes | None) -> str:
    # no fd but stdin/stdout/stderr reaches the code (the launchers' own fds included)
    parts = ["import sys, resource, os as _os", "_os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])",
             "del _os"]
    if nproc is not None:  # set inside: counts the sandbox's uid (its own host uid, or in its user namespace)
        parts.append(f"resource.setrlimit(resource.RLIMIT_NPROC, ({nproc}, {nproc}))")
    if seccomp is not None:
        parts.append(_SECCOMP_INSTALL.replace("{prog}", seccomp.hex()))
    parts += [_GUARDS, _RUN_MAIN]
    return "\n".join(parts)

# ---------------------------------------------------------------- seccomp filter (classic BPF, built here)

# Syscalls the sandboxed code gets EPERM for. Numbers from the kernel's uapi headers (x86_64: asm/unistd_64.h;
# aarch64: asm-generic/unistd.h); names missing on an architecture are left out.
_DENIED = ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd", "kcmp", "bpf", "perf_event_open",
           "userfaultfd", "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
           "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount",
           "fspick", "mount_setattr", "setns", "unshare", "kexec_load", "kexec_file_load", "init_module",
           "finit_module", "delete_module", "swapon", "swapoff", "reboot", "acct", "quotactl", "quotactl_fd",
           "syslog", "name_to_handle_at", "open_by_handle_at", "lookup_dcookie", "iopl", "ioperm", "settimeofday",
           "clock_settime", "clock_adjtime", "adjtimex", "vhangup", "personality", "fanotify_init", "modify_ldt",
           "uselib")
_SYSCALLS = {
    "x86_64": (0xC000003E, {
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438, "kcmp": 312,
        "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "mount": 165, "umount2": 166,
        "pivot_root": 155, "chroot": 161, "move_mount": 429, "open_tree": 428, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "setns": 308, "unshare": 272, "kexec_load": 246,
        "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176, "swapon": 167,
        "swapoff": 168, "reboot": 169, "acct": 163, "quotactl": 179, "quotactl_fd": 443, "syslog": 103,
        "name_to_handle_at": 303, "open_by_handle_at": 304, "lookup_dcookie": 212, "iopl": 172, "ioperm": 173,
        "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "vhangup": 153,
        "personality": 135, "fanotify_init": 300, "modify_ldt": 154, "uselib": 134, "clone": 56, "clone3": 435}),
    "aarch64": (0xC00000B7, {
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_getfd": 438, "kcmp": 272,
        "bpf": 280, "perf_event_open": 241, "userfaultfd": 282, "keyctl": 219, "add_key": 217, "request_key": 218,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "move_mount": 429, "open_tree": 428, "fsopen": 430, "fsconfig": 431,
        "fsmount": 432, "fspick": 433, "mount_setattr": 442, "setns": 268, "unshare": 97, "kexec_load": 104,
        "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106, "swapon": 224,
        "swapoff": 225, "reboot": 142, "acct": 89, "quotactl": 60, "quotactl_fd": 443, "syslog": 116,
        "name_to_handle_at": 264, "open_by_handle_at": 265, "lookup_dcookie": 18, "settimeofday": 170,
        "clock_settime": 112, "clock_adjtime": 266, "adjtimex": 171, "vhangup": 58, "personality": 92,
        "fanotify_init": 262, "clone": 220, "clone3": 435}),
}
_CLONE_NEW_NAMESPACES = 0x7E020000  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_RET_ALLOW, _RET_KILL_PROCESS = 0x7FFF0000, 0x80000000
_RET_EPERM, _RET_ENOSYS = 0x00050000 | 1, 0x00050000 | 38


def seccomp_program(machine: str | None = None) -> bytes | None:
    """The sandbox's seccomp filter for `machine` (default: this one) as struct sock_filter[], or None if unknown.

    Foreign-architecture syscalls (i386 int 0x80, x32) kill the process; clone with a CLONE_NEW* flag and the
    `_DENIED` syscalls return EPERM; clone3 returns ENOSYS (its flags sit in memory a filter cannot read, and
    libc then falls back to clone); everything else is allowed.
    """
    machine = machine or platform.machine()
    if machine not in _SYSCALLS:
        return None
    arch, nr = _SYSCALLS[machine]
    denied = [nr[name] for name in _DENIED if name in nr]
    # (code, jt, jf, k) with jt/jf as labels resolved below
    ld_arch, ld_nr, ld_arg0 = (0x20, 0, 0, 4), (0x20, 0, 0, 0), (0x20, 0, 0, 16)
    prog: list[tuple] = [ld_arch, (0x15, 0, "kill", arch), ld_nr]
    if machine == "x86_64":
        prog.append((0x45, "eperm", 0, 0x40000000))  # jset: x32 ABI
    prog += [(0x15, "eperm", 0, n) for n in denied]
    prog += [(0x15, "enosys", 0, nr["clone3"]), (0x15, 0, "allow", nr["clone"]), ld_arg0,
             (0x45, "eperm", "allow", _CLONE_NEW_NAMESPACES)]
    labels = {"allow": len(prog), "eperm": len(prog) + 1, "enosys": len(prog) + 2, "kill": len(prog) + 3}
    prog += [(0x06, 0, 0, _RET_ALLOW), (0x06, 0, 0, _RET_EPERM), (0x06, 0, 0, _RET_ENOSYS),
             (0x06, 0, 0, _RET_KILL_PROCESS)]
    out = bytearray()
    for i, (code, jt, jf, k) in enumerate(prog):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        out += struct.pack("=HBBI", code, jt, jf, k)
    return bytes(out)

# ---------------------------------------------------------------- config and result


@dataclass(frozen=True)
class PythonExecutorConfig:
    """Limits of one execution and how it is isolated."""

    timeout_s: float = 5.0          # wall time, sandbox start included
    memory_mb: int = 512            # RLIMIT_AS of each process
    max_output_chars: int = 4000    # what the model sees of stdout and of stderr
    max_file_mb: int = 16           # RLIMIT_FSIZE: largest file written, stdout/stderr included
    cpu_s: float | None = None      # RLIMIT_CPU of each process; None: timeout_s + 1
    max_processes: int = 16         # RLIMIT_NPROC inside the sandbox (threads count)
    disk_mb: int = 64               # size of the /scratch tmpfs
    isolation: str = "auto"         # "auto" (bwrap, else unshare), "bwrap" or "unshare"
    ro_paths: tuple[str, ...] = ()  # extra host paths visible read-only inside, same path (world-readable)
    unsafe_python: bool = False     # without a working sandbox, run with best-effort guards instead of refusing

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64 (the interpreter needs it to start), got {self.memory_mb}")
        if self.max_output_chars < 1:
            raise ValueError(f"max_output_chars must be >= 1, got {self.max_output_chars}")
        if self.max_file_mb < 1:
            raise ValueError(f"max_file_mb must be >= 1, got {self.max_file_mb}")
        if self.cpu_s is not None and not self.cpu_s > 0:
            raise ValueError(f"cpu_s must be > 0 or None, got {self.cpu_s}")
        if self.max_processes < 1:
            raise ValueError(f"max_processes must be >= 1, got {self.max_processes}")
        if self.disk_mb < 1:
            raise ValueError(f"disk_mb must be >= 1, got {self.disk_mb}")
        if self.isolation not in ("auto",) + BACKENDS:
            raise ValueError(f"isolation must be 'auto', 'bwrap' or 'unshare', got {self.isolation!r}")
        for path in self.ro_paths:
            if not isinstance(path, str) or not os.path.isabs(path):
                raise ValueError(f"ro_paths entries must be absolute paths, got {path!r}")

    @property
    def cpu_limit_s(self) -> int:
        return math.ceil(self.cpu_s if self.cpu_s is not None else self.timeout_s + 1)


@dataclass(frozen=True)
class ExecutionResult:
    """What the child printed and how it ended."""

    stdout: str
    stderr: str
    returncode: int | None  # None if it was killed for running past the time limit; -N: killed by signal N
    timed_out: bool
    wall_s: float
    limit: str = ""         # the limit that ended it, if one did ("CPU time limit of 2 s", ...)
    isolation: str = ""     # how it was isolated (Isolation.describe()), or that it was not

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    def render(self) -> str:
        """The result as the model sees it."""
        if self.timed_out:
            status = "timed out (killed)"
        elif self.returncode == 0:
            status = "exit code 0"
        elif self.returncode is not None and self.returncode < 0:
            status = f"killed by signal {signal.Signals(-self.returncode).name}"
        else:
            status = f"exit code {self.returncode}"
        if self.limit:
            status += f" ({self.limit} exceeded)"
        parts = [status]
        if self.stdout:
            parts.append(f"stdout:\n{self.stdout}")
        if self.stderr:
            parts.append(f"stderr:\n{self.stderr}")
        return "\n".join(parts)


class SandboxUnavailableError(RuntimeError):
    """No isolation works on this machine (and `unsafe_python` is off)."""


@dataclass(frozen=True)
class Isolation:
    """A sandbox configuration that the probe found working."""

    backend: str        # "bwrap" or "unshare"
    tool: str           # path of the bwrap / unshare binary
    userns: bool        # in its own user namespace (Kiln is not root)
    host_uid: bool      # Kiln is root: the code runs as a dedicated unprivileged host uid via setpriv
    seccomp: bool       # the seccomp filter is installed
    setpriv: str = ""

    def describe(self) -> str:
        ns = "user/mount/pid/net/ipc/uts/cgroup" if self.userns else "mount/pid/net/ipc/uts/cgroup"
        who = "an unprivileged host uid" if self.host_uid else "the calling user"
        return (f"{self.backend}: own {ns} namespaces, read-only filesystem, {SCRATCH} tmpfs, no network; code runs "
                f"as {who} with no capabilities; {'seccomp filter' if self.seccomp else 'no seccomp filter'}")


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit // 2
    return f"{text[:head]}\n... [{len(text) - limit} characters truncated] ...\n{text[len(text) - (limit - head):]}"

# ---------------------------------------------------------------- the sandbox's filesystem view

_TOP_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives")
_DEVICES = ("null", "zero", "full", "random", "urandom")


def _python_roots() -> list[str]:
    roots = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))}
    return sorted(r for r in roots if r and r != "/")


def _view(host_dir: Path, uid: int, disk_bytes: int, ro_paths: tuple[str, ...]) -> list[tuple]:
    """The mounts of the sandbox, in order: ("dir", p), ("ro", src, dst), ("symlink", target, dst), ("proc", p),
    ("dev", p), ("scratch", p, bytes), ("copy", host_file, dst)."""
    ops: list[tuple] = []
    made: set[str] = {"/"}
    bound: list[str] = []

    def parents(path: str) -> None:
        missing = []
        parent = os.path.dirname(path)
        while parent not in made:
            missing.append(parent)
            parent = os.path.dirname(parent)
        for p in reversed(missing):
            ops.append(("dir", p))
            made.add(p)

    def covered(real: str) -> bool:
        return any(real == b or real.startswith(b.rstrip("/") + "/") for b in bound)

    def bind(path: str) -> None:
        real = os.path.realpath(path)
        if covered(real):
            return
        parents(real)
        ops.append(("ro", real, real))
        made.add(real)
        bound.append(real)
        if path != real and not covered(os.path.abspath(path)):
            parents(path)
            ops.append(("symlink", real, path))
            made.add(path)

    for top in _TOP_DIRS:
        if os.path.islink(top):
            ops.append(("symlink", os.readlink(top), top))
            made.add(top)
        elif os.path.isdir(top):
            bind(top)
    for root in _python_roots() + list(ro_paths):
        bind(root)
    ops.append(("dir", "/etc"))
    made.add("/etc")
    for path in _ETC_FILES:
        if os.path.exists(path):
            ops.append(("ro", os.path.realpath(path), path))
    etc = host_dir / "etc"
    etc.mkdir()
    (etc / "passwd").write_text(f"root:x:0:0:root:/root:/usr/sbin/nologin\nsandbox:x:{uid}:{uid}:sandbox:"
                                f"{SCRATCH}:/bin/sh\n")
    (etc / "group").write_text(f"root:x:0:\nsandbox:x:{uid}:\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
    for name in ("passwd", "group", "hosts"):
        ops.append(("ro", str(etc / name), f"/etc/{name}"))
    ops += [("proc", "/proc"), ("dev", "/dev"), ("scratch", SCRATCH, disk_bytes),
            ("copy", str(host_dir / "main.py"), f"{SCRATCH}/main.py")]
    if "/tmp" not in made:  # unless a bound path lives under /tmp
        ops.append(("symlink", SCRATCH, "/tmp"))
    return ops


def _bwrap_argv(iso: Isolation, ops: list[tuple], info_fd: int, launcher: list[str]) -> tuple[list[str], list[int]]:
    """bwrap's command line and the fds it reads (the caller passes and closes them)."""
    argv = [iso.tool, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--hostname", "kiln-sandbox", "--die-with-parent", "--new-session", "--info-fd", str(info_fd),
            "--as-pid-1"]
    if iso.userns:
        argv += ["--unshare-user", "--disable-userns"]
    else:  # root without a user namespace: setpriv needs these to drop to the sandbox uid and clear the bounding set
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    fds: list[int] = []
    for op in ops:
        kind = op[0]
        if kind == "dir":
            argv += ["--perms", "0755", "--dir", op[1]]
        elif kind == "ro":
            argv += ["--ro-bind", op[1], op[2]]
        elif kind == "symlink":
            argv += ["--symlink", op[1], op[2]]
        elif kind == "proc":
            argv += ["--proc", op[1]]
        elif kind == "dev":
            argv += ["--dev", op[1]]
        elif kind == "scratch":
            argv += ["--perms", "0777", "--size", str(op[2]), "--tmpfs", op[1]]
        elif kind == "copy":
            fd = os.open(op[1], os.O_RDONLY | os.O_CLOEXEC)
            fds.append(fd)
            argv += ["--perms", "0666", "--file", str(fd), op[2]]
        else:
            raise AssertionError(kind)
    # Our own pid 1, a shell that waits for the launcher: bwrap's reaper would tell bwrap the exit status and
    # leave its own exit (and the namespace's teardown) behind, an orphaned zombie; this way bwrap reaps the
    # namespace's init itself, and the code is not pid 1 (which would ignore its rlimit signals).
    argv += ["--remount-ro", "/", "--chdir", SCRATCH, "--", "/bin/sh", "-c", '"$@"; exit $?', "kiln-init"]
    return argv + launcher, fds


def _unshare_argv(iso: Isolation, ops: list[tuple], info_fd: int, launcher: list[str], new_root: Path) -> list[str]:
    """unshare's command line: a shell, pid 1 of the new PID namespace, builds the view, pivots into it and runs
    the launcher as its child (so that the code is not the namespace's init, which would ignore its rlimit
    signals)."""
    q = shlex.quote
    lines = [
        "set -eu",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        # the host pid of this shell (the namespace's init), for the caller to kill on timeout
        # (dash cannot name fds above 9 in a redirection; the prelude closes every fd above 2 before the code)
        'while read -r k v rest; do if [ "$k" = NSpid: ]; then printf \'{"child-pid": %s}\\n\' "$v" > '
        f"/proc/self/fd/{info_fd}; break; fi; done < /proc/self/status",
        f"R={q(str(new_root))}",
        'mount -t tmpfs -o mode=0755,nosuid,nodev kiln-root "$R"',
    ]
    for op in ops:
        kind = op[0]
        if kind == "dir":
            lines.append(f'mkdir -p -m 0755 "$R"{q(op[1])}')
        elif kind == "ro":
            src, dst = op[1], op[2]
            if os.path.isdir(src):
                lines.append(f'mkdir -p "$R"{q(dst)}')
            else:
                lines.append(f'mkdir -p "$R"{q(os.path.dirname(dst))}; : > "$R"{q(dst)}')
            lines.append(f'mount --bind -o ro,nosuid,nodev {q(src)} "$R"{q(dst)}')
        elif kind == "symlink":
            lines.append(f'ln -s {q(op[1])} "$R"{q(op[2])}')
        elif kind == "proc":
            lines.append(f'mkdir -p "$R"{q(op[1])}; mount -t proc -o nosuid,nodev,noexec proc "$R"{q(op[1])}')
        elif kind == "dev":
            lines.append(f'mkdir -p "$R"{q(op[1])}')
            for name in _DEVICES:
                lines.append(f': > "$R"{q(op[1])}/{name}; mount --bind -o nosuid /dev/{name} "$R"{q(op[1])}/{name}')
        elif kind == "scratch":
            lines.append(f'mkdir -p "$R"{q(op[1])}; '
                         f'mount -t tmpfs -o size={op[2]},mode=0777,nosuid,nodev kiln-scratch "$R"{q(op[1])}')
        elif kind == "copy":
            lines.append(f'cp {q(op[1])} "$R"{q(op[2])}; chmod 0666 "$R"{q(op[2])}')
        else:
            raise AssertionError(kind)
    lines += ['cd "$R"', "mkdir .oldroot", "pivot_root . .oldroot", "cd /", "umount -l /.oldroot", "rmdir /.oldroot",
              "mount -o remount,bind,ro,nosuid,nodev /", f"cd {SCRATCH}", f"PATH={q(_python_env()['PATH'])}", "set +e",
              " ".join(q(a) for a in launcher), "exit $?"]
    argv = [iso.tool, "--pid", "--fork", "--kill-child", "--mount", "--net", "--ipc", "--uts", "--cgroup",
            "--propagation", "private"]
    if iso.userns:
        argv += ["--user", "--map-root-user"]
    return argv + ["--", "/bin/sh", "-c", "\n".join(lines)]

# ---------------------------------------------------------------- running a child and ending it


_UID_BASE = 3_000_000_000  # sandbox host uids: base + (pid & 0xFFFFF) << 8 + slot, below 2**32 - 1
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


@contextlib.contextmanager
def _sandbox_uid():
    """A host uid of its own for one execution (as root), so that RLIMIT_NPROC counts only its processes."""
    with _uid_lock:
        slot = next((s for s in range(256) if s not in _uids_in_use), time.monotonic_ns() % 256)
        _uids_in_use.add(slot)
    try:
        yield _UID_BASE + ((os.getpid() & 0xFFFFF) << 8) + slot
    finally:
        with _uid_lock:
            _uids_in_use.discard(slot)


_libc = None


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(1, ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def _limits(config: PythonExecutorConfig, *, nproc: bool, pdeathsig: bool):
    memory = config.memory_mb * 2**20
    cpu = config.cpu_limit_s
    file_bytes = config.max_file_mb * 2**20

    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc:
            resource.setrlimit(resource.RLIMIT_NPROC, (config.max_processes, config.max_processes))
        if pdeathsig:
            _set_pdeathsig()

    return apply


def _read_init_pid(info_r: int, deadline: float) -> int | None:
    """The host pid of the namespace's init, from bwrap's --info-fd JSON (or the unshare script's)."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        ready, _, _ = select.select([info_r], [], [], left)
        if not ready:
            return None
        chunk = os.read(info_r, 4096)
        data += chunk
        match = re.search(rb'"child-pid":\s*(\d+)', data)
        if match:
            return int(match.group(1))
        if not chunk:
            return None


def _open_init_pidfd(pid: int) -> int | None:
    """A pidfd for the sandbox's init; None if it is gone or (pid reused) not in a PID namespace of its own."""
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None
    try:
        if os.stat(f"/proc/{pid}/ns/pid").st_ino == os.stat("/proc/self/ns/pid").st_ino:
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        return None
    return fd


def _end_namespace(init_pidfd: int) -> None:
    """SIGKILL the namespace's init (the kernel then kills every process of its PID namespace, and the init
    exits only once they are gone) and wait for its exit; a no-op for an init that has already exited."""
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(init_pidfd, signal.SIGKILL)
    poller = select.poll()
    poller.register(init_pidfd, select.POLLIN)
    poller.poll(10_000)


def _kill_sandbox(proc: subprocess.Popen, init_pidfd: int | None) -> None:
    """End the sandbox's PID namespace, let the launcher reap its init (else that init would be left a zombie
    for the host's pid 1), then kill and reap the launcher's process group."""
    if init_pidfd is not None:
        _end_namespace(init_pidfd)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    if proc.returncode is None:  # not reaped yet, so its pid (the group's id) cannot have been reused
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _spawn(argv, *, config, env, cwd, preexec, pass_fds, info_r, out, err) -> tuple[int | None, bool]:
    """Run argv to its end or the time limit; returns (returncode or None, timed_out)."""
    start = time.monotonic()
    deadline = start + config.timeout_s
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                preexec_fn=preexec, start_new_session=True, pass_fds=pass_fds)
    except BaseException:
        if info_r is not None:
            os.close(info_r)
        raise
    finally:
        for fd in pass_fds:
            os.close(fd)
    init_pidfd = None
    try:
        if info_r is not None:
            init_pid = _read_init_pid(info_r, deadline)
            if init_pid is not None:
                init_pidfd = _open_init_pidfd(init_pid)
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if init_pidfd is not None:  # the launcher is gone; make sure its namespace is too
                _end_namespace(init_pidfd)
            return proc.returncode, False
        except subprocess.TimeoutExpired:
            if init_pidfd is None and info_r is not None:  # started late: its pid may have come meanwhile
                init_pid = _read_init_pid(info_r, time.monotonic() + 0.5)
                init_pidfd = _open_init_pidfd(init_pid) if init_pid is not None else None
            _kill_sandbox(proc, init_pidfd)
            return None, True
    finally:
        if init_pidfd is not None:
            os.close(init_pidfd)
        if info_r is not None:
            os.close(info_r)
        if proc.returncode is None:  # an exception on the way: leave nothing behind
            _kill_sandbox(proc, None)


def _python_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": SCRATCH, "TMPDIR": SCRATCH, "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run_sandboxed(iso: Isolation, code: str, config: PythonExecutorConfig, root: Path, out, err,
                   *, prelude: str) -> tuple[int | None, bool]:
    (root / "main.py").write_text(code)
    new_root = root / "root"
    new_root.mkdir()
    with _sandbox_uid() if iso.host_uid else contextlib.nullcontext(os.getuid()) as uid:
        ops = _view(root, uid, config.disk_mb * 2**20, config.ro_paths)
        launcher = [sys.executable, "-I", "-c", prelude]
        if iso.host_uid:
            launcher = [iso.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                        "--bounding-set=-all", "--inh-caps=-all", "--"] + launcher
        elif iso.backend == "unshare":  # root of its user namespace: drop every capability before the code
            launcher = [iso.setpriv or "setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all",
                        "--"] + launcher
        info_r, info_w = os.pipe()
        os.set_inheritable(info_w, True)
        try:
            if iso.backend == "bwrap":
                argv, fds = _bwrap_argv(iso, ops, info_w, launcher)
            else:
                argv, fds = _unshare_argv(iso, ops, info_w, launcher, new_root), []
        except BaseException:
            os.close(info_r)
            os.close(info_w)
            raise
        preexec = _limits(config, nproc=False, pdeathsig=True)
        return _spawn(argv, config=config, env=_python_env(), cwd=root, preexec=preexec,
                      pass_fds=tuple([info_w] + fds), info_r=info_r, out=out, err=err)

# ---------------------------------------------------------------- probing which isolation works


_probe_lock = threading.Lock()
_probe_cache: dict[str, Isolation | str] = {}

_PROBE_CODE = r'''
import os
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, "capabilities left"
assert status["NoNewPrivs"].strip() == "1", "no_new_privs not set"
assert os.getppid() == 1 and len([p for p in os.listdir("/proc") if p.isdigit()]) < 8, "PID namespace not own"
print("kiln-sandbox-ok", status["Seccomp"].strip(), os.getuid())
'''


def _probe_one(backend: str) -> Isolation | str:
    """Run a trivial script under `backend`; the working Isolation, or why it does not work."""
    tool = shutil.which(backend)
    if tool is None:
        return f"{backend}: not found on PATH"
    root = os.geteuid() == 0
    setpriv = shutil.which("setpriv") or ""
    if (root or backend == "unshare") and not setpriv:
        return f"{backend}: needs util-linux setpriv, not found on PATH"
    program = seccomp_program()
    why = ""
    for seccomp in ([program, None] if program is not None else [None]):
        iso = Isolation(backend, tool, userns=not root, host_uid=root, seccomp=seccomp is not None, setpriv=setpriv)
        config = PythonExecutorConfig(timeout_s=30.0, memory_mb=512, isolation=backend)
        prelude = _prelude(nproc=config.max_processes, seccomp=seccomp)
        with tempfile.TemporaryDirectory(prefix="kiln-py-probe-") as tmp:
            with open(Path(tmp) / "stdout", "wb") as out, open(Path(tmp) / "stderr", "wb") as err:
                rc, timed_out = _run_sandboxed(iso, _PROBE_CODE, config, Path(tmp), out, err, prelude=prelude)
            stdout = (Path(tmp) / "stdout").read_text(errors="replace")
            stderr = (Path(tmp) / "stderr").read_text(errors="replace")
        words = stdout.split() + ["", "", ""]
        if rc == 0 and words[0] == "kiln-sandbox-ok" and (seccomp is None or words[1] == "2") and \
                (not root or words[2] != "0"):
            return iso
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        why = lines[-1] if lines else ("timed out" if timed_out else f"exit code {rc}, output {stdout.strip()!r}")
        logger.debug("python sandbox probe %s (seccomp=%s) failed: %s", backend, seccomp is not None, stderr)
    return f"{backend}: does not work here: {why}"


def sandbox_isolation(backend: str = "auto", *, refresh: bool = False) -> Isolation:
    """The isolation `run_python` uses for `backend` ("auto": bwrap, else unshare), probed once and cached.

    Raises SandboxUnavailableError naming what is missing and how to install it."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be 'auto', 'bwrap' or 'unshare', got {backend!r}")
    if sys.platform != "linux":
        raise SandboxUnavailableError(f"the python tool sandbox needs Linux namespaces (this is {sys.platform}); "
                                      "set PythonExecutorConfig(unsafe_python=True) to run without it")
    global _libc
    with _probe_lock:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        if refresh:
            _probe_cache.clear()
        if backend not in _probe_cache:
            reasons = []
            for name in (BACKENDS if backend == "auto" else (backend,)):
                if name not in _probe_cache:
                    _probe_cache[name] = _probe_one(name)
                found = _probe_cache[name]
                if isinstance(found, Isolation):
                    _probe_cache[backend] = found
                    break
                reasons.append(found)
            else:
                _probe_cache[backend] = "; ".join(reasons)
            if isinstance(_probe_cache[backend], Isolation):
                logger.info("python tool sandbox: %s", _probe_cache[backend].describe())
        found = _probe_cache[backend]
    if isinstance(found, str):
        raise SandboxUnavailableError(f"no sandbox for the python tool ({found}); {INSTALL_HINT}; or set "
                                      "PythonExecutorConfig(unsafe_python=True) to run model code with best-effort "
                                      "guards only (not a security boundary)")
    return found

# ---------------------------------------------------------------- running code


_warned_unsafe = False


def _limit_hit(config: PythonExecutorConfig, returncode: int | None, timed_out: bool, stderr: str) -> str:
    if timed_out:
        return f"wall time limit of {config.timeout_s:g} s"
    if returncode == -signal.SIGXCPU:
        return f"CPU time limit of {config.cpu_limit_s} s"
    tail = stderr.rstrip().rsplit("\n", 1)[-1]
    if returncode == -signal.SIGXFSZ or "File too large" in tail:  # Python ignores SIGXFSZ: EFBIG instead
        return f"file size limit of {config.max_file_mb} MB"
    if tail.startswith("MemoryError"):
        return f"memory limit of {config.memory_mb} MB"
    if "No space left on device" in tail:
        return f"scratch disk limit of {config.disk_mb} MB"
    return ""


def _signal_status(returncode: int) -> int:
    """bwrap and the unshare shell report a child killed by signal N as exit code 128 + N."""
    if returncode > 128 and (returncode - 128) in {int(s) for s in signal.valid_signals()}:
        return -(returncode - 128)
    return returncode


def run_python(code: str, config: PythonExecutorConfig = PythonExecutorConfig()) -> ExecutionResult:
    """Run `code` as a script in the sandbox and return its (truncated) output.

    Raises SandboxUnavailableError when no isolation works and `config.unsafe_python` is off."""
    global _warned_unsafe
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    iso = None
    if not config.unsafe_python:
        iso = sandbox_isolation(config.isolation)
    elif not _warned_unsafe:
        _warned_unsafe = True
        logger.warning("python tool: unsafe_python=True, model code runs WITHOUT a sandbox (rlimits and "
                       "Python-level guards only; it can read this machine's files and reach its network)")
    with tempfile.TemporaryDirectory(prefix="kiln-py-") as tmp:
        root = Path(tmp)
        start = time.monotonic()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            if iso is not None:
                prelude = _prelude(nproc=config.max_processes, seccomp=seccomp_program() if iso.seccomp else None)
                returncode, timed_out = _run_sandboxed(iso, code, config, root, out, err, prelude=prelude)
                if returncode is not None:
                    returncode = _signal_status(returncode)
            else:
                work = root / "work"  # the script's cwd and HOME; the output files live outside it
                work.mkdir()
                (work / "main.py").write_text(code)
                env = dict(_python_env(), HOME=str(work), TMPDIR=str(work))
                returncode, timed_out = _spawn([sys.executable, "-I", "-c", _prelude(nproc=None, seccomp=None)],
                                               config=config, env=env, cwd=work,
                                               preexec=_limits(config, nproc=True, pdeathsig=False), pass_fds=(),
                                               info_r=None, out=out, err=err)
        wall = time.monotonic() - start
        stdout = (root / "stdout").read_bytes().decode("utf-8", errors="replace")
        stderr = (root / "stderr").read_bytes().decode("utf-8", errors="replace")
    return ExecutionResult(_truncate(stdout, config.max_output_chars), _truncate(stderr, config.max_output_chars),
                           returncode, timed_out, wall, limit=_limit_hit(config, returncode, timed_out, stderr),
                           isolation=iso.describe() if iso is not None else "none (unsafe_python=True)")


async def arun_python(code: str, config: PythonExecutorConfig = PythonExecutorConfig()) -> ExecutionResult:
    """`run_python` without blocking the event loop."""
    return await asyncio.to_thread(run_python, code, config)


def python_tool(config: PythonExecutorConfig = PythonExecutorConfig()) -> Tool:
    """A `python` tool that runs a script and returns its exit status, stdout and stderr.

    Probes the sandbox now, so that a machine without one fails here, loudly, with SandboxUnavailableError,
    instead of answering every tool call with an error observation (ToolEnv turns tool exceptions into those)."""
    if not config.unsafe_python:
        sandbox_isolation(config.isolation)

    async def python(code: str) -> str:
        return (await arun_python(code, config)).render()

    return Tool("python",
                f"Run a Python script (no network, {config.timeout_s:g}s, {config.memory_mb} MB) and return "
                "what it printed. Use print() to see values.",
                {"type": "object", "properties": {"code": {"type": "string", "description": "the script"}},
                 "required": ["code"]},
                python)
