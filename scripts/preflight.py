"""Preflight of the device scripts on the CPU: every `python` / `python3` command that scripts/*_gpu.sh,
scripts/gpu_tests.sh and scripts/*_check.sh would run on the device, checked here before a device call.

    .venv/bin/python scripts/preflight.py                        # every device script, as its header documents it
    .venv/bin/python scripts/preflight.py scripts/fp8_gpu.sh     # one script
    .venv/bin/python scripts/preflight.py 'SKIP_TESTS=1 BENCH_ARGS="--shape qwen3-8b" bash scripts/gpu_check.sh'

Each script passes `bash -n`, and under `set -u` uses no variable that is neither set nor given a default. Then bash
dry-runs it with scripts/preflight_stubs.sh as BASH_ENV: the script's own logic runs (defaults, loops, branches,
`set -u`), what needs the device is a stand-in, and each python command is recorded with its file and line. Every
run the script's header documents (`[VAR=value ...] bash scripts/<it>.sh [args]`) is dry-run too. One Python process
then checks every recorded command:
- `-m pytest ...`: pytest collects (--collect-only) with the script's arguments; each file or node id named must
  exist and select a test (`-m gpu` tests are collected on the CPU, they skip only when run);
- `-m module ...` / `path.py ...`: the module is found, imported and run as __main__ until its argparse parser has
  parsed the script's arguments (ArgumentParser.parse_args is wrapped to stop there, before any work);
- `train.py ...` / `-m orchestrator.driver ...`: the driver's own parsing and config resolution (the --config YAML
  and every check made before Ray starts), a model folder that only the device makes standing in as a placeholder;
- `-c CODE` / `python3 - <<EOF`: the code compiles.
Problems are printed as FILE:LINE: message; the exit code is 1 if there is any.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUBS = REPO / "scripts" / "preflight_stubs.sh"
DEVICE_SCRIPTS = ("*_gpu.sh", "gpu_tests.sh", "*_check.sh")
DRY_RUN_TIMEOUT_S = 30
CHECK_TIMEOUT_S = 300
# names a device script may use without setting them: bash's own, and PYTHONPATH (exported by .whl/install.sh,
# which scripts/device_env.sh sources)
KNOWN_VARIABLES = {"SECONDS", "PIPESTATUS", "RANDOM", "LINENO", "BASH_SOURCE", "BASH_LINENO", "FUNCNAME", "BASHPID",
                   "HOME", "PWD", "OLDPWD", "PATH", "UID", "EUID", "HOSTNAME", "IFS", "PPID", "OPTARG", "OPTIND",
                   "REPLY", "PYTHONPATH"}
PYTHON_OPTIONS_WITH_VALUE = {"-W", "-X"}
# the driver's flags that name an HF model folder (config.json checked before Ray starts): a folder missing here is
# taken to be made on the device by an earlier step of the script, and a placeholder stands in for it
MODEL_FOLDER_FLAGS = ("hf-checkpoint", "ref-checkpoint", "opd-teacher-load", "critic-load")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Run:
    """One way of calling a device script: `[VAR=value ...] bash SCRIPT [args]`."""
    script: Path
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        words = [f"{k}={shlex.quote(v)}" for k, v in self.env] + ["bash", _rel(self.script)]
        return " ".join(words + [shlex.quote(a) for a in self.args])

    @property
    def on_device(self) -> bool:
        """False for a script's CPU variant (`--cpu`), which runs here with .venv's python."""
        return "--cpu" not in self.args


@dataclass
class Job:
    """One distinct python command to check, and where the scripts run it."""
    kind: str          # pytest, module, path, driver, code
    target: str        # module name, file path, or the code
    args: list[str]
    cwd: str
    shown: str         # the command as a person reads it
    where: list[tuple[str, int, Run]]


def _rel(path: Path | str) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def device_scripts() -> list[Path]:
    """The scripts a device call runs (`bash scripts/X.sh`)."""
    return sorted({p for pattern in DEVICE_SCRIPTS for p in (REPO / "scripts").glob(pattern)})


def parse_command(text: str) -> Run:
    """'A=1 B="x y" bash scripts/x.sh --cpu' (a `source scripts/device_env.sh;` before it is dropped) as a Run."""
    text = text.split(";")[-1] if "bash " in text.split(";")[-1] else text
    words = shlex.split(text)
    if len(words) == 1 and words[0].endswith(".sh"):
        words = ["bash", words[0]]
    if "bash" not in words:
        raise ValueError(f"{text!r}: expected [VAR=value ...] bash scripts/X.sh [args]")
    at = words.index("bash")
    env = []
    for word in words[:at]:
        name, eq, value = word.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise ValueError(f"{text!r}: {word!r} before `bash` is not VAR=value")
        env.append((name, value))
    script = Path(words[at + 1])
    return Run(script if script.is_absolute() else REPO / script, tuple(words[at + 2:]), tuple(env))


def documented_runs(script: Path) -> list[Run]:
    """The bare call, and each `[VAR=value ...] bash scripts/<script>.sh [args]` in the script's comment lines."""
    runs = [Run(script)]
    name = re.escape(script.name)
    pattern = re.compile(r"((?:[A-Za-z_]\w*=(?:'[^']*'|\"[^\"]*\"|[^\s'\";]*)\s+)*)bash\s+scripts/" + name
                         + r"((?:[ \t]+[^\s\"';#)]+)*)")
    for line in script.read_text().splitlines():
        if not line.lstrip().startswith("#"):
            continue
        for m in pattern.finditer(line):
            run = parse_command(f"{m.group(1)}bash {_rel(script)}{m.group(2)}")
            if run not in runs:
                runs.append(run)
    return runs


