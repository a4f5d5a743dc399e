"""A safe arithmetic evaluator (Python's `ast`, numbers and a few math functions only) and its tool."""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable

from envs.tools import Tool, tool

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 1000
MAX_RESULT_DIGITS = 400

_BINARY: dict[type, Callable] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.BitXor: operator.pow,  # `^` is power, as on calculators
}
_UNARY: dict[type, Callable] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_FUNCTIONS: dict[str, Callable] = {
    "sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
    "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "floor": math.floor, "ceil": math.ceil,
}


class CalculatorError(ValueError):
    """The expression is not plain arithmetic or cannot be computed."""


def _check_size(value: int | float) -> int | float:
    if isinstance(value, int) and abs(value).bit_length() > MAX_RESULT_DIGITS * 3.33:
        raise CalculatorError(f"result has more than {MAX_RESULT_DIGITS} digits")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not a finite number")
    return value


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return node.value
        raise CalculatorError(f"only numbers are allowed, got {node.value!r}")
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if type(node.op) in (ast.Pow, ast.BitXor) and abs(right) > MAX_EXPONENT:
            raise CalculatorError(f"exponent {right} is larger than {MAX_EXPONENT}")
        try:
            return _check_size(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise CalculatorError("division by zero") from None
        except OverflowError:
            raise CalculatorError("result is too large") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise CalculatorError(f"unknown name {node.id!r}; constants are {sorted(_CONSTANTS)}")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        fn = _FUNCTIONS.get(node.func.id)
        if fn is None:
            raise CalculatorError(f"unknown function {node.func.id!r}; functions are {sorted(_FUNCTIONS)}")
        try:
            return _check_size(fn(*[_eval(a) for a in node.args]))
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, CalculatorError):
                raise
            raise CalculatorError(f"{node.func.id}: {e}") from None
    raise CalculatorError(f"unsupported syntax {type(node).__name__}: only numbers, + - * / // % ** ^, "
                          f"parentheses, {sorted(_CONSTANTS)} and {sorted(_FUNCTIONS)} are allowed")


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def evaluate(expression: str) -> int | float:
    """Evaluate an arithmetic expression without executing any code; raise `CalculatorError` if not arithmetic."""
    if not isinstance(expression, str) or not expression.strip():
        raise CalculatorError("expression is empty")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression.strip().replace("×", "*").replace("÷", "/").replace("−", "-")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"cannot parse {_short(expression)!r}: {e.msg}") from None
    except RecursionError:
        raise CalculatorError("expression is nested too deeply") from None
    try:
        return _eval(tree)
    except RecursionError:
        raise CalculatorError("expression is nested too deeply") from None


def format_number(value: int | float) -> str:
    """Integers exactly; floats to 12 significant digits, without a trailing '.0'."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".12g")
    return str(value)


@tool(params={"expression": "an arithmetic expression, e.g. '(12 + 7) * 3 / 2' or 'sqrt(2) ^ 3'"})
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return the number."""
    return format_number(evaluate(expression))


CALCULATOR: Tool = calculator
