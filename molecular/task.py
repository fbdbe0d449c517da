"""MACE training task: energy + force loss, optional MACE-REPA alignment, evaluation with an alignment floor.

Loss: MACE's ``WeightedEnergyForcesLoss`` (ACEsuit/mace ``mace/modules/loss.py``):
``λ_E · mean_b ((E_b - Ê_b) / N_b)^2 + λ_F · mean over all force components (F - F̂)^2``.

MACE-REPA ("Unifying Force Prediction and Molecular Conformation Generation Through Representation Alignment",
ICML 2025 GenBio workshop): the student's per-atom node features after interaction ``align_layer`` go through an
MLP projector (REPA's ``build_mlp`` shape, sihyun-yu/REPA) and are pulled towards a frozen teacher's per-atom
features with ``-cos`` (:class:`unirep.align.Aligner`). The teacher is a :class:`unirep.encoders.FrozenEncoder`
called with the structure ids, so its features are computed once per structure and then read from the cache.

Per-atom teacher features can be nearly blind to conformation (rs-gh/molecular-repa: cosine 0.998 between
conformers of MACE-OFF; a projector on random inputs reaching 0.86), so :meth:`MaceTask.evaluate` reports, next
to the trained projector's cosine, the cosine a fresh projector reaches on *shuffled* teacher targets and the
cosine of the per-element mean teacher feature (a projector that only knows the element).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from molecular.data import (
    AtomsDataset,
    GraphBatch,
    StructureError,
    collate_graphs,
    generate_set,
    load_dataset,
    train_val_split,
)
from molecular.models import MACEModel, energy_forces_loss, fit_atomic_energies, fit_scale_shift
from unirep.align import Aligner, ProjectorMLP, StopAtStep, token_cosine
from unirep.encoders import FrozenEncoder
from unirep.tokens import TokenSet
from unirep.train.data import DataModule, Task

__all__ = ["MaceTask", "mace_data", "energy_forces_loss", "prediction_metrics", "alignment_floor"]


def mace_data(
    train: str,
    val: str | None = None,
    r_max: float = 5.0,
    z_table: Sequence[int] | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = "data/cache/molecular",
    generate: dict | None = None,
) -> DataModule:
    """Labelled structures from files as a DataModule of graphs (hydra target).

    Without ``val``, a seeded split of ``train`` gives the validation set (``n_val`` or ``val_fraction``).
    ``n_train`` keeps a seeded subset of the remaining training structures (learning curves). ``generate`` makes a
    missing ``train`` file first with GFN2-xTB labels, so a fresh clone runs without preparing data by hand:
    ``{"kind": "md", "molecule": "ethanol", "frames": 200}`` (one molecule's Langevin MD) or
    ``{"kind": "broad", "num_molecules": 300}`` (many small molecules; see ``scripts/make_molecular_data.py``).
    """
    train_path = Path(train)
    if not train_path.exists() and generate:
        generate_set(train_path, **dict(generate))
    train_ds, val_ds = train_val_split(
        train_path, val, r_max, z_table, n_train, n_val, val_fraction, seed, cache_dir=cache_dir
    )
    info = {"r_max": float(r_max), "z_table": None if z_table is None else list(z_table), "train_file": str(train)}
    return DataModule(train=train_ds, val=val_ds, collate_fn=collate_graphs, info=info)


@torch.no_grad()
def _detach(out: dict) -> dict:
    return {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in out.items()}


def predict(
    model: MACEModel,
    data: AtomsDataset,
    batch_size: int = 32,
    device: torch.device | None = None,
    features: tuple[int, bool] | None = None,
) -> dict[str, Any]:
    """Energies, forces (and optionally one layer's features) of every structure, in data order, on the CPU."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    es, fs, feats = [], [], []
    try:
        for start in range(0, len(data), batch_size):
            batch = collate_graphs([data[i] for i in range(start, min(len(data), start + batch_size))]).to(device)
            out = model(batch, training=False)
            es.append(out["energy"].detach().double().cpu())
            fs.append(out["forces"].detach().double().cpu())
            if features is not None:
                feats.append(
                    model.split_features(out["node_feats"].detach(), batch, [features[0]], features[1])[0].to("cpu")
                )
    finally:
        model.train(was_training)
    result = {"energy": torch.cat(es), "forces": torch.cat(fs)}
    if features is not None:
        result["features"] = TokenSet.cat_items(feats)
    return result


def prediction_metrics(
    pred_e: Tensor, pred_f: Tensor, true_e: Tensor, true_f: Tensor, num_atoms: Tensor
) -> dict[str, float]:
    """Energy MAE/RMSE (meV per structure and per atom) and force-component MAE/RMSE (meV/Å)."""
    de = (pred_e - true_e).double()
    df = (pred_f - true_f).double()
    n = num_atoms.double()
    return {
        "e_mae_meV": float(de.abs().mean() * 1e3),
        "e_rmse_meV": float(de.square().mean().sqrt() * 1e3),
        "e_mae_meV_per_atom": float((de / n).abs().mean() * 1e3),
        "f_mae_meV_A": float(df.abs().mean() * 1e3),
        "f_rmse_meV_A": float(df.square().mean().sqrt() * 1e3),
    }


def _parity_plot(path: Path, sets: dict[str, dict[str, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for name, d in sets.items():
        axes[0].scatter(d["true_e"], d["pred_e"], s=6, alpha=0.6, label=name)
        axes[1].scatter(d["true_f"], d["pred_f"], s=2, alpha=0.3, label=name)
    for ax, title, unit in ((axes[0], "energy per atom (shifted)", "eV/atom"), (axes[1], "force components", "eV/Å")):
        lo = min(a.get_xlim()[0] for a in [ax])
        hi = max(a.get_xlim()[1] for a in [ax])
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xlabel(f"reference ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def alignment_floor(
    student: TokenSet,
    target: TokenSet,
    numbers: Tensor,
    hidden_dim: int = 256,
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
) -> dict[str, float]:
    """What cosine is cheap to get: fresh projectors fitted (full batch, Adam) from the student's features to the
    real teacher targets and to targets shuffled across atoms, and the per-element mean teacher feature.

    Returns ``fit_real`` (a fresh projector on the real targets, comparable to the trained one), ``fit_shuffled``
    (the floor: teacher features assigned to random atoms), ``element_mean`` (cosine of each atom's target with
    its element's mean target).
    """
    g = torch.Generator().manual_seed(seed)
    x = student.x.detach().float()
    y = target.x.detach().float()
    perm = torch.randperm(y.shape[0], generator=g)

    def fit(tgt: Tensor) -> float:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            proj = ProjectorMLP(x.shape[1], y.shape[1], hidden_dim=hidden_dim)
        opt = torch.optim.Adam(proj.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = -torch.nn.functional.cosine_similarity(proj(x), tgt, dim=-1).mean()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(torch.nn.functional.cosine_similarity(proj(x), tgt, dim=-1).mean())

    means = torch.zeros(int(numbers.max()) + 1, y.shape[1])
    means.index_add_(0, numbers, y)
    means /= torch.bincount(numbers, minlength=means.shape[0]).clamp_min(1)[:, None].float()
    elem = float(torch.nn.functional.cosine_similarity(means[numbers], y, dim=-1).mean())
    return {"fit_real": fit(y), "fit_shuffled": fit(y[perm]), "element_mean": elem}


class MaceTask(Task):
    """Train a MACE force field, optionally aligned to a frozen atomistic teacher (MACE-REPA).

    Args:
        model: the :class:`MACEModel` student.
        energy_weight / forces_weight: λ_E, λ_F of the loss (MACE-OFF23: 40 / 1000; MACE default 1 / 100).
        statistics_from: the training data the E0s (least squares), ScaleShift and the mean neighbour count are
            fitted on when the task is built (MACE's ``E0s="average"``, ``scaling="rms_forces_scaling"``): a
            mapping of :func:`molecular.data.train_val_split` arguments (``train``, ``val``, ``n_train``, ``n_val``,
            ``val_fraction``, ``seed``: the recipes pass the data config's, so only the training split counts,
            never the validation frames), a :class:`~unirep.train.DataModule` (its ``train``), an
            :class:`~molecular.data.AtomsDataset`, or a file path (every structure in it).
        teacher: a frozen atomistic teacher (``FrozenEncoder``); enables MACE-REPA when ``align_weight > 0``.
        align_layer: the interaction whose node features are aligned (``0``: the first).
        align_invariant: align only the scalar (``0e``) channels (rotation-invariant, like the teacher's).
        align_weight / align_loss / align_stop_step: REPA's λ, loss name, and an optional step where it drops to 0.
        projector_hidden / projector_layers: the MLP projector's width and number of Linear layers.
        eval_batch_size: batch size in :meth:`evaluate`.
        baseline_steps: optimisation steps of the fresh projectors in the alignment floor (0: skip it).
        cache_dir: processed-data cache used when ``statistics_from`` names files.
        teacher_cache: read teacher features from the per-structure cache (False: recompute every step, for timing).
    """

    def __init__(
        self,
        model: MACEModel,
        energy_weight: float = 1.0,
        forces_weight: float = 100.0,
        statistics_from: str | os.PathLike | Mapping[str, Any] | DataModule | AtomsDataset | None = None,
        teacher: FrozenEncoder | None = None,
        align_layer: int = 0,
        align_invariant: bool = True,
        align_weight: float = 0.5,
        align_loss: str = "neg_cosine",
        align_stop_step: int | None = None,
        projector_hidden: int = 256,
        projector_layers: int = 3,
        eval_batch_size: int = 32,
        baseline_steps: int = 300,
        cache_dir: str | None = None,
        teacher_cache: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.energy_weight = float(energy_weight)
        self.forces_weight = float(forces_weight)
        self.eval_batch_size = int(eval_batch_size)
        self.baseline_steps = int(baseline_steps)
        self.cache_dir = cache_dir
        self.teacher_cache = bool(teacher_cache)
        if statistics_from is not None and not (isinstance(statistics_from, str) and not statistics_from):
            self.fit_statistics(statistics_from)
        self.teacher = teacher
        self.aligner: Aligner | None = None
        self.align_layer = int(align_layer)
        self.align_invariant = bool(align_invariant)
        if teacher is not None:
            in_dim = model.feature_dim(self.align_layer, self.align_invariant)
            schedule = StopAtStep(align_weight, align_stop_step) if align_stop_step is not None else None
            projector = ProjectorMLP(in_dim, teacher.dim, hidden_dim=projector_hidden, num_layers=projector_layers)
            self.aligner = Aligner(projector, loss=align_loss, weight=align_weight, schedule=schedule)

    def fit_statistics(self, source: str | os.PathLike | Mapping[str, Any] | DataModule | AtomsDataset) -> None:
        """Fit E0s, ScaleShift and the mean neighbour count on the training structures of ``source`` (see
        ``statistics_from``) and set them on the model."""
        if isinstance(source, DataModule):
            ds = source.train
        elif isinstance(source, AtomsDataset):
            ds = source
        else:
            path = source.get("train") if isinstance(source, Mapping) else source
            if path is None or not Path(path).exists():
                # a checkpoint being rebuilt elsewhere: its saved buffers hold the statistics
                warnings.warn(
                    f"statistics_from: {path} not found: E0s/scale/shift stay as given (or as loaded from a "
                    "checkpoint)",
                    stacklevel=2,
                )
                return
            if isinstance(source, Mapping):
                spec = {"r_max": self.model.r_max, "z_table": self.model.z_table, "cache_dir": self.cache_dir}
                ds, _ = train_val_split(**{**spec, **source})
            else:  # a file of training structures: all of it
                ds = load_dataset(
                    path,
                    r_max=self.model.r_max,
                    z_table=self.model.z_table,
                    require_labels=True,
                    cache_dir=self.cache_dir,
                )
        e0 = fit_atomic_energies(ds.structures, self.model.z_table)
        scale, shift = fit_scale_shift(ds.structures, self.model.z_table, e0)
        neighbours = float(np.mean([g.edge_index.shape[1] / max(1, g.numbers.numel()) for g in ds.graphs]))
        self.model.set_statistics(e0, scale, shift, max(neighbours, 1.0))

    # -- training --------------------------------------------------------------------------------------------------
    def forward(self, batch: GraphBatch, step: int) -> dict[str, Tensor]:
        if batch.energy is None or batch.forces is None:
            raise StructureError(f"batch with ids {batch.ids[:3]}...: training needs energy and forces labels")
        out = self.model(batch, training=True)
        result = energy_forces_loss(
            out["energy"],
            out["forces"],
            batch.energy,
            batch.forces,
            batch.num_atoms,
            self.energy_weight,
            self.forces_weight,
        )
        with torch.no_grad():
            result["mae/forces"] = (out["forces"] - batch.forces.to(out["forces"].dtype)).abs().mean()
            result["mae/energy_per_atom"] = (
                (out["energy"] - batch.energy.to(out["energy"].dtype)).abs() / batch.num_atoms
            ).mean()
        if self.aligner is not None:
            student = self.model.split_features(out["node_feats"], batch, [self.align_layer], self.align_invariant)[0]
            ids = batch.ids if self.teacher_cache else None  # None: the teacher runs on every step
            target = self.teacher.encode(batch, ids=ids, device=batch.positions.device)
            a = self.aligner(student.with_x(student.x.float()), target, step)
            result["loss"] = result["loss"] + a["loss"]
            result["loss/align"] = a["raw"].detach()
            result["align/cos"] = a["cos"]
            result["align/weight"] = torch.tensor(float(a["weight"]))
        result["loss/energy"] = result["loss/energy"].detach()
        result["loss/forces"] = result["loss/forces"].detach()
        return result

    # -- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, data: DataModule, out_dir: str | os.PathLike, step: int) -> dict[str, float]:
        """Energy/force errors on the validation set and a training subset, a parity plot, a JSON file, and
        (MACE-REPA) the alignment cosine against its floors on the validation set."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        sets: dict[str, AtomsDataset] = {}
        if data.val is not None and len(data.val):
            sets["val"] = data.val
        train = data.train
        sets["train"] = train.subset(list(range(min(len(train), 200)))) if hasattr(train, "subset") else train
        metrics: dict[str, float] = {}
        plot: dict[str, dict[str, np.ndarray]] = {}
        for name, ds in sets.items():
            want = (self.align_layer, self.align_invariant) if (self.aligner is not None and name == "val") else None
            p = predict(self.model, ds, self.eval_batch_size, features=want)
            ref = collate_graphs(ds.graphs)
            n = ref.num_atoms
            for k, v in prediction_metrics(p["energy"], p["forces"], ref.energy, ref.forces, n).items():
                metrics[f"{name}/{k}"] = v
            mean_e = float((ref.energy / n).mean())
            plot[name] = {
                "true_e": (ref.energy / n - mean_e).numpy(),
                "pred_e": (p["energy"] / n - mean_e).numpy(),
                "true_f": ref.forces.reshape(-1).numpy(),
                "pred_f": p["forces"].reshape(-1).numpy(),
            }
            if want is not None:
                metrics.update(self._alignment_metrics(p["features"], ref))
        _parity_plot(out_dir / f"parity_step{step:08d}.png", plot)
        record = {"step": step, "metrics": metrics, "sets": {k: len(v) for k, v in sets.items()}}
        tmp = out_dir / f"eval_step{step:08d}.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out_dir / f"eval_step{step:08d}.json")
        return metrics

    @torch.no_grad()
    def _teacher_tokens(self, ref: GraphBatch) -> TokenSet:
        parts = []
        device = next(self.aligner.parameters()).device
        for start in range(0, ref.num_graphs, self.eval_batch_size):
            sub = ref.select(list(range(start, min(ref.num_graphs, start + self.eval_batch_size)))).to(device)
            parts.append(self.teacher.encode(sub, ids=sub.ids, device=device).to("cpu"))
        return TokenSet.cat_items(parts)

    def _alignment_metrics(self, student: TokenSet, ref: GraphBatch) -> dict[str, float]:
        target = self._teacher_tokens(ref)
        device = next(self.aligner.parameters()).device
        with torch.no_grad():
            pred = self.aligner.projector(student.x.float().to(device)).cpu()
            cos = float(token_cosine(student.with_x(pred), target).mean())
        out = {"align/val_cos": cos}
        if self.baseline_steps > 0:
            with torch.enable_grad():
                floor = alignment_floor(student, target, ref.numbers, steps=self.baseline_steps)
            out.update({f"align/val_cos_{k}": v for k, v in floor.items()})
        return out
