"""Tests for cnnprior.gan.models: SFT parts, LSFT/GSFT generators, PatchGAN discriminator."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnprior.core.errors import UserError
from cnnprior.gan.models import (
    GSFTGenerator,
    LSFTGenerator,
    PatchDiscriminator,
    build_discriminator,
    build_generator,
    gsft,
    lsft,
    sft,
)
from cnnprior.gan.models.lsft import plain_blocks_per_gap
from cnnprior.gan.models.sft import CondNet, ResBlock, SFTLayer, SFTResBlock

N = 4  # priors
TINY = {"n_priors": N, "width": 8, "cond_channels": 4, "cond_hidden": 8}


def tiny(variant: str, depth: int = 2, seed: int = 0) -> nn.Module:
    """A tiny generator with fixed weights."""
    torch.manual_seed(seed)
    return build_generator(variant, depth=depth, **TINY)


def inputs(batch: int, size: int = 16, n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random image (B, 3, S, S) and priors (B, n, S, S) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g), torch.rand(batch, n, size, size, generator=g)


@pytest.mark.parametrize("variant", ["lsft", "gsft"])
@pytest.mark.parametrize("size", [16, 24])
def test_generator_shape_and_range(variant: str, size: int) -> None:
    gen = tiny(variant).eval()
    image, priors = inputs(2, size)
    with torch.no_grad():
        out = gen(image, priors)
    assert out.shape == (2, 1, size, size)
    assert out.dtype == torch.float32
    assert 0.0 <= out.min().item() and out.max().item() <= 1.0
    assert out.std().item() > 0  # depends on the input, not a constant


@pytest.mark.parametrize("variant", ["lsft", "gsft"])
def test_batching_does_not_change_per_sample_outputs(variant: str) -> None:
    gen = tiny(variant).eval()
    image, priors = inputs(17)
    with torch.no_grad():
        full = gen(image, priors)
        ones = torch.cat([gen(image[i : i + 1], priors[i : i + 1]) for i in range(17)])
        threes = torch.cat([gen(image[i : i + 3], priors[i : i + 3]) for i in range(0, 17, 3)])
    torch.testing.assert_close(ones, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(threes, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["lsft", "gsft"])
def test_cpu_inference_chunks_match_one_pass(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = tiny(variant).eval()
    image, priors = inputs(5)
    with torch.no_grad():
        whole = gen(image, priors)
        monkeypatch.setattr(sft, "CPU_CHUNK_BYTES_PER_THREAD", 1)  # one row per chunk, CondNet and trunk
        assert sft.inference_rows(image, 8) == 1
        chunked = gen(image, priors)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)
    assert sft.inference_rows(image, 8) == 5  # grad enabled (training): never chunked


@pytest.mark.parametrize(
    ("total", "rows", "expected"),
    [(32, 24, [(0, 16), (16, 32)]), (5, 1, [(i, i + 1) for i in range(5)]), (3, 8, [(0, 3)])],
)
def test_chunk_bounds_are_even(total: int, rows: int, expected: list[tuple[int, int]]) -> None:
    assert sft.chunk_bounds(total, rows) == expected


def test_lsft_vectorised_equals_per_sample_loop() -> None:
    gen = tiny("lsft", depth=3).eval()
    image, priors = inputs(3, 20)
    with torch.no_grad():
        torch.testing.assert_close(gen(image, priors), gen.forward_per_sample_loop(image, priors), atol=1e-5, rtol=0)


def test_lsft_condnet_called_once_on_all_priors() -> None:
    gen = tiny("lsft").eval()
    calls: list[tuple[int, ...]] = []
    handle = gen.cond_net.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    try:
        with torch.no_grad():
            gen(*inputs(3))
        assert calls == [(3 * N, 1, 16, 16)]
        calls.clear()
        with torch.no_grad():
            gen.forward_per_sample_loop(*inputs(3))
        assert calls == [(1, 1, 16, 16)] * (3 * N)
    finally:
        handle.remove()


def test_lsft_block_i_uses_prior_i() -> None:
    gen = tiny("lsft", depth=3).eval()
    sft_blocks = [b for b in gen.blocks if isinstance(b, SFTResBlock)]
    assert [b.cond_index for b in sft_blocks] == list(range(N))
    _, priors = inputs(2)
    with torch.no_grad():
        stack = gen.conditions(priors)
        assert stack.shape == (N, 2, TINY["cond_channels"], 16, 16)
        assert tiny("gsft").conditions(priors).shape == (1, 2, TINY["cond_channels"], 16, 16)
        for i in range(N):
            torch.testing.assert_close(stack[i], gen.cond_net(priors[:, i : i + 1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("n_sft", "n_plain", "expected"), [(8, 7, [1] * 7 + [0]), (4, 5, [2, 2, 1, 0]), (1, 3, [3])])
def test_plain_blocks_spread_between_sft_blocks(n_sft: int, n_plain: int, expected: list[int]) -> None:
    assert plain_blocks_per_gap(n_sft, n_plain) == expected


def test_lsft_trunk_layout() -> None:
    gen = build_generator("lsft", n_priors=8, width=8, depth=7, cond_channels=4, cond_hidden=8)
    kinds = ["S" if isinstance(b, SFTResBlock) else "P" for b in gen.blocks]
    assert "".join(kinds) == "SP" * 7 + "S"
    gen = build_generator("gsft", n_priors=8, width=8, depth=5, cond_channels=4, cond_hidden=8)
    assert len(gen.blocks) == 5 and all(isinstance(b, SFTResBlock) for b in gen.blocks)
    assert isinstance(gen.final_sft, SFTLayer)


def test_sft_layer_formula_on_hand_set_weights() -> None:
    layer = SFTLayer(channels=3, cond_channels=2, hidden=4)
    x = torch.randn(2, 3, 5, 5)
    cond = torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        torch.testing.assert_close(layer(x, cond), x)  # zero branches: scale 0, shift 0 -> identity
        layer.shift[2].bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
        layer.scale[2].bias.copy_(torch.tensor([1.0, 0.0, -1.0]))  # scale = 1, 0, -1 per channel
        expected = x * torch.tensor([2.0, 1.0, 0.0]).view(1, 3, 1, 1) + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
        torch.testing.assert_close(layer(x, cond), expected)
        # condition-dependent shift: hidden = relu-ish(cond[:, 0]), shift = 3 * hidden on every channel
        layer.scale[2].bias.zero_()
        layer.shift[2].bias.zero_()
        layer.shift[0].weight.zero_()
        layer.shift[0].weight[0, 0] = 1.0
        layer.shift[2].weight.zero_()
        layer.shift[2].weight[:, 0] = 3.0
        hidden = nn.functional.leaky_relu(cond[:, :1], 0.1)
        torch.testing.assert_close(layer(x, cond), x + 3.0 * hidden)


def test_condnet_shapes_and_leaky_slope() -> None:
    net = CondNet(in_channels=5, cond_channels=7, hidden=6)
    out = net(torch.rand(2, 5, 9, 9))
    assert out.shape == (2, 7, 9, 9)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] + [(1, 1)] * 4
    assert [c.out_channels for c in convs] == [6, 6, 6, 6, 7]
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}


def test_blocks_compose_as_pairs() -> None:
    torch.manual_seed(0)
    x, cond = torch.randn(2, 6, 8, 8), torch.randn(3, 2, 4, 8, 8)
    block = SFTResBlock(6, cond_channels=4, cond_index=2)
    out, cond_out = nn.Sequential(block, ResBlock(6))((x, cond))
    assert out.shape == x.shape and cond_out is cond
    # with zeroed second conv the SFT block is the identity (pure skip)
    nn.init.zeros_(block.conv2.weight)
    nn.init.zeros_(block.conv2.bias)
    torch.testing.assert_close(block((x, cond))[0], x)


def test_discriminator_logits_shape_and_not_constant() -> None:
    torch.manual_seed(0)
    disc = build_discriminator(width=8, n_layers=3)
    assert isinstance(disc, PatchDiscriminator)
    image, priors = inputs(3, 32)
    logits = disc(image, priors[:, :1])
    assert logits.shape == (3, 1, 4, 4)
    assert logits.std().item() > 1e-4
    assert not torch.allclose(logits[0], logits[1])
    small_image, small_priors = inputs(2, 16)
    assert disc(small_image, small_priors[:, :1]).shape == (2, 1, 2, 2)
    assert not any(isinstance(m, (nn.Sigmoid, nn.Softmax, nn.BatchNorm2d)) for m in disc.modules())


@pytest.mark.parametrize("variant", ["lsft", "gsft"])
def test_gradients_reach_every_generator_parameter(variant: str) -> None:
    gen = tiny(variant).train()
    disc = build_discriminator(width=8, n_layers=2)
    image, priors = inputs(2)
    fake = gen(image, priors)
    loss = nn.functional.binary_cross_entropy_with_logits(disc(image, fake), torch.ones(2, 1, 4, 4))
    loss = loss + 100 * (fake - priors[:, :1]).abs().mean()
    loss.backward()
    missing = [n for n, p in gen.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert all(p.grad is not None for p in disc.parameters())


def test_build_generator_variants_config_and_errors() -> None:
    gen = build_generator("lsft", n_priors=3, width=8, depth=2, cond_channels=4, cond_hidden=8)
    assert isinstance(gen, LSFTGenerator) and gen.variant == "lsft"
    assert gen.config() == {"n_priors": 3, "width": 8, "n_plain": 2, "cond_channels": 4, "cond_hidden": 8}
    rebuilt = LSFTGenerator(**gen.config())
    rebuilt.load_state_dict(gen.state_dict())
    gen = build_generator("gsft", n_priors=3, width=8, depth=2, cond_channels=4, cond_hidden=8)
    assert isinstance(gen, GSFTGenerator) and gen.variant == "gsft"
    assert gen.config() == {"n_priors": 3, "width": 8, "n_blocks": 2, "cond_channels": 4, "cond_hidden": 8}
    GSFTGenerator(**gen.config()).load_state_dict(gen.state_dict())
    with pytest.raises(UserError, match="gan.variant: 'sft' is not a registered generator"):
        build_generator("sft", n_priors=3, width=8, depth=2, cond_channels=4, cond_hidden=8)
    with pytest.raises(ValueError, match=r"expected priors of shape \(B, 3, H, W\)"):
        gen(*inputs(1, n=4))


def test_generators_share_the_sft_building_blocks() -> None:
    assert type(tiny("lsft").cond_net) is type(tiny("gsft").cond_net) is sft.CondNet
    assert lsft.SFTResBlock is gsft.SFTResBlock is sft.SFTResBlock
    kinds = {variant: {type(m) for m in tiny(variant).modules()} for variant in ("lsft", "gsft")}
    for cls in (CondNet, SFTResBlock, SFTLayer):
        assert cls in kinds["lsft"] and cls in kinds["gsft"]
    assert ResBlock in kinds["lsft"]
    assert issubclass(LSFTGenerator, sft.SFTGenerator) and issubclass(GSFTGenerator, sft.SFTGenerator)


def test_generators_have_no_batchnorm() -> None:
    for variant in ("lsft", "gsft"):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in tiny(variant).modules())
