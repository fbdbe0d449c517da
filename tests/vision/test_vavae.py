"""VA-VAE: shapes for several downsampling factors, KL closed form, channel statistics, the adaptive weight on a
toy graph, the VF loss against a direct implementation of its definition, the ReaLS option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unirep.tokens import TokenSet
from vision.tokenizers.vavae import VAVAE, DiagonalGaussian, VFAlignment, adaptive_weight


@pytest.mark.parametrize("ch_mult,f", [((1, 2), 2), ((1, 1, 2), 4)])
def test_shapes_and_downsampling(ch_mult, f):
    torch.manual_seed(0)
    vae = VAVAE(ch=8, ch_mult=ch_mult, num_res_blocks=1, z_channels=6)
    x = torch.randn(2, 3, 16, 16)
    assert vae.downsample == f and vae.latent_shape_for(16) == (6, 16 // f, 16 // f)
    rec, z, post = vae(x)
    assert rec.shape == x.shape and z.shape == (2, 6, 16 // f, 16 // f) and post.mean.shape == z.shape
    assert vae.encode(x).shape == z.shape
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.randn(1, 3, 15, 15))


def test_kl_matches_torch_distributions():
    moments = torch.randn(3, 8, 2, 2)
    post = DiagonalGaussian(moments)
    q = torch.distributions.Normal(post.mean, post.std)
    p = torch.distributions.Normal(torch.zeros_like(post.mean), torch.ones_like(post.std))
    ref = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(post.kl(), ref, atol=1e-5)


def test_channel_statistics_applied_and_inverted():
    torch.manual_seed(0)
    vae = VAVAE(ch=8, ch_mult=(1, 2), z_channels=4).eval()
    batches = [torch.randn(3, 3, 8, 8) for _ in range(2)]
    vae.fit_statistics(batches, reduce_dims=(0, 2, 3))
    raw = torch.cat([vae._encode(b) for b in batches]).double()  # [6, C, h, w]
    per_c = raw.transpose(0, 1).reshape(4, -1)
    assert torch.allclose(vae.latent_mean.flatten().double(), per_c.mean(1), atol=1e-5)
    assert torch.allclose(vae.latent_std.flatten().double(), torch.sqrt(per_c.var(1) + 1e-5), atol=1e-5)
    zs = torch.cat([vae.encode(b) for b in batches]).transpose(0, 1).reshape(4, -1)  # normalised, per channel
    assert torch.allclose(zs.mean(1), torch.zeros(4), atol=1e-4) and torch.allclose(zs.std(1), torch.ones(4), atol=1e-3)
    z = vae.encode(batches[0])
    assert torch.allclose(vae.decode(z), vae._decode(vae._encode(batches[0])), atol=1e-5)


def test_adaptive_weight_by_hand():
    w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    a = torch.tensor([0.5, 1.0, -1.0])
    b = torch.tensor([2.0, 1.0, 0.5])
    loss_a = (w * a).sum()  # gradient a
    loss_b = 0.5 * (b * w**2).sum()  # gradient b * w = [2, -2, 1.5]
    got = adaptive_weight(loss_a, loss_b, w, eps=1e-4)
    expected = torch.sqrt(torch.tensor(0.25 + 1 + 1)) / (torch.sqrt(torch.tensor(4 + 4 + 2.25)) + 1e-4)
    assert torch.allclose(got, expected) and not got.requires_grad
    # a loss that does not reach the layer gives weight 0
    assert adaptive_weight(loss_a, (a**2).sum().requires_grad_(), w, eps=1e-4) == 0


def _vf_reference(pred: torch.Tensor, target: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
    """VA-VAE's definition on dense [B, N, D] features."""
    zp, zt = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    mcos = F.relu(1 - m1 - (zp * zt).sum(-1)).mean()
    mdms = F.relu((zp @ zp.transpose(1, 2) - zt @ zt.transpose(1, 2)).abs() - m2).mean()
    return mcos + mdms


