"""Frozen teachers: the ``Encoder`` protocol and :class:`FrozenEncoder`, a wrapper with a content-keyed feature cache.

An encoder maps a batch of samples (images, molecules) to per-token features as a :class:`~unirep.TokenSet`
and, optionally, one pooled vector per item (a ViT's class token). Teachers are frozen: REPA aligns a
student to DINOv2 patch tokens (Yu et al. 2025, sihyun-yu/REPA), MACE-REPA to a foundation potential's
per-atom features. When the data set is fixed the teacher features of an item never change, so they are computed
once: ``unirep-features`` (:mod:`unirep.features`) precomputes them into read-only shards, and
:class:`FrozenEncoder` serves a training step from those shards or a bounded in-memory LRU.

Keys are *content digests*, never item ids: regenerated data that reuses an id gets new features. The namespace of a
digest is the teacher (``cache_key``, a fingerprint of its weights and settings) and the feature kind (tokens of the
last layer, tokens at layer ``k``, the pooled vector). The store of one teacher and kind is::

    <cache_dir>/<cache_key>/<kind>/index.json               {"items": {digest: shard file name}, ...}
    <cache_dir>/<cache_key>/<kind>/shard_00000.safetensors  tensors "<digest>" (x) and "<digest>.pos" (optional)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from unirep.tokens import TokenSet

__all__ = [
    "Encoder",
    "FrozenEncoder",
    "ShardStore",
    "module_fingerprint",
    "tensor_item_digests",
    "feature_kind",
    "FEATURES_COMMAND",
    "INDEX_FORMAT",
]

log = logging.getLogger(__name__)

FEATURES_COMMAND = "unirep-features"  # the console script that precomputes the shards (unirep.features)
INDEX_FORMAT = "unirep-features/1"

Entry = dict[str, Tensor]  # one item's features: "x" ([n, D] tokens or [D] pooled) and optionally "pos" ([n, k])


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


def _settings_signature(module: nn.Module) -> str:
    """What changes a teacher's output besides its weights: the encoder's ``cache_settings()`` (grid size, input
    size; a dict) when it has one, and its non-persistent buffers (input normalisation)."""
    fn = getattr(module, "cache_settings", None)
    parts = [repr(sorted(fn().items()))] if callable(fn) else []
    persistent = set(module.state_dict())
    for name, buf in sorted(module.named_buffers()):
        if name not in persistent and buf.numel() <= 4096:
            parts.append(f"{name}={buf.detach().float().cpu().flatten().tolist()!r}")
    return ";".join(parts)


def tensor_item_digests(x: Tensor) -> list[str]:
    """sha1 of each item of a batch ``x[B, ...]``: its bytes, dtype and shape (the same on any device)."""
    x = x.detach()
    if x.dim() == 0:
        raise ValueError("tensor_item_digests needs a batch [B, ...], got a 0-d tensor")
    head = f"{x.dtype}|{tuple(x.shape[1:])}|".encode()
    flat = x.to("cpu").contiguous()
    if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
        flat = flat.view(torch.int16)
    arr = flat.numpy()
    out = []
    for i in range(arr.shape[0]):
        h = hashlib.sha1(head)
        h.update(arr[i].tobytes())
        out.append(h.hexdigest())
    return out


def feature_kind(layer: int | None = None, pooled: bool = False) -> str:
    """The folder name of a feature kind: ``tokens`` (last layer), ``tokens_layer<k>``, ``pooled``."""
    if pooled:
        if layer is not None:
            raise ValueError("a pooled teacher target has no layer: set layer=None with pooled=True")
        return "pooled"
    return "tokens" if layer is None else f"tokens_layer{int(layer)}"


def _fix_hint() -> str:
    return (
        f"rerun `{FEATURES_COMMAND}` with the same experiment and overrides as the training run (it recomputes only "
        "what is missing)"
    )


class ShardStore:
    """Read-only view of one teacher's precomputed features of one kind (the folder ``unirep-features`` writes).

    Shard files are opened lazily with ``safetensors.safe_open`` and their handles kept (memory-mapped reads).
    A missing folder is an empty store. An unreadable index or shard stops with the file and the fix.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.index_path = self.folder / "index.json"
        self.items: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, set[str]] = {}
        if self.index_path.is_file():
            try:
                index = json.loads(self.index_path.read_text())
                self.items = dict(index["items"])
            except (ValueError, KeyError, TypeError) as err:
                raise RuntimeError(
                    f"teacher feature index {self.index_path} is unreadable ({err}): delete it and {_fix_hint()}"
                ) from err

    def __contains__(self, digest: str) -> bool:
        return digest in self.items

    def __len__(self) -> int:
        return len(self.items)

    def _handle(self, shard: str) -> Any:
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            path = self.folder / shard
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
                self._keys[shard] = set(handle.keys())  # keys() lists the whole shard: once, not per item
            except Exception as err:
                raise RuntimeError(
                    f"teacher feature shard {path} is unreadable ({err}): delete it and {_fix_hint()}"
                ) from err
            self._handles[shard] = handle
        return handle

    def get(self, digest: str) -> Entry | None:
        """The stored features of one item, or ``None`` when the store does not have it."""
        shard = self.items.get(digest)
        if shard is None:
            return None
        handle = self._handle(shard)
        try:
            entry = {"x": handle.get_tensor(digest)}
            if f"{digest}.pos" in self._keys[shard]:
                entry["pos"] = handle.get_tensor(f"{digest}.pos")
        except Exception as err:
            raise RuntimeError(
                f"teacher feature shard {self.folder / shard} is unreadable or lacks item {digest} ({err}): delete "
                f"it and {_fix_hint()}"
            ) from err
        return entry

    def close(self) -> None:
        self._handles.clear()
        self._keys.clear()


