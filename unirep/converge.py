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
    "shared_anchors",
    "LEVELS",
    "ConvergenceResult",
    "compare",
    "mean_alignment",
    "write_outputs",
    "ood_shift",
    "run_convergence",
    "main",
]

log = logging.getLogger(__name__)

LEVELS = ("item", "token", "token_centred", "token_per_group")
_METRICS = (
    "mutual_knn",
    "cka",
    "unbiased_cka",
    "cknna",
    "svcca",
    "distance_correlation",
    "information_imbalance",
    "anchor_retrieval",
    "anchor_ot_distance",
)


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
_BEST_FIELDS = ("null_mean", "null_std", "p_value", "p_adj", "z", "corrected", "floor", "floor_gain")


@dataclass
class ConvergenceResult:
    """Tidy rows ``(model_a, layer_a, model_b, layer_b, level, metric, value)`` plus the best layer pairs.

    ``lower``: metric labels where lower means more alike (information imbalance, anchor OT distance): their best
    layer pair is the minimum. ``asymmetric``: labels with a row per direction (information imbalance,
    ``model_a -> model_b``). ``per_model``: rows ``(model, layer, level, measure, value)`` of one-model measures
    (TwoNN intrinsic dimension). Calibration (null, floor) is added to the best rows in place (:data:`_BEST_FIELDS`).
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    per_model: list[dict[str, Any]] = field(default_factory=list)
    lower: set[str] = field(default_factory=set)
    asymmetric: set[str] = field(default_factory=set)
    # item level: each model's (last layer's) anchor-space embedding [n, K] over the shared anchors (Li & Walsh)
    anchor_embeddings: dict[str, Tensor] = field(default_factory=dict)

    def best(self) -> list[dict[str, Any]]:
        """Per (model pair, level, metric): the layer pair with the best value (platonic-rep's choice: the highest,
        the lowest for lower-is-better metrics)."""
        top: dict[tuple, dict[str, Any]] = {}
        for r in self.rows:
            key = (r["model_a"], r["model_b"], r["level"], r["metric"])
            sign = -1.0 if r["metric"] in self.lower else 1.0
            if key not in top or sign * r["value"] > sign * top[key]["value"]:
                top[key] = r
        return list(top.values())

    def matrix(self, models: list[str], level: str, metric: str, value: str = "value") -> Tensor:
        """Model-by-model matrix of best-layer ``value`` (or a calibration field such as ``corrected``); symmetric
        unless the metric is asymmetric (then row i, column j is i -> j). NaN on the diagonal and where missing."""
        idx = {m: i for i, m in enumerate(models)}
        out = torch.full((len(models), len(models)), float("nan"))
        for r in self.best():
            if r["level"] == level and r["metric"] == metric and r.get(value) is not None:
                if r["model_a"] not in idx or r["model_b"] not in idx:
                    continue
                i, j = idx[r["model_a"]], idx[r["model_b"]]
                out[i, j] = r[value]
                if metric not in self.asymmetric:
                    out[j, i] = r[value]
        return out


_ANCHOR_METRICS = {"anchor_retrieval", "anchor_ot_distance"}
_ASYMMETRIC = {"information_imbalance"}


@dataclass
class _Metric:
    label: str
    base: str
    fn: Callable[..., float]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        from unirep.metrics import LOWER_IS_BETTER

        return self.base not in LOWER_IS_BETTER


def _metric_fns(metrics: Sequence[dict[str, Any] | str]) -> list[_Metric]:
    import unirep.metrics as M

    out = []
    for spec in metrics:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = spec.pop("name")
        label = spec.pop("label", None)
        fn = getattr(M, name) if name in _METRICS else None
        if fn is None:
            raise ValueError(f"unknown metric {name!r}: use one of {', '.join(_METRICS)} (unirep.metrics)")
        if label is None:
            label = (
                name
                + "".join(f"_{k}{v}" for k, v in sorted(spec.items()) if k != "kernel")
                + (f"_{spec['kernel']}" if "kernel" in spec else "")
            )
        out.append(_Metric(label, name, _bind(fn, spec), spec))
    labels = [m.label for m in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"metric labels must be unique (give one a `label:`); got {labels}")
    return out


def _bind(fn: Callable, kwargs: dict[str, Any]) -> Callable[..., float]:
    return lambda a, b, **extra: float(fn(a, b, **kwargs, **extra))


@dataclass
class _Prepared:
    """One model-layer's features at one level, ready for the metrics: ``parts`` are (group weight, features)."""

    parts: list[tuple[float, Tensor]]


def _level_parts(
    feats: ModelFeatures, layer: int, level: str, token_index: Tensor | None, group_index: dict[int, Tensor] | None
) -> list[tuple[float, Tensor]]:
    """The raw features of one model-layer at one level as (weight, [n_k, d]) parts (one part unless per group)."""
    if level == "item":
        return [(1.0, feats.pooled(layer).double())]
    x = feats.tokens[layer]
    if level in ("token_centred", "token_per_group") and feats.groups is None:
        raise ValueError(
            f"level {level!r} needs token groups (atomic numbers) but the data set has no token_groups(index); "
            "use levels item/token"
        )
    if level == "token":
        return [(1.0, x[token_index].double())]
    if level == "token_centred":
        return [(1.0, group_centre(x, feats.groups)[token_index].double())]
    if level == "token_per_group":
        assert group_index is not None
        total = sum(int(i.numel()) for i in group_index.values())
        return [(i.numel() / total, x[i].double()) for i in group_index.values()]
    raise ValueError(f"unknown level {level!r}: use one of {', '.join(LEVELS)}")


