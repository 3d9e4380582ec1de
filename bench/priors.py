#!/usr/bin/env python
"""Benchmark the priors: one-pass extraction vs bare forward+backward (two CNNs), and the stage vs extraction.

Everything is timed in ONE run, with a fixed torch thread count (`--threads`, default 1), interleaved: every
repeat runs each group's methods `--inner` times in a rotating order (the per-layer method once), group after
group; images/s are medians over the runs, and a ratio is the median over runs of (numerator / denominator)
taken from the same round, so load from other jobs cancels as far as it can. The 1-minute load average is
printed at the start and at the end.

  shipped cnn  the shipped default's CNN, models/fashion_resnet18-cnn.pt (ResNet-18 at 128 px, loaded by
               cnnprior.priors.extract.extractor_for_checkpoint with configs/fashion_resnet18.yaml's priors section),
               on seeded random 128 px inputs
  resnet18     a randomly initialised ResNet-18 at 64 px on synthetic shapes images, its 20 conv layers read
               raw (the earlier measurement)
  stage        the priors stage, cnnprior.priors.stage.write_prior_file: a DataLoader over a data set split (loading,
               resizing), the extraction, and the records written to a prior file in a temp folder -- against
               the extraction alone on the same images, loaded beforehand. With the shipped CNN. `--stage-data`:
               `fixture` = Fashion-MNIST's idx files holding grayscale shapes images, written to a temp folder;
               `fashion_mnist` = the real files ($CNNPRIOR_DATASETS/fashion-mnist); `shapes` = the synthetic
               source drawn at 128 px; `auto` = fashion_mnist where its files exist, else fixture.
               `--workers` (default 0; the shipped config's data.num_workers is 1): on a CPU a forked worker
               costs the stage ~0.3-0.4 s per split (copy-on-write of the parent's memory while it lives) and
               saves ~1% (loading); on a GPU the workers are what keeps the extraction fed

Methods: bare = forward + backward of the explained score (the sum of each image's predicted logit) down to
the first map the extraction reads, no weight gradients (the network work the extraction cannot avoid);
bare-full = the usual backward with weight gradients (shown for reference); extraction = PriorExtractor's call
(every layer's CAM, min-max and resize, the cumulative priors and the target; records and writing are the
stage's, no longer part of it); per-layer = the released method, one GradCAM(model, [layer]) call per conv layer.

    python bench/priors.py                     # about 2 minutes on one idle core
    python bench/priors.py --quick             # a few seconds: the code paths, tiny sizes (tests)
    python bench/priors.py --device cuda --batches 8 --stage-images 2048 --workers 4

The last lines are `ratio extraction/per-layer (resnet18 64px): W.WW`, `ratio extraction/bare (shipped cnn
128px): X.XX`, `ratio extraction/bare (resnet18 64px): Y.YY` and `ratio stage/extraction: Z.ZZ`.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from timing import (
    device_name,
    load_average,
    positive_int,
    resolve_bench_device,
    timer,
    write_json,
)
from torch.utils.data import DataLoader

from cnnprior.cnn.layers import conv_layers
from cnnprior.cnn.model import build_cnn
from cnnprior.core.config import Config, load_config
from cnnprior.core.errors import cli_main
from cnnprior.data.sources.base import datasets_root
from cnnprior.data.sources.shapes import ShapesSource
from cnnprior.data.sources.torchvision_sets import FASHION_MNIST_FILES
from cnnprior.priors.extract import PriorExtractor, extractor_for_checkpoint
from cnnprior.priors.spec import PriorSpec
from cnnprior.priors.stage import file_meta, split_dataset, write_prior_file

REPO = Path(__file__).resolve().parents[1]

SHIPPED_CONFIG = REPO / "configs" / "fashion_resnet18.yaml"
SHIPPED_CNN = REPO / "models" / "fashion_resnet18-cnn.pt"
STAGE_DATA = ("auto", "fixture", "fashion_mnist", "shapes")


def predicted_score(logits: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each image's predicted-class logit (the extraction's explained score)."""
    return logits.gather(1, logits.argmax(1, keepdim=True)).sum()