def syntax_problems(script: Path) -> list[Problem]:
    """`bash -n`: the script parses."""
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    return [Problem(_rel(script), int(m.group(1)), m.group(2))
            for m in re.finditer(r"line (\d+): (.*)", done.stderr)] or (
        [Problem(_rel(script), 0, done.stderr.strip() or "bash -n failed")] if done.returncode else [])


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of the script without comments and here-document bodies."""
    lines, heredoc = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if heredoc is not None:
            if line.strip() == heredoc:
                heredoc = None
            continue
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m:
            heredoc = m.group(1)
        lines.append((number, re.sub(r"(^|\s)#.*$", "", line)))
    return lines


def unset_variable_problems(script: Path) -> list[Problem]:
    """Under `set -u`: names used bare ($X, ${X}, in $(( ))) that the script (or what it sources) never sets and
    never gives a default (${X:-...}) -- each would stop the script on the device."""
    text = script.read_text()
    if not re.search(r"^\s*set\s+(-\w*u|-o\s+nounset)", text, re.M):
        return []
    sources = [text] + [(REPO / m.group(1)).read_text()
                        for m in re.finditer(r"^\s*(?:source|\.)\s+(scripts/\S+\.sh)", text, re.M)
                        if (REPO / m.group(1)).is_file()]
    code = [line for src in sources for _, line in _code_lines(src)]
    joined = "\n".join(code)
    known = set(KNOWN_VARIABLES)
    known |= set(re.findall(r"(?:^|[\s;(&|{])([A-Za-z_]\w*)(?:\[[^]]*\])?\+?=", joined, re.M))
    known |= set(re.findall(r"\bfor\s+([A-Za-z_]\w*)\s+in\b", joined))
    known |= set(re.findall(r"\bread\s+(?:-\w+\s+)*([A-Za-z_]\w*)", joined))
    known |= set(re.findall(r"\$\{([A-Za-z_]\w*)(?:\[[^]]*\])?:?[-=+?]", joined))   # given a default somewhere
    problems, seen = [], set()
    for number, line in _code_lines(text):
        used = re.findall(r"\$([A-Za-z_]\w*)|\$\{[#!]?([A-Za-z_]\w*)(?:\[[^]]*\])?\}", line)
        names = [a or b for a, b in used]
        for body in re.findall(r"\(\((.*?)\)\)", line):   # arithmetic: bare names
            names += re.findall(r"(?<![\w$])([A-Za-z_]\w*)", body)
        for name in names:
            if name not in known and name not in seen:
                seen.add(name)
                problems.append(Problem(_rel(script), number,
                                        f"${name} is used under `set -u` but never set and has no default "
                                        f"(${{{name}:-...}})"))
    return problems


def _records(log: Path) -> list[tuple[str, str, int, str, list[str]]]:
    """(kind, file, line, cwd, fields) of the stubs' records."""
    if not log.exists():
        return []
    out = []
    for record in log.read_bytes().decode(errors="replace").split("\x01")[1:]:
        parts = record.split("\0")
        kind, file, line, cwd, argc = parts[:5]
        out.append((kind, file, int(line or 0), cwd, parts[5:5 + int(argc)]))
    return out


