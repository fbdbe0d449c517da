"""Alignment of every SiT layer with the teacher, over noise levels and training checkpoints (REPA's figure 2).

Yu et al., ICLR 2025, "Representation Alignment for Generation" (REPA, sihyun-yu/REPA), figure 2 and section 3:
CKNNA (Huh et al. 2024, minyoungg/platonic-rep ``metrics.py``) between a SiT's hidden states and DINOv2's features
rises with training and with depth up to a middle block, is highest at low noise, and stays far below the teacher's
own level; REPA raises it. This command measures that on a run of this project: for every checkpoint
``<run>/checkpoints/step_N``, every noise level t and every layer (0 = the embedded input, k = block k, the
``forward_intermediates`` convention), the metric between the layer's tokens of ``x_t = (1 - t) x + t eps`` (one
fixed noise draw per item, the same for every checkpoint) and the frozen teacher's tokens of the clean images.

The scoring is ``unirep-converge``'s: :func:`unirep.converge.compare` with the same metric specs
(``{name: cknna, topk: 10}``, any :mod:`unirep.metrics` metric), levels (``item``: mean-pooled tokens per image;
``token``: every patch, the teacher's grid resampled to the student's), and platonic-rep preprocessing (clamp at the
0.95 quantile, L2-normalise). The teacher is built once from the first checkpoint's config and reused: its
features are those of one fixed network for every checkpoint.

Outputs under ``out_dir`` (default ``<run>/align_analysis``): ``alignment.json`` and ``alignment.csv`` (rows
``step, t, layer, level, metric, value``), per metric and level ``heatmap_<metric>_<level>.png`` (layer x t at the
last checkpoint) and ``curves_<metric>_<level>.png`` (value vs checkpoint step, one line per layer at the noise level
``curve_t``, and the best layer), and ``summary.json`` (best layer per step and t).

Run: ``unirep-align-analysis run=outputs/vision_repa`` (config ``configs/align_analysis.yaml``, schema
:class:`AlignAnalysisConfig`; any key on the command line, e.g. ``times=[0.0,0.5] num_items=512``).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import MISSING, OmegaConf
from torch import Tensor

from unirep.align import resample_tokens
from unirep.converge import ModelFeatures, compare
from unirep.flow import interpolate
from unirep.tokens import TokenSet

__all__ = [
    "AlignAnalysisConfig",
    "run_checkpoints",
    "analysis_inputs",
    "layer_features",
    "teacher_features",
    "score_checkpoint",
    "write_outputs",
    "run_align_analysis",
    "main",
]


@dataclass
class AlignAnalysisConfig:
    """Schema of ``unirep-align-analysis`` (``configs/align_analysis.yaml``): a misspelt key stops at start-up."""

    run: str = MISSING  # outputs/<run>: its checkpoints/step_N folders (or one checkpoint folder)
    out_dir: str | None = None  # default <run>/align_analysis
    steps: list[int] | None = None  # checkpoint steps to use (None: all)
    times: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    metrics: list[Any] = field(default_factory=lambda: [{"name": "cknna", "topk": 10}])
    levels: list[str] = field(default_factory=lambda: ["item"])
    preprocess: Any = field(default_factory=lambda: {"clamp_quantile": 0.95, "normalize": True})
    max_tokens: int | None = 4000  # token level: a seeded subset of patches (kernel metrics cost O(n^2))
    num_items: int = 256  # images of the held-out split (the training split when there is none)
    batch_size: int = 64
    labels: bool = True  # false: every item gets the null class (unconditional features)
    curve_t: float = 0.5  # noise level of the curves (the nearest of `times`)
    ema: bool = True  # false: the raw weights
    trust_config: bool = False  # true: build any _target_ of the run's config (only for runs you made)
    device: str = "auto"
    seed: int = 0
    data: Any = None  # a data config to use instead of the run's


def register_config() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_align_analysis", node=AlignAnalysisConfig)


def run_checkpoints(run: str | Path, steps: Sequence[int] | None = None) -> list[tuple[int, Path]]:
    """``(step, folder)`` of a run's checkpoints, oldest first (a checkpoint folder is a run of one)."""
    from unirep.train.checkpoint import list_checkpoints, read_state

    run = Path(run)
    if (run / "state.json").is_file():
        found = [run]
    else:
        found = list_checkpoints(run / "checkpoints") or list_checkpoints(run)
    if not found:
        raise FileNotFoundError(f"run={run}: no checkpoints (step_N folders) there or under {run}/checkpoints")
    pairs = [(int(read_state(p)["step"]), p) for p in found]
    if steps is not None:
        have = {s for s, _ in pairs}
        if missing := sorted(set(steps) - have):
            raise ValueError(f"run={run}: no checkpoint for steps {missing}; it has steps {sorted(have)}")
        pairs = [(s, p) for s, p in pairs if s in set(steps)]
    return pairs


