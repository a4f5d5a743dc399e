"""Tool calling: Qwen/Hermes `<tool_call>` parsing, tool descriptions, argument checking, and `ToolEnv`."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, get_type_hints

from envs.base import Env, StepResult
from kiln_common.sample import Sample

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list,), "object": (dict,), "null": (type(None),),
}
_PY_TO_JSON = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call: a tool name and its JSON arguments."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolCallError:
    """A `<tool_call>` block that could not be understood, with the reason to show the model."""

    raw: str
    message: str


def _parse_block(body: str) -> ToolCall | ToolCallError:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCallError(body, f"tool call is not valid JSON ({e.msg} at position {e.pos})")
    if not isinstance(obj, dict):
        return ToolCallError(body, f"tool call must be a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ToolCallError(body, 'tool call needs a "name" string')
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models emit the arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return ToolCallError(body, f'"arguments" of {name!r} is a string that is not a JSON object')
    if not isinstance(args, dict):
        return ToolCallError(body, f'"arguments" of {name!r} must be a JSON object, got {type(args).__name__}')
    return ToolCall(name, args)


def parse_tool_calls(text: str) -> list[ToolCall | ToolCallError]:
    """All `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks of a turn, in order."""
    calls: list[ToolCall | ToolCallError] = [_parse_block(m.group(1).strip()) for m in _TOOL_CALL.finditer(text)]
    tail = _TOOL_CALL.sub("", text)
    if "<tool_call>" in tail:
        start = tail.index("<tool_call>")
        calls.append(ToolCallError(tail[start:], "unterminated <tool_call> (missing </tool_call>)"))
    return calls


def check_arguments(parameters: dict[str, Any], arguments: dict[str, Any]) -> str | None:
    """Check arguments against a JSON-schema-like object schema; return the problem, or None if valid."""
    props: dict[str, Any] = parameters.get("properties", {})
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        return f"missing required argument(s) {missing}; expected {sorted(props)}"
    unknown = [k for k in arguments if k not in props]
    if unknown and not parameters.get("additionalProperties", False):
        return f"unknown argument(s) {unknown}; expected {sorted(props)}"
    for key, value in arguments.items():
        spec = props.get(key, {})
        kind = spec.get("type")
        if kind is not None:
            allowed = _JSON_TYPES.get(kind, ())
            ok = isinstance(value, allowed) and not (kind in ("integer", "number") and isinstance(value, bool))
            if not ok:
                return f"argument {key!r} must be {kind}, got {type(value).__name__} {value!r}"
        if "enum" in spec and value not in spec["enum"]:
            return f"argument {key!r} must be one of {spec['enum']}, got {value!r}"
    return None


@dataclass(frozen=True)
class Tool:
    """A function the model may call, with its JSON-schema-like description."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any | Awaitable[Any]]

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", self.name or ""):
            raise ValueError(f"tool name must be an identifier-like string, got {self.name!r}")
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be an object schema, got {self.parameters!r}")

    def schema(self) -> dict[str, Any]:
        """The OpenAI / Qwen function description."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    async def __call__(self, arguments: dict[str, Any]) -> str:
        """Run the tool (sync functions in a worker thread) and return its result as text."""
        if inspect.iscoroutinefunction(self.fn):
            result = await self.fn(**arguments)
        else:
            result = await asyncio.to_thread(self.fn, **arguments)
        return result if isinstance(result, str) else json.dumps(result)


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         params: dict[str, str] | None = None) -> Tool | Callable[[Callable], Tool]:
    """Decorator making a `Tool` from a typed function; `params` maps argument names to descriptions."""

    def build(f: Callable) -> Tool:
        hints = get_type_hints(f)
        props: dict[str, Any] = {}
        required: list[str] = []
        for pname, p in inspect.signature(f).parameters.items():
            json_type = _PY_TO_JSON.get(hints.get(pname))
            if json_type is None:
                raise ValueError(f"tool {f.__name__}: argument {pname!r} needs a type hint among "
                                 f"{[t.__name__ for t in _PY_TO_JSON]}")
            props[pname] = {"type": json_type}
            if params and pname in params:
                props[pname]["description"] = params[pname]
            if p.default is inspect.Parameter.empty:
                required.append(pname)
        doc = description or (inspect.getdoc(f) or "").split("\n")[0]
        return Tool(name or f.__name__, doc, {"type": "object", "properties": props, "required": required}, f)

    return build(fn) if fn is not None else build


def render_tools_prompt(tools: Sequence[Tool]) -> str:
    """Describe the tools for the system prompt, in the Qwen/Hermes `<tools>` convention."""
    lines = "\n".join(json.dumps(t.schema(), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def tool_response(content: str) -> str:
    """Wrap a tool result for the model."""
    return f"<tool_response>\n{content}\n</tool_response>"


def tool_error(message: str) -> str:
    """Wrap a tool error for the model."""
    return f"<tool_response>error: {message}</tool_response>"


@dataclass
class ToolResult:
    """What one tool call produced (for `StepResult.info`)."""

    name: str
    arguments: dict[str, Any]
    output: str
    error: bool = False


class ToolEnv(Env):
    """Dispatches each turn's tool calls to registered tools; a turn without tool calls ends the episode.

    Subclasses override `score(final_text)` for the episode's reward and may pass `final_answer_pattern`
    (a regex) so that a turn matching it ends the episode even if it also contains tool calls.
    """

    def __init__(self, tools: Sequence[Tool], *, final_answer_pattern: str | None = None,
                 max_calls_per_turn: int = 8, instructions: str = ""):
        names = [t.name for t in tools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate tool names {dupes}")
        if max_calls_per_turn < 1:
            raise ValueError(f"max_calls_per_turn must be >= 1, got {max_calls_per_turn}")
        self.tools: dict[str, Tool] = {t.name: t for t in tools}
        self.final_answer = re.compile(final_answer_pattern) if final_answer_pattern else None
        self.max_calls_per_turn = max_calls_per_turn
        self.instructions = instructions
        self.sample: Sample | None = None
        self.history: list[ToolResult] = []

    def system_prompt(self) -> str | None:
        parts = [p for p in (self.instructions, render_tools_prompt(list(self.tools.values())) if self.tools else "")
                 if p]
        return "\n\n".join(parts) or None

    async def reset(self, sample: Sample) -> str:
        self.sample = sample
        self.history = []
        if isinstance(sample.prompt, str):
            return sample.prompt
        return ""

    async def score(self, final_text: str) -> float:
        """Reward of the final answer; 0.0 unless overridden."""
        return 0.0

    async def call(self, item: ToolCall | ToolCallError) -> ToolResult:
        """Run one parsed call; every failure becomes an error result for the model."""
        if isinstance(item, ToolCallError):
            return ToolResult("", {}, item.message, error=True)
        t = self.tools.get(item.name)
        if t is None:
            return ToolResult(item.name, item.arguments,
                              f"unknown tool {item.name!r}; available: {sorted(self.tools)}", error=True)
        problem = check_arguments(t.parameters, item.arguments)
        if problem is not None:
            return ToolResult(item.name, item.arguments, f"{item.name}: {problem}", error=True)
        try:
            return ToolResult(item.name, item.arguments, await t(item.arguments))
        except Exception as e:  # a tool failure is the model's information, not a crash
            return ToolResult(item.name, item.arguments, f"{item.name} failed: {type(e).__name__}: {e}", error=True)

    async def step(self, action_text: str) -> StepResult:
        calls = parse_tool_calls(action_text)
        if not calls or (self.final_answer is not None and self.final_answer.search(action_text)):
            reward = await self.score(action_text)
            return StepResult("", reward, True, {"tool_calls": 0})
        results = [await self.call(c) for c in calls[:self.max_calls_per_turn]]
        self.history.extend(results)
        parts = [tool_error(r.output) if r.error else tool_response(r.output) for r in results]
        if len(calls) > self.max_calls_per_turn:
            parts.append(tool_error(f"{len(calls) - self.max_calls_per_turn} call(s) ignored: at most "
                                    f"{self.max_calls_per_turn} tool calls per turn"))
        return StepResult("\n".join(parts), 0.0, False,
                          {"tool_calls": len(results), "tool_errors": sum(r.error for r in results)})
