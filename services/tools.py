"""Tools for multi-turn RL: Python functions offered to the model, called in a sandbox.

A tool is a function with type hints and a Google-style docstring; its JSON schema is derived
from them (transformers' `get_json_schema`, the form chat templates render from `tools=`).
The model calls a tool by writing, in its turn, exactly one

    <tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>

(`rlfleet.common.bpe` makes both tags single tokens). `ToolBox.call` runs it in a separate,
pre-started process under a time limit and an address-space limit (`services/sandbox.py`).
Nothing a call does can crash the rollout: an unparseable call, an unknown tool, wrong
arguments, a timeout, a crash or an exception each become an error observation for the
model (`ToolResult.error` names the kind, for the run's tool-error rate).
"""

from __future__ import annotations

import ast
import json
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rlfleet.services.sandbox import ProcessWorkers, import_path

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
ERROR_KINDS = ("unparseable", "unknown_tool", "bad_arguments", "timeout", "crashed", "error")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolResult:
    """The observation text for the model; `error` is one of ERROR_KINDS, or None."""

    text: str
    error: str | None = None


def tool_schema(fn: Callable) -> dict[str, Any]:
    """The chat-template schema of `fn` ({"type": "function", "function": {name, description,
    parameters}}); a missing docstring or type hint raises, naming the function."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as err:  # transformers' own errors name the argument
        raise ValueError(f"tool {getattr(fn, '__name__', fn)!r} cannot be offered to the model: {err}") from err


def find_tool_call(text: str) -> ToolCall | ToolResult | None:
    """The tool call in a model turn: None (no call: a final answer), the call, or an
    `unparseable` error result."""
    found = TOOL_CALL.search(text)
    if found is None:
        return ToolResult("error (unparseable): an unclosed <tool_call>", "unparseable") if "<tool_call>" in text \
            else None
    try:
        body = json.loads(found.group(1))
    except json.JSONDecodeError as err:
        return ToolResult(f"error (unparseable): the call is not JSON ({err.msg})", "unparseable")
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) \
            or not isinstance(body.get("arguments", {}), dict):
        return ToolResult('error (unparseable): expected {"name": ..., "arguments": {...}}', "unparseable")
    return ToolCall(body["name"], body.get("arguments", {}))


class ToolBox:
    """The tools of a run (`package.module:function` paths) and the processes that run them."""

    def __init__(self, paths: Sequence[str], timeout_s: float = 5.0, memory_mb: int | None = 512,
                 processes: int = 1):
        self._paths = {}
        self.schemas = []
        for path in paths:
            schema = tool_schema(import_path(path))
            self._paths[schema["function"]["name"]] = path
            self.schemas.append(schema)
        self._params = {s["function"]["name"]: s["function"]["parameters"] for s in self.schemas}
        self._timeout_s = timeout_s
        self._workers = ProcessWorkers(list(paths), processes, memory_mb=memory_mb, name="tool")

    def call(self, call: ToolCall) -> ToolResult:
        path = self._paths.get(call.name)
        if path is None:
            return ToolResult(f"error (unknown_tool): no tool named {call.name!r}; tools: {', '.join(self._paths)}",
                              "unknown_tool")
        params = self._params[call.name]
        names = list(params.get("properties", {}))
        missing = [n for n in params.get("required", []) if n not in call.arguments]
        extra = [n for n in call.arguments if n not in names]
        if missing or extra:
            return ToolResult(f"error (bad_arguments): {call.name} takes {names}; missing {missing}, unknown {extra}",
                              "bad_arguments")
        args = tuple(call.arguments[n] for n in names if n in call.arguments)
        status, value = self._workers.run(path, [args], self._timeout_s)[0]
        if status == "ok":
            return ToolResult(str(value))
        if status == "timeout":
            return ToolResult(f"error (timeout): {call.name} took longer than {self._timeout_s:g} s", "timeout")
        if status == "crashed":
            return ToolResult(f"error (crashed): {call.name} stopped its process ({value})", "crashed")
        return ToolResult(f"error: {value}", "error")

    def run_turn(self, text: str) -> ToolResult | None:
        """The observation for a model turn: None when it calls no tool."""
        found = find_tool_call(text)
        return self.call(found) if isinstance(found, ToolCall) else found

    def close(self) -> None:
        self._workers.close()


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod, ast.USub: operator.neg}


def calculator(expression: str) -> str:
    """Evaluate an integer arithmetic expression.

    Args:
        expression: integers with + - * // % and parentheses, e.g. "12*(3+4)".
    """

    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and abs(node.value) < 10**12:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError(f"not integer arithmetic: {ast.unparse(node)!r}")

    return str(value(ast.parse(expression, mode="eval").body))
