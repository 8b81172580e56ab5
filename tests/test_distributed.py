"""Multi-device behaviour: sharding, the regularizer's statistics, and a real 2-process DDP run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from flexact import FlexAct
from flexact.datamodules.sampling import EpochRandomSampler, ResumableDataLoader, shard_indices
from flexact.nn import flexact_layers

from .conftest import REPO

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
# Variables of an enclosing launcher that must not leak into the child's own DDP launch.
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                     "NODE_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def run_bounded(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a (possibly multi-process) command; on timeout kill its whole process group.

    Lightning's DDP launcher starts the other ranks as children of rank 0: killing rank 0 alone
    would leave them behind. A timeout fails the test with the output so far (a deadlock).
    """
    proc = subprocess.Popen(command, cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"no result after {timeout} s (deadlock?):\n{out[-4000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, "")


def clean_env() -> dict[str, str]:
    """The environment for a DDP subprocess: no launcher variables, repo importable."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ---------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n", [0, 1, 7, 10, 33])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_shard_indices_match_distributed_sampler(n: int, world_size: int, shuffle: bool,
                                                 drop_last: bool) -> None:
    data = list(range(n))
    shards = []
    for rank in range(world_size):
        sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                     seed=5, drop_last=drop_last)
        sampler.set_epoch(3)
        shard = shard_indices(n, rank, world_size, seed=5, epoch=3, shuffle=shuffle,
                              drop_last=drop_last)
        assert shard.tolist() == list(sampler)
        shards.append(shard)
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
    if n and not drop_last:
        assert set(torch.cat(shards).tolist()) == set(range(n))  # the shards cover the epoch
    if n and n % world_size == 0:
        assert sorted(torch.cat(shards).tolist()) == list(range(n))  # ... exactly once


def test_shard_indices_is_a_function_of_seed_and_epoch() -> None:
    torch.manual_seed(0)
    first = shard_indices(50, 1, 2, seed=3, epoch=4)
    torch.manual_seed(123)  # the global generator plays no part
    torch.rand(10)
    assert torch.equal(first, shard_indices(50, 1, 2, seed=3, epoch=4))
    assert not torch.equal(first, shard_indices(50, 1, 2, seed=3, epoch=5))
    assert not torch.equal(first, shard_indices(50, 1, 2, seed=4, epoch=4))
    with pytest.raises(ValueError, match="rank"):
        shard_indices(10, 2, 2)


def test_one_device_order_is_the_union_of_the_ranks_batches() -> None:
    """Batch b on one device (size 2B) holds exactly batch b of both ranks (size B each)."""
    sampler = EpochRandomSampler(range(64), seed=9)
    sampler.set_epoch(2)
    single = list(sampler)
    ranks = [shard_indices(64, r, 2, seed=9, epoch=2).tolist() for r in range(2)]
    for b in range(4):
        assert sorted(single[16 * b:16 * (b + 1)]) == sorted(ranks[0][8 * b:8 * (b + 1)]
                                                               + ranks[1][8 * b:8 * (b + 1)])


def test_epoch_sampler_ignores_the_global_generator() -> None:
    sampler = EpochRandomSampler(range(20), seed=1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    order = list(sampler)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(99)
    assert list(sampler) == order
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(list(sampler)) == list(range(20))


def _loader(seed: int = 0) -> ResumableDataLoader:
    data = TensorDataset(torch.arange(20).float())
    return ResumableDataLoader(data, batch_size=4, sampler=EpochRandomSampler(data, seed=seed),
                               generator=torch.Generator().manual_seed(0))


def test_resumable_loader_skips_the_batches_already_seen() -> None:
    loader = _loader()
    loader.sampler.set_epoch(1)
    full = [b[0].tolist() for b in loader]
    iterator = iter(loader)
    seen = [next(iterator)[0].tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2} and seen == full[:2]

    resumed = _loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert len(resumed) == 5  # Lightning counts the skipped batches as done
    assert [b[0].tolist() for b in resumed] == full[2:]
    assert [b[0].tolist() for b in resumed] == full  # the next epoch is whole again
    assert resumed.state_dict() == {"epoch": 1, "batches": 5}


def test_resumable_loader_resumes_a_distributed_shard() -> None:
    """Under DDP Lightning rebuilds the loader around a DistributedSampler; resume still works."""
    data = TensorDataset(torch.arange(30).float())

    def shard_loader() -> ResumableDataLoader:
        sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=4)
        return ResumableDataLoader(data, batch_size=4, sampler=sampler)

    loader = shard_loader()
    loader.sampler.set_epoch(2)
    full = [b[0].tolist() for b in loader]
    iterator = iter(loader)
    next(iterator)
    resumed = shard_loader()
    resumed.load_state_dict(loader.state_dict())
    assert resumed.sampler.epoch == 2  # set at once, for worker processes that start early
    assert [b[0].tolist() for b in resumed] == full[1:]


def test_resumable_loader_does_not_skip_a_finished_or_other_epoch() -> None:
    for state, epoch in (({"epoch": 0, "batches": 5}, 1), ({"epoch": 3, "batches": 2}, 4)):
        loader = _loader()
        loader.load_state_dict(state)
        loader.sampler.set_epoch(epoch)
        assert len(list(loader)) == 5


# ---------------------------------------------------------------------------- statistics sync
# Each rank of a 2-process gloo group runs FlexAct on its part of one batch (uneven: 5 and 11
# rows) and saves the pseudo-probabilities p̃, with and without sync_statistics. Plain torch
# only, so the processes start fast.
_STATISTICS_SCRIPT = """
import sys, torch, torch.distributed as dist
from flexact import FlexAct
rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
torch.manual_seed(0)
x, w = torch.randn(16, 6), torch.randn(3, 6)  # inputs, weight of the affine map before FlexAct
rows = slice(0, 5) if rank == 0 else slice(5, 16)
images = torch.randn(16, 3, 4, 4)  # a conv-shaped input: the closed form measures ḡ itself
targets = {}
for sync in (True, False):
    layer = FlexAct(kl_lambda=0.5)
    layer.sync_statistics = sync
    layer.train()
    layer(x[rows] @ w.T, input_weight=w)
    targets[sync] = layer._targets
    layer(images[rows])
    targets["closed", sync] = layer._targets
torch.save(targets, f"{out}/targets{rank}.pt")
dist.destroy_process_group()
"""


def test_sync_statistics_gives_the_global_batch_targets(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(_STATISTICS_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "init"),
                               str(tmp_path)], env=clean_env(), stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    targets = [torch.load(tmp_path / f"targets{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    x, w = torch.randn(16, 6), torch.randn(3, 6)
    images = torch.randn(16, 3, 4, 4)
    layer = FlexAct(kl_lambda=0.5)
    layer.train()
    layer(x @ w.T, input_weight=w)
    global_targets = layer._targets
    assert global_targets is not None
    layer(images)
    global_closed = layer._targets
    for t in targets:  # synchronized: every rank gets p̃ of the whole batch
        torch.testing.assert_close(t[True], global_targets, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t["closed", True], global_closed, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(targets[0]["closed", False], global_closed, atol=1e-4)
    # Not synchronized: each rank's p̃ comes from its own rows only.
    assert not torch.allclose(targets[0][False], targets[1][False], atol=1e-4)
    assert not torch.allclose(targets[0][False], global_targets, atol=1e-4)


def test_sync_statistics_is_a_no_op_without_a_process_group() -> None:
    torch.manual_seed(0)
    a, b = FlexAct(), FlexAct()
    b.sync_statistics = True
    x = torch.randn(8, 4)
    a.train(), b.train()
    a(x), b(x)
    assert torch.equal(a._targets, b._targets)


# ---------------------------------------------------------------------------- a real DDP run
class RankDump(L.Callback):
    """Test-only: each rank writes its final selection state to ``default_root_dir``.

    With ``scramble_rank1_seed``, rank 1 starts from another seed, as processes started by
    torchrun or SLURM with ``seed_everything: true`` would; RNGState must undo that.
    """

    def __init__(self, scramble_rank1_seed: bool = False) -> None:
        self.scramble_rank1_seed = scramble_rank1_seed
        self.first_batch: torch.Tensor | None = None
        self.rng: list[torch.Tensor] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.scramble_rank1_seed and trainer.global_rank == 1:
            os.environ["PL_GLOBAL_SEED"] = "1234"
            torch.manual_seed(1234)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.first_batch is None:
            self.first_batch = batch[0].detach().cpu().clone()
        self.rng.append(torch.get_rng_state())  # the Gumbel stream, step by step

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        (_, layer), = flexact_layers(pl_module)
        torch.save({"logits": layer.logits.detach().cpu(), "tau": layer.tau,
                    "weight": pl_module.head.linear.weight.detach().cpu(),
                    "committed": layer.committed, "step": trainer.global_step,
                    "world_size": trainer.world_size, "first_batch": self.first_batch,
                    "rng": torch.stack(self.rng), "metrics": sorted(trainer.callback_metrics)},
                   Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt")


def _fit_args(root: Path, batch_size: int) -> list[str]:
    return ["fit", "--config", "configs/synthetic.yaml",
            "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir",
            str(root), "--trainer.max_steps", "8", "--data.n_train", "256",
            "--data.n_val", "64", "--data.n_test", "64", "--data.batch_size", str(batch_size),
            "--trainer.callbacks+=tests.test_distributed.RankDump", *QUIET]


@pytest.mark.slow
def test_ddp_two_processes_agree_and_match_one_device(tmp_path: Path) -> None:
    ddp_root = tmp_path / "ddp"
    command = [sys.executable, "-m", "flexact", *_fit_args(ddp_root, batch_size=16),
               "--trainer.callbacks.scramble_rank1_seed", "true",
               "--trainer.accelerator", "cpu", "--trainer.devices", "2",
               "--trainer.strategy", "ddp"]
    out = run_bounded(command, timeout=120)
    log = out.stdout
    assert out.returncode == 0, log[-4000:]

    ranks = [torch.load(ddp_root / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["step"] for r in ranks] == [8, 8]
    assert ranks[0]["committed"] and ranks[1]["committed"]  # DDP survives the commit
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])
    assert ranks[0]["tau"] == ranks[1]["tau"]
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # the same keys logged on every rank
    assert {"train_loss", "val_loss", "tau"} <= set(ranks[0]["metrics"])
    assert torch.equal(ranks[0]["rng"], ranks[1]["rng"])  # one Gumbel stream, whatever the seeds
    assert not torch.equal(ranks[0]["first_batch"], ranks[1]["first_batch"])  # sharded data

    # Rank 0 alone writes: one log directory, one selection.json, one checkpoint (and the
    # run's last.ckpt beside it).
    assert [p.name for p in (ddp_root / "synthetic").iterdir()] == ["version_0"]
    assert len(list(ddp_root.rglob("selection.json"))) == 1
    checkpoints = sorted(p.name for p in ddp_root.rglob("*.ckpt"))
    assert len([c for c in checkpoints if c != "last.ckpt"]) == 1 and len(checkpoints) <= 2
    assert log.count("FlexAct selection") == 1

    # Two devices × batch 16 train exactly as one device × batch 32 (up to float rounding):
    # same samples per step, same Gumbel noise, statistics synchronized.
    from flexact.cli import build_cli

    single_root = tmp_path / "single"
    build_cli([*_fit_args(single_root, batch_size=32), "--trainer.accelerator", "cpu"])
    single = torch.load(single_root / "rank0.pt")
    both = torch.cat([ranks[0]["first_batch"], ranks[1]["first_batch"]])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, single["first_batch"].tolist()))
    torch.testing.assert_close(single["logits"], ranks[0]["logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(single["weight"], ranks[0]["weight"], rtol=1e-5, atol=1e-6)
    assert torch.equal(single["rng"], ranks[0]["rng"])
