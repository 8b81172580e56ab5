"""One line for each error the ``flexact`` command reports, instead of usage and tracebacks.

:func:`explain_parse_error` turns jsonargparse's nested report (a union of class problems,
often 40 lines after the usage) into the key, the file or argument that set it, and the fix:
``did you mean …?`` for a misspelt key or class, the new place of a setting that moved.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, NoReturn

from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from flexact.cli.compose import config_sources, find_key, where_set

__all__ = ["FlexActArgumentParser", "explain_config_error", "explain_parse_error"]


class FlexActArgumentParser(LightningArgumentParser):
    """LightningCLI's parser without abbreviated options, whose errors are one line.

    ``--trainer.max_epoch`` is an unknown option, not ``--trainer.max_epochs``. An error is printed
    as ``flexact: error: <key, where it was set, the fix>`` (:func:`explain_parse_error`) with
    exit status 2, without the usage (``--help`` shows it); ``JSONARGPARSE_DEBUG=1`` shows the
    parser's own report.
    """

    args: ClassVar[list[str]] = []
    """The command line being parsed (set by the CLI), to tell which file or argument set a key."""
    sections: ClassVar[Mapping[str, type]] = {}
    """Top-level sections that hold a callback (the CLI's forced callbacks)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)  # nested parsers raise to the one that reports
        parser = getattr(ex, "subcommand_parser", None) or self
        commands = getattr(getattr(parser, "_subcommands_action", None), "_name_parser_map", {})
        parser = next((commands[a] for a in self.args if a in commands), parser)
        try:
            line = explain_parse_error(message, parser, self.args, self.sections, parser.prog)
        except Exception:  # never hide the parser's message behind a failed explanation
            line = " ".join(message.split())
        if rank_zero_only.rank == 0:
            print(f"flexact: error: {line}", file=sys.stderr)
        self.exit(2)


class _Node(NamedTuple):
    text: str
    children: list[_Node]


_NOISE = ("Does not validate against any of the Union", "Subtypes:", "Given value",
          "Expected a <class 'NoneType'>", "Not a valid subclass of", "Subclass types expect")


def _tree(message: str) -> list[_Node]:
    root = _Node("", [])
    stack: list[tuple[int, _Node]] = [(-1, root)]
    for line in message.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        while stack[-1][0] >= indent:
            stack.pop()
        node = _Node(line.strip().removeprefix("- "), [])
        stack[-1][1].children.append(node)
        stack.append((indent, node))
    return root.children


def _leaves(nodes: list[_Node], path: list[str], cls: str | None,
            out: list[tuple[list[str], str | None, str]]) -> None:
    for node in nodes:
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', node.text)
        problem = re.match(r"Problem with given class_path '([^']+)':", node.text)
        if key:
            inner = [*path, *key.group(1).split(".")]
            if key.group(2):
                out.append((inner, cls, key.group(2)))
            _leaves(node.children, inner, cls, out)
        elif problem:
            _leaves(node.children, [*path, "init_args"], problem.group(1), out)
        elif node.text.startswith("Errors:"):
            _leaves(node.children, path, cls, out)
        elif not node.text.startswith(_NOISE):
            out.append((path, cls, node.text))


def _import(dotted: str | None) -> Any:
    if not dotted or "." not in dotted:
        return None
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except Exception:  # a broken import is reported by the parser itself
        return None


def _accepted(cls: Any, group: Sequence[str], parser: Any, path: Sequence[str]) -> list[str]:
    """Names accepted at ``path + group``.

    A class's arguments (its dataclass fields for a group), or the parser's own options.
    """
    if cls is None:
        prefix = ".".join([*path, *group, ""]) if [*path, *group] else ""
        return sorted({o[2:].removeprefix(prefix).split(".")[0]
                       for o in getattr(parser, "_option_string_actions", {})
                       if o.startswith("--" + prefix)})
    names: list[str] = []
    for klass in getattr(cls, "__mro__", [cls]):
        if "__init__" in vars(klass):
            try:
                with_types = typing.get_type_hints(klass.__init__) if group else {}
            except Exception:  # unresolvable annotations: no dataclass fields to offer
                with_types = {}
            params = inspect.signature(klass.__init__).parameters
            if group and group[0] in params:
                hint = with_types.get(group[0])
                fields = [t for t in typing.get_args(hint) or (hint,)
                          if dataclasses.is_dataclass(t)]
                return [f.name for f in dataclasses.fields(fields[0])] if fields else []
            names += [n for n, p in params.items() if n != "self" and p.kind not in
                      (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names


def _display(path: Sequence[str], cls: str | None) -> str:
    shown = list(path)
    if cls and "init_args" in shown and shown[0] == "trainer":  # a list entry: name the class
        at = shown.index("init_args")
        shown[at - 1] += f"[{cls.rpartition('.')[2]}]"
    return ".".join(shown)


_TYPES = {"PositiveInt": "a positive int", "PositiveFloat": "a number > 0",
          "NonNegativeInt": "an int >= 0", "NonNegativeFloat": "a number >= 0",
          "ClosedUnitInterval": "a number in [0, 1]", "OpenUnitInterval": "a number in (0, 1)"}


def _bad_value(text: str, given: str) -> str | None:
    """``must be …, got …`` for the parser's type errors (``given``: the report's value)."""
    if m := re.match(r"Not of type (\w+):\s*(.*?)\s*does not conform to restriction", text):
        return f"must be {_TYPES.get(m.group(1), m.group(1))}, got {m.group(2) or given}"
    if m := re.match(r"Not of type (\w+): .*'(.*)'", text):
        return f"must be {_TYPES.get(m.group(1), m.group(1))}, got {m.group(2)!r}"
    if m := re.match(r"Expected a typing.Literal\[(.*)\]. Got value: (.*)", text):
        return f"must be one of {m.group(1)}, got {m.group(2)!r}"
    if m := re.match(r"Expected a <class '(\w+)'>. Got value: (.*)", text):
        kind = "true or false" if m.group(1) == "bool" else f"a {m.group(1)}"
        return f"must be {kind}, got {m.group(2)!r}"
    return None


def _known_classes() -> list[str]:
    names: list[str] = []
    for module in ("flexact.modules", "flexact.datamodules", "flexact.callbacks",
                   "flexact.backbones", "lightning.pytorch.callbacks"):
        names += getattr(importlib.import_module(module), "__all__", [])
    return names


def explain_parse_error(message: str, parser: Any, args: Sequence[str],
                        sections: Mapping[str, type] | None = None, prog: str = "flexact") -> str:
    """One line for a jsonargparse error ``message``: the key, where it was set, the fix.

    Args:
        message: The parser's report (possibly nested over many lines).
        parser: The parser that knows the keys (the subcommand's).
        args: The command line that was parsed (to tell which file or argument set a key).
        sections: Top-level config sections holding a callback (``temperature`` …), to point
            a key given to ``trainer.callbacks`` to its section.
        prog: The command, for the ``--help`` hint.
    """
    from flexact.modules.hparams import LEGACY_SPEC_KEYS

    sources = config_sources(args)
    leaves: list[tuple[list[str], str | None, str]] = []
    _leaves(_tree(message), [], None, leaves)
    leaves.sort(key=lambda leaf: leaf[1] is None)  # inside a class first: the precise one
    path, cls, text = leaves[0] if leaves else ([], None, message.strip())
    help_hint = f"`{prog.replace(' [options]', '')} --help` lists the keys"
    if m := re.search(r"Problems parsing config\s*:?\s*(.*)", text):
        return f"a --config value is not valid YAML ({m.group(1)}); fix its syntax"
    if m := re.search(r"class_path='([\w.]+)'", text):  # a nested class: its own arguments
        path, cls = [*path, "init_args"], m.group(1)
    group: list[str] = []
    if m := re.search(r"Group '([^']+)' does not accept option '([^']+)'", text):
        group, unknown = m.group(1).split("."), m.group(2)
    elif m := re.search(r"Option '([^']+)' is not accepted|Subcommand '\w+' does not accept "
                        r"option '([^']+)'", text):
        *group, unknown = (m.group(1) or m.group(2)).split(".")
    elif m := re.search(r"unrecognized arguments: --?(\S+)", text):
        *group, unknown = m.group(1).split("=")[0].split(".")
    elif m := re.search(r"(?:dot import path string:|a path but) (\S+)", text):
        near = difflib.get_close_matches(m.group(1).rpartition(".")[2], _known_classes(), 1)
        fix = f"did you mean {near[0]}?" if near else "give a class name or a dotted import path"
        where = where_set(path, sources)
        return f"unknown class {m.group(1)!r} for {_display(path, cls)}{where}; {fix}"
    elif m := re.search(r"File does not exist: '?([^']+)'?", text):
        return f"config file not found: {m.group(1)}; check the path given to --config"
    elif m := re.search(r'Key "([^"]+)" is required', text):
        return f"{m.group(1)} is required but not set; set it in the config or the command line"
    else:
        where = where_set(path, sources)
        given = re.search(r"Given value: (.*)", message[message.find(text):])
        reason = _bad_value(text, given.group(1) if given else "?") or text.rstrip(".")
        return f"{_display(path, cls)}{where}: {reason}" if path else f"{reason}; {help_hint}"
    klass = _import(cls)
    for i, name in enumerate([*group, unknown]):  # the first part that is not a key
        if name not in _accepted(klass, group[:i], parser, path):
            group, unknown = group[:i], name
            break
    parts = [*path, *group, unknown]
    where = where_set(parts, sources)
    if (path == ["model", "init_args"] and not group and unknown in LEGACY_SPEC_KEYS
            and klass is not None and hasattr(klass, "configure_models")):
        old = [k for k in LEGACY_SPEC_KEYS if where_set([*path, k], sources)] or [unknown]
        return (f"model.init_args.{unknown}{where} moved to model.init_args.flexact.{unknown}: "
                f"move {', '.join(old)} under model.init_args.flexact (flexact 0.2)")
    for section, callback in (sections or {}).items():
        if path[:2] == ["trainer", "callbacks"] and unknown in _accepted(callback, [], None, []):
            return (f"unknown key {_display(parts, cls)}{where}: {callback.__name__} is set under "
                    f"`{section}:`; give --{section}.{unknown}")
    near = difflib.get_close_matches(unknown, _accepted(klass, group, parser, path), 1, 0.6)
    fix = f"did you mean {near[0]}?" if near else help_hint
    return f"unknown key {_display(parts, cls)}{where}; {fix}"


def explain_config_error(message: str, args: Sequence[str]) -> str:
    """A :class:`~flexact.ConfigError` message, with the place of the setting it names.

    ``tau must be a finite number > 0, got 0.0`` (a ``FlexActSpec`` check, which knows no
    config keys) ends with `` (model.init_args.flexact.tau in run.yaml)``.
    """
    m = re.match(r"(\w+) must be", message)
    return message + find_key(m.group(1), config_sources(args)) if m else message
