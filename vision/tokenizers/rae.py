"""Representation autoencoder (RAE): a frozen representation encoder as the tokenizer, a trained ViT decoder.

Zheng et al. 2025, "Diffusion Transformers with Representation Autoencoders"; anchor implementation
bytetriper/RAE (``stage1/rae.py``, ``stage1/decoders/decoder.py``, ``stage1/encoders/dinov2.py``).

- Encoder: any frozen :class:`~unirep.encoders.Encoder` (DINOv2-with-registers-B in the anchor; the project's
  self-trained ViT offline). Only patch tokens are kept; the final LayerNorm is applied *without* affine
  parameters (the anchor strips ``layernorm.weight``/``bias``), so the latent is per-token standardised.
- Latent: the ``N = g*g`` patch tokens laid out as an image ``[B, D, g, g]``, normalised per position and channel
  with training-set statistics (``latent_mean``/``latent_std`` buffers of shape ``(D, g, g)``, eps 1e-5).
- Decoder: an MAE-style ViT: linear embedding of the latent tokens, a learnable class token, fixed 2-D sin-cos
  positions, pre-norm transformer blocks, a linear head to ``p*p*C`` per token and unpatchify.
- Noise-augmented decoder training: ``z <- z + sigma * eps`` with ``sigma = tau * U(0, 1)`` drawn per sample
  (tau = 0.8 in the anchor), only in training mode and only in :meth:`RAE.reconstruct`; :meth:`RAE.encode` (used by
  diffusion on the latents) never adds noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from unirep.encoders import FrozenEncoder
from unirep.tokenizers import Tokenizer
from vision.models.sit import get_2d_sincos_pos_embed, unpatchify

__all__ = [
    "RAEDecoder",
    "RAE",
    "noise_augment",
    "strip_final_norm_affine",
    "rae_decoder_tiny",
    "rae_decoder_small",
    "rae_decoder_base",
    "rae_decoder_large",
    "rae_decoder_xl",
]


def noise_augment(z: Tensor, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """``z + sigma * eps`` with ``sigma = tau * U(0, 1)`` drawn once per sample (RAE's decoder noise augmentation)."""
    shape = (z.shape[0],) + (1,) * (z.dim() - 1)  # one sigma per item, broadcast over tokens and channels
    sigma = tau * torch.rand(shape, device=z.device, dtype=z.dtype, generator=generator)
    eps = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
    return z + sigma * eps


class RAEDecoder(nn.Module):
    """MAE-style ViT decoder from latent tokens ``[B, N, latent_dim]`` to images ``[B, C, g*p, g*p]``.

    Args:
        latent_dim: channel size of the encoder tokens.
        grid: side of the token grid (``N = grid**2``).
        patch_size: pixels per token side; the output image side is ``grid * patch_size``.
        out_channels: image channels.
        width, depth, num_heads, mlp_ratio: transformer size (the anchor's XL: 1152, 28, 16, 4).
    """

    def __init__(
        self,
        latent_dim: int,
        grid: int,
        patch_size: int,
        out_channels: int = 3,
        width: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"RAEDecoder width {width} must be divisible by num_heads {num_heads}")
        self.latent_dim, self.grid, self.patch_size, self.out_channels = latent_dim, grid, patch_size, out_channels
        self.embed = nn.Linear(latent_dim, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))  # trainable; the anchor starts it at zero
        # fixed sin-cos positions with a zero row for the class token, as MAE's decoder
        pos = torch.from_numpy(get_2d_sincos_pos_embed(width, grid)).float()
        pos = torch.cat([torch.zeros(1, width, device="cpu"), pos])
        self.register_buffer("pos_embed", pos[None], persistent=False)  # [1, 1+N, W]
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, patch_size * patch_size * out_channels)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):  # MAE/timm: xavier-uniform linears, zero biases
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def image_size(self) -> int:
        return self.grid * self.patch_size

    @property
    def last_layer(self) -> Tensor:
        """The weight the adaptive GAN weight is computed against (the output projection)."""
        return self.head.weight

    def forward(self, z: Tensor) -> Tensor:
        b, n, d = z.shape
        if n != self.grid**2 or d != self.latent_dim:
            raise ValueError(
                f"RAEDecoder expects latent tokens [B, {self.grid**2}, {self.latent_dim}], got {tuple(z.shape)}"
            )
        x = self.embed(z)  # [B, N, W]
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed  # [B, 1+N, W]
        for blk in self.blocks:
            x = blk(x)
        x = self.head(self.norm(x))[:, 1:]  # drop the class token: [B, N, p*p*C]
        return unpatchify(x, self.patch_size, self.out_channels)


