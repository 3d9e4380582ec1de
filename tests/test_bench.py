"""Smoke tests of the benchmarks' code paths on tiny sizes (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnprior.data.sources.shapes import ShapesSource
from tests.helpers import REPO


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_shapes_bench_prints_its_ratio_lines(capsys: pytest.CaptureFixture[str]) -> None:
    assert _bench("shapes").main(["--sizes", "16", "24", "--count", "3", "--repeats", "2"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-2:]
    for size, line in zip((16, 24), last, strict=True):
        assert re.fullmatch(rf"size {size}: shapes \d+ img/s, ratio shapes/noise: \d+\.\d\d", line), line


def test_sft_merge_bench_checks_equal_outputs_and_prints_its_ratios(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sft.json"
    assert _restoring_threads(lambda: _bench("sft_merge").main(["--quick", "--layers", "3", "--json", str(out)])) == 0
    last = capsys.readouterr().out.strip().splitlines()[-3:]
    ways = ("product \\+ add_", "wide hidden \\+ grouped out", "wide hidden \\+ per-branch out")
    for way, line in zip(ways, last, strict=True):
        assert re.fullmatch(rf"ratio {way}/models: \d+\.\d\d", line), line
    assert len([k for k in json.loads(out.read_text()) if k.startswith("ratio ")]) == 3


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


def _restoring_threads(fn):
    """Run fn() and put torch's thread count back (the benchmarks set their own)."""
    threads = torch.get_num_threads()
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_fashion_mnist_fixture_reads_back_through_the_source(tmp_path: Path) -> None:
    """The priors bench's stage fixture is Fashion-MNIST as torchvision reads it: 28x28 gray, labels i mod 10."""
    from cnnprior.data.sources.torchvision_sets import fashion_mnist

    bench = _bench("priors")
    root = bench.write_fashion_mnist_fixture(tmp_path / "fm", 12)
    test, train = fashion_mnist(str(root), "test"), fashion_mnist(str(root), "train")
    assert (len(test), len(train)) == (12, 10)
    assert test.labels.tolist() == [i % 10 for i in range(12)]
    img, mask = test.load(3)
    assert img.shape == (28, 28, 3) and img.dtype == np.uint8 and mask is None
    assert (img[..., 0] == img[..., 2]).all() and img.std() > 5  # gray, not blank
    shapes = ShapesSource(12, 28, seed=0).load(3)[0]
    assert np.array_equal(img[..., 0], shapes.mean(2).round().astype(np.uint8))


def test_priors_bench_quick_prints_every_ratio_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench("priors")
    out = tmp_path / "priors.json"
    assert _restoring_threads(lambda: bench.main(["--quick", "--stage-data", "fixture", "--json", str(out)])) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    labels = ["extraction/per-layer \\(resnet18 64px\\)", "extraction/bare \\(shipped cnn 128px\\)",
              "extraction/bare \\(resnet18 64px\\)", "stage/extraction"]
    for label, line in zip(labels, lines[-4:], strict=True):
        assert re.fullmatch(rf"ratio {label}: \d+\.\d\d", line), line
    assert re.fullmatch(r"load average: \S+ at start, \S+ at end", lines[-5])
    assert any(line.startswith("stage: write_prior_file over 4 images of a Fashion-MNIST-format fixture")
               for line in lines)
    results = json.loads(out.read_text())
    assert set(results["images_per_s"]) == {"shipped cnn 128px", "resnet18 64px", "stage"}
    assert set(results["images_per_s"]["resnet18 64px"]) == {"bare", "bare-full", "extraction", "per-layer"}
    assert all(v > 0 for g in results["images_per_s"].values() for v in g.values())
    assert results["threads"] == 1 and len(results["ratios"]) == 4