def analysis_inputs(task: Any, data: Any, num_items: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(images, model_inputs, labels)`` of the first ``num_items`` held-out items (training split otherwise).

    As in training: the model sees ``tokenizer.encode(x)`` (``x`` itself without a tokenizer), the teacher the
    item's ``image`` (``x`` when the items have no separate image)."""
    ds = data.val if getattr(data, "val", None) is not None else data.train
    n = min(int(num_items), len(ds))
    if n < 4:
        raise ValueError(f"the alignment analysis needs at least 4 items, the data set has {len(ds)}")
    items = [ds[i] for i in range(n)]
    x = torch.stack([torch.as_tensor(it["x"]) for it in items]).float()
    images = torch.stack([torch.as_tensor(it.get("image", it["x"])) for it in items]).float()
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is not None:
        with torch.no_grad():
            x = tokenizer.encode(x.to(next(task.model.parameters()).device)).cpu()
    labels = torch.stack([torch.as_tensor(it.get("y", 0)) for it in items]).long()
    return images, x, labels


def _stack_layers(chunks: list[list[TokenSet]]) -> tuple[list[Tensor], Tensor]:
    """Per layer ``[T, D_l]`` over all batches, and each token's item index ``[T]`` (items numbered globally)."""
    tokens = [torch.cat([c[k].x.float().cpu() for c in chunks]) for k in range(len(chunks[0]))]
    batch, offset = [], 0
    for c in chunks:
        batch.append(c[0].batch.cpu() + offset)
        offset += int(c[0].num_items)
    return tokens, torch.cat(batch)


@torch.no_grad()
def layer_features(
    model: Any, z: Tensor, t: float, eps: Tensor, labels: Tensor | None, batch_size: int, name: str = "student"
) -> ModelFeatures:
    """Every layer's tokens of ``model`` at noise level ``t`` (``x_t = (1 - t) z + t eps``), as ModelFeatures."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    chunks = []
    for s in range(0, z.shape[0], batch_size):
        zb, eb = z[s : s + batch_size].to(device, dtype), eps[s : s + batch_size].to(device, dtype)
        tb = torch.full((zb.shape[0],), float(t), device=device, dtype=dtype)
        yb = None if labels is None else labels[s : s + batch_size].to(device)
        chunks.append(model.forward_intermediates(interpolate(zb, eb, tb), tb, yb, None)[1])
    tokens, batch = _stack_layers(chunks)
    return ModelFeatures(name, [str(k) for k in range(len(tokens))], tokens, batch)


@torch.no_grad()
def teacher_features(teacher: Any, images: Tensor, batch_size: int, num_tokens: int | None) -> ModelFeatures:
    """The frozen teacher's tokens of the clean images (resampled to ``num_tokens`` per item when given)."""
    if teacher is None:
        raise ValueError("the run's task has no teacher (task.teacher): the analysis compares the SiT with it")
    chunks = []
    for s in range(0, images.shape[0], batch_size):
        ts = teacher.compute_tokens(images[s : s + batch_size])  # a FrozenEncoder: computed, not cached
        if num_tokens is not None and ts.x.shape[0] != num_tokens * ts.num_items:
            ts = resample_tokens(ts, num_tokens)
        chunks.append([ts])
    tokens, batch = _stack_layers(chunks)
    return ModelFeatures("teacher", ["teacher"], tokens, batch)


def score_checkpoint(model: Any, inputs: dict[str, Any], teacher: ModelFeatures, cfg: Any, step: int) -> list[dict]:
    """Rows ``{step, t, layer, level, metric, value}`` of one checkpoint: every layer vs the teacher, every t."""
    rows = []
    for t in cfg.times:
        student = layer_features(model, inputs["z"], float(t), inputs["eps"], inputs["labels"], int(cfg.batch_size))
        result = compare(
            [student, teacher],
            metrics=list(cfg.metrics),
            levels=list(cfg.levels),
            preprocess=dict(cfg.preprocess) if cfg.preprocess is not None else None,
            max_tokens=cfg.max_tokens,
            seed=int(cfg.seed),
            progress=False,
            intrinsic_dimension=False,
        )
        for r in result.rows:
            rows.append(dict(step=step, t=float(t), layer=int(r["layer_a"]), level=r["level"], metric=r["metric"]))
            rows[-1]["value"] = float(r["value"])
    return rows


def _grid(rows: list[dict], metric: str, level: str, step: int) -> tuple[list[int], list[float], Tensor]:
    """Layer x t matrix of one metric/level at one step."""
    sel = [r for r in rows if r["metric"] == metric and r["level"] == level and r["step"] == step]
    layers, times = sorted({r["layer"] for r in sel}), sorted({r["t"] for r in sel})
    m = torch.full((len(layers), len(times)), float("nan"))
    for r in sel:
        m[layers.index(r["layer"]), times.index(r["t"])] = r["value"]
    return layers, times, m


def _plot_heatmap(rows: list[dict], metric: str, level: str, step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, times, m = _grid(rows, metric, level, step)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(times), 1.0 + 0.45 * len(layers)))
    im = ax.imshow(m.numpy(), aspect="auto", origin="lower", cmap="viridis")
    ax.set_xticks(range(len(times)), [f"{t:g}" for t in times])
    ax.set_yticks(range(len(layers)), [str(k) for k in layers])
    ax.set_xlabel("noise level t (0 = data, 1 = noise)")
    ax.set_ylabel("layer (0 = embedding, k = block k)")
    ax.set_title(f"{metric} ({level}) with the teacher, step {step}")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{float(m[i, j]):.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _curves(rows: list[dict], metric: str, level: str, t: float) -> tuple[list[int], dict[int, list[float]]]:
    """Per layer, the value at noise level ``t`` for every step."""
    sel = [r for r in rows if r["metric"] == metric and r["level"] == level and math.isclose(r["t"], t)]
    steps = sorted({r["step"] for r in sel})
    by_layer: dict[int, list[float]] = {}
    for layer in sorted({r["layer"] for r in sel}):
        vals = {r["step"]: r["value"] for r in sel if r["layer"] == layer}
        by_layer[layer] = [vals.get(s, float("nan")) for s in steps]
    return steps, by_layer


def _plot_curves(rows: list[dict], metric: str, level: str, t: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, by_layer = _curves(rows, metric, level, t)
    fig, ax = plt.subplots(figsize=(6, 4))
    cmap = plt.get_cmap("viridis")
    for i, (layer, vals) in enumerate(by_layer.items()):
        ax.plot(steps, vals, marker="o", color=cmap(i / max(len(by_layer) - 1, 1)), label=f"layer {layer}")
    best = torch.tensor(list(by_layer.values())).nan_to_num(float("-inf")).max(0).values
    ax.plot(steps, best.tolist(), "k--", label="best layer")
    ax.set_xlabel("training step (checkpoint)")
    ax.set_ylabel(f"{metric} ({level})")
    ax.set_title(f"alignment with the teacher at t = {t:g}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary(rows: list[dict]) -> dict[str, Any]:
    """Per metric/level: per step and t, the best layer and its value."""
    out: dict[str, Any] = {}
    for r in rows:
        key = f"{r['metric']}/{r['level']}"
        cell = out.setdefault(key, {}).setdefault(str(r["step"]), {}).setdefault(f"{r['t']:g}", None)
        if cell is None or r["value"] > cell["value"]:
            out[key][str(r["step"])][f"{r['t']:g}"] = {"layer": r["layer"], "value": r["value"]}
    return out


def write_outputs(rows: list[dict], out_dir: Path, curve_t: float, meta: dict[str, Any]) -> dict[str, Any]:
    """``alignment.json``/``.csv``, the heatmaps, the curves and ``summary.json`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "alignment.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    with open(out_dir / "alignment.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "t", "layer", "level", "metric", "value"])
        w.writeheader()
        w.writerows(rows)
    last = max(r["step"] for r in rows)
    times = sorted({r["t"] for r in rows})
    t_curve = min(times, key=lambda t: abs(t - curve_t))
    figures = []
    for metric, level in sorted({(r["metric"], r["level"]) for r in rows}):
        _plot_heatmap(rows, metric, level, last, out_dir / f"heatmap_{metric}_{level}.png")
        _plot_curves(rows, metric, level, t_curve, out_dir / f"curves_{metric}_{level}.png")
        figures += [f"heatmap_{metric}_{level}.png", f"curves_{metric}_{level}.png"]
    summary = {**meta, "heatmap_step": last, "curve_t": t_curve, "figures": figures, "best": _summary(rows)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load(path: Path, cfg: Any, device: torch.device) -> tuple[Any, Any]:
    from unirep.train import load_task

    torch.manual_seed(int(cfg.seed))  # a teacher built with random weights (smoke runs) is the same every time
    return load_task(path, ema=bool(cfg.ema), device=device, trust_config=bool(cfg.trust_config))


def _build_data(cfg: Any, run_cfg: Any, found: Path) -> Any:
    from hydra.utils import instantiate

    from unirep.config import check_targets

    node = cfg.data if cfg.data is not None else run_cfg.data
    if cfg.data is None and not cfg.trust_config:  # the run's data config is untrusted input, as in unirep-eval
        check_targets(OmegaConf.to_container(node), "data", f"{found}/state.json")
    return instantiate(node, _convert_="object")


def _check(cfg: Any) -> None:
    if not cfg.times or any(not 0.0 <= float(t) <= 1.0 for t in cfg.times):
        raise ValueError(f"times must be noise levels in [0, 1] (0 = data, 1 = noise), got {list(cfg.times)}")
    if bad := [lv for lv in cfg.levels if lv not in ("item", "token")]:
        raise ValueError(f"levels {bad}: the alignment analysis has levels item and token")
    if int(cfg.batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")


def run_align_analysis(cfg: Any) -> dict[str, Any]:
    """Score every checkpoint of ``cfg.run`` (see the module docstring); returns the rows, summary and out_dir."""
    _check(cfg)
    device = _device(str(cfg.device))
    ckpts = run_checkpoints(cfg.run, list(cfg.steps) if cfg.steps is not None else None)
    task, run_cfg = _load(ckpts[0][1], cfg, device)
    images, z, labels = analysis_inputs(task, _build_data(cfg, run_cfg, ckpts[0][1]), int(cfg.num_items))
    g = torch.Generator().manual_seed(int(cfg.seed))
    num_classes = int(getattr(task, "num_classes", 0))
    y = None if num_classes == 0 else (labels if cfg.labels else torch.full_like(labels, num_classes))
    inputs = {"z": z, "eps": torch.randn(z.shape, generator=g), "labels": y}
    per_item = int(layer_features(task.model, z[:1], 0.0, inputs["eps"][:1], None if y is None else y[:1], 1)
                   .tokens[-1].shape[0])  # fmt: skip
    teacher = teacher_features(task.teacher, images.to(device), int(cfg.batch_size), per_item)
    rows: list[dict] = []
    for i, (step, path) in enumerate(ckpts):
        if i > 0:
            task, _ = _load(path, cfg, device)
        rows += score_checkpoint(task.model, inputs, teacher, cfg, step)
        print(f"[unirep] align-analysis: step {step} ({i + 1}/{len(ckpts)}) scored", flush=True)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.run) / "align_analysis"
    meta = {"run": str(cfg.run), "steps": [s for s, _ in ckpts], "num_items": int(z.shape[0])}
    meta["weights"] = "ema" if cfg.ema else "raw"
    summary = write_outputs(rows, out_dir, float(cfg.curve_t), meta)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return {"rows": rows, "summary": summary, "out_dir": out_dir}


def main() -> None:
    """Console script ``unirep-align-analysis`` (hydra app over ``configs/align_analysis.yaml``)."""
    import hydra

    from unirep.cli import config_dir

    register_config()

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="align_analysis")
    def _app(cfg: Any) -> None:
        out = run_align_analysis(cfg)
        print(f"[unirep] wrote {out['out_dir']}/alignment.json ({len(out['rows'])} rows), heatmaps and curves")

    _app()


if __name__ == "__main__":
    main()