def bare_activation_backward(model: torch.nn.Module, first: torch.nn.Module, x: torch.Tensor) -> None:
    """Backward from the score down to `first`'s output (its first call), as far as the extraction goes."""
    seen: list[torch.Tensor] = []
    handle = first.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.enable_grad():
            score = predicted_score(model(x))
            torch.autograd.grad(score, seen[0])
    finally:
        handle.remove()


def bare_full_backward(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Forward + the usual backward, weight gradients included."""
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        predicted_score(model(x)).backward()
    model.zero_grad(set_to_none=True)


def per_layer_gradcam(model: torch.nn.Module, layers: list, x: torch.Tensor) -> list[np.ndarray]:
    """The released method: one GradCAM call per layer."""
    maps = []
    for _, layer in layers:
        with GradCAM(model, target_layers=[layer]) as cam:
            maps.append(cam(x, None))
    model.zero_grad(set_to_none=True)
    return maps


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An idx ubyte file (magic 0x0000080N, big-endian int32 sizes, then the bytes)."""
    header = (0x800 + arr.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(data, 1) if path.suffix == ".gz" else data)


def write_fashion_mnist_fixture(root: Path, count: int) -> Path:
    """Fashion-MNIST's four idx files in torchvision's layout (root/FashionMNIST/raw, read in place): `count`
    test images (28x28 grayscale shapes), 10 training images."""
    src = ShapesSource(count, 28, seed=0)
    images = np.stack([src.load(i)[0].mean(2).round().astype(np.uint8) for i in range(count)])
    labels = (np.arange(count) % 10).astype(np.uint8)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    train_images, train_labels, test_images, test_labels = FASHION_MNIST_FILES
    for stem, arr in ((train_images, images[:10]), (train_labels, labels[:10]), (test_images, images),
                      (test_labels, labels)):
        write_idx(raw / stem, arr)
    return root


def shipped_config(*overrides: str) -> Config:
    """configs/fashion_resnet18.yaml with the shipped CNN and `overrides`."""
    return load_config(SHIPPED_CONFIG, [f"cnn.checkpoint={SHIPPED_CNN}", *overrides])


def stage_config(kind: str, images: int, tmp: Path) -> tuple[Config, str]:
    """The shipped config pointed at the stage's data (test split capped at `images`), and what that data is."""
    real = datasets_root() / "fashion-mnist"
    if kind == "auto":
        kind = "fashion_mnist" if (real / "t10k-images-idx3-ubyte.gz").is_file() else "fixture"
    cap = f"priors.test_limit={images}"
    if kind == "fashion_mnist":
        return shipped_config(f"data.root={real}", "data.limit=0", cap), f"Fashion-MNIST test set ('{real}')"
    if kind == "shapes":
        return (shipped_config("data.source=shapes", f"data.shapes_count={10 * images + 10}", "data.limit=0", cap),
                "synthetic shapes drawn at 128 px")
    root = write_fashion_mnist_fixture(tmp / "fashion-mnist", images)
    return shipped_config(f"data.root={root}", "data.limit=0", cap), "Fashion-MNIST-format fixture (28 px shapes)"


@dataclass
class Group:
    """Methods timed against each other on the same images: `methods` alternate `inner` times per repeat in a
    rotating order, `once` run once per repeat."""

    label: str
    images: int
    methods: dict[str, Callable[[], object]]
    inner: int = 1
    once: dict[str, Callable[[], object]] = field(default_factory=dict)
    rates: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.rates[name])

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of num's rate / den's rate (same round); for a once-per-repeat method, of medians."""
        a, b = self.rates[num], self.rates[den]
        if len(a) != len(b):
            return statistics.median(a) / statistics.median(b)
        return statistics.median(x / y for x, y in zip(a, b, strict=True))


def run_groups(groups: list[Group], repeats: int, device: torch.device) -> None:
    """One untimed warm-up call of every method, then `repeats` rounds over all groups; fills `rates`."""
    clock = timer(device)
    for g in groups:
        for fn in (*g.methods.values(), *g.once.values()):
            clock(fn)
        g.rates = {name: [] for name in (*g.methods, *g.once)}
    for r in range(repeats):
        for g in groups:
            names = list(g.methods)
            for i in range(g.inner):
                k = (r + i) % len(names)
                for name in names[k:] + names[:k]:
                    g.rates[name].append(g.images / clock(g.methods[name]))
            for name, fn in g.once.items():
                g.rates[name].append(g.images / clock(fn))
        print(f"repeat {r + 1}: " + "; ".join(
            f"{g.label}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in g.rates.items()) for g in groups)
            + " images/s", flush=True)


@dataclass
class Shipped:
    """The shipped CNN, loaded once: its extractor (the shipped config's priors section), model and metadata."""

    extractor: PriorExtractor
    model: torch.nn.Module
    meta: dict


def shipped_group(args: argparse.Namespace, shipped: Shipped, device: torch.device) -> tuple[Group, str]:
    """The shipped CNN at its input size on seeded random inputs: bare, bare-full, extraction."""
    extractor, model, meta = shipped.extractor, shipped.model, shipped.meta
    size = int(meta["image_size"])
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(args.batch_size, 3, size, size, generator=g).to(device) for _ in range(args.batches)]
    first = extractor.layers[0]
    group = Group(f"shipped cnn {size}px", args.batches * args.batch_size, {
        "bare": lambda: [bare_activation_backward(model, first, x) for x in batches],
        "bare-full": lambda: [bare_full_backward(model, x) for x in batches],
        "extraction": lambda: [extractor(x) for x in batches],
    }, inner=args.inner)
    about = (f"{group.label}: {meta['arch']} from {SHIPPED_CNN.relative_to(REPO)}, {extractor.conv_count} CAM "
             f"layers + target {extractor.target_name}, random {size}x{size} input, batch {args.batch_size} x "
             f"{args.batches}")
    return group, about


