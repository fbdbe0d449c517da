"""Small graph potentials trained in the project, exposing per-atom features per layer for convergence studies.

Two architecturally different message-passing networks, trained on the same labelled data:

- :class:`SchNet` (Schütt et al. 2017, "SchNet: A continuous-filter convolutional neural network"): invariant,
  continuous-filter convolutions; the interaction blocks are ``torch_geometric.nn.models.schnet.InteractionBlock``
  (anchor: pyg-team/pytorch_geometric ``torch_geometric/nn/models/schnet.py``).
- :class:`PaiNN` (Schütt, Unke & Gastegger 2021, "Equivariant message passing for the prediction of tensorial
  properties and molecular spectra"; anchor: atomistic-machine-learning/schnetpack ``nn/representation/painn``):
  scalar and vector features with equivariant message and update blocks.

Neighbour graphs come from ``molecular.data`` (matscipy neighbour lists), never from pyg-lib/torch-cluster.
Energies are sums of per-atom outputs; forces are ``-dE/dr`` by autograd. Each model's
``forward_intermediates(batch, indices) -> (out, tokens)`` returns energy (and forces) with the per-atom scalar
features after the embedding (index 0) and after every interaction block (1..L) from the same pass.

:class:`MoleculeSet` builds the data (rdkit conformers of SMILES, Gaussian displacements, GFN2-xTB labels,
cached on disk). Training is a recipe on the one Trainer (:class:`GraphNetTask`,
``unirep-train experiment=molecular/graphnet``), which exports a checkpoint; :class:`GraphNetEncoder` only loads it
(its held-out force MAE becomes its ``quality``) and, when it is missing, stops with the command that makes it.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from molecular.data import (
    AtomsDataset,
    GraphBatch,
    collate_graphs,
    fit_atomic_energies,
    label_structures,
    species_index,
    structures_from_smiles,
    thermal_displacements,
    z_lookup,
)
from molecular.models import energy_forces_loss
from unirep.intermediates import feature_take_indices, normalize_index
from unirep.splits import split_indices
from unirep.tokens import TokenSet
from unirep.train.data import DataModule, Task

__all__ = [
    "SchNet",
    "PaiNN",
    "MoleculeSet",
    "MoleculeSetData",
    "GraphNetTask",
    "evaluate_forces",
    "GraphNetEncoder",
    "graphnet_command",
]

log = logging.getLogger(__name__)


def _edges(batch: GraphBatch, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Edge vectors ``[E, 3]`` (receiver minus sender, with periodic shifts), lengths ``[E]``, edge_index."""
    snd, rcv = batch.edge_index
    vec = positions[rcv] - positions[snd] + batch.shifts.to(positions.dtype)
    return vec, vec.norm(dim=-1), batch.edge_index


def _cosine_cutoff(r: Tensor, r_cut: float) -> Tensor:
    return 0.5 * (torch.cos(math.pi * r / r_cut) + 1.0) * (r < r_cut)


