"""Benchmark the generators: conv GFLOP/s of this machine, inference efficiency, LSFT vectorised vs loop.

Usage: python bench/generator.py [--batch 32] [--size 64] [--repeats 3] [--device auto|cpu|cuda]
                                 [--threads N] [--cpu-chunk-mib M] [--train auto|on|off]
                                 [--train-preset all|paper|cpu|cpu64] [--train-batch 16] [--train-step]
                                 [--train-compile] [--train-profile fp32|bf16]
                                 [--json PATH] [--quick]

Inference: images/s, GFLOP/s and efficiency (against a 64->64 3x3 conv) of LSFT and GSFT in every preset.
Training (`--train`, on by default on CUDA): images/s of one pix2pix step (D then G) of each variant in
`--train-preset` (default all), fp32 and bf16 autocast, and the training-step efficiency
`ratio train/conv (<variant> <preset> <precision>)`: the step's counted FLOPs per second over the reference conv's,
timed interleaved. The step is the trainer's own (cnnprior.gan.train.build_trainer and train_step: foreach Adam,
channels_last, gan.precision's autocast, the presets' discriminator widths), under its backend settings.
`--train-step` times only the CPU-preset training steps (fp32); `--train-compile` times them compiled;
`--train-profile fp32|bf16` prints the ops that bound one training step of each `--train-preset` preset (torch.profiler,
self time).
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
    timer,
    write_json,
)
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from cnnprior.core.config import GANConfig
from cnnprior.gan import train as gan_train
from cnnprior.gan.models import build_generator, sft

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
    # wider than "cpu" (LSFT also shallower): 3x3 convolutions carry more of the step, the SFT layers' 1x1
    # convolutions and elementwise passes (memory-bound, docs/scaling.md#training-speed) less. GSFT keeps the
    # 8 blocks: with 3 it lost val r (docs/scaling.md#a-wider-cpu-preset-for-fp32)
    "cpu64": {
        "lsft": {"width": 64, "depth": 1, "cond_channels": 32, "cond_hidden": 32},
        "gsft": {"width": 64, "depth": 8, "cond_channels": 32, "cond_hidden": 64},
    },
}
# gan.disc_width of the configs of each preset (configs/fashion_<variant>_<preset>.yaml)
DISC_WIDTH = {"paper": 64, "cpu": 32, "cpu64": 32}


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
        for preset in PRESETS:
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
                    f"{variant} {preset:6s} {PRESETS[preset][variant]} {params:.2f} M params | "
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


def train_config(variant: str, preset: str, precision: str = "fp32", device: str = "cpu") -> GANConfig:
    """The GAN config of a preset as configs/fashion_<variant>_<preset>.yaml sets it (defaults: Adam 2e-4, betas
    0.5/0.999, BCE-with-logits adversarial + 100 * L1)."""
    return GANConfig(variant=variant, **PRESETS[preset][variant], disc_width=DISC_WIDTH[preset],
                     precision=precision, device=device)


def train_step_fn(
    variant: str, preset: str, batch: int, size: int, device: torch.device, dtype: torch.dtype | None = None,
    precision: str | None = None, compile: bool = False,
) -> Callable[[], object]:
    """One training step exactly as `train.py --stage gan` runs it: the trainer gan.train.build_trainer builds
    (foreach Adam, fused on CUDA; channels_last networks; gan.precision's autocast) stepped by
    gan.train.train_step (D on the real and fake pairs in one forward, then G). `dtype` (None or torch.bfloat16)
    is the older way to say `precision`."""
    if precision is None:
        precision = next(name for name, dt in PRECISIONS.items() if dt == dtype)
    tr = gan_train.build_trainer(train_config(variant, preset, precision, device.type), N_PRIORS, device)
    if compile:
        gan_train.compile_trainer(tr, device, print)
    image, priors, target = make_inputs(batch, size, device)

    def step() -> Tensor:
        return gan_train.train_step(tr, image, priors, target)

    step.generator = tr.g  # type: ignore[attr-defined]  # for the smoke test
    step.trainer = tr  # type: ignore[attr-defined]
    return step


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def bench_training(
    presets: list[str], batch: int, size: int, repeats: int, device: torch.device, precisions: list[str],
    conv: Callable[[], object] | None = None, conv_flops: int = 0, compile: bool = False,
) -> dict[str, float]:
    """Print and return training images/s (generator + discriminator step) per preset, variant and precision and,
    with a conv reference, the training-step efficiency: the FLOPs of one full step (D and G, forward and
    backward, counted by torch.utils.flop_counter) per second over the reference conv's FLOP/s, both timed
    interleaved in the same repeats (`ratio train/conv (<variant> <preset> <precision>)`)."""
    results = {}
    for preset in presets:
        for variant in ("lsft", "gsft"):
            for precision in precisions:
                step = train_step_fn(variant, preset, batch, size, device, precision=precision)
                fns: dict[str, Callable[[], object]] = {"step": step}
                if conv is not None:
                    fns["conv"] = conv
                flops = count_flops(step)  # one full step: D fwd+bwd on real and fake pairs, G fwd+bwd
                if compile:  # after counting (eagerly); interleaved's warm-up call compiles
                    gan_train.compile_trainer(step.trainer, device, print)  # type: ignore[attr-defined]
                with gan_train.training_backends(device):
                    t = interleaved(fns, repeats, device)
                per = statistics.median(t["step"])
                shown = (precision if PRECISIONS[precision] is None else f"{precision} autocast") + (
                    " compiled" if compile else "")
                results[f"train {variant} {preset} {precision}"] = batch / per
                line = f"train {variant} {preset} {shown} batch {batch} size {size}: {batch / per:.1f} images/s"
                if conv is not None:
                    ratio = ratios([flops / s for s in t["step"]], [conv_flops / c for c in t["conv"]])
                    results[f"ratio train/conv {variant} {preset} {precision}"] = ratio
                    line += f" | {flops / batch / 1e9:.2f} GFLOP/image/step | {flops / per / 1e9:.1f} GFLOP/s"
                print(line, flush=True)
    return results


def profile_steps(
    preset: str, batch: int, size: int, device: torch.device, precision: str, rows: int = 12
) -> dict[str, list[dict[str, object]]]:
    """torch.profiler on one training step (after a warm-up step) of each variant of a preset: print and return the
    ops that take the most self CPU time (CUDA: self device time) per input shapes (a convolution's backward lists
    grad_output, input, weight), with their share of the step."""
    import gc

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for variant in ("lsft", "gsft"):
        step = train_step_fn(variant, preset, batch, size, device, precision=precision)
        with gan_train.training_backends(device):
            step()
            plain = timer(device)(step)  # the profiler's own cost shows as the difference
            with profile(activities=acts, record_shapes=True) as prof:
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -getattr(e, key))
        total = sum(getattr(e, key) for e in events) or 1
        top = [{"op": e.key, "inputs": " ".join("x".join(map(str, s)) for s in e.input_shapes[:3] if s),
                "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
               for e in events[:rows]]
        tables[variant] = top
        print(f"profile {variant} {preset} {precision} batch {batch} size {size}: {total / 1e3:.0f} ms self time "
              f"in all (step unprofiled {plain * 1e3:.0f} ms); top ops by self time")
        print(f"  {'op':28s} {'inputs':42s} {'calls':>5s} {'self ms':>8s} {'share':>6s}")
        for row in top:
            print(f"  {row['op'][:28]:28s} {row['inputs'][:42]:42s} {row['calls']:5d} {row['self_ms']:8.1f} "
                  f"{row['share']:6.1%}")
        del step, prof, events  # a second profile in a process still holding the first ran 2-3x slow here
        gc.collect()
    return tables


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
                        help="the preset(s) --train times (default all: cpu, cpu64 and paper)")
    parser.add_argument("--train-step", action="store_true", help="only time CPU-preset training steps (fp32)")
    parser.add_argument("--train-profile", choices=[*sorted(PRECISIONS)], default=None,
                        help="only profile one training step per variant of each --train-preset preset at this "
                             "precision (top ops by self time, torch.profiler)")
    parser.add_argument("--train-compile", action="store_true",
                        help="time the training steps through torch.compile (gan.compile: true; compiling takes "
                             "about a minute per step function on a CPU)")
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
    if args.train_profile:
        for preset in sorted(PRESETS) if args.train_preset == "all" else [args.train_preset]:
            profile_steps(preset, args.train_batch, args.size, device, args.train_profile)
        return 0
    if args.train_step:
        bench_training(["cpu"], args.train_batch, args.size, args.repeats, device, ["fp32"],
                       compile=args.train_compile)
        return 0
    results = bench_inference(args, device)
    if args.train == "on" or (args.train == "auto" and device.type == "cuda"):
        conv, conv_flops = conv_reference(args.batch, args.size, device)
        presets = sorted(PRESETS) if args.train_preset == "all" else [args.train_preset]
        results.update(bench_training(presets, args.train_batch, args.size, args.repeats, device,
                                      list(PRECISIONS), conv, conv_flops, compile=args.train_compile))
    print(f"conv 64->64 3x3 reference: {results['conv']:.1f} GFLOP/s | load average {load_average()}")
    for preset in PRESETS:
        for variant in ("lsft", "gsft"):
            print(f"{variant} {preset} efficiency: {results[f'{variant} {preset} efficiency']:.2f}")
    print(f"lsft vectorised/loop: {results['lsft vectorised/loop']:.2f}")
    print_train_ratios(results)
    write_json(args.json, {"device": str(device), "device_name": device_name(device),
                           "threads": torch.get_num_threads(), "settings": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