def _finish(x: Tensor, preprocess: dict[str, Any] | None, relative_to: Tensor | None) -> Tensor:
    if relative_to is not None:
        x = anchor_relative(x, relative_to)
    if preprocess is not None:
        from unirep.metrics import prepare_features

        x = prepare_features(x, **preprocess)
    return x


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
    """Features of one model-layer at one level (with ``anchors`` > 0: anchor-relative to a seeded random subset)."""
    parts = []
    for w, x in _level_parts(feats, layer, level, token_index, group_index):
        rel = None
        if anchors > 0:
            g = torch.Generator().manual_seed(anchor_seed)
            rel = torch.randperm(x.shape[0], generator=g)[: min(anchors, x.shape[0])]
        parts.append((w, _finish(x, preprocess, rel)))
    return _Prepared(parts)


def shared_anchors(
    parts: Sequence[Tensor], k: int, sampling: str = "fps", seed: int = 0, preprocess: dict[str, Any] | None = None
) -> Tensor:
    """K anchor items shared by every model: farthest-point sampling (``fps``) in the joint space of all models
    (each model's features preprocessed and scaled by ``1/sqrt(#models)``, concatenated along features), so the
    anchors cover what every model distinguishes; ``random``: a seeded random subset. The FPS order is greedy, so
    the first K' < K anchors are the anchors of a K'-anchor run."""
    n = parts[0].shape[0]
    k = min(k, n - 2)  # leave items that are not anchors to compare
    if k < 1:
        raise ValueError(f"shared_anchors: {n} items leave no room for anchors")
    if sampling == "random":
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    if sampling != "fps":
        raise ValueError(f"anchor_sampling must be 'fps' or 'random', got {sampling!r}")
    from unirep.metrics import farthest_point_sampling, prepare_features

    joint = torch.cat(
        [
            (prepare_features(p, **preprocess) if preprocess else torch.nn.functional.normalize(p.float(), dim=1))
            / math.sqrt(len(parts))
            for p in parts
        ],
        dim=1,
    )
    start = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))
    return farthest_point_sampling(joint, k, start=start)


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
    anchor_space: int = 64,
    anchor_sampling: str = "fps",
    null_permutations: int = 0,
    null_metrics: Sequence[str] | None = None,
    null_levels: Sequence[str] | None = None,
    width_floor: bool = False,
    floor_draws: int = 3,
    intrinsic_dimension: bool = True,
) -> ConvergenceResult:
    """Score every layer pair of every model pair at every level with every metric, then calibrate the best pairs.

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
        anchors: K > 0 replaces every feature by its cosines to K shared anchor items (Li & Walsh's
            anchor-relative embedding) before every metric.
        anchor_space: the number of shared anchors of the anchor-space metrics (``anchor_retrieval``,
            ``anchor_ot_distance``).
        anchor_sampling: ``fps`` (farthest-point sampling in the joint space of all models) or ``random``.
        null_permutations: K > 0 adds a permutation null to every best layer pair (items of model b shuffled K
            times): ``null_mean``, ``null_std``, ``p_value`` (+1 corrected), ``p_adj`` (Benjamini-Hochberg over
            the pairs of one level and metric), ``z`` and ``corrected`` = gain over the null mean (positive =
            better than chance, whatever the metric's direction).
        null_metrics, null_levels: restrict the nulls to these metric labels (or base names) and levels.
        width_floor: add ``floor`` (the metric between independent Gaussian features of the two models' widths,
            same n and preprocessing, mean of ``floor_draws``) and ``floor_gain`` (the gain over it).
        intrinsic_dimension: add TwoNN intrinsic dimension rows per model, layer and level (``per_model``).
    """
    _check_same_items(features, levels)
    ref = features[0]
    fns = _metric_fns(metrics)
    if any(m.base in _ANCHOR_METRICS for m in fns) and anchor_space < 1:
        raise ValueError("anchor_retrieval / anchor_ot_distance need anchor_space >= 1 shared anchors")
    g = torch.Generator().manual_seed(seed)
    token_index = _subsample(ref.batch.numel(), max_tokens, g)
    group_index = _group_index(ref, levels, min_group_tokens, max_tokens, g)
    result = ConvergenceResult(
        lower={m.label for m in fns if not m.higher_is_better},
        asymmetric={m.label for m in fns if m.base in _ASYMMETRIC},
    )
    anchor_cfg = (anchors, anchor_space, anchor_sampling, seed, preprocess)
    for level in levels:
        prepared, extras = _prepare_all(features, level, token_index, group_index, fns, anchor_cfg, result)
        start = len(result.rows)
        _score_pairs(features, prepared, extras, fns, level, result, progress)
        if intrinsic_dimension:
            _intrinsic_rows(features, prepared, level, result)
        do_null = null_permutations > 0 and (null_levels is None or level in null_levels)
        if do_null or width_floor:
            calib = (null_permutations if do_null else 0, null_metrics, width_floor, floor_draws, seed, preprocess)
            _calibrate(features, prepared, extras, fns, level, result, start, calib, anchors, progress)
    return result


def _check_same_items(features: Sequence[ModelFeatures], levels: Sequence[str]) -> None:
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


