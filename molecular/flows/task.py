"""Conformer generation by flow matching on coordinates, with optional representation alignment (conformer REPA).

The task of ET-Flow (Hassan et al. 2024, ``shenoynikhil/ETFlow``): given the molecular graph, learn the velocity
from a prior (isotropic Gaussian or the harmonic bond-graph prior) to reference conformers with the core
flow-matching loss (``unirep.flow``, t = 0 data, t = 1 noise), coordinates kept at zero centre of mass. Sampling
integrates the learned ODE (or SDE) with ``unirep.flow`` and the zero-CoM projection after every step; generated
structures are written as SDF/extxyz and evaluated as torsional diffusion does (COV/MAT recall and precision on
heavy atoms, 2 generated per reference conformer), plus validity (bond graph kept, sanitises to the same SMILES)
and, optionally, GFN2-xTB energies relative to the reference minimum.

``conformer_repa`` (the MACE-REPA paper, "Unifying Force Prediction and Molecular Conformation Generation Through
Representation Alignment") adds the core ``Aligner`` between an intermediate per-atom layer of the velocity network
and a frozen atomistic teacher's per-atom features of the *clean* structure, as REPA (Yu et al. 2025,
``sihyun-yu/REPA``) does with DINOv2 patch tokens of the clean image.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rdkit import Chem
from torch import Tensor, nn

from molecular.conformers import (
    MoleculeRecord,
    aggregate_stats,
    collate_molecules,
    coverage_stats,
    default_delta,
    make_record,
    rmsd_matrix,
    validity_stats,
    with_coordinates,
    write_extxyz,
    write_sdf,
    xtb_energy,
)
from unirep.align import Aligner, ProjectorMLP, StopAtStep
from unirep.encoders import FrozenEncoder
from unirep.flow import flow_matching_loss, interpolate, sample_ode, sample_sde, sample_time, shift_time
from unirep.tokens import TokenSet
from unirep.train import Task

from .egnn import EquivariantVelocityNet, remove_mean
from .prior import GaussianPrior, HarmonicPrior

__all__ = ["ConformerFlowTask", "teacher_tokens", "evaluate_conformers"]


def teacher_tokens(teacher: nn.Module, batch, r_max: float | None) -> TokenSet:
    """Per-atom features of the clean structures of ``batch`` from a frozen teacher.

    The teacher receives ``batch.radius_graph(r_max)`` (the batch with a radius graph, the input of the project's
    atomistic encoders) when ``r_max`` is given, else the batch itself; a ``FrozenEncoder`` also gets the
    item ids (``"<smiles>#<conformer>"``) so its features are cached per reference conformer.
    """
    sample = batch.radius_graph(r_max) if r_max is not None else batch
    with torch.no_grad():
        if isinstance(teacher, FrozenEncoder) and batch.ids:
            out = teacher.encode(sample, ids=batch.ids)
        else:
            out = teacher.encode(sample)
    if not isinstance(out, TokenSet):
        out = TokenSet(out, batch.batch, None, batch.num_graphs)
    if out.x.shape[0] != batch.batch.shape[0]:
        raise ValueError(
            f"teacher returned {out.x.shape[0]} per-atom features for {batch.batch.shape[0]} atoms: the teacher must "
            "keep every atom (hydrogens included) in the order of the batch"
        )
    return TokenSet(out.x.to(batch.positions.device).float(), batch.batch, None, batch.num_graphs)


def _generation_batches(records: Sequence[MoleculeRecord], counts: Sequence[int], max_atoms: int):
    """Yield ``(GraphBatch, [(record index, copy index), ...])`` with at most ``max_atoms`` atoms per batch."""
    items, owners, atoms = [], [], 0
    for r, (rec, k) in enumerate(zip(records, counts, strict=True)):
        for c in range(k):
            if items and atoms + rec.num_atoms > max_atoms:
                yield collate_molecules(items), owners
                items, owners, atoms = [], [], 0
            items.append((rec, rec.conformers[0], r, c))
            owners.append((r, c))
            atoms += rec.num_atoms
    if items:
        yield collate_molecules(items), owners


def _safe_energy(mol) -> float:
    try:
        return xtb_energy(mol)
    except Exception:  # SCF failure on a broken structure: no energy, not a crash of the evaluation
        return float("nan")


def evaluate_conformers(
    records: Sequence[MoleculeRecord],
    generated: Sequence[np.ndarray],
    delta: float | None = None,
    energies: bool = False,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """COV/MAT (recall/precision), validity and (optionally) GFN2-xTB energies of generated ensembles.

    ``generated[i]`` is ``[k_i, N_i, 3]`` for ``records[i]``. Returns the aggregate over molecules and the
    per-molecule rows. ``delta`` defaults to 0.5 Å for QM9-size molecules and 0.75 Å for larger ones.
    """
    rows, per_mol, mols_all, n_fail = [], [], [], 0
    for rec, pos in zip(records, generated, strict=True):
        refs = [with_coordinates(rec.mol, c.numpy()) for c in rec.conformers.double()]
        try:
            gens = [with_coordinates(rec.mol, p) for p in pos]
        except ValueError:  # non-finite coordinates: a failed generation counts as coverage 0 (anchor)
            n_fail += 1
            rows.append({"smiles": rec.smiles, "failed": True})
            continue
        d = delta if delta is not None else default_delta(Chem.RemoveHs(rec.mol).GetNumAtoms())
        rmsd = rmsd_matrix(refs, gens)
        s = coverage_stats(rmsd, d)
        s.update(validity_stats(gens))
        if energies:
            e_ref = min(xtb_energy(m) for m in refs)
            e_gen = np.array([_safe_energy(m) for m in gens])
            # eV above the reference minimum; structures where GFN2-xTB fails (overlapping atoms) are left out
            s["energy_rel_median"] = float(np.nanmedian(e_gen - e_ref)) if np.isfinite(e_gen).any() else float("nan")
        per_mol.append(s)
        mols_all.extend(gens)
        rows.append({"smiles": rec.smiles, "delta": d, "n_ref": len(refs), "n_gen": len(gens), **s})
    agg = aggregate_stats(per_mol, n_fail)
    for key in ("valid_graph", "valid_smiles", "energy_rel_median"):
        vals = [s[key] for s in per_mol if key in s]
        if vals:
            agg[key] = float(np.mean(vals))
    return agg, rows


class ConformerFlowTask(Task):
    """Flow matching on zero-CoM coordinates conditioned on the molecular graph (ET-Flow), optionally aligned.

    Args:
        model: the velocity network (:class:`EquivariantVelocityNet`).
        prior: ``GaussianPrior`` / ``HarmonicPrior`` (a built part), or ``"gaussian"`` / ``"harmonic"``.
        time_dist, time_mean, time_std, time_shift: training-time distribution (``unirep.flow.sample_time``)
            and noise-time shift (``unirep.flow.shift_time``), the shift also used on the sampling grid.
        teacher: frozen atomistic encoder of the clean structure (``encode(sample) -> TokenSet`` and ``dim``);
            enables conformer REPA: an MLP projector (``projector_hidden`` wide, ``projector_layers`` Linear layers,
            REPA's shape) maps the aligned layer to the teacher's width and ``unirep.align.Aligner`` compares them.
        align_layer: which EGNN layer's node features are aligned (1-based, as ``forward_intermediates``).
        align_weight, align_loss, align_stop_step: REPA's λ, the loss name, an optional step where λ drops to 0.
        teacher_r_max: radius graph (Å) built for the teacher's input; ``None`` passes the batch as it is.
        sampler: ``"euler"`` / ``"heun"`` ODE or ``"sde"``; ``sample_steps`` steps.
        samples_per_ref: generated conformers per reference conformer in evaluation (2 in the anchors).
        eval_max_molecules: cap on held-out molecules evaluated (evaluation cost grows with the square of K).
        delta: COV threshold in Å; ``None`` chooses 0.5 / 0.75 by molecule size.
        eval_energies: also compute GFN2-xTB energies of generated structures (slower).
        max_atoms_per_batch: generation batch size in atoms.
        sample_smiles: molecules ``sample`` generates for when called without ``smiles``.
    """

    def __init__(
        self,
        model: EquivariantVelocityNet,
        prior: GaussianPrior | HarmonicPrior | str = "harmonic",
        time_dist: str = "uniform",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        time_shift: float = 1.0,
        teacher: nn.Module | None = None,
        align_layer: int = 2,
        align_weight: float = 0.5,
        align_loss: str = "neg_cosine",
        align_stop_step: int | None = None,
        projector_hidden: int = 256,
        projector_layers: int = 3,
        teacher_r_max: float | None = 5.0,
        sampler: str = "euler",
        sample_steps: int = 50,
        samples_per_ref: int = 2,
        eval_max_molecules: int = 20,
        delta: float | None = None,
        eval_energies: bool = False,
        max_atoms_per_batch: int = 4096,
        sample_smiles: Sequence[str] = ("CCO", "CC(=O)OC"),
    ):
        super().__init__()
        self.model = model
        if isinstance(prior, str):
            if prior not in ("gaussian", "harmonic"):
                raise ValueError(f"unknown prior {prior!r}: use 'gaussian' or 'harmonic' (or pass a prior object)")
            prior = HarmonicPrior() if prior == "harmonic" else GaussianPrior()
        self.prior = prior
        self.time_dist, self.time_mean, self.time_std, self.time_shift = time_dist, time_mean, time_std, time_shift
        self.aligner: Aligner | None = None
        self.teacher = teacher
        if teacher is not None:
            if not 0 <= align_layer <= model.num_layers:
                raise ValueError(f"align_layer={align_layer} is outside the network's layers 0..{model.num_layers}")
            teacher.requires_grad_(False)
            teacher.eval()
            schedule = StopAtStep(align_weight, align_stop_step) if align_stop_step is not None else None
            projector = ProjectorMLP(
                model.dim, int(teacher.dim), hidden_dim=projector_hidden, num_layers=projector_layers
            )
            self.aligner = Aligner(projector, loss=align_loss, weight=align_weight, schedule=schedule)
        self.align_layer = align_layer
        self.teacher_r_max = teacher_r_max
        if sampler not in ("euler", "heun", "sde"):
            raise ValueError(f"unknown sampler {sampler!r}: use 'euler', 'heun' or 'sde'")
        self.sampler, self.sample_steps = sampler, sample_steps
        self.samples_per_ref, self.eval_max_molecules = samples_per_ref, eval_max_molecules
        self.delta, self.eval_energies, self.max_atoms_per_batch = delta, eval_energies, max_atoms_per_batch
        self.sample_smiles = list(sample_smiles)

    # -- training -------------------------------------------------------------------------------------------
    def forward(self, batch, step: int = 0) -> dict[str, Tensor]:
        bidx, n_graphs = batch.batch, batch.num_graphs
        x = remove_mean(batch.positions, bidx, n_graphs)  # clean conformer, zero CoM [T, 3]
        eps = self.prior.sample(batch, dtype=x.dtype)  # zero-CoM prior sample [T, 3]
        t = sample_time(n_graphs, self.time_dist, self.time_mean, self.time_std, device=x.device)
        if self.time_shift != 1.0:
            t = shift_time(t, self.time_shift)
        t_atom = t[bidx]  # one time per molecule, broadcast to its atoms [T]
        x_t = interpolate(x, eps, t_atom)
        indices = (self.align_layer,) if self.aligner is not None else ()
        v, _, feats = self.model.forward_intermediates(batch, x_t, t_atom, indices=indices)
        loss_flow = flow_matching_loss(v, x, eps)
        out = {"loss/flow": loss_flow.detach()}
        loss = loss_flow
        if self.aligner is not None:
            target = teacher_tokens(self.teacher, batch, self.teacher_r_max)
            student = TokenSet(feats[self.align_layer], bidx, None, n_graphs)
            a = self.aligner(student, target, step)
            loss = loss + a["loss"]
            out.update(
                {"loss/align": a["raw"].detach(), "align/cos": a["cos"], "align/weight": torch.tensor(a["weight"])}
            )
        out["loss"] = loss
        return out

    # -- sampling -------------------------------------------------------------------------------------------
    # The sampled state is [T, 3] coordinates here; LatentFlowTask extends it with per-atom latents [T, 3 + L].
    def _initial_state(self, batch, generator: torch.Generator) -> Tensor:
        return self.prior.sample(batch, generator=generator, dtype=torch.float32)

    def _velocity_fn(self, batch) -> Callable[[Tensor, Tensor], Tensor]:
        def fn(x_t: Tensor, t: Tensor) -> Tensor:
            return self.model(batch, x_t, t)

        return fn

    def _project(self, batch) -> Callable[[Tensor], Tensor]:
        bidx, n_graphs = batch.batch, batch.num_graphs

        def project(s: Tensor) -> Tensor:
            # zero centre of mass of the coordinates after every step (latent channels, if any, untouched)
            return torch.cat([remove_mean(s[:, :3], bidx, n_graphs), s[:, 3:]], dim=1)

        return project

    @torch.no_grad()
    def generate(self, records: Sequence[MoleculeRecord], counts: Sequence[int], seed: int = 0) -> list[np.ndarray]:
        """``counts[i]`` conformers of ``records[i]`` each: a list of ``[counts[i], N_i, 3]`` arrays (Å)."""
        device = next(self.model.parameters()).device
        gen = torch.Generator().manual_seed(int(seed))
        out = [np.zeros((k, rec.num_atoms, 3)) for rec, k in zip(records, counts, strict=True)]
        was_training = self.model.training
        self.model.eval()
        for batch, owners in _generation_batches(records, counts, self.max_atoms_per_batch):
            batch = batch.to(device)
            s1 = self._initial_state(batch, gen).to(device)
            fn, project = self._velocity_fn(batch), self._project(batch)
            if self.sampler == "sde":
                s0 = sample_sde(fn, s1, self.sample_steps, shift=self.time_shift, project=project, generator=gen)
            else:
                s0 = sample_ode(fn, s1, self.sample_steps, method=self.sampler, shift=self.time_shift, project=project)
            x0 = s0[:, :3].cpu().double().numpy()
            starts = np.concatenate([[0], np.cumsum(batch.num_atoms.cpu().numpy())])
            for g, (r, c) in enumerate(owners):
                out[r][c] = x0[starts[g] : starts[g + 1]]
        self.model.train(was_training)
        return out

    def evaluate(self, data, out_dir: str | Path, step: int) -> dict[str, float]:
        """COV/MAT, validity (and energies) on the held-out molecules; generated SDF written under ``out_dir``."""
        ds = data.val if getattr(data, "val", None) is not None else data.train
        records = ds.records[: self.eval_max_molecules]
        counts = [self.samples_per_ref * rec.conformers.shape[0] for rec in records]
        t0 = time.perf_counter()
        generated = self.generate(records, counts, seed=step)
        gen_time = time.perf_counter() - t0
        agg, rows = evaluate_conformers(records, generated, self.delta, self.eval_energies)
        folder = Path(out_dir) / "eval" / f"step_{step:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        mols = [
            with_coordinates(rec.mol, p)
            for rec, pos in zip(records, generated, strict=True)
            for p in pos
            if np.isfinite(p).all()
        ]
        write_sdf(mols, folder / "generated.sdf")
        (folder / "per_molecule.json").write_text(json.dumps(rows, indent=1))
        metrics = {f"conf/{k}": v for k, v in agg.items()}
        metrics["conf/seconds_per_conformer"] = gen_time / max(1, sum(counts))
        return metrics

    def sample(
        self, out_dir: str | Path, num: int, seed: int, smiles: Sequence[str] | str | None = None, **kwargs
    ) -> dict:
        """Generate ``num`` conformers per molecule (``smiles``, default ``sample_smiles``) and write
        ``conformers.sdf`` and ``conformers.extxyz``; returns the file paths and the validity shares."""
        if kwargs:
            raise ValueError(f"unknown sample options {sorted(kwargs)}: ConformerFlowTask.sample takes smiles=[...]")
        smiles = self.sample_smiles if smiles is None else smiles
        smiles = [smiles] if isinstance(smiles, str) else list(smiles)
        # one ETKDG conformer only provides the graph template and atom order; its coordinates are not used
        records = [make_record(s, num_confs=1, max_confs=1) for s in smiles]
        generated = self.generate(records, [num] * len(records), seed)
        mols, props = [], []
        for rec, pos in zip(records, generated, strict=True):
            for i, p in enumerate(pos):
                if np.isfinite(p).all():
                    mols.append(with_coordinates(rec.mol, p))
                    props.append({"smiles": rec.smiles, "sample": i})
        out_dir = Path(out_dir)
        sdf = write_sdf(mols, out_dir / "conformers.sdf", props)
        xyz = write_extxyz(mols, out_dir / "conformers.extxyz", [{"sample": p["sample"]} for p in props])
        return {"sdf": str(sdf), "extxyz": str(xyz), "num_structures": len(mols), **validity_stats(mols)}
