"""Tokenizers: the map between data space and the space a generative model is trained in.

``encode(x) -> z`` and ``decode(z) -> x``; latent normalisation statistics are named buffers (``latent_mean``,
``latent_std``) that are computed from data (:meth:`Tokenizer.fit_statistics`) and saved with the model,
never magic numbers in a training loop (the counter-example is LDM's ``0.18215``). Implementations: the
identity (pixels), VA-VAE and RAE (``vision``), the local atomic autoencoder (``molecular``).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["Tokenizer", "IdentityTokenizer"]


class Tokenizer(nn.Module, abc.ABC):
    """Base class. Subclasses implement ``_encode``/``_decode``; this class applies the normalisation.

    ``encode`` returns the *normalised* latent ``(z_raw - latent_mean) / latent_std``; ``decode`` inverts the
    normalisation before ``_decode``. ``stat_shape`` is the shape the statistics broadcast over, without the
    batch dimension: ``(C, 1, 1)`` for channel statistics, ``(N, C)`` for per-position statistics (RAE).
    """

    def __init__(self, stat_shape: tuple[int, ...] = (1,), eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("latent_mean", torch.zeros(stat_shape))
        self.register_buffer("latent_std", torch.ones(stat_shape))

    @abc.abstractmethod
    def _encode(self, x: Tensor) -> Tensor:
        """Data -> raw (unnormalised) latent."""

    @abc.abstractmethod
    def _decode(self, z: Tensor) -> Tensor:
        """Raw latent -> data."""

    def normalize(self, z: Tensor) -> Tensor:
        return (z - self.latent_mean) / self.latent_std

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self.latent_std + self.latent_mean

    def encode(self, x: Tensor) -> Tensor:
        return self.normalize(self._encode(x))

    def decode(self, z: Tensor) -> Tensor:
        return self._decode(self.denormalize(z))

    @torch.no_grad()
    def fit_statistics(self, batches: Iterable[Tensor], reduce_dims: tuple[int, ...] = (0,)) -> None:
        """Set ``latent_mean``/``latent_std`` from raw latents of ``batches`` (streaming Chan et al. moment merge).

        ``reduce_dims`` are the dims of a raw latent batch averaged over (always including the batch dim 0);
        the rest must match ``stat_shape``.
        """
        count, mean, m2 = 0, None, None
        for x in batches:
            z = self._encode(x).double()
            n = 1
            for d in reduce_dims:
                n *= z.shape[d]
            b_mean = z.mean(dim=reduce_dims, keepdim=True)
            b_m2 = ((z - b_mean) ** 2).sum(dim=reduce_dims, keepdim=True)
            if mean is None:
                count, mean, m2 = n, b_mean, b_m2
            else:
                delta = b_mean - mean
                tot = count + n
                mean = mean + delta * n / tot
                m2 = m2 + b_m2 + delta**2 * count * n / tot
                count = tot
        if mean is None:
            raise ValueError("fit_statistics got no batches: the data set is empty")
        var = m2 / max(count - 1, 1)
        shape = self.latent_mean.shape
        self.latent_mean.copy_(mean.squeeze(0).reshape(shape).to(self.latent_mean))
        self.latent_std.copy_((var + self.eps).sqrt().squeeze(0).reshape(shape).to(self.latent_std))


class IdentityTokenizer(Tokenizer):
    """Pixels (or coordinates) as they are; statistics stay 0 and 1 unless fitted."""

    def _encode(self, x: Tensor) -> Tensor:
        return x

    def _decode(self, z: Tensor) -> Tensor:
        return z
