"""MACE training task: energy + force loss, alignment terms (MACE-REPA), stage two, evaluation against floors.

Loss: MACE's ``WeightedEnergyForcesLoss`` (ACEsuit/mace ``mace/modules/loss.py``):
``λ_E · mean_b ((E_b - Ê_b) / N_b)^2 + λ_F · mean over all force components (F - F̂)^2``; with ``stage_two`` the
weights switch to mace_run_train's stage-two values (``λ_E = 1000``, ``λ_F = 100``) for the last part of training.

MACE-REPA ("Unifying Force Prediction and Molecular Conformation Generation Through Representation Alignment",
ICML 2025 GenBio workshop) is an :class:`unirep.align.AlignmentTerm` (``configs/align/mace_repa.yaml``): the student's
per-atom features at ``layer`` (the shared index convention of :mod:`unirep.intermediates`: 0 = node embedding,
k = after interaction k) through an MLP projector, negative cosine to a frozen teacher's per-atom features. The
features come from the same forward pass that gives energy and forces (``MACEModel.forward_intermediates``); the
teacher is a :class:`unirep.encoders.FrozenEncoder` keyed by structure content, so each structure's features are
computed once (or precomputed with ``unirep-features``).

Per-atom teacher features can be nearly blind to conformation (rs-gh/molecular-repa: cosine 0.998 between
conformers of MACE-OFF; a projector on random inputs reaching 0.86), so :meth:`MaceTask.evaluate` reports, next
to the trained projector's cosine, the floors of :func:`unirep.metrics.alignment_floors`: a fresh projector on
*shuffled* teacher targets and the per-element mean teacher feature (a projector that only knows the element).
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
from molecular.teachers.base import check_teacher_elements
from molecular.teachers.mace import save_mace_model
from unirep.align import AlignContext, Alignment, AlignmentTerm, ProjectorMLP, TeacherTarget, token_cosine
from unirep.encoders import FrozenEncoder
from unirep.metrics import alignment_floors
from unirep.tokens import TokenSet
from unirep.train.data import DataModule, Task

__all__ = [
    "MaceTask",
    "StageTwo",
    "TrainingElements",
    "mace_data",
    "energy_forces_loss",
    "prediction_metrics",
    "predict",
]


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
    layers: Sequence[int] = (),
) -> dict[str, Any]:
    """Energies, forces (and the features at ``layers``, from the same pass) of every structure, in data order, on
    the CPU: ``{"energy", "forces", "features": {layer: TokenSet}}``."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    es, fs = [], []
    feats: dict[int, list[TokenSet]] = {int(k): [] for k in layers}
    try:
        for start in range(0, len(data), batch_size):
            batch = collate_graphs([data[i] for i in range(start, min(len(data), start + batch_size))]).to(device)
            out, tokens = model.forward_intermediates(batch, list(feats), training=False)
            es.append(out["energy"].detach().double().cpu())
            fs.append(out["forces"].detach().double().cpu())
            for k, t in zip(feats, tokens, strict=True):
                feats[k].append(TokenSet(t.x.detach().float().cpu(), t.batch.cpu(), None, t.num_items))
    finally:
        model.train(was_training)
    return {
        "energy": torch.cat(es),
        "forces": torch.cat(fs),
        "features": {k: TokenSet.cat_items(v) for k, v in feats.items()},
    }


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


