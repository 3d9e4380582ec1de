"""Shared test helpers (imported as `tests.helpers`): the repo root, tiny prior files and GAN configs (S=16, n=4, a
learnable target: the mean of the priors), the environment and commands of child runs."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import yaml

from cnnprior.priors.priorfile import PRIORS_FORMAT, PriorWriter, record_dtype, to_u8

REPO = Path(__file__).resolve().parents[1]
SIZE, N = 16, 4
LAYERS = [f"layer{i}.conv" for i in range(6)]


def blob_maps(rng: np.random.Generator, count: int, n: int, size: int) -> np.ndarray:
    """(count, n, size, size) Gaussian blobs in [0, 1] at random centres and widths."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = rng.uniform(2, size - 2, (2, count, n, 1, 1))
    sigma = rng.uniform(1.5, 4.0, (count, n, 1, 1))
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))


def sidecar_meta(size: int = SIZE, n: int = N, split: str = "train", **overrides: object) -> dict:
    """A sidecar like the priors stage writes (format, spec, layer bookkeeping, dataset, cnn)."""
    order = LAYERS[:-1][::-1]
    positions = list(range(n))
    meta = {"format": PRIORS_FORMAT, "size": size, "n": n, "method": "gradcam", "order": "output_to_input",
            "target": "last", "include_target_layer": False, "explain": "predicted", "layers": LAYERS,
            "target_layer": LAYERS[-1], "average_order": order, "positions": positions,
            "prior_layers": [order[:p + 1] for p in positions], "split": split, "dataset": "shapes",
            "class_names": ["circle", "square"], "has_masks": False,
            "cnn": {"arch": "resnet18", "checkpoint": "models/tiny-cnn.pt", "checkpoint_sha256": "0" * 64,
                    "image_size": 32, "val_accuracy": 0.9}}
    meta.update(overrides)
    return meta


def write_priors(path: Path, count: int, seed: int, size: int = SIZE, n: int = N, **meta: object) -> Path:
    """A prior file whose target map is the mean of its n blob priors (so a generator can learn it)."""
    rng = np.random.default_rng(seed)
    priors = blob_maps(rng, count, n, size)
    side = sidecar_meta(size, n, **meta)
    rec = np.zeros(count, dtype=record_dtype(size, n, with_mask=bool(side["has_masks"])))
    rec["image"] = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    rec["priors"] = to_u8(priors)
    rec["target"] = to_u8(priors.mean(1))
    rec["label"] = rng.integers(0, 2, count)
    rec["pred"] = rec["explained"] = rec["label"]
    rec["prob"] = 0.9
    rec["index"] = np.arange(count)
    writer = PriorWriter(path, count, side)
    writer.write(rec)
    return writer.close()


def tiny_data(root: Path, train_count: int = 32, val_count: int = 16) -> tuple[Path, Path]:
    """Train and val prior files under root/npys."""
    return (write_priors(root / "npys" / "tiny-train.npy", train_count, seed=1),
            write_priors(root / "npys" / "tiny-val.npy", val_count, seed=2, split="val"))


def gan_config(root: Path, train: list[Path] | Path, val: Path, **gan: object) -> Path:
    """A YAML config for a tiny LSFT run (width 8, depth 1) writing under root/models."""
    settings = {"variant": "lsft", "width": 8, "depth": 1, "cond_channels": 8, "cond_hidden": 8, "disc_width": 8,
                "disc_layers": 2, "epochs": 1, "batch_size": 8, "lr": 1e-3, "device": "cpu", "seed": 0,
                "train": [str(p) for p in (train if isinstance(train, list) else [train])], "val": str(val),
                "out": str(root / "models" / f"tiny-{gan.get('variant', 'lsft')}")}
    settings.update(gan)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"tiny-{settings['variant']}.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "gan": settings}, sort_keys=False), encoding="utf-8")
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for child runs: repo importable, conftest's thread count (same arithmetic in every run)."""
    threads = os.environ.get("CNNPRIOR_TEST_THREADS", "1")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    env.update(extra)
    return env


def train_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(config), "--stage", "gan", *extra]


def stage_cmd(config: Path, stage: str, *extra: str) -> list[str]:
    """A stage run through the Python API with the tests' callbacks (`--kill-at N`, `--dump DIR`:
    tests/stage_runner.py); `stage_cmd(...)[1:]` after torchrun's options runs it under torchrun."""
    return [sys.executable, "-m", "tests.stage_runner", "--config", str(config), "--stage", stage, *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
