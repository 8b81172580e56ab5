"""Canonical forms of activation expressions, and schemas that enumerate spaces of them.

Two expressions are the same function when they agree on fixed probe inputs
(:func:`fingerprint`). :func:`canonical` rewrites an expression bottom-up (identities, constant
folding, sorted arguments of commutative operators) and replaces every subexpression that
computes a one-operator function by that operator (``abs(relu(x))`` → ``relu(x)``).
:func:`expand_schema` enumerates a schema such as ``binary(unary(x),unary(x))`` and keeps one
canonical expression per function, so a space of thousands has no duplicates.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Iterator, Sequence
from functools import lru_cache

import torch

from flexact.nn.expressions import (
    BINARY,
    COMMUTATIVE,
    UNARY,
    ExpressionError,
    Node,
    evaluate,
    format_node,
    parse,
)

__all__ = ["SCHEMAS", "canonical", "canonical_node", "canonical_of_module", "expand_schema",
           "fingerprint", "parse_schema", "spell"]

SCHEMAS: dict[str, str] = {
    "unary": "unary(x)",
    "unary_unary": "unary(unary(x))",
    "binary_unary": "binary(unary(x),unary(x))",
    "binary_unary_x": "binary(unary(x),x)",
    "unary_binary": "unary(binary(unary(x),unary(x)))",
}
"""Named schemas; ``unary`` and ``binary`` are slots filled by every operator of that kind."""

_SLOTS = ("unary", "binary")


def _probe_points() -> torch.Tensor:
    grid = torch.linspace(-6.0, 6.0, 121, dtype=torch.float64)
    far = torch.tensor([10.0, 30.0, 100.0, 1e3, 1e4], dtype=torch.float64)
    return torch.cat([grid, far, -far])


_PROBE = _probe_points()


def fingerprint(expression: str | Node) -> bytes:
    """A key equal for expressions that agree on the probe inputs (to 1e-6), float64."""
    node = parse(expression) if isinstance(expression, str) else expression
    values = torch.broadcast_to(evaluate(node, _PROBE), _PROBE.shape)
    key = torch.round(values * 1e6).to(torch.int64)
    return hashlib.blake2b(key.numpy().tobytes(), digest_size=16).digest()


def canonical_of_module(module: torch.nn.Module) -> str | None:
    """The one-operator expression a module computes (``nn.ReLU()`` → ``relu(x)``), if any.

    Modules with parameters (PReLU, Swish-β) have none: they change shape as they train.
    """
    if any(True for _ in module.parameters()):
        return None
    with torch.no_grad():
        values = module(_PROBE.float()).double()
    if values.shape != _PROBE.shape or not torch.isfinite(values).all():
        return None
    for node in _one_operator_table().values():
        if torch.allclose(values, evaluate(node, _PROBE).float().double(), rtol=1e-5,
                          atol=1e-6):
            return format_node(node)
    return None


def _fold(node: Node) -> Node:
    """Constant-fold a node whose arguments are all constants."""
    value = evaluate(node, torch.zeros((), dtype=torch.float64))
    return float(value)


def _simplify(node: Node) -> Node:
    """One node's rewrite, its arguments already simplified."""
    if not isinstance(node, tuple):
        return node
    name, *args = node
    if name in ("zero", "one"):
        return 0.0 if name == "zero" else 1.0
    if all(isinstance(a, float) for a in args):
        return _fold(node)
    if name == "identity":
        return args[0]
    inner = args[0]
    if name == "neg" and isinstance(inner, tuple) and inner[0] == "neg":
        return inner[1]
    if name == "abs" and isinstance(inner, tuple) and inner[0] in ("abs", "neg"):
        return ("abs", inner[1]) if inner[0] == "neg" else inner
    if len(args) >= 2:
        a, b = args[0], args[1]
        if name == "wadd":
            w = args[2]
            return a if w == 0 or b == 0.0 else ("add", a, b) if w == 1 else node
        rule = _binary_rule(name, a, b)
        if rule is not None:
            return rule
        if name in COMMUTATIVE and format_node(b) < format_node(a):
            return (name, b, a)
    return node


def _binary_rule(name: str, a: Node, b: Node) -> Node | None:
    if a == b:
        same = {"max": a, "min": a, "sub": 0.0}
        if name in same:
            return same[name]
    if name in ("add", "sub") and b == 0.0:
        return a
    if name == "add" and a == 0.0:
        return b
    if name == "sub" and a == 0.0:
        return ("neg", b)
    if (name in ("mul", "div") and b == 1.0) or (name == "mul" and a == 1.0):
        return a if b == 1.0 else b
    if name == "mul" and 0.0 in (a, b):
        return 0.0
    return None


