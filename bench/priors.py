#!/usr/bin/env python
"""Benchmark the prior extraction against a bare forward+backward and grad-cam's one-call-per-layer method.

Randomly initialised ResNet-18 at 64x64, batch 32, CPU. Three methods, timed in the same run on the same
batches, interleaved (each repeat: a and b alternate `--inner` times in a rotating order, then c once); each
reports the median images/s over its runs:
  (a) bare:      forward + backward of the explained score (sum of the predicted logits) down to the first
                 conv layer's output -- the network work the extraction cannot avoid (no weight gradients,
                 like the extraction's autograd.grad); the usual full backward (weight gradients) is shown too
  (b) ours:      PriorExtractor (all 20 conv layers in one pass) + cumulative priors + records written to a
                 PriorWriter in a temp folder
  (c) per-layer: the released method: for each of the 20 conv layers a separate GradCAM(model, [layer])
                 call on the batch

    python bench/priors.py --batches 1 --repeats 3 --threads 1
The last two lines are `ratio extraction/bare: X.XX` and `ratio extraction/per-layer: Y.YY`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnprior.cnn import build_cnn  # noqa: E402
from cnnprior.layers import conv_layers  # noqa: E402
from cnnprior.priorfile import PRIORS_FORMAT, PriorWriter, make_records  # noqa: E402
from cnnprior.priors import PriorExtractor, PriorSpec  # noqa: E402
from cnnprior.sources.shapes import ShapesSource  # noqa: E402


def predicted_score(logits: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each image's predicted-class logit (the extraction's explained score)."""
    return logits.gather(1, logits.argmax(1, keepdim=True)).sum()


def bare_activation_backward(model: torch.nn.Module, first_conv: torch.nn.Module, x: torch.Tensor) -> None:
    """Backward from the score down to the first conv layer's output, as far as the extraction goes."""
    seen: list[torch.Tensor] = []
    handle = first_conv.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.enable_grad():
            score = predicted_score(model(x))
            torch.autograd.grad(score, seen[0])
    finally:
        handle.remove()


def bare_full_backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        predicted_score(model(x)).backward()
    model.zero_grad(set_to_none=True)


def per_layer_gradcam(model: torch.nn.Module, layers: list, x: torch.Tensor) -> list[np.ndarray]:
    maps = []
    for _, layer in layers:
        with GradCAM(model, target_layers=[layer]) as cam:
            maps.append(cam(x, None))
    model.zero_grad(set_to_none=True)
    return maps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=1, help="batches per method per repeat (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported (default 3)")
    p.add_argument("--inner", type=int, default=3,
                   help="runs of (a) and (b) per repeat, alternating; (c) runs once per repeat (default 3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="input and prior size in pixels")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_cnn("resnet18", [str(i) for i in range(10)], args.size).eval()
    layers = conv_layers(model)
    spec = PriorSpec(size=args.size, n=8)
    extractor = PriorExtractor(model, layers, spec)
    src = ShapesSource(args.batches * args.batch_size, args.size, seed=0)
    batches = []
    for b in range(args.batches):
        loaded = [src.load(b * args.batch_size + i) for i in range(args.batch_size)]
        images = torch.from_numpy(np.stack([im for im, _ in loaded])).permute(0, 3, 1, 2).float() / 255.0
        masks = torch.from_numpy(np.stack([mk for _, mk in loaded])).float()
        batches.append((images, masks, torch.from_numpy(src.labels[:args.batch_size].copy()),
                        torch.arange(b * args.batch_size, (b + 1) * args.batch_size)))
    n_images = args.batches * args.batch_size
    meta = {"format": PRIORS_FORMAT, **spec.as_dict(), **extractor.describe(), "class_names": model.class_names}
    print(f"resnet18 (random init), {len(layers)} conv layers, input {args.size}x{args.size}, batch "
          f"{args.batch_size}, {args.batches} batch(es), {args.repeats} repeats x ({args.inner} x a/b, 1 x c), "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")

    runs = args.repeats * args.inner
    with tempfile.TemporaryDirectory() as tmp:
        writer = PriorWriter(Path(tmp) / "warmup.npy", n_images, meta)

        def ours() -> None:
            for images, masks, labels, index in batches:
                out = extractor(images, labels)
                writer.write(make_records(out, images, labels, masks, index, spec.size, spec.n))

        cheap = {
            "bare": lambda: [bare_activation_backward(model, layers[0][1], x) for x, *_ in batches],
            "bare-full": lambda: [bare_full_backward(model, x) for x, *_ in batches],
            "extraction": ours,
        }
        ours()  # warm-up (allocator, first-call costs), not timed
        writer.close()
        writer = PriorWriter(Path(tmp) / "bench.npy", n_images * runs, meta)
        rates: dict[str, list[float]] = {k: [] for k in (*cheap, "per-layer")}

        def timed(name: str, run) -> None:
            t0 = time.perf_counter()
            run()
            rates[name].append(n_images / (time.perf_counter() - t0))

        for r in range(args.repeats):
            for i in range(args.inner):  # the cheap methods alternate, in a rotating order
                names = list(cheap)
                for name in names[(r + i) % 3:] + names[:(r + i) % 3]:
                    timed(name, cheap[name])
            timed("per-layer", lambda: [per_layer_gradcam(model, layers, x) for x, *_ in batches])
            print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " images/s",
                  flush=True)
        writer.close()

    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"(a) bare forward+backward to the activations: {med['bare']:8.1f} images/s")
    print(f"    (bare forward+backward with weight grads:  {med['bare-full']:8.1f} images/s)")
    print(f"(b) extraction, all layers + priors + writing:  {med['extraction']:8.1f} images/s")
    print(f"(c) grad-cam, one GradCAM call per layer:       {med['per-layer']:8.1f} images/s")
    print(f"ratio extraction/bare: {med['extraction'] / med['bare']:.2f}")
    print(f"ratio extraction/per-layer: {med['extraction'] / med['per-layer']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
