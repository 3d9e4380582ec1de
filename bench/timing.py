"""What the benchmarks share: timing a call (CUDA-synchronised), interleaved rounds, medians of paired ratios,
the load average, the device flag and the `--json` results file."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def load_average() -> str:
    """The 1-minute load average (other jobs slow small ops most), or '?' where unknown."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def resolve_bench_device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    """`auto` = cuda when available; `cuda` without a GPU is the parser's one-line error (exit 2)."""
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (use --device cpu)")
    use_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def device_name(device: torch.device) -> str:
    """The GPU's name, or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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


def ratios(num: list[float], den: list[float]) -> float:
    """Median over repeats of num[i] / den[i]."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is argparse's one-line error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def write_json(path: str | None, results: dict) -> None:
    """Write a benchmark's results as JSON (for bench/device.sh's summary), if a path was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