def _entry_bytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry.values())


def _subset(sample: Any, idx: list[int]) -> Any | None:
    """The items ``idx`` of a batch (a tensor, or an object with ``select``), or ``None`` when it cannot be split."""
    if isinstance(sample, Tensor):
        return sample[idx]
    select = getattr(sample, "select", None)
    return select(idx) if callable(select) else None


def _split_tokens(ts: TokenSet) -> list[Entry]:
    """One entry per item of a token set (token order within an item kept)."""
    order = torch.argsort(ts.batch, stable=True)
    counts = torch.bincount(ts.batch, minlength=ts.num_items).tolist()
    x = ts.x[order].detach().to("cpu", copy=True)
    pos = ts.pos[order].detach().to("cpu", copy=True) if ts.pos is not None else None
    out, start = [], 0
    for c in counts:
        e = {"x": x[start : start + c].clone()}  # clone: an entry must not keep the whole batch alive
        if pos is not None:
            e["pos"] = pos[start : start + c].clone()
        out.append(e)
        start += c
    return out


def _join_tokens(entries: Sequence[Entry]) -> TokenSet:
    xs = [e["x"] for e in entries]
    batch = torch.cat([torch.full((x.shape[0],), j, dtype=torch.long) for j, x in enumerate(xs)])
    pos = torch.cat([e["pos"] for e in entries]) if entries and all("pos" in e for e in entries) else None
    return TokenSet(torch.cat(xs), batch, pos, len(xs))


