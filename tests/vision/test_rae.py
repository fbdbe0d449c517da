"""RAE tokenizer: decoder shapes and presets, token normalisation, per-position statistics, noise augmentation,
the dimension-dependent shift, bit-exact reloading."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unirep.flow import dimension_shift, shift_time
from unirep.tokens import TokenSet
from vision.tokenizers.rae import RAE, RAEDecoder, noise_augment, rae_decoder_tiny, rae_decoder_xl


class PatchEncoder(nn.Module):
    """A tiny stand-in teacher: a strided conv patch embedding whose output is *not* standardised."""

    def __init__(self, dim: int = 16, patch: int = 4):
        super().__init__()
        self.dim = dim
        self.conv = nn.Conv2d(3, dim, patch, patch)
        nn.init.normal_(self.conv.weight, std=0.5)
        nn.init.normal_(self.conv.bias, mean=2.0)

    def encode(self, x: torch.Tensor) -> TokenSet:
        return TokenSet.from_dense(self.conv(x).flatten(2).transpose(1, 2))


def _rae(tau: float = 0.8, dim: int = 16) -> RAE:
    torch.manual_seed(0)
    return RAE(PatchEncoder(dim), rae_decoder_tiny(dim, grid=4, patch_size=4), noise_tau=tau, final_norm="apply")


def test_decoder_shapes_and_xl_preset():
    dec = RAEDecoder(16, grid=4, patch_size=4, width=32, depth=2, num_heads=2)
    out = dec(torch.randn(3, 16, 16))
    assert out.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="latent tokens"):
        dec(torch.randn(3, 9, 16))
    with torch.device("meta"):  # the anchor's XL decoder: 28 blocks at width 1152 with 16 heads
        xl = rae_decoder_xl(768, grid=16, patch_size=16)
    assert len(xl.blocks) == 28 and xl.embed.out_features == 1152 and xl.blocks[0].attn.num_heads == 16
    assert xl.head.out_features == 16 * 16 * 3


def test_encode_layout_and_token_norm():
    rae = _rae()
    x = torch.randn(2, 3, 16, 16)
    raw = rae._encode(x)
    assert raw.shape == (2, 16, 4, 4) == (2, *rae.latent_shape)
    # the latent of token (i, j) is the teacher's token i*g + j, standardised over channels (LN without affine)
    tokens = rae.encoder.encoder.encode(x).to_dense()[0]  # [B, N, D]
    ref = (tokens - tokens.mean(-1, keepdim=True)) / torch.sqrt(tokens.var(-1, unbiased=False, keepdim=True) + 1e-6)
    assert torch.allclose(raw[1, :, 2, 3], ref[1, 2 * 4 + 3], atol=1e-5)


def test_statistics_per_position_applied_and_inverted():
    rae = _rae()
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    rae.fit_statistics(batches)
    raws = torch.cat([rae._encode(b) for b in batches]).double()  # [12, D, g, g]
    mean, var = raws.mean(0), raws.var(0)  # per channel and position
    assert torch.allclose(rae.latent_mean.double(), mean, atol=1e-5)
    assert torch.allclose(rae.latent_std.double(), torch.sqrt(var + 1e-5), atol=1e-5)
    x = batches[0]
    z = rae.encode(x)
    assert torch.allclose(z.double(), (rae._encode(x).double() - mean) / torch.sqrt(var + 1e-5), atol=1e-4)
    assert torch.allclose(rae.denormalize(z), rae._encode(x), atol=1e-5)
    rae.eval()
    assert torch.allclose(rae.decode(z), rae._decode(rae._encode(x)), atol=1e-5)
    assert set(dict(rae.named_buffers())) >= {"latent_mean", "latent_std"}


def test_noise_augmentation_matches_definition():
    z = torch.randn(5, 8, 4, 4)
    out = noise_augment(z, 0.8, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    sigma = 0.8 * torch.rand(5, 1, 1, 1, generator=g)
    eps = torch.randn(z.shape, generator=g)
    assert torch.equal(out, z + sigma * eps)
    assert torch.equal(noise_augment(z, 0.0), z)


def test_noise_on_in_training_off_in_eval():
    rae = _rae(tau=0.8)
    x = torch.randn(2, 3, 16, 16)
    rae.train()
    assert rae.encoder.training is False  # the frozen teacher never enters training mode
    a, b = rae(x), rae(x)
    assert not torch.allclose(a, b)
    rae.eval()
    c, d = rae(x), rae(x)
    assert torch.equal(c, d) and torch.equal(c, rae._decode(rae._encode(x)))
    # encode() never adds noise, even in training mode (diffusion trains on clean latents)
    rae.train()
    assert torch.equal(rae.encode(x), rae.encode(x))


def test_gradients_reach_decoder_only():
    rae = _rae()
    rae.train()
    loss = (rae(torch.randn(2, 3, 16, 16)) - torch.randn(2, 3, 16, 16)).abs().mean()
    loss.backward()
    for name, p in rae.decoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(not p.requires_grad for p in rae.encoder.parameters())


def test_dimension_shift_on_rae_latent():
    m = 768 * 16 * 16  # the anchor's DINOv2-B latent
    assert dimension_shift(m) == pytest.approx(math.sqrt(m / 4096)) and dimension_shift(m) == pytest.approx(6.928, 1e-3)
    rae = _rae()
    s = dimension_shift(math.prod(rae.latent_shape))
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_time(t, s), s * t / (1 + (s - 1) * t))


def test_reload_reproduces_reconstructions_bit_for_bit(tmp_path):
    rae = _rae()
    rae.fit_statistics([torch.randn(4, 3, 16, 16)])
    rae.eval()
    save_file({k: v.contiguous() for k, v in rae.state_dict().items()}, str(tmp_path / "rae.safetensors"))
    torch.manual_seed(123)  # a differently initialised copy
    other = RAE(rae.encoder, rae_decoder_tiny(16, grid=4, patch_size=4), final_norm="apply")
    other.load_state_dict(load_file(str(tmp_path / "rae.safetensors")))
    other.eval()
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(other.decode(other.encode(x)), rae.decode(rae.encode(x)))


def test_bad_grid_is_named():
    rae = _rae()
    with pytest.raises(ValueError, match="grid"):
        rae.encode(torch.randn(1, 3, 20, 20))
    with pytest.raises(ValueError, match="latent_dim"):
        RAE(PatchEncoder(8), rae_decoder_tiny(16, grid=4, patch_size=4), final_norm="apply")
    with pytest.raises(ValueError, match="final LayerNorm"):
        RAE(PatchEncoder(16), rae_decoder_tiny(16, grid=4, patch_size=4), final_norm="strip")
