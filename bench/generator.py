"""Benchmark the generators: conv GFLOP/s of this machine, inference efficiency, LSFT vectorised vs loop.

Usage: python bench/generator.py [--batch 32] [--size 64] [--repeats 3] [--device auto|cpu|cuda]
                                 [--threads N] [--cpu-chunk-mib M] [--train auto|on|off]
                                 [--train-preset all|paper|cpu] [--train-batch 16] [--train-step]
                                 [--json PATH] [--quick]

Inference: images/s, GFLOP/s and efficiency (against a 64->64 3x3 conv) of LSFT and GSFT in both presets.
Training (`--train`, on by default on CUDA): images/s of one pix2pix step (D then G) of each variant in
`--train-preset` (default both), fp32 and bf16 autocast, and the training-step efficiency
`ratio train/conv (<variant> <preset> <precision>)`: the step's counted FLOPs per second over the reference conv's,
timed interleaved. `--train-step` times only the CPU-preset training steps (fp32).
Timings are interleaved (reference conv, model, ...) and every ratio is taken per repeat, then the median,
so a machine shared with other jobs still gives comparable numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator

import torch
from timing import (
    device_name,
    interleaved,
    load_average,
    positive_int,
    ratios,
    resolve_bench_device,
    write_json,
)
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cnnprior.gan.models import build_discriminator, build_generator, sft

N_PRIORS = 8
# depth = n_plain for lsft, n_blocks for gsft (as in build_generator)
PRESETS: dict[str, dict[str, dict[str, int]]] = {
    "paper": {
        "lsft": {"width": 64, "depth": 7, "cond_channels": 32, "cond_hidden": 128},
        "gsft": {"width": 64, "depth": 32, "cond_channels": 32, "cond_hidden": 128},
    },
    "cpu": {
        "lsft": {"width": 32, "depth": 3, "cond_channels": 32, "cond_hidden": 64},
        "gsft": {"width": 32, "depth": 8, "cond_channels": 32, "cond_hidden": 64},
    },
}


def make_generator(variant: str, preset: str, device: torch.device) -> nn.Module:
    """A generator of the given preset, seeded, in eval mode on device."""
    torch.manual_seed(0)
    return build_generator(variant, N_PRIORS, **PRESETS[preset][variant]).to(device).eval()


def make_inputs(batch: int, size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Random image, priors and target map in [0, 1]."""
    g = torch.Generator().manual_seed(1)
    image = torch.rand(batch, 3, size, size, generator=g)
    priors = torch.rand(batch, N_PRIORS, size, size, generator=g)
    target = torch.rand(batch, 1, size, size, generator=g)
    return image.to(device), priors.to(device), target.to(device)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, counted by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """Turn TF32 off for a while, so that CUDA fp32 results are compared at fp32 precision."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def conv_reference(batch: int, size: int, device: torch.device) -> tuple[Callable[[], object], int]:
    """The 64->64 3x3 conv on (batch, 64, S, S) channels_last, and its FLOPs 2*B*Cin*Cout*9*S*S."""
    conv = nn.Conv2d(64, 64, 3, padding=1).to(device, memory_format=torch.channels_last)
    x = torch.randn(batch, 64, size, size, device=device).to(memory_format=torch.channels_last)
    # three calls per sample: a single one is short enough to be at the mercy of other jobs
    return (lambda: [conv(x) for _ in range(3)]), 3 * 2 * batch * 64 * 64 * 9 * size * size



def bench_inference(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Conv reference, images/s and efficiency of every variant x preset, and the LSFT loop ratio."""
    conv, conv_flops = conv_reference(args.batch, args.size, device)
    image, priors, _ = make_inputs(args.batch, args.size, device)
    results: dict[str, float] = {}
    conv_speeds: list[float] = []
    load = load_average()
    print(
        f"device {device} ({device_name(device)}) | threads {torch.get_num_threads()} | batch {args.batch} | "
        f"size {args.size} | "
        f"cpu chunk {sft.CPU_CHUNK_BYTES_PER_THREAD / (1 << 20):g} MiB/thread | load average {load}"
    )
    if device.type == "cpu" and load != "?" and float(load) > 0.5:
        print("note: other jobs are running; with threads >= free cores every small op waits on a descheduled")
        print("      thread, so efficiency reads low (try --threads 1 for a load-robust figure)")
    with torch.inference_mode():
        for preset in ("cpu", "paper"):
            for variant in ("lsft", "gsft"):
                gen = make_generator(variant, preset, device)
                fns: dict[str, Callable[[], object]] = {"conv": conv, "model": lambda gen=gen: gen(image, priors)}
                if variant == "lsft" and preset == "paper":
                    with exact_fp32():
                        vec, loop = gen(image, priors), gen.forward_per_sample_loop(image, priors)
                    diff = (vec - loop).abs().max().item()
                    assert diff <= 1e-5, f"LSFT vectorised and per-sample loop differ by {diff:.2e}"
                    fns["loop"] = lambda gen=gen: gen.forward_per_sample_loop(image, priors)
                # every op is per sample, so one sample's count times the batch is exact and cheaper
                flops = count_flops(lambda gen=gen: gen(image[:1], priors[:1])) * args.batch
                t = interleaved(fns, args.repeats, device)
                conv_speeds += [conv_flops / s / 1e9 for s in t["conv"]]
                speed = [flops / s / 1e9 for s in t["model"]]
                eff = ratios([flops / m for m in t["model"]], [conv_flops / c for c in t["conv"]])
                results[f"{variant} {preset} efficiency"] = eff
                results[f"infer {variant} {preset} images/s"] = args.batch / statistics.median(t["model"])
                params = sum(p.numel() for p in gen.parameters()) / 1e6
                print(
                    f"{variant} {preset:5s} {PRESETS[preset][variant]} {params:.2f} M params | "
                    f"{flops / args.batch / 1e9:.2f} GFLOP/image | "
                    f"{results[f'infer {variant} {preset} images/s']:.1f} images/s | "
                    f"{statistics.median(speed):.1f} GFLOP/s | efficiency {eff:.2f}"
                )
                if "loop" in t:
                    results["lsft vectorised/loop"] = ratios(t["loop"], t["model"])
                    print(
                        f"lsft paper per-sample loop: {args.batch / statistics.median(t['loop']):.1f} images/s "
                        f"(max |vectorised - loop| = {diff:.1e})"
                    )
    results["conv"] = statistics.median(conv_speeds)
    return results