class TrainingElements(list):
    """The atomic numbers of a data config's training split, sorted: the default ``z_table`` of a MACE recipe
    (mace_run_train derives it from the training set too), so the model is no larger than the data needs.

    Takes :func:`molecular.data.train_val_split` arguments (a hydra node; the recipes pass the data config's);
    ``include`` adds elements the split may lack (a foundation model that should cover every QM9 element);
    ``elements`` gives the table explicitly (``task.model.z_table.elements=[1,6,7,8]``), checked against the split."""

    def __init__(
        self, train: str, include: Sequence[int] = (), elements: Sequence[int] | None = None, **split: Any
    ) -> None:
        if not Path(train).exists():
            raise FileNotFoundError(
                f"task.model.z_table is derived from the training data {train}, which does not exist: make the data "
                "first (data.generate) or give the elements explicitly, e.g. task.model.z_table=[1,6,7,8]"
            )
        split = {
            k: v for k, v in split.items() if k in ("val", "n_train", "n_val", "val_fraction", "seed", "cache_dir")
        }
        ds, _ = train_val_split(train, r_max=float(split.pop("r_max", 5.0)), **split)
        found = {int(z) for s in ds.structures for z in s.numbers}
        if elements is not None:
            missing = sorted(found - {int(z) for z in elements})
            if missing:
                raise StructureError(
                    f"task.model.z_table.elements={list(elements)} lacks atomic numbers {missing} of the training data "
                    f"{train}: add them"
                )
            found = {int(z) for z in elements}
        super().__init__(sorted(found | {int(z) for z in include}))


class StageTwo:
    """mace_run_train's stage two (``--stage_two``, formerly SWA) as a step schedule of the loss weights: from
    ``start`` on (a step, or a fraction of ``max_steps``; mace: the last 25 % of the epochs) the loss uses
    ``energy_weight`` / ``forces_weight`` (mace: 1000 / 100). mace also lowers the learning rate to 1e-3 then; that
    needs the trainer (see docs/molecular.md)."""

    def __init__(
        self, start: float = 0.75, energy_weight: float = 1000.0, forces_weight: float = 100.0, max_steps: int = 0
    ) -> None:
        if start < 0 or (start < 1 and isinstance(start, float) and max_steps <= 0 and start != 0):
            raise ValueError(f"stage_two.start={start} is a fraction: give stage_two.max_steps (trainer.max_steps)")
        self.start = int(round(start * max_steps)) if 0 < start < 1 else int(start)
        self.energy_weight, self.forces_weight = float(energy_weight), float(forces_weight)

    def weights(self, step: int, energy_weight: float, forces_weight: float) -> tuple[float, float]:
        if step >= self.start:
            return self.energy_weight, self.forces_weight
        return energy_weight, forces_weight


_STATISTICS = ("e0s", "scale", "shift", "avg_num_neighbors")
# mace_run_train's defaults (--model MACE): E0s "average", scale = RMS force, shift 0, the mean neighbour count
MACE_STATISTICS = ("e0s", "scale", "avg_num_neighbors")