def _group_index(
    ref: ModelFeatures, levels: Sequence[str], min_group_tokens: int, max_tokens: int | None, g: torch.Generator
) -> dict[int, Tensor] | None:
    """Per group (element), the subsampled token indices of ``token_per_group``; ``None`` when not needed."""
    if "token_per_group" not in levels or ref.groups is None:
        return None
    group_index = {}
    for grp in torch.unique(ref.groups).tolist():
        members = (ref.groups == grp).nonzero().squeeze(1)
        if members.numel() >= min_group_tokens:
            group_index[grp] = members[_subsample(members.numel(), max_tokens, g)]
    if not group_index:
        raise ValueError(f"no group has at least min_group_tokens={min_group_tokens} tokens")
    return group_index


def _prepare_all(
    features: Sequence[ModelFeatures],
    level: str,
    token_index: Tensor,
    group_index: dict[int, Tensor] | None,
    fns: list[_Metric],
    anchor_cfg: tuple,
    result: ConvergenceResult,
) -> tuple[dict[tuple[str, int], _Prepared], list[dict[str, Any]]]:
    """Every (model, layer)'s parts at ``level``, preprocessed, with the shared anchors of the anchor metrics."""
    import unirep.metrics as M

    anchors, anchor_space, anchor_sampling, seed, preprocess = anchor_cfg
    ref = features[0]
    raw = {
        (f.name, li): _level_parts(f, li, level, token_index, group_index)
        for f in features
        for li in range(len(f.layers))
    }
    n_parts = len(raw[(ref.name, 0)])
    shared: list[Tensor | None] = [None] * n_parts
    if anchors > 0 or any(m.base in _ANCHOR_METRICS for m in fns):
        k = max(anchors, anchor_space)
        shared = [
            shared_anchors(
                [raw[(f.name, len(f.layers) - 1)][p][1] for f in features], k, anchor_sampling, seed, preprocess
            )
            for p in range(n_parts)
        ]
    prepared = {
        key: _Prepared(
            [
                (w, _finish(x, preprocess, shared[p][:anchors] if anchors > 0 else None))
                for p, (w, x) in enumerate(parts)
            ]
        )
        for key, parts in raw.items()
    }
    if level == "item" and shared[0] is not None and anchor_space > 0:
        for f in features:
            x = prepared[(f.name, len(f.layers) - 1)].parts[0][1]
            result.anchor_embeddings[f.name] = M.anchor_embedding(x, shared[0][:anchor_space])
    extras = [{"anchors": shared[p][:anchor_space]} if shared[p] is not None else {} for p in range(n_parts)]
    return prepared, extras


def _score_pairs(features, prepared, extras, fns, level, result, progress) -> None:
    """Every metric on every layer pair of every model pair (both directions for asymmetric metrics)."""
    from tqdm.auto import tqdm

    pairs = list(itertools.combinations(features, 2))
    for fa, fb in tqdm(pairs, desc=f"metrics {level}", disable=not progress, leave=False):
        for la, lb in itertools.product(range(len(fa.layers)), range(len(fb.layers))):
            pa, pb = prepared[(fa.name, la)], prepared[(fb.name, lb)]
            for m in fns:
                result.rows.append(_row(fa, la, fb, lb, level, m.label, _call(m, pa, pb, extras)))
                if m.base in _ASYMMETRIC:
                    result.rows.append(_row(fb, lb, fa, la, level, m.label, _call(m, pb, pa, extras)))


def _intrinsic_rows(features, prepared, level, result) -> None:
    """TwoNN intrinsic dimension per model, layer and level (weighted over the level's parts)."""
    import unirep.metrics as M

    for f in features:
        for li, lname in enumerate(f.layers):
            parts = prepared[(f.name, li)].parts
            value = sum(w * M.twonn_dimension(x) for w, x in parts)
            result.per_model.append(
                {"model": f.name, "layer": lname, "level": level, "measure": "twonn_id", "value": float(value)}
            )


def _calibrate(features, prepared, extras, fns, level, result, start, calib, anchors, progress) -> None:
    """Permutation nulls (with BH-adjusted p-values) and width floors on the best layer pair of every model pair."""
    from tqdm.auto import tqdm

    import unirep.metrics as M

    null_permutations, null_metrics, width_floor, floor_draws, seed, preprocess = calib
    do_null = null_permutations > 0
    wanted_null = set(null_metrics) if null_metrics is not None else None
    level_result = ConvergenceResult(result.rows[start:], lower=result.lower, asymmetric=result.asymmetric)
    by_label = {m.label: m for m in fns}
    layer_of = {(f.name, ln): li for f in features for li, ln in enumerate(f.layers)}
    floors: dict[tuple, float] = {}
    best = level_result.best()
    for r in tqdm(best, desc=f"calibration {level}", disable=not progress, leave=False):
        m = by_label[r["metric"]]
        pa = prepared[(r["model_a"], layer_of[(r["model_a"], r["layer_a"])])]
        pb = prepared[(r["model_b"], layer_of[(r["model_b"], r["layer_b"])])]
        sign = 1.0 if m.higher_is_better else -1.0
        if do_null and (wanted_null is None or m.label in wanted_null or m.base in wanted_null):
            null = _part_null(m, pa, pb, extras, null_permutations, seed, r["value"])
            r.update({k: null[k] for k in ("null_mean", "null_std", "p_value", "z", "corrected")})
        if width_floor:
            dims = tuple(
                (x.shape[0], x.shape[1], y.shape[1]) for (_, x), (_, y) in zip(pa.parts, pb.parts, strict=True)
            )
            key = (m.label, dims)
            if key not in floors:
                floors[key] = _width_floor(m, pa, pb, extras, floor_draws, seed, preprocess, anchors)
            r["floor"] = floors[key]
            r["floor_gain"] = sign * (r["value"] - floors[key])
    if do_null:
        for m in fns:
            group = [r for r in best if r["metric"] == m.label and "p_value" in r]
            for r, q in zip(group, M.benjamini_hochberg([r["p_value"] for r in group]), strict=True):
                r["p_adj"] = q


