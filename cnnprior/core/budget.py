"""A training run's budget, as its checkpoints record it: samples seen, optimiser steps, wall seconds, threads,
precision, and training FLOPs (one step's, counted once with `torch.utils.flop_counter.FlopCounterMode`, times
the steps).

The FLOPs of a step are counted on a copy of the networks (`count_flops` runs the caller's copy under the counter
with the RNG states forked), so counting never changes a trained number nor the RNG stream: runs with and without
the count are bit-identical. FlopCounterMode counts the matrix products and convolutions of the forward and
backward passes (2 FLOPs per multiply-add); elementwise work (activations, normalisation, the optimiser) is not
counted. A run resumed from a checkpoint keeps accumulating: samples, steps and wall seconds go on from the saved
budget, and the saved per-step FLOPs are kept.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Budget", "count_flops", "format_flops"]


@dataclass
class Budget:
    """What a run has spent so far.

    Attributes:
        samples: training samples seen (all processes together).
        steps: optimiser steps (each updates the networks once; a GAN step is one D and one G update).
        wall_s: wall-clock seconds of the run's processes, summed over resumptions (data loading and validation
            included).
        threads: torch.get_num_threads() of the process that wrote it (per process).
        processes: processes of the job (torchrun's world size; 1 alone).
        precision: the training arithmetic (fp32, bf16).
        device: the device type trained on (cpu, cuda).
        step_flops: FLOPs of one step of all processes together (counted on one full batch per process, times the
            processes); None until counted.
        estimated: True when the run was resumed from a checkpoint without a budget: samples and wall seconds before
            it are estimated from its step count and history.
    """

    samples: int = 0
    steps: int = 0
    wall_s: float = 0.0
    threads: int = 1
    processes: int = 1
    precision: str = "fp32"
    device: str = "cpu"
    step_flops: int | None = None
    estimated: bool = False

    @property
    def flops(self) -> int | None:
        """Training FLOPs so far: step_flops x steps (None when not counted)."""
        return None if self.step_flops is None else int(self.step_flops) * int(self.steps)

    def add_step(self, samples: int) -> None:
        """Count one trained step of `samples` samples (all processes)."""
        self.steps += 1
        self.samples += int(samples)

    def as_dict(self, wall_s: float | None = None) -> dict[str, Any]:
        """The checkpoint entry (`budget`), with `flops`; `wall_s` replaces the stored seconds when given."""
        out = dataclasses.asdict(self)
        if wall_s is not None:
            out["wall_s"] = float(wall_s)
        out["flops"] = self.flops
        return out

    @classmethod
    def from_dict(cls, d: Any) -> Budget | None:
        """A checkpoint's `budget` entry -> Budget; None when absent or not a mapping (older checkpoints)."""
        if not isinstance(d, Mapping):
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        out = cls(**kw)
        out.samples, out.steps, out.wall_s = int(out.samples), int(out.steps), float(out.wall_s)
        out.step_flops = None if out.step_flops is None else int(out.step_flops)
        return out

    def describe(self) -> str:
        """'48,000 samples, 3,000 steps, 1.2e+13 FLOPs, 812 s (1 thread, fp32)'."""
        flops = "FLOPs not counted" if self.flops is None else f"{format_flops(self.flops)} training FLOPs"
        threads = f"{self.threads} thread{'s' if self.threads != 1 else ''}"
        procs = f" x {self.processes} processes" if self.processes > 1 else ""
        est = ", partly estimated" if self.estimated else ""
        return (f"{self.samples:,} samples, {self.steps:,} steps, {flops}, {self.wall_s:,.0f} s ({threads}{procs}, "
                f"{self.precision}{est})")


def format_flops(flops: float | None) -> str:
    """1.23e13 -> '1.23e+13'; None -> '–'."""
    if flops is None or not math.isfinite(float(flops)):
        return "–"
    return f"{float(flops):.3g}"


def count_flops(step: Callable[[], Any], device: torch.device | None = None) -> int:
    """FLOPs that `step()` runs (FlopCounterMode's total: matrix products and convolutions, forward and backward),
    with the global RNG states (CPU, and `device`'s on CUDA) restored afterwards, so the caller's RNG stream is
    unchanged. Pass a step on copies of the networks: the step itself is run."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        counter = FlopCounterMode(display=False)
        with counter:
            step()
    return int(counter.get_total_flops())