class FrozenEncoder(nn.Module):
    """Wrap an encoder as a frozen teacher: eval mode, no gradients, a content-keyed feature cache.

    Lookup order for each item: the in-memory LRU, then the precomputed shards under ``cache_dir`` (a shard hit is
    kept in the LRU too); the items found in neither are computed by the teacher in one call and kept in memory only
    (a training step never writes files).

    Args:
        encoder: a module with ``encode(sample) -> TokenSet`` and ``dim``; may also have
            ``encode_pooled(sample) -> Tensor[B, D]``, ``forward_intermediates(sample, indices)`` (features at another
            layer) and ``item_digests(sample) -> list[str]`` (content keys of non-tensor samples, e.g. molecules).
        cache_dir: root of the precomputed shards (``unirep-features`` writes there); ``None``: memory only.
        cache_key: names the teacher in the cache; defaults to a fingerprint of its weights and settings, so a
            changed teacher never reads stale features.
        max_memory_mb: bound of the in-memory LRU (least recently used items are dropped first); 0 turns it off.
        cache: ``False`` turns all caching off (every call runs the teacher).
    """

    def __init__(
        self,
        encoder: nn.Module,
        cache_dir: str | os.PathLike | None = None,
        cache_key: str | None = None,
        max_memory_mb: float = 512.0,
        cache: bool = True,
    ):
        super().__init__()
        self.encoder = encoder
        self.encoder.eval()
        self.encoder.requires_grad_(False)
        self.dim = int(encoder.dim)
        has_pooled = hasattr(encoder, "encode_pooled")
        self.pooled_dim: int | None = int(getattr(encoder, "pooled_dim", self.dim)) if has_pooled else None
        self._key = cache_key
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_memory_bytes = int(max_memory_mb * 2**20)
        self.cache_enabled = bool(cache)
        self._memory: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._memory_bytes = 0
        self._stores: dict[str, ShardStore] = {}
        self._warned: set[str] = set()
        self.hits = 0  # calls answered without the teacher
        self.misses = 0  # calls that ran the teacher
        self.item_hits = 0
        self.item_misses = 0
        self.teacher_calls = 0

    def train(self, mode: bool = True) -> FrozenEncoder:  # a teacher never leaves eval mode
        super().train(False)
        return self

    @property
    def cache_key(self) -> str:
        if self._key is None:
            self._key = module_fingerprint(self.encoder, extra=_settings_signature(self.encoder))
        return self._key

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    def feature_dim(self, layer: int | None = None) -> int:
        """Token feature size at ``layer`` (the encoder's ``feature_dim`` when it has one, else ``dim``)."""
        fn = getattr(self.encoder, "feature_dim", None)
        return int(fn(layer)) if (layer is not None and callable(fn)) else self.dim

    # -- keys and stores -----------------------------------------------------------------------------------------
    def item_digests(self, sample: Any) -> list[str] | None:
        """Content keys of the items of ``sample``, or ``None`` when they cannot be computed (no caching then)."""
        if isinstance(sample, Tensor):
            return tensor_item_digests(sample)
        fn = getattr(self.encoder, "item_digests", None)
        return list(fn(sample)) if callable(fn) else None

    def store_dir(self, kind: str) -> Path | None:
        """The folder of the precomputed shards of ``kind`` (``None`` without ``cache_dir``)."""
        return self.cache_dir / self.cache_key / kind if self.cache_dir is not None else None

    def store(self, kind: str) -> ShardStore | None:
        if self.cache_dir is None:
            return None
        st = self._stores.get(kind)
        if st is None:
            st = self._stores[kind] = ShardStore(self.store_dir(kind))
        return st

    def reload_stores(self) -> None:
        """Forget the opened shard stores (after ``unirep-features`` wrote new shards in this process)."""
        for st in self._stores.values():
            st.close()
        self._stores.clear()

    def _mem_get(self, kind: str, digest: str) -> Entry | None:
        entry = self._memory.get((kind, digest))
        if entry is not None:
            self._memory.move_to_end((kind, digest))
        return entry

    def _mem_put(self, kind: str, digest: str, entry: Entry) -> None:
        size = _entry_bytes(entry)
        if size > self.max_memory_bytes:
            return
        old = self._memory.pop((kind, digest), None)
        if old is not None:
            self._memory_bytes -= _entry_bytes(old)
        self._memory[(kind, digest)] = entry
        self._memory_bytes += size
        while self._memory_bytes > self.max_memory_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._memory_bytes -= _entry_bytes(dropped)

    def lookup(self, kind: str, digests: Sequence[str]) -> list[Entry | None]:
        """Cached features of each digest (memory, then shards), ``None`` where neither has it."""
        store = self.store(kind)
        out: list[Entry | None] = []
        for d in digests:
            e = self._mem_get(kind, d)
            if e is None and store is not None:
                e = store.get(d)
                if e is not None and self.max_memory_bytes > 0:  # later epochs read memory, not the shard
                    self._mem_put(kind, d, e)
            out.append(e)
        return out

    def clear_memory(self) -> None:
        """Drop the in-memory copy of the cache (the shards stay)."""
        self._memory.clear()
        self._memory_bytes = 0

    # -- computing -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_tokens(self, sample: Any, layer: int | None = None) -> TokenSet:
        """Run the teacher (no cache): last-layer tokens, or ``forward_intermediates(sample, [layer])``'s."""
        self.teacher_calls += 1
        if layer is None:
            return self.encoder.encode(sample)
        fn = getattr(self.encoder, "forward_intermediates", None)
        if not callable(fn):
            raise TypeError(
                f"teacher {type(self.encoder).__name__} has no forward_intermediates(sample, indices): it cannot give "
                f"features at layer {layer}; use layer=None (its last layer)"
            )
        _, feats = fn(sample, [layer])
        return feats[0]

    @torch.no_grad()
    def compute_pooled(self, sample: Any) -> Tensor:
        """Run the teacher (no cache): its pooled vector ``[B, D]``, or the token mean."""
        self.teacher_calls += 1
        if hasattr(self.encoder, "encode_pooled"):
            return self.encoder.encode_pooled(sample)
        return self.encoder.encode(sample).pool("mean")

    def compute_entries(self, sample: Any, kind_layer: int | None, pooled: bool) -> list[Entry]:
        """Teacher features of each item as cache entries on the CPU (what the shards store)."""
        if pooled:
            out = self.compute_pooled(sample).detach().to("cpu", copy=True)
            return [{"x": out[j].clone()} for j in range(out.shape[0])]
        return _split_tokens(self.compute_tokens(sample, kind_layer))

    def _warn_missing(self, kind: str, n: int) -> None:
        if self.cache_dir is None or kind in self._warned:
            return
        self._warned.add(kind)
        log.warning(
            "teacher %s: %d item(s) of kind %r are not among the precomputed features under %s; they are computed "
            "by the teacher during training (kept in memory only). Precompute them once with `%s experiment=<the "
            "recipe> <same overrides as unirep-train>`.",
            type(self.encoder).__name__,
            n,
            kind,
            self.store_dir(kind),
            FEATURES_COMMAND,
        )

    def _default_device(self, sample: Any) -> torch.device:
        if isinstance(sample, Tensor):
            return sample.device
        p = next(iter(self.encoder.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    def normalize_layer(self, layer: int | None) -> int | None:
        """``layer`` in ``0..L`` when the encoder says its ``num_layers`` (so ``-1`` and ``L`` share one store)."""
        n = getattr(self.encoder, "num_layers", None)
        if layer is None or n is None:
            return layer
        from unirep.intermediates import normalize_index

        return normalize_index(int(layer), int(n), f"teacher {type(self.encoder).__name__}")

    @torch.no_grad()
    def _cached(self, sample: Any, layer: int | None, pooled: bool, device: torch.device | None) -> Any:
        layer = self.normalize_layer(layer)
        kind = feature_kind(layer, pooled)
        digests = self.item_digests(sample) if self.cache_enabled else None
        if digests is None:
            self.misses += 1
            out = self.compute_pooled(sample) if pooled else self.compute_tokens(sample, layer)
            return out.to(device) if device is not None else out
        entries = self.lookup(kind, digests)
        missing = [j for j, e in enumerate(entries) if e is None]
        self.item_hits += len(entries) - len(missing)
        self.item_misses += len(missing)
        if missing:
            self.misses += 1
            self._warn_missing(kind, len(missing))
            part = _subset(sample, missing) if len(missing) < len(entries) else sample
            if part is None:  # cannot split the batch: run the teacher on all of it
                missing, part = list(range(len(entries))), sample
            new = self.compute_entries(part, layer, pooled)
            if len(new) != len(missing):
                raise ValueError(f"teacher returned {len(new)} items for a batch of {len(missing)}")
            for j, e in zip(missing, new, strict=True):
                entries[j] = e
                if self.max_memory_bytes > 0:
                    self._mem_put(kind, digests[j], e)
        else:
            self.hits += 1
        out = torch.stack([e["x"] for e in entries]) if pooled else _join_tokens(entries)
        return out.to(device if device is not None else self._default_device(sample))

    def encode(
        self,
        sample: Any,
        layer: int | None = None,
        device: torch.device | None = None,
        ids: Sequence[str] | None = None,
    ) -> TokenSet:
        """Per-token teacher features (at ``layer`` when given, else the last layer's ``encode``).

        ``ids`` is accepted for old callers and ignored: features are keyed by content, never by id.
        """
        return self._cached(sample, layer, False, device)

    def encode_pooled(
        self, sample: Any, device: torch.device | None = None, ids: Sequence[str] | None = None
    ) -> Tensor:
        """One vector per item ``[B, D]`` (the encoder's pooled output, or the token mean); ``ids`` is ignored."""
        return self._cached(sample, None, True, device)
