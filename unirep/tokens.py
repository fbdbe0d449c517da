"""Token sets: the one data shape that images and molecules share.

A :class:`TokenSet` is a padding-free batch of feature vectors. ``x[T, D]`` holds the features of all T tokens
of a batch, ``batch[T]`` the index of the item each token belongs to (the torch_geometric convention), and
``pos[T, k]`` optional coordinates (atom positions in Å, or patch-grid coordinates).

- B images of N patches each: T = B*N, ``batch = arange(B).repeat_interleave(N)``;
- a batch of molecules: T = total atoms, ``batch`` the graph index.

Everything that aligns or compares representations (``unirep.align``, ``unirep.metrics``) takes token sets,
so it is written once for both domains. Reductions use ``index_add_`` so no torch-scatter is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

__all__ = ["TokenSet", "segment_sum", "segment_mean"]


def segment_sum(x: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Sum rows of ``x`` that share a segment index. ``x[T, ...]``, ``index[T]`` -> ``[num_segments, ...]``."""
    out = x.new_zeros((num_segments, *x.shape[1:]))
    return out.index_add_(0, index, x)


def segment_mean(x: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Mean of rows of ``x`` per segment; empty segments give zeros."""
    total = segment_sum(x, index, num_segments)
    count = torch.bincount(index, minlength=num_segments).clamp_min(1).to(x.dtype)
    return total / count.view(-1, *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class TokenSet:
    """A padding-free batch of tokens.

    Attributes:
        x: token features ``[T, D]``.
        batch: item index of each token ``[T]`` (long, non-decreasing is not required).
        pos: optional token coordinates ``[T, k]``.
        num_items: number of items B; given explicitly so that items without tokens are not lost.
    """

    x: Tensor
    batch: Tensor
    pos: Tensor | None = None
    num_items: int | None = None

    def __post_init__(self) -> None:
        if self.x.dim() != 2:
            raise ValueError(f"TokenSet.x must be [T, D], got shape {tuple(self.x.shape)}")
        if self.batch.dim() != 1 or self.batch.shape[0] != self.x.shape[0]:
            raise ValueError(
                f"TokenSet.batch must be [T] with T = {self.x.shape[0]}, got shape {tuple(self.batch.shape)}"
            )
        if self.batch.dtype != torch.long:
            object.__setattr__(self, "batch", self.batch.long())
        if self.pos is not None and self.pos.shape[0] != self.x.shape[0]:
            raise ValueError(f"TokenSet.pos must have T = {self.x.shape[0]} rows, got {self.pos.shape[0]}")
        if self.num_items is None:
            n = int(self.batch.max().item()) + 1 if self.batch.numel() else 0
            object.__setattr__(self, "num_items", n)

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, x: Tensor, pos: Tensor | None = None, mask: Tensor | None = None) -> TokenSet:
        """Build from ``x[B, N, D]`` (and ``pos[B, N, k]``); ``mask[B, N]`` marks real tokens when padded."""
        b, n, d = x.shape
        if mask is None:
            batch = torch.arange(b, device=x.device).repeat_interleave(n)
            return cls(x.reshape(b * n, d), batch, None if pos is None else pos.reshape(b * n, -1), b)
        batch = torch.arange(b, device=x.device)[:, None].expand(b, n)[mask]
        return cls(x[mask], batch, None if pos is None else pos[mask], b)

    def to_dense(self, fill: float = 0.0) -> tuple[Tensor, Tensor]:
        """Return ``(x[B, N_max, D], mask[B, N_max])``; order of tokens within an item is preserved."""
        counts = self.counts
        n_max = int(counts.max().item()) if counts.numel() else 0
        order = torch.argsort(self.batch, stable=True)
        batch = self.batch[order]
        start = torch.cumsum(counts, 0) - counts
        slot = torch.arange(batch.shape[0], device=batch.device) - start[batch]
        out = self.x.new_full((self.num_items, n_max, self.dim), fill)
        mask = torch.zeros(self.num_items, n_max, dtype=torch.bool, device=self.x.device)
        out[batch, slot] = self.x[order]
        mask[batch, slot] = True
        return out, mask

    # -- properties -----------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.x.shape[1]

    @property
    def counts(self) -> Tensor:
        """Number of tokens per item ``[B]``."""
        return torch.bincount(self.batch, minlength=self.num_items)

    @property
    def is_uniform(self) -> bool:
        """True when every item has the same number of tokens (an image batch)."""
        c = self.counts
        return bool((c == c[0]).all()) if c.numel() else True

    def __len__(self) -> int:
        return self.x.shape[0]

    # -- operations -----------------------------------------------------------------------------------------
    def pool(self, reduce: str = "mean") -> Tensor:
        """One vector per item ``[B, D]`` (``mean`` or ``sum``)."""
        if reduce == "mean":
            return segment_mean(self.x, self.batch, self.num_items)
        if reduce == "sum":
            return segment_sum(self.x, self.batch, self.num_items)
        raise ValueError(f"unknown reduce {reduce!r}: use 'mean' or 'sum'")

    def with_x(self, x: Tensor) -> TokenSet:
        """Same items and positions, new features (e.g. after a projector)."""
        return replace(self, x=x)

    def select(self, items: Tensor | list[int]) -> TokenSet:
        """Keep the given items (renumbered 0..len(items)-1 in the given order)."""
        items = torch.as_tensor(items, device=self.batch.device, dtype=torch.long)
        remap = torch.full((self.num_items,), -1, dtype=torch.long, device=self.batch.device)
        remap[items] = torch.arange(items.numel(), device=items.device)
        new_batch = remap[self.batch]
        keep = new_batch >= 0
        order = torch.argsort(new_batch[keep], stable=True)
        idx = keep.nonzero().squeeze(1)[order]
        return TokenSet(self.x[idx], new_batch[idx], None if self.pos is None else self.pos[idx], int(items.numel()))

    def detach(self) -> TokenSet:
        return replace(self, x=self.x.detach(), pos=None if self.pos is None else self.pos.detach())

    def to(self, *args, **kwargs) -> TokenSet:
        """Move/cast like ``Tensor.to``; ``batch`` keeps its long dtype."""
        x = self.x.to(*args, **kwargs)
        return TokenSet(
            x,
            self.batch.to(x.device),
            None if self.pos is None else self.pos.to(*args, **kwargs),
            self.num_items,
        )

    @staticmethod
    def cat_items(sets: list[TokenSet]) -> TokenSet:
        """Concatenate token sets as consecutive items (item indices are offset)."""
        xs, bs, ps, offset = [], [], [], 0
        for s in sets:
            xs.append(s.x)
            bs.append(s.batch + offset)
            ps.append(s.pos)
            offset += s.num_items
        pos = None if any(p is None for p in ps) else torch.cat(ps)
        return TokenSet(torch.cat(xs), torch.cat(bs), pos, offset)
