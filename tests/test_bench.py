"""Smoke tests of the benchmarks' code paths on tiny sizes (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from tests.helpers import REPO


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shapes_bench_prints_its_ratio_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench("shapes").main(["--sizes", "16", "24", "--count", "3", "--repeats", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-2:]
    for size, line in zip((16, 24), last, strict=True):
        assert re.fullmatch(rf"size {size}: shapes \d+ img/s, ratio shapes/noise: \d+\.\d\d", line), line


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("variant", ["lsft", "gsft"])
def test_generator_bench_training_step_runs_and_updates_weights(variant: str, dtype: torch.dtype | None) -> None:
    """The training-step path the CUDA run measures (fp32 and bf16 autocast), run here on the CPU."""
    bench = _bench("generator")
    step = bench.train_step_fn(variant, "cpu", batch=2, size=16, device=torch.device("cpu"), dtype=dtype)
    params = step.generator  # the step updates its generator: most weights must change
    before = [p.detach().clone() for p in params.parameters()]
    step()
    step()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, params.parameters(), strict=True))
    assert changed > len(before) // 2
    assert all(torch.isfinite(p).all() for p in params.parameters())
