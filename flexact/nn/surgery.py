"""Model surgery: put FlexAct at every activation site, or freeze FlexAct to plain activations.

Pure PyTorch (no Lightning import)::

    model = torchvision.models.resnet18()
    report = swap_activations(model)           # every nn.ReLU becomes a FlexAct
    ...train...
    plain = freeze_selection(model)            # every FlexAct becomes its picked nn.Module
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flexact.errors import ConfigError
from flexact.nn.layer import FlexAct, flexact_layers
from flexact.nn.mixture import apply_per_channel
from flexact.nn.registry import plain_module
from flexact.nn.spec import FlexActSpec

__all__ = ["DEFAULT_SWAP_TYPES", "Swap", "freeze_selection", "share_selection",
           "swap_activations"]

DEFAULT_SWAP_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Softplus, nn.Tanh,
)
"""Activation types replaced by default. Sigmoid and Hardsigmoid are left alone: in many models
(squeeze-excitation, gates) they act as gates, not as hidden activations; pass ``types`` to
include them."""


@dataclass(frozen=True)
class Swap:
    """One replaced module: its qualified name, what it was, and the FlexAct put there."""

    name: str
    replaced: str
    num_channels: int | None


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return bool(patterns) and any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def _channels_by_site(model: nn.Module, names: set[str], example_input: Any) -> dict[str, int]:
    """Channel count (dim 1) of the input each named module sees, from one dry forward."""
    sizes: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if name in names:
            def hook(mod: nn.Module, args: tuple[Tensor, ...], key: str = name) -> None:
                x = args[0]
                channels = int(x.shape[1]) if x.dim() >= 2 else 1
                if sizes.setdefault(key, channels) != channels:
                    raise ConfigError(f"module {key!r} is applied to inputs with {sizes[key]} and "
                                      f"{channels} channels; per-channel FlexAct cannot replace "
                                      "a module shared between sites of different widths "
                                      "(use granularity='layer' or exclude it)")
            handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    missing = names - set(sizes)
    if missing:
        raise ConfigError(f"modules {sorted(missing)} were not called by the example input; "
                          "exclude them or pass an input that reaches them")
    return sizes


def swap_activations(
    model: nn.Module,
    spec: FlexActSpec | Mapping[str, Any] | Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Sequence[type[nn.Module]] = DEFAULT_SWAP_TYPES,
    example_input: Any = None,
    **settings: Any,
) -> list[Swap]:
    """Replace the activation modules of ``model`` with FlexAct layers, in place.

    Works on any model whose activations are modules (torchvision ResNet, VGG, MobileNet, a
    user's MLP, ...). A module object used at several sites (torchvision's BasicBlock calls one
    ``nn.ReLU`` twice) becomes one FlexAct shared by those sites. In-place activations are
    fine: FlexAct never writes into its input.

    Args:
        model: The model to modify.
        spec: Settings of every new layer (:class:`~flexact.FlexActSpec`, a mapping of its
            fields, or a list of candidate names); ``granularity="channel"`` takes the channel
            counts from ``example_input``.
        include: Glob patterns of qualified module names to replace (default: all).
        exclude: Glob patterns of qualified module names to keep.
        types: Activation module types to replace.
        example_input: A batch for one dry forward, required for ``granularity="channel"``.
        **settings: Fields of :class:`~flexact.FlexActSpec` that replace the spec's (``tau``,
            ``kl_lambda``...). Unless the spec or ``settings`` set it, ``compact_memory`` is
            true here: a FlexAct keeps its input for backward,
            and in bf16 that costs half (a conv stack with FlexAct at every site: about 1.2×
            the ReLU network's saved bytes instead of 1.4×). Sites whose model calls
            :meth:`~flexact.FlexAct.forward_batchnorm` (CifarResNet does) keep no copy at all.

    Returns:
        One :class:`Swap` per replaced module, in model order.
    """
    if spec is None or isinstance(spec, Sequence):  # no spec of the caller's: compact memory
        settings.setdefault("compact_memory", True)
    spec = FlexActSpec.build(spec, **settings)
    granularity = spec.granularity
    types = tuple(types)
    inside = tuple(f"{name}." if name else "" for name, _ in flexact_layers(model))
    targets = [
        name for name, module in model.named_modules()
        if name and isinstance(module, types) and not isinstance(module, FlexAct)
        and not (inside and name.startswith(inside))  # a FlexAct's own candidates
        and (include is None or _matches(name, include)) and not _matches(name, exclude)
    ]
    if granularity == "channel":
        if example_input is None:
            raise ConfigError("granularity='channel' needs example_input (one batch) to learn "
                              "each site's channel count")
        channels: dict[str, int] = _channels_by_site(model, set(targets), example_input)
    swaps = []
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        width = channels[name] if granularity == "channel" else None
        layer = FlexAct(spec, num_channels=width, channel_dim=1)
        param = next(old.parameters(), None) or next(model.parameters(), None)
        if param is not None:
            layer.to(device=param.device)
        setattr(parent, attr, layer)
        swaps.append(Swap(name, type(old).__name__, width))
    return swaps


def share_selection(model: nn.Module) -> int:
    """Make every FlexAct layer of ``model`` use one set of selection logits.

    The network then chooses one activation for all its sites: the question a sweep of
    fixed-activation runs answers, decided from the gradient of every layer at once. Each layer
    keeps its own Gumbel noise, pruning mask and commit state; fed the same logits, they settle,
    prune and commit alike. The first layer's logits (and so its ``prior``) are kept.

    Args:
        model: A model with FlexAct layers of one granularity ``layer`` and the same candidates.

    Returns:
        The number of layers that share the logits.

    Raises:
        ConfigError: If the layers' candidates differ, or a layer selects per channel.
    """
    layers = list(flexact_layers(model))
    if not layers:
        return 0
    first_name, first = layers[0]
    for name, layer in layers:
        if layer.num_channels is not None:
            raise ConfigError(f"share_selection needs one selection per layer, but FlexAct layer "
                              f"{name!r} selects per channel: set granularity: layer")
        if layer.candidate_names != first.candidate_names:
            raise ConfigError(
                f"share_selection needs the same candidates in every FlexAct layer: {name!r} has "
                f"{list(layer.candidate_names)}, {first_name!r} has "
                f"{list(first.candidate_names)}; give the backbone and head the same candidates")
    for _, layer in layers[1:]:
        layer.logits = first.logits  # one Parameter, registered in every layer
    return len(layers)


class PerChannelActivation(nn.Module):
    """Frozen per-channel pick: channel ``c`` gets activation ``index[c]`` (plain PyTorch)."""

    def __init__(self, activations: Sequence[nn.Module], index: Tensor, channel_dim: int) -> None:
        super().__init__()
        self.activations = nn.ModuleList(activations)
        self.register_buffer("index", index.clone())
        self.channel_dim = channel_dim

    def forward(self, x: Tensor) -> Tensor:
        return apply_per_channel(x, self.index, self.activations, self.channel_dim % x.dim())


def freeze_selection(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every FlexAct by the activation it picked.

    Per-layer FlexAct becomes that activation's module (``nn.ReLU``, ``nn.Sigmoid``, ... or the
    registry module with its learned parameters); per-channel FlexAct becomes a
    :class:`PerChannelActivation`. The outputs equal the FlexAct model's in eval/argmax mode.

    Args:
        model: A model containing FlexAct layers.
        inplace: Modify ``model`` itself instead of a deep copy.

    Returns:
        The frozen model (in the same train/eval mode as ``model``).
    """
    frozen = model if inplace else copy.deepcopy(model)
    for name, layer in list(flexact_layers(frozen)):
        picks = layer.logits.detach().argmax(dim=-1)
        if layer.num_channels is None:
            replacement = plain_module(layer.candidates[int(picks)])
        else:
            used = sorted(set(picks.tolist()))
            remap = {j: i for i, j in enumerate(used)}
            replacement = PerChannelActivation(
                [plain_module(layer.candidates[j]) for j in used],
                torch.tensor([remap[int(j)] for j in picks], device=picks.device),
                layer.channel_dim,
            )
        if not name:
            return replacement
        parent_name, _, attr = name.rpartition(".")
        parent = frozen.get_submodule(parent_name) if parent_name else frozen
        setattr(parent, attr, replacement)
    return frozen
