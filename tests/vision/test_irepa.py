"""iREPA: the conv projector and the spatial z-score against hand-written definitions, and the composed term."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from unirep.align import Alignment, AlignmentTerm
from unirep.cli import config_dir
from unirep.tokens import TokenSet
from vision.align import VisionAlignContext
from vision.irepa import ConvProjector, SpatialNormTarget, spatial_zscore
from vision.models.sit import create_sit


def _zscore_numpy(f: np.ndarray, alpha: float, eps: float) -> np.ndarray:
    """The anchor's formula per item and channel, with numpy's unbiased std (ddof=1) as torch.std."""
    out = np.empty_like(f)
    for b in range(f.shape[0]):
        for d in range(f.shape[2]):
            col = f[b, :, d]
            out[b, :, d] = (col - alpha * col.mean()) / (col.std(ddof=1) + eps)
    return out


def test_spatial_zscore_equals_the_anchor_formula():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(3, 16, 5, generator=g, dtype=torch.float64) * 3 + 2
    for alpha in (0.6, 1.0):
        got = spatial_zscore(f, alpha=alpha, eps=1e-6)
        np.testing.assert_allclose(got.numpy(), _zscore_numpy(f.numpy(), alpha, 1e-6), rtol=1e-12, atol=1e-12)
    full = spatial_zscore(f, alpha=1.0, eps=0.0)
    assert torch.allclose(full.mean(1), torch.zeros(3, 5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(full.std(1), torch.ones(3, 5, dtype=torch.float64), atol=1e-12)
    # a TokenSet in shuffled token order keeps its order
    ts = TokenSet.from_dense(f)
    perm = torch.randperm(ts.x.shape[0], generator=g)
    shuffled = TokenSet(ts.x[perm], ts.batch[perm], None, ts.num_items)
    out = spatial_zscore(shuffled, alpha=0.6)
    assert torch.allclose(out.x, spatial_zscore(f, 0.6).reshape(-1, 5)[perm])
    with pytest.raises(ValueError, match="N >= 2"):
        spatial_zscore(torch.randn(2, 1, 4))


def _conv_by_hand(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``x[B, N, D]`` row-major s x s grids; ``w[O, D, k, k]``; same-size output with zero padding."""
    bsz, n, _ = x.shape
    s = int(round(n**0.5))
    k = w.shape[-1]
    p = k // 2
    out = np.zeros((bsz, n, w.shape[0]))
    for item in range(bsz):
        grid = x[item].reshape(s, s, -1)
        for i in range(s):
            for j in range(s):
                acc = b.copy()
                for di in range(k):
                    for dj in range(k):
                        ii, jj = i + di - p, j + dj - p
                        if 0 <= ii < s and 0 <= jj < s:
                            acc += w[:, :, di, dj] @ grid[ii, jj]
                out[item, i * s + j] = acc
    return out


def test_conv_projector_is_a_conv_on_the_row_major_token_grid():
    torch.manual_seed(0)
    proj = ConvProjector(6, 4, kernel_size=3).double()
    x = torch.randn(2, 16, 6, dtype=torch.float64)
    want = _conv_by_hand(x.numpy(), proj.conv.weight.detach().numpy(), proj.conv.bias.detach().numpy())
    np.testing.assert_allclose(proj(x).detach().numpy(), want, rtol=1e-10, atol=1e-12)
    # items interleaved token by token (each item's tokens still in grid order): the output keeps that layout
    inter = TokenSet(x.transpose(0, 1).reshape(-1, 6), torch.arange(2).repeat(16), None, 2)
    out = proj(inter)
    np.testing.assert_allclose(out.x.detach().numpy(), want.transpose(1, 0, 2).reshape(-1, 4), rtol=1e-10, atol=1e-12)
    # kernel 1 is a per-token linear map (the LDM train.py default): no neighbour mixing
    one = ConvProjector(6, 4, kernel_size=1).double()
    lin = x @ one.conv.weight[:, :, 0, 0].T + one.conv.bias
    assert torch.allclose(one(x), lin)
    assert not torch.allclose(proj(x), x @ proj.conv.weight[:, :, 1, 1].T + proj.conv.bias)
    with pytest.raises(ValueError, match="square token grid"):
        proj(torch.randn(2, 15, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="flat"):
        proj(torch.randn(30, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="odd"):
        ConvProjector(6, 4, kernel_size=2)


class GridTeacher(nn.Module):
    """A frozen stand-in teacher: a fixed linear map of 4 x 4 pixel patches to 5-d tokens with a spatial offset."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 5)
        self.dim = 5

    def encode(self, x, layer=None):
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(x.shape[0], 16, 16)  # [B, 16 patches, 16 pixels]
        return TokenSet.from_dense(self.proj(patches) + 3.0)


def test_irepa_config_term_equals_conv_then_cosine_to_zscored_teacher():
    cfg = OmegaConf.load(config_dir() / "align" / "irepa.yaml")
    term = instantiate(cfg)
    assert isinstance(term, AlignmentTerm) and isinstance(term.target, SpatialNormTarget)
    assert term.target.alpha == 0.6 and term.schedule(0) == 1.0
    torch.manual_seed(0)
    model = create_sit("SiT-tiny/4", input_size=16, in_channels=1, num_classes=10)
    term.layer_spec = 2
    al = Alignment({"irepa": term}).bind(model, teacher=GridTeacher())
    assert isinstance(term.projector, ConvProjector) and term.projector.conv.kernel_size == (3, 3)
    assert term.projector.conv.in_channels == 64 and term.projector.conv.out_channels == 5
    x = torch.randn(3, 1, 16, 16)
    y = torch.randint(0, 10, (3,))
    _, feats = model.forward_intermediates(x, torch.rand(3), y, [2])
    ctx = VisionAlignContext(batch={"x": x}, features={2: feats[0]})
    loss, logs = al(ctx, step=0)
    # by hand: conv over the 4 x 4 student grid, z-score of the teacher's tokens over its grid, negative cosine
    h = feats[0].to_dense()[0]  # [3, 16, 64]
    grid = h.reshape(3, 4, 4, 64).permute(0, 3, 1, 2)
    pred = term.projector.conv(grid).permute(0, 2, 3, 1).reshape(3, 16, 5)
    f = GridTeacher.encode(al.terms["irepa"].target.teacher.encoder, x).to_dense()[0]
    zf = (f - 0.6 * f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)
    want = -torch.nn.functional.cosine_similarity(pred, zf, dim=-1).mean()
    assert torch.allclose(loss, want, atol=1e-6) and torch.allclose(logs["loss/irepa"], want, atol=1e-6)
    loss.backward()
    assert term.projector.conv.weight.grad is not None and term.projector.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="mode must be 'tokens'"):
        SpatialNormTarget(mode="pooled")
