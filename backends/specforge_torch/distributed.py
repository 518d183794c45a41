"""Data-parallel training with DistributedDataParallel, under torchrun.

torchrun starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...). Every process runs the whole
training loop on the same global batches: it computes its own contiguous shard of each
batch (:func:`specforge.data.pipeline.shard`), DDP averages the gradients, and the loss and
outputs of the whole batch are gathered back, so that the loop, its metrics and its logs are
those of one process training on the whole batch. Each shard's loss is weighted by its share
of the batch, so that uneven shards (a last, smaller batch) still give the whole batch's
mean. Evaluation batches are sharded and gathered the same way. Only rank 0 writes the run
folder and shows progress.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from specforge.data.pipeline import Batch, shard
from specforge_torch.transfer import to_host_later


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    local_rank: int


def ranks_from_environment() -> Ranks | None:
    """This process's place among torchrun's processes, or None outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def join(ranks: Ranks, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on the CPU); this process's device."""
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=ranks.rank, world_size=ranks.world)
    # A kernel with one input channel has a size-1 dimension whose stride differs between
    # the parameter and its gradient: the same layout, and a warning DDP need not print.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket")
    return device


def leave() -> None:
    """Leave the process group once every process has come this far: one that tears down
    while another still works sometimes aborts ("terminate called without an active
    exception": 4 of 60 two-process runs on the CPU without the barrier, 0 of 48 with)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class ShardedBatches:
    """The batch source of one process: ``x`` is this process's shard of the step's batch,
    ``y`` the labels of the whole batch (the trainer picks its own and gathers the others'
    outputs, so the loop counts metrics over the whole batch)."""

    def __init__(self, source: Any, pipeline: Any, ranks: Ranks) -> None:
        self.source, self.pipeline, self.ranks = source, pipeline, ranks
        #: numpy work on the host, which data workers can do ahead (see specforge.runner)
        self.host_side = source is pipeline

    def train_batch(self, step: int) -> Batch:
        labels = self.pipeline.train.labels[self.pipeline.batch_indices(step)]
        part = shard(len(labels), self.ranks.rank, self.ranks.world)
        return Batch(self.source.train_batch(step, part).x, labels)


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of ``value`` over the processes, as a new tensor (on a GPU the all-reduce is
    queued on the device, not waited for)."""
    total = value.clone()
    dist.all_reduce(total)
    return total


def any_rank(flag: bool, device: torch.device) -> Callable[[], bool]:
    """Start agreeing whether ``flag`` is True on any process; what it returns reads the
    answer, the same on every process (a stop must be agreed on: a process that stops alone
    leaves the others waiting in an all-reduce). On a GPU the all-reduce is queued and
    reading it waits only for the work queued before it."""
    value = torch.full((1,), int(flag), device=device)  # filled there: no host copy
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    answer = to_host_later(value)
    return lambda: bool(answer()[0].item())


def gather_rows(rows: torch.Tensor, total: int, ranks: Ranks) -> torch.Tensor:
    """Every process's ``rows`` (its shard's outputs), in rank order: the whole batch's (on
    the device, queued there)."""
    biggest = shard(total, 0, ranks.world).stop  # rank 0's shard is never smaller
    padded = torch.zeros((biggest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    padded[:len(rows)] = rows
    parts = gather_same_shape(padded, ranks)
    sizes = [len(range(total)[shard(total, r, ranks.world)]) for r in range(ranks.world)]
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def gather_same_shape(tensor: torch.Tensor, ranks: Ranks) -> list[torch.Tensor]:
    """Every process's ``tensor`` (the same shape in all, e.g. an RNG state), in rank
    order."""
    parts = [torch.empty_like(tensor) for _ in range(ranks.world)]
    dist.all_gather(parts, tensor)
    return parts