def _preset(width: int, depth: int, heads: int) -> Callable[..., RAEDecoder]:
    def build(latent_dim: int, grid: int, patch_size: int, out_channels: int = 3, **kw) -> RAEDecoder:
        return RAEDecoder(latent_dim, grid, patch_size, out_channels, width=width, depth=depth, num_heads=heads, **kw)

    build.__doc__ = f"RAE decoder preset: width {width}, depth {depth}, {heads} heads."
    return build


rae_decoder_tiny = _preset(192, 4, 3)
rae_decoder_small = _preset(384, 12, 6)
rae_decoder_base = _preset(768, 12, 12)
rae_decoder_large = _preset(1024, 24, 16)
rae_decoder_xl = _preset(1152, 28, 16)  # the anchor's ViT-XL decoder


def strip_final_norm_affine(encoder: nn.Module) -> None:
    """Replace the final LayerNorm of a timm ViT teacher (``encoder.model.norm`` or ``encoder.norm``) by one without
    affine parameters, as the anchor does to DINOv2 (``layernorm.weight = None``)."""
    model = getattr(encoder, "model", encoder)
    norm = getattr(model, "norm", None)
    if not isinstance(norm, nn.LayerNorm):
        raise ValueError(
            f"RAE final_norm='strip' needs a timm ViT teacher with a final LayerNorm (model.norm), found "
            f"{type(norm).__name__} on {type(encoder).__name__}: use final_norm='apply' for an encoder that returns "
            f"tokens before its final norm, or 'none'"
        )
    if norm.elementwise_affine:
        model.norm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)


class RAE(Tokenizer):
    """RAE tokenizer: ``encode(x) -> [B, D, g, g]`` normalised latent, ``decode(z) -> image``.

    Args:
        encoder: a frozen encoder with ``encode(images) -> TokenSet`` of ``g*g`` patch tokens per image and ``dim``;
            wrapped in :class:`FrozenEncoder` if it is not one (so checkpoints never store it).
        decoder: the trainable :class:`RAEDecoder` (its ``latent_dim`` must equal ``encoder.dim``).
        noise_tau: decoder noise augmentation strength (0 disables it).
        final_norm: how the final LayerNorm without affine parameters is obtained. ``"strip"`` (the anchor's way):
            the encoder's own final LayerNorm (timm's ``model.norm``) loses its affine parameters; ``"apply"``: the
            encoder returns tokens before its final norm and RAE applies ``LayerNorm(D, affine=False, eps=1e-6)``;
            ``"none"``: tokens as the encoder returns them.
        eps: added to the variance of the latent statistics.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: RAEDecoder,
        noise_tau: float = 0.8,
        final_norm: str = "strip",
        eps: float = 1e-5,
    ):
        dim = int(encoder.dim)
        if decoder.latent_dim != dim:
            raise ValueError(
                f"RAE decoder latent_dim {decoder.latent_dim} != encoder dim {dim}: build the decoder "
                f"with latent_dim={dim}"
            )
        super().__init__(stat_shape=(dim, decoder.grid, decoder.grid), eps=eps)
        if final_norm not in ("strip", "apply", "none"):
            raise ValueError(f"RAE final_norm must be 'strip', 'apply' or 'none', got {final_norm!r}")
        if final_norm == "strip":
            strip_final_norm_affine(encoder.encoder if isinstance(encoder, FrozenEncoder) else encoder)
        self.encoder = encoder if isinstance(encoder, FrozenEncoder) else FrozenEncoder(encoder)
        self.decoder = decoder
        self.noise_tau = float(noise_tau)
        self.final_norm = final_norm

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.latent_mean.shape)  # (D, g, g)

    @property
    def image_size(self) -> int:
        return self.decoder.image_size

    @torch.no_grad()
    def _encode(self, x: Tensor) -> Tensor:
        tokens = self.encoder.encode(x)
        z, mask = tokens.to_dense()  # [B, N, D]
        g = self.decoder.grid
        if not bool(mask.all()) or z.shape[1] != g * g:
            raise ValueError(
                f"RAE encoder returned {z.shape[1]} tokens per image, the decoder expects a {g}x{g} grid: check the "
                f"image size ({tuple(x.shape[-2:])}) and the encoder's patch size, or build the decoder with grid="
                f"{int(z.shape[1] ** 0.5)}"
            )
        if self.final_norm == "apply":
            z = F.layer_norm(z.float(), (z.shape[-1],), eps=1e-6)
        return z.transpose(1, 2).reshape(z.shape[0], -1, g, g)  # [B, D, g, g], row-major token order

    def _decode(self, z: Tensor) -> Tensor:
        b, d, g, _ = z.shape
        return self.decoder(z.reshape(b, d, g * g).transpose(1, 2))  # tokens [B, N, D] -> image

    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Encode and decode; in training mode the raw latent is noise-augmented first (as the anchor)."""
        z = self._encode(x)
        if self.training and self.noise_tau > 0:
            z = noise_augment(z, self.noise_tau, generator)
        return self._decode(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)
