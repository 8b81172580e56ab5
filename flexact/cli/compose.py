"""Configs that build on another: ``extends: other.yaml`` at the top of a YAML config.

``configs/resnet34.yaml`` is ``configs/resnet18.yaml`` with another depth::

    extends: resnet18.yaml          # relative to this file
    model: {init_args: {backbone: {init_args: {depth: 34}}}}

jsonargparse merges several ``--config`` files in order; ``--config resnet34.yaml`` is expanded
into ``--config resnet18.yaml --config <resnet34.yaml without extends>`` before parsing, so the
override wins and the saved ``config.yaml`` is the merged one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml

from flexact.errors import ConfigError

__all__ = ["expand_extends"]


def expand_extends(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config FILE`` whose YAML has ``extends:`` expanded (recursively).

    Raises:
        ConfigError: If a chain of ``extends`` comes back to a file, or names a missing one.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            out += _expanded(args[i + 1], ())
            i += 2
        elif arg.startswith("--config="):
            out += _expanded(arg.partition("=")[2], ())
            i += 1
        else:
            out.append(arg)
            i += 1
    return out


def _expanded(value: str, chain: tuple[Path, ...]) -> list[str]:
    path = Path(value)
    try:
        if not path.is_file():
            return ["--config", value]  # a YAML string, or a missing file jsonargparse reports
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return ["--config", value]  # jsonargparse reports it with its own message
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
