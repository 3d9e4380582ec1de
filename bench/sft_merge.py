"""Benchmark rewrites of the SFT layer's training arithmetic against the models' own: merged convolutions, no addcmul_.

Usage: python bench/sft_merge.py [--layers 17] [--batch 16] [--size 64] [--repeats 3] [--threads N] [--json PATH]
                                 [--train-steps] [--quick]

In the CPU presets every SFT layer's scale and shift branches are two 32->32 1x1 convolutions on the condition, then
one 32->32 1x1 each: too little work per byte to run near the machine's conv rate (docs/scaling.md). Two rewrites:
- merged: all of GSFT's SFT layers read one condition, so their hidden convolutions can be one wide convolution over
  the concatenated weights (the condition is read once), and the output convolutions one grouped convolution, or
  one per branch on the wide output's channel slices;
- product + add_: the layer's output `x * (scale + 1) + shift` is `shift.addcmul_(x, scale + 1)` in the models,
  whose backward spends a scalar pass per input (grad * (other * value)); `(x * (scale + 1)).add_(shift)` has none.
This bench times the forward and backward of `--layers` SFT layers (GSFT CPU preset: 8 blocks x 2 + the final one =
17) each way on the same weights and inputs, interleaved, and prints each way's time over the models' path
(`ratio <way>/models`; above 1 = slower); the outputs are checked equal to float tolerance first. `--train-steps`
times whole training steps (bench/generator.py's, every variant, preset and precision) with the models' SFT layer
and with product + add_, interleaved (`ratio train step product + add_/models (<variant> <preset> <precision>)`).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator

import torch
from timing import interleaved, load_average, positive_int, ratios, write_json
from torch import Tensor
from torch.nn import functional as F

from cnnprior.gan import step as gan_step
from cnnprior.gan.models.sft import SFT_SLOPE, SFTLayer


def product_add(layer: SFTLayer, x: Tensor, cond: Tensor) -> Tensor:
    """The SFT layer's output as a product, then an in-place add (no addcmul_)."""
    hidden_conv, act, out = layer.scale
    scale_plus_one = F.conv2d(act(hidden_conv(cond)), out.weight, out.bias + 1.0)
    return (x * scale_plus_one).add_(layer.shift(cond))


def per_layer(layers: list[SFTLayer], xs: list[Tensor], cond: Tensor, fn: Callable | None = None) -> Tensor:
    """Each layer computes its own scale and shift from the condition (fn None: the models' forward)."""
    return torch.stack([(fn(layer, x, cond) if fn else layer(x, cond)).sum()
                        for layer, x in zip(layers, xs, strict=True)]).sum()


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


@contextlib.contextmanager
def sft_forward(fn: Callable | None) -> Iterator[None]:
    """SFTLayer.forward replaced by fn (None: left as it is) for the duration."""
    original = SFTLayer.forward
    if fn is not None:
        SFTLayer.forward = fn
    try:
        yield
    finally:
        SFTLayer.forward = original


def bench_train_steps(batch: int, size: int, repeats: int, results: dict) -> None:
    """Whole training steps with the models' SFT layer vs product + add_, interleaved per configuration."""
    import generator as gen_bench  # bench/generator.py: the trainer's own step on each preset

    device = torch.device("cpu")
    for variant in ("lsft", "gsft"):
        for preset in sorted(gen_bench.PRESETS):
            for precision in sorted(gen_bench.PRECISIONS):
                step = gen_bench.train_step_fn(variant, preset, batch, size, device, precision=precision)

                def run(fn: Callable | None, step: Callable = step) -> None:
                    with sft_forward(fn):
                        step()

                with gan_step.training_backends(device):
                    times = interleaved({"models": lambda: run(None), "product": lambda: run(product_add)},
                                        repeats, device)
                key = f"ratio train step product + add_/models ({variant} {preset} {precision})"
                results[key] = ratios(times["product"], times["models"])
                print(f"{key}: {results[key]:.2f}  ({min(times['models']):.2f} s / {min(times['product']):.2f} s)",
                      flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=positive_int, default=17, help="SFT layers on one condition (GSFT CPU: 17)")
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--size", type=positive_int, default=64)
    p.add_argument("--width", type=positive_int, default=32, help="features, condition and hidden channels")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--train-steps", action="store_true",
                   help="also time whole training steps (every variant, preset, precision) with product + add_")
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
    ways: dict[str, Callable[[], Tensor]] = {
        "models": lambda: per_layer(layers, xs, cond),
        "product + add_": lambda: per_layer(layers, xs, cond, product_add),
        "wide hidden + grouped out": lambda: merged(layers, xs, cond, True),
        "wide hidden + per-branch out": lambda: merged(layers, xs, cond, False),
    }
    with torch.no_grad():
        ref = ways["models"]()
        for name, way in ways.items():
            if not torch.allclose(way(), ref, rtol=1e-4):
                print(f"error: the {name} path differs from the models' one", file=sys.stderr)
                return 1
    times = interleaved({name: (lambda way=way: way().backward()) for name, way in ways.items()}, args.repeats,
                        torch.device("cpu"))
    results: dict[str, float | str] = {"load_average": load_average()}
    print(f"{args.layers} SFT layers, width {w}, batch {args.batch}, size {args.size}, "
          f"{torch.get_num_threads()} threads, load average {load_average()}")
    for name, t in times.items():
        results[f"seconds {name}"] = min(t)
        print(f"{name}: {min(t) * 1e3:.0f} ms per forward + backward")
    for name in list(ways)[1:]:
        key = f"ratio {name}/models"
        results[key] = ratios(times[name], times["models"])
        print(f"{key}: {results[key]:.2f}")
    if args.train_steps:
        bench_train_steps(args.batch, args.size, args.repeats, results)
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