def test_vf_alignment_matches_definition_and_resamples():
    torch.manual_seed(0)
    vf = VFAlignment(z_channels=4, teacher_dim=12)
    z = torch.randn(2, 4, 3, 3)
    teacher = torch.randn(2, 9, 12)
    got = vf(z, TokenSet.from_dense(teacher))
    pred = vf.proj(z).flatten(2).transpose(1, 2)
    assert torch.allclose(got, _vf_reference(pred, teacher, 0.5, 0.25), atol=1e-5)
    # a 6x6 teacher grid is resampled (bilinear, patch centres) to the 3x3 latent grid
    big = torch.randn(2, 36, 12)
    small = (
        F.interpolate(big.reshape(2, 6, 6, 12).permute(0, 3, 1, 2), size=(3, 3), mode="bilinear", align_corners=False)
        .permute(0, 2, 3, 1)
        .reshape(2, 9, 12)
    )
    assert torch.allclose(vf(z, TokenSet.from_dense(big)), _vf_reference(pred, small, 0.5, 0.25), atol=1e-5)
    # ReaLS: the contrastive option is a different, positive loss; an aligned latent scores lower
    ntx = VFAlignment(z_channels=4, teacher_dim=12, loss="nt_xent", tau=0.1)
    with torch.no_grad():
        ntx.proj.weight.copy_(vf.proj.weight)
        ntx.proj.bias.copy_(vf.proj.bias)
    aligned = TokenSet.from_dense(pred.detach())
    assert ntx(z, aligned) < ntx(z, TokenSet.from_dense(teacher))
    with pytest.raises(ValueError, match="nt_xent"):
        VFAlignment(4, 12, loss="cosine")


def test_vf_gradient_reaches_encoder_last_layer():
    torch.manual_seed(0)
    vae = VAVAE(ch=8, ch_mult=(1, 2), z_channels=4)
    vf = VFAlignment(4, 12)
    x = torch.randn(2, 3, 8, 8)
    rec, z, post = vae(x)
    l_vf = vf(z, TokenSet.from_dense(torch.randn(2, 16, 12)))
    nll = (rec - x).abs().mean()
    w = adaptive_weight(nll, l_vf, vae.encoder_last_layer, eps=1e-4)
    assert w > 0 and torch.isfinite(w)
    (nll + 0.1 * w * l_vf).backward()
    assert vae.encoder_last_layer.grad is not None and vf.proj.weight.grad is not None


def test_reconstruction_metrics_closed_forms():
    from vision.tokenizers.metrics import frechet_distance, psnr, ssim

    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert psnr(x + 0.1, x) == pytest.approx(10 * torch.log10(torch.tensor(4.0 / 0.01)).item(), rel=1e-6)
    assert ssim(x, x) == pytest.approx(1.0) and ssim(x + 0.05 * torch.randn_like(x), x) > ssim(torch.rand_like(x), x)
    # Gaussians with commuting covariances: ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2
    import numpy as np

    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(1.0 + 1.0 + 1.0)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_stage1_task_vf_weight_and_ablation():
    from torch import nn

    from vision.tokenizers.tasks import VAVAEStage1Task

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.dim = 12
            self.conv = nn.Conv2d(1, 12, 2, 2)

        def encode(self, x):
            return TokenSet.from_dense(self.conv(x).flatten(2).transpose(1, 2))

    torch.manual_seed(0)
    vae = VAVAE(in_channels=1, ch=8, ch_mult=(1, 2), z_channels=4)
    task = VAVAEStage1Task(vae, Teacher(), align="vf", perceptual_weight=0.0)
    batch = {"image": torch.rand(2, 1, 8, 8) * 2 - 1, "id": ["a", "b"]}
    torch.manual_seed(1)
    out = task(batch, step=0)
    # the same computation by hand: the posterior sample is the only randomness
    torch.manual_seed(1)
    rec, z, post = vae(batch["image"])
    nll = (rec - batch["image"]).abs().mean()
    l_vf = task.align(z, task.teacher.encode(batch["image"]))
    g_nll = torch.autograd.grad(nll, vae.encoder_last_layer, retain_graph=True)[0]
    g_vf = torch.autograd.grad(l_vf, vae.encoder_last_layer, retain_graph=True)[0]
    expected_w = 0.1 * g_nll.norm() / (g_vf.norm() + 1e-4)
    assert torch.allclose(out["vf/weight"], expected_w, rtol=1e-5)
    kl = post.kl().mean() / 64
    assert torch.allclose(out["loss"], nll + 1e-6 * kl + expected_w * l_vf, rtol=1e-5)
    out["loss"].backward()
    assert task.align.proj.weight.grad is not None and vae.encoder.conv_in.weight.grad is not None
    plain = VAVAEStage1Task(
        VAVAE(in_channels=1, ch=8, ch_mult=(1, 2), z_channels=4), None, align=None, perceptual_weight=0.0
    )
    assert "loss/vf" not in plain(batch, step=0) and plain.align is None
    with pytest.raises(ValueError, match="teacher"):
        VAVAEStage1Task(VAVAE(in_channels=1, ch=8, ch_mult=(1, 2), z_channels=4), None, align="vf")
