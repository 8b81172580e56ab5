"""Training-free activation features (Bingham & Miikkulainen, 2023): outputs and Fisher spectrum.

Conventions (float64). With ``W = [weight | bias]`` of shape ``(out, in + 1)``, the Fisher block
is ``F ≈ kron(A, G)`` for the column-stacking ``vec`` (``W.T.reshape(-1)``), ``kron(G, A)`` for
PyTorch's row-major ``W.reshape(-1)``. ``A``: mean of the inputs' outer products over all N·T rows
(samples × positions: a conv's output positions, a Linear input's dims between batch and
features); ``G``: the per-sample output gradients' outer products summed over positions, averaged
over the N samples (KFC, Grosse & Martens 2016). Exact for N = T = 1. Eigensolves treat
non-finite factor entries (a diverging activation) as finite: NaN → 0, ±inf → ±1e200.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexact.errors import ConfigError, check_positive_ints

__all__ = ["fisher_features", "kfac_eigenvalues", "kfac_factors", "output_distribution",
           "spectrum_histogram"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Calls = list[tuple[Tensor, Tensor]]  # per call of a layer: (input, d(N·loss)/d(output))


def output_distribution(activation: nn.Module | Callable[[Tensor], Tensor], n: int = 1000,
                        seed: int = 0) -> Tensor:
    """The activation applied to a fixed, sorted sample of ``n`` N(0, 1) values.

    The global RNG stays untouched (a local generator, a forked RNG state); a module runs in eval
    mode (no Gumbel or dropout noise), restored after. Outputs: clamped to ±1e6, NaN → 0.

    Args:
        activation: An elementwise activation: a module or a function of a tensor.
        n: Sample size.
        seed: Seed of the local generator.

    Returns:
        A float32 CPU tensor of shape ``(n,)``, without grad.

    Raises:
        ConfigError: A bad ``n``, ``seed`` or activation, or an output of another shape.
    """
    check_positive_ints(n=n)
    if isinstance(seed, bool) or not isinstance(seed, int) or not callable(activation):
        raise ConfigError(f"need a callable activation (an nn.Module or a function) and an int "
                          f"seed, got activation={activation!r}, seed={seed!r}")
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)).sort().values
    module = activation if isinstance(activation, nn.Module) else nn.Module()
    modes, param = [(m, m.training) for m in module.modules()], next(module.parameters(), None)
    if param is not None and param.is_floating_point():
        x = x.to(param.device, param.dtype)
    try:
        for m, _ in modes:
            m.training = False
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            y = activation(x)
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(y, Tensor) or y.shape != x.shape:
        raise ConfigError(f"activation must be elementwise: an input of shape ({n},) gave "
                          f"{getattr(y, 'shape', type(y))}")
    y = torch.nan_to_num(y.detach().to("cpu", torch.float32), nan=0.0)
    return y.clamp_(-1e6, 1e6)


def _select(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    found = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)
             or (isinstance(m, nn.Conv2d) and m.groups == 1)}  # one (A, G): one dense weight
    if not found:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear or nn.Conv2d (groups=1) "
                          "layer; K-FAC Fisher features need at least one")
    if layers is None:
        return found
    unknown = [name for name in layers if name not in found]
    if isinstance(layers, str) or not layers or unknown:
        raise ConfigError(f"layers must be a non-empty list of module names, got {layers!r} "
                          f"(unknown: {unknown}); available Linear/Conv2d (groups=1) layers: "
                          f"{list(found)}")
    return {name: m for name, m in found.items() if name in set(layers)}


def _capture(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn,
             layers: Sequence[str] | None) -> dict[str, tuple[nn.Module, Calls]]:
    chosen = _select(model, layers)
    names = {module: name for name, module in chosen.items()}
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in chosen}

    def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        # A frozen prefix gives outputs without grad: make them leaves we can differentiate.
        out = output if output.requires_grad else output.detach().requires_grad_()
        seen[names[module]].append((args[0].detach(), out))
        # Downstream sees a copy, so an in-place op (ReLU(inplace=True)) cannot rebase `out`.
        return out.clone()

    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    handles = [module.register_forward_hook(record) for module in names]
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            silent = [name for name, calls in seen.items() if not calls]
            if silent:
                raise ConfigError(f"layer(s) {silent} were not called in the forward pass; "
                                  "leave them out with layers=")
            if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.requires_grad:
                raise ConfigError("loss_fn must return the mean loss over the batch as a scalar "
                                  "tensor with grad (e.g. F.cross_entropy, reduction='mean')")
            outs = [out for calls in seen.values() for _, out in calls]
            # Grads w.r.t. outputs leave .grad alone; N·(mean loss): per-sample dℓ_n/ds_n.
            grads = iter(torch.autograd.grad(loss * len(inputs), outs, materialize_grads=True))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
        for param, grad, requires_grad in params:
            param.grad = grad
            param.requires_grad_(requires_grad)
    # `grads` runs in the order of `outs`; an unused output's gradient is zeros.
    return {name: (chosen[name], [(x, next(grads)) for x, _ in c]) for name, c in seen.items()}


def _pads(conv: nn.Conv2d) -> list[int]:
    """F.pad amounts (left, right, top, bottom) matching the conv's own padding."""
    if conv.padding == "same":  # like torch's conv: an odd extra pixel goes right/bottom
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return [p for t in reversed(totals) for p in (t // 2, t - t // 2)]
    pads = (0, 0) if conv.padding == "valid" else conv.padding
    return [int(p) for p in reversed(pads) for _ in range(2)]


def _layers(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn,
            layers: Sequence[str] | None) -> Iterator[tuple[str, list[Tensor], list[Tensor]]]:
    """Per layer (one at a time: memory), matrices (d, L) whose columns are the rows a, resp. g."""
    captured = _capture(model, inputs, targets, loss_fn, layers)
    for name in list(captured):
        module, calls = captured.pop(name)
        a: list[Tensor] = []
        g: list[Tensor] = []
        for x, grad in calls:
            if isinstance(module, nn.Conv2d):  # per sample, from unfold: no transposed copy
                x, grad = (x, grad) if x.dim() == 4 else (x[None], grad[None])
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                a += F.unfold(F.pad(x, _pads(module), mode=mode), module.kernel_size,
                              dilation=module.dilation, stride=module.stride).unbind()
                g += grad.flatten(2).unbind()
            else:  # all rows: samples and any positions between batch and features
                a.append(x.reshape(-1, x.shape[-1]).T)
                g.append(grad.reshape(-1, grad.shape[-1]).T)
        if module.bias is not None:
            a = [torch.cat([block, block.new_ones(1, block.shape[1])]) for block in a]
        yield name, a, g


def _gram(blocks: list[Tensor], wide: bool = False) -> Tensor:
    """XᵀX (or XXᵀ if ``wide``) in float64, where X's rows are the blocks' columns."""
    if wide:  # XXᵀ: the same sum, with X itself as the one block
        blocks = [torch.cat([block.T for block in blocks])]
    d = len(blocks[0])
    h, gram = d // 2, blocks[0].new_zeros(d, d, dtype=torch.float64)
    for block in blocks:  # per sample: as fast as one big matmul, without a transposed copy
        top, low = block.double().split([h, d - h])  # float32 would blur λ below ~1e-7·λ_max
        # upper blocks only (symmetry: 3/4 of the flops)
        gram[:h, :h].addmm_(top, top.T)
        gram[:h, h:].addmm_(top, low.T)
        gram[h:, h:].addmm_(low, low.T)
    gram[h:, :h] = gram[:h, h:].T
    return gram


def kfac_factors(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn,
                 layers: Sequence[str] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC factors (A, G) of every nn.Linear and nn.Conv2d (groups=1) layer of ``model``.

    One forward and one backward pass, in the model's current mode; grouped convs are skipped.
    Modes, ``requires_grad`` and ``.grad`` stay as they were and all hooks are removed, also when
    ``loss_fn`` raises. Scaling and Kronecker order: see the module docstring.

    Args:
        model: The network; the first dim of its input is the batch.
        inputs: A batch of N inputs.
        targets: The batch's targets.
        loss_fn: ``loss_fn(outputs, targets)``: the MEAN loss over the batch.
        layers: Only these module names (default: all supported layers).

    Returns:
        Module name → (A, G) in module order: A is d×d (d: in or C·kh·kw, +1 for a bias), G out×out.

    Raises:
        ConfigError: No supported layer, a bad ``layers``, or a loss that is not a scalar.
    """
    # A: mean over all N·T rows; G: sum over positions, mean over the N samples.
    return {name: (_gram(a) / sum(b.shape[1] for b in a), _gram(g) / len(inputs))
            for name, a, g in _layers(model, inputs, targets, loss_fn, layers)}


def _eigvalsh(matrix: Tensor) -> Tensor:
    matrix = torch.nan_to_num(matrix.double(), nan=0.0, posinf=1e200, neginf=-1e200)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # MKL's threaded solver stalls 10-50× on a loaded CPU, gains ~10% idle
    try:
        values = torch.linalg.eigvalsh(matrix)
    finally:
        torch.set_num_threads(threads)
    return values.clamp_(min=0.0)  # negatives are round-off of a PSD matrix


def _spectrum(blocks: list[Tensor], divisor: int | None = None) -> Tensor:
    """Eigenvalues of XᵀX / (divisor or X's rows), from the smaller of XᵀX and XXᵀ."""
    dim, rows = len(blocks[0]), sum(block.shape[1] for block in blocks)
    # A wide patch matrix (e.g. 512 × 4608): XXᵀ has XᵀX's non-zero eigenvalues, the rest are 0.
    values = _eigvalsh(_gram(blocks, wide=rows < dim)) / (divisor or rows)
    return torch.cat([values.new_zeros(max(dim - rows, 0)), values])


def kfac_eigenvalues(factors: dict[str, tuple[Tensor, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Eigenvalues of each layer's A and G: float64, ascending, tiny negatives clamped to 0.

    The K-FAC block ``kron(A, G)`` has exactly the eigenvalues ``λ_i(A)·μ_j(G)`` for all i, j.

    Args:
        factors: Module name → (A, G), as from :func:`kfac_factors`.

    Returns:
        Module name → (eigenvalues of A, eigenvalues of G).
    """
    for name, pair in factors.items():
        if any(f.dim() != 2 or f.shape[0] != f.shape[1] for f in pair):
            raise ConfigError(f"the K-FAC factors of layer {name!r} must be square matrices, got "
                              f"shapes {[tuple(f.shape) for f in pair]}")
    return {name: (_eigvalsh(a), _eigvalsh(g)) for name, (a, g) in factors.items()}


def _edges(bins: int, low: float, high: float) -> Tensor:
    check_positive_ints(bins=bins)
    if not (isinstance(low, (int, float)) and isinstance(high, (int, float))
            and -math.inf < low < high < math.inf):
        raise ConfigError(f"low < high must be finite log10 bounds, got low={low!r}, high={high!r}")
    return torch.linspace(low, high, bins + 1, dtype=torch.float64)[1:-1]


def spectrum_histogram(eigenvalues: dict[str, tuple[Tensor, Tensor]], bins: int = 24,
                       low: float = -12.0, high: float = 4.0) -> Tensor:
    """Per layer, the normalized histogram of log10 of all products λ_i·μ_j.

    ``bins`` uniform bins over ``[low, high]`` (log10); products below ``10**low`` (zeros too)
    count in the first bin, those above ``10**high`` in the last. Never forming the products, a
    binary search per λ_i in the sorted log μ counts those below each edge: exact to the bin.

    Args:
        eigenvalues: Module name → (eigenvalues of A, eigenvalues of G).
        bins: Bins per layer.
        low: log10 of the lower bound.
        high: log10 of the upper bound.

    Returns:
        A float32 vector of length ``bins × layers`` (dict order), each layer's part summing to 1.

    Raises:
        ConfigError: Bad bins or bounds, no layers, or an empty eigenvalue tensor.
    """
    edges = _edges(bins, low, high)
    if not eigenvalues:
        raise ConfigError("eigenvalues is empty: pass at least one layer's (λ, μ)")
    parts = []
    for name, pair in eigenvalues.items():
        if any(values.numel() == 0 for values in pair):
            raise ConfigError(f"layer {name!r} has an empty eigenvalue tensor")
        # zeros (and NaN, negatives) → log -inf: below every edge, so in the first bin
        log_lam, log_mu = (torch.nan_to_num(v.detach().to("cpu", torch.float64).flatten(), nan=0.0)
                           .clamp(min=0.0).log10() for v in pair)
        # below[k] = #{(i, j): log λ_i + log μ_j < edges[k]}
        below = torch.searchsorted(log_mu.sort().values, edges - log_lam[:, None]).sum(dim=0)
        total = log_lam.numel() * log_mu.numel()
        counts = torch.diff(below, prepend=below.new_zeros(1), append=below.new_full((1,), total))
        parts.append(counts.double() / total)
    return torch.cat(parts).float()


def fisher_features(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn: LossFn,
                    layers: Sequence[str] | None = None, bins: int = 24, low: float = -12.0,
                    high: float = 4.0) -> Tensor:
    """The K-FAC Fisher spectrum histogram of ``model`` on one batch (arguments: as there).

    :func:`kfac_factors` → :func:`kfac_eigenvalues` → :func:`spectrum_histogram`, without forming
    large factors: each factor's eigenvalues come from the smaller Gram matrix of its rows.

    Returns:
        A float32 vector of length ``bins × layers``.
    """
    _edges(bins, low, high)  # fail before the expensive pass
    spectra = {name: (_spectrum(a), _spectrum(g, len(inputs)))
               for name, a, g in _layers(model, inputs, targets, loss_fn, layers)}
    return spectrum_histogram(spectra, bins, low, high)