def dry_run(run: Run, tmp: Path) -> tuple[list[tuple[str, int, str, str, str, list[str]]], list[Problem]]:
    """Run the script under the stubs: ([(file, line, cwd, interpreter, stdin code, args)], problems bash met)."""
    tmp.mkdir(parents=True, exist_ok=True)
    out, log, guard = tmp.parent / "out", tmp / "calls", tmp.parent / "bin"   # $OUT: one for all runs, so that
    out.mkdir(exist_ok=True)                                                 # their commands compare equal
    guard.mkdir(exist_ok=True)
    for name in ("python", "python3"):   # a python started other than through the stubs (env, xargs, ...)
        exe = guard / name
        exe.write_text('#!/bin/sh\necho "preflight: $0 $* was started outside the stubs" >&2\nexit 97\n')
        exe.chmod(0o755)
    env = {"PATH": f"{guard}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(tmp),
           "LANG": "C.UTF-8", "OUT": str(out), "BASH_ENV": str(STUBS), "KILN_PREFLIGHT_LOG": str(log),
           "KILN_PREFLIGHT_TMP": str(tmp.parent), **dict(run.env)}
    script = _rel(run.script)
    try:
        done = subprocess.run(["bash", script, *run.args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=DRY_RUN_TIMEOUT_S)
        stderr = done.stderr
    except subprocess.TimeoutExpired:
        return [], [Problem(script, 0, f"the dry run ({run}) did not end in {DRY_RUN_TIMEOUT_S} s")]
    problems = []
    for m in re.finditer(r"^(.+?): line (\d+): (.*)$", stderr, re.M):
        unbound = re.match(r"(\w+): unbound variable", m.group(3))
        line = _source_line(m.group(1), int(m.group(2)), unbound.group(1)) if unbound else int(m.group(2))
        problems.append(Problem(m.group(1), line, f"bash: {m.group(3)}"))
    problems += [Problem(script, 0, line.strip()) for line in stderr.splitlines() if line.startswith("preflight: ")]
    calls = []
    for kind, file, line, cwd, fields in _records(log):
        if kind == "note":   # from a stub: "<command>: what is wrong"
            problems.append(Problem(file, _source_line(file, line, fields[0].split(":")[0]), fields[0]))
        else:
            calls.append((file, line, cwd, fields[1], fields[0], fields[2:]))
    return calls, problems


def classify(interpreter: str, args: list[str], code: str, cwd: str) -> tuple[str, str, list[str]]:
    """(kind, target, arguments) of one python command line."""
    i = 0
    while i < len(args) and args[i].startswith("-") and args[i] not in ("-m", "-c", "-"):
        i += 2 if args[i] in PYTHON_OPTIONS_WITH_VALUE else 1
    if i >= len(args):
        return "code", "", []   # reads a program from stdin: nothing to check here
    if args[i] == "-m" and i + 1 < len(args):
        module, rest = args[i + 1], args[i + 2:]
        kind = {"pytest": "pytest", "orchestrator.driver": "driver"}.get(module, "module")
        return kind, module, rest
    if args[i] == "-c" and i + 1 < len(args):
        return "code", args[i + 1], []
    if args[i] == "-":
        return "code", code, []
    path = Path(cwd, args[i])
    kind = "driver" if path.resolve() == (REPO / "train.py").resolve() else "path"
    return kind, str(path), args[i + 1:]


def _needle(args: list[str]) -> str:
    """The word of a python command line that its source line shows: the module, the file, -c, or the heredoc."""
    if "-m" in args[:-1]:
        return args[args.index("-m") + 1]
    words = [a for a in args if not a.startswith("-") or a in ("-c", "-")]
    first = words[0] if words else "python"
    return "<<" if first == "-" else first


def _source_line(file: str, line: int, needle: str) -> int:
    """`line`, or the nearest line within 3 that shows `needle` where `line` does not: bash's line numbers run one
    short after a subshell ending in a function call, piped, inside an if / { } block (bash 5.2; `(cd X && f) | g`)."""
    path = Path(file) if Path(file).is_absolute() else REPO / file
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return line
    for candidate in (line, line + 1, line - 1, line + 2, line - 2, line + 3, line - 3):
        if 0 < candidate <= len(lines) and needle in lines[candidate - 1]:
            return candidate
    return line


def collect_jobs(runs: list[Run], tmp: Path) -> tuple[list[Job], list[Problem]]:
    """Dry-run each run; the distinct python commands they reach, and the problems of the shell side (each once:
    a problem a script's bare run met is not repeated for its documented runs, which are named otherwise)."""
    jobs: dict[tuple, Job] = {}
    problems: dict[Problem, Run] = {}
    for number, run in enumerate(runs):
        calls, found = dry_run(run, tmp / f"run{number}")
        for file, line, cwd, interpreter, code, args in calls:
            if run.on_device and "/" in interpreter:
                found.append(Problem(file, line, f"runs {interpreter}: the device's copy of the tree has no "
                                                 f"{interpreter} (an ignored folder, not carried); use python3 "
                                                 f"(scripts/device_env.sh puts the tree on PYTHONPATH)"))
            kind, target, rest = classify(interpreter, args, code, cwd)
            line = _source_line(file, line, _needle(args))
            shown = " ".join([interpreter, *(shlex.quote(a) for a in args)])
            shown = shown if len(shown) <= 110 else shown[:107] + "..."
            key = (kind, target, tuple(rest), cwd if kind == "path" else "")
            job = jobs.setdefault(key, Job(kind, target, list(rest), cwd, shown, []))
            if (file, line) not in [(f, n) for f, n, _ in job.where]:   # another run reached the same line
                job.where.append((file, line, run))
        for problem in found:
            problems.setdefault(problem, run)
    return list(jobs.values()), [_named(p, run) for p, run in problems.items()]


def _named(problem: Problem, run: Run) -> Problem:
    """The problem, with the run that met it named unless that is the script's bare run."""
    return problem if run == Run(run.script) else Problem(problem.file, problem.line, f"{problem.message} [{run}]")


def check_jobs(jobs: list[Job], tmp: Path, log=None) -> list[Problem]:
    """Check every job in one Python process (this file's --check-jobs); a Problem per failure and place."""
    todo = tmp / "jobs.json"
    results = tmp / "results.json"
    todo.write_text(json.dumps([{"kind": j.kind, "target": j.target, "args": j.args, "cwd": j.cwd} for j in jobs]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline",
           "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    try:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--check-jobs", str(todo), str(results)],
                              cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [Problem(_rel(__file__), 0, f"the checking process did not end in {CHECK_TIMEOUT_S} s (a command "
                                           f"that started its work?)")]
    if done.returncode or not results.exists():
        return [Problem(_rel(__file__), 0, f"the checking process failed (rc {done.returncode}): "
                                           f"{done.stderr.strip()[-2000:]}")]
    problems = []
    for job, message in zip(jobs, json.loads(results.read_text())):
        if log is not None:
            places = ", ".join(f"{file}:{line}" for file, line, _ in job.where)
            log(f"{'FAIL' if message else 'ok'} {job.kind:7} {job.shown} ({places})")
        if message:
            for file, line, run in job.where:
                problems.append(_named(Problem(file, line, f"{job.shown}: {message}"), run))
    return problems


def preflight(runs: list[Run] | None = None, log=None) -> list[Problem]:
    """Every problem of the given runs (default: every device script, bare and as its header documents it); `log`
    (print, say) gets a line per run and per command checked."""
    if runs is None:
        runs = [run for script in device_scripts() for run in documented_runs(script)]
    problems, broken = [], set()
    for script in dict.fromkeys(run.script for run in runs):
        found = syntax_problems(script)
        problems += found or unset_variable_problems(script)
        broken |= {script} if found else set()
    runs = [run for run in runs if run.script not in broken]   # a script bash cannot parse is not dry-run
    with tempfile.TemporaryDirectory(prefix="kiln_preflight_") as tmp:
        if log is not None:
            for run in runs:
                log(f"run     {run}")
        jobs, found = collect_jobs(runs, Path(tmp))
        problems += found + check_jobs(jobs, Path(tmp), log)
    return list(dict.fromkeys(problems))


# ---- the checking process: imports the project, so it runs apart from the caller -------------------------------

class _Parsed(BaseException):
    """Raised where a command's arguments have been parsed: the command stops there, before its work."""

    def __init__(self, result: object):
        super().__init__()
        self.result = result


def _placeholder_model(tmp: Path) -> str:
    """An HF model folder as the driver checks one before loading it (config.json), for a folder the device makes."""
    folder = tmp / "placeholder-model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return str(folder)


def _error_line(text: str) -> str:
    """The last `error:` line of argparse / the driver (and its hint), else the last non-empty line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if "error:" in lines[i] or lines[i].startswith("ERROR"):
            hint = lines[i + 1] if i + 1 < len(lines) and lines[i + 1].startswith("hint:") else ""
            return " ".join(filter(None, [lines[i], hint]))
    return lines[-1] if lines else ""


def _nested(job: dict, namespace: argparse.Namespace, tmp: Path) -> list[tuple[str, dict]]:
    """Arguments a command hands on to another parser later in its run: (label, job) to check as well."""
    if job["target"] == "examples.medical_multiagent.experiment":   # warm_main([folder, *--warm-args.split()])
        return [("--warm-args", {"kind": "module", "target": "examples.medical_multiagent.warm_start",
                                 "args": [str(tmp / "warm"), *namespace.warm_args.split()], "cwd": job["cwd"]}),
                ("--config", {"kind": "driver-yaml", "target": str(Path(job["cwd"], namespace.config)), "args": [],
                              "cwd": job["cwd"]})]
    return []


def _run_main(job: dict, tmp: Path) -> str:
    """'' if the command's parser takes its arguments, else why not (argparse's error line, an import error...)."""
    import importlib.util
    import runpy

    kind, target, cwd = job["kind"], job["target"], Path(job["cwd"])
    if "/" not in target:   # a module name (a file's target is its path)
        try:
            spec = importlib.util.find_spec(target)
        except ImportError as e:
            spec, why = None, str(e)
        else:
            why = f"no module named {target!r}"
        if spec is None or not spec.origin:
            return why
        source_file, path = Path(spec.origin), None
    else:
        source_file = path = Path(cwd, target)
        if not path.is_file():
            return f"{_rel(path)}: no such file"
    if kind != "driver" and "parse_args" not in source_file.read_text():
        return f"{_rel(source_file)} has no argparse parse_args to check the arguments against (not run)"

    original_parse, patched = argparse.ArgumentParser.parse_args, []
    if kind == "driver":
        import orchestrator.driver as driver

        resolve = driver.resolve

        def stop_after_resolve(values):
            values = dict(values)
            for flag in MODEL_FOLDER_FLAGS:   # a folder an earlier step makes on the device
                if isinstance(values.get(flag), str) and values[flag] and not Path(values[flag]).exists():
                    values[flag] = _placeholder_model(tmp)
            raise _Parsed(resolve(values))

        driver.resolve = stop_after_resolve
        patched.append(lambda: setattr(driver, "resolve", resolve))
    else:
        def stop_after_parse(self, args=None, namespace=None):
            raise _Parsed(original_parse(self, args, namespace))

        argparse.ArgumentParser.parse_args = stop_after_parse
        patched.append(lambda: setattr(argparse.ArgumentParser, "parse_args", original_parse))
    saved_argv, saved_path, saved_cwd = sys.argv[:], sys.path[:], os.getcwd()
    captured = io.StringIO()
    try:
        os.chdir(cwd)
        sys.argv = [str(source_file), *job["args"]]
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            if path is None:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                sys.path.insert(0, str(path.parent))
                runpy.run_path(str(path), run_name="__main__")
        return "ran to its end without parsing its arguments"
    except _Parsed as parsed:
        if kind != "module" or not isinstance(parsed.result, argparse.Namespace):
            return ""
        for label, nested in _nested(job, parsed.result, tmp):
            for p in patched[::-1]:
                p()
            patched.clear()
            message = _check_one(nested, tmp)
            if message:
                return f"{label}: {nested['target']}: {message}"
        return ""
    except SystemExit as e:
        return _error_line(captured.getvalue()) or f"exited ({e.code}) before its arguments were parsed"
    except Exception as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    finally:
        for p in patched[::-1]:
            p()
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(saved_cwd)


class _Collected:
    """pytest plugin: the selected items, the collection errors and the positional arguments."""

    def __init__(self):
        self.items: list[str] = []
        self.errors: list[str] = []
        self.args: list[str] = []
        self.rootdir = Path(".")
        self.markexpr = ""

    def pytest_collectreport(self, report):
        if report.failed:
            self.errors.append(f"{report.nodeid}: {_error_line(str(report.longrepr))}")

    def pytest_collection_finish(self, session):
        self.items = [item.nodeid for item in session.items]
        self.args = list(session.config.args)
        self.rootdir = Path(session.config.rootpath)
        self.markexpr = session.config.option.markexpr


def _check_pytest(job: dict) -> str:
    """'' if pytest collects with the script's arguments and every file / node id named selects a test."""
    import pytest

    args = list(job["args"]) + ["--collect-only"]
    if "no:cacheprovider" not in args:
        args += ["-p", "no:cacheprovider"]
    plugin, captured = _Collected(), io.StringIO()
    saved_cwd = os.getcwd()
    try:
        os.chdir(job["cwd"])
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            rc = pytest.main(args, plugins=[plugin])
    finally:
        os.chdir(saved_cwd)
    if plugin.errors:
        return "collection error: " + "; ".join(plugin.errors)
    if rc not in (0, 5):
        return f"pytest exited {int(rc)}: {_error_line(captured.getvalue())}"
    empty = []
    for arg in plugin.args:
        file, _, rest = arg.partition("::")
        prefix = os.path.relpath(Path(job["cwd"], file).resolve(), plugin.rootdir) + (f"::{rest}" if rest else "")
        if not any(item == prefix or item.startswith((prefix + "::", prefix + "[", prefix + "/"))
                   for item in plugin.items):
            empty.append(_rel(Path(job["cwd"], file)) + (f"::{rest}" if rest else ""))
    if empty or rc == 5:
        by = f" with -m {plugin.markexpr!r}" if plugin.markexpr else ""
        return f"selects no test{by}: {', '.join(empty) or 'all'}"
    return ""


def _check_one(job: dict, tmp: Path) -> str:
    """'' if the job is fine, else one line saying what is wrong."""
    if job["kind"] == "code":
        try:
            compile(job["target"], "<python code>", "exec")
        except SyntaxError as e:
            return f"SyntaxError: {e.msg} (line {e.lineno} of the code)"
        return ""
    if job["kind"] == "driver-yaml":
        from orchestrator.cli import load_yaml
        from orchestrator.driver import CONFIG_CLASSES

        try:
            load_yaml(job["target"], CONFIG_CLASSES)
        except Exception as e:
            return str(e)
        return ""
    if job["kind"] == "pytest":
        return _check_pytest(job)
    return _run_main(job, tmp)


def _check_jobs_main(todo: Path, results: Path) -> None:
    """The checking process: one line (or '') per job of `todo`, written to `results` as JSON."""
    import warnings

    warnings.simplefilter("ignore")
    jobs = json.loads(todo.read_text())
    messages = [""] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="kiln_preflight_check_") as tmp:
        order = sorted(range(len(jobs)), key=lambda i: jobs[i]["kind"] == "pytest")   # pytest's imports last
        for i in order:
            try:
                messages[i] = _check_one(jobs[i], Path(tmp))
            except BaseException as e:   # noqa: BLE001 - one command's failure is its line, the others go on
                messages[i] = f"the check itself failed: {type(e).__name__}: {e}".splitlines()[0]
    results.write_text(json.dumps(messages))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="scripts (scripts/x.sh) or command lines ('A=1 bash scripts/x.sh ...'); "
                                             "default: every device script, bare and as its header documents it")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every run and every command checked")
    ap.add_argument("--check-jobs", nargs=2, metavar=("JOBS", "RESULTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.check_jobs:
        _check_jobs_main(Path(args.check_jobs[0]), Path(args.check_jobs[1]))
        return 0
    runs = None
    if args.runs:
        runs = []
        for text in args.runs:
            try:
                run = parse_command(text)
            except ValueError as e:
                ap.error(str(e))
            runs += documented_runs(run.script) if text.strip().endswith(".sh") and " " not in text.strip() else [run]
    problems = preflight(runs, log=print if args.verbose else None)
    for problem in problems:
        print(problem)
    n_runs = len(runs) if runs is not None else "all"
    print(f"preflight: {len(problems)} problem(s) ({n_runs} runs)" if problems else "preflight: OK", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
