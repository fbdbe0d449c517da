"""VA-VAE: shapes for several downsampling factors, KL closed form, channel statistics, the adaptive weight on a
toy graph, the VF loss against a direct implementation of its definition, the ReaLS option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unirep.tokens import TokenSet
from vision.tokenizers.vavae import VAVAE, DiagonalGaussian, adaptive_weight


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


def _vf_term(loss="vf", teacher_dim=12):
    from functools import partial

    from unirep.align import AlignmentTerm, ProjectorMLP, TeacherTarget, nt_xent, vf_loss

    fn = partial(vf_loss, m1=0.5, m2=0.25) if loss == "vf" else partial(nt_xent, tau=0.1)
    return AlignmentTerm(-1, partial(ProjectorMLP, num_layers=1), TeacherTarget(), fn, 0.1)


class _Teacher(torch.nn.Module):
    """A conv "teacher" with a 2x2 patch grid: 12-d tokens of an 8x8 image on a 4x4 grid."""

    def __init__(self, dim=12, patch=2):
        super().__init__()
        self.dim = dim
        self.conv = torch.nn.Conv2d(1, dim, patch, patch)

    def encode(self, x):
        return TokenSet.from_dense(self.conv(x).flatten(2).transpose(1, 2))


def test_vf_term_matches_definition_and_resamples():
    """configs/align/vf.yaml's term: a per-token linear map (the anchor's 1x1 conv) and the VF loss; a finer
    teacher grid is resampled (bilinear, patch centres) to the latent grid."""
    from unirep.align import AlignContext, Alignment
    from unirep.encoders import FrozenEncoder

    torch.manual_seed(0)
    vae = VAVAE(in_channels=1, ch=8, ch_mult=(1, 2, 2), z_channels=4)  # 8x8 image -> 2x2 latent
    assert vae.num_layers == 1 and vae.feature_dim(-1) == 4 and vae.feature_dim(0) == 1
    teacher = FrozenEncoder(_Teacher(patch=2), cache=False)  # 4x4 teacher grid
    term = _vf_term()
    Alignment({"vf": term}).bind(vae, teacher=teacher)
    conv = torch.nn.Conv2d(4, 12, 1)
    with torch.no_grad():
        conv.weight.copy_(term.projector.net[0].weight[:, :, None, None])
        conv.bias.copy_(term.projector.net[0].bias)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    z = torch.randn(2, 4, 2, 2)
    res = term(AlignContext(batch={"image": x}, features={1: vae.latent_tokens(z)}), 0)
    big = teacher.encode(x).to_dense()[0]  # [2, 16, 12]
    small = (
        F.interpolate(big.reshape(2, 4, 4, 12).permute(0, 3, 1, 2), size=(2, 2), mode="bilinear", align_corners=False)
        .permute(0, 2, 3, 1)
        .reshape(2, 4, 12)
    )
    pred = conv(z).flatten(2).transpose(1, 2)
    assert torch.allclose(res["raw"], _vf_reference(pred, small, 0.5, 0.25), atol=1e-5)
    assert torch.allclose(res["loss"], 0.1 * _vf_reference(pred, small, 0.5, 0.25), atol=1e-5)


def test_reconstruction_metrics_closed_forms():
    from vision.tokenizers.metrics import frechet_distance, psnr, ssim

    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert psnr(x + 0.1, x) == pytest.approx(10 * torch.log10(torch.tensor(4.0 / 0.01)).item(), rel=1e-6)
    assert ssim(x, x) == pytest.approx(1.0) and ssim(x + 0.05 * torch.randn_like(x), x) > ssim(torch.rand_like(x), x)
    # the one eigh-based Fréchet distance (closed forms in tests/vision/test_metrics.py)
    a = torch.randn(50, 3, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_stage1_task_vf_weight_and_ablation():
    from vision.tokenizers.tasks import VAVAEStage1Task

    torch.manual_seed(0)
    vae = VAVAE(in_channels=1, ch=8, ch_mult=(1, 2), z_channels=4)  # 8x8 -> 4x4, the teacher's grid
    task = VAVAEStage1Task(vae, _Teacher(), align={"vf": _vf_term()}, perceptual_weight=0.0)
    batch = {"image": torch.rand(2, 1, 8, 8) * 2 - 1, "id": ["a", "b"]}
    torch.manual_seed(1)
    out = task(batch, step=0)
    # the same computation by hand: the posterior sample is the only randomness
    torch.manual_seed(1)
    rec, z, post = vae(batch["image"])
    nll = (rec - batch["image"]).abs().mean()
    proj = task.alignment.terms["vf"].projector
    pred = proj(z.flatten(2).transpose(1, 2))
    l_vf = _vf_reference(pred, task.teacher.encode(batch["image"]).to_dense()[0], 0.5, 0.25)
    g_nll = torch.autograd.grad(nll, vae.encoder_last_layer, retain_graph=True)[0]
    g_vf = torch.autograd.grad(l_vf, vae.encoder_last_layer, retain_graph=True)[0]
    expected_w = 0.1 * g_nll.norm() / (g_vf.norm() + 1e-4)  # LightningDiT's adaptive VF weight
    assert torch.allclose(out["align/vf/weight"], expected_w, rtol=1e-4)
    assert torch.allclose(out["loss/vf"], l_vf, rtol=1e-5)
    kl = post.kl().mean() / 64
    assert torch.allclose(out["loss"], nll + 1e-6 * kl + expected_w * l_vf, rtol=1e-4)
    out["loss"].backward()
    assert proj.net[0].weight.grad is not None and vae.encoder.conv_in.weight.grad is not None
    # ReaLS: the contrastive loss in the same term
    ntx = VAVAEStage1Task(vae, _Teacher(), align={"vf": _vf_term("nt_xent")}, perceptual_weight=0.0)
    assert torch.isfinite(ntx(batch, step=0)["loss/vf"])
    plain = VAVAEStage1Task(
        VAVAE(in_channels=1, ch=8, ch_mult=(1, 2), z_channels=4), None, align=None, perceptual_weight=0.0
    )
    assert "loss/vf" not in plain(batch, step=0) and len(plain.alignment) == 0
    with pytest.raises(ValueError, match="teacher"):
        VAVAEStage1Task(VAVAE(in_channels=1, ch=8, ch_mult=(1, 2), z_channels=4), None, align={"vf": _vf_term()})
