#!/usr/bin/env python
"""Benchmark the synthetic `shapes` generator (one core, random access by index).

For each size, timed in the same run and interleaved (rotating order, median over `--repeats`):
  (a) shapes:    ShapesSource(seed=0).load(i) for `--count` consecutive indices (image + exact mask)
  (b) noise:     one seeded generator per index drawing size x size x 3 float32 normals, scaled to uint8 --
                 the floor of a generator that draws its pixel noise per image, as the first shapes
                 generator did (567 img/s at 128 px); shapes takes its noise from a bank, so ratios above 1
                 are possible
Both are single-threaded numpy (no BLAS-sized products).

    python bench/shapes.py --sizes 64 128 --count 2000
The last line per size is `size S: shapes N img/s, ratio shapes/noise: X.XX`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from cnnprior.data.sources.shapes import ShapesSource


def noise_images(size: int, count: int) -> None:
    for i in range(count):
        rng = np.random.default_rng([0, i])
        img = rng.standard_normal(size=(size, size, 3), dtype=np.float32)
        np.clip(img * 40 + 128, 0, 255).astype(np.uint8)


def shapes_images(src: ShapesSource, count: int) -> None:
    for i in range(count):
        src.load(i)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256], help="image sizes in pixels")
    p.add_argument("--count", type=int, default=1000, help="images per timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    args = p.parse_args(argv)
    lines = []
    for size in args.sizes:
        src = ShapesSource(args.count, size, seed=0)
        src.load(0)  # builds the noise bank once, as a DataLoader worker does
        runs: dict[str, list[float]] = {"shapes": [], "noise": []}
        for rep in range(args.repeats):
            order = ["shapes", "noise"] if rep % 2 == 0 else ["noise", "shapes"]
            for name in order:
                t = time.perf_counter()
                shapes_images(src, args.count) if name == "shapes" else noise_images(size, args.count)
                runs[name].append(args.count / (time.perf_counter() - t))
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"{size:4d} px: shapes {med['shapes']:8.0f} img/s   noise-only {med['noise']:8.0f} img/s   "
              f"(runs: {', '.join(f'{x:.0f}' for x in runs['shapes'])})")
        lines.append(f"size {size}: shapes {med['shapes']:.0f} img/s, ratio shapes/noise: "
                     f"{med['shapes'] / med['noise']:.2f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
