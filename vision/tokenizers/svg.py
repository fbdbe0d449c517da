"""SVG: frozen representation-encoder features plus a light residual encoder, concatenated, as the latent.

Shi et al. 2025, "Latent Diffusion Model without Variational Autoencoder" (arXiv 2510.15301); anchor implementation
shiml20/SVG (``autoencoder/ldm/models/dino_decoder.py``, ``autoencoder/configs/example_svg_autoencoder_vitsp.yaml``,
``autoencoder/ldm/modules/losses/contperceptual_decoder.py``), checked 2026-12-01.

- Semantic branch: a frozen encoder's patch tokens (DINOv3 ViT-S/16+ there, 384 channels on a 16 x 16 grid at 256 px;
  the ``x_norm_patchtokens``, i.e. after the final norm *with* its affine parameters).
- Residual branch (:class:`ResidualViT`): a small ViT on the same image with the encoder's patch size (anchor: 6 layers,
  width 384, 8 heads, MLP 1536, dropout 0.1 on the MLP and attention; ``create_small_vit_s``), its patch tokens mapped
  by ``Linear(W, W) -> GELU -> Linear(W, r)`` to ``r`` channels (``output_dim: 8``), so the latent is 384 + 8 = 392
  channels (``z_channels: 392``).
- Regularisation of the residual branch, as the anchor: (1) ``match_distribution`` (``use_outnorm: true``) rescales the
  residual features to the semantic features' scale: both are reduced to one scalar mean (the mean over channels of
  the per-channel batch means) and one scalar std (the mean of the per-channel stds), detached, and the residual is
  standardised with its own scalars and mapped onto the semantic ones; (2) ``mask_ratio`` (0.1): in training, each
  sample's whole residual branch is replaced by a learned mask token with that probability, so the decoder must also
  decode from the semantic features alone.
- Decoder: the anchor uses LDM's convolutional decoder; here the RAE ViT decoder (:class:`RAEDecoder`) on the
  concatenated tokens, so RAE and SVG differ only in the latent. No noise augmentation (the anchor has none).
- Losses (:class:`SVGStage1Task`): L1 + LPIPS (weight 1) + PatchGAN hinge GAN with the adaptive weight (eps 1e-4 there;
  1e-6 in :func:`vision.losses.gan_adaptive_weight`), ``disc_weight`` 0.5 from step 5001; Adam lr 1e-4, betas
  (0.5, 0.9). The anchor's learned ``logvar`` of the NLL is left out (initialised at 0 it is a no-op at the start).

Not verified: the anchor's match_distribution uses *batch* statistics at inference too (a latent depends on its batch);
this module does the same in training and uses statistics of the batch at hand in ``encode`` as well.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from unirep.encoders import FrozenEncoder
from unirep.tokenizers import Tokenizer
from vision.losses import LPIPS, EncoderPerceptualLoss
from vision.tokenizers.rae import RAEDecoder
from vision.tokenizers.tasks import _ensure_stats_buffer, _TokenizerTask, images_of

__all__ = ["ResidualViT", "SVG", "SVGStage1Task", "match_distribution", "frozen_tokens"]


def frozen_tokens(encoder: nn.Module, x: Tensor, grid: int) -> Tensor:
    """A frozen encoder's patch tokens ``[B, grid**2, D]`` (no gradient), checked against the expected grid."""
    with torch.no_grad():
        z, mask = encoder.encode(x).to_dense()
    if not bool(mask.all()) or z.shape[1] != grid * grid:
        raise ValueError(
            f"the encoder returned {z.shape[1]} tokens per image, the tokenizer expects a {grid}x{grid} grid: check "
            f"the image size ({tuple(x.shape[-2:])}) and the encoder's grid_size"
        )
    return z.float()


def match_distribution(h: Tensor, h_res: Tensor, eps: float = 1e-6) -> Tensor:
    """Map ``h_res`` ``[B, N, r]`` onto the scalar mean/std of ``h`` ``[B, N, D]`` (SVG's ``match_distribution``)."""

    def scalars(t: Tensor) -> tuple[Tensor, Tensor]:
        dims = (0, 1)  # batch and tokens: per-channel statistics, then averaged over channels
        return t.mean(dim=dims).mean().detach(), t.std(dim=dims).mean().detach()

    m_h, s_h = scalars(h)
    m_r, s_r = scalars(h_res)
    return (h_res - m_r) / (s_r + eps) * s_h + m_h