def train_step_fn(
    variant: str, preset: str, batch: int, size: int, device: torch.device, dtype: torch.dtype | None
) -> Callable[[], object]:
    """One pix2pix step (D then G; BCE-with-logits adversarial + 100 * L1; Adam 2e-4, betas 0.5/0.999)."""
    gen = make_generator(variant, preset, device).train()
    disc = build_discriminator().to(device).train()
    opt_g = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    image, priors, target = make_inputs(batch, size, device)
    bce = nn.BCEWithLogitsLoss()

    def autocast() -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)

    def step() -> None:
        with autocast():
            fake = gen(image, priors)
            real_logits, fake_logits = disc(image, target), disc(image, fake.detach())
            loss_d = 0.5 * (
                bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))
            )
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with autocast():
            fake_logits = disc(image, fake)
            loss_g = bce(fake_logits, torch.ones_like(fake_logits)) + 100.0 * (fake.float() - target).abs().mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()

    step.generator = gen  # type: ignore[attr-defined]  # for the smoke test
    return step


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def bench_training(
    presets: list[str], batch: int, size: int, repeats: int, device: torch.device, precisions: list[str],
    conv: Callable[[], object] | None = None, conv_flops: int = 0,
) -> dict[str, float]:
    """Print and return training images/s (generator + discriminator step) per preset, variant and precision and,
    with a conv reference, the training-step efficiency: the FLOPs of one full step (D and G, forward and
    backward, counted by torch.utils.flop_counter) per second over the reference conv's FLOP/s, both timed
    interleaved in the same repeats (`ratio train/conv (<variant> <preset> <precision>)`)."""
    results = {}
    for preset in presets:
        for variant in ("lsft", "gsft"):
            for precision in precisions:
                step = train_step_fn(variant, preset, batch, size, device, PRECISIONS[precision])
                fns: dict[str, Callable[[], object]] = {"step": step}
                if conv is not None:
                    fns["conv"] = conv
                flops = count_flops(step)  # one full step: D fwd+bwd on real and fake pairs, G fwd+bwd
                t = interleaved(fns, repeats, device)
                per = statistics.median(t["step"])
                shown = precision if PRECISIONS[precision] is None else f"{precision} autocast"
                results[f"train {variant} {preset} {precision}"] = batch / per
                line = f"train {variant} {preset} {shown} batch {batch} size {size}: {batch / per:.1f} images/s"
                if conv is not None:
                    ratio = ratios([flops / s for s in t["step"]], [conv_flops / c for c in t["conv"]])
                    results[f"ratio train/conv {variant} {preset} {precision}"] = ratio
                    line += f" | {flops / batch / 1e9:.2f} GFLOP/image/step | {flops / per / 1e9:.1f} GFLOP/s"
                print(line, flush=True)
    return results


