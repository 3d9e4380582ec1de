"""Benchmark the generators: conv GFLOP/s of this machine, inference efficiency, LSFT vectorised vs loop.

Usage: python bench/generator.py [--batch 32] [--size 64] [--repeats 3] [--device auto|cpu|cuda]
                                 [--threads N] [--cpu-chunk-mib M] [--train-step [--train-batch 16]]

Timings are interleaved (reference conv, model, ...) and every ratio is taken per repeat, then the median,
so a machine shared with other jobs still gives comparable numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnprior.models import build_discriminator, build_generator, sft  # noqa: E402

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


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function returning the wall time of one call, synchronising CUDA around it."""

    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, counted by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each fn, one warm-up then `repeats` rounds taking the fns in turn."""
    run = timer(device)
    for fn in fns.values():
        run(fn)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(run(fn))
    return times


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


def load_average() -> str:
    """The 1-minute load average (other jobs slow small ops most), or '?' where unknown."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def ratios(num: list[float], den: list[float]) -> float:
    """Median over repeats of num[i] / den[i]."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def bench_inference(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Conv reference, images/s and efficiency of every variant x preset, and the LSFT loop ratio."""
    conv, conv_flops = conv_reference(args.batch, args.size, device)
    image, priors, _ = make_inputs(args.batch, args.size, device)
    results: dict[str, float] = {}
    conv_speeds: list[float] = []
    load = load_average()
    print(
        f"device {device} | threads {torch.get_num_threads()} | batch {args.batch} | size {args.size} | "
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
                params = sum(p.numel() for p in gen.parameters()) / 1e6
                print(
                    f"{variant} {preset:5s} {PRESETS[preset][variant]} {params:.2f} M params | "
                    f"{flops / args.batch / 1e9:.2f} GFLOP/image | "
                    f"{args.batch / statistics.median(t['model']):.1f} images/s | "
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


def bench_training(
    preset: str, batch: int, size: int, repeats: int, device: torch.device, dtypes: list[torch.dtype | None]
) -> None:
    """Print training images/s (generator + discriminator step) per variant and precision."""
    for variant in ("lsft", "gsft"):
        for dtype in dtypes:
            step = train_step_fn(variant, preset, batch, size, device, dtype)
            t = statistics.median(interleaved({"step": step}, repeats, device)["step"])
            precision = "fp32" if dtype is None else f"{str(dtype).removeprefix('torch.')} autocast"
            print(f"train {variant} {preset} {precision} batch {batch} size {size}: {batch / t:.1f} images/s")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; the last lines carry the efficiency and loop-ratio figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--train-step", action="store_true", help="only time CPU-preset training steps")
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--cpu-chunk-mib", type=float, default=None, help="CPU inference chunk MiB per thread (0: no chunks)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_chunk_mib is not None:
        sft.CPU_CHUNK_BYTES_PER_THREAD = int(args.cpu_chunk_mib * (1 << 20)) or (1 << 62)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda:
        torch.backends.cudnn.benchmark = True
    if args.train_step:
        bench_training("cpu", args.train_batch, args.size, args.repeats, device, [None])
        return 0
    results = bench_inference(args, device)
    if use_cuda:
        bench_training("paper", args.batch, args.size, args.repeats, device, [None, torch.bfloat16])
    print(f"conv 64->64 3x3 reference: {results['conv']:.1f} GFLOP/s | load average {load_average()}")
    print(f"lsft cpu efficiency: {results['lsft cpu efficiency']:.2f}")
    print(f"gsft cpu efficiency: {results['gsft cpu efficiency']:.2f}")
    print(f"lsft paper efficiency: {results['lsft paper efficiency']:.2f}")
    print(f"gsft paper efficiency: {results['gsft paper efficiency']:.2f}")
    print(f"lsft vectorised/loop: {results['lsft vectorised/loop']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
