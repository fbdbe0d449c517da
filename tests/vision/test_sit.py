"""SiT/DiT: shapes, gradients of every preset at tiny width, adaLN-Zero identity, patchify round trip, anchors' init."""

import math

import pytest
import torch

from unirep.nn import timestep_embedding
from vision.models.sit import (
    SIT_CONFIGS,
    SiT,
    SiTBlock,
    TimestepEmbedder,
    create_sit,
    get_2d_sincos_pos_embed,
    list_sit_models,
    patchify,
    unpatchify,
)


def _tiny_kwargs(**kw):
    base = dict(input_size=8, in_channels=3, num_classes=10)
    base.update(kw)
    return base


@pytest.mark.parametrize("name", list_sit_models())
def test_every_preset_forward_backward_at_tiny_width(name):
    size, patch = name.split("-")[1].split("/")
    torch.manual_seed(0)
    # keep the preset's depth, patch and learn_sigma but shrink the width so every preset runs on CPU
    heads = SIT_CONFIGS[size]["num_heads"]
    model = create_sit(name, hidden_size=8 * heads, depth=2, **_tiny_kwargs())
    for m in model.modules():  # adaLN-Zero makes most gradients zero at init: perturb so every path is live
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.05)
    x = torch.randn(2, 3, 8, 8)
    out = model(x, torch.rand(2), torch.tensor([1, 10]))
    assert out.shape == (2, 6 if name.startswith("DiT") else 3, 8, 8)
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
        if "embedding_table" not in n:  # rows of unused labels get no gradient, by design
            assert p.grad.abs().sum() > 0, n


def test_preset_shapes_match_anchors():
    assert SIT_CONFIGS["S"] == dict(depth=12, hidden_size=384, num_heads=6)
    assert SIT_CONFIGS["B"] == dict(depth=12, hidden_size=768, num_heads=12)
    assert SIT_CONFIGS["L"] == dict(depth=24, hidden_size=1024, num_heads=16)
    assert SIT_CONFIGS["XL"] == dict(depth=28, hidden_size=1152, num_heads=16)
    with torch.device("meta"):  # count parameters without allocating 675M floats
        m = create_sit("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    n_params = sum(p.numel() for p in m.parameters())
    assert abs(n_params / 1e6 - 675) < 5  # SiT-XL/2 has ~675M parameters (DiT paper, Table 4)


def test_adaln_zero_identity_at_init():
    torch.manual_seed(0)
    model = SiT(**_tiny_kwargs(hidden_size=32, depth=3, num_heads=4, patch_size=2))
    x = torch.randn(3, 3, 8, 8)
    out, feats = model.forward_intermediates(x, torch.rand(3), torch.tensor([0, 1, 2]), indices=[0, 1, 3])
    assert torch.equal(out, torch.zeros_like(out))  # zero final layer
    # zero gates: every block is the identity, so every hidden state equals the embedded input
    assert torch.allclose(feats[1].x, feats[0].x) and torch.allclose(feats[2].x, feats[0].x)
    emb = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed
    assert torch.allclose(feats[0].x, emb.reshape(-1, 32))


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 8, 8)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 16, 12)
    assert torch.equal(unpatchify(tokens, 2, 3), x)
    # token (row 1, col 2) holds pixels x[:, :, 2:4, 4:6] in (p, q, c) order
    assert torch.equal(tokens[0, 1 * 4 + 2], x[0, :, 2:4, 4:6].permute(1, 2, 0).reshape(-1))


def test_sincos_pos_embed_closed_form():
    d, g = 16, 3
    emb = get_2d_sincos_pos_embed(d, g)
    assert emb.shape == (9, 16)
    # token (h=1, w=2): the first d/2 channels encode w (MAE/DiT convention), the rest h
    i = 1 * g + 2
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    expect_w = torch.cat([torch.sin(2 * omega), torch.cos(2 * omega)])
    expect_h = torch.cat([torch.sin(1 * omega), torch.cos(1 * omega)])
    assert torch.allclose(torch.from_numpy(emb[i]), torch.cat([expect_w, expect_h]))


