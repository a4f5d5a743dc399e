"""The device scripts' preflight (scripts/preflight.py) on the CPU: every python command of scripts/*_gpu.sh,
scripts/gpu_tests.sh and scripts/*_check.sh -- bare and as each script's header documents its runs -- finds its
module or file, parses its arguments with the command's own parser (the driver's config resolution for train.py),
and names pytest files and node ids that collect; each script passes `bash -n` and uses no unset variable under
`set -u`. A script of known mistakes checks that each is found, with its line."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_preflight():
    spec = importlib.util.spec_from_file_location("kiln_preflight", REPO / "scripts" / "preflight.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


preflight = _load_preflight()
SCRIPTS = preflight.device_scripts()

# One mistake of each kind, on known lines (the if / subshell / pipe of line 14 makes bash's own line numbers run one
# short afterwards: the lines below must still be the source's).
BAD = """\
#!/usr/bin/env bash
# A device script with one mistake of each kind the preflight finds.
#   run(command="SKIP_A=1 bash scripts/bad_gpu.sh")
set -u
OUT=${OUT:-/tmp/kiln_bad}
source scripts/device_env.sh
timeout 100 python3 -m benchmarks.engine_throughput --shape qwen3-8b --decode-batchs 1,64 2>&1 | tee "$OUT/a.log"
python3 -m pytest -m gpu tests/test_fp8_gpu.py::test_no_such_test -q -p no:cacheprovider
python3 -m pytest -m gpu tests/test_import_rules.py -q
python3 -m benchmarks.no_such_module --x
PY=${PY:-.venv/bin/python}
"$PY" -m benchmarks.trainer_memory --shape qwen3-0.6b
if [ "${SKIP_A:-0}" != 1 ]; then
  (cd /made/on/the/device && python3 -m benchmarks.trainer_memory --shape qwen3-0.6b) 2>&1 | tee "$OUT/b.log"
fi
python3 train.py --config examples/quickstart/config.yaml --prompt-data x.jsonl --hf-checkpoint /made/on/device \\
  --use-opd --opd-type engine
python3 -m examples.medical_multiagent.experiment "$OUT/m" --warm-args "--stepz 3"
python3 - "$OUT" <<'EOF'
print("no closing parenthesis"
EOF
timeout "${LIMIT:-}" python3 -m benchmarks.trainer_memory --shape qwen3-0.6b
python3 -m benchmarks.trainer_memory --dp "$DP"
"""
EXPECTED = [  # (line, what the message says)
    (7, "engine_throughput.py: error: unrecognized arguments: --decode-batchs 1,64"),
    (8, "ERROR: not found: " + str(REPO / "tests/test_fp8_gpu.py::test_no_such_test")),
    (9, "selects no test with -m 'gpu': tests/test_import_rules.py"),
    (10, "no module named 'benchmarks.no_such_module'"),
    (12, "runs .venv/bin/python: the device's copy of the tree has no .venv/bin/python"),
    (16, "train.py: error: --use-opd --opd-type engine needs one teacher"),
    (18, "--warm-args: examples.medical_multiagent.warm_start: warm_start.py: error: unrecognized arguments: --stepz"),
    (19, "SyntaxError: '(' was never closed"),
    (22, "timeout: invalid time interval ''"),
    (23, "$DP is used under `set -u` but never set and has no default"),
    (23, "bash: DP: unbound variable"),
]
BROKEN = "#!/usr/bin/env bash\nset -u\nif true; then\n  python3 -m benchmarks.trainer_memory --shape qwen3-0.6b\n"


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    """The preflight's problems of every device script and of the two bad scripts, in one run (one checking
    process): {script: [Problem]}."""
    folder = tmp_path_factory.mktemp("scripts")
    (folder / "bad_gpu.sh").write_text(BAD)
    (folder / "broken_gpu.sh").write_text(BROKEN)
    runs = [run for script in [*SCRIPTS, folder / "bad_gpu.sh", folder / "broken_gpu.sh"]
            for run in preflight.documented_runs(script)]
    found = preflight.preflight(runs)
    by_file: dict[str, list] = {}
    for problem in found:
        by_file.setdefault(Path(problem.file).name, []).append(problem)
    return by_file


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_device_script_preflight(problems, script):
    """Each device script's python commands find their module / file, parse their arguments and collect their tests."""
    mine = problems.get(script.name, [])
    assert not mine, f"{script.name}: fix before a device call:\n" + "\n".join(map(str, mine))


