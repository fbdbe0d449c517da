"""Conformer generation by flow matching on coordinates (ET-Flow's recipe), optionally aligned (conformer REPA).

The task of ET-Flow (Hassan et al. 2024, ``shenoynikhil/ETFlow``): given the molecular graph, learn the velocity
from a prior (the harmonic bond-graph prior, or an isotropic Gaussian) to reference conformers, coordinates kept at
zero centre of mass. Training is :class:`~molecular.flows.paths.ConformerPath` on ``unirep.flow.FlowMatching``:
one time per molecule, the prior sample Kabsch-aligned to the data conformer, bridge noise ``0.1 sqrt(t (1 - t))``
and the per-molecule L2-norm loss (each switchable; switched off it is ``FlowMatching.objective`` itself).
Sampling integrates the learned ODE with ``unirep.flow.sample_ode`` and the zero-CoM projection after every step,
then corrects chirality post hoc (ET-Flow's ``parity_switch: post_hoc``, :func:`correct_chirality`).
The SDE sampler takes its score from ``velocity_to_score``, which holds for an isotropic Gaussian prior paired
independently with the data; it is refused by name under the harmonic prior, Kabsch-aligned pairs or bridge noise.

Generated structures are written as SDF/extxyz and evaluated as torsional diffusion does (COV/MAT recall and
precision on heavy atoms, 2 generated per reference conformer), plus validity (bond graph kept, specified stereo
kept, sanitises to the same isomeric SMILES) and, optionally, GFN2-xTB energies relative to the reference minimum.

``conformer_repa`` (the MACE-REPA paper, "Unifying Force Prediction and Molecular Conformation Generation Through
Representation Alignment") adds :class:`unirep.align.Alignment` terms (``configs/align/conformer_repa.yaml``): an
intermediate per-atom layer of the velocity network, projected, pulled towards a frozen atomistic teacher's
per-atom features of the *clean* structure, as REPA (Yu et al. 2025, ``sihyun-yu/REPA``) does with DINOv2 patch
tokens of the clean image. The teacher sees the graph batch itself and builds its own neighbour list only when its
feature cache misses (``FrozenEncoder``; precompute with ``unirep-features``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
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
    featurize,
    mol_from_smiles,
    rmsd_matrix,
    validity_stats,
    with_coordinates,
    write_extxyz,
    write_sdf,
    xtb_energy,
)
from molecular.conformers.stereo import correct_chirality
from molecular.data import AtomicGraph, GraphBatch, Structure
from unirep.align import AlignContext, Alignment, AlignmentTerm
from unirep.flow import FlowMatching, sample_ode, sample_sde
from unirep.tokens import TokenSet
from unirep.train import Task

from .egnn import remove_mean
from .paths import ConformerPath
from .prior import GaussianPrior, HarmonicPrior

__all__ = ["ConformerFlowTask", "LazyGraphBatch", "evaluate_conformers", "records_from_smiles", "SAMPLERS"]

SAMPLERS = ("euler", "heun", "sde")


@dataclass
class LazyGraphBatch(GraphBatch):
    """A :class:`GraphBatch` whose radius graph is built per structure only when a consumer asks for it.

    The teacher of conformer REPA receives this view of the training batch: a ``FrozenEncoder`` answers cache hits
    without touching the structures, and only the structures it has to compute (cache misses) get a neighbour
    list (``graph(i)``, used by ``regraph`` / ``select``), instead of a radius graph built for the whole batch on
    every step.
    """

    lazy_r_max: float = 5.0

    @classmethod
    def of(cls, batch: GraphBatch, r_max: float) -> LazyGraphBatch:
        return cls(**{f.name: getattr(batch, f.name) for f in fields(batch)}, lazy_r_max=r_max)

    def graph(self, i: int) -> AtomicGraph:
        if self.edge_index is not None:
            return super().graph(i)
        a, b = int(self.ptr[i]), int(self.ptr[i + 1])
        pos = self.positions[a:b].detach().cpu().double().numpy()
        s = Structure(self.numbers[a:b].cpu().numpy(), pos, id=self.ids[i] if self.ids else "")
        g = AtomicGraph.from_structure(s, self.lazy_r_max)
        return replace(
            g, **{f.name: v.to(self.positions.device) for f in fields(g) if isinstance(v := getattr(g, f.name), Tensor)}
        )


def records_from_smiles(smiles: Sequence[str], what: str = "sample.smiles") -> list[MoleculeRecord]:
    """Graph-only records (no reference conformers) of SMILES strings; a bad one stops with its text and position."""
    out = []
    for i, smi in enumerate(smiles):
        try:
            template = mol_from_smiles(smi)
            types, feats, bidx, btyp = featurize(template, smi)
        except ValueError as err:
            raise ValueError(f"{what}[{i}] = {smi!r} (position {i} of {len(smiles)}): {err}") from None
        pos = torch.zeros(1, template.GetNumAtoms(), 3)  # placeholder: only the graph and atom order are used
        out.append(MoleculeRecord(smi, template, types, feats, bidx, btyp, pos))
    return out


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=2.0)


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
    for key in ("valid_graph", "valid_stereo", "valid_smiles", "energy_rel_median"):
        vals = [s[key] for s in per_mol if key in s]
        if vals:
            agg[key] = float(np.mean(vals))
    return agg, rows


class ConformerFlowTask(Task):
    """Flow matching on zero-CoM coordinates conditioned on the molecular graph (ET-Flow), optionally aligned.

    Args:
        model: the velocity network (:class:`EquivariantVelocityNet` or :class:`EquivariantTransformer`), with
            ``forward_intermediates(batch, x_t, t, indices) -> (v, list[TokenSet])``.
        prior: ``GaussianPrior`` / ``HarmonicPrior`` (a built part), or ``"gaussian"`` / ``"harmonic"``.
        time_dist, time_mean, time_std, time_shift: ``unirep.flow.FlowMatching``'s time distribution and noise-time
            shift (the shift is also used on the sampling grid).
        align_prior, bridge_noise, loss: ET-Flow's Kabsch-aligned prior, bridge noise scale and loss
            (:class:`~molecular.flows.paths.ConformerPath`).
        align: alignment terms by name (``configs/align/*.yaml``, e.g. ``conformer_repa``), run by one
            :class:`unirep.align.Alignment`; a teacher target without an encoder uses ``teacher``.
        teacher: frozen atomistic encoder of the clean structure (a ``FrozenEncoder``; ``encode(batch) -> TokenSet``).
        teacher_r_max: cutoff (Å) of the neighbour list built for a structure the teacher has to compute
            (:class:`LazyGraphBatch`; the teacher then applies its own cutoff).
        chirality: ``"post_hoc"`` (reflect samples whose tetrahedral centres mostly disagree with the SMILES, as
            ET-Flow) or ``"none"``.
        sampler: ``"euler"`` / ``"heun"`` ODE, or ``"sde"`` (Gaussian prior without Kabsch pairs or bridge noise only);
            ``sample_steps`` steps.
        samples_per_ref: generated conformers per reference conformer in evaluation (2 in the anchors).
        eval_max_molecules: cap on held-out molecules evaluated (evaluation cost grows with the square of K).
        delta: COV threshold in Å; ``None`` chooses 0.5 / 0.75 by molecule size.
        eval_energies: also compute GFN2-xTB energies of generated structures (slower).
        max_atoms_per_batch: generation batch size in atoms.
        sample_smiles: molecules ``sample`` generates for when called without ``smiles``.
        progress: progress bars while sampling (``sample``; evaluation stays quiet).
    """

    def __init__(
        self,
        model: nn.Module,
        prior: GaussianPrior | HarmonicPrior | str = "harmonic",
        time_dist: str = "uniform",
        time_mean: float = 0.0,
        time_std: float = 1.0,
        time_shift: float = 1.0,
        align_prior: bool = True,
        bridge_noise: float = 0.1,
        loss: str = "l2",
        align: Mapping[str, AlignmentTerm] | Alignment | None = None,
        teacher: nn.Module | None = None,
        teacher_r_max: float = 5.0,
        chirality: str = "post_hoc",
        sampler: str = "euler",
        sample_steps: int = 50,
        samples_per_ref: int = 2,
        eval_max_molecules: int = 20,
        delta: float | None = None,
        eval_energies: bool = False,
        max_atoms_per_batch: int = 4096,
        sample_smiles: Sequence[str] = ("CCO", "CC(=O)OC"),
        progress: bool = True,
    ):
        super().__init__()
        self.model = model
        if isinstance(prior, str):
            if prior not in ("gaussian", "harmonic"):
                raise ValueError(f"unknown prior {prior!r}: use 'gaussian' or 'harmonic' (or pass a prior object)")
            prior = HarmonicPrior() if prior == "harmonic" else GaussianPrior()
        self.prior = prior
        self.time_shift = time_shift
        flow = FlowMatching(time_dist, time_mean, time_std, shift=time_shift)
        self.path = ConformerPath(flow, align_prior=align_prior, bridge_noise=bridge_noise, loss=loss)
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.teacher, self.teacher_r_max = teacher, teacher_r_max
        self.alignment = align if isinstance(align, Alignment) else Alignment(dict(align) if align else None)
        self.alignment.bind(model, teacher=teacher)
        self._layers = self.alignment.student_layers()
        if chirality not in ("post_hoc", "none"):
            raise ValueError(f"unknown chirality {chirality!r}: use 'post_hoc' (ET-Flow) or 'none'")
        self.chirality = chirality
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}: use one of {SAMPLERS}")
        self.sampler, self.sample_steps = sampler, sample_steps
        self.check_sampler(sampler)
        self.samples_per_ref, self.eval_max_molecules = samples_per_ref, eval_max_molecules
        self.delta, self.eval_energies, self.max_atoms_per_batch = delta, eval_energies, max_atoms_per_batch
        self.sample_smiles = list(sample_smiles)
        self.progress = progress
        self.last_flips = 0  # samples reflected by the chirality correction in the last generate()

    def check_sampler(self, sampler: str) -> None:
        """Refuse the SDE where its score (``unirep.flow.velocity_to_score``) is wrong for this path."""
        if sampler != "sde":
            return
        why = []
        if not isinstance(self.prior, GaussianPrior):
            why.append(f"the prior is {type(self.prior).__name__} (the score assumes an isotropic Gaussian prior)")
        if self.path.align_prior:
            why.append("prior samples are Kabsch-aligned to the data (not independent of it)")
        if self.path.bridge_noise > 0:
            why.append("the path carries bridge noise")
        if why:
            raise ValueError(
                "sampler='sde' takes its score from unirep.flow.velocity_to_score, which is only right for an "
                f"isotropic Gaussian prior paired independently with the data; here {'; '.join(why)}. Use "
                "sampler=euler or sampler=heun, or train with prior=gaussian, align_prior=false, bridge_noise=0"
            )

    # -- training -------------------------------------------------------------------------------------------
    def forward(self, batch, step: int = 0) -> dict[str, Tensor]:
        bidx, n_graphs = batch.batch, batch.num_graphs
        x = remove_mean(batch.positions, bidx, n_graphs)  # clean conformer, zero CoM [T, 3]
        eps = self.prior.sample(batch, dtype=x.dtype)  # zero-CoM prior sample [T, 3]
        layers = self._layers

        def model_fn(sample):
            out, feats = self.model.forward_intermediates(batch, sample.x_t, sample.t_in, layers)
            return out, dict(zip(layers, feats, strict=True))

        res = self.path.objective(x, model_fn, eps, bidx, n_graphs)
        logs = {"loss/flow": res.loss.detach()}
        loss = res.loss
        if len(self.alignment):
            view = LazyGraphBatch.of(batch, self.teacher_r_max)  # neighbour lists only for teacher cache misses
            ctx = AlignContext(view, res.aux, t=res.sample.t, rerun=self._rerun(batch, res.sample), device=x.device)
            align_loss, align_logs = self.alignment(ctx, step)
            if align_loss is not None:
                loss = loss + align_loss
            logs.update(align_logs)
        logs["loss"] = loss
        return logs

    def _rerun(self, batch, sample) -> Callable[[nn.Module, Tensor, list[int]], list[TokenSet]]:
        def rerun(module: nn.Module, t: Tensor, indices: list[int]) -> list[TokenSet]:
            return module.forward_intermediates(batch, sample.at(t), t[batch.batch], indices)[1]

        return rerun

    def on_step_end(self, step: int) -> None:
        self.alignment.on_step_end(self.model)

    # -- sampling -------------------------------------------------------------------------------------------
    # The sampled state is [T, 3] coordinates here; a subclass may extend it with per-atom channels [T, 3 + L].
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

    def _decode(self, batch, state: Tensor) -> Tensor:
        """Coordinates ``[T, 3]`` of a final sampled state (a latent flow decodes here)."""
        return state[:, :3]

    def _integrate(self, batch, s1: Tensor, steps: int, sampler: str, gen: torch.Generator) -> Tensor:
        fn, project = self._velocity_fn(batch), self._project(batch)
        if sampler == "sde":
            return sample_sde(fn, s1, steps, shift=self.time_shift, project=project, generator=gen, batch_time=False)
        return sample_ode(fn, s1, steps, method=sampler, shift=self.time_shift, project=project, batch_time=False)

    @torch.no_grad()
    def generate(
        self,
        records: Sequence[MoleculeRecord],
        counts: Sequence[int],
        seed: int = 0,
        steps: int | None = None,
        sampler: str | None = None,
        progress: bool = False,
    ) -> list[np.ndarray]:
        """``counts[i]`` conformers of ``records[i]`` each: a list of ``[counts[i], N_i, 3]`` arrays (Å).

        ``steps`` / ``sampler`` override the task's for this call (few-step tables). Chirality is corrected post hoc
        when ``chirality="post_hoc"``; ``self.last_flips`` counts the reflected samples.
        """
        steps = self.sample_steps if steps is None else int(steps)
        sampler = self.sampler if sampler is None else sampler
        self.check_sampler(sampler)
        device = next(self.model.parameters()).device
        gen = torch.Generator().manual_seed(int(seed))
        out = [np.zeros((k, rec.num_atoms, 3)) for rec, k in zip(records, counts, strict=True)]
        was_training = self.model.training
        self.model.eval()
        batches = list(_generation_batches(records, counts, self.max_atoms_per_batch))
        for batch, owners in _progress(batches, len(batches), "sampling", progress):
            batch = batch.to(device)
            s1 = self._initial_state(batch, gen).to(device)
            x0 = self._decode(batch, self._integrate(batch, s1, steps, sampler, gen)).cpu().double().numpy()
            starts = np.concatenate([[0], np.cumsum(batch.num_atoms.cpu().numpy())])
            for g, (r, c) in enumerate(owners):
                out[r][c] = x0[starts[g] : starts[g + 1]]
        self.model.train(was_training)
        self.last_flips = 0
        if self.chirality == "post_hoc":
            for i, rec in enumerate(records):
                out[i], flipped = correct_chirality(rec.mol, out[i])
                self.last_flips += int(flipped.sum())
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
        metrics["conf/chirality_flipped"] = self.last_flips / max(1, sum(counts))
        return metrics

    def sample(
        self,
        out_dir: str | Path,
        num: int,
        seed: int,
        smiles: Sequence[str] | str | None = None,
        steps: int | None = None,
        sampler: str | None = None,
        formats: Sequence[str] = ("sdf", "extxyz"),
        **kwargs,
    ) -> dict:
        """Generate ``num`` conformers per molecule (``smiles``, default ``sample_smiles``).

        Writes ``conformers.sdf`` / ``conformers.extxyz`` (``formats``) and ``validity.json`` (per molecule: bond
        graph kept, stereo kept, same isomeric SMILES, chirality flips) under ``out_dir``; prints the per-molecule
        report; returns the paths and the overall shares. A bad SMILES stops before sampling with its text and
        position in the list.
        """
        if kwargs:
            raise ValueError(
                f"unknown sample options {sorted(kwargs)}: {type(self).__name__}.sample takes smiles=[...], steps, "
                "sampler, formats"
            )
        bad = [f for f in formats if f not in ("sdf", "extxyz")]
        if bad:
            raise ValueError(f"unknown output formats {bad}: use 'sdf' and/or 'extxyz'")
        smiles = self.sample_smiles if smiles is None else smiles
        smiles = [smiles] if isinstance(smiles, str) else list(smiles)
        records = records_from_smiles(smiles)
        t0 = time.perf_counter()
        generated = self.generate(records, [num] * len(records), seed, steps, sampler, progress=self.progress)
        seconds = time.perf_counter() - t0
        mols, props, report = [], [], []
        for rec, pos in zip(records, generated, strict=True):
            ok = [with_coordinates(rec.mol, p) for p in pos if np.isfinite(p).all()]
            mols += ok
            props += [{"smiles": rec.smiles, "sample": i} for i in range(len(ok))]
            report.append({"smiles": rec.smiles, "num": len(ok), "failed": len(pos) - len(ok), **validity_stats(ok)})
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        result: dict[str, Any] = {"num_structures": len(mols), "seconds_per_conformer": seconds / max(1, len(mols))}
        if "sdf" in formats:
            result["sdf"] = str(write_sdf(mols, out_dir / "conformers.sdf", props))
        if "extxyz" in formats:
            xyz = write_extxyz(mols, out_dir / "conformers.extxyz", [{"sample": p["sample"]} for p in props])
            result["extxyz"] = str(xyz)
        (out_dir / "validity.json").write_text(json.dumps(report, indent=1))
        print(f"{'molecule':<32s} {'n':>4s} {'graph':>6s} {'stereo':>6s} {'smiles':>6s}")
        for r in report:
            print(
                f"{r['smiles'][:32]:<32s} {r['num']:>4d} {r['valid_graph']:>6.2f} {r['valid_stereo']:>6.2f} "
                f"{r['valid_smiles']:>6.2f}"
            )
        result["validity"] = str(out_dir / "validity.json")
        result.update(validity_stats(mols))
        return result

    def extra_repr(self) -> str:
        return f"path={self.path!r}, chirality={self.chirality!r}, sampler={self.sampler!r}"
