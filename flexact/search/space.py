"""The search space: a schema's slots, its distinct functions, and the grammar's mutator.

A schema such as ``binary(unary(x),unary(x))`` has slots (here three, in pre-order); a trial's
expression is the schema filled with one operator per slot, in canonical form. Optuna's
samplers see the slots as categorical parameters ``slot0``, ``slot1``, ...; evolution mutates
one operator of a parent.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flexact.nn.canonical import (
    canonical,
    canonical_node,
    expand_schema,
    fingerprint,
    parse_schema,
    spell,
)
from flexact.nn.expressions import BINARY, UNARY, ExpressionError, Node, parse

__all__ = ["Mutator", "SearchSpace", "grammar_mutator"]

Mutator = Callable[[Sequence[tuple[str, float]], random.Random], Sequence[str]]
"""Proposes child expressions from parents and their scores (lower is better): the plug-in
point of evolution (an LLM client can be one: any callable with this signature)."""


def _slots(node: Node) -> list[str]:
    if not isinstance(node, tuple):
        return []
    own = [node[0]] if node[0] in ("unary", "binary") else []
    return own + [kind for arg in node[1:] for kind in _slots(arg)]


@dataclass
class SearchSpace:
    """A schema with the operators allowed in its slots.

    Args:
        schema: A named schema or a pattern with ``unary``/``binary`` slots.
        unary: Operators of the unary slots (default: all).
        binary: Operators of the binary slots (default: all, with ``wadd:0.1`` and
            ``wadd:0.5`` for the weighted sums).
    """

    schema: str = "binary_unary"
    unary: Sequence[str] | None = None
    binary: Sequence[str] | None = None
    pattern: Node = field(init=False)
    kinds: list[str] = field(init=False)
    slots_of: dict[str, list[str]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.unary = list(UNARY) if self.unary is None else list(self.unary)
        self.binary = ([*BINARY, "wadd:0.1", "wadd:0.5"] if self.binary is None
                       else list(self.binary))
        for op in self.unary:
            if op not in UNARY:
                raise ExpressionError(f"unknown unary operator {op!r}; unary: {', '.join(UNARY)}")
        for op in self.binary:
            if op not in BINARY and not op.startswith("wadd:"):
                raise ExpressionError(f"unknown binary operator {op!r}; binary: "
                                      f"{', '.join(BINARY)}, wadd:<weight>")
        self.pattern = parse_schema(self.schema)
        self.kinds = _slots(self.pattern)
        if not self.kinds:
            raise ExpressionError(f"schema {self.schema!r} has no unary/binary slot to search")
        if any(not self.choices(i) for i in range(len(self.kinds))):
            raise ExpressionError(f"schema {self.schema!r} with these operators has no valid "
                                  "expression (a slot has no operator)")

    def choices(self, slot: int) -> list[str]:
        """The operators slot ``slot`` may hold."""
        return list(self.unary if self.kinds[slot] == "unary" else self.binary)  # type: ignore

    def expression(self, values: Sequence[str]) -> str:
        """The canonical expression of the schema filled with ``values`` (pre-order)."""
        it = iter(values)

        def fill(node: Node) -> Node:
            if not isinstance(node, tuple):
                return node
            if node[0] not in ("unary", "binary"):
                return (node[0], *(fill(a) for a in node[1:]))
            op = next(it)  # pre-order: the slot before its arguments, as in _slots
            rest = tuple(fill(a) for a in node[1:])
            if op.startswith("wadd:"):
                return ("wadd", *rest, float(op.split(":", 1)[1]))
            return (op, *rest)

        text = self.representative(spell(canonical_node(fill(self.pattern))))
        self.slots_of.setdefault(text, list(values))
        return text

    def representative(self, text: str) -> str:
        """The space's own spelling of ``text``'s function, if the space has it.

        Fingerprint-equal spellings such as ``mul(relu(x),relu(x))`` and ``mul(relu(x),x)``
        are one function, evaluated once.
        """
        return self._representatives().get(fingerprint(text), text)

    def _representatives(self) -> dict[bytes, str]:
        if not hasattr(self, "_table"):
            self._table = {fingerprint(f): f for f in self.functions()}
        return self._table

    def functions(self) -> list[str]:
        """Every distinct function of the space, canonical and sorted."""
        plain = [b for b in self.binary if not b.startswith("wadd:")]  # type: ignore
        weights = [float(b.split(":", 1)[1]) for b in self.binary if b.startswith("wadd:")]  # type: ignore
        return expand_schema(self.schema, self.unary, plain + (["wadd"] if weights else []),
                             weights=weights or (0.1,))

    def random_slots(self, rng: random.Random) -> list[str]:
        return [rng.choice(self.choices(i)) for i in range(len(self.kinds))]


def _mutate_tree(node: Node, rng: random.Random, unary: Sequence[str],
                 binary: Sequence[str]) -> Node:
    """Replace the operator of one node (chosen uniformly) by another of its arity."""
    paths: list[tuple[int, ...]] = []

    def collect(n: Node, path: tuple[int, ...]) -> None:
        if isinstance(n, tuple):
            paths.append(path)
            for i, a in enumerate(n[1:], 1):
                collect(a, (*path, i))

    collect(node, ())
    if not paths:
        return (rng.choice(list(unary)), node)
    target = rng.choice(paths)

    def rebuild(n: Node, path: tuple[int, ...]) -> Node:
        if not path:
            ops = [o for o in (unary if n[0] in UNARY else binary) if o != n[0]
                   and not o.startswith("wadd:")] or [n[0]]
            return (rng.choice(ops), *n[1:]) if n[0] != "wadd" else n
        i = path[0]
        return (*n[:i], rebuild(n[i], path[1:]), *n[i + 1:])

    return rebuild(node, target)


def grammar_mutator(space: SearchSpace) -> Mutator:
    """The built-in mutator: change one operator of the best parent.

    Parents from this space are mutated in their slots (the child stays in the space); other
    expressions (from a plug-in mutator, say) in their parse tree.
    """

    def mutate(parents: Sequence[tuple[str, float]], rng: random.Random) -> list[str]:
        parent = min(parents, key=lambda p: p[1])[0]
        slots = space.slots_of.get(parent) or space.slots_of.get(canonical(parent))
        if slots is not None:
            i = rng.randrange(len(slots))
            options = [o for o in space.choices(i) if o != slots[i]] or [slots[i]]
            return [space.expression([*slots[:i], rng.choice(options), *slots[i + 1:]])]
        tree = _mutate_tree(parse(parent), rng, space.unary, space.binary)  # type: ignore
        return [space.representative(spell(canonical_node(tree)))]

    return mutate