class ResidualViT(nn.Module):
    """A small ViT from images ``[B, C, H, W]`` to ``r``-channel patch tokens ``[B, N, r]`` (SVG's residual branch).

    Args:
        image_size, patch_size, in_channels: input geometry (``patch_size`` = the frozen encoder's).
        out_dim: residual channels ``r`` (8 in the anchor).
        width, depth, num_heads, mlp_ratio, dropout: the anchor's 384, 6, 8, 4, 0.1.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int = 3,
        out_dim: int = 8,
        width: int = 384,
        depth: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ResidualViT image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.grid = image_size // patch_size
        self.out_dim = int(out_dim)
        self.patch = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.randn(1, self.grid**2, width) * 0.02)  # learned, as torchvision's ViT
        self.blocks = nn.Sequential(
            *[
                Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout, attn_drop=dropout)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)  # [B, N, W]
        if t.shape[1] != self.grid**2:
            raise ValueError(f"ResidualViT built for a {self.grid}x{self.grid} grid, got {t.shape[1]} patches")
        return self.head(self.norm(self.blocks(t + self.pos)))  # [B, N, r]


class SVG(Tokenizer):
    """SVG tokenizer: ``encode(x) -> [B, D + r, g, g]`` (frozen features ++ residual), ``decode(z) -> image``.

    Args:
        encoder: the frozen encoder (wrapped in :class:`FrozenEncoder`, so checkpoints never store it).
        residual: the trainable :class:`ResidualViT` (same grid as the encoder).
        decoder: :class:`RAEDecoder` with ``latent_dim = encoder.dim + residual.out_dim``.
        mask_ratio: probability that a training sample's residual is replaced by the mask token (0.1).
        match: rescale the residual to the semantic features' scale (the anchor's ``use_outnorm``).
        eps: added to the variance of the (per-channel) latent statistics.
    """

    def __init__(
        self,
        encoder: nn.Module,
        residual: ResidualViT,
        decoder: RAEDecoder,
        mask_ratio: float = 0.1,
        match: bool = True,
        eps: float = 1e-5,
    ):
        dim = int(encoder.dim) + residual.out_dim
        if decoder.latent_dim != dim:
            raise ValueError(
                f"SVG decoder latent_dim {decoder.latent_dim} != encoder dim {int(encoder.dim)} + residual out_dim "
                f"{residual.out_dim}: build the decoder with latent_dim={dim}"
            )
        if residual.grid != decoder.grid:
            raise ValueError(f"SVG residual grid {residual.grid} != decoder grid {decoder.grid}: use one patch size")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"SVG mask_ratio must be in [0, 1), got {mask_ratio}")
        super().__init__(stat_shape=(dim, 1, 1), eps=eps)
        self.encoder = encoder if isinstance(encoder, FrozenEncoder) else FrozenEncoder(encoder)
        self.residual, self.decoder = residual, decoder
        self.mask_ratio, self.match = float(mask_ratio), bool(match)
        self.mask_token = nn.Parameter(torch.randn(1, 1, residual.out_dim) * 0.02)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (int(self.latent_mean.shape[0]), self.decoder.grid, self.decoder.grid)

    @property
    def image_size(self) -> int:
        return self.decoder.image_size

    def tokens(self, x: Tensor) -> Tensor:
        """``[B, N, D + r]``: frozen tokens (no gradient) ++ residual tokens (gradient to the residual ViT)."""
        h = frozen_tokens(self.encoder, x, self.decoder.grid)
        r = self.residual(x)
        if self.training and self.mask_ratio > 0:
            drop = (torch.rand(x.shape[0], 1, 1, device=x.device) < self.mask_ratio).to(r.dtype)
            r = r * (1 - drop) + self.mask_token.to(r.dtype) * drop
        if self.match:
            r = match_distribution(h, r)
        return torch.cat([h, r], dim=-1)

    def _encode(self, x: Tensor) -> Tensor:
        z = self.tokens(x)
        g = self.decoder.grid
        return z.transpose(1, 2).reshape(z.shape[0], -1, g, g)  # [B, D + r, g, g]

    def _decode(self, z: Tensor) -> Tensor:
        b, d, g, _ = z.shape
        return self.decoder(z.reshape(b, d, g * g).transpose(1, 2))

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decoder(self.tokens(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)


class _FrozenEncoderStage1Task(_TokenizerTask):
    """Shared parts of the SVG, FAE and staged-aligner stage-1 tasks: reconstruction + perceptual + GAN + evaluation.

    ``perceptual_encoder`` is the frozen encoder the perceptual loss and FD-teacher use (the tokenizer's own frozen
    encoder by default).
    """

    def _setup_common(
        self,
        tokenizer: Tokenizer,
        perceptual_encoder: nn.Module | None,
        perceptual_weight: float,
        lpips: LPIPS | None,
        lpips_weight: float,
        gan: dict[str, Any],
        eval_items: int,
        fit_statistics_items: int | None,
    ) -> None:
        _ensure_stats_buffer(tokenizer)
        self.tokenizer = tokenizer
        enc = perceptual_encoder if perceptual_encoder is not None else tokenizer.encoder
        self._fd = enc if isinstance(enc, FrozenEncoder) else FrozenEncoder(enc)
        self.perceptual = EncoderPerceptualLoss(self._fd) if perceptual_weight > 0 else None
        self.perceptual_weight = float(perceptual_weight)
        self.lpips, self.lpips_weight = lpips, float(lpips_weight)
        self._setup_gan(**gan)
        self.eval_items, self.fit_statistics_items = int(eval_items), fit_statistics_items

    @property
    def model(self) -> nn.Module:
        return self.tokenizer

    def _reconstruct_eval(self, x: Tensor) -> Tensor:
        return self.tokenizer._decode(self.tokenizer._encode(x))

    def _fd_encoder(self) -> nn.Module:
        return self._fd


def _gan_args(discriminator, disc_weight, disc_start, disc_max_weight, disc_update_start, gen_loss) -> dict:
    return dict(
        discriminator=discriminator,
        disc_weight=disc_weight,
        disc_start=disc_start,
        max_w=disc_max_weight,
        disc_update_start=disc_update_start,
        gen_loss=gen_loss,
    )


class SVGStage1Task(_FrozenEncoderStage1Task):
    """Train SVG's residual ViT and decoder (the encoder stays frozen) with L1 + perceptual (+ LPIPS) + GAN.

    Args mirror :class:`vision.tokenizers.tasks.RAEStage1Task`; the anchor's GAN is a PatchGAN with the hinge
    generator loss, ``disc_weight`` 0.5, from step 5001.
    """

    def __init__(
        self,
        tokenizer: SVG,
        perceptual_weight: float = 1.0,
        lpips: LPIPS | None = None,
        lpips_weight: float = 1.0,
        discriminator: nn.Module | None = None,
        disc_weight: float = 0.5,
        disc_start: int = 5001,
        disc_max_weight: float = 1e4,
        disc_update_start: int | None = None,
        gen_loss: str = "hinge",
        eval_items: int = 256,
        fit_statistics_items: int | None = 4096,
    ):
        super().__init__()
        if not isinstance(tokenizer, SVG):
            raise TypeError(f"SVGStage1Task needs an SVG tokenizer, got {type(tokenizer).__name__}")
        gan = _gan_args(discriminator, disc_weight, disc_start, disc_max_weight, disc_update_start, gen_loss)
        self._setup_common(
            tokenizer, None, perceptual_weight, lpips, lpips_weight, gan, eval_items, fit_statistics_items
        )

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        x = images_of(batch)
        x_rec = self.tokenizer.reconstruct(x)
        nll, out = self._reconstruction_loss(x_rec, x)
        gan = self._gan_terms(x, x_rec, nll, self.tokenizer.decoder.last_layer, step)
        out["loss"] = nll + gan.pop("gan_total", 0.0)
        return {**out, **gan}
