"""Activation expressions: ``"add(tanh(x),sin(x))"`` is a candidate wherever a name is.

A small grammar of unary and binary operators over the input ``x`` and numeric constants::

    expr   := "x" | NUMBER | UNARY "(" expr ")" | BINARY "(" expr "," expr ")"
              | "wadd" "(" expr "," expr "," NUMBER ")"          # a + w·b

Every operator is numerically safe: for inputs in [-1e4, 1e4] every value and gradient is
finite in float32 and bfloat16, at any depth. Growing operators (``exp``, ``square``, ``cube``,
``mul``, ``div``) saturate at ±:data:`LIMIT`, ``div`` keeps its denominator away from zero and
``sinc`` has no 0/0. :class:`Expression` is the module; it traces, exports to ONNX and compiles
without graph breaks, since its forward is a fixed composition of torch operations.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexact.errors import ConfigError

__all__ = ["BINARY", "LIMIT", "UNARY", "Expression", "ExpressionError", "Node", "format_node",
           "is_expression", "parse"]

LIMIT = 1e6
"""Saturation bound of the growing operators (finite in float32 and bfloat16, squared too)."""
_DIV_EPS = 1e-2  # smallest |denominator| of div: |a/b| ≤ 100·|a| before saturation


def _sat(y: Tensor) -> Tensor:
    return y.clamp(-LIMIT, LIMIT)


def _exp(x: Tensor) -> Tensor:
    return torch.exp(x.clamp(max=13.8))  # e^13.8 ≈ LIMIT: the gradient stays finite too


def _sinc(x: Tensor) -> Tensor:
    small = x.abs() < 1e-3
    safe = torch.where(small, torch.ones_like(x), x)  # no 0/0 in either branch's gradient
    return torch.where(small, 1 - x * x / 6, torch.sin(safe) / safe)


def _div(a: Tensor, b: Tensor) -> Tensor:
    sign = torch.where(b < 0, -torch.ones_like(b), torch.ones_like(b))
    safe = torch.where(b.abs() < _DIV_EPS, sign * _DIV_EPS, b)
    return _sat(a / safe)


UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "neg": torch.neg,
    "abs": torch.abs,
    "square": lambda x: _sat(x.clamp(-1e3, 1e3) ** 2),
    "cube": lambda x: _sat(x.clamp(-1e2, 1e2) ** 3),
    "exp": _exp,
    "log1p_abs": lambda x: torch.log1p(x.abs()),
    "sin": torch.sin,
    "cos": torch.cos,
    "sinc": _sinc,
    "erf": torch.erf,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "elu": F.elu,
    "selu": F.selu,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "silu": F.silu,
    "gelu": F.gelu,
    "hard_sigmoid": F.hardsigmoid,
    "zero": lambda x: x * 0.0,  # constants stay in the graph (zero gradient), as autograd
    "one": lambda x: x * 0.0 + 1.0,  # derivatives of a candidate need
}
"""Unary operators by name (``zero`` and ``one`` are the constant functions 0 and 1)."""

BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": lambda a, b: _sat(a * b),
    "div": _div,
    "max": torch.maximum,
    "min": torch.minimum,
}
"""Binary operators by name; ``wadd(a, b, w)`` (``a + w·b``) is the weighted sum besides."""

COMMUTATIVE = frozenset({"add", "mul", "max", "min"})

Node = str | float | tuple
"""A parsed expression: ``"x"``, a float constant, or ``(operator, *arguments)`` (``wadd``
carries its weight as a float last argument)."""

_TOKEN = re.compile(r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
                    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<punct>[(),]))")


class ExpressionError(ConfigError):
    """A malformed activation expression (the message names the bad token)."""


def operator_list() -> str:
    """The operators, for error messages."""
    return (f"unary: {', '.join(UNARY)}; binary: {', '.join(BINARY)}, wadd(a,b,weight); "
            "leaves: x and numbers")


def is_expression(name: object) -> bool:
    """Whether a candidate name is meant as an expression (it has a call or is ``x``)."""
    return isinstance(name, str) and ("(" in name or name.strip() == "x")


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out, pos = [], 0
    while pos < len(text.rstrip()):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            bad = text[pos:].strip()[:1]
            raise ExpressionError(f"bad token {bad!r} at position {pos} in expression "
                                  f"{text!r}; {operator_list()}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind), match.start(kind)))
        pos = match.end()
    return out


def parse(text: str, slots: tuple[str, ...] = ()) -> Node:
    """Parse an expression into a :data:`Node` tree.

    Args:
        text: The expression.
        slots: Schema slot names also accepted (``unary``: one argument, ``binary``: two).

    Raises:
        ExpressionError: Naming the bad token and its position, and listing the operators.
    """
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(f"an expression must be a non-empty string, got {text!r}")
    tokens = _tokens(text)
    node, end = _parse_at(text, tokens, 0, slots)
    if end != len(tokens):
        raise ExpressionError(f"unexpected {tokens[end][1]!r} at position {tokens[end][2]} "
                              f"after a complete expression in {text!r}")
    return node


def _expect(text: str, tokens: list, i: int, want: str) -> int:
    if i >= len(tokens):
        raise ExpressionError(f"expression {text!r} ends early: expected {want!r}")
    if tokens[i][1] != want:
        raise ExpressionError(f"bad token {tokens[i][1]!r} at position {tokens[i][2]} in "
                              f"{text!r}: expected {want!r}")
    return i + 1


def _parse_at(text: str, tokens: list, i: int, slots: tuple[str, ...]) -> tuple[Node, int]:
    if i >= len(tokens):
        raise ExpressionError(f"expression {text!r} ends early: expected an argument")
    kind, value, pos = tokens[i]
    if kind == "num":
        return float(value), i + 1
    if kind != "name":
        raise ExpressionError(f"bad token {value!r} at position {pos} in {text!r}: expected "
                              f"x, a number or an operator; {operator_list()}")
    if value == "x":
        return "x", i + 1
    arities = {"unary": 1, "binary": 2}
    arity = (1 if value in UNARY else 2 if value in BINARY else 3 if value == "wadd"
             else arities.get(value, 0) if value in slots else 0)
    if not arity:
        raise ExpressionError(f"bad token {value!r} at position {pos} in {text!r}: unknown "
                              f"operator; {operator_list()}")
    i = _expect(text, tokens, i + 1, "(")
    args: list[Node] = []
    for k in range(arity):
        if k:
            i = _expect(text, tokens, i, ",")
        arg, i = _parse_at(text, tokens, i, slots)
        args.append(arg)
    if value == "wadd" and not isinstance(args[2], float):
        raise ExpressionError(f"wadd's third argument must be a number (the weight) in {text!r}")
    i = _expect(text, tokens, i, ")")
    return (value, *args), i


def _number(value: float) -> str:
    text = f"{value:.6g}"
    return text if text != "-0" else "0"


def format_node(node: Node) -> str:
    """The expression's text in the standard spelling (no spaces, numbers as ``%.6g``)."""
    if isinstance(node, str):
        return node
    if isinstance(node, float):
        return _number(node)
    return f"{node[0]}({','.join(format_node(a) for a in node[1:])})"


def evaluate(node: Node, x: Tensor) -> Tensor:
    """The expression's value at ``x`` (element-wise)."""
    if isinstance(node, str):
        return x
    if isinstance(node, float):
        return x * 0.0 + node
    name = node[0]
    if name in UNARY:
        return UNARY[name](evaluate(node[1], x))
    if name == "wadd":
        return evaluate(node[1], x) + node[3] * evaluate(node[2], x)
    return BINARY[name](evaluate(node[1], x), evaluate(node[2], x))


class Expression(nn.Module):
    """An activation built from an expression, e.g. ``Expression("add(tanh(x),sin(x))")``.

    Args:
        expression: The expression text (see :mod:`flexact.nn.expressions`).

    Raises:
        ExpressionError: If the expression is malformed.
    """

    def __init__(self, expression: str) -> None:
        super().__init__()
        self.tree = parse(expression)
        self.expression = format_node(self.tree)

    def forward(self, x: Tensor) -> Tensor:
        return evaluate(self.tree, x)

    def extra_repr(self) -> str:
        return repr(self.expression)