def _call(m: _Metric, pa: _Prepared, pb: _Prepared, extras: list[dict[str, Any]]) -> float:
    """``sum_k w_k metric(a_k, b_k)`` over the parts; anchor metrics get each part's shared anchors."""
    ex = extras if m.base in _ANCHOR_METRICS else [{}] * len(pa.parts)
    return float(sum(w * m.fn(xa, xb, **e) for (w, xa), (_, xb), e in zip(pa.parts, pb.parts, ex, strict=True)))


def _row(fa: ModelFeatures, la: int, fb: ModelFeatures, lb: int, level: str, label: str, value: float) -> dict:
    return {
        "model_a": fa.name,
        "layer_a": fa.layers[la],
        "model_b": fb.name,
        "layer_b": fb.layers[lb],
        "level": level,
        "metric": label,
        "value": value,
    }


def _part_null(
    m: _Metric, pa: _Prepared, pb: _Prepared, extras: list[dict[str, Any]], permutations: int, seed: int, value: float
) -> dict[str, float]:
    """:func:`unirep.metrics.permutation_null` over the weighted parts (groups) of one layer pair; anchor metrics
    keep each part's anchors (anchors index the rows of a; b's rows are the ones shuffled)."""
    from unirep.metrics import permutation_null

    ex = extras if m.base in _ANCHOR_METRICS else [{}] * len(pa.parts)
    xs_a = [x for _, x in pa.parts]
    part_of = {id(x): k for k, x in enumerate(xs_a)}  # permutation_null passes a's parts unchanged

    def fn(a: Tensor, b: Tensor) -> float:
        return m.fn(a, b, **ex[part_of[id(a)]])

    weights = [w for w, _ in pa.parts]
    fast = None if m.base in _ANCHOR_METRICS else m.base  # exact fast paths where a permutation only relabels
    return permutation_null(
        fn, xs_a, [x for _, x in pb.parts], permutations, seed, m.higher_is_better, weights, value, fast, m.kwargs
    )


def _width_floor(
    m: _Metric,
    pa: _Prepared,
    pb: _Prepared,
    extras: list[dict[str, Any]],
    draws: int,
    seed: int,
    preprocess: dict[str, Any] | None,
    anchors: int,
) -> float:
    """The metric between independent Gaussian features of the same shapes as the two models' parts."""
    from unirep.metrics import gaussian_floor

    total = 0.0
    for p, ((w, xa), (_, xb)) in enumerate(zip(pa.parts, pb.parts, strict=True)):
        ex = extras[p] if m.base in _ANCHOR_METRICS else {}
        # with anchor-relative features the widths are the anchor count: draw in the raw widths the anchors saw
        rel = torch.arange(anchors) if anchors > 0 else None
        total += w * gaussian_floor(
            lambda a, b, _e=ex: m.fn(a, b, **_e),
            xa.shape[0],
            xa.shape[1],
            xb.shape[1],
            draws,
            seed,
            lambda x, _r=rel: _finish(x.double(), preprocess, _r),
        )
    return float(total)


# ---------------------------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------------------------
_FIELDS = ["model_a", "layer_a", "model_b", "layer_b", "level", "metric", "value"]
_PER_MODEL_FIELDS = ["model", "layer", "level", "measure", "value"]


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


def mean_alignment(
    result: ConvergenceResult,
    models: list[str],
    level: str,
    metric: str,
    families: dict[str, str] | None = None,
    exclude: Sequence[str] = (),
    value: str = "value",
) -> dict[str, float]:
    """Each model's mean best-layer alignment to the other models.

    ``families`` (model -> family; sweeps and ensemble members share one): the mean runs over the *other* families,
    each family's members averaged first, so 8 members of one ensemble count as one reference and a model is never
    scored by its own duplicates. ``exclude``: models left out as references (floors: random nets, descriptors).
    ``value``: ``value`` or a calibration field (``corrected``, ``floor_gain``)."""
    m = result.matrix(models, level, metric, value)
    fam = families or {name: name for name in models}
    out = {}
    for i, name in enumerate(models):
        per_family: dict[str, list[float]] = {}
        for j, other in enumerate(models):
            if j == i or other in exclude or fam.get(other, other) == fam.get(name, name):
                continue
            v = float(m[i, j])
            if math.isfinite(v):
                per_family.setdefault(fam.get(other, other), []).append(v)
        means = [sum(v) / len(v) for v in per_family.values()]
        out[name] = sum(means) / len(means) if means else float("nan")
    return out


def _calibrated(result: ConvergenceResult, level: str, metric: str) -> bool:
    return any("p_value" in r for r in result.best() if r["level"] == level and r["metric"] == metric)


