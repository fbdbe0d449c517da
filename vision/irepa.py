"""iREPA: REPA with a convolutional projector on the token grid and spatially normalised teacher tokens.

Singh, Leng, Wu, Zheng, Zhang, Shechtman & Xie 2025, "What Matters for Representation Alignment: Global Information
or Spatial Structure?" (arXiv 2512.10794); anchor code End2End-Diffusion/iREPA: ``ldm/models/sit.py``
(``ProjectionLayer``, type ``conv``), ``ldm/utils.py`` (``SpatialNormalization``, ``spatial_zscore``), ``ldm/train.py``
and ``ldm/configs/irepa.yaml`` (the SiT recipe), ``jit/`` (the same two changes on JiT). The paper finds that the
spatial structure of the teacher's tokens, not its global semantics, predicts REPA's benefit; iREPA keeps that
structure in both places:

1. :class:`ConvProjector`: one ``Conv2d(D, D_teacher, k, padding k // 2)`` on the student's ``[B, D, H, W]`` token
   grid instead of REPA's per-token MLP, PyTorch's default Conv2d initialisation (the anchor's Xavier init touches
   ``nn.Linear`` only). Kernel 3: the README's "three lines", the SiT class default and the JiT recipe's default.
   (The LDM ``train.py`` flag ``--proj-kwargs-kernel-size`` defaults to 1, which the config does not override: a
   1 x 1 conv is a per-token linear map; pass ``kernel_size: 1`` to reproduce that.)
2. :func:`spatial_zscore`: each item's teacher patch tokens ``[N, D]`` become
   ``(f - alpha mean_N f) / (std_N f + 1e-6)``, the mean and the (unbiased, ``torch.std``) standard deviation over
   the N spatial positions per channel; ``alpha`` 0.6 for the SiT recipe (``--zscore-alpha``; JiT's 0.8).
   :class:`SpatialNormTarget` is a :class:`unirep.align.TeacherTarget` that applies it, so the shared
   feature cache, ``unirep-features`` and the task's teacher work as for REPA.

The rest is REPA's (block 4 of SiT-B, negative cosine to the teacher's patch tokens); the SiT recipe's weight is
1.0 (``proj_coeff: "1.0"`` in ``ldm/configs/irepa.yaml``, against REPA's 0.5; the JiT recipe keeps 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from unirep.align import AlignContext, TeacherTarget
from unirep.tokens import TokenSet

__all__ = ["ConvProjector", "SpatialNormTarget", "spatial_zscore"]


def _per_item_grid(tokens: TokenSet, fn: Callable[[Tensor], Tensor], what: str) -> TokenSet:
    """Apply ``fn: [B, N, D] -> [B, N, D']`` to the items' tokens and return them in the TokenSet's own order."""
    if not tokens.is_uniform:
        raise ValueError(f"{what} needs the same number of tokens in every item (an image patch grid)")
    dense, _ = tokens.to_dense()  # [B, N, D], tokens of an item in their order
    out = fn(dense)
    order = torch.argsort(tokens.batch, stable=True)
    n = dense.shape[1]
    slot = torch.arange(order.numel(), device=order.device) % n  # uniform items: the k-th token of each item
    flat = out[tokens.batch[order], slot]  # [T, D'] in item-sorted order
    return tokens.with_x(torch.empty_like(flat).index_copy_(0, order, flat))


def spatial_zscore(tokens: TokenSet | Tensor, alpha: float = 0.6, eps: float = 1e-6) -> TokenSet | Tensor:
    """iREPA's spatial normalisation per item: ``(f - alpha mean) / (std + eps)`` over the item's tokens.

    ``tokens``: a TokenSet with the same count per item, or a dense ``[B, N, D]`` tensor. Statistics per channel over
    the N tokens, standard deviation unbiased (``torch.std``), computed in float32 at least.
    """
    if isinstance(tokens, TokenSet):
        return _per_item_grid(tokens, lambda dense: spatial_zscore(dense, alpha, eps), "spatial_zscore")
    if tokens.dim() != 3 or tokens.shape[1] < 2:
        raise ValueError(f"spatial_zscore expects [B, N, D] with N >= 2 tokens, got {tuple(tokens.shape)}")
    f = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    mean = f.mean(dim=1, keepdim=True)
    std = f.std(dim=1, keepdim=True)
    return (f - alpha * mean) / (std + eps)


class SpatialNormTarget(TeacherTarget):
    """A frozen teacher's patch tokens, spatially z-scored per item (iREPA); arguments as :class:`TeacherTarget`.

    Args:
        alpha: the share of the spatial mean removed (anchor SiT recipe 0.6, JiT 0.8; 1 is a full z-score).
        eps: added to the standard deviation (anchor 1e-6).
    """

    def __init__(
        self,
        encoder: nn.Module | None = None,
        layer: int | None = None,
        mode: str = "tokens",
        input_key: str | tuple[str, ...] | None = ("image", "x"),
        cache_dir: str | None = None,
        alpha: float = 0.6,
        eps: float = 1e-6,
    ) -> None:
        if mode != "tokens":
            raise ValueError(
                f"SpatialNormTarget normalises patch tokens over the grid: mode must be 'tokens', got {mode!r}"
            )
        super().__init__(encoder=encoder, layer=layer, mode=mode, input_key=input_key, cache_dir=cache_dir)
        self.alpha, self.eps = float(alpha), float(eps)

    def tokens(self, ctx: AlignContext) -> TokenSet:
        # the raw tokens stay in the per-step memo (a REPA term on the same teacher reads them unnormalised)
        return spatial_zscore(super().tokens(ctx), self.alpha, self.eps).detach()


class ConvProjector(nn.Module):
    """iREPA's projector: ``Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)`` on each item's grid.

    Takes a TokenSet whose items are square grids of N = s * s tokens in row-major order (the SiT's patch order) and
    returns one with the same tokens, or a dense ``[B, N, in_dim]`` tensor. ``grid_input = True`` tells
    :class:`unirep.align.AlignmentTerm` to hand it the TokenSet instead of the flat token features.
    """

    grid_input = True

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ConvProjector kernel_size must be odd and >= 1 (same-size output), got {kernel_size}")
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
        self.in_dim, self.out_dim, self.kernel_size = in_dim, out_dim, kernel_size

    def _grid(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        s = math.isqrt(n)
        if s * s != n:
            raise ValueError(f"ConvProjector needs a square token grid per item, got {n} tokens (REG's class token?)")
        grid = x.reshape(b, s, s, d).permute(0, 3, 1, 2)  # [B, D, s, s]
        return self.conv(grid).permute(0, 2, 3, 1).reshape(b, n, self.out_dim)  # [B, N, D_out]

    def forward(self, tokens: TokenSet | Tensor) -> TokenSet | Tensor:
        if isinstance(tokens, TokenSet):
            return _per_item_grid(tokens, self._grid, "ConvProjector")
        if tokens.dim() != 3:
            raise ValueError(
                f"ConvProjector takes a TokenSet or a dense [B, N, D] tensor, got shape {tuple(tokens.shape)}: flat "
                "token features carry no grid"
            )
        return self._grid(tokens)
