"""SVG, FAE and the staged aligner: shapes, which parts train, SVG's residual rescaling, the preservation loss."""

from __future__ import annotations

import pytest
import torch

from vision.encoders import TimmViTEncoder
from vision.tokenizers import FAE, SVG, AttentionAdapter, ResidualViT, StagedAligner, TokenAdapter, TokenDecoder
from vision.tokenizers.aligner import AlignerStage1Task
from vision.tokenizers.fae import FAEStage1Task
from vision.tokenizers.rae import RAEDecoder
from vision.tokenizers.svg import SVGStage1Task, match_distribution

DIM, GRID, PATCH = 48, 4, 4  # 16 x 16 images -> 4 x 4 tokens of 48


def _vit() -> TimmViTEncoder:
    torch.manual_seed(0)
    return TimmViTEncoder(
        "vit_tiny_patch16_224",
        grid_size=GRID,
        allow_random_init=True,
        model_kwargs=dict(patch_size=PATCH, embed_dim=DIM, depth=2, num_heads=3),
    )


def _dec(latent_dim: int) -> RAEDecoder:
    return RAEDecoder(latent_dim, GRID, PATCH, out_channels=1, width=48, depth=1, num_heads=3)


def _images(b: int = 3) -> torch.Tensor:
    return torch.rand(b, 1, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _svg(**kw) -> SVG:
    res = ResidualViT(GRID * PATCH, PATCH, in_channels=1, out_dim=4, width=24, depth=1, num_heads=2, dropout=0.0)
    return SVG(_vit(), res, _dec(DIM + 4), **kw)


def _grads(module: torch.nn.Module) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


def test_match_distribution_closed_form():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 6, generator=g) * 3 + 1
    r = torch.randn(2, 5, 2, generator=g) * 0.1 - 4
    out = match_distribution(h, r)
    m_h, s_h = h.mean(dim=(0, 1)).mean(), h.std(dim=(0, 1)).mean()
    m_r, s_r = r.mean(dim=(0, 1)).mean(), r.std(dim=(0, 1)).mean()
    assert torch.allclose(out, (r - m_r) / (s_r + 1e-6) * s_h + m_h, atol=1e-5)
    assert torch.allclose(out.mean(dim=(0, 1)).mean(), m_h, atol=1e-5)


def test_svg_shapes_and_gradients():
    tok = _svg(mask_ratio=0.0)
    x = _images()
    z = tok.encode(x)
    assert z.shape == (3, DIM + 4, GRID, GRID) and tok.latent_shape == (DIM + 4, GRID, GRID)
    # the first DIM channels are the frozen encoder's tokens, unchanged (statistics are 0 / 1 here)
    ref = tok.encoder.encode(x).to_dense()[0].transpose(1, 2).reshape(3, DIM, GRID, GRID)
    assert torch.allclose(z[:, :DIM], ref, atol=1e-5)
    assert tok.decode(z).shape == x.shape
    task = SVGStage1Task(tok, perceptual_weight=1.0, eval_items=4)
    task.train()
    task({"image": x}, step=0)["loss"].backward()
    assert all(_grads(tok.residual)) and all(_grads(tok.decoder))
    assert all(p.grad is None for p in tok.encoder.parameters())


def test_svg_mask_replaces_the_whole_residual_in_training_only():
    tok = _svg(mask_ratio=0.999, match=False)
    x = _images()
    tok.train()
    t = tok.tokens(x)
    assert torch.allclose(t[..., DIM:], tok.mask_token.expand(3, GRID * GRID, 4))
    tok.eval()
    assert not torch.allclose(tok.tokens(x)[..., DIM:], tok.mask_token.expand(3, GRID * GRID, 4))


def test_svg_bad_decoder_width_is_named():
    res = ResidualViT(16, PATCH, in_channels=1, out_dim=4, width=24, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="latent_dim=52"):
        SVG(_vit(), res, _dec(DIM))


def _fae() -> FAE:
    return FAE(
        _vit(),
        AttentionAdapter(DIM, 8, num_heads=4),
        TokenDecoder(8, DIM, GRID, width=24, depth=1, num_heads=2),
        _dec(DIM),
    )


def test_fae_shapes_and_which_losses_reach_which_parts():
    tok = _fae()
    x = _images()
    z = tok.encode(x)
    assert z.shape == (3, 8, GRID, GRID) and tuple(tok.latent_mean.shape) == (8, 1, 1)
    assert tok.decode_features(z).shape == (3, GRID * GRID, DIM) and tok.decode(z).shape == x.shape
    task = FAEStage1Task(tok, perceptual_weight=0.0, eval_items=4)
    task.train()
    out = task({"image": x}, step=0)
    # the pixel decoder trains on detached features: the adapter's gradient is the feature loss's alone
    (g_all,) = torch.autograd.grad(out["loss"], [tok.adapter.proj.weight], retain_graph=True)
    f = tok.features(x)
    feat = torch.nn.functional.mse_loss(tok.feature_decoder(tok.adapter(f)), f)
    (g_feat,) = torch.autograd.grad(feat, [tok.adapter.proj.weight])
    assert torch.allclose(g_all, g_feat, atol=1e-6)
    out["loss"].backward()
    assert all(_grads(tok.adapter)) and all(_grads(tok.pixel_decoder))
    assert all(p.grad is None for p in tok.encoder.parameters())


def _aligner_task(stage: int, **kw) -> AlignerStage1Task:
    tok = StagedAligner(_vit(), TokenAdapter(DIM, 8, depth=1, num_heads=4), _dec(8))
    return AlignerStage1Task(tok, stage=stage, allow_no_init=True, perceptual_weight=0.0, eval_items=4, **kw)


@pytest.mark.parametrize(
    "stage,trains", [(1, {"adapter", "decoder"}), (2, {"encoder", "adapter", "decoder"}), (3, {"decoder"})]
)
def test_aligner_stages_train_the_right_parts(stage, trains):
    task = _aligner_task(stage)
    tok = task.tokenizer
    task.train()
    x = _images()
    assert tok.encode(x).shape == (3, 8, GRID, GRID)
    task({"image": x}, step=0)["loss"].backward()
    for name in ("encoder", "adapter", "decoder"):
        part = getattr(tok, name)
        assert all(p.requires_grad == (name in trains) for p in part.parameters()), name
        got = _grads(part)
        assert all(got) if name in trains else not any(got), name
    assert not any(p.requires_grad for p in task.reference.parameters())


def test_preservation_is_zero_at_the_start_of_refinement_and_grows():
    task = _aligner_task(2, preserve_weight=1.0)
    x = _images()
    out = task({"image": x}, step=0)
    assert float(out["loss/preserve"]) == 0.0
    with torch.no_grad():
        for p in task.tokenizer.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    moved = float(task.preservation(x).detach())
    f, f_p = task.tokenizer.features(x), task.reference.encoder.encode(x).to_dense()[0]
    assert moved > 0 and abs(moved - float(((f - f_p) ** 2).mean().detach())) < 1e-5


def test_aligner_later_stage_needs_its_checkpoint():
    tok = StagedAligner(_vit(), TokenAdapter(DIM, 8, depth=0), _dec(8))
    with pytest.raises(ValueError, match="init_checkpoint"):
        AlignerStage1Task(tok, stage=2)
    with pytest.raises(FileNotFoundError, match="previous stage"):
        AlignerStage1Task(tok, stage=3, init_checkpoint="/nonexistent/run")
