"""Tokenizer normalisation statistics: fitted exactly, applied and inverted exactly."""

import pytest
import torch

from unirep.tokenizers import IdentityTokenizer, Tokenizer


def test_identity_round_trip_with_channel_statistics():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 2.0, 5.0]).view(1, 3, 1, 1)
    batches = [torch.randn(4, 3, 2, 2, generator=g) * scale + 3 for _ in range(5)]
    tok = IdentityTokenizer(stat_shape=(3, 1, 1), eps=0.0)
    tok.fit_statistics(batches, reduce_dims=(0, 2, 3))
    allx = torch.cat(batches).double()
    assert torch.allclose(tok.latent_mean.double().flatten(), allx.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(tok.latent_std.double().flatten(), allx.transpose(0, 1).reshape(3, -1).std(dim=1), atol=1e-5)
    z = tok.encode(batches[0])
    assert torch.allclose(tok.decode(z), batches[0], atol=1e-5)
    assert set(dict(tok.named_buffers())) == {"latent_mean", "latent_std"}


def test_per_position_statistics():
    x = torch.randn(10, 4, 3)
    tok = IdentityTokenizer(stat_shape=(4, 3), eps=0.0)
    tok.fit_statistics([x[:3], x[3:]])
    assert torch.allclose(tok.latent_mean, x.mean(0), atol=1e-6)
    assert torch.allclose(tok.latent_std, x.std(0), atol=1e-5)


def test_tokenizer_subclass_without_decode_cannot_be_built():
    class EncodeOnly(Tokenizer):
        def _encode(self, x):
            return x

    with pytest.raises(TypeError, match="_decode"):
        EncodeOnly()