def print_train_ratios(results: dict[str, float]) -> None:
    """The figure of merit of training speed, one line per preset, variant and precision."""
    for key, value in results.items():
        if key.startswith("ratio train/conv "):
            variant, preset, precision = key.removeprefix("ratio train/conv ").split()
            print(f"ratio train/conv ({variant} {preset} {precision}): {value:.2f}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; the last lines carry the efficiency and loop-ratio figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=positive_int, default=32, help="inference batch (default 32)")
    parser.add_argument("--size", type=positive_int, default=64, help="image and prior size (default 64)")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--train", choices=["auto", "on", "off"], default="auto",
                        help="also time training steps, fp32 and bf16 autocast (auto: on CUDA only)")
    parser.add_argument("--train-preset", choices=[*sorted(PRESETS), "all"], default="all",
                        help="the preset(s) --train times (default all: cpu and paper)")
    parser.add_argument("--train-step", action="store_true", help="only time CPU-preset training steps (fp32)")
    parser.add_argument("--train-batch", type=positive_int, default=16,
                        help="training batch (default 16, the configs' gan.batch_size)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--cpu-chunk-mib", type=float, default=None, help="CPU inference chunk MiB per thread (0: no chunks)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--quick", action="store_true",
                        help="batch 2, size 16, one repeat: checks the code paths (the numbers mean little)")
    args = parser.parse_args(argv)
    if args.cpu_chunk_mib is not None and args.cpu_chunk_mib < 0:
        parser.error(f"--cpu-chunk-mib: {args.cpu_chunk_mib} is not >= 0")
    if args.quick:
        args.batch, args.size, args.repeats, args.train_batch = 2, 16, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_chunk_mib is not None:
        sft.CPU_CHUNK_BYTES_PER_THREAD = int(args.cpu_chunk_mib * (1 << 20)) or (1 << 62)
    device = resolve_bench_device(args.device, parser)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.train_step:
        bench_training(["cpu"], args.train_batch, args.size, args.repeats, device, ["fp32"])
        return 0
    results = bench_inference(args, device)
    if args.train == "on" or (args.train == "auto" and device.type == "cuda"):
        conv, conv_flops = conv_reference(args.batch, args.size, device)
        presets = sorted(PRESETS) if args.train_preset == "all" else [args.train_preset]
        results.update(bench_training(presets, args.train_batch, args.size, args.repeats, device,
                                      list(PRECISIONS), conv, conv_flops))
    print(f"conv 64->64 3x3 reference: {results['conv']:.1f} GFLOP/s | load average {load_average()}")
    print(f"lsft cpu efficiency: {results['lsft cpu efficiency']:.2f}")
    print(f"gsft cpu efficiency: {results['gsft cpu efficiency']:.2f}")
    print(f"lsft paper efficiency: {results['lsft paper efficiency']:.2f}")
    print(f"gsft paper efficiency: {results['gsft paper efficiency']:.2f}")
    print(f"lsft vectorised/loop: {results['lsft vectorised/loop']:.2f}")
    print_train_ratios(results)
    write_json(args.json, {"device": str(device), "device_name": device_name(device),
                           "threads": torch.get_num_threads(), "settings": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