def test_no_problem_in_a_sourced_file(problems):
    """What the scripts source (scripts/device_env.sh) is fine too."""
    names = {s.name for s in SCRIPTS} | {"bad_gpu.sh", "broken_gpu.sh"}
    other = [p for file, found in problems.items() if file not in names for p in found]
    assert not other, "\n".join(map(str, other))


def test_preflight_finds_each_mistake_on_its_line(problems):
    """The bad script: each known mistake is one problem on its source line, named; nothing else is reported."""
    found = [(p.line, p.message) for p in problems["bad_gpu.sh"]]
    for line, text in EXPECTED:
        assert [m for n, m in found if n == line and text in m], f"line {line}: {text!r} not reported in {found}"
    assert len(found) == len(EXPECTED), "\n".join(f"{n}: {m}" for n, m in found)
    assert all(p.file.endswith("bad_gpu.sh") for p in problems["bad_gpu.sh"])


def test_preflight_reports_a_script_bash_cannot_parse(problems):
    """`bash -n` first: an unclosed `if` is its one problem (the script is not dry-run)."""
    [problem] = problems["broken_gpu.sh"]
    assert problem.line == 5 and "syntax error" in problem.message


def test_parse_command_and_documented_runs(tmp_path):
    """A device call's command line, and the runs a script's header documents (plus the bare call)."""
    run = preflight.parse_command('source scripts/device_env.sh; A=1 B="x y" bash scripts/gpu_check.sh --cpu')
    assert run == preflight.Run(REPO / "scripts/gpu_check.sh", ("--cpu",), (("A", "1"), ("B", "x y")))
    assert not run.on_device and str(run) == "A=1 B='x y' bash scripts/gpu_check.sh --cpu"
    script = tmp_path / "x_gpu.sh"
    script.write_text(textwrap.dedent("""\
        # run(kind="nvidia-h100-x2", command="source scripts/device_env.sh; LIMIT_S=590 bash scripts/x_gpu.sh")
        #   bash scripts/x_gpu.sh --cpu     # on CPU
        # (SKIP_KILN=1 LIMIT_S=590 gives TRL a call of its own); BENCH_ARGS='--a 1' bash scripts/other.sh
        echo bash scripts/x_gpu.sh
        """))
    Run = preflight.Run
    assert preflight.documented_runs(script) == [Run(script), Run(script, (), (("LIMIT_S", "590"),)),
                                                 Run(script, ("--cpu",))]


def test_python_calls_in_the_background_are_recorded_whole(tmp_path):
    """Device scripts start python processes side by side (`&`, e.g. medical_gpu.sh's seeds and arms); each stub
    call writes its record under a lock, so none interleaves with another's (before the lock, a record could be cut
    into another and the dry run failed to parse, about one run in three of medical_gpu.sh with PARALLEL=arms)."""
    script = REPO / "scripts" / f"_background_probe_{tmp_path.name}_gpu.sh"
    long = "x" * 6000  # long enough that a record takes more than one write
    script.write_text("#!/usr/bin/env bash\n" + "".join(
        f"python3 -c 'print({i})' {long} {i} &\n" for i in range(64)) + "wait\n")
    try:
        calls, found = preflight.dry_run(preflight.Run(script), tmp_path / "run")
    finally:
        script.unlink()
    assert found == []
    assert sorted(int(args[-1]) for *_, args in calls) == list(range(64))
    assert all(args[-2] == long for *_, args in calls)