def _heatmap(ax: Any, fig: Any, result: ConvergenceResult, models: list[str], level: str, metric: str, value: str):
    m = result.matrix(models, level, metric, value).numpy()
    im = ax.imshow(m, cmap="viridis_r" if metric in result.lower and value == "value" else "viridis")
    ax.set_xticks(range(len(models)), models, rotation=90, fontsize=6)
    ax.set_yticks(range(len(models)), models, fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046)
    if _calibrated(result, level, metric):
        sig = result.matrix(models, level, metric, "p_adj").numpy()
        for i in range(len(models)):
            for j in range(len(models)):
                if i != j and sig[i, j] == sig[i, j] and sig[i, j] < 0.05:
                    ax.text(j, i, "*", ha="center", va="center", fontsize=6, color="white")


def write_outputs(
    result: ConvergenceResult,
    models: list[str],
    out_dir: Path,
    quality: dict[str, float],
    quality_name: str = "quality",
    higher_is_better: bool = False,
    families: dict[str, str] | None = None,
    exclude_from_mean: Sequence[str] = (),
    bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``alignment.csv``/``.json`` (all rows), ``best.csv`` (best layer pairs with their calibration),
    ``per_model.csv`` (intrinsic dimension), one heatmap PNG per metric (a panel per level; ``*`` marks pairs
    that beat their permutation null at BH q < 0.05; a second row shows the null-corrected score), and, when
    models have quality scores, ``quality_vs_alignment_<metric>.png`` with the Spearman rank correlation between
    quality and mean alignment (bootstrap interval). Returns the summary (also ``summary.json``)."""
    import matplotlib

    matplotlib.use("Agg")

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_table(result.rows, out_dir / "alignment.csv", _FIELDS)
    (out_dir / "alignment.json").write_text(json.dumps(result.rows, indent=1))
    best = result.best()
    _write_table(best, out_dir / "best.csv", _FIELDS + list(_BEST_FIELDS))
    _write_table(result.per_model, out_dir / "per_model.csv", _PER_MODEL_FIELDS)
    levels = list(dict.fromkeys(r["level"] for r in result.rows))
    metrics = list(dict.fromkeys(r["metric"] for r in result.rows))
    excluded = [m for m in models if m in set(exclude_from_mean)]
    summary: dict[str, Any] = {
        "models": models,
        "levels": levels,
        "metrics": metrics,
        "lower_is_better": sorted(result.lower),
        "families": families or {m: m for m in models},
        "excluded_from_mean": excluded,
        "mean_alignment": {},
        "mean_corrected": {},
        "calibration": {},
        "intrinsic_dimension": {},
    }
    for r in result.per_model:  # the model's last (deepest selected) layer wins: rows come in layer order
        summary["intrinsic_dimension"].setdefault(r["level"], {})[r["model"]] = r["value"]
    for metric in metrics:
        _metric_heatmap(result, models, levels, metric, families, excluded, best, summary, out_dir)
    if result.anchor_embeddings:
        _anchor_space_figure(result.anchor_embeddings, families or {}, out_dir / "anchor_space.png")

    scored = [m for m in models if quality.get(m) is not None and math.isfinite(quality[m]) and m not in excluded]
    summary["quality"] = {m: quality[m] for m in scored}
    summary["quality_name"] = quality_name
    summary["spearman"], summary["spearman_ci"], summary["spearman_corrected"] = {}, {}, {}
    if len(scored) >= 3:
        for metric in metrics:
            fig_args = (quality, quality_name, higher_is_better, bootstrap, seed)
            _quality_figure(result, summary, metric, levels, scored, fig_args, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _metric_heatmap(result, models, levels, metric, families, excluded, best, summary, out_dir) -> None:
    """One metric's heatmap PNG (a panel per level; a null-corrected row where calibrated); fills the summary."""
    import matplotlib.pyplot as plt

    calibrated = [lv for lv in levels if _calibrated(result, lv, metric)]
    nrows = 2 if calibrated else 1
    fig, axes = plt.subplots(
        nrows,
        len(levels),
        figsize=(0.35 * len(models) * len(levels) + 3, nrows * (0.35 * len(models) + 2)),
        squeeze=False,
    )
    for k, level in enumerate(levels):
        _heatmap(axes[0][k], fig, result, models, level, metric, "value")
        axes[0][k].set_title(f"{metric} / {level}" + (" (* beats null, BH q<0.05)" if calibrated else ""), fontsize=8)
        args = (result, models, level, metric, families, excluded)
        summary["mean_alignment"].setdefault(metric, {})[level] = mean_alignment(*args)
        if level in calibrated:
            _heatmap(axes[1][k], fig, result, models, level, metric, "corrected")
            axes[1][k].set_title(f"{metric} / {level}: minus permutation-null mean", fontsize=8)
            summary["mean_corrected"].setdefault(metric, {})[level] = mean_alignment(*args, value="corrected")
            rows = [r for r in best if r["level"] == level and r["metric"] == metric and "p_value" in r]
            summary["calibration"].setdefault(metric, {})[level] = {
                "pairs": len(rows),
                "beat_null_bh05": sum(r["p_adj"] < 0.05 for r in rows),
                "min_p": min(r["p_value"] for r in rows),
                "median_corrected": float(torch.tensor([r["corrected"] for r in rows]).median()),
            }
        elif nrows == 2:
            axes[1][k].axis("off")
    fig.tight_layout()
    fig.savefig(out_dir / f"heatmap_{metric}.png", dpi=110)
    plt.close(fig)


def _quality_figure(result, summary, metric, levels, scored, fig_args, out_dir) -> None:
    """Quality vs mean alignment for one metric (a panel per level) and its Spearman rank correlation."""
    import matplotlib.pyplot as plt

    from unirep.metrics import spearman_bootstrap

    quality, quality_name, higher_is_better, bootstrap, seed = fig_args
    fig, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 3.6), squeeze=False)
    sign_a = -1.0 if metric in result.lower else 1.0  # "more aligned" is positive for every metric
    for ax, level in zip(axes[0], levels, strict=True):
        align = summary["mean_alignment"][metric][level]
        qs = [quality[m] for m in scored]
        al = [align[m] for m in scored]
        better = qs if higher_is_better else [-q for q in qs]
        ok = [k for k, a in enumerate(al) if math.isfinite(a)]
        if len(ok) < 3:
            continue
        # rank correlation with "better quality" and "more aligned" positive, whichever way the scores run
        stats = spearman_bootstrap([better[k] for k in ok], [sign_a * al[k] for k in ok], n_boot=bootstrap, seed=seed)
        rho = stats["rho"]
        summary["spearman"].setdefault(metric, {})[level] = rho
        summary["spearman_ci"].setdefault(metric, {})[level] = stats
        corr = summary["mean_corrected"].get(metric, {}).get(level)
        if corr is not None:
            cs = [corr[m] for m in scored]
            ok_c = [k for k, c in enumerate(cs) if math.isfinite(c)]
            if len(ok_c) >= 3:
                summary["spearman_corrected"].setdefault(metric, {})[level] = spearman_bootstrap(
                    [better[k] for k in ok_c], [cs[k] for k in ok_c], n_boot=bootstrap, seed=seed
                )
        ax.scatter(qs, al, s=14)
        for m, q, a in zip(scored, qs, al, strict=True):
            ax.annotate(m, (q, a), fontsize=5)
        ax.set_xlabel(quality_name + (" (higher is better)" if higher_is_better else " (lower is better)"))
        ax.set_ylabel(f"mean {metric} to the other families")
        ax.set_title(
            f"{level}: rho = {rho:.2f} [{stats['lo']:.2f}, {stats['hi']:.2f}], p = {stats['p_value']:.3f}",
            fontsize=8,
        )
    fig.tight_layout()
    fig.savefig(out_dir / f"quality_vs_alignment_{metric}.png", dpi=110)
    plt.close(fig)


