"""Tool calling: parsing (incl. malformed), argument checks, ToolEnv, calculator, Python executor, BM25."""

import json
import math
import re

import pytest

from envs import BM25Index, CalculatorError, ToolCall, ToolCallError, ToolEnv, evaluate, parse_tool_calls, tool
from envs.calculator import calculator, format_number
from envs.python_executor import PythonExecutorConfig, python_tool, run_python
from envs.retrieval import retrieval_tool, tokenize
from envs.tools import check_arguments

# ---------------------------------------------------------------- parsing


def test_parse_several_calls_in_order():
    text = ('I will compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>'
            ' and <tool_call>{"name": "search", "arguments": "{\\"query\\": \\"gout\\"}"}</tool_call>')
    assert parse_tool_calls(text) == [ToolCall("calculator", {"expression": "1+2"}),
                                      ToolCall("search", {"query": "gout"})]
    assert parse_tool_calls("no calls here") == []
    assert parse_tool_calls('<tool_call>{"name": "noargs"}</tool_call>') == [ToolCall("noargs", {})]


@pytest.mark.parametrize("block, message", [
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "1+2"}</tool_call>', "not valid JSON"),
    ("<tool_call>[1, 2]</tool_call>", "must be a JSON object, got list"),
    ('<tool_call>{"arguments": {}}</tool_call>', 'needs a "name" string'),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', '"arguments" of \'f\' must be a JSON object'),
    ('<tool_call>{"name": "f", "arguments": "nope"}</tool_call>', "string that is not a JSON object"),
    ('<tool_call>{"name": "f", "arguments": {}}', "unterminated <tool_call>"),
])
def test_parse_malformed_calls_become_errors(block, message):
    (call,) = parse_tool_calls(block)
    assert isinstance(call, ToolCallError) and message in call.message


@pytest.mark.parametrize("args, problem", [
    ({"a": 1}, "missing required argument(s) ['b']"),
    ({"a": 1, "b": "x", "c": 3}, "unknown argument(s) ['c']"),
    ({"a": "1", "b": "x"}, "argument 'a' must be integer, got str"),
    ({"a": True, "b": "x"}, "argument 'a' must be integer, got bool"),
    ({"a": 1, "b": "z"}, "argument 'b' must be one of ['x', 'y']"),
    ({"a": 1, "b": "y"}, None),
])
def test_check_arguments(args, problem):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "enum": ["x", "y"]}},
              "required": ["a", "b"]}
    result = check_arguments(schema, args)
    assert result == problem if problem is None else problem in result


def test_tool_decorator_builds_schema():
    @tool(params={"city": "a city name"})
    def weather(city: str, days: int = 1) -> str:
        """Forecast for a city.

        More text that is not the description."""
        return f"{city}:{days}"

    assert weather.schema() == {"type": "function", "function": {
        "name": "weather", "description": "Forecast for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "a city name"},
                                                        "days": {"type": "integer"}}, "required": ["city"]}}}
    with pytest.raises(ValueError, match="argument 'x' needs a type hint"):
        tool(lambda x: x)


class _Env(ToolEnv):
    async def score(self, final_text):
        return 0.5


def _raise(x: int) -> str:
    raise RuntimeError("disk on fire")


async def test_tool_env_reports_every_error_as_observation_and_continues():
    env = _Env([calculator, tool(_raise, name="explode")])
    turn = ('<tool_call>{"name": "calculator", "arguments": {"expression": "6*7"}}</tool_call>'
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'
            '<tool_call>{"name": "explode", "arguments": {"x": 1}}</tool_call>'
            '<tool_call>{not json}</tool_call>')
    r = await env.step(turn)
    parts = r.observation.split("\n<tool_response>")
    assert not r.done and r.info == {"tool_calls": 6, "tool_errors": 5}
    assert parts[0] == "<tool_response>\n42\n</tool_response>"
    assert "error: unknown tool 'nope'; available: ['calculator', 'explode']" in parts[1]
    assert "error: calculator: missing required argument(s) ['expression']" in parts[2]
    assert "error: calculator failed: CalculatorError: division by zero" in parts[3]
    assert "error: explode failed: RuntimeError: disk on fire" in parts[4]
    assert "error: tool call is not valid JSON" in parts[5]
    final = await env.step("The answer is 42.")
    assert final.done and final.reward == 0.5


