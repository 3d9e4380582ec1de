"""One process or a torchrun job: this process's rank, and collective helpers that keep every rank in step."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from cnnprior.errors import UserError
from cnnprior.runtime import resolve_device

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
    import torch.distributed as dist

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


def agree(ctx: Dist, error: str | None) -> None:
    """Raise the same UserError on every rank when any rank hit one (so no rank waits forever)."""
    if ctx.enabled:
        import torch.distributed as dist

        errors: list[str | None] = [None] * ctx.world
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise UserError(error)


def everywhere(ctx: Dist, fn: Callable[[], T]) -> T:
    """Run fn on every rank; a UserError on any rank is raised on all."""
    result, error = None, None
    try:
        result = fn()
    except UserError as exc:
        error = str(exc)
    agree(ctx, error)
    return result  # type: ignore[return-value]


def from_main(ctx: Dist, fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and hand its result (or its UserError) to every rank."""
    result, error = None, None
    if ctx.main:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    if ctx.enabled:
        import torch.distributed as dist

        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error:
        raise UserError(error)
    return result  # type: ignore[return-value]


def all_sum(ctx: Dist, t: Tensor) -> Tensor:
    """Sum `t` over the ranks, in place (itself when run alone)."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def shard(order: Tensor, rank: int, world: int) -> Tensor:
    """DistributedSampler semantics: pad by wrapping to a multiple of `world`, then every world-th from rank."""
    if world == 1:
        return order
    total = math.ceil(len(order) / world) * world
    padded = order.repeat(math.ceil(total / len(order)))[:total]
    return padded[rank::world]