def _anchor_space_figure(emb: dict[str, Tensor], families: dict[str, str], path: Path) -> None:
    """Li & Walsh's picture at this scale: every model's items in the one shared anchor space, projected on its two
    principal axes (fitted on all models together). Left: coloured by model family; right: by item, so items that
    land together across models show that the models agree."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(emb)
    stacked = torch.cat([emb[m].double() for m in names])  # [models * n, K]
    centred = stacked - stacked.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    n = emb[names[0]].shape[0]
    fams = list(dict.fromkeys(families.get(m, m) for m in names))
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for k, m in enumerate(names):
        pts = xy[k * n : (k + 1) * n]
        fam = families.get(m, m)
        first = names.index(next(x for x in names if families.get(x, x) == fam)) == k
        axes[0].scatter(pts[:, 0], pts[:, 1], s=4, color=cmap(fams.index(fam) % 20), label=fam if first else None)
        axes[1].scatter(pts[:, 0], pts[:, 1], s=4, c=range(n), cmap="hsv", vmin=0, vmax=n)
    axes[0].legend(fontsize=6, markerscale=2, ncol=2)
    axes[0].set_title(f"shared anchor space ({emb[names[0]].shape[1]} anchors): models", fontsize=8)
    axes[1].set_title("the same points coloured by item", fontsize=8)
    for ax in axes:
        ax.set_xlabel("PC 1", fontsize=7)
        ax.set_ylabel("PC 2", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ood_shift(summary_id: dict[str, Any], summary_ood: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """In- vs out-of-distribution: per model and level, TwoNN intrinsic dimension and mean alignment (each metric)
    on both data sets, written to ``ood_shift.csv`` and ``ood_shift.png`` (Edamadaka et al. report lower
    intrinsic dimension and higher alignment far out of distribution: representations collapse)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for level, ids in summary_id.get("intrinsic_dimension", {}).items():
        for model, v in ids.items():
            w = summary_ood.get("intrinsic_dimension", {}).get(level, {}).get(model)
            rows.append({"level": level, "model": model, "measure": "twonn_id", "id": v, "ood": w})
    for metric, by_level in summary_id.get("mean_alignment", {}).items():
        for level, per in by_level.items():
            for model, v in per.items():
                w = summary_ood.get("mean_alignment", {}).get(metric, {}).get(level, {}).get(model)
                rows.append({"level": level, "model": model, "measure": f"mean_{metric}", "id": v, "ood": w})
    _write_table(rows, out_dir / "ood_shift.csv", ["level", "model", "measure", "id", "ood"])
    measures = list(dict.fromkeys(r["measure"] for r in rows))
    levels = list(dict.fromkeys(r["level"] for r in rows))
    out: dict[str, Any] = {}
    if rows:
        fig, axes = plt.subplots(
            len(levels), len(measures), figsize=(3 * len(measures), 3 * len(levels)), squeeze=False
        )
        for i, level in enumerate(levels):
            for j, meas in enumerate(measures):
                pts = [
                    (r["id"], r["ood"])
                    for r in rows
                    if r["level"] == level and r["measure"] == meas and r["ood"] is not None
                ]
                pts = [(a, b) for a, b in pts if math.isfinite(a) and math.isfinite(b)]
                ax = axes[i][j]
                if not pts:
                    ax.axis("off")
                    continue
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, s=10)
                lo, hi = min(xs + ys), max(xs + ys)
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.6)
                ax.set_xlabel("in distribution", fontsize=7)
                ax.set_ylabel("out of distribution", fontsize=7)
                ax.set_title(f"{meas} / {level}", fontsize=7)
                out.setdefault(meas, {})[level] = {
                    "median_id": float(torch.tensor(xs).median()),
                    "median_ood": float(torch.tensor(ys).median()),
                    "share_ood_higher": sum(b > a for a, b in pts) / len(pts),
                }
        fig.tight_layout()
        fig.savefig(out_dir / "ood_shift.png", dpi=110)
        plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------
