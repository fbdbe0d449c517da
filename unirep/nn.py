"""Small neural-network pieces shared by the backends."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1.0) -> Tensor:
    """Sinusoidal embedding ``t[B] -> [B, dim]``: cosines of the first half of the frequencies, then sines
    (DiT's order), zero-padded to an odd ``dim``.

    ``scale`` multiplies ``t`` first: DiT/SiT embed times in [0, 1] as they are (``scale=1``); networks that want
    the integer-step frequencies of DDPM timesteps embed ``1000 t``. Computed in ``t``'s floating dtype (float32
    for integer ``t``).
    """
    dtype = t.dtype if t.is_floating_point() else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = (scale * t.to(dtype))[:, None] * freqs[None]  # [B, half]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))
