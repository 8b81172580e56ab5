"""``flexact export``: turn a checkpoint into a frozen, flexact-free TorchScript (and ONNX) file.

Usage::

    flexact export runs/synthetic/version_0/checkpoints/last.ckpt --out model.pt
    flexact export model.ckpt --input-shape 3 32 32 --out resnet.pt --onnx resnet.onnx

Every FlexAct layer is replaced by the activation it picked (:func:`flexact.freeze_selection`),
then the module's network (``module.model``) is traced. The TorchScript file loads with
``torch.jit.load`` and runs with plain PyTorch: no flexact import is needed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from flexact.cli.checkpoint import read_checkpoint
from flexact.errors import ConfigError
from flexact.modules import FlexActModule
from flexact.nn.surgery import freeze_selection

__all__ = ["export_checkpoint", "load_module", "main"]


def load_module(checkpoint: str | Path) -> FlexActModule:
    """Load a flexact LightningModule from a checkpoint, whatever its subclass.

    The class comes from the checkpoint's ``_class_path`` (written by the CLI); it must be an
    importable subclass of :class:`~flexact.modules.FlexActModule`.

    Raises:
        ConfigError: If the file is missing, unreadable, or not a flexact checkpoint.
    """
    path = Path(checkpoint)
    contents = read_checkpoint(path)  # missing, truncated or damaged: one clear ConfigError
    if contents is None:
        raise ConfigError(f"{path} holds objects that safe loading (weights_only) refuses: it "
                          "was not written by flexact fit; export a flexact checkpoint")
    hparams = contents.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path")
    if class_path:
        module_name, _, name = class_path.rpartition(".")
        candidate = getattr(importlib.import_module(module_name), name, None)
        if not (isinstance(candidate, type) and issubclass(candidate, FlexActModule)):
            raise ConfigError(f"{path} holds a {class_path}, not a flexact module")
        cls: type[FlexActModule] = candidate
    else:
        raise ConfigError(f"{path} does not name its module class (_class_path); load it with "
                          "YourModuleClass.load_from_checkpoint and call freeze_selection")
    try:
        return cls.load_from_checkpoint(path, map_location="cpu")
    except ConfigError as err:
        raise ConfigError(f"cannot rebuild the model saved in {path}: {err}") from err


def _input_shape(module: FlexActModule, shape: Sequence[int] | None) -> list[int]:
    if shape:
        return list(shape)
    hp = module.hparams
    if hp.get("example_input_shape"):
        return list(hp["example_input_shape"])
    if hp.get("backbone") is None and hp.get("in_features"):
        return [int(hp["in_features"])]
    raise ConfigError("cannot tell the input shape: pass --input-shape (one sample, e.g. 3 32 32)")


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    input_shape: Sequence[int] | None = None,
    onnx_path: str | Path | None = None,
) -> tuple[Path, Path | None]:
    """Freeze the selection of a checkpoint's model and save it as TorchScript (and ONNX).

    Args:
        checkpoint: A checkpoint written by ``flexact fit``.
        out: Path of the TorchScript file.
        input_shape: Shape of one input sample, for tracing (inferred for raw-feature models).
        onnx_path: Also write ONNX here (needs the ``onnx`` package).

    Returns:
        The TorchScript path and the ONNX path (or ``None``).
    """
    module = load_module(checkpoint)
    module.eval()
    model = freeze_selection(module.model).eval()
    example = torch.zeros(2, *_input_shape(module, input_shape))
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(out))
    onnx_out = None
    if onnx_path is not None:
        if importlib.util.find_spec("onnx") is None:
            raise ConfigError("ONNX export needs the onnx package: pip install onnx")
        onnx_out = Path(onnx_path)
        with warnings.catch_warnings():
            # The TorchScript-based exporter needs only `onnx` (the newer one also needs
            # onnxscript) and handles the traced, frozen model fully.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(onnx_out), input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}},
                              dynamo=False)
    return out, onnx_out


def main(argv: Sequence[str] | None = None) -> None:
    """``flexact export``: checkpoint → frozen TorchScript (and ONNX) file."""
    parser = argparse.ArgumentParser(
        prog="flexact export",
        description="Freeze every FlexAct layer to its pick and save a plain-PyTorch model.",
    )
    parser.add_argument("checkpoint", help="checkpoint written by flexact fit")
    parser.add_argument("--out", default=None,
                        help="TorchScript file to write (default: the checkpoint with .pt)")
    parser.add_argument("--input-shape", type=int, nargs="+", default=None,
                        help="shape of one input sample for tracing, e.g. 3 32 32")
    parser.add_argument("--onnx", default=None, help="also write an ONNX file here")
    args = parser.parse_args(argv)
    out = args.out or str(Path(args.checkpoint).with_suffix(".pt"))
    try:
        script, onnx_file = export_checkpoint(args.checkpoint, out, args.input_shape, args.onnx)
    except ConfigError as err:
        parser.exit(2, f"flexact export: error: {err}\n")
    print(f"TorchScript: {script}")
    if onnx_file is not None:
        print(f"ONNX: {onnx_file}")


if __name__ == "__main__":
    main()
