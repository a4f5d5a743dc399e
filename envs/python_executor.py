"""Run model-written Python in a separate, limited process: wall time, memory, output size, no network.

The child is the current interpreter in isolated mode (`-I`) in a fresh temporary directory, with
resource limits set before exec (address space, CPU seconds, file size, process count) and a prelude
that disables sockets, `ctypes` and process spawning at the Python level. This keeps honest mistakes
(infinite loops, huge allocations, accidental downloads) contained; it is not a security boundary
against hostile code -- run untrusted code inside a container as well.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from envs.tools import Tool

_PRELUDE = r'''
import sys

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
            setattr(_mod, _name, _KilnNoSocket if _name in ("socket", "SocketType") else _kiln_blocked("network access"))
for _name in ("ctypes", "_ctypes"):
    sys.modules[_name] = None
import os, _posixsubprocess
_posixsubprocess.fork_exec = _kiln_blocked("starting processes")
for _name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "execv", "execve", "execvp",
              "execvpe", "execl", "execle", "execlp", "execlpe", "spawnv", "spawnve", "spawnl", "spawnle"):
    if hasattr(os, _name):
        setattr(os, _name, _kiln_blocked("starting processes"))
del _mod, _name, _socket, socket, os, _posixsubprocess, _KilnNoSocket, _kiln_blocked
import runpy
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
'''


@dataclass(frozen=True)
class PythonExecutorConfig:
    """Limits of one execution."""

    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output_chars: int = 4000
    max_file_mb: int = 16

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.memory_mb < 64:
            raise ValueError(f"memory_mb must be >= 64 (the interpreter needs it to start), got {self.memory_mb}")
        if self.max_output_chars < 1:
            raise ValueError(f"max_output_chars must be >= 1, got {self.max_output_chars}")
        if self.max_file_mb < 1:
            raise ValueError(f"max_file_mb must be >= 1, got {self.max_file_mb}")


@dataclass(frozen=True)
class ExecutionResult:
    """What the child printed and how it ended."""

    stdout: str
    stderr: str
    returncode: int | None  # None if it was killed for running past the time limit
    timed_out: bool
    wall_s: float

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
        parts = [status]
        if self.stdout:
            parts.append(f"stdout:\n{self.stdout}")
        if self.stderr:
            parts.append(f"stderr:\n{self.stderr}")
        return "\n".join(parts)


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit // 2
    return f"{text[:head]}\n... [{len(text) - limit} characters truncated] ...\n{text[len(text) - (limit - head):]}"


def _limits(config: PythonExecutorConfig):
    memory = config.memory_mb * 2**20
    cpu = int(config.timeout_s) + 1
    file_bytes = config.max_file_mb * 2**20

    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))  # effective for non-root users

    return apply


def run_python(code: str, config: PythonExecutorConfig = PythonExecutorConfig()) -> ExecutionResult:
    """Run `code` as a script in a limited child process and return its (truncated) output."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    with tempfile.TemporaryDirectory(prefix="kiln-py-") as tmp:
        root = Path(tmp)
        work = root / "work"  # the script's cwd and HOME; the output files live outside it
        work.mkdir()
        (work / "main.py").write_text(code)
        env = {"PATH": os.defpath, "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "no_proxy": "*", "http_proxy": "http://0.0.0.0:9",
               "https_proxy": "http://0.0.0.0:9"}
        start = time.monotonic()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _PRELUDE], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    preexec_fn=_limits(config), start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=config.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        wall = time.monotonic() - start
        stdout = (root / "stdout").read_bytes().decode("utf-8", errors="replace")
        stderr = (root / "stderr").read_bytes().decode("utf-8", errors="replace")
    return ExecutionResult(_truncate(stdout, config.max_output_chars), _truncate(stderr, config.max_output_chars),
                           None if timed_out else proc.returncode, timed_out, wall)


async def arun_python(code: str, config: PythonExecutorConfig = PythonExecutorConfig()) -> ExecutionResult:
    """`run_python` without blocking the event loop."""
    return await asyncio.to_thread(run_python, code, config)


def python_tool(config: PythonExecutorConfig = PythonExecutorConfig()) -> Tool:
    """A `python` tool that runs a script and returns its exit status, stdout and stderr."""

    async def python(code: str) -> str:
        return (await arun_python(code, config)).render()

    return Tool("python",
                f"Run a Python script (no network, {config.timeout_s:g}s, {config.memory_mb} MB) and return "
                "what it printed. Use print() to see values.",
                {"type": "object", "properties": {"code": {"type": "string", "description": "the script"}},
                 "required": ["code"]},
                python)