_MODEL_KEYS = {"name", "encoder", "layers", "quality", "optional", "sweep", "batch_size", "family", "tags"}


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
    anchors: int = 0  # K > 0: every feature becomes its cosines to K shared anchors before every metric
    anchor_space: int = 64  # shared anchors of the anchor-space metrics (anchor_retrieval, anchor_ot_distance)
    anchor_sampling: str = "fps"  # fps (farthest-point in the joint space of all models) or random
    null_permutations: int = 0  # K > 0: permutation null of every best layer pair (p-values, corrected scores)
    null_metrics: list[str] | None = None  # restrict the nulls to these metric labels or names (None: all)
    null_levels: list[str] | None = None  # restrict the nulls to these levels (None: all)
    width_floor: bool = False  # score of independent Gaussian features of the two models' widths
    floor_draws: int = 3
    intrinsic_dimension: bool = True  # TwoNN per model, layer and level
    exclude_from_mean: list[str] = field(default_factory=list)  # model names, families or tags (floor, descriptor)
    bootstrap: int = 2000  # resamples of the Spearman interval
    quality_fn: Any = None  # {_target_, _partial_: true, ...} called as fn(encoder) -> float | None
    ood_data: Any = None  # a second data set (same models): out_dir/ood/ and the in- vs out-of-distribution shift
    ood_metrics: list[Any] | None = None  # metrics on ood_data (None: the same); no permutation nulls there
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
        spec.setdefault("family", spec["name"])  # members of a sweep (seeds, ensemble members) are one family
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


def _model_quality(spec: dict[str, Any], encoder: Any, quality_fn: Callable | None) -> tuple[float | None, str]:
    """A model's quality and where it came from: ``quality:`` in its entry, else the study's ``quality_fn``
    (one common test for every model), else the encoder's own ``quality`` attribute."""
    if spec.get("quality") is not None:
        return float(spec["quality"]), "config"
    if quality_fn is not None:
        try:
            q = quality_fn(encoder)
        except Exception as err:  # a model without energies/forces has no quality; never stop the study for it
            log.warning("quality_fn failed for %s: %s", spec["name"], err)
            q = None
        if q is not None:
            return float(q), "quality_fn"
    q = getattr(encoder, "quality", None)
    return (float(q), "encoder") if isinstance(q, int | float) else (None, "none")


def _excluded(specs: list[dict[str, Any]], families: dict[str, str], keys: Sequence[str]) -> list[str]:
    keys = set(keys)
    return [
        s["name"] for s in specs if s["name"] in keys or families[s["name"]] in keys or keys & set(s.get("tags") or [])
    ]


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