class _Potential(nn.Module, abc.ABC):
    """Shared parts: atom-type embedding over a ``z_table``, energy readout, forces by autograd."""

    def __init__(self, z_table: Sequence[int], hidden: int, r_max: float):
        super().__init__()
        self.z_table = [int(z) for z in z_table]
        self.register_buffer("z_lookup", z_lookup(self.z_table), persistent=False)
        self.embedding = nn.Embedding(len(self.z_table), hidden)
        self.readout = nn.Sequential(nn.Linear(hidden, hidden // 2), nn.SiLU(), nn.Linear(hidden // 2, 1))
        self.hidden, self.r_max = hidden, float(r_max)
        # per-element reference energies and a scale, fitted on the training set (buffers: saved with the weights)
        self.register_buffer("atomic_energies", torch.zeros(len(self.z_table), dtype=torch.float64))
        self.register_buffer("scale", torch.ones((), dtype=torch.float64))

    def species(self, numbers: Tensor) -> Tensor:
        return species_index(self.z_lookup, numbers, self.z_table, owner=type(self).__name__)

    @abc.abstractmethod
    def layers(self, batch: GraphBatch, positions: Tensor) -> list[Tensor]:
        """Per-atom features ``[T, hidden]`` after the embedding and after each interaction block (1 + L tensors)."""

    @property
    def num_layers(self) -> int:
        """L, the number of interaction blocks (intermediates: 0 = embedding, 1..L)."""
        return len(getattr(self, "interactions", getattr(self, "messages", [])))

    def feature_dim(self, index: int) -> int:
        normalize_index(int(index), self.num_layers, type(self).__name__)
        return self.hidden

    def forward_intermediates(
        self, batch: GraphBatch, indices: int | Sequence[int] | None = None, compute_forces: bool = True
    ) -> tuple[dict[str, Tensor], list[TokenSet]]:
        """``(out, tokens)``: energy (and forces) and the per-atom scalar features at ``indices`` (0: the embedding,
        k: after interaction k, negative from the end; ``None``: all) from the same pass."""
        take = feature_take_indices(self.num_layers, indices, type(self).__name__)
        pos = batch.positions.to(self.embedding.weight.dtype)
        if compute_forces:
            pos = pos.detach().requires_grad_(True)
        with torch.enable_grad() if compute_forces else contextlib.nullcontext():
            feats = self.layers(batch, pos)
            atom_e = self.readout(feats[-1]).squeeze(-1).double() * self.scale
            atom_e = atom_e + self.atomic_energies[self.species(batch.numbers)]
            energy = torch.zeros(batch.num_graphs, dtype=atom_e.dtype, device=atom_e.device).index_add_(
                0, batch.batch, atom_e
            )
            out = {"energy": energy}
            if compute_forces:
                (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=self.training)
                out["forces"] = -grad.double()
        return out, [TokenSet(feats[k], batch.batch, batch.positions, batch.num_graphs) for k in take]

    def forward(self, batch: GraphBatch, compute_forces: bool = True) -> dict[str, Tensor]:
        """``energy[B]`` in eV and ``forces[T, 3]`` in eV/Å."""
        return self.forward_intermediates(batch, [], compute_forces)[0]


class SchNet(_Potential):
    """SchNet with torch_geometric's continuous-filter interaction blocks (residual updates, as in the paper)."""

    def __init__(
        self,
        z_table: Sequence[int] = (1, 6, 7, 8),
        hidden: int = 64,
        num_layers: int = 3,
        num_rbf: int = 32,
        r_max: float = 5.0,
    ):
        super().__init__(z_table, hidden, r_max)
        from torch_geometric.nn.models.schnet import GaussianSmearing, InteractionBlock

        self.rbf = GaussianSmearing(0.0, r_max, num_rbf)
        self.interactions = nn.ModuleList(InteractionBlock(hidden, num_rbf, hidden, r_max) for _ in range(num_layers))

    def layers(self, batch: GraphBatch, positions: Tensor) -> list[Tensor]:
        _, r, edge_index = _edges(batch, positions)
        h = self.embedding(self.species(batch.numbers))  # [T, F]
        attr = self.rbf(r)  # [E, num_rbf]
        out = [h]
        for block in self.interactions:
            h = h + block(h, edge_index, r, attr)
            out.append(h)
        return out


class _PaiNNMessage(nn.Module):
    def __init__(self, f: int, num_rbf: int, r_max: float):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(f, f), nn.SiLU(), nn.Linear(f, 3 * f))
        self.w = nn.Linear(num_rbf, 3 * f)
        self.f, self.r_max = f, r_max

    def forward(self, s: Tensor, v: Tensor, edge_index: Tensor, rbf: Tensor, r: Tensor, unit: Tensor):
        snd, rcv = edge_index
        x = self.phi(s)[snd] * self.w(rbf) * _cosine_cutoff(r, self.r_max)[:, None]  # [E, 3F]
        ds, dvv, dvs = x.split(self.f, dim=-1)  # [E, F] each
        dv = v[snd] * dvv[:, None, :] + unit[:, :, None] * dvs[:, None, :]  # [E, 3, F]
        s = s + torch.zeros_like(s).index_add_(0, rcv, ds)
        v = v + torch.zeros_like(v).index_add_(0, rcv, dv)
        return s, v


class _PaiNNUpdate(nn.Module):
    def __init__(self, f: int):
        super().__init__()
        self.U = nn.Linear(f, f, bias=False)  # mixes vector channels: no bias keeps it equivariant
        self.V = nn.Linear(f, f, bias=False)
        self.mlp = nn.Sequential(nn.Linear(2 * f, f), nn.SiLU(), nn.Linear(f, 3 * f))
        self.f = f

    def forward(self, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        uv, vv = self.U(v), self.V(v)  # [T, 3, F]
        vnorm = torch.sqrt((vv**2).sum(1) + 1e-8)  # [T, F]; eps keeps the gradient finite at v = 0
        a_vv, a_sv, a_ss = self.mlp(torch.cat([s, vnorm], -1)).split(self.f, -1)
        return s + a_sv * (uv * vv).sum(1) + a_ss, v + a_vv[:, None, :] * uv


class PaiNN(_Potential):
    """PaiNN: scalar ``s[T, F]`` and vector ``v[T, 3, F]`` features; the exposed per-layer features are ``s``."""

    def __init__(
        self,
        z_table: Sequence[int] = (1, 6, 7, 8),
        hidden: int = 64,
        num_layers: int = 3,
        num_rbf: int = 20,
        r_max: float = 5.0,
    ):
        super().__init__(z_table, hidden, r_max)
        self.num_rbf = num_rbf
        self.messages = nn.ModuleList(_PaiNNMessage(hidden, num_rbf, r_max) for _ in range(num_layers))
        self.updates = nn.ModuleList(_PaiNNUpdate(hidden) for _ in range(num_layers))

    def layers(self, batch: GraphBatch, positions: Tensor) -> list[Tensor]:
        vec, r, edge_index = _edges(batch, positions)
        unit = vec / r[:, None]
        n = torch.arange(1, self.num_rbf + 1, device=r.device, dtype=r.dtype)
        rbf = torch.sin(n * math.pi * r[:, None] / self.r_max) / r[:, None]  # [E, num_rbf], PaiNN's sinc basis
        s = self.embedding(self.species(batch.numbers))
        v = s.new_zeros(s.shape[0], 3, s.shape[1])
        out = [s]
        for msg, upd in zip(self.messages, self.updates, strict=True):
            s, v = msg(s, v, edge_index, rbf, r, unit)
            s, v = upd(s, v)
            out.append(s)
        return out


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
class MoleculeSet:
    """Labelled small-molecule structures for training graph nets and for convergence studies.

    Structures: ETKDG conformers of ``smiles`` (MMFF-relaxed), each displaced ``num_displacements`` times with
    Gaussian noise of ``sigma`` Å, labelled with ``calculator`` (GFN2-xTB by default). The labelled set is cached
    under ``cache_dir`` (safetensors + JSON) keyed by every parameter, then split by structure with ``seed``.

    Implements the data protocol of :mod:`unirep.converge`: ``__len__``, ``__getitem__``, ``collate`` (a
    ``GraphBatch``), ``token_groups`` (atomic numbers) and ``fingerprint``.
    """

    def __init__(
        self,
        smiles: Sequence[str],
        num_confs: int = 2,
        num_displacements: int = 10,
        sigma: float = 0.05,
        seed: int = 0,
        calculator: str = "gfn2",
        r_max: float = 5.0,
        split: str = "test",
        fractions: Sequence[float] = (0.6, 0.1, 0.3),
        cache_dir: str | None = "data/cache/converge",
        limit: int | None = None,
    ):
        params = {
            "smiles": list(smiles),
            "num_confs": num_confs,
            "num_displacements": num_displacements,
            "sigma": sigma,
            "seed": seed,
            "calculator": calculator,
            "r_max": r_max,
        }
        self.key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        full = _load_or_build(params, self.key, cache_dir)
        names = ("train", "val", "test")
        if split not in (*names, "all"):
            raise ValueError(f"MoleculeSet(split={split!r}): use one of train, val, test, all")
        if split == "all":
            idx = list(range(len(full)))
        else:
            idx = split_indices(len(full), fractions, seed=seed)[names.index(split)]
        if limit is not None:
            idx = idx[: int(limit)]
        self.data = full.subset(idx)
        self.split, self.limit, self.fractions = split, limit, list(fractions)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i]

    def collate(self, items: list) -> GraphBatch:
        return collate_graphs(items)

    def token_groups(self, i: int) -> Tensor:
        return self.data[i].numbers

    def fingerprint(self) -> str:
        return f"{self.key}-{self.split}-{self.fractions}-{self.limit}"

    @property
    def structures(self) -> list:
        return self.data.structures


def _load_or_build(params: dict[str, Any], key: str, cache_dir: str | None) -> AtomsDataset:
    path = Path(cache_dir) / key if cache_dir else None
    if path is not None and (path / "graphs.safetensors").exists():
        return AtomsDataset.load(path)
    t0 = time.time()
    confs = structures_from_smiles(params["smiles"], num_confs=params["num_confs"], seed=params["seed"])
    structures = []
    for k, s in enumerate(confs):
        structures += thermal_displacements(
            s,
            params["num_displacements"],
            params["sigma"],
            seed=params["seed"] * 100003 + k,
            prefix=f"{s.id or 'conf'}{k}",
        )
    structures = label_structures(structures, params["calculator"])
    ds = AtomsDataset(structures, params["r_max"], require_labels=True, name="MoleculeSet")
    log.info("labelled %d structures with %s in %.1f s", len(ds), params["calculator"], time.time() - t0)
    if path is not None:
        ds.save(path)
        (path / "params.json").write_text(json.dumps(params, indent=1))
    return ds


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------
def _fit_references(model: _Potential, data: AtomsDataset) -> None:
    """Least-squares per-element energies, and the force RMS as the output scale."""
    ref = fit_atomic_energies(data.structures, model.z_table)
    forces = np.concatenate([s.forces for s in data.structures])
    model.atomic_energies.copy_(torch.as_tensor(ref, dtype=torch.float64))
    model.scale.fill_(float(np.sqrt((forces**2).mean())))


def evaluate_forces(model: _Potential, data: Any, batch_size: int = 64) -> dict[str, float]:
    """Force MAE (eV/Å) and energy MAE per atom (eV) of a model on a labelled set."""
    model.eval()
    f_err, e_err, n_atoms, n_comp = 0.0, 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        b = collate_graphs([data[i] for i in range(start, min(len(data), start + batch_size))])
        out = model(b)
        f_err += float((out["forces"].detach() - b.forces).abs().sum())
        e_err += float(((out["energy"].detach() - b.energy).abs() / b.num_atoms).sum())
        n_comp += b.forces.numel()
        n_atoms += b.num_graphs
    return {"force_mae": f_err / n_comp, "energy_mae_per_atom": e_err / n_atoms}


GRAPHNET_RECIPE = "unirep-train experiment=molecular/graphnet"
# the graphnet recipe's defaults (configs/experiment/molecular/graphnet.yaml; a test keeps the two equal): the
# convergence study's 16 H/C/N/O molecules, 2 conformers x 10 displacements, GFN2-xTB labels
GRAPHNET_DATA = {
    "smiles": [
        "CCO",
        "c1ccccc1",
        "CC(=O)N",
        "NCC(=O)O",
        "CC(C)=O",
        "Cc1ccccc1",
        "OC=O",
        "CN",
        "CC(=O)Oc1ccccc1C(=O)O",
        "c1ccncc1",
        "NC(=O)N",
        "Oc1ccccc1",
        "CC(N)C(=O)O",
        "CCOC(C)=O",
        "C1CCOC1",
        "CC#N",
    ],
    "num_confs": 2,
    "num_displacements": 10,
    "sigma": 0.05,
    "seed": 0,
    "calculator": "gfn2",
    "r_max": 5.0,
    "cache_dir": "data/cache/converge",
}
GRAPHNET_TRAIN = {"steps": 300, "batch_size": 16, "lr": 3e-3}
_TRAIN_KEYS = {"steps": "trainer.max_steps", "batch_size": "trainer.batch_size", "lr": "optimizer.lr"}


class MoleculeSetData(DataModule):
    """The train / val splits of one :class:`MoleculeSet` as a DataModule of graphs (the graphnet recipe's data).

    ``molecules`` are :class:`MoleculeSet` keyword arguments (``split`` is set here)."""

    def __init__(self, **molecules: Any) -> None:
        molecules = {
            k: (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in molecules.items()
        }
        super().__init__(
            train=MoleculeSet(**molecules, split="train").data,
            val=MoleculeSet(**molecules, split="val").data,
            collate_fn=collate_graphs,
            info={"molecules": molecules},
        )


def _save_graphnet(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f"model.safetensors.{os.getpid()}.tmp"
    save_model(model, str(tmp))  # handles SchNet's shared filter-network tensors (pyg shares them)
    os.replace(tmp, path / "model.safetensors")
    tmp_meta = path / f"meta.json.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1))
    os.replace(tmp_meta, path / "meta.json")


class GraphNetTask(Task):
    """Train a SchNet / PaiNN on energies and forces on the one Trainer (``experiment=molecular/graphnet``).

    MACE's weighted energy-forces loss (per-atom energy error) on force-RMS-scaled errors; per-element reference
    energies and the force RMS are fitted on the training split when the task is built. ``evaluate`` reports the
    held-out force MAE and exports the model as a :class:`GraphNetEncoder` checkpoint (``model.safetensors`` +
    ``meta.json`` with its ``quality``) at ``export``.

    Args:
        model: the network.
        molecules: the :class:`MoleculeSet` arguments of the data (recorded in ``meta.json``; the references are fitted
            on its training split).
        energy_weight / forces_weight: λ_E, λ_F.
        export: folder of the exported checkpoint (``None``: no export).
        record: what ``meta.json`` stores besides the data: the seed and the training settings (``steps``,
            ``batch_size``, ``lr``), which :class:`GraphNetEncoder` compares with what it was asked for.
    """

    def __init__(
        self,
        model: _Potential,
        molecules: dict[str, Any] | None = None,
        energy_weight: float = 1.0,
        forces_weight: float = 10.0,
        export: str | None = None,
        record: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.energy_weight, self.forces_weight = float(energy_weight), float(forces_weight)
        self.molecules = json.loads(json.dumps(dict(molecules or {}), default=list))
        self.export = Path(export) if export else None
        self.record = json.loads(json.dumps(dict(record or {}), default=list))
        if self.molecules:
            _fit_references(self.model, MoleculeSet(**self.molecules, split="train").data)

    def forward(self, batch: GraphBatch, step: int) -> dict[str, Tensor]:
        out = self.model(batch)
        losses = energy_forces_loss(
            out["energy"],
            out["forces"],
            batch.energy,
            batch.forces,
            batch.num_atoms,
            self.energy_weight,
            self.forces_weight,
            float(self.model.scale),
        )
        with torch.no_grad():
            losses["mae/forces"] = (out["forces"] - batch.forces.double()).abs().mean()
        return {k: (v if k == "loss" else v.detach()) for k, v in losses.items()}

    def evaluate(self, data: DataModule, out_dir: str | os.PathLike, step: int) -> dict[str, float]:
        metrics = evaluate_forces(self.model, data.val) if data.val is not None and len(data.val) else {}
        if self.export is not None:
            seed = self.record.get("seed", 0)
            train = {k: v for k, v in self.record.items() if k != "seed"}
            meta = {"seed": seed, "train": train, "data": self.molecules, "step": step, **metrics}
            _save_graphnet(self.model, self.export, meta)
            mae = metrics.get("force_mae", float("nan"))
            print(f"[graphnet] exported {self.export} (held-out force MAE {mae:.4f} eV/A)", flush=True)
        return metrics


def graphnet_command(model: nn.Module, checkpoint: Path, train: dict[str, Any] | None, seed: int) -> str:
    """The exact ``unirep-train`` command that makes the checkpoint ``GraphNetEncoder`` was asked to load."""
    target = f"{type(model).__module__}.{type(model).__name__}"
    args = [GRAPHNET_RECIPE, f"task.model._target_={target}"]
    sizes = {"hidden": model.hidden, "num_layers": model.num_layers, "r_max": model.r_max}
    if hasattr(model, "rbf"):
        sizes["num_rbf"] = int(model.rbf.offset.numel())
    elif hasattr(model, "num_rbf"):
        sizes["num_rbf"] = int(model.num_rbf)
    args += [f"task.model.{k}={v}" for k, v in sizes.items()]
    args.append(f"task.model.z_table=[{','.join(map(str, model.z_table))}]")
    train = dict(train or {})
    data = dict(train.pop("data", None) or {})
    for k, v in data.items():
        if GRAPHNET_DATA.get(k) != (list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v):
            value = json.dumps(list(v)).replace(" ", "") if isinstance(v, Sequence) and not isinstance(v, str) else v
            args.append(f"'data.{k}={value}'" if isinstance(value, str) and "[" in value else f"data.{k}={value}")
    for k, v in {**GRAPHNET_TRAIN, **train}.items():
        if k in _TRAIN_KEYS:
            args.append(f"{_TRAIN_KEYS[k]}={v}")
        else:
            args.append(f"task.{k}={v}")
    args += [f"seed={seed}", f"task.export={checkpoint}", f"name=graphnet_{checkpoint.name}"]
    return " ".join(args)


class GraphNetEncoder(nn.Module):
    """A project-trained graph potential as a frozen encoder (every layer exposed); it only loads weights.

    Args:
        model: the network (built by hydra from a ``_target_``).
        checkpoint: folder with ``model.safetensors`` + ``meta.json`` (what ``experiment=molecular/graphnet`` exports
            with ``task.export=<folder>``).
        train: the settings the checkpoint must have been trained with (``data``: :class:`MoleculeSet` arguments,
            ``steps``, ``lr``, ``batch_size``): a missing checkpoint, or one trained otherwise, stops with the exact
            command that makes it. ``None`` with no checkpoint: the randomly initialised floor.
        seed: initialisation seed of the random floor, and the seed the checkpoint must have been trained with.
    """

    def __init__(
        self, model: _Potential, checkpoint: str | None = None, train: dict[str, Any] | None = None, seed: int = 0
    ):
        super().__init__()
        self.model = model
        torch.manual_seed(seed)
        for m in self.model.modules():  # re-initialise from this seed: hydra built the model under another
            if m is not self.model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        self.quality: float | None = None
        self.meta: dict[str, Any] = {}
        ckpt = Path(checkpoint) if checkpoint else None
        if ckpt is not None:
            if not (ckpt / "model.safetensors").exists():
                how = graphnet_command(model, ckpt, train, seed)
                raise FileNotFoundError(
                    f"graph-net checkpoint {ckpt} does not exist (no model.safetensors). Make it with\n    {how}\n"
                    "or fix the path (no checkpoint and no train: the randomly initialised floor)"
                )
            if self._stale(ckpt, train, seed):
                raise ValueError(
                    f"graph-net checkpoint {ckpt} was trained with other settings, data or seed than asked for "
                    f"(see its meta.json). Remake it with\n    {graphnet_command(model, ckpt, train, seed)}"
                )
            self._load(ckpt)
        self.quality = self.meta.get("force_mae")
        self.model.eval().requires_grad_(False)
        self.dim = self.model.hidden
        self.layer_names = ["embed"] + [f"interaction{i + 1}" for i in range(self.model.num_layers)]
        self.elements = list(self.model.z_table)

    @staticmethod
    def _stale(path: Path, train: dict[str, Any] | None, seed: int) -> bool:
        """Whether the checkpoint's meta.json disagrees with the settings asked for (only the keys asked for)."""
        if train is None or not (path / "meta.json").exists():
            return False
        meta = json.loads((path / "meta.json").read_text())
        train = json.loads(json.dumps(dict(train), default=list))
        data_kw = train.pop("data", None)
        stored = meta.get("train") or {}
        stale = any(stored.get(k) != v for k, v in train.items()) or meta.get("seed") != seed
        if data_kw is not None:
            stale = stale or meta.get("data") != data_kw
        return stale

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def feature_dim(self, index: int | None = None) -> int:
        return self.dim if index is None else self.model.feature_dim(index)

    def item_digests(self, sample: Any) -> list[str]:
        from molecular.teachers.base import structure_digests

        return structure_digests(sample)

    def _load(self, path: Path) -> None:
        try:
            missing, unexpected = load_model(self.model, str(path / "model.safetensors"), strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(
                f"checkpoint {path} does not fit {type(self.model).__name__}: {err}; was it trained with "
                "another architecture or size?"
            ) from err
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not fit {type(self.model).__name__}: missing {missing}, "
                f"unexpected {unexpected}; was it trained with another architecture or size?"
            )
        meta = path / "meta.json"
        self.meta = json.loads(meta.read_text()) if meta.exists() else {}

    def train(self, mode: bool = True) -> GraphNetEncoder:  # frozen encoder
        return super().train(False)

    @torch.no_grad()
    def forward_intermediates(self, sample: GraphBatch, indices: Any = None) -> tuple[dict, list[TokenSet]]:
        out, feats = self.model.forward_intermediates(sample, indices, compute_forces=False)
        return {k: v.detach() for k, v in out.items()}, [t.detach() for t in feats]

    def encode_layers(self, sample: GraphBatch) -> list[TokenSet]:
        return self.forward_intermediates(sample, None)[1]

    def encode(self, sample: GraphBatch) -> TokenSet:
        return self.forward_intermediates(sample, [-1])[1][0]
