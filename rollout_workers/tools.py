"""Tools the student may call during a rollout: the plug-in interface, call parsing, the safe calculator.

Owns parsing Hermes/Qwen-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
blocks out of generated text, running a call with a time limit (a failing,
slow or unknown tool becomes an error string the model reads, never an
exception), loading plug-ins by `module:attribute`, and the built-in
`calculator` (arithmetic through an AST whitelist: no names beyond a few
math functions, no attributes, bounded exponents). The multi-turn loop that
feeds the answers back as tokens is in `episode.py`.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rollout_workers.plugins import import_attribute

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ToolError(ValueError):
    """A tool was misconfigured (bad plug-in spec) or given bad arguments; the message is shown to the model."""


@dataclass(frozen=True)
class Tool:
    """A callable the model may use: `fn(arguments) -> str`. `parameters` is a JSON schema for the template."""

    name: str
    description: str
    fn: Callable[[dict[str, Any]], Any]
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def spec(self) -> dict[str, Any]:
        """The OpenAI-style function spec chat templates render."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    error: str | None = None  # set when the block could not be parsed


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every `<tool_call>` block in `text`, in order; malformed ones carry an `error` for the model."""
    calls = []
    for body in _TOOL_CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as exc:
            calls.append(ToolCall("?", {}, f"tool call is not valid JSON ({exc.msg})"))
            continue
        name, args = (obj.get("name"), obj.get("arguments", {})) if isinstance(obj, dict) else (None, None)
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(name, str) or not isinstance(args, dict):
            calls.append(ToolCall(str(name), {}, 'tool call needs {"name": string, "arguments": object}'))
            continue
        calls.append(ToolCall(name, args))
    return calls


# ---------------------------------------------------------------------------------------------- calculator

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt,
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "floor": math.floor,
    "ceil": math.ceil,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "factorial": math.factorial,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
_MAX_EXPRESSION_CHARS = 256
_MAX_EXPONENT = 512
_MAX_MAGNITUDE = 10**100


def _check_magnitude(value: Any) -> Any:
    if isinstance(value, int | float) and abs(value) > _MAX_MAGNITUDE:
        raise ToolError("result too large (limit 1e100)")
    return value


def _eval_node(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval_node(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise ToolError(f"exponent {right} too large (limit {_MAX_EXPONENT})")
        return _check_magnitude(_BINARY[type(node.op)](left, right))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        args = [_eval_node(a) for a in node.args]
        if node.func.id == "factorial" and (not args or args[0] > 170):
            raise ToolError("factorial argument too large (limit 170)")
        return _check_magnitude(_FUNCTIONS[node.func.id](*args))
    raise ToolError(
        f"unsupported expression element {ast.dump(node)[:60]}; use numbers, + - * / // % **, "
        f"parentheses and {', '.join(sorted(_FUNCTIONS))}"
    )


def safe_eval(expression: str) -> int | float:
    """Evaluate an arithmetic expression without `eval`: a whitelist over the parsed AST."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.replace("^", "**"), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"cannot parse {expression!r}: {exc.msg}") from None
    try:
        return _eval_node(tree.body)
    except (ZeroDivisionError, OverflowError, ValueError, TypeError) as exc:
        raise ToolError(f"{type(exc).__name__}: {exc}") from None


def _calculator(arguments: dict[str, Any]) -> str:
    expression = arguments.get("expression")
    if not isinstance(expression, str):
        raise ToolError('calculator needs {"expression": "<arithmetic>"}')
    value = safe_eval(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    return str(value)


CALCULATOR = Tool(
    "calculator",
    "Evaluate an arithmetic expression exactly (numbers, + - * / // % **, "
    "parentheses, sqrt, log, exp, sin, cos, tan, floor, ceil, factorial, pi, e).",
    _calculator,
    {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
)
BUILTIN_TOOLS = {"calculator": CALCULATOR}


def load_tool(spec: str) -> Tool:
    """`calculator`, or `module:attribute` naming a Tool or a function `fn(arguments: dict) -> str`."""
    if spec in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[spec]
    obj = import_attribute(
        spec, kind="tool", builtins=", ".join(BUILTIN_TOOLS), flag="--tools-enabled", error=ToolError
    )
    attr = spec.partition(":")[2]
    if isinstance(obj, Tool):
        return obj
    if callable(obj):
        return Tool(attr, (obj.__doc__ or attr).strip().splitlines()[0], obj)
    raise ToolError(f"tool {spec!r} is neither a Tool nor a function")


class ToolBox:
    """The tools of one worker; runs calls with a time limit and turns every failure into text."""

    def __init__(self, tools: dict[str, Tool], timeout_s: float = 5.0) -> None:
        self.tools, self.timeout_s = tools, timeout_s

    @classmethod
    def from_specs(cls, specs: list[str], timeout_s: float = 5.0) -> ToolBox:
        tools = [load_tool(s) for s in specs]
        return cls({t.name: t for t in tools}, timeout_s)

    def specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self.tools.values()]

    async def run(self, call: ToolCall) -> tuple[str, bool]:
        """(answer text, ok). A thread that overruns the limit is abandoned, not killed: keep tools bounded."""
        if call.error:
            return f"error: {call.error}", False
        tool = self.tools.get(call.name)
        if tool is None:
            return f"error: unknown tool {call.name!r}; available: {', '.join(sorted(self.tools))}", False
        try:
            result = await asyncio.wait_for(asyncio.to_thread(tool.fn, call.arguments), self.timeout_s)
        except TimeoutError:
            return f"error: {call.name} timed out after {self.timeout_s:g} s", False
        except Exception as exc:  # noqa: BLE001 - a plug-in's failure is the model's feedback, not ours
            return f"error: {exc}", False
        return str(result), True