def resnet18_group(args: argparse.Namespace, device: torch.device) -> tuple[Group, str]:
    """A random-init ResNet-18 at 64 px on shapes images: bare, bare-full, extraction, and per-layer once."""
    size = 64
    torch.manual_seed(0)
    model = build_cnn("resnet18", [str(i) for i in range(10)], size).eval().to(device)
    layers = conv_layers(model)
    extractor = PriorExtractor(model, layers, PriorSpec(size=size, n=8))
    src = ShapesSource(args.batches * args.batch_size, size, seed=0)
    batches = []
    for b in range(args.batches):
        images = np.stack([src.load(b * args.batch_size + i)[0] for i in range(args.batch_size)])
        batches.append(torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0).contiguous().to(device))
    once = {"per-layer": lambda: [per_layer_gradcam(model, layers, x) for x in batches]} if args.per_layer else {}
    group = Group(f"resnet18 {size}px", args.batches * args.batch_size, {
        "bare": lambda: [bare_activation_backward(model, layers[0][1], x) for x in batches],
        "bare-full": lambda: [bare_full_backward(model, x) for x in batches],
        "extraction": lambda: [extractor(x) for x in batches],
    }, inner=args.inner, once=once)
    about = (f"{group.label}: resnet18 (random init), {len(layers)} conv layers (raw outputs), shapes images, "
             f"batch {args.batch_size} x {args.batches}")
    return group, about