@lru_cache(maxsize=1)
def _one_operator_table() -> dict[bytes, Node]:
    """The simplest one-operator node for each function of that kind."""
    table: dict[bytes, Node] = {}
    nodes: list[Node] = ["x", *((name, "x") for name in UNARY if name not in ("zero", "one"))]
    for node in sorted(nodes, key=lambda n: (len(format_node(n)), format_node(n)), reverse=True):
        table[fingerprint(node)] = node  # shortest last: it wins
    return table


def canonical_node(node: Node) -> Node:
    """The canonical form of a parsed expression (see :func:`canonical`)."""
    if isinstance(node, tuple):
        node = (node[0], *(canonical_node(a) for a in node[1:]))
    node = _simplify(node)
    if isinstance(node, tuple):
        known = _one_operator_table().get(fingerprint(node))
        if known is not None:
            return known
    return node


def spell(node: Node) -> str:
    """Text for a canonical node; a constant function is spelt with ``zero``/``one``."""
    if isinstance(node, float):
        if node == 0.0:
            return "zero(x)"
        return "one(x)" if node == 1.0 else f"mul({format_node(node)},one(x))"
    return format_node(node)


def canonical(expression: str) -> str:
    """The canonical spelling of an expression (see the module docstring).

    Raises:
        ExpressionError: If the expression is malformed.
    """
    return spell(canonical_node(parse(expression)))


def _fill(pattern: Node, unary: Sequence[str], binary: Sequence[Node]) -> Iterator[Node]:
    """Every way of filling the pattern's slots."""
    if not isinstance(pattern, tuple):
        yield pattern
        return
    name, *args = pattern
    choices: Sequence = [name]
    if name == "unary":
        choices = unary
    elif name == "binary":
        choices = binary
    for op in choices:
        for filled in itertools.product(*(list(_fill(a, unary, binary)) for a in args)):
            if isinstance(op, tuple):  # a weighted sum: ("wadd", weight)
                yield ("wadd", *filled, op[1])
            else:
                yield (op, *filled)


def parse_schema(schema: str) -> Node:
    """A schema (a name from :data:`SCHEMAS` or a pattern) parsed, slots as operators."""
    text = SCHEMAS.get(schema, schema)
    if "(" not in text:
        raise ExpressionError(f"unknown schema {schema!r}; named schemas: {', '.join(SCHEMAS)} "
                              "(or write one, e.g. 'binary(unary(x),unary(x))')")
    return parse(text, slots=_SLOTS)


def expand_schema(schema: str, unary: Sequence[str] | None = None,
                  binary: Sequence[str] | None = None, weights: Sequence[float] = (0.1, 0.5),
                  limit: int | None = None, seed: int = 0) -> list[str]:
    """The distinct functions of a schema, one canonical expression each.

    Args:
        schema: A name from :data:`SCHEMAS` or a pattern with ``unary``/``binary`` slots.
        unary: Operators for the unary slots (default: all of them).
        binary: Operators for the binary slots (default: all, and ``wadd``).
        weights: The weights ``w`` of ``wadd(a, b, w)`` in binary slots.
        limit: Keep this many, drawn at random (seeded); all if ``None``.
        seed: Seed of that draw.

    Returns:
        Canonical expressions, sorted (the draw keeps that order).

    Raises:
        ExpressionError: For an unknown schema or operator, or a space with no expression.
    """
    unary = list(UNARY) if unary is None else list(unary)
    binary_names = [*BINARY, "wadd"] if binary is None else list(binary)
    for op in unary:
        if op not in UNARY:
            raise ExpressionError(f"unknown unary operator {op!r}; unary: {', '.join(UNARY)}")
    for op in binary_names:
        if op not in BINARY and op != "wadd":
            raise ExpressionError(f"unknown binary operator {op!r}; binary: "
                                  f"{', '.join(BINARY)}, wadd")
    binary_ops: list[Node] = [op for op in binary_names if op != "wadd"]
    if "wadd" in binary_names:
        binary_ops += [("wadd", float(w)) for w in weights]
    pattern = parse_schema(schema)
    best: dict[bytes, tuple[int, str]] = {}
    for node in _fill(pattern, unary, binary_ops):
        text = spell(canonical_node(node))
        key = fingerprint(text)
        if key not in best or (len(text), text) < best[key]:
            best[key] = (len(text), text)
    found = sorted(text for _, text in best.values())
    if not found:
        raise ExpressionError(f"schema {schema!r} with these operators has no expression")
    if limit is not None and limit < len(found):
        found = sorted(random.Random(seed).sample(found, limit))
    return found