async def test_tool_env_limits_calls_per_turn_and_final_pattern():
    env = ToolEnv([calculator], max_calls_per_turn=2, final_answer_pattern=r"FINAL")
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "1+1"}}</tool_call>'
    r = await env.step(call * 3)
    assert r.observation.count("<tool_response>\n2\n</tool_response>") == 2
    assert "1 call(s) ignored: at most 2 tool calls per turn" in r.observation
    assert (await env.step(call + " FINAL")).done
    with pytest.raises(ValueError, match="duplicate tool names"):
        ToolEnv([calculator, calculator])

# ---------------------------------------------------------------- calculator


@pytest.mark.parametrize("expression, expected", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2 ^ 10", 1024), ("2 ** 0.5", math.sqrt(2)), ("-3 // 2", -2),
    ("7 % 3", 1), ("10 / 4", 2.5), ("sqrt(16) + abs(-2)", 6.0), ("max(3, 9, 4)", 9), ("pi * 2", 2 * math.pi),
    ("12 × 3 ÷ 4", 9.0), ("123456789 * 987654321", 121932631112635269),
])
def test_calculator_matches_python_math(expression, expected):
    assert evaluate(expression) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('ls')", "unsupported syntax Call"), ("__import__('os')", "unknown function '__import__'"),
    ("open('x')", "unknown function 'open'"), ("x + 1", "unknown name 'x'"),
    ("(1).__class__", "unsupported syntax Attribute"), ("'a' * 3", "only numbers are allowed"),
    ("[1, 2]", "unsupported syntax List"), ("lambda: 1", "unsupported syntax Lambda"),
    ("1 / 0", "division by zero"), ("9 ** 9 ** 9", "exponent 387420489 is larger than 1000"),
    ("10 ** 999", "more than 400 digits"), ("1 +", "cannot parse"), ("", "expression is empty"),
    ("sqrt(-1)", "sqrt: math domain error"), ("(" * 240 + "1" + ")" * 240, "too many nested parentheses"),
    ("True + 1", "only numbers are allowed"), ("10.0 ** 400", "result is too large"),
])
def test_calculator_rejects_non_arithmetic(expression, message):
    with pytest.raises(CalculatorError, match=re.escape(message)):
        evaluate(expression)


def test_format_number():
    assert [format_number(v) for v in (3, 2.0, 0.1 + 0.2, 1e20, -1.5)] == ["3", "2", "0.3", "1e+20", "-1.5"]

# ---------------------------------------------------------------- python executor

FAST = PythonExecutorConfig(timeout_s=2.0, memory_mb=256)


def test_python_runs_in_temp_dir_and_returns_output():
    r = run_python("import os, sys\nprint(sum(range(10)))\nprint('warn', file=sys.stderr)\nprint(os.listdir('.'))",
                   FAST)
    assert r.ok and r.stdout.splitlines()[0] == "45" and r.stderr == "warn\n"
    assert r.stdout.splitlines()[1] == "['main.py']"  # a fresh, private working directory


def test_python_wall_time_limit_kills():
    r = run_python("import time\nprint('start', flush=True)\ntime.sleep(60)", PythonExecutorConfig(timeout_s=0.5))
    assert r.timed_out and r.returncode is None and r.stdout == "start\n"
    assert r.render().startswith("timed out (killed)")


def test_python_memory_limit():
    r = run_python("x = bytearray(1024 ** 3)\nprint('allocated')", FAST)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout


