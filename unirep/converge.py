"""Platonic convergence: how far do the representations of many models agree on the same inputs?

Huh et al. 2024, "The Platonic Representation Hypothesis" (anchor: minyoungg/platonic-rep, ``metrics.py`` and
``measure_alignment.py``): features of every layer of two models on the same items are preprocessed (clamped at
the 0.95 quantile of ``|x|``, rows L2-normalised), every layer pair is scored with a kernel-alignment metric
(mutual k-NN by default) and the best pair is kept. Edamadaka et al. 2025 ("Universally Converging
Representations of Matter Across Scientific Foundation Models") and Li & Walsh 2025 ("Platonic representation of
foundation machine learning interatomic potentials") run the same study for interatomic potentials; Li & Walsh
compare models through *anchor-relative* embeddings (each item represented by its cosines to K anchor items).

This module is domain-agnostic: models are any :class:`~unirep.encoders.Encoder` built from config ``_target_``s,
the data any sequence of items with a ``collate`` function. Levels:

- ``item``: one mean-pooled vector per item (structure, image);
- ``token``: every token (atom, patch) as its own point;
- ``token_centred``: tokens after subtracting the mean feature of their group (element) -- raw per-atom features of
  different models agree mostly by element identity, which this removes;
- ``token_per_group``: metrics computed within each group and averaged weighted by the group's token count.

Groups come from the data set's optional ``token_groups(index) -> LongTensor[n_tokens]`` (atomic numbers).

Run it as ``unirep-converge --config-name molecular_quick`` (configs under ``configs/converge/``).
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from omegaconf import MISSING
from safetensors.torch import load_file, save_file
from torch import Tensor

from unirep.encoders import module_fingerprint
from unirep.tokens import TokenSet

__all__ = [
    "LayeredEncoder",
    "encode_layers",
    "ModelFeatures",
    "extract_features",
    "anchor_relative",
    "group_centre",
    "LEVELS",
    "ConvergenceResult",
    "compare",
    "run_convergence",
    "main",
]

log = logging.getLogger(__name__)

LEVELS = ("item", "token", "token_centred", "token_per_group")
_METRICS = ("mutual_knn", "cka", "unbiased_cka", "cknna", "svcca")


@runtime_checkable
class LayeredEncoder(Protocol):
    """An encoder that exposes several layers: one token set per layer, all over the same tokens."""

    def encode_layers(self, sample: Any) -> list[TokenSet]: ...


def encode_layers(encoder: Any, sample: Any) -> list[TokenSet]:
    """Token sets of every layer the encoder exposes: ``forward_intermediates(sample, None)`` (the one contract,
    :mod:`unirep.intermediates`), else ``[encoder.encode(sample)]`` for single-output encoders (descriptors)."""
    if hasattr(encoder, "forward_intermediates"):
        return list(encoder.forward_intermediates(sample, None)[1])
    if hasattr(encoder, "encode_layers"):
        return list(encoder.encode_layers(sample))
    return [encoder.encode(sample)]


def layer_names(encoder: Any, num_layers: int) -> list[str]:
    names = getattr(encoder, "layer_names", None)
    if names is not None and len(names) == num_layers:
        return [str(n) for n in names]
    return [str(i) for i in range(num_layers)]


# ---------------------------------------------------------------------------------------------------------------
# feature extraction with an on-disk cache
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ModelFeatures:
    """Every layer's features of one model over the whole data set.

    Attributes:
        name: the model's name in the study.
        layers: layer names, one per entry of ``tokens``.
        tokens: per-layer token features ``[T, D_l]`` (all items concatenated in data order).
        batch: item index of every token ``[T]``.
        groups: group label of every token ``[T]`` (atomic number) or ``None``.
        quality: the model's quality score (``None`` if it has none).
    """

    name: str
    layers: list[str]
    tokens: list[Tensor]
    batch: Tensor
    groups: Tensor | None = None
    quality: float | None = None

    @property
    def num_items(self) -> int:
        return int(self.batch.max().item()) + 1 if self.batch.numel() else 0

    def pooled(self, layer: int) -> Tensor:
        """Mean over each item's tokens ``[N, D_l]``."""
        return TokenSet(self.tokens[layer], self.batch, None, self.num_items).pool("mean")

    def select_layers(self, chosen: Sequence[int | str] | None) -> ModelFeatures:
        """Keep chosen layers, given by index (negative counts from the end) or by name."""
        if chosen is None:
            return self
        keep = []
        for c in chosen:
            if isinstance(c, str) and c in self.layers:
                keep.append(self.layers.index(c))
            elif isinstance(c, int) and -len(self.layers) <= c < len(self.layers):
                keep.append(c % len(self.layers))
            else:
                raise ValueError(
                    f"model {self.name!r}: layer {c!r} does not exist; it has layers {self.layers} "
                    f"(choose names from this list or indices in [-{len(self.layers)}, {len(self.layers) - 1}])"
                )
        return ModelFeatures(
            self.name,
            [self.layers[i] for i in keep],
            [self.tokens[i] for i in keep],
            self.batch,
            self.groups,
            self.quality,
        )


