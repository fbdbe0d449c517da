"""VA-VAE: a KL autoencoder whose latent is aligned to a frozen vision foundation model.

Yao et al. 2025, "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models";
anchor implementation hustvl/LightningDiT (``vavae/``, built on the LDM autoencoder of CompVis/latent-diffusion
``ldm/modules/diffusionmodules/model.py`` and ``ldm/modules/losses/contperceptual.py``).

- Autoencoder: LDM's conv encoder/decoder (ResNet blocks with GroupNorm(32) and SiLU, strided-conv downsampling,
  nearest upsampling, one self-attention block in the middle), a diagonal Gaussian posterior and KL weight 1e-6.
  The downsampling factor is ``2**(len(ch_mult) - 1)``; the latent has ``z_channels`` channels (f16 d32 in the
  anchor).
- VF loss: an :class:`unirep.align.AlignmentTerm` on the latent (``configs/align/vf.yaml``): a per-token linear
  projector (the anchor's 1x1 conv) to the teacher's width and ``unirep.align.vf_loss`` (marginal cosine, m1 = 0.5,
  plus marginal distance matrix, m2 = 0.25) against the frozen encoder's patch features (the teacher grid resampled
  to the latent grid when they differ); the stage-1 task weighs it adaptively,
  ``w = 0.1 * ||grad L_nll|| / (||grad L_vf|| + 1e-4)`` with gradients taken w.r.t. the encoder's last layer.
  ``nt_xent`` as the term's loss swaps in the contrastive alignment of ReaLS (Xu et al. 2025) for comparison.
  The VAE is a one-layer "student" for the term: index 1 (= -1) is the latent, ``feature_dim`` its channels.
- Latent normalisation: per-channel statistics over the training set (``latent_mean``/``latent_std`` of shape
  ``(C, 1, 1)``); skipping it breaks diffusion on VA-VAE latents (FID 130 in the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unirep.tokenizers import Tokenizer
from unirep.tokens import TokenSet

__all__ = ["DiagonalGaussian", "VAEEncoder", "VAEDecoder", "VAVAE", "adaptive_weight"]


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, c), num_channels=c, eps=1e-6, affine=True)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all positions (LDM's mid-block attention)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # [B, HW, C] each
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # [B, HW, C]
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding keeps H/2 exactly


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VAEEncoder(nn.Module):
    """Image ``[B, C, H, W]`` -> posterior moments ``[B, 2*z, H/f, W/f]`` (mean, log-variance)."""

    def __init__(self, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        layers: list[nn.Module] = []
        c = ch
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                layers.append(ResBlock(c, ch * m))
                c = ch * m
            if i < len(ch_mult) - 1:
                layers.append(Downsample(c))
        self.down = nn.Sequential(*layers)
        self.mid = nn.Sequential(ResBlock(c, c), AttnBlock(c), ResBlock(c, c))
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 2 * z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class VAEDecoder(nn.Module):
    """Latent ``[B, z, h, w]`` -> image ``[B, C, h*f, w*f]``."""

    def __init__(self, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(c, c), AttnBlock(c), ResBlock(c, c))
        layers: list[nn.Module] = []
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):  # LDM's decoder has one more block per level than the encoder
                layers.append(ResBlock(c, ch * m))
                c = ch * m
            if i > 0:
                layers.append(Upsample(c))
        self.up = nn.Sequential(*layers)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior ``N(mean, exp(logvar))`` from moments ``[B, 2C, h, w]``; log-variance clamped to [-30, 20] as LDM."""

    def __init__(self, moments: Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        eps = torch.randn(self.mean.shape, device=self.mean.device, dtype=self.mean.dtype, generator=generator)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL to N(0, I) summed over latent elements, one value per item ``[B]`` (LDM's convention)."""
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class VAVAE(Tokenizer):
    """KL autoencoder with channel latent statistics. ``encode`` returns the normalised posterior mean.

    Args:
        in_channels: image channels.
        ch, ch_mult, num_res_blocks: LDM widths; ``f = 2**(len(ch_mult) - 1)``.
        z_channels: latent channels.
        sample_latents: ``encode`` returns a posterior sample instead of the mean (LightningDiT samples when it
            extracts features; the mean is deterministic, the default here).
    """

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 32,
        ch_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 8,
        sample_latents: bool = False,
        eps: float = 1e-5,
    ):
        super().__init__(stat_shape=(z_channels, 1, 1), eps=eps)
        ch_mult = tuple(int(m) for m in ch_mult)
        self.in_channels, self.z_channels, self.downsample = in_channels, z_channels, 2 ** (len(ch_mult) - 1)
        self.sample_latents = sample_latents
        self.encoder = VAEEncoder(in_channels, ch, ch_mult, num_res_blocks, z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
        self.decoder = VAEDecoder(in_channels, ch, ch_mult, num_res_blocks, z_channels)

    def latent_shape_for(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.downsample:
            raise ValueError(
                f"image size {image_size} is not divisible by the VAE downsampling factor {self.downsample}"
            )
        g = image_size // self.downsample
        return (self.z_channels, g, g)

    @property
    def num_layers(self) -> int:
        """For alignment terms: index 0 is the image, 1 (= -1) the latent sample (:meth:`latent_tokens`)."""
        return 1

    def feature_dim(self, index: int) -> int:
        from unirep.intermediates import normalize_index

        return self.in_channels if normalize_index(index, 1, "VAVAE") == 0 else self.z_channels

    @staticmethod
    def latent_tokens(z: Tensor) -> TokenSet:
        """A latent ``[B, C, h, w]`` as B items of ``h * w`` tokens of size C (row-major, the teacher grid's order)."""
        return TokenSet.from_dense(z.flatten(2).transpose(1, 2))

    @property
    def encoder_last_layer(self) -> Tensor:
        """The weight the VF adaptive weight is computed against (the encoder's output conv)."""
        return self.encoder.conv_out.weight

    @property
    def decoder_last_layer(self) -> Tensor:
        """The weight the GAN adaptive weight is computed against (the decoder's output conv)."""
        return self.decoder.conv_out.weight

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"VAVAE expects images [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-1] % self.downsample or x.shape[-2] % self.downsample:
            raise ValueError(
                f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor {self.downsample}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def _encode(self, x: Tensor) -> Tensor:
        post = self.posterior(x)
        return post.sample() if self.sample_latents else post.mode()

    def _decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: Tensor, sample: bool = True) -> tuple[Tensor, Tensor, DiagonalGaussian]:
        """``(reconstruction, latent, posterior)``; the latent is a posterior sample in training."""
        post = self.posterior(x)
        z = post.sample() if sample else post.mode()
        return self._decode(z), z, post


def adaptive_weight(loss_a: Tensor, loss_b: Tensor, layer: Tensor, eps: float, max_value: float = 1e8) -> Tensor:
    """``||d loss_a / d layer|| / (||d loss_b / d layer|| + eps)``, detached and clamped to ``[0, max_value]``.

    VA-VAE's VF weight uses ``eps = 1e-4`` (then times 0.1); the LDM/RAE GAN weight uses ``eps = 1e-6``.
    Returns 0 when ``loss_b`` does not reach ``layer`` (no gradient).
    """
    ga = torch.autograd.grad(loss_a, layer, retain_graph=True, allow_unused=True)[0]
    gb = torch.autograd.grad(loss_b, layer, retain_graph=True, allow_unused=True)[0]
    if ga is None or gb is None:
        return loss_a.new_zeros(())
    return (ga.norm() / (gb.norm() + eps)).clamp(0.0, max_value).detach()
