"""One process or a torchrun job: this process's rank, and collective helpers that keep every rank in step."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from cnnprior.core.errors import UserError
from cnnprior.core.runtime import resolve_device

__all__ = [
    "agree", "all_sum", "Dist", "everywhere", "from_main", "gather_objects", "init_distributed", "joined",
    "main_first", "mean_batchnorm_stats", "rank_seed", "shard", "T"
]

T = TypeVar("T")


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), device

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) visible; lower "
                            f"--nproc_per_node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return Dist(rank, world), device


@contextlib.contextmanager
def joined(device_name: str) -> Iterator[tuple[Dist, torch.device]]:
    """This process's rank and device for one stage: joins a torchrun job's process group and leaves it after.

    Re-entrant: inside an outer `joined` (the priors stage holds one group for its split and randomised files;
    leaving and re-joining a torchrun agent's store between them can hang) it reuses that group."""
    if dist.is_available() and dist.is_initialized():
        device = resolve_device(device_name)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        yield Dist(dist.get_rank(), dist.get_world_size()), device
        return
    ctx, device = init_distributed(device_name)
    try:
        yield ctx, device
    finally:
        if ctx.enabled:
            dist.destroy_process_group()


def agree(ctx: Dist, error: str | None) -> None:
    """Raise the same UserError on every rank when any rank hit one (so no rank waits forever)."""
    if ctx.enabled:
        errors: list[str | None] = [None] * ctx.world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UserError(error)


def _attempt(fn: Callable[[], T]) -> tuple[T | None, str | None]:
    """(fn(), None), or (None, its UserError's message)."""
    try:
        return fn(), None
    except UserError as exc:
        return None, str(exc)


def everywhere(ctx: Dist, fn: Callable[[], T]) -> T:
    """Run fn on every rank; a UserError on any rank is raised on all."""
    result, error = _attempt(fn)
    agree(ctx, error)
    return result  # type: ignore[return-value]


def from_main(ctx: Dist, fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and hand its result (or its UserError) to every rank."""
    result, error = _attempt(fn) if ctx.main else (None, None)
    if ctx.enabled:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error:
        raise UserError(error)
    return result  # type: ignore[return-value]


def all_sum(ctx: Dist, t: Tensor) -> Tensor:
    """Sum `t` over the ranks, in place (itself when run alone)."""
    if ctx.enabled:
        dist.all_reduce(t)
    return t


def shard(order: Tensor, rank: int, world: int) -> Tensor:
    """DistributedSampler semantics: pad by wrapping to a multiple of `world`, then every world-th from rank."""
    if world == 1:
        return order
    total = math.ceil(len(order) / world) * world
    padded = order.repeat(math.ceil(total / len(order)))[:total]
    return padded[rank::world]


def main_first(ctx: Dist, fn: Callable[[], T]) -> T:
    """Run fn on rank 0, then on each other node's first process, then on the rest, one group at a time (so a
    first run can fill a cache, e.g. extract a dataset, before anyone else reads it); a UserError on any rank is
    raised on all."""
    if not ctx.enabled:
        return fn()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    group = 0 if ctx.main else 1 if local == 0 else 2
    result = None
    for turn in range(3):
        error = None
        if group == turn:
            result, error = _attempt(fn)
        agree(ctx, error)
    return result  # type: ignore[return-value]


def gather_objects(ctx: Dist, value: T) -> list[T]:
    """Every rank's `value` (picklable, in memory only), in rank order, on every rank ([value] when run alone)."""
    if not ctx.enabled:
        return [value]

    values: list = [None] * ctx.world
    dist.all_gather_object(values, value)
    return values


def mean_batchnorm_stats(ctx: Dist, module: nn.Module) -> None:
    """Replace every batch-norm layer's running mean and variance by their mean over the ranks (one all-reduce)."""
    if not ctx.enabled:
        return
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    stats = [t for m in module.modules() if isinstance(m, kinds) and m.track_running_stats
             for t in (m.running_mean, m.running_var) if t is not None]
    if stats:
        flat = all_sum(ctx, torch.cat([t.detach().flatten().double() for t in stats]))
        flat /= ctx.world
        offset = 0
        for t in stats:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's own random draws (augmentation, dropout): `seed` itself on rank 0, so a one-process run
    draws exactly what it always did; independent streams on the other ranks."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1)[0])