def stage_group(args: argparse.Namespace, shipped: Shipped, tmp: Path) -> tuple[Group, str]:
    """write_prior_file over the stage data's test split vs the extraction alone on the same (preloaded) images."""
    cfg, what = stage_config(args.stage_data, args.stage_images, tmp)
    extractor, meta = shipped.extractor, shipped.meta
    ds = split_dataset(cfg, "test")
    file = file_meta(cfg, extractor, meta, ds, "test")
    batches = list(DataLoader(ds, batch_size=args.stage_batch_size, shuffle=False))
    out = tmp / "stage.npy"

    def stage() -> None:  # the same path each time: the finished file is replaced, as with --overwrite
        write_prior_file(extractor, ds, out, file, args.stage_batch_size, resume=False, overwrite=True,
                         num_workers=args.workers)

    group = Group("stage", len(ds), {"stage": stage,
                                     "extraction": lambda: [extractor(b["image"], b["label"]) for b in batches]},
                  inner=args.inner)
    about = (f"stage: write_prior_file over {len(ds)} images of a {what}, batch {args.stage_batch_size}, "
             f"{args.workers} DataLoader worker(s), shipped cnn, records to a temp folder")
    return group, about


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=positive_int, default=1, help="batches per extraction run (default 1)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="extraction batch size (default 32)")
    p.add_argument("--repeats", type=positive_int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--inner", type=positive_int, default=3,
                   help="runs of each group's methods per repeat, alternating (default 3)")
    p.add_argument("--stage-images", type=positive_int, default=128,
                   help="images the stage writes per run (default 128)")
    p.add_argument("--stage-batch-size", type=positive_int, default=64,
                   help="stage batch size (default 64, the shipped config's priors.batch_size)")
    p.add_argument("--stage-data", choices=STAGE_DATA, default="auto", help="the stage's images (default auto)")
    p.add_argument("--workers", type=int, default=0, help="the stage's DataLoader workers (default 0)")
    p.add_argument("--no-per-layer", dest="per_layer", action="store_false",
                   help="skip the per-layer grad-cam method (and its ratio line)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="default cpu")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, one repeat (checks the code paths; the numbers mean little)")
    args = p.parse_args(argv)
    if args.workers < 0:
        p.error(f"--workers: {args.workers} is not >= 0")
    if args.quick:
        args.batches, args.batch_size, args.repeats, args.inner = 1, 2, 1, 1
        args.stage_images, args.stage_batch_size = 4, 2
    return args, p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args, parser = parse_args(argv)
    device = resolve_bench_device(args.device, parser)
    torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    load_start = load_average()
    print(f"priors benchmark on {device} ({device_name(device)}), {torch.get_num_threads()} thread(s), torch "
          f"{torch.__version__}, {args.repeats} repeat(s) x {args.inner} inner; load average {load_start} at start",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-priors-") as tmp:
        shipped = Shipped(*extractor_for_checkpoint(shipped_config(), device))
        made = [shipped_group(args, shipped, device), resnet18_group(args, device),
                stage_group(args, shipped, Path(tmp))]
        for _, about in made:
            print(about, flush=True)
        groups = [g for g, _ in made]
        run_groups(groups, args.repeats, device)
    shipped, small, stage = groups
    for g in groups:
        print(f"{g.label}: " + ", ".join(f"{k} {g.median(k):.1f}" for k in g.rates) + " images/s (medians)")
    load_end = load_average()
    print(f"load average: {load_start} at start, {load_end} at end")
    ratios = {f"extraction/bare ({shipped.label})": shipped.ratio("extraction", "bare"),
              f"extraction/bare ({small.label})": small.ratio("extraction", "bare"),
              "stage/extraction": stage.ratio("stage", "extraction")}
    if args.per_layer:
        ratios = {f"extraction/per-layer ({small.label})": small.ratio("extraction", "per-layer"), **ratios}
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}")
    write_json(args.json, {
        "device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
        "load_average": {"start": load_start, "end": load_end}, "settings": vars(args),
        "images_per_s": {g.label: {k: g.median(k) for k in g.rates} for g in groups}, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())
