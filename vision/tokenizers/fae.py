"""FAE: one attention layer from a frozen encoder's features to a low-dimensional latent, and two decoders.

Gao, Chen, Chen and Gu 2025, "One Layer Is Enough: Adapting Pretrained Visual Encoders for Image Generation"
(arXiv 2512.07829, Apple). No code release was found in the searchable index (checked 2026-12-01); the design below
follows the paper's abstract and method summaries (project page starflow-v.github.io/projects/fae, reviews of the
paper):

- Encoder: the frozen encoder's patch tokens ``x`` (DINOv2 / SigLIP; ~768-1536 channels) -> a *single* self-attention
  layer (pre-norm, residual) -> a linear projection to ``d`` channels (a low dimension, "4 to 64"; 32 is used here for
  DINOv2 scale, 16 for the 96-channel digits ViT). The paper's point: one layer removes the global redundancy shared
  by the patch tokens without re-encoding them; deeper adapters lost information and trained slower.
- Double decoder: (1) a deep *feature decoder* (a ViT, :class:`TokenDecoder`) reconstructs the encoder's features from
  ``z``; (2) a *pixel decoder* (here RAE's ViT decoder, :class:`RAEDecoder`) maps the reconstructed features to the
  image. Diffusion models (SiT / LightningDiT unchanged) train on the ``d``-channel latent ``z`` with channel
  statistics, as on a VAE latent; samples decode through both decoders.

Losses (:class:`FAEStage1Task`): feature reconstruction ``feature_weight * MSE(f_hat, f)`` (+ optional
``cosine_weight * (1 - cos)``) for the adapter and the feature decoder; the pixel decoder's L1 + perceptual (+ LPIPS)
(+ GAN) on ``f_hat`` *detached*, so pixels never shape the latent (the two decoders are trained side by side, the
pixel loss stops at the reconstructed features). Not verified against the paper's text: the exact feature loss (MSE
vs cosine), whether the pixel decoder sees reconstructed or true features in training (``pixel_input``), decoder
depths, and any noise augmentation of ``z`` (``latent_noise_tau``, off by default) or of the pixel decoder's input
(``noise_tau``, RAE's augmentation, off by default).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import Tensor, nn

from unirep.encoders import FrozenEncoder
from unirep.tokenizers import Tokenizer
from vision.losses import LPIPS
from vision.models.sit import get_2d_sincos_pos_embed
from vision.tokenizers.rae import RAEDecoder, noise_augment
from vision.tokenizers.svg import _FrozenEncoderStage1Task, _gan_args, frozen_tokens
from vision.tokenizers.tasks import images_of

__all__ = ["AttentionAdapter", "TokenDecoder", "FAE", "FAEStage1Task"]


class AttentionAdapter(nn.Module):
    """``Linear(x + Attn(LN(x)))``: one self-attention layer, then a projection ``D -> d`` per token."""

    def __init__(self, in_dim: int, latent_dim: int, num_heads: int = 8):
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(f"AttentionAdapter in_dim {in_dim} must be divisible by num_heads {num_heads}")
        self.in_dim, self.latent_dim = int(in_dim), int(latent_dim)
        self.norm = nn.LayerNorm(in_dim, eps=1e-6)
        self.attn = Attention(in_dim, num_heads=num_heads, qkv_bias=True)
        self.proj = nn.Linear(in_dim, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x + self.attn(self.norm(x)))  # [B, N, d]


class TokenDecoder(nn.Module):
    """A ViT from latent tokens ``[B, N, d]`` to feature tokens ``[B, N, D]`` (FAE's feature decoder).

    Fixed 2-D sin-cos positions, pre-norm blocks, a final LayerNorm and a linear head.
    """

    def __init__(
        self,
        latent_dim: int,
        out_dim: int,
        grid: int,
        width: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.latent_dim, self.out_dim, self.grid = int(latent_dim), int(out_dim), int(grid)
        self.embed = nn.Linear(latent_dim, width)
        pos = torch.from_numpy(get_2d_sincos_pos_embed(width, grid)).float()
        self.register_buffer("pos_embed", pos[None], persistent=False)  # [1, N, W]
        self.blocks = nn.Sequential(
            *[Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, out_dim)

    def forward(self, z: Tensor) -> Tensor:
        if z.shape[1:] != (self.grid**2, self.latent_dim):
            raise ValueError(
                f"TokenDecoder expects [B, {self.grid**2}, {self.latent_dim}] latent tokens, got {tuple(z.shape)}"
            )
        return self.head(self.norm(self.blocks(self.embed(z) + self.pos_embed)))


class FAE(Tokenizer):
    """FAE tokenizer: ``encode(x) -> [B, d, g, g]``, ``decode(z) -> pixel_decoder(feature_decoder(z))``.

    Args:
        encoder: the frozen encoder (wrapped in :class:`FrozenEncoder`).
        adapter: :class:`AttentionAdapter` (``encoder.dim -> d``).
        feature_decoder: :class:`TokenDecoder` (``d -> encoder.dim``).
        pixel_decoder: :class:`RAEDecoder` with ``latent_dim = encoder.dim``.
        eps: added to the variance of the per-channel latent statistics.
    """

    def __init__(
        self,
        encoder: nn.Module,
        adapter: AttentionAdapter,
        feature_decoder: TokenDecoder,
        pixel_decoder: RAEDecoder,
        eps: float = 1e-5,
    ):
        dim = int(encoder.dim)
        for name, got in (
            ("adapter in_dim", adapter.in_dim),
            ("feature_decoder out_dim", feature_decoder.out_dim),
            ("pixel_decoder latent_dim", pixel_decoder.latent_dim),
        ):
            if got != dim:
                raise ValueError(f"FAE {name} {got} != encoder dim {dim}: build it with {dim}")
        if feature_decoder.latent_dim != adapter.latent_dim:
            raise ValueError(
                f"FAE feature_decoder latent_dim {feature_decoder.latent_dim} != adapter latent_dim "
                f"{adapter.latent_dim}"
            )
        if feature_decoder.grid != pixel_decoder.grid:
            raise ValueError(f"FAE decoders' grids differ ({feature_decoder.grid} vs {pixel_decoder.grid})")
        super().__init__(stat_shape=(adapter.latent_dim, 1, 1), eps=eps)
        self.encoder = encoder if isinstance(encoder, FrozenEncoder) else FrozenEncoder(encoder)
        self.adapter, self.feature_decoder, self.pixel_decoder = adapter, feature_decoder, pixel_decoder

    @property
    def grid(self) -> int:
        return self.pixel_decoder.grid

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.adapter.latent_dim, self.grid, self.grid)

    @property
    def image_size(self) -> int:
        return self.pixel_decoder.image_size

    def features(self, x: Tensor) -> Tensor:
        """The frozen encoder's tokens ``[B, N, D]`` (the feature decoder's target)."""
        return frozen_tokens(self.encoder, x, self.grid)

    def _to_grid(self, t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], -1, self.grid, self.grid)

    def _encode(self, x: Tensor) -> Tensor:
        return self._to_grid(self.adapter(self.features(x)))  # [B, d, g, g]

    def decode_features(self, z: Tensor) -> Tensor:
        """Raw latent ``[B, d, g, g]`` -> reconstructed features ``[B, N, D]``."""
        b, d, g, _ = z.shape
        return self.feature_decoder(z.reshape(b, d, g * g).transpose(1, 2))

    def _decode(self, z: Tensor) -> Tensor:
        return self.pixel_decoder(self.decode_features(z))


class FAEStage1Task(_FrozenEncoderStage1Task):
    """Train FAE's adapter + feature decoder (feature loss) and its pixel decoder (pixel losses on detached features).

    Args:
        tokenizer: the :class:`FAE` (``task.model``).
        feature_weight: weight of ``MSE(f_hat, f)``.
        cosine_weight: weight of ``mean(1 - cos(f_hat, f))`` per token (0: off).
        pixel_input: ``"reconstructed"`` (the pixel decoder learns from ``f_hat``, what it decodes at inference) or
            ``"encoder"`` (from the true features, RAE's way).
        noise_tau: RAE's noise augmentation of the pixel decoder's input features (0: off).
        latent_noise_tau: the same on ``z`` before the feature decoder (0: off).
        perceptual_weight, lpips, lpips_weight, discriminator, disc_weight, disc_start, disc_max_weight,
        disc_update_start, gen_loss, eval_items, fit_statistics_items: as :class:`RAEStage1Task`.
    """

    def __init__(
        self,
        tokenizer: FAE,
        feature_weight: float = 1.0,
        cosine_weight: float = 0.0,
        pixel_input: str = "reconstructed",
        noise_tau: float = 0.0,
        latent_noise_tau: float = 0.0,
        perceptual_weight: float = 1.0,
        lpips: LPIPS | None = None,
        lpips_weight: float = 1.0,
        discriminator: nn.Module | None = None,
        disc_weight: float = 0.75,
        disc_start: int = 0,
        disc_max_weight: float = 1e4,
        disc_update_start: int | None = None,
        gen_loss: str = "hinge",
        eval_items: int = 256,
        fit_statistics_items: int | None = 4096,
    ):
        super().__init__()
        if not isinstance(tokenizer, FAE):
            raise TypeError(f"FAEStage1Task needs an FAE tokenizer, got {type(tokenizer).__name__}")
        if pixel_input not in ("reconstructed", "encoder"):
            raise ValueError(f"FAEStage1Task pixel_input must be 'reconstructed' or 'encoder', got {pixel_input!r}")
        self.feature_weight, self.cosine_weight = float(feature_weight), float(cosine_weight)
        self.pixel_input = pixel_input
        self.noise_tau, self.latent_noise_tau = float(noise_tau), float(latent_noise_tau)
        gan = _gan_args(discriminator, disc_weight, disc_start, disc_max_weight, disc_update_start, gen_loss)
        self._setup_common(
            tokenizer, None, perceptual_weight, lpips, lpips_weight, gan, eval_items, fit_statistics_items
        )

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        tok: FAE = self.tokenizer
        x = images_of(batch)
        f = tok.features(x)  # [B, N, D], no gradient
        z = tok.adapter(f)  # [B, N, d]
        if self.training and self.latent_noise_tau > 0:
            z = noise_augment(z, self.latent_noise_tau)
        f_hat = tok.feature_decoder(z)
        feat = F.mse_loss(f_hat, f)
        out = {"loss/feature_mse": feat.detach()}
        loss = self.feature_weight * feat
        if self.cosine_weight > 0:
            cos = 1.0 - F.cosine_similarity(f_hat, f, dim=-1).mean()
            loss = loss + self.cosine_weight * cos
            out["loss/feature_cos"] = cos.detach()
        pix_in = f_hat.detach() if self.pixel_input == "reconstructed" else f
        if self.training and self.noise_tau > 0:
            pix_in = noise_augment(pix_in, self.noise_tau)
        x_rec = tok.pixel_decoder(pix_in)
        nll, rec = self._reconstruction_loss(x_rec, x)
        out.update(rec)
        gan = self._gan_terms(x, x_rec, nll, tok.pixel_decoder.last_layer, step)
        out["loss"] = loss + nll + gan.pop("gan_total", 0.0)
        return {**out, **gan}