class MaceTask(Task):
    """Train a MACE force field, optionally with alignment terms (MACE-REPA: ``configs/align/mace_repa.yaml``).

    Args:
        model: the :class:`MACEModel` student (built, or loaded from a foundation model: :mod:`molecular.finetune`).
        align: alignment terms by name (hydra: ``- /align@task.align.repa: mace_repa``), an :class:`Alignment`, or
            ``None``. Every ``layer`` key follows :mod:`unirep.intermediates` (0: node embedding, k: interaction k).
        teacher: the task's frozen teacher (a ``FrozenEncoder``); terms whose target has ``encoder: null`` use it.
        energy_weight / forces_weight: λ_E, λ_F of the loss (mace_run_train: 1 / 100; MACE-OFF23: 40 / 1000).
        stage_two: a :class:`StageTwo` (or its arguments): the loss weights of the last part of training.
        statistics_from: the training data the statistics are fitted on when the task is built (MACE's
            ``E0s="average"``, ``scaling="rms_forces_scaling"``, the mean neighbour count): a mapping of
            :func:`molecular.data.train_val_split` arguments (the recipes pass the data config's, so only the training
            split counts), a :class:`~unirep.train.DataModule` (its ``train``), an
            :class:`~molecular.data.AtomsDataset`, or a file path (every structure in it).
        statistics: which statistics to fit: ``e0s``, ``scale`` (RMS force), ``shift`` (mean per-atom interaction
            energy: mace's ``--model ScaleShiftMACE``; ``scale_shift`` names both), ``avg_num_neighbors``. Default:
            mace_run_train's (``--model MACE``: E0s, scale, neighbours; shift 0). Fine-tuning keeps the foundation's
            scale and neighbour count (``[e0s]``).
        align_features: the student's per-layer features for alignment: ``scalars`` (the ``0e`` channels), ``norms``
            (scalars plus per-irrep norms: an invariant contraction of the equivariant channels) or ``full``
            (equivariant; refused towards an invariant teacher). ``None`` keeps the model's.
        eval_batch_size: batch size in :meth:`evaluate`.
        baseline_steps: optimisation steps of the fresh projectors of the alignment floors (0: skip them).
        cache_dir: processed-data cache used when ``statistics_from`` names files.
        export: a folder where :meth:`evaluate` saves the (EMA) model in the project's MACE format, atomically (the
            foundation recipes: what ``molecular.quickstart.foundation_teacher`` and fine-tuning load).
    """

    def __init__(
        self,
        model: MACEModel,
        align: Mapping[str, AlignmentTerm] | Alignment | None = None,
        teacher: FrozenEncoder | None = None,
        energy_weight: float = 1.0,
        forces_weight: float = 100.0,
        stage_two: StageTwo | Mapping[str, Any] | None = None,
        statistics_from: str | os.PathLike | Mapping[str, Any] | DataModule | AtomsDataset | None = None,
        statistics: Sequence[str] = MACE_STATISTICS,
        align_features: str | None = None,
        eval_batch_size: int = 32,
        baseline_steps: int = 300,
        cache_dir: str | None = None,
        export: str | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.export = Path(export) if export else None
        self.energy_weight = float(energy_weight)
        self.forces_weight = float(forces_weight)
        if isinstance(stage_two, Mapping):
            stage_two = dict(stage_two)
            stage_two = StageTwo(**stage_two) if stage_two.pop("enabled", True) else None
        self.stage_two = stage_two
        self.eval_batch_size = int(eval_batch_size)
        self.baseline_steps = int(baseline_steps)
        self.cache_dir = cache_dir
        statistics = [x for s in statistics for x in (("scale", "shift") if s == "scale_shift" else (s,))]
        unknown = sorted(set(statistics) - set(_STATISTICS))
        if unknown:
            raise ValueError(f"task.statistics: unknown {unknown}; use some of {list(_STATISTICS)} (or scale_shift)")
        self.statistics = tuple(statistics)
        train_numbers: set[int] | None = None
        if statistics_from is not None and not (isinstance(statistics_from, str) and not statistics_from):
            train_numbers = self.fit_statistics(statistics_from)
        if align_features is not None:
            model.features = align_features
        self.teacher = teacher
        if isinstance(align, Alignment):
            self.alignment = align
        else:
            self.alignment = Alignment(dict(align) if align else {})
        if len(self.alignment):
            self.alignment.bind(model, teacher)
            self._fit_projector_widths()
            self._check_alignment(train_numbers)

    # -- set-up checks ---------------------------------------------------------------------------------------------
    def _teachers(self) -> list[Any]:
        out = [self.teacher] if self.teacher is not None else []
        for target in self.alignment.teacher_targets():
            enc = target.encoder if target.encoder is not None else self.teacher
            if enc is not None and all(enc is not o for o in out):
                out.append(enc)
        return out

    def _fit_projector_widths(self) -> None:
        """A teacher target at another layer than the teacher's default may be another width (ANI's AEV is 384-d, its
        hidden layer 96-d): rebuild such a term's MLP projector with the width of that layer (``TeacherTarget.dim``
        reports the default layer's)."""
        for term in self.alignment.terms.values():
            target, proj = term.target, term.projector
            if not isinstance(target, TeacherTarget) or target.layer is None or target.mode != "tokens":
                continue
            enc = target.encoder if target.encoder is not None else self.teacher
            want = int(enc.feature_dim(target.layer))
            if isinstance(proj, ProjectorMLP) and proj.out_dim != want:
                linears = [m for m in proj.net if isinstance(m, torch.nn.Linear)]
                hidden = linears[0].out_features if len(linears) > 1 else want
                term.projector = ProjectorMLP(proj.in_dim, want, hidden_dim=hidden, num_layers=len(linears))

    def _check_alignment(self, train_numbers: set[int] | None) -> None:
        """Refuse l >= 1 student channels aligned to an invariant teacher, and a teacher missing a data element."""
        for name, term in self.alignment.terms.items():
            target = term.target
            if not isinstance(target, TeacherTarget):
                continue
            enc = target.encoder if target.encoder is not None else self.teacher
            inner = getattr(enc, "encoder", enc)
            if getattr(inner, "invariant", True) and self.model.equivariant_at(term.layer):
                raise ValueError(
                    f"alignment term {name!r}: the student's features at layer {term.layer} hold l >= 1 (equivariant) "
                    f"channels but the teacher {type(inner).__name__} is rotation invariant, so the loss would depend "
                    "on the molecule's orientation. Use task.align_features=norms (an invariant contraction: scalars "
                    "plus per-irrep norms) or task.align_features=scalars"
                )
        numbers = train_numbers if train_numbers is not None else set(self.model.z_table)
        for enc in self._teachers():
            check_teacher_elements(
                enc, sorted(numbers), "the training data" if train_numbers else "the model's z_table"
            )

    def fit_statistics(
        self, source: str | os.PathLike | Mapping[str, Any] | DataModule | AtomsDataset
    ) -> set[int] | None:
        """Fit the chosen statistics (``statistics``) on the training structures of ``source`` (see
        ``statistics_from``) and set them on the model; returns the training split's atomic numbers."""
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
                return None
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
        structures = ds.structures
        numbers = {int(z) for s in structures for z in s.numbers}
        unknown = sorted(numbers - set(self.model.z_table))
        if unknown:
            raise StructureError(f"the training data holds atomic numbers {unknown} not in the model's z_table")
        if not self.statistics:
            return numbers
        e0 = fit_atomic_energies(structures, self.model.z_table)
        scale, shift = fit_scale_shift(structures, self.model.z_table, e0)
        neighbours = None
        if "avg_num_neighbors" in self.statistics:
            neighbours = float(np.mean([g.edge_index.shape[1] / max(1, g.numbers.numel()) for g in ds.graphs]))
        self.model.set_statistics(
            e0 if "e0s" in self.statistics else None,
            scale if "scale" in self.statistics else None,
            shift if "shift" in self.statistics else None,
            None if neighbours is None else max(neighbours, 1.0),
        )
        return numbers

    # -- training --------------------------------------------------------------------------------------------------
    def loss_weights(self, step: int) -> tuple[float, float]:
        if self.stage_two is None:
            return self.energy_weight, self.forces_weight
        return self.stage_two.weights(step, self.energy_weight, self.forces_weight)

    def forward(self, batch: GraphBatch, step: int) -> dict[str, Tensor]:
        if batch.energy is None or batch.forces is None:
            raise StructureError(f"batch with ids {batch.ids[:3]}...: training needs energy and forces labels")
        layers = self.alignment.student_layers()
        out, feats = self.model.forward_intermediates(batch, layers, training=True)
        w_e, w_f = self.loss_weights(step)
        result = energy_forces_loss(out["energy"], out["forces"], batch.energy, batch.forces, batch.num_atoms, w_e, w_f)
        with torch.no_grad():
            result["mae/forces"] = (out["forces"] - batch.forces.to(out["forces"].dtype)).abs().mean()
            result["mae/energy_per_atom"] = (
                (out["energy"] - batch.energy.to(out["energy"].dtype)).abs() / batch.num_atoms
            ).mean()
        if layers:
            # projectors are float32; a float64 force field's features are cast (their gradients flow back)
            features = {k: t.with_x(t.x.float()) for k, t in zip(layers, feats, strict=True)}
            ctx = AlignContext(batch=batch, features=features, device=batch.positions.device)
            align_loss, logs = self.alignment(ctx, step)
            if align_loss is not None:
                result["loss"] = result["loss"] + align_loss
            result.update({k: v.detach() for k, v in logs.items()})
        result["loss/energy"] = result["loss/energy"].detach()
        result["loss/forces"] = result["loss/forces"].detach()
        return result

    def on_step_end(self, step: int) -> None:
        self.alignment.on_step_end(self.model)

    # -- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, data: DataModule, out_dir: str | os.PathLike, step: int) -> dict[str, float]:
        """Energy/force errors on the validation set and a training subset, a parity plot, a JSON file, and per
        alignment term its validation cosine against its floors (``align/<term>/val_cos``, ``.../fit_real``,
        ``.../floor_shuffled``, ``.../floor_element_mean``)."""
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
            layers = self.alignment.student_layers() if name == "val" else []
            p = predict(self.model, ds, self.eval_batch_size, layers=layers)
            ref = collate_graphs([ds[i] for i in range(len(ds))])
            n = ref.num_atoms
            for k, v in prediction_metrics(p["energy"], p["forces"], ref.energy, ref.forces, n).items():
                metrics[f"{name}/{k}"] = v
            # the weighted training loss on this set (mace's validation loss, what ReduceLROnPlateau watches)
            w_e, w_f = self.loss_weights(step)
            loss = energy_forces_loss(p["energy"], p["forces"], ref.energy, ref.forces, n, w_e, w_f)["loss"]
            metrics[f"{name}/loss"] = float(loss)
            mean_e = float((ref.energy / n).mean())
            plot[name] = {
                "true_e": (ref.energy / n - mean_e).numpy(),
                "pred_e": (p["energy"] / n - mean_e).numpy(),
                "true_f": ref.forces.reshape(-1).numpy(),
                "pred_f": p["forces"].reshape(-1).numpy(),
            }
            if layers:
                metrics.update(self._alignment_metrics(p["features"], ref, step))
        _parity_plot(out_dir / f"parity_step{step:08d}.png", plot)
        if self.export is not None:
            save_mace_model(self.model, self.export)
            print(f"[molecular] exported the model to {self.export} (step {step})", flush=True)
        record = {"step": step, "metrics": metrics, "sets": {k: len(v) for k, v in sets.items()}}
        tmp = out_dir / f"eval_step{step:08d}.json.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out_dir / f"eval_step{step:08d}.json")
        return metrics

    @torch.no_grad()
    def _target_tokens(self, term: AlignmentTerm, ref: GraphBatch, device: torch.device) -> TokenSet:
        parts = []
        for start in range(0, ref.num_graphs, self.eval_batch_size):
            sub = ref.select(list(range(start, min(ref.num_graphs, start + self.eval_batch_size)))).to(device)
            ctx = AlignContext(batch=sub, features={}, device=device)
            parts.append(term.target.tokens(ctx).to("cpu"))
        return TokenSet.cat_items(parts)

    def _alignment_metrics(self, feats: dict[int, TokenSet], ref: GraphBatch, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, term in self.alignment.terms.items():
            if not isinstance(term.target, TeacherTarget) or term.weight_at(step) == 0.0 and step > 0:
                continue
            device = next(term.parameters(), torch.empty(0)).device
            student = feats[term.layer]
            target = self._target_tokens(term, ref, device)
            with torch.no_grad():
                pred = term.projector(student.x.to(device)).cpu()
                out[f"align/{name}/val_cos"] = float(token_cosine(student.with_x(pred), target).mean())
            if self.baseline_steps > 0:
                with torch.enable_grad():
                    floors = alignment_floors(student.x, target.x, ref.numbers, steps=self.baseline_steps)
                out[f"align/{name}/fit_real"] = floors["fit_real"]
                out[f"align/{name}/floor_shuffled"] = floors["fit_shuffled"]
                out[f"align/{name}/floor_element_mean"] = floors["group_mean"]
        return out