def _container(node: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _build_data(node: Any, what: str) -> tuple[Any, str]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    data_yaml = OmegaConf.to_yaml(node, resolve=True)
    dataset = instantiate(node, _convert_="all")
    if len(dataset) == 0:
        raise ValueError(f"the {what} built from {data_yaml.strip()!r} is empty")
    return dataset, data_fingerprint(dataset, data_yaml)


def _check_study(cfg: Any, levels: list[str], metrics: list[Any]) -> None:
    bad_levels = [lv for lv in levels if lv not in LEVELS]
    if bad_levels:
        raise ValueError(f"unknown levels {bad_levels}: use any of {', '.join(LEVELS)}")
    fns = _metric_fns(metrics)
    if any(m.base in _ANCHOR_METRICS for m in fns) and int(cfg.anchor_space) < 1:
        raise ValueError("anchor_retrieval / anchor_ot_distance need anchor_space >= 1")
    known = {m.label for m in fns} | {m.base for m in fns}
    unknown_null = [x for x in (cfg.null_metrics or []) if x not in known]
    if unknown_null:
        raise ValueError(f"null_metrics {unknown_null} are not among the study's metrics {sorted(known)}")
    bad_null_levels = [x for x in (cfg.null_levels or []) if x not in levels]
    if bad_null_levels:
        raise ValueError(f"null_levels {bad_null_levels} are not among the study's levels {levels}")
    if cfg.anchor_sampling not in ("fps", "random"):
        raise ValueError(f"anchor_sampling must be fps or random, got {cfg.anchor_sampling!r}")


def _extract_all(cfg, dataset, dfp, ood, quality_fn, cache_dir, progress) -> tuple:
    """Build every model of the study in turn, extract (cached) features on the data (and the OOD data), score its
    quality; optional models that cannot be built are skipped and reported."""
    from hydra.utils import instantiate

    specs = expand_models(cfg.models)
    features, ood_features, quality, source, skipped, built = [], [], {}, {}, {}, []
    for spec in specs:
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
        efp = encoder_fingerprint(encoder, enc_yaml)
        bs = int(spec.get("batch_size") or cfg.get("batch_size", 32))
        feats = extract_features(encoder, dataset, name, bs, cache_dir, _sha(dfp, efp, enc_yaml), progress)
        feats = feats.select_layers(spec.get("layers"))
        feats.quality, source[name] = _model_quality(spec, encoder, quality_fn)
        quality[name] = feats.quality
        features.append(feats)
        if ood is not None:
            of = extract_features(encoder, ood[0], name, bs, cache_dir, _sha(ood[1], efp, enc_yaml), progress)
            ood_features.append(of.select_layers(spec.get("layers")))
        built.append(spec)
        del encoder
    return features, ood_features, quality, source, skipped, built


def run_convergence(cfg: Any) -> dict[str, Any]:
    """Build the data and the models of a ``configs/converge`` config, extract (cached) features, compare,
    calibrate, write; with ``ood_data`` the same models are compared on the out-of-distribution set too."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = _validated(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    levels = list(cfg.get("levels", ["item"]))
    metrics = _container(cfg.get("metrics", ["mutual_knn"]))
    _check_study(cfg, levels, metrics)  # fail on a bad level or metric before any feature is extracted
    out_dir = Path(cfg.get("out_dir") or f"runs/converge/{cfg.get('name', 'study')}")
    cache_dir = Path(cfg.get("cache_dir") or out_dir / "features")
    progress = bool(cfg.get("progress", True))
    dataset, dfp = _build_data(cfg.data, "data set")
    ood = _build_data(cfg.ood_data, "out-of-distribution data set") if cfg.get("ood_data") is not None else None
    quality_fn = instantiate(cfg.quality_fn, _convert_="all") if cfg.get("quality_fn") is not None else None

    extracted = _extract_all(cfg, dataset, dfp, ood, quality_fn, cache_dir, progress)
    features, ood_features, quality, source, skipped, built = extracted
    families = {s["name"]: str(s["family"]) for s in built}
    excluded = _excluded(built, families, list(cfg.exclude_from_mean))

    preprocess = _container(cfg.get("preprocess", {"clamp_quantile": 0.95, "normalize": True}))
    options = dict(
        metrics=metrics,
        levels=levels,
        preprocess=preprocess if preprocess else None,
        max_tokens=cfg.get("max_tokens", 4000),
        min_group_tokens=int(cfg.get("min_group_tokens", 20)),
        anchors=int(cfg.get("anchors", 0)),
        seed=int(cfg.get("seed", 0)),
        progress=progress,
        anchor_space=int(cfg.anchor_space),
        anchor_sampling=str(cfg.anchor_sampling),
        null_permutations=int(cfg.null_permutations),
        null_metrics=_container(cfg.null_metrics),
        null_levels=_container(cfg.null_levels),
        width_floor=bool(cfg.width_floor),
        floor_draws=int(cfg.floor_draws),
        intrinsic_dimension=bool(cfg.intrinsic_dimension),
    )
    outputs = dict(
        quality_name=str(cfg.get("quality_name", "quality")),
        higher_is_better=bool(cfg.get("higher_is_better", False)),
        families=families,
        exclude_from_mean=excluded,
        bootstrap=int(cfg.bootstrap),
        seed=int(cfg.seed),
    )
    names = [f.name for f in features]
    result = compare(features, **options)
    summary = write_outputs(result, names, out_dir, quality, **outputs)
    summary["quality_source"] = source
    ood_out = None
    if ood is not None:
        ood_options = {**options, "null_permutations": 0}
        if cfg.get("ood_metrics") is not None:
            ood_options["metrics"] = _container(cfg.ood_metrics)
        ood_result = compare(ood_features, **ood_options)
        ood_summary = write_outputs(ood_result, names, out_dir / "ood", quality, **outputs)
        summary["ood_shift"] = ood_shift(summary, ood_summary, out_dir)
        ood_out = {"result": ood_result, "summary": ood_summary, "features": ood_features}
    summary["skipped"] = skipped
    summary["layers"] = {f.name: f.layers for f in features}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return {"result": result, "summary": summary, "features": features, "out_dir": out_dir, "ood": ood_out}


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
        for metric, by_level in s.get("calibration", {}).items():
            for level, cal in by_level.items():
                print(f"{metric}/{level}: {cal['beat_null_bh05']}/{cal['pairs']} pairs beat their permutation null")
        for metric, by_level in s.get("spearman_ci", {}).items():
            for level, st in by_level.items():
                print(
                    f"Spearman(quality, mean alignment) {metric}/{level}: {st['rho']:.3f} "
                    f"[{st['lo']:.2f}, {st['hi']:.2f}] p={st['p_value']:.3f} (n={st['n']})"
                )
        for measure, by_level in s.get("ood_shift", {}).items():
            for level, st in by_level.items():
                print(f"OOD shift {measure}/{level}: median {st['median_id']:.3f} -> {st['median_ood']:.3f}")

    _app()


if __name__ == "__main__":
    main()
