"""Config files: ``extends:``, YAML checks, and one-line explanations of the parser's errors.

``configs/resnet34.yaml`` is ``configs/resnet18.yaml`` with another depth::

    extends: resnet18.yaml          # relative to this file
    model: {init_args: {backbone: {init_args: {depth: 34}}}}

jsonargparse merges several ``--config`` files in order; ``--config resnet34.yaml`` is expanded
into ``--config resnet18.yaml --config <resnet34.yaml without extends>`` before parsing, so the
override wins and the saved ``config.yaml`` is the merged one.

:func:`config_sources` tells which file or argument set a key, for error messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from flexact.errors import ConfigError

__all__ = ["config_sources", "expand_extends", "find_key", "where_set"]


def expand_extends(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config FILE`` whose YAML has ``extends:`` expanded (recursively).

    Raises:
        ConfigError: If a config file is not valid YAML, or a chain of ``extends`` comes back
            to a file or names a missing one.
    """
    out: list[str] = []
    for is_config, value in _split(args):
        out += _expanded(value, ()) if is_config else [value]
    return out


def _split(args: Sequence[str]) -> list[tuple[bool, str]]:
    """``args`` as (is a ``--config`` value, text) pairs; ``--config`` itself is dropped."""
    out: list[tuple[bool, str]] = []
    i = 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            out.append((True, args[i + 1]))
            i += 1
        elif args[i].startswith("--config="):
            out.append((True, args[i].partition("=")[2]))
        else:
            out.append((False, args[i]))
        i += 1
    return out


def _load(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}); fix the file "
                          "(indentation, a missing ':' or closing bracket)") from None


def _expanded(value: str, chain: tuple[Path, ...]) -> list[str]:
    path = Path(value)
    try:
        if not path.is_file():
            return ["--config", value]  # a YAML string, or a missing file jsonargparse reports
    except OSError:
        return ["--config", value]
    data = _load(path)
    if not isinstance(data, dict) or "extends" not in data:
        return ["--config", value]
    here = path.resolve()
    if here in chain:
        names = " → ".join(str(p) for p in (*chain, here))
        raise ConfigError(f"config files extend each other in a circle: {names}")
    base = path.parent / str(data.pop("extends"))
    if not base.is_file():
        raise ConfigError(f"{path} extends {base}, which does not exist; fix its `extends:`")
    return [*_expanded(str(base), (*chain, here)), "--config", yaml.safe_dump(data)]


# ------------------------------------------------------------------ where a key was set
def config_sources(args: Sequence[str]) -> list[tuple[str, Any]]:
    """What set each key, in order: ``(file name, its YAML)`` or ``(argument, None)``.

    A file that extends another comes after its base; inline YAML strings are labelled
    ``--config``. Unreadable files are skipped (the parser reports them).
    """
    sources: list[tuple[str, Any]] = []

    def add_file(path: Path, chain: tuple[Path, ...]) -> None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return
        if isinstance(data, dict) and "extends" in data and path.resolve() not in chain:
            add_file(path.parent / str(data["extends"]), (*chain, path.resolve()))
        sources.append((str(path), data))

    for is_config, value in _split(args):
        if is_config and Path(value).is_file():
            add_file(Path(value), ())
        elif is_config:
            try:
                sources.append(("--config", yaml.safe_load(value)))
            except yaml.YAMLError:
                pass
        elif value.startswith("--"):
            sources.append((value.split("=", 1)[0], None))
    return sources


def _plain_key(parts: Sequence[str]) -> list[str]:
    return [p for p in parts if p not in ("init_args", "dict_kwargs")]


def _holds(data: Any, parts: Sequence[str]) -> bool:
    if not parts:
        return True
    if isinstance(data, list):
        return any(_holds(item, parts) for item in data)
    if not isinstance(data, Mapping):
        return False
    if parts[0] in data:
        return _holds(data[parts[0]], parts[1:])
    return isinstance(data.get("init_args"), Mapping) and _holds(data["init_args"], parts)


def where_set(parts: Sequence[str], sources: Sequence[tuple[str, Any]]) -> str:
    """`` in FILE`` / `` (--a.b on the command line)`` for the last source that set the key."""
    key = _plain_key(parts)
    for label, data in reversed(sources):
        if data is None and _plain_key(label[2:].split(".")) == key:
            return f" ({label} on the command line)"
        if data is not None and _holds(data, key):
            return f" in {label}"
    return ""


def _paths_to(data: Any, name: str, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(data, list):
        return [p for item in data for p in _paths_to(item, name, path)]
    if not isinstance(data, Mapping):
        return []
    found = [(*path, name)] if name in data else []
    return found + [p for key, item in data.items() if key != name
                    for p in _paths_to(item, name, (*path, str(key)))]


def find_key(name: str, sources: Sequence[tuple[str, Any]]) -> str:
    """`` (KEY in FILE)`` / `` (--KEY on the command line)`` for the last source setting ``name``.

    For messages that know a setting's name but not its place (a ``FlexActSpec`` check).
    """
    for label, data in reversed(sources):
        if data is None and label.rpartition(".")[2] == name:
            return f" ({label} on the command line)"
        paths = _paths_to(data, name) if data is not None else []
        if paths:
            return f" ({'.'.join(paths[-1])} in {label})"
    return ""
