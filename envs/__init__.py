"""Kiln environments: the agent-environment plugin API and built-in environments."""

from envs.base import Env, EnvError, StepResult, call_guarded, run_reset, run_step
from envs.registry import ENTRY_POINT_GROUP, available, make, register, resolve
from envs.tools import (Tool, ToolCall, ToolCallError, ToolEnv, check_arguments, parse_tool_calls,
                        render_tools_prompt, tool)
from envs.calculator import CALCULATOR, CalculatorError, evaluate
from envs.arithmetic import ArithmeticEnv, arithmetic_samples
from envs.python_executor import (ExecutionResult, PythonExecutorConfig, SandboxUnavailableError, python_tool,
                                  run_python, sandbox_isolation)
from envs.retrieval import BM25Index, SearchHit, retrieval_tool

__all__ = [
    "Env", "EnvError", "StepResult", "call_guarded", "run_reset", "run_step",
    "ENTRY_POINT_GROUP", "available", "make", "register", "resolve",
    "Tool", "ToolCall", "ToolCallError", "ToolEnv", "check_arguments", "parse_tool_calls", "render_tools_prompt",
    "tool", "CALCULATOR", "CalculatorError", "evaluate", "ArithmeticEnv", "arithmetic_samples",
    "ExecutionResult", "PythonExecutorConfig", "SandboxUnavailableError", "python_tool", "run_python",
    "sandbox_isolation",
    "BM25Index", "SearchHit", "retrieval_tool",
]