@pytest.mark.parametrize("flags", [["--workers", "-1"], ["--repeats", "0"], ["--stage-data", "imagenet"]])
def test_priors_bench_bad_flags_exit_2(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _bench("priors").main(flags)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_classifier_bench_steps_update_the_weights(dtype: torch.dtype | None) -> None:
    run = _bench("classifier").train_steps_fn("resnet18", 32, 2, 2, torch.device("cpu"), dtype)
    before = [p.detach().clone() for p in run.model.parameters()]
    run()
    changed = sum(not torch.equal(a, p) for a, p in zip(before, run.model.parameters(), strict=True))
    assert changed > len(before) // 2
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_device_summary_reports_missing_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "classifier.json").write_text(json.dumps({
        "device": "cpu", "device_name": "cpu", "results": {"train classifier resnet18 32px fp32": 12.5}}))
    assert _bench("device_summary").main([str(tmp_path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "summary: device cpu (cpu)", "summary: priors: missing", "summary: generator: missing",
        "summary: classifier training resnet18 32px fp32: 12.5 images/s"]


DEVICE_LINES = [  # every figure bench/device.sh promises, as `--device cpu --quick` prints it
    r"gpu: none \(--device cpu\) \| torch .*",
    r"ratio extraction/per-layer \(resnet18 64px\): \d+\.\d\d",
    r"ratio extraction/bare \(shipped cnn 128px\): \d+\.\d\d",
    r"ratio extraction/bare \(resnet18 64px\): \d+\.\d\d",
    r"ratio stage/extraction: \d+\.\d\d",
    *(rf"{v} {p} +\{{.*\}} [\d.]+ M params \| [\d.]+ GFLOP/image \| [\d.]+ images/s \| .*"
      for p in ("cpu", "cpu64", "paper") for v in ("lsft", "gsft")),
    *(rf"train {v} {p} {d} batch 2 size 16: [\d.]+ images/s \| [\d.]+ GFLOP/image/step \| [\d.]+ GFLOP/s"
      for p in ("cpu", "cpu64", "paper") for v in ("lsft", "gsft") for d in ("fp32", "bf16 autocast")),
    *(rf"ratio train/conv \({v} {p} {d}\): \d+\.\d\d" for p in ("cpu", "cpu64", "paper") for v in ("lsft", "gsft")
      for d in ("fp32", "bf16")),
    r"train classifier resnet18 32px fp32 batch 2: [\d.]+ images/s",
    r"train classifier resnet18 32px bf16 autocast batch 2: [\d.]+ images/s",
    r"summary: device cpu \(cpu\)",
    r"summary: priors extraction \(shipped cnn 128px\): [\d.]+ images/s, bare forward\+backward [\d.]+ images/s, "
    r"ratio extraction/bare \d+\.\d\d",
    r"summary: priors extraction \(resnet18 64px\): .*, ratio extraction/bare \d+\.\d\d",
    r"summary: priors stage: [\d.]+ images/s, extraction alone [\d.]+ images/s, ratio stage/extraction \d+\.\d\d",
    *(rf"summary: gan training {v} paper {d}: [\d.]+ images/s" for v in ("lsft", "gsft") for d in ("fp32", "bf16")),
    *(rf"summary: generator inference {v} {p}: [\d.]+ images/s" for p in ("paper", "cpu", "cpu64") for v in ("lsft", "gsft")),
    r"summary: classifier training resnet18 32px fp32: [\d.]+ images/s",
    r"summary: classifier training resnet18 32px bf16: [\d.]+ images/s",
]


def test_device_script_cpu_quick_prints_every_figure(tmp_path: Path) -> None:
    """`bash bench/device.sh --device cpu --quick`, exactly as documented (no timing is asserted)."""
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", OUT=str(tmp_path))
    proc = subprocess.run(["bash", "bench/device.sh", "--device", "cpu", "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    missing = [pattern for pattern in DEVICE_LINES if not any(re.fullmatch(pattern, line) for line in lines)]
    assert not missing, (missing, proc.stdout[-3000:])
    assert sorted(p.name for p in (tmp_path / "device-bench").iterdir()) == [
        "classifier.json", "generator.json", "priors.json"]


@pytest.mark.parametrize("args", [["--device", "tpu"], ["--bogus"], ["--device"]])
def test_device_script_bad_arguments_exit_2_with_one_line(args: list[str]) -> None:
    proc = subprocess.run(["bash", "bench/device.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")


def test_grayscale_items_equal_the_rgb_path(tmp_path: Path) -> None:
    """SplitView resizes a grayscale source's one plane (load_native) and repeats it: the same pixels, bit for
    bit, as resizing the three-channel image (the faster path the priors stage bench measures)."""
    from cnnprior.core.config import load_config
    from cnnprior.data.sources.base import resize_uint8
    from cnnprior.data.splits import load_split

    root = _bench("priors").write_fashion_mnist_fixture(tmp_path / "fm", 6)
    cfg = load_config(None, ["data.source=fashion_mnist", f"data.root={root}", "data.image_size=50"])
    ds = load_split(cfg.data, "test")
    assert ds.source.load_native(2)[0].shape == (28, 28)
    for i in range(len(ds)):
        item = ds[i]
        rgb = ds.source.load(item["index"])[0]
        expected = torch.from_numpy(resize_uint8(rgb, 50).copy()).permute(2, 0, 1).float() / 255.0
        assert item["image"].shape == (3, 50, 50) and item["image"].is_contiguous()
        assert torch.equal(item["image"], expected)