def _old_sit_embedding(t, dim, max_period=10000.0):
    """The SiT's own embedding before it called unirep.nn.timestep_embedding (kept here to pin its numbers)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_timestep_embedding_is_the_shared_one_with_the_sit_numbers(dtype):
    t = torch.tensor([0.0, 0.5, 0.123, 1.0], dtype=dtype)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    emb = timestep_embedding(t.float(), 8)  # times in [0, 1] as they are: scale 1 (molecules embed 1000 t)
    assert torch.allclose(emb[1], torch.cat([torch.cos(0.5 * freqs), torch.sin(0.5 * freqs)]))
    torch.manual_seed(0)
    te = TimestepEmbedder(16, frequency_embedding_size=255)  # odd size: the zero pad
    for dim in (256, 255):
        assert torch.equal(timestep_embedding(t.float(), dim), _old_sit_embedding(t, dim))
    expect = te.mlp(_old_sit_embedding(t, 255))
    assert torch.equal(te(t), expect)  # bit for bit what the SiT computed before, for float32 and float64 times


def test_label_dropout_and_null_class():
    torch.manual_seed(0)
    model = SiT(**_tiny_kwargs(hidden_size=16, depth=1, num_heads=2, class_dropout_prob=0.1))
    table = model.y_embedder.embedding_table
    assert table.num_embeddings == 11  # 10 classes + null
    model.y_embedder.train()
    drops = model.y_embedder(torch.zeros(20000, dtype=torch.long), train=True)
    frac = (drops == table.weight[10]).all(dim=1).float().mean().item()
    assert abs(frac - 0.1) < 0.01
    with pytest.raises(ValueError, match=r"label 11 is outside \[0, 11\)"):
        model(torch.randn(1, 3, 8, 8), torch.rand(1), torch.tensor([11]))


def test_reg_class_token_head_is_zero_and_grid_excludes_it():
    torch.manual_seed(0)
    model = SiT(**_tiny_kwargs(hidden_size=16, depth=2, num_heads=2, cls_token_dim=12))
    (v, v_cls), feats = model.forward_intermediates(
        torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]), indices=[1], cls=torch.randn(2, 12)
    )
    assert v.shape == (2, 3, 8, 8) and v_cls.shape == (2, 12)
    assert torch.equal(v_cls, torch.zeros_like(v_cls))
    assert feats[0].x.shape == (2 * 16, 16)  # patch tokens only


def test_reg_class_velocity_after_the_shared_final_norm_and_prefix_features():
    torch.manual_seed(0)
    model = SiT(**_tiny_kwargs(hidden_size=16, depth=2, num_heads=2, cls_token_dim=12))
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.1)
    x, t, y, cls = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1]), torch.randn(2, 12)
    (v, v_cls), feats = model.forward_intermediates(x, t, y, indices=[-1, 2], cls=cls, keep_prefix=True)
    h = feats[0].to_dense()[0]  # [B, 1 + N, D]: the class token first (REG aligns [cls, patches])
    assert h.shape == (2, 17, 16) and torch.equal(feats[0].x, feats[1].x)
    c = model._condition(t, y, None)
    # Martinser/REG: the class-token head reads token 0 after the final LayerNorm + adaLN modulation
    assert torch.allclose(v_cls, model.cls_head(model.final_layer.modulated(h, c)[:, 0]), atol=1e-6)
    assert not torch.allclose(v_cls, model.cls_head(h[:, 0]), atol=1e-3)
    (v2, _), no_prefix = model.forward_intermediates(x, t, y, indices=[2], cls=cls)
    assert torch.equal(v, v2) and torch.equal(no_prefix[0].to_dense()[0], h[:, 1:])


def test_intermediate_indices_follow_the_shared_convention():
    torch.manual_seed(0)
    model = SiT(**_tiny_kwargs(hidden_size=16, depth=3, num_heads=2))
    assert model.num_layers == 3 and model.feature_dim(-1) == 16
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    _, feats = model.forward_intermediates(x, t, y, indices=[3, -1, 0, -4])
    assert torch.equal(feats[0].x, feats[1].x) and torch.equal(feats[2].x, feats[3].x)
    _, every = model.forward_intermediates(x, t, y, indices=None)
    assert len(every) == 4
    with pytest.raises(ValueError, match="outside"):
        model.forward_intermediates(x, t, y, indices=[4])
    with pytest.raises(ValueError, match="outside"):
        model.feature_dim(-5)


def test_explicit_attention_path_equals_sdpa_and_returns_logits():
    torch.manual_seed(0)
    model = SiT(**_tiny_kwargs(hidden_size=16, depth=3, num_heads=2, qk_norm=True))
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.1)
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    out, feats = model.forward_intermediates(x, t, y, indices=[3])
    out2, feats2, logits = model.forward_intermediates(x, t, y, indices=[3], attention=[2, -1])
    assert torch.allclose(out, out2, atol=1e-5) and torch.allclose(feats[0].x, feats2[0].x, atol=1e-5)
    assert sorted(logits) == [2, 3] and logits[2].shape == (2, 2, 16, 16)
    block = model.blocks[0]
    assert isinstance(block, SiTBlock)
    h = torch.randn(2, 16, 16)
    a, lg = block.attn(h, return_logits=True)
    assert torch.allclose(a, block.attn(h), atol=1e-5) and lg.shape == (2, 2, 16, 16)


def test_unconditional_and_bad_inputs():
    model = SiT(**_tiny_kwargs(hidden_size=16, depth=1, num_heads=2, num_classes=0))
    assert model.y_embedder is None
    assert model(torch.randn(1, 3, 8, 8), torch.rand(1)).shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="expects input"):
        model(torch.randn(1, 3, 16, 16), torch.rand(1))
    with pytest.raises(KeyError, match="unknown model"):
        create_sit("SiT-Q/2")
