"""DiT^DH: shapes, zero-initialised output, per-token conditioning against the per-item SiT block, intermediates,
gradients, the anchor's XL preset."""

from __future__ import annotations

import pytest
import torch

from vision.models.ddt import DiTDH, ditdh_tiny, ditdh_xl
from vision.models.sit import SiTBlock


def test_shapes_zero_init_and_intermediates():
    torch.manual_seed(0)
    m = ditdh_tiny(input_size=4, patch_size=1, in_channels=32, num_classes=5)
    x, t, y = torch.randn(3, 32, 4, 4), torch.rand(3), torch.tensor([0, 1, 4])
    out, feats = m.forward_intermediates(x, t, y, indices=[0, 4, 6])
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: output starts at zero
    assert [f.x.shape for f in feats] == [(48, 64), (48, 64), (48, 128)]
    # one index convention: the head continues after the trunk, negatives count from the end, widths follow
    assert m.num_layers == 6 and [m.feature_dim(i) for i in (0, 4, 5, -1)] == [64, 64, 128, 128]
    _, neg = m.forward_intermediates(x, t, y, indices=[-1, -3])
    assert torch.equal(neg[0].x, feats[2].x) and torch.equal(neg[1].x, feats[1].x)
    with pytest.raises(ValueError, match="outside"):
        m.forward_intermediates(x, t, y, indices=[7])
    with pytest.raises(ValueError, match="REG"):
        DiTDH(
            input_size=4,
            patch_size=1,
            in_channels=8,
            cls_token_dim=16,
            depth=1,
            hidden_size=32,
            num_heads=2,
            head_width=32,
            head_depth=1,
            head_heads=2,
        )


def test_per_token_condition_that_is_constant_equals_per_item_condition():
    torch.manual_seed(0)
    block = SiTBlock(32, 4)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 32)
    assert torch.allclose(block(x, c[:, None].expand(2, 5, 32)), block(x, c), atol=1e-5)
    # per-token conditioning (DiT^DH's head): changing the condition of token 2 changes token 2's modulation
    s = c[:, None].expand(2, 5, 32).clone()
    s[:, 2] += 1.0
    diff = (block(x, s) - block(x, c)).abs().sum(-1)  # [B, N]
    assert (diff[:, 2] > 1e-3).all()


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    m = ditdh_tiny(input_size=4, patch_size=2, in_channels=8, num_classes=3)
    for p in m.parameters():  # leave the zero init so that gradients flow through every branch
        torch.nn.init.normal_(p, std=0.05)
    out = m(torch.randn(2, 8, 4, 4), torch.rand(2), torch.tensor([0, 2]))
    out.square().mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_xl_preset_matches_anchor():
    with torch.device("meta"):
        m = ditdh_xl(input_size=16, patch_size=1, in_channels=768, num_classes=1000)
    assert (m.depth, m.hidden_size, len(m.blocks)) == (28, 1152, 28)
    assert (m.head_width, m.head_depth) == (2048, 2) and m.head_blocks[0].attn.num_heads == 16
    assert m.head_width >= m.in_channels  # the head is at least as wide as the latent token