def _sha(*parts: str) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def data_fingerprint(dataset: Any, fallback: str = "") -> str:
    """Identifies the data: the data set's own ``fingerprint()`` if it has one, else ``fallback`` (its config)."""
    if hasattr(dataset, "fingerprint"):
        return str(dataset.fingerprint())
    return _sha(type(dataset).__qualname__, str(len(dataset)), fallback)


def encoder_fingerprint(encoder: Any, fallback: str = "") -> str:
    """Identifies an encoder: its ``cache_key`` if set, else a hash of its weights (modules) and its config."""
    key = getattr(encoder, "cache_key", None)
    if key:
        return str(key)
    if isinstance(encoder, torch.nn.Module):
        return module_fingerprint(encoder, fallback)
    return _sha(type(encoder).__qualname__, fallback)


def _collate(dataset: Any) -> Callable[[list[Any]], Any]:
    return getattr(dataset, "collate", None) or (lambda items: items)


@torch.no_grad()
def extract_features(
    encoder: Any,
    dataset: Any,
    name: str,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    cache_key: str | None = None,
    progress: bool = True,
) -> ModelFeatures:
    """Run ``encoder`` over ``dataset`` in batches (with a progress bar) and cache every layer on disk.

    The cache file is ``<cache_dir>/<name>-<cache_key>.safetensors``; ``cache_key`` must change whenever the
    encoder or the data change (:func:`run_convergence` hashes the encoder's weights/config and the data).
    """
    from tqdm.auto import tqdm

    path = None
    if cache_dir is not None and cache_key is not None:
        path = Path(cache_dir) / f"{_safe(name)}-{cache_key}.safetensors"
        if path.exists():
            try:
                stored = load_file(str(path))
            except Exception as err:  # a corrupt cache is never trusted
                raise RuntimeError(f"feature cache {path} of model {name!r} is unreadable ({err}); delete it") from err
            meta = json.loads(stored.pop("__meta__").numpy().tobytes().decode())
            tokens = [stored[f"layer_{i}"] for i in range(len(meta["layers"]))]
            return ModelFeatures(name, meta["layers"], tokens, stored["batch"], stored.get("groups"))

    n = len(dataset)
    if n == 0:
        raise ValueError(f"the data set is empty: model {name!r} has nothing to encode")
    collate = _collate(dataset)
    per_layer: list[list[Tensor]] | None = None
    batches: list[Tensor] = []
    names: list[str] = []
    for start in tqdm(range(0, n, batch_size), desc=f"features {name}", disable=not progress, leave=False):
        idx = list(range(start, min(n, start + batch_size)))
        layers = encode_layers(encoder, collate([dataset[i] for i in idx]))
        if not layers:
            raise ValueError(f"model {name!r} returned no layers")
        if per_layer is None:
            per_layer = [[] for _ in layers]
            names = layer_names(encoder, len(layers))
        elif len(layers) != len(per_layer):
            raise ValueError(
                f"model {name!r} returned {len(layers)} layers for items {idx[0]}.., before {len(per_layer)}"
            )
        ref = layers[0]
        if ref.num_items != len(idx):
            raise ValueError(
                f"model {name!r} returned {ref.num_items} items for a batch of {len(idx)} (items {idx[0]}-{idx[-1]}): "
                "its encode must return one item per input item"
            )
        order = torch.argsort(ref.batch.cpu(), stable=True)  # tokens grouped by item, in item order
        for li, ts in enumerate(layers):
            if ts.num_items != ref.num_items or not torch.equal(ts.batch.cpu(), ref.batch.cpu()):
                raise ValueError(f"model {name!r}: layer {names[li]} has different tokens than layer {names[0]}")
            per_layer[li].append(ts.x.detach().float().cpu()[order])
        batches.append(ref.batch.cpu()[order] + start)
    assert per_layer is not None
    tokens = [torch.cat(chunks) for chunks in per_layer]
    batch = torch.cat(batches)
    groups = _groups(dataset, batch)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"name": name, "layers": names}).encode()
        store = {f"layer_{i}": t.contiguous() for i, t in enumerate(tokens)}
        store["batch"] = batch
        store["__meta__"] = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
        if groups is not None:
            store["groups"] = groups
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(store, str(tmp))
        os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written cache under the real name
    return ModelFeatures(name, names, tokens, batch, groups)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _groups(dataset: Any, batch: Tensor) -> Tensor | None:
    if not hasattr(dataset, "token_groups"):
        return None
    groups = torch.cat([torch.as_tensor(dataset.token_groups(i), dtype=torch.long) for i in range(len(dataset))])
    if groups.shape[0] != batch.shape[0]:
        raise ValueError(
            f"the data set labels {groups.shape[0]} tokens with groups but the encoder returned {batch.shape[0]} "
            "tokens: an encoder that drops or adds tokens cannot use per-group levels"
        )
    return groups


