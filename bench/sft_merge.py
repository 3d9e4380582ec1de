"""Benchmark one proposed speed-up of the SFT layers: their 1x1 convolutions merged into wide ones.

Usage: python bench/sft_merge.py [--layers 17] [--batch 16] [--size 64] [--repeats 3] [--threads N] [--json PATH]
                                 [--quick]

In the CPU presets every SFT layer's scale and shift branches are two 32->32 1x1 convolutions on the condition, then
one 32->32 1x1 each: too little work per byte to run near the machine's conv rate (docs/scaling.md). All of GSFT's
SFT layers read one condition, so their hidden convolutions can be one wide convolution over the concatenated
weights (the condition is read once), and the output convolutions one grouped convolution. This bench times the
forward and backward of `--layers` SFT layers (GSFT CPU preset: 8 blocks x 2 + the final one = 17) three ways on
the same weights and inputs, interleaved, and prints each merged way's time over the per-layer one
(`ratio merged/per-layer (<way>)`; above 1 = slower). The outputs are checked equal first.
"""

from __future__ import annotations

import argparse
import sys

import torch
from timing import interleaved, load_average, positive_int, ratios, write_json
from torch import Tensor
from torch.nn import functional as F

from cnnprior.gan.models.sft import SFT_SLOPE, SFTLayer


def per_layer(layers: list[SFTLayer], xs: list[Tensor], cond: Tensor) -> Tensor:
    """The models' own path: each layer computes its scale and shift from the condition."""
    return torch.stack([layer(x, cond).sum() for layer, x in zip(layers, xs, strict=True)]).sum()


def merged(layers: list[SFTLayer], xs: list[Tensor], cond: Tensor, grouped: bool) -> Tensor:
    """All hidden 1x1 convolutions as one wide convolution; the output ones grouped or one per branch."""
    branches = [branch for layer in layers for branch in (layer.scale, layer.shift)]
    hidden = F.leaky_relu(F.conv2d(cond, torch.cat([b[0].weight for b in branches]),
                                   torch.cat([b[0].bias for b in branches])), SFT_SLOPE, inplace=True)
    biases = [b[2].bias + 1.0 if i % 2 == 0 else b[2].bias for i, b in enumerate(branches)]
    if grouped:
        mods = F.conv2d(hidden, torch.cat([b[2].weight for b in branches]), torch.cat(biases),
                        groups=len(branches)).split(branches[0][2].out_channels, dim=1)
    else:
        parts = hidden.split(branches[0][0].out_channels, dim=1)
        mods = [F.conv2d(h, b[2].weight, bias) for h, b, bias in zip(parts, branches, biases, strict=True)]
    return torch.stack([torch.addcmul(mods[2 * i + 1], x, mods[2 * i]).sum() for i, x in enumerate(xs)]).sum()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=positive_int, default=17, help="SFT layers on one condition (GSFT CPU: 17)")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--size", type=positive_int, default=64)
    p.add_argument("--width", type=positive_int, default=32, help="features, condition and hidden channels")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true", help="batch 2, size 16, one repeat: checks the code paths")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.size, args.repeats = 2, 16, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w, cl = args.width, torch.channels_last
    layers = [SFTLayer(w, w, w).to(memory_format=cl) for _ in range(args.layers)]
    cond = torch.randn(args.batch, w, args.size, args.size).to(memory_format=cl).requires_grad_()
    xs = [torch.randn_like(cond).requires_grad_() for _ in range(args.layers)]
    with torch.no_grad():
        ref = per_layer(layers, xs, cond)
        for grouped in (True, False):
            if not torch.allclose(merged(layers, xs, cond, grouped), ref, rtol=1e-4):
                print(f"error: the merged path (grouped={grouped}) differs from the per-layer one", file=sys.stderr)
                return 1
    fns = {
        "per-layer": lambda: per_layer(layers, xs, cond).backward(),
        "wide hidden + grouped out": lambda: merged(layers, xs, cond, True).backward(),
        "wide hidden + per-branch out": lambda: merged(layers, xs, cond, False).backward(),
    }
    times = interleaved(fns, args.repeats, torch.device("cpu"))
    results: dict[str, float | str] = {"load_average": load_average()}
    print(f"{args.layers} SFT layers, width {w}, batch {args.batch}, size {args.size}, "
          f"{torch.get_num_threads()} threads, load average {load_average()}")
    for name, t in times.items():
        results[f"seconds {name}"] = min(t)
        print(f"{name}: {min(t) * 1e3:.0f} ms per forward + backward")
    for name in list(fns)[1:]:
        results[f"ratio merged/per-layer ({name})"] = ratios(times[name], times["per-layer"])
        print(f"ratio merged/per-layer ({name}): {results[f'ratio merged/per-layer ({name})']:.2f}")
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