@pytest.mark.parametrize("code, expected", [
    ("import socket\nsocket.socket()", "PermissionError: network access is disabled"),
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))", "PermissionError: network access is disabled"),
    ("import _socket\n_socket.socket()", "PermissionError: network access is disabled"),
    ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9')", "network access is disabled"),
    ("import ctypes", "ModuleNotFoundError: import of ctypes halted"),
    ("import subprocess\nsubprocess.run(['true'])", "PermissionError: starting processes is disabled"),
    ("import os\nos.system('true')", "PermissionError: starting processes is disabled"),
])
def test_python_network_and_processes_blocked(code, expected):
    r = run_python(code, FAST)
    assert r.returncode == 1 and expected in r.stderr, r.stderr


def test_python_crash_and_output_truncation_reported():
    r = run_python("def f():\n    raise KeyError('missing')\nf()", FAST)
    assert r.returncode == 1 and "KeyError: 'missing'" in r.stderr and r.render().startswith("exit code 1")
    segv = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", FAST)
    assert segv.returncode == -11 and segv.render().startswith("killed by signal SIGSEGV")
    big = run_python("print('x' * 10000)", PythonExecutorConfig(max_output_chars=100))
    assert len(big.stdout) < 200 and "characters truncated" in big.stdout


async def test_python_tool_through_tool_env():
    env = ToolEnv([python_tool(FAST)])
    r = await env.step('<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>')
    assert r.observation == "<tool_response>\nexit code 0\nstdout:\n42\n\n</tool_response>"


def test_python_config_validation():
    with pytest.raises(ValueError, match="memory_mb must be >= 64"):
        PythonExecutorConfig(memory_mb=1)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        PythonExecutorConfig(timeout_s=0)

# ---------------------------------------------------------------- BM25

CORPUS = [
    "Gout is an inflammatory arthritis caused by uric acid crystals in a joint, often the big toe.",
    "Appendicitis causes pain that starts near the navel and moves to the right lower abdomen.",
    "Migraine headaches are throbbing, one-sided and come with nausea and sensitivity to light.",
    "Tension headaches feel like a tight band around the head.",
    "Uric acid levels can be normal during an acute gout attack.",
]


def _reference_bm25(query, docs, k1=1.5, b=0.75):
    toks = [tokenize(d) for d in docs]
    n, avg = len(docs), sum(map(len, toks)) / len(docs)
    scores = []
    for t in toks:
        s = 0.0
        for q in tokenize(query):
            df = sum(q in d for d in toks)
            tf = t.count(q)
            if tf:
                idf = math.log((n - df + 0.5) / (df + 0.5) + 1)
                s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(t) / avg))
        scores.append(s)
    return scores


def test_bm25_scores_match_reference_and_rank():
    index = BM25Index(CORPUS)
    for query in ("gout uric acid", "headache with nausea", "right lower abdomen pain", "tight band head"):
        ref = _reference_bm25(query, CORPUS)
        assert [index.score(query, i) for i in range(len(CORPUS))] == pytest.approx(ref, rel=1e-12)
        hits = index.search(query, k=5)
        assert [h.doc_id for h in hits] == [str(i) for i in sorted(range(5), key=lambda i: (-ref[i], i))
                                            if ref[i] > 0]
    assert [h.doc_id for h in index.search("gout uric acid", k=2)] == ["4", "0"]  # shorter doc, same terms
    assert index.search("headache nausea", k=1)[0].doc_id == "2"
    assert index.search("zebra", k=3) == []


def test_bm25_from_jsonl_and_tool(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"d{i}", "title": f"Doc {i}", "text": t})
                              for i, t in enumerate(CORPUS)) + "\n")
    index = BM25Index.from_jsonl(path)
    assert index.ids == [f"d{i}" for i in range(5)] and index.documents[1].startswith("Doc 1\nAppendicitis")
    out = retrieval_tool(index, k=1).fn("navel pain")
    assert out.startswith("[d1] Doc 1\nAppendicitis")
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "text": "ok"}\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string 'text' field"):
        BM25Index.from_jsonl(tmp_path / "bad.jsonl")
