#!/usr/bin/env python
"""Benchmark the classifier stage's training step: images/s of the target CNN, fp32 and bf16 autocast.

The step the classifier stage takes (cnnprior/cnn/train.py): a channels_last model and batch, forward, cross-entropy
with label smoothing 0.05, backward, AdamW; on seeded random images (no data loading, no augmentation). The
defaults are the shipped default's CNN (configs/fashion_resnet18.yaml: ResNet-18, 128 px, batch 32, 10
classes). Each precision: one warm-up step, then `--repeats` timed runs of `--steps` steps; the median.

    python bench/classifier.py --device cuda --steps 20 --repeats 5
    python bench/classifier.py --quick          # tiny: checks the code path
Lines: `train classifier resnet18 128px fp32 batch 32: N images/s` (and bf16 autocast).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import (
    device_name,
    interleaved,
    load_average,
    positive_int,
    resolve_bench_device,
    write_json,
)

from cnnprior.cnn.model import build_cnn
from cnnprior.core.config import ARCHS

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def train_steps_fn(arch: str, size: int, batch: int, steps: int, device: torch.device,
                   dtype: torch.dtype | None, classes: int = 10) -> Callable[[], None]:
    """`steps` classifier training steps on one seeded random batch (the model is returned as `.model`)."""
    torch.manual_seed(0)
    model = build_cnn(arch, [str(i) for i in range(classes)], size).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)

    def autocast() -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    def run() -> None:
        for _ in range(steps):
            with autocast():
                loss = F.cross_entropy(model(x), y, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    run.model = model  # type: ignore[attr-defined]  # for the smoke test
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=ARCHS, default="resnet18", help="default resnet18 (the shipped CNN)")
    p.add_argument("--size", type=positive_int, default=128, help="input size (default 128)")
    p.add_argument("--batch", type=positive_int, default=32, help="batch size (default 32)")
    p.add_argument("--steps", type=positive_int, default=3, help="steps per timed run (default 3)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed runs per precision (default 3)")
    p.add_argument("--precision", choices=list(PRECISIONS), nargs="+", default=list(PRECISIONS),
                   help="default: fp32 bf16 (bf16 = autocast)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true", help="size 32, batch 2, one step, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.repeats = 32, 2, 1, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_bench_device(args.device, p)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"classifier training on {device} ({device_name(device)}), {torch.get_num_threads()} thread(s), "
          f"load average {load_average()}", flush=True)
    results = {}
    for precision in args.precision:
        run = train_steps_fn(args.arch, args.size, args.batch, args.steps, device, PRECISIONS[precision])
        t = statistics.median(interleaved({"run": run}, args.repeats, device)["run"])
        rate = args.batch * args.steps / t
        shown = precision if PRECISIONS[precision] is None else f"{precision} autocast"
        results[f"train classifier {args.arch} {args.size}px {precision}"] = rate
        print(f"train classifier {args.arch} {args.size}px {shown} batch {args.batch}: {rate:.1f} images/s", flush=True)
    write_json(args.json, {"device": str(device), "device_name": device_name(device),
                           "threads": torch.get_num_threads(), "settings": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
