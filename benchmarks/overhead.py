"""What FlexAct costs: step time and memory against the same network with fixed ReLUs.

Side by side in one process (interleaved repeats, medians), four comparisons:

1. CIFAR ResNet18 with a plain head (Linear → ReLU → Linear) vs the FlexAct head; the heads
   alone as well, since their difference is below the step-to-step noise.
2. CIFAR ResNet18 with ReLU at every site vs FlexAct at every site (one selection per site,
   and one per channel), and with every FlexAct site committed (issue 15: ≤ 1.05×).
3. The FlexAct layer alone vs ``nn.ReLU`` on a large tensor (forward + backward).

A step is forward, loss (plus α·KL for FlexAct models), backward and an SGD update. Memory is
the bytes saved for backward (saved-tensor hooks) on the CPU, and
``torch.cuda.max_memory_allocated`` on a GPU. On the CPU the batch is small; on a GPU it is 128
with bf16 autocast, where kernel-launch overhead dominates. The kernels one eager step runs
(``flexact.tools.profiling.kernel_count``) predict that launch overhead on any device.

Usage: ``python benchmarks/overhead.py [--batch 16] [--repeats 10] [--steps 2] [--compile]
[--bf16] [--no-write]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexact import FlexAct, FlexActHead, selection_kl
from flexact.backbones import cifar_resnet18
from flexact.tools.profiling import kernel_count, saved_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import write_section  # a sibling script, not a package

Step = Callable[[], None]


def _autocast(device: torch.device, bf16: bool) -> object:
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def classifier_step(model: nn.Module, x: Tensor, y: Tensor, alpha: float,
                    compile_model: bool = False, bf16: bool = False) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    uses_flexact = any(isinstance(m, FlexAct) for m in model.modules())
    forward = torch.compile(model) if compile_model else model

    def step() -> None:
        with _autocast(x.device, bf16):
            loss = F.cross_entropy(forward(x), y)
            if uses_flexact and alpha > 0:
                loss = loss + alpha * selection_kl(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def layer_step(layer: nn.Module, x: Tensor, compile_model: bool = False,
               bf16: bool = False) -> Step:
    forward = torch.compile(layer) if compile_model else layer

    def step() -> None:
        with _autocast(x.device, bf16):
            out = forward(x)
        out.sum().backward()

    return step


def peak_memory(step: Step, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def timed(step: Step, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def compare(name: str, base: tuple[Step, Callable[[], Tensor]],
            other: tuple[Step, Callable[[], Tensor]], device: torch.device, repeats: int,
            steps: int, bf16: bool = False, count: bool = True) -> dict[str, float | str]:
    """Interleave the two steps (so machine noise hits both alike) and take medians.

    The order alternates between repeats: the second of two back-to-back measurements is
    systematically a little slower or faster here (allocator, caches, clock).

    With ``count``, also the number of kernels one step runs on each side (eager only: a
    compiled step fuses them).
    """
    for step, _ in (base, other):  # warm-up (allocator, autotuning, lazy init)
        step()
        step()
    times: dict[str, list[float]] = {"base": [], "other": []}
    for i in range(repeats):  # ABBA order: neither side always runs second
        order = (("base", base[0]), ("other", other[0]))
        for key, step in order if i % 2 == 0 else order[::-1]:
            times[key].append(timed(step, steps, device))
    if device.type == "cuda":
        memory = [peak_memory(base[0], device), peak_memory(other[0], device)]
    else:
        with _autocast(device, bf16):
            memory = [saved_bytes(base[1]), saved_bytes(other[1])]
    kernels = [kernel_count(base[0]), kernel_count(other[0])] if count else [0, 0]
    base_t, other_t = statistics.median(times["base"]), statistics.median(times["other"])
    return {"comparison": name, "base_ms": 1e3 * base_t, "flexact_ms": 1e3 * other_t,
            "time_ratio": other_t / base_t, "base_mb": memory[0] / 2**20,
            "flexact_mb": memory[1] / 2**20, "memory_ratio": memory[1] / memory[0],
            "base_kernels": kernels[0], "flexact_kernels": kernels[1]}


def run(batch: int, repeats: int, steps: int, device: torch.device,
        compile_model: bool = False, bf16: bool = False) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = []

    def head_model(flexact: bool) -> nn.Module:
        head = FlexActHead(512, 10, hidden_features=256) if flexact else nn.Sequential(
            nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
        return nn.Sequential(cifar_resnet18(), head).to(device)

    plain, flex = head_model(False), head_model(True)
    rows.append(compare(
        "ResNet18: plain head vs FlexAct head",
        (classifier_step(plain, x, y, 0.3, compile_model, bf16), lambda: plain(x)),
        (classifier_step(flex, x, y, 0.3, compile_model, bf16), lambda: flex(x)), device,
        repeats, steps, bf16, not compile_model))
    # The heads alone on backbone-sized features: their difference is a fraction of a step,
    # below this machine's step-to-step noise, so it is measured directly as well.
    features = torch.randn(batch, 512, device=device)
    rows.append(compare(
        f"heads alone on {tuple(features.shape)} features",
        (classifier_step(plain[1], features, y, 0.3, compile_model, bf16),
         lambda: plain[1](features)),
        (classifier_step(flex[1], features, y, 0.3, compile_model, bf16),
         lambda: flex[1](features)), device, repeats, 20 * steps, bf16, not compile_model))

    relu_net = nn.Sequential(cifar_resnet18(activation="relu"), nn.Linear(512, 10)).to(device)
    for activation, label in (("flexact", "FlexAct everywhere"),
                              ("flexact_channel", "FlexAct per channel everywhere")):
        flex_net = nn.Sequential(cifar_resnet18(activation=activation),
                                 nn.Linear(512, 10)).to(device)
        rows.append(compare(
            f"ResNet18: ReLU everywhere vs {label}",
            (classifier_step(relu_net, x, y, 0.3, compile_model, bf16), lambda: relu_net(x)),
            (classifier_step(flex_net, x, y, 0.3, compile_model, bf16),
             lambda net=flex_net: net(x)),  # type: ignore[misc]
            device, repeats, steps, bf16, not compile_model))

    # After SelectionCommit every site applies its pick only (here ReLU, the argmax of equal
    # logits): a committed FlexAct-everywhere network should step as fast as the ReLU one.
    committed = nn.Sequential(cifar_resnet18(activation="flexact"), nn.Linear(512, 10)).to(device)
    for layer in committed.modules():
        if isinstance(layer, FlexAct):
            layer.commit()
    rows.append(compare(
        "ResNet18: ReLU everywhere vs FlexAct everywhere, committed",
        (classifier_step(relu_net, x, y, 0.3, compile_model, bf16), lambda: relu_net(x)),
        (classifier_step(committed, x, y, 0.3, compile_model, bf16), lambda: committed(x)),
        device, repeats, steps, bf16, not compile_model))

    big = torch.randn(batch * 4, 64, 32, 32, device=device, requires_grad=True)
    relu, layer = nn.ReLU(), FlexAct().to(device)
    rows.append(compare(
        f"layer alone on {tuple(big.shape)}: nn.ReLU vs FlexAct",
        (layer_step(relu, big, compile_model, bf16), lambda: relu(big)),
        (layer_step(layer, big, compile_model, bf16), lambda: layer(big)), device, repeats,
        steps, bf16, not compile_model))

    # The Lightning modules' head-only default: the selection gradient standardized (an affine
    # map follows the head's FlexAct layer), two moments of each candidate's output per step.
    standardized = FlexActHead(512, 10, hidden_features=256,
                               selection_gradient="standardized").to(device)
    standardized.load_state_dict(flex[1].state_dict())
    rows.append(compare(
        f"heads alone on {tuple(features.shape)} features, FlexAct standardized",
        (classifier_step(plain[1], features, y, 0.3, compile_model, bf16),
         lambda: plain[1](features)),
        (classifier_step(standardized, features, y, 0.3, compile_model, bf16),
         lambda: standardized(features)), device, repeats, 20 * steps, bf16, not compile_model))
    return rows


def implied_head_ratio(rows: list[dict]) -> str:
    """The head comparison's step-time ratio from the heads' own times: 1 + Δhead / step."""
    step, heads, standardized = rows[0], rows[1], rows[-1]
    ratio = 1 + (heads["flexact_ms"] - heads["base_ms"]) / step["base_ms"]
    std_ratio = 1 + (standardized["flexact_ms"] - standardized["base_ms"]) / step["base_ms"]
    return (f"Head overhead measured directly: {heads['flexact_ms'] - heads['base_ms']:.2f} ms "
            f"per step ({heads['base_ms']:.2f} → {heads['flexact_ms']:.2f} ms for the heads "
            f"alone), so the FlexAct head's step-time ratio is **{ratio:.3f}** (1 + Δhead / "
            f"{step['base_ms']:.1f} ms); with the standardized selection gradient (the "
            f"Lightning modules' head-only default) {standardized['base_ms']:.2f} → "
            f"{standardized['flexact_ms']:.2f} ms, **{std_ratio:.3f}**.")


def table(rows: list[dict]) -> str:
    lines = ["| comparison | base ms/step | FlexAct ms/step | time ratio | base MB | FlexAct MB "
             "| memory ratio | kernels/step (base → FlexAct) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kernels = (f"{r['base_kernels']} → {r['flexact_kernels']}" if r["base_kernels"]
                   else "(compiled)")
        lines.append(f"| {r['comparison']} | {r['base_ms']:.1f} | {r['flexact_ms']:.1f} | "
                     f"**{r['time_ratio']:.3f}** | {r['base_mb']:.1f} | {r['flexact_mb']:.1f} | "
                     f"**{r['memory_ratio']:.3f}** | {kernels} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default: 16 on the CPU, 128 on a GPU)")
    parser.add_argument("--repeats", type=int, default=10, help="interleaved timing repeats")
    parser.add_argument("--steps", type=int, default=2, help="steps per timing repeat")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile both sides of every comparison (inductor)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast on the CPU too (on a GPU it is always on): the "
                             "dtypes, hence the memory, of a bf16-mixed GPU run")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch or (128 if device.type == "cuda" else 16)
    bf16 = args.bf16 or device.type == "cuda"
    start = time.perf_counter()
    rows = run(batch, args.repeats, args.steps, device, args.compile, bf16)
    text = table(rows) + "\n\n" + implied_head_ratio(rows)
    print(text)
    if not args.no_write:
        memory = ("peak torch.cuda.max_memory_allocated" if device.type == "cuda"
                  else "bytes saved for backward") + (", bf16 autocast" if bf16 else ", float32")
        mode = ("-compiled" if args.compile else "") + ("-bf16" if args.bf16 else "")
        label = (", torch.compile" if args.compile else "") + (", bf16" if args.bf16 else "")
        write_section(
            f"overhead-{device.type}{mode}",
            f"FlexAct overhead ({device.type}, batch {batch}{label})",
            time.perf_counter() - start,
            f"Medians of {args.repeats} interleaved repeats of {args.steps} steps; memory: "
            f"{memory}. Goals (issue 8): head ≤ 1.03× time; FlexAct everywhere ≤ 1.35× time and "
            f"≤ 1.15× memory.\n\n{text}",
        )
    return rows


if __name__ == "__main__":
    main()
