"""Frozen teachers: the ``Encoder`` protocol and the :class:`FrozenEncoder` wrapper with a feature cache.

An encoder maps a batch of samples (images, molecules) to per-token features as a :class:`~unirep.TokenSet`
and, optionally, one pooled vector per item (a ViT's class token). Teachers are frozen: REPA aligns a
student to DINOv2 patch tokens (Yu et al. 2025, sihyun-yu/REPA), MACE-REPA to a foundation potential's
per-atom features. When the data set is fixed the teacher features of an item never change, so
:class:`FrozenEncoder` caches them on disk keyed by item id and the teacher runs once per item, not once
per step.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from unirep.tokens import TokenSet

__all__ = ["Encoder", "FrozenEncoder", "module_fingerprint"]


@runtime_checkable
class Encoder(Protocol):
    """What a teacher provides. ``dim`` is the token feature size."""

    dim: int

    def encode(self, sample: Any) -> TokenSet:
        """Per-token features of a batch of items."""
        ...


def module_fingerprint(module: nn.Module, extra: str = "") -> str:
    """A short hash of a module's class, parameter shapes and values: identifies a teacher for caching."""
    h = hashlib.sha1(type(module).__qualname__.encode())
    h.update(extra.encode())
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            if t.numel():
                flat = t.detach().float().flatten()
                # a strided subsample plus the sum keeps this fast for large teachers
                h.update(flat[:: max(1, flat.numel() // 4096)].cpu().numpy().tobytes())
                h.update(repr(float(flat.double().sum())).encode())
    return h.hexdigest()[:16]


_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class FrozenEncoder(nn.Module):
    """Wrap an encoder as a frozen teacher: eval mode, no gradients, optional per-item feature cache.

    Args:
        encoder: a module with ``encode(sample) -> TokenSet`` and ``dim``; may also have
            ``encode_pooled(sample) -> Tensor[B, D]``.
        cache_dir: folder for the on-disk cache (``None``: in-memory cache only when ``ids`` are given).
        cache_key: names the teacher in the cache; defaults to a fingerprint of its weights, so a changed
            teacher never reads stale features.
    """

    def __init__(self, encoder: nn.Module, cache_dir: str | os.PathLike | None = None, cache_key: str | None = None):
        super().__init__()
        self.encoder = encoder
        self.encoder.eval()
        self.encoder.requires_grad_(False)
        self.dim = int(encoder.dim)
        self._key = cache_key
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._memory: dict[str, dict[str, Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def train(self, mode: bool = True) -> FrozenEncoder:  # a teacher never leaves eval mode
        super().train(False)
        return self

    @property
    def cache_key(self) -> str:
        if self._key is None:
            self._key = module_fingerprint(self.encoder)
        return self._key

    def _path(self, kind: str, item_id: str) -> Path:
        assert self.cache_dir is not None
        safe = _SAFE.sub("_", item_id)
        if safe != item_id or len(safe) > 120:
            safe = safe[:80] + "-" + hashlib.sha1(item_id.encode()).hexdigest()[:12]
        return self.cache_dir / self.cache_key / kind / f"{safe}.safetensors"

    def _get(self, kind: str, item_id: str) -> dict[str, Tensor] | None:
        mem = self._memory.get(f"{kind}/{item_id}")
        if mem is not None:
            return mem
        if self.cache_dir is None:
            return None
        path = self._path(kind, item_id)
        if not path.exists():
            return None
        try:
            entry = load_file(str(path))
        except Exception as err:  # a corrupt entry is recomputed, never trusted
            raise RuntimeError(
                f"teacher feature cache entry {path} is unreadable ({err}); delete it (or the folder "
                f"{self.cache_dir / self.cache_key}) and it will be recomputed"
            ) from err
        self._memory[f"{kind}/{item_id}"] = entry
        return entry

    def _put(self, kind: str, item_id: str, entry: dict[str, Tensor]) -> None:
        entry = {k: v.detach().to("cpu").contiguous() for k, v in entry.items()}
        self._memory[f"{kind}/{item_id}"] = entry
        if self.cache_dir is None:
            return
        path = self._path(kind, item_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(entry, str(tmp))
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written entry under the real name

    @torch.no_grad()
    def _compute_tokens(self, sample: Any) -> TokenSet:
        return self.encoder.encode(sample)

    @torch.no_grad()
    def _compute_pooled(self, sample: Any) -> Tensor:
        if hasattr(self.encoder, "encode_pooled"):
            return self.encoder.encode_pooled(sample)
        return self.encoder.encode(sample).pool("mean")

    @torch.no_grad()
    def encode(self, sample: Any, ids: Sequence[str] | None = None, device: torch.device | None = None) -> TokenSet:
        """Per-token teacher features; with ``ids`` (one string per item) features are cached per item."""
        if ids is None:
            return self._compute_tokens(sample)
        entries = [self._get("tokens", str(i)) for i in ids]
        if any(e is None for e in entries):
            self.misses += 1
            out = self._compute_tokens(sample)
            if out.num_items != len(ids):
                raise ValueError(f"teacher returned {out.num_items} items for {len(ids)} ids")
            for j, item_id in enumerate(ids):
                one = out.select([j])
                entry = {"x": one.x}
                if one.pos is not None:
                    entry["pos"] = one.pos
                self._put("tokens", str(item_id), entry)
            return out
        self.hits += 1
        xs = [e["x"] for e in entries]
        batch = torch.cat([torch.full((x.shape[0],), j, dtype=torch.long) for j, x in enumerate(xs)])
        pos = torch.cat([e["pos"] for e in entries]) if all("pos" in e for e in entries) else None
        ts = TokenSet(torch.cat(xs), batch, pos, len(xs))
        return ts.to(device) if device is not None else ts

    @torch.no_grad()
    def encode_pooled(
        self, sample: Any, ids: Sequence[str] | None = None, device: torch.device | None = None
    ) -> Tensor:
        """One vector per item ``[B, D]`` (the encoder's pooled output, or the token mean)."""
        if ids is None:
            return self._compute_pooled(sample)
        entries = [self._get("pooled", str(i)) for i in ids]
        if any(e is None for e in entries):
            self.misses += 1
            out = self._compute_pooled(sample)
            for j, item_id in enumerate(ids):
                self._put("pooled", str(item_id), {"x": out[j]})
            return out
        self.hits += 1
        out = torch.stack([e["x"] for e in entries])
        return out.to(device) if device is not None else out

    def clear_memory(self) -> None:
        """Drop the in-memory copy of the cache (the on-disk cache stays)."""
        self._memory.clear()
