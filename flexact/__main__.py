"""``python -m flexact``: the flexact command line.

``--help`` and ``--version`` at the top level are answered here, without importing Lightning
(about 3 s of imports); everything else goes to :func:`flexact.cli.main`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

ROOT_HELP = """\
usage: flexact [-h] [-c CONFIG] [--print_config[=flags]] [--version] {fit,validate,test,predict} ...

flexact: train networks that pick their activation functions.

options:
  -h, --help            Show this help message and exit.
  -c CONFIG, --config CONFIG
                        Path to a configuration file in json or yaml format.
  --print_config[=flags]
                        Print the configuration after applying all other arguments and exit.
  --version             show program's version number and exit

subcommands (add one, then --help, e.g. `flexact fit --help`):
    fit                 Runs the full optimization routine.
    validate            Perform one evaluation epoch over the validation set.
    test                Perform one evaluation epoch over the test set.
    predict             Run inference on your data.

Other commands: `flexact plot HISTORY.csv` (selection plots), `flexact export CHECKPOINT` (frozen
TorchScript/ONNX), `flexact probe --config CONFIG` (rank candidate activations before training);
add --help. A config may start with `extends: base.yaml`.
"""
"""The top-level help (the subcommands' own help comes from LightningCLI)."""


def answer_without_lightning(argv: Sequence[str]) -> bool:
    """Print the top-level help or version if that is all ``argv`` asks for.

    Returns:
        Whether it was answered (nothing else to do).
    """
    if list(argv) in (["-h"], ["--help"]):
        print(ROOT_HELP, end="")
        return True
    if list(argv) == ["--version"]:
        from flexact import __version__

        print(f"flexact {__version__}")
        return True
    return False


def run() -> None:
    """The ``flexact`` console script: top-level help without Lightning, else the CLI."""
    if not answer_without_lightning(sys.argv[1:]):
        from flexact.cli import main

        main()


if __name__ == "__main__":
    run()