# ---------------------------------------------------------------------------------------------------------------
# feature transforms
# ---------------------------------------------------------------------------------------------------------------
def group_centre(x: Tensor, groups: Tensor) -> Tensor:
    """Subtract from each row the mean row of its group (per-element centring of atom features)."""
    uniq, inv = torch.unique(groups, return_inverse=True)
    count = torch.bincount(inv, minlength=uniq.numel()).to(x.dtype)
    mean = torch.zeros(uniq.numel(), x.shape[1], dtype=x.dtype).index_add_(0, inv, x) / count[:, None]
    return x - mean[inv]


def anchor_relative(x: Tensor, anchors: Tensor) -> Tensor:
    """Li & Walsh's anchor-relative embedding: cosine of each row ``x[n, d]`` to the anchor rows -> ``[n, K]``."""
    xn = torch.nn.functional.normalize(x, dim=1)
    return xn @ xn[anchors].T


# ---------------------------------------------------------------------------------------------------------------
# comparison
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class ConvergenceResult:
    """Tidy rows ``(model_a, layer_a, model_b, layer_b, level, metric, value)`` plus the best layer pairs."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def best(self) -> list[dict[str, Any]]:
        """Per (model pair, level, metric): the layer pair with the highest value (platonic-rep's choice)."""
        top: dict[tuple, dict[str, Any]] = {}
        for r in self.rows:
            key = (r["model_a"], r["model_b"], r["level"], r["metric"])
            if key not in top or r["value"] > top[key]["value"]:
                top[key] = r
        return list(top.values())

    def matrix(self, models: list[str], level: str, metric: str) -> Tensor:
        """Symmetric model-by-model matrix of best-layer values (NaN on the diagonal and where missing)."""
        idx = {m: i for i, m in enumerate(models)}
        out = torch.full((len(models), len(models)), float("nan"))
        for r in self.best():
            if r["level"] == level and r["metric"] == metric:
                i, j = idx[r["model_a"]], idx[r["model_b"]]
                out[i, j] = out[j, i] = r["value"]
        return out


def _metric_fns(metrics: Sequence[dict[str, Any] | str]) -> list[tuple[str, Callable[[Tensor, Tensor], float]]]:
    import unirep.metrics as M

    out = []
    for spec in metrics:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = spec.pop("name")
        label = spec.pop("label", None)
        fn = getattr(M, name) if name in _METRICS else None
        if fn is None:
            raise ValueError(
                f"unknown metric {name!r}: use one of mutual_knn, cka, unbiased_cka, cknna, svcca (unirep.metrics)"
            )
        if label is None:
            label = (
                name
                + "".join(f"_{k}{v}" for k, v in sorted(spec.items()) if k != "kernel")
                + (f"_{spec['kernel']}" if "kernel" in spec else "")
            )
        out.append((label, _bind(fn, spec)))
    return out


def _bind(fn: Callable, kwargs: dict[str, Any]) -> Callable[[Tensor, Tensor], float]:
    return lambda a, b: float(fn(a, b, **kwargs))


@dataclass
class _Prepared:
    """One model-layer's features at one level, ready for the metrics: ``parts`` are (group weight, features)."""

    parts: list[tuple[float, Tensor]]


def _prepare_level(
    feats: ModelFeatures,
    layer: int,
    level: str,
    token_index: Tensor | None,
    group_index: dict[int, Tensor] | None,
    preprocess: dict[str, Any] | None,
    anchors: int,
    anchor_seed: int,
) -> _Prepared:
    from unirep.metrics import prepare_features

    def finish(x: Tensor) -> Tensor:
        x = x.double()
        if anchors > 0:
            # anchors are the first K points of a seeded permutation: the same items for every model
            g = torch.Generator().manual_seed(anchor_seed)
            k = min(anchors, x.shape[0])
            x = anchor_relative(x, torch.randperm(x.shape[0], generator=g)[:k])
        if preprocess is not None:
            x = prepare_features(x, **preprocess)
        return x

    if level == "item":
        return _Prepared([(1.0, finish(feats.pooled(layer)))])
    x = feats.tokens[layer]
    if level in ("token_centred", "token_per_group") and feats.groups is None:
        raise ValueError(
            f"level {level!r} needs token groups (atomic numbers) but the data set has no token_groups(index); "
            "use levels item/token"
        )
    if level == "token":
        return _Prepared([(1.0, finish(x[token_index]))])
    if level == "token_centred":
        return _Prepared([(1.0, finish(group_centre(x, feats.groups)[token_index]))])
    if level == "token_per_group":
        assert group_index is not None
        total = sum(int(i.numel()) for i in group_index.values())
        return _Prepared([(i.numel() / total, finish(x[i])) for i in group_index.values()])
    raise ValueError(f"unknown level {level!r}: use one of {', '.join(LEVELS)}")


def _subsample(n: int, cap: int | None, generator: torch.Generator) -> Tensor:
    if cap is None or n <= cap:
        return torch.arange(n)
    return torch.sort(torch.randperm(n, generator=generator)[:cap]).values


def compare(
    features: Sequence[ModelFeatures],
    metrics: Sequence[dict[str, Any] | str] = ("mutual_knn",),
    levels: Sequence[str] = ("item",),
    preprocess: dict[str, Any] | None = None,
    max_tokens: int | None = 4000,
    min_group_tokens: int = 20,
    anchors: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> ConvergenceResult:
    """Score every layer pair of every model pair at every level with every metric.

    Args:
        features: one :class:`ModelFeatures` per model, all over the same items (and, for token levels, the
            same tokens).
        metrics: names of :mod:`unirep.metrics` functions, or dicts ``{name, label?, **kwargs}`` (``topk``, ...).
        levels: any of :data:`LEVELS`.
        preprocess: keyword arguments of :func:`unirep.metrics.prepare_features` (platonic-rep: clamp at the 0.95
            quantile, L2-normalise); ``None`` compares the raw features.
        max_tokens: token levels use this many tokens (a seeded random subset, the same for every model); per
            group for ``token_per_group``. Kernel metrics cost O(n^2), which is why tokens are subsampled.
        min_group_tokens: groups with fewer tokens are left out of ``token_per_group``.
        anchors: K > 0 replaces every feature by its cosines to K anchor points (Li & Walsh).
    """
    from tqdm.auto import tqdm

    if len(features) < 2:
        raise ValueError(f"a convergence study needs at least two models, got {len(features)}")
    ref = features[0]
    for f in features[1:]:
        if f.num_items != ref.num_items:
            raise ValueError(
                f"model {f.name!r} has {f.num_items} items but {ref.name!r} has {ref.num_items}: every model must "
                "encode the same items"
            )
        if any(lv != "item" for lv in levels) and not torch.equal(f.batch, ref.batch):
            raise ValueError(
                f"model {f.name!r} has {f.batch.numel()} tokens but {ref.name!r} has {ref.batch.numel()} "
                "(or a different number per item): token levels need the same tokens; use levels: [item]"
            )
    fns = _metric_fns(metrics)
    g = torch.Generator().manual_seed(seed)
    token_index = _subsample(ref.batch.numel(), max_tokens, g)
    group_index = None
    if "token_per_group" in levels and ref.groups is not None:
        group_index = {}
        for grp in torch.unique(ref.groups).tolist():
            members = (ref.groups == grp).nonzero().squeeze(1)
            if members.numel() >= min_group_tokens:
                group_index[grp] = members[_subsample(members.numel(), max_tokens, g)]
        if not group_index:
            raise ValueError(f"no group has at least min_group_tokens={min_group_tokens} tokens")

    result = ConvergenceResult()
    for level in levels:
        prepared = {
            (f.name, li): _prepare_level(f, li, level, token_index, group_index, preprocess, anchors, seed)
            for f in features
            for li in range(len(f.layers))
        }
        pairs = list(itertools.combinations(features, 2))
        for fa, fb in tqdm(pairs, desc=f"metrics {level}", disable=not progress, leave=False):
            for la, lb in itertools.product(range(len(fa.layers)), range(len(fb.layers))):
                pa, pb = prepared[(fa.name, la)], prepared[(fb.name, lb)]
                for label, fn in fns:
                    value = sum(w * fn(xa, xb) for (w, xa), (_, xb) in zip(pa.parts, pb.parts, strict=True))
                    result.rows.append(
                        {
                            "model_a": fa.name,
                            "layer_a": fa.layers[la],
                            "model_b": fb.name,
                            "layer_b": fb.layers[lb],
                            "level": level,
                            "metric": label,
                            "value": float(value),
                        }
                    )
    return result


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------
_FIELDS = ["model_a", "layer_a", "model_b", "layer_b", "level", "metric", "value"]


def _write_table(rows: list[dict[str, Any]], path: Path, fields: list[str]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def _spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def mean_alignment(result: ConvergenceResult, models: list[str], level: str, metric: str) -> dict[str, float]:
    """Each model's mean best-layer alignment to all the other models."""
    m = result.matrix(models, level, metric)
    return {name: float(torch.nanmean(m[i]).item()) for i, name in enumerate(models)}


def write_outputs(
    result: ConvergenceResult,
    models: list[str],
    out_dir: Path,
    quality: dict[str, float],
    quality_name: str = "quality",
    higher_is_better: bool = False,
) -> dict[str, Any]:
    """Write ``alignment.csv``/``.json`` (all rows), ``best.csv`` (best layer pairs), one heatmap PNG per metric
    (a panel per level) and, when models have quality scores, ``quality_vs_alignment_<metric>.png`` with the
    Spearman rank correlation between quality and mean alignment. Returns the summary (also ``summary.json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_table(result.rows, out_dir / "alignment.csv", _FIELDS)
    (out_dir / "alignment.json").write_text(json.dumps(result.rows, indent=1))
    best = result.best()
    _write_table(best, out_dir / "best.csv", _FIELDS)
    levels = list(dict.fromkeys(r["level"] for r in result.rows))
    metrics = list(dict.fromkeys(r["metric"] for r in result.rows))
    summary: dict[str, Any] = {"models": models, "levels": levels, "metrics": metrics, "mean_alignment": {}}
    for metric in metrics:
        fig, axes = plt.subplots(1, len(levels), figsize=(0.35 * len(models) * len(levels) + 3, 0.35 * len(models) + 2))
        axes = [axes] if len(levels) == 1 else list(axes)
        for ax, level in zip(axes, levels, strict=True):
            m = result.matrix(models, level, metric).numpy()
            im = ax.imshow(m, cmap="viridis")
            ax.set_title(f"{metric} / {level}", fontsize=8)
            ax.set_xticks(range(len(models)), models, rotation=90, fontsize=6)
            ax.set_yticks(range(len(models)), models, fontsize=6)
            fig.colorbar(im, ax=ax, fraction=0.046)
            summary["mean_alignment"].setdefault(metric, {})[level] = mean_alignment(result, models, level, metric)
        fig.tight_layout()
        fig.savefig(out_dir / f"heatmap_{metric}.png", dpi=110)
        plt.close(fig)

    scored = [m for m in models if quality.get(m) is not None and math.isfinite(quality[m])]
    summary["quality"] = {m: quality[m] for m in scored}
    summary["quality_name"] = quality_name
    summary["spearman"] = {}
    if len(scored) >= 3:
        for metric in metrics:
            fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 3.6))
            axes = [axes] if len(levels) == 1 else list(axes)
            for ax, level in zip(axes, levels, strict=True):
                align = summary["mean_alignment"][metric][level]
                qs = [quality[m] for m in scored]
                al = [align[m] for m in scored]
                # rank correlation with "better quality" positive, whichever direction the score runs
                rho = _spearman(qs if higher_is_better else [-q for q in qs], al)
                summary["spearman"].setdefault(metric, {})[level] = rho
                ax.scatter(qs, al, s=14)
                for m, q, a in zip(scored, qs, al, strict=True):
                    ax.annotate(m, (q, a), fontsize=5)
                ax.set_xlabel(quality_name + (" (higher is better)" if higher_is_better else " (lower is better)"))
                ax.set_ylabel(f"mean {metric} to the others")
                ax.set_title(f"{level}: Spearman rho(better, aligned) = {rho:.2f}", fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / f"quality_vs_alignment_{metric}.png", dpi=110)
            plt.close(fig)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------
_MODEL_KEYS = {"name", "encoder", "layers", "quality", "optional", "sweep", "batch_size"}


@dataclass
class ConvergeConfig:
    """Schema of ``unirep-converge`` (``configs/converge/*.yaml`` start with ``defaults: [base_converge, _self_]``),
    so a misspelt top-level or model key stops at start-up with its name, as in ``unirep-train``."""

    name: str = "study"
    out_dir: str | None = None
    cache_dir: str | None = None
    seed: int = 0
    threads: int = 0
    progress: bool = True
    defs: Any = None
    data: Any = MISSING
    levels: list[str] = field(default_factory=lambda: ["item"])
    metrics: list[Any] = field(default_factory=lambda: ["mutual_knn"])
    preprocess: Any = field(default_factory=lambda: {"clamp_quantile": 0.95, "normalize": True})
    max_tokens: int | None = 4000
    min_group_tokens: int = 20
    anchors: int = 0
    batch_size: int = 32
    quality_name: str = "quality"
    higher_is_better: bool = False
    # each entry is checked by expand_models (name, encoder, sweep, layers, optional, batch_size, quality)
    models: list[Any] = field(default_factory=list)


def register_converge_config() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_converge", node=ConvergeConfig)


_TOP_KEYS = {f.name for f in fields(ConvergeConfig)}


def expand_models(models: Sequence[Any]) -> list[dict[str, Any]]:
    """Expand ``sweep: {key: [values]}`` entries into one model per combination (``name`` gets a suffix)."""
    from omegaconf import OmegaConf

    out = []
    for i, spec in enumerate(models):
        spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
        unknown = set(spec) - _MODEL_KEYS
        if unknown:
            raise ValueError(
                f"models[{i}] ({spec.get('name')}): unknown keys {sorted(unknown)}; allowed {sorted(_MODEL_KEYS)}"
            )
        if "name" not in spec or "encoder" not in spec:
            raise ValueError(
                f"models[{i}] needs a name and an encoder (a config with _target_), got keys {sorted(spec)}"
            )
        sweep = spec.pop("sweep", None) or {}
        keys = list(sweep)
        for values in itertools.product(*(sweep[k] for k in keys)):
            one = json.loads(json.dumps(spec))
            for k, v in zip(keys, values, strict=True):
                node, *path = [one["encoder"], *k.split(".")[:-1]]
                for p in path:  # dotted keys reach nested arguments, e.g. train.steps
                    node = node.setdefault(p, {})
                node[k.split(".")[-1]] = v
                one["name"] += f"_{k.split('.')[-1]}{v}"
            one["encoder"] = _format_names(one["encoder"], one["name"])
            out.append(one)
    names = [m["name"] for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"model names must be unique; repeated: {dup}")
    return out


def _format_names(node: Any, name: str) -> Any:
    """Replace ``{name}`` in every string of an encoder config by the model's name (per-model checkpoint paths)."""
    if isinstance(node, dict):
        return {k: _format_names(v, name) for k, v in node.items()}
    if isinstance(node, list):
        return [_format_names(v, name) for v in node]
    return node.replace("{name}", name) if isinstance(node, str) else node


def _model_quality(spec: dict[str, Any], encoder: Any) -> float | None:
    if spec.get("quality") is not None:
        return float(spec["quality"])
    q = getattr(encoder, "quality", None)
    return float(q) if isinstance(q, int | float) else None


def _validated(cfg: Any) -> Any:
    """The config merged onto :class:`ConvergeConfig`: a misspelt or mistyped key raises with its name."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not OmegaConf.is_config(cfg):
        cfg = OmegaConf.create(cfg)
    unknown = set(cfg.keys()) - _TOP_KEYS - {"hydra"}
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}")
    body = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    try:
        return OmegaConf.merge(OmegaConf.structured(ConvergeConfig), body)
    except OmegaConfBaseException as err:
        raise ValueError(f"unirep-converge config: {err}") from err


def run_convergence(cfg: Any) -> dict[str, Any]:
    """Build the data and the models of a ``configs/converge`` config, extract (cached) features, compare, write."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = _validated(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    levels = list(cfg.get("levels", ["item"]))
    bad_levels = [lv for lv in levels if lv not in LEVELS]
    if bad_levels:
        raise ValueError(f"unknown levels {bad_levels}: use any of {', '.join(LEVELS)}")
    metrics = cfg.get("metrics", ["mutual_knn"])
    metrics = OmegaConf.to_container(metrics) if OmegaConf.is_config(metrics) else list(metrics)
    _metric_fns(metrics)  # fail on an unknown metric before any feature is extracted
    out_dir = Path(cfg.get("out_dir") or f"runs/converge/{cfg.get('name', 'study')}")
    cache_dir = Path(cfg.get("cache_dir") or out_dir / "features")
    progress = bool(cfg.get("progress", True))
    data_yaml = OmegaConf.to_yaml(cfg.data, resolve=True)
    dataset = instantiate(cfg.data, _convert_="all")
    if len(dataset) == 0:
        raise ValueError(f"the data set built from {data_yaml.strip()!r} is empty")
    dfp = data_fingerprint(dataset, data_yaml)

    features, quality, skipped = [], {}, {}
    for spec in expand_models(cfg.models):
        name = spec["name"]
        try:
            encoder = instantiate(spec["encoder"], _convert_="all")
        except Exception as err:  # hydra wraps the cause; name the model and keep the cause readable
            cause = err.__cause__ or err
            if spec.get("optional", False):
                log.warning("skipping optional model %s: %s", name, cause)
                skipped[name] = f"{type(cause).__name__}: {cause}"
                continue
            raise RuntimeError(f"model {name!r} could not be built from {spec['encoder']}: {cause}") from err
        if isinstance(encoder, torch.nn.Module):
            encoder.eval()
        enc_yaml = json.dumps(spec["encoder"], sort_keys=True)
        key = _sha(dfp, encoder_fingerprint(encoder, enc_yaml), enc_yaml)
        feats = extract_features(
            encoder, dataset, name, int(spec.get("batch_size") or cfg.get("batch_size", 32)), cache_dir, key, progress
        )
        feats = feats.select_layers(spec.get("layers"))
        feats.quality = _model_quality(spec, encoder)
        quality[name] = feats.quality
        features.append(feats)
        del encoder

    preprocess = cfg.get("preprocess", {"clamp_quantile": 0.95, "normalize": True})
    preprocess = OmegaConf.to_container(preprocess) if OmegaConf.is_config(preprocess) else preprocess
    result = compare(
        features,
        metrics=metrics,
        levels=levels,
        preprocess=preprocess if preprocess else None,
        max_tokens=cfg.get("max_tokens", 4000),
        min_group_tokens=int(cfg.get("min_group_tokens", 20)),
        anchors=int(cfg.get("anchors", 0)),
        seed=int(cfg.get("seed", 0)),
        progress=progress,
    )
    summary = write_outputs(
        result,
        [f.name for f in features],
        out_dir,
        quality,
        str(cfg.get("quality_name", "quality")),
        bool(cfg.get("higher_is_better", False)),
    )
    summary["skipped"] = skipped
    summary["layers"] = {f.name: f.layers for f in features}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return {"result": result, "summary": summary, "features": features, "out_dir": out_dir}


def main() -> None:
    """Console script ``unirep-converge`` (hydra app over ``configs/converge/``)."""
    import hydra

    default_dir = Path(__file__).resolve().parents[1] / "configs" / "converge"
    config_dir = os.environ.get("UNIREP_CONVERGE_CONFIGS") or str(default_dir)

    register_converge_config()

    @hydra.main(version_base=None, config_path=config_dir, config_name="molecular_quick")
    def _app(cfg: Any) -> None:
        out = run_convergence(cfg)
        s = out["summary"]
        print(f"wrote {out['out_dir']}/alignment.csv ({len(out['result'].rows)} rows), heatmaps, summary.json")
        if s.get("skipped"):
            print("skipped optional models:", ", ".join(s["skipped"]))
        for metric, by_level in s.get("spearman", {}).items():
            for level, rho in by_level.items():
                print(f"Spearman(quality, mean alignment) {metric}/{level}: {rho:.3f}")

    _app()


if __name__ == "__main__":
    main()
