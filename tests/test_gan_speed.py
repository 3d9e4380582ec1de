"""Tests of GAN training speed settings: gan.precision (and the deprecated gan.amp), bf16 on CPU and its resume,
the multi-tensor optimisers, gan.compile's fallback, and the one step function shared by the trainer and the benchmark.
No wall time is asserted."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from cnnprior.core.config import GANConfig, load_config
from cnnprior.core.errors import UserError
from cnnprior.gan import step as gan_step
from cnnprior.gan import train as gan_train
from cnnprior.gan.train import adam, build_trainer, precision, run_gan_stage
from tests.helpers import REPO, N, gan_config, tiny_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("gan-speed")
    train, val = tiny_data(root)
    return root, train, val


def _bench_generator():
    spec = importlib.util.spec_from_file_location("bench_generator_speed", REPO / "bench" / "generator.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(REPO / "bench"))  # the bench imports its sibling `timing`
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module


def _tensors_equal(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ----------------------------------------------------------------------------------------- config
def test_precision_key_defaults_to_fp32_and_bad_values_are_one_line() -> None:
    assert load_config(None).gan.precision == "fp32" and precision(load_config(None).gan) == "fp32"
    assert precision(load_config(None, ["gan.precision=bf16"]).gan) == "bf16"
    for bad in ("gan.precision=fp16", "gan.precision=bf15", "gan.amp=fp16"):
        with pytest.raises(UserError) as exc:
            load_config(None, [bad])
        text = str(exc.value)
        assert "\n" not in text and f"key '{bad.split('=')[0]}'" in text, text
    assert "fp32, bf16, auto" in str(pytest.raises(UserError, load_config, None, ["gan.precision=fp16"]).value)


@pytest.mark.parametrize(("flags", "expected"), [({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"),
                                                  ({"avx512f", "avx2"}, "fp32"), (set(), "fp32")])
def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16(monkeypatch, flags: set, expected: str) -> None:
    monkeypatch.setattr(gan_step, "cpu_flags", lambda: flags)
    gc = load_config(None, ["gan.precision=auto"]).gan
    assert precision(gc, torch.device("cpu")) == expected
    assert precision(gc, torch.device("cuda")) == "fp32"  # not measured on GPUs: fp32 (TF32) there
    assert precision(gc) == "fp32"  # no device named: fp32
    tr = build_trainer(gc, 2, torch.device("cpu"))
    assert tr.precision == expected  # what the checkpoint records: the arithmetic the run used


def test_deprecated_amp_key_maps_to_precision() -> None:
    # saved configs (models/*.yaml, checkpoints) carry `amp: none`: it leaves gan.precision in charge
    assert precision(load_config(None, ["gan.amp=none", "gan.precision=bf16"]).gan) == "bf16"
    assert precision(load_config(None, ["gan.amp=none"]).gan) == "fp32"
    assert precision(load_config(None, ["gan.amp=bf16"]).gan) == "bf16"


# ----------------------------------------------------------------------------------------- trainer pieces
def test_trainer_builds_multi_tensor_adam_with_the_config_settings() -> None:
    """foreach Adam on the CPU (the same bits as the per-tensor loop of earlier runs), fused on CUDA."""
    gc = GANConfig(variant="lsft", width=8, depth=1, cond_channels=8, cond_hidden=8, disc_width=8, disc_layers=2,
                   lr=3e-4, beta1=0.4, beta2=0.99)
    tr = build_trainer(gc, N, torch.device("cpu"))
    for opt in (tr.opt_g, tr.opt_d):
        assert isinstance(opt, torch.optim.Adam)
        group = opt.param_groups[0]
        assert group["foreach"] is True and not group["fused"]
        assert (group["lr"], group["betas"]) == (3e-4, (0.4, 0.99))
    assert {p for g in tr.opt_g.param_groups for p in g["params"]} == set(tr.g.parameters())
    assert tr.precision == "fp32"
    # the networks keep channels_last weights (what oneDNN and cuDNN run fastest)
    assert tr.g.stem.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}], ids=["foreach", "fused"])
def test_an_older_checkpoints_optimiser_state_loads_into_this_builds_adam(impl: dict) -> None:
    """A checkpoint written before (no foreach / fused named) resumes with this build's implementation, and the
    fused kernel gets its float32 step counts (what CUDA runs; fused Adam also runs on the CPU)."""
    gc = GANConfig()
    w = torch.nn.Parameter(torch.randn(3, 3))
    old = torch.optim.Adam([w], lr=gc.lr, betas=(gc.beta1, gc.beta2), foreach=False)
    w.grad = torch.ones_like(w)
    old.step()
    new = torch.optim.Adam([w], lr=1.0, betas=(0.1, 0.2), **impl)
    gan_train.load_optimizer(new, old.state_dict(), gc)
    group = new.param_groups[0]
    assert {k: group[k] for k in impl} == impl and (group["lr"], group["betas"]) == (gc.lr, (gc.beta1, gc.beta2))
    assert new.state[w]["step"].dtype == torch.float32
    w.grad = torch.ones_like(w)
    new.step()
    assert new.state[w]["step"].item() == 2.0 and torch.isfinite(w).all()
    assert adam([w], gc, torch.device("cpu")).param_groups[0]["foreach"] is True


def test_bf16_steps_on_cpu_give_finite_losses() -> None:
    gc = GANConfig(variant="gsft", width=8, depth=1, cond_channels=8, cond_hidden=8, disc_width=8, disc_layers=2,
                   precision="bf16")
    tr = build_trainer(gc, N, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch = [torch.rand(4, c, 16, 16, generator=g) for c in (3, N, 1)]
    before = tr.g.head.weight.detach().clone()
    for _ in range(3):
        stats = gan_train.train_step(tr, *batch)
        assert stats.dtype == torch.float64 and torch.isfinite(stats).all(), stats
    assert not torch.equal(before, tr.g.head.weight) and tr.g.head.weight.dtype == torch.float32
    with tr.autocast():  # the autocast really is bf16 on the CPU
        assert tr.g.stem(batch[0]).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------- the step function
def test_the_bench_and_the_training_loop_step_through_train_step(data, monkeypatch) -> None:
    assert gan_train.train_step is gan_step.train_step and gan_train.Trainer is gan_step.Trainer
    calls: list[str] = []
    real = gan_train.train_step

    def counting(tr, image, priors, target, reference=None, paired=None):
        calls.append("step")
        return real(tr, image, priors, target, reference, paired)

    monkeypatch.setattr(gan_train, "train_step", counting)
    bench = _bench_generator()
    step = bench.train_step_fn("lsft", "cpu", batch=2, size=16, device=torch.device("cpu"), precision="bf16")
    stats = step()
    assert calls == ["step"] and torch.isfinite(stats).all()
    tr = step.trainer
    assert isinstance(tr, gan_train.Trainer) and tr.precision == "bf16"
    assert tr.opt_g.param_groups[0]["foreach"] is True
    cpu = bench.train_config("lsft", "cpu")
    assert (cpu.disc_width, tr.d.body[0].out_channels) == (32, 32)  # the CPU configs' discriminator
    assert tr.opt_g.param_groups[0]["lr"] == cpu.lr == 2e-4 and tr.l1_weight == 100.0 and tr.crit.kind == "bce"
    # the old dtype argument still names the precision
    assert bench.train_step_fn("gsft", "cpu", 2, 16, torch.device("cpu"), torch.bfloat16).trainer.precision == "bf16"

    calls.clear()
    root, train, val = data
    run_gan_stage(load_config(gan_config(root / "loop", train, val)), log=lambda _m: None)
    assert len(calls) == 1 + 4  # one step on copies that counts the FLOPs (core/budget.py), then 32 samples / batch 8


def test_training_backends_set_and_put_back_the_cpu_settings() -> None:
    import torch.utils.deterministic as det

    before = (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory,
              torch.get_float32_matmul_precision())
    with gan_train.training_backends(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled() and not det.fill_uninitialized_memory
    assert (torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory,
            torch.get_float32_matmul_precision()) == before


def test_bench_profiles_the_trainers_step(capsys) -> None:
    bench = _bench_generator()
    threads = torch.get_num_threads()
    try:
        # the cpu preset only: the paper preset alone takes minutes in bf16 on a CPU without native bf16
        assert bench.main(["--quick", "--train-profile", "bf16", "--train-preset", "cpu", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "profile lsft cpu64" not in out and "profile gsft paper" not in out
    for preset in ("cpu",):
        for variant in ("lsft", "gsft"):
            assert f"profile {variant} {preset} bf16 batch 2 size 16: " in out
    # the convolutions show among the top ops; which kernel runs them (mkldnn, the slow path for bf16 on a CPU
    # without native bf16) depends on the CPU
    assert re.search(r"aten::\S*conv\S*", out), out


# ----------------------------------------------------------------------------------------- runs
def test_bf16_run_on_cpu_records_its_precision_and_resumes(data) -> None:
    """bf16 autocast on the CPU: finite losses, the precision in the checkpoint, and a run resumed at an epoch
    boundary continues to the same weights as an uninterrupted one (measured bit-identical on CPU)."""
    root, train, val = data
    lines: list[str] = []
    first = gan_config(root / "bf16", train, val, amp="bf16")  # the deprecated key, mapped to precision bf16
    res = run_gan_stage(load_config(first), log=lines.append)
    assert "gan.amp is deprecated" in lines[0] and ", cpu, bf16" in lines[1]
    h = res["history"][0]
    assert all(math.isfinite(h[k]) for k in ("l1", "d_loss", "val_l1", "val_r")), h
    ck = torch.load(res["last"], weights_only=True)
    assert ck["precision"] == "bf16" and ck["config"]["gan"]["amp"] == "bf16"
    assert all(v.dtype == torch.float32 for v in ck["generator"].values() if v.is_floating_point())
    exported = torch.load(Path(res["last"]).with_name("tiny-lsft.pt"), weights_only=True)
    assert exported["precision"] == "bf16"  # kept in the generator-only export

    run_gan_stage(load_config(first, ["gan.epochs=2"]), resume=True, log=lambda _m: None)
    straight = gan_config(root / "bf16-straight", train, val, precision="bf16", epochs=2)
    run_gan_stage(load_config(straight), log=lambda _m: None)
    a = torch.load(res["last"], weights_only=True)
    b = torch.load(root / "bf16-straight" / "models" / "tiny-lsft-last.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for key in ("generator", "discriminator", "optim_g", "optim_d"):
        assert _tensors_equal(a[key], b[key]), key


def test_compile_without_a_working_compiler_warns_and_trains_eagerly(data, monkeypatch) -> None:
    monkeypatch.setattr(gan_step, "compiler_problem", lambda _device: "RuntimeError: no C++ compiler")
    root, train, val = data
    lines: list[str] = []
    with pytest.warns(RuntimeWarning, match="gan.compile: torch.compile does not work here"):
        res = run_gan_stage(load_config(gan_config(root / "nocc", train, val, compile=True)), log=lines.append)
    assert any("training in eager mode" in line for line in lines)
    assert not any(", compiled" in line for line in lines)
    assert res["step"] == 4 and math.isfinite(res["history"][0]["val_r"])


@pytest.mark.slow
def test_compiled_training_steps_match_eager_closely() -> None:
    """gan.compile where a compiler works (about a minute of compiling on a CPU): the compiled step trains like the
    eager one, to float tolerance (compiled kernels fuse, so not bit for bit)."""
    if gan_step.compiler_problem(torch.device("cpu")):
        pytest.skip("no working torch.compile here")
    gc = GANConfig(variant="lsft", width=8, depth=1, cond_channels=8, cond_hidden=8, disc_width=8, disc_layers=2)
    g = torch.Generator().manual_seed(0)
    batch = [torch.rand(4, c, 16, 16, generator=g) for c in (3, N, 1)]
    eager, compiled = build_trainer(gc, N, torch.device("cpu")), build_trainer(gc, N, torch.device("cpu"))
    assert gan_train.compile_trainer(compiled, torch.device("cpu"), lambda _m: None)
    for _ in range(2):
        a, b = gan_train.train_step(eager, *batch), gan_train.train_step(compiled, *batch)
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for (name, p), q in zip(eager.g.named_parameters(), compiled.g.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)
