"""The Lightning entry points: the ``flexact`` command, checkpoints, export.

``flexact fit|validate|test|predict`` run :class:`FlexActCLI` (LightningCLI); ``flexact plot``
and ``flexact export`` dispatch to their own parsers (:data:`EXTRA_COMMANDS`).
"""

from flexact.cli.app import EXTRA_COMMANDS, FlexActCLI, build_cli, main

__all__ = ["EXTRA_COMMANDS", "FlexActCLI", "build_cli", "main"]
