#!/usr/bin/env python
"""Benchmark imagefolder start-up on a folder of many tiny image files (built in a temporary folder).

Three start-ups over the same folder, timed in the same run, interleaved (rotating order) after one untimed
warm-up each (warm page cache); medians over `--repeats`; one thread; load average printed before and after:
  (a) eager:  the start-up before lazy validation (kept here, side by side): list every file with Path.rglob,
              then open and verify each one with Pillow -- one full pass over the files
  (b) lazy:   ImageFolderSource today: list the folders (os.scandir / os.walk); no file is opened
  (c) split:  load_split(train) today: (b) plus the deterministic stratified split (what train.py runs twice)

    python bench/imagefolder.py --files 100000 --repeats 3
The last line is `N files: eager X.XX s, lazy Y.YY s, lazy + split Z.ZZ s (eager/lazy R.Rx)`.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from cnnprior.core.config import load_config
from cnnprior.data.sources.base import IMAGE_EXTENSIONS
from cnnprior.data.sources.imagefolder import ImageFolderSource
from cnnprior.data.splits import load_split


def build_folder(root: Path, files: int, classes: int) -> Path:
    """root/class_<c>/<n>.png: `files` tiny (4x4) PNGs spread over `classes` folders, one colour per class."""
    blobs = []
    for c in range(classes):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (c * 25 % 256, 80, 160)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for n in range(files):
        c = n % classes
        (root / f"class_{c:02d}" / f"{n:07d}.png").write_bytes(blobs[c])
    return root


def readable(path: Path) -> bool:
    """The eager start-up's per-file check: open and verify with Pillow."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def eager_scan(root: Path) -> tuple[list[str], list[int]]:
    """The start-up before lazy validation: every file listed by rglob, then opened and verified."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted((root / c).rglob("*")):
            if not f.is_file() or f.name.startswith("."):
                continue
            if f.suffix.lower() in IMAGE_EXTENSIONS and readable(f):
                files.append(str(f))
                labels.append(ci)
    return files, labels


def lazy_scan(root: Path) -> tuple[list[str], list[int]]:
    """Today's start-up: ImageFolderSource lists the folders and opens nothing."""
    src = ImageFolderSource(str(root))
    return src.files, src.labels.tolist()


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=100_000, help="tiny image files in the folder")
    p.add_argument("--classes", type=int, default=10, help="class folders")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median reported)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-imagefolder-") as tmp:
        root = build_folder(Path(tmp) / "folder", args.files, args.classes)
        cfg = load_config(None, ["data.source=imagefolder", f"data.root={root}"]).data
        methods = {"eager": lambda: eager_scan(root), "lazy": lambda: lazy_scan(root),
                   "split": lambda: load_split(cfg, "train")}
        assert eager_scan(root) == lazy_scan(root), "eager and lazy start-ups must find the same files and labels"
        load_before = os.getloadavg()
        for fn in methods.values():  # warm-up: page cache and Python caches
            fn()
        runs: dict[str, list[float]] = {k: [] for k in methods}
        names = list(methods)
        for rep in range(args.repeats):
            for name in names[rep % 3:] + names[:rep % 3]:
                runs[name].append(timed(methods[name]))
                print(f"repeat {rep + 1}: {name} {runs[name][-1]:.3f} s", flush=True)
        load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"threads 1; load average (1/5/15 min) before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}")
    print(f"{args.files} files: eager {med['eager']:.2f} s, lazy {med['lazy']:.2f} s, lazy + split "
          f"{med['split']:.2f} s (eager/lazy {med['eager'] / med['lazy']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
